//! learning-api: stays, places and next-place prediction per device (DESIGN.md, "learning-api").
#![forbid(unsafe_code)]

use std::future::Future;

use tokio::net::TcpListener;
use tonic::{Request, Response, Status, service::Routes};
use trackmesh_proto::v1::{
    ForgetRequest, ForgetResponse, GetPlacesRequest, GetPlacesResponse, GetProfileRequest,
    GetProfileResponse, ObserveRequest, ObserveResponse, PredictNextRequest, PredictNextResponse,
    learning_server::{Learning, LearningServer, SERVICE_NAME},
};
use trackmesh_shared::{
    config::{self, CommonConfig, ConfigError},
    redis::{Redis, RedisConfig},
    server::{self, ready_check},
};

pub const DEFAULT_PORT: u16 = 50052;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub redis: RedisConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(DEFAULT_PORT)?,
            redis: config::from_env()?,
        })
    }
}

impl AsRef<CommonConfig> for Config {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

/// Serves the Learning API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let redis = Redis::connect(&config.redis.target(), config.redis.redis_timeout.get())?;
    let routes = Routes::new(LearningServer::new(LearningService));
    let ready = ready_check(move || {
        let redis = redis.clone();
        async move { redis.ping().await }
    });
    let service = server::Service {
        name: SERVICE_NAME,
        routes,
        ready,
    };
    server::serve(&config.common, listener, service, shutdown).await
}

struct LearningService;

fn not_yet() -> Status {
    Status::unimplemented("learning-api does not learn yet")
}

#[tonic::async_trait]
impl Learning for LearningService {
    async fn observe(
        &self,
        _: Request<ObserveRequest>,
    ) -> Result<Response<ObserveResponse>, Status> {
        Err(not_yet())
    }

    async fn get_places(
        &self,
        _: Request<GetPlacesRequest>,
    ) -> Result<Response<GetPlacesResponse>, Status> {
        Err(not_yet())
    }

    async fn predict_next(
        &self,
        _: Request<PredictNextRequest>,
    ) -> Result<Response<PredictNextResponse>, Status> {
        Err(not_yet())
    }

    async fn get_profile(
        &self,
        _: Request<GetProfileRequest>,
    ) -> Result<Response<GetProfileResponse>, Status> {
        Err(not_yet())
    }

    async fn forget(&self, _: Request<ForgetRequest>) -> Result<Response<ForgetResponse>, Status> {
        Err(not_yet())
    }
}

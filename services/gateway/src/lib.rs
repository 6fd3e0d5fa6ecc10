//! gateway: the public trackmesh API (DESIGN.md, "gateway").
#![forbid(unsafe_code)]

use std::{future::Future, pin::Pin};

use serde::Deserialize;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming, service::Routes, transport::Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use trackmesh_proto::v1::{
    DailyStatsResponse, DeleteDeviceRequest, DeleteDeviceResponse, DevicePlacesRequest,
    DevicePredictRequest, GetDailyStatsRequest, GetPlacesResponse, GetTrackRequest, IngestRequest,
    IngestResponse, ListDevicesRequest, ListDevicesResponse, PredictNextResponse, TrackChunk,
    gateway_server::{Gateway, GatewayServer, SERVICE_NAME},
};
use trackmesh_shared::{
    config::{self, CommonConfig, ConfigError, Validate},
    server::{self, ready_check},
};

pub const DEFAULT_PORT: u16 = 50050;

#[derive(Debug, Clone)]
pub struct Config {
    pub common: CommonConfig,
    pub gateway: GatewayConfig,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self {
            common: CommonConfig::from_env(DEFAULT_PORT)?,
            gateway: config::from_env()?,
        })
    }
}

impl AsRef<CommonConfig> for Config {
    fn as_ref(&self) -> &CommonConfig {
        &self.common
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    pub refinement_addr: String,
    pub learning_addr: String,
    pub storage_addr: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            refinement_addr: "http://127.0.0.1:50051".into(),
            learning_addr: "http://127.0.0.1:50052".into(),
            storage_addr: "http://127.0.0.1:50053".into(),
        }
    }
}

impl Validate for GatewayConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        config::url("REFINEMENT_ADDR", &self.refinement_addr, "http")?;
        config::url("LEARNING_ADDR", &self.learning_addr, "http")?;
        config::url("STORAGE_ADDR", &self.storage_addr, "http")?;
        Ok(())
    }
}

/// Serves the Gateway API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let url = |var, value: &str| -> anyhow::Result<Endpoint> {
        Ok(Endpoint::from_shared(
            config::url(var, value, "http")?.to_string(),
        )?)
    };
    let refinement = url("REFINEMENT_ADDR", &config.gateway.refinement_addr)?.connect_lazy();
    let storage = url("STORAGE_ADDR", &config.gateway.storage_addr)?.connect_lazy();
    let routes = Routes::new(GatewayServer::new(GatewayService));
    let ready = ready_check(move || {
        let downstreams = [
            ("refinement", refinement.clone()),
            ("storage", storage.clone()),
        ];
        async move {
            for (name, channel) in downstreams {
                let status = HealthClient::new(channel)
                    .check(HealthCheckRequest::default())
                    .await
                    .map_err(|err| format!("{name}: {}", err.message()))?
                    .into_inner()
                    .status;
                if status != ServingStatus::Serving as i32 {
                    return Err(format!("{name}: not serving"));
                }
            }
            Ok(())
        }
    });
    let service = server::Service {
        name: SERVICE_NAME,
        routes,
        ready,
    };
    server::serve(&config.common, listener, service, shutdown).await
}

struct GatewayService;

fn not_yet() -> Status {
    Status::unimplemented("the gateway does not route yet")
}

type Stream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Gateway for GatewayService {
    type IngestStreamStream = Stream<IngestResponse>;
    type GetTrackStream = Stream<TrackChunk>;

    async fn ingest(&self, _: Request<IngestRequest>) -> Result<Response<IngestResponse>, Status> {
        Err(not_yet())
    }

    async fn ingest_stream(
        &self,
        _: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::IngestStreamStream>, Status> {
        Err(not_yet())
    }

    async fn get_track(
        &self,
        _: Request<GetTrackRequest>,
    ) -> Result<Response<Self::GetTrackStream>, Status> {
        Err(not_yet())
    }

    async fn get_daily_stats(
        &self,
        _: Request<GetDailyStatsRequest>,
    ) -> Result<Response<DailyStatsResponse>, Status> {
        Err(not_yet())
    }

    async fn list_devices(
        &self,
        _: Request<ListDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        Err(not_yet())
    }

    async fn get_places(
        &self,
        _: Request<DevicePlacesRequest>,
    ) -> Result<Response<GetPlacesResponse>, Status> {
        Err(not_yet())
    }

    async fn predict_next(
        &self,
        _: Request<DevicePredictRequest>,
    ) -> Result<Response<PredictNextResponse>, Status> {
        Err(not_yet())
    }

    async fn delete_device(
        &self,
        _: Request<DeleteDeviceRequest>,
    ) -> Result<Response<DeleteDeviceResponse>, Status> {
        Err(not_yet())
    }
}

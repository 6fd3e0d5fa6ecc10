//! storage-service: accepted fixes through Kafka into ClickHouse, and queries over them
//! (DESIGN.md, "storage-service").
#![forbid(unsafe_code)]

mod clickhouse;
mod config;
mod kafka;

use std::{future::Future, pin::Pin};

use tokio::net::TcpListener;
use tonic::{Request, Response, Status, service::Routes};
use trackmesh_proto::v1::{
    DailyStatsRequest, DailyStatsResponse, DeleteStoredDeviceRequest, DeleteStoredDeviceResponse,
    ListDevicesResponse, ListStoredDevicesRequest, QueryTrackRequest, StoreRequest, StoreResponse,
    TrackChunk,
    storage_server::{SERVICE_NAME, Storage, StorageServer},
};
use trackmesh_shared::server::{self, ready_check};

pub use config::{Config, DEFAULT_PORT, StorageConfig};

/// Serves the Storage API on `listener` until `shutdown` completes.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let db = clickhouse::Db::new(&config.storage);
    let kafka = kafka::Kafka::new(&config.storage)?;
    let routes = Routes::new(StorageServer::new(StorageService));
    let ready = ready_check(move || {
        let (db, kafka) = (db.clone(), kafka.clone());
        async move {
            db.ping().await?;
            kafka.ping().await
        }
    });
    let service = server::Service {
        name: SERVICE_NAME,
        routes,
        ready,
    };
    server::serve(&config.common, listener, service, shutdown).await
}

struct StorageService;

fn not_yet() -> Status {
    Status::unimplemented("storage-service does not store yet")
}

type TrackStream = Pin<Box<dyn futures::Stream<Item = Result<TrackChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Storage for StorageService {
    type QueryTrackStream = TrackStream;

    async fn store(&self, _: Request<StoreRequest>) -> Result<Response<StoreResponse>, Status> {
        Err(not_yet())
    }

    async fn query_track(
        &self,
        _: Request<QueryTrackRequest>,
    ) -> Result<Response<TrackStream>, Status> {
        Err(not_yet())
    }

    async fn daily_stats(
        &self,
        _: Request<DailyStatsRequest>,
    ) -> Result<Response<DailyStatsResponse>, Status> {
        Err(not_yet())
    }

    async fn list_devices(
        &self,
        _: Request<ListStoredDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        Err(not_yet())
    }

    async fn delete_device(
        &self,
        _: Request<DeleteStoredDeviceRequest>,
    ) -> Result<Response<DeleteStoredDeviceResponse>, Status> {
        Err(not_yet())
    }
}

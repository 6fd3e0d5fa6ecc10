//! The Storage gRPC service: Store produces to Kafka; queries read ClickHouse with bound values.

use std::{collections::BTreeMap, pin::Pin, time::Duration};

use futures::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use trackmesh_proto::v1::{
    DailyStat, DailyStatsRequest, DailyStatsResponse, DeleteHistoryRequest, DeleteHistoryResponse,
    DeleteStoredDeviceRequest, DeleteStoredDeviceResponse, DeviceSummary, EventType, Fix,
    GetEventsResponse, GetStaysResponse, GetTripsResponse, ListDevicesResponse,
    ListStoredDevicesRequest, QueryTrackRequest, RefinedFix, StoreRequest, StoreResponse,
    StoredEventsRequest, StoredHistoryRequest, TrackChunk, Verdict, storage_server::Storage,
};
use trackmesh_shared::{
    domain::{DeviceId, DeviceKey, Invalid, TenantId},
    fix_messages::FixBatch,
    geo,
    grpc::Deadline,
};

use crate::{
    clickhouse::{Db, EventFilter, HistoryFilter, SORT_FIELDS, TrackRow},
    config::StorageConfig,
    error::Error,
    events,
    kafka::Kafka,
};

const DAY_MS: i64 = 86_400_000;
/// Largest page of ListDevices.
const MAX_PAGE_SIZE: u32 = 1000;
const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest `limit` of a track query: beyond this, page with resume tokens.
const MAX_TRACK_LIMIT: u64 = 1_000_000_000;
/// Most events one GetEvents answers (the earliest ones); for more, ask again from the last
/// event's time (events at that very time come again).
const MAX_EVENTS: u64 = 10_000;
/// Most stays (or trips) one GetStays (GetTrips) answers, the earliest starts; for more, ask
/// again from the last one's start (it comes again).
const MAX_HISTORY: u64 = 10_000;
/// How long DeleteHistory waits for the server to apply its deletes before answering anyway.
const DELETE_HISTORY_WAIT: Duration = Duration::from_secs(10);

pub struct StorageService {
    db: Db,
    kafka: Kafka,
    produce_timeout: Duration,
    chunk_size: usize,
    max_sort_fields: usize,
}

impl StorageService {
    pub fn new(config: &StorageConfig, db: Db, kafka: Kafka) -> Self {
        Self {
            db,
            kafka,
            produce_timeout: config.produce_timeout.get(),
            chunk_size: config.streaming_chunk_size as usize,
            max_sort_fields: config.max_sort_fields as usize,
        }
    }

    #[tracing::instrument(name = "store", skip_all, fields(tenant = %tenant, fixes = fixes.len()))]
    async fn store(
        &self,
        tenant: &str,
        fixes: Vec<RefinedFix>,
        deadline: Deadline,
    ) -> Result<u32, Error> {
        TenantId::parse(tenant)?;
        // A device's fixes go to Kafka in order, on the partition of its key.
        let mut by_device: BTreeMap<String, Vec<RefinedFix>> = BTreeMap::new();
        let count = u32::try_from(fixes.len()).unwrap_or(u32::MAX);
        for (index, refined) in fixes.into_iter().enumerate() {
            check_storable(index, &refined)?;
            let device = refined
                .fix
                .as_ref()
                .map(|f| f.device_id.clone())
                .unwrap_or_default();
            by_device.entry(device).or_default().push(refined);
        }
        let batches: Vec<FixBatch> = by_device
            .into_iter()
            .map(|(device_id, fixes)| FixBatch {
                tenant_id: tenant.to_owned(),
                device_id,
                fixes: fixes.into_iter().map(Into::into).collect(),
            })
            .collect();
        let timeout = deadline.budget().min(self.produce_timeout);
        self.kafka.produce(batches, timeout).await?;
        Ok(count)
    }
}

type TrackStream = Pin<Box<dyn Stream<Item = Result<TrackChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Storage for StorageService {
    type QueryTrackStream = TrackStream;

    async fn store(
        &self,
        request: Request<StoreRequest>,
    ) -> Result<Response<StoreResponse>, Status> {
        let deadline = Deadline::from_metadata(request.metadata(), self.produce_timeout);
        let request = request.into_inner();
        let stored = self
            .store(&request.tenant_id, request.fixes, deadline)
            .await?;
        Ok(Response::new(StoreResponse { stored }))
    }

    async fn query_track(
        &self,
        request: Request<QueryTrackRequest>,
    ) -> Result<Response<TrackStream>, Status> {
        let request = request.into_inner();
        DeviceKey::parse(&request.tenant_id, &request.device_id).map_err(Error::from)?;
        let (mut from_ms, mut to_ms) =
            range(request.from_ms, request.to_ms).map_err(Error::from)?;
        if request.limit > MAX_TRACK_LIMIT {
            let rule = format!("at most {MAX_TRACK_LIMIT}; page with resume_token");
            return Err(Error::from(Invalid::new("limit", rule)).into());
        }
        if !request.resume_token.is_empty() {
            let after: i64 = request.resume_token.parse().map_err(|_| {
                Error::from(Invalid::new(
                    "resume_token",
                    "not a token from a TrackChunk",
                ))
            })?;
            if request.descending {
                to_ms = to_ms.min(after.saturating_sub(1));
            } else {
                from_ms = from_ms.max(after.saturating_add(1));
            }
        }
        let mut cursor = self
            .db
            .track(
                &request.tenant_id,
                &request.device_id,
                from_ms,
                to_ms,
                request.descending,
                request.limit,
            )
            .map_err(Error::from)?;
        let chunk_size = self.chunk_size;
        let device_id = request.device_id;
        // A small channel: the reader waits for the client, so memory stays bounded.
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut chunk = Vec::with_capacity(chunk_size);
            loop {
                match cursor.next().await {
                    Ok(Some(row)) => {
                        chunk.push(refined(&device_id, row));
                        if chunk.len() == chunk_size {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(chunk_size));
                            if tx.send(Ok(track_chunk(full))).await.is_err() {
                                return; // the client went away
                            }
                        }
                    }
                    Ok(None) => {
                        if !chunk.is_empty() {
                            let _ = tx.send(Ok(track_chunk(chunk))).await;
                        }
                        return;
                    }
                    Err(err) => {
                        let _ = tx.send(Err(Status::from(Error::from(err)))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn daily_stats(
        &self,
        request: Request<DailyStatsRequest>,
    ) -> Result<Response<DailyStatsResponse>, Status> {
        let request = request.into_inner();
        DeviceKey::parse(&request.tenant_id, &request.device_id).map_err(Error::from)?;
        let (from_ms, to_ms) = range(request.from_ms, request.to_ms).map_err(Error::from)?;
        let rows = self
            .db
            .daily(
                &request.tenant_id,
                &request.device_id,
                from_ms.div_euclid(DAY_MS),
                to_ms.div_euclid(DAY_MS),
            )
            .await
            .map_err(Error::from)?;
        let days = rows
            .into_iter()
            .map(|row| DailyStat {
                device_id: row.device_id,
                day: row.day,
                fixes: row.fixes,
                distance_m: row.distance_m,
                max_speed_kmh: row.max_speed_kmh,
                first_ms: row.first_ms,
                last_ms: row.last_ms,
            })
            .collect();
        Ok(Response::new(DailyStatsResponse { days }))
    }

    async fn list_devices(
        &self,
        request: Request<ListStoredDevicesRequest>,
    ) -> Result<Response<ListDevicesResponse>, Status> {
        let request = request.into_inner();
        TenantId::parse(&request.tenant_id).map_err(Error::from)?;
        let sort = sort_fields(&request.sort, self.max_sort_fields).map_err(Error::from)?;
        let page_size = match request.page_size {
            0 => DEFAULT_PAGE_SIZE,
            size if size > MAX_PAGE_SIZE => {
                let rule = format!("at most {MAX_PAGE_SIZE}");
                return Err(Error::from(Invalid::new("page_size", rule)).into());
            }
            size => size,
        };
        let offset: u64 = if request.page_token.is_empty() {
            0
        } else {
            request.page_token.parse().map_err(|_| {
                Error::from(Invalid::new(
                    "page_token",
                    "not a token from a ListDevicesResponse",
                ))
            })?
        };
        let rows = self
            .db
            .devices(&request.tenant_id, &sort, offset, u64::from(page_size))
            .await
            .map_err(Error::from)?;
        let next_page_token = if rows.len() == page_size as usize {
            (offset + rows.len() as u64).to_string()
        } else {
            String::new()
        };
        let pairs: Vec<(&str, i64)> = rows
            .iter()
            .map(|row| (row.device_id.as_str(), row.last_ms))
            .collect();
        let positions = self
            .db
            .last_positions(&request.tenant_id, &pairs)
            .await
            .map_err(Error::from)?;
        let devices = rows
            .into_iter()
            .map(|row| {
                // Unknown (NaN) only for a device deleted between the two queries.
                let (last_lat, last_lon) = positions
                    .get(&row.device_id)
                    .copied()
                    .unwrap_or((f64::NAN, f64::NAN));
                DeviceSummary {
                    device_id: row.device_id,
                    fixes: row.fixes,
                    first_ms: row.first_ms,
                    last_ms: row.last_ms,
                    distance_m: row.distance_m,
                    max_speed_kmh: row.max_speed_kmh,
                    last_lat,
                    last_lon,
                    fixes_today: row.fixes_today,
                    distance_today_m: row.distance_today_m,
                }
            })
            .collect();
        Ok(Response::new(ListDevicesResponse {
            devices,
            next_page_token,
        }))
    }

    async fn delete_device(
        &self,
        request: Request<DeleteStoredDeviceRequest>,
    ) -> Result<Response<DeleteStoredDeviceResponse>, Status> {
        let request = request.into_inner();
        let key = DeviceKey::parse(&request.tenant_id, &request.device_id).map_err(Error::from)?;
        // The marker first: fixes of the device still in Kafka are deleted when the consumer
        // reaches it; what is stored already goes now.
        self.kafka
            .produce_delete_marker(key, self.produce_timeout)
            .await?;
        self.db
            .delete_device(&key.tenant, &key.device)
            .await
            .map_err(Error::from)?;
        tracing::info!(tenant = %request.tenant_id, "stored fixes of a device deleted");
        Ok(Response::new(DeleteStoredDeviceResponse {}))
    }

    async fn get_events(
        &self,
        request: Request<StoredEventsRequest>,
    ) -> Result<Response<GetEventsResponse>, Status> {
        let request = request.into_inner();
        TenantId::parse(&request.tenant_id).map_err(Error::from)?;
        // Empty: every device of the tenant.
        let device = (!request.device_id.is_empty())
            .then(|| DeviceId::parse("device_id", &request.device_id))
            .transpose()
            .map_err(Error::from)?;
        let (from_ms, to_ms) = range(request.from_ms, request.to_ms).map_err(Error::from)?;
        let types = event_types(&request.types).map_err(Error::from)?;
        let rows = self
            .db
            .events(&EventFilter {
                tenant: &request.tenant_id,
                device: device.as_deref(),
                from_ms,
                to_ms,
                types: &types,
                limit: MAX_EVENTS,
            })
            .await
            .map_err(Error::from)?;
        let events = rows.into_iter().map(events::event).collect();
        Ok(Response::new(GetEventsResponse { events }))
    }

    async fn get_stays(
        &self,
        request: Request<StoredHistoryRequest>,
    ) -> Result<Response<GetStaysResponse>, Status> {
        let request = request.into_inner();
        let filter = history_filter(&request).map_err(Error::from)?;
        let rows = self.db.stays(&filter).await.map_err(Error::from)?;
        let stays = rows.into_iter().map(events::stay).collect();
        Ok(Response::new(GetStaysResponse { stays }))
    }

    async fn get_trips(
        &self,
        request: Request<StoredHistoryRequest>,
    ) -> Result<Response<GetTripsResponse>, Status> {
        let request = request.into_inner();
        let filter = history_filter(&request).map_err(Error::from)?;
        let rows = self.db.trips(&filter).await.map_err(Error::from)?;
        let trips = rows.into_iter().map(events::trip).collect();
        Ok(Response::new(GetTripsResponse { trips }))
    }

    async fn delete_history(
        &self,
        request: Request<DeleteHistoryRequest>,
    ) -> Result<Response<DeleteHistoryResponse>, Status> {
        let request = request.into_inner();
        DeviceKey::parse(&request.tenant_id, &request.device_id).map_err(Error::from)?;
        let applied = self
            .db
            .delete_history(
                &request.tenant_id,
                &request.device_id,
                request.from_ms,
                DELETE_HISTORY_WAIT,
            )
            .await
            .map_err(Error::from)?;
        if applied {
            tracing::info!(tenant = %request.tenant_id, from_ms = request.from_ms, "stored stays and trips of a device deleted");
        } else {
            // Submitted: the server applies it later; rows stored from now on are not touched.
            tracing::warn!(tenant = %request.tenant_id, from_ms = request.from_ms, "stays and trips delete still being applied");
        }
        Ok(Response::new(DeleteHistoryResponse {}))
    }
}

/// A checked stays or trips request: rows overlapping `[from_ms, to_ms]` (0: no bound).
fn history_filter(request: &StoredHistoryRequest) -> Result<HistoryFilter<'_>, Invalid> {
    DeviceKey::parse(&request.tenant_id, &request.device_id)?;
    let (from_ms, to_ms) = range(request.from_ms, request.to_ms)?;
    Ok(HistoryFilter {
        tenant: &request.tenant_id,
        device: &request.device_id,
        from_ms,
        to_ms,
        limit: MAX_HISTORY,
    })
}

/// The requested event types as stored (1..=4), each once; empty: every type.
fn event_types(types: &[i32]) -> Result<Vec<u8>, Invalid> {
    let mut out = Vec::with_capacity(types.len());
    for (index, &value) in types.iter().enumerate() {
        let known = match EventType::try_from(value) {
            Ok(EventType::Unspecified) | Err(_) => {
                return Err(Invalid::new(
                    format!("types[{index}]"),
                    format!("{value} is not an event type; allowed ENTER, EXIT, ARRIVE, DEPART"),
                ));
            }
            Ok(known) => u8::try_from(known as i32).unwrap_or_default(),
        };
        if !out.contains(&known) {
            out.push(known);
        }
    }
    Ok(out)
}

/// Only accepted fixes with a device and valid coordinates are stored.
fn check_storable(index: usize, refined: &RefinedFix) -> Result<(), Invalid> {
    let field = |name: &str| format!("fixes[{index}].{name}");
    let Some(fix) = &refined.fix else {
        return Err(Invalid::new(field("fix"), "required"));
    };
    if refined.verdict() != Verdict::Accepted {
        return Err(Invalid::new(
            field("verdict"),
            "only ACCEPTED fixes are stored",
        ));
    }
    DeviceId::parse(format_args!("fixes[{index}].fix.device_id"), &fix.device_id)?;
    if !geo::valid_coordinates(fix.lat, fix.lon) {
        return Err(Invalid::new(
            field("fix.lat"),
            "lat/lon out of range or not finite",
        ));
    }
    Ok(())
}

/// An inclusive time range; `to_ms` 0 means no upper bound.
fn range(from_ms: i64, to_ms: i64) -> Result<(i64, i64), Invalid> {
    let to_ms = if to_ms == 0 { i64::MAX } else { to_ms };
    if from_ms > to_ms {
        return Err(Invalid::new(
            "from_ms",
            format!("{from_ms} is after to_ms {to_ms}"),
        ));
    }
    Ok((from_ms, to_ms))
}

/// Validates sort keys against the whitelist; only names from it reach the SQL.
fn sort_fields(
    sort: &[trackmesh_proto::v1::SortField],
    max: usize,
) -> Result<Vec<(&'static str, bool)>, Invalid> {
    if sort.len() > max {
        return Err(Invalid::new(
            "sort",
            format!("{} fields, at most MAX_SORT_FIELDS={max}", sort.len()),
        ));
    }
    let mut fields: Vec<(&'static str, bool)> = Vec::with_capacity(sort.len());
    for (index, key) in sort.iter().enumerate() {
        let Some(name) = SORT_FIELDS.iter().find(|name| **name == key.field) else {
            return Err(Invalid::new(
                format!("sort[{index}].field"),
                format!("unknown field; allowed: {}", SORT_FIELDS.join(", ")),
            ));
        };
        if fields.iter().any(|(seen, _)| seen == name) {
            return Err(Invalid::new(
                format!("sort[{index}].field"),
                format!("{name} given twice"),
            ));
        }
        fields.push((name, key.descending));
    }
    Ok(fields)
}

fn refined(device_id: &str, row: TrackRow) -> RefinedFix {
    RefinedFix {
        fix: Some(Fix {
            device_id: device_id.to_owned(),
            time_ms: row.time_ms,
            lat: row.lat,
            lon: row.lon,
            accuracy_m: row.accuracy_m,
            speed_mps: row.speed_mps,
            heading_deg: row.heading_deg,
            altitude_m: row.altitude_m,
        }),
        verdict: Verdict::Accepted as i32,
        replay: false,
        segment: row.segment,
        distance_m: row.distance_m,
        dt_ms: row.dt_ms,
        speed_kmh: row.speed_kmh,
        detail: String::new(),
        reanchored: row.reanchored != 0,
    }
}

fn track_chunk(fixes: Vec<RefinedFix>) -> TrackChunk {
    let resume_token = fixes
        .last()
        .and_then(|last| last.fix.as_ref())
        .map(|fix| fix.time_ms.to_string())
        .unwrap_or_default();
    TrackChunk {
        fixes,
        resume_token,
    }
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::SortField;

    use super::*;

    fn sort(fields: &[&str]) -> Vec<SortField> {
        fields
            .iter()
            .map(|f| SortField {
                field: (*f).into(),
                descending: true,
            })
            .collect()
    }

    #[test]
    fn sort_fields_come_from_the_whitelist_only() {
        assert_eq!(
            sort_fields(&sort(&["fixes", "device_id"]), 5).unwrap(),
            [("fixes", true), ("device_id", true)]
        );
        let err = sort_fields(&sort(&["fixes; DROP TABLE fixes"]), 5).unwrap_err();
        assert!(
            err.to_string().starts_with("sort[0].field: unknown field"),
            "{err}"
        );
        let err = sort_fields(&sort(&["fixes", "fixes"]), 5).unwrap_err();
        assert_eq!(err.to_string(), "sort[1].field: fixes given twice");
        let err = sort_fields(&sort(&["fixes", "first_ms", "last_ms"]), 2).unwrap_err();
        assert_eq!(err.to_string(), "sort: 3 fields, at most MAX_SORT_FIELDS=2");
    }

    #[test]
    fn event_types_are_checked_and_deduplicated() {
        assert_eq!(event_types(&[]).unwrap(), Vec::<u8>::new());
        assert_eq!(event_types(&[4, 1, 4]).unwrap(), [4, 1]);
        assert_eq!(
            event_types(&[1, 0]).unwrap_err().to_string(),
            "types[1]: 0 is not an event type; allowed ENTER, EXIT, ARRIVE, DEPART"
        );
        assert!(
            event_types(&[5])
                .unwrap_err()
                .to_string()
                .starts_with("types[0]: 5 ")
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(range(5, 0).unwrap(), (5, i64::MAX));
        assert_eq!(range(5, 5).unwrap(), (5, 5));
        assert_eq!(
            range(6, 5).unwrap_err().to_string(),
            "from_ms: 6 is after to_ms 5"
        );
    }

    #[test]
    fn only_accepted_fixes_are_storable() {
        let mut refined = RefinedFix {
            fix: Some(Fix {
                device_id: "d".into(),
                time_ms: 1,
                lat: 1.0,
                lon: 1.0,
                ..Fix::default()
            }),
            verdict: Verdict::Accepted as i32,
            ..RefinedFix::default()
        };
        assert!(check_storable(0, &refined).is_ok());
        refined.verdict = Verdict::Speed as i32;
        assert_eq!(
            check_storable(3, &refined).unwrap_err().to_string(),
            "fixes[3].verdict: only ACCEPTED fixes are stored"
        );
        refined.fix = None;
        assert!(check_storable(0, &refined).is_err());
    }
}

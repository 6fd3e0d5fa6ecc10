//! Watch: live fixes and events for subscribers (gRPC `Watch` and SSE `/v1/live`).
//!
//! One tail per gateway reads the fixes and events topics from their ends and broadcasts each
//! decoded message to every subscriber, which filters it (tenant, devices, area). The broadcast
//! buffer is shared and bounded (WATCH_BUFFER messages): a subscriber that reads too slowly
//! skips ahead and gets a `Lag` message, and never holds back the tail or anyone else.
//! Every message carries a resume token, the subscriber's position in each partition of each
//! topic (offset, and fix or event within the message); a subscriber that resumes reads from
//! there with a reader of its own until it reaches the tail, then joins the broadcast.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use futures::Stream;
use rdkafka::Message as _;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;
use trackmesh_proto::v1::{BoundingBox, Lag, WatchMessage, watch_message::Item};
use trackmesh_shared::domain::{DeviceId, Invalid};

use crate::{
    error::Error,
    kafka::{Batch, Items, Reader, Seen, TOPICS},
};

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchMessage, Status>> + Send>>;

/// Most device ids one subscription may filter on.
pub const MAX_DEVICE_IDS: usize = 1000;

/// What a subscriber receives: its tenant's fixes and events, of some devices, in an area.
#[derive(Clone, Debug)]
pub struct Filter {
    tenant: String,
    devices: Vec<String>,
    bbox: Option<BoundingBox>,
}

impl Filter {
    /// Checks the request's filters; errors name the field.
    pub fn new(
        tenant: String,
        mut devices: Vec<String>,
        bbox: Option<BoundingBox>,
    ) -> Result<Self, Error> {
        if devices.len() > MAX_DEVICE_IDS {
            return Err(Invalid::new(
                "device_ids",
                format!("at most {MAX_DEVICE_IDS} devices per subscription"),
            )
            .into());
        }
        for device in &devices {
            DeviceId::parse("device_ids", device)?;
        }
        devices.sort_unstable();
        devices.dedup();
        if let Some(b) = &bbox {
            for (field, value, limit) in [
                ("bbox.min_lat", b.min_lat, 90.0),
                ("bbox.max_lat", b.max_lat, 90.0),
                ("bbox.min_lon", b.min_lon, 180.0),
                ("bbox.max_lon", b.max_lon, 180.0),
            ] {
                if !(value.is_finite() && value.abs() <= limit) {
                    return Err(
                        Invalid::new(field, format!("must be a number within ±{limit}")).into(),
                    );
                }
            }
            if b.min_lat > b.max_lat {
                return Err(Invalid::new("bbox.min_lat", "must not be above bbox.max_lat").into());
            }
        }
        Ok(Self {
            tenant,
            devices,
            bbox,
        })
    }

    fn device(&self, tenant: &str, device: &str) -> bool {
        tenant == self.tenant
            && (self.devices.is_empty()
                || self
                    .devices
                    .binary_search_by(|d| d.as_str().cmp(device))
                    .is_ok())
    }

    fn place(&self, lat: f64, lon: f64) -> bool {
        let Some(b) = &self.bbox else { return true };
        let lon_inside = if b.min_lon <= b.max_lon {
            (b.min_lon..=b.max_lon).contains(&lon)
        } else {
            // Across the antimeridian.
            lon >= b.min_lon || lon <= b.max_lon
        };
        (b.min_lat..=b.max_lat).contains(&lat) && lon_inside
    }
}

/// Where a subscriber is in each partition of each topic: the next message's offset, and how
/// many fixes or events of that message it has already had.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position([Vec<(i64, u32)>; TOPICS]);

impl Position {
    fn at(offsets: &[Vec<i64>; TOPICS]) -> Self {
        Self(
            offsets
                .clone()
                .map(|o| o.iter().map(|&offset| (offset, 0)).collect()),
        )
    }

    /// The opaque token of this position.
    pub fn token(&self) -> String {
        let topics: Vec<String> = self
            .0
            .iter()
            .map(|partitions| {
                let text: Vec<String> = partitions
                    .iter()
                    .map(|(offset, had)| format!("{offset}:{had}"))
                    .collect();
                text.join(",")
            })
            .collect();
        URL_SAFE_NO_PAD.encode(format!("2;{}", topics.join(";")))
    }

    /// Reads a token `token` wrote.
    pub fn parse(token: &str) -> Result<Self, Error> {
        let invalid = || {
            Error::from(Invalid::new(
                "resume_token",
                "not a token of a WatchMessage",
            ))
        };
        let text = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
        let text = String::from_utf8(text).map_err(|_| invalid())?;
        let mut topics = text.strip_prefix("2;").ok_or_else(invalid)?.split(';');
        let mut position = Self::default();
        for partitions in &mut position.0 {
            let text = topics.next().ok_or_else(invalid)?;
            *partitions = text
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (offset, had) = p.split_once(':').ok_or_else(invalid)?;
                    let offset: i64 = offset.parse().map_err(|_| invalid())?;
                    let had: u32 = had.parse().map_err(|_| invalid())?;
                    if offset < 0 {
                        return Err(invalid());
                    }
                    Ok((offset, had))
                })
                .collect::<Result<_, _>>()?;
        }
        if topics.next().is_some() {
            return Err(invalid());
        }
        Ok(position)
    }
}

/// One subscriber's filter and position.
struct Subscription {
    filter: Filter,
    position: Position,
}

impl Subscription {
    /// Appends to `out` what `batch` holds for this subscriber, moving its position past it.
    fn take(&mut self, batch: &Batch, out: &mut Vec<WatchMessage>) {
        let Ok(p) = usize::try_from(batch.partition) else {
            return;
        };
        let partitions = &mut self.position.0[batch.topic];
        if p >= partitions.len() {
            // A partition added after the position was taken: from its start.
            partitions.resize(p + 1, (0, 0));
        }
        let (offset, had) = partitions[p];
        if batch.offset < offset {
            return;
        }
        let skip = if batch.offset == offset { had } else { 0 };
        let mut emit = |position: &mut Position, i: u32, item: Item| {
            position.0[batch.topic][p] = (batch.offset, i + 1);
            out.push(WatchMessage {
                item: Some(item),
                resume_token: position.token(),
            });
        };
        match &batch.items {
            Items::Fixes(devices) => {
                for device in devices {
                    if !self.filter.device(&device.tenant, &device.device) {
                        continue;
                    }
                    for (i, fix) in &device.fixes {
                        let Some(f) = &fix.fix else { continue };
                        if *i >= skip && self.filter.place(f.lat, f.lon) {
                            emit(&mut self.position, *i, Item::Fix(fix.clone()));
                        }
                    }
                }
            }
            Items::Events(events) => {
                for (i, event) in &events.events {
                    if *i >= skip
                        && self.filter.device(&events.tenant, &event.device_id)
                        && self.filter.place(event.lat, event.lon)
                    {
                        emit(&mut self.position, *i, Item::Event(event.clone()));
                    }
                }
            }
        }
        self.position.0[batch.topic][p] = (batch.offset + 1, 0);
    }

    fn lag(&self, dropped: u64) -> WatchMessage {
        WatchMessage {
            item: Some(Item::Lag(Lag { dropped })),
            resume_token: self.position.token(),
        }
    }
}

/// The tail's state: where it is, and the channel to subscribers.
struct Tail {
    /// Next offset per partition of each topic; empty until the topics have been read once.
    offsets: Option<[Vec<i64>; TOPICS]>,
    /// `None` once the gateway shuts down: subscribers then end.
    sender: Option<broadcast::Sender<Arc<Batch>>>,
}

/// The fixes and events topics, fanned out to subscribers.
#[derive(Clone)]
pub struct Hub {
    brokers: String,
    topics: [String; TOPICS],
    tail: Arc<Mutex<Tail>>,
}

impl Hub {
    /// Starts the tail; subscriptions are served once it has read the topics' ends.
    pub fn start(
        brokers: &str,
        topics: [String; TOPICS],
        buffer: usize,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        trackmesh_shared::metrics::register(
            &[
                "gateway_watch_fixes_total",
                "gateway_watch_events_total",
                "gateway_watch_lagged_messages_total",
            ],
            &["gateway_watch_subscribers"],
        );
        let (sender, _) = broadcast::channel(buffer);
        let hub = Self {
            brokers: brokers.to_owned(),
            topics,
            tail: Arc::new(Mutex::new(Tail {
                offsets: None,
                sender: Some(sender),
            })),
        };
        let task = tokio::spawn(hub.clone().run_tail());
        (hub, task)
    }

    /// Ends every subscription (shutdown): their clients resume elsewhere with their tokens.
    pub fn close(&self) {
        self.lock().sender = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn run_tail(self) {
        // Storage creates the topics: a gateway started first waits for them.
        let mut pause = Duration::from_millis(250);
        let reader = loop {
            match self.open_tail().await {
                Ok(reader) => break reader,
                Err(err) => {
                    tracing::warn!(topics = ?self.topics, error = %err, retry_in = ?pause, "topics not readable yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                }
            }
        };
        tracing::info!(topics = ?self.topics, "watch reads the topics");
        let mut seen = Seen::default();
        loop {
            let message = match reader.consumer.recv().await {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(error = %err, "topic read failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let topic = self.topics.iter().position(|t| t == message.topic());
            let (partition, offset) = (message.partition(), message.offset());
            let batch = reader.decode(&message, &mut seen);
            drop(message);
            // Offsets and broadcast move together: a subscriber's starting position is then
            // exactly the first message it receives.
            let mut tail = self.lock();
            let Tail { offsets, sender } = &mut *tail;
            let Some(sender) = sender else { return };
            if let Some(next) = topic.zip(offsets.as_mut()).and_then(|(topic, offsets)| {
                offsets[topic].get_mut(usize::try_from(partition).ok()?)
            }) {
                *next = offset + 1;
            }
            if let Some(batch) = batch {
                // No receivers is no error: nobody is watching.
                let _ = sender.send(Arc::new(batch));
            }
        }
    }

    /// A reader at the topics' ends, its offsets noted as the tail's.
    async fn open_tail(&self) -> Result<Reader, String> {
        let (brokers, topics) = (self.brokers.clone(), self.topics.clone());
        let (reader, offsets) = tokio::task::spawn_blocking(move || {
            let reader = Reader::new(&brokers, &topics)?;
            let offsets = reader
                .watermarks()?
                .map(|w| w.iter().map(|w| w.high).collect::<Vec<i64>>());
            let mut from = Vec::new();
            for (topic, offsets) in offsets.iter().enumerate() {
                from.extend((0..).zip(offsets).map(|(p, &o)| (topic, p, o)));
            }
            reader.assign(&from)?;
            Ok::<_, rdkafka::error::KafkaError>((reader, offsets))
        })
        .await
        .map_err(|err| err.to_string())?
        .map_err(|err| err.to_string())?;
        self.lock().offsets = Some(offsets);
        Ok(reader)
    }

    /// A stream of what `filter` selects, from `resume` or from now on.
    pub fn subscribe(
        &self,
        filter: Filter,
        resume: Option<Position>,
    ) -> Result<WatchStream, Error> {
        let (receiver, now) = {
            let tail = self.lock();
            let sender = tail.sender.as_ref().ok_or(Error::LiveEnded)?;
            let offsets = tail.offsets.as_ref().ok_or(Error::LiveStarting)?;
            (sender.subscribe(), Position::at(offsets))
        };
        let (position, catch_up) = match resume {
            None => (now.clone(), None),
            Some(mut position) => {
                let mut behind = false;
                for (mine, tail) in position.0.iter_mut().zip(&now.0) {
                    // Partitions the token does not know: from where the tail is.
                    if mine.len() < tail.len() {
                        let known = mine.len();
                        mine.extend_from_slice(&tail[known..]);
                    }
                    behind |= tail.iter().zip(mine.iter()).any(|(n, p)| p.0 < n.0);
                }
                (position, behind.then_some(now))
            }
        };
        let (sender, stream) = mpsc::channel(64);
        let subscriber = Subscriber {
            subscription: Subscription { filter, position },
            sender,
            out: Vec::new(),
        };
        tokio::spawn(subscriber.run(self.clone(), receiver, catch_up));
        Ok(Box::pin(ReceiverStream::new(stream)))
    }
}

struct Subscriber {
    subscription: Subscription,
    sender: mpsc::Sender<Result<WatchMessage, Status>>,
    out: Vec<WatchMessage>,
}

impl Subscriber {
    async fn run(
        mut self,
        hub: Hub,
        mut receiver: broadcast::Receiver<Arc<Batch>>,
        catch_up: Option<Position>,
    ) {
        let _count = Count::new();
        if let Some(until) = catch_up
            && let Err(status) = self.catch_up(&hub, &until).await
        {
            let _ = self.sender.send(Err(status)).await;
            return;
        }
        loop {
            let received = tokio::select! {
                received = receiver.recv() => received,
                () = self.sender.closed() => return,
            };
            match received {
                Ok(batch) => {
                    if !self.deliver(&batch).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(dropped)) => {
                    metrics::counter!("gateway_watch_lagged_messages_total").increment(dropped);
                    let lag = self.subscription.lag(dropped);
                    if self.sender.send(Ok(lag)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = self.sender.send(Err(Error::LiveEnded.into())).await;
                    return;
                }
            }
        }
    }

    /// Sends what `batch` holds for this subscriber; false once the client has gone.
    async fn deliver(&mut self, batch: &Batch) -> bool {
        self.subscription.take(batch, &mut self.out);
        let name = match batch.items {
            Items::Fixes(_) => "gateway_watch_fixes_total",
            Items::Events(_) => "gateway_watch_events_total",
        };
        metrics::counter!(name).increment(self.out.len() as u64);
        for message in self.out.drain(..) {
            if self.sender.send(Ok(message)).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Reads the topics from the subscriber's position up to `until` (where the tail was when
    /// it subscribed), with a reader of its own.
    async fn catch_up(&mut self, hub: &Hub, until: &Position) -> Result<(), Status> {
        let (brokers, topics) = (hub.brokers.clone(), hub.topics.clone());
        let unavailable = |err: String| Status::unavailable(format!("watch topics: {err}"));
        let (reader, watermarks) = tokio::task::spawn_blocking(move || {
            let reader = Reader::new(&brokers, &topics)?;
            let watermarks = reader.watermarks()?;
            Ok::<_, rdkafka::error::KafkaError>((reader, watermarks))
        })
        .await
        .map_err(|err| unavailable(err.to_string()))?
        .map_err(|err| unavailable(err.to_string()))?;
        // What retention has deleted since the token was written is lost: say how much.
        let mut dropped = 0;
        let mut assign = Vec::new();
        let mut pending = Vec::new();
        for (topic, marks) in watermarks.iter().enumerate() {
            let from = self.subscription.position.0[topic].clone();
            for (p, ((offset, _), (end, _))) in from.iter().zip(&until.0[topic]).enumerate() {
                if offset >= end {
                    continue;
                }
                let low = marks.get(p).map_or(0, |w| w.low);
                let start = if *offset < low {
                    dropped += u64::try_from(low - offset).unwrap_or_default();
                    self.subscription.position.0[topic][p] = (low, 0);
                    low
                } else {
                    *offset
                };
                if start < *end {
                    let partition = i32::try_from(p).unwrap_or(i32::MAX);
                    assign.push((topic, partition, start));
                    pending.push((topic, partition, *end));
                }
            }
        }
        if dropped > 0 {
            metrics::counter!("gateway_watch_lagged_messages_total").increment(dropped);
            let lag = self.subscription.lag(dropped);
            self.sender
                .send(Ok(lag))
                .await
                .map_err(|_| Status::cancelled("client gone"))?;
        }
        if pending.is_empty() {
            return Ok(());
        }
        reader
            .assign(&assign)
            .map_err(|err| unavailable(err.to_string()))?;
        let mut seen = Seen::default();
        while !pending.is_empty() {
            let message = tokio::select! {
                message = reader.consumer.recv() => message.map_err(|err| unavailable(err.to_string()))?,
                () = self.sender.closed() => return Err(Status::cancelled("client gone")),
            };
            let topic = reader.topics.iter().position(|t| t == message.topic());
            let (partition, offset) = (message.partition(), message.offset());
            let batch = reader.decode(&message, &mut seen);
            drop(message);
            if let Some(batch) = batch
                && !self.deliver(&batch).await
            {
                return Err(Status::cancelled("client gone"));
            }
            pending
                .retain(|&(t, p, end)| !(Some(t) == topic && p == partition && offset + 1 >= end));
        }
        Ok(())
    }
}

/// The subscriber gauge, held for a subscription's life.
struct Count;

impl Count {
    fn new() -> Self {
        metrics::gauge!("gateway_watch_subscribers").increment(1.0);
        Self
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        metrics::gauge!("gateway_watch_subscribers").decrement(1.0);
    }
}

//! `trackctl watch`: the tenant's live fixes (gateway Watch), printed one per line, or counted
//! over many subscribers at once for the fan-out benchmark.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use futures::StreamExt as _;
use trackmesh_proto::v1::{BoundingBox, WatchRequest, watch_message::Item};

use crate::client::{Target, status_error};

/// Subscriptions per HTTP/2 connection when counting.
const PER_CONNECTION: u32 = 100;

pub struct Options {
    pub devices: Vec<String>,
    pub bbox: Option<String>,
    pub subscribers: u32,
    pub duration: Option<Duration>,
    pub json: bool,
}

fn bbox(text: &str) -> anyhow::Result<BoundingBox> {
    let n: Vec<f64> = text
        .split(',')
        .map(|n| n.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .ok()
        .filter(|n: &Vec<f64>| n.len() == 4)
        .context("--bbox: four numbers min_lon,min_lat,max_lon,max_lat")?;
    Ok(BoundingBox {
        min_lon: n[0],
        min_lat: n[1],
        max_lon: n[2],
        max_lat: n[3],
    })
}

#[derive(Default)]
struct Counts {
    fixes: AtomicU64,
    lags: AtomicU64,
    dropped: AtomicU64,
}

pub async fn run(target: &Target, options: Options) -> anyhow::Result<()> {
    let request = WatchRequest {
        device_ids: options.devices,
        bbox: options.bbox.as_deref().map(bbox).transpose()?,
        resume_token: String::new(),
    };
    let counts = Arc::new(Counts::default());
    let print = options.subscribers == 1 && !options.json;
    let mut tasks = Vec::new();
    let mut client = target.connect().await?;
    for i in 0..options.subscribers {
        if i > 0 && i % PER_CONNECTION == 0 {
            client = target.connect().await?;
        }
        let mut stream = client
            .watch(request.clone())
            .await
            .map_err(|status| status_error("watch", &status))?
            .into_inner();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(message) = stream.next().await {
                let message = message.map_err(|status| status_error("watch", &status))?;
                match message.item {
                    Some(Item::Fix(refined)) => {
                        counts.fixes.fetch_add(1, Ordering::Relaxed);
                        if print && let Some(fix) = refined.fix {
                            println!(
                                "{}\t{}\t{:.6}\t{:.6}\tsegment {}",
                                fix.device_id, fix.time_ms, fix.lat, fix.lon, refined.segment
                            );
                        }
                    }
                    Some(Item::Lag(lag)) => {
                        counts.lags.fetch_add(1, Ordering::Relaxed);
                        counts.dropped.fetch_add(lag.dropped, Ordering::Relaxed);
                        if print {
                            eprintln!("lagged: {} messages dropped", lag.dropped);
                        }
                    }
                    Some(Item::Event(_)) | None => {}
                }
            }
            anyhow::Ok(())
        }));
    }
    let start = Instant::now();
    match options.duration {
        Some(duration) => tokio::time::sleep(duration).await,
        None => {
            for task in tasks.drain(..) {
                task.await??;
            }
        }
    }
    for task in &tasks {
        task.abort();
    }
    let seconds = start.elapsed().as_secs_f64();
    let fixes = counts.fixes.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "subscribers": options.subscribers,
        "seconds": seconds,
        "fixes": fixes,
        "fixes_per_s": fixes as f64 / seconds,
        "per_subscriber_per_s": fixes as f64 / seconds / f64::from(options.subscribers.max(1)),
        "lag_messages": counts.lags.load(Ordering::Relaxed),
        "dropped_messages": counts.dropped.load(Ordering::Relaxed),
    });
    if options.json {
        println!("{summary}");
    } else if !print {
        eprintln!(
            "{} subscribers: {fixes} fixes in {seconds:.1} s ({:.0}/s in all, {:.0}/s each), {} lag messages",
            options.subscribers,
            summary["fixes_per_s"].as_f64().unwrap_or_default(),
            summary["per_subscriber_per_s"].as_f64().unwrap_or_default(),
            summary["lag_messages"],
        );
    }
    Ok(())
}

//! The query subcommands: track, places, predict, stats, devices, delete.

use std::{
    fs::File,
    io::{BufWriter, Write},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tonic::Status;
use trackmesh_proto::v1::{
    DailyStat, DeleteDeviceRequest, DevicePlacesRequest, DevicePredictRequest, DeviceSummary,
    GetDailyStatsRequest, GetTrackRequest, ListDevicesRequest, Place, RefinedFix, SortField,
};

use crate::{
    client::{Client, RetryPolicy, code_name, status_error},
    geojson::{self, TrackWriter, label_name},
    table,
    time::{format_duration_ms, format_ms},
    totals::thousands,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TrackFormat {
    Csv,
    Geojson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlacesFormat {
    Table,
    Csv,
    Geojson,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListFormat {
    Table,
    Csv,
    Json,
}

/// The fields ListDevices sorts by.
pub const SORT_FIELDS: [&str; 6] = [
    "device_id",
    "fixes",
    "first_ms",
    "last_ms",
    "distance_m",
    "max_speed_kmh",
];
/// `MAX_SORT_FIELDS` of the gateway's default configuration.
pub const MAX_SORT_FIELDS: usize = 5;

/// Parses `field[:asc|:desc],…` (e.g. `fixes:desc,device_id`).
pub fn parse_sort(spec: &str) -> anyhow::Result<Vec<SortField>> {
    let mut fields: Vec<SortField> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (field, direction) = part.split_once(':').unwrap_or((part, "asc"));
        let field = field.trim().to_ascii_lowercase();
        if !SORT_FIELDS.contains(&field.as_str()) {
            bail!(
                "cannot sort by {field:?}: the sort fields are {}",
                SORT_FIELDS.join(", ")
            );
        }
        let descending = match direction.trim().to_ascii_lowercase().as_str() {
            "asc" => false,
            "desc" => true,
            other => bail!("sort direction {other:?} of {field}: use asc or desc"),
        };
        if fields.iter().any(|f| f.field == field) {
            bail!("{field} appears twice in the sort");
        }
        fields.push(SortField { field, descending });
    }
    if fields.len() > MAX_SORT_FIELDS {
        bail!(
            "at most {MAX_SORT_FIELDS} sort fields, not {}",
            fields.len()
        );
    }
    Ok(fields)
}

/// stdout, or a file (created) when `--out` is given.
pub fn output(out: Option<&Path>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match out {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let file =
                File::create(path).with_context(|| format!("creating {}", path.display()))?;
            Box::new(BufWriter::new(file))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    })
}

pub fn round(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

/// Where the fixes of a track go.
enum TrackSink {
    Csv(Box<csv::Writer<Box<dyn Write>>>),
    GeoJson(TrackWriter<Box<dyn Write>>),
}

impl TrackSink {
    fn push(&mut self, device_id: &str, refined: &RefinedFix) -> anyhow::Result<()> {
        match self {
            Self::GeoJson(writer) => writer.push(refined)?,
            Self::Csv(writer) => {
                let Some(fix) = &refined.fix else {
                    return Ok(());
                };
                let optional = |v: Option<f32>| v.map_or(String::new(), |v| v.to_string());
                writer.write_record([
                    device_id.to_owned(),
                    format_ms(fix.time_ms),
                    fix.time_ms.to_string(),
                    fix.lat.to_string(),
                    fix.lon.to_string(),
                    refined.segment.to_string(),
                    round(refined.distance_m, 2).to_string(),
                    refined.dt_ms.to_string(),
                    round(refined.speed_kmh, 2).to_string(),
                    optional(fix.speed_mps),
                    optional(fix.heading_deg),
                    optional(fix.accuracy_m),
                    optional(fix.altitude_m),
                ])?;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<usize> {
        match self {
            Self::GeoJson(writer) => Ok(writer.finish()?.1),
            Self::Csv(mut writer) => {
                writer.flush()?;
                Ok(0)
            }
        }
    }
}

pub struct TrackQuery {
    pub device_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
    pub limit: u64,
    pub format: TrackFormat,
    pub out: Option<PathBuf>,
}

/// Streams a device's track to CSV or GeoJSON.
pub async fn track(client: &Client, retry: RetryPolicy, query: TrackQuery) -> anyhow::Result<()> {
    let out = output(query.out.as_deref())?;
    let mut sink = match query.format {
        TrackFormat::Geojson => TrackSink::GeoJson(TrackWriter::new(out, &query.device_id)?),
        TrackFormat::Csv => {
            let mut writer = csv::Writer::from_writer(out);
            writer.write_record([
                "device_id",
                "time",
                "time_ms",
                "lat",
                "lon",
                "segment",
                "distance_m",
                "dt_ms",
                "speed_kmh",
                "speed_mps",
                "heading_deg",
                "accuracy_m",
                "altitude_m",
            ])?;
            TrackSink::Csv(Box::new(writer))
        }
    };
    let request = GetTrackRequest {
        device_id: query.device_id.clone(),
        from_ms: query.from_ms,
        to_ms: query.to_ms,
        limit: query.limit,
        ..Default::default()
    };
    let fixes = each_fix(client, retry, request, "track", |refined| {
        sink.push(&query.device_id, refined)
    })
    .await?;
    let features = sink.finish()?;
    if fixes == 0 {
        eprintln!(
            "no stored fixes for device {} in that time range",
            query.device_id
        );
    }
    if let Some(path) = &query.out {
        let segments = if query.format == TrackFormat::Geojson {
            format!(" in {features} segments")
        } else {
            String::new()
        };
        eprintln!(
            "wrote {} fixes{segments} to {}",
            thousands(fixes),
            path.display()
        );
    }
    Ok(())
}

/// Streams the fixes GetTrack answers for `request` into `each`, in order. A stream broken by
/// a retryable error continues after the last chunk received (resume token), so every fix
/// comes once; `what` names the command in the retry messages. Returns the number of fixes.
pub async fn each_fix(
    client: &Client,
    retry: RetryPolicy,
    request: GetTrackRequest,
    what: &str,
    mut each: impl FnMut(&RefinedFix) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let limit = request.limit;
    let (mut fixes, mut resume_token, mut attempt) = (0u64, String::new(), 1);
    loop {
        let request = GetTrackRequest {
            limit: limit.saturating_sub(fixes),
            resume_token: resume_token.clone(),
            ..request.clone()
        };
        let failure = match client.clone().get_track(request).await {
            Err(status) => Some(status),
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            for refined in &chunk.fixes {
                                each(refined)?;
                            }
                            fixes += chunk.fixes.len() as u64;
                            resume_token = chunk.resume_token;
                            attempt = 1;
                        }
                        Ok(None) => break None,
                        Err(status) => break Some(status),
                    }
                }
            }
        };
        let Some(status) = failure else {
            return Ok(fixes);
        };
        // Resuming needs a token, unless nothing has been written yet.
        let resumable = !resume_token.is_empty() || fixes == 0;
        match retry.delay(attempt, &status) {
            Some(wait) if resumable && (limit == 0 || fixes < limit) => {
                eprintln!(
                    "{what}: {} ({}), resuming in {wait:.1?}",
                    code_name(status.code()),
                    status.message()
                );
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            _ => return Err(status_error("GetTrack failed", &status)),
        }
    }
}

pub async fn places(
    client: &Client,
    retry: RetryPolicy,
    device_id: &str,
    k: u32,
    format: PlacesFormat,
    out: Option<&Path>,
) -> anyhow::Result<()> {
    let request = DevicePlacesRequest {
        device_id: device_id.to_owned(),
        k,
    };
    let response = unary(
        client,
        retry,
        request,
        "GetPlaces failed",
        |mut c, r| async move { c.get_places(r).await },
    )
    .await?;
    let mut writer = output(out)?;
    match format {
        PlacesFormat::Geojson => {
            serde_json::to_writer_pretty(
                &mut writer,
                &geojson::places(device_id, &response.places),
            )?;
            writeln!(writer)?;
        }
        PlacesFormat::Csv => {
            let mut csv = csv::Writer::from_writer(&mut writer);
            csv.write_record(place_header())?;
            for (i, place) in response.places.iter().enumerate() {
                csv.write_record(place_row(i + 1, place, true))?;
            }
            csv.flush()?;
        }
        PlacesFormat::Table => {
            if response.places.is_empty() {
                writeln!(writer, "no places learned for device {device_id} yet")?;
            } else {
                let rows: Vec<Vec<String>> = response
                    .places
                    .iter()
                    .enumerate()
                    .map(|(i, p)| place_row(i + 1, p, false))
                    .collect();
                write!(writer, "{}", table::render(&place_header(), &rows))?;
            }
        }
    }
    writer.flush()?;
    if let Some(path) = out {
        eprintln!(
            "wrote {} places to {}",
            response.places.len(),
            path.display()
        );
    }
    Ok(())
}

fn place_header() -> [&'static str; 9] {
    [
        "rank",
        "place_id",
        "label",
        "lat",
        "lon",
        "visits",
        "dwell",
        "first_visit",
        "last_visit",
    ]
}

fn place_row(rank: usize, place: &Place, machine: bool) -> Vec<String> {
    vec![
        rank.to_string(),
        place.place_id.clone(),
        label_name(place.label).unwrap_or("").to_owned(),
        format!("{:.5}", place.lat),
        format!("{:.5}", place.lon),
        place.visits.to_string(),
        if machine {
            place.total_dwell_ms.to_string()
        } else {
            format_duration_ms(place.total_dwell_ms)
        },
        format_ms(place.first_visit_ms),
        format_ms(place.last_visit_ms),
    ]
}

/// A unary call, retried per `retry`; `f` gets a clone of the client (a cheap handle) and of the request.
pub async fn unary<Req, T, F, Fut>(
    client: &Client,
    retry: RetryPolicy,
    request: Req,
    what: &str,
    f: F,
) -> anyhow::Result<T>
where
    Req: Clone,
    F: Fn(Client, Req) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    retry
        .run(|| f(client.clone(), request.clone()), |_, _| {})
        .await
        .map(tonic::Response::into_inner)
        .map_err(|status| status_error(what, &status))
}

pub async fn predict(
    client: &Client,
    retry: RetryPolicy,
    device_id: &str,
    k: u32,
    json_output: bool,
) -> anyhow::Result<()> {
    let request = DevicePredictRequest {
        device_id: device_id.to_owned(),
        k,
    };
    let response = unary(
        client,
        retry,
        request,
        "PredictNext failed",
        |mut c, r| async move { c.predict_next(r).await },
    )
    .await?;
    if json_output {
        let place = |p: &Place| json!({"place_id": p.place_id, "lat": p.lat, "lon": p.lon, "label": label_name(p.label), "visits": p.visits});
        let value = json!({
            "device_id": device_id,
            "no_history": response.no_history,
            "from": response.from.as_ref().map(place),
            "predictions": response.predictions.iter().map(|p| json!({
                "probability": p.probability,
                "place": p.place.as_ref().map(place),
            })).collect::<Vec<Value>>(),
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let describe = |p: &Place| {
        let label = label_name(p.label).map_or(String::new(), |l| format!(" ({l})"));
        format!("{}{label} at {:.5}, {:.5}", p.place_id, p.lat, p.lon)
    };
    if let Some(from) = &response.from {
        println!("device {device_id}, from place {}", describe(from));
    }
    if response.no_history || response.predictions.is_empty() {
        println!("no prediction for device {device_id}: no place-to-place transitions learned yet");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = response
        .predictions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let place = p.place.clone().unwrap_or_default();
            vec![
                (i + 1).to_string(),
                format!("{:.1}%", p.probability * 100.0),
                place.place_id.clone(),
                label_name(place.label).unwrap_or("").to_owned(),
                format!("{:.5}", place.lat),
                format!("{:.5}", place.lon),
                place.visits.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "rank",
                "probability",
                "place_id",
                "label",
                "lat",
                "lon",
                "visits"
            ],
            &rows
        )
    );
    Ok(())
}

pub async fn stats(
    client: &Client,
    retry: RetryPolicy,
    device_id: &str,
    from_ms: i64,
    to_ms: i64,
    format: ListFormat,
) -> anyhow::Result<()> {
    let request = GetDailyStatsRequest {
        device_id: device_id.to_owned(),
        from_ms,
        to_ms,
    };
    let response = unary(
        client,
        retry,
        request,
        "GetDailyStats failed",
        |mut c, r| async move { c.get_daily_stats(r).await },
    )
    .await?;
    let header = [
        "day",
        "fixes",
        "distance_km",
        "max_speed_kmh",
        "first",
        "last",
    ];
    let row = |d: &DailyStat| {
        vec![
            d.day.clone(),
            d.fixes.to_string(),
            format!("{:.2}", d.distance_m / 1000.0),
            format!("{:.1}", d.max_speed_kmh),
            format_ms(d.first_ms),
            format_ms(d.last_ms),
        ]
    };
    match format {
        ListFormat::Json => {
            let days: Vec<Value> = response
                .days
                .iter()
                .map(|d| {
                    json!({"device_id": d.device_id, "day": d.day, "fixes": d.fixes, "distance_m": d.distance_m,
                        "max_speed_kmh": d.max_speed_kmh, "first_ms": d.first_ms, "last_ms": d.last_ms})
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({"device_id": device_id, "days": days}))?
            );
        }
        ListFormat::Csv => write_csv(&header, response.days.iter().map(row))?,
        ListFormat::Table if response.days.is_empty() => {
            println!("no stored fixes for device {device_id}")
        }
        ListFormat::Table => {
            let rows: Vec<Vec<String>> = response.days.iter().map(row).collect();
            print!("{}", table::render(&header, &rows));
            let fixes: u64 = response.days.iter().map(|d| d.fixes).sum();
            let km: f64 = response.days.iter().map(|d| d.distance_m).sum::<f64>() / 1000.0;
            println!(
                "{} days, {} fixes, {km:.2} km",
                response.days.len(),
                thousands(fixes)
            );
        }
    }
    Ok(())
}

fn write_csv(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> anyhow::Result<()> {
    let mut csv = csv::Writer::from_writer(std::io::stdout().lock());
    csv.write_record(header)?;
    for row in rows {
        csv.write_record(row)?;
    }
    csv.flush()?;
    Ok(())
}

pub struct DevicesQuery {
    pub sort: Vec<SortField>,
    pub page_size: u32,
    pub page_token: String,
    pub all: bool,
    pub format: ListFormat,
}

pub async fn devices(
    client: &Client,
    retry: RetryPolicy,
    query: DevicesQuery,
) -> anyhow::Result<()> {
    let mut devices: Vec<DeviceSummary> = Vec::new();
    let mut page_token = query.page_token.clone();
    let next_page_token = loop {
        let request = ListDevicesRequest {
            sort: query.sort.clone(),
            page_size: query.page_size,
            page_token: page_token.clone(),
        };
        let page = unary(
            client,
            retry,
            request,
            "ListDevices failed",
            |mut c, r| async move { c.list_devices(r).await },
        )
        .await?;
        devices.extend(page.devices);
        if !query.all || page.next_page_token.is_empty() {
            break page.next_page_token;
        }
        page_token = page.next_page_token;
    };
    let header = [
        "device_id",
        "fixes",
        "first",
        "last",
        "distance_km",
        "max_speed_kmh",
    ];
    let row = |d: &DeviceSummary| {
        vec![
            d.device_id.clone(),
            d.fixes.to_string(),
            format_ms(d.first_ms),
            format_ms(d.last_ms),
            format!("{:.2}", d.distance_m / 1000.0),
            format!("{:.1}", d.max_speed_kmh),
        ]
    };
    match query.format {
        ListFormat::Json => {
            let list: Vec<Value> = devices
                .iter()
                .map(|d| {
                    json!({"device_id": d.device_id, "fixes": d.fixes, "first_ms": d.first_ms, "last_ms": d.last_ms,
                        "distance_m": d.distance_m, "max_speed_kmh": d.max_speed_kmh})
                })
                .collect();
            let value = json!({"devices": list, "next_page_token": next_page_token});
            println!("{}", serde_json::to_string_pretty(&value)?);
        }
        ListFormat::Csv => write_csv(&header, devices.iter().map(row))?,
        ListFormat::Table => {
            let rows: Vec<Vec<String>> = devices.iter().map(row).collect();
            print!("{}", table::render(&header, &rows));
            let fixes: u64 = devices.iter().map(|d| d.fixes).sum();
            let scope = if query.all { "" } else { " on this page" };
            println!(
                "{} devices, {} fixes{scope}",
                devices.len(),
                thousands(fixes)
            );
        }
    }
    // csv and json output is for programs: json carries the token, csv is one page.
    if !next_page_token.is_empty() && query.format == ListFormat::Table {
        eprintln!("more devices: add --page-token {next_page_token} (or --all)");
    }
    Ok(())
}

pub async fn delete(
    client: &Client,
    retry: RetryPolicy,
    device_ids: &[String],
) -> anyhow::Result<()> {
    delete_devices(client, retry, device_ids, true).await
}

/// Deletes devices without a line per device.
pub async fn delete_quietly(
    client: &Client,
    retry: RetryPolicy,
    device_ids: &[String],
) -> anyhow::Result<()> {
    delete_devices(client, retry, device_ids, false).await
}

async fn delete_devices(
    client: &Client,
    retry: RetryPolicy,
    device_ids: &[String],
    verbose: bool,
) -> anyhow::Result<()> {
    for device_id in device_ids {
        let request = DeleteDeviceRequest {
            device_id: device_id.clone(),
        };
        unary(
            client,
            retry,
            request,
            &format!("DeleteDevice {device_id} failed"),
            |mut c, r| async move { c.delete_device(r).await },
        )
        .await?;
        if verbose {
            println!("deleted device {device_id} (refinement state, learned places, stored fixes)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Vec<(String, bool)> {
        parse_sort(text)
            .unwrap()
            .into_iter()
            .map(|f| (f.field, f.descending))
            .collect()
    }

    #[test]
    fn sort_specs() {
        assert_eq!(spec(""), vec![]);
        assert_eq!(spec("fixes"), vec![("fixes".into(), false)]);
        assert_eq!(
            spec("fixes:desc, device_id:asc,LAST_MS:DESC"),
            vec![
                ("fixes".into(), true),
                ("device_id".into(), false),
                ("last_ms".into(), true)
            ]
        );
    }

    #[test]
    fn bad_sort_specs() {
        let err = |text| parse_sort(text).unwrap_err().to_string();
        assert!(err("speed").contains("cannot sort by \"speed\""));
        assert!(err("fixes:down").contains("asc or desc"));
        assert!(err("fixes,fixes:desc").contains("twice"));
        let all = SORT_FIELDS.join(",");
        assert!(err(&all).contains("at most 5"));
    }

    #[test]
    fn place_rows() {
        let place = Place {
            place_id: "p7".into(),
            lat: 36.884781,
            lon: -76.352561,
            visits: 2,
            total_dwell_ms: 5_400_000,
            first_visit_ms: 1_591_240_036_000,
            last_visit_ms: 1_591_240_036_000,
            ..Default::default()
        };
        let row = place_row(1, &place, false);
        assert_eq!(
            row[..7],
            ["1", "p7", "", "36.88478", "-76.35256", "2", "1h 30m"]
        );
        assert_eq!(place_row(1, &place, true)[6], "5400000");
    }
}

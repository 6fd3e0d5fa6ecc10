//! trackctl: the command-line client of the trackmesh gateway.
#![forbid(unsafe_code)]
// A command-line tool: stdout and stderr are its user interface.
#![allow(clippy::print_stdout, clippy::print_stderr)]

mod client;
mod csv_input;
mod eval;
mod geojson;
mod gpx;
mod history;
mod load;
mod query;
mod relearn;
mod replay;
mod table;
mod time;
mod totals;
mod watch;

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    client::{RetryPolicy, Target},
    query::{ListFormat, PlacesFormat, TrackFormat},
};

#[derive(Debug, Parser)]
#[command(
    name = "trackctl",
    version,
    about = "Command-line client of the trackmesh gateway: replay CSV files, query tracks, places, \
             predictions and stats, generate load",
    after_help = "Times (--from, --to) are RFC 3339 (2020-06-30T12:00:00Z, 2020-06-30) or epoch milliseconds.\n\
                  The local stack (scripts/stack up) has the development API keys demo-key and other-key."
)]
struct Cli {
    /// Gateway address (http://host:port, https://… for TLS)
    #[arg(
        long,
        env = "TRACKMESH_ADDR",
        default_value = "http://127.0.0.1:50050",
        global = true
    )]
    addr: String,
    /// API key of the tenant
    #[arg(long, env = "TRACKMESH_API_KEY", hide_env_values = true, global = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) to trust for an https:// gateway
    #[arg(long, env = "TRACKMESH_CA", global = true)]
    ca: Option<PathBuf>,
    /// Deadline of each call
    #[arg(long, default_value = "30s", value_parser = parse_duration, global = true)]
    timeout: Duration,
    /// Attempts per call when the gateway answers UNAVAILABLE or RESOURCE_EXHAUSTED
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100), global = true)]
    attempts: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send the fixes of CSV files (raw AIS or device_id,timestamp,lon,lat) through the gateway
    Replay {
        /// CSV files, sent one after the other
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Fixes per Ingest call
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        /// Batches in flight at once (a device's fixes stay in order)
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// Print the summary as JSON on stdout (the human summary goes to stderr)
        #[arg(long)]
        json: bool,
        /// No progress line
        #[arg(long, short)]
        quiet: bool,
        /// Only read and check the files; send nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// A device's stored track as CSV or GeoJSON (one LineString per segment)
    Track {
        device: String,
        /// Start of the time range (inclusive); default: the beginning
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// End of the time range (inclusive); default: no end
        #[arg(long, value_parser = parse_time)]
        to: Option<i64>,
        #[arg(long, value_enum, default_value = "csv")]
        format: TrackFormat,
        /// Write to this file instead of stdout
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// At most this many fixes (0 = all)
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// The places a device keeps returning to (most dwell first)
    Places {
        device: String,
        #[arg(long, value_enum, default_value = "table")]
        format: PlacesFormat,
        /// At most this many places (0 = all)
        #[arg(short, long, default_value_t = 0)]
        k: u32,
        /// Write to this file instead of stdout
        #[arg(long, short)]
        out: Option<PathBuf>,
    },
    /// The most likely next places of a device
    Predict {
        device: String,
        /// How many predictions
        #[arg(short, long, default_value_t = 3)]
        k: u32,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// A device's daily stats (UTC days)
    Stats {
        device: String,
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        #[arg(long, value_parser = parse_time)]
        to: Option<i64>,
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
    },
    /// A device's stays (closed ones, as learning found them) overlapping a time range
    Stays(history::Query),
    /// A device's trips (movements between two consecutive stays) overlapping a time range
    Trips(history::Query),
    /// Rebuild learned places, stays and trips from the stored fixes with the current
    /// settings; progress on stderr, a summary on stdout
    #[command(group = clap::ArgGroup::new("which").required(true).args(["devices", "all"]))]
    Relearn {
        /// The devices to relearn
        devices: Vec<String>,
        /// Every device of the tenant
        #[arg(long)]
        all: bool,
        /// Learn from the stored fixes at or after this time only (stays and trips before it
        /// are kept); default: all of them
        #[arg(long, value_parser = parse_time)]
        from: Option<i64>,
        /// No progress bar
        #[arg(long, short)]
        quiet: bool,
    },
    /// Anchor refinement on each device's last stored fix where it has no state (after a
    /// Redis loss), so that late old fixes are rejected as OUT_OF_ORDER again
    #[command(group = clap::ArgGroup::new("which").required(true).args(["devices", "all"]))]
    Reseed {
        /// The devices to reseed
        devices: Vec<String>,
        /// Every device of the tenant
        #[arg(long)]
        all: bool,
    },
    /// The tenant's devices, sorted and paged
    Devices {
        /// field[:asc|:desc],… with fields device_id, fixes, first_ms, last_ms, distance_m, max_speed_kmh
        #[arg(long, default_value = "")]
        sort: String,
        #[arg(long, default_value_t = 20)]
        page_size: u32,
        /// Continue after an earlier page
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow the pages to the end
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value = "table")]
        format: ListFormat,
    },
    /// Delete devices everywhere: refinement state, learned places, stored fixes (idempotent)
    Delete {
        #[arg(required = true)]
        devices: Vec<String>,
    },
    /// Measure next-place prediction on held-out days: train before --cut, predict every
    /// test transition through PredictNext, next to baselines (see tools/trackctl/src/eval.rs)
    Eval {
        /// CSV file (either format of data/)
        file: PathBuf,
        /// Start of the test window; training fixes come before it
        #[arg(long, value_parser = parse_time)]
        cut: i64,
        /// End of the test window (exclusive); default: one day after --cut
        #[arg(long, value_parser = parse_time)]
        until: Option<i64>,
        /// Training fixes from this time on; default: all before --cut
        #[arg(long, value_parser = parse_time)]
        train_from: Option<i64>,
        /// Device id prefix (default: eval-<random>-, so runs do not share models)
        #[arg(long)]
        prefix: Option<String>,
        /// Devices replayed at once
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=256))]
        concurrency: u32,
        /// A predicted place is right within this distance of the next stay (metres)
        #[arg(long, default_value_t = 200.0)]
        place_radius: f64,
        /// Score the baselines only; send nothing
        #[arg(long)]
        baselines_only: bool,
        /// Print the report as JSON on stdout (the table goes to stderr)
        #[arg(long)]
        json: bool,
    },
    /// The tenant's fixes live, as storage acknowledges them: one line per fix (device, time,
    /// lat, lon, segment); with --subscribers N, counts over N subscriptions (fan-out benchmark)
    Watch {
        /// Only these devices (repeat the flag); default: every device
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Only fixes inside min_lon,min_lat,max_lon,max_lat
        #[arg(long)]
        bbox: Option<String>,
        /// Subscriptions opened at once (100 per connection); above 1 only counts
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        subscribers: u32,
        /// Stop after this long (e.g. 30s) and print a summary; default: until the stream ends
        #[arg(long, value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Print the summary as JSON on stdout
        #[arg(long)]
        json: bool,
    },
    /// Load generator: synthetic moving devices, reports fixes/s and batch latency percentiles
    Load {
        /// Synthetic devices
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
        devices: u32,
        /// Fixes per call (--batch 1 measures single-fix latency)
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        batch: u32,
        /// Calls in flight at once
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1024))]
        concurrency: u32,
        /// How long to send (e.g. 30s, 2m)
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        duration: Duration,
        /// Fixes per second in all; max throughput when unset
        #[arg(long)]
        rate: Option<f64>,
        /// Device id prefix (default: load-<random>, so runs do not collide)
        #[arg(long)]
        prefix: Option<String>,
        /// Use the bidirectional IngestStream instead of Ingest
        #[arg(long)]
        stream: bool,
        /// Send no-op calls (grpc.health.v1.Health/Check) instead: the gateway's ceiling
        /// for this client, to compare single-fix ingest with
        #[arg(long, conflicts_with = "stream")]
        noop: bool,
        /// Delete the generated devices afterwards
        #[arg(long)]
        cleanup: bool,
        /// Write `device,time_ms` of every fix sent to this CSV file
        #[arg(long, value_name = "FILE")]
        sent: Option<std::path::PathBuf>,
        /// Write `device,time_ms` of every fix acknowledged as stored to this CSV file
        #[arg(long, value_name = "FILE")]
        acked: Option<std::path::PathBuf>,
        /// Print the report as JSON on stdout (the human report goes to stderr)
        #[arg(long)]
        json: bool,
    },
}

fn parse_time(text: &str) -> Result<i64, String> {
    time::parse_ms(text).map_err(|e| format!("{e:#}"))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e} (write durations like 30s, 2m, 500ms)"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("trackctl: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let retry = RetryPolicy {
        attempts: cli.attempts,
        ..RetryPolicy::default()
    };
    let target = Target {
        addr: cli.addr,
        api_key: cli.api_key,
        ca: cli.ca,
        timeout: cli.timeout,
    };
    match cli.command {
        Command::Replay {
            files,
            batch,
            concurrency,
            json,
            quiet,
            dry_run,
        } => {
            let options = replay::Options {
                files,
                batch: batch as usize,
                concurrency: concurrency as usize,
                quiet,
                dry_run,
            };
            let client = if dry_run {
                None
            } else {
                Some(target.connect().await?)
            };
            let summary = replay::run(options, client, retry).await?;
            if json {
                replay::print_summary(&summary, dry_run, &mut std::io::stderr())?;
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                replay::print_summary(&summary, dry_run, &mut std::io::stdout())?;
            }
            if summary.failed_batches > 0 {
                eprintln!(
                    "trackctl: {} batches ({} fixes) were refused as invalid",
                    summary.failed_batches, summary.failed_fixes
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Track {
            device,
            from,
            to,
            format,
            out,
            limit,
        } => {
            let client = target.connect().await?;
            let query = query::TrackQuery {
                device_id: device,
                from_ms: from.unwrap_or(0),
                to_ms: to.unwrap_or(0),
                limit,
                format,
                out,
            };
            query::track(&client, retry, query).await?;
        }
        Command::Places {
            device,
            format,
            k,
            out,
        } => {
            let client = target.connect().await?;
            query::places(&client, retry, &device, k, format, out.as_deref()).await?;
        }
        Command::Predict { device, k, json } => {
            let client = target.connect().await?;
            query::predict(&client, retry, &device, k, json).await?;
        }
        Command::Stats {
            device,
            from,
            to,
            format,
        } => {
            let client = target.connect().await?;
            query::stats(
                &client,
                retry,
                &device,
                from.unwrap_or(0),
                to.unwrap_or(0),
                format,
            )
            .await?;
        }
        Command::Stays(query) => {
            let client = target.connect().await?;
            history::stays(&client, retry, query).await?;
        }
        Command::Trips(query) => {
            let client = target.connect().await?;
            history::trips(&client, retry, query).await?;
        }
        Command::Relearn {
            devices,
            all,
            from,
            quiet,
        } => {
            let client = target.connect().await?;
            let devices = relearn::Devices { ids: devices, all };
            relearn::relearn(&client, retry, devices, from.unwrap_or(0), quiet).await?;
        }
        Command::Reseed { devices, all } => {
            let client = target.connect().await?;
            relearn::reseed(&client, retry, relearn::Devices { ids: devices, all }).await?;
        }
        Command::Devices {
            sort,
            page_size,
            page_token,
            all,
            format,
        } => {
            let sort = query::parse_sort(&sort)?;
            let client = target.connect().await?;
            let devices = query::DevicesQuery {
                sort,
                page_size,
                page_token,
                all,
                format,
            };
            query::devices(&client, retry, devices).await?;
        }
        Command::Watch {
            devices,
            bbox,
            subscribers,
            duration,
            json,
        } => {
            let options = watch::Options {
                devices,
                bbox,
                subscribers,
                duration,
                json,
            };
            watch::run(&target, options).await?;
        }
        Command::Delete { devices } => {
            let client = target.connect().await?;
            query::delete(&client, retry, &devices).await?;
        }
        Command::Eval {
            file,
            cut,
            until,
            train_from,
            prefix,
            concurrency,
            place_radius,
            baselines_only,
            json,
        } => {
            if !(place_radius.is_finite() && place_radius > 0.0) {
                anyhow::bail!("--place-radius must be a positive number of metres");
            }
            let options = eval::Options {
                file,
                train_from_ms: train_from,
                cut_ms: cut,
                until_ms: until.unwrap_or(cut + 86_400_000),
                prefix: prefix
                    .unwrap_or_else(|| format!("eval-{:06x}-", fastrand::u32(..0x100_0000))),
                concurrency: concurrency as usize,
                rules: eval::Rules {
                    place_radius_m: place_radius,
                    ..eval::Rules::default()
                },
            };
            let client = if baselines_only {
                None
            } else {
                Some(target.connect().await?)
            };
            let report = eval::run(&options, client, retry).await?;
            if json {
                eprintln!("{}", eval::render(&report));
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", eval::render(&report));
            }
        }
        Command::Load {
            devices,
            batch,
            concurrency,
            duration,
            rate,
            prefix,
            stream,
            noop,
            cleanup,
            sent,
            acked,
            json,
        } => {
            if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
                anyhow::bail!("--rate must be a positive number of fixes per second");
            }
            let client = target.connect().await?;
            let options = load::Options {
                devices: devices as usize,
                batch: batch as usize,
                concurrency: concurrency as usize,
                duration,
                rate,
                prefix: prefix
                    .unwrap_or_else(|| format!("load-{:06x}", fastrand::u32(..0x100_0000))),
                stream,
                cleanup,
                sent,
                acked,
            };
            eprintln!(
                "load: sending for {} to {} as devices {}-00000…",
                humantime::format_duration(duration),
                target.addr,
                options.prefix
            );
            let noop = if noop {
                Some(tonic_health::pb::health_client::HealthClient::new(
                    target.connect_authed().await?,
                ))
            } else {
                None
            };
            let report = load::run(client, noop, options).await?;
            if json {
                load::print_report(&report, &mut std::io::stderr())?;
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                load::print_report(&report, &mut std::io::stdout())?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_subcommands() {
        let cli = Cli::try_parse_from([
            "trackctl",
            "--api-key",
            "k",
            "track",
            "367000140",
            "--from",
            "2020-06-30",
            "--to",
            "1593478800000",
            "--format",
            "geojson",
        ])
        .unwrap();
        match cli.command {
            Command::Track {
                from, to, format, ..
            } => {
                assert_eq!(
                    (from, to),
                    (Some(1_593_475_200_000), Some(1_593_478_800_000))
                );
                assert_eq!(format, TrackFormat::Geojson);
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["trackctl", "load", "--duration", "2m", "--batch", "1"]).unwrap();
        assert!(
            matches!(cli.command, Command::Load { duration, batch: 1, .. } if duration == Duration::from_secs(120))
        );
        assert!(
            Cli::try_parse_from(["trackctl", "replay"]).is_err(),
            "replay needs a file"
        );
        assert!(Cli::try_parse_from(["trackctl", "track", "d", "--from", "soon"]).is_err());
    }

    #[test]
    fn parses_eval() {
        let cli =
            Cli::try_parse_from(["trackctl", "eval", "week.csv", "--cut", "2020-12-07"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Eval {
                cut: 1_607_299_200_000,
                until: None,
                baselines_only: false,
                ..
            }
        ));
        assert!(
            Cli::try_parse_from(["trackctl", "eval", "week.csv"]).is_err(),
            "eval needs --cut"
        );
    }
}

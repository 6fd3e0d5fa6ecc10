//! `trackctl relearn` (rebuild learned models from the stored fixes, with a progress bar on
//! stderr and a summary on stdout) and `trackctl reseed` (anchor refinement on the last
//! stored fixes after a Redis loss).

use std::{
    io::IsTerminal as _,
    time::{Duration, Instant},
};

use trackmesh_proto::v1::{RelearnProgress, RelearnRequest, ReseedRequest};

use crate::{
    client::{Client, RetryPolicy, code_name, status_error},
    query::unary,
    table,
    totals::thousands,
};

/// Which devices: the named ones, or every device of the tenant.
pub struct Devices {
    pub ids: Vec<String>,
    pub all: bool,
}

/// Where the relearn stands, from the gateway's progress messages.
#[derive(Debug, Default)]
struct Tally {
    devices_done: u32,
    devices_total: u32,
    fixes_total: u64,
    /// The device last reported in progress and its fixes so far.
    current: Option<(String, u64)>,
    /// One final message per finished device.
    done: Vec<RelearnProgress>,
}

impl Tally {
    fn update(&mut self, message: RelearnProgress) {
        self.devices_done = self.devices_done.max(message.devices_done);
        self.devices_total = self.devices_total.max(message.devices_total);
        self.fixes_total = self.fixes_total.max(message.fixes_total);
        if message.done {
            // Devices are relearned a few at a time: another one may still be going.
            if self
                .current
                .as_ref()
                .is_some_and(|(device, _)| *device == message.device_id)
            {
                self.current = None;
            }
            self.done.push(message);
        } else {
            self.current = Some((message.device_id, message.fixes));
        }
    }

    /// `relearn [#######---------] 3/8 devices, 120,000 fixes (v4: 12,000)`
    fn line(&self) -> String {
        const WIDTH: usize = 24;
        let total = self.devices_total.max(1) as usize;
        let filled = (self.devices_done as usize * WIDTH / total).min(WIDTH);
        let mut line = format!(
            "relearn [{}{}] {}/{} devices, {} fixes",
            "#".repeat(filled),
            "-".repeat(WIDTH - filled),
            self.devices_done,
            self.devices_total,
            thousands(self.fixes_total)
        );
        if let Some((device, fixes)) = &self.current {
            line.push_str(&format!(" ({device}: {})", thousands(*fixes)));
        }
        line
    }
}

/// Draws the progress on stderr: in place on a terminal (at most every 100 ms), otherwise a
/// line per finished device, so that logs stay readable.
struct Bar {
    terminal: bool,
    quiet: bool,
    drawn: Option<Instant>,
}

impl Bar {
    fn show(&mut self, tally: &Tally, device_finished: bool) {
        if self.quiet {
            return;
        }
        if !self.terminal {
            if device_finished {
                eprintln!("{}", tally.line());
            }
            return;
        }
        if device_finished
            || self
                .drawn
                .is_none_or(|at| at.elapsed() >= Duration::from_millis(100))
        {
            eprint!("\r\x1b[K{}", tally.line());
            self.drawn = Some(Instant::now());
        }
    }

    fn clear(&self) {
        if self.terminal && !self.quiet && self.drawn.is_some() {
            eprint!("\r\x1b[K");
        }
    }
}

pub async fn relearn(
    client: &Client,
    retry: RetryPolicy,
    devices: Devices,
    from_ms: i64,
    quiet: bool,
) -> anyhow::Result<()> {
    let request = RelearnRequest {
        device_ids: devices.ids,
        all_devices: devices.all,
        from_ms,
    };
    // Only opening the stream is retried: a relearn broken off later is run again by the user
    // (it is idempotent), not silently started over.
    let mut stream = retry
        .run(
            || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.relearn(request).await }
            },
            |_, _| {},
        )
        .await
        .map_err(|status| status_error("Relearn failed", &status))?
        .into_inner();
    let mut tally = Tally::default();
    let mut bar = Bar {
        terminal: std::io::stderr().is_terminal(),
        quiet,
        drawn: None,
    };
    let broken = loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let finished = message.done;
                tally.update(message);
                bar.show(&tally, finished);
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    bar.clear();
    print_summary(&tally);
    if let Some(status) = broken {
        anyhow::bail!(
            "Relearn broke off after {} of {} devices: {}: {} (the finished devices are \
             relearned; running the same command again is safe)",
            tally.devices_done,
            tally.devices_total,
            code_name(status.code()),
            status.message()
        );
    }
    if tally.devices_done < tally.devices_total {
        anyhow::bail!(
            "the gateway ended Relearn after {} of {} devices",
            tally.devices_done,
            tally.devices_total
        );
    }
    Ok(())
}

fn print_summary(tally: &Tally) {
    if !tally.done.is_empty() {
        let rows: Vec<Vec<String>> = tally
            .done
            .iter()
            .map(|d| {
                vec![
                    d.device_id.clone(),
                    thousands(d.fixes),
                    format!("{} → {}", d.places_before, d.places_after),
                    thousands(d.stays),
                ]
            })
            .collect();
        print!(
            "{}",
            table::render(&["device", "fixes", "places", "stays"], &rows)
        );
    }
    let before: u64 = tally.done.iter().map(|d| u64::from(d.places_before)).sum();
    let after: u64 = tally.done.iter().map(|d| u64::from(d.places_after)).sum();
    let stays: u64 = tally.done.iter().map(|d| d.stays).sum();
    println!(
        "relearned {} devices from {} fixes: places {} → {}, {} stays",
        tally.done.len(),
        thousands(tally.fixes_total),
        thousands(before),
        thousands(after),
        thousands(stays)
    );
}

pub async fn reseed(client: &Client, retry: RetryPolicy, devices: Devices) -> anyhow::Result<()> {
    let request = ReseedRequest {
        device_ids: devices.ids,
        all_devices: devices.all,
    };
    let response = unary(
        client,
        retry,
        request,
        "Reseed failed",
        |mut c, r| async move { c.reseed(r).await },
    )
    .await?;
    let rows = [
        (
            "seeded",
            response.seeded,
            "anchored on their last stored fix",
        ),
        ("kept", response.kept, "refinement had state, left alone"),
        ("without_fixes", response.without_fixes, "no stored fix"),
    ];
    let width = rows
        .iter()
        .map(|(_, n, _)| thousands(u64::from(*n)).len())
        .max()
        .unwrap_or(1);
    for (name, count, meaning) in rows {
        let count = thousands(u64::from(count));
        println!("{name:<13}  {count:>width$}  {meaning}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(device: &str, fixes: u64, done: bool, devices_done: u32) -> RelearnProgress {
        RelearnProgress {
            device_id: device.into(),
            fixes,
            done,
            places_before: 1,
            places_after: 2,
            stays: 3,
            devices_done,
            devices_total: 4,
            fixes_total: 1_000 + fixes,
        }
    }

    #[test]
    fn the_bar_follows_the_messages() {
        let mut tally = Tally::default();
        tally.update(progress("a", 500, false, 0));
        assert_eq!(
            tally.line(),
            "relearn [------------------------] 0/4 devices, 1,500 fixes (a: 500)"
        );
        tally.update(progress("a", 900, true, 1));
        tally.update(progress("b", 10, false, 1));
        tally.update(progress("c", 30, false, 1));
        tally.update(progress("b", 20, true, 2));
        assert_eq!(
            tally.line(),
            "relearn [############------------] 2/4 devices, 1,900 fixes (c: 30)",
            "c is still going"
        );
        tally.update(progress("c", 40, true, 3));
        assert_eq!(
            tally.line(),
            "relearn [##################------] 3/4 devices, 1,900 fixes"
        );
        assert_eq!(tally.done.len(), 3);
    }
}

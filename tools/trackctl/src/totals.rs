//! What the gateway answered to ingested batches, added up (replay and load).

use std::collections::BTreeMap;

use serde::Serialize;
use trackmesh_proto::v1::{IngestResponse, Verdict};

#[derive(Debug, Default, Clone, Serialize)]
pub struct IngestTotals {
    /// Fixes in batches the gateway answered.
    pub fixes_sent: u64,
    /// Batches the gateway answered.
    pub batches: u64,
    pub accepted: u64,
    pub rejected: u64,
    /// Rejected fixes by verdict name (`DUPLICATE`, `SPEED`, …).
    pub rejected_by_verdict: BTreeMap<String, u64>,
    /// Accepted fixes that had been accepted before (re-sent).
    pub replayed: u64,
    /// Earlier SPEED rejections accepted after the track re-anchored.
    pub recovered: u64,
    /// Batches storage acknowledged (`stored = true`).
    pub batches_stored: u64,
    /// Accepted fixes in batches storage acknowledged.
    pub fixes_stored: u64,
    /// Batches whose learning step failed (`learning_ok = false`; best effort).
    pub learning_failures: u64,
}

impl IngestTotals {
    /// Adds the answer to a batch of `fixes` fixes.
    pub fn add(&mut self, fixes: usize, response: &IngestResponse) {
        self.fixes_sent += fixes as u64;
        self.batches += 1;
        self.accepted += u64::from(response.accepted);
        self.rejected += u64::from(response.rejected);
        for rejection in &response.rejections {
            *self
                .rejected_by_verdict
                .entry(verdict_name(rejection.verdict))
                .or_default() += 1;
        }
        self.replayed += u64::from(response.replayed);
        self.recovered += u64::from(response.recovered);
        if response.stored {
            self.batches_stored += 1;
            self.fixes_stored += u64::from(response.accepted);
        }
        if !response.learning_ok {
            self.learning_failures += 1;
        }
    }

    /// The verdict lines of a summary for humans.
    pub fn verdict_lines(&self) -> Vec<String> {
        let mut lines = vec![
            format!(
                "  {:<16}{:>10}  (replayed {}, recovered {})",
                "accepted",
                thousands(self.accepted),
                thousands(self.replayed),
                thousands(self.recovered)
            ),
            format!("  {:<16}{:>10}", "rejected", thousands(self.rejected)),
        ];
        let mut by_count: Vec<_> = self.rejected_by_verdict.iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        for (verdict, count) in by_count {
            lines.push(format!("    {verdict:<14}{:>10}", thousands(*count)));
        }
        lines.push(format!(
            "  batches stored {}/{} ({} fixes), learning failures {}",
            thousands(self.batches_stored),
            thousands(self.batches),
            thousands(self.fixes_stored),
            thousands(self.learning_failures)
        ));
        lines
    }
}

/// `ACCEPTED`, `SPEED`, … (or `VERDICT_<n>` for a number this build does not know).
pub fn verdict_name(verdict: i32) -> String {
    Verdict::try_from(verdict).map_or_else(
        |_| format!("VERDICT_{verdict}"),
        |v| v.as_str_name().to_owned(),
    )
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use trackmesh_proto::v1::Rejection;

    use super::*;

    #[test]
    fn adds_up_answers() {
        let mut totals = IngestTotals::default();
        let rejection = |index, verdict: Verdict| Rejection {
            index,
            verdict: verdict as i32,
            detail: String::new(),
        };
        totals.add(
            4,
            &IngestResponse {
                accepted: 1,
                rejected: 3,
                rejections: vec![
                    rejection(1, Verdict::Duplicate),
                    rejection(2, Verdict::Speed),
                    rejection(3, Verdict::Duplicate),
                ],
                stored: true,
                learning_ok: false,
                replayed: 1,
                ..Default::default()
            },
        );
        totals.add(
            2,
            &IngestResponse {
                accepted: 2,
                learning_ok: true,
                recovered: 1,
                ..Default::default()
            },
        );
        assert_eq!((totals.fixes_sent, totals.batches), (6, 2));
        assert_eq!((totals.accepted, totals.rejected), (3, 3));
        assert_eq!(totals.rejected_by_verdict["DUPLICATE"], 2);
        assert_eq!(totals.rejected_by_verdict["SPEED"], 1);
        assert_eq!((totals.replayed, totals.recovered), (1, 1));
        assert_eq!((totals.batches_stored, totals.fixes_stored), (1, 1));
        assert_eq!(totals.learning_failures, 1);
        let lines = totals.verdict_lines().join("\n");
        assert!(lines.contains("DUPLICATE") && lines.find("DUPLICATE") < lines.find("SPEED"));
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(verdict_name(Verdict::OutOfOrder as i32), "OUT_OF_ORDER");
        assert_eq!(verdict_name(99), "VERDICT_99");
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }
}

//! What the operator sees of a running fleet, from the telemetry the broker delivers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How many boards have each value, sorted by value.
pub type Tally = Vec<(String, u32)>;

/// What the operator sees of a running fleet: each board's latest telemetry sample as
/// received from the broker (so it shows what a real fleet dashboard would, not the boards'
/// memory).
#[derive(Debug, Default)]
pub struct FleetProgress {
    latest: Mutex<std::collections::HashMap<String, (String, String)>>,
    samples: AtomicU64,
    pub boards: AtomicU64,
}

impl FleetProgress {
    pub(super) fn sample(&self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
            return;
        };
        let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
        self.samples.fetch_add(1, Ordering::Relaxed);
        self.latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(field("device"), (field("activity"), field("version")));
    }

    /// Telemetry samples received so far.
    pub fn samples(&self) -> u64 {
        self.samples.load(Ordering::Relaxed)
    }

    /// Boards by activity and by running version, from their latest sample, sorted by name.
    pub fn counts(&self) -> (Tally, Tally) {
        let latest = self.latest.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_activity = std::collections::BTreeMap::new();
        let mut by_version = std::collections::BTreeMap::new();
        for (activity, version) in latest.values() {
            *by_activity.entry(activity.clone()).or_insert(0) += 1;
            *by_version.entry(version.clone()).or_insert(0) += 1;
        }
        (
            by_activity.into_iter().collect(),
            by_version.into_iter().collect(),
        )
    }
}

/// The board connections the broker accepted (CONNACK), and when the first and the last came
/// on the run's timeline (virtual ms): over mutual TLS each is a full handshake at the broker,
/// as boards resume no session. Shards on one timeline add up.
#[derive(Debug)]
pub struct BrokerConnects {
    count: AtomicU64,
    first_ms: AtomicU64,
    last_ms: AtomicU64,
}

impl Default for BrokerConnects {
    fn default() -> Self {
        BrokerConnects {
            count: AtomicU64::new(0),
            first_ms: AtomicU64::new(u64::MAX),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl BrokerConnects {
    pub(super) fn record(&self, t_ms: u64) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.first_ms.fetch_min(t_ms, Ordering::Relaxed);
        self.last_ms.fetch_max(t_ms, Ordering::Relaxed);
    }

    /// How many, and the first and last (None before any).
    pub fn summary(&self) -> (u64, Option<(u64, u64)>) {
        let n = self.count.load(Ordering::Relaxed);
        let span = (n > 0).then(|| {
            (
                self.first_ms.load(Ordering::Relaxed),
                self.last_ms.load(Ordering::Relaxed),
            )
        });
        (n, span)
    }
}

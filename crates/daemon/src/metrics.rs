//! `GET /metrics` (prometheus-client, OpenMetrics text): sandboxes by state; GPUs free,
//! held and quarantined; run-phase histograms; pulls; restarts.

use prometheus_client::encoding::{text::encode, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

pub struct Metrics {
    registry: Registry,
    pub sandboxes: Family<StateLabel, Gauge>,
    pub gpus: Family<StateLabel, Gauge>,
    pub phases: Family<PhaseLabel, Histogram>,
    pub pulls: Counter,
    pub restarts: Counter,
    pub deploys: Counter,
}

fn phase_histogram() -> Histogram {
    // 10 ms to about 10 minutes.
    Histogram::new(exponential_buckets(0.01, 3.0, 11))
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gpucell");
        let sandboxes = Family::<StateLabel, Gauge>::default();
        let gpus = Family::<StateLabel, Gauge>::default();
        let phases: Family<PhaseLabel, Histogram> = Family::new_with_constructor(phase_histogram);
        let pulls = Counter::default();
        let restarts = Counter::default();
        let deploys = Counter::default();
        registry.register("sandboxes", "Sandboxes by state", sandboxes.clone());
        registry.register(
            "gpus",
            "GPUs by state (free, held, quarantined)",
            gpus.clone(),
        );
        registry.register(
            "run_phase_seconds",
            "Time spent in each run phase (image, guest, accel, devices, sandbox, release)",
            phases.clone(),
        );
        registry.register("pulls", "Runs that fetched their image", pulls.clone());
        registry.register(
            "restarts",
            "Sandboxes started again by their restart policy",
            restarts.clone(),
        );
        registry.register("deploys", "Deployments accepted", deploys.clone());
        Metrics {
            registry,
            sandboxes,
            gpus,
            phases,
            pulls,
            restarts,
            deploys,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

//! The dispatcher's metrics, in the Prometheus / OpenMetrics text format (`prometheus-client`),
//! served at `GET /metrics` on the API's port.
//!
//! Two sources, so that a restart loses nothing that matters:
//! - counts the store keeps (jobs per state, ready jobs per label set, lost attempts, split
//!   unit tries, notification deliveries and their tries) are read at each scrape in one read transaction: they are exact and survive a
//!   restart (a counter of ended jobs never goes back);
//! - what only passes through the process (output bytes, refused results, runner attaches,
//!   jobs handed back to the queue, queue waits and durations) is counted in memory since the
//!   dispatcher started, as every Prometheus client counts: a restart resets those to zero,
//!   which Prometheus' `rate()` handles as a counter reset.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_domain::{Event, JobId, JobState};
use kiln_store::StoreMetrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The content type of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LabelsLabel {
    /// The label set, `key=value` pairs joined by commas in key order (empty: no label needed).
    labels: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabel {
    /// `first`: the runner's first stream to this dispatcher process; `again`: a stream after
    /// an earlier one, or one that came back holding attempts.
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabel {
    /// `webhook`, `mail` or `status`.
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UnitLabel {
    outcome: String,
    /// `true` for a retry (try 2 or later).
    retry: String,
}

/// Runners as the scheduler sees them at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunnerCounts {
    /// Attached (a live stream).
    pub attached: u64,
    /// Attached and holding at least one attempt.
    pub busy: u64,
    /// Attached and draining (no new work).
    pub draining: u64,
    /// Slots of attached runners.
    pub slots: u64,
    /// Slots in use.
    pub slots_used: u64,
}

/// The in-memory half of the metrics, shared by the dispatcher's tasks.
#[derive(Debug)]
pub struct Metrics {
    output_bytes: Counter,
    results_refused: Counter,
    attaches: Family<AttachLabel, Counter>,
    requeued: Counter,
    queue_wait: Histogram,
    job_duration: Histogram,
    step_duration: Histogram,
    /// Per job: the state it waits in (queued, or running) and since when, for the histograms.
    /// An entry goes when the job is assigned or ends, so this holds at most the queued and
    /// running jobs.
    since: Mutex<HashMap<JobId, (JobState, Instant)>>,
    /// Runner names that attached to this process.
    seen: Mutex<std::collections::HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics.
    pub fn new() -> Self {
        Self {
            output_bytes: Counter::default(),
            results_refused: Counter::default(),
            attaches: Family::default(),
            requeued: Counter::default(),
            // 10 ms .. ~1.5 h, doubling.
            queue_wait: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            // 100 ms .. ~4 h, doubling.
            job_duration: Histogram::new(exponential_buckets(0.1, 2.0, 18)),
            // 10 ms .. ~1.5 h, doubling.
            step_duration: Histogram::new(exponential_buckets(0.01, 2.0, 20)),
            since: Mutex::new(HashMap::new()),
            seen: Mutex::new(std::collections::HashSet::new()),
        }
    }

    /// A job or build changed state (every event the dispatcher publishes passes here).
    pub fn on_event(&self, event: &Event) {
        let Some(job) = event.job_id else {
            return;
        };
        let now = Instant::now();
        let mut since = self.since.lock().unwrap_or_else(|p| p.into_inner());
        match event.state {
            JobState::Queued => {
                since.insert(job, (JobState::Queued, now));
            }
            JobState::Assigned => {
                if let Some((JobState::Queued, at)) = since.remove(&job) {
                    self.queue_wait.observe(secs(now - at));
                }
            }
            JobState::Running => {
                since.insert(job, (JobState::Running, now));
            }
            s if s.is_final() => {
                if let Some((JobState::Running, at)) = since.remove(&job) {
                    self.job_duration.observe(secs(now - at));
                }
            }
            _ => {}
        }
    }

    /// A chunk of output was stored.
    pub fn output(&self, bytes: usize) {
        self.output_bytes.inc_by(bytes as u64);
    }

    /// A step's result came in.
    pub fn step_finished(&self, duration_ms: u64) {
        self.step_duration.observe(duration_ms as f64 / 1000.0);
    }

    /// A result was refused (not the current attempt, or not this runner's).
    pub fn result_refused(&self) {
        self.results_refused.inc();
    }

    /// A job went back to the queue (its runner was lost, or gave it back).
    pub fn requeued(&self) {
        self.requeued.inc();
    }

    /// A runner's stream was welcomed; `holding` says it came back holding attempts.
    pub fn attached(&self, name: &str, holding: bool) {
        let again = !self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        let kind = if again || holding { "again" } else { "first" };
        self.attaches
            .get_or_create(&AttachLabel { kind: kind.into() })
            .inc();
    }

    /// The text of a scrape: the store's counts, the runners', and this process's.
    pub fn encode(&self, store: &StoreMetrics, runners: RunnerCounts) -> String {
        let mut r = Registry::with_prefix("kiln");

        let queued = Family::<LabelsLabel, Gauge>::default();
        for (labels, n) in &store.queued_by_labels {
            let labels = label_set(labels);
            queued.get_or_create(&LabelsLabel { labels }).set(*n as i64);
        }
        r.register(
            "queue_depth",
            "Jobs ready to run and waiting for a runner, per label set they need",
            queued,
        );
        let active = Family::<StateLabel, Gauge>::default();
        let ended = Family::<StateLabel, Counter>::default();
        for (state, n) in &store.jobs_by_state {
            let label = StateLabel {
                state: state.to_string(),
            };
            if state.is_final() {
                ended.get_or_create(&label).inc_by(*n);
            } else {
                active.get_or_create(&label).set(*n as i64);
            }
        }
        r.register(
            "jobs",
            "Jobs not ended yet, per state (queued jobs include those waiting on others)",
            active,
        );
        r.register("jobs_ended", "Jobs ended, per final state", ended);
        let lost = Counter::<u64>::default();
        lost.inc_by(store.lost_attempts);
        r.register(
            "lost_attempts",
            "Attempts whose runner was lost (their jobs went back to the queue)",
            lost,
        );
        let units = Family::<UnitLabel, Counter>::default();
        for (outcome, retry, n) in &store.unit_tries {
            units
                .get_or_create(&UnitLabel {
                    outcome: outcome.as_str().into(),
                    retry: retry.to_string(),
                })
                .inc_by(*n);
        }
        r.register(
            "split_unit_tries",
            "Ended tries of split steps' units, per outcome; retry=\"true\" for retries",
            units,
        );
        let deliveries = Family::<DeliveryLabel, Gauge>::default();
        let tries = Family::<KindLabel, Counter>::default();
        for d in &store.deliveries {
            deliveries
                .get_or_create(&DeliveryLabel {
                    kind: d.kind.clone(),
                    state: d.state.as_str().into(),
                })
                .set(d.count as i64);
            tries
                .get_or_create(&KindLabel {
                    kind: d.kind.clone(),
                })
                .inc_by(d.tries);
        }
        r.register(
            "notify_deliveries",
            "Notification deliveries (webhook, mail, commit status) per kind and state",
            deliveries,
        );
        r.register(
            "notify_delivery_tries",
            "Tries made to send notifications (first sends and retries), per kind",
            tries,
        );

        let gauge = |v: u64| {
            let g = Gauge::<i64>::default();
            g.set(v as i64);
            g
        };
        r.register(
            "runners_attached",
            "Runners with a live stream",
            gauge(runners.attached),
        );
        r.register(
            "runners_busy",
            "Attached runners holding at least one attempt",
            gauge(runners.busy),
        );
        r.register(
            "runners_draining",
            "Attached runners taking no new work",
            gauge(runners.draining),
        );
        r.register(
            "runner_slots",
            "Slots of attached runners",
            gauge(runners.slots),
        );
        r.register(
            "runner_slots_used",
            "Slots of attached runners in use",
            gauge(runners.slots_used),
        );

        r.register(
            "output_bytes",
            "Bytes of job output stored since the dispatcher started",
            self.output_bytes.clone(),
        );
        r.register(
            "results_refused",
            "Results refused since the dispatcher started (not the current attempt, or not the sender's)",
            self.results_refused.clone(),
        );
        r.register(
            "runner_attaches",
            "Runner streams welcomed since the dispatcher started; kind=\"again\" for reconnects",
            self.attaches.clone(),
        );
        r.register(
            "reassignments",
            "Jobs handed back to the queue since the dispatcher started (runner lost or gave it back)",
            self.requeued.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "From queued to assigned, jobs assigned since the dispatcher started",
            self.queue_wait.clone(),
        );
        r.register(
            "job_duration_seconds",
            "From running to ended, jobs ended since the dispatcher started",
            self.job_duration.clone(),
        );
        r.register(
            "step_duration_seconds",
            "Steps' durations as their runners measured them",
            self.step_duration.clone(),
        );

        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &r);
        text
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `key=value` pairs joined by commas, in key order.
fn label_set(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

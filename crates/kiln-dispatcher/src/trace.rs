//! One OpenTelemetry trace per build. The dispatcher opens it when it accepts the build (a
//! `build` span), and adds to it a `queued` span per job (from the build's acceptance to the
//! job's assignment) and an `attempt` span per attempt (from its assignment to its result).
//! The runner's spans (the job, its checkout, each step and each split batch) join the same
//! trace: the build's span context travels to it in `Assign.trace_context` as a W3C
//! `traceparent`.
//!
//! Spans go to OpenTelemetry's global tracer, which the program sets up only when an OTLP
//! endpoint is configured; [`Traces`] does nothing at all unless [`crate::Config::trace`] is
//! set. The build's span context is kept in memory until the build ends: a build that outlives
//! a dispatcher restart continues in a new trace (a `build` span marked `resumed`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_domain::{Build, BuildId, JobState, Millis};
use opentelemetry::trace::{Span, SpanContext, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{Context, KeyValue, global};

/// The instrumentation scope of the dispatcher's spans.
const SCOPE: &str = "kiln-dispatcher";

/// The traces of the builds in flight.
#[derive(Debug, Default)]
pub(crate) struct Traces {
    enabled: bool,
    roots: Mutex<HashMap<BuildId, SpanContext>>,
}

fn at(ms: Millis) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

fn tracer() -> global::BoxedTracer {
    global::tracer_provider().tracer(SCOPE)
}

impl Traces {
    pub(crate) fn new(enabled: bool) -> Self {
        Self {
            enabled,
            roots: Mutex::new(HashMap::new()),
        }
    }

    fn roots(&self) -> std::sync::MutexGuard<'_, HashMap<BuildId, SpanContext>> {
        self.roots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the build's trace (its `build` span), unless it is open already.
    fn root(&self, b: &Build, resumed: bool) -> SpanContext {
        if let Some(sc) = self.roots().get(&b.id) {
            return sc.clone();
        }
        let mut span = tracer()
            .span_builder(format!("build {}", b.id))
            .with_start_time(at(b.created_at))
            .with_attributes(vec![
                KeyValue::new("kiln.build.id", b.id.get() as i64),
                KeyValue::new("kiln.repo", b.repo.clone()),
                KeyValue::new("kiln.commit", b.commit.clone()),
                KeyValue::new("kiln.branch", b.branch.clone()),
                KeyValue::new("kiln.trigger", b.trigger.clone()),
                KeyValue::new("kiln.resumed", resumed),
            ])
            .start(&tracer());
        let sc = span.span_context().clone();
        span.end();
        self.roots().entry(b.id).or_insert(sc).clone()
    }

    /// A build was accepted.
    pub(crate) fn accepted(&self, b: &Build) {
        if self.enabled {
            self.root(b, false);
        }
    }

    /// A job of `b` was given to a runner as `attempt`: its `queued` span, and the context the
    /// runner's spans join (the build's).
    pub(crate) fn assigned(
        &self,
        b: &Build,
        job: &str,
        attempt: kiln_domain::AttemptId,
        runner: &str,
    ) -> BTreeMap<String, String> {
        if !self.enabled {
            return BTreeMap::new();
        }
        let root = self.root(b, true);
        let parent = Context::new().with_remote_span_context(root.clone());
        let mut span = tracer()
            .span_builder(format!("queued {job}"))
            .with_start_time(at(b.created_at))
            .with_attributes(vec![
                KeyValue::new("kiln.job", job.to_string()),
                KeyValue::new("kiln.attempt.id", attempt.get() as i64),
                KeyValue::new("kiln.runner", runner.to_string()),
            ])
            .start_with_context(&tracer(), &parent);
        span.end();
        BTreeMap::from([(
            "traceparent".to_string(),
            format!(
                "00-{}-{}-{:02x}",
                root.trace_id(),
                root.span_id(),
                root.trace_flags().to_u8()
            ),
        )])
    }

    /// An attempt's result was recorded: its `attempt` span, from its assignment.
    pub(crate) fn finished(
        &self,
        build: BuildId,
        attempt: kiln_domain::AttemptId,
        state: JobState,
        since: Option<SystemTime>,
    ) {
        if !self.enabled {
            return;
        }
        let Some(root) = self.roots().get(&build).cloned() else {
            return;
        };
        let parent = Context::new().with_remote_span_context(root);
        let mut builder = tracer()
            .span_builder(format!("attempt {attempt}"))
            .with_attributes(vec![
                KeyValue::new("kiln.attempt.id", attempt.get() as i64),
                KeyValue::new("kiln.job.state", state.to_string()),
            ]);
        if let Some(t) = since {
            builder = builder.with_start_time(t);
        }
        builder.start_with_context(&tracer(), &parent).end();
    }

    /// The build ended: its context is forgotten.
    pub(crate) fn ended(&self, build: BuildId) {
        if self.enabled {
            self.roots().remove(&build);
        }
    }
}

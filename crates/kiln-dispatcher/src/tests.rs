//! Component tests of the engine: runner sessions driven through in-memory streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_domain::{AttemptId, JobId, JobState, NewBuild, NewJob, RunnerId, StepSpec};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::DispatchError;
use super::{Config, Dispatcher};
use kiln_domain::protocol::{self, DispatcherMessage as Out, RunnerMessage as In, StreamError};
use kiln_domain::split::UnitsReply;
use proptest::prelude::*;

pub(crate) type Inbound = mpsc::Sender<Result<In, StreamError>>;
pub(crate) type Outbound = ReceiverStream<Result<Out, DispatchError>>;

fn dispatcher(dir: &std::path::Path) -> Dispatcher {
    let mut c = Config::new(dir);
    c.heartbeat_interval = Duration::from_millis(200);
    Dispatcher::open(c).unwrap()
}

pub(crate) async fn build(d: &Dispatcher, jobs: usize) -> kiln_store::BuildDetail {
    d.create(NewBuild {
        repo: "/nonexistent/repo".into(),
        commit: "a".repeat(40),
        branch: "main".into(),
        trigger: "test".into(),
        retry_of: None,
        error: None,
        jobs: (0..jobs)
            .map(|i| NewJob {
                name: format!("job{i}"),
                labels: BTreeMap::new(),
                steps: vec![StepSpec {
                    index: 0,
                    name: "s".into(),
                    run: "true".into(),
                    env: BTreeMap::new(),
                    timeout_ms: 0,
                    post: None,
                    split: None,
                    junit: Vec::new(),
                }],
                needs: vec![],
            })
            .collect(),
        pipeline_hash: String::new(),
        pipeline: String::new(),
        params: Default::default(),
    })
    .await
    .unwrap()
}

pub(crate) fn m(msg: In) -> Result<In, StreamError> {
    Ok(msg)
}

async fn attach(d: &Dispatcher, name: &str, held: Vec<AttemptId>) -> (Inbound, Outbound, RunnerId) {
    let (tx, out, w) = attach_with(d, name, held, "").await;
    (tx, out, w.runner_id)
}

/// Attaches a runner holding `held` and presenting `secret` (a Welcome's session secret, or
/// empty); returns its streams and Welcome.
pub(crate) async fn attach_with(
    d: &Dispatcher,
    name: &str,
    held: Vec<AttemptId>,
    secret: &str,
) -> (Inbound, Outbound, protocol::Welcome) {
    let (tx, rx) = mpsc::channel(64);
    let mut out = d.attach(ReceiverStream::new(rx));
    tx.send(m(In::Hello(protocol::Hello {
        name: name.into(),
        labels: Default::default(),
        slots: 1,
        version: "test".into(),
        held_attempts: held,
        token: String::new(),
        session_secret: secret.into(),
    })))
    .await
    .unwrap();
    let first = next(&mut out).await.unwrap();
    let Out::Welcome(w) = first else {
        panic!("expected a welcome, got {first:?}")
    };
    (tx, out, w)
}

/// The next message that is not a heartbeat (`Err` when the stream ended with a status).
pub(crate) async fn next(out: &mut Outbound) -> Result<Out, DispatchError> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), out.next())
            .await
            .expect("no message from the dispatcher within 20s")
            .unwrap_or_else(|| {
                Err(DispatchError::Unavailable {
                    message: "stream ended".into(),
                })
            })?;
        if !matches!(msg, Out::Heartbeat(_)) {
            return Ok(msg);
        }
    }
}

pub(crate) async fn assigned(out: &mut Outbound) -> protocol::Assign {
    let msg = next(out).await.unwrap();
    let Out::Assign(a) = msg else {
        panic!("expected an assignment, got {msg:?}")
    };
    a
}

pub(crate) fn finished(
    attempt: AttemptId,
    state: JobState,
    last_seq: u64,
) -> Result<In, StreamError> {
    m(In::JobFinished(protocol::JobFinished {
        attempt_id: attempt,
        state,
        message: String::new(),
        last_seq,
    }))
}

pub(crate) fn output(attempt: AttemptId, seq: u64, data: &[u8]) -> Result<In, StreamError> {
    m(In::Output(protocol::OutputChunk {
        attempt_id: attempt,
        seq,
        step_index: 0,
        stream: protocol::OutputStream::Stdout,
        data: data.to_vec().into(),
    }))
}

async fn stored(d: &Dispatcher, job: JobId) -> Vec<(u64, Vec<u8>)> {
    let len = d.inner.logs.len(job).unwrap();
    let r = d.read_log(job, 0, len, usize::MAX).await.unwrap();
    r.frames
        .into_iter()
        .map(|f| (f.header.seq, f.data))
        .collect()
}

#[tokio::test]
async fn first_message_must_be_hello() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let (tx, rx) = mpsc::channel(4);
    let mut out = d.attach(ReceiverStream::new(rx));
    tx.send(m(In::Heartbeat(protocol::Heartbeat::default())))
        .await
        .unwrap();
    let err = next(&mut out).await.unwrap_err();
    assert!(matches!(err, DispatchError::InvalidArgument { .. }));
    assert!(err.to_string().contains("hello"), "{}", err.to_string());
}

#[tokio::test]
async fn output_is_stored_once_in_order_and_results_are_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let job = b.jobs[0].id;
    let (tx, mut out, w) = hello(&d, hello_of("r1", vec![], "")).await.unwrap();
    let a = assigned(&mut out).await;
    tx.send(m(In::Accepted(protocol::Accepted {
        attempt_id: a.attempt_id,
    })))
    .await
    .unwrap();
    // 1, 2, then 2 again (a re-send), then 4 (a gap).
    for (seq, data) in [(1, "a"), (2, "b"), (2, "b"), (4, "d")] {
        tx.send(output(a.attempt_id, seq, data.as_bytes()))
            .await
            .unwrap();
    }
    let mut acks = Vec::new();
    let gap = loop {
        match next(&mut out).await {
            Ok(msg) => match msg {
                Out::OutputAck(ack) => acks.push(ack.up_to_seq),
                other => panic!("{other:?}"),
            },
            Err(status) => break status,
        }
    };
    assert_eq!(acks, vec![1, 2, 2]);
    // The gap ends the session: the runner must reconnect and send again what is not acked.
    assert!(matches!(gap, DispatchError::OutputGap { .. }), "{gap:?}");
    // It re-attaches presenting its session secret, so it gets its attempt back.
    let (tx, mut out, w) = hello(&d, hello_of("r1", vec![a.attempt_id], &w.session_secret))
        .await
        .unwrap();
    // A result claiming more output than arrived is not taken either.
    tx.send(finished(a.attempt_id, JobState::Passed, 4))
        .await
        .unwrap();
    assert!(matches!(
        next(&mut out).await.unwrap_err(),
        DispatchError::OutputMissing { .. }
    ));
    let (tx, mut out, _) = hello(&d, hello_of("r1", vec![a.attempt_id], &w.session_secret))
        .await
        .unwrap();
    for (seq, data) in [(3, "c"), (4, "d")] {
        tx.send(output(a.attempt_id, seq, data.as_bytes()))
            .await
            .unwrap();
    }
    for want in [3, 4] {
        match next(&mut out).await.unwrap() {
            Out::OutputAck(ack) => assert_eq!(ack.up_to_seq, want),
            other => panic!("{other:?}"),
        }
    }
    let log = stored(&d, job).await;
    assert_eq!(
        log,
        vec![
            (1, b"a".to_vec()),
            (2, b"b".to_vec()),
            (3, b"c".to_vec()),
            (4, b"d".to_vec())
        ]
    );
    // A result for an attempt that is not this runner's is refused; the real one is recorded.
    tx.send(finished(
        AttemptId::new(a.attempt_id.get() + 100),
        JobState::Failed,
        0,
    ))
    .await
    .unwrap();
    assert!(matches!(next(&mut out).await.unwrap(), Out::Refused(_)));
    for _ in 0..2 {
        tx.send(finished(a.attempt_id, JobState::Passed, 4))
            .await
            .unwrap();
        assert!(matches!(next(&mut out).await.unwrap(), Out::ResultAck(_)));
    }
    let b = d.get_build(b.build.id).await.unwrap();
    assert_eq!(b.build.state, JobState::Passed);
    stop.cancel();
    bg.await.unwrap();
}

/// One message of a fuzzing runner's stream.
#[derive(Debug, Clone)]
enum Fuzz {
    /// Output of its attempt with this sequence number (duplicates and gaps included).
    Output(u64),
    /// Output of an attempt this many ids after its own (not its attempt).
    Foreign(u64),
    /// A step's end with this outcome (index into the outcomes).
    Finished(usize),
    /// What the edge passes on for a wire message that does not convert (an unknown stream,
    /// no kind at all).
    Invalid,
    /// A chunk larger than a log frame may be.
    Oversized,
    /// A heartbeat.
    Heartbeat,
}

fn fuzz() -> impl Strategy<Value = Fuzz> {
    prop_oneof![
        6 => (1..9u64).prop_map(Fuzz::Output),
        1 => (1..6u64).prop_map(Fuzz::Foreign),
        1 => (0..6usize).prop_map(Fuzz::Finished),
        2 => Just(Fuzz::Invalid),
        1 => Just(Fuzz::Oversized),
        1 => Just(Fuzz::Heartbeat),
    ]
}

/// Runs one fuzzing runner's stream against `d`: attaches as `name`, takes a new build's job,
/// sends `stream`, and returns the job's stored sequence numbers (and whether the dispatcher
/// closed the stream).
async fn fuzz_session(d: &Dispatcher, name: &str, stream: &[Fuzz]) -> (Vec<u64>, bool) {
    use kiln_domain::StepOutcome::*;
    let b = build(d, 1).await;
    let job = b.jobs[0].id;
    let (tx, mut out, _) = attach(d, name, vec![]).await;
    let attempt = assigned(&mut out).await.attempt_id;
    let mut closed = false;
    for f in stream {
        let msg = match *f {
            Fuzz::Output(seq) => output(attempt, seq, &[b'x'; 3]),
            Fuzz::Foreign(offset) => output(AttemptId::new(attempt.get() + offset), 1, b"zz"),
            Fuzz::Finished(i) => m(In::StepFinished(protocol::StepFinished {
                attempt_id: attempt,
                step_index: 0,
                outcome: [Passed, Failed, TimedOut, Cancelled, Errored, Skipped][i],
                exit_code: None,
                signal: None,
                duration_ms: 0,
                last_seq: 0,
                cases: Vec::new(),
                report_note: String::new(),
            })),
            Fuzz::Invalid => Err(StreamError::InvalidArgument {
                message: "output.stream 8 is not stdout, stderr or system".into(),
            }),
            Fuzz::Oversized => output(attempt, 1, &vec![0u8; kiln_store::MAX_FRAME + 1]),
            Fuzz::Heartbeat => m(In::Heartbeat(protocol::Heartbeat::default())),
        };
        if tx.send(msg).await.is_err() {
            closed = true;
            break;
        }
    }
    drop(tx);
    // Drain what the dispatcher said until the stream ends.
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(20), out.next()).await {
        if msg.is_err() {
            closed = true;
        }
    }
    let seqs = stored(d, job).await.iter().map(|(s, _)| *s).collect();
    (seqs, closed)
}

/// Property: whatever a runner sends (duplicates, gaps, unknown attempts, bad enums, empty
/// messages, oversized chunks, a second hello), the dispatcher never panics, stores each chunk
/// of the current attempt at most once and in sequence, and keeps serving other runners.
/// proptest shrinks a failing stream to a short one.
#[test]
fn random_runner_streams_never_corrupt_the_log() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let (d, bg) = rt.block_on(async {
        let d = dispatcher(dir.path());
        let bg = d.spawn_background(stop.clone());
        (d, bg)
    });
    let sessions = std::sync::atomic::AtomicU64::new(0);
    proptest!(ProptestConfig::with_cases(16), |(stream in proptest::collection::vec(fuzz(), 0..60))| {
        let n = sessions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (seqs, closed) = rt.block_on(fuzz_session(&d, &format!("fuzz{n}"), &stream));
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        prop_assert_eq!(seqs, expected, "log not in sequence (stream closed: {})", closed);
    });
    // Still serving: a well-behaved runner gets work and finishes it.
    rt.block_on(async {
        let b = build(&d, 1).await;
        let (tx, mut out, _) = attach(&d, "good", vec![]).await;
        let mut a = assigned(&mut out).await;
        while a.job_id != b.jobs[0].id {
            // Jobs of the fuzzed sessions come back after their lease; finish them too.
            tx.send(finished(a.attempt_id, JobState::Passed, 0))
                .await
                .unwrap();
            loop {
                match next(&mut out).await.unwrap() {
                    Out::Assign(x) => {
                        a = x;
                        break;
                    }
                    _ => continue,
                }
            }
        }
        tx.send(finished(a.attempt_id, JobState::Passed, 0))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let s = d.get_build(b.build.id).await.unwrap().build.state;
            if s == JobState::Passed {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "state {s}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        bg.await.unwrap();
    });
}

#[tokio::test]
async fn lost_runner_work_goes_to_another_and_late_result_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (tx1, mut out1, _) = attach(&d, "first", vec![]).await;
    let a1 = assigned(&mut out1).await;
    // The first runner goes silent (no heartbeats); a second one is attached.
    let (tx2, mut out2, _) = attach(&d, "second", vec![]).await;
    let beat = tx2.clone();
    tokio::spawn(async move {
        while beat
            .send(m(In::Heartbeat(protocol::Heartbeat::default())))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let a2 = assigned(&mut out2).await;
    assert_eq!(a2.job_id, a1.job_id);
    assert_ne!(a2.attempt_id, a1.attempt_id);
    assert_eq!(a2.attempt_number, 2);
    // The first comes back holding its attempt: told it is stale, and its result is refused.
    drop(tx1);
    let (tx1, _out1b, _) = {
        let (tx, rx) = mpsc::channel(8);
        let mut out = d.attach(ReceiverStream::new(rx));
        tx.send(m(In::Hello(protocol::Hello {
            name: "first".into(),
            slots: 1,
            held_attempts: vec![a1.attempt_id],
            ..Default::default()
        })))
        .await
        .unwrap();
        let w = next(&mut out).await.unwrap();
        let Out::Welcome(w) = w else { panic!("{w:?}") };
        assert_eq!(w.stale_attempts, vec![a1.attempt_id]);
        (tx, out, w.runner_id)
    };
    tx1.send(finished(a1.attempt_id, JobState::Failed, 0))
        .await
        .unwrap();
    tx2.send(finished(a2.attempt_id, JobState::Passed, 0))
        .await
        .unwrap();
    assert!(matches!(next(&mut out2).await.unwrap(), Out::ResultAck(_)));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let detail = d.get_build(b.build.id).await.unwrap();
        let refusals = d.inner.store.refusals(detail.jobs[0].id).unwrap();
        if detail.build.state == JobState::Passed && !refusals.is_empty() {
            assert_eq!(detail.jobs[0].lost_attempts, 1);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(out1);
    stop.cancel();
    bg.await.unwrap();
}

fn next_units(attempt: AttemptId, request: u32, discovered: &[&str]) -> protocol::NextUnits {
    protocol::NextUnits {
        attempt_id: attempt,
        step_index: 0,
        request,
        discovered: discovered.iter().map(|s| s.to_string()).collect(),
        results: vec![],
        max_units: 0,
        interactions: vec![],
        ..Default::default()
    }
}

async fn units_answer(out: &mut Outbound) -> protocol::Units {
    let msg = next(out).await.unwrap();
    let Out::Units(u) = msg else {
        panic!("expected units, got {msg:?}")
    };
    u
}

#[tokio::test]
async fn next_units_is_fenced_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let _bg = d.spawn_background(stop.clone());
    build(&d, 1).await;
    let (tx, mut out, _) = attach(&d, "r1", vec![]).await;
    let a = assigned(&mut out).await;
    tx.send(m(In::Accepted(protocol::Accepted {
        attempt_id: a.attempt_id,
    })))
    .await
    .unwrap();
    // Not a split step: refused, the session stays up.
    tx.send(m(In::NextUnits(next_units(a.attempt_id, 1, &["u1"]))))
        .await
        .unwrap();
    let u = units_answer(&mut out).await;
    assert!(matches!(u.reply, UnitsReply::Refused(_)), "{u:?}");
    assert_eq!(u.request, 1);
    // An attempt this runner does not hold: refused.
    tx.send(m(In::NextUnits(next_units(
        AttemptId::new(999),
        1,
        &["u1"],
    ))))
    .await
    .unwrap();
    let u = units_answer(&mut out).await;
    assert!(
        matches!(&u.reply, UnitsReply::Refused(why) if why.contains("999")),
        "{u:?}"
    );
    // A malformed request (request 0, a unit id with a newline) closes the session as
    // INVALID_ARGUMENT.
    let mut bad = next_units(a.attempt_id, 2, &["a\nb"]);
    bad.request = 2;
    tx.send(m(In::NextUnits(bad))).await.unwrap();
    let err = next(&mut out).await.unwrap_err();
    assert!(
        matches!(err, DispatchError::InvalidArgument { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("newline"), "{err:?}");
    stop.cancel();
}

/// A runner that refuses every assignment ("no free slot", a leaked slot) is backed off, not
/// offered the job in a loop: over ten minutes (paused clock) it gets a bounded number of
/// assignments, each one attempt row, and counts as unhealthy after a few.
#[tokio::test(start_paused = true)]
async fn a_runner_refusing_every_assignment_is_backed_off() {
    let dir = tempfile::tempdir().unwrap();
    // A lease longer than the test's real duration (liveness uses the real clock).
    let mut c = Config::new(dir.path());
    c.heartbeat_interval = Duration::from_secs(10);
    let d = Dispatcher::open(c).unwrap();
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (tx, mut out, runner) = attach(&d, "leaky", vec![]).await;
    let start = tokio::time::Instant::now();
    let mut assignments = 0u64;
    // 1 + 2 + 4 + ... + 32 s, then one a minute: 15 in ten minutes.
    const BOUND: u64 = 20;
    while start.elapsed() < Duration::from_secs(600) {
        let msg = tokio::time::timeout(Duration::from_secs(90), out.next()).await;
        let a = match msg {
            Err(_) => continue,
            Ok(Some(Ok(Out::Assign(a)))) => a,
            Ok(Some(Ok(_))) => continue,
            Ok(other) => panic!("the session ended: {other:?}"),
        };
        assignments += 1;
        assert!(
            assignments <= BOUND,
            "{assignments} assignments to a refusing runner within {:?}",
            start.elapsed()
        );
        tx.send(m(In::Rejected(protocol::Rejected {
            attempt_id: a.attempt_id,
            reason: "no free slot".into(),
        })))
        .await
        .unwrap();
        assert!(matches!(next(&mut out).await.unwrap(), Out::ResultAck(_)));
        // Heartbeats, so the runner stays attached.
        tx.send(m(In::Heartbeat(protocol::Heartbeat::default())))
            .await
            .unwrap();
    }
    assert!(assignments >= 5, "{assignments}");
    let job = d.get_build(b.build.id).await.unwrap().jobs[0].clone();
    assert_eq!(job.attempts as u64, assignments, "{job:?}");
    assert_eq!(job.state, JobState::Queued);
    {
        let st = d.state();
        let s = st.sessions.get(&runner).unwrap();
        assert!(s.unhealthy(), "{} refusals", s.refusals);
    }
    drop(tx);
    stop.cancel();
    bg.await.unwrap();
}

/// Attaches with a hello and returns the status the stream ended with (the hello refused).
async fn hello_refused(d: &Dispatcher, hello: protocol::Hello) -> DispatchError {
    let (tx, rx) = mpsc::channel(4);
    let mut out = d.attach(ReceiverStream::new(rx));
    tx.send(m(In::Hello(hello))).await.unwrap();
    match next(&mut out).await {
        Err(s) => s,
        Ok(msg) => panic!("expected the hello refused, got {msg:?}"),
    }
}

#[tokio::test]
async fn a_hello_claims_only_its_own_attempts_and_a_valid_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (_tx, mut out, _) = attach(&d, "owner", vec![]).await;
    let a = assigned(&mut out).await;

    // Another runner claiming the owner's attempt (and one that does not exist) is told to
    // drop them, and nothing is written onto the build.
    let (tx2, rx2) = mpsc::channel(4);
    let mut out2 = d.attach(ReceiverStream::new(rx2));
    tx2.send(m(In::Hello(protocol::Hello {
        name: "evil".into(),
        slots: 1,
        held_attempts: vec![a.attempt_id, AttemptId::new(9000)],
        ..Default::default()
    })))
    .await
    .unwrap();
    let w = next(&mut out2).await.unwrap();
    let Out::Welcome(w) = w else { panic!("{w:?}") };
    assert_eq!(w.stale_attempts, vec![a.attempt_id, AttemptId::new(9000)]);
    let job = b.jobs[0].id;
    assert_eq!(d.inner.store.refusals(job).unwrap(), vec![]);
    // Its claim changed nothing: the attempt is still the owner's.
    assert_eq!(
        d.state().attempts[&a.attempt_id].runner_id,
        a_runner(&d, "owner")
    );

    // At most twice its slots.
    let s = hello_refused(
        &d,
        protocol::Hello {
            name: "greedy".into(),
            slots: 1,
            held_attempts: (1..=9000).map(AttemptId::new).collect(),
            ..Default::default()
        },
    )
    .await;
    assert!(matches!(s, DispatchError::InvalidArgument { .. }));
    assert!(
        s.to_string().contains("hello.held_attempts"),
        "{}",
        s.to_string()
    );

    // Names: printable ASCII only (no U+200B hiding behind "r3"), bounded.
    for name in [
        "r3\u{200b}",
        "r\u{0440}3",
        &"x".repeat(200),
        "-r",
        "a b",
        "r3\u{202e}",
    ] {
        let s = hello_refused(
            &d,
            protocol::Hello {
                name: name.into(),
                slots: 1,
                ..Default::default()
            },
        )
        .await;
        assert!(
            matches!(s, DispatchError::InvalidArgument { .. }),
            "{name:?}"
        );
        assert!(s.to_string().contains("hello.name"), "{}", s.to_string());
        assert!(s.to_string().len() < 300, "{}", s.to_string());
    }
    let names: Vec<String> = d
        .list_runners()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.record.name)
        .collect();
    assert_eq!(names, ["evil", "owner"]);
    stop.cancel();
    bg.await.unwrap();
}

fn a_runner(d: &Dispatcher, name: &str) -> RunnerId {
    d.inner
        .store
        .list_runners()
        .unwrap()
        .into_iter()
        .find(|r| r.name == name)
        .unwrap()
        .id
}

#[tokio::test]
async fn runners_that_never_held_work_are_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(dir.path());
    c.heartbeat_interval = Duration::from_millis(200);
    c.forget_idle_runners_after = Duration::ZERO;
    let d = Dispatcher::open(c).unwrap();
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    build(&d, 1).await;
    let (worker, mut out, _) = attach(&d, "worker", vec![]).await;
    assigned(&mut out).await;
    let (ghost, _out, _) = attach(&d, "ghost", vec![]).await;
    let (_here, _out2, here) = attach(&d, "attached", vec![]).await;
    drop(ghost);
    drop(worker);
    // Wait until the ghost's session is gone (its stream ended).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let n = {
            let st = d.state();
            st.sessions.len()
        };
        if n == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} sessions");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    d.forget_idle_runners(&[here]).await.unwrap();
    let names: Vec<String> = d
        .list_runners()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.record.name)
        .collect();
    assert_eq!(names, ["attached", "worker"]);
    stop.cancel();
    bg.await.unwrap();
}

/// Sends a hello; the Welcome, or the status the stream ended with.
async fn hello(
    d: &Dispatcher,
    hello: protocol::Hello,
) -> Result<(Inbound, Outbound, protocol::Welcome), DispatchError> {
    let (tx, rx) = mpsc::channel(16);
    let mut out = d.attach(ReceiverStream::new(rx));
    tx.send(m(In::Hello(hello))).await.unwrap();
    let w = next(&mut out).await?;
    let Out::Welcome(w) = w else {
        panic!("expected a welcome, got {w:?}")
    };
    Ok((tx, out, w))
}

fn hello_of(name: &str, held: Vec<AttemptId>, secret: &str) -> protocol::Hello {
    protocol::Hello {
        name: name.into(),
        slots: 1,
        held_attempts: held,
        session_secret: secret.into(),
        ..Default::default()
    }
}

/// An impostor using a live runner's name (shared-token mode: no token at all here) is refused
/// while the runner's session is alive, and cannot claim its attempts while they wait for it
/// to come back; the runner itself, presenting its session secret, re-attaches at once.
#[tokio::test]
async fn a_runner_cannot_be_impersonated_within_its_lease() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(dir.path());
    // A long lease and grace: the attempt waits for its runner throughout the test.
    c.heartbeat_interval = Duration::from_secs(20);
    c.reconnect_grace = Duration::from_secs(60);
    let d = Dispatcher::open(c).unwrap();
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (tx, mut out, w) = hello(&d, hello_of("victim", vec![], "")).await.unwrap();
    assert_eq!(w.session_secret.len(), 69, "{w:?}");
    let a = assigned(&mut out).await.attempt_id;

    // Its session is alive: without the secret (or with a wrong one) the name is refused.
    for secret in ["", "kiln_guess"] {
        let s = hello(&d, hello_of("victim", vec![a], secret))
            .await
            .err()
            .unwrap();
        assert!(matches!(s, DispatchError::RunnerAttached { .. }), "{s:?}");
    }
    // The runner's stream closes; its attempt waits for it. An impostor may now use the name
    // but gets nothing of the runner's: the attempt is not re-attached and its forged result
    // is refused.
    drop(tx);
    drop(out);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while d.state().attempts[&a].session.is_some() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (itx, mut iout, iw) = hello(&d, hello_of("victim", vec![a], "")).await.unwrap();
    assert_eq!(iw.stale_attempts, vec![a]);
    itx.send(finished(a, JobState::Failed, 0)).await.unwrap();
    let r = next(&mut iout).await.unwrap();
    assert!(matches!(r, Out::Refused(_)), "{r:?}");
    let job = d.get_build(b.build.id).await.unwrap().jobs[0].clone();
    assert_eq!(job.state, JobState::Assigned, "{job:?}");
    assert_eq!(d.state().attempts[&a].session, None);

    // The runner itself comes back with the secret and gets its attempt back, at once, even
    // while the impostor's session is alive (the impostor's session ends).
    let (rtx, mut rout, rw) = hello(&d, hello_of("victim", vec![a], &w.session_secret))
        .await
        .unwrap();
    assert!(rw.stale_attempts.is_empty(), "{rw:?}");
    assert!(next(&mut iout).await.is_err() || d.state().sessions.len() == 1);
    rtx.send(finished(a, JobState::Passed, 0)).await.unwrap();
    let r = next(&mut rout).await.unwrap();
    assert!(matches!(r, Out::ResultAck(_)), "{r:?}");
    let detail = d.get_build(b.build.id).await.unwrap();
    assert_eq!(detail.build.state, JobState::Passed);
    drop(itx);
    stop.cancel();
    bg.await.unwrap();
}

/// With per-runner tokens the token proves the runner: a second session presenting it takes
/// over; one presenting another runner's token is refused.
#[tokio::test]
async fn a_runner_token_binds_the_session_to_its_runner() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    for (name, token) in [("a", "token-a"), ("b", "token-b")] {
        let hash = crate::tokens::hash_token(token);
        d.inner.store.set_runner_token(name, Some(&hash)).unwrap();
    }
    let with = |name: &str, token: &str| protocol::Hello {
        token: token.into(),
        ..hello_of(name, vec![], "")
    };
    let (_tx, _out, _) = hello(&d, with("a", "token-a")).await.unwrap();
    let s = hello(&d, with("a", "token-b")).await.err().unwrap();
    assert!(matches!(s, DispatchError::Unauthenticated { .. }), "{s:?}");
    // The runner restarted (no secret) but holds its token: it takes over at once.
    let (_tx2, _out2, _) = hello(&d, with("a", "token-a")).await.unwrap();
}

/// A runner whose full heartbeats (`lists_held`) stop listing an attempt it accepted has
/// forgotten it: the dispatcher sends it back to the queue after two such heartbeats, without
/// waiting for the job's deadline. Heartbeats that do not claim to list everything (older
/// runners) change nothing.
#[tokio::test]
async fn an_attempt_the_runner_no_longer_lists_goes_back_to_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (tx, mut out, _) = attach(&d, "forgetful", vec![]).await;
    let a = assigned(&mut out).await;
    tx.send(m(In::Accepted(protocol::Accepted {
        attempt_id: a.attempt_id,
    })))
    .await
    .unwrap();
    let beat = |lists_held: bool, running: Vec<AttemptId>| {
        m(In::Heartbeat(protocol::Heartbeat {
            running_attempts: running,
            sent_at_ms: 0,
            draining: false,
            lists_held,
        }))
    };
    let job = b.jobs[0].id;
    let attempt_of = |d: &Dispatcher| {
        let d = d.clone();
        async move {
            let detail = d.get_build(b.build.id).await.unwrap();
            detail.jobs[0].current_attempt
        }
    };
    // Listed, or not claiming to list everything: it stays, however long that goes on.
    for _ in 0..6 {
        tx.send(beat(true, vec![a.attempt_id])).await.unwrap();
        tx.send(beat(false, vec![])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(attempt_of(&d).await, Some(a.attempt_id));
    assert!(d.state().attempts.contains_key(&a.attempt_id));
    // Full heartbeats without it: back to the queue, and offered again (to this runner, the
    // only one).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let again = loop {
        tx.send(beat(true, vec![])).await.unwrap();
        let next = tokio::time::timeout(Duration::from_millis(200), out.next()).await;
        if let Ok(Some(Ok(Out::Assign(x)))) = next {
            break x;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forgotten attempt was never given out again"
        );
    };
    assert_eq!(again.job_id, job);
    assert_ne!(again.attempt_id, a.attempt_id);
    let detail = d.get_build(b.build.id).await.unwrap();
    assert_eq!(detail.jobs[0].lost_attempts, 1);
    drop(tx);
    stop.cancel();
    bg.await.unwrap();
}

/// A job the dispatcher ends itself (here a cancel its runner never confirmed) has its log
/// compressed at rest like a job that ended with a result, and it reads the same.
#[tokio::test]
async fn a_job_ended_without_its_runner_has_its_log_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = Config::new(dir.path());
    c.heartbeat_interval = Duration::from_millis(200);
    c.cancel_grace = Duration::from_millis(300);
    c.deadline_slack = Duration::from_millis(100);
    let d = Dispatcher::open(c).unwrap();
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let b = build(&d, 1).await;
    let (tx, mut out, _) = attach(&d, "mute", vec![]).await;
    let a = assigned(&mut out).await;
    for seq in 1..=3 {
        tx.send(output(a.attempt_id, seq, b"some output\n"))
            .await
            .unwrap();
        assert!(matches!(next(&mut out).await.unwrap(), Out::OutputAck(_)));
    }
    let before = stored(&d, a.job_id).await;
    assert_eq!(before.len(), 3);
    // The runner keeps heartbeating but never answers the cancel.
    let beat = tx.clone();
    tokio::spawn(async move {
        while beat
            .send(m(In::Heartbeat(protocol::Heartbeat::default())))
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    d.cancel_build(b.build.id).await.unwrap();
    let sealed = dir
        .path()
        .join("logs")
        .join(format!("{}.log.zst", a.job_id));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let state = d.get_build(b.build.id).await.unwrap().build.state;
        if state == JobState::Cancelled && sealed.exists() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "state {state}, sealed {}",
            sealed.exists()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !dir.path()
            .join("logs")
            .join(format!("{}.log", a.job_id))
            .exists()
    );
    assert_eq!(stored(&d, a.job_id).await, before);
    drop(out);
    stop.cancel();
    bg.await.unwrap();
}

/// The dispatcher answers each runner heartbeat with its own (the runner hears from it at its
/// own interval) and sends none unasked (an idle farm wakes it once per runner and interval).
#[tokio::test]
async fn the_dispatcher_answers_heartbeats() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let (tx, mut out, _) = attach(&d, "beating", vec![]).await;
    // Three intervals without a runner heartbeat: nothing comes.
    let quiet = tokio::time::timeout(Duration::from_millis(600), out.next()).await;
    assert!(quiet.is_err(), "unasked: {quiet:?}");
    for _ in 0..3 {
        tx.send(m(In::Heartbeat(protocol::Heartbeat::default())))
            .await
            .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(20), out.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(matches!(answer, Out::Heartbeat(_)), "{answer:?}");
    }
}

/// A build's parameters reach the runner in each step's env, over what the pipeline put there
/// (the runner applies a step's env after the assignment's), and not as a KILN_ variable.
#[tokio::test]
async fn an_assignment_carries_the_build_parameters_over_the_step_env() {
    let dir = tempfile::tempdir().unwrap();
    let d = dispatcher(dir.path());
    let stop = CancellationToken::new();
    let bg = d.spawn_background(stop.clone());
    let step = |index: u32, env: &[(&str, &str)]| StepSpec {
        index,
        name: format!("s{index}"),
        run: "true".into(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        timeout_ms: 0,
        post: None,
        split: None,
        junit: Vec::new(),
    };
    let params: BTreeMap<String, String> = [("GREETING", "param"), ("EXTRA", "x")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let b = d
        .create(NewBuild {
            repo: "/nonexistent/repo".into(),
            commit: "a".repeat(40),
            branch: "main".into(),
            trigger: "test".into(),
            retry_of: None,
            error: None,
            jobs: vec![NewJob {
                name: "j".into(),
                labels: BTreeMap::new(),
                steps: vec![
                    step(0, &[("GREETING", "pipeline"), ("KEEP", "kept")]),
                    step(1, &[]),
                ],
                needs: vec![],
            }],
            pipeline_hash: String::new(),
            pipeline: String::new(),
            params: params.clone(),
        })
        .await
        .unwrap();
    assert_eq!(b.build.params, params);
    let (_tx, mut out, _w) = hello(&d, hello_of("r1", vec![], "")).await.unwrap();
    let a = assigned(&mut out).await;
    assert_eq!(a.steps[0].env["GREETING"], "param");
    assert_eq!(a.steps[0].env["KEEP"], "kept");
    assert_eq!(a.steps[0].env["EXTRA"], "x");
    assert_eq!(a.steps[1].env, params);
    assert_eq!(a.env["KILN_BUILD_ID"], b.build.id.to_string());
    assert!(!a.env.contains_key("GREETING"), "{:?}", a.env);
    stop.cancel();
    bg.await.unwrap();
}

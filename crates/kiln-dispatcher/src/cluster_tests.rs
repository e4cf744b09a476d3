//! Several dispatchers on one PostgreSQL database (a throwaway one, `kiln-pgtest`), each with
//! its own data dir, runners driven through in-memory streams.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use kiln_domain::{AttemptId, Event, JobId, JobState};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::tests::{
    Inbound, Outbound, assigned, attach_with as attach, build, finished, m, next, output,
};
use super::{Config, Dispatcher, RunnerState};
use kiln_domain::protocol::{self, DispatcherMessage as Out, RunnerMessage as In};

/// A dispatcher on `url` with its background loops (stopped by the token), its bus listening.
async fn open(url: &str, dir: &std::path::Path) -> (Dispatcher, CancellationToken) {
    let mut c = Config::new(dir);
    c.heartbeat_interval = Duration::from_millis(200);
    c.cancel_grace = Duration::from_millis(500);
    c.database = Some(url.parse().unwrap());
    let d = tokio::task::spawn_blocking(move || Dispatcher::open(c))
        .await
        .unwrap()
        .unwrap();
    let stop = CancellationToken::new();
    d.spawn_background(stop.clone());
    tokio::time::timeout(Duration::from_secs(10), d.bus_listening())
        .await
        .expect("the bus listens within 10 s");
    (d, stop)
}

fn accepted(a: AttemptId) -> Result<In, protocol::StreamError> {
    m(In::Accepted(protocol::Accepted { attempt_id: a }))
}

/// Waits (at most 20 s) for an event of `job` in `state`.
async fn wait_event(rx: &mut broadcast::Receiver<Event>, job: JobId, state: JobState) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = rx.recv().await.unwrap();
            if e.job_id == Some(job) && e.state == state {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event of job {job} becoming {state} within 20 s"));
}

/// Waits (at most 20 s) until `cond` holds, looking every 20 ms.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within 20 s: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Two dispatchers A and B on one throwaway database, each with its own data dir.
struct Two {
    url: String,
    a: Dispatcher,
    stop_a: CancellationToken,
    b: Dispatcher,
    stop_b: CancellationToken,
    dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn two() -> Two {
    let url = kiln_pgtest::database().unwrap();
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, stop_a) = open(&url, dirs.0.path()).await;
    let (b, stop_b) = open(&url, dirs.1.path()).await;
    Two {
        url,
        a,
        stop_a,
        b,
        stop_b,
        dirs,
    }
}

/// Breaks `d`'s bus connection (as a network fault would): listening again, it says it may
/// have missed messages.
fn break_bus(url: &str, d: &Dispatcher) {
    let me = d.inner.cluster.as_ref().unwrap().me;
    let killed = kiln_pgtest::query(
        url,
        &format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'kiln-bus-{me}' AND datname = current_database()"
        ),
    )
    .unwrap();
    assert_eq!(killed.len(), 1, "the bus connection not found: {killed:?}");
}

/// Sets whether `d` loses every bus message it hears.
fn deaf(d: &Dispatcher, deaf: bool) {
    let c = d.inner.cluster.as_ref().unwrap();
    c.deaf.store(deaf, std::sync::atomic::Ordering::SeqCst);
}

/// Two dispatchers on one database, a runner `r1` attached to A, and a one-job build
/// submitted to B running on it (B saw it start).
struct OnA {
    url: String,
    a: Dispatcher,
    stop_a: CancellationToken,
    b: Dispatcher,
    _stop_b: CancellationToken,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    tx: Inbound,
    out: Outbound,
    welcome: protocol::Welcome,
    detail: kiln_store::BuildDetail,
    job: JobId,
    attempt: AttemptId,
    events: broadcast::Receiver<Event>,
}

async fn running_on_a() -> OnA {
    let Two {
        url,
        a,
        stop_a,
        b,
        stop_b,
        dirs,
    } = two().await;
    let (tx, mut out, welcome) = attach(&a, "r1", vec![], "").await;
    let detail = build(&b, 1).await;
    let job = detail.jobs[0].id;
    let attempt = assigned(&mut out).await.attempt_id;
    tx.send(accepted(attempt)).await.unwrap();
    let mut events = b.subscribe();
    wait_event(&mut events, job, JobState::Running).await;
    OnA {
        url,
        a,
        stop_a,
        b,
        _stop_b: stop_b,
        _dirs: dirs,
        tx,
        out,
        welcome,
        detail,
        job,
        attempt,
        events,
    }
}

/// Sends output chunks `seqs` of `attempt` and checks each is acknowledged.
async fn acked_output(
    tx: &Inbound,
    out: &mut Outbound,
    attempt: AttemptId,
    seqs: std::ops::RangeInclusive<u64>,
    data: &[u8],
) {
    for seq in seqs {
        tx.send(output(attempt, seq, data)).await.unwrap();
        match next(out).await.unwrap() {
            Out::OutputAck(ack) => assert_eq!(ack.up_to_seq, seq),
            other => panic!("expected an ack, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_submitted_to_one_dispatcher_runs_on_the_others_runner() {
    let Two {
        a,
        stop_a: _stop_a,
        b,
        stop_b: _stop_b,
        dirs: _dirs,
        ..
    } = two().await;
    let (tx, mut out, _) = attach(&a, "r1", vec![], "").await;
    let mut events = b.subscribe();
    let detail = build(&b, 1).await;
    let job = detail.jobs[0].id;
    // B's build event kicked A's scheduler.
    let asg = assigned(&mut out).await;
    assert_eq!(asg.job_id, job);
    tx.send(accepted(asg.attempt_id)).await.unwrap();
    wait_event(&mut events, job, JobState::Running).await;
    // B lists the runner as attached (to A) and busy.
    let views = b.list_runners().await.unwrap();
    let r1 = views.iter().find(|v| v.record.name == "r1").unwrap();
    assert_eq!(r1.state, RunnerState::Busy);
    assert_eq!(r1.running_jobs, vec![job]);
    tx.send(finished(asg.attempt_id, JobState::Passed, 0))
        .await
        .unwrap();
    assert!(matches!(next(&mut out).await.unwrap(), Out::ResultAck(_)));
    // B's watchers see it end.
    wait_event(&mut events, job, JobState::Passed).await;
    assert_eq!(b.get_job(job).await.unwrap().state, JobState::Passed);
    let views = b.list_runners().await.unwrap();
    let r1 = views.iter().find(|v| v.record.name == "r1").unwrap();
    assert_eq!(r1.state, RunnerState::Idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dispatchers_never_give_out_one_job_twice() {
    let Two {
        a,
        stop_a: _stop_a,
        b,
        stop_b: _stop_b,
        dirs: _dirs,
        ..
    } = two().await;
    const JOBS: usize = 12;
    let stop = CancellationToken::new();
    let mut runners = Vec::new();
    for (i, d) in [&a, &b, &a, &b].into_iter().enumerate() {
        let (tx, mut out, _) = attach(d, &format!("r{i}"), vec![], "").await;
        let stop = stop.clone();
        // Each runner runs what it is given, at once.
        runners.push(tokio::spawn(async move {
            let mut ran = Vec::new();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return ran,
                    msg = next(&mut out) => msg.unwrap(),
                };
                if let Out::Assign(asg) = msg {
                    ran.push((asg.job_id, asg.attempt_id));
                    tx.send(accepted(asg.attempt_id)).await.unwrap();
                    tx.send(finished(asg.attempt_id, JobState::Passed, 0))
                        .await
                        .unwrap();
                }
            }
        }));
    }
    let mut events = a.subscribe();
    let detail = build(&b, JOBS).await;
    let last = detail.jobs.iter().map(|j| j.id).collect::<BTreeSet<_>>();
    let mut ended = BTreeSet::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while ended != last {
            let e = events.recv().await.unwrap();
            if let Some(j) = e.job_id
                && e.state.is_final()
            {
                ended.insert(j);
            }
        }
    })
    .await
    .expect("every job ended within 30 s");
    stop.cancel();
    let mut ran = Vec::new();
    for r in runners {
        ran.extend(r.await.unwrap());
    }
    let jobs: BTreeSet<JobId> = ran.iter().map(|(j, _)| *j).collect();
    assert_eq!(ran.len(), JOBS, "a job given out twice: {ran:?}");
    assert_eq!(jobs, last);
    let d = b.get_build(detail.build.id).await.unwrap();
    assert_eq!(d.build.state, JobState::Passed);
    assert!(d.jobs.iter().all(|j| j.attempts == 1), "{:?}", d.jobs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_and_a_drain_reach_a_runner_held_by_another_dispatcher() {
    let Two {
        a,
        stop_a: _stop_a,
        b,
        stop_b: _stop_b,
        dirs: _dirs,
        ..
    } = two().await;
    let (tx, mut out, _) = attach(&a, "r1", vec![], "").await;
    let mut events = b.subscribe();
    let detail = build(&b, 1).await;
    let job = detail.jobs[0].id;
    let asg = assigned(&mut out).await;
    tx.send(accepted(asg.attempt_id)).await.unwrap();
    wait_event(&mut events, job, JobState::Running).await;
    // Cancelled on B: A tells its runner, which answers with the job cancelled.
    let now = b.cancel_build(detail.build.id).await.unwrap();
    assert_eq!(
        now.jobs[0].state,
        JobState::Running,
        "ended before its runner stopped"
    );
    match next(&mut out).await.unwrap() {
        Out::Cancel(c) => assert_eq!(c.attempt_id, asg.attempt_id),
        other => panic!("expected a cancel, got {other:?}"),
    }
    tx.send(finished(asg.attempt_id, JobState::Cancelled, 0))
        .await
        .unwrap();
    wait_event(&mut events, job, JobState::Cancelled).await;
    // Drained on B: A drains it.
    let view = b.drain_runner("r1").await.unwrap();
    assert_eq!(view.state, RunnerState::Draining);
    loop {
        match next(&mut out).await.unwrap() {
            Out::Drain(_) => break,
            Out::ResultAck(_) => continue,
            other => panic!("expected a drain, got {other:?}"),
        }
    }
    // A runner attached nowhere: not found attached.
    assert!(b.drain_runner("nobody").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_lost_on_the_bus_is_asked_again_until_the_job_ends() {
    let OnA {
        a: _a,
        stop_a: _stop_a,
        b,
        tx,
        mut out,
        detail,
        job,
        attempt,
        mut events,
        ..
    } = running_on_a().await;
    let lose = |n| {
        let c = b.inner.cluster.as_ref().unwrap();
        c.lose.store(n, std::sync::atomic::Ordering::SeqCst);
    };
    let lost = || {
        let c = b.inner.cluster.as_ref().unwrap();
        c.lose.load(std::sync::atomic::Ordering::SeqCst)
    };
    // The runner stays alive while B waits to ask again.
    let beating = tx.clone();
    let beat = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(100));
        loop {
            every.tick().await;
            let hb = m(In::Heartbeat(protocol::Heartbeat::default()));
            if beating.send(hb).await.is_err() {
                return;
            }
        }
    });
    // B's first ask to A is lost; B asks again after the grace period, and A's runner stops.
    lose(1);
    let now = b.cancel_build(detail.build.id).await.unwrap();
    assert_eq!(lost(), 0, "the first ask was not sent on the bus");
    assert_eq!(now.jobs[0].state, JobState::Running);
    // One deadline for the whole wait: `next` skips the heartbeats' answers.
    let cancel = tokio::time::timeout(Duration::from_secs(20), next(&mut out))
        .await
        .expect("no cancel reached the runner within 20 s");
    match cancel.unwrap() {
        Out::Cancel(c) => assert_eq!(c.attempt_id, attempt),
        other => panic!("expected a cancel, got {other:?}"),
    }
    tx.send(finished(attempt, JobState::Cancelled, 0))
        .await
        .unwrap();
    wait_event(&mut events, job, JobState::Cancelled).await;
    beat.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_catches_up_when_the_bus_may_have_lost_messages() {
    let OnA {
        url,
        a,
        stop_a: _stop_a,
        b,
        tx,
        mut out,
        job,
        attempt,
        ..
    } = running_on_a().await;
    let mut progress = b.follow(job).await.unwrap();
    let start = progress.borrow().len;
    // B hears nothing of the output stored through A...
    deaf(&b, true);
    acked_output(&tx, &mut out, attempt, 1..=3, b"through A\n").await;
    let logs = a.inner.logs.clone();
    let len = tokio::task::spawn_blocking(move || logs.len(job))
        .await
        .unwrap()
        .unwrap();
    assert!(len > start, "no output stored");
    // ...then its bus connection breaks: listening again, it may have missed messages, and
    // its follower learns the stored length from the database.
    break_bus(&url, &b);
    tokio::time::timeout(Duration::from_secs(20), progress.wait_for(|p| p.len >= len))
        .await
        .expect("the follower on B saw the stored length within 20 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_re_attaching_to_another_dispatcher_takes_its_attempt_along() {
    let OnA {
        url: _,
        a,
        stop_a: _stop_a,
        b,
        _stop_b,
        _dirs,
        tx,
        mut out,
        welcome,
        detail: _detail,
        job,
        attempt,
        events: _events,
    } = running_on_a().await;
    // Output A stored and acknowledged.
    acked_output(&tx, &mut out, attempt, 1..=2, b"on A\n").await;
    let store = b.store();
    let owner = move |s: std::sync::Arc<dyn kiln_store::Store>| {
        s.owned_attempt(attempt).unwrap().unwrap().owner
    };
    let s = store.clone();
    let first = tokio::task::spawn_blocking(move || owner(s)).await.unwrap();
    assert_eq!(first, a.me());
    // Someone claiming it under the runner's name without the session's secret: told to drop
    // it, and it stays A's.
    let (itx, _iout, iw) = attach(&b, "r1", vec![attempt], "not-the-secret").await;
    assert_eq!(iw.stale_attempts, vec![attempt]);
    drop(itx);
    let s = store.clone();
    let still = tokio::task::spawn_blocking(move || owner(s)).await.unwrap();
    assert_eq!(still, a.me());
    assert!(a.state().attempts.contains_key(&attempt));
    // The runner itself (A's secret): B claims it, A lets go of it, the result counts.
    let (btx, mut bout, bw) = attach(&b, "r1", vec![attempt], &welcome.session_secret).await;
    assert!(bw.stale_attempts.is_empty(), "{bw:?}");
    let s = store.clone();
    let moved = tokio::task::spawn_blocking(move || owner(s)).await.unwrap();
    assert_eq!(moved, b.me());
    wait_until("A dropped the moved attempt", || {
        !a.state().attempts.contains_key(&attempt)
    })
    .await;
    // B goes on where A left off (the database's log has 1 and 2), then the result.
    btx.send(output(attempt, 3, b"on B\n")).await.unwrap();
    match next(&mut bout).await.unwrap() {
        Out::OutputAck(ack) => assert_eq!(ack.up_to_seq, 3),
        other => panic!("expected an ack, got {other:?}"),
    }
    btx.send(finished(attempt, JobState::Passed, 3))
        .await
        .unwrap();
    assert!(matches!(next(&mut bout).await.unwrap(), Out::ResultAck(_)));
    assert_eq!(b.get_job(job).await.unwrap().state, JobState::Passed);
    // A late result through A changes nothing (the attempt's result is recorded: it is
    // acknowledged as a re-sent one).
    tx.send(finished(attempt, JobState::Failed, 0))
        .await
        .unwrap();
    match next(&mut out).await {
        Ok(Out::Refused(_) | Out::ResultAck(_)) | Err(_) => {}
        other => panic!("expected an answer, got {other:?}"),
    }
    assert_eq!(b.get_job(job).await.unwrap().state, JobState::Passed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dispatchers_attempt_is_adopted_and_its_runner_finishes_it_elsewhere() {
    let OnA {
        url: _,
        a,
        stop_a,
        b,
        _stop_b,
        _dirs,
        tx,
        mut out,
        welcome,
        detail,
        job,
        attempt,
        mut events,
    } = running_on_a().await;
    // Output A stored (in the database's log) and acknowledged.
    acked_output(&tx, &mut out, attempt, 1..=5, b"on A\n").await;
    // A stops refreshing its row (as if killed): B adopts the attempt after the lease.
    stop_a.cancel();
    a.close_sessions();
    drop(tx);
    drop(a);
    wait_until("B adopted the attempt", || {
        b.state().attempts.contains_key(&attempt)
    })
    .await;
    let (btx, mut bout, bw) = attach(&b, "r1", vec![attempt], &welcome.session_secret).await;
    assert!(bw.stale_attempts.is_empty(), "{bw:?}");
    // Its output went to A (acknowledged); the result comes to B, which reads the log's last
    // sequence number from the database: nothing is missing.
    btx.send(finished(attempt, JobState::Passed, 5))
        .await
        .unwrap();
    assert!(matches!(next(&mut bout).await.unwrap(), Out::ResultAck(_)));
    wait_event(&mut events, job, JobState::Passed).await;
    let d = b.get_build(detail.build.id).await.unwrap();
    assert_eq!(d.jobs[0].attempts, 1);
    let logs = b.inner.logs.clone();
    let len = tokio::task::spawn_blocking(move || logs.len(job))
        .await
        .unwrap()
        .unwrap();
    let read = b.read_log(job, 0, len, 1 << 20).await.unwrap();
    let text: Vec<u8> = read.frames.iter().flat_map(|f| f.data.clone()).collect();
    assert_eq!(text, b"on A\n".repeat(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_back_from_an_absence_claims_back_what_its_runners_still_run() {
    let OnA {
        url: _,
        a,
        stop_a: _stop_a,
        b,
        _stop_b,
        _dirs,
        tx,
        mut out,
        welcome: _welcome,
        detail: _detail,
        job,
        attempt,
        mut events,
    } = running_on_a().await;
    // B takes A for dead (as if A's row had not been refreshed for a lease) and adopts.
    b.adopt(kiln_domain::now_millis() + 60_000).await.unwrap();
    assert!(b.state().attempts.contains_key(&attempt));
    // A notices its absence: the runner is still here, so A claims the attempt back and B
    // lets go of it.
    a.forget_last_seen();
    a.liveness_round().await.unwrap();
    let store = b.store();
    let owner = tokio::task::spawn_blocking(move || store.owned_attempt(attempt))
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .owner;
    assert_eq!(owner, a.me());
    wait_until("B let go of the attempt", || {
        !b.state().attempts.contains_key(&attempt)
    })
    .await;
    tx.send(finished(attempt, JobState::Passed, 0))
        .await
        .unwrap();
    assert!(matches!(next(&mut out).await.unwrap(), Out::ResultAck(_)));
    wait_event(&mut events, job, JobState::Passed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_superseded_attempt_held_elsewhere_is_stopped_by_its_owner() {
    let OnA {
        url: _,
        a: _a,
        stop_a: _stop_a,
        b,
        _stop_b,
        _dirs,
        tx: _tx,
        mut out,
        welcome: _welcome,
        detail: _detail,
        job: _job,
        attempt,
        events: _events,
    } = running_on_a().await;
    // What B does for the running attempts of builds a newer commit superseded.
    b.cancel_on_runner(attempt, "superseded by a newer build");
    match next(&mut out).await.unwrap() {
        Out::Cancel(c) => {
            assert_eq!(c.attempt_id, attempt);
            assert_eq!(c.reason, "superseded by a newer build");
        }
        other => panic!("expected a cancel, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_through_the_dispatcher_recording_the_end_gets_the_whole_log() {
    let OnA {
        a,
        stop_a: _stop_a,
        b,
        tx,
        mut out,
        welcome,
        job,
        attempt,
        _stop_b,
        _dirs,
        ..
    } = running_on_a().await;
    let mut progress = b.follow(job).await.unwrap();
    // A stores and acknowledges output that B's hub never hears of (its growth messages are
    // coalesced, and lost when A dies or freezes before sending them)...
    deaf(&b, true);
    acked_output(&tx, &mut out, attempt, 1..=3, b"on A\n").await;
    let stored = a.log_len(job).await.unwrap();
    // ...then the runner moves to B carrying its attempt, and its result is recorded there.
    drop(tx);
    let (btx, mut bout, bw) = attach(&b, "r1", vec![attempt], &welcome.session_secret).await;
    assert!(bw.stale_attempts.is_empty(), "{bw:?}");
    btx.send(finished(attempt, JobState::Passed, 3))
        .await
        .unwrap();
    assert!(matches!(next(&mut bout).await.unwrap(), Out::ResultAck(_)));
    let end = *tokio::time::timeout(
        Duration::from_secs(20),
        progress.wait_for(|p| p.done.is_some()),
    )
    .await
    .expect("the follower on B saw the end within 20 s")
    .unwrap();
    assert_eq!(end.done, Some(JobState::Passed));
    assert_eq!(
        end.len, stored,
        "the follower on B ended at {} of the stored {stored} bytes",
        end.len
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_are_told_the_states_a_bus_gap_lost() {
    let OnA {
        url,
        a: _a,
        stop_a: _stop_a,
        b,
        tx,
        mut out,
        detail,
        job,
        attempt,
        mut events,
        _stop_b,
        _dirs,
        ..
    } = running_on_a().await;
    // The build ends on A while B hears nothing...
    deaf(&b, true);
    tx.send(finished(attempt, JobState::Passed, 0))
        .await
        .unwrap();
    assert!(matches!(next(&mut out).await.unwrap(), Out::ResultAck(_)));
    // ...then B's bus connection breaks: B re-reads the builds it knew open, and its watchers
    // (still deaf to the bus) are told the job's and the build's ends.
    break_bus(&url, &b);
    wait_event(&mut events, job, JobState::Passed).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let e = events.recv().await.unwrap();
            if e.build_id == detail.build.id && e.job_id.is_none() {
                assert_eq!(e.state, JobState::Passed);
                return;
            }
        }
    })
    .await
    .expect("no event of the build's end within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_for_an_attempt_that_moved_away_is_not_recorded_before_its_output() {
    let OnA {
        a,
        stop_a: _stop_a,
        b,
        tx,
        mut out,
        welcome,
        job,
        attempt,
        _stop_b,
        _dirs,
        ..
    } = running_on_a().await;
    acked_output(&tx, &mut out, attempt, 1..=2, b"on A\n").await;
    // The runner re-attaches to B; A lets go of the attempt.
    let (_btx, _bout, bw) = attach(&b, "r1", vec![attempt], &welcome.session_secret).await;
    assert!(bw.stale_attempts.is_empty(), "{bw:?}");
    wait_until("A dropped the moved attempt", || {
        !a.state().attempts.contains_key(&attempt)
    })
    .await;
    // A result on the old stream to A claiming output that was never stored: refused, and
    // the job does not end.
    tx.send(finished(attempt, JobState::Passed, 5))
        .await
        .unwrap();
    match next(&mut out).await.unwrap() {
        Out::Refused(r) => assert_eq!(r.attempt_id, attempt),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(a.get_job(job).await.unwrap().state, JobState::Running);
}

//! Split steps against both backends (a SQLite file, a PostgreSQL database; see
//! `testing.rs`): shards pulling units, re-sends, lost attempts,
//! retry rounds, history, static strategies and the migration.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use kiln_domain::split::{
    DEFAULT_BUDGET_FLOOR_MS, Interaction, InteractionPolicy, LeasedUnit, RetryPolicy, SplitSpec,
    Strategy, Threshold, UnitOutcome, UnitReport, UnitSource, UnitTryState, UnitVerdict,
    UnitsReply, UnitsRequest, static_shards,
};
use kiln_domain::{AttemptId, BuildId, JobId, JobState, NewBuild, NewJob, RunnerId, StepSpec};

use crate::testing::{Backend, TestStore, on_both_backends};
use crate::{Finish, SqliteStore, Store};

const REPO: &str = "/tmp/repo";
const KEY: &str = "tests";

fn step(spec: Option<SplitSpec>) -> StepSpec {
    StepSpec {
        name: "tests".into(),
        run: "pytest {units}".into(),
        split: spec,
        ..Default::default()
    }
}

/// A build with one job per shard, each with one split step; returns the job ids by shard.
fn split_build(
    s: &dyn TestStore,
    commit: char,
    shards: u32,
    strategy: Strategy,
    retry: RetryPolicy,
) -> Vec<JobId> {
    let jobs = (0..shards)
        .map(|shard| NewJob {
            name: format!("tests-{shard}"),
            steps: vec![step(Some(SplitSpec {
                key: KEY.into(),
                shards,
                shard,
                units: UnitSource::Glob(vec!["tests/test_*.py".into()]),
                strategy,
                retry: retry.clone(),
                max_batch: 0,
            }))],
            ..Default::default()
        })
        .collect();
    let d = s
        .create_build(&NewBuild {
            repo: REPO.into(),
            commit: commit.to_string().repeat(40),
            branch: "main".into(),
            trigger: "test".into(),
            jobs,
            ..Default::default()
        })
        .unwrap();
    d.jobs.iter().map(|j| j.id).collect()
}

fn retries(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        attempts,
        ..RetryPolicy::default()
    }
}

fn units(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("tests/test_{i:02}.py")).collect()
}

/// One shard: its attempt, the units it holds and its request counter.
struct Shard {
    attempt: AttemptId,
    runner: RunnerId,
    request: u32,
    held: Vec<LeasedUnit>,
    max_units: u32,
    done: Option<(bool, String)>,
    /// Every unit try this shard was given.
    got: Vec<(String, u32)>,
}

fn start(s: &dyn TestStore, job: JobId, runner: &str) -> Shard {
    let r = s
        .upsert_runner(runner, &BTreeMap::new(), 1, "test")
        .unwrap()
        .id;
    let (attempt, _) = s.assign(job, r, runner).unwrap().unwrap();
    s.start_attempt(attempt).unwrap().unwrap();
    Shard {
        attempt,
        runner: r,
        request: 0,
        held: Vec::new(),
        max_units: 0,
        done: None,
        got: Vec::new(),
    }
}

type Outcomes<'a> = &'a dyn Fn(&str, u32) -> UnitOutcome;

fn report(held: &[LeasedUnit], outcome: Outcomes<'_>) -> Vec<UnitReport> {
    held.iter()
        .map(|u| UnitReport {
            unit: u.unit.clone(),
            try_number: u.try_number,
            outcome: outcome(&u.unit, u.try_number),
            duration_ms: 100,
            cases: Vec::new(),
        })
        .collect()
}

impl Shard {
    fn request(&self, discovered: &[String], results: Vec<UnitReport>) -> UnitsRequest {
        UnitsRequest {
            attempt: self.attempt,
            runner: self.runner,
            step_index: 0,
            request: self.request,
            discovered: if self.request == 1 {
                discovered.to_vec()
            } else {
                Vec::new()
            },
            results,
            interactions: Vec::new(),
            max_units: self.max_units,
            batch_ms: 0,
            batch_processes: 0,
        }
    }

    /// Reports what it holds (outcomes from `outcome`) and asks for more.
    fn ask(
        &mut self,
        s: &dyn TestStore,
        discovered: &[String],
        outcome: Outcomes<'_>,
    ) -> UnitsReply {
        self.request += 1;
        let results = report(&self.held, outcome);
        let reply = s.next_units(&self.request(discovered, results)).unwrap();
        self.held.clear();
        match &reply {
            UnitsReply::Batch(b) => {
                assert!(!b.is_empty());
                self.held = b.clone();
                self.got
                    .extend(b.iter().map(|u| (u.unit.clone(), u.try_number)));
            }
            UnitsReply::Done { passed, summary } => {
                self.done = Some((*passed, summary.clone()));
            }
            UnitsReply::Wait => {}
            UnitsReply::Refused(why) => panic!("refused: {why}"),
        }
        reply
    }
}

/// Runs the shards round-robin until every one is done.
///
/// Nothing here depends on the clock: a shard left alone (every other one done) holds no
/// lease when it asks, so it must get units or the verdict, never WAIT. Without that check a
/// rule that only times out (a window in milliseconds) would make the loop end or not
/// depending on the machine's speed.
fn run(s: &dyn TestStore, shards: &mut [Shard], discovered: &[String], outcome: Outcomes<'_>) {
    for _ in 0..10_000 {
        if shards.iter().all(|sh| sh.done.is_some()) {
            return;
        }
        let alone = shards.iter().filter(|sh| sh.done.is_none()).count() == 1;
        for sh in shards.iter_mut().filter(|sh| sh.done.is_none()) {
            let reply = sh.ask(s, discovered, outcome);
            assert!(
                !(alone && matches!(reply, UnitsReply::Wait)),
                "the only shard left was told to wait (it holds nothing)"
            );
        }
    }
    panic!("the split never ended");
}

/// The split's verdict, from a shard that ran to the end (not one sent away from a retry round).
fn split_done(shards: &[Shard]) -> (bool, String) {
    let verdicts: BTreeSet<(bool, String)> = shards
        .iter()
        .filter_map(|sh| sh.done.clone())
        .filter(|(_, s)| !s.contains("fewer shards"))
        .collect();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    verdicts.into_iter().next().unwrap()
}

fn all_pass(_: &str, _: u32) -> UnitOutcome {
    UnitOutcome::Passed
}

fn the_report(s: &dyn TestStore, job: JobId) -> kiln_domain::split::SplitReport {
    let build = s.get_job(job).unwrap().unwrap().build_id;
    let mut reports = s.split_reports(build).unwrap();
    assert_eq!(reports.len(), 1);
    reports.remove(0)
}

fn two_shards_pull_disjoint_units_until_done(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(1));
    let list = units(40);
    let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
    run(s, &mut shards, &list, &all_pass);
    let mut seen = BTreeSet::new();
    for sh in &shards {
        assert!(!sh.got.is_empty(), "both shards took units");
        for (u, t) in &sh.got {
            assert_eq!(*t, 1);
            assert!(seen.insert(u.clone()), "{u} given twice");
        }
        let (passed, summary) = sh.done.clone().unwrap();
        assert!(passed);
        assert_eq!(summary, "40 units in 1 round: 40 passed, 0 flaky, 0 failed");
    }
    assert_eq!(seen.len(), 40);
    let r = the_report(s, jobs[0]);
    assert!(r.done && r.passed);
    assert_eq!(r.rounds, 1);
    assert_eq!(r.shards, 2);
    assert_eq!(r.strategy, Strategy::Dynamic);
    let order: Vec<&str> = r.units.iter().map(|u| u.unit.as_str()).collect();
    assert_eq!(order, list.iter().map(String::as_str).collect::<Vec<_>>());
    for u in &r.units {
        assert_eq!(u.tries.len(), 1, "{u:?}");
        assert_eq!(u.verdict, UnitVerdict::Passed);
        assert_eq!(u.tries[0].state.outcome(), Some(UnitOutcome::Passed));
        assert_eq!(u.tries[0].duration_ms, 100);
        assert!(matches!(u.tries[0].runner.as_deref(), Some("r1" | "r2")));
    }
    // A done split answers later requests with the same verdict.
    let mut again = shards.remove(0);
    again.done = None;
    assert!(matches!(
        again.ask(s, &list, &all_pass),
        UnitsReply::Done { passed: true, .. }
    ));
}

fn duplicate_discovery_and_later_discoveries_are_ignored(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(1));
    let mut a = start(s, jobs[0], "r1");
    let mut b = start(s, jobs[1], "r2");
    let first = vec!["x".to_string(), "y".to_string(), "x".to_string()];
    a.ask(s, &first, &all_pass);
    b.ask(s, &["z".to_string()], &all_pass);
    let mut shards = vec![a, b];
    run(s, &mut shards, &first, &all_pass);
    let r = the_report(s, jobs[0]);
    let order: Vec<&str> = r.units.iter().map(|u| u.unit.as_str()).collect();
    assert_eq!(order, ["x", "y"]);
}

fn resent_request_gets_the_same_units_and_records_nothing_twice(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(1));
    let list = units(40);
    let mut a = start(s, jobs[0], "r1");
    a.request = 1;
    let req1 = a.request(&list, Vec::new());
    let UnitsReply::Batch(first) = s.next_units(&req1).unwrap() else {
        panic!()
    };
    assert_eq!(
        s.next_units(&req1).unwrap(),
        UnitsReply::Batch(first.clone())
    );
    a.request = 2;
    let req2 = a.request(&list, report(&first, &all_pass));
    let UnitsReply::Batch(second) = s.next_units(&req2).unwrap() else {
        panic!()
    };
    assert!(second.iter().all(|u| !first.contains(u)));
    assert_eq!(
        s.next_units(&req2).unwrap(),
        UnitsReply::Batch(second.clone())
    );
    // A late copy of an older request changes nothing.
    assert_eq!(s.next_units(&req1).unwrap(), UnitsReply::Wait);
    let r = the_report(s, jobs[0]);
    let ended: Vec<&str> = r
        .units
        .iter()
        .filter(|u| u.tries.iter().any(|t| t.state.outcome().is_some()))
        .map(|u| u.unit.as_str())
        .collect();
    assert_eq!(ended.len(), first.len());
    for u in &r.units {
        assert_eq!(u.tries.len(), 1);
    }
    a.request = 2;
    a.held = second;
    let mut b = start(s, jobs[1], "r2");
    b.request = 1;
    let mut shards = vec![a, b];
    run(s, &mut shards, &list, &all_pass);
    let r = the_report(s, jobs[0]);
    assert!(
        r.units
            .iter()
            .all(|u| u.tries.len() == 1 && u.verdict == UnitVerdict::Passed)
    );
}

fn a_lost_attempt_returns_its_units_to_another_shard(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(1));
    let list = units(30);
    let mut a = start(s, jobs[0], "r1");
    let mut b = start(s, jobs[1], "r2");
    a.ask(s, &list, &all_pass);
    b.ask(s, &list, &all_pass);
    a.ask(s, &list, &all_pass);
    let lost = a.held.clone();
    assert!(!lost.is_empty());
    s.requeue_attempt(a.attempt, "runner lost", 3, true)
        .unwrap()
        .unwrap();
    // The lost attempt is refused from now on; its results are not recorded.
    a.request += 1;
    let late = s
        .next_units(&a.request(&list, report(&lost, &all_pass)))
        .unwrap();
    assert!(matches!(late, UnitsReply::Refused(_)), "{late:?}");
    let mut shards = vec![b];
    run(s, &mut shards, &list, &all_pass);
    let got: BTreeSet<&String> = shards[0].got.iter().map(|(u, _)| u).collect();
    for u in &lost {
        assert!(got.contains(&u.unit), "{} was not handed out again", u.unit);
    }
    let r = the_report(s, jobs[0]);
    assert!(r.done && r.passed);
    for u in &r.units {
        assert_eq!(u.tries.len(), 1, "{u:?}");
        let runner = u.tries[0].runner.as_deref();
        if lost.iter().any(|l| l.unit == u.unit) {
            assert_eq!(runner, Some("r2"));
        }
    }
    crate::testing::check_tallies(s);
}

fn finished_and_ended_jobs_return_their_units(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 3, Strategy::Dynamic, retries(1));
    let list = units(30);
    let mut a = start(s, jobs[0], "r1");
    let mut b = start(s, jobs[1], "r2");
    let mut c = start(s, jobs[2], "r3");
    a.ask(s, &list, &all_pass);
    b.ask(s, &list, &all_pass);
    c.ask(s, &list, &all_pass);
    let a_units = a.held.clone();
    let b_units = b.held.clone();
    assert!(matches!(
        s.finish_attempt(a.attempt, JobState::Failed, Some("crashed"))
            .unwrap(),
        Finish::Recorded(_)
    ));
    s.end_job(jobs[1], JobState::Cancelled, "by user")
        .unwrap()
        .unwrap();
    let mut shards = vec![c];
    run(s, &mut shards, &list, &all_pass);
    let got: BTreeSet<&String> = shards[0].got.iter().map(|(u, _)| u).collect();
    for u in a_units.iter().chain(&b_units) {
        assert!(got.contains(&u.unit), "{} not handed out again", u.unit);
    }
    assert!(the_report(s, jobs[0]).passed);
}

fn refused_when_not_current_not_a_split_or_nothing_found(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(1));
    let list = units(4);
    let mut a = start(s, jobs[0], "r1");
    // No units found by the first request: refused, saying so.
    a.request = 1;
    match s.next_units(&a.request(&[], Vec::new())).unwrap() {
        UnitsReply::Refused(why) => {
            assert!(why.contains("no units found"), "{why}");
            assert!(why.contains("tests/test_*.py"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // Another runner than the attempt's.
    let mut wrong = a.request(&list, Vec::new());
    wrong.runner = RunnerId::new(wrong.runner.get() + 100);
    assert!(matches!(
        s.next_units(&wrong).unwrap(),
        UnitsReply::Refused(_)
    ));
    // A step that is not a split step.
    let mut other_step = a.request(&list, Vec::new());
    other_step.step_index = 3;
    match s.next_units(&other_step).unwrap() {
        UnitsReply::Refused(why) => assert!(why.contains("not a split step"), "{why}"),
        other => panic!("{other:?}"),
    }
    a.request = 0;
    assert!(matches!(a.ask(s, &list, &all_pass), UnitsReply::Batch(_)));
    // Attempt no longer current.
    s.requeue_attempt(a.attempt, "lost", 3, true).unwrap();
    let a2 = start(s, jobs[0], "r1");
    a.request += 1;
    match s.next_units(&a.request(&list, Vec::new())).unwrap() {
        UnitsReply::Refused(why) => assert!(why.contains("not the current attempt"), "{why}"),
        other => panic!("{other:?}"),
    }
    let mut unknown = a.request(&list, Vec::new());
    unknown.attempt = AttemptId::new(9999);
    assert!(matches!(
        s.next_units(&unknown).unwrap(),
        UnitsReply::Refused(_)
    ));
    // The new attempt goes on, without discovering again.
    let mut shards = vec![a2];
    shards[0].request = 1;
    run(s, &mut shards, &[], &all_pass);
    assert!(the_report(s, jobs[0]).passed);
}

fn flaky_outcome(unit: &str, try_number: u32) -> UnitOutcome {
    if unit == "tests/test_02.py" && try_number == 1 {
        UnitOutcome::Failed
    } else {
        UnitOutcome::Passed
    }
}

fn a_flaky_unit_passes_on_retry_and_is_counted_in_the_history(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(6);
    for (build, commit) in [(1, 'a'), (2, 'b')] {
        let jobs = split_build(s, commit, 2, Strategy::Dynamic, retries(3));
        let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
        let before = the_report_opt(s, jobs[0]);
        assert!(before.is_none());
        run(s, &mut shards, &list, &flaky_outcome);
        let (passed, summary) = split_done(&shards);
        assert!(passed);
        assert_eq!(summary, "6 units in 2 rounds: 5 passed, 1 flaky, 0 failed");
        let r = the_report(s, jobs[0]);
        assert!(r.done && r.passed);
        assert_eq!(r.rounds, 2);
        assert_eq!(r.retry_note, "");
        for u in &r.units {
            if u.unit == "tests/test_02.py" {
                assert_eq!(u.verdict, UnitVerdict::Flaky);
                assert_eq!(u.tries.len(), 2);
                assert_eq!(u.tries[0].state.outcome(), Some(UnitOutcome::Failed));
                assert_eq!(u.tries[1].state.outcome(), Some(UnitOutcome::Passed));
                assert_eq!(u.tries[1].try_number, 2);
                assert_eq!(u.flaky_history, build);
            } else {
                assert_eq!(u.verdict, UnitVerdict::Passed);
                assert_eq!(u.tries.len(), 1);
                assert_eq!(u.flaky_history, 0);
            }
        }
    }
    crate::testing::check_tallies(s);
}

fn the_report_opt(s: &dyn TestStore, job: JobId) -> Option<kiln_domain::split::SplitReport> {
    let build = s.get_job(job).unwrap().unwrap().build_id;
    s.split_reports(build).unwrap().pop()
}

fn a_unit_failing_every_try_fails_the_split(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(6);
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(3));
    let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
    // test_01 always fails; test_02 is flaky, so round 2 recovers something and round 3 runs.
    let outcome = |u: &str, t: u32| match u {
        "tests/test_01.py" => UnitOutcome::Failed,
        _ => flaky_outcome(u, t),
    };
    run(s, &mut shards, &list, &outcome);
    let (passed, summary) = split_done(&shards);
    assert!(!passed);
    assert!(
        summary.starts_with("6 units in 3 rounds: 4 passed, 1 flaky, 1 failed"),
        "{summary}"
    );
    let r = the_report(s, jobs[0]);
    assert!(r.done && !r.passed);
    assert_eq!(r.rounds, 3);
    assert!(r.retry_note.contains("3 times"), "{}", r.retry_note);
    let broken = r
        .units
        .iter()
        .find(|u| u.unit == "tests/test_01.py")
        .unwrap();
    assert_eq!(broken.verdict, UnitVerdict::Failed);
    assert_eq!(broken.tries.len(), 3);
    assert!(
        broken
            .tries
            .iter()
            .all(|t| t.state.outcome() == Some(UnitOutcome::Failed))
    );
    let flaky = r
        .units
        .iter()
        .find(|u| u.unit == "tests/test_02.py")
        .unwrap();
    assert_eq!(flaky.verdict, UnitVerdict::Flaky);
    assert_eq!(flaky.tries.len(), 2);

    // Alone, a broken unit stops retries after a round that recovered nothing.
    let jobs = split_build(s, 'b', 1, Strategy::Dynamic, retries(5));
    let mut shards = vec![start(s, jobs[0], "r1")];
    let outcome = |u: &str, _: u32| {
        if u == "tests/test_01.py" {
            UnitOutcome::Errored
        } else {
            UnitOutcome::Passed
        }
    };
    run(s, &mut shards, &list, &outcome);
    let r = the_report(s, jobs[0]);
    assert!(!r.passed);
    assert_eq!(r.rounds, 2);
    assert!(
        r.retry_note.contains("no failure into a pass"),
        "{}",
        r.retry_note
    );
    crate::testing::check_tallies(s);
}

fn more_failures_than_the_threshold_means_no_retry_round(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(6);
    let retry = RetryPolicy {
        attempts: 3,
        max_failures: Some(Threshold::Count(2)),
        ..RetryPolicy::default()
    };
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retry);
    let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
    let outcome = |u: &str, _: u32| {
        if u < "tests/test_03.py" {
            UnitOutcome::Failed
        } else {
            UnitOutcome::Passed
        }
    };
    run(s, &mut shards, &list, &outcome);
    assert!(!split_done(&shards).0);
    let r = the_report(s, jobs[0]);
    assert_eq!(r.rounds, 1);
    assert!(r.retry_note.contains("threshold"), "{}", r.retry_note);
    for u in &r.units {
        assert_eq!(u.tries.len(), 1);
        assert_ne!(u.verdict, UnitVerdict::Flaky);
    }
    assert_eq!(
        r.units
            .iter()
            .filter(|u| u.verdict == UnitVerdict::Failed)
            .count(),
        3
    );
}

fn the_retry_budget_stops_retries_and_its_floor_leaves_room_for_one(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(10);
    // Round 1: 10 units of 100 ms; a 10% budget is 100 ms; the failed unit took 100 ms, so a
    // retry fits; with 5% and no floor it does not, and the report names it; with 5% and the
    // default floor (one minute) it does.
    for (commit, permille, floor, rounds) in [
        ('a', 100, 0, 2),
        ('b', 50, 0, 1),
        ('c', 50, DEFAULT_BUDGET_FLOOR_MS, 2),
    ] {
        let retry = RetryPolicy {
            attempts: 2,
            budget_permille: Some(permille),
            budget_floor_ms: floor,
            ..RetryPolicy::default()
        };
        let jobs = split_build(s, commit, 1, Strategy::Dynamic, retry);
        let mut shards = vec![start(s, jobs[0], "r1")];
        run(s, &mut shards, &list, &flaky_outcome);
        let r = the_report(s, jobs[0]);
        assert_eq!(r.rounds, rounds, "{commit}");
        if rounds == 1 {
            assert!(!r.passed);
            assert!(
                r.retry_note.contains("not retried: tests/test_02.py")
                    && r.retry_note.contains("budget"),
                "{}",
                r.retry_note
            );
        } else {
            assert!(r.passed, "{commit}: {}", r.retry_note);
        }
    }
}

/// Two units fail; the budget (its floor) has room for the cheaper one only: it is retried,
/// the other is not, and the report says which and why.
fn units_over_the_budget_are_named_in_the_report(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(4);
    let retry = RetryPolicy {
        attempts: 2,
        budget_permille: Some(10),
        budget_floor_ms: 150,
        ..RetryPolicy::default()
    };
    let jobs = split_build(s, 'a', 1, Strategy::Dynamic, retry);
    let mut shards = vec![start(s, jobs[0], "r1")];
    let outcome = |unit: &str, _try: u32| {
        if unit == "tests/test_00.py" || unit == "tests/test_01.py" {
            UnitOutcome::Failed
        } else {
            UnitOutcome::Passed
        }
    };
    run(s, &mut shards, &list, &outcome);
    let r = the_report(s, jobs[0]);
    assert_eq!(r.rounds, 2);
    let tries = |u: &str| {
        r.units
            .iter()
            .find(|x| x.unit == u)
            .map(|x| x.tries.len())
            .unwrap_or(0)
    };
    assert_eq!(
        tries("tests/test_00.py") + tries("tests/test_01.py"),
        3,
        "{r:?}"
    );
    assert!(
        r.retry_note
            .starts_with("round 2: not retried: tests/test_0")
            && r.retry_note.contains("at least 150 ms"),
        "{}",
        r.retry_note
    );
    assert!(!r.passed);
}

/// A shard reports an interaction failure with its batch's results (each unit passed alone):
/// recorded once even when the request is re-sent, listed in the report, and the step's
/// policy decides the verdict.
fn interaction_failures_are_reported_and_the_policy_decides(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(3);
    for (commit, policy, passes) in [
        ('a', InteractionPolicy::Warn, true),
        ('b', InteractionPolicy::Fail, false),
    ] {
        let retry = RetryPolicy {
            interaction: policy,
            ..RetryPolicy::default()
        };
        let jobs = split_build(s, commit, 1, Strategy::Dynamic, retry);
        let mut sh = start(s, jobs[0], "r1");
        let UnitsReply::Batch(batch) = sh.ask(s, &list, &all_pass) else {
            panic!("no batch");
        };
        sh.request += 1;
        let mut req = sh.request(&list, report(&sh.held, &all_pass));
        req.interactions = vec![Interaction {
            units: batch.iter().map(|u| u.unit.clone()).collect(),
            try_number: 1,
            detail: "exit status 2".into(),
            runner: None,
        }];
        // Sent twice (a reconnect): recorded once.
        let first = s.next_units(&req).unwrap();
        let again = s.next_units(&req).unwrap();
        assert_eq!(first, again);
        sh.held = match first {
            UnitsReply::Batch(b) => b,
            _ => Vec::new(),
        };
        let mut shards = vec![sh];
        run(s, &mut shards, &list, &all_pass);
        let (passed, summary) = split_done(&shards);
        assert_eq!(passed, passes, "{summary}");
        assert!(summary.contains("1 interaction failure"), "{summary}");
        let r = the_report(s, jobs[0]);
        assert_eq!(r.passed, passes);
        assert_eq!(r.interaction_policy, policy);
        assert_eq!(r.interactions.len(), 1, "{r:?}");
        assert_eq!(r.interactions[0].units.len(), batch.len());
        assert_eq!(r.interactions[0].detail, "exit status 2");
        assert_eq!(r.interactions[0].runner.as_deref(), Some("r1"));
        assert!(r.units.iter().all(|u| u.verdict == UnitVerdict::Passed));
    }
}

fn longest_units_first_from_the_history_and_the_median_for_new_ones(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    s.seed_unit_durations(
        REPO,
        KEY,
        &[
            ("u0".into(), 100),
            ("u1".into(), 500),
            ("u2".into(), 300),
            ("gone".into(), 9000),
        ],
    )
    .unwrap();
    let list: Vec<String> = ["u0", "u3", "u1", "u2", "u4"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let jobs = split_build(s, 'a', 1, Strategy::Dynamic, retries(1));
    let mut sh = start(s, jobs[0], "r1");
    sh.max_units = 1;
    let mut shards = vec![sh];
    run(s, &mut shards, &list, &all_pass);
    // The median of the known units of the split (100, 300, 500) is 300 for u3 and u4; equal
    // estimates go in discovery order (u3, u2, u4).
    let order: Vec<&str> = shards[0].got.iter().map(|(u, _)| u.as_str()).collect();
    assert_eq!(order, ["u1", "u3", "u2", "u4", "u0"]);
    // The durations of this build join the history: u1 is now 500 and 100, median 500 (the
    // upper middle); u3 has 100.
    let h = |u: &str| s.history(REPO, KEY, u);
    assert_eq!(h("u1"), vec![500, 100]);
    assert_eq!(h("u3"), vec![100]);
    // Only the last five are kept.
    for (i, c) in ['b', 'c', 'd', 'e', 'f'].into_iter().enumerate() {
        let jobs = split_build(s, c, 1, Strategy::Dynamic, retries(1));
        let mut shards = vec![start(s, jobs[0], &format!("r{i}"))];
        run(s, &mut shards, &list, &all_pass);
    }
    assert_eq!(h("u1"), vec![100; 5]);
}

fn static_hash_gives_each_shard_only_its_own_units(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(30);
    let jobs = split_build(s, 'a', 3, Strategy::Hash, retries(1));
    let with_estimates: Vec<(String, u64)> = list.iter().map(|u| (u.clone(), 1000)).collect();
    let expected = static_shards(Strategy::Hash, &with_estimates, 3);
    let mut shards: Vec<Shard> = (0..3)
        .map(|i| start(s, jobs[i], &format!("r{i}")))
        .collect();
    // Shard 0 alone: it takes its own units, then waits for the others.
    loop {
        match shards[0].ask(s, &list, &all_pass) {
            UnitsReply::Batch(_) => {}
            UnitsReply::Wait => break,
            other => panic!("{other:?}"),
        }
    }
    run(s, &mut shards, &list, &all_pass);
    let mut all = BTreeSet::new();
    for (i, sh) in shards.iter().enumerate() {
        for (u, _) in &sh.got {
            let pos = list.iter().position(|x| x == u).unwrap();
            assert_eq!(expected[pos], Some(i as u32), "{u} went to shard {i}");
            assert!(all.insert(u.clone()));
        }
        assert!(sh.done.clone().unwrap().0);
    }
    assert_eq!(all.len(), 30);
    assert_eq!(the_report(s, jobs[0]).strategy, Strategy::Hash);
}

fn retry_rounds_run_on_fewer_shards(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(12);
    let retry = RetryPolicy {
        attempts: 2,
        shards: 1,
        ..RetryPolicy::default()
    };
    let jobs = split_build(s, 'a', 3, Strategy::Dynamic, retry);
    let mut shards: Vec<Shard> = (0..3)
        .map(|i| start(s, jobs[i], &format!("r{i}")))
        .collect();
    let outcome = |u: &str, t: u32| {
        if t == 1 && (u == "tests/test_01.py" || u == "tests/test_07.py") {
            UnitOutcome::Failed
        } else {
            UnitOutcome::Passed
        }
    };
    run(s, &mut shards, &list, &outcome);
    let retried: Vec<usize> = (0..3)
        .filter(|&i| shards[i].got.iter().any(|(_, t)| *t == 2))
        .collect();
    assert_eq!(retried.len(), 1, "one shard runs the retry round");
    let early: Vec<String> = shards
        .iter()
        .filter_map(|sh| sh.done.clone())
        .map(|(_, s)| s)
        .filter(|s| s.contains("fewer shards"))
        .collect();
    assert_eq!(early.len(), 2, "{early:?}");
    let r = the_report(s, jobs[0]);
    assert!(r.done && r.passed);
    assert_eq!(r.rounds, 2);
}

fn retries_prefer_another_runner(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list: Vec<String> = vec!["u0".into(), "u1".into()];
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(2));
    let mut a = start(s, jobs[0], "r1");
    let mut b = start(s, jobs[1], "r2");
    let outcome = |u: &str, t: u32| {
        if u == "u0" && t == 1 {
            UnitOutcome::Failed
        } else {
            UnitOutcome::Passed
        }
    };
    assert_eq!(
        a.ask(s, &list, &outcome),
        UnitsReply::Batch(vec![LeasedUnit {
            unit: "u0".into(),
            try_number: 1
        }])
    );
    assert!(matches!(b.ask(s, &list, &outcome), UnitsReply::Batch(_)));
    assert_eq!(b.ask(s, &list, &outcome), UnitsReply::Wait);
    // a ends round 1 with u0 failed; b asked just now from another runner: u0 waits for it.
    assert_eq!(a.ask(s, &list, &outcome), UnitsReply::Wait);
    assert_eq!(
        b.ask(s, &list, &outcome),
        UnitsReply::Batch(vec![LeasedUnit {
            unit: "u0".into(),
            try_number: 2
        }])
    );
    let mut shards = vec![a, b];
    run(s, &mut shards, &list, &outcome);
    let r = the_report(s, jobs[0]);
    let u0 = &r.units[0];
    assert_eq!(u0.verdict, UnitVerdict::Flaky);
    assert_eq!(u0.tries[0].runner.as_deref(), Some("r1"));
    assert_eq!(u0.tries[1].runner.as_deref(), Some("r2"));
}

/// Tries read back with their state (queued, leased, ended with its outcome); a stored state
/// that is not one of those, or that disagrees with its outcome, is the store's corrupt-data
/// error.
fn unit_try_states_read_back_and_corrupt_ones_are_refused(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(3);
    let jobs = split_build(s, 'a', 1, Strategy::Dynamic, retries(2));
    let mut a = start(s, jobs[0], "r1");
    a.max_units = 1;
    a.ask(s, &list, &all_pass);
    a.ask(s, &list, &all_pass);
    let r = the_report(s, jobs[0]);
    let states: Vec<UnitTryState> = r.units.iter().map(|u| u.tries[0].state).collect();
    assert_eq!(
        states,
        [
            UnitTryState::Ended(UnitOutcome::Passed),
            UnitTryState::Leased,
            UnitTryState::Queued
        ]
    );
    let build = s.get_job(jobs[0]).unwrap().unwrap().build_id;
    for (state, outcome) in [("ended", None), ("queued", Some("passed")), ("lost", None)] {
        s.exec(&format!(
            "UPDATE unit_tries SET state = '{state}', outcome = {} WHERE position = 2",
            outcome.map_or("NULL".to_string(), |o| format!("'{o}'"))
        ));
        let e = s.split_reports(build).err();
        assert!(
            matches!(&e, Some(crate::StoreError::Corrupt(m)) if m.contains(state)),
            "{state} {outcome:?}: {e:?}"
        );
    }
}

fn verdicts_while_running(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(3);
    let jobs = split_build(s, 'a', 1, Strategy::Dynamic, retries(2));
    let mut a = start(s, jobs[0], "r1");
    a.max_units = 1;
    a.ask(s, &list, &all_pass);
    let fail = |_: &str, _: u32| UnitOutcome::Failed;
    a.ask(s, &list, &fail);
    let r = the_report(s, jobs[0]);
    assert!(!r.done && !r.passed);
    // test_00 failed with a retry possible: undecided; the others never ended.
    assert!(r.units.iter().all(|u| u.verdict == UnitVerdict::NotRun));
    assert_eq!(r.units[1].tries[0].state.outcome(), None);
    // The build is cancelled: what failed stays failed.
    s.end_job(jobs[0], JobState::Cancelled, "by user")
        .unwrap()
        .unwrap();
    let r = the_report(s, jobs[0]);
    assert_eq!(r.units[0].verdict, UnitVerdict::Failed);
    assert_eq!(r.units[2].verdict, UnitVerdict::NotRun);
}

/// Creates a database with the schema as it was before split steps, with a build in it.
fn old_database(path: &Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    let before = 3;
    for m in &crate::sqlite::MIGRATIONS[..before] {
        conn.execute_batch(m).unwrap();
    }
    conn.pragma_update(None, "user_version", before as i64)
        .unwrap();
    conn.execute(
        "INSERT INTO builds (repo, commit_id, branch, trigger_by, state, created_at) \
         VALUES ('/tmp/old', 'c0ffee', 'main', 'test', 'passed', 1)",
        [],
    )
    .unwrap();
}

#[test]
fn the_migration_applies_to_an_existing_older_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.db");
    old_database(&path);
    let jobs = {
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.get_build(BuildId::new(1)).unwrap().unwrap().build.repo,
            "/tmp/old"
        );
        let jobs = split_build(&s, 'a', 2, Strategy::Dynamic, retries(2));
        let mut shards = vec![start(&s, jobs[0], "r1"), start(&s, jobs[1], "r2")];
        run(&s, &mut shards, &units(8), &flaky_outcome);
        jobs
    };
    let s = SqliteStore::open(&path).unwrap();
    let version: i64 = s
        .reader()
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version as usize, crate::sqlite::MIGRATIONS.len());
    let r = the_report(&s, jobs[0]);
    assert!(r.done && r.passed);
    assert_eq!(r.units.len(), 8);
    assert_eq!(r.units[2].verdict, UnitVerdict::Flaky);
    assert_eq!(r.units[2].flaky_history, 1);
}

fn a_broken_runners_failures_run_again_under_the_same_try(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'q', 2, Strategy::Dynamic, retries(1));
    let list = units(20);
    let mut bad = start(s, jobs[0], "bad");
    let mut good = start(s, jobs[1], "good");
    bad.max_units = 1;
    bad.ask(s, &list, &all_pass);
    good.ask(s, &list, &all_pass);
    let failed_there = bad.held.clone();
    let fail = |_: &str, _: u32| UnitOutcome::Failed;
    bad.ask(s, &list, &fail);
    assert_eq!(s.requeue_failed_units(bad.attempt).unwrap(), 1);
    s.requeue_attempt(bad.attempt, "taken out of the pool", 3, false)
        .unwrap()
        .unwrap();
    let mut shards = vec![good];
    run(s, &mut shards, &list, &all_pass);
    let r = the_report(s, jobs[0]);
    assert!(r.done && r.passed, "{r:?}");
    for u in &r.units {
        assert_eq!(u.tries.len(), 1, "{u:?}");
        assert_eq!(u.tries[0].runner.as_deref(), Some("good"), "{u:?}");
    }
    // The unit that failed on the broken runner ran again under the same try number.
    assert_eq!(failed_there.len(), 1);
    let again = r.units.iter().find(|u| u.unit == failed_there[0].unit);
    let again = again.map(|u| (u.tries[0].try_number, u.tries[0].state.outcome()));
    assert_eq!(again, Some((1, Some(UnitOutcome::Passed))));
}

fn a_lost_attempt_cannot_finish_its_queued_job(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'l', 1, Strategy::Dynamic, retries(1));
    let a = start(s, jobs[0], "r1");
    s.requeue_attempt(a.attempt, "runner lost", 3, false)
        .unwrap()
        .unwrap();
    // Before the job is given out again, the lost attempt is still the job's last one: its
    // late result must not end the job.
    let late = s
        .finish_attempt(a.attempt, kiln_domain::JobState::Cancelled, None)
        .unwrap();
    assert!(matches!(late, crate::Finish::Refused(_)), "{late:?}");
    assert_eq!(
        s.get_job(jobs[0]).unwrap().unwrap().state,
        kiln_domain::JobState::Queued
    );
}

fn a_split_whose_shards_all_ended_is_closed(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let jobs = split_build(s, 'c', 2, Strategy::Dynamic, retries(1));
    let list = units(6);
    let mut a = start(s, jobs[0], "r1");
    a.ask(s, &list, &all_pass);
    a.ask(s, &list, &all_pass);
    s.end_job(jobs[0], kiln_domain::JobState::TimedOut, "deadline")
        .unwrap()
        .unwrap();
    assert!(
        !the_report(s, jobs[0]).done,
        "the other shard may still run"
    );
    s.end_job(jobs[1], kiln_domain::JobState::Cancelled, "cancelled")
        .unwrap()
        .unwrap();
    let r = the_report(s, jobs[0]);
    assert!(r.done && !r.passed, "{r:?}");
    assert!(r.retry_note.contains("every shard ended"), "{r:?}");
    assert!(
        r.units
            .iter()
            .any(|u| u.verdict == kiln_domain::split::UnitVerdict::NotRun)
    );
}

/// Reports the batch `sh` holds (each unit's own time `own_ms`, and, with `start_ms`, the
/// batch's wall time: the units' times plus `start_ms`) and returns the next batch.
fn ask_timed(
    s: &dyn TestStore,
    sh: &mut Shard,
    discovered: &[String],
    own_ms: u64,
    start_ms: Option<u64>,
) -> (UnitsRequest, Vec<LeasedUnit>) {
    sh.request += 1;
    let results: Vec<UnitReport> = sh
        .held
        .iter()
        .map(|u| UnitReport {
            unit: u.unit.clone(),
            try_number: u.try_number,
            outcome: UnitOutcome::Passed,
            duration_ms: own_ms,
            cases: Vec::new(),
        })
        .collect();
    let mut req = sh.request(discovered, results);
    if let Some(start_ms) = start_ms.filter(|_| !sh.held.is_empty()) {
        req.batch_ms = own_ms * sh.held.len() as u64 + start_ms;
        req.batch_processes = 1;
    }
    match s.next_units(&req).unwrap() {
        UnitsReply::Batch(b) => {
            sh.held = b.clone();
            (req, b)
        }
        other => panic!("{other:?}"),
    }
}

fn the_start_cost_seen_in_batches_makes_the_next_batches_bigger(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(200);
    let seeded: Vec<(String, u64)> = list.iter().map(|u| (u.clone(), 10)).collect();
    s.seed_unit_durations(REPO, KEY, &seeded).unwrap();

    // Without a start cost reported, batches keep the plain size.
    let jobs = split_build(s, 'a', 4, Strategy::Dynamic, retries(1));
    let mut plain = start(s, jobs[0], "r1");
    let (_, first) = ask_timed(s, &mut plain, &list, 10, None);
    assert_eq!(first.len(), 20, "200 units of 10 ms over 4 shards");
    let (_, second) = ask_timed(s, &mut plain, &list, 10, None);
    assert_eq!(second.len(), 20);

    // A batch that took 300 ms more than its units: the next batch is half of the shard's
    // fair share or two starts' worth, whichever is more, within the fair share: 160 units of
    // 10 ms are left, 400 ms per shard, less than two starts, so it takes all of its share.
    let (req, third) = ask_timed(s, &mut plain, &list, 10, Some(300));
    let left = 200 - 20 - 20;
    assert_eq!(third.len(), left / 4, "{} units of {left}", third.len());
    assert_eq!(s.history(REPO, KEY, ""), vec![300]);

    // A re-send records nothing twice.
    let mut again = req.clone();
    again.batch_ms += 10_000;
    assert!(matches!(s.next_units(&again).unwrap(), UnitsReply::Batch(b) if b == third));
    assert_eq!(s.history(REPO, KEY, ""), vec![300]);

    // The start cost is kept with the history: the next build starts with big batches.
    let jobs = split_build(s, 'b', 4, Strategy::Dynamic, retries(1));
    let mut next = start(s, jobs[0], "r2");
    let (_, first) = ask_timed(s, &mut next, &list, 10, None);
    assert_eq!(first.len(), 50, "a fair share of 2000 ms over 4 shards");
    // The other shards' fair shares count the batches in flight: each gets a quarter too,
    // and the last one the rest.
    for (i, runner) in ["r3", "r4", "r5"].into_iter().enumerate() {
        let mut other = start(s, jobs[i + 1], runner);
        let (_, got) = ask_timed(s, &mut other, &list, 10, None);
        assert_eq!(got.len(), 50, "shard {}", i + 2);
    }
}

fn units_without_history_are_estimated_from_the_split_once_some_ended(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(30);
    let jobs = split_build(s, 'a', 4, Strategy::Dynamic, retries(1));
    let mut sh = start(s, jobs[0], "r1");
    // Nothing known: 1000 ms each, one unit per batch.
    let (_, first) = ask_timed(s, &mut sh, &list, 60, None);
    assert_eq!(first.len(), 1);
    // It took 60 ms and its process 300 ms to start: 29 units of about 60 ms are left, a
    // fair share of 435 ms per shard.
    let (_, second) = ask_timed(s, &mut sh, &list, 60, Some(300));
    assert_eq!(second.len(), 7);
}

fn with_a_start_cost_units_recorded_once_count_as_most_of_a_typical_unit(b: Backend) {
    // 40 units: 20 recorded at 400 ms, 20 at 40 ms; a start cost of 300 ms known from earlier
    // builds. The split's median estimate is 400 ms, so a unit whose history is not to be
    // trusted as it is counts for at least 300 ms (three quarters of it, at most one start).
    let list = units(40);
    let seeded: Vec<(String, u64)> = list
        .iter()
        .enumerate()
        .map(|(i, u)| (u.clone(), if i < 20 { 400 } else { 40 }))
        .chain([(String::new(), 300)])
        .collect();
    let first_batch = |runs: usize| {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        s.seed_unit_durations(REPO, KEY, &seeded).unwrap();
        if runs > 1 {
            s.exec(
                "UPDATE unit_history SET durations = '[' || \
                 trim(durations, '[]') || ',' || trim(durations, '[]') || ',' || \
                 trim(durations, '[]') || ']' WHERE unit != ''",
            );
        }
        let jobs = split_build(s, 'a', 4, Strategy::Dynamic, retries(1));
        let mut sh = start(s, jobs[0], "r1");
        let (_, got) = ask_timed(s, &mut sh, &list, 0, None);
        assert!(got.iter().all(|u| list[..20].contains(&u.unit)), "{got:?}");
        got.len()
    };
    // Recorded once: 20 x 400 + 20 x 300 = 14 s, 3.5 s per shard, half of it in the first
    // batch: four units of 400 ms.
    assert_eq!(first_batch(1), 4);
    // Recorded three times alike: 20 x 400 + 20 x 40 = 8.8 s, 2.2 s per shard, half of it:
    // two units, as without the floor.
    assert_eq!(first_batch(3), 2);
}

fn without_a_start_cost_units_recorded_once_count_as_recorded(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(40);
    let seeded: Vec<(String, u64)> = list
        .iter()
        .enumerate()
        .map(|(i, u)| (u.clone(), if i < 20 { 400 } else { 40 }))
        .collect();
    s.seed_unit_durations(REPO, KEY, &seeded).unwrap();
    let jobs = split_build(s, 'a', 4, Strategy::Dynamic, retries(1));
    let mut sh = start(s, jobs[0], "r1");
    // The plain rule: an eighth of 8.8 s / 4 = 275 ms: one unit of 400 ms.
    let (_, got) = ask_timed(s, &mut sh, &list, 0, None);
    assert_eq!(got.len(), 1);
    // Batches of one 400 ms unit each until those are gone.
    let mut n = 1;
    while n < 20 {
        let (_, got) = ask_timed(s, &mut sh, &list, 400, None);
        n += got.len();
    }
    // 20 units of 40 ms as recorded: an eighth of 800 / 4 ms is under 200 ms, so 200 ms of
    // them: five.
    let (_, got) = ask_timed(s, &mut sh, &list, 400, None);
    assert_eq!(got.len(), 5, "{got:?}");
}

/// The batches as the web page's timeline reads them: one per (attempt, request, round), each
/// unit try in exactly one, with the shard's job and runner, and the retry round's batch apart.
fn split_batches_group_the_leased_tries_per_request(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(6);
    let jobs = split_build(s, 'a', 2, Strategy::Dynamic, retries(3));
    let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
    run(s, &mut shards, &list, &flaky_outcome);
    let build = s.get_job(jobs[0]).unwrap().unwrap().build_id;
    let batches = s.split_batches(build).unwrap();
    let given: usize = shards.iter().map(|sh| sh.got.len()).sum();
    let listed: usize = batches.iter().map(|b| b.units.len()).sum();
    assert_eq!(listed, given, "{batches:?}");
    assert_eq!(given, 7, "6 units and one retry");
    let mut keys = BTreeSet::new();
    for b in &batches {
        assert!(keys.insert((b.attempt, b.request, b.round)), "{b:?} twice");
        assert_eq!(b.split_key, KEY);
        let sh = shards.iter().find(|sh| sh.attempt == b.attempt).unwrap();
        assert!(b.job.starts_with("tests-"), "{b:?}");
        assert!(matches!(b.runner.as_str(), "r1" | "r2"));
        assert!(b.ended_at.is_some_and(|e| e >= b.leased_at), "{b:?}");
        for u in &b.units {
            assert!(
                sh.got.contains(&(u.clone(), b.round)),
                "{u} not given to {b:?}"
            );
        }
    }
    let retry: Vec<_> = batches.iter().filter(|b| b.round == 2).collect();
    assert_eq!(retry.len(), 1, "{batches:?}");
    assert_eq!(retry[0].units, vec!["tests/test_02.py".to_string()]);
    let failed: u32 = batches.iter().map(|b| b.failed).sum();
    assert_eq!(failed, 1);
    assert!(s.split_batches(BuildId::new(99)).unwrap().is_empty());
}

fn a_units_past_lists_its_verdict_per_build_newest_first(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let list = units(6);
    let always_02 = |u: &str, t: u32| match u {
        "tests/test_02.py" => UnitOutcome::Failed,
        _ => flaky_outcome(u, t),
    };
    let outcomes: [Outcomes<'_>; 3] = [&flaky_outcome, &all_pass, &always_02];
    let mut builds = Vec::new();
    for (commit, outcome) in ['a', 'b', 'c'].into_iter().zip(outcomes) {
        let jobs = split_build(s, commit, 2, Strategy::Dynamic, retries(3));
        let mut shards = vec![start(s, jobs[0], "r1"), start(s, jobs[1], "r2")];
        run(s, &mut shards, &list, outcome);
        builds.push(s.get_job(jobs[0]).unwrap().unwrap().build_id);
    }
    let asked = [
        "tests/test_02.py".to_string(),
        "tests/test_03.py".to_string(),
        "tests/nowhere.py".to_string(),
    ];
    let pasts = s.unit_pasts(REPO, KEY, &asked, builds[2], 10).unwrap();
    assert_eq!(pasts.len(), 3);
    assert_eq!(pasts[0].unit, "tests/test_02.py");
    assert_eq!(
        pasts[0].recent,
        vec![
            (builds[2], UnitVerdict::Failed),
            (builds[1], UnitVerdict::Passed),
            (builds[0], UnitVerdict::Flaky)
        ]
    );
    assert_eq!((pasts[0].flaky_total, pasts[0].failed_total), (1, 1));
    assert!(
        pasts[1]
            .recent
            .iter()
            .all(|(_, v)| *v == UnitVerdict::Passed)
    );
    assert_eq!(pasts[1].recent.len(), 3);
    assert_eq!((pasts[1].flaky_total, pasts[1].failed_total), (0, 0));
    assert!(pasts[2].recent.is_empty());
    // Bounded by `limit`, and by `until` (a build's page shows its own past, not its future).
    let two = s.unit_pasts(REPO, KEY, &asked[..1], builds[2], 2).unwrap();
    assert_eq!(
        two[0].recent,
        vec![
            (builds[2], UnitVerdict::Failed),
            (builds[1], UnitVerdict::Passed)
        ]
    );
    let before = s.unit_pasts(REPO, KEY, &asked[..1], builds[1], 10).unwrap();
    assert_eq!(
        before[0].recent,
        vec![
            (builds[1], UnitVerdict::Passed),
            (builds[0], UnitVerdict::Flaky)
        ]
    );
    // Another key or repository has no past of these units.
    let other = s
        .unit_pasts(REPO, "other", &asked[..1], builds[2], 10)
        .unwrap();
    assert!(other[0].recent.is_empty());
}

on_both_backends!(
    two_shards_pull_disjoint_units_until_done,
    duplicate_discovery_and_later_discoveries_are_ignored,
    resent_request_gets_the_same_units_and_records_nothing_twice,
    a_lost_attempt_returns_its_units_to_another_shard,
    finished_and_ended_jobs_return_their_units,
    refused_when_not_current_not_a_split_or_nothing_found,
    a_flaky_unit_passes_on_retry_and_is_counted_in_the_history,
    a_unit_failing_every_try_fails_the_split,
    more_failures_than_the_threshold_means_no_retry_round,
    the_retry_budget_stops_retries_and_its_floor_leaves_room_for_one,
    units_over_the_budget_are_named_in_the_report,
    interaction_failures_are_reported_and_the_policy_decides,
    longest_units_first_from_the_history_and_the_median_for_new_ones,
    static_hash_gives_each_shard_only_its_own_units,
    retry_rounds_run_on_fewer_shards,
    retries_prefer_another_runner,
    unit_try_states_read_back_and_corrupt_ones_are_refused,
    verdicts_while_running,
    a_broken_runners_failures_run_again_under_the_same_try,
    a_lost_attempt_cannot_finish_its_queued_job,
    a_split_whose_shards_all_ended_is_closed,
    the_start_cost_seen_in_batches_makes_the_next_batches_bigger,
    units_without_history_are_estimated_from_the_split_once_some_ended,
    without_a_start_cost_units_recorded_once_count_as_recorded,
    split_batches_group_the_leased_tries_per_request,
    with_a_start_cost_units_recorded_once_count_as_most_of_a_typical_unit,
    a_units_past_lists_its_verdict_per_build_newest_first,
);

//! `Store::assign_many` on both backends: `PgStore` makes a chunk in one transaction (see
//! `assign_batch` in `pg.rs`), and each assignment must still answer as `assign_owned` alone
//! would, in order, exactly once among racing dispatchers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Barrier;

use kiln_domain::{JobState, NewJob, RunnerId};

use crate::AssignRequest;
use crate::testing::{Backend, TestStore, on_both_backends, one_job_build};

fn request(job: kiln_domain::JobId, runner: RunnerId) -> AssignRequest {
    AssignRequest {
        job,
        runner,
        runner_name: "r".into(),
        owner: None,
    }
}

fn assign_many_answers_each_as_assign_would(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let r = s.upsert_runner("r", &BTreeMap::new(), 8, "t").unwrap().id;
    // Build `two` has two jobs; `taken`'s one job is assigned already.
    let mut new = one_job_build("two");
    let mut second: NewJob = new.jobs[0].clone();
    second.name = "k".into();
    new.jobs.push(second);
    let two = s.create_build(&new).unwrap();
    let taken = s.create_build(&one_job_build("taken")).unwrap();
    s.assign(taken.jobs[0].id, r, "r").unwrap().unwrap();
    let out = s.assign_many(&[
        request(two.jobs[0].id, r),
        request(taken.jobs[0].id, r),
        request(two.jobs[1].id, r),
        // The same job again: the second finds it assigned.
        request(two.jobs[0].id, r),
    ]);
    assert_eq!(out.len(), 4);
    let (a0, c0) = out[0].as_ref().unwrap().clone().unwrap();
    assert!(out[1].as_ref().unwrap().is_none(), "{:?}", out[1]);
    let (a2, c2) = out[2].as_ref().unwrap().clone().unwrap();
    assert!(out[3].as_ref().unwrap().is_none(), "{:?}", out[3]);
    assert_ne!(a0, a2);
    assert_eq!(
        (c0.build_id, c0.job_id, c0.job_state, c0.build_state),
        (
            two.build.id,
            two.jobs[0].id,
            JobState::Assigned,
            JobState::Running
        )
    );
    assert!(c0.build_changed, "the first assignment starts the build");
    assert_eq!(
        (c2.job_id, c2.job_state, c2.build_state),
        (two.jobs[1].id, JobState::Assigned, JobState::Running)
    );
    assert!(!c2.build_changed, "the build was running already");
    for (job, attempt) in [(two.jobs[0].id, a0), (two.jobs[1].id, a2)] {
        let job = s.get_job(job).unwrap().unwrap();
        assert_eq!(job.state, JobState::Assigned);
        assert_eq!(job.current_attempt, Some(attempt));
        assert_eq!(job.attempts, 1);
        assert_eq!(job.runner.as_deref(), Some("r"));
    }
    let stored = s.get_build(two.build.id).unwrap().unwrap();
    assert_eq!(stored.build.state, JobState::Running);
    // Each attempt goes on as one `assign` made: accepted, finished, the build settled.
    s.start_attempt(a0).unwrap().unwrap();
    s.start_attempt(a2).unwrap().unwrap();
    s.finish_attempt(a0, JobState::Passed, None).unwrap();
    s.finish_attempt(a2, JobState::Passed, None).unwrap();
    let stored = s.get_build(two.build.id).unwrap().unwrap();
    assert_eq!(stored.build.state, JobState::Passed);
    crate::testing::check_tallies(s);
}

fn a_failing_assignment_undoes_only_itself(b: Backend) {
    let opened = b.open();
    let s: &dyn TestStore = &*opened;
    let r = s.upsert_runner("r", &BTreeMap::new(), 8, "t").unwrap().id;
    let builds: Vec<_> = (0..3)
        .map(|i| s.create_build(&one_job_build(&format!("c{i}"))).unwrap())
        .collect();
    // No such runner: PostgreSQL refuses the attempt's row (foreign key).
    let missing = RunnerId::new(r.get() + 1000);
    let out = s.assign_many(&[
        request(builds[0].jobs[0].id, r),
        request(builds[1].jobs[0].id, missing),
        request(builds[2].jobs[0].id, r),
    ]);
    assert!(matches!(out[0], Ok(Some(_))), "{:?}", out[0]);
    assert!(matches!(out[2], Ok(Some(_))), "{:?}", out[2]);
    if matches!(b, Backend::Postgres) {
        assert!(out[1].is_err(), "{:?}", out[1]);
    }
    if out[1].is_err() {
        let job = s.get_job(builds[1].jobs[0].id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.attempts, 0);
        assert_eq!(job.current_attempt, None);
        let build = s.get_build(builds[1].build.id).unwrap().unwrap();
        assert_eq!(build.build.state, JobState::Queued);
    }
    for i in [0, 2] {
        let job = s.get_job(builds[i].jobs[0].id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Assigned);
    }
    crate::testing::check_tallies(s);
}

fn racing_chunks_on_two_handles_give_each_job_once(b: Backend) {
    const CHUNKS: usize = 4;
    let opened = b.open();
    let other = opened.another();
    let s: &dyn TestStore = &*opened;
    let r = s.upsert_runner("r", &BTreeMap::new(), 64, "t").unwrap().id;
    let jobs: Vec<_> = (0..40)
        .map(|i| {
            s.create_build(&one_job_build(&format!("c{i}")))
                .unwrap()
                .jobs[0]
                .id
        })
        .collect();
    let barrier = Barrier::new(CHUNKS);
    let made: Vec<Vec<kiln_domain::AttemptId>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..CHUNKS)
            .map(|w| {
                let (barrier, jobs) = (&barrier, &jobs);
                let st: &dyn TestStore = if w % 2 == 0 { s } else { &*other };
                scope.spawn(move || {
                    // Each chunk overlaps the others, in its own order.
                    let mut mine: Vec<_> = jobs.iter().map(|j| request(*j, r)).collect();
                    mine.rotate_left(w * 7);
                    if w % 2 == 1 {
                        mine.reverse();
                    }
                    barrier.wait();
                    st.assign_many(&mine)
                        .into_iter()
                        .filter_map(|x| x.unwrap().map(|(a, _)| a))
                        .collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all: Vec<_> = made.into_iter().flatten().collect();
    let distinct: BTreeSet<_> = all.iter().copied().collect();
    assert_eq!(all.len(), jobs.len(), "every job once: {all:?}");
    assert_eq!(distinct.len(), jobs.len());
    for job in &jobs {
        let job = s.get_job(*job).unwrap().unwrap();
        assert_eq!(job.state, JobState::Assigned);
        assert_eq!(job.attempts, 1);
        assert!(distinct.contains(&job.current_attempt.unwrap()));
    }
    crate::testing::check_tallies(s);
}

on_both_backends!(
    assign_many_answers_each_as_assign_would,
    a_failing_assignment_undoes_only_itself,
    racing_chunks_on_two_handles_give_each_job_once,
);

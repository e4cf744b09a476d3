//! Several dispatchers on one store: their rows, attempts' owners, the owner-fenced requeue,
//! claims of re-attached attempts, adoption of dead dispatchers' attempts, runners' dispatchers.
//! On both backends (a SQLite file's one dispatcher never registers, but the rules hold).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use kiln_domain::{AttemptId, DispatcherId, JobState, RunnerId};

use crate::testing::{Backend, TestStore, on_both_backends, one_job_build};
use crate::{DISPATCHER_LEASE_MS, Owner};

const NOW: i64 = 1_000_000_000;

fn owner(d: DispatcherId, secret: &str) -> Owner {
    Owner {
        dispatcher: d,
        secret_hash: secret.into(),
    }
}

/// A queued job given to runner `r` as an attempt owned by `d`.
pub(crate) fn owned_attempt(
    s: &dyn TestStore,
    commit: &str,
    r: RunnerId,
    d: Option<DispatcherId>,
) -> AttemptId {
    let b = s.create_build(&one_job_build(commit)).unwrap();
    let o = d.map(|d| owner(d, "hash"));
    s.assign_owned(b.jobs[0].id, r, "r", o.as_ref())
        .unwrap()
        .unwrap()
        .0
}

fn dispatchers_register_heartbeat_and_are_listed(b: Backend) {
    let s = b.open();
    let a = s.register_dispatcher("a", NOW).unwrap();
    let c = s.register_dispatcher("c", NOW).unwrap();
    assert_ne!(a, c);
    assert!(s.dispatcher_seen(a, NOW + 5_000).unwrap());
    // Never backwards (a late heartbeat of an older clock reading).
    assert!(s.dispatcher_seen(a, NOW + 1_000).unwrap());
    let list = s.dispatchers().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].id, a);
    assert_eq!(list[0].seen_at, NOW + 5_000);
    assert_eq!(list[0].started_at, NOW);
    assert!(list[0].alive(NOW + 5_000 + DISPATCHER_LEASE_MS));
    assert!(!list[1].alive(NOW + 5_000));
    assert!(!s.dispatcher_seen(DispatcherId::new(9999), NOW).unwrap());
}

fn assign_records_the_owner_and_the_secret_hash(b: Backend) {
    let s = b.open();
    let d = s.register_dispatcher("a", NOW).unwrap();
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let a = owned_attempt(&*s, "a1", r, Some(d));
    let o = s.owned_attempt(a).unwrap().unwrap();
    assert_eq!(o.owner, Some(d));
    assert_eq!(o.secret_hash.as_deref(), Some("hash"));
    assert!(o.current);
    assert_eq!(o.attempt.runner_id, r);
    // Without an owner (a SQLite store's dispatcher): none recorded.
    let plain = owned_attempt(&*s, "a2", r, None);
    let o = s.owned_attempt(plain).unwrap().unwrap();
    assert_eq!((o.owner, o.secret_hash), (None, None));
    // Once finished, no longer current.
    s.finish_attempt(a, JobState::Passed, None).unwrap();
    assert!(!s.owned_attempt(a).unwrap().unwrap().current);
    assert!(s.owned_attempt(AttemptId::new(9999)).unwrap().is_none());
}

fn requeue_is_fenced_by_the_owner(b: Backend) {
    let s = b.open();
    let (da, dc) = (
        s.register_dispatcher("a", NOW).unwrap(),
        s.register_dispatcher("c", NOW).unwrap(),
    );
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let a = owned_attempt(&*s, "a1", r, Some(da));
    // Not C's: nothing changes.
    assert!(
        s.requeue_owned(a, "lost", 3, true, Some(dc))
            .unwrap()
            .is_none()
    );
    let job = s.get_attempt(a).unwrap().unwrap().job_id;
    assert_eq!(s.get_job(job).unwrap().unwrap().state, JobState::Assigned);
    // Once C claimed it, A's requeue is refused and C's goes through.
    assert!(s.claim_attempt(a, r, Some(da), &owner(dc, "h2")).unwrap());
    assert!(
        s.requeue_owned(a, "lost", 3, true, Some(da))
            .unwrap()
            .is_none()
    );
    let ch = s
        .requeue_owned(a, "lost", 3, true, Some(dc))
        .unwrap()
        .unwrap();
    assert_eq!(ch.job_state, JobState::Queued);
    // Unfenced (SQLite's one dispatcher) as before.
    let a2 = owned_attempt(&*s, "a2", r, Some(da));
    assert!(s.requeue_attempt(a2, "lost", 3, true).unwrap().is_some());
}

fn a_claim_is_a_compare_and_set_on_the_owner(b: Backend) {
    let s = b.open();
    let (da, dc) = (
        s.register_dispatcher("a", NOW).unwrap(),
        s.register_dispatcher("c", NOW).unwrap(),
    );
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let other = s.upsert_runner("o", &BTreeMap::new(), 1, "t").unwrap().id;
    let a = owned_attempt(&*s, "a1", r, Some(da));
    // Another runner cannot claim it, nor can a claim from a wrong owner.
    assert!(
        !s.claim_attempt(a, other, Some(da), &owner(dc, "x"))
            .unwrap()
    );
    assert!(!s.claim_attempt(a, r, Some(dc), &owner(dc, "x")).unwrap());
    assert!(!s.claim_attempt(a, r, None, &owner(dc, "x")).unwrap());
    assert!(s.claim_attempt(a, r, Some(da), &owner(dc, "h2")).unwrap());
    let o = s.owned_attempt(a).unwrap().unwrap();
    assert_eq!(o.owner, Some(dc));
    assert_eq!(o.secret_hash.as_deref(), Some("h2"));
    // The same again from A: lost.
    assert!(!s.claim_attempt(a, r, Some(da), &owner(da, "h3")).unwrap());
    // A re-attach to the same dispatcher records the new session's secret.
    assert!(s.claim_attempt(a, r, Some(dc), &owner(dc, "h4")).unwrap());
    assert_eq!(
        s.owned_attempt(a).unwrap().unwrap().secret_hash.as_deref(),
        Some("h4")
    );
    // An attempt that is no longer current cannot be claimed.
    s.finish_attempt(a, JobState::Passed, None).unwrap();
    assert!(!s.claim_attempt(a, r, Some(dc), &owner(dc, "h5")).unwrap());
}

fn live_dispatchers_adopt_the_attempts_of_dead_ones(b: Backend) {
    let s = b.open();
    let dead = s.register_dispatcher("dead", NOW).unwrap();
    let live = s.register_dispatcher("live", NOW).unwrap();
    let me = s.register_dispatcher("me", NOW).unwrap();
    let later = NOW + 10_000;
    s.dispatcher_seen(live, later).unwrap();
    s.dispatcher_seen(me, later).unwrap();
    let r = s.upsert_runner("r", &BTreeMap::new(), 4, "t").unwrap().id;
    let of_dead = owned_attempt(&*s, "a1", r, Some(dead));
    let of_live = owned_attempt(&*s, "a2", r, Some(live));
    let mine = owned_attempt(&*s, "a3", r, Some(me));
    let unowned = owned_attempt(&*s, "a4", r, None);
    let finished = owned_attempt(&*s, "a5", r, Some(dead));
    s.finish_attempt(finished, JobState::Passed, None).unwrap();
    let adopted: Vec<AttemptId> = s
        .adopt_attempts(me, later - DISPATCHER_LEASE_MS)
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(adopted, vec![of_dead, unowned]);
    for a in [of_dead, unowned, mine] {
        assert_eq!(s.owned_attempt(a).unwrap().unwrap().owner, Some(me));
    }
    assert_eq!(s.owned_attempt(of_live).unwrap().unwrap().owner, Some(live));
    // The secret hash stays: the runner proves itself to the adopter with it.
    assert_eq!(
        s.owned_attempt(of_dead)
            .unwrap()
            .unwrap()
            .secret_hash
            .as_deref(),
        Some("hash")
    );
    // Adopted once.
    assert!(
        s.adopt_attempts(me, later - DISPATCHER_LEASE_MS)
            .unwrap()
            .is_empty()
    );
    // A dispatcher dead for an hour is forgotten.
    s.adopt_attempts(me, NOW + 2 * crate::FORGET_DISPATCHERS_MS)
        .unwrap();
    let ids: Vec<DispatcherId> = s.dispatchers().unwrap().iter().map(|d| d.id).collect();
    assert_eq!(ids, vec![me]);
}

fn a_runner_is_attached_while_its_dispatcher_lives(b: Backend) {
    let s = b.open();
    let (da, dc) = (
        s.register_dispatcher("a", NOW).unwrap(),
        s.register_dispatcher("c", NOW).unwrap(),
    );
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
    let q = s.upsert_runner("q", &BTreeMap::new(), 1, "t").unwrap().id;
    assert!(s.attached_runners(NOW).unwrap().is_empty());
    s.set_runner_dispatcher(r, Some(da), da).unwrap();
    s.set_runner_dispatcher(q, Some(dc), dc).unwrap();
    assert_eq!(s.attached_runners(NOW).unwrap(), vec![(r, da), (q, dc)]);
    // The runner moved to C; A's late detach changes nothing.
    s.set_runner_dispatcher(r, Some(dc), dc).unwrap();
    s.set_runner_dispatcher(r, None, da).unwrap();
    assert_eq!(s.attached_runners(NOW).unwrap(), vec![(r, dc), (q, dc)]);
    s.set_runner_dispatcher(q, None, dc).unwrap();
    assert_eq!(s.attached_runners(NOW).unwrap(), vec![(r, dc)]);
    // C died: nothing is attached.
    s.dispatcher_seen(da, NOW + 10_000).unwrap();
    assert!(s.attached_runners(NOW + 5_000).unwrap().is_empty());
}

fn a_runner_attached_to_another_live_dispatcher_is_not_forgotten(b: Backend) {
    let s = b.open();
    let d = s.register_dispatcher("other", NOW).unwrap();
    let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap();
    let q = s.upsert_runner("q", &BTreeMap::new(), 1, "t").unwrap();
    s.touch_runner(r.id, 0).unwrap();
    s.touch_runner(q.id, 0).unwrap();
    s.set_runner_dispatcher(r.id, Some(d), d).unwrap();
    // Both idle for long; r is attached to a dispatcher seen since: only q goes.
    assert_eq!(s.forget_idle_runners(NOW, &[]).unwrap(), 1);
    let names: Vec<String> = s
        .list_runners()
        .unwrap()
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, vec!["r".to_string()]);
    // Once that dispatcher is dead for long, r goes too.
    assert_eq!(s.forget_idle_runners(NOW + 1, &[]).unwrap(), 1);
}

on_both_backends!(
    dispatchers_register_heartbeat_and_are_listed,
    assign_records_the_owner_and_the_secret_hash,
    requeue_is_fenced_by_the_owner,
    a_claim_is_a_compare_and_set_on_the_owner,
    live_dispatchers_adopt_the_attempts_of_dead_ones,
    a_runner_is_attached_while_its_dispatcher_lives,
    a_runner_attached_to_another_live_dispatcher_is_not_forgotten,
);

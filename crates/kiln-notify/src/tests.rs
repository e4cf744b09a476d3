//! Planning against a real dispatcher and store (a temp data dir): which deliveries each
//! point of a build's life plans, `fixed` across builds, idempotent re-planning, and the
//! deliveries router over a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use kiln_domain::{JobState, NewBuild, NewJob, StepSpec};
use kiln_store::{BuildDetail, Mark, Store};

use super::*;

fn config() -> Config {
    let secrets = [("S".to_owned(), "secret".to_owned())]
        .into_iter()
        .collect();
    Config::parse(
        "public_url: https://ci.example.com\n\
         rules:\n\
         \x20 - repo: \"https://github.com/acme/*\"\n\
         \x20   branch: main\n\
         \x20   webhook: {url: http://127.0.0.1:9/hook, secret_secret: S}\n\
         \x20   status: {forge: gitea, api: http://127.0.0.1:9, token_secret: S}\n",
        "t.yml",
        &secrets,
    )
    .unwrap()
}

fn new_build(commit: char, branch: &str) -> NewBuild {
    NewBuild {
        repo: "https://github.com/acme/app".into(),
        commit: commit.to_string().repeat(40),
        branch: branch.into(),
        trigger: "test".into(),
        jobs: vec![NewJob {
            name: "test".into(),
            steps: vec![StepSpec {
                name: "s".into(),
                run: "true".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        pipeline_hash: String::new(),
        pipeline: commit.to_string(),
        ..Default::default()
    }
}

/// Creates a build and runs its one job to `end` (or leaves it running).
fn build(store: &dyn Store, commit: char, branch: &str, end: Option<JobState>) -> BuildDetail {
    let d = store.create_build(&new_build(commit, branch)).unwrap();
    let r = store
        .upsert_runner("r", &BTreeMap::new(), 1, "t")
        .unwrap()
        .id;
    let (attempt, _) = store.assign(d.jobs[0].id, r, "r").unwrap().unwrap();
    store.start_attempt(attempt).unwrap();
    if let Some(state) = end {
        store.finish_attempt(attempt, state, None).unwrap();
    }
    d
}

fn planned(store: &dyn Store, id: BuildId) -> Vec<(String, String)> {
    store
        .deliveries(id)
        .unwrap()
        .into_iter()
        .map(|d| (d.event, d.target))
        .collect()
}

#[tokio::test]
async fn builds_plan_their_events_once_and_fixed_follows_the_branch() {
    let dir = tempfile::tempdir().unwrap();
    let dispatcher = Dispatcher::open(kiln_dispatcher::Config::new(dir.path())).unwrap();
    let store = dispatcher.store();
    let config = config();
    let hook = "webhook http://127.0.0.1:9/hook".to_owned();
    let status = "status gitea http://127.0.0.1:9 acme/app".to_owned();

    // A build still running: queued and started.
    let b1 = build(store.as_ref(), 'a', "main", None).build.id;
    assert!(
        plan::plan_build(&dispatcher, &store, &config, b1)
            .await
            .unwrap()
            > 0
    );
    assert_eq!(
        planned(store.as_ref(), b1),
        [
            ("queued".to_owned(), status.clone()),
            ("started".to_owned(), hook.clone()),
            ("started".to_owned(), status.clone()),
        ]
    );
    // Planned again (a restart): nothing new.
    assert_eq!(
        plan::plan_build(&dispatcher, &store, &config, b1)
            .await
            .unwrap(),
        0
    );

    // Failed, then cancelled (looked past), then passed: failed, then fixed.
    let b2 = build(store.as_ref(), 'b', "main", Some(JobState::Failed))
        .build
        .id;
    plan::plan_build(&dispatcher, &store, &config, b2)
        .await
        .unwrap();
    let events: Vec<_> = planned(store.as_ref(), b2)
        .into_iter()
        .filter(|(_, t)| *t == hook)
        .map(|(e, _)| e)
        .collect();
    assert_eq!(events, ["started", "finished", "failed"]);
    // Its statuses: the queued and started ones are not planned for a build already over.
    let statuses: Vec<_> = store
        .deliveries(b2)
        .unwrap()
        .into_iter()
        .filter(|d| d.target == status)
        .map(|d| {
            (
                d.event,
                serde_json::from_str::<serde_json::Value>(&d.payload).unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].1["state"], "failure");
    assert_eq!(
        statuses[0].1["target_url"],
        format!("https://ci.example.com/builds/{b2}")
    );

    let b3 = build(store.as_ref(), 'c', "main", Some(JobState::Cancelled))
        .build
        .id;
    let b4 = build(store.as_ref(), 'd', "main", Some(JobState::Passed))
        .build
        .id;
    let other = build(store.as_ref(), 'e', "dev", Some(JobState::Passed))
        .build
        .id;
    for b in [b3, b4, other] {
        plan::plan_build(&dispatcher, &store, &config, b)
            .await
            .unwrap();
    }
    let hook_events = |b| -> Vec<String> {
        planned(store.as_ref(), b)
            .into_iter()
            .filter(|(_, t)| *t == hook)
            .map(|(e, _)| e)
            .collect()
    };
    assert_eq!(hook_events(b3), ["started", "finished"]);
    assert_eq!(hook_events(b4), ["started", "finished", "fixed"]);
    // Another branch matches no rule: marks, no deliveries.
    assert!(planned(store.as_ref(), other).is_empty());
    assert_eq!(
        store.planned_marks(other).unwrap(),
        [Mark::Queued, Mark::Started, Mark::Finished]
    );
    // b1 still runs, planned up to started: nothing is left to plan.
    assert!(store.unplanned_builds(0, 100).unwrap().is_empty());

    // The delivery log the web page shows (`GET /api/builds/{id}/deliveries`), without what
    // is sent.
    let list = dispatcher.deliveries(b4).await.unwrap();
    let json = serde_json::json!({"build_id": b4, "deliveries": list});
    assert_eq!(json["build_id"], b4.get());
    let list = json["deliveries"].as_array().unwrap();
    assert!(
        list.iter()
            .any(|d| d["event"] == "fixed" && d["state"] == "pending")
    );
    assert!(list.iter().all(|d| d.get("payload").is_none()), "{json}");
}

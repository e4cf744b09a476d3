//! The runners of one machine share one mirror cache (`kiln runner --cache-dir`): a new commit
//! that jobs on several runners need at once is fetched once, by one of them, while the others
//! wait on the mirror's lock and find it there. Each fetch is a line in its runner's log
//! ("fetched mirror"), which is what this test counts.

use kiln_testkit::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use std::collections::BTreeSet;

const RUNNERS: [&str; 3] = ["r1", "r2", "r3"];

/// How many fetches the runners have logged.
fn fetches(runners: &[Proc]) -> usize {
    runners
        .iter()
        .map(|r| {
            String::from_utf8_lossy(&r.stderr())
                .matches("fetched mirror")
                .count()
        })
        .sum()
}

/// A pipeline of three jobs that each wait until all three run: on three one-slot runners,
/// each runner runs one, so all three need the build's commit at the same moment. They meet in
/// the directory `meet`.
fn pipeline(meet: &std::path::Path) -> String {
    let step = |job: &str| {
        let dir = meet.display();
        let wait: Vec<String> = (0..RUNNERS.len())
            .map(|i| wait_flag_sh(&meet.join(i.to_string())))
            .collect();
        let me = match job {
            "a" => 0,
            "b" => 1,
            _ => 2,
        };
        let script = format!(
            "mkdir -p '{dir}' && touch '{dir}/{me}' && {} && echo met",
            wait.join(" && ")
        );
        format!(
            "  {job}:\n    steps:\n      - name: meet\n        run: {}\n",
            serde_json::to_string(&script).unwrap()
        )
    };
    format!("jobs:\n{}{}{}", step("a"), step("b"), step("c"))
}

#[test]
fn three_runners_on_one_machine_fetch_each_new_commit_once() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    // Server::runner gives them one cache, tmp/runner-cache, as the runners of one machine.
    let mut runners: Vec<Proc> = RUNNERS
        .iter()
        .map(|name| server.runner(tmp.path(), name, &[]))
        .collect();
    server.wait_runners_attached(&RUNNERS);
    assert_eq!(fetches(&runners), 0);

    let meet = tmp.path().join("meet");
    let repo = Repo::init(&tmp.path().join("repo"));
    // Round 1 makes the mirror (all three race to create it); round 2 brings a new commit to it.
    for round in 1..=2 {
        let pipeline = pipeline(&meet.join(round.to_string()));
        let sha = repo.commit(&[(".kiln.yml", pipeline.as_bytes())], "round");
        let id = id_of(&server.submit(&repo.path, &sha));
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "round {round}: {b}");
        let ran_on: BTreeSet<&str> = b["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j: &Value| j["runner"].as_str().unwrap())
            .collect();
        assert_eq!(
            ran_on,
            RUNNERS.into_iter().collect(),
            "round {round}: one job on each runner: {b}"
        );
        // The fetch came before the jobs ran; its log line is on its way to us.
        wait_for("the fetch's log line", LONG, || {
            let n = fetches(&runners);
            if n >= round {
                Ok(())
            } else {
                Err(format!("{n} fetches logged"))
            }
        });
    }

    // Stopped, their logs are complete: one fetch per new commit, not one per runner.
    for r in &runners {
        r.signal(Signal::SIGTERM);
    }
    for r in &mut runners {
        r.wait(LONG);
    }
    assert_eq!(fetches(&runners), 2, "fetches of the 2 new commits");
    // One mirror, in the shared cache; none in the runners' own work dirs.
    let cache: Vec<_> = std::fs::read_dir(tmp.path().join("runner-cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert_eq!(cache.len(), 1, "{cache:?}");
    for name in RUNNERS {
        let own = tmp.path().join(format!("work-{name}")).join("mirrors");
        assert!(!own.exists(), "{} exists", own.display());
    }
}

/// A cache directory the runner cannot use is refused at start, naming it, before the runner
/// connects or takes work.
#[test]
fn an_unusable_cache_dir_is_refused_at_start() {
    let tmp = tempdir();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let bad = file.join("mirrors");
    let work = tmp.path().join("work");
    let out = kiln(&[
        "--dispatcher",
        "http://127.0.0.1:1",
        "runner",
        "--name",
        "r1",
        "--work-dir",
        work.to_str().unwrap(),
        "--cache-dir",
        bad.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), 5, "{out}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mirror cache") && err.contains(bad.to_str().unwrap()),
        "{out}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"not a directory");
}

//! Runner sessions against real processes: a runner stopped (SIGSTOP) past its lease comes
//! back, drops the superseded attempt and frees its slot; a runner killed mid-job has its job
//! run elsewhere after a short reconnect grace, not after the whole lease.

use kiln_testkit::*;
use nix::sys::signal::Signal;

/// The job of `kiln show`'s JSON.
fn job(b: &serde_json::Value) -> &serde_json::Value {
    &b["jobs"][0]
}

#[test]
fn a_runner_stopped_past_its_lease_frees_the_slot_of_the_attempt_it_drops() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      echo \"attempt $KILN_ATTEMPT_ID starts\"\n      {}\n      echo \"attempt $KILN_ATTEMPT_ID done\"\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "300ms"]);
    let runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);

    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let first = job(&b)["attempt_id"].as_u64().unwrap();

    // Stopped past its lease: the dispatcher declares it lost and queues the job again.
    runner.signal(Signal::SIGSTOP);
    server.wait_build(id, "the job queued again", LONG, |b| {
        job(b)["state"] == "queued" && job(b)["attempts"] == 1
    });
    runner.signal(Signal::SIGCONT);

    // It comes back, is told its attempt was superseded, drops it, and has a free slot for
    // the second attempt (before the fix it refused every assignment with "no free slot").
    let b = server.wait_build(id, "a second attempt running on r1", LONG, |b| {
        job(b)["state"] == "running" && job(b)["attempt_id"].as_u64() != Some(first)
    });
    assert_eq!(job(&b)["runner"], "r1", "{b}");
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    // A refusal or two while the dropped step was still being stopped, not a storm.
    let attempts = job(&b)["attempts"].as_u64().unwrap();
    assert!(attempts <= 6, "{attempts} attempts: {b}");
}

#[test]
fn a_killed_runners_job_runs_elsewhere_after_the_reconnect_grace_not_the_lease() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      echo \"attempt $KILN_ATTEMPT_ID starts\"\n      {}\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    // A lease of 5 minutes: only the closed stream can explain a reassignment within the
    // test's deadline. The grace is the default (1 s).
    let server = Server::start(
        &tmp.path().join("data"),
        &["--heartbeat-interval", "3s", "--missed-heartbeats", "100"],
    );
    let mut runners = [
        Some(server.runner(tmp.path(), "r1", &[])),
        Some(server.runner(tmp.path(), "r2", &[])),
    ];
    server.wait_runners_attached(&["r1", "r2"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let first = job(&b)["attempt_id"].as_u64().unwrap();
    let (victim, survivor) = match job(&b)["runner"].as_str().unwrap() {
        "r1" => (0, "r2"),
        _ => (1, "r1"),
    };
    wait_for("the first attempt's output", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]);
        if out.out().contains(&format!("attempt {first} starts")) {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
    let killed = std::time::Instant::now();
    runners[victim].as_mut().unwrap().kill_all();
    let b = server.wait_build(id, &format!("reassigned to {survivor}"), LONG, |b| {
        job(b)["runner"] == survivor && job(b)["attempts"] == 2
    });
    // A figure for the record, not an assertion (the lease above is what makes it a test).
    eprintln!(
        "the killed runner's job was running elsewhere after {:?}",
        killed.elapsed()
    );
    assert_ne!(job(&b)["attempt_id"].as_u64(), Some(first), "{b}");
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job(&b)["runner"], survivor, "{b}");
}

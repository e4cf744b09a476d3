//! Restart: builds queued with no runner survive the dispatcher being stopped (SIGTERM) or
//! killed (SIGKILL), and run to `passed` once a runner attaches to the restarted dispatcher.

use kiln_testkit::*;
use nix::sys::signal::Signal;

fn queued_builds_survive(signal: Signal) {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let repo = Repo::init(&tmp.path().join("repo"));
    let shas: Vec<String> = (0..3)
        .map(|i| {
            let yml = format!("steps:\n  - name: s{i}\n    run: echo restart-{i}\n");
            repo.commit(&[(".kiln.yml", yml.as_bytes())], &format!("c{i}"))
        })
        .collect();

    let mut server = Server::start(&data, &["--heartbeat-interval", "500ms"]);
    let ids: Vec<u64> = shas
        .iter()
        .map(|sha| id_of(&server.submit(&repo.path, sha)))
        .collect();
    for &id in &ids {
        assert_eq!(server.show(id)["state"], "queued");
    }

    server.proc.signal(signal);
    let out = server.proc.wait(LONG);
    match signal {
        Signal::SIGTERM => assert_eq!(
            out.status.code(),
            Some(0),
            "kiln serve after SIGTERM: {out}"
        ),
        _ => assert!(out.status.code().is_none(), "{out}"),
    }
    // It is really gone: its port refuses the CLI (exit 6, unavailable).
    server.cli(&["builds"]).expect_code(6);
    drop(server);

    let server = Server::start(&data, &["--heartbeat-interval", "500ms"]);
    let out = server.cli(&["--json", "builds"]);
    out.expect_code(0);
    let listed = out.json();
    let mut listed_ids: Vec<u64> = listed["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    listed_ids.sort_unstable();
    assert_eq!(listed_ids, ids, "{listed}");
    for b in listed["builds"].as_array().unwrap() {
        assert_eq!(b["state"], "queued", "{b}");
    }

    let _runner = server.runner(tmp.path(), "r1", &[]);
    for (i, &id) in ids.iter().enumerate() {
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        assert_eq!(b["commit"], shas[i].as_str());
        assert_eq!(b["jobs"][0]["attempts"], 1, "{b}");
        let logs = server.cli(&["logs", &id.to_string()]);
        logs.expect_code(0);
        assert!(logs.out().contains(&format!("restart-{i}\n")), "{logs}");
    }
    // Ids are not reused after the restart.
    let next = id_of(&server.submit(&repo.path, &repo.new_commit("after-restart")));
    assert!(
        next > *ids.iter().max().unwrap(),
        "new build got id {next} after {ids:?}"
    );
    assert_eq!(server.wait_final(next, LONG)["state"], "passed");
}

#[test]
fn queued_builds_survive_sigterm() {
    queued_builds_survive(Signal::SIGTERM);
}

#[test]
fn queued_builds_survive_sigkill() {
    queued_builds_survive(Signal::SIGKILL);
}

/// A build that was running when the dispatcher was killed is not lost: after the restart
/// (on a new port, so the old runner cannot come back), it goes back to the queue once the
/// lease expires and a new runner runs it to `passed`.
#[test]
fn running_build_is_requeued_after_dispatcher_sigkill() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      {}\n      echo done-waiting\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let mut server = Server::start(&data, &["--heartbeat-interval", "300ms"]);
    let mut old_runner = server.runner(tmp.path(), "old", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    server.wait_build(id, "running on the old runner", LONG, |b| {
        b["state"] == "running" && b["jobs"][0]["runner"] == "old"
    });
    server.proc.signal(Signal::SIGKILL);
    server.proc.wait(LONG);
    old_runner.kill_all();
    drop(server);

    let server = Server::start(&data, &["--heartbeat-interval", "300ms"]);
    let _new_runner = server.runner(tmp.path(), "new", &[]);
    server.wait_build(id, "running again on the new runner", LONG, |b| {
        b["state"] == "running" && b["jobs"][0]["runner"] == "new"
    });
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(b["jobs"][0]["attempts"], 2, "{b}");
    let logs = server.cli(&["logs", &id.to_string()]);
    assert!(logs.out().contains("done-waiting\n"), "{logs}");
}

/// Starts a build whose step blocks, follows it with `kiln logs -f`, sends `signal` to the
/// dispatcher, and returns how the follower ended.
fn follower_after_dispatcher(signal: Signal) -> Out {
    let tmp = tempdir();
    let flag = tmp.path().join("never");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      printf 'waiting-%s\\n' now\n      {}\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "300ms"]);
    let _runner = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);
    follower.wait_stdout(b"waiting-now\n", LONG);
    server.proc.signal(signal);
    let out = follower.wait(LONG);
    // Let the step end rather than wait for its bound.
    std::fs::write(&flag, b"").unwrap();
    out
}

/// A `kiln logs -f` follower does not hang when the dispatcher stops: it exits 6.
#[test]
fn follower_exits_6_when_the_dispatcher_stops() {
    let out = follower_after_dispatcher(Signal::SIGTERM);
    assert_eq!(out.status.code(), Some(6), "{out}");
    assert!(out.err().contains("unavailable"), "{out}");
}

/// Same when the dispatcher dies: the connection breaks mid-stream; that is "the dispatcher
/// cannot be reached" (6), not "any other error" (7).
#[test]
fn follower_exits_6_when_the_dispatcher_dies() {
    let out = follower_after_dispatcher(Signal::SIGKILL);
    assert_eq!(out.status.code(), Some(6), "{out}");
}

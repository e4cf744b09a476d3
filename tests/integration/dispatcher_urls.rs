//! `--dispatcher` with several URLs: clients use the first dispatcher they can reach; a runner
//! stays with the one it reached and moves to the next when that one goes away.

use std::time::Duration;

use kiln_testkit::fault::{cli_at, spawn_runner, wait_attached};
use kiln_testkit::*;

/// A loopback URL nobody listens on (the port was free a moment ago).
fn dead_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

#[test]
fn clients_and_runners_use_the_first_dispatcher_they_can_reach() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let urls = format!("{},{}", dead_url(), server.url);
    let _runner = spawn_runner(&urls, "r1", &tmp.path().join("work"), &[], &[]);
    wait_attached(&server.url, &[], "r1");

    let (repo, commit) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: say\n    run: echo via-the-list\n",
    );
    let out = cli_at(
        &urls,
        &["--json"],
        &["submit", "--repo", repo.path_str(), "--commit", &commit],
    );
    out.expect_code(0);
    let id = id_of(&out.json());
    let build = server.wait_final(id, LONG);
    assert_eq!(build["state"], "passed", "{build}");
    let logs = cli_at(&urls, &[], &["logs", &id.to_string()]);
    assert!(logs.out().contains("via-the-list"), "{logs}");

    // A list with an empty entry is a usage error before anything is called.
    let bad = cli_at(&format!("{},,{}", server.url, server.url), &[], &["builds"]);
    bad.expect_code(2);
    assert!(bad.err().contains("empty entry"), "{bad}");
    // None reachable: the error names the last one tried.
    let dead = dead_url();
    let none = cli_at(&format!("{},{dead}", dead_url()), &[], &["builds"]);
    assert_ne!(none.code(), 0, "{none}");
    assert!(none.err().contains(&dead), "{none}");
}

#[test]
fn a_runner_moves_to_the_next_dispatcher_when_its_own_goes_away() {
    let tmp = tempdir();
    let mut a = Server::start(&tmp.path().join("a"), &[]);
    let b = Server::start(&tmp.path().join("b"), &[]);
    let urls = format!("{},{}", a.url, b.url);
    let _runner = spawn_runner(&urls, "mover", &tmp.path().join("work"), &[], &[]);
    wait_attached(&a.url, &[], "mover");
    a.proc.kill_all();
    // Waits on B's own view (its runner list), with a deadline: the runner reconnects with a
    // backoff of at most 2 s and reaches B on its first try after A is gone.
    wait_attached(&b.url, &[], "mover");

    let (repo, commit) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: say\n    run: echo on-b\n",
    );
    let id = id_of(&b.submit(&repo.path, &commit));
    let build = b.wait_final(id, Duration::from_secs(60));
    assert_eq!(build["state"], "passed", "{build}");
}

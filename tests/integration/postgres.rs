//! `kiln serve --database postgres://...`: the farm's state in a real PostgreSQL (a throwaway
//! cluster of this test process, `kiln-pgtest`, a database per test).

use kiln_testkit::*;

/// A dispatcher on PostgreSQL runs a build to success with a runner; the state is in the
/// database, not in a SQLite file; a second dispatcher process on the same database (its own
/// data dir) sees the build, and so does the first one restarted.
#[test]
fn a_build_runs_to_success_with_the_state_in_postgres() {
    let tmp = tempdir();
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: hello\n    run: printf 'hello-%s\\n' postgres\n",
    );
    let data = tmp.path().join("data");
    let server = Server::start(
        &data,
        &["--database", &url, "--heartbeat-interval", "500ms"],
    );
    let _runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(std::path::Path::new(repo.path_str()), &sha));
    let done = server.wait_final(id, LONG);
    assert_eq!(done["state"], "passed", "{done}");
    let logs = server.cli(&["logs", &id.to_string()]);
    logs.expect_code(0);
    assert!(contains(&logs.stdout, b"hello-postgres\n"), "{logs}");
    assert!(
        !data.join("kiln.db").exists(),
        "a SQLite file was made beside a PostgreSQL database"
    );

    // Another dispatcher process on the same database sees the build as it ended.
    let second = Server::start(&tmp.path().join("data2"), &["--database", &url]);
    let seen = second.show(id);
    assert_eq!(seen["state"], "passed", "{seen}");
    assert_eq!(seen["commit"], sha.as_str());
    drop(second);

    // The first one restarted on the same database and data dir: the build and its log.
    drop(server);
    let server = Server::start(&data, &["--database", &url]);
    assert_eq!(server.show(id)["state"], "passed");
    let logs = server.cli(&["logs", &id.to_string()]);
    logs.expect_code(0);
    assert!(contains(&logs.stdout, b"hello-postgres\n"), "{logs}");
}

/// Job output is in the database: a second dispatcher process on it (its own data dir, no
/// runner) reads a build's log while the build runs on the first one, the same bytes as the
/// first one; after the end, the whole log (more than a MiB, so several checkpoints), byte
/// for byte; and still after the first one is gone. Neither data dir holds a log file.
#[test]
fn a_second_dispatcher_reads_the_log_while_it_is_written_and_after() {
    let tmp = tempdir();
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: first\n    run: |\n      seq 1 3000 | sed 's/^/early-line-/'\n      \
         printf 'to-%s\\n' stderr >&2\n      printf 'waiting-%s\\n' now\n      {}\n      \
         printf 'late-%s\\n' line\n  - name: second\n    run: seq 1 150000 | sed 's/^/tail-/'\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let (data, data2) = (tmp.path().join("data"), tmp.path().join("data2"));
    let server = Server::start(&data, &["--database", &url]);
    let second = Server::start(&data2, &["--database", &url]);
    let runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(std::path::Path::new(repo.path_str()), &sha));
    // `kiln logs` exits 8 while the build runs, 0 once it passed.
    let logs_of = |s: &Server, code: i32| {
        let out = s.cli(&["logs", &id.to_string()]);
        out.expect_code(code);
        out.stdout
    };

    // While the step waits for the flag: the second dispatcher has the output so far.
    let live = wait_for(
        "the second dispatcher to show the output so far",
        LONG,
        || {
            let out = logs_of(&second, 8);
            // Both pipes' last lines (stderr may come after stdout's).
            if contains(&out, b"waiting-now\n") && contains(&out, b"to-stderr\n") {
                Ok(out)
            } else {
                Err(String::from_utf8_lossy(&out).into_owned())
            }
        },
    );
    assert_eq!(server.show(id)["state"], "running");
    assert!(contains(&live, b"early-line-3000\n"));
    assert!(!contains(&live, b"late-line"));
    assert!(
        logs_of(&server, 8) == live,
        "the two dispatchers show different output of the running build"
    );

    std::fs::write(&flag, b"").unwrap();
    let done = server.wait_final(id, LONG);
    assert_eq!(done["state"], "passed", "{done}");
    let whole = logs_of(&server, 0);
    assert!(whole.len() > 1 << 20, "{} bytes", whole.len());
    assert!(contains(&whole, b"late-line\n") && contains(&whole, b"tail-150000\n"));
    assert!(whole.starts_with(&live[..find(&live, b"waiting-now").unwrap()]));
    assert!(
        logs_of(&second, 0) == whole,
        "the second dispatcher shows other output of the ended build"
    );
    for dir in [&data, &data2] {
        assert!(!dir.join("logs").exists(), "log files in {}", dir.display());
    }

    // The dispatcher that wrote it is gone: the log is still whole on the other one.
    drop(runner);
    drop(server);
    assert!(logs_of(&second, 0) == whole);
}

/// A database that cannot be reached is an error at start naming the database, never a
/// silent fallback to SQLite.
#[test]
fn an_unreachable_database_fails_the_start() {
    let tmp = tempdir();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgres://kiln:secret-password@127.0.0.1:{port}/kiln");
    let data = tmp.path().join("data");
    let out = kiln(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--database",
        &url,
    ]);
    assert_ne!(out.code(), 0, "{out}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the database"), "{out}");
    assert!(
        !err.contains("secret-password"),
        "the password was printed: {out}"
    );
    assert!(!data.join("kiln.db").exists());
    // A value that is no URL at all: a usage error that does not repeat it.
    let out = kiln(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().unwrap(),
        "--database",
        "postgres://kiln:secret-password@host:noport/kiln",
    ]);
    assert_ne!(out.code(), 0, "{out}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a PostgreSQL URL"), "{out}");
    assert!(
        !err.contains("secret-password"),
        "the password was printed: {out}"
    );
}

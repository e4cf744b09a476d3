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

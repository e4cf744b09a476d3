//! Bad input is refused with the right gRPC status and a message naming the problem; nothing
//! is stored; the dispatcher keeps serving. Through the API (generated clients), the CLI
//! (exit codes) and a pipeline file with a typo.

use std::time::Duration;

use kiln::proto::{self, runner_message::Kind};
use kiln_testkit::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

fn req(repo: &str, commit: &str) -> proto::SubmitBuildRequest {
    proto::SubmitBuildRequest {
        repo: repo.to_string(),
        commit: commit.to_string(),
        branch: String::new(),
        trigger: "test".to_string(),
        env: Default::default(),
    }
}

/// Asserts `r` failed with `code` and a message containing every word of `words`; then that
/// nothing was stored and that the dispatcher still answers.
#[track_caller]
fn refused(
    api: &Api,
    builds_before: usize,
    what: &str,
    r: Result<proto::Build, tonic::Status>,
    code: Code,
    words: &[&str],
) {
    let status = match r {
        Ok(b) => panic!("{what}: accepted as build {} ({b:?})", b.id),
        Err(s) => s,
    };
    assert_eq!(status.code(), code, "{what}: {status:?}");
    for w in words {
        assert!(
            status.message().contains(w),
            "{what}: the message does not name {w:?}: {:?}",
            status.message()
        );
    }
    assert_eq!(
        api.list_builds().len(),
        builds_before,
        "{what}: something was stored"
    );
    assert!(api.healthy(), "{what}: the dispatcher stopped serving");
}

#[test]
fn submit_build_refuses_bad_requests() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: ok\n    run: echo ok\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let r = repo.path_str();

    // One good build first, so "nothing stored" means "still exactly one".
    let good = api.submit(req(r, &sha)).unwrap();
    assert_eq!(good.commit, sha);
    let n = api.list_builds().len();
    assert_eq!(n, 1);

    refused(
        &api,
        n,
        "revision that names nothing",
        api.submit(req(r, "not-a-commit!")),
        Code::NotFound,
        &["revision", "not-a-commit!", "not found"],
    );
    refused(
        &api,
        n,
        "short hex that names nothing",
        api.submit(req(r, "abc12")),
        Code::NotFound,
        &["revision", "abc12"],
    );
    refused(
        &api,
        n,
        "malformed revision",
        api.submit(req(r, "main branch")),
        Code::InvalidArgument,
        &["revision", "whitespace"],
    );
    refused(
        &api,
        n,
        "41-digit commit",
        api.submit(req(r, &format!("{sha}0"))),
        Code::InvalidArgument,
        &["commit"],
    );
    refused(
        &api,
        n,
        "missing repository",
        api.submit(req("/nonexistent/kiln-test-repo", &sha)),
        Code::NotFound,
        &["/nonexistent/kiln-test-repo"],
    );
    let not_a_repo = tmp.path().join("plain-dir");
    std::fs::create_dir_all(&not_a_repo).unwrap();
    let not_a_repo = not_a_repo.to_str().unwrap();
    refused(
        &api,
        n,
        "directory that is not a repository",
        api.submit(req(not_a_repo, &sha)),
        Code::NotFound,
        &[not_a_repo],
    );
    refused(
        &api,
        n,
        "empty repo",
        api.submit(req("", &sha)),
        Code::InvalidArgument,
        &["repo"],
    );
    refused(
        &api,
        n,
        "blank repo",
        api.submit(req("   ", &sha)),
        Code::InvalidArgument,
        &["repo"],
    );
    refused(
        &api,
        n,
        "relative repo",
        api.submit(req("some/relative/path", &sha)),
        Code::InvalidArgument,
        &["repo", "absolute"],
    );
    refused(
        &api,
        n,
        "empty commit",
        api.submit(req(r, "")),
        Code::InvalidArgument,
        &["commit"],
    );
    let absent = "0123456789abcdef0123456789abcdef01234567";
    refused(
        &api,
        n,
        "commit not in the repository",
        api.submit(req(r, absent)),
        Code::NotFound,
        &[absent],
    );
    refused(
        &api,
        n,
        "bad branch",
        api.submit(proto::SubmitBuildRequest {
            branch: "a b".into(),
            ..req(r, &sha)
        }),
        Code::InvalidArgument,
        &["branch"],
    );
    refused(
        &api,
        n,
        "long branch",
        api.submit(proto::SubmitBuildRequest {
            branch: "b".repeat(300),
            ..req(r, &sha)
        }),
        Code::InvalidArgument,
        &["branch"],
    );

    // Over the 1 MiB request limit: a 2 MiB branch is refused by the transport. What kiln does
    // is OUT_OF_RANGE (tonic's decoder limit); it must not be OK and not INTERNAL.
    let big = api.submit(proto::SubmitBuildRequest {
        branch: "x".repeat(2 << 20),
        ..req(r, &sha)
    });
    let status = big
        .as_ref()
        .err()
        .cloned()
        .expect("a 2 MiB request was accepted");
    assert_ne!(status.code(), Code::Internal, "{status:?}");
    assert!(
        matches!(
            status.code(),
            Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
        ),
        "{status:?}"
    );
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("too large"), "{status:?}");
    refused(&api, n, "2 MiB branch", big, status.code(), &[]);

    // Other calls with bad arguments.
    let mut c = api.builds();
    let s = api
        .rt
        .block_on(c.get_build(proto::GetBuildRequest { build_id: 0 }))
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("build_id"), "{s:?}");
    let s = api
        .rt
        .block_on(c.get_build(proto::GetBuildRequest { build_id: 999 }))
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    assert!(s.message().contains("999"), "{s:?}");
    let s = api
        .rt
        .block_on(c.list_builds(proto::ListBuildsRequest {
            page_size: 501,
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("page_size"), "{s:?}");
    let s = api
        .rt
        .block_on(c.list_builds(proto::ListBuildsRequest {
            page_token: "garbage".into(),
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("page_token"), "{s:?}");
    let s = api
        .rt
        .block_on(c.cancel_build(proto::CancelBuildRequest { build_id: 999 }))
        .unwrap_err();
    assert_eq!(s.code(), Code::NotFound, "{s:?}");
    let s = api
        .rt
        .block_on(async {
            let mut st = c
                .stream_logs(proto::StreamLogsRequest {
                    job_id: 0,
                    build_id: 0,
                    offset: 0,
                    follow: false,
                })
                .await?
                .into_inner();
            st.message().await
        })
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    let job = good.jobs[0].id;
    let s = api
        .rt
        .block_on(async {
            let mut st = c
                .stream_logs(proto::StreamLogsRequest {
                    job_id: job,
                    build_id: 0,
                    offset: 1 << 40,
                    follow: false,
                })
                .await?
                .into_inner();
            st.message().await
        })
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("offset"), "{s:?}");

    assert_eq!(api.list_builds().len(), n);
    // Still serving: a good request still works.
    let next = repo.new_commit("next");
    let again = api.submit(req(r, &next[..10])).unwrap();
    assert_eq!(again.commit, next);
    assert_eq!(api.list_builds().len(), n + 1);
}

/// Opens a runner stream, sends `first`, and returns the status the dispatcher ends it with.
fn attach_status(api: &Api, first: proto::RunnerMessage) -> tonic::Status {
    let mut client = api.runner_service();
    api.rt.block_on(async {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(first).await.unwrap();
        let resp = match client.attach(ReceiverStream::new(rx)).await {
            Err(s) => return s,
            Ok(r) => r,
        };
        let mut stream = resp.into_inner();
        let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
            .await
            .expect("the dispatcher neither answered nor closed the stream");
        drop(tx);
        match r {
            Err(s) => s,
            Ok(m) => panic!("expected the stream to end with an error, got {m:?}"),
        }
    })
}

fn hello(name: &str, slots: u32) -> proto::RunnerMessage {
    proto::RunnerMessage {
        kind: Some(Kind::Hello(proto::Hello {
            name: name.into(),
            slots,
            version: "test".into(),
            ..Default::default()
        })),
    }
}

#[test]
fn runner_stream_refuses_bad_handshakes() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);

    let s = attach_status(
        &api,
        proto::RunnerMessage {
            kind: Some(Kind::Heartbeat(proto::Heartbeat {
                running_attempts: vec![],
                sent_at_ms: 1,
                draining: false,
                lists_held: false,
            })),
        },
    );
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("hello"), "{s:?}");

    let s = attach_status(&api, proto::RunnerMessage { kind: None });
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");

    let s = attach_status(&api, hello("zero-slots", 0));
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("slots"), "{s:?}");

    let s = attach_status(&api, hello("", 1));
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("name"), "{s:?}");

    let s = attach_status(&api, hello("   ", 1));
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("name"), "{s:?}");

    let s = attach_status(&api, hello("has space", 1));
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("name"), "{s:?}");

    // None of them was registered, and the dispatcher still serves.
    assert!(api.list_runners().is_empty(), "{:?}", api.list_runners());
    assert!(api.healthy());

    // A real runner still attaches; a `kiln runner` with a bad name stops with an error.
    let mut bad = server.runner(tmp.path(), "bad name", &[]);
    let out = bad.wait(LONG);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.err().contains("name"), "{out}");
    let _good = server.runner(tmp.path(), "good", &[]);
    server.wait_runners_attached(&["good"]);
    let names: Vec<String> = api.list_runners().into_iter().map(|r| r.name).collect();
    assert_eq!(names, vec!["good".to_string()]);
}

#[test]
fn cli_exit_codes_for_bad_submits() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: ok\n    run: echo ok\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let r = repo.path_str();

    let out = server.cli(&["submit", "--repo", r, "--commit", "zzzzzzz"]);
    out.expect_code(4);
    assert!(out.err().contains("revision zzzzzzz not found"), "{out}");
    let out = server.cli(&["submit", "--repo", r, "--commit", "two words"]);
    out.expect_code(5);
    assert!(out.err().contains("invalid revision"), "{out}");
    let out = server.cli(&[
        "submit",
        "--repo",
        "/nonexistent/kiln-test-repo",
        "--commit",
        &sha,
    ]);
    out.expect_code(4);
    assert!(out.err().contains("/nonexistent/kiln-test-repo"), "{out}");
    let out = server.cli(&[
        "submit",
        "--repo",
        r,
        "--commit",
        "0123456789abcdef0123456789abcdef01234567",
    ]);
    out.expect_code(4);
    assert!(
        out.err()
            .contains("0123456789abcdef0123456789abcdef01234567"),
        "{out}"
    );
    let out = server.cli(&[
        "submit",
        "--repo",
        r,
        "--commit",
        &sha,
        "--branch",
        "bad branch",
    ]);
    out.expect_code(5);
    assert!(out.err().contains("branch"), "{out}");
    server.cli(&["show", "999"]).expect_code(4);
    server.cli(&["logs", "999"]).expect_code(4);
    server.cli(&["cancel", "999"]).expect_code(4);
    server.cli(&["logs", "not-a-number"]).expect_code(2);
    server.cli(&["submit", "--repo", r]).expect_code(0);
    // Nothing but the last (valid) one was stored.
    let out = server.cli(&["--json", "builds"]);
    assert_eq!(out.json()["builds"].as_array().unwrap().len(), 1, "{out}");

    // Unreachable dispatcher: 6.
    let out = kiln(&["--dispatcher", "http://127.0.0.1:1", "builds"]);
    out.expect_code(6);
}

/// A pipeline file with a typo makes a build that ends `errored` at once, with the file, line
/// and column of the typo, and no job: no runner is ever used.
#[test]
fn pipeline_typo_errors_the_build_without_a_runner() {
    let tmp = tempdir();
    let (repo, typo_sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: build\n    rn: echo hi\n",
    );
    let good_sha = repo.commit(
        &[(
            ".kiln.yml",
            b"steps:\n  - name: build\n    run: echo fixed\n",
        )],
        "fix",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);

    let b = server.submit(&repo.path, &typo_sha);
    let id = id_of(&b);
    assert_eq!(b["state"], "errored", "{b}");
    let err = b["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {b}"));
    assert!(err.contains(".kiln.yml:3:5"), "{err}");
    assert!(err.contains("rn"), "{err}");
    assert_eq!(b["jobs"].as_array().unwrap().len(), 0, "{b}");

    let shown = server.show(id);
    assert_eq!(shown["state"], "errored", "{shown}");
    assert_eq!(shown["error"], err, "{shown}");
    assert!(shown["jobs"].as_array().unwrap().is_empty(), "{shown}");
    server.cli(&["show", &id.to_string()]).expect_code(3);
    let out = server.cli(&["logs", "-f", &id.to_string()]);
    out.expect_code(3);
    assert!(out.err().contains(".kiln.yml:3:5"), "{out}");
    // StreamLogs by build id: FAILED_PRECONDITION, naming the reason.
    let api = Api::connect(&server.url);
    let mut c = api.builds();
    let s = api
        .rt
        .block_on(async {
            let mut st = c
                .stream_logs(proto::StreamLogsRequest {
                    job_id: 0,
                    build_id: id,
                    offset: 0,
                    follow: true,
                })
                .await?
                .into_inner();
            st.message().await
        })
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains(".kiln.yml:3:5"), "{s:?}");

    // The runner was never given anything: a fixed commit is the first job it runs.
    let fixed = id_of(&server.submit(&repo.path, &good_sha));
    let b = server.wait_final(fixed, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let logs = server.cli(&["logs", &fixed.to_string()]);
    assert!(logs.out().contains("attempt 1 on r1"), "{logs}");
    let runners = api.list_runners();
    assert_eq!(runners.len(), 1);
    assert!(runners[0].running_jobs.is_empty());
    // Job ids are global: the fixed build's job being the first ever made proves the typo
    // build never had one.
    assert_eq!(b["jobs"][0]["id"], 1, "{b}");
    drop(runner);
    // Retrying the errored build reads the pipeline again: still errored, no job.
    let out = server.cli(&["--json", "retry", &id.to_string()]);
    out.expect_code(0);
    let retry = out.json();
    assert_eq!(retry["state"], "errored", "{retry}");
    assert!(
        retry["error"].as_str().unwrap().contains(".kiln.yml:3:5"),
        "{retry}"
    );
    assert!(
        server.show(id_of(&retry))["jobs"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

/// Retrying a build whose pipeline could not be read makes a new build that records which
/// build it retries, like any other retry.
#[test]
fn retry_of_an_errored_build_is_recorded() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: build\n    rn: echo hi\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let out = server.cli(&["--json", "retry", &id.to_string()]);
    out.expect_code(0);
    let retry = out.json();
    assert_eq!(retry["retry_of"], id, "{retry}");
    let stored = server.show(id_of(&retry));
    assert_eq!(
        stored["retry_of"], id,
        "the stored retry does not say what it retries: {stored}"
    );
    let listed = server.cli(&["--json", "builds"]).json();
    assert_eq!(listed["builds"][0]["retry_of"], id, "{listed}");
}

/// The same commit with the same pipeline is built once: submitting it again is
/// ALREADY_EXISTS naming the existing build (CLI exit 10), nothing is stored, and `retry` is
/// the way to build it again.
#[test]
fn duplicate_submit_is_already_exists() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: ok\n    run: echo ok\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let r = repo.path_str();
    let first = api.submit(req(r, &sha)).unwrap();
    let n = api.list_builds().len();
    let build = format!("build {}", first.id);
    refused(
        &api,
        n,
        "same commit again",
        api.submit(req(r, &sha)),
        Code::AlreadyExists,
        &[&build],
    );
    refused(
        &api,
        n,
        "same commit, abbreviated",
        api.submit(req(r, &sha[..8])),
        Code::AlreadyExists,
        &[&build],
    );
    refused(
        &api,
        n,
        "same commit, upper case",
        api.submit(req(r, &sha.to_ascii_uppercase())),
        Code::AlreadyExists,
        &[&build],
    );
    let out = server.cli(&["submit", "--repo", r, "--commit", &sha]);
    out.expect_code(10);
    assert!(out.err().contains(&build), "{out}");
    assert_eq!(api.list_builds().len(), n);
    // A new commit is a new build; cancelling and retrying the first builds it again.
    let next = repo.new_commit("next");
    api.submit(req(r, &next)).unwrap();
    server
        .cli(&["cancel", &first.id.to_string()])
        .expect_code(0);
    let out = server.cli(&["--json", "retry", &first.id.to_string()]);
    out.expect_code(0);
    assert_eq!(out.json()["commit"], sha.as_str());
    assert_eq!(api.list_builds().len(), n + 2);
}

/// The long flags (`--name`) a help text lists.
fn listed_flags(help: &str) -> Vec<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split(|c: char| c.is_whitespace() || c == ',')
                .take_while(|w| w.is_empty() || w.starts_with('-') || w.starts_with('<'))
                .filter(|w| w.starts_with("--"))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Each command lists (and takes) only the flags it uses: the dispatcher and runners no
/// client `--json`, the dispatcher no `--dispatcher`/`--token`; the client options before the
/// command are still accepted where they apply.
#[test]
fn each_command_lists_only_the_flags_it_uses() {
    let client = [
        "--dispatcher",
        "--token",
        "--tls-ca",
        "--tls-cert",
        "--tls-key",
    ];
    let help = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push("--help");
        let out = kiln(&all);
        out.expect_code(0);
        listed_flags(&out.out())
    };
    for cmd in [
        &["serve"][..],
        &["demo"],
        &["up"],
        &["admin", "runner-token", "create"],
        &["completions"],
        &["man"],
    ] {
        let flags = help(cmd);
        for f in client.iter().chain(&["--json"]) {
            assert!(
                !flags.iter().any(|x| x == f),
                "kiln {cmd:?} lists {f}: {flags:?}"
            );
        }
    }
    let runner = help(&["runner"]);
    for f in client {
        assert!(
            runner.iter().any(|x| x == f),
            "kiln runner lacks {f}: {runner:?}"
        );
    }
    assert!(!runner.iter().any(|x| x == "--json"), "{runner:?}");
    for cmd in [
        &["submit"][..],
        &["builds"],
        &["show"],
        &["tests"],
        &["cancel"],
        &["retry"],
        &["runners"],
    ] {
        let flags = help(cmd);
        for f in client.iter().chain(&["--json"]) {
            assert!(
                flags.iter().any(|x| x == f),
                "kiln {cmd:?} lacks {f}: {flags:?}"
            );
        }
    }
    for cmd in [&["logs"][..], &["watch"], &["runners", "drain"]] {
        let flags = help(cmd);
        assert!(
            flags.iter().any(|x| x == "--dispatcher"),
            "{cmd:?}: {flags:?}"
        );
        assert!(!flags.iter().any(|x| x == "--json"), "{cmd:?}: {flags:?}");
    }
    // Refused where they mean nothing, before or after the command.
    kiln(&["serve", "--json"]).expect_code(2);
    kiln(&["serve", "--dispatcher", "http://127.0.0.1:1"]).expect_code(2);
    let out = kiln(&["--json", "serve"]);
    out.expect_code(2);
    assert!(out.err().contains("kiln serve takes none of"), "{out}");
    kiln(&["runner", "--json"]).expect_code(2);
    // Before or after the command, a client option means the same.
    for args in [
        &["--dispatcher", "http://127.0.0.1:1", "show", "1"][..],
        &["show", "1", "--dispatcher", "http://127.0.0.1:1"],
    ] {
        let out = kiln(args);
        out.expect_code(6);
        assert!(out.err().contains("127.0.0.1:1"), "{out}");
    }
}

/// `kiln completions bash|zsh|fish` prints a completion script the shell takes; `kiln man`
/// prints the man page, `kiln man --dir D` writes one page per command.
#[test]
fn completions_and_man_pages() {
    let bash = kiln(&["completions", "bash"]);
    bash.expect_code(0);
    assert!(bash.out().contains("--separate-stderr"), "{bash}");
    let tmp = tempdir();
    let script = tmp.path().join("kiln.bash");
    std::fs::write(&script, &bash.stdout).unwrap();
    let loaded = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("source '{}' && complete -p kiln", script.display()))
        .output()
        .unwrap();
    assert!(
        loaded.status.success() && String::from_utf8_lossy(&loaded.stdout).contains("_kiln"),
        "{loaded:?}"
    );
    let zsh = kiln(&["completions", "zsh"]);
    zsh.expect_code(0);
    assert!(zsh.out().starts_with("#compdef kiln"), "{zsh}");
    let fish = kiln(&["completions", "fish"]);
    fish.expect_code(0);
    assert!(fish.out().contains("complete -c kiln"), "{fish}");
    kiln(&["completions", "tcsh-or-so"]).expect_code(2);

    let page = kiln(&["man"]);
    page.expect_code(0);
    assert!(page.out().contains(".TH kiln 1"), "{page}");
    assert!(page.out().contains("submit"), "{page}");
    let dir = tmp.path().join("man1");
    kiln(&["man", "--dir", dir.to_str().unwrap()]).expect_code(0);
    for name in [
        "kiln.1",
        "kiln-serve.1",
        "kiln-logs.1",
        "kiln-runners-drain.1",
    ] {
        assert!(dir.join(name).is_file(), "{name} missing in {dir:?}");
    }
    let logs = std::fs::read_to_string(dir.join("kiln-logs.1")).unwrap();
    assert!(logs.contains("separate\\-stderr"), "{logs}");
    // A directory that cannot be made: a clear error, exit 2.
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let out = kiln(&["man", "--dir", file.join("sub").to_str().unwrap()]);
    out.expect_code(2);
    assert!(out.err().contains("cannot create"), "{out}");
}

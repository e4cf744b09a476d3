//! Secrets are masked in job output; API and runner tokens are enforced.

use kiln::proto;
use kiln_testkit::*;
use tonic::Code;

const SECRET: &str = "s3cr3t-Value-42";

/// Runs `pipeline` (which uses `$DEPLOY_TOKEN`) with [`SECRET`] in a secrets file; returns
/// (stdout bytes, stderr bytes, all log bytes) from `StreamLogs` and the follower's output.
fn run_with_secret(pipeline: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>, Out) {
    let tmp = tempdir();
    let secrets = tmp.path().join("secrets.yml");
    std::fs::write(&secrets, format!("DEPLOY_TOKEN: {SECRET}\n")).unwrap();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), pipeline);
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--heartbeat-interval",
            "500ms",
            "--secrets-file",
            secrets.to_str().unwrap(),
        ],
    );
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let followed = follower.wait(LONG);
    followed.expect_code(0);
    let shown = server.cli(&["--json", "show", &id.to_string()]);
    assert!(!shown.out().contains(SECRET), "{shown}");

    let api = Api::connect(&server.url);
    let chunks = api.logs(b["jobs"][0]["id"].as_u64().unwrap());
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.data.iter().copied()).collect();
    let stdout = stream_bytes(&chunks, proto::OutputStream::Stdout);
    let stderr = stream_bytes(&chunks, proto::OutputStream::Stderr);
    assert!(
        contains(&stdout, b"length-ok\n"),
        "the step did not get the secret: {:?}",
        String::from_utf8_lossy(&stdout)
    );
    (stdout, stderr, all, followed)
}

fn assert_no_fragment(all: &[u8], followed: &Out) {
    for part in [SECRET, "s3cr3t", "-Value-42"] {
        assert!(
            !contains(all, part.as_bytes()),
            "{part:?} leaked: {:?}",
            String::from_utf8_lossy(all)
        );
        assert!(
            !contains(&followed.stdout, part.as_bytes()),
            "{part:?} leaked to the follower: {followed}"
        );
        assert!(
            !contains(&followed.stderr, part.as_bytes()),
            "{part:?} leaked to the follower: {followed}"
        );
    }
}

/// A secret given with `--secrets-file` reaches the step as an environment variable and is
/// masked in the stored and streamed log, on stdout and stderr.
#[test]
fn secrets_are_masked_in_output() {
    let pipeline = "steps:\n  - name: leak\n    run: |\n      echo \"whole=$DEPLOY_TOKEN.\"\n      echo \"err=$DEPLOY_TOKEN.\" >&2\n      echo \"twice=$DEPLOY_TOKEN$DEPLOY_TOKEN.\"\n      [ ${#DEPLOY_TOKEN} -eq 15 ] && echo length-ok\n";
    let (stdout, stderr, all, followed) = run_with_secret(pipeline);
    assert_no_fragment(&all, &followed);
    assert!(
        contains(&stdout, b"whole=***.\n"),
        "{:?}",
        String::from_utf8_lossy(&stdout)
    );
    assert!(
        contains(&stdout, b"twice=***.\n"),
        "{:?}",
        String::from_utf8_lossy(&stdout)
    );
    assert!(
        contains(&stderr, b"err=***.\n"),
        "{:?}",
        String::from_utf8_lossy(&stderr)
    );
}

/// A secret written in two pieces with a pause between them is masked whole: no fragment of
/// it reaches the log (the masker's own guarantee).
#[test]
fn secret_printed_in_pieces_is_masked() {
    // The pause only makes two separate reads likely; the assertion holds whatever the timing.
    let pipeline = "steps:\n  - name: leak\n    run: |\n      printf 'split=%s' \"$(printf %s \"$DEPLOY_TOKEN\" | cut -c1-6)\"\n      sleep 0.3\n      printf '%s.\\n' \"$(printf %s \"$DEPLOY_TOKEN\" | cut -c7-)\"\n      [ ${#DEPLOY_TOKEN} -eq 15 ] && echo length-ok\n";
    let (stdout, _stderr, all, followed) = run_with_secret(pipeline);
    assert_no_fragment(&all, &followed);
    assert!(
        contains(&stdout, b"split=***.\n"),
        "{:?}",
        String::from_utf8_lossy(&stdout)
    );
}

/// With `--api-token`, writes need the token; reads stay open unless `--closed-reads`.
#[test]
fn api_token_guards_writes_and_closed_reads() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let r = repo.path_str();
    let server = Server::start(&tmp.path().join("data"), &["--api-token", "api-secret"]);

    let out = server.cli(&["submit", "--repo", r, "--commit", &sha]);
    out.expect_code(9);
    assert!(out.err().contains("token"), "{out}");
    server
        .cli(&["--token", "wrong", "submit", "--repo", r, "--commit", &sha])
        .expect_code(9);
    server.cli(&["builds"]).expect_code(0);
    let out = server.cli(&["--json", "builds"]);
    assert!(
        out.json()["builds"].as_array().unwrap().is_empty(),
        "refused submits were stored: {out}"
    );
    let out = server.cli(&[
        "--token",
        "api-secret",
        "--json",
        "submit",
        "--repo",
        r,
        "--commit",
        &sha,
    ]);
    out.expect_code(0);
    let id = id_of(&out.json()).to_string();
    server.cli(&["show", &id]).expect_code(8);
    server.cli(&["cancel", &id]).expect_code(9);
    server.cli(&["runners", "drain", "x"]).expect_code(9);
    assert_eq!(server.show(id.parse().unwrap())["state"], "queued");
    server
        .cli(&["--token", "api-secret", "cancel", &id])
        .expect_code(0);
    server.cli(&["retry", &id]).expect_code(9);
    // The token also comes from KILN_TOKEN.
    let mut cmd = std::process::Command::new(kiln_bin());
    cmd.args(["--dispatcher", &server.url, "retry", &id])
        .env("KILN_TOKEN", "api-secret");
    Proc::spawn("kiln retry (KILN_TOKEN)", cmd)
        .wait(LONG)
        .expect_code(0);

    // Closed reads.
    drop(server);
    let server = Server::start(
        &tmp.path().join("data2"),
        &["--api-token", "api-secret", "--closed-reads"],
    );
    server.cli(&["builds"]).expect_code(9);
    server.cli(&["runners"]).expect_code(9);
    server
        .cli(&["--token", "api-secret", "builds"])
        .expect_code(0);
    let api = Api::connect(&server.url);
    let mut c = api.builds();
    let s = api
        .rt
        .block_on(c.get_build(proto::GetBuildRequest { build_id: 1 }))
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = api
        .rt
        .block_on(c.stream_logs(proto::StreamLogsRequest {
            job_id: 1,
            build_id: 0,
            offset: 0,
            follow: false,
        }))
        .expect_err("StreamLogs without the token");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    let s = api
        .rt
        .block_on(c.watch_builds(proto::WatchBuildsRequest { build_id: 0 }))
        .expect_err("WatchBuilds without the token");
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    // The JUnit download follows the same rule: 401 without the token, 403 with a wrong one,
    // and with it, the request reaches the build (none here: 404).
    let url = format!("{}/builds/1/junit.xml", server.url);
    let curl = |extra: &[&str]| {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(extra)
            .arg(&url)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(curl(&[]), "401");
    assert_eq!(curl(&["-H", "Authorization: Bearer wrong"]), "403");
    assert_eq!(curl(&["-H", "Authorization: Bearer api-secret"]), "404");
    // Health stays open (load balancers probe it).
    assert!(api.healthy());
}

/// With `--runner-token`, a runner without the token is refused and stops with an error; one
/// with it attaches and runs builds. Per-runner tokens from `kiln admin runner-token`.
#[test]
fn runner_tokens_are_enforced() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let data = tmp.path().join("data");
    // A per-runner token, made on the data dir before the dispatcher starts.
    let out = kiln(&[
        "admin",
        "runner-token",
        "create",
        "special",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    out.expect_code(0);
    let special_token = out.out().trim().to_string();
    assert!(special_token.starts_with("kiln_"), "{out}");

    let server = Server::start(
        &data,
        &[
            "--runner-token",
            "shared-runner-secret",
            "--heartbeat-interval",
            "500ms",
        ],
    );
    let mut anon = server.runner(tmp.path(), "anon", &[]);
    let out = anon.wait(LONG);
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(out.err().contains("token"), "{out}");

    let work = tmp.path().join("work-bad");
    let mut bad = server.spawn_cli(
        "kiln runner (wrong token)",
        &[
            "--token",
            "nope",
            "runner",
            "--name",
            "bad",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    let out = bad.wait(LONG);
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(out.err().contains("not valid"), "{out}");
    // `special` has its own token: the shared one is not enough for it.
    let work = tmp.path().join("work-special-shared");
    let mut wrong = server.spawn_cli(
        "kiln runner special (shared token)",
        &[
            "--token",
            "shared-runner-secret",
            "runner",
            "--name",
            "special",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    assert_ne!(wrong.wait(LONG).status.code(), Some(0));

    let api = Api::connect(&server.url);
    assert!(
        api.list_runners().is_empty(),
        "refused runners were registered: {:?}",
        api.list_runners()
    );

    let work = tmp.path().join("work-good");
    let _good = server.spawn_cli(
        "kiln runner good",
        &[
            "--token",
            "shared-runner-secret",
            "runner",
            "--name",
            "good",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    let work = tmp.path().join("work-special");
    let _special = server.spawn_cli(
        "kiln runner special",
        &[
            "--token",
            &special_token,
            "runner",
            "--name",
            "special",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    server.wait_runners_attached(&["good", "special"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");
}

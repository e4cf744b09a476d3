//! Builds with parameters (environment overrides), end to end: a real `kiln serve` (with a
//! secrets file) and runner, a `jobs:` pipeline whose file, job and step `env` the parameters
//! must win over in every job, submitted with `kiln submit --env`.
//!
//! - Every step of every job sees the parameters over the pipeline's `env`; what they do not
//!   name keeps the pipeline's value; `kiln show` (text and JSON) and GetBuild show them.
//! - `kiln retry` carries them (the retry's log shows them again).
//! - The same commit with the same parameters is refused as already built (ALREADY_EXISTS,
//!   exit 10, naming the build); other parameters, or none, make new builds.
//! - Invalid parameters (a KILN_ name, a secret's name, NUL, too many, too long) are
//!   INVALID_ARGUMENT naming the variable and store nothing (ListBuilds' count); a malformed
//!   `--env` is a usage error before any call (against an address nothing listens on).

use std::collections::HashMap;

use kiln::proto;
use kiln_testkit::*;
use tonic::Code;

const PIPELINE: &str = r#"env:
  GREETING: from-file
  KEEP: kept
jobs:
  first:
    env:
      TARGET: from-job
    steps:
      - name: show
        env:
          GREETING: from-step
        run: echo "first greeting=$GREETING target=$TARGET keep=$KEEP extra=$EXTRA"
  second:
    depends_on: [first]
    steps:
      - name: show
        run: echo "second greeting=$GREETING target=$TARGET keep=$KEEP extra=$EXTRA"
"#;

/// `kiln --json submit --repo R --commit C --branch main --env ...`: the whole output.
fn submit(server: &Server, repo: &Repo, sha: &str, env: &[&str]) -> Out {
    let mut args = vec![
        "--json",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        sha,
        "--branch",
        "main",
    ];
    for e in env {
        args.extend(["--env", e]);
    }
    server.cli(&args)
}

/// The stored output of one job of a build.
fn log(server: &Server, build: u64, job: &str) -> String {
    let out = server.cli(&["logs", &format!("{build}/{job}")]);
    out.expect_code(0);
    out.out()
}

fn env_of(b: &serde_json::Value) -> HashMap<String, String> {
    serde_json::from_value(b["env"].clone()).unwrap()
}

#[test]
fn build_parameters_override_the_pipeline_env_in_every_job_and_survive_retry() {
    let tmp = tempdir();
    let secrets = tmp.path().join("secrets.yml");
    std::fs::write(&secrets, "DEPLOY_TOKEN: s3cret-value\n").unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--secrets-file", secrets.to_str().unwrap()],
    );
    let _runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let params = ["GREETING=from-param", "TARGET=over", "EXTRA=a b=c"];

    // Submitted with parameters: every job sees them over the file's, job's and step's env.
    let out = submit(&server, &repo, &sha, &params);
    out.expect_code(0);
    let b = out.json();
    let id = b["id"].as_u64().unwrap();
    let want: HashMap<String, String> = [
        ("GREETING", "from-param"),
        ("TARGET", "over"),
        ("EXTRA", "a b=c"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env_of(&b), want, "{b}");
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(env_of(&b), want, "kiln show --json: {b}");
    let first = log(&server, id, "first");
    assert!(
        first.contains("first greeting=from-param target=over keep=kept extra=a b=c"),
        "the parameters must win over the step's and the job's env:\n{first}"
    );
    let second = log(&server, id, "second");
    assert!(
        second.contains("second greeting=from-param target=over keep=kept extra=a b=c"),
        "the parameters must win over the file's env in every job:\n{second}"
    );
    let shown = server.cli(&["show", &id.to_string()]);
    shown.expect_code(0);
    for line in [
        "env: EXTRA=a b=c",
        "env: GREETING=from-param",
        "env: TARGET=over",
    ] {
        assert!(shown.out().contains(line), "{line:?} missing: {shown}");
    }
    let api = Api::connect(&server.url);
    let got = api.get_build(id);
    assert_eq!(got.env, want, "GetBuild: {got:?}");

    // A retry carries them.
    let retry = server.cli(&["--json", "retry", &id.to_string()]);
    retry.expect_code(0);
    let r = retry.json();
    let rid = r["id"].as_u64().unwrap();
    assert_eq!(r["retry_of"], id, "{r}");
    assert_eq!(env_of(&r), want, "{r}");
    assert_eq!(server.wait_final(rid, LONG)["state"], "passed");
    let retried = log(&server, rid, "second");
    assert!(
        retried.contains("second greeting=from-param target=over keep=kept extra=a b=c"),
        "the retry ran without its parameters:\n{retried}"
    );

    // The same parameters again (in another order): already built, answered as today.
    let builds = api.list_builds().len();
    let dup = submit(
        &server,
        &repo,
        &sha,
        &["EXTRA=a b=c", "TARGET=over", "GREETING=from-param"],
    );
    dup.expect_code(10);
    assert!(
        dup.err().contains(&format!("build {id}")),
        "the refusal names the build: {dup}"
    );
    let status = api
        .submit(proto::SubmitBuildRequest {
            repo: repo.path_str().into(),
            commit: sha.clone(),
            branch: "main".into(),
            trigger: "test".into(),
            env: want.clone(),
        })
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_eq!(
        api.list_builds().len(),
        builds,
        "a duplicate stored a build"
    );

    // Other parameters, or none, are other builds.
    let other = submit(&server, &repo, &sha, &["GREETING=other"]);
    other.expect_code(0);
    let oid = other.json()["id"].as_u64().unwrap();
    assert_eq!(server.wait_final(oid, LONG)["state"], "passed");
    let olog = log(&server, oid, "first");
    assert!(
        olog.contains("first greeting=other target=from-job keep=kept extra="),
        "{olog}"
    );
    let plain = submit(&server, &repo, &sha, &[]);
    plain.expect_code(0);
    let pid = plain.json()["id"].as_u64().unwrap();
    let p = server.wait_final(pid, LONG);
    assert!(env_of(&p).is_empty(), "{p}");
    let plog = log(&server, pid, "first");
    assert!(
        plog.contains("first greeting=from-step target=from-job keep=kept extra="),
        "without parameters the pipeline's env stands:\n{plog}"
    );
    // And a plain build of it again is a duplicate of that one.
    submit(&server, &repo, &sha, &[]).expect_code(10);

    // Invalid parameters: INVALID_ARGUMENT naming the variable, nothing stored.
    let builds = api.list_builds().len();
    let req = |env: &[(&str, String)]| proto::SubmitBuildRequest {
        repo: repo.path_str().into(),
        commit: sha.clone(),
        branch: "main".into(),
        trigger: "test".into(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
    };
    let many: Vec<(String, String)> = (0..65).map(|i| (format!("V{i}"), String::new())).collect();
    let many: Vec<(&str, String)> = many.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    for (env, word) in [
        (vec![("KILN_BRANCH", "x".to_string())], "KILN_BRANCH"),
        (vec![("DEPLOY_TOKEN", "x".to_string())], "DEPLOY_TOKEN"),
        (vec![("NUL", "a\0b".to_string())], "NUL"),
        (vec![("BIG", "v".repeat(4097))], "BIG"),
        (vec![("9LIVES", "x".to_string())], "9LIVES"),
        (many, "at most 64"),
    ] {
        let s = api.submit(req(&env)).unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{word}: {s:?}");
        assert!(s.message().contains(word), "{word}: {s:?}");
    }
    let refused = submit(&server, &repo, &sha, &["KILN_COMMIT=x"]);
    refused.expect_code(5);
    assert!(refused.err().contains("KILN_COMMIT"), "{refused}");
    assert_eq!(
        api.list_builds().len(),
        builds,
        "a refused submit stored a build"
    );

    // A malformed --env is a usage error before any call: nothing listens at this address.
    for bad in ["NOEQUALS", "BAD-NAME=1", "=1"] {
        let out = kiln(&[
            "--dispatcher",
            "http://127.0.0.1:9",
            "submit",
            "--repo",
            repo.path_str(),
            "--commit",
            &sha,
            "--env",
            bad,
        ]);
        out.expect_code(2);
        assert!(out.err().contains("--env"), "{bad}: {out}");
    }
    assert_eq!(api.list_builds().len(), builds);
}

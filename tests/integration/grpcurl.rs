//! The dispatcher's port seen through a real grpcurl: reflection lists and describes the kiln
//! services, the standard health service answers SERVING, and kiln calls return JSON.
//!
//! grpcurl is installed by `scripts/test`. Without it the test fails when `CI=true` and is
//! skipped (with a message) otherwise.

use std::process::Command;

use kiln_testkit::*;

/// Whether a working grpcurl is on PATH; panics in CI when it is not.
fn grpcurl_available() -> bool {
    let ok = Command::new("grpcurl")
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(
            !ci,
            "grpcurl is not on PATH (CI=true): scripts/test installs it; the grpcurl test must not be skipped in CI"
        );
        eprintln!("SKIPPED: grpcurl is not on PATH (install it, or run scripts/test)");
    }
    ok
}

fn grpcurl(args: &[&str]) -> Out {
    let mut cmd = Command::new("grpcurl");
    cmd.args(["-max-time", "30"]).args(args);
    Proc::spawn(format!("grpcurl {}", args.join(" ")), cmd).wait(LONG)
}

#[test]
fn grpcurl_sees_services_health_and_json() {
    if !grpcurl_available() {
        return;
    }
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let addr = server.addr.as_str();

    let out = grpcurl(&["-plaintext", addr, "list"]);
    out.expect_code(0);
    let services: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    for s in [
        "kiln.v1.BuildService",
        "kiln.v1.RunnerService",
        "kiln.v1.RunnerAdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            services.contains(&s),
            "{s} missing from `grpcurl list`: {out}"
        );
    }

    let out = grpcurl(&["-plaintext", addr, "grpc.health.v1.Health/Check"]);
    out.expect_code(0);
    let v = out.json();
    assert_eq!(v["status"], "SERVING", "{out}");
    for service in [
        "kiln.v1.BuildService",
        "kiln.v1.RunnerService",
        "kiln.v1.RunnerAdminService",
    ] {
        let req = format!("{{\"service\": \"{service}\"}}");
        let out = grpcurl(&[
            "-plaintext",
            "-d",
            &req,
            addr,
            "grpc.health.v1.Health/Check",
        ]);
        out.expect_code(0);
        assert_eq!(out.json()["status"], "SERVING", "{service}: {out}");
    }
    // An unknown service is NOT_FOUND, not SERVING.
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service": "nope.v1.Nope"}"#,
        addr,
        "grpc.health.v1.Health/Check",
    ]);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.err().contains("NotFound"), "{out}");

    let out = grpcurl(&["-plaintext", addr, "describe", "kiln.v1.BuildService"]);
    out.expect_code(0);
    let text = out.out();
    assert!(text.contains("kiln.v1.BuildService is a service"), "{out}");
    for rpc in [
        "SubmitBuild",
        "GetBuild",
        "ListBuilds",
        "StreamLogs",
        "WatchBuilds",
        "CancelBuild",
        "RetryBuild",
        "GetTestReport",
    ] {
        assert!(text.contains(&format!("rpc {rpc}")), "{rpc} missing: {out}");
    }
    let out = grpcurl(&["-plaintext", addr, "describe", "kiln.v1.SubmitBuildRequest"]);
    out.expect_code(0);
    assert!(out.out().contains("string commit = 2"), "{out}");

    // ListBuilds on an empty farm, then with one build, as JSON.
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        addr,
        "kiln.v1.BuildService/ListBuilds",
    ]);
    out.expect_code(0);
    assert_eq!(out.json(), serde_json::json!({}), "{out}");

    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: hi\n    run: echo hi\n",
    );
    let id = id_of(&server.submit(&repo.path, &sha));
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"page_size": 10}"#,
        addr,
        "kiln.v1.BuildService/ListBuilds",
    ]);
    out.expect_code(0);
    let v = out.json();
    let builds = v["builds"].as_array().unwrap_or_else(|| panic!("{out}"));
    assert_eq!(builds.len(), 1, "{out}");
    // proto3 JSON: uint64 as a string, enums by name.
    assert_eq!(builds[0]["id"], id.to_string(), "{out}");
    assert_eq!(builds[0]["commit"], sha.as_str(), "{out}");
    assert_eq!(builds[0]["state"], "JOB_STATE_QUEUED", "{out}");

    // A build without split steps (nor `junit` files) has an empty test report, without JUnit
    // XML (an empty document would read as a success); an unknown build is NotFound.
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &format!(r#"{{"build_id": {id}}}"#),
        addr,
        "kiln.v1.BuildService/GetTestReport",
    ]);
    out.expect_code(0);
    let v = out.json();
    assert!(v.get("splits").is_none(), "{out}");
    assert!(v.get("junitXml").is_none(), "{out}");
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"build_id": 999}"#,
        addr,
        "kiln.v1.BuildService/GetTestReport",
    ]);
    assert!(out.err().contains("NotFound"), "{out}");

    // SubmitBuild through grpcurl: a malformed revision is InvalidArgument, a good one is
    // stored.
    let bad = format!(r#"{{"repo": "{}", "commit": "z z"}}"#, repo.path_str());
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &bad,
        addr,
        "kiln.v1.BuildService/SubmitBuild",
    ]);
    assert_ne!(out.code(), 0, "{out}");
    assert!(out.err().contains("InvalidArgument"), "{out}");
    let sha = repo.new_commit("second");
    let good = format!(
        r#"{{"repo": "{}", "commit": "{}", "trigger": "grpcurl"}}"#,
        repo.path_str(),
        &sha[..12]
    );
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &good,
        addr,
        "kiln.v1.BuildService/SubmitBuild",
    ]);
    out.expect_code(0);
    let b = out.json();
    assert_eq!(
        b["commit"],
        sha.as_str(),
        "the abbreviated commit is stored in full: {out}"
    );
    assert_eq!(b["trigger"], "grpcurl", "{out}");

    let out = grpcurl(&[
        "-plaintext",
        "-d",
        "{}",
        addr,
        "kiln.v1.RunnerAdminService/ListRunners",
    ]);
    out.expect_code(0);
    assert_eq!(out.json(), serde_json::json!({}), "{out}");
}

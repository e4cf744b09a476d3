//! Security, end to end: runner tokens (shared and per runner, revocation), API tokens (the
//! gRPC status and the CLI's exit code), closed reads, TLS for runners and clients, mutual TLS
//! for runners, and secrets kept out of the stored logs.

use std::path::Path;
use std::time::Duration;

use kiln::proto;
use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;
use tonic::Code;

const HEARTBEATS: &[&str] = &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];
const PIPELINE: &str = "steps:\n  - name: s\n    run: echo \"ran on $KILN_ATTEMPT_ID\"\n";
/// How long a runner that should attach gets (it would take well under a second).
const ATTACH: Duration = Duration::from_secs(20);

/// `kiln admin runner-token create|revoke NAME --data-dir DIR`.
fn admin_token(action: &str, name: &str, data: &Path) -> Out {
    kiln(&[
        "admin",
        "runner-token",
        action,
        name,
        "--data-dir",
        data.to_str().unwrap(),
    ])
}

/// Waits for a runner that must be refused to exit, non-zero, saying why.
fn expect_refused_runner(p: &mut Proc, why: &str) -> Out {
    let out = p.wait(LONG);
    assert_ne!(
        out.status.code(),
        Some(0),
        "a refused runner exited 0: {out}"
    );
    assert!(
        out.err().contains(why),
        "the refused runner did not say {why:?}: {out}"
    );
    out
}

/// Waits until a runner process has tried and failed to reach the dispatcher at least once
/// (its log says so), while it stays unattached.
fn expect_unattached_after_a_try(url: &str, global: &[&str], p: &Proc, name: &str) -> String {
    let err = wait_for(&format!("{name} to try and fail to attach"), LONG, || {
        let err = String::from_utf8_lossy(&p.stderr()).into_owned();
        if err.contains("cannot reach the dispatcher") || err.contains("refused") {
            Ok(err)
        } else {
            Err(err)
        }
    });
    let states = runner_states(url, global).unwrap();
    assert!(
        !is_attached(&states, name),
        "{name} attached although it should be refused: {states:?}\n{err}"
    );
    err
}

fn with_bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

// ---------------------------------------------------------------------------------------------
// Runner tokens
// ---------------------------------------------------------------------------------------------

/// Shared runner token and per-runner tokens: a wrong token is refused (the runner exits
/// non-zero and is not shown attached), the shared token and a runner's own token work, and a
/// revoked token stops working (the shared token is configured, so the revoked runner falls
/// back to it and its old token does not match).
#[test]
fn runner_tokens_shared_per_runner_and_revoked() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let data = tmp.path().join("data");
    let out = admin_token("create", "special", &data);
    out.expect_code(0);
    let special = out.out().trim().to_string();
    assert!(special.starts_with("kiln_"), "{out}");
    let mut args = HEARTBEATS.to_vec();
    args.extend_from_slice(&["--runner-token", "shared-s3cret"]);
    let server = Server::start(&data, &args);

    let mut wrong = spawn_runner(
        &server.url,
        "wrong",
        &tmp.path().join("w-wrong"),
        &["--token", "nope"],
        &[],
    );
    expect_refused_runner(&mut wrong, "not valid");
    let mut none = spawn_runner(&server.url, "none", &tmp.path().join("w-none"), &[], &[]);
    expect_refused_runner(&mut none, "token");
    let states = runner_states(&server.url, &[]).unwrap();
    assert!(
        !is_attached(&states, "wrong") && !is_attached(&states, "none"),
        "{states:?}"
    );

    let _good = spawn_runner(
        &server.url,
        "good",
        &tmp.path().join("w-good"),
        &["--token", "shared-s3cret"],
        &[],
    );
    wait_attached(&server.url, &[], "good");
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job0(&b)["runner"], "good", "{b}");

    let mut sp = spawn_runner(
        &server.url,
        "special",
        &tmp.path().join("w-special"),
        &["--token", &special],
        &[],
    );
    wait_attached(&server.url, &[], "special");

    admin_token("revoke", "special", &data).expect_code(0);
    // A revoked token does not get a runner in again.
    sp.signal(Signal::SIGKILL);
    sp.wait(LONG);
    let mut again = spawn_runner(
        &server.url,
        "special",
        &tmp.path().join("w-special"),
        &["--token", &special],
        &[],
    );
    expect_refused_runner(&mut again, "not valid");
    // Revoking a token that is not there says so.
    admin_token("revoke", "special", &data).expect_code(4);
}

/// Per-runner tokens without a shared token: a runner without a token is refused; after the
/// only per-runner token is revoked, neither the revoked token nor no token gets a runner in.
#[test]
fn revoking_the_last_runner_token_does_not_open_the_farm() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let out = admin_token("create", "solo", &data);
    out.expect_code(0);
    let token = out.out().trim().to_string();
    let server = Server::start(&data, HEARTBEATS);

    let mut anon = spawn_runner(&server.url, "anon", &tmp.path().join("w-anon"), &[], &[]);
    expect_refused_runner(&mut anon, "token");
    let mut solo = spawn_runner(
        &server.url,
        "solo",
        &tmp.path().join("w-solo"),
        &["--token", &token],
        &[],
    );
    wait_attached(&server.url, &[], "solo");
    solo.signal(Signal::SIGTERM);
    solo.wait(LONG).expect_code(0);

    admin_token("revoke", "solo", &data).expect_code(0);
    let mut revoked = spawn_runner(
        &server.url,
        "solo",
        &tmp.path().join("w-solo"),
        &["--token", &token],
        &[],
    );
    let mut anon = spawn_runner(&server.url, "anon", &tmp.path().join("w-anon"), &[], &[]);
    // Either they are refused and exit, or they attach: whichever comes first.
    let attached = wait_for("the runners to be refused or to attach", LONG, || {
        let states = runner_states(&server.url, &[])?;
        let attached: Vec<&str> = ["solo", "anon"]
            .into_iter()
            .filter(|n| is_attached(&states, n))
            .collect();
        if !attached.is_empty() {
            return Ok(format!("attached: {attached:?}"));
        }
        if revoked.try_status().is_some() && anon.try_status().is_some() {
            return Ok(String::new());
        }
        Err(format!("{states:?}"))
    });
    assert!(
        attached.is_empty(),
        "after revoking the last runner token, runners got in with the revoked token or none \
         ({attached})"
    );
    expect_refused_runner(&mut revoked, "token");
    expect_refused_runner(&mut anon, "token");
}

// ---------------------------------------------------------------------------------------------
// API tokens
// ---------------------------------------------------------------------------------------------

/// `--api-token`: a submit without a token is UNAUTHENTICATED (exit 9 from the CLI), with a
/// wrong one PERMISSION_DENIED (exit 9), with the right one it is stored; reads stay open.
/// With `--closed-reads`, `kiln builds` needs the token too.
#[test]
fn api_token_statuses_and_closed_reads() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let r = repo.path_str();
    let server = Server::start(&tmp.path().join("data"), &["--api-token", "api-t0ken"]);

    let out = server.cli(&["submit", "--repo", r, "--commit", &sha]);
    out.expect_code(9);
    assert!(out.err().contains("needs an API token"), "{out}");
    let out = server.cli(&["--token", "wrong", "submit", "--repo", r, "--commit", &sha]);
    out.expect_code(9);
    assert!(out.err().contains("not valid"), "{out}");

    let api = Api::connect(&server.url);
    let req = || proto::SubmitBuildRequest {
        repo: r.to_string(),
        commit: sha.clone(),
        branch: String::new(),
        trigger: "test".into(),
        env: Default::default(),
    };
    let s = api.submit(req()).unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    assert!(s.message().contains("needs an API token"), "{s:?}");
    let mut c = api.builds();
    let s = api
        .rt
        .block_on(c.submit_build(with_bearer(req(), "wrong")))
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("not valid"), "{s:?}");
    // Nothing refused was stored; reads are open.
    let out = server.cli(&["--json", "builds"]);
    out.expect_code(0);
    assert!(out.json()["builds"].as_array().unwrap().is_empty(), "{out}");

    let b = api
        .rt
        .block_on(c.submit_build(with_bearer(req(), "api-t0ken")))
        .unwrap()
        .into_inner();
    assert!(b.id > 0);
    let sha2 = repo.commit(&[("2.txt", b"2")], "second");
    let out = server.cli(&[
        "--token",
        "api-t0ken",
        "--json",
        "submit",
        "--repo",
        r,
        "--commit",
        &sha2,
    ]);
    out.expect_code(0);
    server.cli(&["show", &b.id.to_string()]).expect_code(8);
    drop(server);

    let server = Server::start(
        &tmp.path().join("data2"),
        &["--api-token", "api-t0ken", "--closed-reads"],
    );
    let out = server.cli(&["builds"]);
    out.expect_code(9);
    assert!(out.err().contains("API token"), "{out}");
    server.cli(&["--token", "wrong", "builds"]).expect_code(9);
    server
        .cli(&["--token", "api-t0ken", "builds"])
        .expect_code(0);
    let api = Api::connect(&server.url);
    let mut c = api.builds();
    let s = api
        .rt
        .block_on(c.list_builds(proto::ListBuildsRequest::default()))
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated, "{s:?}");
    api.rt
        .block_on(c.list_builds(with_bearer(
            proto::ListBuildsRequest::default(),
            "api-t0ken",
        )))
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

fn tls_server(tmp: &Path, tls: &TlsFiles, extra: &[&str]) -> Server {
    let mut args = HEARTBEATS.to_vec();
    args.extend_from_slice(&[
        "--server-cert",
        tls.server_cert.to_str().unwrap(),
        "--server-key",
        tls.server_key.to_str().unwrap(),
    ]);
    args.extend_from_slice(extra);
    try_start_dispatcher("127.0.0.1:0", &tmp.join("data"), &args, "https")
        .unwrap_or_else(|out| panic!("the TLS dispatcher did not start: {out}"))
}

/// Waits for a build to finish, through a TLS client.
fn wait_final_tls(url: &str, global: &[&str], id: u64) -> serde_json::Value {
    wait_for(&format!("build {id} to finish"), LONG, || {
        let out = cli_at(url, global, &["--json", "show", &id.to_string()]);
        if !matches!(out.status.code(), Some(0 | 1 | 3 | 8)) {
            return Err(out.to_string());
        }
        let b = out.json();
        match b["state"].as_str().unwrap() {
            "queued" | "running" | "assigned" => Err(b.to_string()),
            _ => Ok(b),
        }
    })
}

fn submit_tls(url: &str, global: &[&str], repo: &Repo, sha: &str) -> u64 {
    let out = cli_at(
        url,
        global,
        &[
            "--json",
            "submit",
            "--repo",
            repo.path_str(),
            "--commit",
            sha,
        ],
    );
    out.expect_code(0);
    id_of(&out.json())
}

/// A TLS dispatcher: clients with the CA work (by IP and by name); a plaintext client is
/// refused and stores nothing; a client that does not trust the CA is refused.
#[test]
fn tls_dispatcher_refuses_plaintext_clients() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let ca = tls.ca.to_str().unwrap();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let server = tls_server(tmp.path(), &tls, &[]);
    let port = server.addr.rsplit(':').next().unwrap();

    let plain = format!("http://{}", server.addr);
    let out = cli_at(
        &plain,
        &[],
        &["submit", "--repo", repo.path_str(), "--commit", &sha],
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "a plaintext submit succeeded: {out}"
    );
    // Without the CA (system roots only), the certificate is not trusted.
    let out = cli_at(
        &server.url,
        &[],
        &["submit", "--repo", repo.path_str(), "--commit", &sha],
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "an untrusted TLS submit succeeded: {out}"
    );

    let global = ["--tls-ca", ca];
    let out = cli_at(&server.url, &global, &["--json", "builds"]);
    out.expect_code(0);
    assert!(
        out.json()["builds"].as_array().unwrap().is_empty(),
        "a refused submit was stored: {out}"
    );
    // The certificate names localhost too.
    let by_name = format!("https://localhost:{port}");
    cli_at(&by_name, &global, &["builds"]).expect_code(0);
    let id = submit_tls(&server.url, &global, &repo, &sha);
    assert!(id > 0);
}

/// A runner attaches over https with `--tls-ca` and runs a build; a runner given the http://
/// URL of the TLS dispatcher does not attach.
#[test]
fn runner_over_tls_runs_a_build() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let ca = tls.ca.to_str().unwrap();
    let global = ["--tls-ca", ca];
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let server = tls_server(tmp.path(), &tls, &[]);

    let plain_url = format!("http://{}", server.addr);
    let plain = spawn_runner(&plain_url, "plain", &tmp.path().join("w-plain"), &[], &[]);
    expect_unattached_after_a_try(&server.url, &global, &plain, "plain");

    let r = spawn_runner(
        &server.url,
        "secure",
        &tmp.path().join("w-secure"),
        &global,
        &[],
    );
    wait_for("runner secure to attach over TLS", ATTACH, || {
        let states = runner_states(&server.url, &global)?;
        if is_attached(&states, "secure") {
            Ok(())
        } else {
            Err(format!(
                "{states:?}; runner stderr: {}",
                String::from_utf8_lossy(&r.stderr())
            ))
        }
    });
    let id = submit_tls(&server.url, &global, &repo, &sha);
    let b = wait_final_tls(&server.url, &global, id);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job0(&b)["runner"], "secure", "{b}");
}

/// `--client-ca --require-runner-cert`: a runner without a client certificate, or with one
/// from another CA, is refused; one with a certificate from the CA attaches (under a name the
/// certificate gives it, and under no other) and runs a build.
/// Clients (submit, builds) still need no certificate.
#[test]
fn mutual_tls_is_required_of_runners() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let ca = tls.ca.to_str().unwrap();
    let global = ["--tls-ca", ca];
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let server = tls_server(
        tmp.path(),
        &tls,
        &["--client-ca", ca, "--require-runner-cert"],
    );

    let cert = [
        "--tls-ca",
        ca,
        "--tls-cert",
        tls.client_cert.to_str().unwrap(),
        "--tls-key",
        tls.client_key.to_str().unwrap(),
    ];
    let r = spawn_runner(
        &server.url,
        "trusted",
        &tmp.path().join("w-trusted"),
        &cert,
        &[],
    );
    wait_for(
        "runner trusted to attach with its certificate",
        ATTACH,
        || {
            let states = runner_states(&server.url, &global)?;
            if is_attached(&states, "trusted") {
                Ok(())
            } else {
                Err(format!(
                    "{states:?}; runner stderr: {}",
                    String::from_utf8_lossy(&r.stderr())
                ))
            }
        },
    );
    let bare = spawn_runner(
        &server.url,
        "bare",
        &tmp.path().join("w-bare"),
        &global,
        &[],
    );
    let err = expect_unattached_after_a_try(&server.url, &global, &bare, "bare");
    assert!(
        err.contains("client certificate"),
        "the runner without a certificate was not told it needs one: {err}"
    );
    let rogue = spawn_runner(
        &server.url,
        "rogue",
        &tmp.path().join("w-rogue"),
        &[
            "--tls-ca",
            ca,
            "--tls-cert",
            tls.rogue_cert.to_str().unwrap(),
            "--tls-key",
            tls.rogue_key.to_str().unwrap(),
        ],
        &[],
    );
    expect_unattached_after_a_try(&server.url, &global, &rogue, "rogue");
    // The certificate names its runner ("trusted", "good"): it attaches under no other name.
    let mut impostor = spawn_runner(
        &server.url,
        "impostor",
        &tmp.path().join("w-impostor"),
        &cert,
        &[],
    );
    let out = impostor.wait(LONG);
    assert_ne!(out.status.code(), Some(0), "{out}");
    assert!(
        out.err()
            .contains("certificate names it \"trusted\", \"good\"")
            && out.err().contains("not \"impostor\""),
        "{out}"
    );
    let states = runner_states(&server.url, &global).unwrap();
    assert!(!is_attached(&states, "impostor"), "{states:?}");

    let id = submit_tls(&server.url, &global, &repo, &sha);
    let b = wait_final_tls(&server.url, &global, id);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job0(&b)["runner"], "trusted", "{b}");
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

/// A secret from `--secrets-file` reaches the step, shows as `***` in `kiln logs`, and is in
/// no stored log file (nor anywhere else in the data dir).
#[test]
fn secrets_are_masked_and_never_stored() {
    const SECRET: &str = "sup3r-s3cret-value";
    let tmp = tempdir();
    let secrets = tmp.path().join("secrets.yml");
    std::fs::write(&secrets, format!("API_KEY: {SECRET}\n")).unwrap();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: |\n      echo \"key=$API_KEY\"\n      [ ${#API_KEY} -eq 18 ] && echo secret-ok\n",
    );
    let data = tmp.path().join("data");
    let mut args = HEARTBEATS.to_vec();
    args.extend_from_slice(&["--secrets-file", secrets.to_str().unwrap()]);
    let server = Server::start(&data, &args);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let out = server.cli(&["logs", &id.to_string()]);
    out.expect_code(0);
    assert!(out.out().contains("key=***\n"), "{out}");
    assert!(out.out().contains("secret-ok\n"), "{out}");
    assert!(
        !out.out().contains(SECRET) && !out.err().contains(SECRET),
        "{out}"
    );

    // A log is plain while its job runs and sealed (seekable zstd) once it has ended: read
    // either form whole.
    let logs: Vec<_> = files_under(&data.join("logs"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log" || e == "zst"))
        .collect();
    assert!(!logs.is_empty(), "no log file under {}", data.display());
    for p in &logs {
        let bytes = stored_bytes(p);
        assert!(
            contains(&bytes, b"key=***"),
            "{} holds no masked line",
            p.display()
        );
        assert!(
            !contains(&bytes, SECRET.as_bytes()),
            "{} holds the secret",
            p.display()
        );
    }
    // Stop the dispatcher so everything is on disk, then look at every file it keeps.
    let mut server = server;
    server.proc.signal(Signal::SIGTERM);
    server.proc.wait(LONG).expect_code(0);
    for p in files_under(&data) {
        let bytes = stored_bytes(&p);
        assert!(
            !contains(&bytes, SECRET.as_bytes()),
            "{} holds the secret",
            p.display()
        );
    }
}

//! The push webhook (`POST /webhooks/push` on the dispatcher's gRPC port): signed GitHub- and
//! Gitea-style pushes build their commits in order; unsigned, wrongly signed or malformed
//! requests create nothing; gRPC keeps working on the same port, with and without TLS.
//!
//! HTTP/1.1 is spoken by hand over a `TcpStream` (no HTTP client dependency); the TLS case
//! uses the `curl` program.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;

use hmac::{Hmac, Mac};
use kiln_testkit::*;
use serde_json::{Value, json};
use sha2::Sha256;

const SECRET: &str = "webhook-test-secret";
const ZEROS: &str = "0000000000000000000000000000000000000000";
const PIPELINE: &str = "steps:\n  - name: hello\n    run: echo hello from the webhook\n";

/// Hex HMAC-SHA256 of `body` under `secret` (independent of kiln's own code).
fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// An HTTP answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self:?}"))
    }
}

/// One HTTP/1.1 request over a fresh connection (`Connection: close`), read to the end.
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> Answer {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    // A server may answer (413) before reading everything; a failed write is fine then.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    // The server may reset the connection after answering early; keep what was read.
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {text:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        let mut out = String::new();
        let mut rest = rest;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        rest.to_string()
    };
    Answer { status, body }
}

/// A GitHub-style delivery: `X-GitHub-Event` and `X-Hub-Signature-256` (signed with `secret`).
fn github(addr: &str, event: &str, secret: &str, body: &[u8]) -> Answer {
    http(
        addr,
        "POST",
        "/webhooks/push",
        &[
            ("Content-Type", "application/json".into()),
            ("X-GitHub-Event", event.into()),
            (
                "X-GitHub-Delivery",
                "72d3162e-cc78-11e3-81ab-4c9367dc0958".into(),
            ),
            (
                "X-Hub-Signature-256",
                format!("sha256={}", hmac_hex(secret, body)),
            ),
        ],
        body,
    )
}

/// A GitHub-style push payload.
fn push_payload(repo: &str, branch: &str, before: &str, commits: &[&str]) -> Vec<u8> {
    let after = commits.last().copied().unwrap_or(ZEROS);
    json!({
        "ref": format!("refs/heads/{branch}"),
        "before": before,
        "after": after,
        "created": before == ZEROS,
        "deleted": false,
        "forced": false,
        "commits": commits.iter().map(|c| json!({"id": c, "distinct": true, "message": "m"})).collect::<Vec<_>>(),
        "head_commit": {"id": after},
        "repository": {"full_name": "acme/project", "clone_url": repo, "url": "https://example.invalid/acme/project"},
        "pusher": {"name": "someone"},
    })
    .to_string()
    .into_bytes()
}

fn ids(answer: &Answer) -> Vec<u64> {
    answer.json()["builds"]
        .as_array()
        .unwrap_or_else(|| panic!("no builds in {answer:?}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect()
}

/// A correctly signed GitHub push of two commits builds both, oldest first, with trigger
/// `webhook`; a runner runs them to `passed`. Delivering the same push again builds nothing.
/// gRPC (the CLI) keeps working on the port that now also speaks HTTP/1.1.
#[test]
fn github_push_builds_every_commit_and_they_pass() {
    let tmp = tempdir();
    let (repo, first) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let second = repo.new_commit("second");
    let server = Server::start(
        &tmp.path().join("data"),
        &["--webhook-secret", SECRET, "--heartbeat-interval", "500ms"],
    );
    let _runner = server.runner(tmp.path(), "r1", MANY_SLOTS);

    let body = push_payload(repo.path_str(), "main", ZEROS, &[&first, &second]);
    let answer = github(&server.addr, "push", SECRET, &body);
    assert_eq!(answer.status, 202, "{answer:?}");
    let built = ids(&answer);
    assert_eq!(built.len(), 2, "{answer:?}");
    assert!(built[0] < built[1], "{answer:?}");

    for (id, commit) in built.iter().zip([&first, &second]) {
        let b = server.wait_final(*id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        assert_eq!(b["commit"], commit.as_str());
        assert_eq!(b["branch"], "main");
        assert_eq!(b["trigger"], "webhook");
        assert_eq!(b["repo"], repo.path_str());
    }
    let out = server.cli(&["logs", &built[1].to_string()]);
    assert!(out.out().contains("hello from the webhook"), "{out}");

    // Redelivery (GitHub's "Redeliver" button): nothing new.
    let again = github(&server.addr, "push", SECRET, &body);
    assert_eq!(again.status, 202, "{again:?}");
    assert!(ids(&again).is_empty(), "{again:?}");
    let api = Api::connect(&server.url);
    assert!(api.healthy());
    assert_eq!(api.list_builds().len(), 2);
}

/// Gitea's signature header (bare hex) works, on the `/webhook` path too; Gitea lists commits
/// newest first and they are still built oldest first. A forced push builds only its head, and
/// a `file://` clone URL is fetched like a path.
#[test]
fn gitea_signature_newest_first_and_forced_push() {
    let tmp = tempdir();
    let (repo, c1) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let c2 = repo.new_commit("two");
    let c3 = repo.new_commit("three");
    let c4 = repo.new_commit("four");
    let server = Server::start(&tmp.path().join("data"), &["--webhook-secret", SECRET]);
    let gitea = |path: &str, body: &[u8]| {
        http(
            &server.addr,
            "POST",
            path,
            &[
                ("Content-Type", "application/json".into()),
                ("X-Gitea-Event", "push".into()),
                ("X-Gitea-Signature", hmac_hex(SECRET, body)),
            ],
            body,
        )
    };

    // Newest first, as Gitea sends them.
    let body = json!({
        "ref": "refs/heads/dev",
        "before": ZEROS,
        "after": c2,
        "commits": [{"id": c2}, {"id": c1}],
        "total_commits": 2,
        "repository": {"clone_url": repo.path_str()},
    })
    .to_string();
    let answer = gitea("/webhooks/push", body.as_bytes());
    assert_eq!(answer.status, 202, "{answer:?}");
    let built = ids(&answer);
    assert_eq!(built.len(), 2, "{answer:?}");
    assert_eq!(server.show(built[0])["commit"], c1.as_str());
    assert_eq!(server.show(built[1])["commit"], c2.as_str());

    // A forced push lists commits that may not be new; only the head is built.
    let url = format!("file://{}", repo.path_str());
    let body = json!({
        "ref": "refs/heads/dev",
        "before": c2,
        "after": c4,
        "forced": true,
        "commits": [{"id": c4}, {"id": c3}],
        "repository": {"url": url},
    })
    .to_string();
    let answer = gitea("/webhook", body.as_bytes());
    assert_eq!(answer.status, 202, "{answer:?}");
    let built = ids(&answer);
    assert_eq!(built.len(), 1, "{answer:?}");
    let b = server.show(built[0]);
    assert_eq!(b["commit"], c4.as_str(), "{b}");
    assert_eq!(b["repo"], url.as_str(), "{b}");
    assert_eq!(b["trigger"], "webhook", "{b}");
    assert_eq!(Api::connect(&server.url).list_builds().len(), 3);
}

/// Everything that must not build: no signature, a wrong one, a malformed body, a missing
/// field, a ping, a tag push, a branch deletion, an unknown repository or commit, a body over
/// 1 MiB, the wrong method. Each gets its status and `ListBuilds` stays empty. A dispatcher
/// started without a secret has no webhook (404) even for a correctly signed push.
#[test]
fn refused_and_ignored_requests_create_nothing() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let server = Server::start(&tmp.path().join("data"), &["--webhook-secret", SECRET]);
    let addr = server.addr.as_str();
    let api = Api::connect(&server.url);
    let good = push_payload(repo.path_str(), "main", ZEROS, &[&sha]);
    let json_ct = ("Content-Type", "application/json".to_string());

    // No signature at all.
    let a = http(
        addr,
        "POST",
        "/webhooks/push",
        std::slice::from_ref(&json_ct),
        &good,
    );
    assert_eq!(a.status, 401, "{a:?}");
    assert!(
        a.json()["error"].as_str().unwrap().contains("signature"),
        "{a:?}"
    );
    // Signed with another secret, or for another body.
    let a = github(addr, "push", "not-the-secret", &good);
    assert_eq!(a.status, 401, "{a:?}");
    let a = http(
        addr,
        "POST",
        "/webhooks/push",
        &[
            json_ct.clone(),
            (
                "X-Hub-Signature-256",
                format!("sha256={}", hmac_hex(SECRET, b"{}")),
            ),
        ],
        &good,
    );
    assert_eq!(a.status, 401, "{a:?}");
    // Gitea header with garbage, GitHub header without its prefix.
    let a = http(
        addr,
        "POST",
        "/webhooks/push",
        &[json_ct.clone(), ("X-Gitea-Signature", "not-hex".into())],
        &good,
    );
    assert_eq!(a.status, 401, "{a:?}");
    let a = http(
        addr,
        "POST",
        "/webhooks/push",
        &[
            json_ct.clone(),
            ("X-Hub-Signature-256", hmac_hex(SECRET, &good)),
        ],
        &good,
    );
    assert_eq!(a.status, 401, "{a:?}");

    // Correctly signed but malformed.
    let a = github(addr, "push", SECRET, b"{\"ref\": ");
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.json()["field"], "body", "{a:?}");
    let no_ref = json!({"after": sha, "repository": {"clone_url": repo.path_str()}}).to_string();
    let a = github(addr, "push", SECRET, no_ref.as_bytes());
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.json()["field"], "ref", "{a:?}");
    let no_repo = json!({"ref": "refs/heads/main", "after": sha}).to_string();
    let a = github(addr, "push", SECRET, no_repo.as_bytes());
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.json()["field"], "repository", "{a:?}");
    let bad_commit = json!({"ref": "refs/heads/main", "after": sha, "commits": [{"message": "x"}],
                            "repository": {"clone_url": repo.path_str()}})
    .to_string();
    let a = github(addr, "push", SECRET, bad_commit.as_bytes());
    assert_eq!(a.status, 400, "{a:?}");
    assert_eq!(a.json()["field"], "commits[0].id", "{a:?}");

    // Not a push: GitHub's ping when the hook is created.
    let ping = json!({"zen": "Keep it logically awesome.", "hook_id": 1}).to_string();
    let a = github(addr, "ping", SECRET, ping.as_bytes());
    assert_eq!(a.status, 200, "{a:?}");
    assert!(ids(&a).is_empty());
    // A push of a tag, and a branch deletion.
    let tag = json!({"ref": "refs/tags/v1.0", "before": ZEROS, "after": sha, "commits": [],
                     "repository": {"clone_url": repo.path_str()}})
    .to_string();
    let a = github(addr, "push", SECRET, tag.as_bytes());
    assert_eq!(a.status, 202, "{a:?}");
    assert!(
        ids(&a).is_empty() && a.json()["ignored"].is_string(),
        "{a:?}"
    );
    let deleted = json!({"ref": "refs/heads/main", "before": sha, "after": ZEROS, "deleted": true,
                         "commits": [], "repository": {"clone_url": repo.path_str()}})
    .to_string();
    let a = github(addr, "push", SECRET, deleted.as_bytes());
    assert_eq!(a.status, 202, "{a:?}");
    assert!(ids(&a).is_empty(), "{a:?}");

    // A repository or a commit that does not exist.
    let missing_repo = tmp.path().join("nope");
    let body = push_payload(missing_repo.to_str().unwrap(), "main", ZEROS, &[&sha]);
    let a = github(addr, "push", SECRET, &body);
    assert_eq!(a.status, 404, "{a:?}");
    let body = push_payload(
        repo.path_str(),
        "main",
        ZEROS,
        &["1234567890123456789012345678901234567890"],
    );
    let a = github(addr, "push", SECRET, &body);
    assert_eq!(a.status, 404, "{a:?}");
    // Over 1 MiB.
    let mut big = push_payload(repo.path_str(), "main", ZEROS, &[&sha]);
    big.truncate(big.len() - 1);
    big.extend_from_slice(format!(",\"pad\":\"{}\"}}", "x".repeat(1 << 20)).as_bytes());
    let a = github(addr, "push", SECRET, &big);
    assert_eq!(a.status, 413, "{a:?}");
    // Wrong method, unknown path.
    let a = http(addr, "GET", "/webhooks/push", &[], b"");
    assert_eq!(a.status, 405, "{a:?}");
    let a = http(addr, "POST", "/elsewhere", &[], b"");
    assert_eq!(a.status, 404, "{a:?}");

    assert!(api.list_builds().is_empty(), "{:?}", api.list_builds());
    assert!(api.healthy(), "gRPC on the same port still works");
    // The good push does build (the refusals above were not for lack of a valid setup).
    let a = github(addr, "push", SECRET, &good);
    assert_eq!(a.status, 202, "{a:?}");
    assert_eq!(ids(&a).len(), 1, "{a:?}");

    // Without --webhook-secret the endpoint does not exist.
    let plain = Server::start(&tmp.path().join("data2"), &[]);
    let a = github(&plain.addr, "push", SECRET, &good);
    assert_eq!(a.status, 404, "{a:?}");
    assert!(
        a.json()["error"]
            .as_str()
            .unwrap()
            .contains("--webhook-secret"),
        "{a:?}"
    );
    assert!(Api::connect(&plain.url).list_builds().is_empty());
    // An empty secret is refused at start.
    let out = kiln(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        tmp.path().join("data3").to_str().unwrap(),
        "--webhook-secret",
        "",
    ]);
    out.expect_code(2);
}

/// With TLS, the webhook is served on the same TLS port as gRPC (curl negotiates HTTP/2 by
/// ALPN, as GitHub's sender does), and the CLI still works over TLS.
#[test]
fn webhook_over_the_tls_listener() {
    if Command::new("curl").arg("--version").output().is_err() {
        eprintln!("SKIPPED: curl is not on PATH");
        return;
    }
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), PIPELINE);
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_pem = tmp.path().join("cert.pem");
    let key_pem = tmp.path().join("key.pem");
    std::fs::write(&cert_pem, cert.cert.pem()).unwrap();
    std::fs::write(&key_pem, cert.signing_key.serialize_pem()).unwrap();
    let server = Server::start(
        &tmp.path().join("data"),
        &[
            "--webhook-secret",
            SECRET,
            "--server-cert",
            cert_pem.to_str().unwrap(),
            "--server-key",
            key_pem.to_str().unwrap(),
        ],
    );
    let body = String::from_utf8(push_payload(repo.path_str(), "main", ZEROS, &[&sha])).unwrap();
    let curl = |sig: &str| {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "50", "--cacert"])
            .arg(&cert_pem)
            .args([
                "-H",
                "Content-Type: application/json",
                "-H",
                "X-GitHub-Event: push",
            ])
            .args(["-H", &format!("X-Hub-Signature-256: sha256={sig}")])
            .args([
                "--data-binary",
                &body,
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .arg(format!("https://{}/webhooks/push", server.addr))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl failed: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let refused = curl(&hmac_hex("wrong", body.as_bytes()));
    assert!(refused.trim_end().ends_with("401 2"), "{refused}");
    let accepted = curl(&hmac_hex(SECRET, body.as_bytes()));
    assert!(accepted.trim_end().ends_with("202 2"), "{accepted}");
    let answer: Value = serde_json::from_str(accepted.lines().next().unwrap()).unwrap();
    let id = answer["builds"][0].as_u64().unwrap();
    let url = format!("https://{}", server.addr);
    let out = kiln(&[
        "--dispatcher",
        &url,
        "--tls-ca",
        cert_pem.to_str().unwrap(),
        "--json",
        "show",
        &id.to_string(),
    ]);
    assert!(matches!(out.code(), 0 | 8), "{out}");
    assert_eq!(out.json()["commit"], sha.as_str(), "{out}");
    assert_eq!(out.json()["trigger"], "webhook", "{out}");
}

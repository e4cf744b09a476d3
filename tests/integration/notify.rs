//! Notifications (`kiln serve --notify-config`) against real receivers the test starts: an
//! HTTP server (std `TcpListener`, HTTP/1.1 by hand) playing the webhook receiver and the
//! GitHub and Gitea status APIs, and a real SMTP server (Python's `aiosmtpd`) writing each
//! mail to a directory. The deliveries' rows are read from the SQLite file.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use kiln_testkit::fault::{TlsFiles, int_rows, open_db};
use kiln_testkit::*;
use nix::sys::signal::Signal;
use serde_json::Value;
use sha2::Sha256;

const HOOK_SECRET: &str = "hook-secret-for-the-test";

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// An HTTP receiver on a loopback port: answers 200 to everything, records every request.
struct Receiver {
    addr: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Receiver {
    fn start() -> Receiver {
        Self::on(TcpListener::bind("127.0.0.1:0").unwrap())
    }

    fn on(listener: TcpListener) -> Receiver {
        let addr = listener.local_addr().unwrap().to_string();
        let requests: Arc<Mutex<Vec<Request>>> = Arc::default();
        let seen = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let seen = seen.clone();
                std::thread::spawn(move || serve(conn, &seen));
            }
        });
        Receiver { addr, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// Reads one request, records it, answers 200 and closes.
fn serve(conn: TcpStream, seen: &Mutex<Vec<Request>>) {
    conn.set_read_timeout(Some(LONG)).unwrap();
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let path = parts.next().unwrap_or_default().to_owned();
    let mut headers = BTreeMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap();
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let len: usize = headers
        .get("content-length")
        .map_or(0, |l| l.parse().unwrap());
    let mut body = vec![0; len];
    reader.read_exact(&mut body).unwrap();
    seen.lock().unwrap().push(Request {
        method,
        path,
        headers,
        body,
    });
    let mut conn = reader.into_inner();
    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
}

/// A real SMTP server: Python's aiosmtpd, each message written to `dir` as one file (the
/// envelope's recipients on a first `X-Rcpt-To:` line, then the message as received).
struct Smtp {
    port: u16,
    dir: PathBuf,
    _proc: Proc,
}

/// The SMTP server: plain, or (given a certificate and key) two servers that both want a login
/// (`kiln` / `s3cret`) over TLS: STARTTLS required on the first port, SMTPS on the second.
/// With TLS each mail gets an `X-Session:` line saying how it came (TLS, the login).
const SMTP_SERVER: &str = r#"
import os, socket, ssl, sys, time
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

out = sys.argv[1]
tls = len(sys.argv) > 3

class Handler:
    async def handle_DATA(self, server, session, envelope):
        n = len(os.listdir(out))
        tmp = os.path.join(out, "%04d.tmp" % n)
        with open(tmp, "wb") as f:
            f.write(b"X-Rcpt-To: " + ",".join(envelope.rcpt_tos).encode() + b"\r\n")
            if tls:
                login = session.auth_data.decode() if session.auth_data else "-"
                wrapped = server.transport.get_extra_info("ssl_object") is not None
                tls_on = "yes" if session.ssl or wrapped else "no"
                f.write(("X-Session: tls=%s login=%s\r\n" % (tls_on, login)).encode())
            f.write(envelope.content)
        os.rename(tmp, os.path.join(out, "%04d.eml" % n))
        return "250 OK"

def authenticate(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data.login == b"kiln" \
        and auth_data.password == b"s3cret"
    return AuthResult(success=ok, handled=False, auth_data=auth_data.login if ok else None)

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port

ports = []
if tls:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(sys.argv[2], sys.argv[3])
    starttls = Controller(Handler(), hostname="127.0.0.1", port=free_port(), tls_context=ctx,
                          require_starttls=True, authenticator=authenticate,
                          auth_require_tls=True)
    # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; SMTPS is TLS throughout.
    smtps = Controller(Handler(), hostname="127.0.0.1", port=free_port(), ssl_context=ctx,
                       authenticator=authenticate, auth_require_tls=False)
    for c in (starttls, smtps):
        c.start()
        ports.append(c.port)
else:
    c = Controller(Handler(), hostname="127.0.0.1", port=free_port())
    c.start()
    ports.append(c.port)
print(" ".join(map(str, ports)), flush=True)
while True:
    time.sleep(3600)
"#;

impl Smtp {
    /// A plain SMTP server.
    fn start(tmp: &Path) -> Smtp {
        let (mut ports, smtp) = Smtp::spawn(tmp, None);
        Smtp {
            port: ports.remove(0),
            ..smtp
        }
    }

    /// The two TLS servers wanting a login; `port` is the STARTTLS one, and the SMTPS port
    /// comes back beside.
    fn start_tls(tmp: &Path, tls: &TlsFiles) -> (Smtp, u16) {
        let (ports, smtp) = Smtp::spawn(tmp, Some(tls));
        assert_eq!(ports.len(), 2, "{ports:?}");
        (
            Smtp {
                port: ports[0],
                ..smtp
            },
            ports[1],
        )
    }

    fn spawn(tmp: &Path, tls: Option<&TlsFiles>) -> (Vec<u16>, Smtp) {
        let dir = tmp.join("mail");
        std::fs::create_dir_all(&dir).unwrap();
        let script = tmp.join("smtp_server.py");
        std::fs::write(&script, SMTP_SERVER).unwrap();
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg(&dir).stdin(Stdio::null());
        if let Some(tls) = tls {
            cmd.arg(&tls.server_cert).arg(&tls.server_key);
        }
        let mut proc = Proc::spawn("aiosmtpd", cmd);
        proc.wait_stdout(b"\n", LONG);
        let ports = String::from_utf8(proc.stdout())
            .unwrap()
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect::<Vec<u16>>();
        assert!(
            !ports.is_empty(),
            "aiosmtpd did not print its ports: {:?}",
            proc.stderr()
        );
        (
            ports,
            Smtp {
                port: 0,
                dir,
                _proc: proc,
            },
        )
    }

    /// The mails received so far, in order.
    fn mails(&self) -> Vec<String> {
        let mut files: Vec<_> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        files.sort();
        files
            .iter()
            .map(|p| std::fs::read_to_string(p).unwrap())
            .collect()
    }
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a webhook request (signature, headers against the body) and returns its body.
fn checked_hook(r: &Request) -> Value {
    assert_eq!(r.method, "POST");
    assert_eq!(r.path, "/hook");
    assert_eq!(
        r.header("x-kiln-signature-256"),
        hmac_hex(HOOK_SECRET, &r.body),
        "bad signature: {r:?}"
    );
    let body = r.json();
    assert_eq!(r.header("x-kiln-event"), body["event"], "{r:?}");
    assert_eq!(r.header("x-kiln-delivery"), body["delivery"], "{r:?}");
    body
}

fn write_secrets(tmp: &Path) -> PathBuf {
    let path = tmp.join("secrets.yml");
    std::fs::write(
        &path,
        format!("HOOK_SECRET: {HOOK_SECRET}\nGH_TOKEN: gh-token\nGITEA_TOKEN: gitea-token\n"),
    )
    .unwrap();
    path
}

/// Deliveries of the dispatcher's store that are not delivered yet.
fn undelivered(data: &Path) -> i64 {
    int_rows(
        &open_db(data),
        "SELECT COUNT(*) FROM deliveries WHERE state != 'delivered' AND state != 'superseded'",
    )[0][0]
}

fn submit(server: &Server, repo: &Repo, sha: &str) -> u64 {
    let out = server.cli(&[
        "--json",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        sha,
        "--branch",
        "main",
    ]);
    out.expect_code(0);
    id_of(&out.json())
}

const FAILING: &str = r#"steps:
  - name: test
    run: |
      for i in $(seq 1 40); do echo "log line $i"; done
      mkdir -p reports
      printf '<testsuite name="s"><testcase classname="suite" name="test_breaks"><failure message="expected 1, got 2"/></testcase></testsuite>' > reports/junit.xml
      exit 1
    junit: reports/*.xml
"#;

const PASSING: &str = "steps:\n  - name: test\n    run: echo all good\n";

/// A build that fails then one that passes on the same branch: the webhook gets started,
/// finished and failed, then started, finished and fixed, each signed; the team gets a mail
/// for the failure (failed job, failed test, the last lines of its log) and one for the fix;
/// GitHub and Gitea get pending, then failure, then success statuses with their own tokens.
#[test]
fn webhook_mail_and_statuses_for_a_failure_and_its_fix() {
    let tmp = tempdir();
    let receiver = Receiver::start();
    let smtp = Smtp::start(tmp.path());
    let (repo, sha1) = Repo::with_pipeline(&tmp.path().join("acme").join("app"), FAILING);
    let base = format!("http://{}", receiver.addr);
    let config = tmp.path().join("notify.yml");
    std::fs::write(
        &config,
        format!(
            r#"public_url: https://ci.example.com/
smtp: {{host: 127.0.0.1, port: {port}, security: none, from: "kiln <ci@example.com>"}}
delivery: {{first_retry: 100ms, max_retry: 1s, timeout: 5s}}
rules:
  - repo: "**/acme/app"
    branch: "main"
    webhook: {{url: {base}/hook, secret_secret: HOOK_SECRET, events: [started, finished, failed, fixed]}}
    mail: {{to: [team@example.com, lead@example.com], on: [failed, fixed]}}
    status: {{forge: github, api: {base}, token_secret: GH_TOKEN}}
  - repo: "**/acme/app"
    status: {{forge: gitea, api: {base}/gitea, repo: acme/app, token_secret: GITEA_TOKEN}}
  - repo: "**/other/*"
    webhook: {{url: {base}/never}}
"#,
            port = smtp.port
        ),
    )
    .unwrap();
    let secrets = write_secrets(tmp.path());
    let data = tmp.path().join("data");
    let server = Server::start(
        &data,
        &[
            "--notify-config",
            config.to_str().unwrap(),
            "--secrets-file",
            secrets.to_str().unwrap(),
        ],
    );
    let _runner = server.runner(tmp.path(), "r1", &[]);
    let first = submit(&server, &repo, &sha1);
    assert_eq!(server.wait_final(first, LONG)["state"], "failed");
    let sha2 = repo.commit(&[(".kiln.yml", PASSING.as_bytes())], "fix");
    let second = submit(&server, &repo, &sha2);
    assert_eq!(server.wait_final(second, LONG)["state"], "passed");

    wait_for("every delivery delivered", LONG, || {
        let n = undelivered(&data);
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} not delivered"))
        }
    });

    // Webhooks: signed, one per event, in the build's order of events.
    let hooks: Vec<Value> = receiver
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/hook") || r.path == "/never")
        .map(checked_hook)
        .collect();
    let events_of = |id: u64| -> Vec<String> {
        hooks
            .iter()
            .filter(|h| h["build_id"] == id)
            .map(|h| h["event"].as_str().unwrap().to_owned())
            .collect()
    };
    let mut e1 = events_of(first);
    e1.sort();
    assert_eq!(e1, ["failed", "finished", "started"], "{hooks:?}");
    let mut e2 = events_of(second);
    e2.sort();
    assert_eq!(e2, ["finished", "fixed", "started"], "{hooks:?}");
    let failed = hooks
        .iter()
        .find(|h| h["build_id"] == first && h["event"] == "failed")
        .unwrap();
    assert_eq!(failed["commit"], sha1.as_str());
    assert_eq!(failed["branch"], "main");
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["repo"], repo.path_str());
    assert_eq!(
        failed["url"],
        format!("https://ci.example.com/builds/{first}")
    );
    assert_eq!(failed["jobs"][0]["name"], "test");
    assert_eq!(failed["jobs"][0]["state"], "failed");
    assert!(failed["finished_at"].as_i64().unwrap() >= failed["created_at"].as_i64().unwrap());
    let ids: std::collections::HashSet<_> = hooks.iter().map(|h| h["delivery"].clone()).collect();
    assert_eq!(ids.len(), hooks.len(), "delivery ids are unique: {hooks:?}");

    // Mail: the failure and the fix, to both recipients.
    let mails = smtp.mails();
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let fail_mail = &mails[0];
    assert!(
        fail_mail.starts_with("X-Rcpt-To: team@example.com,lead@example.com\r\n"),
        "{fail_mail}"
    );
    assert!(
        fail_mail.contains(&format!("Subject: kiln: acme/app main #{first} failed")),
        "{fail_mail}"
    );
    for want in [
        "test: failed",
        "suite::test_breaks: expected 1, got 2",
        "log line 40",
        "log line 20",
        &format!("https://ci.example.com/builds/{first}"),
    ] {
        assert!(fail_mail.contains(want), "{want:?} missing: {fail_mail}");
    }
    assert!(
        !fail_mail.contains("log line 5\r\n"),
        "more than 30 lines: {fail_mail}"
    );
    let fix_mail = &mails[1];
    assert!(
        fix_mail.contains(&format!("Subject: kiln: acme/app main #{second} fixed")),
        "{fix_mail}"
    );

    // Commit statuses: each forge's path and token, pending first, the verdict last.
    let statuses = |prefix: &str, auth: &str, sha: &str| -> Vec<String> {
        receiver
            .requests()
            .iter()
            .filter(|r| r.path == format!("{prefix}/repos/acme/app/statuses/{sha}"))
            .map(|r| {
                assert_eq!(r.header("authorization"), auth, "{r:?}");
                let b = r.json();
                assert_eq!(b["context"], "kiln");
                assert_eq!(
                    b["target_url"],
                    format!(
                        "https://ci.example.com/builds/{}",
                        if sha == sha1 { first } else { second }
                    )
                );
                b["state"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    for (prefix, auth) in [
        ("", "Bearer gh-token"),
        ("/gitea/api/v1", "token gitea-token"),
    ] {
        let s1 = statuses(prefix, auth, &sha1);
        assert_eq!(
            s1.last().map(String::as_str),
            Some("failure"),
            "{prefix}: {s1:?}"
        );
        assert!(
            s1.iter().take(s1.len() - 1).all(|s| s == "pending"),
            "{s1:?}"
        );
        let s2 = statuses(prefix, auth, &sha2);
        assert_eq!(
            s2.last().map(String::as_str),
            Some("success"),
            "{prefix}: {s2:?}"
        );
    }
    assert!(
        !receiver.requests().iter().any(|r| r.path == "/never"),
        "a rule of another repository was used"
    );
}

/// The webhook receiver is down while the build runs and finishes; the dispatcher is
/// stopped, the receiver comes up, the dispatcher restarts: every planned delivery arrives,
/// once per delivery id.
#[test]
fn deliveries_survive_a_restart_while_the_receiver_is_down() {
    let tmp = tempdir();
    // A port nobody listens on yet.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("acme").join("app"), PASSING);
    let config = tmp.path().join("notify.yml");
    std::fs::write(
        &config,
        format!(
            "delivery: {{first_retry: 100ms, max_retry: 500ms, tries: 1000, timeout: 1s}}\n\
             rules:\n  - repo: \"**\"\n    webhook: {{url: http://127.0.0.1:{port}/hook, secret_secret: HOOK_SECRET}}\n"
        ),
    )
    .unwrap();
    let secrets = write_secrets(tmp.path());
    let data = tmp.path().join("data");
    let args = [
        "--notify-config",
        config.to_str().unwrap(),
        "--secrets-file",
        secrets.to_str().unwrap(),
    ];
    let mut server = Server::start(&data, &args);
    let mut runner = server.runner(tmp.path(), "r1", &[]);
    let id = submit(&server, &repo, &sha);
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");
    // Both deliveries (started, finished) were planned and tried in vain.
    wait_for("failed tries recorded", LONG, || {
        let rows = int_rows(
            &open_db(&data),
            "SELECT COUNT(*), COALESCE(MIN(attempts), 0) FROM deliveries \
             WHERE state = 'pending' AND last_error IS NOT NULL",
        );
        if rows[0][0] == 2 && rows[0][1] >= 1 {
            Ok(())
        } else {
            Err(format!("{rows:?}"))
        }
    });
    server.proc.signal(Signal::SIGKILL);
    server.proc.wait(LONG);
    runner.kill_all();
    drop(server);

    let receiver = Receiver::on(TcpListener::bind(("127.0.0.1", port)).unwrap());
    let server = Server::start(&data, &args);
    wait_for("every delivery delivered after the restart", LONG, || {
        let n = undelivered(&data);
        if n == 0 {
            Ok(())
        } else {
            Err(format!("{n} not delivered"))
        }
    });
    // The delivery log, as the web page and its JSON API show it: the failed tries before the
    // restart are counted.
    let (status, body) =
        kiln_testkit::http_get(&format!("{}/api/builds/{id}/deliveries", server.url), &[]);
    assert_eq!(status, "200", "{body}");
    let log: Value = serde_json::from_str(&body).unwrap();
    let list = log["deliveries"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{log}");
    assert!(
        list.iter()
            .all(|d| d["state"] == "delivered" && d["attempts"].as_u64().unwrap() >= 2),
        "{log}"
    );
    assert!(list.iter().all(|d| d.get("payload").is_none()), "{log}");
    let (status, page) = kiln_testkit::http_get(&format!("{}/builds/{id}", server.url), &[]);
    assert_eq!(status, "200");
    assert_eq!(
        page.matches("<tr class=\"delivery\" data-state=\"delivered\">")
            .count(),
        2,
        "{page}"
    );
    let hooks: Vec<Value> = receiver.requests().iter().map(checked_hook).collect();
    let mut events: Vec<_> = hooks.iter().map(|h| h["event"].as_str().unwrap()).collect();
    events.sort();
    assert_eq!(events, ["finished", "started"], "{hooks:?}");
    let ids: std::collections::HashSet<_> = hooks.iter().map(|h| h["delivery"].clone()).collect();
    assert_eq!(ids.len(), 2, "each delivery id once: {hooks:?}");
    let delivered = int_rows(
        &open_db(&data),
        "SELECT COUNT(*) FROM deliveries WHERE state = 'delivered'",
    );
    assert_eq!(delivered, [[2]]);
    // The metrics say the same, from the store, so the tries before the restart count.
    let tries = int_rows(&open_db(&data), "SELECT SUM(attempts) FROM deliveries")[0][0];
    let (status, metrics) = kiln_testkit::http_get(&format!("{}/metrics", server.url), &[]);
    assert_eq!(status, "200");
    for want in [
        "kiln_notify_deliveries{kind=\"webhook\",state=\"delivered\"} 2\n".to_string(),
        format!("kiln_notify_delivery_tries_total{{kind=\"webhook\"}} {tries}\n"),
    ] {
        assert!(metrics.contains(&want), "{want} not in {metrics}");
    }
    assert!(tries >= 4, "{tries}");
}

/// A bad notify config stops `kiln serve` before it starts, naming the file, line and field.
#[test]
fn a_bad_notify_config_is_a_usage_error() {
    let tmp = tempdir();
    let secrets = write_secrets(tmp.path());
    let check = |text: &str, want: &[&str]| {
        let path = tmp.path().join("bad.yml");
        std::fs::write(&path, text).unwrap();
        let out = kiln(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            tmp.path().join("data").to_str().unwrap(),
            "--secrets-file",
            secrets.to_str().unwrap(),
            "--notify-config",
            path.to_str().unwrap(),
        ]);
        out.expect_code(2);
        for w in want {
            assert!(out.err().contains(w), "{w:?} missing: {out}");
        }
    };
    check(
        "rules:\n  - repo: x\n    webhok: {url: http://a}\n",
        &["bad.yml:3:", "webhok"],
    );
    check(
        "rules:\n  - repo: x\n    status: {forge: github, api: http://a, token_secret: NOPE}\n",
        &["bad.yml: rules[0].status.token_secret", "NOPE"],
    );
}

/// Mail over TLS with a login, as a real relay wants it: STARTTLS (required by the server) and
/// SMTPS, each with the server's certificate from a private CA (`smtp.ca_file`) and the
/// password from the secrets file. A wrong password and an untrusted certificate are failed
/// deliveries that say why, and the build is not held up by them.
#[test]
fn mail_over_starttls_and_smtps_with_a_login() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let (smtp, smtps_port) = Smtp::start_tls(tmp.path(), &tls);
    let secrets = tmp.path().join("secrets.yml");
    std::fs::write(&secrets, "SMTP_PASSWORD: s3cret\nWRONG_PASSWORD: guess\n").unwrap();
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("acme").join("app"), FAILING);
    // (name, port, security, password secret, whether the CA is given): what happens to the
    // failure's mail.
    let cases = [
        ("starttls", smtp.port, "starttls", "SMTP_PASSWORD", true),
        ("smtps", smtps_port, "tls", "SMTP_PASSWORD", true),
        (
            "wrong-password",
            smtp.port,
            "starttls",
            "WRONG_PASSWORD",
            true,
        ),
        ("untrusted", smtps_port, "tls", "SMTP_PASSWORD", false),
    ];
    for (name, port, security, password, with_ca) in cases {
        let config = tmp.path().join(format!("{name}.yml"));
        let ca = if with_ca {
            format!(", ca_file: {}", tls.ca.display())
        } else {
            String::new()
        };
        std::fs::write(
            &config,
            format!(
                "smtp: {{host: 127.0.0.1, port: {port}, security: {security}, from: \"kiln <ci@example.com>\", username: kiln, password_secret: {password}{ca}}}\n\
                 delivery: {{first_retry: 50ms, max_retry: 100ms, tries: 2, timeout: 5s}}\n\
                 rules:\n  - repo: \"**/acme/app\"\n    mail: {{to: [{name}@example.com], on: [failed]}}\n"
            ),
        )
        .unwrap();
        let data = tmp.path().join(format!("data-{name}"));
        let server = Server::start(
            &data,
            &[
                "--notify-config",
                config.to_str().unwrap(),
                "--secrets-file",
                secrets.to_str().unwrap(),
            ],
        );
        let _runner = server.runner(tmp.path(), &format!("r-{name}"), &[]);
        let id = submit(&server, &repo, &sha);
        assert_eq!(server.wait_final(id, LONG)["state"], "failed");
        let api = format!("{}/api/builds/{id}/deliveries", server.url);
        let delivery = wait_for(&format!("{name}: the mail's delivery ends"), LONG, || {
            let out = Command::new("curl")
                .args(["-sS", &api])
                .output()
                .map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            match v["deliveries"].as_array().and_then(|l| {
                l.iter()
                    .find(|d| d["target"].as_str().unwrap_or("").contains("mail"))
            }) {
                Some(d) if d["state"] == "delivered" || d["state"] == "failed" => Ok(d.clone()),
                other => Err(format!("{other:?}")),
            }
        });
        let mail = smtp
            .mails()
            .into_iter()
            .find(|m| m.starts_with(&format!("X-Rcpt-To: {name}@example.com\r\n")));
        if name == "starttls" || name == "smtps" {
            assert_eq!(delivery["state"], "delivered", "{name}: {delivery}");
            let mail = mail.unwrap_or_else(|| panic!("{name}: no mail: {:#?}", smtp.mails()));
            assert!(
                mail.contains("X-Session: tls=yes login=kiln\r\n"),
                "{name}: {mail}"
            );
            assert!(
                mail.contains(&format!("Subject: kiln: acme/app main #{id} failed")),
                "{name}: {mail}"
            );
        } else {
            assert_eq!(delivery["state"], "failed", "{name}: {delivery}");
            assert!(mail.is_none(), "{name}: {mail:?}");
            let error = delivery["last_error"].as_str().unwrap_or("").to_lowercase();
            let why = if name == "wrong-password" {
                "535"
            } else {
                "certificate"
            };
            assert!(error.contains(why), "{name}: {delivery}");
        }
    }
}

//! The runner, end to end, as an attacker's build step sees it: its token is neither in the
//! step's environment nor readable from its ancestors' command lines and environments, whether
//! it came by `KILN_TOKEN`, `--token` or `--token-file`; steps get a scrubbed environment.
//! A runner the dispatcher will never let in (its certificate) stops with the reason; one that
//! cannot reach it yet keeps trying.

use std::path::Path;
use std::process::Command;

use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;

const HEARTBEATS: &[&str] = &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];
/// The farm's runner token, in two halves: the step puts them together to look for the token
/// (so that finding it prints `FOUND ...`, which no masking hides), and this file never holds
/// the whole token in one literal the step's log could echo.
const TOKEN_A: &str = "tok3n-f0r-";
const TOKEN_B: &str = "runn3rs-only";

/// A step that looks for the token everywhere a step can look: its environment, its parent's
/// command line (`/proc/$PPID/cmdline`), and every ancestor's command line and environment.
const PIPELINE: &str = r#"steps:
  - name: look
    env:
      HALF_A: "tok3n-f0r-"
      HALF_B: "runn3rs-only"
    run: |
      needle="${HALF_A}${HALF_B}"
      look() { if grep -aqF -e "$needle" "$2"; then echo "FOUND in $1"; else echo "clean: $1"; fi; }
      env > "$TMPDIR_STEP/env.txt"
      cat "$TMPDIR_STEP/env.txt"
      look "the step's env" "$TMPDIR_STEP/env.txt"
      tr '\0' ' ' < /proc/$PPID/cmdline > "$TMPDIR_STEP/parent.txt"; echo
      echo "parent $PPID: $(cat "$TMPDIR_STEP/parent.txt")"
      look "the parent's cmdline" "$TMPDIR_STEP/parent.txt"
      p=$$
      while [ "$p" -gt 1 ]; do
        tr '\0' '\n' < /proc/$p/cmdline > "$TMPDIR_STEP/c.txt" 2>/dev/null || echo "cmdline of $p unreadable"
        look "cmdline of $p" "$TMPDIR_STEP/c.txt"
        if tr '\0' '\n' < /proc/$p/environ > "$TMPDIR_STEP/e.txt" 2>/dev/null; then
          look "environ of $p" "$TMPDIR_STEP/e.txt"
        else
          echo "environ of $p unreadable"
        fi
        p=$(awk '/^PPid:/ {print $2}' /proc/$p/status)
      done
      echo "walked to the top"
"#;

/// Starts a runner with a given way of getting the token.
fn runner(server: &Server, tmp: &Path, name: &str, how: &str, token: &str) -> Proc {
    let work = tmp.join(format!("work-{name}"));
    let mut cmd = Command::new(kiln_bin());
    cmd.env_remove("KILN_DISPATCHER")
        .env_remove("KILN_LOG")
        .env_remove("KILN_TOKEN")
        .env("RUNNER_OWN_SETTING", "not-for-steps")
        .env("PASSED_ON", "yes-for-steps")
        .args(["--dispatcher", &server.url]);
    match how {
        "env" => {
            cmd.env("KILN_TOKEN", token);
        }
        "flag" => {
            cmd.args(["--token", token]);
        }
        "file" => {
            let file = tmp.join(format!("{name}.token"));
            std::fs::write(&file, format!("{token}\n")).unwrap();
            cmd.args(["runner", "--token-file", file.to_str().unwrap()]);
        }
        _ => unreachable!(),
    }
    if how != "file" {
        cmd.arg("runner");
    }
    cmd.args([
        "--name",
        name,
        "--work-dir",
        work.to_str().unwrap(),
        "--pass-env",
        "PASSED_ON",
    ]);
    Proc::spawn(format!("kiln runner {name}"), cmd)
}

/// For each way of giving a runner its token, a step that looks for it everywhere finds it
/// nowhere, the runner's command line shows no token, and no stored log holds it.
#[test]
fn build_steps_cannot_read_the_runners_token() {
    let token = format!("{TOKEN_A}{TOKEN_B}");
    let tmp = tempdir();
    let step_tmp = tmp.path().join("step-tmp");
    std::fs::create_dir_all(&step_tmp).unwrap();
    let pipeline = PIPELINE.replace("$TMPDIR_STEP", step_tmp.to_str().unwrap());
    let (repo, first) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let data = tmp.path().join("data");
    let mut args = HEARTBEATS.to_vec();
    args.extend_from_slice(&["--runner-token", &token]);
    let server = Server::start(&data, &args);

    for (i, how) in ["env", "flag", "file"].into_iter().enumerate() {
        let name = format!("r-{how}");
        let mut r = runner(&server, tmp.path(), &name, how, &token);
        server.wait_runners_attached(&[&name]);
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", r.pid())).unwrap();
        assert!(
            !contains(&cmdline, token.as_bytes()),
            "{how}: the runner's command line shows its token: {}",
            String::from_utf8_lossy(&cmdline)
        );
        let sha = if i == 0 {
            first.clone()
        } else {
            repo.new_commit(how)
        };
        let id = id_of(&server.submit(&repo.path, &sha));
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{how}: {b}");
        let out = server.cli(&["logs", &id.to_string()]);
        out.expect_code(0);
        let log = format!("{}{}", out.out(), out.err());
        assert!(log.contains("walked to the top"), "{how}: {log}");
        assert!(log.contains("clean: the parent's cmdline"), "{how}: {log}");
        assert!(
            log.contains(&format!("parent {}: ", r.pid())),
            "{how}: the step's parent is not the runner: {log}"
        );
        assert!(
            log.contains(&format!("clean: cmdline of {}", r.pid())),
            "{how}: {log}"
        );
        assert!(
            !log.contains("FOUND"),
            "{how}: the step found the token: {log}"
        );
        assert!(!log.contains(&token), "{how}: {log}");
        assert!(!log.contains("KILN_TOKEN"), "{how}: {log}");
        assert!(log.contains("PATH="), "{how}: {log}");
        assert!(log.contains("PASSED_ON=yes-for-steps"), "{how}: {log}");
        assert!(!log.contains("RUNNER_OWN_SETTING"), "{how}: {log}");
        if how == "flag" {
            let err = String::from_utf8_lossy(&r.stderr()).into_owned();
            assert!(
                err.contains("--token on the command line is visible"),
                "{how}: no warning: {err}"
            );
        }
        r.signal(Signal::SIGTERM);
        r.wait(LONG).expect_code(0);
    }

    let mut server = server;
    server.proc.signal(Signal::SIGTERM);
    server.proc.wait(LONG).expect_code(0);
    let logs = files_under(&data.join("logs"));
    assert!(!logs.is_empty());
    for p in files_under(&data) {
        let bytes = stored_bytes(&p);
        assert!(
            !contains(&bytes, token.as_bytes()),
            "{} holds the token",
            p.display()
        );
    }
}

/// A token file that cannot be read, or is empty, stops the runner with the reason.
#[test]
fn a_bad_token_file_stops_the_runner_with_the_reason() {
    let tmp = tempdir();
    let empty = tmp.path().join("empty.token");
    std::fs::write(&empty, "\n").unwrap();
    let missing = tmp.path().join("missing.token");
    for (file, why) in [
        (&empty, "is empty"),
        (&missing, "cannot read the token file"),
    ] {
        let out = kiln(&[
            "--dispatcher",
            "http://127.0.0.1:9",
            "runner",
            "--token-file",
            file.to_str().unwrap(),
            "--work-dir",
            tmp.path().join("w").to_str().unwrap(),
        ]);
        assert_eq!(out.code(), 2, "{out}");
        assert!(out.err().contains(why), "{out}");
    }
}

/// A TLS dispatcher requiring runner certificates from its CA.
fn mtls_server(tmp: &Path, tls: &TlsFiles) -> Server {
    let ca = tls.ca.to_str().unwrap();
    let mut args = HEARTBEATS.to_vec();
    args.extend_from_slice(&[
        "--server-cert",
        tls.server_cert.to_str().unwrap(),
        "--server-key",
        tls.server_key.to_str().unwrap(),
        "--client-ca",
        ca,
        "--require-runner-cert",
    ]);
    try_start_dispatcher("127.0.0.1:0", &tmp.join("data"), &args, "https")
        .unwrap_or_else(|out| panic!("the TLS dispatcher did not start: {out}"))
}

/// Runners whose certificate the dispatcher rejects (none, or one from another CA), and one
/// that does not trust the dispatcher's certificate, exit non-zero saying why, instead of
/// retrying forever; a good runner still attaches.
#[test]
fn a_runner_whose_certificate_is_refused_stops_with_the_reason() {
    let tmp = tempdir();
    let tls = TlsFiles::generate(&tmp.path().join("pki"));
    let ca = tls.ca.to_str().unwrap();
    let server = mtls_server(tmp.path(), &tls);
    let cases: [(&str, Vec<&str>, &str); 3] = [
        ("bare", vec!["--tls-ca", ca], "client certificate"),
        (
            "rogue",
            vec![
                "--tls-ca",
                ca,
                "--tls-cert",
                tls.rogue_cert.to_str().unwrap(),
                "--tls-key",
                tls.rogue_key.to_str().unwrap(),
            ],
            "refused this runner's certificate",
        ),
        (
            "untrusting",
            vec![],
            "does not trust the dispatcher's certificate",
        ),
    ];
    for (name, global, why) in cases {
        let mut p = spawn_runner(
            &server.url,
            name,
            &tmp.path().join(format!("w-{name}")),
            &global,
            &[],
        );
        let out = p.wait(LONG);
        assert_ne!(out.status.code(), Some(0), "{name}: {out}");
        assert!(out.err().contains(why), "{name}: no {why:?} in {out}");
        if name != "bare" {
            assert!(
                out.err().contains("over TLS, and retrying will not help"),
                "{name}: {out}"
            );
        }
    }
    let cert = [
        "--tls-ca",
        ca,
        "--tls-cert",
        tls.client_cert.to_str().unwrap(),
        "--tls-key",
        tls.client_key.to_str().unwrap(),
    ];
    let _good = spawn_runner(&server.url, "good", &tmp.path().join("w-good"), &cert, &[]);
    wait_attached(&server.url, &["--tls-ca", ca], "good");
}

/// A runner started by a process that left file descriptors open (a supervisor, a CI agent, a
/// shell with `exec 3<file`) does not hand them to its build steps: a step lists its own
/// descriptors and finds only its standard ones.
#[test]
fn build_steps_do_not_inherit_the_runners_open_files() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: fds\n    run: ls -l /proc/$$/fd\n",
    );
    let server = Server::start(&tmp.path().join("data"), HEARTBEATS);
    // An open file the runner inherits: `dup` makes a descriptor without close-on-exec.
    let held = tmp.path().join("held-by-the-runners-parent.txt");
    let file = std::fs::File::create(&held).unwrap();
    let inherited = nix::unistd::dup(&file).unwrap();
    let runner = server.runner(tmp.path(), "r1", &[]);
    drop(inherited);
    server.wait_runners_attached(&["r1"]);
    let runner_fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", runner.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        runner_fds
            .iter()
            .any(|p| p.contains("held-by-the-runners-parent")),
        "the runner did not inherit the file (the test proves nothing): {runner_fds:?}"
    );
    let id = id_of(&server.submit(&repo.path, &sha));
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");
    let log = server.cli(&["logs", &id.to_string()]).expect_code(0).out();
    assert!(!log.contains("held-by-the-runners-parent"), "{log}");
    assert!(log.contains("/dev/null") || log.contains("pipe:"), "{log}");
}

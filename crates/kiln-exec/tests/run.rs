//! End-to-end tests of `kiln_exec::run` against real processes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use kiln_exec::{Chunk, ExecError, MAX_CHUNK, StepCommand, Stream, Termination, run};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

fn step(script: &str) -> StepCommand {
    StepCommand {
        script: script.to_owned(),
        cwd: std::env::temp_dir(),
        env: Vec::new(),
        timeout: None,
        grace: Duration::from_secs(5),
    }
}

/// Output split per stream, plus every chunk as received.
#[derive(Default)]
struct Collected {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    chunks: Vec<Chunk>,
}

impl Collected {
    fn push(&mut self, chunk: Chunk) {
        assert!(!chunk.data.is_empty(), "empty chunk");
        assert!(chunk.data.len() <= MAX_CHUNK, "chunk too large");
        match chunk.stream {
            Stream::Stdout => self.stdout.extend_from_slice(&chunk.data),
            Stream::Stderr => self.stderr.extend_from_slice(&chunk.data),
        }
        self.chunks.push(chunk);
    }
}

/// Runs `cmd` to completion while collecting all of its output.
async fn run_collect(cmd: &StepCommand) -> (kiln_exec::StepExit, Collected) {
    let (tx, mut rx) = mpsc::channel(16);
    let collector = tokio::spawn(async move {
        let mut collected = Collected::default();
        while let Some(chunk) = rx.recv().await {
            collected.push(chunk);
        }
        collected
    });
    let exit = run(cmd, tx, CancellationToken::new()).await.unwrap();
    (exit, collector.await.unwrap())
}

/// Whether `pid` is a live (non-zombie) process.
fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// Waits (bounded) for `pid` to stop being a live process.
async fn wait_gone(pid: i32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn parse_pid(bytes: &[u8]) -> i32 {
    let text = String::from_utf8_lossy(bytes);
    text.lines().next().unwrap().trim().parse().unwrap()
}

#[tokio::test]
async fn output_is_ordered_and_streams_are_separate() {
    let (exit, out) = run_collect(&step(
        "echo out1; echo err1 >&2; echo out2; echo err2 >&2; printf out3",
    ))
    .await;
    assert!(exit.success());
    assert_eq!(out.stdout, b"out1\nout2\nout3");
    assert_eq!(out.stderr, b"err1\nerr2\n");
}

#[tokio::test]
async fn a_line_arrives_while_the_process_is_still_running() {
    let (tx, mut rx) = mpsc::channel(16);
    let handle = tokio::spawn(async move {
        run(
            &step("echo first; sleep 1; echo second"),
            tx,
            CancellationToken::new(),
        )
        .await
    });
    let first = rx.recv().await.unwrap();
    assert!(
        !handle.is_finished(),
        "run completed before the first line was received"
    );
    assert_eq!(first.stream, Stream::Stdout);
    assert_eq!(&first.data[..], b"first\n");
    let second = rx.recv().await.unwrap();
    assert_eq!(&second.data[..], b"second\n");
    assert!(rx.recv().await.is_none());
    assert!(handle.await.unwrap().unwrap().success());
}

#[tokio::test]
async fn non_utf8_bytes_pass_exactly() {
    let (exit, out) = run_collect(&step(r"printf '\377\376'; printf '\000\200' >&2")).await;
    assert!(exit.success());
    assert_eq!(out.stdout, [0xff, 0xfe]);
    assert_eq!(out.stderr, [0x00, 0x80]);
}

#[tokio::test]
async fn exit_codes_are_reported() {
    for code in [0, 1, 3, 255] {
        let (exit, _) = run_collect(&step(&format!("exit {code}"))).await;
        assert_eq!(exit.termination, Termination::Exited(code));
        assert_eq!(exit.success(), code == 0);
    }
}

#[tokio::test]
async fn killed_by_signal_is_reported() {
    let (exit, _) = run_collect(&step("kill -KILL $$")).await;
    assert_eq!(exit.termination, Termination::Signaled(9));
    assert!(!exit.success());
    let (exit, _) = run_collect(&step("kill -TERM $$")).await;
    assert_eq!(exit.termination, Termination::Signaled(15));
}

#[tokio::test]
async fn environment_and_python_unbuffered() {
    let mut cmd = step(r#"printf '%s:%s' "$PYTHONUNBUFFERED" "$KILN_TEST_VAR""#);
    cmd.env.push(("KILN_TEST_VAR".into(), "hello world".into()));
    let (_, out) = run_collect(&cmd).await;
    assert_eq!(out.stdout, b"1:hello world");

    cmd.env.push(("PYTHONUNBUFFERED".into(), "0".into()));
    let (_, out) = run_collect(&cmd).await;
    assert_eq!(out.stdout, b"0:hello world");
}

/// The step sees the allow-listed variables of this process and its own, nothing else: cargo
/// runs this test with `CARGO_*` variables set, and the step must not see them.
#[tokio::test]
async fn environment_is_scrubbed_to_the_allow_list() {
    assert!(
        std::env::var_os("CARGO_MANIFEST_DIR").is_some(),
        "the test needs a variable set in its own environment"
    );
    let path = std::env::var("PATH").unwrap();
    let mut cmd = step("env");
    cmd.env.push(("STEP_OWN".into(), "mine".into()));
    let (exit, out) = run_collect(&cmd).await;
    assert!(exit.success());
    let env = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert!(env.contains(&format!("PATH={path}\n")), "{env}");
    assert!(env.contains("STEP_OWN=mine\n"), "{env}");
    for name in &names {
        assert!(
            kiln_exec::is_inherited(name)
                || [
                    "STEP_OWN",
                    "PYTHONUNBUFFERED",
                    "PWD",
                    "SHLVL",
                    "_",
                    "OLDPWD"
                ]
                .contains(name),
            "the step inherited {name}: {env}"
        );
    }
    assert!(!env.contains("CARGO_MANIFEST_DIR"), "{env}");
}

#[tokio::test]
async fn cwd_is_used_and_stdin_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = step("cat; pwd -P");
    cmd.cwd = dir.path().to_owned();
    let (exit, out) = run_collect(&cmd).await;
    assert!(exit.success());
    let expected = format!("{}\n", dir.path().canonicalize().unwrap().display());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), expected);
}

#[tokio::test]
async fn timeout_sends_sigterm_then_sigkill_after_grace() {
    let mut cmd = step("trap 'echo got-term' TERM; echo started; while :; do sleep 0.05; done");
    cmd.timeout = Some(Duration::from_millis(300));
    cmd.grace = Duration::from_millis(500);
    let started = Instant::now();
    let (exit, out) = run_collect(&cmd).await;
    assert_eq!(exit.termination, Termination::TimedOut);
    assert!(!exit.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.starts_with("started\n"), "{stdout:?}");
    assert!(
        stdout.contains("got-term"),
        "SIGTERM was not delivered: {stdout:?}"
    );
    assert!(exit.duration >= Duration::from_millis(800), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn timeout_of_a_cooperative_process_does_not_wait_for_grace() {
    let mut cmd = step("sleep 100");
    cmd.timeout = Some(Duration::from_millis(100));
    cmd.grace = Duration::from_secs(60);
    let started = Instant::now();
    let (exit, _) = run_collect(&cmd).await;
    assert_eq!(exit.termination, Termination::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn cancel_of_a_silent_process_returns_promptly() {
    let mut cmd = step("sleep 100");
    cmd.grace = Duration::from_secs(60);
    let cancel = CancellationToken::new();
    let (tx, _rx) = mpsc::channel(16);
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let exit = run(&cmd, tx, cancel).await.unwrap();
    assert_eq!(exit.termination, Termination::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(5), "{exit:?}");
}

#[tokio::test]
async fn cancel_and_timeout_are_honoured_while_the_channel_is_full() {
    // Nobody reads the receiver, so the channel fills after one chunk.
    let cmd = step("yes");
    let (tx, rx) = mpsc::channel(1);
    let cancel = CancellationToken::new();
    let trigger = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let exit = run(&cmd, tx, cancel).await.unwrap();
    assert_eq!(exit.termination, Termination::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(rx);

    let mut cmd = step("yes");
    cmd.timeout = Some(Duration::from_millis(200));
    let (tx, rx) = mpsc::channel(1);
    let started = Instant::now();
    let exit = run(&cmd, tx, CancellationToken::new()).await.unwrap();
    assert_eq!(exit.termination, Termination::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(rx);
}

#[tokio::test]
async fn background_grandchild_is_killed_and_does_not_hang() {
    let started = Instant::now();
    let (exit, out) = run_collect(&step("sleep 100 & echo $!; echo done")).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(exit.success());
    let pid = parse_pid(&out.stdout);
    assert!(wait_gone(pid).await, "background process {pid} survived");
}

#[tokio::test]
async fn escaped_grandchild_holding_the_pipe_does_not_hang() {
    // `setsid` moves the sleeper out of the step's process group, so the
    // group kill misses it and it keeps stdout open.
    let started = Instant::now();
    let (exit, out) = run_collect(&step("setsid sleep 100 & echo $!")).await;
    let elapsed = started.elapsed();
    let pid = parse_pid(&out.stdout);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(exit.success());
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn large_output_arrives_complete_with_a_slow_consumer() {
    const SIZE: usize = 50 * 1024 * 1024;
    const PATTERN: &[u8] = b"0123456789\n";
    let (tx, mut rx) = mpsc::channel::<Chunk>(2);
    let consumer = tokio::spawn(async move {
        let mut total = 0usize;
        let mut count = 0usize;
        while let Some(chunk) = rx.recv().await {
            assert_eq!(chunk.stream, Stream::Stdout);
            assert!(!chunk.data.is_empty() && chunk.data.len() <= MAX_CHUNK);
            for (i, byte) in chunk.data.iter().enumerate() {
                assert_eq!(
                    *byte,
                    PATTERN[(total + i) % PATTERN.len()],
                    "at {}",
                    total + i
                );
            }
            total += chunk.data.len();
            count += 1;
            if count.is_multiple_of(8) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        total
    });
    let exit = run(
        &step(&format!("yes 0123456789 | head -c {SIZE}")),
        tx,
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(consumer.await.unwrap(), SIZE);
}

#[tokio::test]
async fn dropped_receiver_discards_output_but_runs_to_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("marker");
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let script = format!(
        "head -c 10000000 /dev/zero; echo err >&2; touch '{}'; exit 7",
        marker.display()
    );
    let exit = run(&step(&script), tx, CancellationToken::new())
        .await
        .unwrap();
    assert_eq!(exit.termination, Termination::Exited(7));
    assert!(marker.exists());
}

#[tokio::test]
async fn missing_cwd_is_a_spawn_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = step("echo hi");
    cmd.cwd = dir.path().join("does-not-exist");
    let (tx, _rx) = mpsc::channel(1);
    let error = run(&cmd, tx, CancellationToken::new()).await.unwrap_err();
    assert!(matches!(error, ExecError::Spawn { .. }), "{error:?}");
    assert!(std::error::Error::source(&error).is_some());
    assert!(error.to_string().contains("does-not-exist"), "{error}");
}

#[tokio::test]
async fn dropping_the_run_future_kills_the_process_group() {
    let (tx, mut rx) = mpsc::channel(16);
    let handle = tokio::spawn(async move {
        run(
            &step("sleep 100 & echo $!; wait"),
            tx,
            CancellationToken::new(),
        )
        .await
    });
    let first = rx.recv().await.unwrap();
    let pid = parse_pid(&first.data);
    assert!(process_alive(pid));
    handle.abort();
    assert!(handle.await.unwrap_err().is_cancelled());
    assert!(wait_gone(pid).await, "background process {pid} survived");
}

//! `kiln-bench trigger`: how long from a `git commit` until the build's first output line is
//! seen at a `kiln logs -f` follower, for the three ways a commit reaches kiln.
//!
//! - **webhook**: the benchmark commits to a repository, then POSTs a signed GitHub-style push
//!   (`X-Hub-Signature-256`) to `POST /webhooks/push` of a `kiln serve --webhook-secret` child,
//!   as a forge would once it received the push.
//! - **hook**: a bare repository with `contrib/hooks/post-receive` installed (the file is
//!   compiled into the benchmark); the benchmark commits in a clone and runs `git push`, whose
//!   hook runs `kiln submit`.
//! - **polling**: a `kiln watch --interval 1s` child watches a repository; the benchmark only
//!   commits.
//!
//! Every commit is made with the `git` program (`git commit -a`), isolated from the user's and
//! system's git configuration. The pipeline's one step prints a line at once, made of shell
//! builtins only (`read n < counter.txt; echo "trigger-line $n"`). One `WatchBuilds` stream,
//! opened in-process before the first commit, notices each new build; on its first event a
//! `kiln logs -f BUILD` child is started, and t1 is when the step's line (the first line not
//! written by kiln itself, `kiln: ...`) is read from its stdout. t0 is taken just before the
//! commit. Builds are sequential, each after a seeded random pause (50–150 ms; for polling,
//! anywhere within one observer interval, so commits fall at every phase of the observer's
//! cycle). Each path first builds one commit that is not counted (mirrors and checkout cache
//! warm). Every build must pass, for the commit made, with the trigger of its path, and its
//! line must carry the commit's counter.
//!
//! The baseline, measured in the same run: the same `git commit`, then the step's command run
//! directly with `sh -c` from this process, until its line is read: what a commit costs
//! before kiln adds anything.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::util::{
    Proc, Scratch, child_log_filter, connect, fail, figure, header, is_final, kiln_command,
    kiln_exe, ms, note, percentile, pipeline, sorted, spawn_serve, tail, wait_exit, wrong,
};
use crate::BenchError;
use kiln::proto::{
    self, JobState, build_service_client::BuildServiceClient,
    runner_admin_service_client::RunnerAdminServiceClient,
};

/// The webhook's shared secret (given to the serve child in its environment).
const SECRET: &str = "kiln-bench-trigger-secret";
/// The step: prints one line at once, with builtins only.
const STEP: &str = r#"read n < counter.txt; echo "trigger-line $n""#;
/// How the step's line starts.
const MARK: &str = "trigger-line ";
/// The sample post-receive hook.
const HOOK: &str = include_str!("../../../contrib/hooks/post-receive");
/// Goal for the webhook and hook paths' median, ms.
const GOAL_PUSH_MS: f64 = 300.0;
/// Goal for the polling path's median with a 1 s interval, ms.
const GOAL_POLL_MS: f64 = 1300.0;

/// `kiln-bench trigger`.
#[derive(Debug, Clone, Args)]
pub struct TriggerArgs {
    /// Commits measured per path (one more per path, the first, warms the caches and is not
    /// counted).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub commits: u32,
    /// The observer's interval on the polling path (`kiln watch --interval`).
    #[arg(long, default_value = "1s", value_parser = kiln::observer::parse_interval)]
    pub interval: Duration,
    /// Seed of the random pauses before the commits.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl TriggerArgs {
    /// The benchmark's own time limit.
    pub fn limit(&self) -> Duration {
        Duration::from_secs(180)
            + (self.interval + Duration::from_secs(10)) * 3 * (self.commits + 1)
    }
}

/// One path's build, times in ms from t0 (just before the commit).
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// `git commit` returned.
    committed: f64,
    /// The trigger returned: webhook answered, `git push` returned (for polling: = committed).
    triggered: f64,
    /// The build's first `WatchBuilds` event arrived.
    created: f64,
    /// The job's `running` event arrived.
    running: f64,
    /// The step's line was read from the follower.
    first_line: f64,
    /// The build's final event arrived.
    finished: f64,
}

/// What a trigger did.
struct Triggered {
    /// The commit made.
    sha: String,
    /// When `git commit` returned.
    committed: Instant,
    /// When the trigger returned.
    done: Instant,
}

/// Runs the benchmark.
pub async fn run(args: &TriggerArgs) -> Result<(), BenchError> {
    header(
        "trigger",
        &format!(
            "commit to the build's first output line at a `kiln logs -f` follower, by webhook, post-receive hook and polling (`kiln watch --interval {}`), {} commits each",
            humantime::format_duration(args.interval),
            args.commits
        ),
    );
    let version = git(Path::new("."), &["--version"], &[])
        .await
        .map_err(|e| {
            fail(format!(
                "the trigger benchmark needs the git program: {}",
                e.message
            ))
        })?;
    let tmp = Scratch::new()?;
    let dir = tmp.path();
    let mut rng = StdRng::seed_from_u64(args.seed);

    // Baseline: git commit, then the step's command run directly.
    let (base, base_commit) = baseline(dir, args.commits, &mut rng).await?;
    let base = sorted(&base);
    let (b50, b90) = (percentile(&base, 50.0), percentile(&base, 90.0));
    figure(
        "baseline (commit + sh), median",
        format!("{b50:.1} ms"),
        "",
        None,
        &format!(
            "p90 {b90:.1} ms; `git commit` alone: median {:.1} ms",
            percentile(&sorted(&base_commit), 50.0)
        ),
    );

    let mut farm = Farm::start(dir).await?;
    let report = |name: &str, goal: f64, trigger: Option<&str>, t: &[Timing]| {
        let col = |f: fn(&Timing) -> f64| sorted(&t.iter().map(f).collect::<Vec<_>>());
        let total = col(|t| t.first_line);
        let (m, p) = (percentile(&total, 50.0), percentile(&total, 90.0));
        figure(
            &format!("{name}, median"),
            format!("{m:.0} ms"),
            &format!("goal < {goal} ms"),
            Some(m < goal),
            &format!("baseline {b50:.1} ms, ratio {:.1}x", m / b50),
        );
        figure(
            &format!("{name}, p90"),
            format!("{p:.0} ms"),
            "",
            None,
            &format!("baseline {b90:.1} ms, ratio {:.1}x", p / b90),
        );
        let line = |q: f64| {
            let triggered = trigger
                .map(|what| format!(", {what} {:.1}", percentile(&col(|t| t.triggered), q)))
                .unwrap_or_default();
            format!(
                "committed {:.1}{triggered}, build created {:.1}, job running {:.1}, first line {:.1}, build finished {:.1}",
                percentile(&col(|t| t.committed), q),
                percentile(&col(|t| t.created), q),
                percentile(&col(|t| t.running), q),
                percentile(&col(|t| t.first_line), q),
                percentile(&col(|t| t.finished), q),
            )
        };
        note(format!(
            "{name} timeline (ms from t0), medians: {}",
            line(50.0)
        ));
        note(format!(
            "{name} timeline (ms from t0), p90:     {}",
            line(90.0)
        ));
    };

    let webhook = webhook_path(&mut farm, dir, args.commits, &mut rng).await?;
    report("webhook", GOAL_PUSH_MS, Some("webhook answered"), &webhook);
    let hook = hook_path(&mut farm, dir, args.commits, &mut rng).await?;
    report("hook", GOAL_PUSH_MS, Some("git push returned"), &hook);
    let polling = polling_path(&mut farm, dir, args, &mut rng).await?;
    let poll_name = format!("polling {}", humantime::format_duration(args.interval));
    let poll_goal = if args.interval == Duration::from_secs(1) {
        GOAL_POLL_MS
    } else {
        // The goal is for a 1 s interval: half an interval of waiting on average, plus 800 ms.
        ms(args.interval) / 2.0 + 800.0
    };
    report(&poll_name, poll_goal, None, &polling);
    note(format!(
        "{} builds per path after one warm-up build, all passed with their own line; one `kiln runner` (1 slot); {}",
        args.commits,
        version.trim()
    ));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// git
// ---------------------------------------------------------------------------------------------

/// Runs `git ARGS` in `dir`, isolated from the user's and system's configuration, with none of
/// the caller's `KILN_*` variables (but `env`); returns its stdout, fails on a non-zero exit.
async fn git(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String, BenchError> {
    let mut cmd = tokio::process::Command::new("git");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KILN_") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "kiln bench")
        .env("GIT_AUTHOR_EMAIL", "bench@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "kiln bench")
        .env("GIT_COMMITTER_EMAIL", "bench@kiln.invalid")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("git {}", args.join(" "));
    let mut p = Proc::spawn(&what, cmd)?;
    let (mut out, mut err) = (
        p.child.stdout.take().ok_or_else(|| fail("no stdout"))?,
        p.child.stderr.take().ok_or_else(|| fail("no stderr"))?,
    );
    let (mut o, mut e) = (Vec::new(), Vec::new());
    let read = async {
        let (a, b) = tokio::join!(out.read_to_end(&mut o), err.read_to_end(&mut e));
        a.and(b)
    };
    match tokio::time::timeout(Duration::from_secs(60), read).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(fail(format!("{what}: {e}"))),
        Err(_) => return Err(fail(format!("{what} did not finish within 60 s"))),
    }
    let code = wait_exit(&mut p, Duration::from_secs(10)).await?;
    let stderr = String::from_utf8_lossy(&e).into_owned();
    if code != 0 {
        return Err(fail(format!("{what} exited {code}: {}", stderr.trim())));
    }
    // Hooks write to the pusher's stderr; keep it with stdout for the callers that look.
    Ok(String::from_utf8_lossy(&o).into_owned() + &stderr)
}

/// `git init` of a repository on branch `main` at `dir`; returns its canonical path.
async fn git_init(dir: &Path, bare: bool) -> Result<PathBuf, BenchError> {
    std::fs::create_dir_all(dir).map_err(fail)?;
    let mut args = vec!["init", "-q", "--initial-branch=main"];
    if bare {
        args.push("--bare");
    }
    args.push(".");
    git(dir, &args, &[]).await?;
    std::fs::canonicalize(dir).map_err(fail)
}

/// Commits `counter.txt` = `n` in the work tree `dir` with `git commit` (the first commit, with
/// `n == 0`, also adds `.kiln.yml`); returns the commit id and when `git commit` returned.
async fn commit(dir: &Path, n: u32) -> Result<(String, Instant), BenchError> {
    std::fs::write(dir.join("counter.txt"), format!("{n}\n")).map_err(fail)?;
    let message = format!("trigger {n}");
    if n == 0 {
        std::fs::write(dir.join(".kiln.yml"), pipeline("first-line", STEP)).map_err(fail)?;
        git(dir, &["add", "-A"], &[]).await?;
    }
    git(dir, &["commit", "-q", "-a", "-m", &message], &[]).await?;
    let done = Instant::now();
    let repo = git2::Repository::open(dir).map_err(fail)?;
    let head = repo.head().and_then(|h| h.peel_to_commit()).map_err(fail)?;
    Ok((head.id().to_string(), done))
}

/// A seeded pause in `[lo, hi)` ms.
async fn pause(rng: &mut StdRng, lo: u64, hi: u64) {
    let d = rng.random_range(lo..hi.max(lo + 1));
    tokio::time::sleep(Duration::from_millis(d)).await;
}

/// The baseline: `git commit`, then `sh -c STEP` run directly until its line is read. Returns
/// the totals and the commit times, ms.
async fn baseline(
    dir: &Path,
    commits: u32,
    rng: &mut StdRng,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    let repo = git_init(&dir.join("baseline"), false).await?;
    commit(&repo, 0).await?;
    let (mut total, mut committed) = (Vec::new(), Vec::new());
    for n in 1..=commits {
        pause(rng, 50, 150).await;
        let t0 = Instant::now();
        let (_, c) = commit(&repo, n).await?;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", STEP])
            .current_dir(&repo)
            .stdout(Stdio::piped());
        let mut p = Proc::spawn("sh", cmd)?;
        let out = p.child.stdout.take().ok_or_else(|| fail("no stdout"))?;
        let mut lines = BufReader::new(out).lines();
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .map_err(|_| fail("the baseline step printed nothing within 10 s"))?
            .map_err(fail)?;
        let t1 = Instant::now();
        if line.as_deref() != Some(&format!("{MARK}{n}")) {
            return Err(wrong(format!("the baseline step printed {line:?}")));
        }
        wait_exit(&mut p, Duration::from_secs(10)).await?;
        total.push(ms(t1 - t0));
        committed.push(ms(c - t0));
    }
    Ok((total, committed))
}

// ---------------------------------------------------------------------------------------------
// The dispatcher, the runner, the builds' events
// ---------------------------------------------------------------------------------------------

/// A `kiln serve --webhook-secret` child, one `kiln runner` child, and one `WatchBuilds` stream.
struct Farm {
    /// `http://127.0.0.1:PORT`.
    url: String,
    /// `127.0.0.1:PORT`.
    addr: String,
    /// Builds client.
    client: BuildServiceClient<Channel>,
    /// Every build event, with when it arrived.
    events: mpsc::UnboundedReceiver<(Instant, proto::BuildEvent)>,
    /// Forwards the `WatchBuilds` stream to `events`.
    watcher: JoinHandle<()>,
    /// The newest build seen.
    last_build: u64,
    /// Logs of the children, for errors.
    serve_log: PathBuf,
    /// Killed before the dispatcher.
    _runner: Proc,
    _serve: Proc,
}

impl Drop for Farm {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// A file for a child's stderr.
fn log_file(path: &Path) -> Result<std::fs::File, BenchError> {
    std::fs::File::create(path).map_err(|e| fail(format!("{}: {e}", path.display())))
}

impl Farm {
    async fn start(dir: &Path) -> Result<Farm, BenchError> {
        let serve_log = dir.join("serve.log");
        let (serve, addr) = spawn_serve(
            &serve_log,
            "127.0.0.1:0",
            &dir.join("data"),
            &["--webhook-secret", SECRET],
        )
        .await?;
        let Some(addr) = addr else {
            return Err(fail(format!(
                "kiln serve did not say where it listens; its log:\n{}",
                tail(&serve_log, 20)
            )));
        };
        let url = format!("http://{addr}");

        // Ready when a read answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut client = loop {
            if let Ok(ch) = connect(&url).await {
                let mut c = BuildServiceClient::new(ch);
                if c.list_builds(proto::ListBuildsRequest::default())
                    .await
                    .is_ok()
                {
                    break c;
                }
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "kiln serve at {url} does not answer; its log:\n{}",
                    tail(&serve_log, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        let name = "bench-trigger";
        let runner_log = dir.join("runner.log");
        let mut cmd = kiln_command()?;
        cmd.args(["--dispatcher", &url, "runner", "--name", name, "--work-dir"])
            .arg(dir.join("runner"))
            .env("KILN_CACHE_DIR", dir.join("runner-mirrors"))
            .env("KILN_LOG", child_log_filter())
            .stdout(Stdio::null())
            .stderr(log_file(&runner_log)?);
        let runner = Proc::spawn("kiln runner", cmd)?;
        let mut admin = RunnerAdminServiceClient::new(connect(&url).await?);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let idle = admin
                .list_runners(proto::ListRunnersRequest {})
                .await
                .map(|r| {
                    r.into_inner()
                        .runners
                        .iter()
                        .any(|r| r.name == name && r.state == proto::RunnerState::Idle as i32)
                })
                .unwrap_or(false);
            if idle {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "the runner did not attach within 30 s; its log:\n{}",
                    tail(&runner_log, 20)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut watch = client
            .watch_builds(proto::WatchBuildsRequest { build_id: 0 })
            .await
            .map_err(|s| fail(format!("WatchBuilds: {}", s.message())))?
            .into_inner();
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = tokio::spawn(async move {
            while let Ok(Some(ev)) = watch.message().await {
                if tx.send((Instant::now(), ev)).is_err() {
                    return;
                }
            }
        });
        Ok(Farm {
            addr: addr.clone(),
            url,
            client,
            events,
            watcher,
            last_build: 0,
            serve_log,
            _runner: runner,
            _serve: serve,
        })
    }

    /// The next build event before `deadline`.
    async fn next_event(
        &mut self,
        deadline: Instant,
        waiting_for: &str,
    ) -> Result<(Instant, proto::BuildEvent), BenchError> {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.events.recv()).await {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(fail("the WatchBuilds stream ended")),
            Err(_) => Err(fail(format!(
                "{waiting_for}: nothing within the time allowed; the dispatcher's log:\n{}",
                tail(&self.serve_log, 10)
            ))),
        }
    }

    /// Measures one build: `trigger` (already running, started at `t0`) commits `n` and makes
    /// kiln build it; the first event of a new build starts a `kiln logs -f` follower. Checks
    /// that the build is of the commit made, by `trigger_name`, passed, and printed its line.
    async fn measure(
        &mut self,
        t0: Instant,
        trigger: JoinHandle<Result<Triggered, BenchError>>,
        n: u32,
        trigger_name: &str,
        wait: Duration,
    ) -> Result<Timing, BenchError> {
        let what = format!("{trigger_name} build of commit {n}");
        let deadline = Instant::now() + wait;
        let mut trigger = trigger;
        let mut triggered = None;
        let waiting = format!("waiting for the {what}");
        let last = self.last_build;
        let (build_id, created) = loop {
            tokio::select! {
                next = self.next_event(deadline, &waiting) => {
                    let (at, ev) = next?;
                    if ev.build_id > last {
                        break (ev.build_id, at);
                    }
                }
                // A trigger that fails says why at once.
                done = &mut trigger, if triggered.is_none() => match done {
                    Ok(Ok(t)) => triggered = Some(t),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(fail(format!("the trigger task failed: {e}"))),
                },
            }
        };
        self.last_build = build_id;

        let mut cmd = kiln_command()?;
        cmd.args([
            "--dispatcher",
            &self.url,
            "logs",
            "-f",
            &build_id.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
        let mut follower = Proc::spawn("kiln logs -f", cmd)?;
        let out = follower
            .child
            .stdout
            .take()
            .ok_or_else(|| fail("the follower has no stdout"))?;
        let (tx, first) = oneshot::channel::<(Instant, String)>();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(out).lines();
            let mut tx = Some(tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if !line.starts_with("kiln: ")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send((Instant::now(), line));
                }
            }
        });

        let deadline = Instant::now() + Duration::from_secs(60);
        let mut running = None;
        let (finished, state) = loop {
            let (at, ev) = self
                .next_event(
                    deadline,
                    &format!("waiting for the end of build {build_id}"),
                )
                .await?;
            if ev.build_id != build_id {
                continue;
            }
            if ev.job_id != 0 && ev.state == JobState::Running as i32 {
                running.get_or_insert(at);
            }
            if ev.job_id == 0 && is_final(ev.state) {
                break (at, ev.state);
            }
        };
        let seen = tokio::time::timeout(Duration::from_secs(30), first).await;
        let code = wait_exit(&mut follower, Duration::from_secs(30)).await?;
        reader.abort();
        let triggered = match triggered {
            Some(t) => t,
            None => match tokio::time::timeout(Duration::from_secs(60), trigger).await {
                Ok(Ok(r)) => r?,
                Ok(Err(e)) => return Err(fail(format!("the trigger task failed: {e}"))),
                Err(_) => return Err(fail(format!("the {trigger_name} trigger did not return"))),
            },
        };
        let build = self
            .client
            .get_build(proto::GetBuildRequest { build_id })
            .await
            .map_err(|s| fail(format!("GetBuild {build_id}: {}", s.message())))?
            .into_inner();
        if build.commit != triggered.sha || build.trigger != trigger_name {
            return Err(wrong(format!(
                "build {build_id} is of {} by {:?}; expected {} by {trigger_name:?}",
                build.commit, build.trigger, triggered.sha
            )));
        }
        if state != JobState::Passed as i32 || code != 0 {
            return Err(wrong(format!(
                "build {build_id} ({what}) ended {} (follower exit {code}): {}",
                kiln::convert::state_name(state),
                build.error
            )));
        }
        let (t1, line) = match seen {
            Ok(Ok(seen)) => seen,
            _ => {
                return Err(wrong(format!(
                    "the follower of build {build_id} never showed the step's line"
                )));
            }
        };
        if line != format!("{MARK}{n}") {
            return Err(wrong(format!(
                "the follower of build {build_id} showed {line:?}, expected \"{MARK}{n}\""
            )));
        }
        let since = |t: Instant| ms(t.saturating_duration_since(t0));
        Ok(Timing {
            committed: since(triggered.committed),
            triggered: since(triggered.done),
            created: since(created),
            running: running.map_or(f64::NAN, since),
            first_line: since(t1),
            finished: since(finished),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The three paths
// ---------------------------------------------------------------------------------------------

/// POSTs a signed GitHub-style push of `after` on `main` of `repo`; fails unless it is
/// answered 202 with a build.
async fn post_push(addr: &str, repo: &str, before: &str, after: &str) -> Result<(), BenchError> {
    let body = serde_json::json!({
        "ref": "refs/heads/main",
        "before": before,
        "after": after,
        "forced": false,
        "commits": [{"id": after}],
        "repository": {"clone_url": repo},
    })
    .to_string();
    let sig = kiln::webhook::signature(SECRET.as_bytes(), body.as_bytes());
    let request = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-GitHub-Event: push\r\nX-Hub-Signature-256: sha256={sig}\r\nConnection: close\r\n\r\n{body}",
        kiln::webhook::PUSH_PATH,
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| fail("the webhook did not answer within 30 s"))?
        .map_err(|e| fail(format!("webhook: {e}")))?;
    let text = String::from_utf8_lossy(&answer);
    let status = text.split_whitespace().nth(1).unwrap_or("");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    if status != "202" || !body.contains("\"builds\":[") || body.contains("\"builds\":[]") {
        return Err(fail(format!(
            "the webhook answered {status}: {}",
            body.trim()
        )));
    }
    Ok(())
}

/// Webhook: commit, then POST the push.
async fn webhook_path(
    farm: &mut Farm,
    dir: &Path,
    commits: u32,
    rng: &mut StdRng,
) -> Result<Vec<Timing>, BenchError> {
    let repo = git_init(&dir.join("webhook-repo"), false).await?;
    let repo_str = repo.to_string_lossy().into_owned();
    let mut before = "0".repeat(40);
    let mut out = Vec::new();
    for n in 0..=commits {
        pause(rng, 50, 150).await;
        let t0 = Instant::now();
        let task = {
            let (repo, repo_str, addr, before) = (
                repo.clone(),
                repo_str.clone(),
                farm.addr.clone(),
                before.clone(),
            );
            tokio::spawn(async move {
                let (sha, committed) = commit(&repo, n).await?;
                post_push(&addr, &repo_str, &before, &sha).await?;
                Ok(Triggered {
                    sha,
                    committed,
                    done: Instant::now(),
                })
            })
        };
        let t = farm
            .measure(t0, task, n, kiln::webhook::TRIGGER, Duration::from_secs(30))
            .await?;
        before = git2::Repository::open(&repo)
            .and_then(|r| r.head()?.peel_to_commit().map(|c| c.id().to_string()))
            .map_err(fail)?;
        if n > 0 {
            out.push(t);
        }
    }
    Ok(out)
}

/// Hook: commit in a clone, then `git push` to a bare repository whose post-receive hook is
/// kiln's sample.
async fn hook_path(
    farm: &mut Farm,
    dir: &Path,
    commits: u32,
    rng: &mut StdRng,
) -> Result<Vec<Timing>, BenchError> {
    use std::os::unix::fs::PermissionsExt;
    let bare = git_init(&dir.join("hook.git"), true).await?;
    let hook = bare.join("hooks").join("post-receive");
    std::fs::create_dir_all(bare.join("hooks")).map_err(fail)?;
    std::fs::write(&hook, HOOK).map_err(fail)?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).map_err(fail)?;
    let bare_str = bare.to_string_lossy().into_owned();
    git(dir, &["clone", "-q", &bare_str, "hook-work"], &[]).await?;
    let work = dir.join("hook-work");
    git(&work, &["symbolic-ref", "HEAD", "refs/heads/main"], &[]).await?;
    let kiln = kiln_exe()?.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for n in 0..=commits {
        pause(rng, 50, 150).await;
        let t0 = Instant::now();
        let task = {
            let (work, url, kiln) = (work.clone(), farm.url.clone(), kiln.clone());
            tokio::spawn(async move {
                let (sha, committed) = commit(&work, n).await?;
                let said = git(
                    &work,
                    &["push", "-q", "origin", "main"],
                    &[("KILN_DISPATCHER", &url), ("KILN_BIN", &kiln)],
                )
                .await?;
                let done = Instant::now();
                if said.contains("kiln: warning") {
                    return Err(fail(format!("the hook failed: {}", said.trim())));
                }
                Ok(Triggered {
                    sha,
                    committed,
                    done,
                })
            })
        };
        let t = farm
            .measure(t0, task, n, "hook", Duration::from_secs(30))
            .await?;
        if n > 0 {
            out.push(t);
        }
    }
    Ok(out)
}

/// Polling: a `kiln watch --interval I` child watches the repository; the benchmark commits.
async fn polling_path(
    farm: &mut Farm,
    dir: &Path,
    args: &TriggerArgs,
    rng: &mut StdRng,
) -> Result<Vec<Timing>, BenchError> {
    let repo = git_init(&dir.join("polled-repo"), false).await?;
    // The first commit is there before the observer starts; it builds it (its first pass on
    // a branch without a cursor), not counted.
    let t0 = Instant::now();
    let (sha, committed) = commit(&repo, 0).await?;
    let watch_log = dir.join("watch.log");
    let interval = humantime::format_duration(args.interval).to_string();
    let mut cmd = kiln_command()?;
    cmd.args(["--dispatcher", &farm.url, "watch", "--repo"])
        .arg(&repo)
        .args(["--branch", "main", "--interval", &interval, "--work-dir"])
        .arg(dir.join("observer"))
        .env("KILN_LOG", child_log_filter())
        .stdout(Stdio::null())
        .stderr(log_file(&watch_log)?);
    let mut observer = Proc::spawn("kiln watch", cmd)?;
    let wait = args.interval + Duration::from_secs(30);
    let first = tokio::spawn(async move {
        Ok(Triggered {
            sha,
            committed,
            done: committed,
        })
    });
    if let Err(e) = farm.measure(t0, first, 0, "observer", wait).await {
        return Err(fail(format!(
            "{}; the observer's log:\n{}",
            e.message,
            tail(&watch_log, 10)
        )));
    }
    let mut out = Vec::new();
    let cycle = args.interval.as_millis() as u64;
    for n in 1..=args.commits {
        pause(rng, 0, cycle).await;
        if let Ok(Some(status)) = observer.child.try_wait() {
            return Err(fail(format!(
                "kiln watch exited ({status}); its log:\n{}",
                tail(&watch_log, 10)
            )));
        }
        let t0 = Instant::now();
        let task = {
            let repo = repo.clone();
            tokio::spawn(async move {
                let (sha, committed) = commit(&repo, n).await?;
                Ok(Triggered {
                    sha,
                    committed,
                    done: committed,
                })
            })
        };
        out.push(farm.measure(t0, task, n, "observer", wait).await?);
    }
    Ok(out)
}

//! Shared helpers for kiln's end-to-end tests: real `kiln` processes (killed on drop, with
//! everything they started), real git repositories in temp dirs, the CLI and the gRPC API,
//! and waiting on conditions with a deadline instead of sleeping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod browser;
pub mod fault;
pub mod otlp;
pub mod process;

pub use process::{comm_of, descendants, kill_tree};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::proto;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// The `kiln` binary under test: `$KILN_BIN`, or the `kiln` cargo built beside the running
/// test binary (integration tests run from `target/PROFILE/deps`, benchmarks from
/// `target/PROFILE`, the binary is `target/PROFILE/kiln`).
pub fn kiln_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("KILN_BIN") {
            return path.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the running test binary's path");
        let mut dir = exe.parent().expect("a directory").to_path_buf();
        if dir.ends_with("deps") {
            dir.pop();
        }
        let bin = dir.join("kiln");
        assert!(
            bin.is_file(),
            "no kiln binary at {} (run the tests with cargo, which builds it, or set KILN_BIN)",
            bin.display()
        );
        bin.to_string_lossy().into_owned()
    })
}

/// A directory for the test run's shared scratch (cargo's `target/tmp`), beside the binary.
pub fn target_tmpdir() -> PathBuf {
    let bin = Path::new(kiln_bin());
    bin.parent()
        .and_then(Path::parent)
        .map_or_else(std::env::temp_dir, |target| target.join("tmp"))
}

/// Generous deadline for anything that should happen "soon" on a loaded machine.
pub const LONG: Duration = Duration::from_secs(60);
/// How often conditions are polled.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Ok`, or panics after `timeout` with `what` and the last
/// `Err` it returned (what was last seen).
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) => {
                if start.elapsed() > timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        std::thread::sleep(POLL);
    }
}

// ---------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------

/// Output of a finished command.
#[derive(Debug)]
pub struct Out {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: Vec<u8>,
}

impl Out {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self}"))
    }

    /// Stdout as text (lossy).
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Stderr as text (lossy).
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Stdout parsed as one JSON value.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self}"))
    }

    /// Asserts the exit code, showing the output otherwise.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.status.code(),
            Some(code),
            "unexpected exit status: {self}"
        );
        self
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status,
            self.out(),
            self.err()
        )
    }
}

/// A spawned process whose stdout and stderr are collected in the background. Dropping it
/// kills the process and everything it started (even when the test panics); when the test is
/// panicking, the tail of its stderr is printed to help find out why.
pub struct Proc {
    /// A name for messages.
    pub name: String,
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers_done: mpsc::Receiver<()>,
    readers: Vec<JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn pump(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
    done: mpsc::Sender<()>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => into.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
        let _ = done.send(());
    })
}

impl Proc {
    /// Spawns `cmd` with stdin from /dev/null and stdout/stderr collected.
    pub fn spawn(name: impl Into<String>, cmd: Command) -> Proc {
        Proc::spawn_with_stdout(name, cmd, Stdio::piped())
    }

    /// Spawns `cmd` with stdin from /dev/null, this stdout (collected if piped) and stderr
    /// collected.
    pub fn spawn_with_stdout(name: impl Into<String>, mut cmd: Command, stdout: Stdio) -> Proc {
        let name = name.into();
        // A runner's default mirror cache, unless the test names one: under cargo's temp dir for
        // tests, not the user's (`Server::runner` gives each test its own).
        if cmd.get_program() == kiln_bin() && !cmd.get_envs().any(|(k, _)| k == "KILN_CACHE_DIR") {
            cmd.env("KILN_CACHE_DIR", target_tmpdir().join("runner-mirrors"));
        }
        cmd.stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name} ({cmd:?}): {e}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let mut readers = vec![pump(
            child.stderr.take().unwrap(),
            stderr.clone(),
            tx.clone(),
        )];
        if let Some(out) = child.stdout.take() {
            readers.push(pump(out, stdout.clone(), tx));
        }
        Proc {
            name,
            child,
            stdout,
            stderr,
            readers_done: rx,
            readers,
            status: None,
        }
    }

    /// Spawns `kiln` with these arguments.
    pub fn kiln(name: impl Into<String>, args: &[&str]) -> Proc {
        let mut cmd = Command::new(kiln_bin());
        cmd.args(args)
            .env_remove("KILN_DISPATCHER")
            .env_remove("KILN_TIMEOUT")
            .env_remove("KILN_LOG");
        Proc::spawn(name, cmd)
    }

    /// Spawns `kiln` with these arguments, its stdout a pipe whose reader is already closed
    /// (as `kiln ... | head` once `head` has read enough), so its first write fails.
    pub fn kiln_closed_stdout(name: impl Into<String>, args: &[&str]) -> Proc {
        let (reader, writer) = nix::unistd::pipe().unwrap();
        drop(reader);
        let mut cmd = Command::new(kiln_bin());
        cmd.args(args)
            .env_remove("KILN_DISPATCHER")
            .env_remove("KILN_LOG");
        Proc::spawn_with_stdout(name, cmd, Stdio::from(writer))
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// What it wrote on stdout so far.
    pub fn stdout(&self) -> Vec<u8> {
        self.stdout.lock().unwrap().clone()
    }

    /// What it wrote on stderr so far.
    pub fn stderr(&self) -> Vec<u8> {
        self.stderr.lock().unwrap().clone()
    }

    /// Its exit status, if it exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().unwrap();
        }
        self.status
    }

    /// Sends a signal to the process itself.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            kill(Pid::from_raw(self.pid()), sig).unwrap();
        }
    }

    /// Waits for stdout to contain `needle`; panics after `timeout` with what it wrote.
    pub fn wait_stdout(&mut self, needle: &[u8], timeout: Duration) {
        let what = format!(
            "{} to print {:?}",
            self.name,
            String::from_utf8_lossy(needle)
        );
        let mut exited_at: Option<Instant> = None;
        wait_for(&what, timeout, || {
            let out = self.stdout();
            if contains(&out, needle) {
                return Ok(());
            }
            let status = self.child.try_wait().ok().flatten();
            let last = format!(
                "stdout {:?}, stderr {:?}, exit {status:?}",
                String::from_utf8_lossy(&out),
                String::from_utf8_lossy(&self.stderr()),
            );
            // Once it has exited (and its pipes had a moment to drain), waiting is pointless.
            if status.is_some()
                && exited_at.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(2)
            {
                panic!("{what}: it exited without printing it; {last}");
            }
            Err(last)
        });
    }

    /// Waits for the process to exit (and its output to be collected); panics after
    /// `timeout` with what it wrote so far.
    pub fn wait(&mut self, timeout: Duration) -> Out {
        let name = self.name.clone();
        let status = wait_for(&format!("{name} to exit"), timeout, || {
            match self.try_status() {
                Some(s) => Ok(s),
                None => Err(format!(
                    "still running; stdout {:?}, stderr {:?}",
                    String::from_utf8_lossy(&self.stdout()),
                    String::from_utf8_lossy(&self.stderr())
                )),
            }
        });
        // The pipes reach EOF once every holder has closed them; do not wait forever on a
        // grandchild that kept one.
        for _ in 0..self.readers.len() {
            let _ = self.readers_done.recv_timeout(Duration::from_secs(10));
        }
        Out {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }

    /// Kills the process and everything it started (SIGKILL), and reaps it.
    pub fn kill_all(&mut self) {
        if self.try_status().is_none() {
            kill_tree(self.pid());
            self.status = Some(self.child.wait().unwrap());
        } else {
            // It exited; whatever it left behind is no longer its descendant, nothing to find.
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            let err = self.stderr();
            let tail = &err[err.len().saturating_sub(6000)..];
            eprintln!(
                "===== {} (pid {}) exit {:?}; last stderr:\n{}\n===== end of {}",
                self.name,
                self.child.id(),
                self.status,
                String::from_utf8_lossy(tail),
                self.name
            );
        }
    }
}

/// Whether `hay` contains `needle`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || hay.windows(needle.len()).any(|w| w == needle)
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Runs `kiln` with these arguments to its end (deadline: [`LONG`]).
pub fn kiln(args: &[&str]) -> Out {
    Proc::kiln(format!("kiln {}", args.join(" ")), args).wait(LONG)
}

// ---------------------------------------------------------------------------------------------
// Dispatcher and runners
// ---------------------------------------------------------------------------------------------

/// A running `kiln serve`.
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Server {
    /// Starts `kiln serve --listen 127.0.0.1:0 --data-dir DIR EXTRA...` and reads its port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let dir = data_dir.to_str().unwrap();
        let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--data-dir", dir];
        args.extend_from_slice(extra);
        let mut proc = Proc::kiln("kiln serve", &args);
        let prefix = b"kiln dispatcher listening on ";
        proc.wait_stdout(b"\n", LONG);
        let line = String::from_utf8(proc.stdout()).unwrap();
        let mut lines = line.lines();
        let first = lines.next().unwrap();
        assert!(
            first.as_bytes().starts_with(prefix),
            "unexpected first stdout line of kiln serve: {first:?}"
        );
        assert!(
            lines.next().is_none(),
            "kiln serve printed more than one stdout line: {line:?}"
        );
        let addr = first[prefix.len()..].trim().to_string();
        assert!(
            addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
            "{addr:?}"
        );
        Server {
            proc,
            url: format!("http://{addr}"),
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Runs a client command against this dispatcher.
    pub fn cli(&self, args: &[&str]) -> Out {
        let mut all = vec!["--dispatcher", &self.url];
        all.extend_from_slice(args);
        kiln(&all)
    }

    /// Spawns a client command against this dispatcher (e.g. `logs -f`) without waiting.
    pub fn spawn_cli(&self, name: &str, args: &[&str]) -> Proc {
        let mut all = vec!["--dispatcher", &self.url];
        all.extend_from_slice(args);
        Proc::kiln(name, &all)
    }

    /// `kiln --json show ID` (whatever its exit code) as JSON.
    pub fn show(&self, id: u64) -> serde_json::Value {
        let out = self.cli(&["--json", "show", &id.to_string()]);
        assert!(
            matches!(out.code(), 0 | 1 | 3 | 8),
            "kiln show {id} failed: {out}"
        );
        out.json()
    }

    /// `kiln --json submit --repo R --commit C` (must succeed): the build's JSON.
    pub fn submit(&self, repo: &Path, commit: &str) -> serde_json::Value {
        let out = self.cli(&[
            "--json",
            "submit",
            "--repo",
            repo.to_str().unwrap(),
            "--commit",
            commit,
        ]);
        out.expect_code(0);
        out.json()
    }

    /// Starts a runner for this dispatcher with its own work dir under `tmp` and the mirror
    /// cache it shares with the test's other runners (`tmp/runner-cache`, as the runners of one
    /// machine share one) unless `extra` names one.
    pub fn runner(&self, tmp: &Path, name: &str, extra: &[&str]) -> Proc {
        let work = tmp.join(format!("work-{name}"));
        let cache = tmp.join("runner-cache");
        let mut args = vec![
            "--dispatcher",
            &self.url,
            "runner",
            "--name",
            name,
            "--work-dir",
            work.to_str().unwrap(),
        ];
        if !extra.contains(&"--cache-dir") {
            args.extend(["--cache-dir", cache.to_str().unwrap()]);
        }
        args.extend_from_slice(extra);
        Proc::kiln(format!("kiln runner {name}"), &args)
    }

    /// Waits for the named runners to be attached (idle or busy) according to `kiln runners`.
    pub fn wait_runners_attached(&self, names: &[&str]) {
        wait_for("runners to attach", LONG, || {
            let out = self.cli(&["--json", "runners"]);
            if out.code() != 0 {
                return Err(out.to_string());
            }
            let v = out.json();
            let attached: Vec<&str> = v["runners"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["state"] == "idle" || r["state"] == "busy")
                .map(|r| r["name"].as_str().unwrap())
                .collect();
            if names.iter().all(|n| attached.contains(n)) {
                Ok(())
            } else {
                Err(v.to_string())
            }
        });
    }

    /// Waits for build `id` to reach a final state (per `kiln show`); returns its JSON.
    pub fn wait_final(&self, id: u64, timeout: Duration) -> serde_json::Value {
        wait_for(&format!("build {id} to finish"), timeout, || {
            let b = self.show(id);
            match b["state"].as_str().unwrap() {
                "queued" | "running" | "assigned" => Err(b.to_string()),
                _ => Ok(b),
            }
        })
    }

    /// Waits until `check` accepts `kiln show ID`'s JSON.
    pub fn wait_build(
        &self,
        id: u64,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        wait_for(&format!("build {id}: {what}"), timeout, || {
            let b = self.show(id);
            if check(&b) { Ok(b) } else { Err(b.to_string()) }
        })
    }
}

/// `GET url` with `curl`: the status code and the body.
pub fn http_get(url: &str, headers: &[&str]) -> (String, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-w", "\n%{http_code}"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text.rsplit_once('\n').unwrap();
    (status.to_string(), body.to_string())
}

/// Runner arguments giving a runner spare slots (4), for tests that run builds back to back on
/// one runner and are not about slot accounting. (Used by several test files; keep it.)
pub const MANY_SLOTS: &[&str] = &["--slots", "4"];

/// The id of a build JSON.
pub fn id_of(build: &serde_json::Value) -> u64 {
    build["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id in {build}"))
}

/// A shell snippet that waits (at most 60 s) for `flag` to exist; on timeout it prints a
/// message and exits 7, so a test never hangs on it.
pub fn wait_flag_sh(flag: &Path) -> String {
    format!(
        "i=0; while [ ! -e '{}' ]; do i=$((i+1)); if [ $i -gt 1200 ]; then echo 'flag never came'; exit 7; fi; sleep 0.05; done",
        flag.display()
    )
}

// ---------------------------------------------------------------------------------------------
// Git repositories
// ---------------------------------------------------------------------------------------------

/// A git repository in a temp dir, made with git2.
pub struct Repo {
    /// Its path.
    pub path: PathBuf,
    repo: git2::Repository,
}

impl Repo {
    /// Creates an empty repository at `path`.
    pub fn init(path: &Path) -> Repo {
        Repo::try_init(path, None).unwrap()
    }

    /// Creates an empty repository at `path`, its first branch `branch` (else git's default).
    pub fn try_init(path: &Path, branch: Option<&str>) -> Result<Repo, RepoError> {
        std::fs::create_dir_all(path)?;
        let mut opts = git2::RepositoryInitOptions::new();
        if let Some(b) = branch {
            opts.initial_head(b);
        }
        let repo = git2::Repository::init_opts(path, &opts)?;
        Ok(Repo {
            path: path.canonicalize()?,
            repo,
        })
    }

    /// Creates a repository whose first commit holds `.kiln.yml` with `pipeline`; returns it
    /// and the commit id.
    pub fn with_pipeline(path: &Path, pipeline: &str) -> (Repo, String) {
        let r = Repo::init(path);
        let sha = r.commit(&[(".kiln.yml", pipeline.as_bytes())], "pipeline");
        (r, sha)
    }

    /// Writes the files and commits them on HEAD; returns the full commit id.
    pub fn commit(&self, files: &[(&str, &[u8])], message: &str) -> String {
        self.try_commit(files, message).unwrap()
    }

    /// [`Repo::commit`], returning what went wrong instead of panicking.
    pub fn try_commit(&self, files: &[(&str, &[u8])], message: &str) -> Result<String, RepoError> {
        for (name, data) in files {
            let p = self.path.join(name);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::write(&p, data)?;
        }
        let mut index = self.repo.index()?;
        index.add_all(
            ["*", ".kiln.yml"].iter(),
            git2::IndexAddOption::DEFAULT,
            None,
        )?;
        index.write()?;
        let tree = self.repo.find_tree(index.write_tree()?)?;
        let sig = git2::Signature::now("kiln tests", "tests@kiln.invalid")?;
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        let id = self
            .repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)?;
        Ok(id.to_string())
    }

    /// Commits a change to a file of its own (`.kiln-test-tag`), so that the same pipeline
    /// gets a new commit id (kiln builds a commit with a given pipeline once); returns it.
    pub fn new_commit(&self, tag: &str) -> String {
        self.commit(&[(".kiln-test-tag", tag.as_bytes())], tag)
    }

    /// The path as a string.
    pub fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

/// Why a throwaway repository could not be made or committed to.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// Writing its files failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// git failed.
    #[error("{0}")]
    Git(#[from] git2::Error),
}

/// A fresh temp dir for one test.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("kiln-e2e-")
        .tempdir()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// gRPC
// ---------------------------------------------------------------------------------------------

/// A blocking wrapper around the generated gRPC clients.
pub struct Api {
    /// The runtime the clients run on.
    pub rt: tokio::runtime::Runtime,
    /// The connection.
    pub channel: tonic::transport::Channel,
}

impl Api {
    /// Connects to `url`.
    pub fn connect(url: &str) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
            .unwrap()
            .connect_timeout(Duration::from_secs(10));
        let channel = rt
            .block_on(endpoint.connect())
            .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
        Api { rt, channel }
    }

    /// A `BuildService` client.
    pub fn builds(
        &self,
    ) -> proto::build_service_client::BuildServiceClient<tonic::transport::Channel> {
        proto::build_service_client::BuildServiceClient::new(self.channel.clone())
    }

    /// A `RunnerService` client.
    pub fn runner_service(
        &self,
    ) -> proto::runner_service_client::RunnerServiceClient<tonic::transport::Channel> {
        proto::runner_service_client::RunnerServiceClient::new(self.channel.clone())
    }

    /// `SubmitBuild`.
    pub fn submit(&self, req: proto::SubmitBuildRequest) -> Result<proto::Build, tonic::Status> {
        let mut c = self.builds();
        self.rt
            .block_on(c.submit_build(req))
            .map(tonic::Response::into_inner)
    }

    /// `GetBuild`.
    pub fn get_build(&self, id: u64) -> proto::Build {
        let mut c = self.builds();
        self.rt
            .block_on(c.get_build(proto::GetBuildRequest { build_id: id }))
            .unwrap()
            .into_inner()
    }

    /// `ListBuilds` (up to 500).
    pub fn list_builds(&self) -> Vec<proto::Build> {
        let mut c = self.builds();
        self.rt
            .block_on(c.list_builds(proto::ListBuildsRequest {
                page_size: 500,
                ..Default::default()
            }))
            .unwrap()
            .into_inner()
            .builds
    }

    /// `ListRunners`.
    pub fn list_runners(&self) -> Vec<proto::Runner> {
        let mut c =
            proto::runner_admin_service_client::RunnerAdminServiceClient::new(self.channel.clone());
        self.rt
            .block_on(c.list_runners(proto::ListRunnersRequest {}))
            .unwrap()
            .into_inner()
            .runners
    }

    /// Every chunk of a job's stored log (`StreamLogs` without follow).
    pub fn logs(&self, job_id: u64) -> Vec<proto::LogChunk> {
        let mut c = self.builds();
        self.rt.block_on(async {
            let mut s = c
                .stream_logs(proto::StreamLogsRequest {
                    job_id,
                    build_id: 0,
                    offset: 0,
                    follow: false,
                })
                .await
                .unwrap()
                .into_inner();
            let mut out = Vec::new();
            while let Some(chunk) = tokio::time::timeout(LONG, s.message())
                .await
                .expect("StreamLogs stalled")
                .unwrap()
            {
                out.push(chunk);
            }
            out
        })
    }

    /// Whether the standard health service says the server is SERVING.
    pub fn healthy(&self) -> bool {
        let mut c = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        self.rt
            .block_on(c.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            }))
            .map(|r| {
                r.into_inner().status
                    == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
            })
            .unwrap_or(false)
    }
}

/// The bytes of one stream of a log, concatenated.
pub fn stream_bytes(chunks: &[proto::LogChunk], stream: proto::OutputStream) -> Vec<u8> {
    chunks
        .iter()
        .filter(|c| c.stream == stream as i32)
        .flat_map(|c| c.data.iter().copied())
        .collect()
}

/// Every file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// What a stored file holds, as plain bytes: a sealed log (`.zst`, seekable zstd) is
/// decompressed, so a search for a secret cannot miss one hidden by compression.
pub fn stored_bytes(path: &Path) -> Vec<u8> {
    if path.extension().is_some_and(|e| e == "zst") {
        let mut plain = Vec::new();
        zeekstd::Decoder::new(std::fs::File::open(path).unwrap())
            .unwrap()
            .read_to_end(&mut plain)
            .unwrap();
        return plain;
    }
    std::fs::read(path).unwrap()
}

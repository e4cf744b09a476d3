//! The `kiln` command line: argument parsing (clap), the client commands, and the exit codes.
//!
//! # Exit codes
//! | code | meaning |
//! |---|---|
//! | 0 | success; for `logs`, `submit --follow` and `show`: the build or job passed |
//! | 1 | the build or job failed (a step exited non-zero) |
//! | 2 | the command line is wrong (unknown flag, missing argument) |
//! | 3 | the build or job ended cancelled, timed out or errored (a job: or skipped) |
//! | 4 | the build, job or repository (or commit) was not found |
//! | 5 | the dispatcher refused the request as invalid |
//! | 6 | the dispatcher cannot be reached (or is shutting down) |
//! | 7 | any other error |
//! | 8 | the build or job is still running (`show` only) |
//! | 9 | the token is missing or not valid |
//! | 10 | this commit was already built with this pipeline (`kiln retry` builds it again) |
//! | 141 | the output's reader went away (`kiln show 1 \| head -c 100`): the command ends at once and quietly, with the status a shell reports for `cat` killed by SIGPIPE |

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use crate::proto::{
    self, build_service_client::BuildServiceClient,
    runner_admin_service_client::RunnerAdminServiceClient,
};

/// Exit codes (see the module documentation).
pub mod exit {
    /// Success, or the build passed.
    pub const OK: i32 = 0;
    /// The build or job failed.
    pub const FAILED: i32 = 1;
    /// Bad command line.
    pub const USAGE: i32 = 2;
    /// Cancelled, timed out or errored.
    pub const NOT_PASSED: i32 = 3;
    /// Not found.
    pub const NOT_FOUND: i32 = 4;
    /// Refused as invalid.
    pub const INVALID: i32 = 5;
    /// Dispatcher unreachable.
    pub const UNAVAILABLE: i32 = 6;
    /// Anything else.
    pub const INTERNAL: i32 = 7;
    /// Still running.
    pub const RUNNING: i32 = 8;
    /// Not authenticated or not allowed.
    pub const DENIED: i32 = 9;
    /// Already built (same repository, commit and pipeline); retry that build instead.
    pub const DUPLICATE: i32 = 10;
    /// The reader of the output went away (128 + SIGPIPE, as a shell reports `cat | head`).
    pub const CLOSED_PIPE: i32 = 141;
}

/// Ends the process at once and quietly because the reader of its output went away (`kiln
/// logs 7 | head`): nothing is left to say and nobody to say it to.
pub fn closed_pipe() -> ! {
    std::process::exit(exit::CLOSED_PIPE)
}

/// Makes every command end quietly on a closed pipe, wherever it prints. Rust ignores SIGPIPE,
/// so a write to a pipe whose reader has gone fails with `EPIPE`, and `print!`/`println!` (and
/// `eprint!`) panic on it ("failed printing to stdout: Broken pipe"). This hook turns exactly
/// that panic into [`closed_pipe`]; every other panic is reported as before. Sockets are not
/// affected (their errors are returned, not panicked on).
pub fn end_quietly_on_closed_pipe() {
    let previous = std::panic::take_hook();
    let broken_pipe = std::io::Error::from_raw_os_error(libc::EPIPE).to_string();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to std") && message.ends_with(&broken_pipe) {
            closed_pipe();
        }
        previous(info);
    }));
}

/// Writes bytes to standard output (or error) and flushes; a closed pipe ends the process
/// quietly ([`closed_pipe`]).
fn write_out(stderr: bool, data: &[u8]) -> Result<(), CliError> {
    let result = if stderr {
        let mut e = std::io::stderr().lock();
        e.write_all(data).and_then(|()| e.flush())
    } else {
        let mut o = std::io::stdout().lock();
        o.write_all(data).and_then(|()| o.flush())
    };
    match result {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => closed_pipe(),
        Err(e) => Err(CliError::new(
            exit::INTERNAL,
            format!("cannot write output: {e}"),
        )),
    }
}

/// A user-facing error with its exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct CliError {
    /// Exit code.
    pub code: i32,
    /// What to print.
    pub message: String,
}

impl CliError {
    fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        // The connection failed under the call (a plaintext client on a TLS port sees any of
        // these, depending on timing).
        let transport = matches!(s.code(), Code::Unknown | Code::Cancelled | Code::Internal)
            && [
                "transport",
                "h2 protocol",
                "connection",
                "broken pipe",
                "operation was canceled",
            ]
            .iter()
            .any(|w| s.message().contains(w));
        let code = match s.code() {
            _ if transport => exit::UNAVAILABLE,
            Code::NotFound => exit::NOT_FOUND,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => exit::INVALID,
            // A full disk on the dispatcher: try again later, as for an unreachable one.
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => {
                exit::UNAVAILABLE
            }
            Code::Unauthenticated | Code::PermissionDenied => exit::DENIED,
            Code::AlreadyExists => exit::DUPLICATE,
            Code::Unknown
                if ["transport", "h2 protocol", "connection", "broken pipe"]
                    .iter()
                    .any(|w| s.message().contains(w)) =>
            {
                exit::UNAVAILABLE
            }
            _ => exit::INTERNAL,
        };
        let what = match s.code() {
            Code::Unavailable => format!("dispatcher unavailable: {}", s.message()),
            _ if transport => format!(
                "{} (does the dispatcher serve TLS? then use an https:// URL)",
                s.message()
            ),
            _ => s.message().to_string(),
        };
        CliError::new(code, what)
    }
}

/// Kiln: a distributed build farm and CI system.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about, long_about = None)]
pub struct Cli {
    /// The client options given before the command (`kiln --json show 7`), still accepted
    /// there but listed only by the commands that use them.
    #[command(flatten)]
    pub before: ClientBefore,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Client options accepted before the command for compatibility (hidden; each command that
/// uses them lists its own).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientBefore {
    #[arg(long, hide = true, value_name = "URL")]
    dispatcher: Option<String>,
    #[arg(long, hide = true)]
    json: bool,
    #[arg(long, hide = true)]
    pub(crate) token: Option<String>,
    #[arg(long, hide = true)]
    tls_ca: Option<PathBuf>,
    #[arg(long, hide = true)]
    tls_cert: Option<PathBuf>,
    #[arg(long, hide = true)]
    tls_key: Option<PathBuf>,
}

impl ClientBefore {
    fn given(&self) -> bool {
        self.dispatcher.is_some()
            || self.json
            || self.token.is_some()
            || self.tls_ca.is_some()
            || self.tls_cert.is_some()
            || self.tls_key.is_some()
    }
}

/// How a client command reaches the dispatcher.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// The dispatcher's URL [env: KILN_DISPATCHER] [default: http://127.0.0.1:7878].
    #[arg(long, value_name = "URL")]
    pub dispatcher: Option<String>,
    /// API token for the dispatcher [env: KILN_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// dispatcher, instead of the system roots
    /// [env: KILN_TLS_CA].
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS [env: KILN_TLS_CERT].
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS [env: KILN_TLS_KEY].
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

/// How `kiln runner` reaches the dispatcher.
#[derive(Debug, Clone, Default, Args)]
pub struct RunnerClientArgs {
    /// The dispatcher's URL [env: KILN_DISPATCHER] [default: http://127.0.0.1:7878].
    #[arg(long, value_name = "URL")]
    pub dispatcher: Option<String>,
    /// The runner's token, as the dispatcher expects it (shared or per runner) [env:
    /// KILN_TOKEN].
    #[arg(long)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// dispatcher, instead of the system roots
    /// [env: KILN_TLS_CA].
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS [env: KILN_TLS_CERT].
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS [env: KILN_TLS_KEY].
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
}

impl From<RunnerClientArgs> for ClientArgs {
    fn from(r: RunnerClientArgs) -> Self {
        ClientArgs {
            dispatcher: r.dispatcher,
            token: r.token,
            tls_ca: r.tls_ca,
            tls_cert: r.tls_cert,
            tls_key: r.tls_key,
        }
    }
}

impl ClientArgs {
    /// These options, each completed from `other` where not given.
    fn or(self, other: ClientArgs) -> ClientArgs {
        ClientArgs {
            dispatcher: self.dispatcher.or(other.dispatcher),
            token: self.token.or(other.token),
            tls_ca: self.tls_ca.or(other.tls_ca),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
        }
    }

    /// The connection: this command's options, else those before the command, else the
    /// environment, else the default URL.
    fn connection(self, before: &ClientBefore) -> Connection {
        fn env(name: &str) -> Option<String> {
            std::env::var(name).ok().filter(|v| !v.is_empty())
        }
        Connection {
            url: self
                .dispatcher
                .or_else(|| before.dispatcher.clone())
                .or_else(|| env("KILN_DISPATCHER"))
                .unwrap_or_else(|| "http://127.0.0.1:7878".into()),
            token: self
                .token
                .or_else(|| before.token.clone())
                .or_else(|| env("KILN_TOKEN")),
            tls: crate::tls::ClientTls {
                ca: self
                    .tls_ca
                    .or_else(|| before.tls_ca.clone())
                    .or_else(|| env("KILN_TLS_CA").map(PathBuf::from)),
                cert: self
                    .tls_cert
                    .or_else(|| before.tls_cert.clone())
                    .or_else(|| env("KILN_TLS_CERT").map(PathBuf::from)),
                key: self
                    .tls_key
                    .or_else(|| before.tls_key.clone())
                    .or_else(|| env("KILN_TLS_KEY").map(PathBuf::from)),
            },
        }
    }
}

/// `--json`, for the commands that print it.
#[derive(Debug, Clone, Copy, Default, Args)]
pub struct JsonArg {
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the dispatcher (gRPC server, queue, store).
    Serve(ServeArgs),
    /// Run a runner that takes jobs from the dispatcher.
    Runner(RunnerArgs),
    /// Submit a commit for building.
    Submit(SubmitArgs),
    /// List builds, newest first.
    Builds(BuildsArgs),
    /// Show one build with its jobs, their attempts and steps.
    Show {
        /// Build id.
        build: u64,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Print a build's output (or one job's); with -f, follow every job live until the build ends.
    Logs(LogsArgs),
    /// Show a build's test report (split steps): units, failures, flaky tests; with --junit,
    /// write the merged JUnit XML report to a file (`-` for stdout).
    Tests {
        /// Build id.
        build: u64,
        /// Write the JUnit XML report here (`-`: standard output).
        #[arg(long, value_name = "FILE")]
        junit: Option<std::path::PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Cancel a build's unfinished jobs.
    Cancel {
        /// Build id.
        build: u64,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Build a finished build's commit again.
    Retry {
        /// Build id.
        build: u64,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// List runners, or drain one.
    Runners {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<RunnersAction>,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Showcase: a sample repository, a dispatcher and two runners in this process, a passing
    /// and a failing commit, their output live and their results.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Watch repositories and report every new commit of matching branches to the dispatcher.
    Watch {
        #[command(flatten)]
        args: crate::observer::WatchArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The whole farm in one process: dispatcher, runners and an observer of the repositories.
    Up(crate::up::UpArgs),
    /// Administration on the dispatcher's data directory.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print a shell completion script (bash: `source <(kiln completions bash)`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print kiln's man page, or write one page per command into a directory.
    Man {
        /// Write kiln.1 and kiln-COMMAND.1 for every command here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// `kiln runners ...`.
#[derive(Debug, Subcommand)]
pub enum RunnersAction {
    /// Tell a runner to take no new work, finish its jobs and detach.
    Drain {
        /// Runner name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `kiln admin`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Per-runner tokens (stored hashed in the dispatcher's database).
    #[command(subcommand)]
    RunnerToken(RunnerTokenCommand),
}

/// `kiln admin runner-token`.
#[derive(Debug, Subcommand)]
pub enum RunnerTokenCommand {
    /// Creates (or replaces) a runner's token and prints it once.
    Create {
        /// Runner name.
        name: String,
        /// The dispatcher's data directory.
        #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
        data_dir: PathBuf,
    },
    /// Revokes a runner's token.
    Revoke {
        /// Runner name.
        name: String,
        /// The dispatcher's data directory.
        #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
        data_dir: PathBuf,
    },
}

/// `kiln serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Where the database, logs and mirrors live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// How often runners heartbeat.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,
    /// Missed heartbeats before a runner is declared lost.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub missed_heartbeats: u32,
    /// How long a runner whose stream closed (process died, socket reset) has to re-attach
    /// before its jobs go to other runners (a silent runner keeps the whole lease).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub reconnect_grace: Duration,
    /// Free space the data directory must keep (e.g. 64MiB, 2G). Below it the disk counts
    /// as full: submits are refused (RESOURCE_EXHAUSTED) and running jobs pause, their output
    /// kept by the runners, until space is freed. Default: 64 MiB, or 5% of the file system
    /// if that is less.
    #[arg(long, value_parser = crate::dispatcher::parse_size)]
    pub min_free_space: Option<u64>,
    /// API token required for writes (submit, cancel, retry) and, with --closed-reads, reads.
    #[arg(long, env = "KILN_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// Reads need the API token too.
    #[arg(long, requires = "api_token")]
    pub closed_reads: bool,
    /// Shared token every runner must present (per-runner tokens: `kiln admin runner-token`).
    #[arg(long, env = "KILN_RUNNER_TOKEN", hide_env_values = true)]
    pub runner_token: Option<String>,
    /// Serve TLS with this certificate chain (PEM).
    #[arg(long, requires = "server_key")]
    pub server_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, requires = "server_cert")]
    pub server_key: Option<PathBuf>,
    /// Accept client certificates signed by this CA (PEM).
    #[arg(long, requires = "server_cert")]
    pub client_ca: Option<PathBuf>,
    /// Runners must present a client certificate signed by --client-ca (mutual TLS).
    #[arg(long, requires = "client_ca")]
    pub require_runner_cert: bool,
    /// Branches (pattern, repeatable: `*` within a path segment, `**` across segments) that
    /// build only their newest commit and cancel their older unfinished builds; other branches
    /// build every commit.
    #[arg(long = "newest-only", value_name = "PATTERN")]
    pub newest_only: Vec<String>,
    /// YAML file of secrets (`NAME: value`), given to every job as environment variables and
    /// masked in its output.
    #[arg(long, env = "KILN_SECRETS_FILE")]
    pub secrets_file: Option<PathBuf>,
    /// Shared secret of the push webhook (`POST /webhooks/push` on the same port, signed
    /// HMAC-SHA256 as GitHub and Gitea do); without it the webhook is disabled (404).
    #[arg(long, env = "KILN_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
}

/// Reads a secrets file: a YAML mapping of environment variable names to values.
fn read_secrets(path: &std::path::Path) -> Result<BTreeMap<String, String>, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("cannot read secrets file {}: {e}", path.display()),
        )
    })?;
    let map: BTreeMap<String, String> = serde_norway::from_str(&text).map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!(
                "secrets file {}: {e} (expected `NAME: value` lines)",
                path.display()
            ),
        )
    })?;
    for k in map.keys() {
        let valid = k
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(CliError::new(
                exit::USAGE,
                format!(
                    "secrets file {}: {k:?} is not an environment variable name",
                    path.display()
                ),
            ));
        }
    }
    Ok(map)
}

/// `kiln runner`.
#[derive(Debug, Args)]
pub struct RunnerArgs {
    #[command(flatten)]
    pub client: RunnerClientArgs,
    /// Unique runner name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: u32,
    /// Label offered to jobs, as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where checkouts and unsent output live (default: a directory under the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Where repository mirrors live, shared by every runner given the same directory: the
    /// runners of one machine fetch each new commit once, and one waits while another fetches
    /// (a lock file per mirror). Keep it on a local disk. Default: kiln/mirrors under the user's
    /// cache directory ($XDG_CACHE_HOME or ~/.cache), else `mirrors` in the work dir.
    #[arg(long, env = "KILN_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Most unacknowledged output spooled to local disk while the dispatcher is away, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    pub max_spool_bytes: u64,
    /// Read the runner's token from this file (`-`: standard input) rather than --token (which
    /// every user sees in `ps`) or KILN_TOKEN.
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// Pass this variable of the runner's environment on to build steps (repeatable); steps
    /// otherwise inherit only PATH, HOME, USER, SHELL, the locale and a few more (README).
    #[arg(long = "pass-env", value_name = "NAME")]
    pub pass_env: Vec<String>,
}

/// `kiln submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub out: JsonArg,
    /// Repository: a URL, or a local path (made absolute before it is sent).
    #[arg(long)]
    pub repo: String,
    /// The revision to build: a commit id, a branch, a tag, HEAD, HEAD~2 ... (default: HEAD).
    /// Resolved in the repository for a local path, in the dispatcher's mirror for a URL.
    #[arg(long)]
    pub commit: Option<String>,
    /// Branch the commit belongs to (default: for a local path, the branch the revision is on;
    /// for a URL, the branch the revision names).
    #[arg(long, default_value = "")]
    pub branch: String,
    /// Who is asking (shown with the build).
    #[arg(long, default_value = "cli")]
    pub trigger: String,
    /// Follow the build's output until it ends; exit with its status.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// `kiln builds`.
#[derive(Debug, Args)]
pub struct BuildsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub out: JsonArg,
    /// Only this repository (as submitted).
    #[arg(long)]
    pub repo: Option<String>,
    /// Only this branch.
    #[arg(long)]
    pub branch: Option<String>,
    /// Only this state (queued, running, passed, failed, cancelled, timed_out, errored).
    #[arg(long)]
    pub state: Option<kiln_domain::JobState>,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Continue from a previous page.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

/// `kiln logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// BUILD or BUILD/JOB (JOB is a job id or name). A whole build's jobs are shown with each
    /// line prefixed by its job.
    pub target: String,
    /// Only this job (a job id or name), as BUILD/JOB.
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Follow live output until the job ends (every job of the build at once); end with the
    /// build's (or job's) status and exit with its code.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Write the job's stderr to kiln's stderr. By default everything the job wrote (stdout,
    /// stderr and kiln's own notes) goes to stdout in the order it was produced, so
    /// `kiln logs 7 | grep FAIL` sees it all.
    #[arg(long)]
    pub separate_stderr: bool,
    /// Show this attempt of the job (1 is its first; `kiln show` lists them) instead of the
    /// one that produced its result (or the running one).
    #[arg(long, value_name = "N", conflicts_with = "all_attempts")]
    pub attempt: Option<u32>,
    /// Show every attempt's output, superseded ones (a lost runner's) included, oldest first.
    #[arg(long)]
    pub all_attempts: bool,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

/// How a client reaches the dispatcher.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// The dispatcher's URL.
    pub url: String,
    /// API token.
    pub token: Option<String>,
    /// TLS files.
    pub tls: crate::tls::ClientTls,
}

impl Connection {
    /// Plaintext, no token.
    pub fn plain(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }
}

/// A `BuildService` client that sends the API token.
pub type BuildClient = BuildServiceClient<
    tonic::service::interceptor::InterceptedService<Channel, crate::auth::BearerToken>,
>;

/// Runs a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> Result<i32, CliError> {
    let before = cli.before;
    let json = |out: JsonArg| out.json || before.json;
    let no_client_options = |what: &str| {
        if before.given() {
            Err(CliError::new(
                exit::USAGE,
                format!("kiln {what} takes none of --dispatcher, --json, --token, --tls-*"),
            ))
        } else {
            Ok(())
        }
    };
    match cli.command {
        Command::Serve(args) => {
            no_client_options("serve")?;
            serve(args).await
        }
        Command::Runner(args) => {
            if before.json {
                return Err(CliError::new(exit::USAGE, "kiln runner takes no --json"));
            }
            // Files the runner's parent left open (a supervisor, a shell's `exec 3<file`) are
            // not handed on to build steps, nor to the runner started again without its token.
            close_fds::set_fds_cloexec_threadsafe(3, &[]);
            let conn = ClientArgs::from(args.client.clone()).connection(&before);
            runner(&conn, args).await
        }
        Command::Submit(args) => {
            let json = json(args.out);
            let conn = args.client.clone().connection(&before);
            submit(&conn, json, args).await
        }
        Command::Builds(args) => {
            let json = json(args.out);
            let conn = args.client.clone().connection(&before);
            builds(&conn, json, args).await
        }
        Command::Show { build, client, out } => {
            show(&client.connection(&before), json(out), build).await
        }
        Command::Tests {
            build,
            junit,
            client,
            out,
        } => tests(&client.connection(&before), json(out), build, junit).await,
        Command::Logs(args) => {
            let conn = args.client.connection(&before);
            let opts = LogsOptions {
                target: args.target,
                job: args.job,
                follow: args.follow,
                separate_stderr: args.separate_stderr,
                attempt: args.attempt,
                all_attempts: args.all_attempts,
            };
            logs(&conn, &opts).await
        }
        Command::Admin(cmd) => {
            no_client_options("admin")?;
            admin(cmd)
        }
        Command::Cancel { build, client, out } => {
            let mut c = build_client(&client.connection(&before)).await?;
            let b = c
                .cancel_build(proto::CancelBuildRequest { build_id: build })
                .await?
                .into_inner();
            print_build(&b, json(out));
            Ok(exit::OK)
        }
        Command::Retry { build, client, out } => {
            let mut c = build_client(&client.connection(&before)).await?;
            let b = c
                .retry_build(proto::RetryBuildRequest { build_id: build })
                .await?
                .into_inner();
            print_build(&b, json(out));
            Ok(exit::OK)
        }
        Command::Runners {
            action: None,
            client,
            out,
        } => runners(&client.connection(&before), json(out)).await,
        Command::Runners {
            action: Some(RunnersAction::Drain { name, client: own }),
            client,
            out: _,
        } => {
            let conn = own.or(client).connection(&before);
            let mut c =
                RunnerAdminServiceClient::with_interceptor(channel(&conn).await?, bearer(&conn)?);
            let r = c
                .drain_runner(proto::DrainRunnerRequest { name })
                .await?
                .into_inner();
            println!("runner {} is draining", r.name);
            Ok(exit::OK)
        }
        Command::Demo(args) => {
            no_client_options("demo")?;
            crate::demo::run(args).await
        }
        Command::Bench(args) => {
            no_client_options("bench")?;
            crate::bench::run(args).await
        }
        Command::Watch { args, client } => {
            if before.json {
                return Err(CliError::new(exit::USAGE, "kiln watch takes no --json"));
            }
            crate::observer::run(&client.connection(&before), args, signal()).await
        }
        Command::Up(args) => {
            no_client_options("up")?;
            crate::up::run(args, signal()).await
        }
        Command::Completions { shell } => {
            no_client_options("completions")?;
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut out);
            write_out(false, &out)?;
            Ok(exit::OK)
        }
        Command::Man { dir } => {
            no_client_options("man")?;
            man(dir.as_deref())
        }
    }
}

/// `kiln man`: the main page on stdout, or every command's page into `dir`.
fn man(dir: Option<&std::path::Path>) -> Result<i32, CliError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot render: {e}")))?;
            write_out(false, &out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot create {}: {e}", dir.display()))
            })?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("cannot write to {}: {e}", dir.display()),
                )
            })?;
            eprintln!("kiln: man pages written to {}", dir.display());
        }
    }
    Ok(exit::OK)
}

/// Resolves on the first SIGTERM or Ctrl-C.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn admin(cmd: AdminCommand) -> Result<i32, CliError> {
    use kiln_store::Store as _;
    let AdminCommand::RunnerToken(cmd) = cmd;
    let (name, data_dir, create) = match cmd {
        RunnerTokenCommand::Create { name, data_dir } => (name, data_dir, true),
        RunnerTokenCommand::Revoke { name, data_dir } => (name, data_dir, false),
    };
    if name.trim().is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CliError::new(
            exit::USAGE,
            format!("runner name {name:?} is not valid"),
        ));
    }
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        CliError::new(
            exit::INTERNAL,
            format!("data dir {}: {e}", data_dir.display()),
        )
    })?;
    let store = kiln_store::SqliteStore::open(&data_dir.join("kiln.db"))
        .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot open the store: {e}")))?;
    if create {
        let token = crate::auth::new_token();
        store
            .set_runner_token(&name, Some(&crate::auth::hash_token(&token)))
            .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
        println!("{token}");
        eprintln!(
            "token for runner {name} (shown once): start it with `kiln runner --name {name} --token ...`"
        );
        Ok(exit::OK)
    } else {
        let changed = store
            .set_runner_token(&name, None)
            .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
        if changed {
            Ok(exit::OK)
        } else {
            Err(CliError::new(
                exit::NOT_FOUND,
                format!("runner {name} has no token"),
            ))
        }
    }
}

async fn serve(args: ServeArgs) -> Result<i32, CliError> {
    let mut config = crate::dispatcher::Config::new(&args.data_dir);
    config.heartbeat_interval = args.heartbeat_interval;
    config.missed_heartbeats = args.missed_heartbeats;
    config.reconnect_grace = args.reconnect_grace;
    config.min_free_space = args.min_free_space;
    config.runner_token = args.runner_token.clone();
    config.newest_only = args.newest_only.clone();
    if let Some(path) = &args.secrets_file {
        config.secrets = read_secrets(path)?;
    }
    let tls = match (&args.server_cert, &args.server_key) {
        (Some(cert), Some(key)) => Some(
            crate::tls::ServerTls {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: args.client_ca.clone(),
            }
            .load()
            .map_err(|e| CliError::new(exit::USAGE, e))?,
        ),
        _ => None,
    };
    let options = crate::api::ServeOptions {
        tls,
        api_auth: match &args.api_token {
            Some(t) => crate::auth::ApiAuth::with_token(t, args.closed_reads),
            None => crate::auth::ApiAuth::open(),
        },
        require_runner_cert: args.require_runner_cert,
        webhook: crate::webhook::WebhookConfig::from_option(args.webhook_secret.as_deref())
            .map_err(|e| CliError::new(exit::USAGE, e))?,
    };
    let dispatcher = crate::dispatcher::Dispatcher::open(config)
        .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot open data dir: {e}")))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| {
            CliError::new(
                exit::UNAVAILABLE,
                format!("cannot listen on {}: {e}", args.listen),
            )
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
    // One line on stdout, so scripts (and tests) can learn the port.
    println!("kiln dispatcher listening on {addr}");
    let _ = std::io::stdout().flush();
    crate::api::serve(listener, dispatcher, options, signal())
        .await
        .map_err(|e| CliError::new(exit::INTERNAL, format!("server failed: {e}")))?;
    Ok(exit::OK)
}

async fn runner(conn: &Connection, args: RunnerArgs) -> Result<i32, CliError> {
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "runner".into()),
    };
    let mut config = crate::runner::RunnerConfig::new(conn.url.clone(), name);
    config.token = match &args.token_file {
        Some(path) => crate::runner::token::read_token_file(path)
            .map_err(|e| CliError::new(exit::USAGE, e))?,
        None => conn.token.clone().unwrap_or_default(),
    };
    config.pass_env = crate::runner::token::pass_env(&args.pass_env)
        .map_err(|e| CliError::new(exit::USAGE, e))?;
    config.tls = conn.tls.clone();
    config.slots = args.slots;
    config.max_spool_bytes = args.max_spool_bytes;
    config.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
    if let Some(dir) = args.work_dir {
        config.work_dir = dir;
    }
    config.cache_dir = args.cache_dir.or_else(crate::runner::default_cache_dir);
    let drain = CancellationToken::new();
    let stop = CancellationToken::new();
    {
        let (drain, stop) = (drain.clone(), stop.clone());
        tokio::spawn(async move {
            signal().await;
            tracing::info!("signal: draining (send another to cancel running jobs)");
            drain.cancel();
            signal().await;
            tracing::info!("second signal: cancelling running jobs");
            stop.cancel();
        });
    }
    crate::runner::run(config, drain, stop)
        .await
        .map_err(|e| CliError::new(exit::INVALID, e.to_string()))?;
    Ok(exit::OK)
}

/// Connects a `BuildService` client.
pub async fn build_client(conn: &Connection) -> Result<BuildClient, CliError> {
    Ok(BuildServiceClient::with_interceptor(
        channel(conn).await?,
        bearer(conn)?,
    ))
}

fn bearer(conn: &Connection) -> Result<crate::auth::BearerToken, CliError> {
    crate::auth::BearerToken::new(conn.token.as_deref()).map_err(|e| CliError::new(exit::USAGE, e))
}

async fn channel(conn: &Connection) -> Result<Channel, CliError> {
    let url = &conn.url;
    let endpoint = conn
        .tls
        .endpoint(url)
        .map_err(|e| CliError::new(exit::USAGE, e))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    endpoint.connect().await.map_err(|e| {
        CliError::new(
            exit::UNAVAILABLE,
            format!(
                "cannot reach the dispatcher at {url}: {}",
                crate::dispatcher::error_chain(&e)
            ),
        )
    })
}

/// Makes a local repository path absolute (URLs pass through).
pub fn normalize_repo(repo: &str) -> Result<String, CliError> {
    if repo.contains("://") || (repo.contains('@') && repo.contains(':')) {
        return Ok(repo.to_string());
    }
    std::fs::canonicalize(repo)
        .map(|p| p.to_string_lossy().into_owned())
        .map_err(|e| CliError::new(exit::NOT_FOUND, format!("repository path {repo:?}: {e}")))
}

/// The commit and branch `kiln submit` sends. For a local repository the revision (HEAD when not
/// given) is resolved here, where the user's refs are, and the branch defaults to the one it is
/// on; a URL's revision goes to the dispatcher as typed, to be resolved in its mirror.
fn submit_revision(
    repo: &str,
    commit: Option<String>,
    branch: String,
) -> Result<(String, String), CliError> {
    let is_url = repo.contains("://") || (repo.contains('@') && repo.contains(':'));
    if is_url {
        return match commit {
            Some(c) => Ok((c, branch)),
            None => Err(CliError::new(
                exit::USAGE,
                format!("--commit is needed for {repo}: only a local repository has a HEAD here"),
            )),
        };
    }
    let rev = commit.unwrap_or_else(|| "HEAD".to_string());
    let resolved = kiln_git::resolve_local(repo, &rev).map_err(|e| {
        let code = match e {
            kiln_git::GitError::InvalidRevision { .. }
            | kiln_git::GitError::InvalidCommitId { .. }
            | kiln_git::GitError::AmbiguousCommit { .. } => exit::INVALID,
            _ => exit::NOT_FOUND,
        };
        CliError::new(code, e.to_string())
    })?;
    let branch = if branch.is_empty() {
        resolved.branch.unwrap_or_default()
    } else {
        branch
    };
    Ok((resolved.commit, branch))
}

async fn submit(conn: &Connection, json: bool, args: SubmitArgs) -> Result<i32, CliError> {
    let repo = normalize_repo(&args.repo)?;
    let (commit, branch) = submit_revision(&repo, args.commit, args.branch)?;
    let mut c = build_client(conn).await?;
    let b = c
        .submit_build(proto::SubmitBuildRequest {
            repo,
            commit,
            branch,
            trigger: args.trigger,
        })
        .await?
        .into_inner();
    print_build(&b, json);
    if args.follow {
        let opts = LogsOptions {
            target: b.id.to_string(),
            follow: true,
            ..LogsOptions::default()
        };
        return logs(conn, &opts).await;
    }
    Ok(exit::OK)
}

async fn builds(conn: &Connection, json: bool, args: BuildsArgs) -> Result<i32, CliError> {
    let mut c = build_client(conn).await?;
    let r = c
        .list_builds(proto::ListBuildsRequest {
            repo: args
                .repo
                .map(|r| normalize_repo(&r).unwrap_or(r))
                .unwrap_or_default(),
            branch: args.branch.unwrap_or_default(),
            state: args
                .state
                .map_or(0, |s| crate::convert::job_state_to_proto(s) as i32),
            page_size: args.limit,
            page_token: args.page_token,
        })
        .await?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "builds": r.builds.iter().map(build_json).collect::<Vec<_>>(),
            "next_page_token": r.next_page_token,
        });
        println!("{v}");
    } else {
        println!(
            "{:<6} {:<10} {:<12} {:<16} {:<20} REPO",
            "ID", "STATE", "COMMIT", "BRANCH", "CREATED"
        );
        for b in &r.builds {
            println!(
                "{:<6} {:<10} {:<12} {:<16} {:<20} {}",
                b.id,
                state_name(b.state),
                b.commit.get(..12).unwrap_or(&b.commit),
                if b.branch.is_empty() { "-" } else { &b.branch },
                b.created_at.as_ref().map(fmt_time).unwrap_or_default(),
                b.repo
            );
        }
        if !r.next_page_token.is_empty() {
            println!("(more: --page-token {})", r.next_page_token);
        }
    }
    Ok(exit::OK)
}

/// A build and its test report (empty without split steps).
async fn build_and_tests(
    conn: &Connection,
    build: u64,
) -> Result<(proto::Build, proto::TestReport), CliError> {
    let mut c = build_client(conn).await?;
    let b = c
        .get_build(proto::GetBuildRequest { build_id: build })
        .await?
        .into_inner();
    let report = c
        .get_test_report(proto::GetTestReportRequest { build_id: build })
        .await?
        .into_inner();
    Ok((b, report))
}

async fn show(conn: &Connection, json: bool, build: u64) -> Result<i32, CliError> {
    let (b, report) = build_and_tests(conn, build).await?;
    if json {
        let mut v = build_json(&b);
        v["tests"] = crate::report::json(&report);
        println!("{v}");
    } else {
        print_build(&b, false);
        print!("{}", crate::report::text(&report));
    }
    Ok(state_exit(b.state))
}

async fn tests(
    conn: &Connection,
    json: bool,
    build: u64,
    junit: Option<std::path::PathBuf>,
) -> Result<i32, CliError> {
    let (b, report) = build_and_tests(conn, build).await?;
    if junit.is_some() && report.junit_xml.is_empty() {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "build {build} has no test report: no split step, and no step's `junit` files \
                 gave test cases"
            ),
        ));
    }
    match junit {
        Some(path) if path.as_os_str() == "-" => {
            // Standard output holds the XML alone.
            print!("{}", report.junit_xml);
            return Ok(state_exit(b.state));
        }
        Some(path) => {
            std::fs::write(&path, &report.junit_xml).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot write {}: {e}", path.display()))
            })?;
            if !json {
                eprintln!(
                    "kiln: JUnit report of build {build} written to {}",
                    path.display()
                );
            }
        }
        None => {}
    }
    if json {
        println!("{}", crate::report::json(&report));
    } else if report.splits.is_empty() && report.steps.is_empty() {
        println!(
            "build {build} has no test report: no split step (`parallel:` or `units:`) and no \
             step with `junit:` files"
        );
    } else {
        print!("{}", crate::report::text(&report));
    }
    Ok(state_exit(b.state))
}

/// The exit code for a final (or not) state.
pub fn state_exit(state: i32) -> i32 {
    match proto::JobState::try_from(state) {
        Ok(proto::JobState::Passed) => exit::OK,
        Ok(proto::JobState::Failed) => exit::FAILED,
        Ok(
            proto::JobState::Cancelled
            | proto::JobState::TimedOut
            | proto::JobState::Errored
            | proto::JobState::Skipped,
        ) => exit::NOT_PASSED,
        _ => exit::RUNNING,
    }
}

/// The name of a wire job state, as the CLI prints it.
pub fn state_name(state: i32) -> &'static str {
    proto::JobState::try_from(state)
        .ok()
        .and_then(crate::convert::job_state_from_proto)
        .map_or("unknown", |s| s.as_str())
}

fn fmt_time(ts: &prost_types::Timestamp) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(crate::convert::millis(ts).max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn build_json(b: &proto::Build) -> serde_json::Value {
    serde_json::json!({
        "id": b.id,
        "repo": b.repo,
        "commit": b.commit,
        "branch": b.branch,
        "state": state_name(b.state),
        "trigger": b.trigger,
        "error": (!b.error.is_empty()).then_some(&b.error),
        "pipeline": (!b.pipeline.is_empty()).then_some(&b.pipeline),
        "retry_of": (b.retry_of != 0).then_some(b.retry_of),
        "created_at": b.created_at.as_ref().map(crate::convert::millis),
        "finished_at": b.finished_at.as_ref().map(crate::convert::millis),
        "jobs": b.jobs.iter().map(|j| serde_json::json!({
            "id": j.id,
            "name": j.name,
            "state": state_name(j.state),
            "runner": j.runner,
            "attempt_id": j.attempt_id,
            "attempts": j.attempts,
            "message": j.message,
            "lost_attempts": j.lost_attempts,
            "attempt_list": j.attempt_list.iter().map(|a| serde_json::json!({
                "id": a.id,
                "number": a.number,
                "runner": a.runner,
                "state": a.state,
                "started_at": a.started_at.as_ref().map(crate::convert::millis),
                "finished_at": a.finished_at.as_ref().map(crate::convert::millis),
                "note": (!a.note.is_empty()).then_some(&a.note),
            })).collect::<Vec<_>>(),
            "refusals": j.refusals,
            "labels": j.labels,
            "steps": j.steps.iter().map(|s| serde_json::json!({
                "index": s.index,
                "name": s.name,
                "run": s.run,
                "outcome": proto::StepOutcome::try_from(s.outcome).ok()
                    .and_then(crate::convert::step_outcome_from_proto)
                    .map(|o| o.as_str()),
                "exit_code": s.exit_code,
                "duration_ms": s.duration_ms,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn print_build(b: &proto::Build, json: bool) {
    if json {
        println!("{}", build_json(b));
        return;
    }
    println!(
        "build {}  {}  {} {}{}",
        b.id,
        state_name(b.state),
        b.repo,
        b.commit,
        if b.branch.is_empty() {
            String::new()
        } else {
            format!(" ({})", b.branch)
        }
    );
    if !b.pipeline.is_empty() && !b.jobs.is_empty() {
        println!("  pipeline: {}", b.pipeline);
    }
    if !b.error.is_empty() {
        println!("  error: {}", b.error);
    }
    for j in &b.jobs {
        println!(
            "  job {} {:<20} {:<10} runner={} attempts={}{}",
            j.id,
            j.name,
            state_name(j.state),
            if j.runner.is_empty() { "-" } else { &j.runner },
            j.attempts,
            if j.message.is_empty() {
                String::new()
            } else {
                format!("  ({})", j.message)
            }
        );
        if let Some(first) = j.attempt_list.first()
            && first.number > 1
        {
            println!("    ({} earlier attempts not listed)", first.number - 1);
        }
        for a in &j.attempt_list {
            let result = if a.id == j.attempt_id {
                "  <- current"
            } else {
                ""
            };
            println!(
                "    attempt {} (id {}) on {:<12} {:<10}{}{result}",
                a.number,
                a.id,
                if a.runner.is_empty() { "-" } else { &a.runner },
                a.state,
                if a.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", a.note)
                }
            );
        }
        for r in &j.refusals {
            println!("    refused: {r}");
        }
        for s in &j.steps {
            let outcome = proto::StepOutcome::try_from(s.outcome)
                .ok()
                .and_then(crate::convert::step_outcome_from_proto)
                .map_or("pending", |o| o.as_str());
            let exit = s
                .exit_code
                .map(|c| format!(" exit={c}"))
                .unwrap_or_default();
            println!(
                "    step {} {:<18} {:<10}{exit} {} ms",
                s.index, s.name, outcome, s.duration_ms
            );
        }
    }
}

/// What `kiln logs` (and `kiln submit -f`) prints.
#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    /// BUILD or BUILD/JOB.
    pub target: String,
    /// Only this job (name or id), as BUILD/JOB says.
    pub job: Option<String>,
    /// Follow live output until the job (or every job of the build) ends.
    pub follow: bool,
    /// The job's stderr to kiln's stderr (otherwise everything to stdout, in log order).
    pub separate_stderr: bool,
    /// Only this attempt (by number) of the one job shown.
    pub attempt: Option<u32>,
    /// Every attempt's output (otherwise the current attempt's: the result's or the running).
    pub all_attempts: bool,
}

/// Which attempts' output of a job to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptFilter {
    /// Every attempt.
    All,
    /// This attempt id.
    Only(u64),
    /// This attempt id and any later one (a follower sees a reassignment's new attempt).
    From(u64),
}

impl AttemptFilter {
    /// The filter for a job: `--all-attempts`, `--attempt N`, or the current attempt.
    fn of(job: &proto::Job, opts: &LogsOptions) -> Result<Self, CliError> {
        if opts.all_attempts {
            return Ok(Self::All);
        }
        match opts.attempt {
            Some(n) => job
                .attempt_list
                .iter()
                .find(|a| a.number == n)
                .map(|a| Self::Only(a.id))
                .ok_or_else(|| {
                    CliError::new(
                        exit::NOT_FOUND,
                        format!(
                            "job {} has no attempt {n} (it has {})",
                            job.name,
                            match job.attempts {
                                0 => "none".to_string(),
                                1 => "attempt 1".to_string(),
                                k => format!("attempts 1 to {k}"),
                            }
                        ),
                    )
                }),
            None => Ok(Self::From(job.attempt_id)),
        }
    }

    /// Whether output of `attempt` is shown (0: a dispatcher that does not say).
    fn shows(self, attempt: u64) -> bool {
        attempt == 0
            || match self {
                Self::All => true,
                Self::Only(a) => attempt == a,
                Self::From(a) => attempt >= a,
            }
    }
}

/// Prints the output of a build's jobs (or one job): each job's output in the order it was
/// produced, to stdout (with `separate_stderr` the job's stderr to stderr). With more than one
/// job every line is prefixed with its job's name (coloured on a terminal unless `NO_COLOR`
/// is set); when following, every job is followed at once and the command ends with the
/// build's (or the job's) status and exits with its code.
pub async fn logs(conn: &Connection, opts: &LogsOptions) -> Result<i32, CliError> {
    let target = opts.target.as_str();
    let (build, in_target) = match target.split_once('/') {
        Some((b, j)) => (b, Some(j)),
        None => (target, None),
    };
    let job = match (in_target, opts.job.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(CliError::new(
                exit::USAGE,
                format!("{target:?} names job {a:?} but --job says {b:?}"),
            ));
        }
        (a, b) => a.or(b),
    };
    let build: u64 = build
        .parse()
        .map_err(|_| CliError::new(exit::USAGE, format!("{target:?} is not BUILD or BUILD/JOB")))?;
    let mut c = build_client(conn).await?;
    let b = c
        .get_build(proto::GetBuildRequest { build_id: build })
        .await?
        .into_inner();
    let jobs: Vec<&proto::Job> = match job {
        None => b.jobs.iter().collect(),
        Some(j) => {
            let found = b
                .jobs
                .iter()
                .find(|x| x.name == j || x.id.to_string() == j)
                .ok_or_else(|| {
                    CliError::new(exit::NOT_FOUND, format!("build {build} has no job {j:?}"))
                })?;
            vec![found]
        }
    };
    if jobs.is_empty() {
        eprintln!("build {build} has no jobs: {}", b.error);
        return Ok(state_exit(b.state));
    }
    if opts.attempt.is_some() && jobs.len() > 1 {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "build {build} has {} jobs: --attempt needs one (BUILD/JOB or --job)",
                jobs.len()
            ),
        ));
    }
    let filters = jobs
        .iter()
        .map(|j| AttemptFilter::of(j, opts))
        .collect::<Result<Vec<_>, _>>()?;
    for (j, f) in jobs.iter().zip(&filters) {
        if let (AttemptFilter::From(_), Some(last)) = (f, j.attempt_list.last())
            && j.attempts > 1
        {
            eprintln!(
                "kiln: job {} had {} attempts; showing attempt {} on {} (--attempt N or \
                 --all-attempts for the others)",
                j.name, j.attempts, last.number, last.runner
            );
        }
    }
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    let prefixes = if jobs.len() > 1 {
        job_prefixes(&names, colour_wanted())
    } else {
        Vec::new()
    };
    let mut printer = Printer {
        separate_stderr: opts.separate_stderr,
        prefixes,
        partial: std::collections::HashMap::new(),
    };
    let follow = opts.follow;
    let mut codes = vec![exit::RUNNING; jobs.len()];
    if follow && jobs.len() > 1 {
        // Every job at once: one stream per job, their chunks printed as they come.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(
            usize,
            Result<Option<proto::LogChunk>, tonic::Status>,
        )>(64);
        for (i, j) in jobs.iter().enumerate() {
            let (mut c, tx, id) = (c.clone(), tx.clone(), j.id);
            tokio::spawn(async move {
                let streamed = async {
                    let mut s = c.stream_logs(stream_request(id, true)).await?.into_inner();
                    while let Some(chunk) = s.message().await? {
                        if tx.send((i, Ok(Some(chunk)))).await.is_err() {
                            break;
                        }
                    }
                    Ok::<_, tonic::Status>(())
                }
                .await;
                let _ = tx.send((i, streamed.map(|()| None))).await;
            });
        }
        drop(tx);
        while let Some((i, event)) = rx.recv().await {
            match event? {
                Some(chunk) => {
                    if chunk.final_state != 0 {
                        codes[i] = state_exit(chunk.final_state);
                    }
                    if filters[i].shows(chunk.attempt_id) {
                        printer.chunk(i, chunk.stream, &chunk.data)?;
                    }
                }
                None => printer.end(i)?,
            }
        }
    } else {
        for (i, j) in jobs.iter().enumerate() {
            let mut s = c
                .stream_logs(stream_request(j.id, follow))
                .await?
                .into_inner();
            while let Some(chunk) = s.message().await? {
                if chunk.final_state != 0 {
                    codes[i] = state_exit(chunk.final_state);
                }
                if filters[i].shows(chunk.attempt_id) {
                    printer.chunk(i, chunk.stream, &chunk.data)?;
                }
            }
            printer.end(i)?;
        }
    }
    if !follow {
        return Ok(codes.into_iter().max().unwrap_or(exit::OK));
    }
    // The end: the build's own state decides (a skipped job after a failed one is not worse).
    let b = c
        .get_build(proto::GetBuildRequest { build_id: build })
        .await?
        .into_inner();
    if job.is_none() {
        let others: Vec<String> = b
            .jobs
            .iter()
            .filter(|j| b.jobs.len() > 1 && j.state != proto::JobState::Passed as i32)
            .map(|j| format!("{} {}", j.name, state_name(j.state)))
            .collect();
        let detail = if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        };
        write_out(
            false,
            format!("kiln: build {build} {}{detail}\n", state_name(b.state)).as_bytes(),
        )?;
        return Ok(state_exit(b.state));
    }
    let code = codes.first().copied().unwrap_or(exit::RUNNING);
    if let Some(j) = jobs.first() {
        let state = b.jobs.iter().find(|x| x.id == j.id).map_or(0, |x| x.state);
        write_out(
            false,
            format!(
                "kiln: job {} of build {build} {}\n",
                j.name,
                state_name(state)
            )
            .as_bytes(),
        )?;
    }
    Ok(code)
}

fn stream_request(job: u64, follow: bool) -> proto::StreamLogsRequest {
    proto::StreamLogsRequest {
        job_id: job,
        build_id: 0,
        offset: 0,
        follow,
    }
}

/// Whether to colour job prefixes: on a terminal, unless `NO_COLOR` is set (and not empty).
fn colour_wanted() -> bool {
    use std::io::IsTerminal as _;
    colour_for(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Colour on a terminal, unless `NO_COLOR` is set to something (<https://no-color.org>).
fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `[name] ` for each job, padded to the longest name so the output lines up, each in its own
/// colour when `colour`.
fn job_prefixes(names: &[&str], colour: bool) -> Vec<Vec<u8>> {
    use anstyle::AnsiColor::{Blue, Cyan, Green, Magenta, Red, Yellow};
    let palette = [Cyan, Green, Yellow, Magenta, Blue, Red];
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    names
        .iter()
        .zip(palette.iter().cycle())
        .map(|(name, c)| {
            let pad = " ".repeat(width - name.chars().count());
            if colour {
                let style = c.on_default();
                format!("{}[{name}]{}{pad} ", style.render(), style.render_reset())
            } else {
                format!("[{name}]{pad} ")
            }
            .into_bytes()
        })
        .collect()
}

/// Longest partial line kept back while waiting for its newline; longer ones are cut.
const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// Writes jobs' output: as is for one job, line by line with each job's prefix for several.
struct Printer {
    separate_stderr: bool,
    /// One per job; empty: no prefixes (bytes pass through untouched).
    prefixes: Vec<Vec<u8>>,
    /// Unfinished last line per (job, to stderr).
    partial: std::collections::HashMap<(usize, bool), Vec<u8>>,
}

impl Printer {
    fn chunk(&mut self, job: usize, stream: i32, data: &[u8]) -> Result<(), CliError> {
        if data.is_empty() {
            return Ok(());
        }
        let to_err = self.separate_stderr && stream == proto::OutputStream::Stderr as i32;
        let Some(prefix) = self.prefixes.get(job) else {
            return write_out(to_err, data);
        };
        let buf = self.partial.entry((job, to_err)).or_default();
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&buf[start..=start + pos]);
            start += pos + 1;
        }
        if buf.len() - start >= MAX_PARTIAL_LINE {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&buf[start..]);
            out.push(b'\n');
            start = buf.len();
        }
        buf.drain(..start);
        if out.is_empty() {
            Ok(())
        } else {
            write_out(to_err, &out)
        }
    }

    /// The job's output ended: its unfinished lines are written with a newline.
    fn end(&mut self, job: usize) -> Result<(), CliError> {
        let Some(prefix) = self.prefixes.get(job) else {
            return Ok(());
        };
        for to_err in [false, true] {
            if let Some(rest) = self.partial.remove(&(job, to_err))
                && !rest.is_empty()
            {
                let mut out = prefix.clone();
                out.extend_from_slice(&rest);
                out.push(b'\n');
                write_out(to_err, &out)?;
            }
        }
        Ok(())
    }
}

async fn runners(conn: &Connection, json: bool) -> Result<i32, CliError> {
    let mut c = RunnerAdminServiceClient::with_interceptor(channel(conn).await?, bearer(conn)?);
    let r = c
        .list_runners(proto::ListRunnersRequest {})
        .await?
        .into_inner();
    let state = |s: i32| match proto::RunnerState::try_from(s) {
        Ok(proto::RunnerState::Idle) => "idle",
        Ok(proto::RunnerState::Busy) => "busy",
        Ok(proto::RunnerState::Draining) => "draining",
        Ok(proto::RunnerState::Offline) => "offline",
        _ => "unknown",
    };
    if json {
        let v: Vec<_> = r
            .runners
            .iter()
            .map(|x| {
                serde_json::json!({
                    "id": x.id, "name": x.name, "state": state(x.state), "labels": x.labels,
                    "slots": x.slots, "running_jobs": x.running_jobs, "version": x.version,
                    "last_heartbeat": x.last_heartbeat.as_ref().map(crate::convert::millis),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "runners": v }));
    } else {
        println!(
            "{:<4} {:<20} {:<9} {:<5} {:<12} {:<20} LABELS",
            "ID", "NAME", "STATE", "SLOTS", "JOBS", "LAST HEARTBEAT"
        );
        for x in &r.runners {
            let labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let jobs: Vec<String> = x.running_jobs.iter().map(u64::to_string).collect();
            println!(
                "{:<4} {:<20} {:<9} {:<5} {:<12} {:<20} {}",
                x.id,
                x.name,
                state(x.state),
                x.slots,
                if jobs.is_empty() {
                    "-".into()
                } else {
                    jobs.join(",")
                },
                x.last_heartbeat.as_ref().map(fmt_time).unwrap_or_default(),
                labels.join(",")
            );
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_prefixes_line_up_and_are_coloured_only_when_asked() {
        let plain = job_prefixes(&["build", "test-1"], false);
        assert_eq!(plain, vec![b"[build]  ".to_vec(), b"[test-1] ".to_vec()]);
        let coloured = job_prefixes(&["build", "test-1"], true);
        for (c, p) in coloured.iter().zip(&plain) {
            assert!(c.starts_with(b"\x1b["), "{c:?}");
            assert!(c.len() > p.len());
        }
        assert_ne!(coloured[0], coloured[1], "each job its own colour");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None));
    }
}

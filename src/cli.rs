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
        let code = match s.code() {
            Code::NotFound => exit::NOT_FOUND,
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => exit::INVALID,
            Code::Unavailable | Code::DeadlineExceeded => exit::UNAVAILABLE,
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
            Code::Unknown if s.message().contains("transport") => format!(
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
    /// The dispatcher's URL.
    #[arg(
        long,
        global = true,
        env = "KILN_DISPATCHER",
        default_value = "http://127.0.0.1:7878"
    )]
    pub dispatcher: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// API token for the dispatcher (for `kiln runner`: the runner's token).
    #[arg(long, global = true, env = "KILN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// dispatcher, instead of the system roots.
    #[arg(long, global = true, env = "KILN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, env = "KILN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, env = "KILN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
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
    /// Show one build with its jobs and steps.
    Show {
        /// Build id.
        build: u64,
    },
    /// Print a job's output; with -f, follow it live until the job ends.
    Logs(LogsArgs),
    /// Show a build's test report (split steps): units, failures, flaky tests; with --junit,
    /// write the merged JUnit XML report to a file (`-` for stdout).
    Tests {
        /// Build id.
        build: u64,
        /// Write the JUnit XML report here (`-`: standard output).
        #[arg(long, value_name = "FILE")]
        junit: Option<std::path::PathBuf>,
    },
    /// Cancel a build's unfinished jobs.
    Cancel {
        /// Build id.
        build: u64,
    },
    /// Build a finished build's commit again.
    Retry {
        /// Build id.
        build: u64,
    },
    /// List runners, or drain one.
    Runners {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<RunnersAction>,
    },
    /// Showcase: a sample repository, a dispatcher and two runners in this process, a passing
    /// and a failing commit, their output live and their results.
    Demo(crate::demo::DemoArgs),
    /// Benchmarks (see BENCHMARKS.md).
    Bench(crate::bench::BenchArgs),
    /// Watch repositories and report every new commit of matching branches to the dispatcher.
    Watch(crate::observer::WatchArgs),
    /// The whole farm in one process: dispatcher, runners and an observer of the repositories.
    Up(crate::up::UpArgs),
    /// Administration on the dispatcher's data directory.
    #[command(subcommand)]
    Admin(AdminCommand),
}

/// `kiln runners ...`.
#[derive(Debug, Subcommand)]
pub enum RunnersAction {
    /// Tell a runner to take no new work, finish its jobs and detach.
    Drain {
        /// Runner name.
        name: String,
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
    /// Branches (glob, repeatable) that build only their newest commit and cancel their older
    /// unfinished builds; other branches build every commit.
    #[arg(long = "newest-only", value_name = "BRANCH_GLOB")]
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
    /// Unique runner name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Jobs run at once.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub slots: u32,
    /// Label offered to jobs, as key=value (repeatable).
    #[arg(long = "label", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Where mirrors and checkouts live (default: a directory under the system temp dir).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
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
    /// Repository: a URL, or a local path (made absolute before it is sent).
    #[arg(long)]
    pub repo: String,
    /// Commit id (default: the local repository's HEAD).
    #[arg(long)]
    pub commit: Option<String>,
    /// Branch the commit belongs to.
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
    /// BUILD or BUILD/JOB (JOB is a job id or name).
    pub target: String,
    /// Follow live output until the job ends; exit with its status.
    #[arg(long, short = 'f')]
    pub follow: bool,
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
    let conn = Connection {
        url: cli.dispatcher.clone(),
        token: cli.token.clone(),
        tls: crate::tls::ClientTls {
            ca: cli.tls_ca.clone(),
            cert: cli.tls_cert.clone(),
            key: cli.tls_key.clone(),
        },
    };
    let conn = &conn;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Runner(args) => runner(conn, args).await,
        Command::Submit(args) => submit(conn, cli.json, args).await,
        Command::Builds(args) => builds(conn, cli.json, args).await,
        Command::Show { build } => show(conn, cli.json, build).await,
        Command::Tests { build, junit } => tests(conn, cli.json, build, junit).await,
        Command::Logs(args) => logs(conn, &args.target, args.follow).await,
        Command::Admin(cmd) => admin(cmd),
        Command::Cancel { build } => {
            let mut c = build_client(conn).await?;
            let b = c
                .cancel_build(proto::CancelBuildRequest { build_id: build })
                .await?
                .into_inner();
            print_build(&b, cli.json);
            Ok(exit::OK)
        }
        Command::Retry { build } => {
            let mut c = build_client(conn).await?;
            let b = c
                .retry_build(proto::RetryBuildRequest { build_id: build })
                .await?
                .into_inner();
            print_build(&b, cli.json);
            Ok(exit::OK)
        }
        Command::Runners { action: None } => runners(conn, cli.json).await,
        Command::Runners {
            action: Some(RunnersAction::Drain { name }),
        } => {
            let mut c =
                RunnerAdminServiceClient::with_interceptor(channel(conn).await?, bearer(conn)?);
            let r = c
                .drain_runner(proto::DrainRunnerRequest { name })
                .await?
                .into_inner();
            println!("runner {} is draining", r.name);
            Ok(exit::OK)
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Bench(args) => crate::bench::run(args).await,
        Command::Watch(args) => crate::observer::run(conn, args, signal()).await,
        Command::Up(args) => crate::up::run(args, signal()).await,
    }
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

async fn submit(conn: &Connection, json: bool, args: SubmitArgs) -> Result<i32, CliError> {
    let repo = normalize_repo(&args.repo)?;
    let commit = match args.commit {
        Some(c) => c,
        None => {
            let r = git2::Repository::open(&repo).map_err(|e| {
                CliError::new(
                    exit::NOT_FOUND,
                    format!(
                        "--commit not given and {repo} is not a local repository: {}",
                        e.message()
                    ),
                )
            })?;
            let head = r.head().and_then(|h| h.peel_to_commit()).map_err(|e| {
                CliError::new(
                    exit::NOT_FOUND,
                    format!("cannot read HEAD of {repo}: {}", e.message()),
                )
            })?;
            head.id().to_string()
        }
    };
    let mut c = build_client(conn).await?;
    let b = c
        .submit_build(proto::SubmitBuildRequest {
            repo,
            commit,
            branch: args.branch,
            trigger: args.trigger,
        })
        .await?
        .into_inner();
    print_build(&b, json);
    if args.follow {
        return logs(conn, &b.id.to_string(), true).await;
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
    } else if report.splits.is_empty() {
        println!("build {build} has no split step (no `parallel:` or `units:` in its pipeline)");
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

/// Prints a job's output (to stdout and stderr, as the step wrote it) and, when following,
/// returns the exit code of the job's final state.
pub async fn logs(conn: &Connection, target: &str, follow: bool) -> Result<i32, CliError> {
    let (build, job) = match target.split_once('/') {
        Some((b, j)) => (b, Some(j)),
        None => (target, None),
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
    let whole_build = job.is_none();
    let ids: Vec<u64> = jobs.iter().map(|j| j.id).collect();
    let mut worst = exit::OK;
    for id in ids {
        let code = follow_job(&mut c, id, follow).await?;
        worst = worst.max(code);
    }
    if whole_build && follow {
        // The build's own state decides (a skipped job after a failed one is not worse).
        let b = c
            .get_build(proto::GetBuildRequest { build_id: build })
            .await?
            .into_inner();
        return Ok(state_exit(b.state));
    }
    Ok(worst)
}

async fn follow_job(c: &mut BuildClient, job: u64, follow: bool) -> Result<i32, CliError> {
    let mut stream = c
        .stream_logs(proto::StreamLogsRequest {
            job_id: job,
            build_id: 0,
            offset: 0,
            follow,
        })
        .await?
        .into_inner();
    let mut code = exit::RUNNING;
    while let Some(chunk) = stream.message().await? {
        if chunk.final_state != 0 {
            code = state_exit(chunk.final_state);
        }
        if chunk.data.is_empty() {
            continue;
        }
        let result = if chunk.stream == proto::OutputStream::Stderr as i32 {
            let mut e = std::io::stderr().lock();
            e.write_all(&chunk.data).and_then(|()| e.flush())
        } else {
            let mut o = std::io::stdout().lock();
            o.write_all(&chunk.data).and_then(|()| o.flush())
        };
        if let Err(e) = result {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(exit::OK);
            }
            return Err(CliError::new(
                exit::INTERNAL,
                format!("cannot write output: {e}"),
            ));
        }
    }
    Ok(if follow {
        code
    } else {
        code.min(exit::RUNNING)
    })
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

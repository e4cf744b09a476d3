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
//! | 10 | this commit was already built with this pipeline and these parameters (`kiln retry` builds it again) |
//! | 141 | the output's reader went away (`kiln show 1 \| head -c 100`): the command ends at once and quietly, with the status a shell reports for `cat` killed by SIGPIPE |

//!
//! One file per command (`serve.rs`, `runner.rs`, `submit.rs`, `logs.rs`, ...); `client.rs`
//! the client options and connection every client command shares; `output.rs` how builds are
//! printed. `demo.rs` is `kiln demo`, the
//! all-in-one showcase; `up.rs` is `kiln up` (dispatcher, runners and observer in one
//! process); `kiln watch` runs `crate::observer`.

mod admin;
mod builds;
mod client;
mod demo;
mod logs;
mod man;
mod output;
mod pool;
mod runner;
mod runners;
mod serve;
mod show;
mod submit;
mod test_report;
mod up;

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_domain::BuildId;

pub use admin::{AdminCommand, RunnerTokenCommand};
pub use builds::BuildsArgs;
pub use client::{ClientArgs, ClientBefore, Connection, JsonArg, RunnerClientArgs};
pub use logs::{LogsArgs, LogsOptions, logs};
pub use output::state_exit;
pub use runner::{RunnerArgs, secure_start};
pub use runners::RunnersAction;
pub use serve::ServeArgs;
pub use submit::{SubmitArgs, normalize_repo};

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
    let broken_pipe = std::io::Error::from(nix::errno::Errno::EPIPE).to_string();
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
pub(crate) fn write_out(stderr: bool, data: &[u8]) -> Result<(), CliError> {
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
    pub(crate) fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::client::ClientError> for CliError {
    fn from(e: crate::client::ClientError) -> Self {
        use crate::client::ClientError;
        let code = match e {
            ClientError::Config(_) => exit::USAGE,
            ClientError::Unreachable { .. } => exit::UNAVAILABLE,
        };
        CliError::new(code, e.to_string())
    }
}

impl From<crate::observer::ObserverError> for CliError {
    fn from(e: crate::observer::ObserverError) -> Self {
        use crate::observer::ObserverError;
        match e {
            ObserverError::Config(m) => CliError::new(exit::USAGE, m),
            ObserverError::Git(m) => CliError::new(exit::NOT_FOUND, m),
            ObserverError::Connect(e) => e.into(),
            ObserverError::Dispatcher(s) => s.into(),
            ObserverError::Internal(m) => CliError::new(exit::INTERNAL, m),
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let transport = s.code() != Code::Unavailable && crate::client::failed_in_transport(&s);
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
            _ => exit::INTERNAL,
        };
        let what = match s.code() {
            Code::Unavailable => format!("dispatcher unavailable: {}", s.message()),
            _ if crate::client::timed_out(&s) => format!(
                "no answer from the dispatcher in time (--timeout; by default {} s, and {} min \
                 for a submit or a retry, which fetch the repository) (does the dispatcher \
                 serve TLS? then use an https:// URL)",
                crate::client::CALL_TIMEOUT.as_secs(),
                crate::client::FETCHING_CALL_TIMEOUT.as_secs() / 60
            ),
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
        build: BuildId,
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
        build: BuildId,
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
        build: BuildId,
        #[command(flatten)]
        client: ClientArgs,
        #[command(flatten)]
        out: JsonArg,
    },
    /// Build a finished build's commit again.
    Retry {
        /// Build id.
        build: BuildId,
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
    Demo(demo::DemoArgs),
    /// Watch repositories and report every new commit of matching branches to the dispatcher.
    Watch {
        #[command(flatten)]
        args: crate::observer::WatchArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// The whole farm in one process: dispatcher, runners and an observer of the repositories.
    Up(up::UpArgs),
    /// Keep between --min and --max local runners, sized to the queue: grow with the work,
    /// drain idle runners when it is gone (never a busy one).
    Pool {
        #[command(flatten)]
        args: pool::PoolArgs,
        #[command(flatten)]
        client: ClientArgs,
    },
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
            serve::serve(args).await
        }
        Command::Runner(args) => {
            if before.json {
                return Err(CliError::new(exit::USAGE, "kiln runner takes no --json"));
            }
            // Files the runner's parent left open (a supervisor, a shell's `exec 3<file`) are
            // not handed on to build steps, nor to the runner started again without its token.
            close_fds::set_fds_cloexec_threadsafe(3, &[]);
            let conn = ClientArgs::from(args.client.clone()).connection(&before);
            runner::runner(&conn, args).await
        }
        Command::Submit(args) => {
            let json = json(args.out);
            let conn = args.client.clone().connection(&before);
            submit::submit(&conn, json, args).await
        }
        Command::Builds(args) => {
            let json = json(args.out);
            let conn = args.client.clone().connection(&before);
            builds::builds(&conn, json, args).await
        }
        Command::Show { build, client, out } => {
            show::show(&client.connection(&before), json(out), build).await
        }
        Command::Tests {
            build,
            junit,
            client,
            out,
        } => test_report::tests(&client.connection(&before), json(out), build, junit).await,
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
            admin::admin(cmd)
        }
        Command::Cancel { build, client, out } => {
            show::cancel(&client.connection(&before), json(out), build).await
        }
        Command::Retry { build, client, out } => {
            show::retry(&client.connection(&before), json(out), build).await
        }
        Command::Runners {
            action: None,
            client,
            out,
        } => runners::runners(&client.connection(&before), json(out)).await,
        Command::Runners {
            action: Some(RunnersAction::Drain { name, client: own }),
            client,
            out: _,
        } => runners::drain(&own.or(client).connection(&before), name).await,
        Command::Demo(args) => {
            no_client_options("demo")?;
            demo::run(args).await
        }
        Command::Watch { args, client } => {
            if before.json {
                return Err(CliError::new(exit::USAGE, "kiln watch takes no --json"));
            }
            crate::observer::run(&client.connection(&before), args, signal()).await?;
            Ok(exit::OK)
        }
        Command::Pool { args, client } => {
            if before.json {
                return Err(CliError::new(exit::USAGE, "kiln pool takes no --json"));
            }
            pool::pool(client.connection(&before), args).await
        }
        Command::Up(args) => {
            no_client_options("up")?;
            up::run(args, signal()).await
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
            man::man(dir.as_deref())
        }
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

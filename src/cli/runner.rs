//! `kiln runner`: a runner, one stream to the dispatcher.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::client::{Connection, RunnerClientArgs};
use super::{CliError, exit, signal};

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

pub(super) fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

pub(super) async fn runner(conn: &Connection, args: RunnerArgs) -> Result<i32, CliError> {
    let name = match args.name {
        Some(n) => n,
        None => nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "runner".into()),
    };
    let mut config = crate::runner::RunnerConfig::new(conn.url.clone(), name);
    config.engine.token = match &args.token_file {
        Some(path) => {
            kiln_runner::token::read_token_file(path).map_err(|e| CliError::new(exit::USAGE, e))?
        }
        None => conn.token.clone().unwrap_or_default(),
    };
    config.engine.pass_env =
        kiln_runner::token::pass_env(&args.pass_env).map_err(|e| CliError::new(exit::USAGE, e))?;
    config.tls = conn.tls.clone();
    config.engine.slots = args.slots;
    config.engine.max_spool_bytes = args.max_spool_bytes;
    config.engine.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
    if let Some(dir) = args.work_dir {
        config.engine.work_dir = dir;
    }
    config.engine.cache_dir = args.cache_dir.or_else(kiln_runner::default_cache_dir);
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

/// For `kiln runner`, before the runtime starts: restarts the runner without its token on the
/// command line or in the environment (see [`kiln_runner::token::secure_start`]). Other
/// commands: nothing.
pub fn secure_start(cli: &super::Cli) -> Result<(), String> {
    let super::Command::Runner(args) = &cli.command else {
        return Ok(());
    };
    let token = args
        .client
        .token
        .clone()
        .or_else(|| cli.before.token.clone());
    kiln_runner::token::secure_start(token, args.token_file.is_some())
}

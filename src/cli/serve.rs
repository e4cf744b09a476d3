//! `kiln serve`: the dispatcher.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{CliError, exit, signal};

/// `kiln serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:7878")]
    pub listen: SocketAddr,
    /// Where the database, logs and mirrors live.
    #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
    pub data_dir: PathBuf,
    /// Keep the farm's state in this PostgreSQL database (`postgres://USER:PASSWORD@HOST:PORT/DB`
    /// or `host=... dbname=...`) instead of the data dir's SQLite file; logs and mirrors stay
    /// in the data dir. The schema is created or brought up to date at start.
    #[arg(
        long,
        env = "KILN_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database: Option<String>,
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
    #[arg(long, value_parser = kiln_dispatcher::parse_size)]
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
    /// Watch this repository from the dispatcher itself (a URL, or a local path; repeatable):
    /// every new commit of its matching branches is built, as `kiln watch` would report it,
    /// without an observer process. Mirrors live in the data dir (`observer/`).
    #[arg(long = "watch", value_name = "URL_OR_PATH")]
    pub watch: Vec<String>,
    /// With --watch: the branches to build, as patterns (repeatable; as `kiln watch --branch`).
    #[arg(
        long = "branch",
        value_name = "PATTERN",
        default_value = "**",
        requires = "watch"
    )]
    pub branches: Vec<String>,
    /// With --watch: how often the repositories are fetched.
    #[arg(long, default_value = "30s", value_parser = crate::observer::parse_interval, requires = "watch")]
    pub watch_interval: Duration,
    /// With --watch: a branch seen for the first time builds at most this many of its newest
    /// first-parent commits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000), requires = "watch")]
    pub watch_backfill: u32,
    /// Notifications (webhooks, mail, commit statuses) per repository and branch: a YAML
    /// file (see the README's "Notifications"); its `*_secret` fields name entries of
    /// --secrets-file.
    #[arg(long, env = "KILN_NOTIFY_CONFIG")]
    pub notify_config: Option<PathBuf>,
    /// Base URL of build pages in notifications (`{URL}/builds/{id}`); overrides the notify
    /// config's `public_url`.
    #[arg(long, env = "KILN_PUBLIC_URL")]
    pub public_url: Option<String>,
}

/// A `--database` value: a PostgreSQL URL or key=value settings. Parsed here rather than by
/// clap, whose error would repeat the value (and its password).
fn parse_database(s: &str) -> Result<kiln_store::PgConfig, CliError> {
    s.parse::<kiln_store::PgConfig>().map_err(|e| {
        CliError::new(
            exit::USAGE,
            format!("--database: not a PostgreSQL URL: {e}"),
        )
    })
}

/// Reads a secrets file: a YAML mapping of environment variable names to values.
pub(super) fn read_secrets(path: &std::path::Path) -> Result<BTreeMap<String, String>, CliError> {
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

pub(super) async fn serve(args: ServeArgs) -> Result<i32, CliError> {
    let mut config = kiln_dispatcher::Config::new(&args.data_dir);
    config.database = args.database.as_deref().map(parse_database).transpose()?;
    config.heartbeat_interval = args.heartbeat_interval;
    config.missed_heartbeats = args.missed_heartbeats;
    config.reconnect_grace = args.reconnect_grace;
    config.min_free_space = args.min_free_space;
    config.runner_token = args.runner_token.clone();
    config.newest_only = args.newest_only.clone();
    config.trace = crate::telemetry::configured();
    if let Some(path) = &args.secrets_file {
        config.secrets = read_secrets(path)?;
    }
    // Checked before anything starts: a bad file is a usage error naming its line.
    let notify = match &args.notify_config {
        Some(path) => {
            let mut notify = kiln_notify::Config::load(path, &config.secrets)
                .map_err(|e| CliError::new(exit::USAGE, e.to_string()))?;
            if let Some(url) = &args.public_url {
                notify.public_url = Some(url.trim_end_matches('/').to_owned());
            }
            Some(notify)
        }
        None => None,
    };
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
        web_auth: match &args.api_token {
            Some(t) => kiln_web::WebAuth::with_token(t, args.closed_reads),
            None => kiln_web::WebAuth::open(),
        }
        .secure_cookies(args.server_cert.is_some() && args.server_key.is_some()),
    };
    // Checked before anything starts: a bad pattern or path is a usage error.
    let watch = if args.watch.is_empty() {
        None
    } else {
        crate::observer::branch_globs(&args.branches)?;
        let repos = args
            .watch
            .iter()
            .map(|r| crate::observer::normalize_repo(r))
            .collect::<Result<Vec<_>, _>>()?;
        Some(crate::observer::ObserverConfig {
            repos,
            branches: args.branches.clone(),
            interval: args.watch_interval,
            backfill: args.watch_backfill,
            work_dir: crate::observer::work_dir_in(&args.data_dir),
            print: false,
        })
    };
    // On a blocking thread: the store is synchronous (PostgreSQL's blocks on its network).
    let what = if config.database.is_some() {
        "cannot open the database"
    } else {
        "cannot open data dir"
    };
    let dispatcher = tokio::task::spawn_blocking(move || kiln_dispatcher::Dispatcher::open(config))
        .await
        .map_err(|e| CliError::new(exit::INTERNAL, format!("{what}: {e}")))?
        .map_err(|e| CliError::new(exit::INTERNAL, format!("{what}: {e}")))?;
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
    let stop_companions = CancellationToken::new();
    let observer = watch.map(|config| {
        tracing::info!(repos = ?config.repos, branches = ?config.branches,
            interval = %humantime::format_duration(config.interval), "watching repositories");
        let sink = crate::observer::Local(dispatcher.clone());
        tokio::spawn(crate::observer::observe(
            sink,
            config,
            false,
            stop_companions.clone(),
        ))
    });
    let notifier = notify.map(|config| {
        tracing::info!(rules = config.rules.len(), "notifications on");
        tokio::spawn(kiln_notify::run(
            dispatcher.clone(),
            config,
            stop_companions.clone(),
        ))
    });
    let served = crate::api::serve(listener, dispatcher, options, signal()).await;
    stop_companions.cancel();
    if let Some(notifier) = notifier {
        // Deliveries in flight are cut off; their lease ends and the next start sends them.
        let _ = tokio::time::timeout(Duration::from_secs(5), notifier).await;
    }
    if let Some(observer) = observer {
        // A pass in progress gets a few seconds (the observer's own grace) to end.
        match tokio::time::timeout(Duration::from_secs(10), observer).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "observer stopped with an error"),
            Ok(Err(e)) => tracing::warn!(error = %e, "observer task failed"),
            Ok(Ok(Ok(()))) | Err(_) => {}
        }
    }
    served.map_err(|e| CliError::new(exit::INTERNAL, format!("server failed: {e}")))?;
    Ok(exit::OK)
}

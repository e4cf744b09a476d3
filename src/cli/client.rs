//! The client side every command shares: `--dispatcher`, `--token`, `--tls-*` and `--json`
//! (given before or after the command), and the [`Connection`] made from them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

pub use crate::client::Connection;

/// Client options accepted before the command for compatibility (hidden; each command that
/// uses them lists its own).
#[derive(Debug, Clone, Default, Args)]
pub struct ClientBefore {
    #[arg(long, hide = true, value_name = "URL")]
    dispatcher: Option<String>,
    #[arg(long, hide = true)]
    pub(super) json: bool,
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
    pub(super) fn given(&self) -> bool {
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
    /// The dispatcher's URL, or several separated by commas (dispatchers sharing one farm: the
    /// first that can be reached answers) [env: KILN_DISPATCHER] [default:
    /// http://127.0.0.1:7878].
    #[arg(long, value_name = "URL[,URL...]")]
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
    /// How long a call waits for the dispatcher's answer (`10s`, `2m`); a call with no answer
    /// by then fails with exit code 6 [default: 30s, and 1h for `submit` and `retry`, which
    /// fetch the repository first].
    #[arg(long, env = "KILN_TIMEOUT", value_name = "DURATION", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
}

/// Parses `--timeout`: a duration from 1 ms to a day.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d =
        humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (for example 30s or 5m)"))?;
    if d < Duration::from_millis(1) || d > Duration::from_secs(24 * 3600) {
        return Err("must be from 1ms to 24h".into());
    }
    Ok(d)
}

/// How `kiln runner` reaches the dispatcher.
#[derive(Debug, Clone, Default, Args)]
pub struct RunnerClientArgs {
    /// The dispatcher's URL, or several separated by commas (dispatchers sharing one farm: the
    /// runner stays with the one it reached and moves to the next when that one cannot be
    /// reached) [env: KILN_DISPATCHER] [default: http://127.0.0.1:7878].
    #[arg(long, value_name = "URL[,URL...]")]
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
            timeout: None,
        }
    }
}

impl ClientArgs {
    /// These options, each completed from `other` where not given.
    pub(super) fn or(self, other: ClientArgs) -> ClientArgs {
        ClientArgs {
            dispatcher: self.dispatcher.or(other.dispatcher),
            token: self.token.or(other.token),
            tls_ca: self.tls_ca.or(other.tls_ca),
            tls_cert: self.tls_cert.or(other.tls_cert),
            tls_key: self.tls_key.or(other.tls_key),
            timeout: self.timeout.or(other.timeout),
        }
    }

    /// The connection: this command's options, else those before the command, else the
    /// environment, else the default URL.
    pub(super) fn connection(self, before: &ClientBefore) -> Connection {
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
            timeout: self.timeout,
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

//! `kiln runner`: the runner engine (crate `kiln-runner`) over gRPC. The engine speaks domain
//! messages through a [`Transport`]; [`grpc::TonicTransport`] is the one that goes over the
//! network (TLS from [`crate::tls`]).

pub mod grpc;

use std::ops::{Deref, DerefMut};

use tokio_util::sync::CancellationToken;

pub use kiln_runner::{
    ConnectError, Inbound, RunnerError, Transport, default_cache_dir, split, transport,
};

/// How `kiln runner` behaves: where the dispatcher is and how to reach it, and the engine's
/// settings (reached through this value: `config.slots`, `config.labels`, ...).
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// The dispatcher's URL, e.g. `http://127.0.0.1:7878`.
    pub dispatcher: String,
    /// TLS files for an https:// dispatcher.
    pub tls: crate::tls::ClientTls,
    /// The engine's settings.
    pub engine: kiln_runner::RunnerConfig,
}

impl RunnerConfig {
    /// Defaults for a dispatcher URL and a name.
    pub fn new(dispatcher: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            dispatcher: dispatcher.into(),
            tls: crate::tls::ClientTls::default(),
            engine: kiln_runner::RunnerConfig::new(name),
        }
    }
}

impl Deref for RunnerConfig {
    type Target = kiln_runner::RunnerConfig;

    fn deref(&self) -> &Self::Target {
        &self.engine
    }
}

impl DerefMut for RunnerConfig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.engine
    }
}

/// Runs a runner against the dispatcher over gRPC until `drain` is cancelled and its jobs are
/// done (or `stop` is cancelled, which cancels the jobs).
pub async fn run(
    config: RunnerConfig,
    drain: CancellationToken,
    stop: CancellationToken,
) -> Result<(), RunnerError> {
    let transport =
        grpc::TonicTransport::new(&config.dispatcher, &config.tls).map_err(RunnerError::Config)?;
    kiln_runner::run(config.engine, transport, drain, stop).await
}

/// Keeping the runner's token out of sight of build steps (see [`kiln_runner::token`]).
pub mod token {
    pub use kiln_runner::token::*;

    use crate::cli::{Cli, Command};

    /// For `kiln runner`, before the runtime starts: restarts the runner without its token on
    /// the command line or in the environment (see [`kiln_runner::token::secure_start`]).
    /// Other commands: nothing.
    pub fn secure_start(cli: &Cli) -> Result<(), String> {
        let Command::Runner(args) = &cli.command else {
            return Ok(());
        };
        let token = args
            .client
            .token
            .clone()
            .or_else(|| cli.before.token.clone());
        kiln_runner::token::secure_start(token, args.token_file.is_some())
    }
}

//! `kiln runner`: the runner engine (crate `kiln-runner`) over gRPC. The engine speaks domain
//! messages through a [`Transport`]; [`grpc::TonicTransport`] is the one that goes over the
//! network (TLS from [`crate::tls`]).

pub mod grpc;

use tokio_util::sync::CancellationToken;

use kiln_runner::RunnerError;

/// How `kiln runner` behaves: where the dispatcher is and how to reach it, and the engine's
/// settings (`config.engine.slots`, `config.engine.labels`, ...).
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

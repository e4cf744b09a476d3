//! How the runner reaches its dispatcher: a [`Transport`] opens one runner stream at a time,
//! a channel of the runner's messages out and a stream of the dispatcher's back. The program
//! uses gRPC (tonic, in the root package); tests use in-memory channels.

use std::future::Future;
use std::pin::Pin;

use kiln_domain::protocol::{DispatcherMessage, RunnerMessage, StreamError};
use tokio::sync::mpsc;
use tokio_stream::Stream;

/// The dispatcher's messages on one stream; an error or the end closes it.
pub type Inbound = Pin<Box<dyn Stream<Item = Result<DispatcherMessage, StreamError>> + Send>>;

/// Why a stream could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// The dispatcher cannot be reached now (refused or reset connection, timeout, restart):
    /// try again.
    #[error("{0}")]
    Unreachable(String),
    /// The TLS handshake failed over a certificate (ours refused, or the dispatcher's not
    /// trusted): trying again will not help.
    #[error("{0}")]
    Tls(String),
    /// The dispatcher answered the attach with an error.
    #[error("{0}")]
    Refused(StreamError),
}

/// Opens runner streams to the dispatcher.
pub trait Transport: Send + Sync + 'static {
    /// Opens a stream: the messages received on `outbound` go to the dispatcher in order (the
    /// stream's sending side ends when `outbound`'s senders are gone), the dispatcher's come
    /// back on the returned stream.
    fn attach(
        &self,
        outbound: mpsc::Receiver<RunnerMessage>,
    ) -> impl Future<Output = Result<Inbound, ConnectError>> + Send;

    /// The dispatcher of the last stream stopped answering (it did not heartbeat, or a new
    /// stream got no Welcome in time) without closing the connection, as a frozen or
    /// unplugged host does: with several dispatchers, the next stream is tried elsewhere
    /// first. Nothing to do with one.
    fn move_on(&self) {}
}

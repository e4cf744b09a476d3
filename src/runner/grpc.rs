//! The runner's gRPC transport: `RunnerService.Attach` over tonic (TLS from [`ClientTls`]),
//! wire messages converted by [`crate::convert`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use kiln_domain::protocol::{MAX_MESSAGE_BYTES, RunnerMessage, StreamError};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::convert;
use crate::proto::runner_service_client::RunnerServiceClient;
use crate::tls::ClientTls;
use kiln_runner::{ConnectError, Inbound, Transport};

/// Opens runner streams over gRPC, to one dispatcher or to the first reachable of several.
#[derive(Debug)]
pub struct TonicTransport {
    /// The dispatchers, in the order given.
    endpoints: Vec<Endpoint>,
    /// The one that took the last stream: tried first next time, so a runner stays with its
    /// dispatcher and moves on only when that one cannot be reached.
    current: AtomicUsize,
}

impl TonicTransport {
    /// A transport to the dispatcher at `url` (`http://` or `https://` with `tls`), or to the
    /// dispatchers of a comma-separated list of URLs (several dispatchers sharing one farm).
    pub fn new(url: &str, tls: &ClientTls) -> Result<Self, String> {
        let endpoints = crate::client::dispatcher_urls(url)?
            .iter()
            .map(|url| {
                Ok(tls
                    .endpoint(url)?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(20)))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Self {
            endpoints,
            current: AtomicUsize::new(0),
        })
    }

    /// Connects to the dispatcher that took the last stream, else to the next ones in turn:
    /// a dispatcher that is gone costs one refused (or timed out) connection.
    async fn connect(&self) -> Result<tonic::transport::Channel, ConnectError> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n.max(1);
        let mut failed = ConnectError::Unreachable("no dispatcher URL given".into());
        for k in 0..n {
            let i = (first + k) % n;
            match self.endpoints[i].connect().await {
                Ok(channel) => {
                    if i != first {
                        tracing::info!(dispatcher = %self.endpoints[i].uri(), "moving to another dispatcher");
                    }
                    self.current.store(i, Ordering::Relaxed);
                    return Ok(channel);
                }
                Err(e) => match classify(kiln_domain::error_chain(&e)) {
                    // Another dispatcher may be reachable.
                    e @ ConnectError::Unreachable(_) => failed = e,
                    e => return Err(e),
                },
            }
        }
        // None could be reached: the next try starts with the one after the first tried.
        self.next_first();
        Err(failed)
    }

    /// The next stream is tried first at the dispatcher after the current one.
    fn next_first(&self) {
        let n = self.endpoints.len().max(1);
        let _ = self
            .current
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |i| Some((i + 1) % n));
    }
}

impl Transport for TonicTransport {
    fn move_on(&self) {
        if self.endpoints.len() > 1 {
            tracing::info!("the dispatcher stopped answering: trying the next one first");
        }
        self.next_first();
    }

    async fn attach(
        &self,
        outbound: tokio::sync::mpsc::Receiver<RunnerMessage>,
    ) -> Result<Inbound, ConnectError> {
        let channel = self.connect().await?;
        let mut client =
            RunnerServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        let outbound = ReceiverStream::new(outbound).map(convert::runner_message_to_proto);
        let inbound = client
            .attach(outbound)
            .await
            .map_err(|s| match s.code() {
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                    ConnectError::Refused(convert::stream_error_from_status(&s))
                }
                _ => {
                    let e = classify(convert::status_chain(&s));
                    if matches!(e, ConnectError::Unreachable(_)) {
                        // It answered but cannot take the runner now (shutting down): the
                        // next try starts with another dispatcher, if there is one.
                        self.next_first();
                    }
                    e
                }
            })?
            .into_inner();
        Ok(Box::pin(inbound.filter_map(|m| match m {
            Ok(m) => match convert::dispatcher_message_from_proto(m) {
                Ok(Some(m)) => Some(Ok(m)),
                // A kind this runner does not know (a newer dispatcher): ignored.
                Ok(None) => None,
                Err(message) => Some(Err(StreamError::InvalidArgument { message })),
            },
            Err(s) => {
                let chain = convert::status_chain(&s);
                Some(Err(if is_permanent(&chain) {
                    StreamError::Tls {
                        message: tls_hint(&chain),
                    }
                } else {
                    convert::stream_error_from_status(&s)
                }))
            }
        })))
    }
}

/// A failure to connect or attach: permanent when the TLS handshake failed over a certificate
/// (ours refused by the dispatcher, or the dispatcher's not trusted by us) or the handshake was
/// refused (no common protocol), since trying again changes nothing; anything else (refused or
/// reset connections, timeouts, a restarting dispatcher) may pass.
fn classify(chain: String) -> ConnectError {
    if is_permanent(&chain) {
        ConnectError::Tls(tls_hint(&chain))
    } else {
        ConnectError::Unreachable(chain)
    }
}

/// A TLS failure's chain with what to check first.
fn tls_hint(chain: &str) -> String {
    let hint = if chain.contains("invalid peer certificate") {
        "this runner does not trust the dispatcher's certificate (see --tls-ca)"
    } else if chain.contains("Certificate") || chain.contains("UnknownCA") {
        "the dispatcher refused this runner's certificate (see --tls-cert, --tls-key)"
    } else {
        "the dispatcher refused the TLS handshake"
    };
    format!("{hint}: {chain}")
}

/// Whether an error chain (as [`kiln_domain::error_chain`] writes it) tells of a TLS failure
/// that a retry will not mend. rustls writes `invalid peer certificate: ...` when we refuse
/// the dispatcher's certificate, and `received fatal alert: ...` when the dispatcher refuses
/// ours (or the handshake).
fn is_permanent(chain: &str) -> bool {
    const PERMANENT_ALERTS: &[&str] = &[
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "CertificateUnknown",
        "CertificateRequired",
        "UnknownCA",
        "AccessDenied",
        "HandshakeFailure",
        "ProtocolVersion",
        "InsufficientSecurity",
        "NoApplicationProtocol",
    ];
    chain.contains("invalid peer certificate")
        || chain.contains("peer sent no certificates")
        || chain.contains("peer is incompatible")
        || chain
            .split("received fatal alert: ")
            .skip(1)
            .any(|rest| PERMANENT_ALERTS.iter().any(|alert| rest.starts_with(alert)))
}

#[cfg(test)]
mod tests {
    use super::is_permanent;

    /// Error chains as the runner saw them (rustls' words under tonic's and hyper's).
    #[test]
    fn certificate_failures_are_permanent_and_the_rest_are_retried() {
        for permanent in [
            "transport error: invalid peer certificate: UnknownIssuer",
            "transport error: connection error: received fatal alert: UnknownCA",
            "transport error: connection error: received fatal alert: CertificateRequired",
            "transport error: received fatal alert: BadCertificate",
            "transport error: received fatal alert: HandshakeFailure",
        ] {
            assert!(is_permanent(permanent), "{permanent}");
        }
        for transient in [
            "transport error: tcp connect error: Connection refused (os error 111)",
            "transport error: connection error: stream closed because of a broken pipe",
            "operation was canceled: connection closed",
            "http2 error: keep-alive timed out: operation timed out",
            "no welcome within 10s",
            "transport error: received fatal alert: InternalError",
            "h2 protocol error: http2 error",
        ] {
            assert!(!is_permanent(transient), "{transient}");
        }
    }
}

//! kiln's gRPC clients as the CLI, the observer and scripts use them: how to reach a
//! dispatcher ([`Connection`]: URL, token, TLS files) and the clients connected from it.

use std::time::Duration;

use tonic::transport::Channel;
use tower::timeout::Timeout;

use crate::auth::BearerToken;
use crate::proto::build_service_client::BuildServiceClient;
use crate::proto::runner_admin_service_client::RunnerAdminServiceClient;

/// The dispatcher URLs a `--dispatcher` value names: one URL, or several separated by commas
/// (several dispatchers sharing one farm on PostgreSQL). Blanks around each are ignored; an
/// empty entry is an error.
pub fn dispatcher_urls(value: &str) -> Result<Vec<String>, String> {
    let urls: Vec<String> = value.split(',').map(|u| u.trim().to_string()).collect();
    if urls.iter().any(String::is_empty) {
        return Err(format!(
            "dispatcher URL list {value:?} has an empty entry (give URLs separated by commas)"
        ));
    }
    Ok(urls)
}

/// How long a call waits for the dispatcher's answer (for a streaming call, for the stream to
/// open: what follows is not limited). A call past it fails with `tower`'s `Elapsed` in its
/// status's source chain (tonic's own `Endpoint::timeout` would give a plain `Cancelled`, not
/// told apart from a dispatcher's answer). Every call the dispatcher serves answers in
/// milliseconds; a call with no answer by then failed in the connection under it. Without a
/// deadline such a call could wait forever: a request handed to a connection in the instant it
/// fails (a plaintext client on a TLS port, about one call in a thousand here) is never
/// answered nor failed by the HTTP/2 client, and no socket is left for the keepalive to watch.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The deadline of the calls the dispatcher answers after fetching the repository
/// (`SubmitBuild`, `RetryBuild`, `ReportCommits`): a first fetch of a large repository takes
/// minutes.
pub const FETCHING_CALL_TIMEOUT: Duration = Duration::from_secs(3600);

/// How a client reaches the dispatcher.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// The dispatcher's URL, or several separated by commas: a client uses the first it can
    /// reach.
    pub url: String,
    /// API token.
    pub token: Option<String>,
    /// TLS files.
    pub tls: crate::tls::ClientTls,
    /// How long every call waits for an answer, instead of [`CALL_TIMEOUT`] and
    /// [`FETCHING_CALL_TIMEOUT`] (`--timeout`).
    pub timeout: Option<Duration>,
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

/// Why a client could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection's settings are wrong (a token that cannot be a header, unreadable TLS
    /// files, a URL that is not one).
    #[error("{0}")]
    Config(String),
    /// The dispatcher could not be reached.
    #[error("cannot reach the dispatcher at {url}: {reason}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// Why (the transport's error chain).
        reason: String,
    },
}

/// A `BuildService` client that sends the API token.
pub type BuildClient = BuildServiceClient<
    tonic::service::interceptor::InterceptedService<Timeout<Channel>, BearerToken>,
>;

/// A `RunnerAdminService` client that sends the API token.
pub type AdminClient = RunnerAdminServiceClient<
    tonic::service::interceptor::InterceptedService<Timeout<Channel>, BearerToken>,
>;

impl Connection {
    /// Connects a `BuildService` client whose calls wait [`CALL_TIMEOUT`] for an answer.
    pub async fn build_client(&self) -> Result<BuildClient, ClientError> {
        Ok(BuildServiceClient::with_interceptor(
            self.channel(self.timeout.unwrap_or(CALL_TIMEOUT)).await?,
            self.bearer()?,
        ))
    }

    /// Connects a `BuildService` client for the calls that fetch the repository first
    /// (`SubmitBuild`, `RetryBuild`, `ReportCommits`): [`FETCHING_CALL_TIMEOUT`].
    pub async fn fetching_build_client(&self) -> Result<BuildClient, ClientError> {
        Ok(BuildServiceClient::with_interceptor(
            self.channel(self.timeout.unwrap_or(FETCHING_CALL_TIMEOUT))
                .await?,
            self.bearer()?,
        ))
    }

    /// Connects a `RunnerAdminService` client.
    pub async fn admin_client(&self) -> Result<AdminClient, ClientError> {
        Ok(RunnerAdminServiceClient::with_interceptor(
            self.channel(self.timeout.unwrap_or(CALL_TIMEOUT)).await?,
            self.bearer()?,
        ))
    }

    fn bearer(&self) -> Result<BearerToken, ClientError> {
        BearerToken::new(self.token.as_deref()).map_err(ClientError::Config)
    }

    /// A channel to the first of the dispatchers that can be reached, tried in the order
    /// given; the error names the last one tried.
    async fn channel(&self, deadline: Duration) -> Result<Timeout<Channel>, ClientError> {
        let urls = dispatcher_urls(&self.url).map_err(ClientError::Config)?;
        let endpoints = urls
            .iter()
            .map(|url| {
                Ok(self
                    .tls
                    .endpoint(url)
                    .map_err(ClientError::Config)?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    // A connection that stops answering (a dispatcher that went away without
                    // closing it, or a TLS port spoken to in plaintext that never answers) is
                    // given up within half a minute instead of waited on forever.
                    .http2_keep_alive_interval(Duration::from_secs(10))
                    .keep_alive_timeout(Duration::from_secs(20))
                    .keep_alive_while_idle(true))
            })
            .collect::<Result<Vec<_>, ClientError>>()?;
        let mut failed = None;
        for (url, endpoint) in urls.iter().zip(endpoints) {
            match endpoint.connect().await {
                Ok(channel) => return Ok(Timeout::new(channel, deadline)),
                Err(e) => {
                    failed = Some(ClientError::Unreachable {
                        url: url.clone(),
                        reason: kiln_domain::error_chain(&e),
                    })
                }
            }
        }
        Err(failed.unwrap_or_else(|| ClientError::Config("no dispatcher URL given".into())))
    }
}

/// Whether a call failed in the connection under it rather than at the dispatcher: the
/// status carries (somewhere in its source chain) the transport's own error: an I/O error, a
/// connection (hyper) error, an HTTP/2 protocol error, or no answer within [`CALL_TIMEOUT`]. A plaintext client on a TLS port sees
/// one of these, which of them depending on timing.
pub fn failed_in_transport(s: &tonic::Status) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = next {
        if e.is::<tonic::transport::Error>()
            || e.is::<tower::timeout::error::Elapsed>()
            || e.is::<std::io::Error>()
            || e.is::<hyper::Error>()
            || e.is::<h2::Error>()
        {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a call failed because no answer came within its deadline ([`CALL_TIMEOUT`],
/// [`FETCHING_CALL_TIMEOUT`]).
pub fn timed_out(s: &tonic::Status) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = next {
        if e.is::<tower::timeout::error::Elapsed>() {
            return true;
        }
        next = e.source();
    }
    false
}

/// Whether a failed call means the dispatcher cannot take requests now (unreachable, shutting
/// down, out of time, or its disk is full): try again later rather than elsewhere.
pub fn is_unavailable(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted
    ) || failed_in_transport(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dispatcher_value_names_one_url_or_several() {
        assert_eq!(
            dispatcher_urls("http://a:1").as_deref(),
            Ok(&["http://a:1".to_string()][..])
        );
        assert_eq!(
            dispatcher_urls("http://a:1, http://b:2 ,http://c:3").as_deref(),
            Ok(&[
                "http://a:1".to_string(),
                "http://b:2".to_string(),
                "http://c:3".to_string()
            ][..])
        );
        for bad in ["", "http://a:1,", ",http://a:1", "http://a:1,,http://b:2"] {
            let Err(e) = dispatcher_urls(bad) else {
                panic!("{bad:?} accepted")
            };
            assert!(e.contains("empty entry"), "{e}");
        }
    }
}

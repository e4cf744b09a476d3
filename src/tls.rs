//! TLS settings from PEM files, for the dispatcher's listener and for clients (runners, CLI).

use std::path::{Path, PathBuf};

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

/// The dispatcher's TLS: its certificate and key, and optionally a CA whose client certificates
/// it accepts (mutual TLS).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA for client certificates (PEM), if clients may present one.
    pub client_ca: Option<PathBuf>,
}

/// How long a connection to a TLS dispatcher has to complete its handshake.
pub const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl ServerTls {
    /// Loads the files into tonic's configuration. Client certificates are optional at the TLS
    /// layer; the runner service can require them (`require_runner_cert`).
    pub fn load(&self) -> Result<ServerTlsConfig, String> {
        let identity = Identity::from_pem(
            read(&self.cert, "TLS certificate")?,
            read(&self.key, "TLS key")?,
        );
        // A connection that never completes its handshake is closed after a while: a
        // plaintext HTTP/2 client's first bytes read as a TLS record header announcing about
        // 8 KiB, which the acceptor would otherwise wait for forever (and so would the client).
        let mut cfg = ServerTlsConfig::new()
            .identity(identity)
            .timeout(TLS_HANDSHAKE_TIMEOUT);
        if let Some(ca) = &self.client_ca {
            cfg = cfg
                .client_ca_root(Certificate::from_pem(read(ca, "client CA")?))
                .client_auth_optional(true);
        }
        Ok(cfg)
    }
}

/// A client's TLS: which CA to trust (default: the system roots) and an optional client
/// certificate.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// CA certificate (PEM) to trust instead of the system roots.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM), for mutual TLS.
    pub cert: Option<PathBuf>,
    /// Client key (PEM).
    pub key: Option<PathBuf>,
}

impl ClientTls {
    /// An endpoint for `url`, with TLS when the URL is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, String> {
        let mut endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad dispatcher URL {url:?}: {e}"))?;
        if url.starts_with("https://") {
            let mut cfg = ClientTlsConfig::new();
            cfg = match &self.ca {
                Some(ca) => cfg.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?)),
                None => cfg.with_native_roots(),
            };
            match (&self.cert, &self.key) {
                (Some(c), Some(k)) => {
                    cfg = cfg.identity(Identity::from_pem(
                        read(c, "client certificate")?,
                        read(k, "client key")?,
                    ));
                }
                (None, None) => {}
                _ => return Err("a client certificate needs both --tls-cert and --tls-key".into()),
            }
            endpoint = endpoint
                .tls_config(cfg)
                .map_err(|e| format!("TLS configuration: {e}"))?;
        } else if self.ca.is_some() || self.cert.is_some() {
            return Err(format!(
                "TLS files were given but the dispatcher URL {url} is not https://"
            ));
        }
        Ok(endpoint)
    }
}

/// The names a client certificate (DER) gives its holder: its DNS subject alternative names and
/// its subject's common names. With mutual TLS a runner may attach only under one of them.
pub fn certificate_names(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| format!("the client certificate cannot be read: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(n) = name {
                names.push((*n).to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(cn) = cn.as_str() {
            names.push(cn.to_string());
        }
    }
    Ok(names)
}

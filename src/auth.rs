//! Who may do what: API tokens for the CLI and scripts, runner tokens for runners.
//!
//! - Write calls (submit, cancel, retry) need the API token when one is configured; reads need
//!   it too when reads are closed.
//! - A runner proves itself with its own token (created by `kiln admin runner-token create`,
//!   stored as a SHA-256 hash) or, for simple setups, the shared runner token. As soon as either
//!   exists, runners without a valid token are refused.
//! - Tokens are compared in constant time (`subtle`), on their hashes.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::Status;
use tonic::metadata::MetadataMap;

/// How API calls are authorised.
#[derive(Debug, Clone, Default)]
pub struct ApiAuth {
    /// The API token's hash, if one is configured.
    token_hash: Option<[u8; 32]>,
    /// Whether reads need the token too.
    closed_reads: bool,
}

pub use kiln_dispatcher::tokens::{hash_token, new_token, token_matches};

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The bearer token of a request, if any.
fn bearer(md: &MetadataMap) -> Option<&str> {
    md.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

impl ApiAuth {
    /// No token: everything open.
    pub fn open() -> Self {
        Self::default()
    }

    /// A token; reads open unless `closed_reads`.
    pub fn with_token(token: &str, closed_reads: bool) -> Self {
        Self {
            token_hash: Some(sha256(token)),
            closed_reads,
        }
    }

    fn check(&self, md: &MetadataMap, what: &str) -> Result<(), Status> {
        let Some(want) = &self.token_hash else {
            return Ok(());
        };
        match bearer(md) {
            None => Err(Status::unauthenticated(format!(
                "{what} needs an API token (authorization: Bearer ...; `kiln --token` or KILN_TOKEN)"
            ))),
            Some(t) if bool::from(sha256(t).ct_eq(want)) => Ok(()),
            Some(_) => Err(Status::permission_denied("the API token is not valid")),
        }
    }

    /// Authorises a call that changes state.
    pub fn check_write(&self, md: &MetadataMap) -> Result<(), Status> {
        self.check(md, "this call")
    }

    /// Authorises a call that only reads.
    pub fn check_read(&self, md: &MetadataMap) -> Result<(), Status> {
        if self.closed_reads {
            self.check(md, "reading (reads are closed)")
        } else {
            Ok(())
        }
    }
}

/// Adds `authorization: Bearer TOKEN` to every request of a client.
#[derive(Debug, Clone, Default)]
pub struct BearerToken(Option<tonic::metadata::AsciiMetadataValue>);

impl BearerToken {
    /// From an optional token; a token that is not valid ASCII is an error.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    "the token contains characters not allowed in a header".to_string()
                })
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: Option<&str>) -> MetadataMap {
        let mut m = MetadataMap::new();
        if let Some(v) = v
            && let Ok(v) = v.parse()
        {
            m.insert("authorization", v);
        }
        m
    }

    #[test]
    fn api_token_rules() {
        let open = ApiAuth::open();
        assert!(open.check_write(&md(None)).is_ok());
        let auth = ApiAuth::with_token("s3cret", false);
        assert_eq!(
            auth.check_write(&md(None)).map_err(|s| s.code()),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            auth.check_write(&md(Some("Bearer wrong")))
                .map_err(|s| s.code()),
            Err(tonic::Code::PermissionDenied)
        );
        assert!(auth.check_write(&md(Some("Bearer s3cret"))).is_ok());
        assert!(auth.check_read(&md(None)).is_ok());
        let closed = ApiAuth::with_token("s3cret", true);
        assert!(closed.check_read(&md(None)).is_err());
        assert!(closed.check_read(&md(Some("Bearer s3cret"))).is_ok());
    }

    #[test]
    fn runner_tokens_hash_and_compare() {
        let t = new_token();
        assert!(t.starts_with("kiln_") && t.len() == 5 + 64);
        let h = hash_token(&t);
        assert!(token_matches(&t, &h));
        assert!(!token_matches("other", &h));
        assert!(!token_matches(&t, "not hex"));
    }
}

//! Who may read and write, as gRPC decides it (`kiln serve --api-token`, `--closed-reads`):
//! writes need the API token when one is configured, reads need it too when reads are closed.
//! A request presents it as `Authorization: Bearer TOKEN`, or as the session cookie the login
//! form sets (`kiln_session`: a value derived from the token's hash, never the token; HttpOnly,
//! SameSite=Strict). Both are compared in constant time.
//!
//! Cross-site requests: every POST must come from this site (`Sec-Fetch-Site` same-origin or
//! none, and an `Origin`, when sent, naming this host), and a form POST must carry the CSRF
//! token of its page, equal to the `kiln_csrf` cookie (SameSite=Strict, double submit).

use axum::http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::WebError;

/// The session cookie's name.
pub(crate) const SESSION_COOKIE: &str = "kiln_session";
/// The CSRF cookie's name.
pub(crate) const CSRF_COOKIE: &str = "kiln_csrf";

/// How the web reporter authorises requests: the API token's hash and whether reads need it.
#[derive(Clone, Default)]
pub struct WebAuth {
    /// SHA-256 of the API token, if one is configured.
    token_hash: Option<[u8; 32]>,
    /// Whether reads need the token too.
    closed_reads: bool,
    /// Whether the listener is TLS: cookies are then `Secure`.
    secure_cookies: bool,
}

impl std::fmt::Debug for WebAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebAuth")
            .field("token", &self.token_hash.is_some())
            .field("closed_reads", &self.closed_reads)
            .field("secure_cookies", &self.secure_cookies)
            .finish()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// What a request proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Presented {
    /// No token needed, or a valid one (bearer or cookie).
    Valid,
    /// Nothing (or a stale cookie).
    Nothing,
    /// A bearer token that is not the API token.
    Wrong,
}

impl WebAuth {
    /// No token: everything open.
    pub fn open() -> Self {
        Self::default()
    }

    /// The API token; reads open unless `closed_reads`.
    pub fn with_token(token: &str, closed_reads: bool) -> Self {
        Self {
            token_hash: Some(sha256(token.as_bytes())),
            closed_reads,
            secure_cookies: false,
        }
    }

    /// Marks cookies `Secure` (the dispatcher serves TLS).
    pub fn secure_cookies(mut self, secure: bool) -> Self {
        self.secure_cookies = secure;
        self
    }

    /// A cookie's `Set-Cookie` value: HttpOnly, SameSite=Strict, the whole site, and Secure
    /// under TLS.
    pub(crate) fn cookie(&self, name: &str, value: &str) -> String {
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        format!("{name}={value}; Path=/; HttpOnly; SameSite=Strict{secure}")
    }

    /// Whether a token is configured.
    pub fn has_token(&self) -> bool {
        self.token_hash.is_some()
    }

    /// Whether reads need the token.
    pub fn closed_reads(&self) -> bool {
        self.token_hash.is_some() && self.closed_reads
    }

    /// The session cookie's value for the configured token: derived from its hash, so the
    /// cookie is not the token (it does not work on the gRPC API).
    fn session_value(&self) -> Option<String> {
        self.token_hash.map(|h| {
            let mut input = b"kiln web session\0".to_vec();
            input.extend_from_slice(&h);
            hex::encode(sha256(&input))
        })
    }

    /// Checks a token typed into the login form; the session cookie's value when it is right.
    pub(crate) fn login(&self, token: &str) -> Option<String> {
        let want = self.token_hash?;
        bool::from(sha256(token.trim().as_bytes()).ct_eq(&want))
            .then(|| self.session_value())
            .flatten()
    }

    /// What the request presents.
    pub(crate) fn presented(&self, headers: &HeaderMap) -> Presented {
        let Some(want) = &self.token_hash else {
            return Presented::Valid;
        };
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            let t = v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim);
            return match t {
                Some(t) if bool::from(sha256(t.as_bytes()).ct_eq(want)) => Presented::Valid,
                _ => Presented::Wrong,
            };
        }
        match (cookie(headers, SESSION_COOKIE), self.session_value()) {
            (Some(c), Some(s)) if bool::from(c.as_bytes().ct_eq(s.as_bytes())) => Presented::Valid,
            _ => Presented::Nothing,
        }
    }

    fn check(&self, headers: &HeaderMap, what: &str) -> Result<(), WebError> {
        match self.presented(headers) {
            Presented::Valid => Ok(()),
            Presented::Nothing => Err(WebError::new(
                StatusCode::UNAUTHORIZED,
                format!(
                    "{what} needs the API token (Authorization: Bearer TOKEN, or log in at /login)"
                ),
            )),
            Presented::Wrong => Err(WebError::forbidden("the API token is not valid")),
        }
    }

    /// Authorises a read.
    pub(crate) fn check_read(&self, headers: &HeaderMap) -> Result<(), WebError> {
        if self.closed_reads {
            self.check(headers, "reading (reads are closed)")
        } else {
            Ok(())
        }
    }

    /// Authorises a write (and refuses a cross-site one).
    pub(crate) fn check_write(&self, headers: &HeaderMap) -> Result<(), WebError> {
        same_site(headers)?;
        self.check(headers, "this action")
    }
}

/// A cookie's value from the request's `Cookie` headers.
pub(crate) fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// Refuses a request a browser marks as coming from another site.
pub(crate) fn same_site(headers: &HeaderMap) -> Result<(), WebError> {
    let refused = || WebError::forbidden("cross-site request refused");
    if let Some(v) = headers.get("sec-fetch-site") {
        let v = v.to_str().map_err(|_| refused())?;
        if v != "same-origin" && v != "none" {
            return Err(refused());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().map_err(|_| refused())?;
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(refused)?;
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .ok_or_else(refused)?;
        if !origin_host.eq_ignore_ascii_case(host) {
            return Err(refused());
        }
    }
    Ok(())
}

/// The CSRF token of the request's cookie, or a new one (to set as the cookie).
pub(crate) fn csrf_token(headers: &HeaderMap) -> (String, bool) {
    match cookie(headers, CSRF_COOKIE) {
        Some(c) if c.len() == 32 && c.bytes().all(|b| b.is_ascii_hexdigit()) => {
            (c.to_string(), false)
        }
        _ => (hex::encode(rand::random::<[u8; 16]>()), true),
    }
}

/// Checks a form's CSRF token against the cookie.
pub(crate) fn check_csrf(headers: &HeaderMap, form_token: &str) -> Result<(), WebError> {
    match cookie(headers, CSRF_COOKIE) {
        Some(c) if !c.is_empty() && bool::from(c.as_bytes().ct_eq(form_token.as_bytes())) => Ok(()),
        _ => Err(WebError::forbidden(
            "the form's CSRF token is missing or stale: reload the page and try again",
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn tokens_and_cookies() {
        let a = WebAuth::with_token("s3cret", true);
        assert_eq!(a.presented(&headers(&[])), Presented::Nothing);
        assert_eq!(
            a.presented(&headers(&[("authorization", "Bearer s3cret")])),
            Presented::Valid
        );
        assert_eq!(
            a.presented(&headers(&[("authorization", "Bearer nope")])),
            Presented::Wrong
        );
        let session = a.login("s3cret").unwrap();
        assert!(!session.contains("s3cret"));
        assert!(a.login("nope").is_none());
        let c = format!("a=b; {SESSION_COOKIE}={session}");
        assert_eq!(a.presented(&headers(&[("cookie", &c)])), Presented::Valid);
        assert_eq!(
            a.presented(&headers(&[("cookie", "kiln_session=00")])),
            Presented::Nothing
        );
        assert!(WebAuth::open().check_write(&headers(&[])).is_ok());
        assert_eq!(a.cookie("c", "v"), "c=v; Path=/; HttpOnly; SameSite=Strict");
        assert!(
            a.secure_cookies(true)
                .cookie("c", "v")
                .ends_with("; Secure")
        );
    }

    #[test]
    fn cross_site_posts_are_refused() {
        assert!(same_site(&headers(&[("sec-fetch-site", "cross-site")])).is_err());
        assert!(same_site(&headers(&[("sec-fetch-site", "same-origin")])).is_ok());
        assert!(
            same_site(&headers(&[
                ("origin", "http://evil.example"),
                ("host", "127.0.0.1:7878")
            ]))
            .is_err()
        );
        assert!(
            same_site(&headers(&[
                ("origin", "http://127.0.0.1:7878"),
                ("host", "127.0.0.1:7878")
            ]))
            .is_ok()
        );
        let h = headers(&[("cookie", "kiln_csrf=0123456789abcdef0123456789abcdef")]);
        assert!(check_csrf(&h, "0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_csrf(&h, "x").is_err());
        assert!(check_csrf(&headers(&[]), "").is_err());
    }
}

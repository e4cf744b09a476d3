//! Errors as the web answers them: JSON `{"error": ...}` for the API, a small page for pages.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::DispatchError;

/// A failed request: its status, what to say, and whether a page or JSON says it.
#[derive(Debug)]
pub(crate) struct WebError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) html: bool,
}

impl WebError {
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            html: false,
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    /// The same error, answered as a page.
    pub(crate) fn page(mut self) -> Self {
        self.html = true;
        self
    }
}

impl From<DispatchError> for WebError {
    fn from(e: DispatchError) -> Self {
        let status = match &e {
            DispatchError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            DispatchError::NotFound(_) => StatusCode::NOT_FOUND,
            DispatchError::FailedPrecondition { .. } | DispatchError::AlreadyBuilt { .. } => {
                StatusCode::CONFLICT
            }
            DispatchError::ResourceExhausted { .. } | DispatchError::Unavailable { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            DispatchError::Internal(m) => {
                tracing::error!(cause = %m, "web request failed");
                return Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error");
            }
            _ => StatusCode::BAD_REQUEST,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        if self.html {
            return crate::pages::error_page(self.status, &self.message);
        }
        let body = serde_json::json!({ "error": self.message }).to_string();
        let mut r = (self.status, body).into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        r
    }
}

/// Parses an id from a path segment: 400 with a clear message when it is not one.
pub(crate) fn parse_id<T: std::str::FromStr>(what: &str, raw: &str) -> Result<T, WebError> {
    match raw.parse::<T>() {
        Ok(v) if raw != "0" => Ok(v),
        _ => Err(WebError::bad_request(format!(
            "{raw:?} is not a {what} id (a positive integer)"
        ))),
    }
}

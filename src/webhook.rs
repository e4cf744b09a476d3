//! Push webhooks: `POST /webhooks/push` (also `/webhook`) on the dispatcher's gRPC listener,
//! so it shares its port and its TLS.
//!
//! A forge (GitHub, Gitea, Forgejo, Gogs, or anything that sends the same JSON) posts a push
//! event signed with HMAC-SHA256 of the raw body under a shared secret (`kiln serve
//! --webhook-secret`, or `KILN_WEBHOOK_SECRET`):
//!
//! - GitHub: `X-Hub-Signature-256: sha256=<hex>`; Gitea/Forgejo/Gogs: `X-Gitea-Signature:
//!   <hex>` (or `X-Gogs-Signature`). When several are present, `X-Hub-Signature-256` is the
//!   one checked. The comparison is in constant time.
//! - The event kind comes from `X-GitHub-Event` / `X-Gitea-Event` / `X-Gogs-Event`; anything
//!   but `push` (e.g. `ping`) is answered 200 and ignored. Without any of those headers the
//!   body is taken as a push.
//! - The payload: `ref` (`refs/heads/BRANCH`), `after`, optional `before`, `forced` and
//!   `commits[].id`, and `repository.clone_url` (or `repository.url`): what the dispatcher
//!   fetches, so a URL (or absolute path) the dispatcher can reach.
//!
//! What is built: the listed commits, oldest first (Gitea lists them newest first; a list that
//! starts with `after` is reversed), ending with `after`. A forced push or an empty list
//! builds `after` only. The commits go to [`Dispatcher::report_commits`] with trigger
//! `webhook`, which builds each commit not built before and moves the branch's cursor.
//!
//! Answers (JSON bodies):
//!
//! | status | when |
//! |---|---|
//! | 202 `{"builds":[ids]}` | a branch push was accepted (ids of the builds created, possibly none when every commit was built before) |
//! | 202 `{"builds":[],"ignored":"..."}` | a tag push, another kind of ref, or a branch deletion |
//! | 200 `{"builds":[],"ignored":"..."}` | an event other than `push` (`ping`, ...) |
//! | 400 `{"error":"...","field":"..."}` | the body is not JSON, or a field is missing or wrong (named) |
//! | 401 `{"error":"..."}` | no signature header, or a signature that does not match |
//! | 404 `{"error":"..."}` | webhooks are disabled (no secret configured), or the repository or a commit does not exist |
//! | 408 `{"error":"..."}` | the body did not arrive within 15 s |
//! | 413 `{"error":"..."}` | the body is larger than 1 MiB |
//! | 503 / 500 | the repository could not be fetched (retry later) / an internal error |
//!
//! Without a secret the endpoint does not exist (404, with an error saying how to enable it):
//! an unsigned push is never accepted. The API token (`--api-token`) does not apply here; the
//! signature is the webhook's authentication.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use kiln_dispatcher::{DispatchError, Dispatcher};

/// The webhook's path.
pub const PUSH_PATH: &str = "/webhooks/push";
/// The same endpoint under a shorter path.
pub const ALT_PATH: &str = "/webhook";
/// Largest body accepted (413 above).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest a sender may take to send the body (408 after).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// The trigger recorded on builds created by the webhook.
pub const TRIGGER: &str = "webhook";

/// The id git uses for "no commit" (a deleted or newly created ref).
const ZERO_ID: &str = "0000000000000000000000000000000000000000";

/// Webhook settings: enabled when a secret is set.
#[derive(Clone, Default)]
pub struct WebhookConfig {
    secret: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("enabled", &self.enabled())
            .finish()
    }
}

impl WebhookConfig {
    /// Webhooks disabled: the endpoint answers 404.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Webhooks enabled with this shared secret (must not be empty).
    pub fn with_secret(secret: &str) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("the webhook secret must not be empty".into());
        }
        Ok(Self {
            secret: Some(Arc::from(secret.as_bytes())),
        })
    }

    /// From an optional secret (`None`: disabled).
    pub fn from_option(secret: Option<&str>) -> Result<Self, String> {
        secret.map_or_else(|| Ok(Self::disabled()), Self::with_secret)
    }

    /// Whether the endpoint accepts pushes.
    pub fn enabled(&self) -> bool {
        self.secret.is_some()
    }
}

/// The signature a sender puts in `X-Gitea-Signature` (prefix `sha256=` for GitHub's
/// `X-Hub-Signature-256`): lowercase hex of HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length; this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks the request's signature header against the body (constant-time comparison).
fn verify(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> Result<(), &'static str> {
    let header_str = |name: &str| {
        headers
            .get(name)
            .map(|v| v.to_str().map(str::trim).unwrap_or(""))
    };
    let hex_sig = if let Some(v) = header_str("x-hub-signature-256") {
        v.strip_prefix("sha256=")
            .ok_or("X-Hub-Signature-256 must be sha256=<hex>")?
    } else if let Some(v) =
        header_str("x-gitea-signature").or_else(|| header_str("x-gogs-signature"))
    {
        v.strip_prefix("sha256=").unwrap_or(v)
    } else {
        return Err(
            "missing signature: X-Hub-Signature-256 (GitHub) or X-Gitea-Signature (Gitea) is required",
        );
    };
    let sig = hex::decode(hex_sig).map_err(|_| "the signature is not hex")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad secret")?;
    mac.update(body);
    mac.verify_slice(&sig)
        .map_err(|_| "the signature does not match the body and the configured secret")
}

/// The event kind from the sender's headers, if it sent one.
fn event_kind(headers: &HeaderMap) -> Option<String> {
    ["x-github-event", "x-gitea-event", "x-gogs-event"]
        .iter()
        .find_map(|h| headers.get(*h))
        .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase())
}

/// A push reduced to what kiln needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Push {
    /// Build these commits (oldest first, never empty) of `branch` of `repo`.
    Branch {
        /// What the dispatcher fetches.
        repo: String,
        /// The branch pushed to.
        branch: String,
        /// Commits to report, oldest first; the last one is the new head.
        commits: Vec<String>,
    },
    /// Nothing to build, and why.
    Ignored(String),
}

/// A problem with the payload: which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadError {
    /// The field (`ref`, `after`, `commits[2].id`, `repository.clone_url`, ...), or `body`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl PayloadError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Reads a push payload (GitHub or Gitea JSON).
pub fn parse_push(body: &[u8]) -> Result<Push, PayloadError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| PayloadError::new("body", format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(PayloadError::new("body", "the body must be a JSON object"));
    }
    let string = |field: &str| -> Result<&str, PayloadError> {
        match v.get(field) {
            None | Some(Value::Null) => {
                Err(PayloadError::new(field, format!("{field} is required")))
            }
            Some(Value::String(s)) => Ok(s.as_str()),
            Some(_) => Err(PayloadError::new(
                field,
                format!("{field} must be a string"),
            )),
        }
    };
    let git_ref = string("ref")?;
    let after = string("after")?.trim().to_ascii_lowercase();
    if !is_commit_id(&after) {
        return Err(PayloadError::new(
            "after",
            format!("after {after:?} is not a full commit id"),
        ));
    }
    let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
        let what = if git_ref.starts_with("refs/tags/") {
            "a tag push"
        } else {
            "not a branch"
        };
        return Ok(Push::Ignored(format!("{git_ref}: {what}")));
    };
    if branch.is_empty() {
        return Err(PayloadError::new("ref", "ref names no branch"));
    }
    if after.bytes().all(|b| b == b'0') || after == ZERO_ID {
        return Ok(Push::Ignored(format!("{git_ref}: branch deleted")));
    }
    let forced = match v.get("forced") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(PayloadError::new("forced", "forced must be true or false")),
    };
    let repo = match v.get("repository") {
        Some(Value::Object(r)) => {
            let pick = |k: &str| {
                r.get(k)
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
            };
            pick("clone_url").or_else(|| pick("url")).ok_or_else(|| {
                PayloadError::new(
                    "repository.clone_url",
                    "repository.clone_url (or repository.url) is required",
                )
            })?
        }
        None | Some(Value::Null) => {
            return Err(PayloadError::new("repository", "repository is required"));
        }
        Some(_) => {
            return Err(PayloadError::new(
                "repository",
                "repository must be an object",
            ));
        }
    };
    let mut commits = Vec::new();
    match v.get("commits") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, c) in list.iter().enumerate() {
                let id = c
                    .get("id")
                    .and_then(Value::as_str)
                    .map(|s| s.trim().to_ascii_lowercase())
                    .ok_or_else(|| {
                        PayloadError::new(format!("commits[{i}].id"), "a commit id is required")
                    })?;
                if !is_commit_id(&id) {
                    return Err(PayloadError::new(
                        format!("commits[{i}].id"),
                        format!("{id:?} is not a full commit id"),
                    ));
                }
                commits.push(id);
            }
        }
        Some(_) => return Err(PayloadError::new("commits", "commits must be an array")),
    }
    if forced || commits.is_empty() {
        commits = vec![after];
    } else {
        // Gitea (and newer GitLab) list the newest commit first; GitHub the oldest.
        if commits.len() > 1 && commits.first() == Some(&after) && commits.last() != Some(&after) {
            commits.reverse();
        }
        if commits.last() != Some(&after) {
            commits.retain(|c| *c != after);
            commits.push(after);
        }
    }
    Ok(Push::Branch {
        repo: repo.to_string(),
        branch: branch.to_string(),
        commits,
    })
}

struct Hook {
    dispatcher: Dispatcher,
    config: WebhookConfig,
}

/// The webhook routes, as tonic routes to serve next to the gRPC services (tonic adds its
/// services to this router). Paths that are neither a webhook nor a gRPC service get gRPC's
/// UNIMPLEMENTED (for gRPC clients) or a JSON 404.
/// `extra` routes (plain HTTP downloads) are served beside them.
pub fn routes(
    dispatcher: Dispatcher,
    config: WebhookConfig,
    extra: axum::Router,
) -> tonic::service::Routes {
    let hook = Arc::new(Hook { dispatcher, config });
    let router = axum::Router::new()
        .route(PUSH_PATH, post(push))
        .route(ALT_PATH, post(push))
        .fallback(fallback)
        .with_state(hook)
        .merge(extra);
    tonic::service::Routes::from(router)
}

fn reply(status: StatusCode, body: Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    reply(status, json!({ "error": message.into() }))
}

async fn fallback(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("")
            .into_http::<Body>()
            .into_response();
    }
    error(
        StatusCode::NOT_FOUND,
        format!("not found: the push webhook is POST {PUSH_PATH}"),
    )
}

async fn push(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Body) -> Response {
    let Some(secret) = hook.config.secret.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "webhooks are disabled: start kiln serve with --webhook-secret (or KILN_WEBHOOK_SECRET)",
        );
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, read_body(body)).await {
        Ok(Ok(b)) => b,
        Ok(Err(r)) => return r,
        // A sender that stops mid-body would otherwise also hold up a graceful shutdown.
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                format!("the body did not arrive within {BODY_TIMEOUT:?}"),
            );
        }
    };
    if let Err(why) = verify(&secret, &headers, &body) {
        tracing::warn!(reason = why, "webhook refused");
        return error(StatusCode::UNAUTHORIZED, why);
    }
    if let Some(event) = event_kind(&headers)
        && event != "push"
    {
        return reply(
            StatusCode::OK,
            json!({ "builds": [], "ignored": format!("event {event:?} is not a push") }),
        );
    }
    let (repo, branch, commits) = match parse_push(&body) {
        Ok(Push::Branch {
            repo,
            branch,
            commits,
        }) => (repo, branch, commits),
        Ok(Push::Ignored(why)) => {
            return reply(
                StatusCode::ACCEPTED,
                json!({ "builds": [], "ignored": why }),
            );
        }
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({ "error": e.message, "field": e.field }),
            );
        }
    };
    tracing::info!(%repo, %branch, commits = commits.len(), "webhook push");
    // Its own task: a sender that hangs up (GitHub waits 10 s) does not cut the report short.
    let d = hook.dispatcher.clone();
    let task = tokio::spawn(async move {
        d.report_commits(&repo, &branch, &commits, TRIGGER)
            .await
            .map(|builds| builds.iter().map(|b| b.build.id).collect::<Vec<_>>())
    });
    match task.await {
        Ok(Ok(ids)) => reply(StatusCode::ACCEPTED, json!({ "builds": ids })),
        Ok(Err(e)) => dispatch_error(e),
        Err(e) => {
            tracing::error!(cause = %e, "webhook task failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the dispatcher's log)",
            )
        }
    }
}

/// The body, at most [`MAX_BODY_BYTES`] (413 above, without reading the rest).
async fn read_body(body: Body) -> Result<Vec<u8>, Response> {
    use tokio_stream::StreamExt as _;
    let mut data = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = data.next().await {
        let chunk = chunk.map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
            )
        })?;
        if buf.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is larger than {MAX_BODY_BYTES} bytes"),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn dispatch_error(e: DispatchError) -> Response {
    let message = e.to_string();
    match e {
        DispatchError::InvalidArgument { .. } => error(StatusCode::BAD_REQUEST, message),
        DispatchError::NotFound(_) => error(StatusCode::NOT_FOUND, message),
        DispatchError::FailedPrecondition { .. }
        | DispatchError::AlreadyBuilt { .. }
        | DispatchError::RunnerAttached { .. } => error(StatusCode::CONFLICT, message),
        DispatchError::Unavailable { .. } => error(StatusCode::SERVICE_UNAVAILABLE, message),
        DispatchError::ResourceExhausted { .. } => error(StatusCode::INSUFFICIENT_STORAGE, message),
        // Runner-session errors; a webhook does not meet them.
        DispatchError::Unauthenticated { .. } => error(StatusCode::UNAUTHORIZED, message),
        DispatchError::PermissionDenied { .. } => error(StatusCode::FORBIDDEN, message),
        DispatchError::HelloTimeout { .. }
        | DispatchError::OutputGap { .. }
        | DispatchError::OutputMissing { .. }
        | DispatchError::Internal(_) => {
            tracing::error!(cause = %message, "internal error");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error (see the dispatcher's log)",
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const C: &str = "3333333333333333333333333333333333333333";

    fn body(v: Value) -> Vec<u8> {
        v.to_string().into_bytes()
    }

    fn branch(commits: &[&str]) -> Push {
        Push::Branch {
            repo: "/srv/r.git".into(),
            branch: "main".into(),
            commits: commits.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn github_order_and_forced_and_empty() {
        let p = |commits: Value, forced: bool| {
            parse_push(&body(json!({
                "ref": "refs/heads/main", "before": A, "after": C, "forced": forced,
                "commits": commits, "repository": {"clone_url": "/srv/r.git"},
            })))
            .unwrap()
        };
        assert_eq!(p(json!([{"id": B}, {"id": C}]), false), branch(&[B, C]));
        // Gitea: newest first.
        assert_eq!(p(json!([{"id": C}, {"id": B}]), false), branch(&[B, C]));
        assert_eq!(p(json!([{"id": B}, {"id": C}]), true), branch(&[C]));
        assert_eq!(p(json!([]), false), branch(&[C]));
        // The head is always last.
        assert_eq!(p(json!([{"id": B}]), false), branch(&[B, C]));
    }

    #[test]
    fn tags_and_deletions_are_ignored() {
        let tag = parse_push(&body(json!({
            "ref": "refs/tags/v1", "after": A, "repository": {"clone_url": "/r"},
        })))
        .unwrap();
        assert!(matches!(tag, Push::Ignored(_)), "{tag:?}");
        let del = parse_push(&body(json!({
            "ref": "refs/heads/main", "after": ZERO_ID, "repository": {"clone_url": "/r"},
        })))
        .unwrap();
        assert!(matches!(del, Push::Ignored(_)), "{del:?}");
    }

    #[test]
    fn errors_name_the_field() {
        let field = |v: Value| parse_push(&body(v)).unwrap_err().field;
        assert_eq!(parse_push(b"{nope").unwrap_err().field, "body");
        assert_eq!(field(json!({"after": A})), "ref");
        assert_eq!(field(json!({"ref": "refs/heads/x"})), "after");
        assert_eq!(
            field(json!({"ref": "refs/heads/x", "after": "abc"})),
            "after"
        );
        assert_eq!(
            field(json!({"ref": "refs/heads/x", "after": A})),
            "repository"
        );
        assert_eq!(
            field(json!({"ref": "refs/heads/x", "after": A, "repository": {}})),
            "repository.clone_url"
        );
        assert_eq!(
            field(
                json!({"ref": "refs/heads/x", "after": A, "repository": {"url": "/r"},
                         "commits": [{"id": A}, {}]})
            ),
            "commits[1].id"
        );
    }

    #[test]
    fn signatures() {
        let secret = b"s3cret";
        let body = b"{\"x\":1}";
        let sig = signature(secret, body);
        let mut h = HeaderMap::new();
        assert!(verify(secret, &h, body).is_err());
        h.insert(
            "x-hub-signature-256",
            HeaderValue::from_str(&format!("sha256={sig}")).unwrap(),
        );
        assert!(verify(secret, &h, body).is_ok());
        assert!(verify(b"other", &h, body).is_err());
        assert!(verify(secret, &h, b"{\"x\":2}").is_err());
        let mut g = HeaderMap::new();
        g.insert(
            "x-gitea-signature",
            HeaderValue::from_str(&sig.to_uppercase()).unwrap(),
        );
        assert!(verify(secret, &g, body).is_ok());
        g.insert("x-gitea-signature", HeaderValue::from_static("zz"));
        assert!(verify(secret, &g, body).is_err());
    }
}

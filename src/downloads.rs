//! Plain HTTP downloads beside the gRPC API, on the same port and TLS: a build's merged JUnit
//! XML report at `GET /builds/{id}/junit.xml`, for browsers, `curl` and CI dashboards that
//! read JUnit (404 when the build has no report, rather than an empty one a consumer would
//! read as success); the dispatcher's metrics at `GET /metrics` (Prometheus / OpenMetrics
//! text, see [`kiln_dispatcher::metrics`]). Reads follow the API's rule: open, unless reads are
//! closed, then the API token is needed as `Authorization: Bearer TOKEN` (Prometheus'
//! `authorization` scrape setting).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tonic::metadata::MetadataMap;

use crate::auth::ApiAuth;
use kiln_dispatcher::Dispatcher;
use kiln_domain::BuildId;

/// Path of a build's JUnit report.
pub const JUNIT_PATH: &str = "/builds/{id}/junit.xml";
/// Path of the metrics.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Clone)]
struct Downloads {
    dispatcher: Dispatcher,
    auth: ApiAuth,
}

/// The download routes.
pub fn router(dispatcher: Dispatcher, auth: ApiAuth) -> axum::Router {
    axum::Router::new()
        .route(JUNIT_PATH, get(junit))
        .route(METRICS_PATH, get(metrics))
        .with_state(Downloads { dispatcher, auth })
}

fn text(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

/// The API's read rule over HTTP: the answer to give when the read is refused.
fn refuse_read(d: &Downloads, headers: HeaderMap) -> Option<Response> {
    let s = d
        .auth
        .check_read(&MetadataMap::from_headers(headers))
        .err()?;
    let code = match s.code() {
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        _ => StatusCode::UNAUTHORIZED,
    };
    Some(text(code, s.message().to_string()))
}

async fn metrics(State(d): State<Downloads>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_read(&d, headers) {
        return r;
    }
    match d.dispatcher.metrics_text().await {
        Ok(body) => {
            let mut r = body.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(kiln_dispatcher::metrics::CONTENT_TYPE),
            );
            r
        }
        Err(e) => {
            let s = crate::api::status(e);
            text(StatusCode::SERVICE_UNAVAILABLE, s.message().to_string())
        }
    }
}

async fn junit(State(d): State<Downloads>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_read(&d, headers) {
        return r;
    }
    let Ok(id) = id.parse::<BuildId>() else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a build id (a positive integer)"),
        );
    };
    match d.dispatcher.test_report(id).await {
        Ok(r) => match r.junit_xml() {
            None => text(
                StatusCode::NOT_FOUND,
                format!(
                    "build {id} has no test report: no split step, and no step's `junit` files \
                     gave test cases"
                ),
            ),
            Some(xml) => {
                let mut r = xml.into_response();
                let h = r.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/xml; charset=utf-8"),
                );
                if let Ok(v) =
                    HeaderValue::from_str(&format!("attachment; filename=\"kiln-build-{id}.xml\""))
                {
                    h.insert(header::CONTENT_DISPOSITION, v);
                }
                r
            }
        },
        Err(e) => {
            let s = crate::api::status(e);
            let code = match s.code() {
                tonic::Code::NotFound => StatusCode::NOT_FOUND,
                tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            text(code, s.message().to_string())
        }
    }
}

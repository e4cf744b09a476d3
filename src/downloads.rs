//! Plain HTTP downloads beside the gRPC API, on the same port and TLS: a build's merged JUnit
//! XML report at `GET /builds/{id}/junit.xml`, for browsers, `curl` and CI dashboards that
//! read JUnit (404 when the build has no report, rather than an empty one a consumer would
//! read as success). Reads follow the API's rule: open, unless reads are closed, then the API token
//! is needed as `Authorization: Bearer TOKEN`.

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

#[derive(Clone)]
struct Downloads {
    dispatcher: Dispatcher,
    auth: ApiAuth,
}

/// The download routes.
pub fn router(dispatcher: Dispatcher, auth: ApiAuth) -> axum::Router {
    axum::Router::new()
        .route(JUNIT_PATH, get(junit))
        .with_state(Downloads { dispatcher, auth })
}

fn text(status: StatusCode, message: String) -> Response {
    (status, format!("{message}\n")).into_response()
}

async fn junit(State(d): State<Downloads>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(s) = d.auth.check_read(&MetadataMap::from_headers(headers)) {
        let code = match s.code() {
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        return text(code, s.message().to_string());
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

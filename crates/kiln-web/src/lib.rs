//! The web reporter: server-rendered pages and a JSON API over the dispatcher engine, served by
//! `kiln serve` on its API port (plain HTTP beside gRPC, same TLS).
//!
//! - [`router`] the routes; [`WebAuth`] who may read and write (the API token, as gRPC checks
//!   it: `Authorization: Bearer TOKEN`, or the session cookie the login form sets).
//! - `pages` the HTML pages (askama templates in `templates/`, assets in `assets/`, all
//!   compiled into the binary); `api` the JSON API; `log` reading a job's log by offset (tail,
//!   earlier parts, the SSE follower, the plain-text download); `svg` the job DAG, the split
//!   timeline and the badge, drawn on the server; `auth` tokens, cookies and CSRF.
//!
//! Pages read without JavaScript; the little script (`assets/app.js`) only adds live updates
//! (`GET /events`, `GET /jobs/{id}/log/events`, both Server-Sent Events) and loading earlier
//! output on scroll-up.

mod api;
mod auth;
mod error;
mod log;
mod pages;
mod svg;
mod time;

use axum::Router;
use axum::routing::{get, post};
use kiln_dispatcher::Dispatcher;
use tokio_util::sync::CancellationToken;

pub use auth::WebAuth;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct Web {
    /// The engine.
    pub(crate) dispatcher: Dispatcher,
    /// Who may read and write.
    pub(crate) auth: std::sync::Arc<WebAuth>,
    /// Cancelled when the dispatcher shuts down: long-lived streams (SSE) end then.
    pub(crate) shutdown: CancellationToken,
}

/// The web reporter's routes (pages, assets, JSON API), to merge into the dispatcher's HTTP
/// routes. Its event streams end only when their clients leave; see [`router_with_shutdown`].
pub fn router(dispatcher: Dispatcher, auth: WebAuth) -> Router {
    router_with_shutdown(dispatcher, auth, CancellationToken::new())
}

/// [`router`], whose event streams end when `shutdown` is cancelled (so a graceful shutdown
/// does not wait for open browser tabs).
pub fn router_with_shutdown(
    dispatcher: Dispatcher,
    auth: WebAuth,
    shutdown: CancellationToken,
) -> Router {
    let web = Web {
        dispatcher,
        auth: std::sync::Arc::new(auth),
        shutdown,
    };
    Router::new()
        // Pages.
        .route("/", get(pages::builds))
        .route("/builds/{id}", get(pages::build))
        .route("/builds/{id}/tests", get(pages::tests))
        .route("/builds/{id}/cancel", post(pages::cancel))
        .route("/builds/{id}/retry", post(pages::retry))
        .route("/runners", get(pages::runners))
        .route("/runners/{name}/drain", post(pages::drain))
        .route("/new", get(pages::new_form).post(pages::new_submit))
        .route("/login", get(pages::login_form).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/badge/{repo}/{*branch}", get(svg::badge))
        .route("/static/style.css", get(pages::style))
        .route("/static/app.js", get(pages::script))
        // Live updates and logs.
        .route("/events", get(log::build_events))
        .route("/jobs/{id}/log/events", get(log::log_events))
        .route("/jobs/{id}/log.txt", get(log::log_txt))
        // JSON API.
        .route("/api/builds", get(api::list_builds).post(api::submit))
        .route("/api/builds/{id}", get(api::get_build))
        .route("/api/builds/{id}/tests", get(api::tests))
        .route("/api/builds/{id}/deliveries", get(api::deliveries))
        .route("/api/builds/{id}/cancel", post(api::cancel))
        .route("/api/builds/{id}/retry", post(api::retry))
        .route("/api/jobs/{id}", get(api::get_job))
        .route("/api/jobs/{id}/log", get(api::log))
        .route("/api/runners", get(api::runners))
        .route("/api/runners/{name}/drain", post(api::drain))
        .route("/api/queue", get(api::queue))
        .with_state(web)
}

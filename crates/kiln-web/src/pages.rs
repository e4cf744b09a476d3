//! The HTML pages (askama templates from `templates/`, escaped by default) and their forms.
//! Every form POSTs with a CSRF token (see `auth`) and answers with a redirect (303).

use std::collections::BTreeMap;

use askama::Template;
use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Redirect, Response};
use kiln_dispatcher::SubmitRequest;
use kiln_domain::split::{UnitOutcome, UnitTryState, UnitVerdict};
use kiln_domain::{BuildId, JobState};
use kiln_store::BuildFilter;
use serde::Deserialize;

use crate::Web;
use crate::api::{ListQuery, labels_text, retried_by, runner_state};
use crate::auth::{CSRF_COOKIE, SESSION_COOKIE, check_csrf, csrf_token, same_site};
use crate::error::{WebError, parse_id};
use crate::time::{duration, span, utc};

const STYLE: &str = include_str!("../assets/style.css");
const SCRIPT: &str = include_str!("../assets/app.js");

/// What every page's frame needs.
#[derive(Debug)]
pub(crate) struct Frame {
    /// The page's title.
    title: String,
    /// This page's CSRF token (its forms carry it).
    csrf: String,
    /// Whether a token is configured (show log in / log out).
    has_token: bool,
    /// Whether this browser is logged in.
    logged_in: bool,
}

fn frame(w: &Web, headers: &HeaderMap, title: impl Into<String>) -> (Frame, Option<String>) {
    let (csrf, new) = csrf_token(headers);
    let logged_in = w.auth.has_token()
        && crate::auth::cookie(headers, SESSION_COOKIE).is_some()
        && w.auth.presented(headers) == crate::auth::Presented::Valid;
    (
        Frame {
            title: title.into(),
            csrf: csrf.clone(),
            has_token: w.auth.has_token(),
            logged_in,
        },
        new.then(|| w.auth.cookie(CSRF_COOKIE, &csrf)),
    )
}

/// A rendered page with the headers every page gets (and the CSRF cookie, a whole
/// `Set-Cookie` value, when new).
fn page(t: &impl Template, status: StatusCode, set_csrf: Option<String>) -> Response {
    let body = match t.render() {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(cause = %e, "cannot render a page");
            return (StatusCode::INTERNAL_SERVER_ERROR, "cannot render the page").into_response();
        }
    };
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(c) = set_csrf
        && let Ok(v) = HeaderValue::from_str(&c)
    {
        h.append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage {
    frame: Frame,
    status: u16,
    message: String,
}

/// A page saying what went wrong.
pub(crate) fn error_page(status: StatusCode, message: &str) -> Response {
    let t = ErrorPage {
        frame: Frame {
            title: format!(
                "{} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ),
            csrf: String::new(),
            has_token: false,
            logged_in: false,
        },
        status: status.as_u16(),
        message: message.to_string(),
    };
    page(&t, status, None)
}

/// The read rule for pages: refused reads go to the login form.
fn page_read(w: &Web, headers: &HeaderMap, uri: &Uri) -> Result<(), Box<Response>> {
    match w.auth.check_read(headers) {
        Ok(()) => Ok(()),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(Box::new(to_login(uri.path()))),
        Err(e) => Err(Box::new(e.page().into_response())),
    }
}

fn to_login(next: &str) -> Response {
    let next: String =
        percent_encoding::utf8_percent_encode(next, percent_encoding::NON_ALPHANUMERIC).collect();
    Redirect::to(&format!("/login?next={next}")).into_response()
}

/// The write rule for forms: same site, the page's CSRF token, then the API token (the
/// login form when it is missing).
fn page_write(w: &Web, headers: &HeaderMap, csrf: &str, back: &str) -> Result<(), Box<Response>> {
    same_site(headers).map_err(|e| Box::new(e.page().into_response()))?;
    check_csrf(headers, csrf).map_err(|e| Box::new(e.page().into_response()))?;
    match w.auth.check_write(headers) {
        Ok(()) => Ok(()),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(Box::new(to_login(back))),
        Err(e) => Err(Box::new(e.page().into_response())),
    }
}

/// A build as a row of a list.
#[derive(Debug)]
struct Row {
    id: BuildId,
    state: &'static str,
    repo: String,
    branch: String,
    commit: String,
    trigger: String,
    created: String,
    took: String,
}

fn row(b: &kiln_domain::Build) -> Row {
    Row {
        id: b.id,
        state: b.state.as_str(),
        repo: b.repo.clone(),
        branch: b.branch.clone(),
        commit: b.commit.chars().take(10).collect(),
        trigger: b.trigger.clone(),
        created: utc(b.created_at),
        took: span(Some(b.created_at), b.finished_at),
    }
}

#[derive(Template)]
#[template(path = "builds.html")]
struct BuildsPage {
    frame: Frame,
    repo: String,
    branch: String,
    state: String,
    states: Vec<(&'static str, bool)>,
    rows: Vec<Row>,
    heads: Vec<Row>,
}

/// `GET /`: builds, newest first, filtered; the head of each branch.
pub(crate) async fn builds(
    State(w): State<Web>,
    Query(q): Query<ListQuery>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = page_read(&w, &headers, &uri) {
        return *r;
    }
    let filter = match q.filter(100) {
        Ok(f) => f,
        Err(e) => return e.page().into_response(),
    };
    let builds = match w.dispatcher.list_builds(filter).await {
        Ok(b) => b,
        Err(e) => return WebError::from(e).page().into_response(),
    };
    let recent = w
        .dispatcher
        .list_builds(BuildFilter {
            limit: 300,
            ..Default::default()
        })
        .await
        .unwrap_or_default();
    let mut seen = std::collections::BTreeSet::new();
    let heads = recent
        .iter()
        .filter(|b| !b.branch.is_empty() && seen.insert((b.repo.clone(), b.branch.clone())))
        .map(row)
        .collect();
    let (frame, set) = frame(&w, &headers, "Builds");
    let t = BuildsPage {
        frame,
        repo: q.repo.unwrap_or_default(),
        branch: q.branch.unwrap_or_default(),
        state: q.state.clone().unwrap_or_default(),
        states: JobState::ALL
            .iter()
            .map(|s| (s.as_str(), q.state.as_deref() == Some(s.as_str())))
            .collect(),
        rows: builds.iter().map(row).collect(),
        heads,
    };
    page(&t, StatusCode::OK, set)
}

#[derive(Debug)]
struct StepView {
    name: String,
    outcome: String,
    took: String,
}

#[derive(Debug)]
struct JobView {
    id: kiln_domain::JobId,
    name: String,
    state: &'static str,
    runner: String,
    attempts: u32,
    attempt_from: u64,
    message: String,
    took: String,
    live: bool,
    steps: Vec<StepView>,
    log_html: String,
    log_start: u64,
    log_end: u64,
    pending: String,
    next_line: u64,
}

#[derive(Template)]
#[template(path = "build.html")]
struct BuildPage {
    frame: Frame,
    id: BuildId,
    state: &'static str,
    repo: String,
    commit: String,
    branch: String,
    trigger: String,
    pipeline: String,
    /// The build's parameters (NAME, VALUE), by name.
    env: Vec<(String, String)>,
    error: String,
    created: String,
    finished: String,
    took: String,
    retry_of: Option<BuildId>,
    retried_by: Vec<BuildId>,
    finished_build: bool,
    jobs: Vec<JobView>,
    dag: String,
    deliveries: Vec<DeliveryView>,
}

/// One notification of a build, as its page lists it.
#[derive(Debug)]
struct DeliveryView {
    event: String,
    target: String,
    state: &'static str,
    attempts: u32,
    when: String,
    error: String,
}

/// `GET /builds/{id}`: header, jobs with steps and their output's tail, the DAG.
pub(crate) async fn build(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = page_read(&w, &headers, &uri) {
        return *r;
    }
    match build_page(&w, &id, &headers).await {
        Ok(r) => r,
        Err(e) => e.page().into_response(),
    }
}

async fn build_page(w: &Web, id: &str, headers: &HeaderMap) -> Result<Response, WebError> {
    let id: BuildId = parse_id("build", id)?;
    let d = w.dispatcher.get_build(id).await?;
    let by = retried_by(w, &d.build).await;
    let mut jobs = Vec::with_capacity(d.jobs.len());
    for j in &d.jobs {
        let results = d.steps.get(&j.id).map(Vec::as_slice).unwrap_or_default();
        let steps = j
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let r = results.iter().find(|r| r.index as usize == i);
                StepView {
                    name: s.name.clone(),
                    outcome: r.map_or("-", |r| r.outcome.as_str()).to_string(),
                    took: r.map(|r| duration(r.duration_ms)).unwrap_or_default(),
                }
            })
            .collect();
        let tail = crate::log::tail(&w.dispatcher, j, crate::log::tail_bytes(d.jobs.len())).await?;
        jobs.push(JobView {
            id: j.id,
            name: j.name.clone(),
            state: j.state.as_str(),
            runner: j.runner.clone().unwrap_or_default(),
            attempts: j.attempts,
            attempt_from: j.current_attempt.map_or(0, u64::from),
            message: j.message.clone().unwrap_or_default(),
            took: span(j.started_at, j.finished_at),
            live: !j.state.is_final(),
            steps,
            log_html: tail.html,
            log_start: tail.start,
            log_end: tail.end,
            pending: tail.pending,
            next_line: tail.next_line,
        });
    }
    let deliveries = w
        .dispatcher
        .deliveries(id)
        .await?
        .into_iter()
        .map(|x| DeliveryView {
            event: x.event,
            target: x.target,
            state: x.state.as_str(),
            attempts: x.attempts,
            when: utc(x.finished_at.unwrap_or(x.next_at)),
            error: x.last_error.unwrap_or_default(),
        })
        .collect();
    let b = &d.build;
    let (frame, set) = frame(w, headers, format!("Build {id}"));
    let t = BuildPage {
        frame,
        id,
        state: b.state.as_str(),
        repo: b.repo.clone(),
        commit: b.commit.clone(),
        branch: b.branch.clone(),
        trigger: b.trigger.clone(),
        pipeline: b.pipeline.clone(),
        env: b
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        error: b.error.clone().unwrap_or_default(),
        created: utc(b.created_at),
        finished: b.finished_at.map(utc).unwrap_or_default(),
        took: span(Some(b.created_at), b.finished_at),
        retry_of: b.retry_of,
        retried_by: by,
        finished_build: b.state.is_final(),
        dag: crate::svg::dag(&d.jobs),
        jobs,
        deliveries,
    };
    Ok(page(&t, StatusCode::OK, set))
}

/// A form carrying only its CSRF token.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /builds/{id}/cancel` (form).
pub(crate) async fn cancel(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let back = format!("/builds/{id}");
    if let Err(r) = page_write(&w, &headers, &f.csrf, &back) {
        return *r;
    }
    let id: BuildId = match parse_id("build", &id) {
        Ok(id) => id,
        Err(e) => return e.page().into_response(),
    };
    match w.dispatcher.cancel_build(id).await {
        Ok(_) => Redirect::to(&format!("/builds/{id}")).into_response(),
        Err(e) => WebError::from(e).page().into_response(),
    }
}

/// `POST /builds/{id}/retry` (form): to the new build.
pub(crate) async fn retry(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let back = format!("/builds/{id}");
    if let Err(r) = page_write(&w, &headers, &f.csrf, &back) {
        return *r;
    }
    let id: BuildId = match parse_id("build", &id) {
        Ok(id) => id,
        Err(e) => return e.page().into_response(),
    };
    match w.dispatcher.retry_build(id).await {
        Ok(d) => Redirect::to(&format!("/builds/{}", d.build.id)).into_response(),
        Err(e) => WebError::from(e).page().into_response(),
    }
}

#[derive(Debug)]
struct FailureView {
    name: String,
    place: String,
    text: String,
    flaky: bool,
    /// The split key and unit it belongs to, when it is a split's (its past is shown).
    unit: Option<(String, String)>,
    history: Option<HistoryView>,
}

/// A unit's past on the tests page: a cell per recent build that ran it, and a sentence.
#[derive(Debug, Clone)]
struct HistoryView {
    unit: String,
    cells: Vec<HistoryCell>,
    summary: String,
}

#[derive(Debug, Clone)]
struct HistoryCell {
    build: BuildId,
    verdict: &'static str,
    current: bool,
}

/// Builds whose verdicts a flaky or failed unit's history shows.
const HISTORY_BUILDS: u32 = 10;
/// Units whose history the tests page looks up (each is one store query).
const HISTORY_UNITS: usize = 100;

fn history_view(id: BuildId, p: &kiln_domain::split::UnitPast) -> HistoryView {
    let count = |v: UnitVerdict| p.recent.iter().filter(|(_, x)| *x == v).count();
    let runs = p.recent.len();
    let mut summary = format!(
        "last {} {}: {} flaky, {} failed",
        runs,
        if runs == 1 { "build" } else { "builds" },
        count(UnitVerdict::Flaky),
        count(UnitVerdict::Failed)
    );
    summary.push_str(&format!(
        "; in all: flaky {} {}, failed {} {}",
        p.flaky_total,
        if p.flaky_total == 1 { "time" } else { "times" },
        p.failed_total,
        if p.failed_total == 1 { "time" } else { "times" }
    ));
    HistoryView {
        unit: p.unit.clone(),
        cells: p
            .recent
            .iter()
            .map(|(b, v)| HistoryCell {
                build: *b,
                verdict: v.as_str(),
                current: *b == id,
            })
            .collect(),
        summary,
    }
}

/// The past of every flaky or failed split unit of a report (at most [`HISTORY_UNITS`]), by
/// split key: what the tests page and `/api/builds/{id}/tests` show as their history.
pub(crate) async fn troubled_pasts(
    w: &Web,
    r: &kiln_dispatcher::TestReport,
) -> Result<Vec<(String, kiln_domain::split::UnitPast)>, WebError> {
    let mut out = Vec::new();
    let mut n = 0;
    for s in &r.splits {
        let units: Vec<String> = s
            .units
            .iter()
            .filter(|u| matches!(u.verdict, UnitVerdict::Flaky | UnitVerdict::Failed))
            .map(|u| u.unit.clone())
            .take(HISTORY_UNITS - n)
            .collect();
        if units.is_empty() {
            continue;
        }
        n += units.len();
        let pasts = w
            .dispatcher
            .unit_pasts(r.build.id, s.key.clone(), units, HISTORY_BUILDS)
            .await?;
        out.extend(pasts.into_iter().map(|p| (s.key.clone(), p)));
    }
    Ok(out)
}

#[derive(Debug)]
struct Slow {
    name: String,
    took: String,
}

#[derive(Template)]
#[template(path = "tests.html")]
struct TestsPage {
    frame: Frame,
    id: BuildId,
    failures: Vec<FailureView>,
    flaky: Vec<FailureView>,
    slowest: Vec<Slow>,
    timelines: Vec<String>,
    notes: Vec<String>,
    total: usize,
    has_junit: bool,
}

fn case_text(c: &kiln_domain::split::TestCase) -> String {
    let mut t = String::new();
    for part in [&c.message, &c.body, &c.system_out, &c.system_err] {
        if !part.is_empty() {
            if !t.is_empty() {
                t.push('\n');
            }
            t.push_str(part);
        }
    }
    t
}

fn case_name(c: &kiln_domain::split::TestCase) -> String {
    if c.classname.is_empty() {
        c.name.clone()
    } else {
        format!("{}.{}", c.classname, c.name)
    }
}

/// `GET /builds/{id}/tests`: failures first with their text, flaky tests, slowest units, and
/// each split's timeline.
pub(crate) async fn tests(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = page_read(&w, &headers, &uri) {
        return *r;
    }
    match tests_page(&w, &id, &headers).await {
        Ok(r) => r,
        Err(e) => e.page().into_response(),
    }
}

async fn tests_page(w: &Web, id: &str, headers: &HeaderMap) -> Result<Response, WebError> {
    let id: BuildId = parse_id("build", id)?;
    let r = w.dispatcher.test_report(id).await?;
    let batches = w.dispatcher.split_batches(id).await?;
    let (mut failures, mut flaky, mut slow, mut notes) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut total = 0;
    for s in &r.splits {
        if !s.retry_note.is_empty() {
            notes.push(format!("{}: {}", s.key, s.retry_note));
        }
        for u in &s.units {
            total += 1;
            let longest = u.tries.iter().map(|t| t.duration_ms).max().unwrap_or(0);
            slow.push((longest, u.unit.clone()));
            let failed_tries: Vec<_> = u
                .tries
                .iter()
                .filter(|t| {
                    matches!(
                        t.state,
                        UnitTryState::Ended(UnitOutcome::Failed | UnitOutcome::Errored)
                    )
                })
                .collect();
            match u.verdict {
                UnitVerdict::Failed => {
                    // Each failed test case of its last failed try, with its text; the unit
                    // itself when no case says why.
                    let Some(t) = failed_tries.last() else {
                        continue;
                    };
                    let place = format!(
                        "{}: {}, try {} on {}",
                        s.key,
                        u.unit,
                        t.try_number,
                        t.runner.as_deref().unwrap_or("?")
                    );
                    let mut any = false;
                    for c in t.cases.iter().filter(|c| c.outcome != UnitOutcome::Passed) {
                        any = true;
                        failures.push(FailureView {
                            name: case_name(c),
                            place: place.clone(),
                            text: case_text(c),
                            flaky: false,
                            unit: Some((s.key.clone(), u.unit.clone())),
                            history: None,
                        });
                    }
                    if !any {
                        failures.push(FailureView {
                            name: u.unit.clone(),
                            place,
                            text: "the unit failed without a failed test case in its report \
                                   (see the shard's output)"
                                .into(),
                            flaky: false,
                            unit: Some((s.key.clone(), u.unit.clone())),
                            history: None,
                        });
                    }
                }
                UnitVerdict::Flaky => {
                    let mut text = String::new();
                    for t in &failed_tries {
                        text.push_str(&format!(
                            "try {} on {} failed:\n",
                            t.try_number,
                            t.runner.as_deref().unwrap_or("?")
                        ));
                        for c in t.cases.iter().filter(|c| c.outcome != UnitOutcome::Passed) {
                            text.push_str(&format!("{}\n{}\n", case_name(c), case_text(c)));
                        }
                    }
                    flaky.push(FailureView {
                        name: u.unit.clone(),
                        place: s.key.clone(),
                        text,
                        flaky: true,
                        unit: Some((s.key.clone(), u.unit.clone())),
                        history: None,
                    });
                }
                _ => {}
            }
        }
    }
    for s in &r.steps {
        if !s.note.is_empty() {
            notes.push(format!("{}: {}", s.key, s.note));
        }
        for c in &s.cases {
            total += 1;
            slow.push((c.duration_ms, case_name(c)));
            if c.outcome != UnitOutcome::Passed && !c.skipped {
                failures.push(FailureView {
                    name: case_name(c),
                    place: s.key.clone(),
                    text: case_text(c),
                    flaky: false,
                    unit: None,
                    history: None,
                });
            }
        }
    }
    let pasts: BTreeMap<(String, String), HistoryView> = troubled_pasts(w, &r)
        .await?
        .into_iter()
        .map(|(key, p)| ((key, p.unit.clone()), history_view(id, &p)))
        .collect();
    for v in failures.iter_mut().chain(flaky.iter_mut()) {
        v.history = v.unit.as_ref().and_then(|k| pasts.get(k).cloned());
    }
    slow.sort_by_key(|s| std::cmp::Reverse(s.0));
    let slowest = slow
        .into_iter()
        .take(15)
        .map(|(ms, name)| Slow {
            name,
            took: duration(ms),
        })
        .collect();
    let mut by_split: BTreeMap<(kiln_domain::split::SplitId, String), Vec<_>> = BTreeMap::new();
    for b in &batches {
        by_split
            .entry((b.split_id, b.split_key.clone()))
            .or_default()
            .push(b);
    }
    let timelines = by_split
        .iter()
        .enumerate()
        .map(|(i, ((_, key), bs))| crate::svg::timeline(key, bs, i == 0))
        .collect();
    let (frame, set) = frame(w, headers, format!("Build {id}: tests"));
    let t = TestsPage {
        frame,
        id,
        failures,
        flaky,
        slowest,
        timelines,
        notes,
        total,
        has_junit: r.junit_xml().is_some(),
    };
    Ok(page(&t, StatusCode::OK, set))
}

#[derive(Debug)]
struct RunnerRow {
    name: String,
    state: &'static str,
    labels: String,
    slots: u32,
    /// Its running jobs: (build, job).
    jobs: Vec<(BuildId, kiln_domain::JobId)>,
    heartbeat: String,
    attached: bool,
}

#[derive(Debug)]
struct QueueRow {
    labels: String,
    depth: u64,
}

#[derive(Template)]
#[template(path = "runners.html")]
struct RunnersPage {
    frame: Frame,
    runners: Vec<RunnerRow>,
    queue: Vec<QueueRow>,
}

/// `GET /runners`: runners and the queue.
pub(crate) async fn runners(State(w): State<Web>, headers: HeaderMap, uri: Uri) -> Response {
    if let Err(r) = page_read(&w, &headers, &uri) {
        return *r;
    }
    let (rs, q) = match (
        w.dispatcher.list_runners().await,
        w.dispatcher.queue().await,
    ) {
        (Ok(rs), Ok(q)) => (rs, q),
        (Err(e), _) | (_, Err(e)) => return WebError::from(e).page().into_response(),
    };
    let mut builds_of = BTreeMap::new();
    for j in rs.iter().flat_map(|r| &r.running_jobs) {
        if let Ok(job) = w.dispatcher.get_job(*j).await {
            builds_of.insert(*j, job.build_id);
        }
    }
    let (frame, set) = frame(&w, &headers, "Runners");
    let t = RunnersPage {
        frame,
        runners: rs
            .iter()
            .map(|r| RunnerRow {
                name: r.record.name.clone(),
                state: runner_state(r.state),
                labels: labels_text(&r.record.labels),
                slots: r.record.slots,
                jobs: r
                    .running_jobs
                    .iter()
                    .filter_map(|j| builds_of.get(j).map(|b| (*b, *j)))
                    .collect(),
                heartbeat: utc(r.last_heartbeat),
                attached: !matches!(
                    r.state,
                    kiln_dispatcher::RunnerState::Offline | kiln_dispatcher::RunnerState::Draining
                ),
            })
            .collect(),
        queue: q
            .iter()
            .map(|(l, n)| QueueRow {
                labels: labels_text(l),
                depth: *n,
            })
            .collect(),
    };
    page(&t, StatusCode::OK, set)
}

/// `POST /runners/{name}/drain` (form).
pub(crate) async fn drain(
    State(w): State<Web>,
    Path(name): Path<String>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    if let Err(r) = page_write(&w, &headers, &f.csrf, "/runners") {
        return *r;
    }
    match w.dispatcher.drain_runner(&name).await {
        Ok(_) => Redirect::to("/runners").into_response(),
        Err(e) => WebError::from(e).page().into_response(),
    }
}

#[derive(Template)]
#[template(path = "new.html")]
struct NewPage {
    frame: Frame,
    repo: String,
    commit: String,
    branch: String,
    /// The environment field as typed (NAME=VALUE lines).
    env: String,
    error: String,
}

/// The "build with parameters" form.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct NewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    repo: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    branch: String,
    /// Environment overrides: `NAME=VALUE` lines (blank lines and `#` comments ignored).
    #[serde(default)]
    env: String,
}

/// The form's environment field: one `NAME=VALUE` per line (split at the first `=`, the value
/// kept as typed but for a line end's `\r`); blank lines and lines starting with `#` are
/// ignored, and so is indentation before a name. A malformed line, or a name given twice, is
/// an error naming the line. The dispatcher checks the rest (limits, reserved names).
pub(crate) fn parse_env_lines(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    let mut first_line = BTreeMap::new();
    for (i, line) in text.split('\n').enumerate() {
        let n = i + 1;
        let line = line.strip_suffix('\r').unwrap_or(line).trim_start();
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = kiln_domain::params::parse_assignment(line)
            .map_err(|e| format!("environment, line {n}: {e}"))?;
        if let Some(before) = first_line.insert(name.clone(), n) {
            return Err(format!(
                "environment, line {n}: {name} is already set on line {before}"
            ));
        }
        env.insert(name, value);
    }
    Ok(env)
}

/// `GET /new`: the form.
pub(crate) async fn new_form(
    State(w): State<Web>,
    Query(f): Query<NewForm>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    if let Err(r) = page_read(&w, &headers, &uri) {
        return *r;
    }
    let (frame, set) = frame(&w, &headers, "New build");
    let t = NewPage {
        frame,
        repo: f.repo,
        commit: f.commit,
        branch: f.branch,
        env: f.env,
        error: String::new(),
    };
    page(&t, StatusCode::OK, set)
}

/// `POST /new`: submits, then to the new build (or the form again with the error).
pub(crate) async fn new_submit(
    State(w): State<Web>,
    headers: HeaderMap,
    Form(f): Form<NewForm>,
) -> Response {
    if let Err(r) = page_write(&w, &headers, &f.csrf, "/new") {
        return *r;
    }
    let submitted = match parse_env_lines(&f.env) {
        Ok(params) => {
            let req = SubmitRequest {
                repo: f.repo.trim().to_string(),
                commit: f.commit.trim().to_string(),
                branch: f.branch.trim().to_string(),
                trigger: "web".into(),
                params,
            };
            w.dispatcher.submit(req).await.map_err(WebError::from)
        }
        Err(e) => Err(WebError::bad_request(e)),
    };
    match submitted {
        Ok(d) => Redirect::to(&format!("/builds/{}", d.build.id)).into_response(),
        Err(e) => {
            let (frame, set) = frame(&w, &headers, "New build");
            let t = NewPage {
                frame,
                repo: f.repo,
                commit: f.commit,
                branch: f.branch,
                env: f.env,
                error: e.message,
            };
            page(&t, e.status, set)
        }
    }
}

#[derive(Template)]
#[template(path = "login.html")]
struct LoginPage {
    frame: Frame,
    next: String,
    error: String,
}

/// Query and form of the login page.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct LoginForm {
    #[serde(default)]
    next: String,
    #[serde(default)]
    token: String,
}

/// Only a path of this site is a place to go back to.
fn local_path(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.contains('\\') {
        next
    } else {
        "/"
    }
}

/// `GET /login`
pub(crate) async fn login_form(
    State(w): State<Web>,
    Query(f): Query<LoginForm>,
    headers: HeaderMap,
) -> Response {
    let (frame, set) = frame(&w, &headers, "Log in");
    let t = LoginPage {
        frame,
        next: local_path(&f.next).to_string(),
        error: String::new(),
    };
    page(&t, StatusCode::OK, set)
}

/// `POST /login`: a right token sets the session cookie (HttpOnly, SameSite=Strict).
pub(crate) async fn login(
    State(w): State<Web>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if let Err(e) = same_site(&headers) {
        return e.page().into_response();
    }
    let next = local_path(&f.next).to_string();
    match w.auth.login(&f.token) {
        Some(session) => {
            let mut r = Redirect::to(&next).into_response();
            if let Ok(v) = HeaderValue::from_str(&w.auth.cookie(SESSION_COOKIE, &session)) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        None => {
            let (frame, set) = frame(&w, &headers, "Log in");
            let error = if w.auth.has_token() {
                "that token is not the API token"
            } else {
                "this dispatcher has no API token: nothing to log in to"
            };
            let t = LoginPage {
                frame,
                next,
                error: error.into(),
            };
            page(&t, StatusCode::FORBIDDEN, set)
        }
    }
}

/// `POST /logout`: forgets the session cookie.
pub(crate) async fn logout(State(w): State<Web>, headers: HeaderMap) -> Response {
    if let Err(e) = same_site(&headers) {
        return e.page().into_response();
    }
    let mut r = Redirect::to("/login").into_response();
    if let Ok(v) =
        HeaderValue::from_str(&format!("{}; Max-Age=0", w.auth.cookie(SESSION_COOKIE, "")))
    {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}

/// `GET /static/style.css`
pub(crate) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

/// `GET /static/app.js`
pub(crate) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn env_lines_skip_blanks_and_comments_and_keep_values_as_typed() {
        let text = "# parameters\r\nGREETING=hello world\r\n\r\n  INDENTED=1\n   \nURL=a=b#c\nEMPTY=\n  # another comment\nSPACES= x \n";
        let env = parse_env_lines(text).unwrap();
        let want: BTreeMap<String, String> = [
            ("GREETING", "hello world"),
            ("INDENTED", "1"),
            ("URL", "a=b#c"),
            ("EMPTY", ""),
            ("SPACES", " x "),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(env, want);
        assert!(parse_env_lines("").unwrap().is_empty());
        assert!(parse_env_lines("\n# only a comment\n").unwrap().is_empty());
    }

    #[test]
    fn a_malformed_env_line_is_an_error_naming_the_line() {
        for (text, want) in [
            ("A=1\nno equals sign", "line 2"),
            ("=value", "line 1"),
            ("A=1\n\n9X=2", "line 3"),
            ("A B=1", "line 1"),
            ("A=1\nB=2\nA=3", "line 3: A is already set on line 1"),
        ] {
            let e = parse_env_lines(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}

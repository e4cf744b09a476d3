//! The JSON API over plain HTTP, with gRPC's authorisation rules: writes need the API token
//! (when one is configured), reads need it when reads are closed. Errors are
//! `{"error": "..."}` with 400 (bad id or parameter), 401 (no token), 403 (wrong token,
//! cross-site), 404, 409 (not now), 503.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::{RunnerState, RunnerView, SubmitRequest};
use kiln_domain::{AttemptId, BuildId, JobId, JobState};
use kiln_store::{BuildDetail, BuildFilter};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Web;
use crate::error::{WebError, parse_id};
use crate::log::{ended, locate, read_range};

/// Most builds one list returns.
pub(crate) const MAX_LIMIT: u32 = 500;
/// Most bytes one log read returns.
const MAX_LOG_LEN: u64 = 4 << 20;

/// Filters of a build list (the page's form uses the same names).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ListQuery {
    pub(crate) repo: Option<String>,
    pub(crate) branch: Option<String>,
    pub(crate) state: Option<String>,
    pub(crate) limit: Option<u32>,
    pub(crate) before: Option<u64>,
}

impl ListQuery {
    /// The store's filter: empty fields mean "any".
    pub(crate) fn filter(&self, default_limit: u32) -> Result<BuildFilter, WebError> {
        let nonempty = |s: &Option<String>| {
            s.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        let state = match nonempty(&self.state) {
            None => None,
            Some(s) => Some(s.parse::<JobState>().map_err(|_| {
                WebError::bad_request(format!(
                    "state {s:?} is not one of {}",
                    JobState::ALL.map(JobState::as_str).join(", ")
                ))
            })?),
        };
        Ok(BuildFilter {
            repo: nonempty(&self.repo),
            branch: nonempty(&self.branch),
            state,
            before: self.before.filter(|b| *b > 0).map(BuildId::new),
            limit: self.limit.unwrap_or(default_limit).clamp(1, MAX_LIMIT),
        })
    }
}

/// A build as the list shows it.
pub(crate) fn build_json(b: &kiln_domain::Build) -> Value {
    json!({
        "id": b.id,
        "repo": b.repo,
        "commit": b.commit,
        "branch": b.branch,
        "trigger": b.trigger,
        "state": b.state.as_str(),
        "error": b.error,
        "retry_of": b.retry_of,
        "created_at": b.created_at,
        "finished_at": b.finished_at,
        "pipeline": b.pipeline,
        "env": b.params,
    })
}

/// A job with its step results.
fn job_json(j: &kiln_domain::Job, steps: &[kiln_domain::StepResult]) -> Value {
    json!({
        "id": j.id,
        "build_id": j.build_id,
        "name": j.name,
        "state": j.state.as_str(),
        "labels": j.labels,
        "needs": j.needs,
        "steps": j.steps.iter().enumerate().map(|(i, s)| {
            let r = steps.iter().find(|r| r.index as usize == i);
            json!({
                "name": s.name,
                "outcome": r.map(|r| r.outcome),
                "exit_code": r.and_then(|r| r.exit_code),
                "duration_ms": r.map(|r| r.duration_ms),
            })
        }).collect::<Vec<_>>(),
        "current_attempt": j.current_attempt,
        "attempts": j.attempts,
        "runner": j.runner,
        "message": j.message,
        "started_at": j.started_at,
        "finished_at": j.finished_at,
    })
}

/// A build with its jobs, and the builds that retried it.
pub(crate) fn detail_json(d: &BuildDetail, retried_by: &[BuildId]) -> Value {
    let mut b = build_json(&d.build);
    b["retried_by"] = json!(retried_by);
    b["jobs"] = d
        .jobs
        .iter()
        .map(|j| job_json(j, d.steps.get(&j.id).map(Vec::as_slice).unwrap_or_default()))
        .collect();
    b
}

/// Builds that retried `id` (among the newest of its repository and branch).
pub(crate) async fn retried_by(w: &Web, b: &kiln_domain::Build) -> Vec<BuildId> {
    let filter = BuildFilter {
        repo: Some(b.repo.clone()),
        branch: Some(b.branch.clone()).filter(|s| !s.is_empty()),
        limit: 200,
        ..Default::default()
    };
    w.dispatcher
        .list_builds(filter)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|o| o.retry_of == Some(b.id))
        .map(|o| o.id)
        .collect()
}

/// `GET /api/builds?repo=&branch=&state=&limit=&before=`
pub(crate) async fn list_builds(
    State(w): State<Web>,
    q: Result<Query<ListQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let Query(q) = q.map_err(bad_query)?;
    let builds = w.dispatcher.list_builds(q.filter(50)?).await?;
    Ok(
        Json(json!({ "builds": builds.iter().map(build_json).collect::<Vec<_>>() }))
            .into_response(),
    )
}

/// `GET /api/builds/{id}`
pub(crate) async fn get_build(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let id: BuildId = parse_id("build", &id)?;
    let d = w.dispatcher.get_build(id).await?;
    let by = retried_by(&w, &d.build).await;
    Ok(Json(detail_json(&d, &by)).into_response())
}

/// `GET /api/jobs/{id}`
pub(crate) async fn get_job(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let id: JobId = parse_id("job", &id)?;
    let j = w.dispatcher.get_job(id).await?;
    let detail = w.dispatcher.get_build(j.build_id).await?;
    let steps = detail.steps.get(&id).map(Vec::as_slice).unwrap_or_default();
    Ok(Json(job_json(&j, steps)).into_response())
}

/// Query of a log read.
#[derive(Debug, Deserialize)]
pub(crate) struct LogQuery {
    /// Start here (a frame boundary, 0 by default).
    offset: Option<u64>,
    /// Read about this many bytes (256 KiB by default, at most 4 MiB).
    len: Option<u64>,
    /// Instead of `offset`: the part of about `len` bytes that ends here (earlier output).
    before: Option<u64>,
    /// Show this attempt and later ones (default: the job's current attempt).
    attempt: Option<u64>,
    /// Show every attempt's output.
    #[serde(default)]
    all_attempts: bool,
}

/// `GET /api/jobs/{id}/log?offset=&len=` (or `?before=&len=`): the output from `offset`,
/// where to continue (`next_offset`) and whether the job ended (`ended`: nothing more will
/// come after `next_offset`). With `before`, also `first_line`, the number of the line the text
/// starts in, and `starts_mid_line`, whether it starts in the middle of it.
pub(crate) async fn log(
    State(w): State<Web>,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let Query(q) = q.map_err(bad_query)?;
    let job: JobId = parse_id("job", &id)?;
    let d = &w.dispatcher;
    // A job that does not exist gets no follower channel.
    d.get_job(job).await?;
    let progress = d.follow(job).await?;
    let j = d.get_job(job).await?;
    d.settle_follow(job, j.state).await;
    let p = *progress.borrow();
    let from = if q.all_attempts {
        None
    } else {
        match q.attempt {
            Some(a) if a > 0 => Some(AttemptId::new(a)),
            _ => j.current_attempt,
        }
    };
    let len = q.len.unwrap_or(256 * 1024).clamp(1, MAX_LOG_LEN);
    let (piece, first_line) = match q.before {
        Some(before) => {
            if before > p.len {
                return Err(WebError::bad_request(format!(
                    "before {before} is past the end of job {job}'s log ({} bytes)",
                    p.len
                )));
            }
            let at = locate(d, job, before.saturating_sub(len), before, from).await?;
            let piece = read_range(d, job, at.offset, before, usize::MAX, from).await?;
            (piece, Some((at.lines + 1, !at.aligned)))
        }
        None => {
            let offset = q.offset.unwrap_or(0);
            if offset > p.len {
                return Err(WebError::bad_request(format!(
                    "offset {offset} is past the end of job {job}'s log ({} bytes)",
                    p.len
                )));
            }
            let piece = read_range(d, job, offset, p.len, len as usize, from).await?;
            (piece, None)
        }
    };
    Ok(Json(json!({
        "job_id": job,
        "state": j.state.as_str(),
        "offset": piece.from,
        "next_offset": piece.next,
        "log_len": p.len,
        "first_line": first_line.map(|f| f.0),
        "starts_mid_line": first_line.is_some_and(|f| f.1),
        "attempt": from,
        "text": String::from_utf8_lossy(&piece.text),
        "ended": q.before.is_none() && ended(j.state, p.done, piece.next, p.len),
    }))
    .into_response())
}

/// `GET /api/builds/{id}/tests`: the merged test report (splits and plain steps' cases).
pub(crate) async fn tests(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let id: BuildId = parse_id("build", &id)?;
    let r = w.dispatcher.test_report(id).await?;
    let batches = w.dispatcher.split_batches(id).await?;
    let history: Vec<Value> = crate::pages::troubled_pasts(&w, &r)
        .await?
        .into_iter()
        .map(|(key, p)| json!({"split": key, "past": p}))
        .collect();
    Ok(Json(json!({
        "build": build_json(&r.build),
        "splits": r.splits,
        "steps": r.steps,
        "batches": batches,
        "history": history,
        "junit": r.junit_xml().is_some().then(|| format!("/builds/{id}/junit.xml")),
    }))
    .into_response())
}

/// `GET /api/builds/{id}/deliveries`: the build's notifications (webhooks, mail, commit
/// statuses) and where each stands.
pub(crate) async fn deliveries(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let id: BuildId = parse_id("build", &id)?;
    // A build that does not exist is a 404, not an empty log.
    w.dispatcher.get_build(id).await?;
    let list = w.dispatcher.deliveries(id).await?;
    Ok(Json(json!({"build_id": id, "deliveries": list})).into_response())
}

/// A runner state's name, as `kiln runners` prints it.
pub(crate) fn runner_state(s: RunnerState) -> &'static str {
    match s {
        RunnerState::Idle => "idle",
        RunnerState::Busy => "busy",
        RunnerState::Draining => "draining",
        RunnerState::Offline => "offline",
    }
}

fn runner_json(r: &RunnerView) -> Value {
    json!({
        "name": r.record.name,
        "state": runner_state(r.state),
        "labels": r.record.labels,
        "slots": r.record.slots,
        "version": r.record.version,
        "running_jobs": r.running_jobs,
        "last_heartbeat": r.last_heartbeat,
    })
}

/// `GET /api/runners`
pub(crate) async fn runners(
    State(w): State<Web>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let rs = w.dispatcher.list_runners().await?;
    Ok(Json(json!({ "runners": rs.iter().map(runner_json).collect::<Vec<_>>() })).into_response())
}

/// `GET /api/queue`: ready jobs waiting for a runner, per label set.
pub(crate) async fn queue(State(w): State<Web>, headers: HeaderMap) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let q = w.dispatcher.queue().await?;
    let total: u64 = q.iter().map(|(_, n)| n).sum();
    Ok(Json(json!({
        "total": total,
        "labels": q.iter().map(|(l, n)| json!({ "labels": l, "depth": n })).collect::<Vec<_>>(),
    }))
    .into_response())
}

/// Body of `POST /api/builds`.
#[derive(Debug, Deserialize)]
pub(crate) struct SubmitBody {
    repo: String,
    #[serde(default)]
    commit: String,
    #[serde(default)]
    branch: String,
    /// Build parameters: `{"NAME": "VALUE"}`, over the pipeline's `env`.
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// A query string that does not fit: 400 with what is wrong.
pub(crate) fn bad_query(e: QueryRejection) -> WebError {
    WebError::bad_request(e.body_text())
}

/// Parses a JSON body, with a 400 that says what is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WebError> {
    serde_json::from_slice(body)
        .map_err(|e| WebError::bad_request(format!("the body is not valid JSON for this: {e}")))
}

/// `POST /api/builds` `{"repo","commit","branch","env"}`: 201 with the new build.
pub(crate) async fn submit(
    State(w): State<Web>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, WebError> {
    w.auth.check_write(&headers)?;
    let b: SubmitBody = parse_body(&body)?;
    let d = w
        .dispatcher
        .submit(SubmitRequest {
            repo: b.repo,
            commit: b.commit,
            branch: b.branch,
            trigger: "web".into(),
            params: b.env,
        })
        .await?;
    Ok((StatusCode::CREATED, Json(detail_json(&d, &[]))).into_response())
}

/// `POST /api/builds/{id}/cancel`
pub(crate) async fn cancel(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_write(&headers)?;
    let id: BuildId = parse_id("build", &id)?;
    let d = w.dispatcher.cancel_build(id).await?;
    Ok(Json(detail_json(&d, &[])).into_response())
}

/// `POST /api/builds/{id}/retry`: 201 with the new build.
pub(crate) async fn retry(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_write(&headers)?;
    let id: BuildId = parse_id("build", &id)?;
    let d = w.dispatcher.retry_build(id).await?;
    Ok((StatusCode::CREATED, Json(detail_json(&d, &[]))).into_response())
}

/// `POST /api/runners/{name}/drain`
pub(crate) async fn drain(
    State(w): State<Web>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_write(&headers)?;
    let r = w.dispatcher.drain_runner(&name).await?;
    Ok(Json(runner_json(&r)).into_response())
}

/// Label sets printed `k=v,k=v` (`-` for none).
pub(crate) fn labels_text(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "-".into();
    }
    l.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

//! Planning: for a build, each point of its life reached (queued, started, finished) and not
//! planned yet becomes its deliveries (one per matching rule target and event), stored with the
//! mark in one transaction. What is sent is fixed here, so every try sends the same bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use kiln_dispatcher::Dispatcher;
use kiln_domain::{Build, BuildId, JobState};
use kiln_store::{BuildDetail, BuildFilter, Mark, NewDelivery, Store};
use serde_json::json;

use crate::config::{Config, EventKind, derive_owner_repo};
use crate::rules::{events_at, is_failure, is_verdict};
use crate::{Error, blocking};

/// Lines of each failed job's log in a mail.
pub const MAIL_LOG_LINES: usize = 30;
/// Longest line kept in a mail (longer ones are cut).
const MAIL_LINE_BYTES: usize = 400;
/// Most failed jobs whose logs a mail quotes.
const MAIL_JOBS: usize = 10;
/// Most failed tests a mail lists.
const MAIL_TESTS: usize = 50;
/// Most log bytes read per job to find its last lines.
const MAIL_LOG_SCAN: u64 = 32 << 20;

/// The commit status context kiln posts: one status per build, whatever its jobs.
pub const STATUS_CONTEXT: &str = "kiln";

/// What a delivery sends, by target kind.
pub(crate) fn target_kind(target: &str) -> &str {
    target.split(' ').next().unwrap_or("")
}

/// Plans what `build` reached and was not planned yet. Returns the deliveries added.
pub(crate) async fn plan_build(
    dispatcher: &Dispatcher,
    store: &Arc<dyn Store>,
    config: &Config,
    id: BuildId,
) -> Result<u64, Error> {
    let detail = dispatcher.get_build(id).await?;
    let planned = blocking(store, move |s| s.planned_marks(id)).await?;
    let started = detail.jobs.iter().any(|j| j.started_at.is_some());
    let finished = detail.build.state.is_final();
    let mut added = 0;
    for mark in Mark::ALL {
        let reached = match mark {
            Mark::Queued => true,
            Mark::Started => started,
            Mark::Finished => finished,
        };
        if !reached || planned.contains(&mark) {
            continue;
        }
        let previous = if mark == Mark::Finished && detail.build.state == JobState::Passed {
            previous_verdict(store, &detail.build).await?
        } else {
            None
        };
        let events = events_at(mark, detail.build.state, previous);
        let deliveries = deliveries_for(dispatcher, config, &detail, mark, &events).await;
        let n = deliveries.len();
        added += blocking(store, move |s| s.plan_deliveries(id, mark, &deliveries)).await?;
        tracing::debug!(build = %id, mark = mark.as_str(), deliveries = n, "planned");
    }
    Ok(added)
}

/// The state of the newest build of the same repository and branch, older than `build`,
/// that ended with a verdict.
async fn previous_verdict(
    store: &Arc<dyn Store>,
    build: &Build,
) -> Result<Option<JobState>, Error> {
    let mut before = Some(build.id);
    // Bounded: a branch with thousands of cancelled builds in a row is no fix.
    for _ in 0..20 {
        let filter = BuildFilter {
            repo: Some(build.repo.clone()),
            branch: Some(build.branch.clone()),
            state: None,
            before,
            limit: 50,
        };
        let page = blocking(store, move |s| s.list_builds(&filter)).await?;
        if let Some(b) = page.iter().find(|b| is_verdict(b.state)) {
            return Ok(Some(b.state));
        }
        match page.last() {
            Some(b) if page.len() == 50 => before = Some(b.id),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

async fn deliveries_for(
    dispatcher: &Dispatcher,
    config: &Config,
    detail: &BuildDetail,
    mark: Mark,
    events: &[EventKind],
) -> Vec<NewDelivery> {
    let b = &detail.build;
    let mut out: Vec<NewDelivery> = Vec::new();
    let mut mail_text: Option<String> = None;
    let push = |out: &mut Vec<NewDelivery>, event: EventKind, target: String, payload, sup| {
        if !out
            .iter()
            .any(|d| d.event == event.as_str() && d.target == target)
        {
            out.push(NewDelivery {
                delivery_id: new_delivery_id(),
                event: event.as_str().to_owned(),
                target,
                payload,
                supersedes: sup,
            });
        }
    };
    for rule in config
        .rules
        .iter()
        .filter(|r| r.matches(&b.repo, &b.branch))
    {
        if let Some(w) = &rule.webhook {
            for &event in events.iter().filter(|e| w.events.contains(e)) {
                let id = new_delivery_id();
                let body = webhook_body(config, detail, event, &id);
                let target = format!("webhook {}", w.url);
                if !out
                    .iter()
                    .any(|d| d.event == event.as_str() && d.target == target)
                {
                    out.push(NewDelivery {
                        delivery_id: id,
                        event: event.as_str().to_owned(),
                        target,
                        payload: body,
                        supersedes: false,
                    });
                }
            }
        }
        if let Some(m) = &rule.mail {
            for &event in events.iter().filter(|e| m.on.contains(e)) {
                let to: Vec<String> = m.to.iter().map(|t| t.to_string()).collect();
                if mail_text.is_none() {
                    mail_text = Some(mail_body(dispatcher, detail).await);
                }
                let payload = json!({
                    "to": to,
                    "subject": mail_subject(b, event),
                    "body": format!("{}{}", mail_intro(config, b, event), mail_text.as_deref().unwrap_or("")),
                })
                .to_string();
                push(
                    &mut out,
                    event,
                    format!("mail {}", to.join(", ")),
                    payload,
                    false,
                );
            }
        }
        if let Some(s) = &rule.status {
            // Statuses for queued/started only while the build runs (a build planned after
            // it ended gets its final status only).
            if mark != Mark::Finished && b.state.is_final() {
                continue;
            }
            let Some(event) = events.first().copied() else {
                continue;
            };
            let Some(repo) = s.repo.clone().or_else(|| derive_owner_repo(&b.repo)) else {
                tracing::warn!(build = %b.id, repo = %b.repo, "no owner/repo for a commit status");
                continue;
            };
            let (state, description) = match b.state {
                JobState::Passed if mark == Mark::Finished => ("success", "the build passed"),
                JobState::Failed | JobState::TimedOut if mark == Mark::Finished => {
                    ("failure", "the build failed")
                }
                _ if mark == Mark::Finished => ("error", "the build did not complete"),
                _ => ("pending", "the build is running"),
            };
            let description = if mark == Mark::Queued {
                "the build is queued"
            } else {
                description
            };
            let payload = json!({
                "sha": b.commit,
                "state": state,
                "description": description,
                "target_url": config.build_url(b.id),
                "context": STATUS_CONTEXT,
            })
            .to_string();
            let target = format!("status {} {} {}", s.forge.as_str(), s.api, repo);
            push(&mut out, event, target, payload, true);
        }
    }
    out
}

/// A new delivery id: 128 random bits in hex.
fn new_delivery_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// The webhook's JSON body.
pub(crate) fn webhook_body(
    config: &Config,
    detail: &BuildDetail,
    event: EventKind,
    delivery: &str,
) -> String {
    let b = &detail.build;
    let jobs: Vec<_> = detail
        .jobs
        .iter()
        .map(|j| {
            json!({
                "id": j.id,
                "name": j.name,
                "state": j.state.as_str(),
                "message": j.message,
                "started_at": j.started_at,
                "finished_at": j.finished_at,
            })
        })
        .collect();
    json!({
        "event": event.as_str(),
        "delivery": delivery,
        "build_id": b.id,
        "repo": b.repo,
        "branch": b.branch,
        "commit": b.commit,
        "state": b.state.as_str(),
        "url": config.build_url(b.id),
        "trigger": b.trigger,
        "error": b.error,
        "created_at": b.created_at,
        "started_at": detail.jobs.iter().filter_map(|j| j.started_at).min(),
        "finished_at": b.finished_at,
        "jobs": jobs,
    })
    .to_string()
}

/// `kiln: acme/app main #42 failed`.
pub(crate) fn mail_subject(b: &Build, event: EventKind) -> String {
    let repo = derive_owner_repo(&b.repo).unwrap_or_else(|| b.repo.clone());
    let branch = if b.branch.is_empty() {
        String::new()
    } else {
        format!(" {}", b.branch)
    };
    format!("kiln: {repo}{branch} #{} {}", b.id, event.as_str())
}

fn mail_intro(config: &Config, b: &Build, event: EventKind) -> String {
    let short = b.commit.get(..12).unwrap_or(&b.commit);
    let what = match event {
        EventKind::Fixed => "passed again".to_owned(),
        _ => b.state.as_str().replace('_', " "),
    };
    let mut s = format!(
        "Build #{} of {} ({}) at commit {short} {what}.\n",
        b.id,
        b.repo,
        if b.branch.is_empty() {
            "no branch"
        } else {
            &b.branch
        }
    );
    if let Some(url) = config.build_url(b.id) {
        s.push_str(&url);
        s.push('\n');
    }
    s
}

/// The failed jobs, failed tests and the last lines of each failed job's log.
async fn mail_body(dispatcher: &Dispatcher, detail: &BuildDetail) -> String {
    let mut s = String::new();
    if let Some(e) = &detail.build.error {
        s.push_str(&format!("\nThe pipeline could not be read: {e}\n"));
    }
    let failed: Vec<_> = detail.jobs.iter().filter(|j| is_failure(j.state)).collect();
    if failed.is_empty() {
        return s;
    }
    s.push_str("\nFailed jobs:\n");
    for j in &failed {
        match &j.message {
            Some(m) => s.push_str(&format!("  - {}: {} ({m})\n", j.name, j.state.as_str())),
            None => s.push_str(&format!("  - {}: {}\n", j.name, j.state.as_str())),
        }
    }
    if let Ok(report) = dispatcher.test_report(detail.build.id).await {
        let mut tests: Vec<String> = Vec::new();
        for step in &report.steps {
            for c in step.cases.iter().filter(|c| {
                matches!(
                    c.outcome,
                    kiln_domain::split::UnitOutcome::Failed
                        | kiln_domain::split::UnitOutcome::Errored
                )
            }) {
                let name = if c.classname.is_empty() {
                    c.name.clone()
                } else {
                    format!("{}::{}", c.classname, c.name)
                };
                tests.push(cut(&format!("{name}: {}", c.message)));
            }
        }
        for split in &report.splits {
            for u in split
                .units
                .iter()
                .filter(|u| u.verdict == kiln_domain::split::UnitVerdict::Failed)
            {
                tests.push(format!("{} ({})", u.unit, split.key));
            }
        }
        if !tests.is_empty() {
            s.push_str("\nFailed tests:\n");
            for t in tests.iter().take(MAIL_TESTS) {
                s.push_str(&format!("  - {t}\n"));
            }
            if tests.len() > MAIL_TESTS {
                s.push_str(&format!("  ... and {} more\n", tests.len() - MAIL_TESTS));
            }
        }
    }
    for j in failed.iter().take(MAIL_JOBS) {
        let lines = last_lines(dispatcher, j).await;
        if lines.is_empty() {
            continue;
        }
        s.push_str(&format!(
            "\n--- {} (last {} lines of its log) ---\n",
            j.name,
            lines.len()
        ));
        for l in lines {
            s.push_str(&l);
            s.push('\n');
        }
    }
    s
}

/// The last [`MAIL_LOG_LINES`] lines of the job's current attempt's output (bounded).
async fn last_lines(dispatcher: &Dispatcher, job: &kiln_domain::Job) -> Vec<String> {
    let mut lines: VecDeque<String> = VecDeque::new();
    let mut partial: Vec<u8> = Vec::new();
    let mut offset = 0;
    let mut scanned = 0u64;
    // The log's length, as followers learn it (the job has ended: it is all there).
    let len = match dispatcher.follow(job.id).await {
        Ok(progress) => progress.borrow().len,
        Err(_) => return Vec::new(),
    };
    dispatcher.settle_follow(job.id, job.state).await;
    while offset < len {
        let Ok(read) = dispatcher.read_log(job.id, offset, len, 1 << 20).await else {
            break;
        };
        if read.frames.is_empty() {
            break;
        }
        for f in &read.frames {
            scanned += f.data.len() as u64;
            if job.current_attempt.is_some_and(|a| a != f.header.attempt) {
                continue;
            }
            for &byte in &f.data {
                if byte == b'\n' {
                    lines.push_back(cut(&String::from_utf8_lossy(&partial)));
                    partial.clear();
                    if lines.len() > MAIL_LOG_LINES {
                        lines.pop_front();
                    }
                } else if partial.len() <= MAIL_LINE_BYTES {
                    partial.push(byte);
                }
            }
        }
        if read.next_offset <= offset || scanned > MAIL_LOG_SCAN {
            break;
        }
        offset = read.next_offset;
    }
    if !partial.is_empty() {
        lines.push_back(cut(&String::from_utf8_lossy(&partial)));
        if lines.len() > MAIL_LOG_LINES {
            lines.pop_front();
        }
    }
    lines.into()
}

fn cut(s: &str) -> String {
    let s = s.trim_end_matches('\r');
    if s.len() <= MAIL_LINE_BYTES {
        return s.to_owned();
    }
    let mut end = MAIL_LINE_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

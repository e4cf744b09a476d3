//! Pictures drawn on the server as SVG: a build's job DAG, a split's timeline, the badge.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use kiln_domain::split::BatchRecord;
use kiln_domain::{Job, JobId, JobState};
use kiln_store::BuildFilter;

use crate::Web;
use crate::error::WebError;
use crate::log::escape;

const BOX_W: i64 = 170;
const BOX_H: i64 = 36;
const GAP_X: i64 = 60;
const GAP_Y: i64 = 16;

/// Each job's column: the length of the longest chain of `needs` before it.
fn depths(jobs: &[Job]) -> BTreeMap<JobId, usize> {
    let mut depth: BTreeMap<JobId, usize> = jobs.iter().map(|j| (j.id, 0)).collect();
    // Jobs are stored in pipeline order and a DAG has at most n levels: n rounds settle it.
    for _ in 0..jobs.len() {
        let mut changed = false;
        for j in jobs {
            let d = j
                .needs
                .iter()
                .filter_map(|n| depth.get(n).map(|d| d + 1))
                .max()
                .unwrap_or(0);
            if depth.get(&j.id).is_some_and(|&old| d > old) {
                depth.insert(j.id, d);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    depth
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The jobs as boxes in columns by dependency depth, `needs` as edges: `<svg id="dag">`.
pub(crate) fn dag(jobs: &[Job]) -> String {
    let depth = depths(jobs);
    let mut rows: BTreeMap<usize, usize> = BTreeMap::new();
    let mut pos: BTreeMap<JobId, (i64, i64)> = BTreeMap::new();
    for j in jobs {
        let d = depth.get(&j.id).copied().unwrap_or(0);
        let r = rows.entry(d).or_insert(0);
        pos.insert(
            j.id,
            (
                10 + d as i64 * (BOX_W + GAP_X),
                10 + *r as i64 * (BOX_H + GAP_Y),
            ),
        );
        *r += 1;
    }
    let cols = rows.keys().max().map_or(1, |m| m + 1) as i64;
    let height = rows.values().max().copied().unwrap_or(1).max(1) as i64;
    let (w, h) = (
        20 + cols * BOX_W + (cols - 1) * GAP_X,
        20 + height * BOX_H + (height - 1) * GAP_Y,
    );
    let mut s = format!(
        "<svg id=\"dag\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" role=\"img\" aria-label=\"jobs and their dependencies\">"
    );
    for j in jobs {
        let Some(&(x2, y2)) = pos.get(&j.id) else {
            continue;
        };
        for n in &j.needs {
            if let Some(&(x1, y1)) = pos.get(n) {
                let (ax, ay, bx, by) = (x1 + BOX_W, y1 + BOX_H / 2, x2, y2 + BOX_H / 2);
                let mx = (ax + bx) / 2;
                let _ = write!(
                    s,
                    "<path class=\"edge\" data-from=\"{n}\" data-to=\"{}\" \
                     d=\"M{ax},{ay} C{mx},{ay} {mx},{by} {bx},{by}\"/>",
                    j.id
                );
            }
        }
    }
    for j in jobs {
        let Some(&(x, y)) = pos.get(&j.id) else {
            continue;
        };
        let _ = write!(
            s,
            "<a href=\"#job-{id}\"><g class=\"node state-{st}\" data-job-id=\"{id}\" \
             data-state=\"{st}\"><title>{name}: {st}</title>\
             <rect x=\"{x}\" y=\"{y}\" width=\"{BOX_W}\" height=\"{BOX_H}\" rx=\"5\"/>\
             <text x=\"{tx}\" y=\"{ty}\">{label}</text></g></a>",
            id = j.id,
            st = j.state.as_str(),
            name = escape(&j.name),
            tx = x + 10,
            ty = y + BOX_H / 2 + 5,
            label = escape(&cut(&j.name, 22)),
        );
    }
    s.push_str("</svg>");
    s
}

/// A split's batches on a time axis: one row per shard attempt, a `<rect class="batch">` per
/// batch (retry rounds `round-N`, a batch with failures `failed`), round starts marked:
/// `<svg id="timeline">` (the id only on the first of a page: `first`).
pub(crate) fn timeline(key: &str, batches: &[&BatchRecord], first: bool) -> String {
    const LEFT: i64 = 180;
    const WIDTH: i64 = 720;
    const ROW: i64 = 24;
    let now = kiln_domain::now_millis();
    let t0 = batches.iter().map(|b| b.leased_at).min().unwrap_or(0);
    let t1 = batches
        .iter()
        .map(|b| b.ended_at.unwrap_or(now))
        .max()
        .unwrap_or(t0)
        .max(t0 + 1);
    let mut rows: Vec<(String, kiln_domain::AttemptId)> = Vec::new();
    for b in batches {
        if !rows.iter().any(|(_, a)| *a == b.attempt) {
            rows.push((format!("{} ({})", b.job, b.runner), b.attempt));
        }
    }
    let x = |t: i64| LEFT + ((t - t0) as f64 / (t1 - t0) as f64 * WIDTH as f64) as i64;
    let h = 30 + rows.len() as i64 * ROW;
    let id = if first { " id=\"timeline\"" } else { "" };
    let mut s = format!(
        "<svg{id} class=\"timeline\" data-split=\"{key}\" xmlns=\"http://www.w3.org/2000/svg\" \
         width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
         aria-label=\"batches of {key} over time\">",
        key = escape(key),
        w = LEFT + WIDTH + 20,
    );
    for (i, (label, _)) in rows.iter().enumerate() {
        let y = 10 + i as i64 * ROW;
        let _ = write!(
            s,
            "<text class=\"row\" x=\"4\" y=\"{}\">{}</text>",
            y + 15,
            escape(&cut(label, 26))
        );
    }
    let mut round_starts: BTreeMap<u32, i64> = BTreeMap::new();
    for b in batches {
        let e = round_starts.entry(b.round).or_insert(b.leased_at);
        *e = (*e).min(b.leased_at);
    }
    for (round, t) in round_starts.iter().filter(|(r, _)| **r > 1) {
        let _ = write!(
            s,
            "<line class=\"round\" x1=\"{x}\" x2=\"{x}\" y1=\"4\" y2=\"{y2}\"/>\
             <text class=\"round\" x=\"{tx}\" y=\"{ty}\">retry round {round}</text>",
            x = x(*t),
            y2 = h - 14,
            tx = x(*t) + 3,
            ty = h - 4,
        );
    }
    for b in batches {
        let Some(row) = rows.iter().position(|(_, a)| *a == b.attempt) else {
            continue;
        };
        let (bx, ex) = (x(b.leased_at), x(b.ended_at.unwrap_or(now)));
        let mut class = format!("batch round-{}", b.round);
        if b.failed > 0 {
            class.push_str(" failed");
        }
        if b.ended_at.is_none() {
            class.push_str(" running");
        }
        let units = b
            .units
            .iter()
            .take(50)
            .map(|u| escape(u))
            .collect::<Vec<_>>()
            .join(", ");
        let more = b.units.len().saturating_sub(50);
        let _ = write!(
            s,
            "<rect class=\"{class}\" data-round=\"{round}\" data-runner=\"{runner}\" \
             x=\"{bx}\" y=\"{y}\" width=\"{w}\" height=\"{hh}\"><title>{job} on {runner}, \
             round {round}, {n} unit(s), {dur}{failed}: {units}{more}</title></rect>",
            round = b.round,
            runner = escape(&b.runner),
            job = escape(&b.job),
            y = 12 + row as i64 * ROW,
            w = (ex - bx).max(2),
            hh = ROW - 6,
            n = b.units.len(),
            dur = crate::time::span(Some(b.leased_at), b.ended_at),
            failed = if b.failed > 0 {
                format!(", {} failed", b.failed)
            } else {
                String::new()
            },
            more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            },
        );
    }
    s.push_str("</svg>");
    s
}

/// A shields-style badge: `label | value` with the value's colour.
pub(crate) fn badge_svg(label: &str, value: &str, color: &str) -> String {
    let wl = 6 * label.chars().count() as i64 + 12;
    let wv = 6 * value.chars().count() as i64 + 12;
    let w = wl + wv;
    let (label, value) = (escape(label), escape(value));
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"20\" role=\"img\" \
         aria-label=\"{label}: {value}\"><title>{label}: {value}</title>\
         <linearGradient id=\"s\" x2=\"0\" y2=\"100%\"><stop offset=\"0\" stop-color=\"#bbb\" \
         stop-opacity=\".1\"/><stop offset=\"1\" stop-opacity=\".1\"/></linearGradient>\
         <clipPath id=\"r\"><rect width=\"{w}\" height=\"20\" rx=\"3\" fill=\"#fff\"/></clipPath>\
         <g clip-path=\"url(#r)\"><rect width=\"{wl}\" height=\"20\" fill=\"#555\"/>\
         <rect x=\"{wl}\" width=\"{wv}\" height=\"20\" fill=\"{color}\"/>\
         <rect width=\"{w}\" height=\"20\" fill=\"url(#s)\"/></g>\
         <g fill=\"#fff\" text-anchor=\"middle\" font-family=\"Verdana,Geneva,DejaVu Sans,sans-serif\" \
         font-size=\"11\"><text x=\"{lx}\" y=\"14\">{label}</text>\
         <text x=\"{vx}\" y=\"14\">{value}</text></g></svg>",
        lx = wl / 2,
        vx = wl + wv / 2,
    )
}

/// The badge colour of a state.
fn state_color(s: Option<JobState>) -> &'static str {
    match s {
        Some(JobState::Passed) => "#4c1",
        Some(JobState::Failed | JobState::Errored | JobState::TimedOut) => "#e05d44",
        Some(JobState::Running | JobState::Assigned) => "#007ec6",
        Some(JobState::Queued) => "#dfb317",
        Some(JobState::Cancelled | JobState::Skipped) | None => "#9f9f9f",
    }
}

/// `GET /badge/{repo}/{branch}.svg` (repo URL-encoded): the state of the branch's newest build.
pub(crate) async fn badge(
    State(w): State<Web>,
    Path((repo, branch)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let Some(branch) = branch.strip_suffix(".svg") else {
        return Err(WebError::not_found(
            "a badge is /badge/{repo}/{branch}.svg (repo URL-encoded)",
        ));
    };
    let newest = w
        .dispatcher
        .list_builds(BuildFilter {
            repo: Some(repo),
            branch: Some(branch.to_string()),
            limit: 1,
            ..Default::default()
        })
        .await?;
    let state = newest.first().map(|b| b.state);
    let svg = badge_svg(
        "build",
        state.map_or("unknown", JobState::as_str),
        state_color(state),
    );
    let mut r = svg.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("image/svg+xml"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badge_escapes_and_colours() {
        let s = badge_svg("build", "<x>", "#4c1");
        assert!(s.starts_with("<svg") && s.contains("&lt;x&gt;") && s.contains("#4c1"));
    }
}

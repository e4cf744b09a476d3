//! A job's log by byte offset, as the page and the API read it.
//!
//! Offsets are the log file's (frame boundaries), the same the gRPC `StreamLogs` reports, so a
//! reader resumes exactly where it stopped. What is shown is the output of the job's current
//! attempt and later ones, as `kiln logs` shows it. The page renders only the tail (about
//! [`TAIL_BYTES`]); earlier parts come from `GET /api/jobs/{id}/log?before=&len=`, and live
//! output from the SSE follower (`GET /jobs/{id}/log/events?offset=N`), which replays what is
//! stored from `N` and then follows the log's published length, as `kiln logs -f` does: no gap
//! and no duplicate. Nothing reads a whole log into memory: reads go at most about a MiB at a
//! time.

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use kiln_dispatcher::{DispatchError, Dispatcher};
use kiln_domain::{AttemptId, JobId, JobState};
use kiln_store::Located;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::Web;
use crate::error::{WebError, parse_id};

/// How much of a log's end a page renders (less per job when a build has many: see
/// [`tail_bytes`]).
pub(crate) const TAIL_BYTES: u64 = 256 * 1024;
/// Most payload one read of the log store returns.
const READ_BYTES: usize = 1 << 20;
/// Most payload one SSE event carries (a follower holds at most a few in its channel).
const SSE_READ_BYTES: usize = 256 * 1024;

/// The tail each job of a build with `jobs` jobs gets on its page: a page holds about a MiB
/// of output at most, each job at least 32 KiB of it.
pub(crate) fn tail_bytes(jobs: usize) -> u64 {
    ((1u64 << 20) / jobs.max(1) as u64).clamp(32 * 1024, TAIL_BYTES)
}

/// Which attempts' output is shown: `from` and later ones (`None`: every attempt).
pub(crate) fn shows(from: Option<AttemptId>, attempt: AttemptId) -> bool {
    from.is_none_or(|f| attempt >= f)
}

/// Output read from a log.
#[derive(Debug, Default)]
pub(crate) struct Piece {
    /// Where it starts (a frame boundary).
    pub(crate) from: u64,
    /// Where it ends (a frame boundary): where to continue.
    pub(crate) next: u64,
    /// The shown attempts' bytes.
    pub(crate) text: Vec<u8>,
}

/// The log's published length (whole frames below it). Settles the follow of a job that
/// ended, so that looking at an old job's log leaves nothing behind in the engine's hub.
pub(crate) async fn log_len(d: &Dispatcher, job: &kiln_domain::Job) -> Result<u64, DispatchError> {
    let progress = d.follow(job.id).await?;
    // Subscribed, then the state: a job that ended meanwhile is seen ended.
    let state = if job.state.is_final() {
        job.state
    } else {
        d.get_job(job.id).await?.state
    };
    d.settle_follow(job.id, state).await;
    // Read after settling: the length of a job that ended is its final one.
    let len = progress.borrow().len;
    Ok(len)
}

/// Reads the shown output in `[offset, limit)`, stopping after about `max` bytes.
pub(crate) async fn read_range(
    d: &Dispatcher,
    job: JobId,
    offset: u64,
    limit: u64,
    max: usize,
    from: Option<AttemptId>,
) -> Result<Piece, DispatchError> {
    let mut piece = Piece {
        from: offset,
        next: offset,
        text: Vec::new(),
    };
    while piece.next < limit && piece.text.len() < max {
        let want = (max - piece.text.len()).min(READ_BYTES);
        let read = d.read_log(job, piece.next, limit, want).await?;
        for f in read.frames {
            if shows(from, f.header.attempt) {
                piece.text.extend_from_slice(&f.data);
            }
        }
        if read.next_offset <= piece.next {
            break;
        }
        piece.next = read.next_offset;
    }
    Ok(piece)
}

/// The first frame boundary at or after `target` and how many lines come before it (from the
/// log's checkpoint index: about a MiB of log is read, whatever its size).
pub(crate) async fn locate(
    d: &Dispatcher,
    job: JobId,
    target: u64,
    limit: u64,
    from: Option<AttemptId>,
) -> Result<Located, DispatchError> {
    d.locate_log(job, target, limit, move |a| shows(from, a))
        .await
}

/// Escapes text for HTML.
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// One line of output as HTML: ANSI colours as spans, the rest escaped.
pub(crate) fn line_html(line: &str) -> String {
    let line = line.strip_suffix('\r').unwrap_or(line);
    ansi_to_html::convert(line).unwrap_or_else(|_| escape(line))
}

/// A log's tail as the page shows it.
#[derive(Debug, Default)]
pub(crate) struct Tail {
    /// Where the rendered part starts (load earlier output before it).
    pub(crate) start: u64,
    /// Where it ends (follow from there).
    pub(crate) end: u64,
    /// The lines: `<span class="line" id="L{job}-{n}">` each, as HTML.
    pub(crate) html: String,
    /// The last line when it has no newline yet (the follower continues it).
    pub(crate) pending: String,
    /// The number the next line gets.
    pub(crate) next_line: u64,
}

/// Renders lines `text` of `job` numbered from `first` (the last one, when it has no newline,
/// is left in `pending`). With `partial_first`, the text starts in the middle of line `first`:
/// that piece gets no anchor (class `partial`; the page completes it when it loads the part
/// before).
pub(crate) fn render_lines(
    job: JobId,
    text: &str,
    first: u64,
    partial_first: bool,
) -> (String, String, u64) {
    let mut html = String::new();
    let mut n = first;
    let mut rest = text;
    let mut partial = partial_first;
    while let Some(i) = rest.find('\n') {
        if partial {
            html.push_str(&format!(
                "<span class=\"line partial\" data-n=\"{n}\">{}</span>\n",
                line_html(&rest[..i])
            ));
            partial = false;
        } else {
            html.push_str(&format!(
                "<span class=\"line\" id=\"L{job}-{n}\" data-n=\"{n}\">{}</span>\n",
                line_html(&rest[..i])
            ));
        }
        n += 1;
        rest = &rest[i + 1..];
    }
    if !rest.is_empty() {
        let (class, id) = if partial {
            ("line open partial", String::new())
        } else {
            ("line open", format!(" id=\"L{job}-{n}\""))
        };
        html.push_str(&format!(
            "<span class=\"{class}\"{id} data-n=\"{n}\">{}</span>",
            line_html(rest)
        ));
    }
    (html, rest.to_string(), n)
}

/// The last `bytes` or so of a job's shown output.
pub(crate) async fn tail(
    d: &Dispatcher,
    j: &kiln_domain::Job,
    bytes: u64,
) -> Result<Tail, DispatchError> {
    let (job, from) = (j.id, j.current_attempt);
    let len = log_len(d, j).await?;
    let at = match len.checked_sub(bytes) {
        Some(target) if target > 0 => locate(d, job, target, len, from).await?,
        _ => Located {
            offset: 0,
            lines: 0,
            aligned: true,
        },
    };
    let piece = read_range(d, job, at.offset, len, usize::MAX, from).await?;
    let text = String::from_utf8_lossy(&piece.text);
    let (html, pending, next_line) = render_lines(job, &text, at.lines + 1, !at.aligned);
    Ok(Tail {
        start: at.offset,
        end: piece.next,
        html,
        pending,
        next_line,
    })
}

/// Query of the SSE log follower.
#[derive(Debug, Deserialize)]
pub(crate) struct FollowQuery {
    /// Where to start (a frame boundary; `Last-Event-ID` wins on a reconnect).
    offset: Option<u64>,
    /// Show this attempt and later ones (0 or absent: the job's current attempt).
    attempt: Option<u64>,
}

fn sse_response<S>(stream: S) -> Response
where
    S: futures_util::Stream<Item = Result<SseEvent, Infallible>> + Send + 'static,
{
    let mut r = Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /jobs/{id}/log/events?offset=N`: events `chunk` (`{"from","next","text"}`, event id
/// the next offset) from `N` on, live, then one `end` (`{"state","next"}`) when the job ended.
pub(crate) async fn log_events(
    State(w): State<Web>,
    Path(id): Path<String>,
    q: Result<Query<FollowQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let Query(q) = q.map_err(crate::api::bad_query)?;
    let job: JobId = parse_id("job", &id)?;
    let d = w.dispatcher.clone();
    // A job that does not exist gets no follower channel.
    d.get_job(job).await?;
    // Subscribe first, then look at the job: an end in between cannot be missed.
    let mut progress = d.follow(job).await?;
    let j = d.get_job(job).await?;
    d.settle_follow(job, j.state).await;
    let resumed = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut offset = resumed.or(q.offset).unwrap_or(0);
    let len = progress.borrow().len;
    if offset > len {
        return Err(WebError::bad_request(format!(
            "offset {offset} is past the end of job {job}'s log ({len} bytes)"
        )));
    }
    let from = match q.attempt {
        Some(a) if a > 0 => Some(AttemptId::new(a)),
        _ => j.current_attempt,
    };
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(4);
    let shutdown = w.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let p = *progress.borrow_and_update();
            if offset < p.len {
                match read_range(&d, job, offset, p.len, SSE_READ_BYTES, from).await {
                    Ok(piece) => {
                        let data = serde_json::json!({
                            "from": piece.from,
                            "next": piece.next,
                            "text": String::from_utf8_lossy(&piece.text),
                        });
                        let ev = SseEvent::default()
                            .event("chunk")
                            .id(piece.next.to_string())
                            .data(data.to_string());
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                        if piece.next <= offset {
                            return;
                        }
                        offset = piece.next;
                    }
                    Err(e) => {
                        let data = serde_json::json!({ "error": e.to_string() });
                        let _ = tx
                            .send(Ok(SseEvent::default()
                                .event("error")
                                .data(data.to_string())))
                            .await;
                        return;
                    }
                }
                continue;
            }
            if let Some(state) = p.done {
                let data = serde_json::json!({ "state": state.as_str(), "next": offset });
                let _ = tx
                    .send(Ok(SseEvent::default().event("end").data(data.to_string())))
                    .await;
                return;
            }
            tokio::select! {
                changed = progress.changed() => {
                    if changed.is_err() && progress.borrow().done.is_none() {
                        // The channel was replaced; subscribe again.
                        match d.follow(job).await {
                            Ok(p) => progress = p,
                            Err(_) => return,
                        }
                        if let Ok(j) = d.get_job(job).await {
                            d.settle_follow(job, j.state).await;
                        }
                    }
                }
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Ok(sse_response(ReceiverStream::new(rx)))
}

/// `GET /events`: `ready` once subscribed, then every state change as an event `state`
/// (`{"build_id","job_id","state","at"}`); `resync` when this follower fell behind and missed
/// some (the page re-reads then).
pub(crate) async fn build_events(
    State(w): State<Web>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let mut events = w.dispatcher.subscribe();
    let (tx, rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    // Subscribed: say so, so a client knows that nothing after this is missed.
    let ready = SseEvent::default().event("ready").data("{}");
    if tx.send(Ok(ready)).await.is_err() {
        return Err(WebError::new(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
        ));
    }
    let shutdown = w.shutdown.clone();
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            };
            let out = match ev {
                Ok(ev) => SseEvent::default().event("state").data(
                    serde_json::json!({
                        "build_id": ev.build_id,
                        "job_id": ev.job_id,
                        "state": ev.state.as_str(),
                        "at": ev.at,
                    })
                    .to_string(),
                ),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => SseEvent::default()
                    .event("resync")
                    .data(serde_json::json!({ "missed": n }).to_string()),
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    });
    Ok(sse_response(ReceiverStream::new(rx)))
}

/// `GET /jobs/{id}/log.txt`: the job's shown output as stored now, streamed a MiB at a time.
pub(crate) async fn log_txt(
    State(w): State<Web>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, WebError> {
    w.auth.check_read(&headers)?;
    let job: JobId = parse_id("job", &id)?;
    let d = w.dispatcher.clone();
    let j = d.get_job(job).await?;
    let len = log_len(&d, &j).await?;
    let from = j.current_attempt;
    let (tx, rx) = mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let mut offset = 0;
        while offset < len {
            match read_range(&d, job, offset, len, READ_BYTES, from).await {
                Ok(piece) => {
                    if piece.next <= offset {
                        return;
                    }
                    offset = piece.next;
                    if !piece.text.is_empty() && tx.send(Ok(piece.text.into())).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
                    return;
                }
            }
        }
    });
    let mut r = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("inline; filename=\"kiln-job-{job}.log\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(r)
}

/// Whether a job's output is complete (it ended and everything up to `offset` is read).
pub(crate) fn ended(state: JobState, done: Option<JobState>, offset: u64, len: u64) -> bool {
    (done.is_some() || state.is_final()) && offset >= len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_escaped_and_coloured() {
        let (html, pending, next) =
            render_lines(JobId::new(3), "a<b\n\x1b[31mred\x1b[0m\nhalf", 1, false);
        assert!(html.contains("<span class=\"line\" id=\"L3-1\" data-n=\"1\">a&lt;b</span>"));
        assert!(html.contains("id=\"L3-2\""));
        assert!(html.contains("color:"), "{html}");
        assert!(html.contains("<span class=\"line open\" id=\"L3-3\""));
        assert_eq!((pending.as_str(), next), ("half", 3));
        let (html, pending, next) = render_lines(JobId::new(3), "x\ny\n", 7, true);
        assert_eq!((pending.as_str(), next), ("", 9));
        assert!(html.starts_with("<span class=\"line partial\" data-n=\"7\">x</span>"));
        assert!(html.contains("id=\"L3-8\""));
    }
}

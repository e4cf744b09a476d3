//! `kiln-bench latency`: how late a `kiln logs -f` follower sees a step's output lines.
//!
//! A step writes `--rate` lines a second of `--line-bytes` bytes for `--duration`, each line
//! starting with the wall clock when it was written. A real `kiln logs -f` child follows the
//! build; each line's latency is the wall clock when the benchmark read it from the follower's
//! stdout minus the line's own timestamp. The baseline is the same generator piped straight
//! into this process.
//!
//! With `--browser`, the build's web page is open in a real browser (headless chromium through
//! chromedriver) in the same run: a `MutationObserver` in the page takes the wall clock when
//! each line's element is added to the page, and the line's latency there is that minus its
//! timestamp (the browser and the generator read the same machine clock).

use std::process::Stdio;
use std::time::Duration;

use clap::Args;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use super::generate::LinesArgs;
use super::util::{
    Proc, Repo, Scratch, Server, bench_exe, fail, figure, header, kiln_command, note, now_ns,
    percentile, pipeline, sh_quote, sorted, submit, wait_exit, wrong,
};
use crate::BenchError;

/// `kiln-bench latency`.
#[derive(Debug, Clone, Args)]
pub struct LatencyArgs {
    /// Lines per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Bytes per line (1024 at 1000 lines/s is about 1 MB/s).
    #[arg(long, default_value_t = 1024)]
    pub line_bytes: usize,
    /// How long the step writes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// How long the step waits before its first line, so the follower is attached.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    /// Also measure the lines on the build's web page in a real browser (needs `chromium` and
    /// `chromedriver` on PATH).
    #[arg(long)]
    pub browser: bool,
}

impl LatencyArgs {
    fn lines(&self) -> LinesArgs {
        LinesArgs {
            rate: self.rate,
            line_bytes: self.line_bytes,
            duration: self.duration,
            delay: self.delay,
            until: None,
        }
    }
}

/// What a reader saw.
struct Seen {
    /// Latency of every timestamped line, ms, in arrival order.
    latencies: Vec<f64>,
    /// Timestamped lines whose sequence number was not the next one.
    out_of_order: u64,
    /// When the first byte arrived (ns since the epoch).
    first_byte_ns: Option<u128>,
    /// Timestamped lines written before the first byte arrived (replayed, not live).
    before_attach: u64,
}

/// Reads lines from `from` until EOF; lines that start with a timestamp and a sequence number
/// are measured, anything else (kiln's own lines) is skipped.
async fn read_lines(from: impl AsyncRead + Unpin) -> Result<Seen, BenchError> {
    let mut reader = BufReader::with_capacity(1 << 16, from);
    let mut line = Vec::with_capacity(4096);
    let mut seen = Seen {
        latencies: Vec::new(),
        out_of_order: 0,
        first_byte_ns: None,
        before_attach: 0,
    };
    let mut next_seq = 0u64;
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|e| fail(format!("reading lines: {e}")))?;
        let now = now_ns();
        if n == 0 {
            return Ok(seen);
        }
        let first = *seen.first_byte_ns.get_or_insert(now);
        let mut words = line.split(|&b| b == b' ');
        let parse = |w: Option<&[u8]>| {
            w.and_then(|w| std::str::from_utf8(w).ok())
                .and_then(|w| w.parse::<u128>().ok())
        };
        let (Some(ts), Some(seq)) = (parse(words.next()), parse(words.next())) else {
            continue;
        };
        if seq != u128::from(next_seq) {
            seen.out_of_order += 1;
        }
        next_seq = seq as u64 + 1;
        if ts < first {
            seen.before_attach += 1;
        }
        seen.latencies.push(now.saturating_sub(ts) as f64 / 1e6);
    }
}

/// Runs the benchmark; fails with exit code 1 when output was lost or reordered.
pub async fn run(args: &LatencyArgs) -> Result<(), BenchError> {
    let spec = args.lines();
    let expected = spec.count();
    header(
        "latency",
        &format!(
            "live output lines seen by a `kiln logs -f` follower ({} lines/s of {} B for {:?})",
            args.rate, args.line_bytes, args.duration
        ),
    );
    let tmp = Scratch::new()?;

    // Baseline: the generator piped straight into this process.
    let base = {
        let mut cmd = tokio::process::Command::new(bench_exe()?);
        cmd.args(spec.argv()).stdout(Stdio::piped());
        let mut p = Proc::spawn("generator", cmd)?;
        let out = p.child.stdout.take().ok_or_else(|| fail("no stdout"))?;
        let limit = args.delay + args.duration + Duration::from_secs(60);
        let seen = tokio::time::timeout(limit, read_lines(out))
            .await
            .map_err(|_| fail("the baseline generator did not finish"))??;
        let code = wait_exit(&mut p, Duration::from_secs(10)).await?;
        if code != 0 {
            return Err(fail(format!("the baseline generator exited {code}")));
        }
        seen
    };

    // Kiln: a dispatcher, a runner, a repository whose step is the generator.
    let server = Server::start(tmp.path()).await?;
    let _runner = server.start_runner(tmp.path(), "bench-latency").await?;
    let repo = Repo::init(&tmp.path().join("repo"))?;
    let run = std::iter::once(sh_quote(&bench_exe()?.to_string_lossy()))
        .chain(spec.argv())
        .collect::<Vec<_>>()
        .join(" ");
    let commit = repo.commit(&[(".kiln.yml", &pipeline("lines", &run))], "latency")?;
    let mut client = server.build_client().await?;
    let build = submit(&mut client, &repo, &commit).await?;
    let page = if args.browser {
        let url = format!("{}/builds/{}", server.url, build.id);
        Some(
            tokio::task::spawn_blocking(move || watch_page(&url))
                .await
                .map_err(|e| fail(format!("the browser thread: {e}")))??,
        )
    } else {
        None
    };
    let mut cmd = kiln_command()?;
    cmd.args([
        "--dispatcher",
        &server.url,
        "logs",
        "-f",
        &build.id.to_string(),
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    let mut follower = Proc::spawn("kiln logs -f", cmd)?;
    let out = follower
        .child
        .stdout
        .take()
        .ok_or_else(|| fail("no stdout"))?;
    let limit = args.delay + args.duration + Duration::from_secs(120);
    let seen = tokio::time::timeout(limit, read_lines(out))
        .await
        .map_err(|_| fail("the follower did not finish"))??;
    let code = wait_exit(&mut follower, Duration::from_secs(30)).await?;

    let b = sorted(&base.latencies);
    let k = sorted(&seen.latencies);
    let received = seen.latencies.len() as u64;
    let complete = received == expected && seen.out_of_order == 0;
    note(format!(
        "lines: {received} of {expected} received{}, follower exit code {code}{}",
        if seen.out_of_order == 0 {
            " in order"
        } else {
            ""
        },
        if seen.before_attach > 0 {
            format!(
                ", {} written before the follower's first byte",
                seen.before_attach
            )
        } else {
            String::new()
        }
    ));
    let row = |label: &str, p: f64, goal: Option<f64>| {
        let v = percentile(&k, p);
        let bv = percentile(&b, p);
        figure(
            label,
            format!("{v:.2} ms"),
            &goal.map(|g| format!("goal < {g} ms")).unwrap_or_default(),
            goal.map(|g| v < g),
            &format!("baseline (pipe) {bv:.3} ms, ratio {:.1}x", v / bv),
        );
    };
    row("p50", 50.0, Some(10.0));
    row("p99", 99.0, Some(50.0));
    row("max", 100.0, None);
    if let Some(page) = page {
        let seen = tokio::task::spawn_blocking(move || page.collect(expected))
            .await
            .map_err(|e| fail(format!("the browser thread: {e}")))??;
        let w = sorted(&seen.latencies);
        note(format!(
            "web page: {} of {expected} lines added to the page{}",
            seen.latencies.len(),
            if seen.out_of_order == 0 {
                " in order".to_string()
            } else {
                format!(", {} out of order", seen.out_of_order)
            }
        ));
        for (label, p) in [
            ("web page p50", 50.0),
            ("web page p99", 99.0),
            ("web page max", 100.0),
        ] {
            let v = percentile(&w, p);
            figure(
                label,
                format!("{v:.2} ms"),
                "",
                None,
                &format!(
                    "`kiln logs -f` {:.2} ms, ratio {:.1}x",
                    percentile(&k, p),
                    v / percentile(&k, p)
                ),
            );
        }
        if seen.latencies.len() as u64 != expected || seen.out_of_order != 0 {
            return Err(wrong(format!(
                "the web page showed {} of {expected} lines, {} out of order",
                seen.latencies.len(),
                seen.out_of_order
            )));
        }
    }
    if !complete {
        return Err(wrong(format!(
            "the follower saw {received} of {expected} lines, {} out of order",
            seen.out_of_order
        )));
    }
    if base.latencies.len() as u64 != expected {
        return Err(wrong("the baseline pipe lost lines"));
    }
    if code != 0 {
        return Err(wrong(format!(
            "`kiln logs -f` exited {code}; the build did not pass"
        )));
    }
    Ok(())
}

/// The build's page, open in a browser that records when each line arrives.
struct Page {
    browser: kiln_testkit::browser::Browser,
}

/// Installed in the page: for every `span.line` added under a job's log, the wall clock (ms
/// since the epoch, sub-millisecond) minus the timestamp the line starts with (ns), and its
/// sequence number.
const OBSERVER_JS: &str = r#"
window.__kilnLat = [];
window.__kilnSeq = [];
const clock = () => performance.timeOrigin + performance.now();
const take = (el) => {
  const now = clock();
  const m = /^(\d{16,}) (\d{10}) /.exec(el.textContent || "");
  if (m) {
    window.__kilnLat.push(now - Number(m[1]) / 1e6);
    window.__kilnSeq.push(Number(m[2]));
  }
};
new MutationObserver((records) => {
  for (const r of records) {
    for (const n of r.addedNodes) {
      if (n.nodeType !== 1) continue;
      if (n.matches && n.matches("span.line")) take(n);
      else if (n.querySelectorAll) n.querySelectorAll("span.line").forEach(take);
    }
  }
}).observe(document.body, { childList: true, subtree: true });
return true;
"#;

/// Opens `url` and installs the observer (before the step's first line: the step waits
/// `--delay` before writing).
fn watch_page(url: &str) -> Result<Page, BenchError> {
    let browser = kiln_testkit::browser::Browser::start();
    browser.goto(url);
    browser.wait_css("#build-state", Duration::from_secs(60));
    browser.eval(OBSERVER_JS);
    Ok(Page { browser })
}

impl Page {
    /// Waits (at most a minute) until `expected` lines were seen or no more arrive, then
    /// reads what the page recorded.
    fn collect(self, expected: u64) -> Result<Seen, BenchError> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let count = |b: &kiln_testkit::browser::Browser| {
            b.eval("return window.__kilnLat.length;")
                .as_u64()
                .unwrap_or(0)
        };
        while count(&self.browser) < expected && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let lat = self.browser.eval("return window.__kilnLat;");
        let seq = self.browser.eval("return window.__kilnSeq;");
        let latencies: Vec<f64> = lat
            .as_array()
            .ok_or_else(|| fail("the page recorded no latencies"))?
            .iter()
            .filter_map(serde_json::Value::as_f64)
            .collect();
        let mut out_of_order = 0;
        let mut next = 0u64;
        for s in seq.as_array().into_iter().flatten() {
            let s = s.as_u64().unwrap_or(u64::MAX);
            if s != next {
                out_of_order += 1;
            }
            next = s.wrapping_add(1);
        }
        Ok(Seen {
            latencies,
            out_of_order,
            first_byte_ns: None,
            before_attach: 0,
        })
    }
}

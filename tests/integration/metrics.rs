//! `GET /metrics` scraped from a live dispatcher and read with Prometheus' own OpenMetrics
//! parser (the official Python client's): what happened is what it counts, the store's counts
//! survive a restart, and closed reads close it too.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use kiln_testkit::*;

/// One sample: name, labels, value.
type Sample = (String, BTreeMap<String, String>, f64);

/// Parses an OpenMetrics text with `prometheus_client.openmetrics.parser` (it refuses what
/// is not valid OpenMetrics, e.g. a missing `# EOF`).
fn parse(text: &str) -> Result<Vec<Sample>, String> {
    let script = "import sys, json\n\
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse\n\
        print(json.dumps([[s.name, s.labels, s.value] for f in parse(sys.stdin.read()) for s in f.samples]))";
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("python3: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "the OpenMetrics parser refused the text: {}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// The value of the sample `name` with exactly these labels (0 when absent).
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|s| s.2)
        .unwrap_or(0.0)
}

fn scrape(server: &Server, headers: &[&str]) -> Result<Vec<Sample>, String> {
    let (status, body) = http_get(&format!("{}/metrics", server.url), headers);
    if status != "200" {
        return Err(format!("HTTP {status}: {body}"));
    }
    parse(&body)
}

#[test]
fn a_live_dispatchers_metrics_parse_and_count_what_happened() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let server = Server::start(&data, &[]);
    let _runner = server.runner(tmp.path(), "m1", &["--slots", "2"]);
    server.wait_runners_attached(&["m1"]);

    let (good, good_sha) = Repo::with_pipeline(
        &tmp.path().join("good"),
        "steps:\n  - name: out\n    run: head -c 100000 /dev/zero | tr '\\0' x\n",
    );
    let (bad, bad_sha) = Repo::with_pipeline(
        &tmp.path().join("bad"),
        "steps:\n  - name: fails\n    run: exit 3\n",
    );
    let (nowhere, nowhere_sha) = Repo::with_pipeline(
        &tmp.path().join("nowhere"),
        "steps:\n  - name: never\n    run: echo never\n    labels: {os: nowhere}\n",
    );
    let g = id_of(&server.submit(&good.path, &good_sha));
    let b = id_of(&server.submit(&bad.path, &bad_sha));
    id_of(&server.submit(&nowhere.path, &nowhere_sha));
    assert_eq!(server.wait_final(g, LONG)["state"], "passed");
    assert_eq!(server.wait_final(b, LONG)["state"], "failed");

    let s = wait_for("metrics to count both builds", LONG, || {
        let s = scrape(&server, &[])?;
        if value(&s, "kiln_job_duration_seconds_count", &[]) < 2.0 {
            return Err(format!("{s:?}"));
        }
        Ok(s)
    });
    let ended = |state| value(&s, "kiln_jobs_ended_total", &[("state", state)]);
    assert_eq!((ended("passed"), ended("failed")), (1.0, 1.0), "{s:?}");
    assert_eq!(value(&s, "kiln_jobs", &[("state", "queued")]), 1.0, "{s:?}");
    assert_eq!(
        value(&s, "kiln_queue_depth", &[("labels", "os=nowhere")]),
        1.0,
        "{s:?}"
    );
    assert_eq!(value(&s, "kiln_runners_attached", &[]), 1.0);
    assert_eq!(value(&s, "kiln_runner_slots", &[]), 2.0);
    assert_eq!(value(&s, "kiln_runners_busy", &[]), 0.0);
    assert!(
        value(&s, "kiln_output_bytes_total", &[]) >= 100_000.0,
        "{s:?}"
    );
    assert_eq!(value(&s, "kiln_job_duration_seconds_count", &[]), 2.0);
    // Three jobs were queued; two were assigned.
    assert_eq!(value(&s, "kiln_queue_wait_seconds_count", &[]), 2.0);
    assert_eq!(value(&s, "kiln_step_duration_seconds_count", &[]), 2.0);
    assert_eq!(
        value(&s, "kiln_runner_attaches_total", &[("kind", "first")]),
        1.0
    );
    assert_eq!(value(&s, "kiln_results_refused_total", &[]), 0.0);
    assert_eq!(value(&s, "kiln_reassignments_total", &[]), 0.0);

    // A restart: the store's counts are still there; what the process counted starts again.
    let addr = server.addr.clone();
    drop(server);
    let again = kiln_testkit::fault::restart_dispatcher_on(
        &addr,
        &data,
        &["--api-token", "sekrit", "--closed-reads"],
    );
    // Closed reads close the metrics too: the token is needed, as for every read.
    let (status, _) = http_get(&format!("{}/metrics", again.url), &[]);
    assert_eq!(status, "401");
    let (status, _) = http_get(
        &format!("{}/metrics", again.url),
        &["Authorization: Bearer wrong"],
    );
    assert_eq!(status, "403");
    let s = scrape(&again, &["Authorization: Bearer sekrit"]).unwrap();
    let ended = |state| value(&s, "kiln_jobs_ended_total", &[("state", state)]);
    assert_eq!((ended("passed"), ended("failed")), (1.0, 1.0), "{s:?}");
    assert_eq!(
        value(&s, "kiln_queue_depth", &[("labels", "os=nowhere")]),
        1.0
    );
    assert_eq!(value(&s, "kiln_output_bytes_total", &[]), 0.0);
}

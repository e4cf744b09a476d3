//! The web page in a real browser (headless chromium through chromedriver): what a person sees
//! at `http://DISPATCHER/` while builds run. Each test saves a screenshot of its page under
//! `target/screenshots/`.

use std::path::Path;

use kiln_testkit::browser::Browser;
use kiln_testkit::{LONG, Repo, Server, id_of, tempdir, wait_flag_sh};

/// A dispatcher with one runner attached, and a build of `pipeline` submitted to it.
fn one_build(tmp: &Path, pipeline: &str) -> (Server, kiln_testkit::Proc, u64) {
    let (repo, sha) = Repo::with_pipeline(&tmp.join("repo"), pipeline);
    let server = Server::start(&tmp.join("data"), &[]);
    let runner = server.runner(tmp, "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    (server, runner, id)
}

/// A pipeline whose one step prints a line, waits for `flag`, then prints another (`printf`, so
/// the banner that echoes the command does not contain the text waited for).
fn waiting_pipeline(flag: &Path) -> String {
    format!(
        "steps:\n  - name: live\n    run: |\n      printf 'first-%s\\n' line\n      {}\n      printf 'second-%s\\n' line\n",
        wait_flag_sh(flag)
    )
}

#[test]
fn a_running_jobs_output_appears_on_its_page_before_the_job_ends() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let (server, _r, id) = one_build(tmp.path(), &waiting_pipeline(&flag));

    let browser = Browser::start();
    browser.goto(&format!("{}/builds/{id}", server.url));
    let log = "section.job[data-job-name=\"live\"] pre.log";
    browser.wait_text(log, "first-line", LONG);
    // The job is still running: the line came live, not with the result.
    assert_eq!(server.show(id)["state"], "running");
    assert!(
        !browser
            .text(log)
            .unwrap_or_default()
            .contains("second-line")
    );
    assert_eq!(
        browser.attr("#build-state", "data-state").as_deref(),
        Some("running")
    );
    let took = browser.text("#took").unwrap_or_default();
    assert!(took.ends_with(" so far"), "{took:?}");
    browser.screenshot("build-running");

    std::fs::write(&flag, b"").unwrap();
    browser.wait_attr("#build-state", "data-state", LONG, |s| s == "passed");
    // The build's duration becomes its final one, live.
    browser.wait_attr("#took", "data-final", LONG, |s| s == "true");
    let took = browser.text("#took").unwrap_or_default();
    assert!(!took.is_empty() && !took.contains("so far"), "{took:?}");
    let text = browser.wait_text(log, "second-line", LONG);
    // Replay then follow: each line once, in order.
    assert_eq!(text.matches("first-line").count(), 1, "{text}");
    assert_eq!(text.matches("second-line").count(), 1, "{text}");
    assert!(text.find("first-line") < text.find("second-line"), "{text}");
    // Every line has an anchor one can link to.
    let job = browser
        .attr("section.job[data-job-name=\"live\"]", "data-job-id")
        .unwrap();
    assert!(
        browser.count(&format!("pre.log span.line[id^=\"L{job}-\"]")) >= 2,
        "line anchors"
    );
    browser.goto(&format!("{}/builds/{id}#L{job}-1", server.url));
    browser.wait_css(&format!("#L{job}-1"), LONG);
    // As the server renders it.
    assert_eq!(browser.text("#took").as_deref(), Some(took.as_str()));
    browser.screenshot("build");
}

#[test]
fn the_builds_list_changes_state_without_a_reload() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &waiting_pipeline(&flag));
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);

    let browser = Browser::start();
    browser.goto(&format!("{}/", server.url));
    browser.wait_css("table#builds", LONG);
    // A mark on the page's window: a reload would lose it.
    browser.eval("window.__kilnNoReload = 'still here'; return null;");

    // No build yet: no branches table shown.
    assert_eq!(
        browser.eval("return document.getElementById('branches').hidden;"),
        serde_json::json!(true)
    );
    let submit_on = |branch: &str, sha: &str| {
        let out = server.cli(&[
            "--json",
            "submit",
            "--repo",
            repo.path.to_str().unwrap(),
            "--commit",
            sha,
            "--branch",
            branch,
        ]);
        out.expect_code(0);
        id_of(&out.json())
    };
    let id = submit_on("main", &sha);
    let row = format!("table#builds tr[data-build-id=\"{id}\"]");
    browser.wait_attr(&row, "data-state", LONG, |s| s == "running");
    // The branches table shows up with the new branch's row, live.
    let head = format!("table#heads tr[data-head-of=\"{id}\"][data-branch=\"main\"]");
    browser.wait_css(&head, LONG);
    std::fs::write(&flag, b"").unwrap();
    browser.wait_attr(&row, "data-state", LONG, |s| s == "passed");
    browser.wait_attr(&head, "data-state", LONG, |s| s == "passed");
    assert_eq!(
        browser.eval("return document.getElementById('branches').hidden;"),
        serde_json::json!(false)
    );
    // A build on another new branch adds its row on top; then a newer build on `main`
    // replaces that branch's row.
    // (A commit is built once: new commits.)
    let other = submit_on("feature/live", &repo.commit(&[("b.txt", b"b")], "b"));
    let other_head =
        format!("table#heads tr[data-head-of=\"{other}\"][data-branch=\"feature/live\"]");
    browser.wait_attr(&other_head, "data-state", LONG, |s| s == "passed");
    assert_eq!(
        browser.attr("table#heads tbody tr:first-child", "data-head-of"),
        Some(other.to_string())
    );
    let newer = submit_on("main", &repo.commit(&[("c.txt", b"c")], "c"));
    browser.wait_attr(
        &format!("table#heads tr[data-head-of=\"{newer}\"][data-branch=\"main\"]"),
        "data-state",
        LONG,
        |s| s == "passed",
    );
    assert_eq!(
        browser.count("table#heads tbody tr"),
        2,
        "one row per branch"
    );
    assert_eq!(
        browser.eval("return window.__kilnNoReload || null;"),
        serde_json::json!("still here"),
        "the page reloaded"
    );
    browser.screenshot("builds");

    // The runners page lists the runner and the (empty) queue.
    browser.goto(&format!("{}/runners", server.url));
    browser.wait_css("tr[data-runner=\"r1\"]", LONG);
    browser.wait_css("table#queue", LONG);
    browser.screenshot("runners");
}

#[test]
fn a_failed_split_shows_the_failed_tests_text_and_the_timeline() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let mut files: Vec<(String, String)> = (0..4)
        .map(|f| {
            (
                format!("tests/test_ok{f}.py"),
                format!("def test_ok_{f}():\n    assert True\n"),
            )
        })
        .collect();
    files.push((
        "tests/test_broken.py".into(),
        "def test_arithmetic():\n    total = 1 + 1\n    assert total == 3, 'arithmetic is broken today'\n".into(),
    ));
    files.push((
        ".kiln.yml".into(),
        "steps:\n  - name: tests\n    run: python3 -m pytest -q -p no:cacheprovider --junitxml={junit} {units}\n    parallel: 2\n    units:\n      glob: tests/test_*.py\n".into(),
    ));
    let all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_bytes()))
        .collect();
    let sha = repo.commit(&all, "suite");
    let id = id_of(&server.submit(&repo.path, &sha));
    let build = server.wait_final(id, LONG);
    assert_eq!(build["state"], "failed", "{build}");

    let browser = Browser::start();
    browser.goto(&format!("{}/builds/{id}/tests", server.url));
    let failure = browser.wait_css("div.failure[data-test*=\"test_arithmetic\"]", LONG);
    assert!(
        failure.contains("arithmetic is broken today"),
        "the failure's message: {failure}"
    );
    // The traceback (the body), not only the message.
    assert!(
        failure.contains("assert 2 == 3"),
        "the failure's text: {failure}"
    );
    assert!(
        browser.count("svg#timeline rect.batch") >= 2,
        "a box per batch"
    );
    browser.screenshot("tests");
}

#[test]
fn cancel_from_the_page_cancels_after_logging_in() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &waiting_pipeline(&flag));
    let server = Server::start(
        &tmp.path().join("data"),
        &["--api-token", "s3cret-token", "--closed-reads"],
    );
    // (Reads are closed: the build's state, below, is read with the token.)
    let _r = server.runner(tmp.path(), "r1", &[]);
    let out = server.cli(&[
        "--token",
        "s3cret-token",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        &sha,
        "--json",
    ]);
    let id = id_of(&out.expect_code(0).json());
    let show = || {
        server
            .cli(&["--token", "s3cret-token", "show", &id.to_string(), "--json"])
            .json()
    };
    kiln_testkit::wait_for("the build to run", LONG, || {
        let b = show();
        if b["state"] == "running" {
            Ok(())
        } else {
            Err(b.to_string())
        }
    });

    let browser = Browser::start();
    // Reads are closed: the page asks for the token first.
    browser.goto(&format!("{}/builds/{id}", server.url));
    browser.wait_css("input#token", LONG);
    assert_eq!(
        browser.count("#build-state"),
        0,
        "the build shown without a token"
    );
    browser.screenshot("login");
    browser.type_into("input#token", "s3cret-token");
    browser.click("button#login");
    browser.wait_attr("#build-state", "data-state", LONG, |s| s == "running");
    browser.click("button#cancel");
    browser.wait_attr("#build-state", "data-state", LONG, |s| s == "cancelled");
    assert_eq!(show()["state"], "cancelled");
    browser.screenshot("build-cancelled");
}

#[test]
fn a_fast_log_keeps_a_bounded_page_and_scrolling_up_brings_back_earlier_lines() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: loud\n    run: |\n      printf 'begin-%s\\n' here\n      {}\n      i=0; while [ $i -lt 4000 ]; do i=$((i+1)); echo \"n-$i\"; done\n      python3 -c 'import sys; sys.stdout.write(\"\".join(\"n-%d\\n\" % i for i in range(4001, 12001)))'\n",
        wait_flag_sh(&flag)
    );
    let (server, _r, id) = one_build(tmp.path(), &pipeline);

    let browser = Browser::start();
    browser.goto(&format!("{}/builds/{id}", server.url));
    let log = "section.job[data-job-name=\"loud\"] pre.log";
    browser.wait_text(log, "begin-here", LONG);
    std::fs::write(&flag, b"").unwrap();
    browser.wait_attr("#build-state", "data-state", LONG, |s| s == "passed");
    kiln_testkit::wait_for("the last line on the page", LONG, || {
        let found = browser.eval(
            "return [...document.querySelectorAll('pre.log span.line')] \
             .some(s => s.textContent.trim() === 'n-12000');",
        );
        if found == serde_json::json!(true) {
            Ok(())
        } else {
            Err(browser
                .text(log)
                .unwrap_or_default()
                .chars()
                .rev()
                .take(200)
                .collect())
        }
    });
    // Live output did not pile up: the oldest lines left the page.
    let numbers =
        "return [...document.querySelectorAll('pre.log span.line')].map(s => Number(s.dataset.n));";
    let shown: Vec<u64> = serde_json::from_value(browser.eval(numbers)).unwrap();
    assert!(shown.len() <= 3000, "{} lines on the page", shown.len());
    let first = shown[0];
    assert!(first > 1, "nothing was dropped: {first}");
    // Scrolling to the top brings back the lines before, numbered on from where they were.
    browser.eval(
        "const p = document.querySelector('pre.log'); p.scrollTop = 0; \
         p.dispatchEvent(new Event('scroll')); return null;",
    );
    let after: Vec<u64> = kiln_testkit::wait_for("earlier lines", LONG, || {
        let v: Vec<u64> = serde_json::from_value(browser.eval(numbers)).unwrap();
        if v[0] < first {
            Ok(v)
        } else {
            Err(format!("first line still {}", v[0]))
        }
    });
    for w in after.windows(2) {
        assert_eq!(w[1], w[0] + 1, "lines out of sequence around {}", w[0]);
    }
    // Line n is the n-th line of the log (the banner and `begin-here` come first).
    let text = browser
        .text(&format!(
            "#L{}-{}",
            browser.attr("section.job", "data-job-id").unwrap(),
            first
        ))
        .unwrap();
    let full = server.cli(&["logs", &id.to_string()]).out();
    let nth = full.lines().nth(first as usize - 1).unwrap();
    assert_eq!(text.trim(), nth.trim(), "line {first}");
}

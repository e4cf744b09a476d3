//! The web reporter (`kiln-web`) against a real `kiln serve` and runner: the JSON API, the
//! pages (the DOM contract the browser tests rely on), the SSE log follower (lines before the
//! job ends, no gap, no duplicate, the same bytes `kiln logs` prints), a large log's tail and
//! earlier parts, the badge, 404s, and authorisation (tokens, closed reads, the login cookie,
//! CSRF). HTTP is spoken by `curl`.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use kiln_testkit::*;
use serde_json::Value;

/// An HTTP answer.
struct Resp {
    status: u16,
    headers: String,
    body: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// `curl -X METHOD URL` with extra arguments (headers, data).
fn http(method: &str, url: &str, extra: &[&str]) -> Resp {
    let dir = tempdir();
    let (h, b) = (dir.path().join("h"), dir.path().join("b"));
    let out = Command::new("curl")
        .args(["-s", "-X", method, "-o"])
        .arg(&b)
        .arg("-D")
        .arg(&h)
        .args(["-w", "%{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    Resp {
        status: String::from_utf8_lossy(&out.stdout).trim().parse().unwrap(),
        headers: std::fs::read_to_string(&h).unwrap_or_default(),
        body: String::from_utf8_lossy(&std::fs::read(&b).unwrap_or_default()).into_owned(),
    }
}

fn get(url: &str, extra: &[&str]) -> Resp {
    http("GET", url, extra)
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The `chunk` events of an SSE text: (from, next, text) each, and whether `end` came.
fn chunks(sse: &str) -> (Vec<(u64, u64, String)>, bool) {
    let mut out = Vec::new();
    let mut ended = false;
    for block in sse.split("\n\n") {
        let event = block.lines().find_map(|l| l.strip_prefix("event: "));
        let data = block.lines().find_map(|l| l.strip_prefix("data: "));
        match (event, data) {
            (Some("chunk"), Some(d)) => {
                let v: Value = serde_json::from_str(d).unwrap();
                out.push((
                    v["from"].as_u64().unwrap(),
                    v["next"].as_u64().unwrap(),
                    v["text"].as_str().unwrap().to_string(),
                ));
            }
            (Some("end"), _) => ended = true,
            _ => {}
        }
    }
    (out, ended)
}

/// Follows `job`'s log with `curl -N` from `offset`.
fn follow(server: &Server, job: u64, offset: u64) -> Proc {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-N"]).arg(format!(
        "{}/jobs/{job}/log/events?offset={offset}",
        server.url
    ));
    Proc::spawn(format!("curl sse job {job}"), cmd)
}

/// The whole shown log of a job read through `GET /api/jobs/{id}/log` page by page.
fn api_log(server: &Server, job: u64, len: u64) -> (String, bool) {
    let (mut offset, mut text) = (0u64, String::new());
    loop {
        let r = get(
            &format!(
                "{}/api/jobs/{job}/log?offset={offset}&len={len}",
                server.url
            ),
            &[],
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        text.push_str(v["text"].as_str().unwrap());
        let next = v["next_offset"].as_u64().unwrap();
        if next == offset || next == v["log_len"].as_u64().unwrap() {
            return (text, v["ended"].as_bool().unwrap());
        }
        offset = next;
    }
}

fn job_id(build: &Value, name: &str) -> u64 {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("no job {name} in {build}"))["id"]
        .as_u64()
        .unwrap()
}

fn pipeline(flag: &Path) -> String {
    format!(
        "jobs:\n  first:\n    steps:\n      - name: colours\n        run: printf '\\033[31mred\\033[0m <b>&\\n'\n  \
         live:\n    depends_on: [first]\n    steps:\n      - name: wait\n        run: |\n          \
         for i in 1 2 3; do echo before-$i; done\n          {}\n          for i in 1 2 3; do echo after-$i; done\n  \
         big:\n    steps:\n      - name: lines\n        run: seq -f 'line %06g of a large log, padded to about sixty bytes....' 1 40000\n",
        wait_flag_sh(flag)
    )
}

/// The API, pages, SSE follower, badge and 404s on one farm.
#[test]
fn web_api_pages_and_live_log() {
    let tmp = tempdir();
    let flag = tmp.path().join("flag");
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline(&flag));
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r = server.runner(tmp.path(), "r1", MANY_SLOTS);
    let repo_path = repo.path.to_str().unwrap();

    // Submit over the JSON API.
    let body =
        serde_json::json!({ "repo": repo_path, "commit": sha, "branch": "main" }).to_string();
    let r = http(
        "POST",
        &format!("{}/api/builds", server.url),
        &["-H", "content-type: application/json", "--data", &body],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let b = r.json();
    let id = b["id"].as_u64().unwrap();
    let (live, first, big) = (job_id(&b, "live"), job_id(&b, "first"), job_id(&b, "big"));

    // The live job prints its first lines and waits: an SSE follower from 0 gets them while
    // the job is still running.
    wait_for("the live job's first lines", LONG, || {
        let v = get(&format!("{}/api/jobs/{live}/log", server.url), &[]).json();
        if v["text"].as_str().unwrap_or("").contains("before-3") {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let mut sse = follow(&server, live, 0);
    sse.wait_stdout(b"before-3", LONG);
    let job = get(&format!("{}/api/jobs/{live}", server.url), &[]).json();
    assert_eq!(job["state"], "running", "{job}");
    let page = get(&format!("{}/builds/{id}", server.url), &[]);
    assert!(
        page.body.contains(&format!(
            "<section class=\"job\" id=\"job-{live}\" data-job-name=\"live\" data-job-id=\"{live}\" data-state=\"running\""
        )),
        "{}",
        page.body
    );
    assert!(page.body.contains("<span id=\"build-state\""));
    std::fs::write(&flag, "go").unwrap();
    sse.wait_stdout(b"event: end", LONG);
    let followed = String::from_utf8(sse.stdout()).unwrap();
    let (parts, ended) = chunks(&followed);
    assert!(ended, "{followed}");
    let mut at = 0;
    for (from, next, _) in &parts {
        assert_eq!(*from, at, "a gap or a duplicate: {parts:?}");
        at = *next;
    }
    let streamed: String = parts.iter().map(|p| p.2.as_str()).collect();
    assert!(
        streamed.contains("before-1\nbefore-2\nbefore-3\n"),
        "{streamed}"
    );
    assert!(streamed.contains("after-3\n"), "{streamed}");

    let done = server.wait_final(id, LONG);
    assert_eq!(done["state"], "passed", "{done}");

    // Replay equals what `kiln logs` prints, read by offset in small pages or streamed.
    let printed = server.cli(&["logs", &id.to_string(), "--job", "live"]);
    printed.expect_code(0);
    let (replayed, ended) = api_log(&server, live, 64);
    assert!(ended);
    assert_eq!(replayed, printed.out());
    assert_eq!(streamed, printed.out());
    // Resuming from the middle gives exactly the rest.
    let (mid_from, mid_next, _) = parts[parts.len() / 2].clone();
    let mut resumed = follow(&server, live, mid_next);
    resumed.wait_stdout(b"event: end", LONG);
    let (rest, _) = chunks(&String::from_utf8(resumed.stdout()).unwrap());
    let rest: String = rest.iter().map(|p| p.2.as_str()).collect();
    let before: String = parts
        .iter()
        .take_while(|p| p.0 < mid_next && p.0 <= mid_from)
        .map(|p| p.2.as_str())
        .collect();
    assert_eq!(format!("{before}{rest}"), streamed);
    // A browser reconnecting says where it was in `Last-Event-ID`, which wins over the URL's.
    // (The first chunk came before the flag, so it is not the end.)
    let first_next = parts[0].1;
    assert!(first_next < at, "{parts:?}");
    let resumed_at = get(
        &format!("{}/jobs/{live}/log/events?offset=0", server.url),
        &["-H", &format!("Last-Event-ID: {first_next}")],
    );
    let (again, ended) = chunks(&resumed_at.body);
    assert!(ended);
    assert_eq!(
        again.first().map(|c| c.0),
        Some(first_next),
        "{}",
        resumed_at.body
    );
    let again: String = again.iter().map(|c| c.2.as_str()).collect();
    assert_eq!(format!("{}{again}", parts[0].2), streamed);
    let past = get(
        &format!("{}/api/jobs/{live}/log?offset=99999999", server.url),
        &[],
    );
    assert_eq!(past.status, 400, "{}", past.body);
    assert!(
        past.json()["error"]
            .as_str()
            .unwrap()
            .contains("past the end")
    );

    // The full download equals the replay; the page's log lines have anchors, colours
    // rendered and text escaped.
    let txt = get(&format!("{}/jobs/{live}/log.txt", server.url), &[]);
    assert_eq!(txt.status, 200);
    assert_eq!(txt.body, printed.out());
    let page = get(&format!("{}/builds/{id}", server.url), &[]).body;
    assert!(page.contains(&format!("<span class=\"line\" id=\"L{live}-1\"")));
    assert!(
        page.contains("<span id=\"build-state\" class=\"pill state-passed\" data-state=\"passed\"")
    );
    assert!(page.contains("<svg id=\"dag\""));
    assert!(page.contains("<button id=\"cancel\""));
    assert!(page.contains("<button id=\"retry\""));
    assert!(page.contains(&format!(
        "<form method=\"post\" action=\"/builds/{id}/cancel\""
    )));
    assert!(
        page.contains(&format!("data-from=\"{first}\" data-to=\"{live}\"")),
        "the DAG edge"
    );
    assert!(page.contains("&lt;b&gt;&amp;"), "output is escaped");
    assert!(
        page.contains("color:var(--red"),
        "ANSI colours are rendered"
    );

    // A large log: the page renders its tail only, numbered as in the full log; earlier parts
    // come by `before`.
    let full = get(&format!("{}/jobs/{big}/log.txt", server.url), &[]).body;
    let lines: Vec<&str> = full.lines().collect();
    assert!(full.len() > 2_000_000, "{}", full.len());
    assert!(
        page.len() < 1_000_000,
        "the page holds the whole log: {}",
        page.len()
    );
    let anchor = format!("id=\"L{big}-");
    let at = page.find(&anchor).unwrap();
    let rest = &page[at + anchor.len()..];
    let n: usize = rest[..rest.find('"').unwrap()].parse().unwrap();
    assert!(n > 1000, "the tail starts at line {n}");
    let text_at = rest.find('>').unwrap() + 1;
    let shown = &rest[text_at..text_at + rest[text_at..].find("</span>").unwrap()];
    assert_eq!(shown, lines[n - 1]);
    assert!(page.contains(&format!("id=\"L{big}-{}\"", lines.len())));
    let start: u64 = {
        let s = &page[page
            .find(&format!("data-job-id=\"{big}\" data-start=\""))
            .unwrap()..];
        let s = &s[s.find("data-start=\"").unwrap() + 12..];
        s[..s.find('"').unwrap()].parse().unwrap()
    };
    let earlier = get(
        &format!(
            "{}/api/jobs/{big}/log?before={start}&len=100000",
            server.url
        ),
        &[],
    )
    .json();
    let first_line = earlier["first_line"].as_u64().unwrap() as usize;
    let text = earlier["text"].as_str().unwrap();
    assert_eq!(earlier["next_offset"].as_u64().unwrap(), start);
    // It may start and end in the middle of a line (frames are not lines): the line it
    // starts in is `first_line`, the line it ends in the one before the tail's first anchor.
    assert!(full.contains(text));
    assert!(lines[first_line - 1].ends_with(text.lines().next().unwrap()));
    assert!(lines[n - 2].starts_with(text.lines().last().unwrap()));
    if !earlier["starts_mid_line"].as_bool().unwrap() {
        assert!(lines[first_line - 1].starts_with(text.lines().next().unwrap()));
    }

    // Lists and filters.
    let all = get(&format!("{}/api/builds", server.url), &[]).json();
    assert_eq!(all["builds"][0]["id"], id, "{all}");
    let q = |query: &str| {
        get(&format!("{}/api/builds?{query}", server.url), &[]).json()["builds"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(q(&format!("repo={}", enc(repo_path))), 1);
    assert_eq!(q("branch=main&state=passed"), 1);
    assert_eq!(q("branch=other"), 0);
    assert_eq!(q("state=failed"), 0);
    assert_eq!(
        get(&format!("{}/api/builds?state=bogus", server.url), &[]).status,
        400
    );
    let bad_limit = get(&format!("{}/api/builds?limit=many", server.url), &[]);
    assert_eq!(bad_limit.status, 400);
    assert!(
        bad_limit.json()["error"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
    let list = get(&format!("{}/", server.url), &[]).body;
    assert!(list.contains("<table id=\"builds\""));
    assert!(list.contains(&format!(
        "<tr data-build-id=\"{id}\" data-state=\"passed\">"
    )));
    let filtered = get(&format!("{}/?state=failed", server.url), &[]).body;
    let table = &filtered[filtered.find("<table id=\"builds\"").unwrap()..];
    assert!(!table.contains(&format!("<tr data-build-id=\"{id}\"")));
    assert!(filtered.contains(&format!(
        "<tr data-head-of=\"{id}\" data-state=\"passed\" data-repo=\""
    )));

    // Badge.
    let badge = get(
        &format!("{}/badge/{}/main.svg", server.url, enc(repo_path)),
        &[],
    );
    assert_eq!(badge.status, 200);
    assert_eq!(
        badge.header("content-type").as_deref(),
        Some("image/svg+xml")
    );
    assert_eq!(badge.header("cache-control").as_deref(), Some("no-cache"));
    assert!(badge.body.starts_with("<svg") && badge.body.contains("passed"));
    let unknown = get(&format!("{}/badge/nope/main.svg", server.url), &[]);
    assert!(unknown.body.contains("unknown"));

    // Runners, queue, tests page, the JUnit download still served.
    let runners = get(&format!("{}/runners", server.url), &[]).body;
    assert!(
        runners.contains("<tr data-runner=\"r1\" data-state=\"idle\">"),
        "{runners}"
    );
    assert!(runners.contains("<button class=\"drain\">"));
    assert!(runners.contains("<table id=\"queue\""));
    let api_runners = get(&format!("{}/api/runners", server.url), &[]).json();
    assert_eq!(api_runners["runners"][0]["name"], "r1");
    assert_eq!(
        get(&format!("{}/api/queue", server.url), &[]).json()["total"],
        0
    );
    assert_eq!(
        get(&format!("{}/builds/{id}/tests", server.url), &[]).status,
        200
    );
    assert_eq!(
        get(&format!("{}/api/builds/{id}/tests", server.url), &[]).status,
        200
    );
    assert_eq!(
        get(&format!("{}/builds/{id}/junit.xml", server.url), &[]).status,
        404
    );
    assert_eq!(get(&format!("{}/metrics", server.url), &[]).status, 200);

    // 404 and 400.
    for (path, status) in [
        ("/api/builds/999", 404),
        ("/api/builds/abc", 400),
        ("/api/builds/0", 400),
        ("/api/jobs/999", 404),
        ("/api/jobs/999/log", 404),
        ("/builds/999", 404),
        ("/builds/x", 400),
        ("/jobs/999/log.txt", 404),
        ("/no/such/page", 404),
    ] {
        let r = get(&format!("{}{path}", server.url), &[]);
        assert_eq!(r.status, status, "{path}: {}", r.body);
    }
    assert!(
        get(&format!("{}/api/builds/999", server.url), &[]).json()["error"]
            .as_str()
            .unwrap()
            .contains("999")
    );

    // Retry over the API; the pages link both ways.
    let retried = http(
        "POST",
        &format!("{}/api/builds/{id}/retry", server.url),
        &[],
    );
    assert_eq!(retried.status, 201, "{}", retried.body);
    let new = retried.json()["id"].as_u64().unwrap();
    let old_page = get(&format!("{}/builds/{id}", server.url), &[]).body;
    assert!(old_page.contains(&format!("href=\"/builds/{new}\"")));
    let new_page = get(&format!("{}/builds/{new}", server.url), &[]).body;
    assert!(new_page.contains(&format!("id=\"retry-of\" href=\"/builds/{id}\"")));
}

/// Writes need the token, closed reads need it for reads; the login form sets a cookie that
/// works for pages and the API; cross-site POSTs and forms without the CSRF token are refused.
#[test]
fn web_auth_login_and_csrf() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let server = Server::start(
        &tmp.path().join("data"),
        &["--api-token", "T0ken", "--closed-reads"],
    );
    let u = |p: &str| format!("{}{p}", server.url);
    let state = |id: u64| {
        get(
            &u(&format!("/api/builds/{id}")),
            &["-H", "authorization: Bearer T0ken"],
        )
        .json()["state"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(get(&u("/api/builds"), &[]).status, 401);
    assert_eq!(
        get(&u("/api/builds"), &["-H", "authorization: Bearer nope"]).status,
        403
    );
    assert_eq!(
        get(&u("/api/builds"), &["-H", "authorization: Bearer T0ken"]).status,
        200
    );
    assert_eq!(get(&u("/events"), &[]).status, 401);
    assert_eq!(get(&u("/badge/x/main.svg"), &[]).status, 401);
    let page = get(&u("/builds/1"), &[]);
    assert_eq!(page.status, 303);
    assert_eq!(
        page.header("location").as_deref(),
        Some("/login?next=%2Fbuilds%2F1")
    );
    let login = get(&u("/login"), &[]).body;
    assert!(login.contains("id=\"token\"") && login.contains("<button id=\"login\">"));

    // Submit with the token (no runner: the build stays queued).
    let body = serde_json::json!({ "repo": repo.path, "commit": sha }).to_string();
    let no_token = http(
        "POST",
        &u("/api/builds"),
        &["-H", "content-type: application/json", "--data", &body],
    );
    assert_eq!(no_token.status, 401, "{}", no_token.body);
    let r = http(
        "POST",
        &u("/api/builds"),
        &[
            "-H",
            "authorization: Bearer T0ken",
            "-H",
            "content-type: application/json",
            "--data",
            &body,
        ],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_u64().unwrap();
    let bad = http(
        "POST",
        &u("/api/builds"),
        &["-H", "authorization: Bearer T0ken", "--data", "{not json"],
    );
    assert_eq!(bad.status, 400);

    // A wrong token at the login form is refused; the right one sets the cookie.
    let jar = tmp.path().join("jar");
    let jar = jar.to_str().unwrap();
    let wrong = http(
        "POST",
        &u("/login"),
        &["-c", jar, "--data", "token=nope&next=/"],
    );
    assert_eq!(wrong.status, 403);
    let ok = http(
        "POST",
        &u("/login"),
        &[
            "-c",
            jar,
            "--data",
            &format!("token=T0ken&next=/builds/{id}"),
        ],
    );
    assert_eq!(ok.status, 303, "{}", ok.body);
    assert_eq!(ok.header("location"), Some(format!("/builds/{id}")));
    let cookie = ok.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("T0ken"),
        "the cookie is not the token: {cookie}"
    );
    let page = get(&u(&format!("/builds/{id}")), &["-b", jar, "-c", jar]);
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("data-state=\"queued\""));
    assert_eq!(get(&u("/api/builds"), &["-b", jar]).status, 200);
    let csrf = {
        let s = &page.body[page.body.find("name=\"csrf\" value=\"").unwrap() + 19..];
        s[..s.find('"').unwrap()].to_string()
    };

    // Cross-site and token-less POSTs are refused, whatever the cookie.
    let cancel = u(&format!("/builds/{id}/cancel"));
    let form = format!("csrf={csrf}");
    let cross = http(
        "POST",
        &cancel,
        &[
            "-b",
            jar,
            "-H",
            "Origin: http://evil.example",
            "--data",
            &form,
        ],
    );
    assert_eq!(cross.status, 403);
    let fetch_meta = http(
        "POST",
        &u(&format!("/api/builds/{id}/cancel")),
        &["-b", jar, "-H", "Sec-Fetch-Site: cross-site"],
    );
    assert_eq!(fetch_meta.status, 403);
    assert_eq!(
        http("POST", &cancel, &["-b", jar, "--data", "csrf=0000"]).status,
        403
    );
    assert_eq!(state(id), "queued");
    // The same form from this site with its token cancels.
    let origin = format!("Origin: {}", server.url);
    let done = http(
        "POST",
        &cancel,
        &["-b", jar, "-H", &origin, "--data", &form],
    );
    assert_eq!(done.status, 303, "{}", done.body);
    assert_eq!(state(id), "cancelled");
    // Without the session cookie, the form goes to the login page.
    let csrf_only = format!("kiln_csrf={csrf}");
    let anon = http(
        "POST",
        &u(&format!("/builds/{id}/retry")),
        &["-b", &csrf_only, "--data", &form],
    );
    assert_eq!(anon.status, 303);
    assert!(anon.header("location").unwrap().starts_with("/login"));
}

/// A split step's tests page: failures first with their text, the timeline with one box per
/// batch the store recorded; the JUnit download linked.
#[test]
fn web_tests_page_of_a_split() {
    let tmp = tempdir();
    let repo = Repo::init(&tmp.path().join("repo"));
    let mut files: Vec<(String, String)> = (0..4)
        .map(|f| {
            (
                format!("tests/test_m{f}.py"),
                format!("def test_ok_{f}():\n    assert True\n"),
            )
        })
        .collect();
    files.push((
        "tests/test_bad.py".into(),
        "def test_broken():\n    assert 1 + 1 == 3, 'arithmetic is broken'\n".into(),
    ));
    let mut all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_bytes()))
        .collect();
    let pipeline = "steps:\n  - name: tests\n    run: python3 -m pytest -q -p no:cacheprovider --junitxml={junit} {units}\n    parallel: 2\n    units:\n      glob: tests/test_*.py\n      max_batch: 1\n";
    all.push((".kiln.yml", pipeline.as_bytes()));
    let sha = repo.commit(&all, "suite");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, Duration::from_secs(180));
    assert_eq!(b["state"], "failed", "{b}");

    let api = get(&format!("{}/api/builds/{id}/tests", server.url), &[]).json();
    let batches = api["batches"].as_array().unwrap();
    let units: usize = batches
        .iter()
        .map(|b| b["units"].as_array().unwrap().len())
        .sum();
    assert_eq!(units, 5, "{api}");
    assert!(batches.iter().all(|b| b["ended_at"].is_i64()), "{api}");
    let page = get(&format!("{}/builds/{id}/tests", server.url), &[]);
    assert_eq!(page.status, 200);
    let html = page.body;
    let failure = html
        .find("<div class=\"failure\" data-test=\"test_bad.test_broken\"")
        .or_else(|| html.find("<div class=\"failure\" data-test=\"tests.test_bad.test_broken\""))
        .unwrap_or_else(|| panic!("no failure div: {html}"));
    let div = &html[failure..failure + html[failure..].find("</div>").unwrap()];
    assert!(div.contains("arithmetic is broken"), "{div}");
    assert!(div.contains("assert"), "the body too: {div}");
    let timeline = &html[html.find("<svg id=\"timeline\"").unwrap()..];
    let timeline = &timeline[..timeline.find("</svg>").unwrap()];
    assert_eq!(
        timeline.matches("<rect class=\"batch").count(),
        batches.len(),
        "{timeline}"
    );
    assert!(html.contains(&format!("href=\"/builds/{id}/junit.xml\"")));
    assert_eq!(
        get(&format!("{}/builds/{id}/junit.xml", server.url), &[]).status,
        200
    );

    // The failed unit's history across builds: fixed in the next commit, broken again in the
    // one after; the third build's page shows all three verdicts, newest first.
    let fixed = "def test_broken():\n    assert 1 + 1 == 2\n";
    let sha2 = repo.commit(&[("tests/test_bad.py", fixed.as_bytes())], "fix");
    let id2 = id_of(&server.submit(&repo.path, &sha2));
    assert_eq!(
        server.wait_final(id2, Duration::from_secs(180))["state"],
        "passed"
    );
    let sha3 = repo.commit(&all, "break it again");
    let id3 = id_of(&server.submit(&repo.path, &sha3));
    assert_eq!(
        server.wait_final(id3, Duration::from_secs(180))["state"],
        "failed"
    );
    let html = get(&format!("{}/builds/{id3}/tests", server.url), &[]).body;
    let at = html
        .find("<p class=\"history\" data-unit=\"tests/test_bad.py\">")
        .unwrap_or_else(|| panic!("no history of the failed unit: {html}"));
    let history = &html[at..at + html[at..].find("</p>").unwrap()];
    let cells: Vec<&str> = history
        .split("<a class=\"cell ")
        .skip(1)
        .map(|c| &c[..c.find('"').unwrap()])
        .collect();
    assert_eq!(
        cells,
        ["v-failed current", "v-passed", "v-failed"],
        "{history}"
    );
    for b in [id3, id2, id] {
        assert!(
            history.contains(&format!("href=\"/builds/{b}/tests\"")),
            "{history}"
        );
    }
    assert!(
        history.contains("in all: flaky 0 times, failed 2 times"),
        "{history}"
    );
    let api = get(&format!("{}/api/builds/{id3}/tests", server.url), &[]).json();
    let past = &api["history"][0];
    assert_eq!(past["split"], "tests", "{api}");
    assert_eq!(past["past"]["unit"], "tests/test_bad.py", "{api}");
    assert_eq!(
        past["past"]["recent"],
        serde_json::json!([[id3, "failed"], [id2, "passed"], [id, "failed"]]),
        "{api}"
    );
    // A build's page shows its past, not what came after it.
    let first = get(&format!("{}/builds/{id}/tests", server.url), &[]).body;
    assert!(
        first.contains(&format!("title=\"#{id}: failed\"")) && !first.contains(&format!("#{id3}:")),
        "{first}"
    );
}

/// The "new build" form submits and redirects to the build; `/events` tells of it; a runner
/// is drained from its page's button.
#[test]
fn web_new_build_form_events_and_drain() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let mut events = {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-N"]).arg(format!("{}/events", server.url));
        Proc::spawn("curl sse events", cmd)
    };
    // Subscribed: nothing after this is missed.
    events.wait_stdout(b"event: ready", LONG);
    let jar = tmp.path().join("jar");
    let jar = jar.to_str().unwrap();
    let form = get(&format!("{}/new", server.url), &["-c", jar]).body;
    let csrf = {
        let s = &form[form.find("name=\"csrf\" value=\"").unwrap() + 19..];
        s[..s.find('"').unwrap()].to_string()
    };
    let data = format!(
        "csrf={csrf}&repo={}&commit={sha}&branch=main",
        enc(repo.path.to_str().unwrap())
    );
    let r = http(
        "POST",
        &format!("{}/new", server.url),
        &["-b", jar, "--data", &data],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    let location = r.header("location").unwrap();
    let id: u64 = location.strip_prefix("/builds/").unwrap().parse().unwrap();
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");
    events.wait_stdout(
        format!("\"build_id\":{id},\"job_id\":null,\"state\":\"passed\"").as_bytes(),
        LONG,
    );
    // A bad repository is the form again with the error.
    let bad = format!("csrf={csrf}&repo=%2Fno%2Fsuch%2Frepo&commit=HEAD");
    let r = http(
        "POST",
        &format!("{}/new", server.url),
        &["-b", jar, "--data", &bad],
    );
    assert!(r.status >= 400, "{}", r.body);
    assert!(r.body.contains("id=\"error\""), "{}", r.body);

    // Drain.
    let runners = get(&format!("{}/runners", server.url), &["-b", jar]).body;
    assert!(
        runners.contains("action=\"/runners/r1/drain\""),
        "{runners}"
    );
    let r = http(
        "POST",
        &format!("{}/runners/r1/drain", server.url),
        &["-b", jar, "--data", &format!("csrf={csrf}")],
    );
    assert_eq!(r.status, 303, "{}", r.body);
    wait_for("r1 to drain", LONG, || {
        let v = get(&format!("{}/api/runners", server.url), &[]).json();
        match v["runners"][0]["state"].as_str() {
            Some("draining" | "offline") => Ok(()),
            _ => Err(v.to_string()),
        }
    });
    let missing = http(
        "POST",
        &format!("{}/api/runners/nobody/drain", server.url),
        &[],
    );
    assert_eq!(missing.status, 404, "{}", missing.body);
}

/// Whether `html` holds `text` HTML-escaped (named or numeric character references).
fn shows_escaped(html: &str, text: &str) -> bool {
    let with =
        |amp: &str, lt: &str, gt: &str| text.replace('&', amp).replace('<', lt).replace('>', gt);
    html.contains(&with("&amp;", "&lt;", "&gt;")) || html.contains(&with("&#38;", "&#60;", "&#62;"))
}

/// Build parameters through the web: the new-build form's environment field (NAME=VALUE
/// lines, comments and blank lines ignored) builds with them over the pipeline's `env`; the
/// build page and `/api/builds/N` show them, escaped; a malformed line shows the form again
/// with the error and what was typed, and makes no build; the JSON API takes `"env"` and
/// refuses a KILN_ name with a 400 naming it.
#[test]
fn web_build_with_parameters() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "env:\n  GREETING: from-file\nsteps:\n  - name: s\n    run: echo \"greeting=$GREETING extra=$EXTRA\"\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let api = |path: &str| get(&format!("{}{path}", server.url), &[]).json();
    let jar = tmp.path().join("jar");
    let jar = jar.to_str().unwrap();
    let form = get(&format!("{}/new", server.url), &["-c", jar]).body;
    assert!(form.contains("<textarea name=\"env\""), "{form}");
    let csrf = {
        let s = &form[form.find("name=\"csrf\" value=\"").unwrap() + 19..];
        s[..s.find('"').unwrap()].to_string()
    };
    let post = |env: &str| {
        let data = format!(
            "csrf={csrf}&repo={}&commit={sha}&branch=main&env={}",
            enc(repo.path.to_str().unwrap()),
            enc(env)
        );
        http(
            "POST",
            &format!("{}/new", server.url),
            &["-b", jar, "--data", &data],
        )
    };

    // A malformed line: the form again, with the error and what was typed; no build.
    let typed = "GREETING=<i>x</i>\r\nnot a line\r\n";
    let r = post(typed);
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("id=\"error\""), "{}", r.body);
    assert!(r.body.contains("line 2"), "{}", r.body);
    assert!(
        shows_escaped(&r.body, "GREETING=<i>x</i>") && !r.body.contains("<i>x</i>"),
        "what was typed is shown again, escaped: {}",
        r.body
    );
    assert_eq!(api("/api/builds")["builds"].as_array().unwrap().len(), 0);

    // Comments and blank lines ignored; the parameters win over the file's env.
    let r = post("# what to greet\r\nGREETING=from-form\r\n\r\nEXTRA=<b>&amp;\r\n");
    assert_eq!(r.status, 303, "{}", r.body);
    let id: u64 = r
        .header("location")
        .unwrap()
        .strip_prefix("/builds/")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");
    let log = server.cli(&["logs", &format!("{id}/s")]).out();
    assert!(log.contains("greeting=from-form extra=<b>&amp;"), "{log}");
    let b = api(&format!("/api/builds/{id}"));
    assert_eq!(
        b["env"],
        serde_json::json!({"GREETING": "from-form", "EXTRA": "<b>&amp;"}),
        "{b}"
    );
    let page = get(&format!("{}/builds/{id}", server.url), &[]).body;
    assert!(page.contains("id=\"build-env\""), "{page}");
    assert!(
        shows_escaped(&page, "<b>&amp;") && !page.contains("<b>&amp;"),
        "the page shows the value escaped: {page}"
    );

    // The JSON API.
    let body = serde_json::json!({
        "repo": repo.path_str(), "commit": sha, "branch": "main",
        "env": {"GREETING": "from-api"},
    })
    .to_string();
    let r = http(
        "POST",
        &format!("{}/api/builds", server.url),
        &["-H", "content-type: application/json", "--data", &body],
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let b = r.json();
    assert_eq!(b["env"], serde_json::json!({"GREETING": "from-api"}), "{b}");
    let aid = b["id"].as_u64().unwrap();
    assert_eq!(server.wait_final(aid, LONG)["state"], "passed");
    let log = server.cli(&["logs", &format!("{aid}/s")]).out();
    assert!(log.contains("greeting=from-api extra="), "{log}");
    let bad = serde_json::json!({
        "repo": repo.path_str(), "commit": sha, "env": {"KILN_BRANCH": "x"},
    })
    .to_string();
    let r = http(
        "POST",
        &format!("{}/api/builds", server.url),
        &["-H", "content-type: application/json", "--data", &bad],
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("KILN_BRANCH"),
        "{}",
        r.body
    );
    assert_eq!(api("/api/builds")["builds"].as_array().unwrap().len(), 2);
}

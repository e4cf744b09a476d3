//! End to end: a real dispatcher, real runners and real git repositories; live output,
//! pass/fail exit codes, work spread over runners, byte-exact logs, cancel, retry, timeouts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kiln::proto;
use kiln_testkit::*;

/// A step's output reaches `kiln logs -f` while the step is still running, and the follower
/// exits with the build's status: 0 for a pass, 1 for a failure. `show` and `builds` agree.
#[test]
fn live_output_and_exit_codes() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    // `printf` so the banner line echoing the command does not contain the text we wait for.
    let pipeline = format!(
        "steps:\n  - name: live\n    run: |\n      printf 'first-%s\\n' line\n      {}\n      printf 'second-%s\\n' line\n",
        wait_flag_sh(&flag)
    );
    let (repo, pass_sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let fail_sha = repo.commit(
        &[(
            ".kiln.yml",
            b"steps:\n  - name: broken\n    run: printf 'fail-%s\\n' here; exit 3\n",
        )],
        "broken",
    );

    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);

    let out = server.cli(&[
        "--json",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        &pass_sha,
        "--branch",
        "main",
    ]);
    out.expect_code(0);
    let submitted = out.json();
    let id = id_of(&submitted);
    assert_eq!(submitted["commit"], pass_sha.as_str());
    assert_eq!(submitted["branch"], "main");
    assert_eq!(submitted["repo"], repo.path_str());

    let mut follower = server.spawn_cli("kiln logs -f (pass)", &["logs", "-f", &id.to_string()]);
    follower.wait_stdout(b"first-line\n", LONG);
    // The step is blocked on the flag: the line came live, before the step ended.
    assert!(!flag.exists());
    assert!(
        !contains(&follower.stdout(), b"second-line"),
        "{:?}",
        String::from_utf8_lossy(&follower.stdout())
    );
    assert!(
        follower.try_status().is_none(),
        "the follower exited before the step ended"
    );
    let running = server.show(id);
    assert_eq!(running["state"], "running", "{running}");
    assert_eq!(
        server.cli(&["show", &id.to_string()]).code(),
        8,
        "show of a running build"
    );

    std::fs::write(&flag, b"").unwrap();
    let out = follower.wait(LONG);
    out.expect_code(0);
    let first = find(&out.stdout, b"first-line\n").unwrap();
    let second = find(&out.stdout, b"second-line\n").expect("second-line in the follower's output");
    assert!(first < second, "{out}");

    let shown = server.show(id);
    assert_eq!(shown["state"], "passed", "{shown}");
    let job = &shown["jobs"][0];
    assert_eq!(job["state"], "passed", "{shown}");
    assert!(
        ["r1", "r2"].contains(&job["runner"].as_str().unwrap()),
        "{shown}"
    );
    assert_eq!(job["attempts"], 1, "{shown}");
    assert_eq!(job["steps"][0]["outcome"], "passed", "{shown}");
    assert_eq!(job["steps"][0]["exit_code"], 0, "{shown}");
    assert!(shown["finished_at"].as_i64().is_some(), "{shown}");
    server.cli(&["show", &id.to_string()]).expect_code(0);

    // The failing commit: the follower exits 1.
    let fail = id_of(&server.submit(&repo.path, &fail_sha));
    let mut follower = server.spawn_cli("kiln logs -f (fail)", &["logs", "-f", &fail.to_string()]);
    let out = follower.wait(LONG);
    out.expect_code(1);
    assert!(contains(&out.stdout, b"fail-here\n"), "{out}");
    let shown = server.show(fail);
    assert_eq!(shown["state"], "failed", "{shown}");
    assert_eq!(shown["jobs"][0]["steps"][0]["exit_code"], 3, "{shown}");
    server.cli(&["show", &fail.to_string()]).expect_code(1);

    // `builds` agrees with `show`, newest first.
    let out = server.cli(&["--json", "builds"]);
    out.expect_code(0);
    let list = out.json();
    let builds = list["builds"].as_array().unwrap();
    let ids: Vec<u64> = builds.iter().map(id_of).collect();
    assert_eq!(ids, vec![fail, id], "{list}");
    for b in builds {
        let shown = server.show(id_of(b));
        assert_eq!(b["state"], shown["state"], "builds: {b}\nshow: {shown}");
        assert_eq!(b["commit"], shown["commit"]);
    }
    // And the state filter.
    let out = server.cli(&["--json", "builds", "--state", "failed"]);
    let only: Vec<u64> = out.json()["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(id_of)
        .collect();
    assert_eq!(only, vec![fail], "{out}");
}

/// With six builds queued whose steps block, both runners get work at the same time.
#[test]
fn queued_builds_spread_over_both_runners() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      {}\n",
        wait_flag_sh(&flag)
    );
    let (repo, _) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    // Six builds (six commits of the same pipeline) queued before any runner is there.
    let ids: Vec<u64> = (0..6)
        .map(|i| id_of(&server.submit(&repo.path, &repo.new_commit(&format!("b{i}")))))
        .collect();
    for &id in &ids {
        assert_eq!(server.show(id)["state"], "queued");
    }
    // Two single-slot runners: each takes one; four stay queued.
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    wait_for("both runners to be busy", LONG, || {
        let out = server.cli(&["--json", "runners"]);
        let v = out.json();
        let runners = v["runners"].as_array().unwrap();
        for r in runners {
            let n = r["running_jobs"].as_array().unwrap().len();
            assert!(n <= 1, "a runner runs more jobs than its one slot: {v}");
        }
        let busy = runners.iter().filter(|r| r["state"] == "busy").count();
        if busy == 2 {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    let states: Vec<String> = ids
        .iter()
        .map(|&id| server.show(id)["state"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        states.iter().filter(|s| *s == "queued").count(),
        4,
        "{states:?}"
    );

    std::fs::write(&flag, b"").unwrap();
    let mut used = BTreeMap::new();
    for id in &ids {
        let b = server.wait_final(*id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        *used
            .entry(b["jobs"][0]["runner"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(
        used.keys().collect::<Vec<_>>(),
        ["r1", "r2"],
        "both runners ran builds: {used:?}"
    );
    assert_eq!(used.values().sum::<u32>(), 6);
    let out = server.cli(&["--json", "builds"]);
    for b in out.json()["builds"].as_array().unwrap() {
        assert_eq!(b["state"], "passed", "{b}");
    }
}

/// Output that is not UTF-8 is kept byte for byte: through `StreamLogs` and `kiln logs`.
#[test]
fn non_utf8_output_is_byte_exact() {
    let tmp = tempdir();
    let pipeline = "steps:\n  - name: bytes\n    run: |\n      printf '\\377\\376\\000abc\\n'\n      printf '\\375err\\200\\n' >&2\n";
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let job = b["jobs"][0]["id"].as_u64().unwrap();

    let api = Api::connect(&server.url);
    let chunks = api.logs(job);
    assert_eq!(
        stream_bytes(&chunks, proto::OutputStream::Stdout),
        b"\xff\xfe\x00abc\n",
        "{chunks:?}"
    );
    assert_eq!(
        stream_bytes(&chunks, proto::OutputStream::Stderr),
        b"\xfderr\x80\n",
        "{chunks:?}"
    );
    assert!(
        contains(
            &stream_bytes(&chunks, proto::OutputStream::System),
            b"kiln: step bytes"
        ),
        "{chunks:?}"
    );
    let last = chunks.last().unwrap();
    assert_eq!(
        last.final_state,
        proto::JobState::Passed as i32,
        "{chunks:?}"
    );

    // Offsets: resuming from any `next_offset` gives the rest of the log.
    let mid = &chunks[chunks.len() / 2];
    let mut c = api.builds();
    let rest: Vec<proto::LogChunk> = api.rt.block_on(async {
        let mut s = c
            .stream_logs(proto::StreamLogsRequest {
                job_id: job,
                build_id: 0,
                offset: mid.next_offset,
                follow: false,
            })
            .await
            .unwrap()
            .into_inner();
        let mut v = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            v.push(m);
        }
        v
    });
    let start = chunks.len() / 2 + 1;
    let expect: Vec<&[u8]> = chunks[start..].iter().map(|c| c.data.as_ref()).collect();
    let got: Vec<&[u8]> = rest.iter().map(|c| c.data.as_ref()).collect();
    assert_eq!(got, expect);

    // `kiln logs`: everything on stdout, in the order the log holds it (as it was produced),
    // so `kiln logs N | grep` sees the job's stderr too.
    let all: Vec<u8> = chunks.iter().flat_map(|c| c.data.to_vec()).collect();
    let out = server.cli(&["logs", &id.to_string()]);
    out.expect_code(0);
    assert_eq!(out.stdout, all, "{out}");
    assert!(contains(&out.stdout, b"\xfderr\x80\n"), "{out}");
    assert!(out.stderr.is_empty(), "{out}");

    // `--separate-stderr`: the job's stderr on kiln's stderr, the rest on stdout.
    let out = server.cli(&["logs", "--separate-stderr", &id.to_string()]);
    out.expect_code(0);
    assert!(
        contains(&out.stdout, b"\xff\xfe\x00abc\n"),
        "{:?}",
        out.stdout
    );
    assert_eq!(out.stderr, b"\xfderr\x80\n", "{out}");
    assert!(
        !contains(&out.stdout, b"\xfderr"),
        "stderr bytes went to stdout"
    );
}

/// A silent `sleep 300` is cancelled with `kiln cancel`: the build ends `cancelled` quickly,
/// the step's process is gone, `kiln logs -f` exits 3; a running build cannot be retried.
#[test]
fn cancel_a_running_build() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: nap\n    run: sleep 300\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let runner = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let sleeping = wait_for("the step's sleep to start", LONG, || {
        let d = descendants(runner.pid());
        let s: Vec<i32> = d
            .into_iter()
            .filter(|&p| comm_of(p).as_deref() == Some("sleep"))
            .collect();
        if s.is_empty() {
            Err("no sleep under the runner".into())
        } else {
            Ok(s)
        }
    });
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);

    // Retrying a build that has not finished is refused as invalid (FAILED_PRECONDITION).
    let out = server.cli(&["retry", &id.to_string()]);
    out.expect_code(5);
    assert!(out.err().contains("retried"), "{out}");

    let started = Instant::now();
    server.cli(&["cancel", &id.to_string()]).expect_code(0);
    let b = server.wait_final(id, Duration::from_secs(30));
    assert_eq!(b["state"], "cancelled", "{b}");
    assert_eq!(b["jobs"][0]["state"], "cancelled", "{b}");
    assert!(started.elapsed() < Duration::from_secs(30));
    let out = follower.wait(Duration::from_secs(30));
    out.expect_code(3);
    server.cli(&["show", &id.to_string()]).expect_code(3);
    wait_for(
        "the cancelled step's process to be gone",
        Duration::from_secs(30),
        || {
            let alive: Vec<i32> = sleeping
                .iter()
                .copied()
                .filter(|&p| comm_of(p).as_deref() == Some("sleep"))
                .collect();
            if alive.is_empty() {
                Ok(())
            } else {
                Err(format!("still alive: {alive:?}"))
            }
        },
    );
    // Cancelling again is harmless and changes nothing.
    server.cli(&["cancel", &id.to_string()]).expect_code(0);
    assert_eq!(server.show(id)["state"], "cancelled");
}

/// `kiln retry` of a finished build makes a new build of the same commit, which passes.
#[test]
fn retry_makes_a_new_passing_build() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: ok\n    run: echo \"build $KILN_BUILD_ID\"\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");

    let out = server.cli(&["--json", "retry", &id.to_string()]);
    out.expect_code(0);
    let retry = out.json();
    let new = id_of(&retry);
    assert_ne!(new, id);
    assert_eq!(retry["retry_of"], id, "{retry}");
    assert_eq!(retry["commit"], sha.as_str(), "{retry}");
    let b = server.wait_final(new, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(b["retry_of"], id, "{b}");
    let logs = server.cli(&["logs", &new.to_string()]);
    assert!(logs.out().contains(&format!("build {new}\n")), "{logs}");
    // The original is untouched.
    assert_eq!(server.show(id)["state"], "passed");
    // Retrying a build that does not exist: not found.
    server.cli(&["retry", "999"]).expect_code(4);
}

/// A step with `timeout: 1s` running `sleep 30` ends `timed_out`, long before 30 s.
#[test]
fn step_timeout_ends_timed_out() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: slow\n    timeout: 1s\n    run: sleep 30\n  - name: after\n    run: echo never\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let started = Instant::now();
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, Duration::from_secs(25));
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(b["state"], "timed_out", "{b}");
    let job = &b["jobs"][0];
    assert_eq!(job["state"], "timed_out", "{b}");
    assert!(
        job["message"].as_str().unwrap().contains("timed out"),
        "{b}"
    );
    assert_eq!(job["steps"][0]["outcome"], "timed_out", "{b}");
    assert_eq!(job["steps"][1]["outcome"], "skipped", "{b}");
    server.cli(&["show", &id.to_string()]).expect_code(3);
    let logs = server.cli(&["logs", &id.to_string()]);
    assert!(!logs.out().contains("never\n"), "{logs}");
}

/// Steps get kiln's environment (build, job, commit, branch, step) and the pipeline's `env`
/// (the step's own wins); steps run in order in the checkout, and a failing step skips the rest.
#[test]
fn steps_get_environment_and_run_in_order() {
    let tmp = tempdir();
    let pipeline = "env: {GREETING: file, SHARED: file}\nsteps:\n  - name: one\n    env: {GREETING: step}\n    run: |\n      echo \"ci=$CI build=$KILN_BUILD_ID job=$KILN_JOB_ID branch=$KILN_BRANCH step=$KILN_STEP\"\n      echo \"commit=$KILN_COMMIT\"\n      echo \"greeting=$GREETING shared=$SHARED\"\n      cat marker.txt\n      echo made-by-one > produced.txt\n  - name: two\n    run: cat produced.txt; exit 4\n  - name: three\n    run: echo not-reached\n";
    let (repo, _) = Repo::with_pipeline(&tmp.path().join("repo"), pipeline);
    let sha = repo.commit(&[("marker.txt", b"in-the-checkout\n")], "marker");
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let out = server.cli(&[
        "--json",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        &sha,
        "--branch",
        "feature/x",
    ]);
    out.expect_code(0);
    let b = out.json();
    let id = id_of(&b);
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "failed", "{b}");
    let job = &b["jobs"][0];
    assert_eq!(job["name"], "pipeline", "{b}");
    let outcomes: Vec<&str> = job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(outcomes, ["passed", "failed", "skipped"], "{b}");
    assert_eq!(job["steps"][1]["exit_code"], 4, "{b}");
    let logs = server.cli(&["logs", &format!("{id}/pipeline")]);
    logs.expect_code(1);
    let text = logs.out();
    let job_id = job["id"].as_u64().unwrap();
    assert!(
        text.contains(&format!(
            "ci=true build={id} job={job_id} branch=feature/x step=one\n"
        )),
        "{logs}"
    );
    assert!(text.contains(&format!("commit={sha}\n")), "{logs}");
    assert!(text.contains("greeting=step shared=file\n"), "{logs}");
    assert!(text.contains("in-the-checkout\n"), "{logs}");
    assert!(
        text.contains("made-by-one\n"),
        "steps share the checkout: {logs}"
    );
    assert!(!text.contains("not-reached"), "{logs}");
    let one = text.find("made-by-one").unwrap();
    let env = text.find("greeting=").unwrap();
    assert!(env < one);
}

/// Without `.kiln.yml`, Python unittest files give a `unittest` step; a repository with
/// neither a pipeline nor anything detectable makes an errored build saying so.
#[test]
fn default_pipeline_detection() {
    let tmp = tempdir();
    let repo = Repo::init(&tmp.path().join("repo"));
    let test = b"import unittest\n\nclass T(unittest.TestCase):\n    def test_ok(self):\n        print('python-ran')\n        self.assertEqual(1 + 1, 2)\n";
    let sha = repo.commit(&[("tests/test_x.py", test.as_slice())], "tests");
    let empty = Repo::init(&tmp.path().join("empty"));
    let nothing = empty.commit(&[("README", b"nothing to build\n".as_slice())], "readme");

    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let b = server.submit(&repo.path, &sha);
    assert_eq!(b["jobs"][0]["name"], "unittest", "{b}");
    assert_eq!(
        b["jobs"][0]["steps"][0]["run"], "python3 -m unittest discover -s tests",
        "{b}"
    );
    let b = server.wait_final(id_of(&b), LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let logs = server.cli(&["logs", &id_of(&b).to_string()]);
    assert!(logs.out().contains("python-ran"), "{logs}");

    let b = server.submit(&empty.path, &nothing);
    assert_eq!(b["state"], "errored", "{b}");
    assert!(b["error"].as_str().unwrap().contains(".kiln.yml"), "{b}");
    assert!(b["jobs"].as_array().unwrap().is_empty(), "{b}");
}

/// `ListBuilds` pages newest first without gaps or repeats, and filters by repo and branch.
#[test]
fn list_builds_pages_and_filters() {
    let tmp = tempdir();
    let (repo, _) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let (other, _) = Repo::with_pipeline(
        &tmp.path().join("other"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let mut ids = Vec::new();
    for i in 0..7 {
        let r = if i % 3 == 2 { &other } else { &repo };
        let s = r.new_commit(&format!("b{i}"));
        let b = api
            .submit(proto::SubmitBuildRequest {
                repo: r.path_str().into(),
                commit: s,
                branch: if i % 2 == 0 {
                    "main".into()
                } else {
                    "dev".into()
                },
                trigger: "test".into(),
                env: Default::default(),
            })
            .unwrap();
        ids.push(b.id);
    }
    let mut c = api.builds();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = api
            .rt
            .block_on(c.list_builds(proto::ListBuildsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            }))
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.builds.len() <= 3);
        seen.extend(page.builds.iter().map(|b| b.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 10, "paging does not end");
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);
    assert_eq!(pages, 3);

    let only = |repo: &str, branch: &str| -> Vec<u64> {
        api.rt
            .block_on(c.clone().list_builds(proto::ListBuildsRequest {
                repo: repo.into(),
                branch: branch.into(),
                ..Default::default()
            }))
            .unwrap()
            .into_inner()
            .builds
            .iter()
            .map(|b| b.id)
            .collect()
    };
    let want: Vec<u64> = newest_first
        .iter()
        .copied()
        .filter(|id| (id - ids[0]) % 3 == 2)
        .collect();
    assert_eq!(only(other.path_str(), ""), want);
    let want: Vec<u64> = newest_first
        .iter()
        .copied()
        .filter(|id| (id - ids[0]) % 2 == 1 && (id - ids[0]) % 3 != 2)
        .collect();
    assert_eq!(only(repo.path_str(), "dev"), want);
    // The CLI's --repo takes a path as typed (made absolute).
    let out = server.cli(&[
        "--json",
        "builds",
        "--repo",
        other.path_str(),
        "--limit",
        "1",
    ]);
    let v = out.json();
    assert_eq!(v["builds"].as_array().unwrap().len(), 1, "{v}");
    assert!(!v["next_page_token"].as_str().unwrap().is_empty(), "{v}");
}

/// `kiln show 1 --json | head -c 100` and the like: every command whose output's reader has
/// gone ends at once and quietly (status 141, as a shell reports for `cat` killed by SIGPIPE),
/// never with a panic. The pipe's reader is closed before kiln starts, so its first write fails.
#[test]
fn every_command_ends_quietly_on_a_closed_pipe() {
    let tmp = tempdir();
    let pipeline =
        "steps:\n  - name: talk\n    run: |\n      printf 'out\\n'\n      printf 'err\\n' >&2\n";
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let id = id.to_string();
    let fresh = repo.new_commit("fresh");
    let commands: Vec<Vec<&str>> = vec![
        vec!["show", &id, "--json"],
        vec!["show", &id],
        vec!["builds"],
        vec!["--json", "builds"],
        vec!["logs", &id],
        vec!["logs", "-f", &id],
        vec!["tests", &id],
        vec!["runners"],
        vec!["submit", "--repo", repo.path_str(), "--commit", &fresh],
    ];
    for args in commands {
        let mut all = vec!["--dispatcher", server.url.as_str()];
        all.extend_from_slice(&args);
        let name = format!("kiln {} | (closed)", args.join(" "));
        let out = Proc::kiln_closed_stdout(name.clone(), &all).wait(LONG);
        assert_eq!(out.status.code(), Some(141), "{name}: {out}");
        assert!(
            !out.err().contains("panicked") && !out.err().contains("Broken pipe"),
            "{name}: {out}"
        );
    }
}

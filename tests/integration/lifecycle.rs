//! The life of builds and runners beyond the happy path: new commits after the first build,
//! detached commits, large output, labels, cancelling queued builds, following logs from the
//! queue, watching state changes, draining runners, and a runner riding through a dispatcher
//! restart.

use std::time::Duration;

use kiln::proto;
use kiln_testkit::*;
use nix::sys::signal::Signal;

/// Commits made after the repository was first mirrored (by the dispatcher and the runner)
/// are fetched: each build runs its own commit's pipeline.
#[test]
fn later_commits_are_fetched() {
    let tmp = tempdir();
    let (repo, first) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: v\n    run: cat version.txt\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    // The first commit has no version.txt: fails.
    let id = id_of(&server.submit(&repo.path, &first));
    assert_eq!(server.wait_final(id, LONG)["state"], "failed");
    for n in 1..=3 {
        let text = format!("version-{n}\n");
        let sha = repo.commit(&[("version.txt", text.as_bytes())], &format!("v{n}"));
        let b = server.submit(&repo.path, &sha[..9]);
        assert_eq!(b["commit"], sha.as_str(), "{b}");
        let id = id_of(&b);
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        let logs = server.cli(&["logs", &format!("{id}/v")]);
        logs.expect_code(0);
        assert!(logs.out().contains(&text), "{logs}");
    }
    // A pipeline change is picked up too.
    let sha = repo.commit(
        &[(
            ".kiln.yml",
            b"steps:\n  - name: other\n    run: echo changed-pipeline\n",
        )],
        "p2",
    );
    let b = server.submit(&repo.path, &sha);
    assert_eq!(b["jobs"][0]["name"], "other", "{b}");
    let b = server.wait_final(id_of(&b), LONG);
    assert_eq!(b["state"], "passed", "{b}");
}

/// `kiln submit --repo PATH` without `--commit` builds the local repository's HEAD; that works
/// when HEAD is detached too (a commit made on a detached HEAD, as during a rebase or bisect),
/// since the commit exists in the repository.
#[test]
fn submit_of_a_detached_head_builds() {
    let tmp = tempdir();
    let (repo, base) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: v\n    run: cat version.txt\n",
    );
    let r = git2::Repository::open(&repo.path).unwrap();
    r.set_head_detached(git2::Oid::from_str(&base).unwrap())
        .unwrap();
    let detached = repo.commit(&[("version.txt", b"detached\n")], "on a detached HEAD");
    assert!(r.head_detached().unwrap());
    assert_eq!(r.head().unwrap().target().unwrap().to_string(), detached);

    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let out = server.cli(&["--json", "submit", "--repo", repo.path_str()]);
    out.expect_code(0);
    let b = out.json();
    assert_eq!(b["commit"], detached.as_str(), "{b}");
    let id = id_of(&b);
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let logs = server.cli(&["logs", &id.to_string()]);
    assert!(logs.out().contains("detached\n"), "{logs}");
}

/// `kiln submit --repo PATH` without `--commit` builds the local HEAD (on a branch).
#[test]
fn submit_without_commit_builds_head() {
    let tmp = tempdir();
    let (repo, _first) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: v\n    run: cat version.txt\n",
    );
    let head = repo.commit(&[("version.txt", b"head\n")], "head");
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let out = server.cli(&["--json", "submit", "--repo", repo.path_str(), "-f"]);
    out.expect_code(0);
    // With -f, the build's JSON comes first, then the output.
    let first_line = out.out().lines().next().unwrap().to_string();
    let b: serde_json::Value = serde_json::from_str(&first_line).unwrap();
    assert_eq!(b["commit"], head.as_str(), "{b}");
    assert!(out.out().contains("head\n"), "{out}");
}

/// Several MiB of output arrive complete and in order.
#[test]
fn large_output_is_complete() {
    let tmp = tempdir();
    // 200 000 numbered lines (about 2.3 MB) on stdout, a few on stderr.
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: big\n    run: |\n      seq 1 200000 | sed 's/^/line-/'\n      seq 1 100 >&2\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let mut follower = server.spawn_cli(
        "kiln logs -f",
        &["logs", "-f", "--separate-stderr", &id.to_string()],
    );
    let followed = follower.wait(LONG);
    followed.expect_code(0);
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");

    let expected: Vec<u8> = (1..=200_000)
        .flat_map(|i| format!("line-{i}\n").into_bytes())
        .collect();
    let api = Api::connect(&server.url);
    let chunks = api.logs(b["jobs"][0]["id"].as_u64().unwrap());
    let stdout = stream_bytes(&chunks, proto::OutputStream::Stdout);
    assert_eq!(stdout.len(), expected.len());
    assert!(
        stdout == expected,
        "stdout differs from what the step printed"
    );
    let stderr: Vec<u8> = (1..=100)
        .flat_map(|i| format!("{i}\n").into_bytes())
        .collect();
    assert_eq!(stream_bytes(&chunks, proto::OutputStream::Stderr), stderr);
    // next_offset grows strictly, chunk after chunk.
    for w in chunks.windows(2) {
        assert!(w[1].next_offset >= w[0].next_offset);
    }
    // The live follower saw the same bytes (stdout: system lines plus the step's stdout).
    assert!(
        contains(&followed.stdout, &expected),
        "the follower missed output"
    );
    assert_eq!(followed.stderr, stderr);

    // Once the job has ended its log is compressed at rest (seekable zstd) and reads the same
    // (every offset: kiln-store's sealed_logs_read_the_same_from_any_offset).
    let job = b["jobs"][0]["id"].as_u64().unwrap();
    let sealed = tmp.path().join("data/logs").join(format!("{job}.log.zst"));
    let plain = tmp.path().join("data/logs").join(format!("{job}.log"));
    wait_for("the log to be sealed", LONG, || {
        if sealed.exists() && !plain.exists() {
            Ok(())
        } else {
            Err(format!(
                "sealed {}, plain {}",
                sealed.exists(),
                plain.exists()
            ))
        }
    });
    let size = std::fs::metadata(&sealed).unwrap().len();
    assert!(size * 5 < expected.len() as u64, "{size} bytes on disk");
    let again = api.logs(job);
    assert_eq!(again, chunks, "a sealed log reads the same");
}

/// A job needing labels waits for a runner offering them.
#[test]
fn labels_route_jobs() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: gpu\n    labels: {gpu: \"yes\"}\n    run: echo on-gpu\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _plain = server.runner(tmp.path(), "plain", &["--label", "gpu=no"]);
    server.wait_runners_attached(&["plain"]);
    let b = server.submit(&repo.path, &sha);
    let id = id_of(&b);
    assert_eq!(b["jobs"][0]["labels"]["gpu"], "yes", "{b}");
    // Give the scheduler every chance to misplace it: a later unlabelled build runs on `plain`
    // while the labelled one stays queued.
    let (repo2, sha2) = Repo::with_pipeline(
        &tmp.path().join("repo2"),
        "steps:\n  - name: any\n    run: echo any\n",
    );
    let other = id_of(&server.submit(&repo2.path, &sha2));
    let ob = server.wait_final(other, LONG);
    assert_eq!(ob["state"], "passed", "{ob}");
    assert_eq!(ob["jobs"][0]["runner"], "plain", "{ob}");
    let b = server.show(id);
    assert_eq!(b["state"], "queued", "{b}");
    assert_eq!(b["jobs"][0]["runner"], "", "{b}");

    let _gpu = server.runner(
        tmp.path(),
        "gpu",
        &["--label", "gpu=yes", "--label", "os=linux"],
    );
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(b["jobs"][0]["runner"], "gpu", "{b}");
}

/// Cancelling a queued build (no runner at all) ends it at once; its follower exits 3.
#[test]
fn cancel_a_queued_build() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);
    // The follower waits: the build is queued.
    let out = server.cli(&["--json", "cancel", &id.to_string()]);
    out.expect_code(0);
    let b = out.json();
    assert_eq!(
        b["state"], "cancelled",
        "cancel of a queued build answers its final state: {b}"
    );
    assert_eq!(b["jobs"][0]["state"], "cancelled", "{b}");
    follower.wait(Duration::from_secs(30)).expect_code(3);
    // A runner attaching later does not run it.
    let _r = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let retry = id_of(&server.cli(&["--json", "retry", &id.to_string()]).json());
    assert_eq!(server.wait_final(retry, LONG)["state"], "passed");
    let b = server.show(id);
    assert_eq!(b["state"], "cancelled", "{b}");
    assert_eq!(b["jobs"][0]["attempts"], 0, "{b}");
}

/// `kiln logs -f` started while the build is queued follows it through to the end.
#[test]
fn follow_from_the_queue() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: printf 'hello-%s\\n' world\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);
    let _r = server.runner(tmp.path(), "r1", &[]);
    let out = follower.wait(LONG);
    out.expect_code(0);
    assert!(contains(&out.stdout, b"hello-world\n"), "{out}");
    // `submit -f` does the same in one command.
    let sha = repo.new_commit("again");
    let out = server.cli(&["submit", "--repo", repo.path_str(), "--commit", &sha, "-f"]);
    out.expect_code(0);
    assert!(contains(&out.stdout, b"hello-world\n"), "{out}");
}

/// `WatchBuilds` reports the states a build goes through, in order.
#[test]
fn watch_builds_reports_state_changes() {
    let tmp = tempdir();
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo hi\n",
    );
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);
    let mut c = api.builds();
    let mut stream = api
        .rt
        .block_on(c.watch_builds(proto::WatchBuildsRequest { build_id: 0 }))
        .unwrap()
        .into_inner();
    let id = id_of(&server.submit(&repo.path, &sha));
    let _r = server.runner(tmp.path(), "r1", &[]);
    let mut build_states = Vec::new();
    let mut job_states = Vec::new();
    api.rt.block_on(async {
        loop {
            let ev = tokio::time::timeout(LONG, stream.message())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no event; build states so far {build_states:?}, job states {job_states:?}"
                    )
                })
                .unwrap()
                .expect("the watch ended");
            assert_eq!(ev.build_id, id, "{ev:?}");
            let state = proto::JobState::try_from(ev.state).unwrap();
            if ev.job_id == 0 {
                build_states.push(state);
                if state == proto::JobState::Passed {
                    break;
                }
            } else {
                job_states.push(state);
            }
        }
    });
    use proto::JobState::*;
    assert_eq!(build_states.first(), Some(&Queued), "{build_states:?}");
    assert_eq!(build_states.last(), Some(&Passed), "{build_states:?}");
    assert_eq!(job_states.first(), Some(&Queued), "{job_states:?}");
    assert_eq!(job_states.last(), Some(&Passed), "{job_states:?}");
    assert!(job_states.contains(&Running), "{job_states:?}");
}

/// SIGTERM drains a runner: it finishes its job and exits 0; meanwhile a build submitted
/// while it drains is not lost (it stays queued, then runs on another runner).
#[test]
fn sigterm_drains_a_runner() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      {}\n      echo drained-ok\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let (repo2, quick) = Repo::with_pipeline(
        &tmp.path().join("repo2"),
        "steps:\n  - name: q\n    run: echo quick\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let mut runner = server.runner(tmp.path(), "r1", &["--slots", "2"]);
    let first = id_of(&server.submit(&repo.path, &sha));
    server.wait_build(first, "running", LONG, |b| b["state"] == "running");
    runner.signal(Signal::SIGTERM);
    wait_for("the runner to start draining", LONG, || {
        if contains(&runner.stderr(), b"draining") {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&runner.stderr()).into_owned())
        }
    });
    // The runner has a free slot but drains: new builds must not run there, nor be lost.
    let second = id_of(&server.submit(&repo2.path, &quick));
    let third = id_of(&server.submit(&repo2.path, &repo2.new_commit("third")));
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(first, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let out = runner.wait(LONG);
    assert_eq!(out.status.code(), Some(0), "{out}");
    for id in [second, third] {
        let b = server.show(id);
        assert_eq!(
            b["state"], "queued",
            "a build submitted while the only runner drained: {b}"
        );
    }
    // Another runner takes them.
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    for id in [second, third] {
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
        assert_eq!(b["jobs"][0]["runner"], "r2", "{b}");
    }
}

/// `kiln runners drain NAME`: the runner shows as draining, gets no new work, finishes its
/// job and exits 0.
#[test]
fn admin_drain_of_a_runner() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      {}\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let mut runner = server.runner(tmp.path(), "r1", &["--slots", "2"]);
    let first = id_of(&server.submit(&repo.path, &sha));
    server.wait_build(first, "running", LONG, |b| b["state"] == "running");
    let out = server.cli(&["runners", "drain", "r1"]);
    out.expect_code(0);
    assert!(out.out().contains("r1"), "{out}");
    let v = server.cli(&["--json", "runners"]).json();
    assert_eq!(v["runners"][0]["state"], "draining", "{v}");
    let second = id_of(&server.submit(&repo.path, &repo.new_commit("second")));
    std::fs::write(&flag, b"").unwrap();
    assert_eq!(server.wait_final(first, LONG)["state"], "passed");
    runner.wait(LONG).expect_code(0);
    let b = server.show(second);
    assert_eq!(b["state"], "queued", "{b}");
    assert_eq!(b["jobs"][0]["attempts"], 0, "{b}");
    server.cli(&["runners", "drain", "nobody"]).expect_code(4);
    // r1 is known but no longer attached.
    server.cli(&["runners", "drain", "r1"]).expect_code(5);
}

/// The dispatcher restarts (SIGTERM, same port) while a step runs: the runner keeps running
/// it, reconnects, and the job finishes as its first attempt with all its output.
#[test]
fn runner_rides_through_a_dispatcher_restart() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      printf 'before-%s\\n' restart\n      {}\n      printf 'after-%s\\n' restart\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let mut server = Server::start(&data, &["--heartbeat-interval", "300ms"]);
    let addr = server.addr.clone();
    let _runner = server.runner(tmp.path(), "r1", &[]);
    let id = id_of(&server.submit(&repo.path, &sha));
    wait_for("the step's first line", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]);
        if out.out().contains("before-restart\n") {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
    server.proc.signal(Signal::SIGTERM);
    server.proc.wait(LONG).expect_code(0);
    drop(server);

    // Same address, so the runner finds it again.
    let server = wait_for(
        "the dispatcher to listen on its old port again",
        LONG,
        || {
            let mut p = Proc::kiln(
                "kiln serve (restarted)",
                &[
                    "serve",
                    "--listen",
                    &addr,
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--heartbeat-interval",
                    "300ms",
                ],
            );
            let out_so_far = loop {
                if contains(&p.stdout(), b"\n") {
                    break None;
                }
                if let Some(_status) = p.try_status() {
                    break Some(String::from_utf8_lossy(&p.stderr()).into_owned());
                }
                std::thread::sleep(POLL);
            };
            match out_so_far {
                None => Ok(p),
                Some(err) => Err(err),
            }
        },
    );
    let url = format!("http://{addr}");
    let cli = |args: &[&str]| {
        let mut all = vec!["--dispatcher", url.as_str()];
        all.extend_from_slice(args);
        kiln(&all)
    };
    wait_for("the runner to re-attach", LONG, || {
        let v = cli(&["--json", "runners"]).json();
        if v["runners"][0]["state"] == "busy" {
            Ok(())
        } else {
            Err(v.to_string())
        }
    });
    std::fs::write(&flag, b"").unwrap();
    let b = wait_for("the build to pass", LONG, || {
        let v = cli(&["--json", "show", &id.to_string()]).json();
        if v["state"] == "passed" || v["state"] == "failed" || v["state"] == "errored" {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    });
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(b["jobs"][0]["attempts"], 1, "{b}");
    let logs = cli(&["logs", &id.to_string()]);
    let text = logs.out();
    assert_eq!(text.matches("before-restart\n").count(), 1, "{logs}");
    assert_eq!(text.matches("after-restart\n").count(), 1, "{logs}");
    drop(server);
}

/// Two runner processes started with the same name: the farm still runs every build (the
/// dispatcher knows a runner by its name; the second session replaces the first).
#[test]
fn two_runners_with_one_name_do_not_lose_builds() {
    let tmp = tempdir();
    let (repo, _) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: s\n    run: echo same\n",
    );
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "300ms"]);
    let w1 = tmp.path().join("w1");
    let w2 = tmp.path().join("w2");
    let _a = server.spawn_cli(
        "runner twin a",
        &[
            "runner",
            "--name",
            "twin",
            "--work-dir",
            w1.to_str().unwrap(),
        ],
    );
    let _b = server.spawn_cli(
        "runner twin b",
        &[
            "runner",
            "--name",
            "twin",
            "--work-dir",
            w2.to_str().unwrap(),
        ],
    );
    server.wait_runners_attached(&["twin"]);
    let ids: Vec<u64> = (0..4)
        .map(|i| id_of(&server.submit(&repo.path, &repo.new_commit(&format!("b{i}")))))
        .collect();
    for id in ids {
        let b = server.wait_final(id, LONG);
        assert_eq!(b["state"], "passed", "{b}");
    }
}

/// A second runner process taking a name that an attached, heartbeating runner already uses
/// is refused, instead of the two replacing each other's session over and over.
#[test]
fn duplicate_runner_name_is_refused_not_flapping() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "300ms"]);
    let w1 = tmp.path().join("w1");
    let w2 = tmp.path().join("w2");
    let _a = server.spawn_cli(
        "runner twin a",
        &[
            "runner",
            "--name",
            "twin",
            "--work-dir",
            w1.to_str().unwrap(),
        ],
    );
    server.wait_runners_attached(&["twin"]);
    let mut b = server.spawn_cli(
        "runner twin b",
        &[
            "runner",
            "--name",
            "twin",
            "--work-dir",
            w2.to_str().unwrap(),
        ],
    );
    let attaches = |p: &Proc| {
        String::from_utf8_lossy(&p.stderr())
            .matches("runner attached")
            .count()
    };
    let outcome = wait_for(
        "the duplicate runner to be refused (or the sessions to churn)",
        LONG,
        || {
            if let Some(status) = b.try_status() {
                return Ok(format!("refused: {status}"));
            }
            let n = attaches(&server.proc);
            if n >= 30 {
                return Ok(format!("churn: {n} attaches"));
            }
            Err(format!("{n} attaches so far"))
        },
    );
    assert!(outcome.starts_with("refused"), "{outcome}");
    let out = b.wait(LONG);
    assert!(out.err().contains("twin"), "{out}");
}

/// A backlog of quick builds on one single-slot runner: every build passes. (The runner must
/// have its slot free by the time the dispatcher, having recorded the previous result, offers
/// it the next job; a hand-back must not count as a lost attempt.)
#[test]
fn backlog_on_one_slot_runner_all_pass() {
    let tmp = tempdir();
    let repo = Repo::init(&tmp.path().join("repo"));
    // Many files make the checkout's removal take a while, widening the window.
    let files: Vec<(String, Vec<u8>)> = (0..400)
        .map(|i| (format!("src/f{i}.txt"), vec![b'x'; 2000]))
        .collect();
    let mut all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    all.push((
        ".kiln.yml",
        b"steps:\n  - name: quick\n    run: echo quick\n",
    ));
    repo.commit(&all, "many files");
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let ids: Vec<u64> = (0..12)
        .map(|i| id_of(&server.submit(&repo.path, &repo.new_commit(&format!("b{i}")))))
        .collect();
    let _r = server.runner(tmp.path(), "r1", &["--slots", "1"]);
    let mut failures = Vec::new();
    for id in ids {
        let b = server.wait_final(id, LONG);
        if b["state"] != "passed" {
            failures.push(b);
        }
    }
    assert!(
        failures.is_empty(),
        "{} builds did not pass: {failures:#?}",
        failures.len()
    );
}

/// `kiln submit --commit` takes any revision a user types (HEAD, HEAD~2, a tag, a short id, a
/// branch): resolved in the repository for a local path, with the branch defaulting to the one
/// it is on, and in the dispatcher's mirror for a URL.
#[test]
fn submit_takes_revisions_as_typed() {
    let tmp = tempdir();
    let (repo, first) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: v\n    run: cat version.txt\n",
    );
    let second = repo.commit(&[("version.txt", b"2\n")], "two");
    let third = repo.commit(&[("version.txt", b"3\n")], "three");
    let git = git2::Repository::open(&repo.path).unwrap();
    let branch = git.head().unwrap().shorthand().unwrap().to_string();
    let tagged = git
        .find_object(git2::Oid::from_str(&second).unwrap(), None)
        .unwrap();
    git.tag_lightweight("v2", &tagged, false).unwrap();
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    for (rev, want) in [
        ("HEAD", third.as_str()),
        ("HEAD~2", first.as_str()),
        ("v2", second.as_str()),
    ] {
        let out = server.cli(&[
            "--json",
            "submit",
            "--repo",
            repo.path_str(),
            "--commit",
            rev,
        ]);
        out.expect_code(0);
        let b = out.json();
        assert_eq!(b["commit"], want, "{rev}: {b}");
        assert_eq!(b["branch"], branch.as_str(), "{rev}: {b}");
    }
    // An explicit --branch wins.
    let fourth = repo.new_commit("four");
    let out = server.cli(&[
        "--json",
        "submit",
        "--repo",
        repo.path_str(),
        "--commit",
        &fourth[..8],
        "--branch",
        "release/9",
    ]);
    out.expect_code(0);
    assert_eq!(out.json()["commit"], fourth.as_str());
    assert_eq!(out.json()["branch"], "release/9");

    // A URL: the dispatcher resolves the branch name in its mirror, fetched first.
    let fifth = repo.new_commit("five");
    let url = format!("file://{}", repo.path_str());
    let out = server.cli(&["--json", "submit", "--repo", &url, "--commit", &branch]);
    out.expect_code(0);
    assert_eq!(out.json()["commit"], fifth.as_str(), "{out}");
    assert_eq!(out.json()["branch"], branch.as_str(), "{out}");

    // What names nothing, or is not a revision, is refused with the reason.
    let out = server.cli(&["submit", "--repo", repo.path_str(), "--commit", "nope"]);
    out.expect_code(4);
    assert!(out.err().contains("revision nope not found"), "{out}");
    let out = server.cli(&["submit", "--repo", &url, "--commit", "nope"]);
    out.expect_code(4);
    assert!(out.err().contains("revision nope not found"), "{out}");
    let out = server.cli(&["submit", "--repo", &url, "--commit=-x"]);
    out.expect_code(5);
    assert!(out.err().contains("invalid revision"), "{out}");
}

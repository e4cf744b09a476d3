//! A network partition, end to end: a runner in its own network namespace, joined to the host
//! by a veth pair, loses its link in the middle of a job. The dispatcher declares it lost and a
//! runner on the host finishes the job; when the link comes back, the old runner's late report
//! is refused by fencing and the job keeps its result.
//!
//! A chaos run does the same to several builds: the island's link is cut in the middle of a
//! step until the dispatcher declares the attempt lost, kept cut a random while longer, then
//! restored, three times; every build must end passed with one result and its result attempt's
//! log whole, once.
//!
//! Needs root (network namespaces). Skipped, with a message, when namespaces cannot be created,
//! except when `CI=true` and running as root, where that is a failure.

use std::time::{Duration, Instant};

use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;

fn namespace_or_skip() -> Option<Netns> {
    match Netns::create() {
        Ok(ns) => Some(ns),
        Err(e) => {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            // Effective uid, from /proc (the second number of the `Uid:` line).
            let root = std::fs::read_to_string("/proc/self/status")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                == Some("0");
            if ci && root {
                panic!("CI=true and running as root, but a network namespace cannot be made: {e}");
            }
            eprintln!(
                "SKIPPED partition test: cannot create a network namespace ({e}); it needs root \
                 and the `ip` tool"
            );
            None
        }
    }
}

/// `kiln runner --name island` inside the namespace, its work dir under `tmp`.
fn island_runner(ns: &Netns, server: &Server, tmp: &std::path::Path, extra: &[&str]) -> Proc {
    let island_work = tmp.join("work-island");
    let mut cmd = ns.command(kiln_bin());
    cmd.args([
        "--dispatcher",
        &server.url,
        "runner",
        "--name",
        "island",
        "--work-dir",
        island_work.to_str().unwrap(),
    ])
    .args(extra)
    .env_remove("KILN_DISPATCHER")
    .env_remove("KILN_LOG");
    Proc::spawn("kiln runner island (in the namespace)", cmd)
}

#[test]
fn partitioned_runners_late_result_is_refused() {
    let Some(ns) = namespace_or_skip() else {
        return;
    };
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      echo \"attempt $KILN_ATTEMPT_ID starts\"\n      {}\n      echo \"attempt $KILN_ATTEMPT_ID done\"\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    // The dispatcher listens on the host side of the veth pair only.
    let server = start_dispatcher(
        &format!("{}:0", ns.host_ip),
        &tmp.path().join("data"),
        SHORT_HEARTBEATS,
    );

    // The island runner, inside the namespace, is the only runner when the job is submitted.
    let island = island_runner(&ns, &server, tmp.path(), &[]);
    server.wait_runners_attached(&["island"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running on island", LONG, |b| {
        b["state"] == "running" && job0(b)["runner"] == "island"
    });
    let first = job0(&b)["attempt_id"].as_u64().unwrap();
    wait_for("the island's attempt to print", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]).out();
        if out.contains(&format!("attempt {first} starts\n")) {
            Ok(())
        } else {
            Err(out)
        }
    });
    let _mainland = server.runner(tmp.path(), "mainland", &[]);
    server.wait_runners_attached(&["mainland"]);

    // The partition.
    ns.set_link(false);
    let b = server.wait_build(id, "the job to move to mainland", LONG, |b| {
        job0(b)["runner"] == "mainland" && job0(b)["attempts"] == 2
    });
    let job = job0(&b);
    assert_eq!(job["lost_attempts"], 1, "{b}");
    let second = job["attempt_id"].as_u64().unwrap();
    assert_ne!(second, first);
    let states = runner_states(&server.url, &[]).unwrap();
    assert!(
        states.contains(&("island".to_string(), "offline".to_string())),
        "{states:?}"
    );
    wait_for("mainland's attempt to print", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]).out();
        if out.contains(&format!("attempt {second} starts\n")) {
            Ok(())
        } else {
            Err(out)
        }
    });
    // Both attempts see the flag: the island finishes its copy too, cut off.
    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");

    // The link comes back: the island reconnects with its finished attempt and is refused.
    ns.set_link(true);
    let b = server.wait_build(id, "the island's late result to be refused", LONG, |b| {
        !job0(b)["refusals"].as_array().unwrap().is_empty()
    });
    let job = job0(&b);
    assert_eq!(b["state"], "passed", "{b}");
    assert_eq!(job["state"], "passed", "{b}");
    assert_eq!(job["attempts"], 2, "{b}");
    assert_eq!(job["attempt_id"], second, "{b}");
    assert_eq!(job["runner"], "mainland", "{b}");
    let refusals = job["refusals"].to_string();
    eprintln!("refusals: {refusals}");
    assert!(refusals.contains(&first.to_string()), "{b}");
    // The island is usable again.
    server.wait_runners_attached(&["island"]);
    let text = server.cli(&["logs", &id.to_string()]).out();
    assert!(text.contains(&format!("attempt {second} done\n")), "{text}");
    assert!(
        !text.contains(&format!("attempt {first} done\n")),
        "the refused attempt's output was stored: {text}"
    );
    let segments = attempt_segments(&text);
    let last = segments.last().unwrap();
    assert_eq!(
        (last.attempt, last.runner.as_str()),
        (2, "mainland"),
        "{text}"
    );
    drop(island);
}

/// Twenty builds of a 3 s step on the island and two mainland runners (one slot each). Three
/// times, a seeded moment into one of the island's steps (of a job never lost before), the
/// island's link is cut; it stays cut until the dispatcher has declared the attempt lost (the
/// island shows offline) and the job runs again on the mainland, and a random while longer,
/// then comes back. Each time the job ends on the mainland, and the island, back, has its claim
/// on the superseded attempt refused (whether its step ended while cut, a late result, or still
/// ran, dropped) and takes work again. The pass rule is the chaos run's (`tests/faults.rs`): every build passed,
/// each attempt's lines a prefix once each, the result attempt's log whole once, one finished
/// attempt per job, no refusal of a current attempt, each runner runs one more build at the
/// same time as the others (none kept a dropped attempt's slot), every runner drains and exits
/// 0, no step process left. `KILN_CHAOS_SEED=N` replays the same moments.
#[test]
fn chaos_link_cuts_past_the_lease_refuse_the_late_claims() {
    const BUILDS: usize = 20;
    const LINES: u32 = 60;
    const CUTS: usize = 3;
    let Some(ns) = namespace_or_skip() else {
        return;
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let tmp = tempdir();
    let marker = format!("KILN_PARTITION_{}", std::process::id());
    let _reaper = MarkerReaper(marker.clone());
    let (mut rng, seed) = Rng::from_env_or_clock();
    eprintln!("chaos seed {seed} (replay the same cuts with KILN_CHAOS_SEED={seed})");

    let (repo, commits) = counting_repo(&tmp.path().join("repo"), &marker, LINES, BUILDS);
    let data = tmp.path().join("data");
    let server = start_dispatcher(&format!("{}:0", ns.host_ip), &data, SHORT_HEARTBEATS);
    let one = ["--slots", "1"];
    let mut runners = vec![
        island_runner(&ns, &server, tmp.path(), &one),
        server.runner(tmp.path(), "m1", &one),
        server.runner(tmp.path(), "m2", &one),
    ];
    server.wait_runners_attached(&["island", "m1", "m2"]);
    let ids: Vec<u64> = commits
        .iter()
        .map(|c| id_of(&server.submit(&repo.path, c)))
        .collect();

    let mut cuts = Vec::new();
    let mut cut_attempts = Vec::new();
    let mut ran_on = 0;
    for _ in 0..CUTS {
        let (job, attempt) = wait_for("the island to run a job never lost", LONG, || {
            fresh_running_attempts(&data, "island", 0)
                .first()
                .copied()
                .ok_or_else(|| "none".to_string())
        });
        // A random moment into the step (the fault's timing, not a wait for a condition).
        std::thread::sleep(rng.millis(100, 1000));
        let cut = Instant::now();
        ns.set_link(false);
        wait_for(
            &format!("the dispatcher to declare the island's attempt {attempt} lost"),
            LONG,
            || match attempt_state(&data, attempt).as_str() {
                "lost" => Ok(()),
                s => Err(s.to_string()),
            },
        );
        let lost_after = cut.elapsed();
        let step_running = !attempt_processes(&marker, attempt as u64).is_empty();
        let states = runner_states(&server.url, &[]).unwrap();
        assert!(
            states.contains(&("island".to_string(), "offline".to_string())),
            "{states:?}"
        );
        // Still cut while the job runs again on the mainland, and a random while more.
        wait_for(
            &format!("job {job} to run again on the mainland"),
            LONG,
            || {
                let db = open_db(&data);
                let again = int_rows(
                    &db,
                    &format!(
                        "SELECT COUNT(*) FROM jobs j JOIN attempts a ON a.id = j.current_attempt \
                         WHERE j.id = {job} AND a.id <> {attempt} AND a.state = 'running'"
                    ),
                )[0][0];
                if again == 1 {
                    Ok(())
                } else {
                    Err("not yet".to_string())
                }
            },
        );
        let elsewhere = cut.elapsed();
        std::thread::sleep(rng.millis(0, 1500));
        ns.set_link(true);
        let restored = cut.elapsed();
        wait_attached(&server.url, &[], "island");
        if step_running {
            ran_on += 1;
        }
        cut_attempts.push(attempt);
        cuts.push(format!(
            "job {job} attempt {attempt}: lost {lost_after:?} after the cut (its step {}), running \
             elsewhere after {elsewhere:?}, link back after {restored:?}, island attached after {:?}",
            if step_running {
                "still running"
            } else {
                "ended"
            },
            cut.elapsed()
        ));
    }
    eprintln!("cuts:\n  {}", cuts.join("\n  "));
    assert!(
        ran_on > 0,
        "no cut lost the lease while the island's step still ran: {cuts:#?}"
    );

    let remaining = deadline.saturating_duration_since(Instant::now());
    wait_builds_final(&server, BUILDS, remaining);
    let mut problems = Vec::new();
    let mut tally = Tally::default();
    check_builds(&server, &ids, "count", LINES, &mut tally, &mut problems);
    every_runner_takes_work(
        &server,
        &repo,
        &["island", "m1", "m2"],
        &marker,
        &mut problems,
    );
    // Each cut attempt's claim was refused once the island was back (a refusal is recorded
    // when it re-attaches holding it, or when its late result arrives).
    let db = open_db(&data);
    for &a in &cut_attempts {
        let n = int_rows(
            &db,
            &format!("SELECT COUNT(*) FROM refusals WHERE attempt_id = {a}"),
        )[0][0];
        if n == 0 {
            problems.push(format!("the island's cut attempt {a} was never refused"));
        }
    }
    drop(db);
    let stayed: Vec<i64> = cut_attempts
        .iter()
        .copied()
        .filter(|&a| {
            let db = open_db(&data);
            let runner: String = db
                .query_row(
                    "SELECT r.name FROM jobs j JOIN attempts a ON a.id = j.current_attempt \
                     JOIN runners r ON r.id = a.runner_id \
                     WHERE j.id = (SELECT job_id FROM attempts WHERE id = ?1)",
                    [a],
                    |r| r.get(0),
                )
                .unwrap();
            runner == "island"
        })
        .collect();
    if !stayed.is_empty() {
        problems.push(format!(
            "the jobs of the island's cut attempts {stayed:?} did not end on the mainland"
        ));
    }

    for r in &mut runners {
        r.signal(Signal::SIGTERM);
    }
    for r in &mut runners {
        let out = r.wait(Duration::from_secs(30));
        if out.status.code() != Some(0) {
            problems.push(format!(
                "{} did not drain and exit 0: {}",
                r.name, out.status
            ));
        }
    }
    let mut server = server;
    server.proc.signal(Signal::SIGTERM);
    let out = server.proc.wait(Duration::from_secs(30));
    if out.status.code() != Some(0) {
        problems.push(format!("the dispatcher did not exit 0 on SIGTERM: {out}"));
    }
    check_attempt_rows(&data, &mut tally, &mut problems);
    let left = wait_for_none(&marker);
    if !left.is_empty() {
        problems.push(format!("step processes left behind: {left:?}"));
    }
    eprintln!(
        "partition chaos: {BUILDS} builds; {CUTS} link cuts past the lease ({ran_on} with the \
         step still running when lost); {} attempts, {} lost, {} refusals, {:?} in all",
        tally.attempts,
        tally.lost,
        tally.refusals,
        started.elapsed()
    );
    assert!(problems.is_empty(), "seed {seed}: {problems:#?}");
}

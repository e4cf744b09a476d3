//! A network partition, end to end: a runner in its own network namespace, joined to the host
//! by a veth pair, loses its link in the middle of a job. The dispatcher declares it lost and a
//! runner on the host finishes the job; when the link comes back, the old runner's late report
//! is refused by fencing and the job keeps its result.
//!
//! Needs root (network namespaces). Skipped, with a message, when namespaces cannot be created,
//! except when `CI=true` and running as root, where that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod fault_support;

use common::*;
use fault_support::*;

/// Lost after about a second of silence.
const SHORT_HEARTBEATS: &[&str] = &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];

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
    let island_work = tmp.path().join("work-island");
    let mut cmd = ns.command(KILN);
    cmd.args([
        "--dispatcher",
        &server.url,
        "runner",
        "--name",
        "island",
        "--work-dir",
        island_work.to_str().unwrap(),
    ])
    .env_remove("KILN_DISPATCHER")
    .env_remove("KILN_LOG");
    let island = Proc::spawn("kiln runner island (in the namespace)", cmd);
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

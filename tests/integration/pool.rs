//! `kiln pool`, the runner manager, as a real process: queued work grows the pool to its
//! `--max`, an idle farm shrinks back to `--min` by draining idle runners, no job is lost or
//! run twice, and SIGTERM drains what is left.

use kiln_testkit::*;
use nix::sys::signal::Signal;

/// The pool's runners the dispatcher lists as attached (idle, busy or draining).
fn attached(server: &Server) -> Result<Vec<(String, String)>, String> {
    let out = server.cli(&["--json", "runners"]);
    if out.code() != 0 {
        return Err(out.to_string());
    }
    Ok(out.json()["runners"]
        .as_array()
        .ok_or("no runners")?
        .iter()
        .filter(|r| r["name"].as_str().is_some_and(|n| n.starts_with("pool-")))
        .filter(|r| r["state"] != "offline")
        .map(|r| {
            (
                r["name"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

#[test]
fn a_pool_grows_with_the_queue_and_shrinks_when_idle_losing_nothing() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let mut pool = Proc::kiln(
        "kiln pool",
        &[
            "pool",
            "--dispatcher",
            &server.url,
            "--min",
            "1",
            "--max",
            "4",
            "--label",
            "os=linux",
            "--prefix",
            "pool",
            "--interval",
            "200ms",
            "--idle-timeout",
            "500ms",
            "--work-dir",
            tmp.path().join("pool").to_str().unwrap(),
        ],
    );
    pool.wait_stdout(b"kiln pool: 1 to 4 runners (os=linux)", LONG);
    wait_for("the pool's first runner", LONG, || {
        let a = attached(&server)?;
        if a.len() == 1 {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });

    // 20 jobs for the pool's label, each held until the flag exists: 4 run, 16 wait.
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: held\n    run: \"{} && echo ran\"\n    labels: {{os: linux}}\n",
        wait_flag_sh(&flag)
    );
    let (repo, first) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let mut commits = vec![first];
    for i in 1..20 {
        commits.push(repo.new_commit(&format!("c{i}")));
    }
    let ids: Vec<u64> = commits
        .iter()
        .map(|c| id_of(&server.submit(&repo.path, c)))
        .collect();

    // The pool grows to its max, and never past it.
    let mut most = 0;
    wait_for("the pool at its max, every runner busy", LONG, || {
        let a = attached(&server)?;
        most = most.max(a.len());
        assert!(a.len() <= 4, "more runners than --max: {a:?}");
        if a.len() == 4 && a.iter().all(|(_, s)| s == "busy") {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });
    assert_eq!(most, 4);

    std::fs::write(&flag, b"").unwrap();
    for id in &ids {
        let b = server.wait_final(*id, LONG);
        assert_eq!(b["state"], "passed", "{b:#}");
        // Run once: one attempt, whatever the pool did meanwhile.
        assert_eq!(b["jobs"][0]["attempts"], 1, "{b:#}");
    }

    // Idle again: drained back to --min.
    wait_for("the pool back at its min", LONG, || {
        let a = attached(&server)?;
        assert!(a.len() <= 4, "more runners than --max: {a:?}");
        if a.len() == 1 && a[0].1 == "idle" {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });
    let out = String::from_utf8_lossy(&pool.stdout()).to_string();
    assert_eq!(out.matches("kiln pool: started").count(), 4, "{out}");
    assert_eq!(out.matches("kiln pool: draining").count(), 3, "{out}");
    assert!(
        !out.contains("exited ("),
        "a runner exited on its own: {out}"
    );

    // SIGTERM: the last runner drains and the pool ends cleanly.
    pool.signal(Signal::SIGTERM);
    let done = pool.wait(LONG);
    assert_eq!(done.code(), 0, "{done:?}");
    wait_for("no pool runner attached", LONG, || {
        let a = attached(&server)?;
        if a.is_empty() {
            Ok(())
        } else {
            Err(format!("{a:?}"))
        }
    });
}

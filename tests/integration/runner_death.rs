//! Runner death: the runner running a job is killed (SIGKILL, with its steps, like a machine
//! going away); the dispatcher notices the missed heartbeats and gives the job to the other
//! runner as a second attempt, which passes.

use kiln_testkit::*;

#[test]
fn job_of_a_killed_runner_moves_to_the_other_runner() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      echo \"attempt $KILN_ATTEMPT_ID starts\"\n      {}\n      echo \"attempt $KILN_ATTEMPT_ID done\"\n",
        wait_flag_sh(&flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &pipeline);
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "300ms"]);
    let mut runners = [
        Some(server.runner(tmp.path(), "r1", &[])),
        Some(server.runner(tmp.path(), "r2", &[])),
    ];
    server.wait_runners_attached(&["r1", "r2"]);

    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_build(id, "running", LONG, |b| b["state"] == "running");
    let job = &b["jobs"][0];
    assert_eq!(job["attempts"], 1, "{b}");
    let first_attempt = job["attempt_id"].as_u64().unwrap();
    let victim = job["runner"].as_str().unwrap().to_string();
    let (victim_index, survivor) = match victim.as_str() {
        "r1" => (0, "r2"),
        "r2" => (1, "r1"),
        other => panic!("unknown runner {other:?}: {b}"),
    };
    // Its step really runs there (it printed its first line).
    wait_for("the first attempt's output", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]);
        let want = format!("attempt {first_attempt} starts\n");
        if out.out().contains(&want) {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });

    // A follower attached during the first attempt goes on with the second.
    let mut follower = server.spawn_cli("kiln logs -f", &["logs", "-f", &id.to_string()]);
    follower.wait_stdout(format!("attempt {first_attempt} starts\n").as_bytes(), LONG);

    runners[victim_index].as_mut().unwrap().kill_all();

    let b = server.wait_build(id, &format!("reassigned to {survivor}"), LONG, |b| {
        let j = &b["jobs"][0];
        b["state"] == "running" && j["runner"] == survivor && j["attempts"] == 2
    });
    let second_attempt = b["jobs"][0]["attempt_id"].as_u64().unwrap();
    assert_ne!(second_attempt, first_attempt, "{b}");
    let out = server.cli(&["--json", "runners"]);
    let v = out.json();
    let state_of = |name: &str| {
        v["runners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .map(|r| r["state"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(state_of(&victim), "offline", "{v}");
    assert_eq!(state_of(survivor), "busy", "{v}");

    std::fs::write(&flag, b"").unwrap();
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let job = &b["jobs"][0];
    assert_eq!(job["attempts"], 2, "{b}");
    assert_eq!(job["runner"], survivor, "{b}");
    assert_eq!(job["attempt_id"], second_attempt, "{b}");
    let logs = server.cli(&["logs", &id.to_string()]);
    logs.expect_code(0);
    let text = logs.out();
    assert!(text.contains(&format!("attempt 2 on {survivor}")), "{logs}");
    assert!(
        text.contains(&format!("attempt {second_attempt} done\n")),
        "{logs}"
    );
    assert!(
        !text.contains(&format!("attempt {first_attempt} done\n")),
        "{logs}"
    );
    let followed = follower.wait(LONG);
    followed.expect_code(0);
    assert!(
        followed
            .out()
            .contains(&format!("attempt {second_attempt} done\n")),
        "{followed}"
    );
    // By default only the attempt that produced the result; the lost one on request.
    assert!(
        text.contains(&format!("attempt {second_attempt} starts\n")),
        "{logs}"
    );
    assert!(
        !text.contains(&format!("attempt {first_attempt} starts\n")),
        "the superseded attempt's output is shown by default: {logs}"
    );
    assert!(logs.err().contains("had 2 attempts"), "{logs}");
    let all = server.cli(&["logs", "--all-attempts", &id.to_string()]);
    all.expect_code(0);
    let first_at = all
        .out()
        .find(&format!("attempt {first_attempt} starts\n"))
        .unwrap_or_else(|| panic!("{all}"));
    let second_at = all
        .out()
        .find(&format!("attempt {second_attempt} starts\n"))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(first_at < second_at, "{all}");
    let one = server.cli(&["logs", "--attempt", "1", &id.to_string()]);
    one.expect_code(0);
    assert!(
        one.out()
            .contains(&format!("attempt {first_attempt} starts\n")),
        "{one}"
    );
    assert!(
        !one.out()
            .contains(&format!("attempt {second_attempt} starts\n")),
        "{one}"
    );
    server
        .cli(&["logs", "--attempt", "3", &id.to_string()])
        .expect_code(4);
    // `kiln show` lists the attempts.
    let attempts = b["jobs"][0]["attempt_list"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{b}");
    assert_eq!(attempts[0]["id"], first_attempt, "{b}");
    assert_eq!(attempts[0]["number"], 1, "{b}");
    assert_eq!(attempts[0]["runner"], victim.as_str(), "{b}");
    assert_ne!(attempts[0]["state"], "finished", "{b}");
    assert_eq!(attempts[1]["id"], second_attempt, "{b}");
    assert_eq!(attempts[1]["number"], 2, "{b}");
    assert_eq!(attempts[1]["runner"], survivor, "{b}");
    let shown = server.cli(&["show", &id.to_string()]);
    shown.expect_code(0);
    assert!(
        shown
            .out()
            .contains(&format!("attempt 1 (id {first_attempt}) on {victim}")),
        "{shown}"
    );
    assert!(
        shown
            .out()
            .contains(&format!("attempt 2 (id {second_attempt}) on {survivor}")),
        "{shown}"
    );
}

//! Several dispatchers on one PostgreSQL database (`kiln serve --database`, each with its own
//! data dir): all of them active, a runner attached to one of them runs builds submitted to
//! another, cancels and drains reach it through the database's bus, and when its dispatcher
//! is killed its job is adopted and runs once more elsewhere, with exactly one result.

use kiln::proto;
use kiln_testkit::fault::job0;
use kiln_testkit::*;

const FAST: &[&str] = &["--heartbeat-interval", "500ms"];

fn serve(data: &std::path::Path, url: &str) -> Server {
    let mut args = vec!["--database", url];
    args.extend_from_slice(FAST);
    Server::start(data, &args)
}

#[test]
fn two_dispatchers_share_one_farm_and_survive_the_death_of_one() {
    let tmp = tempdir();
    let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
    let (repo, quick) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: hello\n    run: echo hello-cluster\n",
    );
    let a = serve(&tmp.path().join("data-a"), &url);
    let b = serve(&tmp.path().join("data-b"), &url);
    let _r1 = a.runner(tmp.path(), "r1", &[]);
    a.wait_runners_attached(&["r1"]);
    // B says it is attached too (to A, a live dispatcher).
    b.wait_runners_attached(&["r1"]);

    // WatchBuilds on B, then a build submitted to B: it runs on A's runner and passes, and
    // B's watchers see its states.
    let api = Api::connect(&b.url);
    let mut c = api.builds();
    let mut stream = api
        .rt
        .block_on(c.watch_builds(proto::WatchBuildsRequest { build_id: 0 }))
        .unwrap()
        .into_inner();
    let id = id_of(&b.submit(&repo.path, &quick));
    let done = b.wait_final(id, LONG);
    assert_eq!(done["state"], "passed", "{done}");
    assert_eq!(job0(&done)["runner"], "r1", "{done}");
    let mut job_states = Vec::new();
    api.rt.block_on(async {
        loop {
            let ev = tokio::time::timeout(LONG, stream.message())
                .await
                .unwrap_or_else(|_| panic!("no event on B; job states so far {job_states:?}"))
                .unwrap()
                .expect("the watch ended");
            assert_eq!(ev.build_id, id, "{ev:?}");
            let state = proto::JobState::try_from(ev.state).unwrap();
            if ev.job_id == 0 && state == proto::JobState::Passed {
                break;
            }
            if ev.job_id != 0 {
                job_states.push(state);
            }
        }
    });
    use proto::JobState::*;
    // Queued (B's own), then A's: running, passed.
    assert_eq!(job_states.first(), Some(&Queued), "{job_states:?}");
    assert!(job_states.contains(&Running), "{job_states:?}");
    assert_eq!(job_states.last(), Some(&Passed), "{job_states:?}");
    let listed = b.cli(&["builds"]);
    listed.expect_code(0);
    assert!(listed.out().contains("passed"), "{listed}");

    // A long job on A's runner, cancelled on B: A stops it.
    let long = repo.commit(
        &[(
            ".kiln.yml",
            b"steps:\n  - name: long\n    run: echo started; sleep 600\n",
        )],
        "long",
    );
    let id = id_of(&b.submit(&repo.path, &long));
    b.wait_build(id, "running on r1", LONG, |v| v["state"] == "running");
    let out = b.cli(&["cancel", &id.to_string()]);
    assert!(matches!(out.code(), 0 | 1 | 3 | 8), "{out}");
    let ended = b.wait_final(id, LONG);
    assert_eq!(ended["state"], "cancelled", "{ended}");
    // Not the dispatcher's own give-up after the grace period: the runner answered.
    assert!(
        !ended.to_string().contains("did not confirm"),
        "the runner never heard the cancel: {ended}"
    );

    // Drained on B: A drains r1, which leaves (exit 0).
    let mut r1 = _r1;
    let out = b.cli(&["runners", "drain", "r1"]);
    out.expect_code(0);
    let exited = r1.wait(LONG);
    assert_eq!(exited.status.code(), Some(0), "{exited}");

    // A job runs on A's runner r2 when A is killed (-9). The runner is restarted against B:
    // B adopts the attempt after A's lease, requeues it when nobody brings it back, and it
    // runs again on r2: one result, two attempts.
    let flag = tmp.path().join("first-attempt-ran");
    let pipeline = format!(
        "steps:\n  - name: once-more\n    run: if [ -e '{f}' ]; then echo second; else touch '{f}'; sleep 600; fi\n",
        f = flag.display()
    );
    let failover = repo.commit(&[(".kiln.yml", pipeline.as_bytes())], "failover");
    let mut r2 = a.runner(tmp.path(), "r2", &[]);
    a.wait_runners_attached(&["r2"]);
    let id = id_of(&b.submit(&repo.path, &failover));
    wait_for("the first attempt to start", LONG, || {
        if flag.exists() {
            Ok(())
        } else {
            Err(b.show(id).to_string())
        }
    });
    let mut a = a;
    a.proc.kill_all();
    r2.kill_all();
    let _r2 = b.runner(tmp.path(), "r2", &[]);
    let done = b.wait_final(id, LONG);
    assert_eq!(done["state"], "passed", "{done}");
    assert_eq!(job0(&done)["attempts"], 2, "{done}");
    assert_eq!(job0(&done)["runner"], "r2", "{done}");
    // Exactly one result: no refused report of the first attempt, and it stays passed.
    let again = b.show(id);
    assert_eq!(again["state"], "passed", "{again}");
}

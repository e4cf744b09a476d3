//! Stopping a runner while its dispatcher is unreachable (SIGSTOPped): a SIGTERM is never
//! ignored. The first drains (the running job finishes) and the runner leaves once it is done,
//! without waiting for the dispatcher to come back; a second cancels the job and leaves at once.

use kiln_testkit::fault::*;
use kiln_testkit::*;
use nix::sys::signal::Signal;

const HEARTBEATS: &[&str] = &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"];

/// A dispatcher, one runner, and a build whose step has started and waits for `flag`.
fn running_build(tmp: &std::path::Path, flag: &std::path::Path) -> (Server, Proc) {
    let pipeline = format!(
        "steps:\n  - name: wait\n    run: |\n      echo step-started\n      {}\n      echo step-done\n",
        wait_flag_sh(flag)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.join("repo"), &pipeline);
    let server = Server::start(&tmp.join("data"), HEARTBEATS);
    let runner = server.runner(tmp, "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let id = id_of(&server.submit(&repo.path, &sha));
    wait_for("the step to start", LONG, || {
        let out = server.cli(&["logs", &id.to_string()]);
        if out.out().contains("step-started") {
            Ok(())
        } else {
            Err(out.to_string())
        }
    });
    (server, runner)
}

fn wait_stderr(p: &Proc, needle: &str) {
    wait_for(&format!("{} to say {needle:?}", p.name), LONG, || {
        let err = String::from_utf8_lossy(&p.stderr()).into_owned();
        if err.contains(needle) {
            Ok(())
        } else {
            Err(err)
        }
    });
}

/// The job ends while the dispatcher is stopped, so its result cannot be delivered; one SIGTERM
/// makes the runner leave (exit 0, saying what it could not deliver) instead of waiting for the
/// dispatcher forever.
#[test]
fn one_sigterm_drains_while_the_dispatcher_is_unreachable() {
    let tmp = tempdir();
    let flag = tmp.path().join("go");
    let (server, mut runner) = running_build(tmp.path(), &flag);
    server.proc.signal(Signal::SIGSTOP);
    std::fs::write(&flag, b"").unwrap();
    runner.signal(Signal::SIGTERM);
    let out = runner.wait(LONG);
    assert_eq!(out.status.code(), Some(0), "{out}");
    assert!(out.err().contains("leaving without"), "{out}");
    server.proc.signal(Signal::SIGCONT);
}

/// The job still runs while the dispatcher is stopped: the first SIGTERM drains (the job goes
/// on), the second cancels it and the runner leaves at once; the step's processes are gone.
#[test]
fn a_second_sigterm_stops_now_while_the_dispatcher_is_unreachable() {
    let tmp = tempdir();
    let flag = tmp.path().join("never");
    let marker = flag.to_str().unwrap().to_string();
    let _reaper = MarkerReaper(marker.clone());
    let (server, mut runner) = running_build(tmp.path(), &flag);
    server.proc.signal(Signal::SIGSTOP);
    runner.signal(Signal::SIGTERM);
    wait_stderr(&runner, "draining");
    assert!(
        runner.try_status().is_none(),
        "a drain ended the running job"
    );
    runner.signal(Signal::SIGTERM);
    let out = runner.wait(LONG);
    assert_eq!(out.status.code(), Some(0), "{out}");
    let left = processes_with(&marker);
    assert!(left.is_empty(), "the step's processes are left: {left:?}");
    server.proc.signal(Signal::SIGCONT);
}

//! OpenTelemetry: with `OTEL_EXPORTER_OTLP_ENDPOINT` set, the dispatcher and the runner export
//! their spans over OTLP to a real OTLP trace receiver the test starts (a tonic server on
//! `opentelemetry-proto`'s trace service), and one build is one trace across both processes:
//! the build's span, its job's `queued` and `attempt` spans from the dispatcher, and the
//! runner's `job` span with its checkout and steps under it.

use std::collections::HashMap;
use std::process::Command;

use kiln_testkit::otlp::{Got, start_receiver};
use kiln_testkit::*;

/// `kiln ARGS` with OTLP export to `endpoint`, spans sent every 100 ms.
fn traced(name: &str, endpoint: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new(kiln_bin());
    cmd.args(args)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env_remove("OTEL_SERVICE_NAME")
        .env_remove("KILN_DISPATCHER");
    Proc::spawn(name, cmd)
}

#[test]
fn one_build_is_one_trace_across_dispatcher_and_runner() {
    let (addr, receiver) = start_receiver();
    let endpoint = format!("http://{addr}");
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let mut serve = traced(
        "kiln serve (traced)",
        &endpoint,
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().unwrap(),
        ],
    );
    serve.wait_stdout(b"kiln dispatcher listening on ", LONG);
    let line = String::from_utf8(serve.stdout()).unwrap();
    let listen = line.trim().rsplit(' ').next().unwrap().to_string();
    let server = Server {
        proc: serve,
        url: format!("http://{listen}"),
        addr: listen,
        data_dir: data.clone(),
    };
    let work = tmp.path().join("work");
    let _runner = traced(
        "kiln runner (traced)",
        &endpoint,
        &[
            "runner",
            "--dispatcher",
            &server.url,
            "--name",
            "t1",
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    server.wait_runners_attached(&["t1"]);
    let (repo, sha) = Repo::with_pipeline(
        &tmp.path().join("repo"),
        "steps:\n  - name: first\n    run: echo one\n  - name: second\n    run: echo two\n",
    );
    let id = id_of(&server.submit(&repo.path, &sha));
    assert_eq!(server.wait_final(id, LONG)["state"], "passed");

    let build_span = format!("build {id}");
    let spans = wait_for("the build's spans from both processes", LONG, || {
        let got = receiver.spans();
        let Some(root) = got.iter().find(|s| s.name == build_span) else {
            return Err(format!("no {build_span:?} span yet: {got:#?}"));
        };
        let trace: Vec<Got> = got
            .iter()
            .filter(|s| s.trace == root.trace)
            .cloned()
            .collect();
        let names: Vec<&str> = trace.iter().map(|s| s.name.as_str()).collect();
        let want = ["queued", "attempt", "job", "checkout", "step"];
        let steps = trace.iter().filter(|s| s.name == "step").count();
        if want.iter().all(|w| names.iter().any(|n| n.starts_with(w))) && steps == 2 {
            Ok(trace)
        } else {
            Err(format!("{names:?}"))
        }
    });
    let by_name = |prefix: &str| -> Vec<&Got> {
        spans
            .iter()
            .filter(|s| s.name.starts_with(prefix))
            .collect()
    };
    let root = by_name("build ")[0];
    assert_eq!(root.service, "kiln-dispatcher");
    assert!(
        root.parent.is_empty(),
        "the build's span is the trace's root: {root:?}"
    );
    for name in ["queued", "attempt"] {
        let s = by_name(name)[0];
        assert_eq!(s.service, "kiln-dispatcher", "{s:?}");
        assert_eq!(
            s.parent, root.id,
            "{name} is a child of the build: {spans:#?}"
        );
    }
    let job = by_name("job")[0];
    assert_eq!(job.service, "kiln-runner");
    assert_eq!(
        job.parent, root.id,
        "the runner's job joins the build: {spans:#?}"
    );
    let ids: HashMap<&str, &str> = spans
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    for s in by_name("checkout").into_iter().chain(by_name("step")) {
        assert_eq!(s.service, "kiln-runner");
        assert_eq!(
            s.parent,
            job.id,
            "{} under the job, not {:?}",
            s.name,
            ids.get(s.parent.as_str())
        );
    }
}

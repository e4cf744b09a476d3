//! The length of a step's `run`: what the kernel refuses to start (`E2BIG`, 900 KB) is refused
//! at submit (the build is errored without a job, like any pipeline error) with
//! file:line:column and the limit, and a command at the limit really runs.

use kiln_testkit::*;

#[test]
fn a_run_over_the_limit_is_refused_at_submit_and_one_at_the_limit_runs() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r = server.runner(tmp.path(), "r1", &[]);

    let big = format!(
        "steps:\n  - name: huge\n    run: echo {}\n",
        "x".repeat(900_000)
    );
    let (repo, sha) = Repo::with_pipeline(&tmp.path().join("repo"), &big);
    let b = server.submit(&repo.path, &sha);
    assert_eq!(b["state"], "errored", "{}", short(&b.to_string()));
    let err = b["error"].as_str().unwrap();
    assert!(
        err.len() < 4000,
        "the error echoes the command: {} bytes",
        err.len()
    );
    assert!(err.contains(".kiln.yml:3:10"), "{err}");
    assert!(
        err.contains(&kiln_pipeline::MAX_RUN_BYTES.to_string()),
        "{err}"
    );
    assert!(b["jobs"].as_array().unwrap().is_empty(), "no job may start");

    // At the limit: a shell script of comment lines, then a command; it runs.
    let mut script = String::new();
    while script.len() < kiln_pipeline::MAX_RUN_BYTES - 100 {
        script.push_str(&format!("# {}\n", "c".repeat(70)));
    }
    script.push_str("echo ran-at-the-limit");
    let pad = kiln_pipeline::MAX_RUN_BYTES - script.len();
    script.insert_str(0, &format!("#{}\n", "p".repeat(pad - 2)));
    assert_eq!(script.len(), kiln_pipeline::MAX_RUN_BYTES);
    let indented: String = script.lines().map(|l| format!("      {l}\n")).collect();
    let pipeline = format!("steps:\n  - name: long\n    run: |-\n{indented}");
    let sha = repo.commit(&[(".kiln.yml", pipeline.as_bytes())], "long");
    let id = id_of(&server.submit(&repo.path, &sha));
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    let out = server.cli(&["logs", &id.to_string()]);
    assert!(out.out().contains("ran-at-the-limit"), "{out}");
}

fn short(s: &str) -> String {
    s.chars().take(2000).collect()
}

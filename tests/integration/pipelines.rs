//! Pipelines as code, end to end: `.kiln.yml` files with `jobs:` (a DAG with `depends_on`,
//! `matrix`, `when`, post steps) built by a real `kiln serve` and two real `kiln runner`
//! processes, from git repositories made in temp dirs.
//!
//! - A failing job skips what depends on it (never assigned) while independent jobs still run,
//!   and its `post: failure` step runs while its `post: success` step does not; a follower of
//!   the whole build sees it all and exits as `kiln show` does; a retry builds the same DAG.
//! - Independent jobs run at the same time, one on each runner.
//! - A `matrix` job becomes one job per value, each seeing its value in the environment; one
//!   failing cell skips what needs the matrix job, not the other cell.
//! - `when: {branch}` plans a job (and what depends on it) only for matching branches, and
//!   never in a build without a branch.
//! - A typo in a key, or a dependency cycle, makes an `errored` build without jobs whose error
//!   names `.kiln.yml:LINE:COL`.

use std::path::Path;

use kiln_testkit::*;
use serde_json::Value;

/// A dispatcher and two one-slot runners (`r1`, `r2`), attached. Dropping it kills them all
/// (the runners first), then removes the temp dir.
struct Farm {
    r1: Proc,
    r2: Proc,
    server: Server,
    tmp: tempfile::TempDir,
}

impl Farm {
    fn start() -> Farm {
        let tmp = tempdir();
        let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
        let r1 = server.runner(tmp.path(), "r1", &[]);
        let r2 = server.runner(tmp.path(), "r2", &[]);
        server.wait_runners_attached(&["r1", "r2"]);
        Farm {
            r1,
            r2,
            server,
            tmp,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A new repository named `name` whose first commit holds `.kiln.yml` = `pipeline`.
    fn repo(&self, name: &str, pipeline: &str) -> (Repo, String) {
        Repo::with_pipeline(&self.dir().join(name), pipeline)
    }

    /// `kiln --json submit --repo R --commit C --branch B` (must succeed): the build's JSON.
    fn submit(&self, repo: &Repo, commit: &str, branch: &str) -> Value {
        let out = self.server.cli(&[
            "--json",
            "submit",
            "--repo",
            repo.path_str(),
            "--commit",
            commit,
            "--branch",
            branch,
        ]);
        out.expect_code(0);
        out.json()
    }

    /// `kiln logs BUILD/JOB` (stored output, not following): its stdout.
    fn logs(&self, build: u64, job: &str) -> String {
        let out = self.server.cli(&["logs", &format!("{build}/{job}")]);
        assert!(
            matches!(out.code(), 0..=8),
            "kiln logs {build}/{job} failed: {out}"
        );
        out.out()
    }
}

/// A YAML double-quoted string holding `s` (a JSON string is one).
fn q(s: &str) -> String {
    Value::String(s.to_string()).to_string()
}

/// The job named `name` of a build's JSON.
#[track_caller]
fn job<'a>(build: &'a Value, name: &str) -> &'a Value {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == name)
        .unwrap_or_else(|| panic!("build has no job {name:?}: {build}"))
}

/// The names of a build's jobs, in the order the dispatcher lists them.
fn job_names(build: &Value) -> Vec<String> {
    build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["name"].as_str().unwrap().to_string())
        .collect()
}

/// The step named `name` of a job's JSON.
#[track_caller]
fn step<'a>(job: &'a Value, name: &str) -> &'a Value {
    job["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("job has no step {name:?}: {job}"))
}

/// `build` passes; `test` needs it and fails (`exit 3`) with a `post: failure` and a `post:
/// success` step; `deploy` needs `test`; `lint` needs nothing and passes.
///
/// Expected: build passed, test failed (its first step exit 3, after `build` finished), deploy
/// skipped without ever being assigned (no runner, 0 attempts, no output), lint passed; the
/// post-failure step ran (its line is in `kiln logs BUILD/test`), the post-success step was
/// skipped (its line is not); the build is failed, but only once `lint` (held by a flag, on the
/// other runner meanwhile) has finished; a `kiln logs -f BUILD` follower started at once sees
/// it all and exits 1, and a retry builds the same four jobs with the same outcome.
#[test]
fn dag_failure_skips_dependents_and_runs_post_failure_steps() {
    let farm = Farm::start();
    let built = farm.dir().join("build-done");
    let lint_go = farm.dir().join("lint-go");
    let pipeline = format!(
        r#"jobs:
  build:
    steps:
      - name: compile
        run: {compile}
  test:
    depends_on: [build]
    steps:
      - name: unit
        run: {unit}
      - name: report-failure
        run: echo post-failure-$((6*7))
        post: failure
      - name: report-success
        run: echo post-success-$((6*7))
        post: success
  deploy:
    depends_on: test
    steps:
      - name: ship
        run: echo shipped
  lint:
    steps:
      - name: check
        run: {lint}
"#,
        compile = q(&format!("echo compiled && touch '{}'", built.display())),
        // Holds a runner until the test lets it go, so the rest of the DAG runs beside it.
        lint = q(&format!("{}; echo linted", wait_flag_sh(&lint_go))),
        // Exits 9 (not 3) if it runs before `build` finished.
        unit = q(&format!(
            "test -e '{}' || exit 9; echo running tests; exit 3",
            built.display()
        )),
    );
    let (repo, sha) = farm.repo("dag", &pipeline);
    let b = farm.submit(&repo, &sha, "main");
    let id = id_of(&b);
    assert_eq!(
        job_names(&b),
        ["build", "test", "deploy", "lint"],
        "jobs in plan order: {b}"
    );

    // A follower of the whole build, attached before anything ran: it must see every job's
    // output (the skipped one has none) and end when the last job ends.
    let mut follower = farm
        .server
        .spawn_cli("kiln logs -f (dag)", &["logs", "-f", &id.to_string()]);

    // While `lint` holds one runner, build -> test runs on the other, test fails and deploy is
    // skipped; the build is not over yet.
    let b = farm
        .server
        .wait_build(id, "test failed, deploy skipped, lint running", LONG, |b| {
            job(b, "test")["state"] == "failed"
                && job(b, "deploy")["state"] == "skipped"
                && job(b, "lint")["state"] == "running"
        });
    assert_eq!(
        b["state"], "running",
        "a build with a running job is not over: {b}"
    );
    assert_ne!(
        job(&b, "lint")["runner"],
        job(&b, "build")["runner"],
        "build ran beside lint, on the other runner: {b}"
    );
    std::fs::write(&lint_go, b"go").unwrap();

    let b = farm.server.wait_final(id, LONG);
    assert_eq!(b["state"], "failed", "{b}");
    assert!(b["error"].is_null(), "{b}");
    let followed = follower.wait(LONG);
    for line in ["compiled", "running tests", "post-failure-42", "linted"] {
        assert!(
            followed.out().contains(line),
            "{line:?} missing: {followed}"
        );
    }
    assert!(!followed.out().contains("post-success-42"), "{followed}");
    assert!(!followed.out().contains("shipped"), "{followed}");

    let build = job(&b, "build");
    assert_eq!(build["state"], "passed", "{b}");
    assert_eq!(build["attempts"], 1, "{b}");

    let test = job(&b, "test");
    assert_eq!(test["state"], "failed", "{b}");
    let unit = step(test, "unit");
    assert_eq!(unit["outcome"], "failed", "{b}");
    assert_eq!(
        unit["exit_code"], 3,
        "test must run after build passed (9 = it ran before build's step finished): {b}"
    );
    assert_eq!(step(test, "report-failure")["outcome"], "passed", "{b}");
    assert_eq!(step(test, "report-success")["outcome"], "skipped", "{b}");

    let deploy = job(&b, "deploy");
    assert_eq!(deploy["state"], "skipped", "{b}");
    assert_eq!(deploy["attempts"], 0, "deploy was never assigned: {b}");
    assert_eq!(deploy["runner"], "", "deploy was never assigned: {b}");
    assert_eq!(deploy["attempt_id"], 0, "deploy was never assigned: {b}");
    for s in deploy["steps"].as_array().unwrap() {
        assert!(
            s["outcome"].is_null() || s["outcome"] == "skipped",
            "a step of a skipped job has no result: {b}"
        );
    }

    let lint = job(&b, "lint");
    assert_eq!(lint["state"], "passed", "{b}");

    let test_log = farm.logs(id, "test");
    assert!(test_log.contains("running tests"), "{test_log}");
    assert!(
        test_log.contains("post-failure-42"),
        "the post: failure step's output is missing:\n{test_log}"
    );
    assert!(
        !test_log.contains("post-success-42"),
        "the post: success step ran after a failure:\n{test_log}"
    );
    let deploy_log = farm.logs(id, "deploy");
    assert!(
        !deploy_log.contains("shipped"),
        "the skipped job ran:\n{deploy_log}"
    );
    assert!(farm.logs(id, "lint").contains("linted"));

    // A retry builds the same DAG again: the same jobs, and deploy skipped again.
    let retried = farm.server.cli(&["--json", "retry", &id.to_string()]);
    retried.expect_code(0);
    let again = farm.server.wait_final(id_of(&retried.json()), LONG);
    assert_eq!(
        job_names(&again),
        ["build", "test", "deploy", "lint"],
        "{again}"
    );
    assert_eq!(again["state"], "failed", "{again}");
    for (name, state) in [
        ("build", "passed"),
        ("test", "failed"),
        ("deploy", "skipped"),
        ("lint", "passed"),
    ] {
        assert_eq!(job(&again, name)["state"], state, "{name}: {again}");
    }
    assert_eq!(job(&again, "deploy")["attempts"], 0, "{again}");

    // `kiln show` exits 1 for a failed build, and so must the follower of the whole build; a
    // follower of the skipped job alone must not say "still running" (8) about a job that ended.
    farm.server.cli(&["show", &id.to_string()]).expect_code(1);
    let deploy_followed = farm.server.cli(&["logs", "-f", &format!("{id}/deploy")]);
    assert!(
        followed.code() == 1 && deploy_followed.code() != 8,
        "`kiln logs -f {id}` must exit 1 (failed), as `kiln show {id}` does, and `kiln logs -f \
         {id}/deploy` must not exit 8 (still running) for a job that ended skipped; they exited \
         {} and {}\n{followed}\n{deploy_followed}",
        followed.code(),
        deploy_followed.code()
    );
}

/// Two independent jobs that each wait for a flag file: both must be running at the same time,
/// one on each (one-slot) runner, before the test creates the flag; then both pass.
#[test]
fn independent_jobs_run_in_parallel_on_both_runners() {
    let mut farm = Farm::start();
    let flag = farm.dir().join("go");
    let started = farm.dir().join("started");
    std::fs::create_dir_all(&started).unwrap();
    let slow = |name: &str| {
        q(&format!(
            "touch '{}/{name}'; {}; echo {name} done",
            started.display(),
            wait_flag_sh(&flag)
        ))
    };
    let pipeline = format!(
        "jobs:\n  left:\n    steps:\n      - name: wait\n        run: {}\n  right:\n    steps:\n      - name: wait\n        run: {}\n",
        slow("left"),
        slow("right")
    );
    let (repo, sha) = farm.repo("parallel", &pipeline);
    let id = id_of(&farm.submit(&repo, &sha, "main"));

    let b = farm.server.wait_build(id, "both jobs running", LONG, |b| {
        ["left", "right"]
            .iter()
            .all(|n| job(b, n)["state"] == "running")
    });
    wait_for("both steps to start", LONG, || {
        let seen: Vec<_> = ["left", "right"]
            .iter()
            .filter(|n| started.join(n).exists())
            .collect();
        if seen.len() == 2 {
            Ok(())
        } else {
            Err(format!("started: {seen:?}"))
        }
    });
    let mut runners = vec![
        job(&b, "left")["runner"].as_str().unwrap().to_string(),
        job(&b, "right")["runner"].as_str().unwrap().to_string(),
    ];
    runners.sort();
    assert_eq!(runners, ["r1", "r2"], "one job on each runner: {b}");

    std::fs::write(&flag, b"go").unwrap();
    let b = farm.server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    assert!(farm.logs(id, "left").contains("left done"));
    assert!(farm.logs(id, "right").contains("right done"));
    // Both runners are still attached (nothing went wrong on the way).
    assert!(farm.r1.try_status().is_none() && farm.r2.try_status().is_none());
}

/// `matrix: {py: ["3.11", "3.12"]}` makes `test (py=3.11)` and `test (py=3.12)`, each of whose
/// steps sees `PY`; a job that depends on the matrix job runs after both cells.
#[test]
fn matrix_makes_one_job_per_value_with_its_variable() {
    let farm = Farm::start();
    let pipeline = r#"jobs:
  test:
    matrix:
      py: ["3.11", "3.12"]
    env:
      PY: overridden-by-the-matrix
    steps:
      - name: show
        run: echo "python is $PY"
  after:
    depends_on: test
    steps:
      - name: done
        run: echo after both cells
"#;
    let (repo, sha) = farm.repo("matrix", pipeline);
    let b = farm.submit(&repo, &sha, "main");
    let id = id_of(&b);
    assert_eq!(
        job_names(&b),
        ["test (py=3.11)", "test (py=3.12)", "after"],
        "{b}"
    );
    let b = farm.server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");
    for v in ["3.11", "3.12"] {
        let name = format!("test (py={v})");
        assert_eq!(job(&b, &name)["state"], "passed", "{b}");
        let log = farm.logs(id, &name);
        assert!(
            log.contains(&format!("python is {v}\n")),
            "{name} did not see PY={v}:\n{log}"
        );
        assert!(!log.contains("overridden"), "{log}");
    }
    assert_eq!(job(&b, "after")["state"], "passed", "{b}");

    // One failing cell: the other still runs and passes, the job that needs the matrix job
    // (every cell of it) is skipped.
    let failing = pipeline.replace(
        r#"run: echo "python is $PY""#,
        r#"run: echo "python is $PY"; [ "$PY" != 3.11 ] || exit 4"#,
    );
    assert_ne!(failing, pipeline);
    let sha = repo.commit(&[(".kiln.yml", failing.as_bytes())], "3.11 fails");
    let b = farm
        .server
        .wait_final(id_of(&farm.submit(&repo, &sha, "main")), LONG);
    assert_eq!(b["state"], "failed", "{b}");
    assert_eq!(job(&b, "test (py=3.11)")["state"], "failed", "{b}");
    assert_eq!(job(&b, "test (py=3.12)")["state"], "passed", "{b}");
    assert_eq!(job(&b, "after")["state"], "skipped", "{b}");
    assert_eq!(job(&b, "after")["attempts"], 0, "{b}");
}

/// `when: {branch: main}` plans `release` (and `announce`, which needs it) in a build of `main`
/// only; `when: {branch: "feature/*"}` plans `preview` in a build of `feature/x` only.
#[test]
fn when_branch_plans_a_job_only_for_matching_branches() {
    let farm = Farm::start();
    let pipeline = r#"jobs:
  test:
    steps:
      - name: t
        run: echo testing
  release:
    depends_on: test
    when: {branch: main}
    steps:
      - name: r
        run: echo releasing
  announce:
    depends_on: release
    steps:
      - name: a
        run: echo announcing
  preview:
    when:
      branch: "feature/*"
    steps:
      - name: p
        run: echo previewing
"#;
    let (repo, sha_main) = farm.repo("when", pipeline);
    let sha_feature = repo.new_commit("feature");

    let main = farm.submit(&repo, &sha_main, "main");
    assert_eq!(job_names(&main), ["test", "release", "announce"], "{main}");
    let feature = farm.submit(&repo, &sha_feature, "feature/x");
    assert_eq!(job_names(&feature), ["test", "preview"], "{feature}");

    let main = farm.server.wait_final(id_of(&main), LONG);
    assert_eq!(main["state"], "passed", "{main}");
    assert!(farm.logs(id_of(&main), "release").contains("releasing"));
    let feature = farm.server.wait_final(id_of(&feature), LONG);
    assert_eq!(feature["state"], "passed", "{feature}");
    assert!(farm.logs(id_of(&feature), "preview").contains("previewing"));
    assert_eq!(feature["branch"], "feature/x");

    // A build without a branch plans no job with a `when`.
    let sha_none = repo.new_commit("no branch");
    let none = farm.server.submit(&repo.path, &sha_none);
    assert_eq!(job_names(&none), ["test"], "{none}");
    assert_eq!(
        farm.server.wait_final(id_of(&none), LONG)["state"],
        "passed"
    );
}

/// Submits a commit whose `.kiln.yml` is `pipeline` and checks the build: `errored` at once,
/// no jobs (so no runner ever got anything), an error that starts with `.kiln.yml:LINE:COL:`
/// and mentions `what`.
fn expect_pipeline_error(farm: &Farm, name: &str, pipeline: &str, at: &str, what: &str) {
    let (repo, sha) = farm.repo(name, pipeline);
    let b = farm.submit(&repo, &sha, "main");
    assert_eq!(b["state"], "errored", "{b}");
    assert_eq!(b["jobs"], Value::Array(Vec::new()), "no jobs: {b}");
    let error = b["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error: {b}"));
    assert!(
        error.starts_with(&format!(".kiln.yml:{at}: ")),
        "the error should be at .kiln.yml:{at}: {error:?}"
    );
    assert!(error.contains(what), "{error:?} should mention {what:?}");
    // It stays so: `kiln show` exits 3 (errored), `kiln logs` says why.
    let id = id_of(&b);
    let shown = farm.server.show(id);
    assert_eq!(shown["state"], "errored", "{shown}");
    assert_eq!(shown["jobs"], Value::Array(Vec::new()), "{shown}");
    farm.server.cli(&["show", &id.to_string()]).expect_code(3);
    let logs = farm.server.cli(&["logs", &id.to_string()]);
    assert!(logs.err().contains(".kiln.yml:"), "{logs}");
}

/// A typo in a key (`depnds_on`) and a dependency cycle: each makes an `errored` build with no
/// jobs, whose error names the file, line and column; no runner is ever used.
#[test]
fn pipeline_typo_or_cycle_errors_the_build_with_its_location() {
    let farm = Farm::start();
    let typo = "jobs:
  build:
    steps:
      - name: compile
        run: echo compiled
  test:
    depnds_on: [build]
    steps:
      - name: unit
        run: echo tested
";
    expect_pipeline_error(&farm, "typo", typo, "7:5", "depnds_on");

    // a -> c -> b -> a: reported at the first value in the file that lies on the cycle, `c`
    // of a's depends_on (line 3, column 18).
    let cycle = "jobs:
  a:
    depends_on: [c]
    steps:
      - {name: s, run: echo a}
  b:
    depends_on: [a]
    steps:
      - {name: s, run: echo b}
  c:
    depends_on: b
    steps:
      - {name: s, run: echo c}
";
    expect_pipeline_error(&farm, "cycle", cycle, "3:18", "cycle");

    // No runner was used: both idle, neither ever held a job.
    let runners = farm.server.cli(&["--json", "runners"]);
    runners.expect_code(0);
    for r in runners.json()["runners"].as_array().unwrap() {
        assert_eq!(r["state"], "idle", "{r}");
        assert_eq!(r["running_jobs"], Value::Array(Vec::new()), "{r}");
    }
    // Their checkouts, and the mirror cache they share.
    for (name, sub) in [
        ("r1", "work-r1/checkouts"),
        ("r2", "work-r2/checkouts"),
        ("r1 or r2", "runner-cache"),
    ] {
        let dir = farm.dir().join(sub);
        let used: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(
            used.is_empty(),
            "runner {name} fetched or checked out something: {} holds {used:?}",
            dir.display()
        );
    }
}

/// Without a `.kiln.yml`, a packaged Python project whose tests import it by name (src layout,
/// so a bare `python3 -m unittest discover -s tests` cannot import it: the false red build) is
/// set up as its ecosystem does it: a venv in the checkout, `pip install -e .`, then its tests;
/// `kiln show` says what was detected and why. A tree kiln knows nothing of errors the build
/// with a `.kiln.yml` to start from.
#[test]
fn a_detected_python_project_is_installed_before_its_tests() {
    let farm = Farm::start();
    let repo = Repo::init(&farm.dir().join("pyproj"));
    let sha = repo.commit(
        &[
            (
                "pyproject.toml",
                b"[build-system]\nrequires = [\"setuptools>=61\"]\n\
                  build-backend = \"setuptools.build_meta\"\n\n\
                  [project]\nname = \"kilnsample\"\nversion = \"0.1\"\n",
            ),
            (
                "src/kilnsample/__init__.py",
                b"def double(x):\n    return 2 * x\n",
            ),
            (
                "tests/test_sample.py",
                b"import unittest\n\nimport kilnsample\n\n\n\
                  class T(unittest.TestCase):\n    def test_double(self):\n        \
                  self.assertEqual(kilnsample.double(2), 4)\n",
            ),
        ],
        "a packaged project",
    );
    let id = id_of(&farm.submit(&repo, &sha, "main"));
    let b = farm.server.wait_final(id, LONG);
    let show = farm.server.cli(&["show", &id.to_string()]);
    assert_eq!(b["state"], "passed", "{b}\n{show}");
    assert!(
        show.out()
            .contains("pipeline: no .kiln.yml: detected a Python project (pyproject.toml"),
        "{show}"
    );
    assert!(
        b["pipeline"]
            .as_str()
            .unwrap()
            .contains("pyproject.toml; no pytest: unittest"),
        "{b}"
    );
    let shown = farm.server.show(id);
    let steps: Vec<&str> = shown["jobs"][0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["setup", "test"], "{shown}");
    let logs = farm.server.cli(&["logs", &id.to_string()]);
    assert!(
        logs.out().contains("Ran 1 test") || logs.err().contains("Ran 1 test"),
        "{logs}"
    );

    // Nothing kiln knows: an errored build whose error shows a file to start from.
    let other = Repo::init(&farm.dir().join("plain"));
    let sha = other.commit(&[("README.md", b"hello\n")], "no code");
    let b = farm.submit(&other, &sha, "main");
    assert_eq!(b["state"], "errored", "{b}");
    let error = b["error"].as_str().unwrap();
    assert!(error.contains("start from this `.kiln.yml`"), "{error}");
    assert!(error.contains("steps:\n  - name: test\n"), "{error}");
}

/// `kiln submit -f` follows every job of a build at once: the second job's output appears
/// while the first job (followed first before) is still running, each line prefixed by its
/// job (no colour: not a terminal), and the follower ends with the build's status and exits
/// with its code. `kiln logs -f BUILD --job NAME` follows one job, without prefixes.
#[test]
fn follow_shows_every_job_of_a_build_at_once() {
    let farm = Farm::start();
    let go = farm.dir().join("go");
    let pipeline = format!(
        r#"jobs:
  slow:
    steps:
      - name: wait
        run: {slow}
  fast:
    steps:
      - name: talk
        run: {fast}
"#,
        slow = q(&format!(
            "echo slow-begins; {}; printf 'slow-%s\\n' ends",
            wait_flag_sh(&go)
        )),
        fast = q("echo fast-says-hi; echo fast-complains >&2; exit 4"),
    );
    let (repo, sha) = farm.repo("both", &pipeline);
    let mut follower = farm.server.spawn_cli(
        "kiln submit -f",
        &[
            "submit",
            "--repo",
            repo.path_str(),
            "--commit",
            &sha,
            "--branch",
            "main",
            "-f",
        ],
    );
    // `fast` ends while `slow` waits for the flag, which only this test writes.
    follower.wait_stdout(b"[fast] fast-complains\n", LONG);
    assert!(!go.exists());
    assert!(
        !contains(&follower.stdout(), b"slow-ends"),
        "{:?}",
        String::from_utf8_lossy(&follower.stdout())
    );
    assert!(
        follower.try_status().is_none(),
        "the follower exited before the build ended"
    );
    std::fs::write(&go, b"").unwrap();
    let out = follower.wait(LONG);
    out.expect_code(1);
    let text = out.out();
    let id: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no build id: {out}"));
    for line in [
        "[slow] slow-begins\n",
        "[slow] slow-ends\n",
        "[fast] fast-says-hi\n",
        "[fast] fast-complains\n",
    ] {
        assert!(text.contains(line), "{line:?} missing: {out}");
    }
    assert!(!text.contains('\x1b'), "colour on a pipe: {out}");
    assert!(
        text.ends_with(&format!("kiln: build {id} failed (fast failed)\n")),
        "{out}"
    );

    // One job: its output as is, its status.
    let one = farm
        .server
        .cli(&["logs", "-f", &id.to_string(), "--job", "slow"]);
    one.expect_code(0);
    assert!(one.out().contains("\nslow-ends\n"), "{one}");
    assert!(!one.out().contains("[slow]"), "{one}");
    assert!(
        one.out()
            .ends_with(&format!("kiln: job slow of build {id} passed\n")),
        "{one}"
    );
    // The stored output of the whole build, prefixed, without following.
    let all = farm.server.cli(&["logs", &id.to_string()]);
    all.expect_code(1);
    assert!(all.out().contains("[fast] fast-complains\n"), "{all}");
    assert!(all.out().contains("[slow] slow-ends\n"), "{all}");
}

const PYTEST_SUITE: &str = "def test_adds():\n    assert 1 + 1 == 2\n\ndef test_breaks():\n    assert 1 + 1 == 3, 'arithmetic is broken'\n";

/// A plain step (not split) names its JUnit files with `junit:`: after it fails (a real pytest
/// run with one failing test) kiln reads them, and `kiln tests`, `kiln show` and
/// `GET /builds/N/junit.xml` give its cases (one testsuite for the step). A build without any
/// report answers 404 there rather than an empty report that reads as success.
#[test]
fn a_plain_steps_junit_files_are_its_test_report() {
    let farm = Farm::start();
    let pipeline = "steps:\n  - name: test\n    run: mkdir -p reports && python3 -m pytest -q -p no:cacheprovider tests --junitxml=reports/pytest.xml\n    junit: reports/*.xml\n  - name: after\n    run: echo after\n    post: always\n";
    let repo = Repo::init(&farm.dir().join("junit"));
    let sha = repo.commit(
        &[
            (".kiln.yml", pipeline.as_bytes()),
            ("tests/test_math.py", PYTEST_SUITE.as_bytes()),
        ],
        "suite",
    );
    let id = id_of(&farm.submit(&repo, &sha, "main"));
    let b = farm.server.wait_final(id, LONG);
    assert_eq!(b["state"], "failed", "{b}");

    let tests = farm.server.cli(&["tests", &id.to_string()]);
    let text = tests.out();
    assert!(
        text.contains("step pipeline/test (junit): 2 test cases: 1 passed, 1 failed, 0 skipped"),
        "{tests}"
    );
    assert!(
        text.contains("failed: tests.test_math test_breaks: AssertionError: arithmetic is broken"),
        "{tests}"
    );
    let json = farm
        .server
        .cli(&["--json", "tests", &id.to_string()])
        .json();
    let step = json
        .as_array()
        .and_then(|a| a.iter().find(|r| r["kind"] == "junit"))
        .unwrap_or_else(|| panic!("no junit report in {json}"));
    let names: Vec<&str> = step["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["test_adds", "test_breaks"], "{json}");
    let show = farm.server.cli(&["show", &id.to_string()]);
    assert!(show.out().contains("test_breaks"), "{show}");

    let xml = farm.server.cli(&["tests", &id.to_string(), "--junit", "-"]);
    let (status, body) = http_get(&format!("{}/builds/{id}/junit.xml", farm.server.url), &[]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(body, xml.out());
    assert!(
        body.contains(r#"tests="2""#) && body.contains(r#"failures="1""#),
        "{body}"
    );
    assert!(body.contains(r#"name="test_breaks""#), "{body}");
    assert!(body.contains("arithmetic is broken"), "{body}");

    // No split step and no `junit`: no report, a 404 (and `kiln tests --junit` says so).
    let (repo, sha) = farm.repo("plain", "steps:\n  - name: ok\n    run: echo ok\n");
    let id = id_of(&farm.submit(&repo, &sha, "main"));
    assert_eq!(farm.server.wait_final(id, LONG)["state"], "passed");
    let (status, body) = http_get(&format!("{}/builds/{id}/junit.xml", farm.server.url), &[]);
    assert_eq!(status, "404", "{body}");
    assert!(body.contains("has no test report"), "{body}");
    let out = farm.server.cli(&["tests", &id.to_string(), "--junit", "-"]);
    assert_eq!(out.code(), 4, "{out}");
    assert!(out.out().is_empty(), "{out}");

    // A step whose `junit` matches no file gives no report either.
    let (repo, sha) = farm.repo(
        "nofile",
        "steps:\n  - name: ok\n    run: echo ok\n    junit: reports/*.xml\n",
    );
    let id = id_of(&farm.submit(&repo, &sha, "main"));
    assert_eq!(farm.server.wait_final(id, LONG)["state"], "passed");
    let (status, body) = http_get(&format!("{}/builds/{id}/junit.xml", farm.server.url), &[]);
    assert_eq!(status, "404", "{body}");
    let tests = farm.server.cli(&["tests", &id.to_string()]);
    assert!(
        tests.out().contains("no file matches reports/*.xml"),
        "{tests}"
    );
}

//! Split steps end to end: one test suite split over several real `kiln runner` processes by
//! the dispatcher's unit queue, with real pytest, unittest and cargo test suites in git
//! repositories made for the test; a shard's runner killed mid-run; flaky and broken tests with
//! retries.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use kiln_testkit::*;
use nix::sys::signal::Signal;

const SPLIT_TIMEOUT: Duration = Duration::from_secs(180);

/// The `tests` array of `kiln show --json`: the single split of the build.
fn the_split(build: &serde_json::Value) -> &serde_json::Value {
    let splits = build["tests"].as_array().expect("tests array");
    assert_eq!(splits.len(), 1, "{build}");
    &splits[0]
}

fn units(split: &serde_json::Value) -> &Vec<serde_json::Value> {
    split["units"].as_array().expect("units")
}

/// Test cases (classname::name -> outcome) of the last try of every unit.
fn case_outcomes(split: &serde_json::Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for u in units(split) {
        let last = u["tries"].as_array().unwrap().last().unwrap();
        for c in last["cases"].as_array().unwrap() {
            let name = format!(
                "{}::{}",
                c["classname"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            );
            let outcome = if c["skipped"].as_bool().unwrap() {
                "skipped".to_string()
            } else {
                c["outcome"].as_str().unwrap().to_string()
            };
            assert!(out.insert(name.clone(), outcome).is_none(), "{name} twice");
        }
    }
    out
}

/// A pytest suite: `files` test files with 3 tests each, some failing, some skipped, with
/// different durations.
fn pytest_suite(files: usize) -> Vec<(String, String)> {
    (0..files)
        .map(|f| {
            let mut text = String::from("import time\nimport pytest\n\n");
            for t in 0..3 {
                let sleep = 0.02 * ((f * 7 + t * 3) % 11) as f64;
                let body = match (f + t) % 7 {
                    0 => "    assert 1 + 1 == 3, 'arithmetic is broken'".to_string(),
                    3 => "    pytest.skip('not here')".to_string(),
                    _ => "    assert True".to_string(),
                };
                text.push_str(&format!(
                    "def test_{f}_{t}():\n    time.sleep({sleep:.2})\n{body}\n\n"
                ));
            }
            (format!("tests/test_mod{f:02}.py"), text)
        })
        .collect()
}

fn commit_files(repo: &Repo, files: &[(String, String)], pipeline: &str) -> String {
    let mut all: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(p, t)| (p.as_str(), t.as_bytes()))
        .collect();
    all.push((".kiln.yml", pipeline.as_bytes()));
    repo.commit(&all, "suite")
}

/// Per-test outcomes of running the whole suite in one pytest process, from its JUnit XML.
fn one_process_outcomes(dir: &Path) -> BTreeMap<String, String> {
    let xml = dir.join("reference.xml");
    let out = std::process::Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml"])
        .arg(&xml)
        .arg("tests")
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.code() == Some(1),
        "the suite has failing tests: {out:?}"
    );
    let text = std::fs::read_to_string(&xml).unwrap();
    let cases = kiln_junit::read_cases(&text).unwrap();
    cases
        .into_iter()
        .map(|c| {
            let outcome = if c.skipped {
                "skipped"
            } else {
                c.outcome.as_str()
            };
            (format!("{}::{}", c.classname, c.name), outcome.to_string())
        })
        .collect()
}

#[test]
fn pytest_suite_split_over_three_runners_matches_one_process() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let mut runners: Vec<Proc> = (1..=3)
        .map(|i| server.runner(tmp.path(), &format!("r{i}"), &[]))
        .collect();
    server.wait_runners_attached(&["r1", "r2", "r3"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let files = pytest_suite(14);
    let sha = commit_files(
        &repo,
        &files,
        "steps:\n  - name: tests\n    run: python3 -m pytest -q -p no:cacheprovider --junitxml={junit} {units}\n    parallel: 3\n    units:\n      glob: tests/test_*.py\n",
    );
    let b = server.submit(&repo.path, &sha);
    let build = server.wait_final(id_of(&b), SPLIT_TIMEOUT);
    assert_eq!(build["state"], "failed", "{build}");
    let jobs = build["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{build}");
    let split = the_split(&build);
    assert_eq!(split["done"], true);
    assert_eq!(split["passed"], false);
    assert_eq!(units(split).len(), 14);
    // Every unit ran exactly once, and the three runners all took units.
    let mut by_runner = BTreeMap::new();
    for u in units(split) {
        let tries = u["tries"].as_array().unwrap();
        assert_eq!(tries.len(), 1, "{u}");
        *by_runner
            .entry(tries[0]["runner"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    assert_eq!(by_runner.len(), 3, "units per runner: {by_runner:?}");
    // The same per-test outcomes as one pytest process over the whole suite.
    let reference = one_process_outcomes(&repo.path);
    assert_eq!(reference.len(), 42);
    assert_eq!(case_outcomes(split), reference);
    // The merged JUnit report holds every test case.
    let xml = server.cli(&["tests", &id_of(&b).to_string(), "--junit", "-"]);
    assert_eq!(xml.code(), 1, "{xml}");
    assert_eq!(xml.out().matches("<testcase ").count(), 42, "{xml}");
    // Failure messages and tracebacks as pytest wrote them, through runners, dispatcher and
    // store into the merged report.
    let texts = |xml: &str| -> BTreeMap<String, (String, String)> {
        kiln_junit::read_cases(xml)
            .unwrap()
            .into_iter()
            .filter(|c| c.outcome.as_str() == "failed")
            .map(|c| (format!("{}::{}", c.classname, c.name), (c.message, c.body)))
            .collect()
    };
    let reference_xml = std::fs::read_to_string(repo.path.join("reference.xml")).unwrap();
    let expected = texts(&reference_xml);
    assert!(!expected.is_empty());
    for (message, body) in expected.values() {
        assert!(message.contains('\n'), "{message:?}");
        assert!(body.contains("AssertionError"), "{body:?}");
    }
    assert_eq!(texts(&xml.out()), expected, "{xml}");
    for r in &mut runners {
        r.kill_all();
    }
}

#[test]
fn rust_tests_split_by_a_discovery_command() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let mut lib = String::new();
    for i in 0..8 {
        let assertion = if i == 5 { "1 + 1, 3" } else { "1 + 1, 2" };
        lib.push_str(&format!(
            "#[test]\nfn case_{i}() {{ std::thread::sleep(std::time::Duration::from_millis({})); assert_eq!({assertion}); }}\n",
            20 * i
        ));
    }
    let pipeline = r#"
steps:
  - name: build
    run: cargo build --tests --quiet --offline
  - name: tests
    run: cargo test --quiet --offline -- --exact {units}
    parallel: 2
    units:
      command: "cargo test --quiet --offline -- --list --format terse | sed -n 's/: test$//p'"
"#;
    let sha = repo.commit(
        &[
            (
                "Cargo.toml",
                b"[package]\nname = \"suite\"\nversion = \"0.1.0\"\nedition = \"2021\"\n[workspace]\n",
            ),
            ("src/lib.rs", lib.as_bytes()),
            (".kiln.yml", pipeline.as_bytes()),
        ],
        "rust suite",
    );
    let b = server.submit(&repo.path, &sha);
    let build = server.wait_final(id_of(&b), SPLIT_TIMEOUT);
    assert_eq!(build["state"], "failed", "{build}");
    let split = the_split(&build);
    let verdicts: BTreeMap<String, String> = units(split)
        .iter()
        .map(|u| {
            (
                u["unit"].as_str().unwrap().to_string(),
                u["verdict"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeMap<String, String> = (0..8)
        .map(|i| {
            (
                format!("case_{i}"),
                if i == 5 { "failed" } else { "passed" }.to_string(),
            )
        })
        .collect();
    assert_eq!(verdicts, expected, "{build}");
}

/// A suite of shell-script units that sleep, for the fault test.
fn sleepy_suite(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("suite/u{i:02}.sh"),
                format!("sleep 0.{}\necho unit {i} done\n", 3 + i % 5),
            )
        })
        .collect()
}

#[test]
fn killing_a_shards_runner_loses_no_unit_and_counts_none_twice() {
    let tmp = tempdir();
    let server = Server::start(
        &tmp.path().join("data"),
        &["--heartbeat-interval", "300ms", "--missed-heartbeats", "3"],
    );
    let r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    let _r3 = server.runner(tmp.path(), "r3", &[]);
    server.wait_runners_attached(&["r1", "r2", "r3"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let files = sleepy_suite(30);
    let sha = commit_files(
        &repo,
        &files,
        "steps:\n  - name: tests\n    run: 'for u in {units}; do sh \"$u\" || exit 1; done'\n    parallel: 3\n    units:\n      glob: suite/*.sh\n      max_batch: 1\n",
    );
    let b = server.submit(&repo.path, &sha);
    let id = id_of(&b);
    // Kill r1 once it has finished a unit and holds another one.
    server.wait_build(id, "r1 to have run a unit", SPLIT_TIMEOUT, |b| {
        b["tests"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                units(s).iter().any(|u| {
                    u["tries"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|t| t["runner"] == "r1" && t["outcome"] == "passed")
                })
            })
        })
    });
    r1.signal(Signal::SIGKILL);
    // A late runner joins and takes the lost shard.
    let _r4 = server.runner(tmp.path(), "r4", &[]);
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "passed", "{build}");
    let lost: u64 = build["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["lost_attempts"].as_u64().unwrap())
        .sum();
    assert!(lost >= 1, "the killed runner's shard was not lost: {build}");
    let split = the_split(&build);
    assert_eq!(units(split).len(), 30);
    for u in units(split) {
        let tries = u["tries"].as_array().unwrap();
        assert_eq!(tries.len(), 1, "unit counted more than once: {u}");
        assert_eq!(tries[0]["outcome"], "passed", "{u}");
        assert_eq!(u["verdict"], "passed");
    }
}

/// A unittest suite: `n` passing files plus the given extra files.
fn unittest_suite(n: usize, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = (0..n)
        .map(|i| {
            (
                format!("tests/test_ok{i}.py"),
                format!(
                    "import unittest\n\nclass Ok{i}(unittest.TestCase):\n    def test_ok(self):\n        self.assertEqual({i} + 1, {})\n",
                    i + 1
                ),
            )
        })
        .collect();
    files.extend(extra.iter().map(|(p, t)| (p.to_string(), t.to_string())));
    files
}

const FLAKY: &str = "import os\nimport unittest\n\nclass Flaky(unittest.TestCase):\n    def test_sometimes(self):\n        # fails on the first try only\n        self.assertNotEqual(os.environ.get('KILN_UNIT_TRY'), '1')\n";
const BROKEN: &str = "import unittest\n\nclass Broken(unittest.TestCase):\n    def test_never(self):\n        self.assertEqual(1, 2)\n";

const RETRY_PIPELINE: &str = "steps:\n  - name: tests\n    run: python3 -m unittest {units}\n    parallel: 2\n    units:\n      glob: tests/test_*.py\n    retry:\n      attempts: 3\n      max_failures: MAXF\n";

fn verdict_of<'a>(split: &'a serde_json::Value, unit: &str) -> &'a serde_json::Value {
    units(split)
        .iter()
        .find(|u| u["unit"] == unit)
        .unwrap_or_else(|| panic!("no unit {unit} in {split}"))
}

#[test]
fn flaky_tests_pass_and_are_listed_broken_ones_fail_and_thresholds_stop_retries() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);
    let repo = Repo::init(&tmp.path().join("repo"));

    // 1. A flaky test: the build passes and lists it as flaky.
    let files = unittest_suite(5, &[("tests/test_flaky.py", FLAKY)]);
    let sha = commit_files(&repo, &files, &RETRY_PIPELINE.replace("MAXF", "3"));
    let id = id_of(&server.submit(&repo.path, &sha));
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "passed", "{build}");
    let split = the_split(&build);
    let flaky = verdict_of(split, "tests/test_flaky.py");
    assert_eq!(flaky["verdict"], "flaky", "{flaky}");
    assert_eq!(flaky["tries"].as_array().unwrap().len(), 2, "{flaky}");
    assert_eq!(flaky["flaky_history"], 1, "{flaky}");
    for i in 0..5 {
        let ok = verdict_of(split, &format!("tests/test_ok{i}.py"));
        assert_eq!(ok["verdict"], "passed");
        assert_eq!(
            ok["tries"].as_array().unwrap().len(),
            1,
            "only failures rerun"
        );
    }
    let text = server.cli(&["show", &id.to_string()]);
    assert!(text.out().contains("flaky: tests/test_flaky.py"), "{text}");
    let xml = server.cli(&["tests", &id.to_string(), "--junit", "-"]);
    assert!(xml.out().contains("<flakyFailure"), "{xml}");
    // The same report as a plain HTTP download on the API's port; an unknown build is a 404.
    let (status, body) = http_get(&format!("{}/builds/{id}/junit.xml", server.url), &[]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(body, xml.out());
    let (status, _) = http_get(&format!("{}/builds/9999/junit.xml", server.url), &[]);
    assert_eq!(status, "404");

    // 2. A broken test next to the flaky one: the build fails, the broken test is failed (every
    // try), never flaky; the flaky one is still flaky.
    let files = unittest_suite(
        5,
        &[
            ("tests/test_flaky.py", FLAKY),
            ("tests/test_broken.py", BROKEN),
        ],
    );
    let sha = commit_files(&repo, &files, &RETRY_PIPELINE.replace("MAXF", "3"));
    let id = id_of(&server.submit(&repo.path, &sha));
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "failed", "{build}");
    let split = the_split(&build);
    let broken = verdict_of(split, "tests/test_broken.py");
    assert_eq!(broken["verdict"], "failed", "{broken}");
    let tries = broken["tries"].as_array().unwrap();
    assert!(tries.len() >= 2, "{broken}");
    assert!(tries.iter().all(|t| t["outcome"] == "failed"), "{broken}");
    assert_eq!(verdict_of(split, "tests/test_flaky.py")["verdict"], "flaky");
    assert_eq!(
        verdict_of(split, "tests/test_flaky.py")["flaky_history"],
        2,
        "flaky history counts both builds"
    );
    let xml = server.cli(&["tests", &id.to_string(), "--junit", "-"]);
    assert!(xml.out().contains("<rerunFailure"), "{xml}");

    // 3. More failures than the threshold: nothing is retried.
    let many: Vec<(String, String)> = (0..4)
        .map(|i| (format!("tests/test_bad{i}.py"), BROKEN.to_string()))
        .collect();
    let mut files = unittest_suite(2, &[("tests/test_flaky.py", FLAKY)]);
    files.extend(many);
    let sha = commit_files(&repo, &files, &RETRY_PIPELINE.replace("MAXF", "2"));
    let id = id_of(&server.submit(&repo.path, &sha));
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "failed", "{build}");
    let split = the_split(&build);
    assert_eq!(split["rounds"], 1, "{split}");
    for u in units(split) {
        assert_eq!(u["tries"].as_array().unwrap().len(), 1, "retried: {u}");
        assert_ne!(u["verdict"], "flaky", "{u}");
    }
    assert!(
        split["retry_note"].as_str().unwrap().contains("threshold"),
        "{split}"
    );
}

#[test]
fn a_runner_failing_units_others_pass_is_taken_out_of_the_pool() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);
    // A runner on a broken machine: every unit fails there.
    let work = tmp.path().join("work-bad");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
    cmd.args([
        "--dispatcher",
        &server.url,
        "runner",
        "--name",
        "bad",
        "--work-dir",
        work.to_str().unwrap(),
        "--pass-env",
        "KILN_TEST_BROKEN_MACHINE",
    ])
    .env("KILN_TEST_BROKEN_MACHINE", "1");
    let _bad = Proc::spawn("kiln runner bad", cmd);
    server.wait_runners_attached(&["bad"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let files: Vec<(String, String)> = (0..40)
        .map(|i| {
            (
                format!("suite/u{i:02}.sh"),
                "sleep 0.1\n[ -z \"$KILN_TEST_BROKEN_MACHINE\" ]\n".to_string(),
            )
        })
        .collect();
    let sha = commit_files(
        &repo,
        &files,
        "steps:\n  - name: tests\n    run: 'for u in {units}; do sh \"$u\" || exit 1; done'\n    parallel: 3\n    units:\n      glob: suite/*.sh\n      max_batch: 1\n",
    );
    let id = id_of(&server.submit(&repo.path, &sha));
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "passed", "{build}");
    let runners = server.cli(&["--json", "runners"]).json();
    let bad = runners["runners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "bad")
        .unwrap()
        .clone();
    assert_eq!(bad["state"], "draining", "{runners}");
    // The failures on the broken machine did not count: every unit passed once, elsewhere.
    for u in units(the_split(&build)) {
        let tries = u["tries"].as_array().unwrap();
        assert_eq!(tries.len(), 1, "{u}");
        assert_ne!(tries[0]["runner"], "bad", "{u}");
        assert_eq!(tries[0]["outcome"], "passed", "{u}");
        assert_eq!(u["verdict"], "passed", "{u}");
    }
}

#[test]
fn a_dispatcher_crash_mid_split_loses_no_unit_and_counts_none_twice() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    let extra = ["--heartbeat-interval", "300ms"];
    let mut server = Server::start(&data, &extra);
    let addr = server.addr.clone();
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    let _r2 = server.runner(tmp.path(), "r2", &[]);
    server.wait_runners_attached(&["r1", "r2"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let sha = commit_files(
        &repo,
        &sleepy_suite(24),
        "steps:\n  - name: tests\n    run: 'for u in {units}; do sh \"$u\" || exit 1; done'\n    parallel: 2\n    units:\n      glob: suite/*.sh\n      max_batch: 2\n",
    );
    let id = id_of(&server.submit(&repo.path, &sha));
    server.wait_build(id, "some units to have run", SPLIT_TIMEOUT, |b| {
        b["tests"].as_array().is_some_and(|s| {
            s.iter().any(|s| {
                units(s)
                    .iter()
                    .filter(|u| u["tries"][0]["outcome"] == "passed")
                    .count()
                    >= 4
            })
        })
    });
    // SIGKILL: whatever was accepted must be in the store already.
    server.proc.signal(Signal::SIGKILL);
    server.proc.wait(LONG);
    drop(server);
    let server = kiln_testkit::fault::restart_dispatcher_on(&addr, &data, &extra);
    let build = server.wait_final(id, SPLIT_TIMEOUT);
    assert_eq!(build["state"], "passed", "{build}");
    let split = the_split(&build);
    assert_eq!(units(split).len(), 24);
    for u in units(split) {
        let tries = u["tries"].as_array().unwrap();
        assert_eq!(tries.len(), 1, "unit counted more than once: {u}");
        assert_eq!(tries[0]["outcome"], "passed", "{u}");
    }
}

/// `test_a.py` breaks an import of `test_b.py` when both run in one pytest process (pytest
/// exits 2 on the collection error); alone, each passes.
const TOGETHER_A: &str = "import sys\n\n# A side effect of importing this file: later imports of decimal fail.\nsys.modules['decimal'] = None\n\n\ndef test_a():\n    assert True\n";
const TOGETHER_B: &str =
    "import decimal\n\n\ndef test_b():\n    assert decimal.Decimal('1.5') * 2 == 3\n";
const TOGETHER_C: &str = "def test_c():\n    assert 1 + 1 == 2\n";

/// Two test files fail only together: the batch fails without naming a failed test, each unit
/// passes alone, and the build reports an interaction failure (with the batch's units) in
/// `kiln show`, `kiln tests` and the JUnit report; `interaction: warn` (the default) passes
/// the build, `interaction: fail` fails it.
#[test]
fn files_failing_only_together_are_an_interaction_failure() {
    let tmp = tempdir();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let files: Vec<(String, String)> = [
        ("tests/test_a.py", TOGETHER_A),
        ("tests/test_b.py", TOGETHER_B),
        ("tests/test_c.py", TOGETHER_C),
    ]
    .iter()
    .map(|(p, t)| (p.to_string(), t.to_string()))
    .collect();
    let pipeline = "steps:\n  - name: tests\n    run: python3 -m pytest -q -p no:cacheprovider --junitxml={junit} {units}\n    units:\n      glob: tests/test_*.py\n";
    let key = {
        let p = kiln_pipeline::parse(kiln_pipeline::FILE_NAME, pipeline).unwrap();
        kiln_pipeline::plan(&p, "main")
            .unwrap()
            .into_iter()
            .find_map(|j| j.shard.map(|s| s.key))
            .unwrap()
    };
    // Two repositories (one per policy), each with a history of short units so that the
    // three files go in one batch, in discovery order.
    let repos: Vec<Repo> = ["warn", "fail"]
        .iter()
        .map(|p| Repo::init(&tmp.path().join(p)))
        .collect();
    {
        let store = kiln_store::SqliteStore::open(&data.join("kiln.db")).unwrap();
        let history: Vec<(String, u64)> = files.iter().map(|(p, _)| (p.clone(), 10)).collect();
        for r in &repos {
            store
                .seed_unit_durations(r.path.to_str().unwrap(), &key, &history)
                .unwrap();
        }
    }
    let server = Server::start(&data, &[]);
    let _r1 = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);

    for (repo, policy) in repos.iter().zip(["warn", "fail"]) {
        let text = if policy == "fail" {
            format!("{pipeline}    interaction: fail\n")
        } else {
            pipeline.to_string()
        };
        let sha = commit_files(repo, &files, &text);
        let id = id_of(&server.submit(&repo.path, &sha));
        let build = server.wait_final(id, SPLIT_TIMEOUT);
        let expected = if policy == "fail" { "failed" } else { "passed" };
        assert_eq!(build["state"], expected, "{policy}: {build}");
        let split = the_split(&build);
        assert!(
            units(split).iter().all(|u| u["verdict"] == "passed"),
            "each unit passed alone: {split}"
        );
        assert_eq!(split["interaction_policy"], policy, "{split}");
        let interactions = split["interactions"].as_array().unwrap();
        assert_eq!(interactions.len(), 1, "{split}");
        let batch: Vec<&str> = interactions[0]["units"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u.as_str().unwrap())
            .collect();
        assert_eq!(
            batch,
            ["tests/test_a.py", "tests/test_b.py", "tests/test_c.py"],
            "{split}"
        );
        assert_eq!(interactions[0]["detail"], "exited with code 2", "{split}");
        assert_eq!(interactions[0]["runner"], "r1", "{split}");

        let show = server.cli(&["show", &id.to_string()]);
        assert!(
            show.out().contains("interaction failure")
                && show
                    .out()
                    .contains("tests/test_a.py, tests/test_b.py, tests/test_c.py"),
            "{show}"
        );
        let tests = server.cli(&["tests", &id.to_string()]);
        assert!(tests.out().contains("interaction failure"), "{tests}");
        let xml = server.cli(&["tests", &id.to_string(), "--junit", "-"]);
        let doc = xml.out();
        assert!(
            doc.contains("interaction: tests/test_a.py + tests/test_b.py + tests/test_c.py"),
            "{xml}"
        );
        if policy == "fail" {
            assert!(
                doc.contains("<failure") && doc.contains("type=\"interaction\""),
                "{xml}"
            );
        } else {
            assert!(doc.contains("<flakyFailure"), "{xml}");
            assert!(!doc.contains("<failure"), "{xml}");
        }
    }
}

/// Issue 9 item 11: a suite of fast test files whose process takes far longer to start than
/// its tests run must not get one process per file. The first batch (nothing known) has one
/// file; its process's start cost (wall time less its test cases' times) and the file's own
/// time then size the next batches, so the 12 files run in a few processes, not 12.
#[test]
fn fast_files_share_a_process_once_its_start_cost_is_seen() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let mut runner = server.runner(tmp.path(), "r1", &[]);
    server.wait_runners_attached(&["r1"]);
    let repo = Repo::init(&tmp.path().join("repo"));
    let files: Vec<(String, String)> = (0..12)
        .map(|f| {
            (
                format!("tests/test_fast{f:02}.py"),
                format!("def test_{f}_a():\n    assert True\n\n\ndef test_{f}_b():\n    assert 1 + 1 == 2\n"),
            )
        })
        .collect();
    let sha = commit_files(
        &repo,
        &files,
        "steps:\n  - name: tests\n    run: python3 -m pytest -q -p no:cacheprovider --junitxml={junit} {units}\n    parallel: 1\n    units:\n      glob: tests/test_*.py\n",
    );
    let b = server.submit(&repo.path, &sha);
    let build = server.wait_final(id_of(&b), SPLIT_TIMEOUT);
    assert_eq!(build["state"], "passed", "{build}");
    assert_eq!(units(the_split(&build)).len(), 12);
    let logs = server.cli(&["logs", &id_of(&b).to_string()]);
    let batches = logs
        .out()
        .lines()
        .filter(|l| l.contains("kiln: batch ") && l.contains(" (try 1): "))
        .count();
    assert!(
        (2..=3).contains(&batches),
        "12 fast files in {batches} processes:\n{}",
        logs.out()
    );
    runner.kill_all();
}

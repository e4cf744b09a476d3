//! `kiln-bench split --suite DIR`: a real project's test suite, split by kiln against the same
//! tests in one process.
//!
//! `DIR` is a git checkout whose committed `.kiln.yml` has a split step (glob units). Its
//! direct run is that step's `run` with `{units}` replaced by every unit the glob finds in
//! `DIR` and `{junit}` by a scratch file, run with `sh -c` in `DIR` with the step's `env` (or
//! `--direct CMD`). The split runs on a fresh `kiln serve` child and as many fresh `kiln
//! runner` children (one slot each) as the step has shards, all on this machine. One build of
//! `DIR`'s HEAD runs first, unmeasured: it fills the runners' mirrors and work trees and gives
//! the dispatcher the units' durations and the per-process start cost, as a farm has them from
//! the step's earlier builds. Then `--suite-runs` rounds, each a direct run then a build of the
//! same commit (interleaved, so a change in the machine's load hits both); medians.
//! Measured: direct = the process's wall time; kiln = the build's `created_at` to
//! `finished_at`. Goal: kiln at most 1.5x direct.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::super::util::{
    Proc, Scratch, fail, figure, header, is_final, ms, note, secs, sorted, spawn_runner, tail,
    wait_idle, wrong,
};
use super::SplitArgs;
use crate::BenchError;
use kiln::proto::{self, JobState, build_service_client::BuildServiceClient};

/// The goal: the split at most this many times the direct run.
const GOAL: f64 = 1.5;

/// What the benchmark needs to know of the checkout.
#[derive(Debug, Clone)]
struct Checkout {
    /// Canonical path (what is submitted).
    dir: PathBuf,
    /// HEAD's commit id.
    commit: String,
    /// HEAD's branch (`main` when detached).
    branch: String,
    /// The split step's shards.
    shards: u32,
    /// The split step's key.
    key: String,
    /// The direct run's command.
    direct: String,
    /// Its environment (the step's `env`).
    env: Vec<(String, String)>,
    /// Units the glob finds.
    units: usize,
}

/// Reads `dir`'s HEAD and its committed `.kiln.yml`.
fn inspect(dir: &Path, direct: Option<&str>, scratch: &Path) -> Result<Checkout, BenchError> {
    let dir =
        std::fs::canonicalize(dir).map_err(|e| fail(format!("--suite {}: {e}", dir.display())))?;
    let repo = git2::Repository::open(&dir).map_err(|e| {
        fail(format!(
            "--suite {}: not a git checkout: {e}",
            dir.display()
        ))
    })?;
    let head = repo
        .head()
        .map_err(|e| fail(format!("--suite {}: no HEAD: {e}", dir.display())))?;
    let branch = match head.shorthand() {
        Ok(name) if head.is_branch() => name.to_string(),
        _ => "main".to_string(),
    };
    let commit = head.peel_to_commit().map_err(|e| {
        fail(format!(
            "--suite {}: HEAD is not a commit: {e}",
            dir.display()
        ))
    })?;
    let entry = commit
        .tree()
        .and_then(|t| t.get_path(Path::new(kiln_pipeline::FILE_NAME)))
        .map_err(|_| {
            fail(format!(
                "--suite {}: HEAD has no committed {}",
                dir.display(),
                kiln_pipeline::FILE_NAME
            ))
        })?;
    let blob = entry
        .to_object(&repo)
        .and_then(|o| o.peel_to_blob())
        .map_err(|e| fail(format!("{}: {e}", kiln_pipeline::FILE_NAME)))?;
    let text = std::str::from_utf8(blob.content())
        .map_err(|e| fail(format!("{} is not UTF-8: {e}", kiln_pipeline::FILE_NAME)))?;
    let pipeline = kiln_pipeline::parse(kiln_pipeline::FILE_NAME, text)
        .map_err(|e| fail(format!("--suite {}: {e}", dir.display())))?;
    let plan = kiln_pipeline::plan(&pipeline, &branch)
        .map_err(|e| fail(format!("--suite {}: {e}", dir.display())))?;
    let (job, shard) = plan
        .iter()
        .find_map(|j| j.shard.as_ref().map(|s| (j, s)))
        .ok_or_else(|| {
            fail(format!(
                "--suite {}: its {} has no split step (`parallel:` with `units:`)",
                dir.display(),
                kiln_pipeline::FILE_NAME
            ))
        })?;
    let step = job
        .steps
        .iter()
        .find(|s| s.split.is_some())
        .ok_or_else(|| fail("the split job has no split step"))?;
    let globs = match step.split.as_ref().map(|s| &s.units) {
        Some(kiln_domain::split::UnitSource::Glob(g)) => g.clone(),
        _ => Vec::new(),
    };
    let units = if globs.is_empty() {
        Vec::new()
    } else {
        kiln_runner::split::glob_units(&dir, &globs)
            .map_err(|e| fail(format!("--suite {}: {e}", dir.display())))?
    };
    let direct = match direct {
        Some(cmd) => cmd.to_string(),
        None if units.is_empty() => {
            return Err(fail(format!(
                "--suite {}: the split step's units are not a glob that finds files; give the \
                 single-process command with --direct",
                dir.display()
            )));
        }
        None => {
            let junit = scratch.join("direct-junit.xml");
            kiln_runner::split::substitute(&step.run, &units, &junit.to_string_lossy())
                .map_err(|e| fail(format!("--suite {}: {e}", dir.display())))?
        }
    };
    Ok(Checkout {
        dir,
        commit: commit.id().to_string(),
        branch,
        shards: shard.count,
        key: shard.key.clone(),
        direct,
        env: step
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        units: units.len(),
    })
}

/// One direct run: wall time (ms) and whether it passed.
async fn run_direct(c: &Checkout, log: &Path) -> Result<(f64, bool), BenchError> {
    let out = std::fs::File::create(log).map_err(|e| fail(format!("{}: {e}", log.display())))?;
    let err = out.try_clone().map_err(fail)?;
    let mut cmd = tokio::process::Command::new("sh");
    cmd.arg("-c")
        .arg(&c.direct)
        .current_dir(&c.dir)
        .envs(c.env.iter().map(|(k, v)| (k, v)))
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    let t0 = Instant::now();
    let status = cmd
        .status()
        .await
        .map_err(|e| fail(format!("cannot run the direct command: {e}")))?;
    Ok((ms(t0.elapsed()), status.success()))
}

/// Submits HEAD (or, as a commit is built once, retries the build `again` of it) and waits
/// for the build's end (at most `limit`): the build.
async fn run_build(
    client: &mut BuildServiceClient<Channel>,
    c: &Checkout,
    again: Option<u64>,
    limit: Duration,
    log: &Path,
) -> Result<proto::Build, BenchError> {
    let id = match again {
        None => {
            client
                .submit_build(proto::SubmitBuildRequest {
                    repo: c.dir.to_string_lossy().into_owned(),
                    commit: c.commit.clone(),
                    branch: c.branch.clone(),
                    trigger: "bench".into(),
                    env: Default::default(),
                })
                .await
                .map_err(|s| fail(format!("SubmitBuild: {}", s.message())))?
                .into_inner()
                .id
        }
        Some(build_id) => {
            client
                .retry_build(proto::RetryBuildRequest { build_id })
                .await
                .map_err(|s| fail(format!("RetryBuild {build_id}: {}", s.message())))?
                .into_inner()
                .id
        }
    };
    let deadline = Instant::now() + limit;
    loop {
        let b = client
            .get_build(proto::GetBuildRequest { build_id: id })
            .await
            .map_err(|s| fail(format!("GetBuild {id}: {}", s.message())))?
            .into_inner();
        if is_final(b.state) && b.finished_at.is_some() {
            return Ok(b);
        }
        if Instant::now() > deadline {
            return Err(wrong(format!(
                "build {id} did not end within {limit:?}; the dispatcher's log:\n{}",
                tail(log, 20)
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The build's `created_at` to `finished_at`, ms.
fn makespan(b: &proto::Build) -> f64 {
    let at = |t: Option<&prost_types::Timestamp>| t.map(kiln::convert::millis).unwrap_or(0);
    (at(b.finished_at.as_ref()) - at(b.created_at.as_ref())) as f64
}

fn median(values: &[f64]) -> f64 {
    let s = sorted(values);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn list(values: &[f64]) -> String {
    values
        .iter()
        .map(|v| format!("{:.2}", v / 1000.0))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `kiln-bench split --suite DIR`.
pub async fn run(args: &SplitArgs, dir: &Path) -> Result<(), BenchError> {
    let tmp = Scratch::new()?;
    let c = inspect(dir, args.direct.as_deref(), tmp.path())?;
    header(
        "split --suite",
        &format!(
            "{} split over {} runners on this machine vs one process",
            c.dir.display(),
            c.shards
        ),
    );
    note(format!(
        "commit {} ({}), split {} with {} units; {} rounds, interleaved",
        &c.commit[..c.commit.len().min(12)],
        c.branch,
        c.key,
        c.units,
        args.suite_runs
    ));
    note(format!(
        "direct: sh -c {:?} in {}",
        c.direct,
        c.dir.display()
    ));
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).map_err(fail)?;
    let log = tmp.path().join("serve.log");
    let (_serve, url, mut client) = super::start_dispatcher(args, &log, &data).await?;
    let mut runners: Vec<Proc> = Vec::new();
    let mut names = Vec::new();
    for i in 0..c.shards {
        let name = format!("r{i:02}");
        let work = tmp.path().join("work").join(&name);
        let rlog = tmp.path().join(format!("runner-{name}.log"));
        runners.push(spawn_runner(&url, &name, &work, &rlog, &["--slots", "1"])?);
        names.push(name);
    }
    wait_idle(
        &url,
        &names,
        Duration::from_secs(60),
        &tmp.path().join("runner-r00.log"),
    )
    .await?;

    // One unmeasured direct run and build: caches, mirrors, history, start cost.
    let (warm_direct, direct_ok) = run_direct(&c, &tmp.path().join("direct-0.log")).await?;
    let limit = Duration::from_secs(120) + Duration::from_secs_f64(warm_direct / 1000.0 * 20.0);
    let warm = run_build(&mut client, &c, None, limit, &log).await?;
    let mut last = warm.id;
    note(format!(
        "unmeasured first runs: direct {} ({}), build {} {} in {}",
        secs(warm_direct),
        if direct_ok { "passed" } else { "failed" },
        warm.id,
        kiln::convert::state_name(warm.state),
        secs(makespan(&warm))
    ));
    let (mut direct, mut kiln) = (Vec::new(), Vec::new());
    let mut problems = Vec::new();
    for round in 1..=args.suite_runs {
        let (d, ok) = run_direct(&c, &tmp.path().join(format!("direct-{round}.log"))).await?;
        let b = run_build(&mut client, &c, Some(last), limit, &log).await?;
        last = b.id;
        let passed = b.state == JobState::Passed as i32;
        if passed != ok {
            problems.push(format!(
                "round {round}: the direct run {} but build {} {}",
                if ok { "passed" } else { "failed" },
                b.id,
                kiln::convert::state_name(b.state)
            ));
        }
        direct.push(d);
        kiln.push(makespan(&b));
    }
    let (md, mk) = (median(&direct), median(&kiln));
    let ratio = mk / md;
    note(format!("direct, s: {}", list(&direct)));
    note(format!("kiln {} runners, s: {}", c.shards, list(&kiln)));
    println!();
    figure(
        &format!("kiln {} runners / direct (medians)", c.shards),
        format!("{ratio:.2}x"),
        &format!("goal <= {GOAL}x"),
        Some(ratio <= GOAL),
        &format!("kiln {}, direct {}", secs(mk), secs(md)),
    );
    drop(runners);
    if problems.is_empty() {
        Ok(())
    } else {
        for p in &problems {
            note(format!("WRONG: {p}"));
        }
        Err(wrong(problems.join("; ")))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A repository at `dir` with `files` committed on `main`.
    fn repo(dir: &Path, files: &[(&str, &str)]) {
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(dir, &opts).unwrap();
        let mut index = repo.index().unwrap();
        for (path, text) in files {
            let full = dir.join(path);
            std::fs::create_dir_all(full.parent().unwrap()).unwrap();
            std::fs::write(&full, text).unwrap();
            index.add_path(Path::new(path)).unwrap();
        }
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "c", &tree, &[])
            .unwrap();
    }

    #[test]
    fn the_direct_run_is_the_split_step_with_every_unit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("p");
        repo(
            &dir,
            &[
                (
                    ".kiln.yml",
                    "steps:\n  - name: tests\n    run: py -m pytest --junitxml={junit} {units}\n    parallel: 4\n    units:\n      glob: \"tests/test_*.py\"\n    env:\n      A: b\n",
                ),
                ("tests/test_b.py", ""),
                ("tests/test_a.py", ""),
                ("tests/helper.py", ""),
            ],
        );
        let c = inspect(&dir, None, Path::new("/scratch")).unwrap();
        assert_eq!(c.shards, 4);
        assert_eq!(c.key, "tests");
        assert_eq!(c.branch, "main");
        assert_eq!(c.units, 2);
        assert_eq!(
            c.direct,
            "py -m pytest --junitxml=/scratch/direct-junit.xml tests/test_a.py tests/test_b.py"
        );
        assert_eq!(c.env, [("A".to_string(), "b".to_string())]);
        // --direct wins.
        let c = inspect(&dir, Some("make test"), Path::new("/scratch")).unwrap();
        assert_eq!(c.direct, "make test");
    }

    #[test]
    fn a_checkout_that_cannot_be_measured_is_refused_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        let scratch = Path::new("/scratch");
        // Not there.
        let e = inspect(&tmp.path().join("nope"), None, scratch).unwrap_err();
        assert!(e.message.contains("--suite"), "{}", e.message);
        // Not a git checkout.
        let plain = tmp.path().join("plain");
        std::fs::create_dir_all(&plain).unwrap();
        let e = inspect(&plain, None, scratch).unwrap_err();
        assert!(e.message.contains("not a git checkout"), "{}", e.message);
        // No committed .kiln.yml.
        let bare = tmp.path().join("bare");
        repo(&bare, &[("README", "x")]);
        let e = inspect(&bare, None, scratch).unwrap_err();
        assert!(
            e.message.contains("no committed .kiln.yml"),
            "{}",
            e.message
        );
        // No split step.
        let plain_step = tmp.path().join("plain-step");
        repo(
            &plain_step,
            &[(".kiln.yml", "steps:\n  - name: t\n    run: make test\n")],
        );
        let e = inspect(&plain_step, None, scratch).unwrap_err();
        assert!(e.message.contains("no split step"), "{}", e.message);
        // Units by a command: the direct command must be given.
        let cmd = tmp.path().join("cmd");
        repo(
            &cmd,
            &[(
                ".kiln.yml",
                "steps:\n  - name: t\n    run: x {units}\n    parallel: 2\n    units:\n      command: ./list\n",
            )],
        );
        let e = inspect(&cmd, None, scratch).unwrap_err();
        assert!(e.message.contains("--direct"), "{}", e.message);
        assert!(inspect(&cmd, Some("x"), scratch).is_ok());
    }
}

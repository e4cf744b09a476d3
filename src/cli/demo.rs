//! `kiln demo`: the whole farm in one process, on the embedded default.
//!
//! It makes a sample git repository with a small Python `unittest` suite (no `.kiln.yml`: the
//! default pipeline is detected), starts a dispatcher on a loopback port with its data in a temp
//! directory, attaches two runners, submits a passing and a failing commit through the real
//! gRPC API, prints both builds' output live as it is produced, and then their results.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::{CliError, exit};
use crate::proto;

/// `kiln demo` arguments.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the sample repository and data here instead of a temp dir that is removed.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// After the results, keep the farm (dispatcher, web page, runners) serving until Ctrl-C,
    /// to look at the builds on the web page, retry them or submit more.
    #[arg(long)]
    pub keep: bool,
}

const TEST_FILE: &str = r#"import time
import unittest

from calc import add, mul


class CalcTest(unittest.TestCase):
    def test_add(self):
        print("checking add", flush=True)
        time.sleep(0.3)
        self.assertEqual(add(2, 3), 5)

    def test_mul(self):
        print("checking mul", flush=True)
        time.sleep(0.3)
        self.assertEqual(mul(4, 5), 20)


if __name__ == "__main__":
    unittest.main()
"#;

fn err(e: impl std::fmt::Display) -> CliError {
    CliError {
        code: exit::INTERNAL,
        message: format!("demo: {e}"),
    }
}

/// Writes `files` into the repository's work tree and commits them on `main`.
fn commit(
    repo: &git2::Repository,
    files: &[(&str, &str)],
    message: &str,
) -> Result<String, CliError> {
    let root = repo.workdir().ok_or_else(|| err("bare repository"))?;
    for (path, text) in files {
        let p = root.join(path);
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        std::fs::write(&p, text).map_err(err)?;
    }
    let mut index = repo.index().map_err(err)?;
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .map_err(err)?;
    index.write().map_err(err)?;
    let tree = repo
        .find_tree(index.write_tree().map_err(err)?)
        .map_err(err)?;
    let sig = git2::Signature::now("kiln demo", "demo@kiln.invalid").map_err(err)?;
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    let id = repo
        .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .map_err(err)?;
    Ok(id.to_string())
}

fn make_repo(dir: &Path) -> Result<(String, String, String), CliError> {
    let path = dir.join("sample");
    let mut opts = git2::RepositoryInitOptions::new();
    opts.initial_head("main");
    let repo = git2::Repository::init_opts(&path, &opts).map_err(err)?;
    let good = commit(
        &repo,
        &[
            (
                "calc.py",
                "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n",
            ),
            ("tests/test_calc.py", TEST_FILE),
        ],
        "calc: add and mul",
    )?;
    let bad = commit(
        &repo,
        &[(
            "calc.py",
            "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a + b  # oops\n",
        )],
        "calc: faster mul (broken)",
    )?;
    Ok((path.to_string_lossy().into_owned(), good, bad))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<i32, CliError> {
    let tmp;
    let dir = match args.dir {
        Some(d) => {
            std::fs::create_dir_all(&d).map_err(err)?;
            d
        }
        None => {
            tmp = tempfile::tempdir().map_err(err)?;
            tmp.path().to_path_buf()
        }
    };
    let (repo, good, bad) = make_repo(&dir)?;
    println!("kiln demo: sample repository {repo}");
    println!("  {good} calc: add and mul");
    println!("  {bad} calc: faster mul (broken)");

    let mut config = kiln_dispatcher::Config::new(dir.join("data"));
    config.heartbeat_interval = Duration::from_secs(1);
    let dispatcher = kiln_dispatcher::Dispatcher::open(config).map_err(err)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(err)?;
    let addr = listener.local_addr().map_err(err)?;
    let url = format!("http://{addr}");
    let stop_server = CancellationToken::new();
    let server = {
        let stop = stop_server.clone();
        tokio::spawn(crate::api::serve(
            listener,
            dispatcher,
            Default::default(),
            async move { stop.cancelled().await },
        ))
    };
    println!(
        "kiln demo: dispatcher on {url}, data in {}",
        dir.join("data").display()
    );
    println!("kiln demo: web page at {url}/");

    let drain = CancellationToken::new();
    let mut runners = Vec::new();
    for i in 1..=2 {
        let mut rc = crate::runner::RunnerConfig::new(url.clone(), format!("demo-runner-{i}"));
        rc.engine.work_dir = dir.join(format!("runner-{i}"));
        rc.engine.cache_dir = Some(dir.join("runner-mirrors"));
        let (drain, stop) = (drain.clone(), CancellationToken::new());
        runners.push(tokio::spawn(crate::runner::run(rc, drain, stop)));
    }

    let mut client = super::Connection::plain(url.clone())
        .fetching_build_client()
        .await?;
    let mut builds = Vec::new();
    for (commit, label) in [(&good, "passing"), (&bad, "failing")] {
        let b = client
            .submit_build(proto::SubmitBuildRequest {
                repo: repo.clone(),
                commit: commit.clone(),
                branch: "main".into(),
                trigger: "demo".into(),
                env: Default::default(),
            })
            .await
            .map_err(CliError::from)?
            .into_inner();
        println!(
            "kiln demo: submitted build {} ({label} commit {})",
            b.id,
            &commit[..12]
        );
        builds.push(b);
    }

    // Follow both builds live, prefixing every line with its build.
    let mut followers = Vec::new();
    for b in &builds {
        let mut c = client.clone();
        let id = b.id;
        followers.push(tokio::spawn(async move {
            let mut stream = c
                .stream_logs(proto::StreamLogsRequest {
                    job_id: 0,
                    build_id: id,
                    offset: 0,
                    follow: true,
                })
                .await?
                .into_inner();
            let mut partial: HashMap<i32, Vec<u8>> = HashMap::new();
            while let Some(chunk) = stream.message().await? {
                let buf = partial.entry(chunk.stream).or_default();
                buf.extend_from_slice(&chunk.data);
                while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let mut out = std::io::stdout().lock();
                    let _ = write!(out, "[build {id}] {}", String::from_utf8_lossy(&line));
                    let _ = out.flush();
                }
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for f in followers {
        match f.await {
            Ok(Ok(())) => {}
            Ok(Err(s)) => return Err(CliError::from(s)),
            Err(e) => return Err(err(e)),
        }
    }

    println!();
    println!("kiln demo: results");
    let mut as_expected = true;
    for (b, want) in builds
        .iter()
        .zip([proto::JobState::Passed, proto::JobState::Failed])
    {
        let b = client
            .get_build(proto::GetBuildRequest { build_id: b.id })
            .await
            .map_err(CliError::from)?
            .into_inner();
        let runner = b.jobs.first().map(|j| j.runner.as_str()).unwrap_or("-");
        println!(
            "  build {}  {:<7} commit {}  on {runner}",
            b.id,
            crate::convert::state_name(b.state),
            &b.commit[..12]
        );
        as_expected &= b.state == want as i32;
    }
    println!(
        "\nThe same farm as separate processes: `kiln serve`, `kiln runner`, `kiln submit --repo PATH -f`."
    );
    if args.keep {
        println!(
            "kiln demo: serving {url}/ (web page) and the gRPC API until Ctrl-C; \
             try `kiln --dispatcher {url} retry {}`",
            builds.last().map_or(1, |b| b.id)
        );
        let _ = std::io::stdout().flush();
        super::signal().await;
        println!("kiln demo: stopping");
    }

    drain.cancel();
    for r in runners {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    stop_server.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    Ok(if as_expected { exit::OK } else { exit::FAILED })
}

//! The repository observer (`kiln watch`) and the all-in-one `kiln up`, as real processes
//! against git repositories in temp dirs: every commit is built exactly once, in commit order,
//! whatever is killed or restarted in between.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use git2::Oid;
use kiln_testkit::{LONG, Proc, Server, kiln, tempdir, wait_for};
use nix::sys::signal::Signal;

/// The observer's interval in these tests.
const INTERVAL: &str = "200ms";
/// How long "nothing more happens" is watched for: several intervals.
const QUIET: Duration = Duration::from_millis(1500);
const PIPELINE: &str = "steps:\n  - name: check\n    run: echo checked\n";

/// A repository whose commits are written straight into its object database (no work tree
/// involved), so that branches can be moved, created and rewritten in one step.
struct Git {
    path: PathBuf,
    repo: git2::Repository,
    n: Cell<u32>,
}

impl Git {
    fn init(path: &Path) -> Git {
        std::fs::create_dir_all(path).unwrap();
        let mut opts = git2::RepositoryInitOptions::new();
        opts.initial_head("main");
        let repo = git2::Repository::init_opts(path, &opts).unwrap();
        Git {
            path: path.canonicalize().unwrap(),
            repo,
            n: Cell::new(0),
        }
    }

    fn path_str(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// A new commit on top of `parent` (holding the pipeline and a file of its own), on no
    /// branch.
    fn commit_after(&self, parent: Option<Oid>) -> Oid {
        self.n.set(self.n.get() + 1);
        let mut tb = self.repo.treebuilder(None).unwrap();
        let pipeline = self.repo.blob(PIPELINE.as_bytes()).unwrap();
        tb.insert(".kiln.yml", pipeline, 0o100644).unwrap();
        let tag = self
            .repo
            .blob(format!("commit {}\n", self.n.get()).as_bytes())
            .unwrap();
        tb.insert("n.txt", tag, 0o100644).unwrap();
        let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
        let sig = git2::Signature::now("kiln tests", "tests@kiln.invalid").unwrap();
        let parents: Vec<git2::Commit<'_>> = parent
            .iter()
            .map(|p| self.repo.find_commit(*p).unwrap())
            .collect();
        let parents: Vec<&git2::Commit<'_>> = parents.iter().collect();
        let message = format!("commit {}", self.n.get());
        self.repo
            .commit(None, &sig, &sig, &message, &tree, &parents)
            .unwrap()
    }

    /// `n` commits in a row on top of `parent`, on no branch, oldest first.
    fn chain_after(&self, parent: Option<Oid>, n: usize) -> Vec<Oid> {
        let mut out: Vec<Oid> = Vec::new();
        for _ in 0..n {
            let c = self.commit_after(out.last().copied().or(parent));
            out.push(c);
        }
        out
    }

    fn tip(&self, branch: &str) -> Option<Oid> {
        self.repo
            .find_reference(&format!("refs/heads/{branch}"))
            .ok()
            .and_then(|r| r.target())
    }

    /// Points `branch` at `to` (creating it, or moving it anywhere: a force-push).
    fn set_branch(&self, branch: &str, to: Oid) {
        self.repo
            .reference(&format!("refs/heads/{branch}"), to, true, "test")
            .unwrap();
    }

    /// Commits on top of `branch` (creating it) and moves it: a push of one commit.
    fn commit(&self, branch: &str) -> Oid {
        let c = self.commit_after(self.tip(branch));
        self.set_branch(branch, c);
        c
    }
}

/// One build as `kiln builds --json` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Built {
    id: u64,
    commit: String,
    branch: String,
    trigger: String,
}

/// The repository's builds, oldest first.
fn builds(server: &Server, repo: &Git) -> Vec<Built> {
    let out = server.cli(&[
        "--json",
        "builds",
        "--repo",
        repo.path_str(),
        "--limit",
        "500",
    ]);
    out.expect_code(0);
    let mut all: Vec<Built> = out.json()["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| Built {
            id: b["id"].as_u64().unwrap(),
            commit: b["commit"].as_str().unwrap().to_string(),
            branch: b["branch"].as_str().unwrap().to_string(),
            trigger: b["trigger"].as_str().unwrap().to_string(),
        })
        .collect();
    all.sort_by_key(|b| b.id);
    all
}

/// Waits until the repository has exactly `n` builds (panics at once if there are more).
fn wait_builds(server: &Server, repo: &Git, n: usize) -> Vec<Built> {
    wait_for(&format!("{n} builds"), LONG, || {
        let b = builds(server, repo);
        assert!(b.len() <= n, "more than {n} builds: {b:#?}");
        if b.len() == n {
            Ok(b)
        } else {
            Err(format!("{} builds: {b:?}", b.len()))
        }
    })
}

/// Waits for `n` builds, then checks that no more come for a while.
fn settle(server: &Server, repo: &Git, n: usize) -> Vec<Built> {
    let b = wait_builds(server, repo, n);
    std::thread::sleep(QUIET);
    let later = builds(server, repo);
    assert_eq!(later, b, "builds changed after settling");
    b
}

/// Asserts that the builds are exactly `commits`, once each, build ids in commit order.
#[track_caller]
fn assert_built_in_order(builds: &[Built], commits: &[Oid]) {
    let got: Vec<&str> = builds.iter().map(|b| b.commit.as_str()).collect();
    let want: Vec<String> = commits.iter().map(Oid::to_string).collect();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    assert_eq!(
        got, want,
        "builds (by id) are not the commits in order: {builds:#?}"
    );
}

/// Starts `kiln watch` on `repo` with its own work dir under `tmp`.
fn observer(server_url: &str, repo: &Git, tmp: &Path, name: &str, extra: &[&str]) -> Proc {
    let work = tmp.join(format!("observer-{name}"));
    let mut args = vec![
        "--dispatcher",
        server_url,
        "watch",
        "--repo",
        repo.path_str(),
        "--interval",
        INTERVAL,
        "--work-dir",
        work.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut cmd = std::process::Command::new(kiln_testkit::kiln_bin());
    cmd.args(&args)
        .env_remove("KILN_DISPATCHER")
        .env("KILN_LOG", "info");
    let mut p = Proc::spawn(format!("kiln watch {name}"), cmd);
    p.wait_stdout(b"kiln watch: watching", LONG);
    p
}

#[test]
fn a_burst_of_ten_commits_builds_each_once_in_commit_order() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let first = repo.commit("main");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _obs = observer(&server.url, &repo, tmp.path(), "a", &[]);
    let b = wait_builds(&server, &repo, 1);
    assert_built_in_order(&b, &[first]);

    let started = Instant::now();
    let burst: Vec<Oid> = (0..10).map(|_| repo.commit("main")).collect();
    wait_builds(&server, &repo, 11);
    let latency = started.elapsed();
    let b = settle(&server, &repo, 11);
    let mut want = vec![first];
    want.extend(&burst);
    assert_built_in_order(&b, &want);
    for x in &b {
        assert_eq!(x.branch, "main");
        assert_eq!(x.trigger, "observer");
    }
    // A 200 ms interval: the builds exist well within a few seconds.
    assert!(latency < Duration::from_secs(10), "took {latency:?}");
}

#[test]
fn an_observer_killed_in_a_burst_and_started_again_skips_and_repeats_nothing() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let mut commits = vec![repo.commit("main")];
    let server = Server::start(&tmp.path().join("data"), &[]);
    let mut obs = observer(&server.url, &repo, tmp.path(), "a", &[]);
    wait_builds(&server, &repo, 1);

    for i in 0..30 {
        commits.push(repo.commit("main"));
        std::thread::sleep(Duration::from_millis(40));
        if i == 10 {
            obs.kill_all(); // SIGKILL, whatever it was doing
        }
        if i == 20 {
            // Same work dir: whatever the killed one left there is reused.
            obs = observer(&server.url, &repo, tmp.path(), "a", &[]);
        }
    }
    let b = settle(&server, &repo, commits.len());
    assert_built_in_order(&b, &commits);
    drop(obs);
}

#[test]
fn two_observers_on_one_repository_build_each_commit_once() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let mut commits = vec![repo.commit("main")];
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _a = observer(&server.url, &repo, tmp.path(), "a", &[]);
    let _b = observer(&server.url, &repo, tmp.path(), "b", &[]);
    wait_builds(&server, &repo, 1);
    for i in 0..12 {
        commits.push(repo.commit("main"));
        // Irregular gaps, so that the two observers see different parts of the burst.
        std::thread::sleep(Duration::from_millis([0, 70, 150][i % 3]));
    }
    let b = settle(&server, &repo, commits.len());
    assert_built_in_order(&b, &commits);
}

#[test]
fn a_force_push_builds_only_the_new_head_then_continues() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _obs = observer(&server.url, &repo, tmp.path(), "a", &[]);
    let c0 = repo.commit("main");
    wait_builds(&server, &repo, 1);
    let c1 = repo.commit("main");
    wait_builds(&server, &repo, 2);
    let c2 = repo.commit("main");
    wait_builds(&server, &repo, 3);

    // Reset main to c0 and push two new commits on it at once.
    let rewritten = repo.chain_after(Some(c0), 2);
    repo.set_branch("main", rewritten[1]);
    let b = settle(&server, &repo, 4);
    assert_built_in_order(&b, &[c0, c1, c2, rewritten[1]]);

    // Then the branch goes on as usual.
    let next = repo.commit("main");
    let b = settle(&server, &repo, 5);
    assert_built_in_order(&b, &[c0, c1, c2, rewritten[1], next]);
}

#[test]
fn new_branches_matching_the_patterns_are_picked_up_with_the_backfill_cap() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let c0 = repo.commit("main");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let _obs = observer(
        &server.url,
        &repo,
        tmp.path(),
        "a",
        &[
            "--branch",
            "main",
            "--branch",
            "release/*",
            "--backfill",
            "2",
        ],
    );
    wait_builds(&server, &repo, 1);

    // A new matching branch with three new commits: its two newest are built.
    let release = repo.chain_after(Some(c0), 3);
    repo.set_branch("release/1.0", release[2]);
    // A branch that matches no pattern: never built.
    repo.commit("topic");
    let b = settle(&server, &repo, 3);
    assert_built_in_order(&b, &[c0, release[1], release[2]]);
    assert_eq!(b[1].branch, "release/1.0");
    assert_eq!(b[2].branch, "release/1.0");

    // Both go on; only the watched one builds. A branch at an already built commit adds
    // nothing.
    let r4 = repo.commit("release/1.0");
    repo.commit("topic");
    repo.set_branch("release/2.0", c0);
    let b = settle(&server, &repo, 4);
    assert_built_in_order(&b, &[c0, release[1], release[2], r4]);
}

#[test]
fn the_observer_outlives_a_dispatcher_restart_and_once_reports_unreachable() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let mut commits = vec![repo.commit("main")];
    let data = tmp.path().join("data");

    // --once with no dispatcher: exit 6, nothing else.
    let work = tmp.path().join("once");
    let out = kiln(&[
        "--dispatcher",
        "http://127.0.0.1:9",
        "watch",
        "--once",
        "--repo",
        repo.path_str(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    out.expect_code(6);

    let server = Server::start(&data, &[]);
    let (addr, url) = (server.addr.clone(), server.url.clone());
    // --once with a dispatcher: one pass, exit 0, the head is built.
    let out = server.cli(&[
        "watch",
        "--once",
        "--repo",
        repo.path_str(),
        "--work-dir",
        work.to_str().unwrap(),
    ]);
    out.expect_code(0);
    wait_builds(&server, &repo, 1);

    let mut obs = observer(&url, &repo, tmp.path(), "a", &[]);
    commits.push(repo.commit("main"));
    wait_builds(&server, &repo, 2);
    drop(server); // killed

    // Commits pushed while the dispatcher is down.
    for _ in 0..3 {
        commits.push(repo.commit("main"));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        obs.try_status().is_none(),
        "the observer exited when the dispatcher went away"
    );
    let server = kiln_testkit::fault::restart_dispatcher_on(&addr, &data, &[]);
    commits.push(repo.commit("main"));
    let b = settle(&server, &repo, commits.len());
    assert_built_in_order(&b, &commits);

    // SIGTERM: a graceful stop, exit 0.
    obs.signal(Signal::SIGTERM);
    obs.wait(LONG).expect_code(0);
}

/// `kiln up`: prints where it listens and every build's state; builds every pushed commit with
/// its own runners; continues after a restart without building anything twice.
#[test]
fn kiln_up_builds_every_commit_and_survives_a_restart() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let data = tmp.path().join("up-data");
    let start = |name: &str| {
        let mut p = Proc::kiln(
            name,
            &[
                "up",
                "--repo",
                repo.path_str(),
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                data.to_str().unwrap(),
                "--interval",
                INTERVAL,
                "--runners",
                "2",
            ],
        );
        p.wait_stdout(b"kiln up: dispatcher listening on ", LONG);
        let out = String::from_utf8(p.stdout()).unwrap();
        let addr = out
            .lines()
            .find_map(|l| l.strip_prefix("kiln up: dispatcher listening on "))
            .unwrap()
            .trim()
            .to_string();
        (p, format!("http://{addr}"))
    };
    let c0 = repo.commit("main");
    let (mut up, url) = start("kiln up");
    up.wait_stdout(b"build 1 passed", LONG);
    let burst: Vec<Oid> = (0..3).map(|_| repo.commit("main")).collect();
    for id in 2..=4 {
        up.wait_stdout(format!("build {id} passed").as_bytes(), LONG);
    }
    let out = String::from_utf8(up.stdout()).unwrap();
    assert!(out.contains("build 2 queued"), "{out}");
    assert!(out.contains("build 2 running"), "{out}");
    assert!(
        out.contains(&format!("main@{}", &burst[0].to_string()[..12])),
        "{out}"
    );
    up.signal(Signal::SIGTERM);
    up.wait(LONG).expect_code(0);

    // Pushed while it is down: built after the restart; nothing built twice.
    let c4 = repo.commit("main");
    let (mut up, url2) = start("kiln up again");
    up.wait_stdout(b"build 5 passed", LONG);
    std::thread::sleep(QUIET);
    let out = kiln(&["--dispatcher", &url2, "--json", "builds", "--limit", "50"]);
    out.expect_code(0);
    let mut got: Vec<(u64, String, String)> = out.json()["builds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["id"].as_u64().unwrap(),
                b["commit"].as_str().unwrap().to_string(),
                b["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    got.sort();
    let want: Vec<String> = [c0, burst[0], burst[1], burst[2], c4]
        .iter()
        .map(Oid::to_string)
        .collect();
    assert_eq!(
        got.iter().map(|g| g.1.clone()).collect::<Vec<_>>(),
        want,
        "{got:?}"
    );
    assert!(got.iter().all(|g| g.2 == "passed"), "{got:?}");
    let _ = url;
    up.signal(Signal::SIGINT);
    up.wait(LONG).expect_code(0);
}

/// `kiln watch --branch 'release/*'` means what the same pattern means in `when:` and
/// `--newest-only`: `*` stays within a path segment, so `release/2.0/rc1` is not watched
/// (`release/**` would watch it). One pass with `--once`, so nothing here waits on time.
#[test]
fn a_branch_pattern_means_the_same_to_the_observer() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    repo.commit("main");
    let one = repo.commit("release/1.0");
    let rc = repo.commit("release/2.0/rc1");
    let server = Server::start(&tmp.path().join("data"), &[]);
    let watch = |pattern: &str, work: &str| {
        let work = tmp.path().join(work);
        server
            .cli(&[
                "watch",
                "--once",
                "--repo",
                repo.path_str(),
                "--work-dir",
                work.to_str().unwrap(),
                "--branch",
                pattern,
            ])
            .expect_code(0);
    };
    watch("release/*", "w1");
    let b = builds(&server, &repo);
    assert_built_in_order(&b, &[one]);
    assert_eq!(b[0].branch, "release/1.0");
    watch("release/**", "w2");
    let b = builds(&server, &repo);
    assert_built_in_order(&b, &[one, rc]);
    assert_eq!(b[1].branch, "release/2.0/rc1");
}

/// `kiln serve --watch`: the dispatcher polls the repository itself (no observer process):
/// every new commit of a watched branch is built once, in order, other branches never; after
/// a restart it goes on from its cursor. A bad pattern is refused before the dispatcher starts.
#[test]
fn a_dispatcher_watching_repositories_itself_builds_every_commit_once() {
    let tmp = tempdir();
    let repo = Git::init(&tmp.path().join("repo"));
    let c0 = repo.commit("main");
    let data = tmp.path().join("data");
    let watch = [
        "--watch",
        repo.path_str(),
        "--branch",
        "main",
        "--branch",
        "release/*",
        "--watch-interval",
        INTERVAL,
    ];
    let server = Server::start(&data, &watch);
    assert_built_in_order(&wait_builds(&server, &repo, 1), &[c0]);
    let burst: Vec<Oid> = (0..3).map(|_| repo.commit("main")).collect();
    repo.commit("topic");
    let r1 = repo.commit("release/1");
    let b = settle(&server, &repo, 5);
    // Each branch's builds in commit order (two branches of one pass may interleave).
    let main: Vec<Built> = b.iter().filter(|x| x.branch == "main").cloned().collect();
    assert_built_in_order(&main, &[c0, burst[0], burst[1], burst[2]]);
    let release: Vec<Built> = b
        .iter()
        .filter(|x| x.branch == "release/1")
        .cloned()
        .collect();
    assert_built_in_order(&release, &[r1]);
    assert!(b.iter().all(|x| x.trigger == "observer"), "{b:#?}");

    // Restarted, it continues from the dispatcher's cursor: the commit made while it was down
    // is built, nothing is built twice.
    let addr = server.addr.clone();
    drop(server);
    let c4 = repo.commit("main");
    let again = kiln_testkit::fault::restart_dispatcher_on(&addr, &data, &watch);
    let b = settle(&again, &repo, 6);
    assert_eq!(b[5].commit, c4.to_string(), "{b:#?}");
    assert_eq!(b[5].branch, "main");

    // Refused before anything starts, with the reason.
    let bad = kiln(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        tmp.path().join("d2").to_str().unwrap(),
        "--watch",
        repo.path_str(),
        "--branch",
        "[",
    ]);
    assert_eq!(bad.code(), 2, "{bad:?}");
    assert!(bad.err().contains('['), "{}", bad.err());
    let bad = kiln(&["serve", "--branch", "main"]);
    assert_eq!(bad.code(), 2, "--branch without --watch: {bad:?}");
    assert!(bad.err().contains("--watch"), "{}", bad.err());
}

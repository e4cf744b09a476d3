//! The sample git hooks in `contrib/hooks`, installed in real repositories and run by the real
//! `git` program: a push to a bare repository builds exactly the pushed head of each branch
//! (tags and deletions build nothing, a push never fails because kiln is down), and a commit
//! in a working repository builds that commit. No observer runs: only the hooks submit.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_testkit::*;

const PIPELINE: &str = "steps:\n  - name: hello\n    run: echo hello from the hook\n";

fn hook_source(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/hooks")
        .join(name)
}

/// Copies a sample hook into `git_dir/hooks`, executable.
fn install_hook(git_dir: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let dest = git_dir.join("hooks").join(name);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(hook_source(name), &dest).unwrap();
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// PATH with the directory of the `kiln` under test first.
fn path_with_kiln() -> String {
    let dir = Path::new(kiln_bin()).parent().unwrap();
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// A `git` command isolated from the user's and system's configuration, with `kiln` first on
/// PATH and no kiln settings but `dispatcher` (if given) in the environment.
fn git(dir: &Path, dispatcher: Option<&str>, args: &[&str]) -> Out {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "kiln tests")
        .env("GIT_AUTHOR_EMAIL", "tests@kiln.invalid")
        .env("GIT_COMMITTER_NAME", "kiln tests")
        .env("GIT_COMMITTER_EMAIL", "tests@kiln.invalid")
        .env("PATH", path_with_kiln())
        .env_remove("KILN_TOKEN")
        .env_remove("KILN_REPO")
        .env_remove("KILN_BIN")
        .env_remove("KILN_LOG")
        .env_remove("KILN_TLS_CA")
        .env_remove("KILN_TLS_CERT")
        .env_remove("KILN_TLS_KEY");
    match dispatcher {
        Some(d) => cmd.env("KILN_DISPATCHER", d),
        None => cmd.env_remove("KILN_DISPATCHER"),
    };
    Proc::spawn(format!("git {}", args.join(" ")), cmd).wait(LONG)
}

#[track_caller]
fn git_ok(dir: &Path, dispatcher: Option<&str>, args: &[&str]) -> Out {
    let out = git(dir, dispatcher, args);
    out.expect_code(0);
    out
}

fn rev_parse(dir: &Path, what: &str) -> String {
    git_ok(dir, None, &["rev-parse", what])
        .out()
        .trim()
        .to_string()
}

/// Every build, oldest first, as (commit, branch, trigger, repo).
fn builds(api: &Api) -> Vec<(String, String, String, String)> {
    let mut all = api.list_builds();
    all.sort_by_key(|b| b.id);
    all.into_iter()
        .map(|b| (b.commit, b.branch, b.trigger, b.repo))
        .collect()
}

/// Two commits pushed at once to a bare repository with the post-receive hook: exactly the
/// pushed head is built (branch, trigger `hook`, the bare repository's path), and it passes on
/// a runner. Then: a tag push and a branch deletion build nothing; a branch pointing at a
/// commit already built is not built again; and with the dispatcher unreachable the push
/// still succeeds, with a warning.
#[test]
fn post_receive_builds_the_pushed_head() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &["--heartbeat-interval", "500ms"]);
    let _runner = server.runner(tmp.path(), "r1", MANY_SLOTS);
    let api = Api::connect(&server.url);
    let url = Some(server.url.as_str());

    let bare = tmp.path().join("server.git");
    std::fs::create_dir_all(&bare).unwrap();
    git_ok(
        &bare,
        None,
        &["init", "--bare", "--initial-branch=main", "."],
    );
    install_hook(&bare, "post-receive");
    let bare = bare.canonicalize().unwrap();

    let work = tmp.path().join("work");
    git_ok(
        tmp.path(),
        None,
        &["clone", "--quiet", bare.to_str().unwrap(), "work"],
    );
    git_ok(&work, None, &["symbolic-ref", "HEAD", "refs/heads/main"]);
    std::fs::write(work.join(".kiln.yml"), PIPELINE).unwrap();
    git_ok(&work, None, &["add", ".kiln.yml"]);
    git_ok(&work, None, &["commit", "--quiet", "-m", "pipeline"]);
    let first = rev_parse(&work, "HEAD");
    std::fs::write(work.join("README"), "two\n").unwrap();
    git_ok(&work, None, &["add", "README"]);
    git_ok(&work, None, &["commit", "--quiet", "-m", "second"]);
    let head = rev_parse(&work, "HEAD");
    assert_ne!(first, head);

    let out = git_ok(&work, url, &["push", "origin", "main"]);
    assert!(out.err().contains("remote: kiln: build"), "{out}");
    let bare_str = bare.to_str().unwrap().to_string();
    assert_eq!(
        builds(&api),
        vec![(head.clone(), "main".into(), "hook".into(), bare_str.clone())],
        "exactly the pushed head is built; push said: {out}"
    );
    let id = api.list_builds()[0].id;
    let b = server.wait_final(id, LONG);
    assert_eq!(b["state"], "passed", "{b}");

    // A tag, a second branch at the same (already built) commit, then its deletion.
    git_ok(&work, None, &["tag", "v1"]);
    let out = git_ok(&work, url, &["push", "origin", "v1"]);
    assert!(!out.err().contains("kiln: build"), "{out}");
    let out = git_ok(&work, url, &["push", "origin", "main:feature"]);
    assert!(out.err().contains("built before"), "{out}");
    let out = git_ok(&work, url, &["push", "origin", "--delete", "feature"]);
    assert!(!out.err().contains("remote: kiln"), "{out}");
    assert_eq!(builds(&api).len(), 1, "{:?}", builds(&api));

    // The dispatcher is down (nothing listens on port 1): the push still goes through.
    std::fs::write(work.join("README"), "three\n").unwrap();
    git_ok(&work, None, &["commit", "--quiet", "-am", "third"]);
    let third = rev_parse(&work, "HEAD");
    let out = git_ok(
        &work,
        Some("http://127.0.0.1:1"),
        &["push", "origin", "main"],
    );
    assert!(out.err().contains("kiln: warning"), "{out}");
    assert_eq!(rev_parse(&bare, "refs/heads/main"), third);
    assert_eq!(builds(&api).len(), 1);

    // Configured with `git config kiln.dispatcher` instead of the environment.
    git_ok(&bare, None, &["config", "kiln.dispatcher", &server.url]);
    std::fs::write(work.join("README"), "four\n").unwrap();
    git_ok(&work, None, &["commit", "--quiet", "-am", "fourth"]);
    let fourth = rev_parse(&work, "HEAD");
    let out = git_ok(&work, None, &["push", "origin", "main"]);
    assert!(out.err().contains("remote: kiln: build"), "{out}");
    let all = builds(&api);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[1].0, fourth);
}

/// A commit made in a working repository with the post-commit hook is built (HEAD, on the
/// current branch, trigger `hook`); `git config kiln.dispatcher` says where to send it.
#[test]
fn post_commit_builds_the_new_commit() {
    let tmp = tempdir();
    let server = Server::start(&tmp.path().join("data"), &[]);
    let api = Api::connect(&server.url);

    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    git_ok(
        &work,
        None,
        &["init", "--quiet", "--initial-branch=trunk", "."],
    );
    install_hook(&work.join(".git"), "post-commit");
    git_ok(&work, None, &["config", "kiln.dispatcher", &server.url]);
    let work = work.canonicalize().unwrap();

    std::fs::write(work.join(".kiln.yml"), PIPELINE).unwrap();
    git_ok(&work, None, &["add", ".kiln.yml"]);
    let out = git_ok(&work, None, &["commit", "--quiet", "-m", "pipeline"]);
    assert!(
        out.out().contains("kiln: build") || out.err().contains("kiln: build"),
        "{out}"
    );
    let head = rev_parse(&work, "HEAD");
    assert_eq!(
        builds(&api),
        vec![(
            head,
            "trunk".into(),
            "hook".into(),
            work.to_str().unwrap().to_string()
        )]
    );

    // A commit on a detached HEAD (as during a rebase) is not submitted.
    git_ok(&work, None, &["checkout", "--quiet", "--detach"]);
    git_ok(
        &work,
        None,
        &["commit", "--quiet", "--allow-empty", "-m", "detached"],
    );
    assert_eq!(builds(&api).len(), 1);
}

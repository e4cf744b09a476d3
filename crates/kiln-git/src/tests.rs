#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Instant;
use tempfile::TempDir;

/// What a test file is.
#[derive(Clone, Copy)]
enum Content<'a> {
    File(&'a [u8]),
    Exec(&'a [u8]),
    Link(&'a str),
}
use Content::{Exec, File, Link};

/// A source repository (non-bare) whose commits are written straight into its object database.
struct Source {
    dir: TempDir,
    repo: Repository,
}

impl Source {
    fn new() -> Source {
        let dir = TempDir::new().unwrap();
        let repo = Repository::init(dir.path()).unwrap();
        Source { dir, repo }
    }

    fn url(&self) -> String {
        self.dir.path().to_str().unwrap().to_owned()
    }

    /// Commits a snapshot of `files` to `branch` (on top of the branch's tip, if any).
    fn commit_on(&self, branch: &str, files: &[(&str, Content<'_>)]) -> Oid {
        let tree_id = build_tree(&self.repo, files, "");
        let tree = self.repo.find_tree(tree_id).unwrap();
        let refname = format!("refs/heads/{branch}");
        let parent = self
            .repo
            .find_reference(&refname)
            .ok()
            .map(|r| r.peel_to_commit().unwrap());
        let sig = git2::Signature::now("Test", "test@example.com").unwrap();
        let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
        self.repo
            .commit(Some(&refname), &sig, &sig, "test commit", &tree, &parents)
            .unwrap()
    }

    fn commit(&self, files: &[(&str, Content<'_>)]) -> Oid {
        self.commit_on("main", files)
    }
}

/// Builds the tree for the entries under `prefix` (paths are '/'-separated).
fn build_tree(repo: &Repository, files: &[(&str, Content<'_>)], prefix: &str) -> Oid {
    let mut builder = repo.treebuilder(None).unwrap();
    let mut subdirs = BTreeSet::new();
    for (path, content) in files {
        let Some(rest) = path.strip_prefix(prefix) else {
            continue;
        };
        match rest.split_once('/') {
            Some((dir, _)) => {
                subdirs.insert(dir.to_owned());
            }
            None => {
                let (bytes, mode) = match content {
                    File(b) => (*b, 0o100644),
                    Exec(b) => (*b, 0o100755),
                    Link(t) => (t.as_bytes(), 0o120000),
                };
                let blob = repo.blob(bytes).unwrap();
                builder.insert(rest, blob, mode).unwrap();
            }
        }
    }
    for dir in subdirs {
        let sub = build_tree(repo, files, &format!("{prefix}{dir}/"));
        builder.insert(&dir, sub, 0o040000).unwrap();
    }
    builder.write().unwrap()
}

fn mirrors() -> (TempDir, Mirrors) {
    let dir = TempDir::new().unwrap();
    let mirrors = Mirrors::new(dir.path().join("mirrors")).unwrap();
    (dir, mirrors)
}

/// The mirrors (and temporary directories) under the root; the lock files' directory is left out.
fn root_entries(mirrors: &Mirrors) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(mirrors.root())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name != LOCK_DIR)
        .collect();
    names.sort();
    names
}

/// Every file, symlink and directory under `dir`, relative and '/'-separated, except `.git`.
fn tree_of(dir: &Path) -> BTreeSet<String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let rel = entry
                .path()
                .strip_prefix(base)
                .unwrap()
                .to_str()
                .unwrap()
                .to_owned();
            if rel == ".git" {
                continue;
            }
            let ty = entry.file_type().unwrap();
            if ty.is_dir() {
                out.insert(format!("{rel}/"));
                walk(base, &entry.path(), out);
            } else {
                out.insert(rel);
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

fn git_cli(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8(out.stdout).unwrap())
}

#[test]
fn validate_commit_id_cases() {
    assert!(validate_commit_id("abcdef1").is_ok());
    assert!(validate_commit_id("ABCDEF1234").is_ok());
    assert!(validate_commit_id(&"a".repeat(40)).is_ok());
    assert!(validate_commit_id(&"0".repeat(64)).is_ok());
    for (bad, needle) in [
        ("", "empty"),
        ("abc", "too short"),
        ("abcdef", "too short"),
        ("abcdefg", "not a hexadecimal digit"),
        ("main", "not a hexadecimal digit"),
        ("abcdef1 ", "not a hexadecimal digit"),
        (&"a".repeat(41), "at most 40"),
        (&"a".repeat(63), "at most 40"),
        (&"a".repeat(65), "at most 40"),
    ] {
        let err = validate_commit_id(bad).unwrap_err();
        assert!(
            matches!(err, GitError::InvalidCommitId { .. }),
            "{bad:?}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(needle), "{bad:?}: {msg}");
        assert!(msg.starts_with("invalid commit id"), "{msg}");
    }
}

#[test]
fn url_parsing() {
    let (_dir, mirrors) = mirrors();
    // A path and its file:// URL share one mirror; trailing slashes do not matter.
    let a = mirrors.mirror_path("/srv/git/My App.git").unwrap();
    assert_eq!(
        a,
        mirrors
            .mirror_path("file:///srv/git/My%20App.git/")
            .unwrap()
    );
    assert_eq!(
        a,
        mirrors
            .mirror_path("file://localhost/srv/git/My%20App.git")
            .unwrap()
    );
    assert!(
        a.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-My_App"),
        "{a:?}"
    );
    assert_ne!(a, mirrors.mirror_path("/srv/git/other/My App.git").unwrap());

    let https = mirrors
        .mirror_path("https://github.com/org/kiln.git")
        .unwrap();
    assert!(
        https
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-kiln")
    );
    let scp = mirrors.mirror_path("git@github.com:org/kiln.git").unwrap();
    assert!(
        scp.file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-kiln")
    );
    assert_ne!(https, scp);
    assert!(mirrors.mirror_path("ssh://git@host:22/kiln").is_ok());

    for rel in ["repo", "./repo", "../x/repo", "some/dir"] {
        let err = mirrors.mirror_path(rel).unwrap_err();
        assert!(
            matches!(err, GitError::RepositoryNotFound { .. }),
            "{rel}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains("absolute path") && msg.contains(rel), "{msg}");
    }
    let err = mirrors.mirror_path("file://host/repo").unwrap_err();
    assert!(matches!(err, GitError::RepositoryNotFound { .. }));
    assert!(mirrors.mirror_path("  ").is_err());
}

#[test]
fn ensure_commit_full_and_short_ids() {
    let src = Source::new();
    let c1 = src.commit(&[("README", File(b"hello\n"))]);
    let (_dir, mirrors) = mirrors();
    let full = c1.to_string();
    assert_eq!(mirrors.ensure_commit(&src.url(), &full).unwrap(), full);
    assert_eq!(mirrors.ensure_commit(&src.url(), &full[..7]).unwrap(), full);
    assert_eq!(
        mirrors
            .ensure_commit(&src.url(), &full[..12].to_uppercase())
            .unwrap(),
        full
    );
    let file_url = format!("file://{}", src.url());
    assert_eq!(mirrors.ensure_commit(&file_url, &full[..10]).unwrap(), full);
    // One mirror, no temporary directories left.
    assert_eq!(root_entries(&mirrors).len(), 1);
    assert!(
        mirrors
            .mirror_path(&src.url())
            .unwrap()
            .join("HEAD")
            .exists()
    );
}

#[test]
fn annotated_tag_is_peeled_and_tree_is_not_a_commit() {
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"a"))]);
    let sig = git2::Signature::now("Test", "test@example.com").unwrap();
    let obj = src.repo.find_object(c1, None).unwrap();
    let tag = src.repo.tag("v1", &obj, &sig, "release", false).unwrap();
    let (_dir, mirrors) = mirrors();
    assert_eq!(
        mirrors.ensure_commit(&src.url(), &tag.to_string()).unwrap(),
        c1.to_string()
    );
    let tree = src.repo.find_commit(c1).unwrap().tree_id().to_string();
    let err = mirrors.ensure_commit(&src.url(), &tree).unwrap_err();
    assert!(matches!(err, GitError::InvalidCommitId { .. }), "{err:?}");
    assert!(err.to_string().contains("tree"), "{err}");
}

#[test]
fn new_commit_after_mirror_is_fetched() {
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let (_dir, mirrors) = mirrors();
    mirrors.ensure_commit(&src.url(), &c1.to_string()).unwrap();
    let c2 = src.commit(&[("a", File(b"2"))]);
    let c3 = src.commit_on("feature", &[("b", File(b"3"))]);
    assert_eq!(
        mirrors
            .ensure_commit(&src.url(), &c2.to_string()[..8])
            .unwrap(),
        c2.to_string()
    );
    assert_eq!(
        mirrors.ensure_commit(&src.url(), &c3.to_string()).unwrap(),
        c3.to_string()
    );
    let mirror = Repository::open_bare(mirrors.mirror_path(&src.url()).unwrap()).unwrap();
    assert_eq!(mirror.refname_to_id("refs/heads/main").unwrap(), c2);
    assert_eq!(mirror.refname_to_id("refs/heads/feature").unwrap(), c3);
}

#[test]
fn fetch_prunes_deleted_refs() {
    let src = Source::new();
    src.commit(&[("a", File(b"1"))]);
    let c2 = src.commit_on("gone", &[("b", File(b"2"))]);
    let (_dir, mirrors) = mirrors();
    mirrors.fetch(&src.url()).unwrap();
    let path = mirrors.mirror_path(&src.url()).unwrap();
    assert_eq!(
        Repository::open_bare(&path)
            .unwrap()
            .refname_to_id("refs/heads/gone")
            .unwrap(),
        c2
    );
    src.repo
        .find_reference("refs/heads/gone")
        .unwrap()
        .delete()
        .unwrap();
    mirrors.fetch(&src.url()).unwrap();
    assert!(
        Repository::open_bare(&path)
            .unwrap()
            .find_reference("refs/heads/gone")
            .is_err()
    );
    // The commit's objects stay: a build of it can still run.
    assert_eq!(
        mirrors.ensure_commit(&src.url(), &c2.to_string()).unwrap(),
        c2.to_string()
    );
}

#[test]
fn nonexistent_commit() {
    let src = Source::new();
    src.commit(&[("a", File(b"1"))]);
    let (_dir, mirrors) = mirrors();
    let missing = "0123456789abcdef0123456789abcdef01234567";
    for id in [missing, &missing[..9]] {
        let err = mirrors.ensure_commit(&src.url(), id).unwrap_err();
        assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(id) && msg.contains(&src.url()), "{msg}");
    }
    // The mirror itself is fine and kept.
    assert_eq!(root_entries(&mirrors).len(), 1);
    let err = mirrors.ensure_commit(&src.url(), "xyz").unwrap_err();
    assert!(matches!(err, GitError::InvalidCommitId { .. }));
    let err = mirrors
        .ensure_commit(&src.url(), &"a".repeat(64))
        .unwrap_err();
    assert!(matches!(err, GitError::InvalidCommitId { .. }));
}

#[test]
fn empty_repository_has_no_commits() {
    let src = Source::new();
    let (_dir, mirrors) = mirrors();
    let err = mirrors.ensure_commit(&src.url(), "abcdef1").unwrap_err();
    assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");
}

#[test]
fn bad_repositories_leave_nothing_behind() {
    let (dir, mirrors) = mirrors();
    let missing = dir.path().join("does-not-exist");
    let url = missing.to_str().unwrap().to_owned();
    for u in [url.clone(), format!("file://{url}")] {
        let err = mirrors.ensure_commit(&u, "abcdef1").unwrap_err();
        assert!(
            matches!(err, GitError::RepositoryNotFound { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains(&u), "{err}");
        assert!(mirrors.fetch(&u).is_err());
    }
    assert!(
        root_entries(&mirrors).is_empty(),
        "{:?}",
        root_entries(&mirrors)
    );
    assert!(lock(&mirrors.locks).is_empty());

    // An existing directory that is not a repository.
    let plain = dir.path().join("plain");
    std::fs::create_dir(&plain).unwrap();
    std::fs::write(plain.join("file"), "x").unwrap();
    let plain_url = plain.to_str().unwrap();
    let err = mirrors.ensure_commit(plain_url, "abcdef1").unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("not a git repository"), "{err}");
    // A file.
    let err = mirrors
        .ensure_commit(plain.join("file").to_str().unwrap(), "abcdef1")
        .unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
    // A subdirectory of a repository is not the repository.
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"1"))]);
    std::fs::create_dir(src.dir.path().join("sub")).unwrap();
    let err = mirrors
        .ensure_commit(&format!("{}/sub", src.url()), &c1.to_string())
        .unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
    // A remote that cannot be reached.
    let err = mirrors
        .ensure_commit("http://127.0.0.1:9/nothing.git", "abcdef1")
        .unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
    assert!(
        root_entries(&mirrors).is_empty(),
        "{:?}",
        root_entries(&mirrors)
    );

    // Once the path becomes a repository, the same URL works.
    let repo = Repository::init(&plain).unwrap();
    let sig = git2::Signature::now("Test", "test@example.com").unwrap();
    let tree = repo
        .find_tree(build_tree(&repo, &[("f", File(b"f"))], ""))
        .unwrap();
    let c = repo
        .commit(Some("HEAD"), &sig, &sig, "m", &tree, &[])
        .unwrap();
    assert_eq!(
        mirrors.ensure_commit(plain_url, &c.to_string()).unwrap(),
        c.to_string()
    );

    // A repository that disappears after its mirror was made: known commits still resolve, others report the
    // repository as missing.
    drop(tree);
    drop(repo);
    std::fs::remove_dir_all(&plain).unwrap();
    assert_eq!(
        mirrors.ensure_commit(plain_url, &c.to_string()).unwrap(),
        c.to_string()
    );
    let err = mirrors.ensure_commit(plain_url, "abcdef1").unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
}

#[test]
fn relative_path_is_rejected() {
    let (_dir, mirrors) = mirrors();
    let err = mirrors.ensure_commit("some/repo", "abcdef1").unwrap_err();
    assert!(
        matches!(err, GitError::RepositoryNotFound { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("absolute path"), "{err}");
    assert!(root_entries(&mirrors).is_empty());
}

#[test]
fn read_file_cases() {
    let src = Source::new();
    let c = src.commit(&[
        (".kiln.yml", File(b"steps: []\n")),
        ("big.bin", File(&[7u8; 1000])),
        ("dir/inner.txt", File(b"inner")),
        ("link.yml", Link(".kiln.yml")),
        ("dir/up.yml", Link("../.kiln.yml")),
        ("escape", Link("../../etc/passwd")),
        ("loop", Link("loop")),
    ]);
    let (_dir, mirrors) = mirrors();
    let url = src.url();
    let id = c.to_string();
    assert_eq!(
        mirrors
            .read_file(&url, &id, ".kiln.yml", 100)
            .unwrap()
            .unwrap(),
        b"steps: []\n"
    );
    assert_eq!(
        mirrors
            .read_file(&url, &id[..7], "dir/inner.txt", 5)
            .unwrap()
            .unwrap(),
        b"inner"
    );
    assert_eq!(
        mirrors
            .read_file(&url, &id, "./dir//inner.txt", 5)
            .unwrap()
            .unwrap(),
        b"inner"
    );
    assert_eq!(
        mirrors
            .read_file(&url, &id, "link.yml", 100)
            .unwrap()
            .unwrap(),
        b"steps: []\n"
    );
    assert_eq!(
        mirrors
            .read_file(&url, &id, "dir/up.yml", 100)
            .unwrap()
            .unwrap(),
        b"steps: []\n"
    );
    for absent in [
        "missing.yml",
        "dir",
        "dir/missing",
        "",
        "escape",
        "loop",
        "../x",
    ] {
        assert_eq!(
            mirrors.read_file(&url, &id, absent, 100).unwrap(),
            None,
            "{absent}"
        );
    }
    let err = mirrors.read_file(&url, &id, "big.bin", 999).unwrap_err();
    assert!(
        matches!(
            err,
            GitError::FileTooLarge {
                size: 1000,
                max_bytes: 999,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("big.bin"), "{err}");
    assert_eq!(
        mirrors
            .read_file(&url, &id, "big.bin", 1000)
            .unwrap()
            .unwrap()
            .len(),
        1000
    );
    let err = mirrors
        .read_file(&url, "0123456789abcdef", ".kiln.yml", 100)
        .unwrap_err();
    assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");
}

#[test]
fn list_files_depth_and_limit() {
    let src = Source::new();
    let c = src.commit(&[
        ("a.txt", File(b"a")),
        ("b/c.txt", File(b"c")),
        ("b/d/e.txt", File(b"e")),
        ("b/d/f/g.txt", File(b"g")),
        ("z", Link("a.txt")),
    ]);
    let (_dir, mirrors) = mirrors();
    let (url, id) = (src.url(), c.to_string());
    assert!(mirrors.list_files(&url, &id, 0, 100).unwrap().is_empty());
    assert_eq!(
        mirrors.list_files(&url, &id, 1, 100).unwrap(),
        ["a.txt", "z"]
    );
    assert_eq!(
        mirrors.list_files(&url, &id, 2, 100).unwrap(),
        ["a.txt", "b/c.txt", "z"]
    );
    assert_eq!(
        mirrors.list_files(&url, &id, 3, 100).unwrap(),
        ["a.txt", "b/c.txt", "b/d/e.txt", "z"]
    );
    assert_eq!(
        mirrors.list_files(&url, &id, 10, 100).unwrap(),
        ["a.txt", "b/c.txt", "b/d/e.txt", "b/d/f/g.txt", "z"]
    );
    assert_eq!(
        mirrors.list_files(&url, &id, 10, 2).unwrap(),
        ["a.txt", "b/c.txt"]
    );
    assert!(mirrors.list_files(&url, &id, 10, 0).unwrap().is_empty());
}

#[test]
fn checkout_produces_exactly_the_tree() {
    let src = Source::new();
    let c1 = src.commit(&[
        ("README", File(b"one\n")),
        ("run.sh", Exec(b"#!/bin/sh\necho hi\n")),
        ("old/deep/file.txt", File(b"old")),
        ("keep/x", File(b"x1")),
        ("link", Link("README")),
    ]);
    let c2 = src.commit(&[
        ("README", File(b"two\n")),
        ("keep/x", File(b"x2")),
        ("new.txt", File(b"new")),
        (".gitignore", File(b"*.log\n")),
    ]);
    let (dir, mirrors) = mirrors();
    let dest = dir.path().join("work");
    let url = src.url();

    mirrors.checkout(&url, &c1.to_string(), &dest).unwrap();
    assert_eq!(
        tree_of(&dest),
        set(&[
            "README",
            "run.sh",
            "old/",
            "old/deep/",
            "old/deep/file.txt",
            "keep/",
            "keep/x",
            "link"
        ])
    );
    assert_eq!(std::fs::read(dest.join("README")).unwrap(), b"one\n");
    assert_eq!(
        std::fs::read_link(dest.join("link")).unwrap(),
        Path::new("README")
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_ne!(
            std::fs::metadata(dest.join("run.sh"))
                .unwrap()
                .permissions()
                .mode()
                & 0o111,
            0
        );
    }
    assert!(dest.join(".git").is_dir());
    let repo = Repository::open(&dest).unwrap();
    assert!(repo.head_detached().unwrap());
    assert_eq!(repo.head().unwrap().target().unwrap(), c1);

    // Leftovers from the build: untracked files and directories, ignored files, modified and deleted files.
    std::fs::write(dest.join("untracked.txt"), "u").unwrap();
    std::fs::create_dir_all(dest.join("target/debug")).unwrap();
    std::fs::write(dest.join("target/debug/out"), "o").unwrap();
    std::fs::write(dest.join("keep/x"), "modified").unwrap();
    std::fs::write(dest.join("build.log"), "ignored once .gitignore exists").unwrap();
    std::fs::remove_file(dest.join("README")).unwrap();

    mirrors
        .checkout(&url, &c2.to_string()[..10], &dest)
        .unwrap();
    assert_eq!(
        tree_of(&dest),
        set(&["README", "keep/", "keep/x", "new.txt", ".gitignore"])
    );
    assert_eq!(std::fs::read(dest.join("README")).unwrap(), b"two\n");
    assert_eq!(std::fs::read(dest.join("keep/x")).unwrap(), b"x2");
    let repo = Repository::open(&dest).unwrap();
    assert_eq!(repo.head().unwrap().target().unwrap(), c2);

    // Ignored files go too, and checking out the same commit again restores modified files.
    std::fs::write(dest.join("build.log"), "log").unwrap();
    std::fs::create_dir_all(dest.join("logs")).unwrap();
    std::fs::write(dest.join("logs/a.log"), "log").unwrap();
    std::fs::write(dest.join("new.txt"), "changed").unwrap();
    mirrors.checkout(&url, &c2.to_string(), &dest).unwrap();
    assert_eq!(
        tree_of(&dest),
        set(&["README", "keep/", "keep/x", "new.txt", ".gitignore"])
    );
    assert_eq!(std::fs::read(dest.join("new.txt")).unwrap(), b"new");

    // Back to the first commit.
    mirrors.checkout(&url, &c1.to_string(), &dest).unwrap();
    assert_eq!(
        tree_of(&dest),
        set(&[
            "README",
            "run.sh",
            "old/",
            "old/deep/",
            "old/deep/file.txt",
            "keep/",
            "keep/x",
            "link"
        ])
    );

    // Steps see a real repository.
    if let Some(head) = git_cli(&dest, &["rev-parse", "HEAD"]) {
        assert_eq!(head.trim(), c1.to_string());
        assert_eq!(
            git_cli(&dest, &["status", "--porcelain", "--ignored"]).unwrap(),
            ""
        );
        assert!(
            git_cli(&dest, &["log", "--oneline"])
                .unwrap()
                .lines()
                .count()
                == 1
        );
        assert_eq!(
            git_cli(&dest, &["remote", "get-url", "origin"])
                .unwrap()
                .trim(),
            url
        );
    }
}

#[test]
fn checkout_replaces_foreign_content() {
    let a = Source::new();
    let ca = a.commit(&[("a.txt", File(b"a"))]);
    let b = Source::new();
    let cb = b.commit(&[("b.txt", File(b"b"))]);
    let (dir, mirrors) = mirrors();
    let dest = dir.path().join("work");

    // A directory with junk, including a nested repository and a read-only directory.
    std::fs::create_dir_all(dest.join("junk/nested")).unwrap();
    Repository::init(dest.join("junk/nested")).unwrap();
    std::fs::write(dest.join("junk/file"), "j").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dest.join("junk"), std::fs::Permissions::from_mode(0o500))
            .unwrap();
    }
    mirrors.checkout(&a.url(), &ca.to_string(), &dest).unwrap();
    assert_eq!(tree_of(&dest), set(&["a.txt"]));

    // Another repository into the same directory.
    mirrors.checkout(&b.url(), &cb.to_string(), &dest).unwrap();
    assert_eq!(tree_of(&dest), set(&["b.txt"]));
    assert_eq!(
        Repository::open(&dest)
            .unwrap()
            .head()
            .unwrap()
            .target()
            .unwrap(),
        cb
    );

    // Untracked nested repositories are removed on reuse too.
    Repository::init(dest.join("nested")).unwrap();
    std::fs::write(dest.join("nested/f"), "f").unwrap();
    mirrors.checkout(&b.url(), &cb.to_string(), &dest).unwrap();
    assert_eq!(tree_of(&dest), set(&["b.txt"]));

    // A broken .git is replaced.
    std::fs::write(dest.join(".git/HEAD"), "garbage").unwrap();
    mirrors.checkout(&b.url(), &cb.to_string(), &dest).unwrap();
    assert_eq!(
        Repository::open(&dest)
            .unwrap()
            .head()
            .unwrap()
            .target()
            .unwrap(),
        cb
    );

    // A destination that is a file.
    let file_dest = dir.path().join("a-file");
    std::fs::write(&file_dest, "x").unwrap();
    mirrors
        .checkout(&a.url(), &ca.to_string(), &file_dest)
        .unwrap();
    assert_eq!(tree_of(&file_dest), set(&["a.txt"]));

    // A symbolic link to a directory stays a link; the directory behind it is used.
    #[cfg(unix)]
    {
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::fs::write(real.join("junk"), "j").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        mirrors.checkout(&a.url(), &ca.to_string(), &link).unwrap();
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(tree_of(&real), set(&["a.txt"]));
        mirrors.checkout(&b.url(), &cb.to_string(), &link).unwrap();
        assert_eq!(tree_of(&real), set(&["b.txt"]));
    }

    let err = mirrors.checkout(&a.url(), "0123456789", &dest).unwrap_err();
    assert!(matches!(err, GitError::CommitNotFound { .. }), "{err:?}");
}

#[test]
fn warm_checkout_is_fast() {
    let src = Source::new();
    let files: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| {
            (
                format!("dir{}/file{i}.txt", i % 5),
                format!("content {i}\n").into_bytes(),
            )
        })
        .collect();
    let entries: Vec<(&str, Content<'_>)> =
        files.iter().map(|(p, c)| (p.as_str(), File(c))).collect();
    let c1 = src.commit(&entries);
    let c2 = src.commit(&entries[..40]);
    let (dir, mirrors) = mirrors();
    let url = src.url();
    mirrors.ensure_commit(&url, &c1.to_string()).unwrap();
    mirrors.ensure_commit(&url, &c2.to_string()).unwrap();

    let dest = dir.path().join("work");
    let started = Instant::now();
    mirrors.checkout(&url, &c1.to_string(), &dest).unwrap();
    let fresh = started.elapsed();
    let mut reuse = Duration::MAX;
    for commit in [c2, c1, c2] {
        let started = Instant::now();
        mirrors.checkout(&url, &commit.to_string(), &dest).unwrap();
        reuse = reuse.min(started.elapsed());
    }
    let other = dir.path().join("other");
    let started = Instant::now();
    mirrors.checkout(&url, &c2.to_string(), &other).unwrap();
    let fresh2 = started.elapsed();
    eprintln!("fresh checkout {fresh:?}, fresh (warm) {fresh2:?}, reused {reuse:?}");
    assert_eq!(
        tree_of(&other).iter().filter(|p| !p.ends_with('/')).count(),
        40
    );
    // Generous bounds for unoptimised builds on busy machines; typically a few milliseconds.
    assert!(fresh2 < Duration::from_millis(500), "{fresh2:?}");
    assert!(reuse < Duration::from_millis(500), "{reuse:?}");
}

#[test]
fn concurrent_ensure_commit() {
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let (_dir, mirrors) = mirrors();
    let url = src.url();
    let results: Vec<_> = std::thread::scope(|s| {
        let (mirrors, url) = (&mirrors, &url);
        let handles: Vec<_> = (0..8)
            .map(|i| s.spawn(move || mirrors.ensure_commit(url, &c1.to_string()[..7 + i])))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in results {
        assert_eq!(r.unwrap(), c1.to_string());
    }
    // New commits, fetched by whichever thread gets there first, while others read and check out.
    let c2 = src.commit(&[("a", File(b"2"))]);
    let c3 = src.commit_on("other", &[("b", File(b"3"))]);
    let work = TempDir::new().unwrap();
    std::thread::scope(|s| {
        for i in 0..8 {
            let (mirrors, url, work) = (&mirrors, &url, work.path());
            s.spawn(move || {
                let c = if i % 2 == 0 { c2 } else { c3 };
                assert_eq!(
                    mirrors.ensure_commit(url, &c.to_string()).unwrap(),
                    c.to_string()
                );
                mirrors.fetch(url).unwrap();
                assert!(
                    mirrors
                        .read_file(url, &c.to_string(), "a", 10)
                        .unwrap()
                        .is_some()
                        == (i % 2 == 0)
                );
                mirrors
                    .checkout(url, &c.to_string(), &work.join(i.to_string()))
                    .unwrap();
            });
        }
    });
    assert_eq!(root_entries(&mirrors).len(), 1);
    assert!(lock(&mirrors.locks).is_empty());
}

#[test]
fn ambiguous_short_id() {
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let (_dir, mirrors) = mirrors();
    let url = src.url();
    mirrors.ensure_commit(&url, &c1.to_string()).unwrap();
    // Write blobs into the mirror until two share a 7-digit prefix.
    let mirror = Repository::open_bare(mirrors.mirror_path(&url).unwrap()).unwrap();
    let odb = mirror.odb().unwrap();
    let mut seen = HashMap::new();
    let prefix = (0u64..)
        .find_map(|i| {
            let id = odb
                .write(ObjectType::Blob, i.to_string().as_bytes())
                .unwrap()
                .to_string();
            let prefix = id[..7].to_owned();
            seen.insert(prefix.clone(), id).map(|_| prefix)
        })
        .unwrap();
    let err = mirrors.ensure_commit(&url, &prefix).unwrap_err();
    assert!(matches!(err, GitError::AmbiguousCommit { .. }), "{err:?}");
    assert!(err.to_string().contains(&prefix));
}

#[test]
fn mirrors_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Mirrors>();
    check::<GitError>();
}

#[test]
fn stale_temporary_directories_are_removed() {
    let dir = TempDir::new().unwrap();
    let stale = dir.path().join(format!("{TMP_PREFIX}x-1-1"));
    let fresh = dir.path().join(format!("{TMP_PREFIX}x-1-2"));
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::create_dir_all(&fresh).unwrap();
    let old = SystemTime::now() - Duration::from_secs(7200);
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let mirrors = Mirrors::new(dir.path()).unwrap();
    assert!(!stale.exists());
    assert!(fresh.exists());
    assert!(mirrors.root().is_absolute());
}

/// Revisions as users type them resolve in the local repository and in a mirror, with the
/// branch they are on; what names nothing is "not found", what is malformed is refused early.
#[test]
fn revisions_resolve_locally_and_in_mirrors() {
    let src = Source::new();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let c2 = src.commit(&[("a", File(b"2"))]);
    let c3 = src.commit(&[("a", File(b"3"))]);
    let f1 = src.commit_on("feature/x", &[("a", File(b"f"))]);
    src.repo.set_head("refs/heads/main").unwrap();
    let sig = git2::Signature::now("Test", "test@example.com").unwrap();
    let obj = src.repo.find_object(c2, None).unwrap();
    src.repo.tag("v1.0", &obj, &sig, "release", false).unwrap();
    let (_dir, mirrors) = mirrors();
    let url = src.url();
    let short = &c1.to_string()[..9];
    let cases: [(&str, Oid, Option<&str>); 7] = [
        ("HEAD", c3, Some("main")),
        ("main", c3, Some("main")),
        ("HEAD~2", c1, Some("main")),
        ("main^", c2, Some("main")),
        ("v1.0", c2, Some("main")),
        ("feature/x", f1, Some("feature/x")),
        ("refs/heads/feature/x", f1, Some("feature/x")),
    ];
    for (rev, want, branch) in cases {
        let local = resolve_local(&url, rev).unwrap();
        assert_eq!(local.commit, want.to_string(), "local {rev}");
        assert_eq!(local.branch.as_deref(), branch, "local {rev}");
        let mirrored = mirrors.resolve_revision(&url, rev).unwrap();
        assert_eq!(mirrored, local, "mirror {rev}");
    }
    // A commit id: the branch holding it locally; in a mirror the caller names the branch.
    let local = resolve_local(&url, short).unwrap();
    assert_eq!(local.commit, c1.to_string());
    assert_eq!(local.branch.as_deref(), Some("main"));
    let mirrored = mirrors.resolve_revision(&url, short).unwrap();
    assert_eq!((mirrored.commit, mirrored.branch), (c1.to_string(), None));
    // A branch that moves is fetched again: the mirror does not answer with a stale tip.
    let c4 = src.commit(&[("a", File(b"4"))]);
    assert_eq!(
        mirrors.resolve_revision(&url, "main").unwrap().commit,
        c4.to_string()
    );
    for rev in ["nope", "main~99"] {
        let err = mirrors.resolve_revision(&url, rev).unwrap_err();
        assert!(matches!(err, GitError::RevisionNotFound { .. }), "{err:?}");
        assert!(err.to_string().contains(rev), "{err}");
        let err = resolve_local(&url, rev).unwrap_err();
        assert!(matches!(err, GitError::RevisionNotFound { .. }), "{err:?}");
    }
    let tree = format!("{c1}^{{tree}}");
    let err = resolve_local(&url, &tree).unwrap_err();
    assert!(err.to_string().contains("not a commit"), "{err}");
    for (bad, needle) in [
        ("", "empty"),
        ("main branch", "whitespace"),
        ("--upload-pack=x", "'-'"),
        (&"x".repeat(300), "longer than"),
    ] {
        let err = mirrors.resolve_revision(&url, bad).unwrap_err();
        assert!(matches!(err, GitError::InvalidRevision { .. }), "{err:?}");
        assert!(err.to_string().contains(needle), "{bad:?}: {err}");
    }
}

/// Each fetch adds a pack; the mirror is repacked when more than `MAX_PACKS` pile up, so the
/// count stays bounded after many fetches. Nothing is lost: every commit (also one whose
/// branch was deleted, so unreachable), an annotated tag, and a checkout of the first commit.
#[test]
fn many_fetches_keep_the_pack_count_bounded() {
    let src = Source::new();
    let first = src.commit(&[("a", File(b"0"))]);
    let sig = git2::Signature::now("Test", "test@example.com").unwrap();
    let target = src.repo.find_object(first, None).unwrap();
    let tag = src
        .repo
        .tag("v0", &target, &sig, "annotated", false)
        .unwrap();
    let gone = src.commit_on("gone", &[("g", File(b"gone"))]);
    let (dir, mirrors) = mirrors();
    mirrors.fetch(&src.url()).unwrap();
    src.repo
        .find_reference("refs/heads/gone")
        .unwrap()
        .delete()
        .unwrap();
    let path = mirrors.mirror_path(&src.url()).unwrap();
    let count = || {
        pack_files(&Repository::open_bare(&path).unwrap())
            .unwrap()
            .len()
    };
    let mut commits = vec![first];
    let mut most = 0;
    let mut repacked = false;
    for i in 1..=MAX_PACKS * 3 {
        let before = count();
        commits.push(src.commit(&[("a", File(i.to_string().as_bytes()))]));
        mirrors.fetch(&src.url()).unwrap();
        let after = count();
        assert!(after <= MAX_PACKS, "{after} packs after fetch {i}");
        repacked |= after < before;
        most = most.max(after);
    }
    assert!(repacked, "never repacked (most {most} packs)");
    for c in commits.iter().chain([&gone]) {
        assert_eq!(
            mirrors.ensure_commit(&src.url(), &c.to_string()).unwrap(),
            c.to_string()
        );
    }
    let mirror = Repository::open_bare(&path).unwrap();
    assert_eq!(mirror.refname_to_id("refs/tags/v0").unwrap(), tag);
    assert_eq!(mirror.find_tag(tag).unwrap().target_id(), first);
    let work = dir.path().join("work");
    mirrors
        .checkout(&src.url(), &first.to_string(), &work)
        .unwrap();
    assert_eq!(std::fs::read(work.join("a")).unwrap(), b"0");
}

/// Several processes share one cache root (the runners of one machine): each `Mirrors` here has
/// its own in-process locks, as separate processes do, and its own open lock files (an `flock`
/// is per open file, so they exclude each other as processes would). All of them need one new
/// commit at once: exactly one fetches it, the others wait on the mirror's lock file and find it
/// there. A commit already present is never fetched.
#[test]
fn caches_sharing_a_root_fetch_a_new_commit_once() {
    let src = Source::new();
    let url = src.url();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let root = TempDir::new().unwrap();
    let caches: Vec<Mirrors> = (0..6).map(|_| Mirrors::new(root.path()).unwrap()).collect();
    let total = |caches: &[Mirrors]| caches.iter().map(Mirrors::fetches).sum::<u64>();
    let work = TempDir::new().unwrap();
    for (round, files) in [&[("a", File(b"2"))], &[("a", File(b"3"))]]
        .iter()
        .enumerate()
    {
        let before = total(&caches);
        // The first round also races on creating the mirror.
        let commit = if round == 0 { c1 } else { src.commit(*files) };
        let barrier = std::sync::Barrier::new(caches.len());
        std::thread::scope(|s| {
            for (i, cache) in caches.iter().enumerate() {
                let (barrier, url, work) = (&barrier, &url, work.path());
                s.spawn(move || {
                    barrier.wait();
                    let dest = work.join(i.to_string());
                    cache.checkout(url, &commit.to_string(), &dest).unwrap();
                    assert_eq!(
                        Repository::open(&dest).unwrap().head().unwrap().target(),
                        Some(commit)
                    );
                });
            }
        });
        assert_eq!(total(&caches) - before, 1, "round {round}: fetches");
    }
    // Present already: no fetch at all.
    let before = total(&caches);
    for cache in &caches {
        cache.ensure_commit(&url, &c1.to_string()).unwrap();
    }
    assert_eq!(total(&caches), before);
    assert_eq!(root_entries(&caches[0]).len(), 1);
}

/// The lock is the operating system's: a process that holds a mirror's lock and is killed
/// (SIGKILL, no chance to clean up) releases it, and a cache waiting for it goes on.
#[test]
fn a_killed_lock_holder_releases_the_mirror() {
    let src = Source::new();
    let url = src.url();
    src.commit(&[("a", File(b"1"))]);
    let (_dir, mirrors) = mirrors();
    mirrors.fetch(&url).unwrap();
    let c2 = src.commit(&[("a", File(b"2"))]);
    let dir_name = super::Source::parse(&url).unwrap().dir_name;
    let lock_path = mirrors.root().join(LOCK_DIR).join(&dir_name);
    // Another process takes the mirror's lock and keeps it.
    let script = "import fcntl, sys, time\n\
                  f = open(sys.argv[1], 'a')\n\
                  fcntl.flock(f, fcntl.LOCK_EX)\n\
                  print('locked', flush=True)\n\
                  time.sleep(600)\n";
    let Ok(mut holder) = Command::new("python3")
        .args(["-c", script, lock_path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
    else {
        eprintln!("python3 not found; skipping");
        return;
    };
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "locked");
    assert!(mirrors.lock_file(&dir_name, false).unwrap().is_none());
    std::thread::scope(|s| {
        let waiter = s.spawn(|| mirrors.ensure_commit(&url, &c2.to_string()));
        holder.kill().unwrap();
        holder.wait().unwrap();
        assert_eq!(waiter.join().unwrap().unwrap(), c2.to_string());
    });
    assert_eq!(mirrors.fetches(), 2);
}

/// A fetch killed midway leaves git's lock files and a partial pack in the mirror; with them a
/// later fetch fails ("the lock file exists"). The next holder of the mirror's lock removes them
/// (no live writer owns them) and fetches; what was complete stays.
#[test]
fn a_fetch_killed_midway_does_not_break_the_mirror() {
    let src = Source::new();
    let url = src.url();
    let c1 = src.commit(&[("a", File(b"1"))]);
    let (dir, mirrors) = mirrors();
    mirrors.ensure_commit(&url, &c1.to_string()).unwrap();
    let mirror = mirrors.mirror_path(&url).unwrap();
    let pack_dir = mirror.join("objects/pack");
    let packs_before = pack_files(&Repository::open_bare(&mirror).unwrap()).unwrap();
    let leftovers = [
        mirror.join("HEAD.lock"),
        mirror.join("packed-refs.lock"),
        mirror.join("refs/heads/main.lock"),
        pack_dir.join("pack_git2_a1b2c3"),
        pack_dir.join(format!("pack-{}.pack", "0".repeat(40))),
        pack_dir.join(format!("pack-{}.idx.lock", "1".repeat(40))),
    ];
    for path in &leftovers {
        std::fs::write(path, b"partial").unwrap();
    }
    let c2 = src.commit(&[("a", File(b"2"))]);
    assert_eq!(
        mirrors.ensure_commit(&url, &c2.to_string()).unwrap(),
        c2.to_string()
    );
    for path in &leftovers {
        assert!(!path.exists(), "{} is left", path.display());
    }
    for pack in &packs_before {
        assert!(pack.exists(), "{} was removed", pack.display());
    }
    let repo = Repository::open_bare(&mirror).unwrap();
    assert_eq!(repo.refname_to_id("refs/heads/main").unwrap(), c2);
    let work = dir.path().join("work");
    mirrors.checkout(&url, &c1.to_string(), &work).unwrap();
    assert_eq!(std::fs::read(work.join("a")).unwrap(), b"1");
}

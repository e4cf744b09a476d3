//! Tests of [`Mirrors::branches`] and [`Mirrors::first_parent_since`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;
use tempfile::TempDir;

/// A source repository whose commits are written straight into its object database, all with
/// the same timestamp (so nothing can rely on commit dates for order).
struct Upstream {
    dir: TempDir,
    repo: Repository,
    n: std::cell::Cell<u32>,
}

impl Upstream {
    fn new() -> Upstream {
        let dir = TempDir::new().unwrap();
        let repo = Repository::init_bare(dir.path()).unwrap();
        Upstream {
            dir,
            repo,
            n: std::cell::Cell::new(0),
        }
    }

    fn url(&self) -> String {
        self.dir.path().to_str().unwrap().to_owned()
    }

    /// A commit with these parents (not on any branch, kept by `refs/keep/ID`); its tree holds one unique file.
    fn commit(&self, parents: &[Oid]) -> Oid {
        self.n.set(self.n.get() + 1);
        let blob = self
            .repo
            .blob(format!("{}", self.n.get()).as_bytes())
            .unwrap();
        let mut tb = self.repo.treebuilder(None).unwrap();
        tb.insert("f", blob, 0o100644).unwrap();
        let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
        let sig =
            git2::Signature::new("T", "t@example.com", &git2::Time::new(1_700_000_000, 0)).unwrap();
        let parents: Vec<git2::Commit<'_>> = parents
            .iter()
            .map(|p| self.repo.find_commit(*p).unwrap())
            .collect();
        let parents: Vec<&git2::Commit<'_>> = parents.iter().collect();
        let id = self
            .repo
            .commit(None, &sig, &sig, "c", &tree, &parents)
            .unwrap();
        // Keep every commit reachable (outside refs/heads) so that a fetch brings it.
        self.repo
            .reference(&format!("refs/keep/{id}"), id, true, "test")
            .unwrap();
        id
    }

    /// A linear chain of `n` commits on top of `parent` (if any), oldest first.
    fn chain(&self, parent: Option<Oid>, n: usize) -> Vec<Oid> {
        let mut out = Vec::new();
        let mut last = parent;
        for _ in 0..n {
            let c = self.commit(last.as_slice());
            out.push(c);
            last = Some(c);
        }
        out
    }

    fn set_branch(&self, name: &str, to: Oid) {
        self.repo
            .reference(&format!("refs/heads/{name}"), to, true, "test")
            .unwrap();
    }
}

fn ids(oids: &[Oid]) -> Vec<String> {
    oids.iter().map(Oid::to_string).collect()
}

fn setup() -> (Upstream, TempDir, Mirrors) {
    let up = Upstream::new();
    let cache = TempDir::new().unwrap();
    let mirrors = Mirrors::new(cache.path()).unwrap();
    (up, cache, mirrors)
}

#[test]
fn branches_lists_heads_sorted_with_nested_names_and_follows_deletes() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 2);
    up.set_branch("main", c[1]);
    up.set_branch("release/1.0", c[0]);
    up.repo
        .tag_lightweight("v1", &up.repo.find_object(c[0], None).unwrap(), false)
        .unwrap();
    m.fetch(&up.url()).unwrap();
    assert_eq!(
        m.branches(&up.url()).unwrap(),
        vec![
            ("main".to_owned(), c[1].to_string()),
            ("release/1.0".to_owned(), c[0].to_string()),
        ]
    );
    up.repo
        .find_reference("refs/heads/release/1.0")
        .unwrap()
        .delete()
        .unwrap();
    let d = up.commit(&[c[1]]);
    up.set_branch("main", d);
    m.fetch(&up.url()).unwrap();
    assert_eq!(
        m.branches(&up.url()).unwrap(),
        vec![("main".to_owned(), d.to_string())]
    );
}

#[test]
fn branches_needs_a_mirror() {
    let (up, _cache, m) = setup();
    assert!(m.branches(&up.url()).is_err());
    assert!(m.branches("relative/path").is_err());
}

#[test]
fn linear_history_after_since_oldest_first() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 10);
    let url = up.url();
    let head = c[9].to_string();
    let got = m
        .first_parent_since(&url, &head, Some(&c[2].to_string()), 100)
        .unwrap();
    assert_eq!(got.commits, ids(&c[3..]));
    assert!(got.reached_since && !got.behind);

    // Since the head: nothing, reached.
    let got = m.first_parent_since(&url, &head, Some(&head), 100).unwrap();
    assert!(got.commits.is_empty() && got.reached_since);

    // More than `cap` after since: the newest `cap`, not reached.
    let got = m
        .first_parent_since(&url, &head, Some(&c[2].to_string()), 4)
        .unwrap();
    assert_eq!(got.commits, ids(&c[6..]));
    assert!(!got.reached_since);
    // Exactly `cap`: reached.
    let got = m
        .first_parent_since(&url, &head, Some(&c[5].to_string()), 4)
        .unwrap();
    assert_eq!(got.commits, ids(&c[6..]));
    assert!(got.reached_since);
}

#[test]
fn without_since_the_newest_cap_commits() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 5);
    let url = up.url();
    let head = c[4].to_string();
    let got = m.first_parent_since(&url, &head, None, 2).unwrap();
    assert_eq!(got.commits, ids(&c[3..]));
    assert!(!got.reached_since);
    let got = m.first_parent_since(&url, &head, None, 100).unwrap();
    assert_eq!(got.commits, ids(&c));
    let got = m.first_parent_since(&url, &head, None, 0).unwrap();
    assert!(got.commits.is_empty());
    // An empty or malformed since counts as none.
    let got = m.first_parent_since(&url, &head, Some(""), 1).unwrap();
    assert_eq!(got.commits, ids(&c[4..]));
}

#[test]
fn merges_count_once_and_second_parents_are_not_listed() {
    let (up, _cache, m) = setup();
    let main = up.chain(None, 3); // a b c
    let feature = up.chain(Some(main[1]), 2); // b <- f1 <- f2
    let merge = up.commit(&[main[2], feature[1]]);
    let url = up.url();
    let got = m
        .first_parent_since(&url, &merge.to_string(), Some(&main[2].to_string()), 100)
        .unwrap();
    assert_eq!(got.commits, ids(&[merge]));
    assert!(got.reached_since);
    let got = m
        .first_parent_since(&url, &merge.to_string(), None, 100)
        .unwrap();
    assert_eq!(got.commits, ids(&[main[0], main[1], main[2], merge]));
}

#[test]
fn since_on_the_second_parent_side_is_reached() {
    // The branch was at f2; a merge (`git pull` without rebase) made a commit whose first parent
    // is another line (c) and whose second parent is f2.
    let (up, _cache, m) = setup();
    let main = up.chain(None, 3); // a b c
    let feature = up.chain(Some(main[1]), 2); // b <- f1 <- f2
    let merge = up.commit(&[main[2], feature[1]]);
    let got = m
        .first_parent_since(
            &up.url(),
            &merge.to_string(),
            Some(&feature[1].to_string()),
            100,
        )
        .unwrap();
    assert_eq!(got.commits, ids(&[main[2], merge]));
    assert!(got.reached_since);
}

#[test]
fn force_push_is_not_reached() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 3); // a b c
    let rewritten = up.chain(Some(c[0]), 2); // a <- d <- e
    let got = m
        .first_parent_since(
            &up.url(),
            &rewritten[1].to_string(),
            Some(&c[2].to_string()),
            100,
        )
        .unwrap();
    assert!(!got.reached_since && !got.behind);
    // The commits not in since's history.
    assert_eq!(got.commits, ids(&rewritten));

    // Unrelated history.
    let other = up.chain(None, 2);
    let got = m
        .first_parent_since(&up.url(), &other[1].to_string(), Some(&c[2].to_string()), 1)
        .unwrap();
    assert!(!got.reached_since);
    assert_eq!(got.commits, ids(&other[1..]));
}

#[test]
fn head_behind_since() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 3);
    let got = m
        .first_parent_since(&up.url(), &c[1].to_string(), Some(&c[2].to_string()), 100)
        .unwrap();
    assert!(got.behind && !got.reached_since);
    assert!(got.commits.is_empty());
}

#[test]
fn unknown_since_is_not_an_error() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 3);
    let got = m
        .first_parent_since(&up.url(), &c[2].to_string(), Some(&"ab".repeat(20)), 2)
        .unwrap();
    assert!(!got.reached_since && !got.behind);
    assert_eq!(got.commits, ids(&c[1..]));
}

#[test]
fn head_missing_from_the_mirror_is_fetched() {
    let (up, _cache, m) = setup();
    let c = up.chain(None, 2);
    up.set_branch("main", c[1]);
    m.fetch(&up.url()).unwrap();
    let d = up.commit(&[c[1]]);
    up.set_branch("main", d);
    let got = m
        .first_parent_since(&up.url(), &d.to_string(), Some(&c[1].to_string()), 10)
        .unwrap();
    assert_eq!(got.commits, ids(&[d]));
    assert!(got.reached_since);
}

//! Revisions as users type them (`HEAD`, `main`, `v1.2`, `HEAD~2`, `3f2a9c1`), resolved to a full
//! commit id and, where the revision says so, the branch it is on.

use git2::{ErrorCode, Oid, Repository};

use crate::{GitError, Mirrors, Source, fetch_mirror, validate_commit_id};

/// Longest accepted revision expression, in bytes.
pub const MAX_REVISION_LEN: usize = 256;

/// A revision resolved in a repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The full (40 hex digits) id of the commit.
    pub commit: String,
    /// The branch the revision is on (name without `refs/heads/`): the branch it names, the
    /// branch `HEAD` points at when the commit is in `HEAD`'s history, else the first branch
    /// (by name) whose history holds it. `None` when no branch holds it.
    pub branch: Option<String>,
}

/// Whether `rev` is spelled as a commit id (at least 7 hex digits): such a revision is looked up
/// as an object id (and checked as one by [`validate_commit_id`]), never as a ref name.
pub fn is_commit_id(rev: &str) -> bool {
    rev.len() >= 7 && rev.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks the syntax of a revision before any I/O: a commit id, or what `git rev-parse` reads
/// (a branch, a tag, `HEAD`, `HEAD~2`, `main^`, `v1.0^{commit}`), with no whitespace or control
/// characters, not starting with `-`, at most [`MAX_REVISION_LEN`] bytes.
pub fn validate_revision(rev: &str) -> Result<(), GitError> {
    let invalid = |reason: &str| {
        Err(GitError::InvalidRevision {
            revision: rev.to_owned(),
            reason: reason.to_owned(),
        })
    };
    if rev.is_empty() {
        return invalid("it is empty");
    }
    if rev.len() > MAX_REVISION_LEN {
        return Err(GitError::InvalidRevision {
            revision: format!("{}...", rev.get(..32).unwrap_or("")),
            reason: format!("it is longer than {MAX_REVISION_LEN} bytes"),
        });
    }
    if rev.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return invalid("it contains whitespace or control characters");
    }
    if rev.starts_with('-') {
        return invalid("it starts with '-'");
    }
    if is_commit_id(rev) {
        return validate_commit_id(rev);
    }
    Ok(())
}

/// Resolves `rev` in the local repository at `path` (a working tree or a bare repository), as
/// `kiln submit --repo PATH --commit REV` does before it sends the commit's id.
pub fn resolve_local(path: &str, rev: &str) -> Result<Resolved, GitError> {
    validate_revision(rev)?;
    let repo = Repository::open(path).map_err(|e| GitError::RepositoryNotFound {
        url: path.to_owned(),
        reason: format!("not a git repository: {}", e.message()),
        cause: Some(e),
    })?;
    resolve_in(&repo, path, rev)
}

impl Mirrors {
    /// Resolves `rev` in the mirror of `url`. A commit id is looked up as
    /// [`Mirrors::ensure_commit`] does (fetching only when it is missing) and names no branch
    /// (the caller says which branch it builds); any other revision names refs that move, so the
    /// mirror is fetched first (its `HEAD` follows the remote's default branch).
    pub fn resolve_revision(&self, url: &str, rev: &str) -> Result<Resolved, GitError> {
        validate_revision(rev)?;
        if is_commit_id(rev) {
            let commit = self.ensure_commit(url, rev)?;
            return Ok(Resolved {
                commit,
                branch: None,
            });
        }
        let source = Source::parse(url)?;
        let path = self.root.join(&source.dir_name);
        let guard = self.lock_for(&source);
        let repo = guard.with(|| match Repository::open_bare(&path) {
            Ok(repo) => {
                source.check_local()?;
                fetch_mirror(&repo, &source, &self.fetches)?;
                Ok(repo)
            }
            Err(_) => self.create_mirror(&source, &path),
        })?;
        resolve_in(&repo, &source.url, rev)
    }
}

fn resolve_in(repo: &Repository, url: &str, rev: &str) -> Result<Resolved, GitError> {
    let not_found = || GitError::RevisionNotFound {
        url: url.to_owned(),
        revision: rev.to_owned(),
    };
    let (object, reference) = match repo.revparse_ext(rev) {
        Ok(found) => found,
        Err(e) if e.code() == ErrorCode::Ambiguous => {
            return Err(GitError::AmbiguousCommit {
                url: url.to_owned(),
                commit: rev.to_owned(),
            });
        }
        Err(e)
            if matches!(
                e.code(),
                ErrorCode::NotFound | ErrorCode::InvalidSpec | ErrorCode::UnbornBranch
            ) =>
        {
            return Err(not_found());
        }
        Err(e) => {
            return Err(GitError::git(
                format!("cannot resolve revision {rev:?} in {url}"),
                e,
            ));
        }
    };
    let commit = object
        .peel_to_commit()
        .map_err(|_| GitError::InvalidCommitId {
            commit: rev.to_owned(),
            reason: format!(
                "it names a {} in {url}, not a commit",
                object.kind().map_or("object", |k| k.str())
            ),
        })?
        .id();
    // The branch a ref names (`main`, or `HEAD` pointing at `refs/heads/main`).
    let named = reference.and_then(|r| r.resolve().ok()).and_then(|r| {
        r.name()
            .ok()
            .and_then(|n| n.strip_prefix("refs/heads/"))
            .map(str::to_owned)
    });
    let branch = named.or_else(|| branch_holding(repo, commit));
    Ok(Resolved {
        commit: commit.to_string(),
        branch,
    })
}

/// The branch whose history holds `commit`: `HEAD`'s branch first, else the first by name.
fn branch_holding(repo: &Repository, commit: Oid) -> Option<String> {
    let holds = |tip: Oid| tip == commit || repo.graph_descendant_of(tip, commit).unwrap_or(false);
    if let Ok(head) = repo.head()
        && head.is_branch()
        && let (Ok(name), Some(tip)) = (head.shorthand(), head.target())
        && holds(tip)
    {
        return Some(name.to_owned());
    }
    let mut names: Vec<(String, Oid)> = repo
        .branches(Some(git2::BranchType::Local))
        .ok()?
        .filter_map(|b| {
            let (b, _) = b.ok()?;
            Some((b.name().ok()??.to_owned(), b.get().target()?))
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|&(_, tip)| holds(tip))
        .map(|(name, _)| name)
}

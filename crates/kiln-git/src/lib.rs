//! kiln's git layer: a cache of bare mirrors, one per repository URL, from which the dispatcher checks that a
//! submitted commit exists and reads its pipeline file, and from which runners check commits out into their
//! workspaces. Everything here is synchronous (callers wrap it in `spawn_blocking`) and never looks at the
//! process's current directory: repository URLs are absolute paths, `file://` URLs, or https/ssh URLs.
//!
//! - [`Mirrors`]: the mirror cache. [`Mirrors::ensure_commit`] fetches a mirror only when the commit is missing;
//!   [`Mirrors::read_file`] and [`Mirrors::list_files`] read a commit's tree without a working tree;
//!   [`Mirrors::checkout`] turns a directory into a clean git working tree of a commit, borrowing the mirror's
//!   objects through git's alternates mechanism so that nothing is copied.
//! - [`validate_commit_id`]: the syntax check for commit ids, usable before any I/O.
//! - [`revision`]: revisions as users type them (`HEAD`, `main`, `v1.2`, `HEAD~2`), resolved in a
//!   local repository ([`resolve_local`]) or in a mirror ([`Mirrors::resolve_revision`]), with the
//!   branch they are on.
//! - [`GitError`]: every failure, with lowercase messages that name the URL and commit.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use git2::build::CheckoutBuilder;
use git2::{
    AutotagOption, Cred, CredentialType, ErrorCode, FetchOptions, FetchPrune, ObjectType, Oid,
    RemoteCallbacks, Repository, RepositoryInitOptions, RepositoryOpenFlags, Status, StatusOptions,
    Tree,
};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

/// The refspec of a mirror: every ref of the remote, forced, into the same name.
const MIRROR_REFSPEC: &str = "+refs/*:refs/*";
/// The name of the remote configured in mirrors and in checked-out working trees.
const REMOTE_NAME: &str = "origin";
/// How many times the credentials callback may be asked during one fetch before giving up. libgit2 asks again
/// after every rejected credential, so without a bound a wrong password or an empty ssh-agent loops forever.
const MAX_CREDENTIAL_ATTEMPTS: u32 = 3;
/// How many symbolic links [`Mirrors::read_file`] follows before answering "absent".
const MAX_SYMLINK_HOPS: usize = 8;
/// Prefix of the directories in which new mirrors are built before being renamed into place.
const TMP_PREFIX: &str = ".tmp-";
/// The directory under the cache root holding one lock file per mirror (never removed: removing
/// a lock file another process has open would let two processes hold "the" lock).
const LOCK_DIR: &str = ".locks";
/// Temporary mirror directories older than this are left over from a crash and removed by [`Mirrors::new`].
const STALE_TMP_AGE: Duration = Duration::from_secs(3600);
/// Git's file mode for symbolic links.
const FILEMODE_LINK: i32 = 0o120000;

/// Packs a mirror may hold: every fetch adds one (libgit2 keeps what it receives as a pack), and a
/// lookup tries each pack in turn, so a long-lived mirror would slow down as they pile up. A
/// fetch that leaves more than this many repacks the mirror into one pack.
pub const MAX_PACKS: usize = 16;

/// Everything that can go wrong in the git layer.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    /// The commit id is not syntactically valid (see [`validate_commit_id`]), or names an object that is not a
    /// commit.
    #[error("invalid commit id {commit:?}: {reason}")]
    InvalidCommitId {
        /// The id as given.
        commit: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL cannot be fetched: the path does not exist or is not a git repository, the URL is relative, the
    /// host cannot be reached, authentication failed, and so on.
    #[error("repository {url} not found: {reason}")]
    RepositoryNotFound {
        /// The URL as given.
        url: String,
        /// A short description of the problem (including libgit2's message when a fetch failed).
        reason: String,
        /// The libgit2 error, when there is one.
        #[source]
        cause: Option<git2::Error>,
    },
    /// The repository was fetched but does not contain the commit.
    #[error("commit {commit} not found in repository {url}")]
    CommitNotFound {
        /// The URL as given.
        url: String,
        /// The commit id as given.
        commit: String,
    },
    /// A revision (`HEAD~2`, a branch or tag name) is not well formed (see
    /// [`validate_revision`]).
    #[error("invalid revision {revision:?}: {reason}")]
    InvalidRevision {
        /// The revision as given (cut when it is very long).
        revision: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The repository has no branch, tag or commit by that name.
    #[error("revision {revision} not found in repository {url} (not a branch, tag or commit)")]
    RevisionNotFound {
        /// The URL as given.
        url: String,
        /// The revision as given.
        revision: String,
    },
    /// The abbreviated commit id matches several objects.
    #[error("commit id {commit} is ambiguous in repository {url}")]
    AmbiguousCommit {
        /// The URL as given.
        url: String,
        /// The abbreviated id as given.
        commit: String,
    },
    /// [`Mirrors::read_file`] found a file larger than the caller's limit.
    #[error(
        "file {path} in commit {commit} of {url} is {size} bytes, more than the limit of {max_bytes}"
    )]
    FileTooLarge {
        /// The URL as given.
        url: String,
        /// The full commit id.
        commit: String,
        /// The path as given.
        path: String,
        /// The file's size in bytes.
        size: u64,
        /// The caller's limit.
        max_bytes: usize,
    },
    /// A filesystem operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the path.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Any other libgit2 failure.
    #[error("{context}: {source}")]
    Git {
        /// What was being done, naming the URL or path.
        context: String,
        /// The underlying error.
        #[source]
        source: git2::Error,
    },
}

impl GitError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        GitError::Io {
            context: context.into(),
            source,
        }
    }

    fn git(context: impl Into<String>, source: git2::Error) -> Self {
        GitError::Git {
            context: context.into(),
            source,
        }
    }

    fn not_found(url: &str, reason: impl Into<String>, cause: Option<git2::Error>) -> Self {
        GitError::RepositoryNotFound {
            url: url.to_owned(),
            reason: reason.into(),
            cause,
        }
    }
}

/// Checks the syntax of a commit id: 7 to 40 hexadecimal digits, or exactly 64 (the length of sha256 ids).
/// Upper-case digits are accepted.
pub fn validate_commit_id(commit: &str) -> Result<(), GitError> {
    let invalid = |reason: String| {
        Err(GitError::InvalidCommitId {
            commit: commit.to_owned(),
            reason,
        })
    };
    if commit.is_empty() {
        return invalid("it is empty".to_owned());
    }
    if let Some(c) = commit.chars().find(|c| !c.is_ascii_hexdigit()) {
        return invalid(format!("{c:?} is not a hexadecimal digit"));
    }
    match commit.len() {
        0..7 => invalid(format!(
            "{} digits is too short; at least 7 are needed",
            commit.len()
        )),
        7..=40 | 64 => Ok(()),
        n => invalid(format!(
            "{n} digits; a commit id has at most 40 digits (or exactly 64 for sha256)"
        )),
    }
}

/// Where a repository URL points, once parsed.
#[derive(Debug, Clone)]
struct Source {
    /// The URL as the caller gave it, for messages.
    url: String,
    /// What libgit2 fetches from: the absolute path for local repositories, the URL otherwise.
    fetch_url: String,
    /// The local repository's path, for local repositories.
    local: Option<PathBuf>,
    /// The name of the mirror's directory under the cache root.
    dir_name: String,
}

impl Source {
    fn parse(url: &str) -> Result<Source, GitError> {
        let trimmed = url.trim();
        if trimmed.is_empty() {
            return Err(GitError::not_found(url, "the url is empty", None));
        }
        let local = if let Some(rest) = trimmed.strip_prefix("file://") {
            // file:///abs/path or file://localhost/abs/path.
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(GitError::not_found(
                    url,
                    "a file:// url must name an absolute path on this machine (file:///path/to/repo)",
                    None,
                ));
            }
            Some(PathBuf::from(percent_decode(path)))
        } else if Path::new(trimmed).is_absolute() {
            Some(PathBuf::from(trimmed))
        } else if trimmed.contains("://") || is_scp_like(trimmed) {
            None
        } else {
            return Err(GitError::not_found(
                url,
                "a relative path was given; an absolute path (or a file://, https:// or ssh:// url) is needed",
                None,
            ));
        };
        let fetch_url = match &local {
            Some(path) => {
                let s = path
                    .to_str()
                    .ok_or_else(|| GitError::not_found(url, "the path is not valid utf-8", None))?;
                let s = s.trim_end_matches('/');
                if s.is_empty() {
                    "/".to_owned()
                } else {
                    s.to_owned()
                }
            }
            None => trimmed.to_owned(),
        };
        let dir_name = mirror_dir_name(&fetch_url);
        Ok(Source {
            url: url.to_owned(),
            local: local.map(|_| PathBuf::from(&fetch_url)),
            fetch_url,
            dir_name,
        })
    }

    /// For local repositories, checks that the path exists and is a git repository, so that a bad path is
    /// reported clearly and before anything is created in the cache.
    fn check_local(&self) -> Result<(), GitError> {
        let Some(path) = &self.local else {
            return Ok(());
        };
        match std::fs::metadata(path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(GitError::not_found(
                    &self.url,
                    "the path is not a directory",
                    None,
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(GitError::not_found(&self.url, "no such directory", None));
            }
            Err(e) => {
                return Err(GitError::io(
                    format!("cannot read repository path {}", path.display()),
                    e,
                ));
            }
        }
        match Repository::open_ext(
            path,
            RepositoryOpenFlags::NO_SEARCH,
            std::iter::empty::<&OsStr>(),
        ) {
            Ok(_) => Ok(()),
            Err(e) => Err(GitError::not_found(
                &self.url,
                format!("not a git repository ({})", e.message()),
                Some(e),
            )),
        }
    }
}

/// Whether `url` has git's scp-like ssh syntax, `[user@]host:path`: a colon before any slash.
fn is_scp_like(url: &str) -> bool {
    match url.find(':') {
        Some(colon) => colon > 0 && !url[..colon].contains('/'),
        None => false,
    }
}

/// Decodes `%XX` escapes in a `file://` URL's path; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The mirror directory's name: 16 hex digits of the URL's sha256, then a readable suffix from its last
/// component (`https://host/org/app.git` gives `…-app`).
fn mirror_dir_name(fetch_url: &str) -> String {
    let hash = hex::encode(&Sha256::digest(fetch_url.as_bytes())[..8]);
    let last = fetch_url
        .trim_end_matches('/')
        .rsplit(['/', ':'])
        .next()
        .unwrap_or("");
    let last = last.strip_suffix(".git").unwrap_or(last);
    let suffix: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    let suffix = suffix.trim_start_matches('.');
    if suffix.is_empty() {
        format!("{hash}-repo")
    } else {
        format!("{hash}-{suffix}")
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A cache of bare mirrors, one per repository URL, under a root directory. Each mirror's directory name is
/// derived from a hash of the URL plus a readable suffix. Mirrors fetch every ref (`+refs/*:refs/*`, pruned).
///
/// `Mirrors` is `Send + Sync` and may be shared between threads, and several processes (the runners of one
/// machine) may share one root: a lock per mirror makes sure two fetches (or a fetch and a repack) of one
/// mirror never run at once, while reads need no lock (git writes objects and refs atomically). The lock is a
/// mutex inside the process, then an exclusive `flock` on the mirror's file under `.locks/`, which the
/// operating system releases when its holder dies. Whoever waited for it looks for the commit again before
/// fetching, so N processes that need one new commit fetch it once. A fetch killed midway leaves git's lock
/// files and a partial pack behind; the next holder of the lock removes them (no live writer can own them)
/// before it fetches.
#[derive(Debug)]
pub struct Mirrors {
    /// The absolute directory holding the mirrors.
    root: PathBuf,
    /// One lock per mirror directory name, held while the mirror is created or fetched; an entry is removed
    /// when nobody holds or waits for it, so bad URLs do not make the map grow.
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Fetches started by this value (a mirror's creation included), for tests and figures.
    fetches: AtomicU64,
}

/// Holds a mirror's lock; removes the map entry on drop when no one else uses it.
struct MirrorLock<'a> {
    mirrors: &'a Mirrors,
    key: String,
    lock: Option<Arc<Mutex<()>>>,
}

impl MirrorLock<'_> {
    /// Runs `f` holding the mirror's lock: the mutex of this process, then the lock file shared with other
    /// processes (waiting for both).
    fn with<R>(&self, f: impl FnOnce() -> Result<R, GitError>) -> Result<R, GitError> {
        let _guard = self.lock.as_deref().map(self::lock);
        let _file = self.mirrors.lock_file(&self.key, true)?;
        f()
    }
}

impl Drop for MirrorLock<'_> {
    fn drop(&mut self) {
        let mut map = lock(&self.mirrors.locks);
        if let Some(arc) = self.lock.take() {
            // One reference in the map, one here: nobody else holds or waits for this lock.
            if Arc::strong_count(&arc) == 2 {
                map.remove(&self.key);
            }
        }
    }
}

impl Mirrors {
    /// Opens (creating it if needed) the cache at `root`. A relative `root` is made absolute once, here.
    /// Temporary directories left over by an earlier process that crashed while creating a mirror are removed.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, GitError> {
        let root = root.into();
        let root = std::path::absolute(&root).map_err(|e| {
            GitError::io(
                format!("cannot make mirror root {} absolute", root.display()),
                e,
            )
        })?;
        std::fs::create_dir_all(&root).map_err(|e| {
            GitError::io(format!("cannot create mirror root {}", root.display()), e)
        })?;
        let mirrors = Mirrors {
            root,
            locks: Mutex::new(HashMap::new()),
            fetches: AtomicU64::new(0),
        };
        mirrors.remove_stale_tmp_dirs();
        Ok(mirrors)
    }

    /// The directory holding the mirrors.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// How many fetches this value started (each creation of a mirror included). Other processes sharing
    /// the root count their own.
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// Takes the cross-process lock of the mirror `dir_name`: an exclusive `flock` on `.locks/<dir_name>`,
    /// released when the returned file is closed (or its process dies). Without `wait`, answers `None` when
    /// another process holds it.
    fn lock_file(&self, dir_name: &str, wait: bool) -> Result<Option<std::fs::File>, GitError> {
        let dir = self.root.join(LOCK_DIR);
        let path = dir.join(dir_name);
        let context = |what: &str| {
            format!(
                "cannot {what} the lock file {} of the mirror cache (every process sharing the cache needs to \
                 write in it)",
                path.display()
            )
        };
        std::fs::create_dir_all(&dir).map_err(|e| GitError::io(context("create"), e))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .or_else(|e| match e.kind() {
                // Made by another user sharing the cache: an `flock` needs only a read handle.
                io::ErrorKind::PermissionDenied => std::fs::File::open(&path),
                _ => Err(e),
            })
            .map_err(|e| GitError::io(context("open"), e))?;
        // `File::lock` of the standard library is newer than the crate's minimum Rust version.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => return Ok(Some(file)),
            Err(fs4::TryLockError::WouldBlock) if !wait => return Ok(None),
            Err(fs4::TryLockError::WouldBlock) => {}
            Err(fs4::TryLockError::Error(e)) => return Err(GitError::io(context("lock"), e)),
        }
        info!(
            mirror = dir_name,
            "waiting for another process to finish fetching the mirror"
        );
        fs4::FileExt::lock(&file).map_err(|e| GitError::io(context("lock"), e))?;
        Ok(Some(file))
    }

    /// Where the mirror of `url` lives (whether or not it exists yet).
    pub fn mirror_path(&self, url: &str) -> Result<PathBuf, GitError> {
        Ok(self.root.join(Source::parse(url)?.dir_name))
    }

    fn remove_stale_tmp_dirs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                continue;
            }
            let age = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok());
            if age.is_none_or(|age| age <= STALE_TMP_AGE) {
                continue;
            }
            // `.tmp-<mirror>-<pid>-<n>`: leave it to a process that holds the mirror's lock (it may be
            // building it still).
            let name = entry.file_name().to_string_lossy().into_owned();
            let mirror = name[TMP_PREFIX.len()..]
                .rsplitn(3, '-')
                .nth(2)
                .unwrap_or("");
            if mirror.is_empty() || matches!(self.lock_file(mirror, false), Ok(Some(_))) {
                debug!(path = %entry.path().display(), "removing stale temporary mirror");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn lock_for(&self, source: &Source) -> MirrorLock<'_> {
        let arc = lock(&self.locks)
            .entry(source.dir_name.clone())
            .or_default()
            .clone();
        MirrorLock {
            mirrors: self,
            key: source.dir_name.clone(),
            lock: Some(arc),
        }
    }

    /// Makes sure the mirror of `url` holds `commit` (full or abbreviated hex, at least 7 digits), fetching all
    /// refs (`+refs/*:refs/*`, with pruning) only if the commit is not already there. Returns the full 40-hex id
    /// of the commit (an annotated tag's id is peeled to its commit).
    pub fn ensure_commit(&self, url: &str, commit: &str) -> Result<String, GitError> {
        let source = Source::parse(url)?;
        self.ensure(&source, commit).map(|oid| oid.to_string())
    }

    fn ensure(&self, source: &Source, commit: &str) -> Result<Oid, GitError> {
        validate_commit_id(commit)?;
        if commit.len() == 64 {
            return Err(GitError::InvalidCommitId {
                commit: commit.to_owned(),
                reason: "sha256 repositories are not supported".to_owned(),
            });
        }
        let commit = commit.to_ascii_lowercase();
        let path = self.root.join(&source.dir_name);
        // Fast path, without the lock: the mirror exists and already has the commit.
        if let Ok(repo) = Repository::open_bare(&path)
            && let Some(oid) = find_commit(&repo, source, &commit)?
        {
            return Ok(oid);
        }
        let guard = self.lock_for(source);
        guard.with(|| {
            let (repo, fetched) = match Repository::open_bare(&path) {
                Ok(repo) => {
                    // Someone else may have fetched while we waited for the lock.
                    if let Some(oid) = find_commit(&repo, source, &commit)? {
                        return Ok(oid);
                    }
                    (repo, false)
                }
                Err(_) => (self.create_mirror(source, &path)?, true),
            };
            if !fetched {
                source.check_local()?;
                fetch_mirror(&repo, source, &self.fetches)?;
            }
            match find_commit(&repo, source, &commit)? {
                Some(oid) => Ok(oid),
                None => match lookup(&repo, source, &commit)? {
                    Some(obj) => Err(GitError::InvalidCommitId {
                        commit: commit.clone(),
                        reason: format!(
                            "it names a {} in {}, not a commit",
                            obj.kind().map_or("object", |k| k.str()),
                            source.url
                        ),
                    }),
                    None => Err(GitError::CommitNotFound {
                        url: source.url.clone(),
                        commit: commit.clone(),
                    }),
                },
            }
        })
    }

    /// Fetches the mirror of `url` unconditionally, creating it if needed.
    pub fn fetch(&self, url: &str) -> Result<(), GitError> {
        let source = Source::parse(url)?;
        let path = self.root.join(&source.dir_name);
        let guard = self.lock_for(&source);
        guard.with(|| match Repository::open_bare(&path) {
            Ok(repo) => {
                source.check_local()?;
                fetch_mirror(&repo, &source, &self.fetches)
            }
            Err(_) => self.create_mirror(&source, &path).map(drop),
        })
    }

    /// Creates the mirror of `source` at `path` (which must not be a valid repository) and fetches it. The
    /// mirror is built in a temporary directory and renamed into place only once the fetch succeeded, so a bad
    /// URL leaves nothing behind. Call with the mirror's lock held.
    fn create_mirror(&self, source: &Source, path: &Path) -> Result<Repository, GitError> {
        source.check_local()?;
        if path.exists() {
            // Not openable as a repository: a broken leftover. Start again.
            warn!(path = %path.display(), url = %source.url, "removing broken mirror");
            std::fs::remove_dir_all(path).map_err(|e| {
                GitError::io(format!("cannot remove broken mirror {}", path.display()), e)
            })?;
        }
        // Temporary directories of this mirror are leftovers of a process that died building it: whoever
        // builds one holds the lock.
        if let Ok(entries) = std::fs::read_dir(&self.root) {
            let prefix = format!("{TMP_PREFIX}{}-", source.dir_name);
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(&prefix) {
                    debug!(path = %entry.path().display(), "removing a mirror left half-built");
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let tmp = self.root.join(format!(
            "{TMP_PREFIX}{}-{}-{}",
            source.dir_name,
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        info!(url = %source.url, mirror = %path.display(), "creating mirror");
        let built = (|| {
            let mut opts = RepositoryInitOptions::new();
            opts.bare(true).external_template(false);
            let repo = Repository::init_opts(&tmp, &opts)
                .map_err(|e| GitError::git(format!("cannot create mirror {}", tmp.display()), e))?;
            configure_mirror_remote(&repo, source)?;
            fetch_mirror(&repo, source, &self.fetches)
        })();
        if let Err(e) = built {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another process may have won the race; its mirror is as good as ours.
            if Repository::open_bare(path).is_err() {
                return Err(GitError::io(
                    format!("cannot move new mirror into {}", path.display()),
                    e,
                ));
            }
        }
        Repository::open_bare(path)
            .map_err(|e| GitError::git(format!("cannot open mirror {}", path.display()), e))
    }

    fn open_mirror(&self, source: &Source) -> Result<Repository, GitError> {
        let path = self.root.join(&source.dir_name);
        Repository::open_bare(&path)
            .map_err(|e| GitError::git(format!("cannot open mirror {}", path.display()), e))
    }

    /// The content of the file at `path` (relative to the repository's root, '/'-separated) in `commit`'s
    /// tree, or `None` if there is no such file (or it is a directory or a submodule). Symbolic links inside
    /// the tree are followed. Fails with [`GitError::FileTooLarge`] if the file is larger than `max_bytes`.
    pub fn read_file(
        &self,
        url: &str,
        commit: &str,
        path: &str,
        max_bytes: usize,
    ) -> Result<Option<Vec<u8>>, GitError> {
        let source = Source::parse(url)?;
        let oid = self.ensure(&source, commit)?;
        let repo = self.open_mirror(&source)?;
        let context = || format!("cannot read {path} in commit {oid} of {url}");
        let tree = repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(|e| GitError::git(context(), e))?;
        let Some(blob_id) =
            find_blob_path(&repo, &tree, path).map_err(|e| GitError::git(context(), e))?
        else {
            return Ok(None);
        };
        let odb = repo.odb().map_err(|e| GitError::git(context(), e))?;
        let (size, _) = odb
            .read_header(blob_id)
            .map_err(|e| GitError::git(context(), e))?;
        if size > max_bytes {
            return Err(GitError::FileTooLarge {
                url: url.to_owned(),
                commit: oid.to_string(),
                path: path.to_owned(),
                size: size as u64,
                max_bytes,
            });
        }
        let blob = repo
            .find_blob(blob_id)
            .map_err(|e| GitError::git(context(), e))?;
        Ok(Some(blob.content().to_vec()))
    }

    /// Paths of the files (blobs and symbolic links) in `commit`'s tree, '/'-separated, in tree order, looking
    /// at most `max_depth` directory levels deep (1 = top level only, 0 = nothing); at most `limit` entries.
    pub fn list_files(
        &self,
        url: &str,
        commit: &str,
        max_depth: usize,
        limit: usize,
    ) -> Result<Vec<String>, GitError> {
        let source = Source::parse(url)?;
        let oid = self.ensure(&source, commit)?;
        let repo = self.open_mirror(&source)?;
        let context = || format!("cannot list files of commit {oid} of {url}");
        let tree = repo
            .find_commit(oid)
            .and_then(|c| c.tree())
            .map_err(|e| GitError::git(context(), e))?;
        let mut out = Vec::new();
        if max_depth > 0 && limit > 0 {
            list_tree(&repo, &tree, "", 1, max_depth, limit, &mut out)
                .map_err(|e| GitError::git(context(), e))?;
        }
        Ok(out)
    }

    /// Makes `dest` a clean working tree of `commit`: a real git repository (with HEAD detached at the commit,
    /// an index matching it, and a remote `origin` pointing at `url`) and exactly the commit's files, with no
    /// untracked or ignored files left from earlier use.
    ///
    /// The working tree borrows the mirror's objects through `.git/objects/info/alternates`, so nothing is
    /// copied. When `dest` already is a working tree made from the same mirror it is reused with a forced
    /// checkout that also removes untracked and ignored files (a warm checkout of a small repository takes a
    /// few milliseconds); anything else in `dest` is deleted first. Submodules are not checked out. Two
    /// checkouts into the same `dest` must not run at once.
    pub fn checkout(&self, url: &str, commit: &str, dest: &Path) -> Result<(), GitError> {
        let source = Source::parse(url)?;
        let oid = self.ensure(&source, commit)?;
        let objects = self.root.join(&source.dir_name).join("objects");
        let objects = objects
            .to_str()
            .ok_or_else(|| {
                GitError::io(
                    "the mirror path is not valid utf-8",
                    io::ErrorKind::InvalidData.into(),
                )
            })?
            .to_owned();
        let dest = std::path::absolute(dest).map_err(|e| {
            GitError::io(
                format!("cannot make checkout path {} absolute", dest.display()),
                e,
            )
        })?;

        if let Some(repo) = reusable_worktree(&dest, &objects) {
            match checkout_commit(&repo, oid) {
                Ok(()) => {
                    debug!(url, commit = %oid, dest = %dest.display(), "checked out into existing working tree");
                    return Ok(());
                }
                Err(e) => {
                    warn!(url, commit = %oid, dest = %dest.display(), error = %e, "reusing working tree failed; recreating it");
                }
            }
        }
        empty_dir(&dest)?;
        let repo = init_worktree(&dest, &objects, &source)?;
        checkout_commit(&repo, oid).map_err(|e| {
            GitError::git(
                format!(
                    "cannot check out commit {oid} of {url} into {}",
                    dest.display()
                ),
                e,
            )
        })?;
        debug!(url, commit = %oid, dest = %dest.display(), "checked out into new working tree");
        Ok(())
    }
}

/// Configures the mirror's remote: all refs into the same names, pruned, as `git clone --mirror` does.
fn configure_mirror_remote(repo: &Repository, source: &Source) -> Result<(), GitError> {
    let context = || format!("cannot configure mirror of {}", source.url);
    repo.remote_with_fetch(REMOTE_NAME, &source.fetch_url, MIRROR_REFSPEC)
        .map_err(|e| GitError::git(context(), e))?;
    let mut config = repo.config().map_err(|e| GitError::git(context(), e))?;
    config
        .set_bool(&format!("remote.{REMOTE_NAME}.mirror"), true)
        .map_err(|e| GitError::git(context(), e))?;
    Ok(())
}

/// Fetches every ref of the mirror's remote, pruning refs that are gone, counting it in `fetches`. Any
/// failure means the URL cannot be fetched: [`GitError::RepositoryNotFound`]. Call with the mirror's lock
/// held: what an interrupted fetch left behind is removed first.
fn fetch_mirror(repo: &Repository, source: &Source, fetches: &AtomicU64) -> Result<(), GitError> {
    remove_interrupted_writes(repo.path());
    let mut remote = match repo.find_remote(REMOTE_NAME) {
        Ok(remote) => remote,
        Err(_) => {
            configure_mirror_remote(repo, source)?;
            repo.find_remote(REMOTE_NAME).map_err(|e| {
                GitError::git(format!("cannot configure mirror of {}", source.url), e)
            })?
        }
    };
    let mut options = FetchOptions::new();
    options
        .remote_callbacks(remote_callbacks())
        .prune(FetchPrune::On)
        .download_tags(AutotagOption::None);
    let started = std::time::Instant::now();
    fetches.fetch_add(1, Ordering::Relaxed);
    remote
        .fetch(&[MIRROR_REFSPEC], Some(&mut options), Some("kiln: fetch"))
        .map_err(|e| {
            GitError::not_found(
                &source.url,
                format!("fetching failed: {}", e.message()),
                Some(e),
            )
        })?;
    info!(url = %source.url, elapsed_ms = started.elapsed().as_millis() as u64, "fetched mirror");
    // The mirror's HEAD follows the remote's default branch, so a revision `HEAD` (or `HEAD~2`)
    // means there what it means in the repository.
    if let Ok(head) = remote.default_branch()
        && let Some(name) = head.as_str().ok().filter(|n| n.starts_with("refs/heads/"))
        && let Err(e) = repo.set_head(name)
    {
        debug!(url = %source.url, head = name, error = %e, "cannot point the mirror's HEAD");
    }
    // A failed repack leaves the mirror as it was (the old packs are removed only once the new
    // one is written); the fetch itself succeeded.
    if let Err(e) = repack_if_needed(repo) {
        warn!(url = %source.url, error = %e, "cannot repack mirror");
    }
    Ok(())
}

/// Removes what a writer killed midway (a fetch, a repack) leaves in the mirror at `git_dir`: git's lock
/// files (`HEAD.lock`, `packed-refs.lock`, `refs/**/*.lock`, `*.idx.lock`), which would make every later
/// fetch fail, and partial packs (`pack_git2_*`, `tmp_pack_*`, a `.pack` without its `.idx`), which only
/// take space. What was written completely stays: git writes packs before the refs that need them. Call
/// with the mirror's lock held: every writer of a mirror holds it, so no live writer owns these files.
fn remove_interrupted_writes(git_dir: &Path) {
    fn walk(dir: &Path, pack_dir: &Path, removed: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                walk(&path, pack_dir, removed);
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let leftover = name.ends_with(".lock")
                || (dir == pack_dir && {
                    let ext = path.extension().and_then(OsStr::to_str).unwrap_or("");
                    !matches!(
                        ext,
                        "pack" | "idx" | "rev" | "bitmap" | "keep" | "mtimes" | "promisor"
                    ) || (ext == "pack" && !path.with_extension("idx").exists())
                });
            if leftover && std::fs::remove_file(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    let pack_dir = git_dir.join("objects").join("pack");
    let mut removed = Vec::new();
    walk(git_dir, &pack_dir, &mut removed);
    if !removed.is_empty() {
        warn!(mirror = %git_dir.display(), files = ?removed, "removed what an interrupted fetch left in the mirror");
    }
}

/// The pack files (`*.pack`) of a repository's object database.
fn pack_files(repo: &Repository) -> io::Result<Vec<PathBuf>> {
    let dir = repo.path().join("objects").join("pack");
    let mut packs = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "pack") {
            packs.push(path);
        }
    }
    Ok(packs)
}

/// When the mirror holds more than [`MAX_PACKS`] packs, writes every object it has into one new
/// pack and removes the old ones (their index first, so no reader finds an index without its
/// pack). Every object is kept, reachable or not: a build may still need a commit whose branch
/// was force-pushed or deleted. Call with the mirror's lock held.
fn repack_if_needed(repo: &Repository) -> Result<(), GitError> {
    let packs = pack_files(repo).map_err(|e| GitError::io("cannot list the mirror's packs", e))?;
    if packs.len() <= MAX_PACKS {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let context = || format!("cannot repack {}", repo.path().display());
    let odb = repo.odb().map_err(|e| GitError::git(context(), e))?;
    let mut ids = Vec::new();
    odb.foreach(|id| {
        ids.push(*id);
        true
    })
    .map_err(|e| GitError::git(context(), e))?;
    let mut builder = repo
        .packbuilder()
        .map_err(|e| GitError::git(context(), e))?;
    for id in &ids {
        builder
            .insert_object(*id, None)
            .map_err(|e| GitError::git(context(), e))?;
    }
    let pack_dir = repo.path().join("objects").join("pack");
    builder
        .write(&pack_dir, 0)
        .map_err(|e| GitError::git(context(), e))?;
    let new_name = builder
        .name()
        .map_err(|e| GitError::git(context(), e))?
        .map(|hash| format!("pack-{hash}"));
    let mut removed = 0;
    for pack in &packs {
        let Some(stem) = pack.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if new_name.as_deref() == Some(stem) {
            continue;
        }
        for ext in ["keep", "idx", "rev", "bitmap", "mtimes", "pack"] {
            let file = pack.with_extension(ext);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(GitError::io(format!("cannot remove {}", file.display()), e)),
            }
        }
        removed += 1;
    }
    odb.refresh().map_err(|e| GitError::git(context(), e))?;
    info!(
        mirror = %repo.path().display(),
        objects = ids.len(),
        packs_removed = removed,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "repacked mirror"
    );
    Ok(())
}

/// Callbacks for remote access: ssh-agent for ssh, git's credential helpers for https, a bounded number of
/// attempts so that rejected credentials fail the fetch instead of looping.
fn remote_callbacks<'a>() -> RemoteCallbacks<'a> {
    let mut callbacks = RemoteCallbacks::new();
    let attempts = Cell::new(0u32);
    callbacks.credentials(move |url, username_from_url, allowed| {
        attempts.set(attempts.get() + 1);
        if attempts.get() > MAX_CREDENTIAL_ATTEMPTS {
            return Err(git2::Error::from_str(&format!(
                "authentication failed for {url} after {MAX_CREDENTIAL_ATTEMPTS} attempts"
            )));
        }
        let user = username_from_url.unwrap_or("git");
        if allowed.contains(CredentialType::USERNAME) {
            Cred::username(user)
        } else if allowed.contains(CredentialType::SSH_KEY) {
            Cred::ssh_key_from_agent(user)
        } else if allowed.contains(CredentialType::USER_PASS_PLAINTEXT) {
            let config = git2::Config::open_default()?;
            Cred::credential_helper(&config, url, username_from_url)
        } else if allowed.contains(CredentialType::DEFAULT) {
            Cred::default()
        } else {
            Err(git2::Error::from_str(&format!(
                "no supported authentication method for {url}"
            )))
        }
    });
    callbacks
}

/// Looks `commit` (lowercase hex, full or abbreviated) up in `repo`: the object, or `None` if there is none.
fn lookup<'r>(
    repo: &'r Repository,
    source: &Source,
    commit: &str,
) -> Result<Option<git2::Object<'r>>, GitError> {
    let found = if commit.len() == 40 {
        Oid::from_str(commit).and_then(|oid| repo.find_object(oid, None))
    } else {
        repo.find_object_by_prefix(commit, None)
    };
    match found {
        Ok(obj) => Ok(Some(obj)),
        Err(e) if e.code() == ErrorCode::NotFound => Ok(None),
        Err(e) if e.code() == ErrorCode::Ambiguous => Err(GitError::AmbiguousCommit {
            url: source.url.clone(),
            commit: commit.to_owned(),
        }),
        Err(e) => Err(GitError::git(
            format!("cannot look up commit {commit} in mirror of {}", source.url),
            e,
        )),
    }
}

/// The commit `commit` names in `repo` (peeling tags), or `None` if it names nothing or something else.
fn find_commit(repo: &Repository, source: &Source, commit: &str) -> Result<Option<Oid>, GitError> {
    Ok(lookup(repo, source, commit)?
        .and_then(|obj| obj.peel_to_commit().ok())
        .map(|c| c.id()))
}

/// Resolves `path` in `tree` to a blob, following symbolic links that stay inside the tree.
fn find_blob_path(
    repo: &Repository,
    tree: &Tree<'_>,
    path: &str,
) -> Result<Option<Oid>, git2::Error> {
    let Some(mut components) = normalize_components(Vec::new(), path) else {
        return Ok(None);
    };
    for _ in 0..=MAX_SYMLINK_HOPS {
        if components.is_empty() {
            return Ok(None);
        }
        let joined = components.join("/");
        let entry = match tree.get_path(Path::new(&joined)) {
            Ok(entry) => entry,
            Err(e) if e.code() == ErrorCode::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if entry.kind() != Some(ObjectType::Blob) {
            return Ok(None);
        }
        if entry.filemode() != FILEMODE_LINK {
            return Ok(Some(entry.id()));
        }
        let link = repo.find_blob(entry.id())?;
        let Ok(target) = std::str::from_utf8(link.content()) else {
            return Ok(None);
        };
        if target.starts_with('/') {
            return Ok(None);
        }
        components.pop();
        match normalize_components(components, target) {
            Some(next) => components = next,
            None => return Ok(None),
        }
    }
    Ok(None)
}

/// Appends the '/'-separated `path` to `base`, resolving `.` and `..`; `None` if it leaves the root.
fn normalize_components(mut base: Vec<String>, path: &str) -> Option<Vec<String>> {
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                base.pop()?;
            }
            name => base.push(name.to_owned()),
        }
    }
    Some(base)
}

fn list_tree(
    repo: &Repository,
    tree: &Tree<'_>,
    prefix: &str,
    depth: usize,
    max_depth: usize,
    limit: usize,
    out: &mut Vec<String>,
) -> Result<(), git2::Error> {
    for entry in tree.iter() {
        if out.len() >= limit {
            return Ok(());
        }
        let name = String::from_utf8_lossy(entry.name_bytes());
        match entry.kind() {
            Some(ObjectType::Blob) => out.push(format!("{prefix}{name}")),
            Some(ObjectType::Tree) if depth < max_depth => {
                let sub = repo.find_tree(entry.id())?;
                list_tree(
                    repo,
                    &sub,
                    &format!("{prefix}{name}/"),
                    depth + 1,
                    max_depth,
                    limit,
                    out,
                )?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The working tree at `dest`, if it is one this crate made from the mirror whose objects are at `objects`.
fn reusable_worktree(dest: &Path, objects: &str) -> Option<Repository> {
    let git_dir = dest.join(".git");
    let alternates = std::fs::read_to_string(git_dir.join("objects/info/alternates")).ok()?;
    if alternates.trim_end() != objects {
        return None;
    }
    let repo = Repository::open_ext(
        dest,
        RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&OsStr>(),
    )
    .ok()?;
    (!repo.is_bare()).then_some(repo)
}

/// Creates a repository at `dest` (an empty directory) that borrows the mirror's objects.
fn init_worktree(dest: &Path, objects: &str, source: &Source) -> Result<Repository, GitError> {
    let context = || format!("cannot create a working tree in {}", dest.display());
    let mut opts = RepositoryInitOptions::new();
    opts.external_template(false);
    let repo = Repository::init_opts(dest, &opts).map_err(|e| GitError::git(context(), e))?;
    let info = repo.path().join("objects").join("info");
    std::fs::create_dir_all(&info).map_err(|e| GitError::io(context(), e))?;
    std::fs::write(info.join("alternates"), format!("{objects}\n"))
        .map_err(|e| GitError::io(context(), e))?;
    // Give steps a remote to fetch from (the original URL, as the mirror's remote uses it).
    repo.remote(REMOTE_NAME, &source.fetch_url)
        .map_err(|e| GitError::git(context(), e))?;
    drop(repo);
    // Reopen so that the object database sees the alternates.
    Repository::open_ext(
        dest,
        RepositoryOpenFlags::NO_SEARCH,
        std::iter::empty::<&OsStr>(),
    )
    .map_err(|e| GitError::git(context(), e))
}

/// Forces the working tree and index to `oid`'s tree, removing untracked and ignored files, then detaches HEAD
/// at `oid`.
fn checkout_commit(repo: &Repository, oid: Oid) -> Result<(), git2::Error> {
    let commit = repo.find_commit(oid)?;
    let mut builder = CheckoutBuilder::new();
    builder.force().remove_untracked(true).remove_ignored(true);
    repo.checkout_tree(commit.as_object(), Some(&mut builder))?;
    repo.set_head_detached(oid)?;
    remove_leftovers(repo)
}

/// Removes what a checkout leaves behind although it is neither tracked nor wanted: libgit2 keeps untracked
/// directories that are git repositories of their own (like `git clean` without a second `-f`).
fn remove_leftovers(repo: &Repository) -> Result<(), git2::Error> {
    let Some(workdir) = repo.workdir() else {
        return Ok(());
    };
    let mut options = StatusOptions::new();
    options
        .include_untracked(true)
        .include_ignored(true)
        .recurse_untracked_dirs(false)
        .recurse_ignored_dirs(false)
        .exclude_submodules(true);
    let statuses = repo.statuses(Some(&mut options))?;
    for entry in statuses.iter() {
        if !entry.status().intersects(Status::WT_NEW | Status::IGNORED) {
            continue;
        }
        let Ok(rel) = entry.path() else { continue };
        let path = workdir.join(rel.trim_end_matches('/'));
        debug!(path = %path.display(), "removing leftover");
        remove_path(&path).map_err(|e| {
            git2::Error::from_str(&format!("cannot remove {}: {e}", path.display()))
        })?;
    }
    Ok(())
}

/// Makes `dir` an existing, empty directory, deleting whatever it holds (making read-only directories
/// writable where needed). `dir` itself is kept, in case it is a mount point.
fn empty_dir(dir: &Path) -> Result<(), GitError> {
    let context = || format!("cannot empty checkout directory {}", dir.display());
    // A symbolic link to a directory is kept (and the directory emptied); a file or dangling link is replaced.
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => std::fs::remove_file(dir).map_err(|e| GitError::io(context(), e))?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if std::fs::symlink_metadata(dir).is_ok() {
                std::fs::remove_file(dir).map_err(|e| GitError::io(context(), e))?;
            }
        }
        Err(e) => return Err(GitError::io(context(), e)),
    }
    std::fs::create_dir_all(dir).map_err(|e| GitError::io(context(), e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| GitError::io(context(), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| GitError::io(context(), e))?;
        let path = entry.path();
        remove_path(&path)
            .map_err(|e| GitError::io(format!("cannot remove {}", path.display()), e))?;
    }
    Ok(())
}

fn remove_path(path: &Path) -> io::Result<()> {
    let is_dir = std::fs::symlink_metadata(path)?.is_dir();
    let remove = |path: &Path| {
        if is_dir {
            std::fs::remove_dir_all(path)
        } else {
            std::fs::remove_file(path)
        }
    };
    match remove(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && is_dir => {
            make_writable(path);
            remove(path)
        }
        other => other,
    }
}

/// Best effort: gives the owner write and search permission on `dir` and every directory below it.
fn make_writable(dir: &Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::symlink_metadata(dir) {
            let mut perms = meta.permissions();
            perms.set_mode(perms.mode() | 0o700);
            let _ = std::fs::set_permissions(dir, perms);
        }
    }
    #[cfg(not(unix))]
    {
        if let Ok(meta) = std::fs::symlink_metadata(dir) {
            let mut perms = meta.permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            let _ = std::fs::set_permissions(dir, perms);
        }
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------------------------------------
// Branches and first-parent history, for the repository observer (`kiln watch`).
// ---------------------------------------------------------------------------------------------

/// What [`Mirrors::first_parent_since`] found: the commits of a branch after a known one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstParent {
    /// Full commit ids, oldest first: the head's first-parent chain, newest `cap` at most, stopping before the
    /// first commit that is `since` or an ancestor of it (so a `since` merged in as a second parent still
    /// bounds the list).
    pub commits: Vec<String>,
    /// `since` is the head or an ancestor of it, and the walk got back to it within `cap`: `commits` are
    /// exactly the first-parent commits after `since`. False without `since`, when `since` is unknown to the
    /// mirror or not in the head's history (a force-push), or when more than `cap` commits follow it.
    pub reached_since: bool,
    /// The head is a strict ancestor of `since`: the branch went back (a reset without new commits), or this
    /// mirror is older than whoever recorded `since`. `commits` is then empty.
    pub behind: bool,
}

impl Mirrors {
    /// The branches (`refs/heads/*`, names without that prefix, `/` kept: `release/1.0`) of the mirror of
    /// `url` with their head commits (full ids), sorted by name. Reads the mirror as it is: call
    /// [`Mirrors::fetch`] first. Refs whose names are not UTF-8 or that do not point at a commit are skipped.
    pub fn branches(&self, url: &str) -> Result<Vec<(String, String)>, GitError> {
        let source = Source::parse(url)?;
        let repo = self.open_mirror(&source)?;
        let context = || format!("cannot list the branches of the mirror of {url}");
        let refs = repo.references().map_err(|e| GitError::git(context(), e))?;
        let mut out = Vec::new();
        for r in refs {
            let r = r.map_err(|e| GitError::git(context(), e))?;
            let Some(name) = std::str::from_utf8(r.name_bytes())
                .ok()
                .and_then(|n| n.strip_prefix("refs/heads/"))
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
            else {
                continue;
            };
            match r.peel_to_commit() {
                Ok(c) => out.push((name, c.id().to_string())),
                Err(e) => {
                    debug!(url, branch = %name, error = %e, "skipping a branch that is not a commit")
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The commits of `head`'s first-parent chain that come after `since`, oldest first, at most the newest
    /// `cap` of them (see [`FirstParent`]). Without `since` (a branch seen for the first time) these are the
    /// newest `cap` commits of the chain. `head` is fetched if the mirror lacks it; an unknown `since` is not
    /// an error (it answers `reached_since: false`).
    pub fn first_parent_since(
        &self,
        url: &str,
        head: &str,
        since: Option<&str>,
        cap: usize,
    ) -> Result<FirstParent, GitError> {
        let source = Source::parse(url)?;
        let head = self.ensure(&source, head)?;
        let repo = self.open_mirror(&source)?;
        let context = || format!("cannot walk the history of {head} in the mirror of {url}");
        let since = match since.map(str::trim).filter(|s| !s.is_empty()) {
            Some(s) if validate_commit_id(s).is_ok() && s.len() <= 40 => {
                find_commit(&repo, &source, &s.to_ascii_lowercase())?
            }
            _ => None,
        };
        let mut out = FirstParent::default();
        let Some(since) = since else {
            // No known starting point: the newest `cap` commits of the chain.
            let mut commit = repo
                .find_commit(head)
                .map_err(|e| GitError::git(context(), e))?;
            while out.commits.len() < cap {
                out.commits.push(commit.id().to_string());
                if commit.parent_count() == 0 {
                    break;
                }
                commit = commit.parent(0).map_err(|e| GitError::git(context(), e))?;
            }
            out.commits.reverse();
            return Ok(out);
        };
        if since == head {
            out.reached_since = true;
            return Ok(out);
        }
        let in_history = repo
            .graph_descendant_of(head, since)
            .map_err(|e| GitError::git(context(), e))?;
        if !in_history {
            out.behind = repo
                .graph_descendant_of(since, head)
                .map_err(|e| GitError::git(context(), e))?;
            if out.behind {
                return Ok(out);
            }
        }
        // The first-parent chain of `head` minus everything reachable from `since`: libgit2 follows only
        // first parents of interesting commits but all parents of hidden ones. The interesting commits form
        // one chain, so topological order is chain order (whatever the commit dates say).
        let mut walk = repo.revwalk().map_err(|e| GitError::git(context(), e))?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL)
            .and_then(|()| walk.simplify_first_parent())
            .and_then(|()| walk.push(head))
            .and_then(|()| walk.hide(since))
            .map_err(|e| GitError::git(context(), e))?;
        for oid in walk {
            let oid = oid.map_err(|e| GitError::git(context(), e))?;
            if out.commits.len() == cap {
                // More than `cap` follow `since`: it was not reached.
                out.commits.reverse();
                return Ok(out);
            }
            out.commits.push(oid.to_string());
        }
        out.commits.reverse();
        out.reached_since = in_history;
        Ok(out)
    }
}

#[cfg(test)]
mod observe_tests;

pub mod location;
pub mod revision;
pub use revision::{Resolved, resolve_local, validate_revision};

//! `kiln watch`: the repository observer. It fetches the repositories it watches every
//! interval (into bare mirrors of its own, through `kiln_git::Mirrors`) and reports the new
//! commits of every matching branch to the dispatcher (`ReportCommits`), oldest first.
//!
//! The observer keeps nothing that matters: where each branch stands is the dispatcher's
//! *cursor* (`GetBranchCursor`), which moves in the same transaction that creates the builds,
//! and the dispatcher never builds one commit (with one pipeline) twice. So an observer that is
//! killed and started again continues where the dispatcher's cursor stands, and several
//! observers may watch the same repositories at once: no commit is skipped and none is built
//! twice.
//!
//! For each matching branch whose head is not the cursor:
//! - the cursor is in the head's history: every first-parent commit after it is reported
//!   (a merge counts as one commit; the commits it brings in are not built one by one);
//! - the branch has no cursor (seen for the first time): its newest `--backfill` commits
//!   (default 1, the head only);
//! - the cursor is not in the head's history (a force-push), or more than 10 000 commits
//!   follow it: the head only;
//! - the head is an ancestor of the cursor (the branch went back without new commits, or this
//!   observer's mirror is older than whoever moved the cursor): nothing.
//!
//! Branch patterns are [`kiln_domain::BranchPattern`]s, as everywhere in kiln: `*` stays within
//! a path segment (`release/*` matches `release/1.0`, not `release/1.0/rc1`), `**` spans
//! segments; the default `**` watches every branch.
//!
//! Errors (a repository that cannot be fetched, a dispatcher that cannot be reached) are logged
//! and tried again at the next interval; only `--once` turns them into an exit code.
//!
//! The observer reports through a [`Sink`]: a dispatcher over gRPC ([`Remote`]: `kiln watch`,
//! `kiln up`) or the dispatcher of its own process ([`Local`]: `kiln serve --watch`, one process
//! fewer to deploy, as Buildbot's master polls), with the same calls and the same answers.

use std::collections::HashMap;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_domain::BranchPattern;
use kiln_git::Mirrors;
use tokio_util::sync::CancellationToken;

use crate::client::{BuildClient, ClientError, Connection};
use crate::proto;

/// At most this many commits are reported in one `ReportCommits` (the dispatcher's limit).
const REPORT_CHUNK: usize = 1000;
/// A branch with more new commits than this after its cursor builds its head only.
const MAX_CATCH_UP: usize = 10_000;
/// A branch whose head has not moved is checked against the dispatcher again after this long
/// (in case the dispatcher lost its state); in between it costs no request.
const RESYNC: Duration = Duration::from_secs(300);
/// How long a pass in progress may go on after a stop was asked for.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// `kiln watch` arguments.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Repository to watch: a URL, or a local path (made absolute). Repeatable.
    #[arg(long = "repo", value_name = "URL_OR_PATH", required = true)]
    pub repos: Vec<String>,
    /// Branches to watch, as patterns (repeatable): `*` within a path segment (`release/*`
    /// matches `release/1.0`, not `release/1.0/rc1`), `**` across segments; the default `**` is
    /// every branch.
    #[arg(long = "branch", value_name = "PATTERN", default_value = "**")]
    pub branches: Vec<String>,
    /// How often the repositories are fetched.
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    pub interval: Duration,
    /// A branch seen for the first time (no cursor at the dispatcher yet) builds at most this
    /// many of its newest first-parent commits.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub backfill: u32,
    /// Where the observer keeps its mirrors (default: `kiln-observer` under the system temp
    /// dir). Observers running at the same time on one machine need different directories.
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Check every repository once, report, and exit (0 if everything could be checked).
    #[arg(long)]
    pub once: bool,
}

/// Parses `--interval`: a humantime duration of at least 10 ms.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_millis(10) {
        return Err(format!("{s:?} is too short; at least 10ms"));
    }
    Ok(d)
}

/// What an observer watches and how (`kiln watch` and `kiln up` both make one).
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// Repositories: URLs, or local paths (made absolute by [`observe`]).
    pub repos: Vec<String>,
    /// Branch globs (see the module documentation).
    pub branches: Vec<String>,
    /// Time between the end of one pass and the start of the next.
    pub interval: Duration,
    /// Newest commits built for a branch seen for the first time (at least 1).
    pub backfill: u32,
    /// The mirrors' directory.
    pub work_dir: PathBuf,
    /// Print a line on stdout for every build created (`kiln watch`); `kiln up` prints build
    /// states itself.
    pub print: bool,
}

impl ObserverConfig {
    /// The configuration `kiln watch` arguments describe.
    pub fn from_args(args: &WatchArgs) -> Self {
        Self {
            repos: args.repos.clone(),
            branches: args.branches.clone(),
            interval: args.interval,
            backfill: args.backfill,
            work_dir: args
                .work_dir
                .clone()
                .unwrap_or_else(|| std::env::temp_dir().join("kiln-observer")),
            print: true,
        }
    }
}

/// `kiln watch`: runs the observer until `shutdown` resolves (SIGTERM, Ctrl-C), or for one
/// pass with `--once`.
pub async fn run(
    conn: &Connection,
    args: WatchArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ObserverError> {
    let config = ObserverConfig::from_args(&args);
    let stop = CancellationToken::new();
    let on_signal = {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        })
    };
    let result = observe(Remote::new(conn.clone()), config, args.once, stop).await;
    on_signal.abort();
    result
}

/// Makes a local repository path absolute (resolving symbolic links when it exists, as
/// `kiln submit` does, so both name the repository alike); URLs pass through.
pub fn normalize_repo(repo: &str) -> Result<String, ObserverError> {
    let repo = repo.trim();
    if repo.is_empty() {
        return Err(ObserverError::Config("--repo must not be empty".into()));
    }
    if let Ok(location) = kiln_git::location::canonical(repo) {
        return Ok(location);
    }
    let p = std::path::absolute(repo)
        .map_err(|e| ObserverError::Config(format!("repository path {repo:?}: {e}")))?;
    tracing::warn!(repo = %p.display(), "the repository does not exist (yet); watching it anyway");
    Ok(p.to_string_lossy().into_owned())
}

/// Compiles branch patterns (see [`kiln_domain::branch`]).
pub fn branch_globs(patterns: &[String]) -> Result<Vec<BranchPattern>, ObserverError> {
    kiln_domain::branch::branch_patterns(patterns).map_err(ObserverError::Config)
}

/// Where an observer reports: the two calls it makes of a dispatcher.
pub trait Sink: Send + Sync + 'static {
    /// The branch's cursor at the dispatcher (empty when it has none).
    fn cursor(
        &self,
        repo: &str,
        branch: &str,
    ) -> impl Future<Output = Result<String, ObserverError>> + Send;

    /// Reports a branch's new commits, oldest first (`ReportCommits`): the builds created and
    /// the branch's cursor after them.
    fn report(
        &self,
        request: proto::ReportCommitsRequest,
    ) -> impl Future<Output = Result<proto::ReportCommitsResponse, ObserverError>> + Send;
}

/// A dispatcher over gRPC, connected lazily (the dispatcher may be down when the observer
/// starts); tonic's channel reconnects by itself afterwards.
pub struct Remote {
    conn: Connection,
    client: tokio::sync::Mutex<Option<BuildClient>>,
}

impl Remote {
    /// A sink for the dispatcher `conn` names.
    pub fn new(conn: Connection) -> Self {
        Self {
            conn,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn client(&self) -> Result<BuildClient, ClientError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = self.conn.fetching_build_client().await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}

impl Sink for Remote {
    async fn cursor(&self, repo: &str, branch: &str) -> Result<String, ObserverError> {
        let request = proto::GetBranchCursorRequest {
            repo: repo.to_string(),
            branch: branch.to_string(),
        };
        Ok(self
            .client()
            .await?
            .get_branch_cursor(request)
            .await?
            .into_inner()
            .head)
    }

    async fn report(
        &self,
        request: proto::ReportCommitsRequest,
    ) -> Result<proto::ReportCommitsResponse, ObserverError> {
        Ok(self
            .client()
            .await?
            .report_commits(request)
            .await?
            .into_inner())
    }
}

/// The dispatcher of this process (`kiln serve --watch`): the calls go to the engine directly,
/// its errors mapped to statuses as the API maps them, so the observer treats them alike.
pub struct Local(pub kiln_dispatcher::Dispatcher);

impl Sink for Local {
    async fn cursor(&self, repo: &str, branch: &str) -> Result<String, ObserverError> {
        let cursor = self.0.branch_cursor(repo, branch).await;
        Ok(cursor.map_err(crate::api::status)?.unwrap_or_default())
    }

    async fn report(
        &self,
        r: proto::ReportCommitsRequest,
    ) -> Result<proto::ReportCommitsResponse, ObserverError> {
        let builds = self
            .0
            .report_commits(&r.repo, &r.branch, &r.commits, &r.trigger)
            .await
            .map_err(crate::api::status)?;
        let cursor = self.0.branch_cursor(&r.repo, &r.branch).await;
        Ok(proto::ReportCommitsResponse {
            builds: builds.iter().map(crate::convert::build_to_proto).collect(),
            cursor: cursor.map_err(crate::api::status)?.unwrap_or_default(),
        })
    }
}

/// Runs an observer until `stop` is cancelled (a pass in progress gets a few seconds to
/// finish), or for one pass when `once` is set. Errors are logged and retried at the next
/// interval; with `once`, the first one is returned.
pub async fn observe<S: Sink>(
    sink: S,
    config: ObserverConfig,
    once: bool,
    stop: CancellationToken,
) -> Result<(), ObserverError> {
    let mut repos = Vec::new();
    for r in &config.repos {
        let r = normalize_repo(r)?;
        if !repos.contains(&r) {
            repos.push(r);
        }
    }
    if repos.is_empty() {
        return Err(ObserverError::Config(
            "no repository to watch (--repo)".into(),
        ));
    }
    let globs = branch_globs(&config.branches)?;
    if config.backfill == 0 {
        return Err(ObserverError::Config(
            "--backfill must be at least 1".into(),
        ));
    }
    let mirrors = Mirrors::new(&config.work_dir).map_err(|e| {
        ObserverError::Internal(format!(
            "observer work dir {}: {}",
            config.work_dir.display(),
            kiln_domain::error_chain(&e)
        ))
    })?;
    if config.print {
        println!(
            "kiln watch: watching {} (branches {}) every {}, mirrors in {}",
            repos.join(", "),
            config.branches.join(" "),
            humantime::format_duration(config.interval),
            mirrors.root().display()
        );
        let _ = std::io::stdout().flush();
    }
    let shared = Arc::new(Shared {
        sink,
        mirrors: Arc::new(mirrors),
        globs,
        backfill: config.backfill as usize,
        print: config.print,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for repo in repos {
        let watch = RepoWatch::new(shared.clone(), repo);
        let stop = stop.clone();
        let interval = config.interval;
        tasks.spawn(async move { watch.run(interval, once, stop).await });
    }
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let result = done.unwrap_or_else(|e| {
            Err(ObserverError::Internal(format!(
                "observer task failed: {e}"
            )))
        });
        if let Err(e) = result {
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// What every repository's task shares.
struct Shared<S> {
    sink: S,
    mirrors: Arc<Mirrors>,
    globs: Vec<BranchPattern>,
    backfill: usize,
    print: bool,
}

/// Why the observer stopped, or (every pass is retried until then) why a pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ObserverError {
    /// The configuration is wrong (no repository, an empty one, a bad branch pattern).
    #[error("{0}")]
    Config(String),
    /// Fetching or reading a repository failed.
    #[error("{0}")]
    Git(String),
    /// The dispatcher could not be connected to.
    #[error(transparent)]
    Connect(#[from] ClientError),
    /// The dispatcher's answer to a call.
    #[error("{}", .0.message())]
    Dispatcher(#[from] tonic::Status),
    /// The observer's own machinery failed (its work dir, a task).
    #[error("{0}")]
    Internal(String),
}

impl ObserverError {
    /// The dispatcher itself is unreachable (or cannot take work now): no point in trying the
    /// other branches.
    fn is_unavailable(&self) -> bool {
        match self {
            ObserverError::Connect(ClientError::Unreachable { .. }) => true,
            ObserverError::Dispatcher(s) => crate::client::is_unavailable(s),
            _ => false,
        }
    }

    /// The dispatcher refused the request as invalid: trying again will not help.
    fn is_refusal(&self) -> bool {
        matches!(self, ObserverError::Dispatcher(s) if matches!(
            s.code(),
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::OutOfRange
        ))
    }
}

/// One repository's loop and what it remembers between passes (nothing that matters for
/// correctness: see the module documentation).
struct RepoWatch<S> {
    shared: Arc<Shared<S>>,
    /// The repository as reported (URL, or absolute path).
    repo: String,
    /// Per branch: the head the dispatcher was last known to agree with, and when.
    synced: HashMap<String, (String, Instant)>,
    /// Per branch: a head the dispatcher refused as invalid (not tried again until it moves).
    refused: HashMap<String, String>,
    /// The last error logged, so that a lasting one is logged once.
    last_error: Option<String>,
}

impl<S: Sink> RepoWatch<S> {
    fn new(shared: Arc<Shared<S>>, repo: String) -> Self {
        Self {
            shared,
            repo,
            synced: HashMap::new(),
            refused: HashMap::new(),
            last_error: None,
        }
    }

    async fn run(
        mut self,
        interval: Duration,
        once: bool,
        stop: CancellationToken,
    ) -> Result<(), ObserverError> {
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let result = {
                let pass = self.pass(&stop);
                tokio::pin!(pass);
                tokio::select! {
                    r = &mut pass => r,
                    _ = stop.cancelled() => match tokio::time::timeout(STOP_GRACE, &mut pass).await {
                        Ok(r) => r,
                        Err(_) => return Ok(()),
                    },
                }
            };
            match result {
                Ok(()) => {
                    if self.last_error.take().is_some() {
                        tracing::info!(repo = %self.repo, "observer: working again");
                    }
                }
                Err(e) if once => return Err(e),
                Err(e) => {
                    let message = e.to_string();
                    if self.last_error.as_deref() == Some(message.as_str()) {
                        tracing::debug!(repo = %self.repo, error = %message, "observer: still failing; retrying");
                    } else {
                        tracing::warn!(repo = %self.repo, error = %message,
                            "observer: pass failed; retrying every {}", humantime::format_duration(interval));
                        self.last_error = Some(message);
                    }
                }
            }
            if once {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.cancelled() => return Ok(()),
            }
        }
    }

    /// One pass: fetch, list the branches, report what is new on each matching one.
    async fn pass(&mut self, stop: &CancellationToken) -> Result<(), ObserverError> {
        let mirrors = self.shared.mirrors.clone();
        let url = self.repo.clone();
        let branches = tokio::task::spawn_blocking(move || {
            mirrors.fetch(&url)?;
            mirrors.branches(&url)
        })
        .await
        .map_err(|e| ObserverError::Git(format!("fetch task failed: {e}")))?
        .map_err(|e| ObserverError::Git(kiln_domain::error_chain(&e)))?;
        let branches: Vec<(String, String)> = branches
            .into_iter()
            .filter(|(b, _)| kiln_domain::branch::any_matches(&self.shared.globs, b))
            .collect();
        // Forget branches that are gone.
        self.synced
            .retain(|b, _| branches.iter().any(|(name, _)| name == b));
        self.refused
            .retain(|b, _| branches.iter().any(|(name, _)| name == b));

        let mut failed = None;
        for (branch, head) in branches {
            if stop.is_cancelled() {
                break;
            }
            if self
                .synced
                .get(&branch)
                .is_some_and(|(h, at)| *h == head && at.elapsed() < RESYNC)
            {
                continue;
            }
            if self.refused.get(&branch) == Some(&head) {
                continue;
            }
            match self.branch(&branch, &head).await {
                Ok(()) => {
                    self.synced.insert(branch, (head, Instant::now()));
                }
                Err(e) if e.is_unavailable() => return Err(e),
                Err(e) if e.is_refusal() => {
                    tracing::warn!(repo = %self.repo, %branch, %head, error = %e,
                        "observer: the dispatcher refused this branch's commits; not trying again until it moves");
                    self.refused.insert(branch, head);
                }
                Err(e) => {
                    tracing::warn!(repo = %self.repo, %branch, %head, error = %e,
                        "observer: cannot report this branch; trying again next time");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Reports what is new on one branch whose head is `head`.
    async fn branch(&mut self, branch: &str, head: &str) -> Result<(), ObserverError> {
        let cursor = self.shared.sink.cursor(&self.repo, branch).await?;
        if cursor.eq_ignore_ascii_case(head) {
            return Ok(());
        }
        let cursor = (!cursor.is_empty()).then_some(cursor);
        let cap = if cursor.is_some() {
            MAX_CATCH_UP
        } else {
            self.shared.backfill
        };
        let found = {
            let mirrors = self.shared.mirrors.clone();
            let (url, h, since) = (self.repo.clone(), head.to_string(), cursor.clone());
            tokio::task::spawn_blocking(move || {
                mirrors.first_parent_since(&url, &h, since.as_deref(), cap)
            })
            .await
            .map_err(|e| ObserverError::Git(format!("history task failed: {e}")))?
            .map_err(|e| ObserverError::Git(kiln_domain::error_chain(&e)))?
        };
        let commits = match &cursor {
            None => {
                tracing::info!(repo = %self.repo, %branch, commits = found.commits.len(),
                    "observer: new branch; building its newest commits (--backfill)");
                found.commits
            }
            Some(_) if found.reached_since => found.commits,
            Some(c) if found.behind => {
                tracing::debug!(repo = %self.repo, %branch, %head, cursor = %c,
                    "observer: the head is behind the dispatcher's cursor; nothing to build");
                return Ok(());
            }
            Some(c) => {
                tracing::warn!(repo = %self.repo, %branch, %head, cursor = %c,
                    "observer: the cursor is not in the head's first-parent history (force-push, \
                     or more than {MAX_CATCH_UP} new commits); building the head only");
                vec![head.to_string()]
            }
        };
        for chunk in commits.chunks(REPORT_CHUNK) {
            let r = self
                .shared
                .sink
                .report(proto::ReportCommitsRequest {
                    repo: self.repo.clone(),
                    branch: branch.to_string(),
                    commits: chunk.to_vec(),
                    trigger: "observer".into(),
                })
                .await?;
            tracing::info!(repo = %self.repo, %branch, reported = chunk.len(), created = r.builds.len(),
                cursor = %r.cursor, "observer: reported commits");
            if self.shared.print {
                print_builds(&self.repo, branch, &r.builds);
            }
        }
        Ok(())
    }
}

fn print_builds(repo: &str, branch: &str, builds: &[proto::Build]) {
    if builds.is_empty() {
        return;
    }
    let mut out = std::io::stdout().lock();
    for b in builds {
        let _ = writeln!(
            out,
            "build {} {} {}@{} {}",
            b.id,
            crate::convert::state_name(b.state),
            branch,
            b.commit.get(..12).unwrap_or(&b.commit),
            repo
        );
    }
    let _ = out.flush();
}

/// Where `kiln up` keeps the observer's mirrors under its data directory.
pub fn work_dir_in(data_dir: &Path) -> PathBuf {
    data_dir.join("observer")
}

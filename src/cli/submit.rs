//! `kiln submit`: a build of one commit, optionally followed live.

use clap::Args;

use super::client::{ClientArgs, Connection, JsonArg};
use super::logs::{LogsOptions, logs};
use super::output::print_build;
use super::{CliError, exit};
use crate::proto;

/// `kiln submit`.
#[derive(Debug, Args)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub out: JsonArg,
    /// Repository: a URL, or a local path (made absolute before it is sent).
    #[arg(long)]
    pub repo: String,
    /// The revision to build: a commit id, a branch, a tag, HEAD, HEAD~2 ... (default: HEAD).
    /// Resolved in the repository for a local path, in the dispatcher's mirror for a URL.
    #[arg(long)]
    pub commit: Option<String>,
    /// Branch the commit belongs to (default: for a local path, the branch the revision is on;
    /// for a URL, the branch the revision names).
    #[arg(long, default_value = "")]
    pub branch: String,
    /// Who is asking (shown with the build).
    #[arg(long, default_value = "cli")]
    pub trigger: String,
    /// A build parameter: an environment variable every step of the build gets, over the
    /// pipeline's `env` (repeatable; the last of a name wins). The same commit with other
    /// parameters is another build; `kiln retry` keeps them. KILN_* names and the dispatcher's
    /// secrets are refused.
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Follow the build's output until it ends; exit with its status.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// One `--env NAME=VALUE` (a malformed one is a usage error, before anything is sent).
fn parse_env(s: &str) -> Result<(String, String), String> {
    kiln_domain::params::parse_assignment(s)
}

/// Makes a local repository path absolute (URLs pass through).
pub fn normalize_repo(repo: &str) -> Result<String, CliError> {
    kiln_git::location::canonical(repo)
        .map_err(|e| CliError::new(exit::NOT_FOUND, format!("repository path {repo:?}: {e}")))
}

/// The commit and branch `kiln submit` sends. For a local repository the revision (HEAD when not
/// given) is resolved here, where the user's refs are, and the branch defaults to the one it is
/// on; a URL's revision goes to the dispatcher as typed, to be resolved in its mirror.
pub(super) fn submit_revision(
    repo: &str,
    commit: Option<String>,
    branch: String,
) -> Result<(String, String), CliError> {
    if kiln_git::location::is_url(repo) {
        return match commit {
            Some(c) => Ok((c, branch)),
            None => Err(CliError::new(
                exit::USAGE,
                format!("--commit is needed for {repo}: only a local repository has a HEAD here"),
            )),
        };
    }
    let rev = commit.unwrap_or_else(|| "HEAD".to_string());
    let resolved = kiln_git::resolve_local(repo, &rev).map_err(|e| {
        let code = match e {
            kiln_git::GitError::InvalidRevision { .. }
            | kiln_git::GitError::InvalidCommitId { .. }
            | kiln_git::GitError::AmbiguousCommit { .. } => exit::INVALID,
            _ => exit::NOT_FOUND,
        };
        CliError::new(code, e.to_string())
    })?;
    let branch = if branch.is_empty() {
        resolved.branch.unwrap_or_default()
    } else {
        branch
    };
    Ok((resolved.commit, branch))
}

pub(super) async fn submit(
    conn: &Connection,
    json: bool,
    args: SubmitArgs,
) -> Result<i32, CliError> {
    let repo = normalize_repo(&args.repo)?;
    let (commit, branch) = submit_revision(&repo, args.commit, args.branch)?;
    let mut c = conn.fetching_build_client().await?;
    let b = c
        .submit_build(proto::SubmitBuildRequest {
            repo,
            commit,
            branch,
            trigger: args.trigger,
            env: args.env.into_iter().collect(),
        })
        .await?
        .into_inner();
    print_build(&b, json);
    if args.follow {
        let opts = LogsOptions {
            target: b.id.to_string(),
            follow: true,
            ..LogsOptions::default()
        };
        return logs(conn, &opts).await;
    }
    Ok(exit::OK)
}

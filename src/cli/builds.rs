//! `kiln builds`: recent builds, filtered.

use clap::Args;

use super::client::{ClientArgs, Connection, JsonArg};
use super::output::{build_json, fmt_time};
use super::submit::normalize_repo;
use super::{CliError, exit};
use crate::proto;

/// `kiln builds`.
#[derive(Debug, Args)]
pub struct BuildsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(flatten)]
    pub out: JsonArg,
    /// Only this repository (as submitted).
    #[arg(long)]
    pub repo: Option<String>,
    /// Only this branch.
    #[arg(long)]
    pub branch: Option<String>,
    /// Only this state (queued, running, passed, failed, cancelled, timed_out, errored).
    #[arg(long)]
    pub state: Option<kiln_domain::JobState>,
    /// At most this many.
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    /// Continue from a previous page.
    #[arg(long, default_value = "")]
    pub page_token: String,
}

pub(super) async fn builds(
    conn: &Connection,
    json: bool,
    args: BuildsArgs,
) -> Result<i32, CliError> {
    let mut c = conn.build_client().await?;
    let r = c
        .list_builds(proto::ListBuildsRequest {
            repo: args
                .repo
                .map(|r| normalize_repo(&r).unwrap_or(r))
                .unwrap_or_default(),
            branch: args.branch.unwrap_or_default(),
            state: args
                .state
                .map_or(0, |s| crate::convert::job_state_to_proto(s) as i32),
            page_size: args.limit,
            page_token: args.page_token,
        })
        .await?
        .into_inner();
    if json {
        let v = serde_json::json!({
            "builds": r.builds.iter().map(build_json).collect::<Vec<_>>(),
            "next_page_token": r.next_page_token,
        });
        println!("{v}");
    } else {
        println!(
            "{:<6} {:<10} {:<12} {:<16} {:<20} REPO",
            "ID", "STATE", "COMMIT", "BRANCH", "CREATED"
        );
        for b in &r.builds {
            println!(
                "{:<6} {:<10} {:<12} {:<16} {:<20} {}",
                b.id,
                crate::convert::state_name(b.state),
                b.commit.get(..12).unwrap_or(&b.commit),
                if b.branch.is_empty() { "-" } else { &b.branch },
                b.created_at.as_ref().map(fmt_time).unwrap_or_default(),
                b.repo
            );
        }
        if !r.next_page_token.is_empty() {
            println!("(more: --page-token {})", r.next_page_token);
        }
    }
    Ok(exit::OK)
}

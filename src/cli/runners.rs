//! `kiln runners`: the attached runners, and `kiln runners drain NAME`.

use clap::Subcommand;

use super::client::{ClientArgs, Connection};
use super::output::fmt_time;
use super::{CliError, exit};
use crate::proto;

/// `kiln runners ...`.
#[derive(Debug, Subcommand)]
pub enum RunnersAction {
    /// Tell a runner to take no new work, finish its jobs and detach.
    Drain {
        /// Runner name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) async fn runners(conn: &Connection, json: bool) -> Result<i32, CliError> {
    let mut c = conn.admin_client().await?;
    let r = c
        .list_runners(proto::ListRunnersRequest {})
        .await?
        .into_inner();
    let state = |s: i32| match proto::RunnerState::try_from(s) {
        Ok(proto::RunnerState::Idle) => "idle",
        Ok(proto::RunnerState::Busy) => "busy",
        Ok(proto::RunnerState::Draining) => "draining",
        Ok(proto::RunnerState::Offline) => "offline",
        _ => "unknown",
    };
    if json {
        let v: Vec<_> = r
            .runners
            .iter()
            .map(|x| {
                serde_json::json!({
                    "id": x.id, "name": x.name, "state": state(x.state), "labels": x.labels,
                    "slots": x.slots, "running_jobs": x.running_jobs, "version": x.version,
                    "last_heartbeat": x.last_heartbeat.as_ref().map(crate::convert::millis),
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "runners": v }));
    } else {
        println!(
            "{:<4} {:<20} {:<9} {:<5} {:<12} {:<20} LABELS",
            "ID", "NAME", "STATE", "SLOTS", "JOBS", "LAST HEARTBEAT"
        );
        for x in &r.runners {
            let labels: Vec<String> = x.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let jobs: Vec<String> = x.running_jobs.iter().map(u64::to_string).collect();
            println!(
                "{:<4} {:<20} {:<9} {:<5} {:<12} {:<20} {}",
                x.id,
                x.name,
                state(x.state),
                x.slots,
                if jobs.is_empty() {
                    "-".into()
                } else {
                    jobs.join(",")
                },
                x.last_heartbeat.as_ref().map(fmt_time).unwrap_or_default(),
                labels.join(",")
            );
        }
    }
    Ok(exit::OK)
}

/// `kiln runners drain NAME`: the runner takes no new work and leaves once its jobs end.
pub(super) async fn drain(conn: &Connection, name: String) -> Result<i32, CliError> {
    let mut c = conn.admin_client().await?;
    let r = c
        .drain_runner(proto::DrainRunnerRequest { name })
        .await?
        .into_inner();
    println!("runner {} is draining", r.name);
    Ok(exit::OK)
}

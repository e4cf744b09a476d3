//! `kiln show`: one build, its jobs and steps (the exit code says how it ended); `kiln cancel`
//! and `kiln retry` of a build.

use kiln_domain::BuildId;

use super::client::Connection;
use super::output::{build_json, print_build, state_exit};
use super::{CliError, exit};
use crate::proto;

/// A build and its test report (empty without split steps).
pub(super) async fn build_and_tests(
    conn: &Connection,
    build: BuildId,
) -> Result<(proto::Build, proto::TestReport), CliError> {
    let mut c = conn.build_client().await?;
    let b = c
        .get_build(proto::GetBuildRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    let report = c
        .get_test_report(proto::GetTestReportRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    Ok((b, report))
}

pub(super) async fn show(conn: &Connection, json: bool, build: BuildId) -> Result<i32, CliError> {
    let (b, report) = build_and_tests(conn, build).await?;
    if json {
        let mut v = build_json(&b);
        v["tests"] = crate::report::json(&report);
        println!("{v}");
    } else {
        print_build(&b, false);
        print!("{}", crate::report::text(&report));
    }
    Ok(state_exit(b.state))
}

/// `kiln cancel BUILD`.
pub(super) async fn cancel(conn: &Connection, json: bool, build: BuildId) -> Result<i32, CliError> {
    let mut c = conn.build_client().await?;
    let b = c
        .cancel_build(proto::CancelBuildRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    print_build(&b, json);
    Ok(exit::OK)
}

/// `kiln retry BUILD`: builds the same commit and pipeline again, as a new build.
pub(super) async fn retry(conn: &Connection, json: bool, build: BuildId) -> Result<i32, CliError> {
    let mut c = conn.fetching_build_client().await?;
    let b = c
        .retry_build(proto::RetryBuildRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    print_build(&b, json);
    Ok(exit::OK)
}

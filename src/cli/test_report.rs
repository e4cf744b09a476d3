//! `kiln tests`: a build's test report (merged over split shards and retries), or its JUnit XML.

use kiln_domain::BuildId;

use super::client::Connection;
use super::output::state_exit;
use super::show::build_and_tests;
use super::{CliError, exit};

pub(super) async fn tests(
    conn: &Connection,
    json: bool,
    build: BuildId,
    junit: Option<std::path::PathBuf>,
) -> Result<i32, CliError> {
    let (b, report) = build_and_tests(conn, build).await?;
    if junit.is_some() && report.junit_xml.is_empty() {
        return Err(CliError::new(
            exit::NOT_FOUND,
            format!(
                "build {build} has no test report: no split step, and no step's `junit` files \
                 gave test cases"
            ),
        ));
    }
    match junit {
        Some(path) if path.as_os_str() == "-" => {
            // Standard output holds the XML alone.
            print!("{}", report.junit_xml);
            return Ok(state_exit(b.state));
        }
        Some(path) => {
            std::fs::write(&path, &report.junit_xml).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot write {}: {e}", path.display()))
            })?;
            if !json {
                eprintln!(
                    "kiln: JUnit report of build {build} written to {}",
                    path.display()
                );
            }
        }
        None => {}
    }
    if json {
        println!("{}", crate::report::json(&report));
    } else if report.splits.is_empty() && report.steps.is_empty() {
        println!(
            "build {build} has no test report: no split step (`parallel:` or `units:`) and no \
             step with `junit:` files"
        );
    } else {
        print!("{}", crate::report::text(&report));
    }
    Ok(state_exit(b.state))
}

//! `kiln admin`: what an operator does on the dispatcher's machine (runner tokens).

use std::path::PathBuf;

use clap::Subcommand;

use super::{CliError, exit};

/// `kiln admin`.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Per-runner tokens (stored hashed in the dispatcher's database).
    #[command(subcommand)]
    RunnerToken(RunnerTokenCommand),
}

/// `kiln admin runner-token`.
#[derive(Debug, Subcommand)]
pub enum RunnerTokenCommand {
    /// Creates (or replaces) a runner's token and prints it once.
    Create {
        /// Runner name.
        name: String,
        /// The dispatcher's data directory.
        #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
        data_dir: PathBuf,
    },
    /// Revokes a runner's token.
    Revoke {
        /// Runner name.
        name: String,
        /// The dispatcher's data directory.
        #[arg(long, env = "KILN_DATA_DIR", default_value = "kiln-data")]
        data_dir: PathBuf,
    },
}

pub(super) fn admin(cmd: AdminCommand) -> Result<i32, CliError> {
    use kiln_store::Store as _;
    let AdminCommand::RunnerToken(cmd) = cmd;
    let (name, data_dir, create) = match cmd {
        RunnerTokenCommand::Create { name, data_dir } => (name, data_dir, true),
        RunnerTokenCommand::Revoke { name, data_dir } => (name, data_dir, false),
    };
    if name.trim().is_empty() || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(CliError::new(
            exit::USAGE,
            format!("runner name {name:?} is not valid"),
        ));
    }
    std::fs::create_dir_all(&data_dir).map_err(|e| {
        CliError::new(
            exit::INTERNAL,
            format!("data dir {}: {e}", data_dir.display()),
        )
    })?;
    let store = kiln_store::SqliteStore::open(&data_dir.join("kiln.db"))
        .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot open the store: {e}")))?;
    if create {
        let token = crate::auth::new_token();
        store
            .set_runner_token(&name, Some(&crate::auth::hash_token(&token)))
            .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
        println!("{token}");
        eprintln!(
            "token for runner {name} (shown once): start it with `kiln runner --name {name} --token ...`"
        );
        Ok(exit::OK)
    } else {
        let changed = store
            .set_runner_token(&name, None)
            .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
        if changed {
            Ok(exit::OK)
        } else {
            Err(CliError::new(
                exit::NOT_FOUND,
                format!("runner {name} has no token"),
            ))
        }
    }
}

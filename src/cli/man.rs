//! `kiln man`: manual pages (clap_mangen).

use super::{Cli, CliError, exit, write_out};

/// `kiln man`: the main page on stdout, or every command's page into `dir`.
pub(super) fn man(dir: Option<&std::path::Path>) -> Result<i32, CliError> {
    let cmd = <Cli as clap::CommandFactory>::command();
    match dir {
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .map_err(|e| CliError::new(exit::INTERNAL, format!("cannot render: {e}")))?;
            write_out(false, &out)?;
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| {
                CliError::new(exit::USAGE, format!("cannot create {}: {e}", dir.display()))
            })?;
            clap_mangen::generate_to(cmd, dir).map_err(|e| {
                CliError::new(
                    exit::USAGE,
                    format!("cannot write to {}: {e}", dir.display()),
                )
            })?;
            eprintln!("kiln: man pages written to {}", dir.display());
        }
    }
    Ok(exit::OK)
}

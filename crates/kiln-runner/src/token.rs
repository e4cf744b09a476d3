//! Keeping the runner's token away from build steps.
//!
//! Steps run as the runner's user, and such a process reads `/proc/<runner>/cmdline` (anyone
//! can) and `/proc/<runner>/environ` (the same user, or root). Both show the process's
//! *original* argument and environment strings, whatever the process changes later. So a
//! runner given its token by `--token T` or `KILN_TOKEN=T` starts itself again (`exec`, same
//! pid) before anything else, with neither, and the token on its standard input
//! (`--token-file -`). It also marks itself not dumpable, so a step of the same (non-root) user
//! cannot read its memory either. Steps get a scrubbed environment ([`kiln_exec::is_inherited`]
//! plus `--pass-env`), and the runner's token is masked in their output besides.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;

/// The variable a runner may take its token from (clap reads it for `--token`).
pub const TOKEN_ENV: &str = "KILN_TOKEN";
/// Set in the environment of the runner started again without its token, so it never loops.
const RESTARTED_ENV: &str = "KILN_RUNNER_RESTARTED";
/// Longest token accepted (it must fit a pipe's buffer, which is written before the `exec`).
const MAX_TOKEN_BYTES: usize = 4096;

/// For `kiln runner`, before the runtime starts: warns about `--token` on the command line and,
/// when the token is on the command line or in the environment, starts the runner again
/// without it there (does not return then, unless the `exec` fails: then it warns).
/// `token`: the token as the command line gave it (`--token`, or read from `KILN_TOKEN`);
/// `token_file_given`: the command line also names `--token-file`.
pub fn secure_start(token: Option<String>, token_file_given: bool) -> Result<(), String> {
    // Not dumpable: a step of the same (non-root) user cannot read this process's memory or
    // environment. Inherited by nothing: `exec` of a step resets it.
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!(error = %e, "cannot mark the runner not dumpable");
    }
    let argv: Vec<OsString> = std::env::args_os().collect();
    let on_command_line = argv.iter().skip(1).any(is_token_arg);
    let in_env = std::env::var_os(TOKEN_ENV).is_some();
    if on_command_line {
        if token_file_given {
            return Err("give the runner's token by --token or --token-file, not both".into());
        }
        tracing::warn!(
            "--token on the command line is visible to every user of this machine (ps, \
             /proc/PID/cmdline) until the runner restarts itself without it; use --token-file \
             or the KILN_TOKEN environment variable"
        );
    }
    if !(on_command_line || in_env) {
        return Ok(());
    }
    if std::env::var_os(RESTARTED_ENV).is_some() {
        tracing::warn!("the runner's token is still on its command line or in its environment");
        return Ok(());
    }
    let mut rest: Vec<OsString> = Vec::new();
    let mut args_iter = argv.iter().skip(1);
    while let Some(a) = args_iter.next() {
        if a == "--token" {
            args_iter.next();
        } else if !is_token_arg(a) {
            rest.push(a.clone());
        }
    }
    let mut command = std::process::Command::new("/proc/self/exe");
    if let Some(arg0) = argv.first() {
        command.arg0(arg0);
    }
    command
        .args(&rest)
        .env_remove(TOKEN_ENV)
        .env(RESTARTED_ENV, "1");
    // The token (from --token or KILN_TOKEN, as clap read it) goes on standard input, unless it
    // comes from --token-file anyway.
    let token = token.or_else(|| std::env::var(TOKEN_ENV).ok());
    if !token_file_given && let Some(token) = token.as_ref().filter(|t| !t.is_empty()) {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(format!(
                "the runner's token is longer than {MAX_TOKEN_BYTES} bytes"
            ));
        }
        let (reader, mut writer) =
            std::io::pipe().map_err(|e| format!("cannot make a pipe for the token: {e}"))?;
        writer
            .write_all(token.as_bytes())
            .map_err(|e| format!("cannot pass the token on: {e}"))?;
        drop(writer);
        command.stdin(reader).args(["--token-file", "-"]);
    }
    let e = command.exec();
    // Only reached when the exec failed (no /proc?): run as we are, the token still visible.
    tracing::warn!(
        error = %e,
        "cannot start the runner again without its token on its command line or in its \
         environment; steps of its user may read it from /proc"
    );
    Ok(())
}

/// `--token` or `--token=...` (not `--token-file`).
fn is_token_arg(a: &OsString) -> bool {
    let a = a.as_encoded_bytes();
    a == b"--token" || a.starts_with(b"--token=")
}

/// Reads a token file (`-`: standard input, to its end); surrounding white space is dropped.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let mut raw = Vec::new();
    let read = if path == Path::new("-") {
        std::io::stdin().lock().read_to_end(&mut raw)
    } else {
        std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut raw))
    };
    read.map_err(|e| format!("cannot read the token file {}: {e}", path.display()))?;
    let token = String::from_utf8(raw)
        .map_err(|_| format!("the token file {} is not UTF-8", path.display()))?;
    let token = token.trim();
    if token.is_empty() {
        return Err(format!("the token file {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// The values of the variables named by `--pass-env` (unset ones are left out, with a warning).
pub fn pass_env(names: &[String]) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for name in names {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(format!("--pass-env {name:?} is not a variable name"));
        }
        if name == TOKEN_ENV || name == RESTARTED_ENV {
            return Err(format!(
                "--pass-env {name}: the runner's token is never passed on"
            ));
        }
        match std::env::var(name) {
            Ok(v) => out.push((name.clone(), v)),
            Err(std::env::VarError::NotPresent) => {
                tracing::warn!(name, "--pass-env: the variable is not set");
            }
            Err(std::env::VarError::NotUnicode(_)) => {
                return Err(format!("--pass-env {name}: the value is not UTF-8"));
            }
        }
    }
    Ok(out)
}

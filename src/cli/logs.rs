//! `kiln logs`: a build's or a job's output, replayed and optionally followed live; every job
//! of a build at once, each line prefixed by its job.

use clap::Args;
use kiln_domain::BuildId;

use super::client::{ClientArgs, Connection};
use super::output::state_exit;
use super::{CliError, exit, write_out};
use crate::proto;

/// `kiln logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// BUILD or BUILD/JOB (JOB is a job id or name). A whole build's jobs are shown with each
    /// line prefixed by its job.
    pub target: String,
    /// Only this job (a job id or name), as BUILD/JOB.
    #[arg(long, value_name = "JOB")]
    pub job: Option<String>,
    /// Follow live output until the job ends (every job of the build at once); end with the
    /// build's (or job's) status and exit with its code.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Write the job's stderr to kiln's stderr. By default everything the job wrote (stdout,
    /// stderr and kiln's own notes) goes to stdout in the order it was produced, so
    /// `kiln logs 7 | grep FAIL` sees it all.
    #[arg(long)]
    pub separate_stderr: bool,
    /// Show this attempt of the job (1 is its first; `kiln show` lists them) instead of the
    /// one that produced its result (or the running one).
    #[arg(long, value_name = "N", conflicts_with = "all_attempts")]
    pub attempt: Option<u32>,
    /// Show every attempt's output, superseded ones (a lost runner's) included, oldest first.
    #[arg(long)]
    pub all_attempts: bool,
}

/// What `kiln logs` (and `kiln submit -f`) prints.
#[derive(Debug, Clone, Default)]
pub struct LogsOptions {
    /// BUILD or BUILD/JOB.
    pub target: String,
    /// Only this job (name or id), as BUILD/JOB says.
    pub job: Option<String>,
    /// Follow live output until the job (or every job of the build) ends.
    pub follow: bool,
    /// The job's stderr to kiln's stderr (otherwise everything to stdout, in log order).
    pub separate_stderr: bool,
    /// Only this attempt (by number) of the one job shown.
    pub attempt: Option<u32>,
    /// Every attempt's output (otherwise the current attempt's: the result's or the running).
    pub all_attempts: bool,
}

/// Which attempts' output of a job to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AttemptFilter {
    /// Every attempt.
    All,
    /// This attempt id.
    Only(u64),
    /// This attempt id and any later one (a follower sees a reassignment's new attempt).
    From(u64),
}

impl AttemptFilter {
    /// The filter for a job: `--all-attempts`, `--attempt N`, or the current attempt.
    fn of(job: &proto::Job, opts: &LogsOptions) -> Result<Self, CliError> {
        if opts.all_attempts {
            return Ok(Self::All);
        }
        match opts.attempt {
            Some(n) => job
                .attempt_list
                .iter()
                .find(|a| a.number == n)
                .map(|a| Self::Only(a.id))
                .ok_or_else(|| {
                    CliError::new(
                        exit::NOT_FOUND,
                        format!(
                            "job {} has no attempt {n} (it has {})",
                            job.name,
                            match job.attempts {
                                0 => "none".to_string(),
                                1 => "attempt 1".to_string(),
                                k => format!("attempts 1 to {k}"),
                            }
                        ),
                    )
                }),
            None => Ok(Self::From(job.attempt_id)),
        }
    }

    /// Whether output of `attempt` is shown (0: a dispatcher that does not say).
    fn shows(self, attempt: u64) -> bool {
        attempt == 0
            || match self {
                Self::All => true,
                Self::Only(a) => attempt == a,
                Self::From(a) => attempt >= a,
            }
    }
}

/// Prints the output of a build's jobs (or one job): each job's output in the order it was
/// produced, to stdout (with `separate_stderr` the job's stderr to stderr). With more than one
/// job every line is prefixed with its job's name (coloured on a terminal unless `NO_COLOR`
/// is set); when following, every job is followed at once and the command ends with the
/// build's (or the job's) status and exits with its code.
pub async fn logs(conn: &Connection, opts: &LogsOptions) -> Result<i32, CliError> {
    let target = opts.target.as_str();
    let (build, in_target) = match target.split_once('/') {
        Some((b, j)) => (b, Some(j)),
        None => (target, None),
    };
    let job = match (in_target, opts.job.as_deref()) {
        (Some(a), Some(b)) if a != b => {
            return Err(CliError::new(
                exit::USAGE,
                format!("{target:?} names job {a:?} but --job says {b:?}"),
            ));
        }
        (a, b) => a.or(b),
    };
    let build: BuildId = build
        .parse()
        .map_err(|_| CliError::new(exit::USAGE, format!("{target:?} is not BUILD or BUILD/JOB")))?;
    let mut c = conn.build_client().await?;
    let b = c
        .get_build(proto::GetBuildRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    let jobs: Vec<&proto::Job> = match job {
        None => b.jobs.iter().collect(),
        Some(j) => {
            let found = b
                .jobs
                .iter()
                .find(|x| x.name == j || x.id.to_string() == j)
                .ok_or_else(|| {
                    CliError::new(exit::NOT_FOUND, format!("build {build} has no job {j:?}"))
                })?;
            vec![found]
        }
    };
    if jobs.is_empty() {
        eprintln!("build {build} has no jobs: {}", b.error);
        return Ok(state_exit(b.state));
    }
    if opts.attempt.is_some() && jobs.len() > 1 {
        return Err(CliError::new(
            exit::USAGE,
            format!(
                "build {build} has {} jobs: --attempt needs one (BUILD/JOB or --job)",
                jobs.len()
            ),
        ));
    }
    let filters = jobs
        .iter()
        .map(|j| AttemptFilter::of(j, opts))
        .collect::<Result<Vec<_>, _>>()?;
    for (j, f) in jobs.iter().zip(&filters) {
        if let (AttemptFilter::From(_), Some(last)) = (f, j.attempt_list.last())
            && j.attempts > 1
        {
            eprintln!(
                "kiln: job {} had {} attempts; showing attempt {} on {} (--attempt N or \
                 --all-attempts for the others)",
                j.name, j.attempts, last.number, last.runner
            );
        }
    }
    let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
    let prefixes = if jobs.len() > 1 {
        job_prefixes(&names, colour_wanted())
    } else {
        Vec::new()
    };
    let mut printer = Printer {
        separate_stderr: opts.separate_stderr,
        prefixes,
        partial: std::collections::HashMap::new(),
    };
    let follow = opts.follow;
    let mut codes = vec![exit::RUNNING; jobs.len()];
    if follow && jobs.len() > 1 {
        // Every job at once: one stream per job, their chunks printed as they come.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(
            usize,
            Result<Option<proto::LogChunk>, tonic::Status>,
        )>(64);
        for (i, j) in jobs.iter().enumerate() {
            let (mut c, tx, id) = (c.clone(), tx.clone(), j.id);
            tokio::spawn(async move {
                let streamed = async {
                    let mut s = c.stream_logs(stream_request(id, true)).await?.into_inner();
                    while let Some(chunk) = s.message().await? {
                        if tx.send((i, Ok(Some(chunk)))).await.is_err() {
                            break;
                        }
                    }
                    Ok::<_, tonic::Status>(())
                }
                .await;
                let _ = tx.send((i, streamed.map(|()| None))).await;
            });
        }
        drop(tx);
        while let Some((i, event)) = rx.recv().await {
            match event? {
                Some(chunk) => {
                    if chunk.final_state != 0 {
                        codes[i] = state_exit(chunk.final_state);
                    }
                    if filters[i].shows(chunk.attempt_id) {
                        printer.chunk(i, chunk.stream, &chunk.data)?;
                    }
                }
                None => printer.end(i)?,
            }
        }
    } else {
        for (i, j) in jobs.iter().enumerate() {
            let mut s = c
                .stream_logs(stream_request(j.id, follow))
                .await?
                .into_inner();
            while let Some(chunk) = s.message().await? {
                if chunk.final_state != 0 {
                    codes[i] = state_exit(chunk.final_state);
                }
                if filters[i].shows(chunk.attempt_id) {
                    printer.chunk(i, chunk.stream, &chunk.data)?;
                }
            }
            printer.end(i)?;
        }
    }
    if !follow {
        return Ok(codes.into_iter().max().unwrap_or(exit::OK));
    }
    // The end: the build's own state decides (a skipped job after a failed one is not worse).
    let b = c
        .get_build(proto::GetBuildRequest {
            build_id: build.get(),
        })
        .await?
        .into_inner();
    if job.is_none() {
        let others: Vec<String> = b
            .jobs
            .iter()
            .filter(|j| b.jobs.len() > 1 && j.state != proto::JobState::Passed as i32)
            .map(|j| format!("{} {}", j.name, crate::convert::state_name(j.state)))
            .collect();
        let detail = if others.is_empty() {
            String::new()
        } else {
            format!(" ({})", others.join(", "))
        };
        write_out(
            false,
            format!(
                "kiln: build {build} {}{detail}\n",
                crate::convert::state_name(b.state)
            )
            .as_bytes(),
        )?;
        return Ok(state_exit(b.state));
    }
    let code = codes.first().copied().unwrap_or(exit::RUNNING);
    if let Some(j) = jobs.first() {
        let state = b.jobs.iter().find(|x| x.id == j.id).map_or(0, |x| x.state);
        write_out(
            false,
            format!(
                "kiln: job {} of build {build} {}\n",
                j.name,
                crate::convert::state_name(state)
            )
            .as_bytes(),
        )?;
    }
    Ok(code)
}

pub(super) fn stream_request(job: u64, follow: bool) -> proto::StreamLogsRequest {
    proto::StreamLogsRequest {
        job_id: job,
        build_id: 0,
        offset: 0,
        follow,
    }
}

/// Whether to colour job prefixes: on a terminal, unless `NO_COLOR` is set (and not empty).
pub(super) fn colour_wanted() -> bool {
    use std::io::IsTerminal as _;
    colour_for(
        std::io::stdout().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// Colour on a terminal, unless `NO_COLOR` is set to something (<https://no-color.org>).
pub(super) fn colour_for(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// `[name] ` for each job, padded to the longest name so the output lines up, each in its own
/// colour when `colour`.
pub(super) fn job_prefixes(names: &[&str], colour: bool) -> Vec<Vec<u8>> {
    use anstyle::AnsiColor::{Blue, Cyan, Green, Magenta, Red, Yellow};
    let palette = [Cyan, Green, Yellow, Magenta, Blue, Red];
    let width = names.iter().map(|n| n.chars().count()).max().unwrap_or(0);
    names
        .iter()
        .zip(palette.iter().cycle())
        .map(|(name, c)| {
            let pad = " ".repeat(width - name.chars().count());
            if colour {
                let style = c.on_default();
                format!("{}[{name}]{}{pad} ", style.render(), style.render_reset())
            } else {
                format!("[{name}]{pad} ")
            }
            .into_bytes()
        })
        .collect()
}

/// Longest partial line kept back while waiting for its newline; longer ones are cut.
const MAX_PARTIAL_LINE: usize = 64 * 1024;

/// Writes jobs' output: as is for one job, line by line with each job's prefix for several.
struct Printer {
    separate_stderr: bool,
    /// One per job; empty: no prefixes (bytes pass through untouched).
    prefixes: Vec<Vec<u8>>,
    /// Unfinished last line per (job, to stderr).
    partial: std::collections::HashMap<(usize, bool), Vec<u8>>,
}

impl Printer {
    fn chunk(&mut self, job: usize, stream: i32, data: &[u8]) -> Result<(), CliError> {
        if data.is_empty() {
            return Ok(());
        }
        let to_err = self.separate_stderr && stream == proto::OutputStream::Stderr as i32;
        let Some(prefix) = self.prefixes.get(job) else {
            return write_out(to_err, data);
        };
        let buf = self.partial.entry((job, to_err)).or_default();
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|&b| b == b'\n') {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&buf[start..=start + pos]);
            start += pos + 1;
        }
        if buf.len() - start >= MAX_PARTIAL_LINE {
            out.extend_from_slice(prefix);
            out.extend_from_slice(&buf[start..]);
            out.push(b'\n');
            start = buf.len();
        }
        buf.drain(..start);
        if out.is_empty() {
            Ok(())
        } else {
            write_out(to_err, &out)
        }
    }

    /// The job's output ended: its unfinished lines are written with a newline.
    fn end(&mut self, job: usize) -> Result<(), CliError> {
        let Some(prefix) = self.prefixes.get(job) else {
            return Ok(());
        };
        for to_err in [false, true] {
            if let Some(rest) = self.partial.remove(&(job, to_err))
                && !rest.is_empty()
            {
                let mut out = prefix.clone();
                out.extend_from_slice(&rest);
                out.push(b'\n');
                write_out(to_err, &out)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_prefixes_line_up_and_are_coloured_only_when_asked() {
        let plain = job_prefixes(&["build", "test-1"], false);
        assert_eq!(plain, vec![b"[build]  ".to_vec(), b"[test-1] ".to_vec()]);
        let coloured = job_prefixes(&["build", "test-1"], true);
        for (c, p) in coloured.iter().zip(&plain) {
            assert!(c.starts_with(b"\x1b["), "{c:?}");
            assert!(c.len() > p.len());
        }
        assert_ne!(coloured[0], coloured[1], "each job its own colour");
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use std::ffi::OsStr;
        assert!(colour_for(true, None));
        assert!(colour_for(true, Some(OsStr::new(""))));
        assert!(!colour_for(true, Some(OsStr::new("1"))));
        assert!(!colour_for(false, None));
    }
}

//! The output generators the benchmarks' steps run (`kiln-bench gen ...`, hidden): the same
//! program writes a step's output under kiln and, for the baselines, straight into a pipe the
//! benchmark reads.

use std::io::Write;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use super::util::{fail, now_ns};
use crate::{BenchError, exit};

/// `kiln-bench gen` arguments.
#[derive(Debug, Args)]
pub struct GenArgs {
    /// What to write.
    #[command(subcommand)]
    pub what: Gen,
}

/// The generators.
#[derive(Debug, Subcommand)]
pub enum Gen {
    /// Lines at a steady rate, each starting with the wall clock in nanoseconds and a sequence
    /// number: `TIME_NS SEQ xxxx...\n`.
    Lines(LinesArgs),
    /// A deterministic stream of printable text (newline every 100 bytes), as fast as the pipe
    /// takes it.
    Bytes(BytesArgs),
}

/// `kiln-bench gen lines`.
#[derive(Debug, Clone, Args)]
pub struct LinesArgs {
    /// Lines per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Bytes per line, newline included.
    #[arg(long, default_value_t = 1024)]
    pub line_bytes: usize,
    /// How long to write.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Wait this long before the first line (lets a follower attach).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
    /// Stop early, after the first line written once this file exists (`--duration` still
    /// bounds it): a step that runs until the benchmark says so.
    #[arg(long)]
    pub until: Option<std::path::PathBuf>,
}

impl LinesArgs {
    /// How many lines the generator writes (at most, with `--until`).
    pub fn count(&self) -> u64 {
        (self.duration.as_secs_f64() * f64::from(self.rate)).round() as u64
    }

    /// The command-line arguments that reproduce these settings.
    pub fn argv(&self) -> Vec<String> {
        let mut argv = vec![
            "gen".into(),
            "lines".into(),
            format!("--rate={}", self.rate),
            format!("--line-bytes={}", self.line_bytes),
            format!("--duration={}ms", self.duration.as_millis()),
            format!("--delay={}ms", self.delay.as_millis()),
        ];
        if let Some(until) = &self.until {
            argv.push(format!("--until={}", until.display()));
        }
        argv
    }
}

/// `kiln-bench gen bytes`.
#[derive(Debug, Clone, Args)]
pub struct BytesArgs {
    /// How many bytes.
    #[arg(long, default_value_t = 200_000_000)]
    pub bytes: u64,
    /// Seed of the pattern.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wait this long before the first byte (lets a follower attach).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub delay: Duration,
}

impl BytesArgs {
    /// The command-line arguments that reproduce these settings.
    pub fn argv(&self) -> Vec<String> {
        vec![
            "gen".into(),
            "bytes".into(),
            format!("--bytes={}", self.bytes),
            format!("--seed={}", self.seed),
            format!("--delay={}ms", self.delay.as_millis()),
        ]
    }
}

/// Runs a generator (on a blocking thread: it sleeps and writes synchronously).
pub async fn run(args: GenArgs) -> Result<i32, BenchError> {
    tokio::task::spawn_blocking(move || match args.what {
        Gen::Lines(a) => lines(&a),
        Gen::Bytes(a) => bytes(&a),
    })
    .await
    .map_err(fail)??;
    Ok(exit::OK)
}

fn write_err(e: std::io::Error) -> BenchError {
    fail(format!("cannot write output: {e}"))
}

fn lines(a: &LinesArgs) -> Result<(), BenchError> {
    if a.rate == 0 || a.line_bytes < 48 {
        return Err(fail("--rate must be > 0 and --line-bytes at least 48"));
    }
    std::thread::sleep(a.delay);
    let count = a.count();
    let start = Instant::now();
    let mut out = std::io::stdout().lock();
    let mut line = Vec::with_capacity(a.line_bytes);
    for i in 0..count {
        let due = start + Duration::from_secs_f64(i as f64 / f64::from(a.rate));
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        line.clear();
        // The timestamp is taken last, right before the write.
        let _ = write!(line, "{} {i:010} ", now_ns());
        line.resize(a.line_bytes - 1, b'x');
        line.push(b'\n');
        // Stdout is line buffered: one line, one write(2).
        out.write_all(&line).map_err(write_err)?;
        if a.until.as_deref().is_some_and(std::path::Path::exists) {
            break;
        }
    }
    out.flush().map_err(write_err)
}

/// Size of the pattern's repeating block.
const BLOCK: usize = 1 << 20;

/// Calls `f` with the pattern for `bytes` and `seed`, block by block: a 1 MiB block of
/// pseudo-random printable text (xorshift64*, a newline every 100 bytes) repeated, each copy
/// starting with its own number, so that a lost, repeated or reordered piece changes the
/// checksum.
pub fn pattern(
    bytes: u64,
    seed: u64,
    mut f: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 -";
    let mut state = seed | 1;
    let mut base = vec![0u8; BLOCK];
    for (i, b) in base.iter_mut().enumerate() {
        *b = if i % 100 == 99 {
            b'\n'
        } else {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            ALPHABET[(state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 58) as usize]
        };
    }
    let mut block = base.clone();
    let mut left = bytes;
    let mut n = 0u64;
    while left > 0 {
        let head = format!("block {n:016}\n");
        block[..head.len()].copy_from_slice(head.as_bytes());
        let take = left.min(BLOCK as u64) as usize;
        f(&block[..take])?;
        left -= take as u64;
        n += 1;
    }
    Ok(())
}

fn bytes(a: &BytesArgs) -> Result<(), BenchError> {
    std::thread::sleep(a.delay);
    let mut out = std::io::stdout().lock();
    pattern(a.bytes, a.seed, |b| out.write_all(b)).map_err(write_err)?;
    out.flush().map_err(write_err)
}

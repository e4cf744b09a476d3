//! `kiln-bench throughput`: how fast a step's output reaches a follower, whether all of it
//! does, and how much memory the dispatcher needs meanwhile.
//!
//! A step writes `--bytes` of deterministic text to stdout as fast as it can; an in-process
//! gRPC follower (`StreamLogs`, follow) receives it. Its SHA-256 is compared with the
//! pattern's, its rate is measured from the first to the last byte at the follower, and the
//! `kiln serve` child's resident memory is sampled from /proc throughout. The baseline is the
//! same generator piped straight into this process.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

use super::generate::{BytesArgs, pattern};
use super::util::{
    Proc, Repo, RssSampler, Scratch, Server, bench_exe, fail, figure, header, mb, ms, note,
    pipeline, rss_kib, sh_quote, submit, wait_exit, wrong,
};
use crate::BenchError;
use kiln::proto;

/// `kiln-bench throughput`.
#[derive(Debug, Clone, Args)]
pub struct ThroughputArgs {
    /// Bytes the step writes.
    #[arg(long, default_value_t = 200_000_000)]
    pub bytes: u64,
    /// Seed of the pattern.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Hashes what it is sent on its own thread, so hashing never slows the receiver.
struct Hasher {
    tx: Option<std::sync::mpsc::SyncSender<Bytes>>,
    thread: std::thread::JoinHandle<(u64, String)>,
}

impl Hasher {
    fn new() -> Hasher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(1 << 14);
        let thread = std::thread::spawn(move || {
            let mut h = Sha256::new();
            let mut n = 0u64;
            for b in rx {
                n += b.len() as u64;
                h.update(&b);
            }
            (n, hex::encode(h.finalize()))
        });
        Hasher {
            tx: Some(tx),
            thread,
        }
    }

    fn push(&self, b: Bytes) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(b);
        }
    }

    async fn finish(mut self) -> Result<(u64, String), BenchError> {
        self.tx = None;
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(fail)?
            .map_err(|_| fail("the hashing thread panicked"))
    }
}

/// What a receiver measured.
struct Received {
    bytes: u64,
    sha256: String,
    /// First to last byte.
    span: Duration,
}

impl Received {
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.span.as_secs_f64().max(1e-9)
    }
}

/// The expected SHA-256 of the pattern.
fn expected_sha256(bytes: u64, seed: u64) -> String {
    let mut h = Sha256::new();
    let _ = pattern(bytes, seed, |b| {
        h.update(b);
        Ok(())
    });
    hex::encode(h.finalize())
}

/// Runs the benchmark; fails with exit code 1 when output was lost or corrupted.
pub async fn run(args: &ThroughputArgs) -> Result<(), BenchError> {
    header(
        "throughput",
        &format!(
            "{} MB written by one step, received by a gRPC StreamLogs follower",
            args.bytes as f64 / 1e6
        ),
    );
    let (bytes, seed) = (args.bytes, args.seed);
    let expected = tokio::task::spawn_blocking(move || expected_sha256(bytes, seed))
        .await
        .map_err(fail)?;
    let tmp = Scratch::new()?;
    let spec = BytesArgs {
        bytes: args.bytes,
        seed: args.seed,
        delay: Duration::ZERO,
    };

    // Baseline: the generator piped straight into this process.
    let base = {
        let mut cmd = tokio::process::Command::new(bench_exe()?);
        cmd.args(spec.argv()).stdout(Stdio::piped());
        let mut p = Proc::spawn("generator", cmd)?;
        let mut out = p.child.stdout.take().ok_or_else(|| fail("no stdout"))?;
        let hasher = Hasher::new();
        let mut first = None;
        let mut last = Instant::now();
        let read = async {
            loop {
                let mut buf = Vec::with_capacity(1 << 16);
                let n = out.read_buf(&mut buf).await.map_err(fail)?;
                if n == 0 {
                    return Ok::<_, BenchError>(());
                }
                last = Instant::now();
                first.get_or_insert(last);
                hasher.push(Bytes::from(buf));
            }
        };
        tokio::time::timeout(Duration::from_secs(300), read)
            .await
            .map_err(|_| fail("the baseline generator did not finish"))??;
        let code = wait_exit(&mut p, Duration::from_secs(10)).await?;
        if code != 0 {
            return Err(fail(format!("the baseline generator exited {code}")));
        }
        let (n, sha256) = hasher.finish().await?;
        Received {
            bytes: n,
            sha256,
            span: last.duration_since(first.unwrap_or(last)),
        }
    };

    // Kiln.
    let server = Server::start(tmp.path()).await?;
    let _runner = server.start_runner(tmp.path(), "bench-throughput").await?;
    let repo = Repo::init(&tmp.path().join("repo"))?;
    let spec = BytesArgs {
        delay: Duration::from_millis(500),
        ..spec
    };
    let run = std::iter::once(sh_quote(&bench_exe()?.to_string_lossy()))
        .chain(spec.argv())
        .collect::<Vec<_>>()
        .join(" ");
    let commit = repo.commit(&[(".kiln.yml", &pipeline("bytes", &run))], "throughput")?;
    let mut client = server.build_client().await?;
    let idle_kib = rss_kib(server.pid).map_or(0, |(rss, _)| rss);
    let sampler = RssSampler::start(server.pid, Duration::from_millis(10));
    let submitted = Instant::now();
    let build = submit(&mut client, &repo, &commit).await?;
    let mut stream = client
        .stream_logs(proto::StreamLogsRequest {
            job_id: 0,
            build_id: build.id,
            offset: 0,
            follow: true,
        })
        .await
        .map_err(|s| fail(format!("StreamLogs: {}", s.message())))?
        .into_inner();
    let hasher = Hasher::new();
    let mut first = None;
    let mut last = Instant::now();
    let mut final_state = 0;
    let mut chunks = 0u64;
    let mut got = 0u64;
    let follow = async {
        while let Some(c) = stream
            .message()
            .await
            .map_err(|s| fail(format!("StreamLogs broke: {}", s.message())))?
        {
            if c.final_state != 0 {
                final_state = c.final_state;
            }
            if c.stream == proto::OutputStream::Stdout as i32 && !c.data.is_empty() {
                last = Instant::now();
                first.get_or_insert(last);
                chunks += 1;
                got += c.data.len() as u64;
                hasher.push(c.data);
            }
        }
        Ok::<_, BenchError>(())
    };
    // Bounded: 60 s plus 0.5 s per MB, so a job that never ends cannot hold the benchmark.
    let limit = Duration::from_secs(60) + Duration::from_millis(args.bytes / 2_000);
    let followed = tokio::time::timeout(limit, follow).await;
    let Ok(followed) = followed else {
        return Err(wrong(format!(
            "build {} did not end within {limit:?}; the follower got {got} of {} bytes",
            build.id, args.bytes
        )));
    };
    followed?;
    let ended = submitted.elapsed();
    let peak = sampler.finish().await;
    let (n, sha256) = hasher.finish().await?;
    let kiln = Received {
        bytes: n,
        sha256,
        span: last.duration_since(first.unwrap_or(last)),
    };
    let detail = client
        .get_build(proto::GetBuildRequest { build_id: build.id })
        .await
        .map_err(|s| fail(s.message().to_string()))?
        .into_inner();
    let step_ms = detail
        .jobs
        .first()
        .and_then(|j| j.steps.first())
        .map_or(0, |s| s.duration_ms);

    let complete = kiln.bytes == args.bytes && kiln.sha256 == expected;
    let rate = kiln.mb_per_s();
    let base_rate = base.mb_per_s();
    figure(
        "follower rate",
        format!("{rate:.1} MB/s"),
        "goal >= 100",
        Some(rate >= 100.0),
        &format!(
            "baseline (pipe) {base_rate:.1} MB/s, ratio {:.3}x",
            rate / base_rate
        ),
    );
    figure(
        "complete (sha256)",
        if complete { "yes".into() } else { "NO".into() },
        "goal: same",
        Some(complete),
        &format!(
            "{} of {} bytes, sha256 {}",
            kiln.bytes,
            args.bytes,
            kiln.sha256.get(..16).unwrap_or_default()
        ),
    );
    let peak_mb = mb(peak.sampled_kib.max(peak.hwm_kib));
    figure(
        "dispatcher peak RSS",
        format!("{peak_mb:.1} MB"),
        "goal < 100 MB",
        Some(peak_mb < 100.0),
        &format!(
            "idle before {:.1} MB, ratio {:.2}x (sampled VmRSS {:.1} MB in {} samples, VmHWM {:.1} MB)",
            mb(idle_kib),
            peak_mb / mb(idle_kib).max(1e-9),
            mb(peak.sampled_kib),
            peak.samples,
            mb(peak.hwm_kib)
        ),
    );
    note(format!(
        "first to last byte {:.0} ms in {chunks} chunks; submit to end of stream {:.0} ms; the step ran {step_ms} ms; build {}",
        ms(kiln.span),
        ms(ended),
        kiln::convert::state_name(final_state)
    ));
    if base.bytes != args.bytes || base.sha256 != expected {
        return Err(wrong("the baseline pipe did not carry the pattern intact"));
    }
    if !complete {
        return Err(wrong(format!(
            "the follower received {} of {} bytes, sha256 {} (expected {expected})",
            kiln.bytes, args.bytes, kiln.sha256
        )));
    }
    if final_state != proto::JobState::Passed as i32 {
        return Err(wrong(format!(
            "the build ended {}",
            kiln::convert::state_name(final_state)
        )));
    }
    Ok(())
}

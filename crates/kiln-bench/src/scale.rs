//! `kiln-bench scale`: how the store's per-decision costs grow with the builds it holds.
//!
//! One store (the dispatcher's SQLite file, in a temp dir, opened as `kiln serve` opens it; with
//! `--postgres` a database on a throwaway PostgreSQL cluster with fsync on, analyzed after each
//! fill as autovacuum would have by the time a real history is that long)
//! grows through stages of stored builds (`--builds 1000,10000,100000`). The history is
//! recorded as an observer records it (`record_commits`, a thousand commits per transaction,
//! older builds superseded), so every stored build has a job and a final state. At each stage
//! the benchmark times, through the `Store` trait the dispatcher uses:
//!
//! - **submit**: `create_build` of a new build with one job (what `SubmitBuild` writes);
//! - **observer push**: `record_commits` of one new commit of the branch with the long history
//!   (its build, the branch's cursor, older unfinished builds of the branch superseded);
//! - **decision**: what the scheduler does per assignment of a job that ends at once:
//!   `queued_jobs`, `assign`, `get_build` (the assignment names the build's repository and
//!   commit), `start_attempt`, `finish_attempt`;
//! - **reads**: `get_build` of a random stored build, `list_builds` (the first page, and one
//!   repository's first page), `list_runners`, and `metrics` (a `/metrics` scrape: the
//!   tallies' deltas folded, then read).
//!
//! Each figure is printed with its ratio to the first stage's, measured in the same run: a
//! ratio near 1 means the cost does not grow with the builds stored. The dispatcher's own
//! per-decision work (picking a runner among the attached ones) and the gRPC edge are not in
//! these figures; with `--sessions`, [`sessions`] measures them: a real `kiln serve` with
//! simulated runners attached, at the same stored-builds levels.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use kiln_domain::{BuildId, JobState, NewBuild, NewJob, StepSpec};
use kiln_store::{BuildFilter, PgStore, SqliteStore, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod sessions;

use super::util::{Scratch, fail, figure, header, ms, note, percentile, sorted};
use crate::BenchError;

/// `kiln-bench scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Stages: stored builds at which the costs are measured, in increasing order.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub builds: Vec<u64>,
    /// Samples of each operation per stage.
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u32).range(10..=100_000))]
    pub samples: u32,
    /// Measure PostgreSQL instead of SQLite: a throwaway cluster from the installed server
    /// binaries (`kiln-pgtest`), with PostgreSQL's durability defaults (fsync on), as `kiln
    /// serve --database` would use it.
    #[arg(long)]
    pub postgres: bool,
    /// With `--postgres`: connect through the server's Unix-domain socket instead of loopback
    /// TCP, as a dispatcher on the database's own machine can (`host=/dir` in its settings).
    #[arg(long, requires = "postgres")]
    pub pg_socket: bool,
    /// With `--sessions --postgres`: reach PostgreSQL through a relay in this process that
    /// delays each direction by this many microseconds, as a database on another host would
    /// be (the round trip measured through it is printed).
    #[arg(long, requires = "postgres", conflicts_with = "pg_socket",
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub pg_delay_us: Option<u64>,
    /// Measure the whole dispatcher instead: a `kiln serve` child with these numbers of
    /// simulated runners attached on real `Attach` streams, at each of `--builds` (see
    /// [`sessions`]). `--samples` is then the number of `GetBuild` and `ListBuilds` samples.
    #[arg(long, value_delimiter = ',', value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub sessions: Vec<u32>,
    /// With `--sessions`: builds submitted per stage beyond those the runners first hold (one
    /// each, at most this many runners); these flow once the runners answer.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub jobs: u64,
    /// With `--sessions`: `SubmitBuild` calls in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub submitters: u32,
    /// With `--sessions --postgres`: `kiln serve` processes sharing the one database, the
    /// runners and submits spread over them (see [`sessions`]).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub dispatchers: u32,
}

/// Commits recorded per `record_commits` transaction while filling.
const FILL_BATCH: u64 = 1000;
/// The filler history's repository and branch.
const FILL_REPO: &str = "https://git.example.com/bench/history";
/// The repository the measured builds are submitted to.
const WORK_REPO: &str = "https://git.example.com/bench/work";

fn one_job_build(repo: &str, commit: String, n: u64) -> NewBuild {
    NewBuild {
        repo: repo.into(),
        commit,
        branch: "main".into(),
        trigger: "bench".into(),
        jobs: vec![NewJob {
            name: "test".into(),
            steps: vec![StepSpec {
                name: "test".into(),
                run: format!("make test # {n}"),
                ..Default::default()
            }],
            ..Default::default()
        }],
        pipeline_hash: "bench".into(),
        pipeline: ".kiln.yml".into(),
        ..Default::default()
    }
}

fn commit_id(prefix: char, n: u64) -> String {
    format!("{prefix}{n:039x}")
}

/// The latencies of one operation at one stage, in milliseconds, sorted.
type Samples = Vec<f64>;

/// What one stage measured.
#[derive(Debug, Default)]
struct Stage {
    stored: u64,
    fill_per_s: f64,
    ops: Vec<(&'static str, Samples)>,
}

fn time<T>(out: &mut Samples, f: impl FnOnce() -> kiln_store::Result<T>) -> Result<T, BenchError> {
    let t = Instant::now();
    let v = f().map_err(|e| fail(format!("store: {}", kiln_domain::error_chain(&e))))?;
    out.push(ms(t.elapsed()));
    Ok(v)
}

/// Grows the history from `from` to `to` stored builds.
fn fill(store: &dyn Store, from: u64, to: u64) -> Result<(), BenchError> {
    let mut n = from;
    while n < to {
        let batch: Vec<NewBuild> = (n..(n + FILL_BATCH).min(to))
            .map(|i| one_job_build(FILL_REPO, commit_id('f', i), i))
            .collect();
        let head = batch.last().map(|b| b.commit.clone()).unwrap_or_default();
        n += batch.len() as u64;
        store
            .record_commits(FILL_REPO, "main", &batch, &head, true)
            .map_err(|e| fail(format!("filling the store: {e}")))?;
    }
    Ok(())
}

/// Measures the operations at the current size.
fn measure(store: &dyn Store, stage: u64, samples: u32, stored: u64) -> Result<Stage, BenchError> {
    let runner = store
        .upsert_runner("bench-runner", &BTreeMap::new(), 1, "bench")
        .map_err(|e| fail(format!("store: {e}")))?;
    let (mut submit, mut push, mut decision, mut get, mut list, mut list_repo) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    let (mut runners, mut scrape) = (Vec::new(), Vec::new());
    for i in 0..u64::from(samples) {
        let b = one_job_build(WORK_REPO, commit_id('w', stage * 1_000_000 + i), i);
        time(&mut submit, || store.create_build(&b))?;
    }
    // An observer reporting one new commit of a branch with a long history: the build, the
    // cursor, and the branch's older unfinished builds superseded.
    for i in 0..u64::from(samples) {
        let b = one_job_build(FILL_REPO, commit_id('p', stage * 1_000_000 + i), i);
        let head = b.commit.clone();
        time(&mut push, || {
            store.record_commits(FILL_REPO, "main", std::slice::from_ref(&b), &head, true)
        })?;
    }
    for _ in 0..samples {
        let t = Instant::now();
        let jobs = store
            .queued_jobs(256)
            .map_err(|e| fail(format!("store: {e}")))?;
        let Some(job) = jobs.first() else {
            return Err(fail("no queued job left to assign"));
        };
        let (attempt, _) = store
            .assign(job.id, runner.id, "bench-runner")
            .map_err(|e| fail(format!("store: {e}")))?
            .ok_or_else(|| fail("a queued job could not be assigned"))?;
        store
            .get_build(job.build_id)
            .map_err(|e| fail(format!("store: {e}")))?;
        store
            .start_attempt(attempt)
            .map_err(|e| fail(format!("store: {e}")))?;
        store
            .finish_attempt(attempt, JobState::Passed, None)
            .map_err(|e| fail(format!("store: {e}")))?;
        decision.push(ms(t.elapsed()));
    }
    let mut rng = StdRng::seed_from_u64(stage);
    for _ in 0..samples {
        let id = BuildId::new(rng.random_range(1..=stored.max(1)));
        time(&mut get, || store.get_build(id))?;
        time(&mut list, || {
            store.list_builds(&BuildFilter {
                limit: 50,
                ..BuildFilter::default()
            })
        })?;
        time(&mut list_repo, || {
            store.list_builds(&BuildFilter {
                repo: Some(FILL_REPO.into()),
                limit: 50,
                ..BuildFilter::default()
            })
        })?;
        time(&mut runners, || store.list_runners())?;
    }
    // A scrape as the dispatcher makes it: fold the tallies' deltas (those of the samples
    // above, the first time), then read. Fewer samples.
    for _ in 0..samples.div_ceil(10) {
        time(&mut scrape, || {
            store.fold_tallies()?;
            store.metrics()
        })?;
    }
    Ok(Stage {
        stored,
        fill_per_s: 0.0,
        ops: vec![
            ("submit (create_build)", sorted(&submit)),
            ("observer push (record_commits)", sorted(&push)),
            ("decision (assign..finish)", sorted(&decision)),
            ("get_build", sorted(&get)),
            ("list_builds, first 50", sorted(&list)),
            ("list_builds, one repo", sorted(&list_repo)),
            ("list_runners", sorted(&runners)),
            ("metrics (a scrape)", sorted(&scrape)),
        ],
    })
}

/// Runs the benchmark: the store's costs, or with `--sessions` the whole dispatcher's.
pub async fn run(args: &ScaleArgs) -> Result<(), BenchError> {
    if !args.sessions.is_empty() {
        return sessions::run(args).await;
    }
    let mut stages = args.builds.clone();
    stages.sort_unstable();
    stages.dedup();
    if stages.is_empty() || stages[0] == 0 {
        return Err(fail("--builds needs at least one stage above 0"));
    }
    header(
        "scale",
        &format!(
            "store costs per operation at {} stored builds ({}, {} samples each)",
            stages
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(" / "),
            if args.postgres {
                "PostgreSQL, fsync on"
            } else {
                "SQLite"
            },
            args.samples
        ),
    );
    let tmp = Scratch::new()?;
    let db_path = tmp.path().join("kiln.db");
    let (samples, postgres, socket) = (args.samples, args.postgres, args.pg_socket);
    // The store is synchronous: the whole run is on a blocking thread, as the dispatcher
    // calls it (a PgStore must never be called from an async task).
    let results = tokio::task::spawn_blocking(move || -> Result<Vec<Stage>, BenchError> {
        let (store, pg, _cluster): (Arc<dyn Store>, Option<Arc<PgStore>>, _) = if postgres {
            let cluster = kiln_pgtest::PgCluster::start_durable()
                .map_err(|e| fail(format!("starting PostgreSQL: {e}")))?;
            let url = if socket {
                cluster.database_via_socket()
            } else {
                cluster.database()
            }
            .map_err(|e| fail(format!("creating the database: {e}")))?;
            let store = Arc::new(
                PgStore::connect(&url).map_err(|e| fail(format!("opening the store: {e}")))?,
            );
            (store.clone(), Some(store), Some(cluster))
        } else {
            let store =
                SqliteStore::open(&db_path).map_err(|e| fail(format!("opening the store: {e}")))?;
            (Arc::new(store), None, None)
        };
        let store = store.as_ref();
        let mut out = Vec::new();
        let mut filled = 0;
        for (i, &target) in stages.iter().enumerate() {
            let t = Instant::now();
            fill(store, filled, target)?;
            // The dispatcher folds the metrics' tallies every minute: a farm's history never
            // leaves a day of deltas unfolded.
            store
                .fold_tallies()
                .map_err(|e| fail(format!("folding the tallies: {e}")))?;
            // The fill adds builds thousands of times faster than a farm does; autovacuum
            // would have vacuumed and analyzed the tables many times over by the time a real
            // history is this long.
            if let Some(pg) = &pg {
                pg.analyze()
                    .map_err(|e| fail(format!("VACUUM (ANALYZE) after the fill: {e}")))?;
            }
            let took = t.elapsed().max(Duration::from_millis(1));
            let added = target - filled;
            filled = target;
            let mut stage = measure(store, i as u64, samples, filled)?;
            // The measured builds are stored builds too (submitted and pushed).
            filled += 2 * u64::from(samples);
            stage.fill_per_s = added as f64 / took.as_secs_f64();
            out.push(stage);
        }
        Ok(out)
    })
    .await
    .map_err(|e| fail(format!("the benchmark's thread: {e}")))??;

    let first = &results[0];
    for stage in &results {
        note(format!(
            "-- {} stored builds (history recorded at {:.0} builds/s)",
            stage.stored, stage.fill_per_s
        ));
        for ((name, s), (_, base)) in stage.ops.iter().zip(&first.ops) {
            let (p50, p99) = (percentile(s, 50.0), percentile(s, 99.0));
            let b50 = percentile(base, 50.0);
            let ratio = if b50 > 0.0 { p50 / b50 } else { 0.0 };
            let (goal, met) = match *name {
                "submit (create_build)" => ("p99 < 20 ms", Some(p99 < 20.0)),
                "observer push (record_commits)" if stage.stored != first.stored => {
                    ("p50 ≤ 1.5× first", Some(ratio <= 1.5))
                }
                "decision (assign..finish)" if stage.stored != first.stored => {
                    ("p50 ≤ 1.5× first", Some(ratio <= 1.5))
                }
                _ => ("", None),
            };
            figure(
                name,
                format!("{p50:.3} / {p99:.3} ms"),
                goal,
                met,
                &format!(
                    "p50/p99; p50 at {} builds {b50:.3} ms, ratio {ratio:.2}×",
                    first.stored
                ),
            );
        }
    }
    Ok(())
}

//! [`Store`] on PostgreSQL, so that several dispatchers can share one farm.
//!
//! - The driver is `tokio-postgres` (async), on connections the store pools itself
//!   (`pg/conn.rs`, at most [`MAX_CONNECTIONS`]). Each connection has its own current-thread
//!   tokio runtime, and the thread that took the connection drives it: it sends its request
//!   and polls the connection's I/O itself (`Runtime::block_on`), so a statement costs no
//!   hand-off between threads (with `deadpool-postgres` connections spawned on a shared
//!   runtime, four per statement were most of the dispatcher's CPU at 1,000 runner
//!   sessions). The [`Store`] trait is synchronous: each method blocks its thread while its
//!   statements run. **Invariant: call a `PgStore` only from threads that are not running
//!   async code** (`tokio::task::spawn_blocking`, plain threads, tests), as every caller of
//!   the [`Store`] trait already does for SQLite; from inside an async task `block_on`
//!   panics rather than stall a worker.
//! - Round trips: a transaction's `BEGIN` is sent with its first statement; statements that
//!   do not need each other's answers go together (`settle`'s build lock and the read of the
//!   build's jobs; a chunk of `assign_many`'s assignments, each after its savepoint); a write
//!   whose answer the transaction does not read (the build's new state, written last by
//!   `settle` and by an assignment chunk) is held back and sent with the next request, most
//!   often the `COMMIT` ([`Db::execute_later`]); a write
//!   or read that is one statement runs on its own, in its own transaction (no `BEGIN` or
//!   `COMMIT`: one round trip; its answer comes after the server's `ReadyForQuery`, so after
//!   its commit): `record_step` without test cases, the heartbeats, `get_job`,
//!   `get_build_record`, `get_attempt`, `queued_jobs`. Nothing is answered before its
//!   `COMMIT` (or its statement's implicit commit) returned, and `synchronous_commit` is the
//!   server's (on by default). (A `BEGIN` sent with a first statement that failed would
//!   leave that statement to commit alone; `BEGIN` cannot fail on a live connection, and a
//!   broken one fails both.)
//! - Every method is one transaction ([`PgStore::write_committed`], [`PgStore::write`] or
//!   [`PgStore::read`]). A transaction that loses a conflict (SQLSTATE 40001 serialization
//!   failure, 40P01 deadlock, 23505 a unique index another transaction filled first) is run
//!   again from the start, at most [`MAX_TRIES`] times, re-reading everything.
//!   - Writes run `READ COMMITTED` with explicit row locks, so competing writers queue on a
//!     row instead of failing one another. Where the SQLite code read a row and then changed
//!     it relying on being the only writer, the PostgreSQL code takes the row's lock first
//!     (`SELECT ... FOR UPDATE`, which waits for a writer of the row and then returns the row
//!     as it committed), and each statement after it sees what committed before it: the job
//!     row in `assign`, `record_step`, `finish_attempt`, `requeue_attempt`, `end_job`, the
//!     superseded jobs of `record_commits`; the build row in `settle` (a build's state
//!     recomputed from its jobs, read after the lock); the attempt rows in `adopt_attempts`
//!     and the owner fence; the split rows whose tries an ended attempt releases. The
//!     compare-and-set on the current attempt is a conditional `UPDATE ... WHERE
//!     current_attempt = $n AND state IN (...)`, checked by rows affected (PostgreSQL
//!     re-checks the condition on the committed row after waiting for its lock). Locks are
//!     taken in one order, the job's first (then its attempt's and the split rows it
//!     releases) and the build's last, so two writers of one build do not wait on each other
//!     in a cycle; where `settle` locks more after the build's (the jobs it skips, a split it
//!     closes) a cycle is possible, and PostgreSQL's 40P01 makes one of them run again.
//!     Dedupe is a unique index (`builds_once`, deliveries' (build, event, target)): the
//!     later of two racing inserts fails with 23505 and runs again to find the winner. Two
//!     observers of one branch queue on an advisory lock of the branch (its cursor row may
//!     not exist yet). Each method says why its isolation is safe.
//!   - Serializable, these writes failed one another past the retries with ten runner
//!     sessions (predicate locks on shared index pages and on every job of a build that
//!     `settle` reads: "Canceled on conflict out to pivot"); the
//!     `session_writes_on_many_handles_all_succeed` test reproduces that on the old code.
//!   - Only `seed_unit_durations` (benchmarks' and tests' seeding, never run by a dispatcher)
//!     still runs `SERIALIZABLE` ([`PgStore::write`]). (`SERIALIZABLE` guarantees hold only
//!     among serializable transactions, so no dispatcher method may rely on it any more.)
//!   - `next_units` (a split shard's round trip): the asking job's row `FOR SHARE`, the
//!     split's row `FOR UPDATE` (one round trip of a split at a time, as in SQLite), unit
//!     history rows `FOR UPDATE`; see `pg/split.rs`.
//!   - `assign_many` (a scheduling round's chunk) is one transaction: the chunk's job rows
//!     locked in id order, then their builds' rows, then each assignment in its own savepoint
//!     (one that fails is rolled back alone, answered with its error); see `assign_batch`.
//!   - `take_due_deliveries` uses `FOR UPDATE SKIP LOCKED`: several senders take disjoint
//!     due rows without waiting for each other.
//!   - Reads of several statements (`get_build`, `metrics`, the reports) run `REPEATABLE READ
//!     READ ONLY`: one snapshot, so their counts agree, and never a serialization failure.
//! - Migrations: [`schema::MIGRATIONS`], recorded in `kiln_migrations` (version, when), applied
//!   in one `READ COMMITTED` transaction under an advisory lock, so two dispatchers starting
//!   together apply them once.

#[cfg(test)]
mod assign_many_tests;
mod conn;
mod deliveries;
#[cfg(test)]
mod later_tests;
mod logs;
pub(crate) mod schema;
mod split;

#[cfg(test)]
pub(crate) use split::history_durations as split_history;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

use kiln_domain::{
    AttemptId, AttemptState, Build, BuildId, DispatcherId, Job, JobId, JobState, Millis, NewBuild,
    RunnerId, RunnerRecord, StepOutcome, StepResult, StepSpec, build_state, now_millis,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{IsolationLevel, Row};

pub use logs::PgLogStore;

use crate::sqlite::corrupt;
use crate::{
    Attempt, AttemptInfo, BuildDetail, BuildFilter, Change, Finish, Recorded, Result, Store,
    StoreError, StoreMetrics,
};

/// Most connections one store keeps open.
const MAX_CONNECTIONS: usize = 16;
/// Most runs of one transaction that lost a conflict with another writer.
pub(crate) const MAX_TRIES: u32 = 50;
/// The class (first key) of the advisory locks `record_commits` holds on a branch; the second
/// key is a hash of the repository and branch (a collision only makes two branches' observers
/// queue). The two-key form never collides with the migrations' one-key lock.
const BRANCH_LOCK_CLASS: i32 = 0x6b62_7263; // "kbrc"

/// The advisory lock key migrations hold ("kiln" in ASCII).
const MIGRATION_LOCK: i64 = 0x6b69_6c6e;

/// A PostgreSQL database's connection settings (parsed from a `postgres://` URL or the
/// key=value form; its `Debug` hides the password).
pub type PgConfig = tokio_postgres::Config;

/// Parameters of a statement.
pub(crate) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The PostgreSQL implementation of [`Store`]. See the module's documentation for the
/// threading invariant and the isolation of each operation.
pub struct PgStore {
    pool: conn::Pool,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// One transaction on one connection, driven by the calling thread.
pub(crate) struct Db<'c> {
    conn: RefCell<&'c mut conn::Conn>,
    /// The transaction's `BEGIN`, until it is sent, with the first statement (pipelined: one
    /// round trip for both).
    begin: Cell<Option<&'static str>>,
}

impl Db<'_> {
    /// The `BEGIN` to send with the next statement, once `sqls` are prepared (a statement
    /// that fails to prepare leaves it for the next one, so no statement of the transaction
    /// can run outside it).
    fn begin_after_preparing(&self, sqls: &[&str]) -> Result<Option<&'static str>> {
        if self.begin.get().is_some() {
            let mut conn = self.conn.borrow_mut();
            for sql in sqls {
                conn.prepare(sql)?;
            }
        }
        Ok(self.begin.take())
    }

    /// Runs a statement (prepared once per connection); returns the rows it changed.
    pub(crate) fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let first = self.begin_after_preparing(&[sql])?;
        self.conn.borrow_mut().execute(first, sql, params)
    }

    /// Runs a query; returns its rows.
    pub(crate) fn query(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let first = self.begin_after_preparing(&[sql])?;
        self.conn.borrow_mut().query(first, sql, params)
    }

    /// Runs a query of at most one row.
    pub(crate) fn query_opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let mut rows = self.query(sql, params)?;
        if rows.len() > 1 {
            return Err(StoreError::Corrupt(format!(
                "{} rows where at most one was expected",
                rows.len()
            )));
        }
        Ok(rows.pop())
    }

    /// Runs a query of exactly one row.
    pub(crate) fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        self.query_opt(sql, params)?
            .ok_or_else(|| StoreError::Corrupt("no row where one was expected".into()))
    }

    /// Runs two queries sent together: one round trip (see [`conn::Conn::query2`]).
    pub(crate) fn query2(
        &self,
        a: (&str, Params<'_>),
        b: (&str, Params<'_>),
    ) -> Result<(Vec<Row>, Vec<Row>)> {
        let first = self.begin_after_preparing(&[a.0, b.0])?;
        self.conn.borrow_mut().query2(first, a, b)
    }

    /// Runs queries sent together: one round trip (see [`conn::Conn::query_all`]).
    pub(crate) fn query_all(&self, queries: &[(&str, Params<'_>)]) -> Result<Vec<Vec<Row>>> {
        let sqls: Vec<&str> = queries.iter().map(|(sql, _)| *sql).collect();
        let first = self.begin_after_preparing(&sqls)?;
        self.conn.borrow_mut().query_all(first, queries)
    }

    /// Runs one statement several times, sent at once, each run after its own prefix (see
    /// [`conn::Conn::pipeline`]).
    pub(crate) fn pipeline(
        &self,
        sql: &str,
        runs: &[(&str, Params<'_>)],
    ) -> Result<Vec<Result<Vec<Row>>>> {
        let first = self.begin_after_preparing(&[sql])?;
        self.conn.borrow_mut().pipeline(first, sql, runs)
    }

    /// Runs statements without parameters (`SAVEPOINT`, `ROLLBACK TO SAVEPOINT`, DDL).
    pub(crate) fn batch(&self, sql: &str) -> Result<()> {
        let first = self.begin.take();
        self.conn.borrow_mut().batch_after(first, sql)
    }

    /// A write whose answer (rows changed) the transaction does not read, such as the last
    /// statement before `COMMIT`: held back and sent with the transaction's next request, one
    /// round trip fewer (see [`conn::Conn::execute_later`]). Its error, if it fails, is that
    /// next request's, and the transaction does not commit.
    pub(crate) fn execute_later(
        &self,
        sql: &str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<()> {
        self.conn.borrow_mut().execute_later(sql, params)
    }
}

/// An error and its causes, one line (a pool error's own text does not say why).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// Column `i` of a row as a `u32` (stored as a `BIGINT`).
pub(crate) fn get_u32(r: &Row, i: usize) -> Result<u32> {
    let v: i64 = r.try_get(i)?;
    u32::try_from(v).map_err(|e| corrupt("stored number", e))
}

/// Column `i` of a row as a `u64` (stored as a `BIGINT`).
pub(crate) fn get_u64(r: &Row, i: usize) -> Result<u64> {
    let v: i64 = r.try_get(i)?;
    u64::try_from(v).map_err(|e| corrupt("stored number", e))
}

/// A `u64` as a `BIGINT` (saturating).
pub(crate) fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl StoreError {
    /// Whether the transaction lost a conflict with another writer and may be run again.
    pub(crate) fn is_conflict(&self) -> bool {
        match self {
            StoreError::Postgres(e) => matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED
                    || *c == SqlState::UNIQUE_VIOLATION
            ),
            _ => false,
        }
    }
}

/// The server-side limit on a session left idle inside a transaction (see
/// [`PgStore::connect_with`]).
const IDLE_IN_TRANSACTION: &str = "-c idle_in_transaction_session_timeout=5s";

impl PgStore {
    /// Connects to the database at `url` (`postgres://user@host:port/db`, or the key=value
    /// form) and brings its schema up to date. Call it from a thread that is not running async
    /// code (see the module's documentation).
    pub fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url.parse()?)
    }

    /// Vacuums kiln's tables and refreshes the planner's statistics (`VACUUM (ANALYZE)`), which
    /// autovacuum does by itself once enough rows changed. For after a bulk load: plans made on
    /// a young table's statistics can cost the size of the table per statement, and a queue
    /// table emptied at once (the tallies' deltas) is scanned with its dead rows until
    /// vacuumed (`kiln-bench scale --postgres` calls this after each fill; BENCHMARKS.md says
    /// what it measured without).
    pub fn analyze(&self) -> Result<()> {
        // VACUUM runs outside a transaction block.
        self.pool.get()?.conn().batch("VACUUM (ANALYZE)")
    }

    /// [`PgStore::connect`] with the settings parsed already (their `Debug` hides the
    /// password).
    pub fn connect_with(mut config: PgConfig) -> Result<Self> {
        // A dispatcher frozen (stopped, or its host hung) inside a transaction would hold its
        // row locks for ever, and every other dispatcher's write of those rows (a job's log
        // head, a runner's row) would wait behind it: the server ends such a session after
        // IDLE_IN_TRANSACTION, sooner than runners give up on a silent dispatcher (their
        // lease, 6 s by default). A live dispatcher never waits inside a transaction.
        let options = match config.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {IDLE_IN_TRANSACTION}"),
            _ => IDLE_IN_TRANSACTION.to_string(),
        };
        config.options(&options);
        let store = Self {
            pool: conn::Pool::new(config, MAX_CONNECTIONS),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Records known unit durations for a repository's split key, as if they had been
    /// measured (see [`crate::SqliteStore::seed_unit_durations`]).
    pub fn seed_unit_durations(
        &self,
        repo: &str,
        key: &str,
        durations: &[(String, u64)],
    ) -> Result<()> {
        let now = now_millis();
        // SERIALIZABLE: seeding for benchmarks and tests, never concurrent with a dispatcher.
        self.write(|db| split::seed_durations(db, repo, key, durations, now))
    }

    fn migrate(&self) -> Result<()> {
        let latest = schema::MIGRATIONS.len() as i64;
        // READ COMMITTED: the statements after the advisory lock see what a dispatcher that
        // held it before committed (a serializable snapshot would predate the wait and apply
        // the migrations again).
        self.write_committed(|db| {
            db.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            db.batch(
                "CREATE TABLE IF NOT EXISTS kiln_migrations (\
                 version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
            )?;
            let row = db.query_one("SELECT COALESCE(MAX(version), 0) FROM kiln_migrations", &[])?;
            let version: i64 = row.try_get(0)?;
            if version > latest {
                return Err(StoreError::Corrupt(format!(
                    "database schema version {version} is newer than this kiln ({latest})"
                )));
            }
            for (n, m) in schema::MIGRATIONS.iter().enumerate().skip(version as usize) {
                db.batch(m)?;
                db.execute(
                    "INSERT INTO kiln_migrations (version, applied_at) VALUES ($1, $2)",
                    &[&(n as i64 + 1), &now_millis()],
                )?;
            }
            Ok(())
        })
    }

    /// One write transaction at `SERIALIZABLE`, run again while it loses conflicts. Its
    /// guarantee holds only against other serializable transactions, and the dispatcher's
    /// writes all run [`PgStore::write_committed`]: only for what no dispatcher runs.
    pub(crate) fn write<T>(&self, f: impl Fn(&Db<'_>) -> Result<T>) -> Result<T> {
        self.run(IsolationLevel::Serializable, false, &f)
    }

    /// One write transaction at `READ COMMITTED` (with the row locks its statements take),
    /// run again while it loses conflicts (40P01 deadlock, 23505 unique violation).
    pub(crate) fn write_committed<T>(&self, f: impl Fn(&Db<'_>) -> Result<T>) -> Result<T> {
        self.run(IsolationLevel::ReadCommitted, false, &f)
    }

    /// One read-only transaction on one snapshot (`REPEATABLE READ READ ONLY`).
    pub(crate) fn read<T>(&self, f: impl Fn(&Db<'_>) -> Result<T>) -> Result<T> {
        self.run(IsolationLevel::RepeatableRead, true, &f)
    }

    /// One statement on its own, in its own transaction (no `BEGIN` or `COMMIT` sent: one
    /// round trip), run again while it loses conflicts. Its rows come back after the server's
    /// `ReadyForQuery`, so after its commit (synchronous_commit: flushed).
    pub(crate) fn autocommit(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.statement(sql, params) {
                Err(e) if e.is_conflict() && tries < MAX_TRIES => continue,
                other => return other,
            }
        }
    }

    fn run<T>(
        &self,
        level: IsolationLevel,
        read_only: bool,
        f: &dyn Fn(&Db<'_>) -> Result<T>,
    ) -> Result<T> {
        let mut tries = 0;
        loop {
            tries += 1;
            match self.once(level, read_only, f) {
                Err(e) if e.is_conflict() && tries < MAX_TRIES => continue,
                other => return other,
            }
        }
    }

    fn once<T>(
        &self,
        level: IsolationLevel,
        read_only: bool,
        f: &dyn Fn(&Db<'_>) -> Result<T>,
    ) -> Result<T> {
        let begin = match (level, read_only) {
            (IsolationLevel::Serializable, _) => "BEGIN ISOLATION LEVEL SERIALIZABLE",
            (IsolationLevel::RepeatableRead, true) => {
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
            }
            (IsolationLevel::RepeatableRead, false) => "BEGIN ISOLATION LEVEL REPEATABLE READ",
            _ => "BEGIN ISOLATION LEVEL READ COMMITTED",
        };
        let mut pooled = self.pool.get()?;
        let conn = pooled.conn();
        // Until COMMIT or ROLLBACK succeeds (a panic in `f` included), the connection is
        // closed rather than given back.
        conn.in_tx = true;
        let db = Db {
            conn: RefCell::new(conn),
            begin: Cell::new(Some(begin)),
        };
        let out = f(&db);
        let begin = db.begin.take();
        let conn = db.conn.into_inner();
        match out {
            Ok(out) => {
                // The BEGIN (if no statement was sent yet) and the writes held back go with
                // the COMMIT; with neither, no transaction was opened.
                conn.commit(begin)?;
                conn.in_tx = false;
                Ok(out)
            }
            Err(e) if begin.is_some() => {
                // No statement was sent: no transaction was opened.
                conn.discard_later();
                conn.in_tx = false;
                Err(e)
            }
            Err(e) => {
                // The error is what matters; a connection whose rollback failed is closed.
                if conn.rollback().is_ok() {
                    conn.in_tx = false;
                }
                Err(e)
            }
        }
    }
}

const JOB_COLUMNS: &str = "id, build_id, name, state, labels, steps, current_attempt, attempts, \
     lost_attempts, runner, message, started_at, finished_at, needs";
const BUILD_COLUMNS: &str = "id, repo, commit_id, branch, trigger_by, state, error, retry_of, \
     created_at, finished_at, pipeline, params";
const FINAL_STATES_SQL: &str = "('passed','failed','cancelled','timed_out','errored','skipped')";
/// Jobs ready to run: queued, and every job they need passed.
const READY_SQL: &str = "state = 'queued' AND NOT EXISTS \
     (SELECT 1 FROM jobs d WHERE d.id = ANY(jobs.needs) AND d.state <> 'passed')";

fn parse_state(s: &str) -> Result<JobState> {
    s.parse().map_err(|e| corrupt("job state", e))
}

fn parse_attempt_state(s: &str) -> Result<AttemptState> {
    s.parse().map_err(|e| corrupt("attempt state", e))
}

fn build_from_row(r: &Row) -> Result<Build> {
    let state: String = r.try_get(5)?;
    Ok(Build {
        id: r.try_get(0)?,
        repo: r.try_get(1)?,
        commit: r.try_get(2)?,
        branch: r.try_get(3)?,
        trigger: r.try_get(4)?,
        state: parse_state(&state)?,
        error: r.try_get(6)?,
        retry_of: r.try_get(7)?,
        created_at: r.try_get(8)?,
        finished_at: r.try_get(9)?,
        pipeline: r.try_get(10)?,
        params: serde_json::from_str(&r.try_get::<_, String>(11)?)
            .map_err(|e| corrupt("build params", e))?,
    })
}

fn job_from_row(r: &Row) -> Result<Job> {
    let state: String = r.try_get(3)?;
    let labels: String = r.try_get(4)?;
    let steps: String = r.try_get(5)?;
    Ok(Job {
        id: r.try_get(0)?,
        build_id: r.try_get(1)?,
        name: r.try_get(2)?,
        state: parse_state(&state)?,
        labels: serde_json::from_str(&labels).map_err(|e| corrupt("job labels", e))?,
        steps: serde_json::from_str::<Vec<StepSpec>>(&steps)
            .map_err(|e| corrupt("job steps", e))?,
        needs: r.try_get(13)?,
        current_attempt: r.try_get(6)?,
        attempts: get_u32(r, 7)?,
        lost_attempts: get_u32(r, 8)?,
        runner: r.try_get(9)?,
        message: r.try_get(10)?,
        started_at: r.try_get(11)?,
        finished_at: r.try_get(12)?,
    })
}

fn attempt_from_row(r: &Row) -> Result<Attempt> {
    let state: String = r.try_get(4)?;
    Ok(Attempt {
        id: r.try_get(0)?,
        job_id: r.try_get(1)?,
        build_id: r.try_get(2)?,
        runner_id: r.try_get(3)?,
        state: parse_attempt_state(&state)?,
    })
}

fn load_jobs_of(db: &Db<'_>, build: BuildId) -> Result<Vec<Job>> {
    db.query(
        &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE build_id = $1 ORDER BY position"),
        &[&build],
    )?
    .iter()
    .map(job_from_row)
    .collect()
}

fn load_build(db: &Db<'_>, id: BuildId) -> Result<Option<Build>> {
    db.query_opt(
        &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"),
        &[&id],
    )?
    .map(|r| build_from_row(&r))
    .transpose()
}

fn load_detail(db: &Db<'_>, id: BuildId) -> Result<Option<BuildDetail>> {
    let Some(build) = load_build(db, id)? else {
        return Ok(None);
    };
    let jobs = load_jobs_of(db, id)?;
    let mut steps = BTreeMap::new();
    let mut refusals = BTreeMap::new();
    let mut attempts = BTreeMap::new();
    for job in &jobs {
        let mut list = Vec::new();
        for r in db.query(
            "SELECT position, outcome, exit_code, duration_ms FROM step_results \
             WHERE job_id = $1 ORDER BY position",
            &[&job.id],
        )? {
            let outcome: String = r.try_get(1)?;
            list.push(StepResult {
                index: get_u32(&r, 0)?,
                outcome: outcome
                    .parse::<StepOutcome>()
                    .map_err(|e| corrupt("step outcome", e))?,
                exit_code: r.try_get(2)?,
                duration_ms: r.try_get::<_, i64>(3)?.max(0) as u64,
                cases: Vec::new(),
                report_note: String::new(),
            });
        }
        steps.insert(job.id, list);
        let list = db
            .query(
                "SELECT attempt_id, reason FROM refusals WHERE job_id = $1 ORDER BY id",
                &[&job.id],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect::<Result<Vec<(AttemptId, String)>>>()?;
        if !list.is_empty() {
            refusals.insert(job.id, list);
        }
        // The latest attempts of the job, numbered from the job's count (every attempt row
        // counted once when it was made).
        let mut list = Vec::new();
        for (k, r) in db
            .query(
                "SELECT a.id, COALESCE(r.name, ''), a.state, a.created_at, a.finished_at, \
                 a.note FROM attempts a LEFT JOIN runners r ON r.id = a.runner_id \
                 WHERE a.job_id = $1 ORDER BY a.id DESC LIMIT $2",
                &[&job.id, &(crate::MAX_LISTED_ATTEMPTS as i64)],
            )?
            .iter()
            .enumerate()
        {
            let state: String = r.try_get(2)?;
            list.push(AttemptInfo {
                id: r.try_get(0)?,
                number: job.attempts.saturating_sub(k as u32),
                runner: r.try_get(1)?,
                state: parse_attempt_state(&state)?,
                created_at: r.try_get(3)?,
                finished_at: r.try_get(4)?,
                note: r.try_get(5)?,
            });
        }
        if !list.is_empty() {
            list.reverse();
            attempts.insert(job.id, list);
        }
    }
    Ok(Some(BuildDetail {
        build,
        jobs,
        steps,
        refusals,
        attempts,
    }))
}

fn ready_by_labels(db: &Db<'_>) -> Result<Vec<(BTreeMap<String, String>, u64)>> {
    let mut by_labels: BTreeMap<BTreeMap<String, String>, u64> = BTreeMap::new();
    for r in db.query(
        &format!("SELECT labels, COUNT(*) FROM jobs WHERE {READY_SQL} GROUP BY labels"),
        &[],
    )? {
        let labels: String = r.try_get(0)?;
        let labels = serde_json::from_str(&labels).map_err(|e| corrupt("job labels", e))?;
        // The same set written with its keys in another order is one set.
        *by_labels.entry(labels).or_default() += get_u64(&r, 1)?;
    }
    Ok(by_labels.into_iter().collect())
}

/// Recomputes a build's summary state after one of its jobs changed; returns the change.
/// Locks the build's row (after the job's: the lock order every writer keeps).
///
/// Safe at `READ COMMITTED`: every writer that changes a job's state calls `settle` after the
/// change and before it commits, so it takes this build's row lock while its change is in
/// place; the jobs' states are read by a statement that starts after the lock is granted, so
/// it sees every change committed by the writers that held the lock before. The last writer
/// of a build to take the lock therefore computes the build's state from all its jobs' final
/// states (a writer that came earlier may compute from a state about to change; the next one
/// corrects it in the same row).
fn settle(db: &Db<'_>, job: JobId, now: Millis) -> Result<Change> {
    let r = db.query_one("SELECT build_id, state FROM jobs WHERE id = $1", &[&job])?;
    let build_id: BuildId = r.try_get(0)?;
    let job_state = parse_state(&r.try_get::<_, String>(1)?)?;
    settle_known(db, job, build_id, job_state, now)
}

/// The jobs of a build (id, state, the jobs each needs) and whether a split of the build is
/// still open, in one statement.
fn build_jobs(db: &Db<'_>, build: BuildId) -> Result<(Vec<BuildJob>, bool)> {
    build_jobs_of(&db.query(BUILD_JOBS_SQL, &[&build])?)
}

/// A job of a build as `settle` reads it: id, state, the jobs it needs.
type BuildJob = (JobId, JobState, Vec<JobId>);

/// One answer of [`Store::assign_many`].
type Assigned = Result<Option<(AttemptId, Change)>>;

/// [`build_jobs`]' statement (`$1` the build).
const BUILD_JOBS_SQL: &str = "SELECT id, state, needs, \
     EXISTS (SELECT 1 FROM splits s WHERE s.build_id = $1 AND NOT s.done) \
     FROM jobs WHERE build_id = $1";

/// [`build_jobs`]' rows read.
fn build_jobs_of(rows: &[Row]) -> Result<(Vec<BuildJob>, bool)> {
    let mut open_split = false;
    let mut jobs = Vec::with_capacity(rows.len());
    for r in rows {
        open_split = r.try_get(3)?;
        jobs.push((
            r.try_get(0)?,
            parse_state(&r.try_get::<_, String>(1)?)?,
            r.try_get(2)?,
        ));
    }
    Ok((jobs, open_split))
}

/// [`settle`] for a caller that knows the job's build and the state it just gave the job
/// (one statement fewer). The same locks in the same order: the build's row, then (rarely)
/// the rows of a split it closes and of the jobs it skips.
fn settle_known(
    db: &Db<'_>,
    job: JobId,
    build_id: BuildId,
    job_state: JobState,
    now: Millis,
) -> Result<Change> {
    // The build's lock and its jobs' states, sent together; the server runs the read after
    // the lock is granted (a statement of its own, so a snapshot taken after it).
    let (lock, rows) = db.query2(
        (
            "SELECT state FROM builds WHERE id = $1 FOR UPDATE",
            &[&build_id],
        ),
        (BUILD_JOBS_SQL, &[&build_id]),
    )?;
    settle_read(db, job, build_id, job_state, now, &lock, &rows)
}

/// The build's lock and state by an attempt of one of its jobs (`$1`): for a caller that
/// sends it with the statement that changed the job, before it knows the build.
const BUILD_LOCK_BY_ATTEMPT_SQL: &str = "SELECT state FROM builds WHERE id = \
     (SELECT j.build_id FROM attempts a JOIN jobs j ON j.id = a.job_id WHERE a.id = $1) \
     FOR UPDATE";

/// [`BUILD_JOBS_SQL`] by an attempt of one of the build's jobs (`$1`).
const BUILD_JOBS_BY_ATTEMPT_SQL: &str = "WITH b AS (SELECT j.build_id AS id FROM attempts a \
     JOIN jobs j ON j.id = a.job_id WHERE a.id = $1) \
     SELECT id, state, needs, \
     EXISTS (SELECT 1 FROM splits s WHERE s.build_id = (SELECT id FROM b) AND NOT s.done) \
     FROM jobs WHERE build_id = (SELECT id FROM b)";

/// [`settle_known`] once the build's lock was taken (`lock`: its row) and its jobs were read
/// after that (`rows`: [`BUILD_JOBS_SQL`]'s).
fn settle_read(
    db: &Db<'_>,
    job: JobId,
    build_id: BuildId,
    job_state: JobState,
    now: Millis,
    lock: &[Row],
    rows: &[Row],
) -> Result<Change> {
    let old: String = lock
        .first()
        .ok_or_else(|| StoreError::Corrupt(format!("build {build_id} of job {job} is missing")))?
        .try_get(0)?;
    let (mut jobs, open_split) = build_jobs_of(rows)?;
    let mut reread = false;
    if job_state.is_final() && open_split {
        split::close_abandoned_splits(db, build_id, now)?;
        reread = true;
    }
    // Jobs waiting on a job that did not pass will never run: skip them, transitively. (Only
    // looked for when a queued job of the build needs another job at all.)
    let mut skipped = Vec::new();
    if job_state.is_final()
        && job_state != JobState::Passed
        && jobs
            .iter()
            .any(|(_, s, needs)| *s == JobState::Queued && !needs.is_empty())
    {
        let mut frontier = vec![(job, job_state)];
        while let Some((failed, how)) = frontier.pop() {
            let ids = db
                .query(
                    "SELECT id FROM jobs WHERE build_id = $1 AND state = 'queued' \
                     AND $2 = ANY(needs) ORDER BY id",
                    &[&build_id, &failed],
                )?
                .iter()
                .map(|r| Ok(r.try_get(0)?))
                .collect::<Result<Vec<JobId>>>()?;
            for id in ids {
                // Conditional: at READ COMMITTED the job may have been ended (cancelled) since
                // the statement above read it; then it is not skipped over that.
                let n = db.execute(
                    "UPDATE jobs SET state = 'skipped', message = $1, finished_at = $2 \
                     WHERE id = $3 AND state = 'queued'",
                    &[
                        &format!("skipped: job {failed} it needs ended {how}"),
                        &now,
                        &id,
                    ],
                )?;
                if n == 0 {
                    continue;
                }
                skipped.push(id);
                frontier.push((id, JobState::Skipped));
            }
        }
        reread = true;
    }
    if reread {
        jobs = build_jobs(db, build_id)?.0;
    }
    let new_state = build_state(jobs.iter().map(|(_, s, _)| *s));
    let build_changed = parse_state(&old)? != new_state;
    if build_changed {
        // Most often the transaction's last statement: it goes with the COMMIT.
        let finished = new_state.is_final().then_some(now);
        db.execute_later(
            "UPDATE builds SET state = $1, finished_at = $2 WHERE id = $3",
            vec![
                Box::new(new_state.as_str()),
                Box::new(finished),
                Box::new(build_id),
            ],
        )?;
    }
    Ok(Change {
        build_id,
        job_id: job,
        job_state,
        build_state: new_state,
        build_changed,
        skipped,
    })
}

/// One chunk of [`Store::assign_many`] in one transaction, answered in order (the
/// transaction's own failure, or a conflict, fails them all and nothing commits).
///
/// The locks every writer takes, in the same order: every job's row of the chunk first (one
/// statement, in id order, so two dispatchers' chunks queue rather than deadlock), then the
/// builds' rows of the queued ones (id order), then the states of those builds' jobs are read
/// once: no other writer can commit a change of a job of these builds before this
/// transaction, since each settles the build (its row lock) before it commits. Then each
/// assignment is one statement (the attempt's insert and the job's update) in its own
/// savepoint, sent together with the savepoint: one that fails is rolled back to it and
/// answered with its error, undoing nothing of the others. Each assignment's `Change` is
/// computed from the states read and the assignments before it, as `settle` would read them,
/// and the builds whose state changed are written once at the end.
fn assign_batch(db: &Db<'_>, batch: &[crate::AssignRequest], now: Millis) -> Result<Vec<Assigned>> {
    let ids: Vec<JobId> = batch.iter().map(|a| a.job).collect();
    let mut queued: HashMap<JobId, BuildId> = HashMap::new();
    for r in db.query(
        "SELECT id, build_id, state FROM jobs WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )? {
        if r.try_get::<_, String>(2)? == "queued" {
            queued.insert(r.try_get(0)?, r.try_get(1)?);
        }
    }
    if queued.is_empty() {
        return Ok(batch.iter().map(|_| Ok(None)).collect());
    }
    let mut builds: Vec<BuildId> = queued.values().copied().collect();
    builds.sort();
    builds.dedup();
    let mut stored: HashMap<BuildId, JobState> = HashMap::new();
    for r in db.query(
        "SELECT id, state FROM builds WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&builds],
    )? {
        stored.insert(r.try_get(0)?, parse_state(&r.try_get::<_, String>(1)?)?);
    }
    // Read after the builds' locks (a statement of its own).
    let mut states: HashMap<BuildId, HashMap<JobId, JobState>> = HashMap::new();
    for r in db.query(
        "SELECT build_id, id, state FROM jobs WHERE build_id = ANY($1)",
        &[&builds],
    )? {
        states
            .entry(r.try_get(0)?)
            .or_default()
            .insert(r.try_get(1)?, parse_state(&r.try_get::<_, String>(2)?)?);
    }
    let mut current = stored.clone();
    let mut out: Vec<Option<Assigned>> = batch.iter().map(|_| None).collect();
    let owners: Vec<(Option<DispatcherId>, Option<&str>)> = batch
        .iter()
        .map(|a| {
            (
                a.owner.as_ref().map(|o| o.dispatcher),
                a.owner.as_ref().map(|o| o.secret_hash.as_str()),
            )
        })
        .collect();
    // The first savepoint, then each run releases the one before it (kept by a rollback to
    // it) and opens its own.
    let mut opened = false;
    let mut pending: Vec<usize> = (0..batch.len()).collect();
    while !pending.is_empty() {
        // One wave: the pending assignments of queued jobs, each job once (a job given twice
        // waits for the next wave, where it is no longer queued).
        let mut wave = Vec::new();
        let mut later = Vec::new();
        let mut in_wave = std::collections::HashSet::new();
        for i in pending {
            let job = batch[i].job;
            if !queued.contains_key(&job) {
                out[i] = Some(Ok(None));
            } else if in_wave.insert(job) {
                wave.push(i);
            } else {
                later.push(i);
            }
        }
        if wave.is_empty() {
            break;
        }
        let params: Vec<[&(dyn ToSql + Sync); 6]> = wave
            .iter()
            .map(|&i| {
                let a = &batch[i];
                let (by, hash) = &owners[i];
                [
                    &a.job as &(dyn ToSql + Sync),
                    &a.runner,
                    &now,
                    by,
                    hash,
                    &a.runner_name,
                ]
            })
            .collect();
        let runs: Vec<(&str, Params<'_>)> = params
            .iter()
            .map(|p| {
                let prefix = if opened {
                    "RELEASE SAVEPOINT assign; SAVEPOINT assign"
                } else {
                    opened = true;
                    "SAVEPOINT assign"
                };
                (prefix, &p[..])
            })
            .collect();
        // All of the wave's assignments sent at once: one round trip. A failed one aborts
        // the transaction, and those after it fail unrun; it is rolled back to its own
        // savepoint and the ones after it go in the next wave.
        let answers = db.pipeline(
            "WITH a AS (INSERT INTO attempts (job_id, runner_id, state, created_at, owner, \
             secret_hash) VALUES ($1, $2, 'offered', $3, $4, $5) RETURNING id) \
             UPDATE jobs SET state = 'assigned', current_attempt = a.id, \
             attempts = attempts + 1, runner = $6 FROM a WHERE jobs.id = $1 RETURNING a.id",
            &runs,
        )?;
        let mut retry = Vec::new();
        let mut failed = false;
        for (&i, answer) in wave.iter().zip(answers) {
            if failed {
                retry.push(i);
                continue;
            }
            let a = &batch[i];
            let made = answer.and_then(|rows| match rows.first() {
                Some(r) => Ok(r.try_get::<_, AttemptId>(0)?),
                None => Err(StoreError::Corrupt(format!(
                    "job {} vanished while locked",
                    a.job
                ))),
            });
            let attempt = match made {
                Ok(attempt) => attempt,
                // Another writer won a lock cycle: the whole chunk runs again.
                Err(e) if e.is_conflict() => return Err(e),
                Err(e) => {
                    db.batch("ROLLBACK TO SAVEPOINT assign")?;
                    out[i] = Some(Err(e));
                    failed = true;
                    continue;
                }
            };
            let Some(build_id) = queued.remove(&a.job) else {
                return Err(StoreError::Corrupt(format!(
                    "job {} assigned twice in one chunk",
                    a.job
                )));
            };
            let jobs = states.entry(build_id).or_default();
            jobs.insert(a.job, JobState::Assigned);
            let state = build_state(jobs.values().copied());
            let before = current.insert(build_id, state);
            out[i] = Some(Ok(Some((
                attempt,
                Change {
                    build_id,
                    job_id: a.job,
                    job_state: JobState::Assigned,
                    build_state: state,
                    build_changed: before != Some(state),
                    skipped: Vec::new(),
                },
            ))));
        }
        retry.extend(later);
        retry.sort_unstable();
        pending = retry;
    }
    // The builds whose state changed, in one statement (an assignment never ends a build).
    // The transaction's last statement: it goes with the COMMIT.
    let (changed, to): (Vec<BuildId>, Vec<&'static str>) = builds
        .iter()
        .filter_map(|b| {
            let now_state = current.get(b)?;
            (stored.get(b) != Some(now_state)).then_some((*b, now_state.as_str()))
        })
        .unzip();
    if !changed.is_empty() {
        db.execute_later(
            "UPDATE builds SET state = u.state, finished_at = NULL \
             FROM unnest($1::BIGINT[], $2::TEXT[]) AS u(id, state) WHERE builds.id = u.id",
            vec![Box::new(changed), Box::new(to)],
        )?;
    }
    Ok(out.into_iter().map(|o| o.unwrap_or(Ok(None))).collect())
}

/// Inserts a build and its jobs; a duplicate of (repo, commit, pipeline) is an error naming
/// the existing build. (Two transactions inserting the same one at once: the unique index
/// `builds_once` fails the later, which runs again and finds the build.)
fn insert_build(db: &Db<'_>, new: &NewBuild, now: Millis) -> Result<BuildDetail> {
    if !new.pipeline_hash.is_empty() && new.retry_of.is_none() {
        let existing = db.query_opt(
            // `builds_once`'s own condition spelled out, so the planner can take that
            // partial index (a parameter does not prove `pipeline_hash <> ''`).
            "SELECT id FROM builds WHERE repo = $1 AND commit_id = $2 AND pipeline_hash = $3 \
             AND retry_of IS NULL AND pipeline_hash <> ''",
            &[&new.repo, &new.commit, &new.pipeline_hash],
        )?;
        if let Some(r) = existing {
            return Err(StoreError::Duplicate {
                build: r.try_get(0)?,
            });
        }
    }
    let (state, finished) = if new.error.is_some() || new.jobs.is_empty() {
        (JobState::Errored, Some(now))
    } else {
        (JobState::Queued, None)
    };
    let build_params =
        serde_json::to_string(&new.params).map_err(|e| corrupt("build params", e))?;
    let build_id: BuildId = db
        .query_one(
            "INSERT INTO builds (repo, commit_id, branch, trigger_by, state, error, retry_of, \
             created_at, finished_at, pipeline_hash, pipeline, params) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) RETURNING id",
            &[
                &new.repo,
                &new.commit,
                &new.branch,
                &new.trigger,
                &state.as_str(),
                &new.error,
                &new.retry_of,
                &now,
                &finished,
                &new.pipeline_hash,
                &new.pipeline,
                &build_params,
            ],
        )?
        .try_get(0)?;
    if new.error.is_none() {
        let mut ids: Vec<JobId> = Vec::with_capacity(new.jobs.len());
        for (pos, job) in new.jobs.iter().enumerate() {
            let labels =
                serde_json::to_string(&job.labels).map_err(|e| corrupt("job labels", e))?;
            let steps = serde_json::to_string(&job.steps).map_err(|e| corrupt("job steps", e))?;
            let needs: Vec<JobId> = job
                .needs
                .iter()
                .map(|i| {
                    ids.get(*i).copied().ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "job {pos} needs job {i}, which does not come before it"
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let id: JobId = db
                .query_one(
                    "INSERT INTO jobs (build_id, position, name, state, labels, steps, needs) \
                     VALUES ($1, $2, $3, 'queued', $4, $5, $6) RETURNING id",
                    &[&build_id, &(pos as i64), &job.name, &labels, &steps, &needs],
                )?
                .try_get(0)?;
            ids.push(id);
        }
    }
    load_detail(db, build_id)?
        .ok_or_else(|| StoreError::Corrupt("build vanished inside its transaction".into()))
}

impl Store for PgStore {
    fn create_build(&self, new: &NewBuild) -> Result<BuildDetail> {
        let now = now_millis();
        // READ COMMITTED: it reads only the dedupe check and its own rows, and `builds_once`
        // (unique) decides between two racing submits of one commit (23505, run again: the
        // check then finds the winner). Serializable, concurrent submits failed one another on
        // shared index pages, past the retries (`kiln-bench scale --sessions --postgres`).
        self.write_committed(|db| insert_build(db, new, now))
    }

    fn record_commits(
        &self,
        repo: &str,
        branch: &str,
        builds: &[NewBuild],
        head: &str,
        supersede: bool,
    ) -> Result<Recorded> {
        let now = now_millis();
        // READ COMMITTED: two observers of one branch queue on a transaction-scoped advisory
        // lock of the (repository, branch) pair, taken first (a row lock of the cursor would
        // not do: the branch's first push has no cursor row yet). Dedupe is `builds_once`'s,
        // as in `create_build` (23505, run again, then the check finds the winner). The
        // supersede scan runs after the lock, so it sees every build of the branch an earlier
        // observer recorded, and it locks each job it cancels (`FOR UPDATE OF j`: a session
        // writer of that job finishes first, and the scan's row is re-checked against the
        // committed state: a job that ended meanwhile is no longer in it).
        self.write_committed(|db| {
            db.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2::TEXT || chr(10) || $3::TEXT))",
                &[&BRANCH_LOCK_CLASS, &repo, &branch],
            )?;
            let mut out = Recorded::default();
            for b in builds {
                match insert_build(db, b, now) {
                    Ok(d) => out.created.push(d),
                    Err(StoreError::Duplicate { build }) => out.duplicates.push(build),
                    Err(e) => return Err(e),
                }
            }
            if supersede && let Some(newest) = out.created.last().map(|d| d.build.id) {
                let rows = db.query(
                    // From the unfinished jobs (`jobs_by_state`) to their builds (by primary
                    // key): the branch's history grows without bound, its unfinished jobs do
                    // not. On a young table's statistics the planner may still walk both
                    // (measured: 3.8 s at 10,000 builds before autovacuum's first ANALYZE,
                    // and this EXISTS form alone did not prevent it); `PgStore::analyze`.
                    "SELECT j.id, j.current_attempt FROM jobs j \
                     WHERE j.state IN ('queued', 'assigned', 'running') AND EXISTS \
                     (SELECT 1 FROM builds b WHERE b.id = j.build_id \
                      AND b.repo = $1 AND b.branch = $2 AND b.id < $3) \
                     ORDER BY j.id FOR UPDATE OF j",
                    &[&repo, &branch, &newest],
                )?;
                for r in rows {
                    let job: JobId = r.try_get(0)?;
                    let attempt: Option<AttemptId> = r.try_get(1)?;
                    db.execute(
                        "UPDATE jobs SET state = 'cancelled', message = $1, finished_at = $2 \
                         WHERE id = $3",
                        &[&format!("superseded by build {newest}"), &now, &job],
                    )?;
                    if let Some(a) = attempt {
                        db.execute(
                            "UPDATE attempts SET state = 'superseded', finished_at = $1 \
                             WHERE id = $2 AND state IN ('offered', 'running')",
                            &[&now, &a],
                        )?;
                        out.to_cancel.push(a);
                    }
                    out.superseded.push(settle(db, job, now)?);
                }
            }
            db.execute(
                "INSERT INTO branch_cursors (repo, branch, head, updated_at) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (repo, branch) DO UPDATE SET \
                 head = excluded.head, updated_at = excluded.updated_at",
                &[&repo, &branch, &head, &now],
            )?;
            Ok(out)
        })
    }

    fn branch_cursor(&self, repo: &str, branch: &str) -> Result<Option<String>> {
        self.read(|db| {
            db.query_opt(
                "SELECT head FROM branch_cursors WHERE repo = $1 AND branch = $2",
                &[&repo, &branch],
            )?
            .map(|r| Ok(r.try_get(0)?))
            .transpose()
        })
    }

    fn get_build(&self, id: BuildId) -> Result<Option<BuildDetail>> {
        self.read(|db| load_detail(db, id))
    }

    fn get_build_record(&self, id: BuildId) -> Result<Option<Build>> {
        // One statement: its own snapshot, no transaction around it (one round trip).
        self.statement(
            &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = $1"),
            &[&id],
        )?
        .first()
        .map(build_from_row)
        .transpose()
    }

    fn get_build_records(&self, ids: &[BuildId]) -> Result<Vec<Build>> {
        // One statement, as `get_build_record`.
        self.statement(
            &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ANY($1)"),
            &[&ids],
        )?
        .iter()
        .map(build_from_row)
        .collect()
    }

    fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        // One statement: its own snapshot, no transaction around it (one round trip).
        self.statement(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"),
            &[&id],
        )?
        .first()
        .map(job_from_row)
        .transpose()
    }

    fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        let state = filter.state.map(|s| s.as_str().to_string());
        let limit = i64::from(filter.limit);
        self.read(|db| {
            let mut sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE TRUE");
            let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some(repo) = &filter.repo {
                args.push(repo);
                sql.push_str(&format!(" AND repo = ${}", args.len()));
            }
            if let Some(branch) = &filter.branch {
                args.push(branch);
                sql.push_str(&format!(" AND branch = ${}", args.len()));
            }
            if let Some(state) = &state {
                args.push(state);
                sql.push_str(&format!(" AND state = ${}", args.len()));
            }
            if let Some(before) = &filter.before {
                args.push(before);
                sql.push_str(&format!(" AND id < ${}", args.len()));
            }
            args.push(&limit);
            sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", args.len()));
            db.query(&sql, &args)?.iter().map(build_from_row).collect()
        })
    }

    fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        // One statement: its own snapshot, no transaction around it (one round trip).
        self.statement(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {READY_SQL} ORDER BY id LIMIT $1"),
            &[&i64::from(limit)],
        )?
        .iter()
        .map(job_from_row)
        .collect()
    }

    fn metrics(&self) -> Result<StoreMetrics> {
        self.read(|db| {
            let mut m = StoreMetrics {
                queued_by_labels: ready_by_labels(db)?,
                ..StoreMetrics::default()
            };
            let rows = db
                .query(crate::tallies::READ, &[])?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
                .collect::<Result<Vec<_>>>()?;
            crate::tallies::into_metrics(rows, &mut m)?;
            Ok(m)
        })
    }

    fn fold_tallies(&self) -> Result<u64> {
        // Most scrapes find nothing to fold: no write transaction for them.
        let any: bool = self.read(|db| {
            Ok(db
                .query_one("SELECT EXISTS (SELECT 1 FROM tally_deltas)", &[])?
                .try_get(0)?)
        })?;
        if !any {
            return Ok(0);
        }
        // READ COMMITTED: one statement, one snapshot: it deletes the deltas that snapshot sees
        // (a change committed meanwhile stays for the next fold). Two folds at once: the later
        // waits on each row the earlier deletes, then skips it as deleted, so each delta is
        // moved once; the `ON CONFLICT DO UPDATE` adds to a tally under that row's lock.
        self.write_committed(|db| {
            get_u64(
                &db.query_one(
                    "WITH moved AS (DELETE FROM tally_deltas RETURNING metric, k1, k2, d), \
                     folded AS (INSERT INTO tallies (metric, k1, k2, n) \
                     SELECT metric, k1, k2, SUM(d)::BIGINT FROM moved GROUP BY metric, k1, k2 \
                     ON CONFLICT (metric, k1, k2) DO UPDATE SET n = tallies.n + EXCLUDED.n) \
                     SELECT COUNT(*) FROM moved",
                    &[],
                )?,
                0,
            )
        })
    }

    fn ready_by_labels(&self) -> Result<Vec<(BTreeMap<String, String>, u64)>> {
        self.read(ready_by_labels)
    }

    fn assign_owned(
        &self,
        job: JobId,
        runner: RunnerId,
        runner_name: &str,
        owner: Option<&crate::Owner>,
    ) -> Result<Option<(AttemptId, Change)>> {
        let now = now_millis();
        let (by, hash) = (
            owner.map(|o| o.dispatcher),
            owner.map(|o| o.secret_hash.as_str()),
        );
        // READ COMMITTED: the job's row lock decides. `FOR UPDATE` waits for any writer of the
        // job and then returns the row as that writer committed it, so of two dispatchers
        // assigning one queued job the second sees `assigned` and gives up; then `settle`
        // (the build's lock, after the job's).
        self.write_committed(|db| {
            // The job's row lock: one assignment of a queued job wins.
            let state: Option<String> = db
                .query_opt("SELECT state FROM jobs WHERE id = $1 FOR UPDATE", &[&job])?
                .map(|r| r.try_get(0))
                .transpose()?;
            if state.as_deref() != Some("queued") {
                return Ok(None);
            }
            let attempt: AttemptId = db
                .query_one(
                    "INSERT INTO attempts (job_id, runner_id, state, created_at, owner, \
                     secret_hash) VALUES ($1, $2, 'offered', $3, $4, $5) RETURNING id",
                    &[&job, &runner, &now, &by, &hash],
                )?
                .try_get(0)?;
            db.execute(
                "UPDATE jobs SET state = 'assigned', current_attempt = $1, \
                 attempts = attempts + 1, runner = $2 WHERE id = $3",
                &[&attempt, &runner_name, &job],
            )?;
            Ok(Some((attempt, settle(db, job, now)?)))
        })
    }

    fn assign_many(
        &self,
        batch: &[crate::AssignRequest],
    ) -> Vec<Result<Option<(AttemptId, Change)>>> {
        if batch.len() < 2 {
            return batch
                .iter()
                .map(|a| self.assign_owned(a.job, a.runner, &a.runner_name, a.owner.as_ref()))
                .collect();
        }
        let now = now_millis();
        // READ COMMITTED, one transaction for the chunk: see `assign_batch`.
        match self.write_committed(|db| assign_batch(db, batch, now)) {
            Ok(out) => out,
            Err(e) => {
                // Nothing of the batch committed: every assignment failed.
                let why = chain(&e);
                let mut out = vec![Err(e)];
                out.extend((1..batch.len()).map(|_| {
                    Err(StoreError::Pool(format!(
                        "the transaction of this assignment's batch did not commit: {why}"
                    )))
                }));
                out
            }
        }
    }

    fn start_attempt(&self, attempt: AttemptId) -> Result<Option<Change>> {
        let now = now_millis();
        // READ COMMITTED: the compare-and-set is one UPDATE; it takes the job's row lock and
        // re-checks `current_attempt` and `state` on the committed row after any wait.
        self.write_committed(|db| {
            // One statement: the compare-and-set takes the job's row lock itself, and the
            // attempt is marked running only when it succeeded. Sent with `settle`'s build
            // lock and read (by the attempt: the build is not known yet), in that order: one
            // round trip. When the compare-and-set changed nothing, the build's lock was
            // taken for nothing, and nothing else is.
            let params: [&(dyn ToSql + Sync); 1] = [&attempt];
            let mut all = db
                .query_all(&[
                    (
                        "WITH j AS (UPDATE jobs SET state = 'running', started_at = $1 \
                         WHERE current_attempt = $2 AND state = 'assigned' \
                         RETURNING id, build_id), \
                         a AS (UPDATE attempts SET state = 'running' \
                         WHERE id = $2 AND EXISTS (SELECT 1 FROM j)) \
                         SELECT id, build_id FROM j",
                        &[&now, &attempt],
                    ),
                    (BUILD_LOCK_BY_ATTEMPT_SQL, &params),
                    (BUILD_JOBS_BY_ATTEMPT_SQL, &params),
                ])?
                .into_iter();
            let (Some(won), Some(lock), Some(rows)) = (all.next(), all.next(), all.next()) else {
                unreachable!("three statements answered");
            };
            let Some(row) = won.first() else {
                return Ok(None);
            };
            Ok(Some(settle_read(
                db,
                row.try_get(0)?,
                row.try_get(1)?,
                JobState::Running,
                now,
                &lock,
                &rows,
            )?))
        })
    }

    fn record_step(&self, attempt: AttemptId, step: &StepResult) -> Result<bool> {
        // READ COMMITTED: the job's row lock (re-checked: this attempt current, the job out on
        // a runner) is held until commit, so the job cannot be finished, lost or ended in
        // between (those lock it too); the result rows are upserts keyed by (job, step). The
        // lock and the upsert are one statement; a step without test cases or a report note
        // (most) is that statement alone, in its own transaction: one round trip.
        const SQL: &str = "WITH j AS (SELECT id, steps FROM jobs WHERE current_attempt = $1 \
             AND state IN ('assigned', 'running') FOR UPDATE), \
             r AS (INSERT INTO step_results (job_id, position, attempt_id, outcome, exit_code, \
             duration_ms) SELECT id, $2::BIGINT, $1::BIGINT, $3::TEXT, $4::INTEGER, $5::BIGINT \
             FROM j ON CONFLICT (job_id, position) DO UPDATE SET \
             attempt_id = excluded.attempt_id, outcome = excluded.outcome, \
             exit_code = excluded.exit_code, duration_ms = excluded.duration_ms) \
             SELECT steps FROM j";
        let position = i64::from(step.index);
        let duration = big(step.duration_ms);
        let params: [&(dyn ToSql + Sync); 5] = [
            &attempt,
            &position,
            &step.outcome.as_str(),
            &step.exit_code,
            &duration,
        ];
        if step.cases.is_empty() && step.report_note.is_empty() {
            return Ok(!self.autocommit(SQL, &params)?.is_empty());
        }
        self.write_committed(|db| {
            let Some(row) = db.query_opt(SQL, &params)? else {
                return Ok(false);
            };
            let steps: String = row.try_get(0)?;
            let steps: Vec<StepSpec> =
                serde_json::from_str(&steps).map_err(|e| corrupt("job steps", e))?;
            let name = steps
                .iter()
                .find(|s| s.index == step.index)
                .map(|s| s.name.clone())
                .unwrap_or_else(|| format!("step {}", step.index));
            let cases = serde_json::to_string(&step.cases).map_err(|e| corrupt("test cases", e))?;
            db.execute(
                "INSERT INTO step_tests (attempt_id, position, step_name, cases, note) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                &[&attempt, &position, &name, &cases, &step.report_note],
            )?;
            Ok(true)
        })
    }

    fn finish_attempt(
        &self,
        attempt: AttemptId,
        state: JobState,
        message: Option<&str>,
    ) -> Result<Finish> {
        let now = now_millis();
        // READ COMMITTED: the conditional UPDATE (`current_attempt = this attempt AND state
        // out on a runner`) is the compare-and-set: it takes the job's row lock and re-checks
        // the condition on the committed row after any wait, so of a finish, a requeue and an
        // end of one job, whichever takes the lock first wins and the others see its
        // committed row. Then the split rows' locks (`release_units`) and the build's
        // (`settle`), in that order after the job's, sent with the compare-and-set (one round
        // trip). When it changed nothing (a result refused, or sent again), those locks were
        // taken for nothing and the transaction ends; a second one reads the job's row under
        // its lock to say why, or that this result was recorded already (a compare-and-set
        // that failed once fails for ever: an attempt never becomes current again).
        let params: [&(dyn ToSql + Sync); 1] = [&attempt];
        let recorded = self.write_committed(|db| {
            // The compare-and-set: only the current attempt of a job that is out on a runner
            // may finish it (a lost attempt stays `current_attempt` of its queued job until
            // the job is given out again, and must not finish it). The attempt is marked
            // finished in the same statement, only when it succeeded.
            let mut all = db
                .query_all(&[
                    (
                        "WITH j AS (UPDATE jobs SET state = $1, message = $2, finished_at = $3 \
                         WHERE current_attempt = $4 AND state IN ('assigned', 'running') \
                         RETURNING id, build_id), \
                         a AS (UPDATE attempts SET state = 'finished', finished_at = $3 \
                         WHERE id = $4 AND EXISTS (SELECT 1 FROM j)) \
                         SELECT id, build_id FROM j",
                        &[&state.as_str(), &message, &now, &attempt],
                    ),
                    (split::SPLITS_OF_SQL, &params),
                    (BUILD_LOCK_BY_ATTEMPT_SQL, &params),
                    (BUILD_JOBS_BY_ATTEMPT_SQL, &params),
                ])?
                .into_iter();
            let (Some(won), Some(splits), Some(lock), Some(rows)) =
                (all.next(), all.next(), all.next(), all.next())
            else {
                unreachable!("four statements answered");
            };
            let Some(won) = won.first() else {
                return Ok(None);
            };
            let job: JobId = won.try_get(0)?;
            let build: BuildId = won.try_get(1)?;
            if !splits.is_empty() {
                split::release_locked_units(db, attempt)?;
            }
            Ok(Some(settle_read(db, job, build, state, now, &lock, &rows)?))
        })?;
        if let Some(change) = recorded {
            return Ok(Finish::Recorded(change));
        }
        self.write_committed(|db| {
            let row = db.query_opt(
                "SELECT j.id, j.current_attempt, j.state, a.state FROM attempts a \
                 JOIN jobs j ON j.id = a.job_id WHERE a.id = $1 FOR UPDATE OF j",
                &[&attempt],
            )?;
            let Some(row) = row else {
                return Ok(Finish::Refused(format!("unknown attempt {attempt}")));
            };
            let job: JobId = row.try_get(0)?;
            let current: Option<AttemptId> = row.try_get(1)?;
            let job_state = parse_state(&row.try_get::<_, String>(2)?)?;
            if current == Some(attempt)
                && job_state.is_final()
                && parse_attempt_state(&row.try_get::<_, String>(3)?)? == AttemptState::Finished
            {
                return Ok(Finish::AlreadyRecorded);
            }
            let reason = crate::refusal_reason(attempt, job, current, job_state);
            db.execute(
                "INSERT INTO refusals (attempt_id, job_id, reason, at) VALUES ($1, $2, $3, $4)",
                &[&attempt, &job, &reason, &now],
            )?;
            Ok(Finish::Refused(reason))
        })
    }

    fn requeue_owned(
        &self,
        attempt: AttemptId,
        reason: &str,
        max_lost: u32,
        counts: bool,
        owner: Option<DispatcherId>,
    ) -> Result<Option<Change>> {
        let now = now_millis();
        // READ COMMITTED: the job's row lock, re-checked after any wait (this attempt still
        // current, the job not ended), then the attempt's (the owner fence), then splits and
        // build; a finish of the same attempt queues on the job's lock and then refuses.
        self.write_committed(|db| {
            let row = db.query_opt(
                &format!(
                    "SELECT id, lost_attempts FROM jobs WHERE current_attempt = $1 \
                     AND state NOT IN {FINAL_STATES_SQL} FOR UPDATE"
                ),
                &[&attempt],
            )?;
            let Some(row) = row else {
                return Ok(None);
            };
            if let Some(me) = owner {
                // The fence: the attempt's row lock (after the job's), then its owner.
                let stored: Option<DispatcherId> = db
                    .query_one(
                        "SELECT owner FROM attempts WHERE id = $1 FOR UPDATE",
                        &[&attempt],
                    )?
                    .try_get(0)?;
                if stored != Some(me) {
                    return Ok(None);
                }
            }
            let job: JobId = row.try_get(0)?;
            let lost = get_u32(&row, 1)?;
            db.execute(
                "UPDATE attempts SET state = 'lost', finished_at = $1, note = $2 WHERE id = $3",
                &[&now, &reason, &attempt],
            )?;
            split::release_units(db, attempt)?;
            if counts && lost + 1 >= max_lost {
                db.execute(
                    "UPDATE jobs SET state = 'errored', lost_attempts = lost_attempts + 1, \
                     message = $1, finished_at = $2 WHERE id = $3",
                    &[
                        &format!("gave up after {} lost attempts; last: {reason}", lost + 1),
                        &now,
                        &job,
                    ],
                )?;
            } else {
                db.execute(
                    "UPDATE jobs SET state = 'queued', lost_attempts = lost_attempts + $2, \
                     runner = NULL, started_at = NULL WHERE id = $1",
                    &[&job, &i64::from(counts)],
                )?;
                db.execute("DELETE FROM step_results WHERE job_id = $1", &[&job])?;
            }
            Ok(Some(settle(db, job, now)?))
        })
    }

    fn end_job(&self, job: JobId, state: JobState, message: &str) -> Result<Option<Change>> {
        let now = now_millis();
        // READ COMMITTED: the job's row lock, re-checked after any wait (not ended yet); its
        // current attempt is read under that lock, so a finish or requeue cannot slip between.
        self.write_committed(|db| {
            let row = db.query_opt(
                &format!(
                    "SELECT current_attempt FROM jobs WHERE id = $1 \
                     AND state NOT IN {FINAL_STATES_SQL} FOR UPDATE"
                ),
                &[&job],
            )?;
            let Some(row) = row else {
                return Ok(None);
            };
            let current: Option<AttemptId> = row.try_get(0)?;
            db.execute(
                "UPDATE jobs SET state = $1, message = $2, finished_at = $3 WHERE id = $4",
                &[&state.as_str(), &message, &now, &job],
            )?;
            if let Some(a) = current {
                db.execute(
                    "UPDATE attempts SET state = 'superseded', finished_at = $1, note = $2 \
                     WHERE id = $3 AND state IN ('offered', 'running')",
                    &[&now, &message, &a],
                )?;
                split::release_units(db, a)?;
            }
            Ok(Some(settle(db, job, now)?))
        })
    }

    fn get_attempt(&self, attempt: AttemptId) -> Result<Option<Attempt>> {
        // One statement: its own snapshot, no transaction around it (one round trip).
        self.statement(
            "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM attempts a \
             JOIN jobs j ON j.id = a.job_id WHERE a.id = $1",
            &[&attempt],
        )?
        .first()
        .map(attempt_from_row)
        .transpose()
    }

    fn unfinished_attempts(&self) -> Result<Vec<Attempt>> {
        self.read(|db| {
            db.query(
                "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM jobs j \
                 JOIN attempts a ON a.id = j.current_attempt \
                 WHERE j.state IN ('assigned', 'running') ORDER BY a.id",
                &[],
            )?
            .iter()
            .map(attempt_from_row)
            .collect()
        })
    }

    fn register_dispatcher(&self, name: &str, now: Millis) -> Result<DispatcherId> {
        // READ COMMITTED: one insert of a new row.
        self.write_committed(|db| {
            Ok(db
                .query_one(
                    "INSERT INTO dispatchers (name, started_at, seen_at) VALUES ($1, $2, $2) \
                     RETURNING id",
                    &[&name, &now],
                )?
                .try_get(0)?)
        })
    }

    fn dispatcher_seen(&self, id: DispatcherId, now: Millis) -> Result<bool> {
        // One statement in its own transaction: a heartbeat of its own row.
        Ok(self
            .autocommit(
                "UPDATE dispatchers SET seen_at = GREATEST(seen_at, $1) WHERE id = $2 \
                 RETURNING id",
                &[&now, &id],
            )?
            .len()
            == 1)
    }

    fn dispatchers(&self) -> Result<Vec<crate::DispatcherRecord>> {
        self.read(|db| {
            db.query(
                "SELECT id, name, started_at, seen_at FROM dispatchers ORDER BY id",
                &[],
            )?
            .iter()
            .map(|r| {
                Ok(crate::DispatcherRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    started_at: r.try_get(2)?,
                    seen_at: r.try_get(3)?,
                })
            })
            .collect()
        })
    }

    fn adopt_attempts(&self, me: DispatcherId, dead_before: Millis) -> Result<Vec<Attempt>> {
        // Every dispatcher asks every second: a read-only look first (no serializable
        // transaction, so no conflict with the writers of running jobs when, as nearly always,
        // there is nothing to adopt or forget).
        let forget_before = dead_before - crate::FORGET_DISPATCHERS_MS;
        let anything = self.read(|db| {
            Ok(db
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM jobs j JOIN attempts a ON a.id = j.current_attempt \
                     WHERE j.state IN ('assigned', 'running') \
                     AND (a.owner IS NULL OR (a.owner <> $1 AND NOT EXISTS \
                       (SELECT 1 FROM dispatchers d WHERE d.id = a.owner AND d.seen_at >= $2)))) \
                     OR EXISTS (SELECT 1 FROM dispatchers WHERE seen_at < $3 AND id <> $1)",
                    &[&me, &dead_before, &forget_before],
                )?
                .try_get::<_, bool>(0)?)
        })?;
        if !anything {
            return Ok(Vec::new());
        }
        // READ COMMITTED: the attempts' row locks first, then the compare-and-set of each owner
        // as one UPDATE whose snapshot starts after the locks are held: two dispatchers
        // adopting at once queue on the rows, and the second's UPDATE finds them owned by a
        // live one (or their jobs ended) and adopts none of them.
        self.write_committed(|db| {
            let candidates: Vec<Attempt> = db
                .query(
                    "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM jobs j \
                     JOIN attempts a ON a.id = j.current_attempt \
                     WHERE j.state IN ('assigned', 'running') \
                     AND (a.owner IS NULL OR (a.owner <> $1 AND NOT EXISTS \
                       (SELECT 1 FROM dispatchers d WHERE d.id = a.owner AND d.seen_at >= $2))) \
                     ORDER BY a.id FOR UPDATE OF a",
                    &[&me, &dead_before],
                )?
                .iter()
                .map(attempt_from_row)
                .collect::<Result<_>>()?;
            let ids: Vec<AttemptId> = candidates.iter().map(|a| a.id).collect();
            let mut adopted = Vec::new();
            if !ids.is_empty() {
                let taken: std::collections::HashSet<AttemptId> = db
                    .query(
                        "UPDATE attempts a SET owner = $1 FROM jobs j \
                         WHERE a.id = ANY($2) AND j.current_attempt = a.id \
                         AND j.state IN ('assigned', 'running') \
                         AND (a.owner IS NULL OR (a.owner <> $1 AND NOT EXISTS \
                           (SELECT 1 FROM dispatchers d WHERE d.id = a.owner \
                            AND d.seen_at >= $3))) RETURNING a.id",
                        &[&me, &ids, &dead_before],
                    )?
                    .iter()
                    .map(|r| Ok(r.try_get(0)?))
                    .collect::<Result<_>>()?;
                adopted = candidates
                    .into_iter()
                    .filter(|a| taken.contains(&a.id))
                    .collect();
            }
            db.execute(
                "DELETE FROM dispatchers WHERE seen_at < $1 AND id <> $2",
                &[&forget_before, &me],
            )?;
            Ok(adopted)
        })
    }

    fn owned_attempt(&self, attempt: AttemptId) -> Result<Option<crate::OwnedAttempt>> {
        self.read(|db| {
            db.query_opt(
                "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state, \
                 j.current_attempt IS NOT DISTINCT FROM a.id \
                   AND j.state IN ('assigned', 'running'), \
                 a.owner, a.secret_hash FROM attempts a \
                 JOIN jobs j ON j.id = a.job_id WHERE a.id = $1",
                &[&attempt],
            )?
            .map(|r| {
                Ok(crate::OwnedAttempt {
                    attempt: attempt_from_row(&r)?,
                    current: r.try_get(5)?,
                    owner: r.try_get(6)?,
                    secret_hash: r.try_get(7)?,
                })
            })
            .transpose()
        })
    }

    fn claim_attempt(
        &self,
        attempt: AttemptId,
        runner: RunnerId,
        from: Option<DispatcherId>,
        to: &crate::Owner,
    ) -> Result<bool> {
        // READ COMMITTED: one statement; the compare-and-set of the owner takes the attempt's
        // row lock and re-checks `owner` on the committed row after any wait, so of two
        // dispatchers claiming one attempt from the same owner one wins.
        self.write_committed(|db| {
            // One statement: the compare-and-set of the owner takes the attempt's row lock.
            Ok(db.execute(
                "UPDATE attempts a SET owner = $1, secret_hash = $2 FROM jobs j \
                 WHERE a.id = $3 AND a.runner_id = $4 AND a.owner IS NOT DISTINCT FROM $5 \
                 AND j.current_attempt = a.id AND j.state IN ('assigned', 'running')",
                &[&to.dispatcher, &to.secret_hash, &attempt, &runner, &from],
            )? == 1)
        })
    }

    fn set_runner_dispatcher(
        &self,
        runner: RunnerId,
        to: Option<DispatcherId>,
        by: DispatcherId,
    ) -> Result<()> {
        self.write_committed(|db| {
            match to {
                Some(d) => db.execute(
                    "UPDATE runners SET dispatcher = $1 WHERE id = $2",
                    &[&d, &runner],
                )?,
                None => db.execute(
                    "UPDATE runners SET dispatcher = NULL WHERE id = $1 AND dispatcher = $2",
                    &[&runner, &by],
                )?,
            };
            Ok(())
        })
    }

    fn attached_runners(&self, alive_since: Millis) -> Result<Vec<(RunnerId, DispatcherId)>> {
        self.read(|db| {
            db.query(
                "SELECT r.id, r.dispatcher FROM runners r \
                 JOIN dispatchers d ON d.id = r.dispatcher WHERE d.seen_at >= $1 ORDER BY r.id",
                &[&alive_since],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }

    fn upsert_runner(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        slots: u32,
        version: &str,
    ) -> Result<RunnerRecord> {
        let now = now_millis();
        let labels_json = serde_json::to_string(labels).map_err(|e| corrupt("labels", e))?;
        // READ COMMITTED: one upsert keyed by the unique name.
        self.write_committed(|db| {
            let id: RunnerId = db
                .query_one(
                    "INSERT INTO runners (name, labels, slots, version, last_seen) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (name) DO UPDATE SET \
                     labels = excluded.labels, slots = excluded.slots, \
                     version = excluded.version, last_seen = excluded.last_seen RETURNING id",
                    &[&name, &labels_json, &i64::from(slots), &version, &now],
                )?
                .try_get(0)?;
            Ok(RunnerRecord {
                id,
                name: name.to_string(),
                labels: labels.clone(),
                slots,
                version: version.to_string(),
                last_seen: now,
            })
        })
    }

    fn touch_runner(&self, runner: RunnerId, at: Millis) -> Result<()> {
        // One update of one row, in its own transaction.
        self.autocommit(
            "UPDATE runners SET last_seen = $1 WHERE id = $2",
            &[&at, &runner],
        )?;
        Ok(())
    }

    fn forget_idle_runners(&self, before: Millis, keep: &[RunnerId]) -> Result<u64> {
        // READ COMMITTED: the idle runners' rows are locked first; an assignment inserting an
        // attempt of one of them takes that row's key-share lock (the foreign key), so it
        // either committed before (and the DELETE, a later statement with a later snapshot,
        // sees its attempt and keeps the runner) or waits for this transaction.
        self.write_committed(|db| {
            db.query(
                "SELECT id FROM runners WHERE last_seen < $1 AND id <> ALL($2) \
                 ORDER BY id FOR UPDATE",
                &[&before, &keep],
            )?;
            db.execute(
                "DELETE FROM runners WHERE last_seen < $1 AND id <> ALL($2) \
                 AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.runner_id = runners.id) \
                 AND NOT EXISTS (SELECT 1 FROM dispatchers d WHERE d.id = runners.dispatcher \
                                 AND d.seen_at >= $1)",
                &[&before, &keep],
            )
        })
    }

    fn list_runners(&self) -> Result<Vec<RunnerRecord>> {
        self.read(|db| {
            db.query(
                "SELECT id, name, labels, slots, version, last_seen FROM runners ORDER BY name",
                &[],
            )?
            .iter()
            .map(|r| {
                let labels: String = r.try_get(2)?;
                Ok(RunnerRecord {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                    labels: serde_json::from_str(&labels).map_err(|e| corrupt("labels", e))?,
                    slots: get_u32(r, 3)?,
                    version: r.try_get(4)?,
                    last_seen: r.try_get(5)?,
                })
            })
            .collect()
        })
    }

    fn set_runner_token(&self, name: &str, token_hash: Option<&str>) -> Result<bool> {
        let now = now_millis();
        // READ COMMITTED: one upsert or one conditional update of the name's row.
        self.write_committed(|db| {
            let n = match token_hash {
                Some(h) => db.execute(
                    "INSERT INTO runner_tokens (name, token_hash, created_at) \
                     VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET \
                     token_hash = excluded.token_hash, created_at = excluded.created_at",
                    &[&name, &h, &now],
                )?,
                // Revoked, not deleted: the row keeps runner authentication on (and this name
                // out) even when it was the last token.
                None => db.execute(
                    "UPDATE runner_tokens SET token_hash = '' WHERE name = $1 \
                     AND token_hash <> ''",
                    &[&name],
                )?,
            };
            Ok(n > 0)
        })
    }

    fn runner_token_hash(&self, name: &str) -> Result<(Option<String>, bool)> {
        self.read(|db| {
            let hash = db
                .query_opt(
                    "SELECT token_hash FROM runner_tokens WHERE name = $1",
                    &[&name],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            let any: bool = db
                .query_one("SELECT EXISTS (SELECT 1 FROM runner_tokens)", &[])?
                .try_get(0)?;
            Ok((hash, any))
        })
    }

    fn record_refusal(&self, attempt: AttemptId, reason: &str) -> Result<()> {
        let now = now_millis();
        // READ COMMITTED: one insert.
        self.write_committed(|db| {
            db.execute(
                "INSERT INTO refusals (attempt_id, job_id, reason, at) \
                 SELECT id, job_id, $2, $3 FROM attempts WHERE id = $1",
                &[&attempt, &reason, &now],
            )?;
            Ok(())
        })
    }

    fn refusals(&self, job: JobId) -> Result<Vec<(AttemptId, String)>> {
        self.read(|db| {
            db.query(
                "SELECT attempt_id, reason FROM refusals WHERE job_id = $1 ORDER BY id DESC",
                &[&job],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
        })
    }

    fn next_units(
        &self,
        req: &kiln_domain::split::UnitsRequest,
    ) -> Result<kiln_domain::split::UnitsReply> {
        let now = now_millis();
        // READ COMMITTED with the job's and the split's row locks: see `pg/split.rs`.
        self.write_committed(|db| split::next_units_tx(db, req, now))
    }

    fn split_reports(&self, build: BuildId) -> Result<Vec<kiln_domain::split::SplitReport>> {
        self.read(|db| split::reports_of(db, build))
    }

    fn split_batches(&self, build: BuildId) -> Result<Vec<kiln_domain::split::BatchRecord>> {
        self.read(|db| split::batches_of(db, build))
    }

    fn unit_pasts(
        &self,
        repo: &str,
        key: &str,
        units: &[String],
        until: BuildId,
        limit: u32,
    ) -> Result<Vec<kiln_domain::split::UnitPast>> {
        self.read(|db| split::unit_pasts_of(db, repo, key, units, until, limit))
    }

    fn step_reports(&self, build: BuildId) -> Result<Vec<kiln_domain::split::StepReport>> {
        self.read(|db| {
            db.query(
                "SELECT j.name, t.step_name, t.cases, t.note FROM step_tests t \
                 JOIN jobs j ON j.current_attempt = t.attempt_id \
                 WHERE j.build_id = $1 ORDER BY j.position, j.id, t.position",
                &[&build],
            )?
            .iter()
            .map(|r| {
                let job: String = r.try_get(0)?;
                let step: String = r.try_get(1)?;
                let cases: String = r.try_get(2)?;
                Ok(kiln_domain::split::StepReport {
                    build_id: build,
                    key: format!("{job}/{step}"),
                    cases: serde_json::from_str(&cases).map_err(|e| corrupt("test cases", e))?,
                    note: r.try_get(3)?,
                })
            })
            .collect()
        })
    }

    fn requeue_failed_units(&self, attempt: AttemptId) -> Result<u64> {
        // READ COMMITTED: the split rows' locks first (as every writer of a split's tries),
        // then one conditional UPDATE.
        self.write_committed(|db| split::requeue_failed_units(db, attempt))
    }

    fn plan_deliveries(
        &self,
        build: BuildId,
        mark: crate::Mark,
        deliveries: &[crate::NewDelivery],
    ) -> Result<u64> {
        self.deliveries_plan(build, mark, deliveries)
    }

    fn planned_marks(&self, build: BuildId) -> Result<Vec<crate::Mark>> {
        self.deliveries_marks(build)
    }

    fn unplanned_builds(&self, since: Millis, limit: u32) -> Result<Vec<BuildId>> {
        self.deliveries_unplanned(since, limit)
    }

    fn take_due_deliveries(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<crate::Delivery>> {
        self.deliveries_take_due(now, lease_until, limit)
    }

    fn next_delivery_at(&self) -> Result<Option<Millis>> {
        self.deliveries_next_at()
    }

    fn record_delivery(
        &self,
        id: crate::DeliveryKey,
        result: &crate::DeliveryResult,
        now: Millis,
    ) -> Result<bool> {
        self.deliveries_record(id, result, now)
    }

    fn deliveries(&self, build: BuildId) -> Result<Vec<crate::Delivery>> {
        self.deliveries_of(build)
    }
}

//! [`Store`] on one SQLite file.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::MutexGuard;

use crate::group_commit::GroupCommit;

use kiln_domain::{
    AttemptId, AttemptState, Build, BuildId, DispatcherId, Job, JobId, JobState, Millis, NewBuild,
    RunnerId, RunnerRecord, StepOutcome, StepResult, StepSpec, build_state, now_millis,
};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use crate::{
    Attempt, AttemptInfo, BuildDetail, BuildFilter, Change, Finish, Recorded, Result, Store,
    StoreError, StoreMetrics,
};

/// The schema, applied in order; `PRAGMA user_version` records how many ran.
pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE builds (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    repo        TEXT NOT NULL,
    commit_id   TEXT NOT NULL,
    branch      TEXT NOT NULL,
    trigger_by  TEXT NOT NULL,
    state       TEXT NOT NULL,
    error       TEXT,
    retry_of    INTEGER REFERENCES builds(id),
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE INDEX builds_by_repo ON builds(repo, id);
CREATE INDEX builds_by_branch ON builds(branch, id);
CREATE INDEX builds_by_state ON builds(state, id);
CREATE TABLE jobs (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id        INTEGER NOT NULL REFERENCES builds(id),
    position        INTEGER NOT NULL,
    name            TEXT NOT NULL,
    state           TEXT NOT NULL,
    labels          TEXT NOT NULL,
    steps           TEXT NOT NULL,
    current_attempt INTEGER,
    attempts        INTEGER NOT NULL DEFAULT 0,
    lost_attempts   INTEGER NOT NULL DEFAULT 0,
    runner          TEXT,
    message         TEXT,
    started_at      INTEGER,
    finished_at     INTEGER
);
CREATE INDEX jobs_by_build ON jobs(build_id, position);
CREATE INDEX jobs_by_state ON jobs(state, id);
CREATE TABLE attempts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    runner_id   INTEGER NOT NULL REFERENCES runners(id),
    state       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    note        TEXT
);
CREATE INDEX attempts_by_job ON attempts(job_id);
CREATE TABLE step_results (
    job_id      INTEGER NOT NULL REFERENCES jobs(id),
    position    INTEGER NOT NULL,
    attempt_id  INTEGER NOT NULL REFERENCES attempts(id),
    outcome     TEXT NOT NULL,
    exit_code   INTEGER,
    duration_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, position)
);
CREATE TABLE runners (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    name      TEXT NOT NULL UNIQUE,
    labels    TEXT NOT NULL,
    slots     INTEGER NOT NULL,
    version   TEXT NOT NULL,
    last_seen INTEGER NOT NULL
);
CREATE TABLE refusals (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    attempt_id INTEGER NOT NULL,
    job_id     INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    at         INTEGER NOT NULL
);
CREATE INDEX refusals_by_job ON refusals(job_id);
"#,
    r#"
CREATE TABLE runner_tokens (
    name       TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE jobs ADD COLUMN needs TEXT NOT NULL DEFAULT '[]';
ALTER TABLE builds ADD COLUMN pipeline_hash TEXT NOT NULL DEFAULT '';
CREATE UNIQUE INDEX builds_once ON builds(repo, commit_id, pipeline_hash)
    WHERE retry_of IS NULL AND pipeline_hash != '';
CREATE TABLE branch_cursors (
    repo       TEXT NOT NULL,
    branch     TEXT NOT NULL,
    head       TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (repo, branch)
);
"#,
    // Split steps (see `split.rs`): one row per split (build, key); its units in discovery
    // order; one row per try of a unit (try n is run in round n), queued, leased to an attempt
    // or ended; the shards that asked (for retry rounds); and the per-repository history of
    // unit durations and flaky/failed counts.
    r#"
CREATE TABLE splits (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    build_id    INTEGER NOT NULL REFERENCES builds(id),
    split_key   TEXT NOT NULL,
    repo        TEXT NOT NULL,
    shards      INTEGER NOT NULL,
    strategy    TEXT NOT NULL,
    retry       TEXT NOT NULL,
    max_batch   INTEGER NOT NULL,
    round       INTEGER NOT NULL DEFAULT 1,
    done        INTEGER NOT NULL DEFAULT 0,
    passed      INTEGER NOT NULL DEFAULT 0,
    summary     TEXT NOT NULL DEFAULT '',
    retry_note  TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);
CREATE UNIQUE INDEX splits_by_build ON splits(build_id, split_key);
CREATE TABLE split_units (
    split_id INTEGER NOT NULL REFERENCES splits(id),
    position INTEGER NOT NULL,
    unit     TEXT NOT NULL,
    PRIMARY KEY (split_id, position)
);
CREATE UNIQUE INDEX split_units_by_unit ON split_units(split_id, unit);
CREATE TABLE unit_tries (
    split_id    INTEGER NOT NULL REFERENCES splits(id),
    position    INTEGER NOT NULL,
    try_number  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    shard       INTEGER,
    estimate_ms INTEGER NOT NULL,
    attempt_id  INTEGER,
    request     INTEGER,
    runner_id   INTEGER,
    runner      TEXT,
    leased_at   INTEGER,
    outcome     TEXT,
    duration_ms INTEGER NOT NULL DEFAULT 0,
    cases       TEXT NOT NULL DEFAULT '[]',
    ended_at    INTEGER,
    PRIMARY KEY (split_id, position, try_number)
);
CREATE INDEX unit_tries_queue ON unit_tries(split_id, try_number, state, estimate_ms DESC, position);
CREATE INDEX unit_tries_by_attempt ON unit_tries(attempt_id, state) WHERE attempt_id IS NOT NULL;
CREATE TABLE split_members (
    split_id        INTEGER NOT NULL REFERENCES splits(id),
    attempt_id      INTEGER NOT NULL,
    runner_id       INTEGER NOT NULL,
    last_request    INTEGER NOT NULL,
    last_request_at INTEGER NOT NULL,
    PRIMARY KEY (split_id, attempt_id)
);
CREATE TABLE unit_history (
    repo       TEXT NOT NULL,
    split_key  TEXT NOT NULL,
    unit       TEXT NOT NULL,
    durations  TEXT NOT NULL DEFAULT '[]',
    flaky      INTEGER NOT NULL DEFAULT 0,
    failed     INTEGER NOT NULL DEFAULT 0,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (repo, split_key, unit)
);
"#,
    // 5: a shard sent away from a retry round is done and no longer a candidate for its units.
    "ALTER TABLE split_members ADD COLUMN done INTEGER NOT NULL DEFAULT 0;",
    // 6: how a build's pipeline was found (its file, or what was detected and why).
    "ALTER TABLE builds ADD COLUMN pipeline TEXT NOT NULL DEFAULT '';",
    // 7: interaction failures of split steps: a batch that failed while each of its units passed
    // alone; keyed by the request that reported it, so a re-sent request records it once.
    r#"
CREATE TABLE split_interactions (
    split_id   INTEGER NOT NULL REFERENCES splits(id),
    attempt_id INTEGER NOT NULL,
    request    INTEGER NOT NULL,
    seq        INTEGER NOT NULL,
    try_number INTEGER NOT NULL,
    units      TEXT NOT NULL,
    detail     TEXT NOT NULL,
    runner     TEXT,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (split_id, attempt_id, request, seq)
);
"#,
    // 8: the test cases of a plain step's JUnit files (`junit`), keyed by attempt and step so
    // a re-sent StepFinished records them once; only the job's current attempt's count.
    r#"
CREATE TABLE step_tests (
    attempt_id INTEGER NOT NULL REFERENCES attempts(id),
    position   INTEGER NOT NULL,
    step_name  TEXT NOT NULL,
    cases      TEXT NOT NULL,
    note       TEXT NOT NULL,
    PRIMARY KEY (attempt_id, position)
);
"#,
    // 9: notifications (kiln-notify). `notify_marks` records which points of a build's life
    // (queued, started, finished) had their deliveries planned, in the transaction that planned
    // them; `deliveries` holds one row per (build, event, target), the outbox the notifier
    // sends from. Builds that existed before this migration count as planned, so enabling
    // notifications never announces history.
    r#"
CREATE TABLE notify_marks (
    build_id INTEGER NOT NULL REFERENCES builds(id),
    mark     TEXT NOT NULL,
    at       INTEGER NOT NULL,
    PRIMARY KEY (build_id, mark)
);
CREATE TABLE deliveries (
    id          INTEGER PRIMARY KEY,
    delivery_id TEXT NOT NULL UNIQUE,
    build_id    INTEGER NOT NULL REFERENCES builds(id),
    event       TEXT NOT NULL,
    target      TEXT NOT NULL,
    payload     TEXT NOT NULL,
    state       TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     INTEGER NOT NULL,
    last_error  TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    UNIQUE (build_id, event, target)
);
CREATE INDEX deliveries_due ON deliveries (state, next_at);
INSERT INTO notify_marks (build_id, mark, at) SELECT id, 'queued', created_at FROM builds;
INSERT INTO notify_marks (build_id, mark, at)
    SELECT id, 'started', created_at FROM builds b
    WHERE EXISTS (SELECT 1 FROM jobs j WHERE j.build_id = b.id AND j.started_at IS NOT NULL);
INSERT INTO notify_marks (build_id, mark, at)
    SELECT id, 'finished', finished_at FROM builds WHERE finished_at IS NOT NULL;
"#,
    // 10: a unit's past across builds (the tests page): the splits of a repository and key by
    // build.
    "CREATE INDEX splits_by_repo ON splits(repo, split_key, build_id);",
    // 11: a build's parameters (environment variables over the pipeline's `env`), a JSON object
    // of strings; `{}` for none and for builds made before.
    "ALTER TABLE builds ADD COLUMN params TEXT NOT NULL DEFAULT '{}';",
    // 12: several dispatchers (PostgreSQL's 4; a SQLite file has one dispatcher, which never
    // registers, so these stay empty there): the dispatcher processes, who owns an attempt and
    // the hash of its session's secret, which dispatcher holds a runner's stream.
    r#"
CREATE TABLE dispatchers (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL,
    started_at INTEGER NOT NULL,
    seen_at    INTEGER NOT NULL
);
ALTER TABLE attempts ADD COLUMN owner INTEGER;
ALTER TABLE attempts ADD COLUMN secret_hash TEXT;
ALTER TABLE runners ADD COLUMN dispatcher INTEGER;
"#,
    // 13: what `/metrics` counts (jobs per state, lost attempts, ended unit tries, deliveries),
    // kept as it changes so a scrape does not scan the store (`tallies.rs`): triggers add a
    // row of `tally_deltas` per change, in the changing transaction; a scrape sums `tallies`
    // and the deltas, and folds the deltas into `tallies`. Counted from the rows at migration.
    r#"
-- A delivery's target kind (`webhook`, `mail`, `status`): the first word of its target.
ALTER TABLE deliveries ADD COLUMN kind TEXT GENERATED ALWAYS AS (
    CASE WHEN instr(target, ' ') > 0 THEN substr(target, 1, instr(target, ' ') - 1) ELSE target END
) VIRTUAL;
CREATE TABLE tallies (
    metric TEXT NOT NULL,
    k1     TEXT NOT NULL,
    k2     TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (metric, k1, k2)
) WITHOUT ROWID;
CREATE TABLE tally_deltas (
    id     INTEGER PRIMARY KEY,
    metric TEXT NOT NULL,
    k1     TEXT NOT NULL,
    k2     TEXT NOT NULL,
    d      INTEGER NOT NULL
);
INSERT INTO tallies SELECT 'jobs', state, '', COUNT(*) FROM jobs GROUP BY state;
INSERT INTO tallies SELECT 'lost', '', '', COALESCE(SUM(lost_attempts), 0) FROM jobs;
INSERT INTO tallies
    SELECT 'unit_tries', COALESCE(outcome, ''), CASE WHEN try_number > 1 THEN 'retry' ELSE 'first' END,
           COUNT(*)
    FROM unit_tries WHERE state = 'ended' GROUP BY 2, 3;
INSERT INTO tallies SELECT 'deliveries', kind, state, COUNT(*) FROM deliveries GROUP BY 2, 3;
INSERT INTO tallies
    SELECT 'delivery_tries', kind, state, COALESCE(SUM(attempts), 0) FROM deliveries GROUP BY 2, 3;
CREATE TRIGGER jobs_tally_insert AFTER INSERT ON jobs BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d) VALUES ('jobs', NEW.state, '', 1);
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'lost', '', '', NEW.lost_attempts WHERE NEW.lost_attempts <> 0;
END;
CREATE TRIGGER jobs_tally_update AFTER UPDATE OF state, lost_attempts ON jobs BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'jobs', OLD.state, '', -1 WHERE OLD.state <> NEW.state
        UNION ALL SELECT 'jobs', NEW.state, '', 1 WHERE OLD.state <> NEW.state
        UNION ALL SELECT 'lost', '', '', NEW.lost_attempts - OLD.lost_attempts
            WHERE NEW.lost_attempts <> OLD.lost_attempts;
END;
CREATE TRIGGER jobs_tally_delete AFTER DELETE ON jobs BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'jobs', OLD.state, '', -1
        UNION ALL SELECT 'lost', '', '', -OLD.lost_attempts WHERE OLD.lost_attempts <> 0;
END;
CREATE TRIGGER unit_tries_tally_insert AFTER INSERT ON unit_tries WHEN NEW.state = 'ended' BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d) VALUES ('unit_tries', COALESCE(NEW.outcome, ''),
        CASE WHEN NEW.try_number > 1 THEN 'retry' ELSE 'first' END, 1);
END;
CREATE TRIGGER unit_tries_tally_update AFTER UPDATE OF state, outcome, try_number ON unit_tries
    WHEN OLD.state = 'ended' OR NEW.state = 'ended' BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'unit_tries', COALESCE(OLD.outcome, ''),
               CASE WHEN OLD.try_number > 1 THEN 'retry' ELSE 'first' END, -1
        WHERE OLD.state = 'ended'
        UNION ALL SELECT 'unit_tries', COALESCE(NEW.outcome, ''),
               CASE WHEN NEW.try_number > 1 THEN 'retry' ELSE 'first' END, 1
        WHERE NEW.state = 'ended';
END;
CREATE TRIGGER unit_tries_tally_delete AFTER DELETE ON unit_tries WHEN OLD.state = 'ended' BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d) VALUES ('unit_tries', COALESCE(OLD.outcome, ''),
        CASE WHEN OLD.try_number > 1 THEN 'retry' ELSE 'first' END, -1);
END;
CREATE TRIGGER deliveries_tally_insert AFTER INSERT ON deliveries BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'deliveries', NEW.kind, NEW.state, 1
        UNION ALL SELECT 'delivery_tries', NEW.kind, NEW.state, NEW.attempts
            WHERE NEW.attempts <> 0;
END;
CREATE TRIGGER deliveries_tally_update AFTER UPDATE OF state, attempts, target ON deliveries BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'deliveries', OLD.kind, OLD.state, -1
        UNION ALL SELECT 'delivery_tries', OLD.kind, OLD.state, -OLD.attempts
        UNION ALL SELECT 'deliveries', NEW.kind, NEW.state, 1
        UNION ALL SELECT 'delivery_tries', NEW.kind, NEW.state, NEW.attempts;
END;
CREATE TRIGGER deliveries_tally_delete AFTER DELETE ON deliveries BEGIN
    INSERT INTO tally_deltas (metric, k1, k2, d)
        SELECT 'deliveries', OLD.kind, OLD.state, -1
        UNION ALL SELECT 'delivery_tries', OLD.kind, OLD.state, -OLD.attempts;
END;
"#,
];

/// The SQLite implementation of [`Store`]: WAL journal, `synchronous=FULL` so a committed
/// transaction survives a crash of the process or the machine.
///
/// Writes go through one write connection with group commit ([`GroupCommit`]): concurrent
/// calls share one transaction and one fsync, each call in its own savepoint (atomic on its
/// own, its error its own), and none returns before its batch committed. Reads go to a small
/// pool of read-only connections, each read one read transaction (one consistent state), so
/// they never wait behind a batch's writes or fsync. An in-memory database (tests) has no
/// second connection: its reads take the write connection, after committing any open batch.
pub struct SqliteStore {
    /// The write connection and its group commit.
    writer: GroupCommit,
    /// Read-only connections of the file (`None` in memory).
    readers: Option<ReadPool>,
}

/// Opens the read-only connections of one database file for the [`ReadPool`].
#[derive(Debug)]
pub(crate) struct ReadOnly {
    path: std::path::PathBuf,
}

impl r2d2::ManageConnection for ReadOnly {
    type Connection = Connection;
    type Error = rusqlite::Error;

    fn connect(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut Connection) -> rusqlite::Result<()> {
        conn.execute_batch("")
    }

    /// A connection whose read transaction could not end is not given to the next reader.
    fn has_broken(&self, conn: &mut Connection) -> bool {
        !conn.is_autocommit()
    }
}

/// Read-only connections of one database file (`r2d2`), opened as reads need them.
pub(crate) type ReadPool = r2d2::Pool<ReadOnly>;

/// Reads at once, at most; a read past them waits for one to end (reads take milliseconds).
const READERS: u32 = 16;

fn read_pool(path: &Path) -> Result<ReadPool> {
    r2d2::Pool::builder()
        .max_size(READERS)
        // Opened when first needed, not all at once at the start.
        .min_idle(Some(0))
        // `has_broken` already checks each connection as it is given back.
        .test_on_check_out(false)
        .build(ReadOnly {
            path: path.to_path_buf(),
        })
        .map_err(|e| StoreError::Pool(format!("SQLite read connections: {e}")))
}

/// A connection to read from, inside one read transaction (ended when it is dropped).
pub(crate) enum ReadConn<'a> {
    /// A pooled read-only connection.
    Pooled(r2d2::PooledConnection<ReadOnly>),
    /// The write connection, with no batch open (an in-memory database).
    Writer(MutexGuard<'a, crate::group_commit::WriterState>),
}

impl std::ops::Deref for ReadConn<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            ReadConn::Pooled(c) => c,
            ReadConn::Writer(w) => &w.conn,
        }
    }
}

impl Drop for ReadConn<'_> {
    fn drop(&mut self) {
        if let ReadConn::Pooled(conn) = self {
            // A read transaction commits nothing; one that cannot end leaves the connection
            // in it, and the pool closes it (`has_broken`).
            let _ = conn.execute_batch("COMMIT");
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore").finish_non_exhaustive()
    }
}

const JOB_COLUMNS: &str = "id, build_id, name, state, labels, steps, current_attempt, attempts, \
     lost_attempts, runner, message, started_at, finished_at, needs";
const BUILD_COLUMNS: &str = "id, repo, commit_id, branch, trigger_by, state, error, retry_of, created_at, finished_at, \
     pipeline, params";

impl SqliteStore {
    /// Records known unit durations for a repository's split key, as if they had been measured:
    /// imports a timing history into this database file (the split benchmark seeds one with
    /// deliberate errors before its dispatcher starts). Not part of [`Store`]: no dispatcher
    /// needs it.
    pub fn seed_unit_durations(
        &self,
        repo: &str,
        key: &str,
        durations: &[(String, u64)],
    ) -> Result<()> {
        self.split_seed_durations(repo, key, durations)
    }

    /// Opens (creating if needed) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        Self::init(conn, Some(path))
    }

    /// An in-memory database, for tests.
    pub fn in_memory() -> Result<Self> {
        Self::init(Connection::open_in_memory()?, None)
    }

    fn init(mut conn: Connection, path: Option<&Path>) -> Result<Self> {
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let version = usize::try_from(version).unwrap_or(0);
        if version > MIGRATIONS.len() {
            return Err(StoreError::Corrupt(format!(
                "database schema version {version} is newer than this kiln ({})",
                MIGRATIONS.len()
            )));
        }
        let tx = conn.transaction()?;
        for m in &MIGRATIONS[version..] {
            tx.execute_batch(m)?;
        }
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
        tx.commit()?;
        Ok(Self {
            writer: GroupCommit::new(conn),
            readers: path.map(read_pool).transpose()?,
        })
    }

    /// A connection to read committed state from, in one read transaction (until dropped).
    pub(crate) fn reader(&self) -> Result<ReadConn<'_>> {
        match &self.readers {
            Some(pool) => {
                let conn = pool
                    .get()
                    .map_err(|e| StoreError::Pool(format!("SQLite read connections: {e}")))?;
                conn.execute_batch("BEGIN")?;
                Ok(ReadConn::Pooled(conn))
            }
            None => Ok(ReadConn::Writer(self.writer.exclusive())),
        }
    }

    /// Runs `f` as one write transaction in effect (see [`GroupCommit::write`]): atomic, and
    /// durable (fsync'd) when this returns `Ok`; it may share its commit with other callers'.
    pub(crate) fn with_tx<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.writer.write(f)
    }

    /// The group commit, for its tests.
    #[cfg(test)]
    pub(crate) fn group(&self) -> &GroupCommit {
        &self.writer
    }

    /// (batches committed or failed, write operations run) since the store opened: how much
    /// group commit grouped.
    pub fn commit_stats(&self) -> (u64, u64) {
        self.writer.stats()
    }
}

/// Jobs ready to run (queued, every job they need passed), per label set they need.
fn ready_by_labels(conn: &Connection) -> Result<Vec<(BTreeMap<String, String>, u64)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT labels, COUNT(*) FROM jobs WHERE state = 'queued' AND NOT EXISTS \
         (SELECT 1 FROM json_each(jobs.needs) n JOIN jobs d ON d.id = n.value \
          WHERE d.state != 'passed') GROUP BY labels",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
    let mut by_labels: BTreeMap<BTreeMap<String, String>, u64> = BTreeMap::new();
    for row in rows {
        let (labels, n) = row?;
        let labels = serde_json::from_str(&labels).map_err(|e| corrupt("job labels", e))?;
        // The same set written with its keys in another order is one set.
        *by_labels.entry(labels).or_default() += n as u64;
    }
    Ok(by_labels.into_iter().collect())
}

pub(crate) fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn parse_state(s: &str) -> Result<JobState> {
    s.parse().map_err(|e| corrupt("job state", e))
}

/// A build row: the build, then its state and its parameters as stored (parsed by
/// [`finish_build`]).
fn build_from_row(r: &Row<'_>) -> rusqlite::Result<(Build, String, String)> {
    let state: String = r.get(5)?;
    Ok((
        Build {
            id: r.get(0)?,
            repo: r.get(1)?,
            commit: r.get(2)?,
            branch: r.get(3)?,
            trigger: r.get(4)?,
            state: JobState::Queued,
            error: r.get(6)?,
            retry_of: r.get(7)?,
            created_at: r.get(8)?,
            finished_at: r.get(9)?,
            pipeline: r.get(10)?,
            params: BTreeMap::new(),
        },
        state,
        r.get(11)?,
    ))
}

fn finish_build(row: (Build, String, String)) -> Result<Build> {
    let (mut b, state, params) = row;
    b.state = parse_state(&state)?;
    b.params = serde_json::from_str(&params).map_err(|e| corrupt("build params", e))?;
    Ok(b)
}

struct RawJob {
    job: Job,
    state: String,
    labels: String,
    steps: String,
    needs: String,
}

fn job_from_row(r: &Row<'_>) -> rusqlite::Result<RawJob> {
    Ok(RawJob {
        job: Job {
            id: r.get(0)?,
            build_id: r.get(1)?,
            name: r.get(2)?,
            state: JobState::Queued,
            labels: BTreeMap::new(),
            steps: Vec::new(),
            needs: Vec::new(),
            current_attempt: r.get(6)?,
            attempts: r.get(7)?,
            lost_attempts: r.get(8)?,
            runner: r.get(9)?,
            message: r.get(10)?,
            started_at: r.get(11)?,
            finished_at: r.get(12)?,
        },
        state: r.get(3)?,
        labels: r.get(4)?,
        steps: r.get(5)?,
        needs: r.get(13)?,
    })
}

fn finish_job(raw: RawJob) -> Result<Job> {
    let mut job = raw.job;
    job.state = parse_state(&raw.state)?;
    job.labels = serde_json::from_str(&raw.labels).map_err(|e| corrupt("job labels", e))?;
    job.steps =
        serde_json::from_str::<Vec<StepSpec>>(&raw.steps).map_err(|e| corrupt("job steps", e))?;
    job.needs = serde_json::from_str(&raw.needs).map_err(|e| corrupt("job needs", e))?;
    Ok(job)
}

fn load_job(tx: &Connection, id: JobId) -> Result<Option<Job>> {
    let raw = tx
        .query_row(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"),
            [id],
            job_from_row,
        )
        .optional()?;
    raw.map(finish_job).transpose()
}

fn load_jobs_of(tx: &Connection, build: BuildId) -> Result<Vec<Job>> {
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT {JOB_COLUMNS} FROM jobs WHERE build_id = ?1 ORDER BY position"
    ))?;
    let rows = stmt.query_map([build], job_from_row)?;
    rows.map(|r| finish_job(r?)).collect()
}

fn load_build(tx: &Connection, id: BuildId) -> Result<Option<Build>> {
    let row = tx
        .query_row(
            &format!("SELECT {BUILD_COLUMNS} FROM builds WHERE id = ?1"),
            [id],
            build_from_row,
        )
        .optional()?;
    row.map(finish_build).transpose()
}

fn load_detail(tx: &Connection, id: BuildId) -> Result<Option<BuildDetail>> {
    let Some(build) = load_build(tx, id)? else {
        return Ok(None);
    };
    let jobs = load_jobs_of(tx, id)?;
    let mut steps = BTreeMap::new();
    let mut stmt = tx.prepare_cached(
        "SELECT position, outcome, exit_code, duration_ms FROM step_results \
         WHERE job_id = ?1 ORDER BY position",
    )?;
    for job in &jobs {
        let rows = stmt.query_map([job.id], |r| {
            Ok((
                r.get::<_, u32>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, Option<i32>>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut list = Vec::new();
        for row in rows {
            let (index, outcome, exit_code, duration) = row?;
            list.push(StepResult {
                index,
                outcome: outcome
                    .parse::<StepOutcome>()
                    .map_err(|e| corrupt("step outcome", e))?,
                exit_code,
                duration_ms: duration.max(0) as u64,
                cases: Vec::new(),
                report_note: String::new(),
            });
        }
        steps.insert(job.id, list);
    }
    let mut refusals = BTreeMap::new();
    let mut stmt =
        tx.prepare_cached("SELECT attempt_id, reason FROM refusals WHERE job_id = ?1 ORDER BY id")?;
    for job in &jobs {
        let rows = stmt.query_map([job.id], |r| Ok((r.get(0)?, r.get::<_, String>(1)?)))?;
        let list = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        if !list.is_empty() {
            refusals.insert(job.id, list);
        }
    }
    // The latest attempts of each job, numbered from the job's count (every attempt row
    // counted once when it was made).
    let mut attempts = BTreeMap::new();
    let mut stmt = tx.prepare_cached(
        "SELECT a.id, COALESCE(r.name, ''), a.state, a.created_at, a.finished_at, a.note \
         FROM attempts a LEFT JOIN runners r ON r.id = a.runner_id \
         WHERE a.job_id = ?1 ORDER BY a.id DESC LIMIT ?2",
    )?;
    for job in &jobs {
        let rows = stmt.query_map(params![job.id, crate::MAX_LISTED_ATTEMPTS as i64], |r| {
            Ok((
                r.get(0)?,
                r.get::<_, String>(1)?,
                attempt_state(r, 2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<String>>(5)?,
            ))
        })?;
        let mut list = Vec::new();
        for (k, row) in rows.enumerate() {
            let (id, runner, state, created_at, finished_at, note) = row?;
            list.push(AttemptInfo {
                id,
                number: job.attempts.saturating_sub(k as u32),
                runner,
                state,
                created_at,
                finished_at,
                note,
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

/// Recomputes a build's summary state after one of its jobs changed; returns the change.
fn settle(tx: &Connection, job: JobId, now: Millis) -> Result<Change> {
    let (build_id, job_state): (BuildId, String) = tx.query_row(
        "SELECT build_id, state FROM jobs WHERE id = ?1",
        [job],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let job_state = parse_state(&job_state)?;
    if job_state.is_final() {
        crate::split::close_abandoned_splits(tx, build_id, now)?;
    }
    // Jobs waiting on a job that did not pass will never run: skip them, transitively.
    let mut skipped = Vec::new();
    if job_state.is_final() && job_state != JobState::Passed {
        let mut frontier = vec![(job, job_state)];
        while let Some((failed, how)) = frontier.pop() {
            let mut stmt = tx.prepare_cached(
                "SELECT j.id FROM jobs j, json_each(j.needs) n \
                 WHERE j.build_id = ?1 AND j.state = 'queued' AND n.value = ?2",
            )?;
            let ids: Vec<JobId> = stmt
                .query_map(params![build_id, failed], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in ids {
                tx.execute(
                    "UPDATE jobs SET state = 'skipped', message = ?1, finished_at = ?2 WHERE id = ?3",
                    params![format!("skipped: job {failed} it needs ended {how}"), now, id],
                )?;
                skipped.push(id);
                frontier.push((id, JobState::Skipped));
            }
        }
    }
    let states: Vec<String> = {
        let mut stmt = tx.prepare_cached("SELECT state FROM jobs WHERE build_id = ?1")?;
        stmt.query_map([build_id], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    };
    let states = states
        .iter()
        .map(|s| parse_state(s))
        .collect::<Result<Vec<_>>>()?;
    let new_state = build_state(states);
    let old: String = tx.query_row("SELECT state FROM builds WHERE id = ?1", [build_id], |r| {
        r.get(0)
    })?;
    let build_changed = parse_state(&old)? != new_state;
    if build_changed {
        let finished = new_state.is_final().then_some(now);
        tx.execute(
            "UPDATE builds SET state = ?1, finished_at = ?2 WHERE id = ?3",
            params![new_state.as_str(), finished, build_id],
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

const FINAL_STATES_SQL: &str = "('passed','failed','cancelled','timed_out','errored','skipped')";

/// The build a new one would duplicate. The partial index's own condition is spelled out, so
/// the planner takes `builds_once` instead of walking the repository's builds.
const DEDUPE_SQL: &str = "SELECT id FROM builds WHERE repo = ?1 AND commit_id = ?2 \
     AND pipeline_hash = ?3 AND retry_of IS NULL AND pipeline_hash != ''";

/// The unfinished jobs of a branch's builds older than a new one (superseded by it). From the
/// unfinished jobs (`jobs_by_state`) to their builds, never from the branch's builds: a
/// branch's history grows without bound, its unfinished jobs do not (CROSS JOIN keeps SQLite's
/// planner to this order).
const SUPERSEDED_SQL: &str = "SELECT j.id, j.current_attempt FROM jobs j CROSS JOIN builds b \
     ON b.id = j.build_id WHERE j.state IN ('queued', 'assigned', 'running') \
     AND b.repo = ?1 AND b.branch = ?2 AND b.id < ?3";

/// Inserts a build and its jobs; a duplicate of (repo, commit, pipeline) is an error naming
/// the existing build.
fn insert_build(tx: &Connection, new: &NewBuild, now: Millis) -> Result<BuildDetail> {
    if !new.pipeline_hash.is_empty() && new.retry_of.is_none() {
        let existing: Option<BuildId> = tx
            .query_row(
                DEDUPE_SQL,
                params![new.repo, new.commit, new.pipeline_hash],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(id) = existing {
            return Err(StoreError::Duplicate { build: id });
        }
    }
    let (state, finished) = if new.error.is_some() || new.jobs.is_empty() {
        (JobState::Errored, Some(now))
    } else {
        (JobState::Queued, None)
    };
    let build_params =
        serde_json::to_string(&new.params).map_err(|e| corrupt("build params", e))?;
    tx.execute(
        "INSERT INTO builds (repo, commit_id, branch, trigger_by, state, error, retry_of, \
         created_at, finished_at, pipeline_hash, pipeline, params) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            new.repo,
            new.commit,
            new.branch,
            new.trigger,
            state.as_str(),
            new.error,
            new.retry_of,
            now,
            finished,
            new.pipeline_hash,
            new.pipeline,
            build_params
        ],
    )?;
    let build_id = BuildId::new(tx.last_insert_rowid() as u64);
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
            let needs = serde_json::to_string(&needs).map_err(|e| corrupt("job needs", e))?;
            tx.execute(
                "INSERT INTO jobs (build_id, position, name, state, labels, steps, needs) \
                 VALUES (?1, ?2, ?3, 'queued', ?4, ?5, ?6)",
                params![build_id, pos as i64, job.name, labels, steps, needs],
            )?;
            ids.push(JobId::new(tx.last_insert_rowid() as u64));
        }
    }
    load_detail(tx, build_id)?
        .ok_or_else(|| StoreError::Corrupt("build vanished inside its transaction".into()))
}

/// Gives a queued job to a runner as a new attempt (see [`Store::assign_owned`]).
fn assign_tx(
    tx: &Connection,
    job: JobId,
    runner: RunnerId,
    runner_name: &str,
    owner: Option<&crate::Owner>,
    now: Millis,
) -> Result<Option<(AttemptId, Change)>> {
    let state: Option<String> = tx
        .query_row("SELECT state FROM jobs WHERE id = ?1", [job], |r| r.get(0))
        .optional()?;
    if state.as_deref() != Some("queued") {
        return Ok(None);
    }
    tx.execute(
        "INSERT INTO attempts (job_id, runner_id, state, created_at, owner, secret_hash) \
         VALUES (?1, ?2, 'offered', ?3, ?4, ?5)",
        params![
            job,
            runner,
            now,
            owner.map(|o| o.dispatcher),
            owner.map(|o| o.secret_hash.as_str())
        ],
    )?;
    let attempt = AttemptId::new(tx.last_insert_rowid() as u64);
    tx.execute(
        "UPDATE jobs SET state = 'assigned', current_attempt = ?1, \
         attempts = attempts + 1, runner = ?2 WHERE id = ?3",
        params![attempt, runner_name, job],
    )?;
    Ok(Some((attempt, settle(tx, job, now)?)))
}

impl Store for SqliteStore {
    fn requeue_failed_units(&self, attempt: AttemptId) -> Result<u64> {
        self.with_tx(|tx| crate::split::requeue_failed_units(tx, attempt))
    }

    fn next_units(
        &self,
        req: &kiln_domain::split::UnitsRequest,
    ) -> Result<kiln_domain::split::UnitsReply> {
        self.split_next_units(req)
    }

    fn unit_pasts(
        &self,
        repo: &str,
        key: &str,
        units: &[String],
        until: BuildId,
        limit: u32,
    ) -> Result<Vec<kiln_domain::split::UnitPast>> {
        self.split_unit_pasts(repo, key, units, until, limit)
    }

    fn split_reports(&self, build: BuildId) -> Result<Vec<kiln_domain::split::SplitReport>> {
        self.split_reports_of(build)
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

    fn split_batches(&self, build: BuildId) -> Result<Vec<kiln_domain::split::BatchRecord>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT s.id, s.split_key, t.attempt_id, COALESCE(j.name, ''), t.request, \
             t.try_number, COALESCE(t.runner, ''), MIN(t.leased_at), \
             CASE WHEN COUNT(t.ended_at) = COUNT(*) THEN MAX(t.ended_at) END, \
             group_concat(u.unit, char(10)), \
             SUM(CASE WHEN t.outcome IS NOT NULL AND t.outcome != 'passed' THEN 1 ELSE 0 END) \
             FROM unit_tries t JOIN splits s ON s.id = t.split_id \
             JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
             LEFT JOIN attempts a ON a.id = t.attempt_id LEFT JOIN jobs j ON j.id = a.job_id \
             WHERE s.build_id = ?1 AND t.attempt_id IS NOT NULL AND t.leased_at IS NOT NULL \
             GROUP BY s.id, t.attempt_id, t.request, t.try_number \
             ORDER BY s.id, MIN(t.leased_at), t.attempt_id, t.request",
        )?;
        let rows = stmt.query_map([build], |r| {
            Ok(kiln_domain::split::BatchRecord {
                split_id: r.get(0)?,
                split_key: r.get(1)?,
                attempt: r.get(2)?,
                job: r.get(3)?,
                request: r.get::<_, Option<u32>>(4)?.unwrap_or(0),
                round: r.get(5)?,
                runner: r.get(6)?,
                leased_at: r.get(7)?,
                ended_at: r.get(8)?,
                units: r
                    .get::<_, Option<String>>(9)?
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_string)
                    .collect(),
                failed: r.get(10)?,
            })
        })?;
        Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
    }

    fn step_reports(&self, build: BuildId) -> Result<Vec<kiln_domain::split::StepReport>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT j.name, t.step_name, t.cases, t.note FROM step_tests t \
             JOIN jobs j ON j.current_attempt = t.attempt_id \
             WHERE j.build_id = ?1 ORDER BY j.position, j.id, t.position",
        )?;
        let rows = stmt.query_map([build], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (job, step, cases, note) = row?;
            out.push(kiln_domain::split::StepReport {
                build_id: build,
                key: format!("{job}/{step}"),
                cases: serde_json::from_str(&cases).map_err(|e| corrupt("test cases", e))?,
                note,
            });
        }
        Ok(out)
    }

    fn create_build(&self, new: &NewBuild) -> Result<BuildDetail> {
        let now = now_millis();
        self.with_tx(|tx| insert_build(tx, new, now))
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
        self.with_tx(|tx| {
            let mut out = Recorded::default();
            for b in builds {
                match insert_build(tx, b, now) {
                    Ok(d) => out.created.push(d),
                    Err(StoreError::Duplicate { build }) => out.duplicates.push(build),
                    Err(e) => return Err(e),
                }
            }
            if supersede && let Some(newest) = out.created.last().map(|d| d.build.id) {
                let mut stmt = tx.prepare_cached(SUPERSEDED_SQL)?;
                let rows: Vec<(JobId, Option<AttemptId>)> = stmt
                    .query_map(params![repo, branch, newest], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<rusqlite::Result<_>>()?;
                for (job, attempt) in rows {
                    tx.execute(
                        "UPDATE jobs SET state = 'cancelled', message = ?1, finished_at = ?2 \
                         WHERE id = ?3",
                        params![format!("superseded by build {newest}"), now, job],
                    )?;
                    if let Some(a) = attempt {
                        tx.execute(
                            "UPDATE attempts SET state = 'superseded', finished_at = ?1 \
                             WHERE id = ?2 AND state IN ('offered', 'running')",
                            params![now, a],
                        )?;
                        out.to_cancel.push(a);
                    }
                    out.superseded.push(settle(tx, job, now)?);
                }
            }
            tx.execute(
                "INSERT INTO branch_cursors (repo, branch, head, updated_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (repo, branch) DO UPDATE SET head = excluded.head, \
                 updated_at = excluded.updated_at",
                params![repo, branch, head, now],
            )?;
            Ok(out)
        })
    }

    fn branch_cursor(&self, repo: &str, branch: &str) -> Result<Option<String>> {
        let conn = self.reader()?;
        Ok(conn
            .query_row(
                "SELECT head FROM branch_cursors WHERE repo = ?1 AND branch = ?2",
                params![repo, branch],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn get_build(&self, id: BuildId) -> Result<Option<BuildDetail>> {
        let conn = self.reader()?;
        load_detail(&conn, id)
    }

    fn get_build_record(&self, id: BuildId) -> Result<Option<Build>> {
        let conn = self.reader()?;
        load_build(&conn, id)
    }

    fn get_build_records(&self, ids: &[BuildId]) -> Result<Vec<Build>> {
        let conn = self.reader()?;
        ids.iter()
            .filter_map(|&id| load_build(&conn, id).transpose())
            .collect()
    }

    fn get_job(&self, id: JobId) -> Result<Option<Job>> {
        let conn = self.reader()?;
        load_job(&conn, id)
    }

    fn list_builds(&self, filter: &BuildFilter) -> Result<Vec<Build>> {
        let conn = self.reader()?;
        let mut sql = format!("SELECT {BUILD_COLUMNS} FROM builds WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(repo) = &filter.repo {
            args.push(repo.clone().into());
            sql.push_str(&format!(" AND repo = ?{}", args.len()));
        }
        if let Some(branch) = &filter.branch {
            args.push(branch.clone().into());
            sql.push_str(&format!(" AND branch = ?{}", args.len()));
        }
        if let Some(state) = filter.state {
            args.push(state.as_str().to_string().into());
            sql.push_str(&format!(" AND state = ?{}", args.len()));
        }
        if let Some(before) = filter.before {
            args.push((before.get() as i64).into());
            sql.push_str(&format!(" AND id < ?{}", args.len()));
        }
        args.push(i64::from(filter.limit).into());
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), build_from_row)?;
        rows.map(|r| finish_build(r?)).collect()
    }

    fn queued_jobs(&self, limit: u32) -> Result<Vec<Job>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' AND NOT EXISTS \
             (SELECT 1 FROM json_each(jobs.needs) n JOIN jobs d ON d.id = n.value \
              WHERE d.state != 'passed') ORDER BY id LIMIT ?1"
        ))?;
        let rows = stmt.query_map([i64::from(limit)], job_from_row)?;
        rows.map(|r| finish_job(r?)).collect()
    }

    fn metrics(&self) -> Result<StoreMetrics> {
        // One read transaction (every reader is one), so the counts agree.
        let tx = self.reader()?;
        let mut m = StoreMetrics {
            queued_by_labels: ready_by_labels(&tx)?,
            ..StoreMetrics::default()
        };
        let rows = {
            let mut stmt = tx.prepare_cached(crate::tallies::READ)?;
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
                .collect::<rusqlite::Result<Vec<_>>>()?
        };
        crate::tallies::into_metrics(rows, &mut m)?;
        Ok(m)
    }

    fn fold_tallies(&self) -> Result<u64> {
        // Most scrapes find nothing to fold: no write transaction for them.
        let any: bool =
            self.reader()?
                .query_row("SELECT EXISTS (SELECT 1 FROM tally_deltas)", [], |r| {
                    r.get(0)
                })?;
        if !any {
            return Ok(0);
        }
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO tallies (metric, k1, k2, n) \
                 SELECT metric, k1, k2, SUM(d) FROM tally_deltas WHERE true GROUP BY metric, k1, k2 \
                 ON CONFLICT (metric, k1, k2) DO UPDATE SET n = n + excluded.n",
                [],
            )?;
            Ok(tx.execute("DELETE FROM tally_deltas", [])? as u64)
        })
    }

    fn ready_by_labels(&self) -> Result<Vec<(BTreeMap<String, String>, u64)>> {
        let conn = self.reader()?;
        ready_by_labels(&conn)
    }

    fn assign_owned(
        &self,
        job: JobId,
        runner: RunnerId,
        runner_name: &str,
        owner: Option<&crate::Owner>,
    ) -> Result<Option<(AttemptId, Change)>> {
        let now = now_millis();
        self.with_tx(|tx| assign_tx(tx, job, runner, runner_name, owner, now))
    }

    fn assign_many(
        &self,
        batch: &[crate::AssignRequest],
    ) -> Vec<Result<Option<(AttemptId, Change)>>> {
        // One caller of the group commit with one savepoint per assignment: the round costs
        // one wait for one commit instead of one per assignment.
        let now = now_millis();
        self.writer.write_each(batch.len(), |tx, i| {
            let a = &batch[i];
            assign_tx(tx, a.job, a.runner, &a.runner_name, a.owner.as_ref(), now)
        })
    }

    fn start_attempt(&self, attempt: AttemptId) -> Result<Option<Change>> {
        let now = now_millis();
        self.with_tx(|tx| {
            let n = tx.execute(
                "UPDATE jobs SET state = 'running', started_at = ?1 \
                 WHERE current_attempt = ?2 AND state = 'assigned'",
                params![now, attempt],
            )?;
            if n == 0 {
                return Ok(None);
            }
            tx.execute(
                "UPDATE attempts SET state = 'running' WHERE id = ?1",
                [attempt],
            )?;
            let job: JobId = tx.query_row(
                "SELECT job_id FROM attempts WHERE id = ?1",
                [attempt],
                |r| r.get(0),
            )?;
            Ok(Some(settle(tx, job, now)?))
        })
    }

    fn record_step(&self, attempt: AttemptId, step: &StepResult) -> Result<bool> {
        self.with_tx(|tx| {
            let job: Option<JobId> = tx
                .query_row(
                    "SELECT id FROM jobs WHERE current_attempt = ?1 \
                     AND state IN ('assigned', 'running')",
                    [attempt],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(job) = job else {
                return Ok(false);
            };
            tx.execute(
                "INSERT INTO step_results (job_id, position, attempt_id, outcome, exit_code, \
                 duration_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (job_id, position) DO UPDATE SET attempt_id = excluded.attempt_id, \
                 outcome = excluded.outcome, exit_code = excluded.exit_code, \
                 duration_ms = excluded.duration_ms",
                params![
                    job,
                    step.index,
                    attempt,
                    step.outcome.as_str(),
                    step.exit_code,
                    step.duration_ms as i64
                ],
            )?;
            if !step.cases.is_empty() || !step.report_note.is_empty() {
                let steps: String =
                    tx.query_row("SELECT steps FROM jobs WHERE id = ?1", [job], |r| r.get(0))?;
                let steps: Vec<StepSpec> =
                    serde_json::from_str(&steps).map_err(|e| corrupt("job steps", e))?;
                let name = steps
                    .iter()
                    .find(|s| s.index == step.index)
                    .map(|s| s.name.clone())
                    .unwrap_or_else(|| format!("step {}", step.index));
                let cases =
                    serde_json::to_string(&step.cases).map_err(|e| corrupt("test cases", e))?;
                tx.execute(
                    "INSERT OR IGNORE INTO step_tests (attempt_id, position, step_name, cases, \
                     note) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![attempt, step.index, name, cases, step.report_note],
                )?;
            }
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
        self.with_tx(|tx| {
            let row: Option<(JobId, Option<AttemptId>, String)> = tx
                .query_row(
                    "SELECT j.id, j.current_attempt, j.state FROM attempts a \
                     JOIN jobs j ON j.id = a.job_id WHERE a.id = ?1",
                    [attempt],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let Some((job, current, job_state)) = row else {
                return Ok(Finish::Refused(format!("unknown attempt {attempt}")));
            };
            let job_state = parse_state(&job_state)?;
            if current == Some(attempt) && job_state.is_final() {
                let state =
                    tx.query_row("SELECT state FROM attempts WHERE id = ?1", [attempt], |r| {
                        attempt_state(r, 0)
                    })?;
                if state == AttemptState::Finished {
                    return Ok(Finish::AlreadyRecorded);
                }
            }
            // The compare-and-set: only the current attempt of a job that is out on a runner
            // may finish it (a lost attempt stays `current_attempt` of its queued job until
            // the job is given out again, and must not finish it).
            let n = tx.execute(
                "UPDATE jobs SET state = ?1, message = ?2, finished_at = ?3 \
                 WHERE id = ?4 AND current_attempt = ?5 AND state IN ('assigned', 'running')",
                params![state.as_str(), message, now, job, attempt],
            )?;
            if n == 0 {
                let reason = crate::refusal_reason(attempt, job, current, job_state);
                tx.execute(
                    "INSERT INTO refusals (attempt_id, job_id, reason, at) VALUES (?1, ?2, ?3, ?4)",
                    params![attempt, job, reason, now],
                )?;
                return Ok(Finish::Refused(reason));
            }
            tx.execute(
                "UPDATE attempts SET state = 'finished', finished_at = ?1 WHERE id = ?2",
                params![now, attempt],
            )?;
            crate::split::release_units(tx, attempt)?;
            Ok(Finish::Recorded(settle(tx, job, now)?))
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
        self.with_tx(|tx| {
            let row: Option<(JobId, u32)> = tx
                .query_row(
                    &format!(
                        "SELECT id, lost_attempts FROM jobs WHERE current_attempt = ?1 \
                         AND state NOT IN {FINAL_STATES_SQL}"
                    ),
                    [attempt],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((job, lost)) = row else {
                return Ok(None);
            };
            if let Some(me) = owner {
                let stored: Option<DispatcherId> =
                    tx.query_row("SELECT owner FROM attempts WHERE id = ?1", [attempt], |r| {
                        r.get(0)
                    })?;
                if stored != Some(me) {
                    return Ok(None);
                }
            }
            tx.execute(
                "UPDATE attempts SET state = 'lost', finished_at = ?1, note = ?2 WHERE id = ?3",
                params![now, reason, attempt],
            )?;
            crate::split::release_units(tx, attempt)?;
            if counts && lost + 1 >= max_lost {
                tx.execute(
                    "UPDATE jobs SET state = 'errored', lost_attempts = lost_attempts + 1, \
                     message = ?1, finished_at = ?2 WHERE id = ?3",
                    params![
                        format!("gave up after {} lost attempts; last: {reason}", lost + 1),
                        now,
                        job
                    ],
                )?;
            } else {
                tx.execute(
                    "UPDATE jobs SET state = 'queued', lost_attempts = lost_attempts + ?2, \
                     runner = NULL, started_at = NULL WHERE id = ?1",
                    params![job, i64::from(counts)],
                )?;
                tx.execute("DELETE FROM step_results WHERE job_id = ?1", [job])?;
            }
            Ok(Some(settle(tx, job, now)?))
        })
    }

    fn end_job(&self, job: JobId, state: JobState, message: &str) -> Result<Option<Change>> {
        let now = now_millis();
        self.with_tx(|tx| {
            let current: Option<Option<AttemptId>> = tx
                .query_row(
                    &format!(
                        "SELECT current_attempt FROM jobs WHERE id = ?1 \
                         AND state NOT IN {FINAL_STATES_SQL}"
                    ),
                    [job],
                    |r| r.get(0),
                )
                .optional()?;
            let Some(current) = current else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE jobs SET state = ?1, message = ?2, finished_at = ?3 WHERE id = ?4",
                params![state.as_str(), message, now, job],
            )?;
            if let Some(a) = current {
                tx.execute(
                    "UPDATE attempts SET state = 'superseded', finished_at = ?1, note = ?2 \
                     WHERE id = ?3 AND state IN ('offered', 'running')",
                    params![now, message, a],
                )?;
                crate::split::release_units(tx, a)?;
            }
            Ok(Some(settle(tx, job, now)?))
        })
    }

    fn get_attempt(&self, attempt: AttemptId) -> Result<Option<Attempt>> {
        let conn = self.reader()?;
        let row = conn
            .query_row(
                "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM attempts a \
                 JOIN jobs j ON j.id = a.job_id WHERE a.id = ?1",
                [attempt],
                attempt_from_row,
            )
            .optional()?;
        Ok(row)
    }

    fn unfinished_attempts(&self) -> Result<Vec<Attempt>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM jobs j \
             JOIN attempts a ON a.id = j.current_attempt \
             WHERE j.state IN ('assigned', 'running') ORDER BY a.id",
        )?;
        let rows = stmt.query_map([], attempt_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn register_dispatcher(&self, name: &str, now: Millis) -> Result<DispatcherId> {
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO dispatchers (name, started_at, seen_at) VALUES (?1, ?2, ?2)",
                params![name, now],
            )?;
            Ok(DispatcherId::new(tx.last_insert_rowid() as u64))
        })
    }

    fn dispatcher_seen(&self, id: DispatcherId, now: Millis) -> Result<bool> {
        let n = self.with_tx(|conn| {
            Ok(conn.execute(
                "UPDATE dispatchers SET seen_at = MAX(seen_at, ?1) WHERE id = ?2",
                params![now, id],
            )?)
        })?;
        Ok(n == 1)
    }

    fn dispatchers(&self) -> Result<Vec<crate::DispatcherRecord>> {
        let conn = self.reader()?;
        let mut stmt = conn
            .prepare_cached("SELECT id, name, started_at, seen_at FROM dispatchers ORDER BY id")?;
        let rows = stmt.query_map([], |r| {
            Ok(crate::DispatcherRecord {
                id: r.get(0)?,
                name: r.get(1)?,
                started_at: r.get(2)?,
                seen_at: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    fn adopt_attempts(&self, me: DispatcherId, dead_before: Millis) -> Result<Vec<Attempt>> {
        self.with_tx(|tx| {
            let adopted: Vec<Attempt> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state FROM jobs j \
                     JOIN attempts a ON a.id = j.current_attempt \
                     WHERE j.state IN ('assigned', 'running') \
                     AND (a.owner IS NULL OR (a.owner <> ?1 AND NOT EXISTS \
                       (SELECT 1 FROM dispatchers d WHERE d.id = a.owner AND d.seen_at >= ?2))) \
                     ORDER BY a.id",
                )?;
                let rows = stmt.query_map(params![me, dead_before], attempt_from_row)?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for a in &adopted {
                tx.execute(
                    "UPDATE attempts SET owner = ?1 WHERE id = ?2",
                    params![me, a.id],
                )?;
            }
            tx.execute(
                "DELETE FROM dispatchers WHERE seen_at < ?1 AND id <> ?2",
                params![dead_before - crate::FORGET_DISPATCHERS_MS, me],
            )?;
            Ok(adopted)
        })
    }

    fn owned_attempt(&self, attempt: AttemptId) -> Result<Option<crate::OwnedAttempt>> {
        let conn = self.reader()?;
        let row = conn
            .query_row(
                "SELECT a.id, a.job_id, j.build_id, a.runner_id, a.state, \
                 j.current_attempt = a.id AND j.state IN ('assigned', 'running'), \
                 a.owner, a.secret_hash FROM attempts a \
                 JOIN jobs j ON j.id = a.job_id WHERE a.id = ?1",
                [attempt],
                |r| {
                    Ok(crate::OwnedAttempt {
                        attempt: attempt_from_row(r)?,
                        current: r.get::<_, Option<bool>>(5)?.unwrap_or(false),
                        owner: r.get(6)?,
                        secret_hash: r.get(7)?,
                    })
                },
            )
            .optional()?;
        Ok(row)
    }

    fn claim_attempt(
        &self,
        attempt: AttemptId,
        runner: RunnerId,
        from: Option<DispatcherId>,
        to: &crate::Owner,
    ) -> Result<bool> {
        let n = self.with_tx(|conn| {
            Ok(conn.execute(
                "UPDATE attempts SET owner = ?1, secret_hash = ?2 \
                 WHERE id = ?3 AND runner_id = ?4 AND owner IS ?5 \
                 AND EXISTS (SELECT 1 FROM jobs j WHERE j.current_attempt = attempts.id \
                             AND j.state IN ('assigned', 'running'))",
                params![to.dispatcher, to.secret_hash, attempt, runner, from],
            )?)
        })?;
        Ok(n == 1)
    }

    fn set_runner_dispatcher(
        &self,
        runner: RunnerId,
        to: Option<DispatcherId>,
        by: DispatcherId,
    ) -> Result<()> {
        self.with_tx(|conn| {
            match to {
                Some(d) => conn.execute(
                    "UPDATE runners SET dispatcher = ?1 WHERE id = ?2",
                    params![d, runner],
                )?,
                None => conn.execute(
                    "UPDATE runners SET dispatcher = NULL WHERE id = ?1 AND dispatcher = ?2",
                    params![runner, by],
                )?,
            };
            Ok(())
        })
    }

    fn attached_runners(&self, alive_since: Millis) -> Result<Vec<(RunnerId, DispatcherId)>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT r.id, r.dispatcher FROM runners r JOIN dispatchers d ON d.id = r.dispatcher \
             WHERE d.seen_at >= ?1 ORDER BY r.id",
        )?;
        let rows = stmt.query_map([alive_since], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
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
        self.with_tx(|tx| {
            tx.execute(
                "INSERT INTO runners (name, labels, slots, version, last_seen) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (name) DO UPDATE SET \
                 labels = excluded.labels, slots = excluded.slots, version = excluded.version, \
                 last_seen = excluded.last_seen",
                params![name, labels_json, slots, version, now],
            )?;
            let id: RunnerId =
                tx.query_row("SELECT id FROM runners WHERE name = ?1", [name], |r| {
                    r.get(0)
                })?;
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
        self.with_tx(|conn| {
            conn.execute(
                "UPDATE runners SET last_seen = ?1 WHERE id = ?2",
                params![at, runner],
            )?;
            Ok(())
        })
    }

    fn forget_idle_runners(&self, before: Millis, keep: &[RunnerId]) -> Result<u64> {
        let keep = serde_json::to_string(keep).map_err(|e| corrupt("runner ids", e))?;
        let n = self.with_tx(|conn| {
            Ok(conn.execute(
                "DELETE FROM runners WHERE last_seen < ?1 \
             AND id NOT IN (SELECT value FROM json_each(?2)) \
             AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.runner_id = runners.id) \
             AND NOT EXISTS (SELECT 1 FROM dispatchers d WHERE d.id = runners.dispatcher \
                             AND d.seen_at >= ?1)",
                params![before, keep],
            )?)
        })?;
        Ok(n as u64)
    }

    fn list_runners(&self) -> Result<Vec<RunnerRecord>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT id, name, labels, slots, version, last_seen FROM runners ORDER BY name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, RunnerId>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, name, labels, slots, version, last_seen) = row?;
            out.push(RunnerRecord {
                id,
                name,
                labels: serde_json::from_str(&labels).map_err(|e| corrupt("labels", e))?,
                slots,
                version,
                last_seen,
            });
        }
        Ok(out)
    }

    fn set_runner_token(&self, name: &str, token_hash: Option<&str>) -> Result<bool> {
        let n = self.with_tx(|conn| {
            Ok(match token_hash {
                Some(h) => conn.execute(
                    "INSERT INTO runner_tokens (name, token_hash, created_at) VALUES (?1, ?2, ?3) \
                 ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash, \
                 created_at = excluded.created_at",
                    params![name, h, now_millis()],
                )?,
                // Revoked, not deleted: the row keeps runner authentication on (and this name out)
                // even when it was the last token.
                None => conn.execute(
                    "UPDATE runner_tokens SET token_hash = '' WHERE name = ?1 AND token_hash != ''",
                    [name],
                )?,
            })
        })?;
        Ok(n > 0)
    }

    fn runner_token_hash(&self, name: &str) -> Result<(Option<String>, bool)> {
        let conn = self.reader()?;
        let hash = conn
            .query_row(
                "SELECT token_hash FROM runner_tokens WHERE name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let any: bool = conn.query_row("SELECT EXISTS (SELECT 1 FROM runner_tokens)", [], |r| {
            r.get(0)
        })?;
        Ok((hash, any))
    }

    fn record_refusal(&self, attempt: AttemptId, reason: &str) -> Result<()> {
        let now = now_millis();
        self.with_tx(|conn| {
            conn.execute(
                "INSERT INTO refusals (attempt_id, job_id, reason, at) \
                 SELECT id, job_id, ?2, ?3 FROM attempts WHERE id = ?1",
                params![attempt, reason, now],
            )?;
            Ok(())
        })
    }

    fn refusals(&self, job: JobId) -> Result<Vec<(AttemptId, String)>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT attempt_id, reason FROM refusals WHERE job_id = ?1 ORDER BY id DESC",
        )?;
        let rows = stmt.query_map([job], |r| Ok((r.get(0)?, r.get::<_, String>(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

fn attempt_from_row(r: &Row<'_>) -> rusqlite::Result<Attempt> {
    Ok(Attempt {
        id: r.get(0)?,
        job_id: r.get(1)?,
        build_id: r.get(2)?,
        runner_id: r.get(3)?,
        state: attempt_state(r, 4)?,
    })
}

/// Column `idx` of `r` as an attempt state (a name the store does not know is a conversion
/// error: the file is corrupt or from a newer kiln).
fn attempt_state(r: &Row<'_>, idx: usize) -> rusqlite::Result<AttemptState> {
    let name: String = r.get(idx)?;
    name.parse().map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::testing::{Backend, TestStore, on_both_backends};
    use kiln_domain::NewJob;

    fn new_build(jobs: usize) -> NewBuild {
        NewBuild {
            repo: "/tmp/repo".into(),
            commit: "a".repeat(40),
            branch: "main".into(),
            trigger: "test".into(),
            jobs: (0..jobs)
                .map(|i| NewJob {
                    name: format!("job{i}"),
                    steps: vec![StepSpec {
                        name: "s".into(),
                        run: "true".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn runner(s: &dyn TestStore, name: &str) -> RunnerId {
        s.upsert_runner(name, &BTreeMap::new(), 1, "test")
            .unwrap()
            .id
    }

    fn case(name: &str, outcome: kiln_domain::split::UnitOutcome) -> kiln_domain::split::TestCase {
        kiln_domain::split::TestCase {
            name: name.into(),
            classname: "t".into(),
            outcome,
            skipped: false,
            duration_ms: 1,
            message: String::new(),
            body: String::new(),
            system_out: String::new(),
            system_err: String::new(),
        }
    }

    fn with_cases(cases: Vec<kiln_domain::split::TestCase>) -> StepResult {
        StepResult {
            index: 0,
            outcome: StepOutcome::Failed,
            exit_code: Some(1),
            duration_ms: 1,
            cases,
            report_note: String::new(),
        }
    }

    fn a_step_report_counts_once_and_only_for_the_current_attempt(b: Backend) {
        use kiln_domain::split::UnitOutcome;
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = s.create_build(&new_build(1)).unwrap();
        let job = d.jobs[0].id;
        let r1 = runner(s, "r1");
        assert!(s.step_reports(d.build.id).unwrap().is_empty());
        let (a1, _) = s.assign(job, r1, "r1").unwrap().unwrap();
        assert!(s.start_attempt(a1).unwrap().is_some());
        let first = with_cases(vec![case("a", UnitOutcome::Failed)]);
        assert!(s.record_step(a1, &first).unwrap());
        // A re-sent StepFinished (another list) records nothing more.
        let resent = with_cases(vec![case("b", UnitOutcome::Passed)]);
        assert!(s.record_step(a1, &resent).unwrap());
        let reports = s.step_reports(d.build.id).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].key, "job0/s");
        assert_eq!(reports[0].cases, first.cases);
        // The job runs again: the lost attempt's report no longer counts.
        s.requeue_attempt(a1, "runner lost", 3, true)
            .unwrap()
            .unwrap();
        let (a2, _) = s.assign(job, r1, "r1").unwrap().unwrap();
        assert!(s.start_attempt(a2).unwrap().is_some());
        assert!(s.step_reports(d.build.id).unwrap().is_empty());
        assert!(s.record_step(a2, &resent).unwrap());
        let reports = s.step_reports(d.build.id).unwrap();
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].cases, resent.cases);
    }

    fn build_lifecycle_and_fencing(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = s.create_build(&new_build(1)).unwrap();
        assert_eq!(d.build.state, JobState::Queued);
        let job = d.jobs[0].id;
        let r1 = runner(s, "r1");
        let r2 = runner(s, "r2");
        let (a1, ch) = s.assign(job, r1, "r1").unwrap().unwrap();
        assert_eq!(ch.job_state, JobState::Assigned);
        assert_eq!(ch.build_state, JobState::Running);
        // A second assignment of the same job is refused while it is not queued.
        assert!(s.assign(job, r2, "r2").unwrap().is_none());
        assert!(s.start_attempt(a1).unwrap().is_some());
        // The runner is lost: the job is queued again and given to r2.
        let ch = s
            .requeue_attempt(a1, "runner lost", 3, true)
            .unwrap()
            .unwrap();
        assert_eq!(ch.job_state, JobState::Queued);
        let (a2, _) = s.assign(job, r2, "r2").unwrap().unwrap();
        // The old attempt's late result is refused and recorded.
        match s.finish_attempt(a1, JobState::Failed, None).unwrap() {
            Finish::Refused(why) => assert!(why.contains("not the current attempt"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert!(
            !s.record_step(
                a1,
                &StepResult {
                    index: 0,
                    outcome: StepOutcome::Failed,
                    exit_code: Some(1),
                    duration_ms: 1,
                    cases: Vec::new(),
                    report_note: String::new(),
                }
            )
            .unwrap()
        );
        let ch = match s.finish_attempt(a2, JobState::Passed, None).unwrap() {
            Finish::Recorded(ch) => ch,
            other => panic!("{other:?}"),
        };
        assert!(ch.build_changed);
        assert_eq!(ch.build_state, JobState::Passed);
        // Re-sent result: idempotent. Any other result: refused.
        assert_eq!(
            s.finish_attempt(a2, JobState::Passed, None).unwrap(),
            Finish::AlreadyRecorded
        );
        assert!(matches!(
            s.finish_attempt(a2, JobState::Failed, None).unwrap(),
            Finish::AlreadyRecorded
        ));
        let d = s.get_build(d.build.id).unwrap().unwrap();
        assert_eq!(d.jobs[0].state, JobState::Passed);
        assert_eq!(d.jobs[0].attempts, 2);
        assert_eq!(d.jobs[0].lost_attempts, 1);
        assert_eq!(s.refusals(job).unwrap().len(), 1);
        crate::testing::check_tallies(s);
    }

    fn runners_that_never_held_work_are_forgotten(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = s.create_build(&new_build(1)).unwrap();
        let worker = runner(s, "worker");
        let ghost = runner(s, "ghost");
        let attached = runner(s, "attached");
        s.assign(d.jobs[0].id, worker, "worker").unwrap().unwrap();
        // Seen after the cutoff: kept.
        assert_eq!(s.forget_idle_runners(0, &[]).unwrap(), 0);
        let later = now_millis() + 1;
        assert_eq!(s.forget_idle_runners(later, &[attached]).unwrap(), 1);
        let names: Vec<String> = s
            .list_runners()
            .unwrap()
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(names, ["attached", "worker"]);
        // A forgotten name registers again as a new runner.
        assert_ne!(runner(s, "ghost"), ghost);
    }

    fn lost_too_often_errors(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = s.create_build(&new_build(1)).unwrap();
        let job = d.jobs[0].id;
        let r = runner(s, "r");
        for _ in 0..2 {
            let (a, _) = s.assign(job, r, "r").unwrap().unwrap();
            s.requeue_attempt(a, "lost", 3, true).unwrap();
        }
        let (a, _) = s.assign(job, r, "r").unwrap().unwrap();
        let ch = s.requeue_attempt(a, "lost", 3, true).unwrap().unwrap();
        assert_eq!(ch.job_state, JobState::Errored);
        assert_eq!(ch.build_state, JobState::Errored);
        crate::testing::check_tallies(s);
    }

    fn list_filters_and_pages(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        for i in 0..5 {
            let mut b = new_build(1);
            b.branch = if i % 2 == 0 { "main" } else { "dev" }.into();
            s.create_build(&b).unwrap();
        }
        let all = s
            .list_builds(&BuildFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 5);
        assert!(all[0].id > all[1].id);
        let main = s
            .list_builds(&BuildFilter {
                branch: Some("main".into()),
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(main.len(), 2);
        let rest = s
            .list_builds(&BuildFilter {
                branch: Some("main".into()),
                before: Some(main[1].id),
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rest.len(), 1);
        let queued = s
            .list_builds(&BuildFilter {
                state: Some(JobState::Queued),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(queued.len(), 5);
    }

    #[test]
    fn errored_build_has_no_jobs_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        let id = {
            let s = SqliteStore::open(&path).unwrap();
            let mut b = new_build(1);
            b.error = Some(".kiln.yml:2:3: unknown field".into());
            let d = s.create_build(&b).unwrap();
            assert!(d.jobs.is_empty());
            assert_eq!(d.build.state, JobState::Errored);
            s.create_build(&new_build(2)).unwrap();
            d.build.id
        };
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(
            s.get_build(id).unwrap().unwrap().build.error.as_deref(),
            Some(".kiln.yml:2:3: unknown field")
        );
        assert_eq!(s.queued_jobs(10).unwrap().len(), 2);
    }

    fn dependents_wait_and_are_skipped_when_a_need_fails(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let mut b = new_build(4);
        b.jobs[1].needs = vec![0];
        b.jobs[2].needs = vec![1];
        // job 3 is independent.
        let d = s.create_build(&b).unwrap();
        let ids: Vec<JobId> = d.jobs.iter().map(|j| j.id).collect();
        assert_eq!(d.jobs[2].needs, vec![ids[1]]);
        let queued: Vec<JobId> = s.queued_jobs(10).unwrap().iter().map(|j| j.id).collect();
        assert_eq!(queued, vec![ids[0], ids[3]]);
        let r = runner(s, "r");
        let (a, _) = s.assign(ids[0], r, "r").unwrap().unwrap();
        let ch = match s.finish_attempt(a, JobState::Failed, None).unwrap() {
            Finish::Recorded(ch) => ch,
            other => panic!("{other:?}"),
        };
        assert_eq!(ch.skipped, vec![ids[1], ids[2]]);
        let d = s.get_build(d.build.id).unwrap().unwrap();
        assert_eq!(d.jobs[2].state, JobState::Skipped);
        assert_eq!(d.build.state, JobState::Running);
        let queued: Vec<JobId> = s.queued_jobs(10).unwrap().iter().map(|j| j.id).collect();
        assert_eq!(queued, vec![ids[3]]);
        crate::testing::check_tallies(s);
    }

    fn same_commit_and_pipeline_is_built_once_unless_retried(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let mut b = new_build(1);
        b.pipeline_hash = "p1".into();
        let first = s.create_build(&b).unwrap();
        match s.create_build(&b) {
            Err(StoreError::Duplicate { build }) => assert_eq!(build, first.build.id),
            other => panic!("{other:?}"),
        }
        b.retry_of = Some(first.build.id);
        assert!(s.create_build(&b).is_ok());
        b.retry_of = None;
        b.pipeline_hash = "p2".into();
        assert!(s.create_build(&b).is_ok());
    }

    fn a_builds_parameters_are_stored_with_it(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let mut b = new_build(1);
        b.params = [("GREETING", "hi \"there\""), ("EMPTY", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let made = s.create_build(&b).unwrap();
        assert_eq!(made.build.params, b.params);
        let read = s.get_build(made.build.id).unwrap().unwrap();
        assert_eq!(read.build.params, b.params);
        // The row alone (what an assignment reads) is the same build.
        let row = s.get_build_record(made.build.id).unwrap().unwrap();
        assert_eq!(row, read.build);
        assert!(
            s.get_build_record(BuildId::new(made.build.id.get() + 1000))
                .unwrap()
                .is_none()
        );
        let listed = s.list_builds(&BuildFilter {
            limit: 10,
            ..BuildFilter::default()
        });
        assert_eq!(listed.unwrap()[0].params, b.params);
        let plain = s.create_build(&new_build(1)).unwrap();
        assert!(plain.build.params.is_empty());
        // Several rows at once: those found, a missing id left out.
        let missing = BuildId::new(plain.build.id.get() + 1000);
        let mut rows = s
            .get_build_records(&[plain.build.id, missing, made.build.id])
            .unwrap();
        rows.sort_by_key(|b| b.id);
        assert_eq!(rows, vec![read.build.clone(), plain.build.clone()]);
        assert!(s.get_build_records(&[]).unwrap().is_empty());
    }

    fn record_commits_moves_the_cursor_and_supersedes(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let mk = |c: char| {
            let mut b = new_build(1);
            b.commit = c.to_string().repeat(40);
            b.pipeline_hash = "p".into();
            b
        };
        let r = s
            .record_commits(
                "/tmp/repo",
                "main",
                &[mk('a'), mk('b')],
                &"b".repeat(40),
                false,
            )
            .unwrap();
        assert_eq!(r.created.len(), 2);
        assert_eq!(
            s.branch_cursor("/tmp/repo", "main").unwrap(),
            Some("b".repeat(40))
        );
        // A second observer reporting overlapping commits creates only the new one.
        let r = s
            .record_commits(
                "/tmp/repo",
                "main",
                &[mk('b'), mk('c')],
                &"c".repeat(40),
                true,
            )
            .unwrap();
        assert_eq!(r.duplicates.len(), 1);
        assert_eq!(r.created.len(), 1);
        // With supersede, the older unfinished builds of the branch ended.
        assert_eq!(r.superseded.len(), 2);
        let newest = r.created[0].build.id;
        let all = s
            .list_builds(&BuildFilter {
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        for b in all {
            let want = if b.id == newest {
                JobState::Queued
            } else {
                JobState::Cancelled
            };
            assert_eq!(b.state, want, "build {}", b.id);
        }
    }

    fn cancel_supersedes(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = s.create_build(&new_build(2)).unwrap();
        let r = runner(s, "r");
        let (a, _) = s.assign(d.jobs[0].id, r, "r").unwrap().unwrap();
        s.end_job(d.jobs[0].id, JobState::Cancelled, "by user")
            .unwrap()
            .unwrap();
        let ch = s
            .end_job(d.jobs[1].id, JobState::Cancelled, "by user")
            .unwrap()
            .unwrap();
        assert_eq!(ch.build_state, JobState::Cancelled);
        assert!(
            s.end_job(d.jobs[1].id, JobState::Cancelled, "again")
                .unwrap()
                .is_none()
        );
        assert!(matches!(
            s.finish_attempt(a, JobState::Passed, None).unwrap(),
            Finish::Refused(_)
        ));
        crate::testing::check_tallies(s);
    }

    on_both_backends!(
        a_step_report_counts_once_and_only_for_the_current_attempt,
        build_lifecycle_and_fencing,
        runners_that_never_held_work_are_forgotten,
        lost_too_often_errors,
        list_filters_and_pages,
        dependents_wait_and_are_skipped_when_a_need_fails,
        same_commit_and_pipeline_is_built_once_unless_retried,
        a_builds_parameters_are_stored_with_it,
        record_commits_moves_the_cursor_and_supersedes,
        cancel_supersedes,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod delivery_tests {
    use super::*;
    use crate::testing::{Backend, TestStore, on_both_backends};
    use crate::{DeliveryResult, DeliveryState, Mark, NewDelivery};

    fn delivery(id: &str, event: &str, target: &str, supersedes: bool) -> NewDelivery {
        NewDelivery {
            delivery_id: id.into(),
            event: event.into(),
            target: target.into(),
            payload: format!("{{\"event\":\"{event}\"}}"),
            supersedes,
        }
    }

    fn build(s: &dyn TestStore, commit: char) -> BuildDetail {
        s.create_build(&crate::testing::one_job_build(
            &commit.to_string().repeat(40),
        ))
        .unwrap()
    }

    /// Planning is idempotent per (build, event, target), marks make a build planned, due
    /// deliveries are leased, tries are counted, and a newer status supersedes a pending one.
    fn deliveries_are_planned_once_leased_and_recorded(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let b = build(s, 'a').build.id;
        assert_eq!(s.unplanned_builds(0, 10).unwrap(), vec![b]);
        let plan = [
            delivery("d1", "queued", "status x", true),
            delivery("d2", "queued", "webhook y", false),
        ];
        assert_eq!(s.plan_deliveries(b, Mark::Queued, &plan).unwrap(), 2);
        // Re-planned after a "crash": nothing new (another random id changes nothing).
        let again = [delivery("d9", "queued", "status x", true)];
        assert_eq!(s.plan_deliveries(b, Mark::Queued, &again).unwrap(), 0);
        assert_eq!(s.planned_marks(b).unwrap(), vec![Mark::Queued]);
        assert!(s.unplanned_builds(0, 10).unwrap().is_empty());

        let now = now_millis();
        let due = s.take_due_deliveries(now, now + 10_000, 10).unwrap();
        assert_eq!(due.len(), 2);
        // Leased: not due again until the lease ends.
        assert!(
            s.take_due_deliveries(now, now + 10_000, 10)
                .unwrap()
                .is_empty()
        );
        assert_eq!(s.next_delivery_at().unwrap(), Some(now + 10_000));
        let retry = DeliveryResult::Retry {
            next_at: now,
            error: "503".into(),
        };
        assert!(s.record_delivery(due[1].key, &retry, now).unwrap());
        let due2 = s.take_due_deliveries(now, now + 10_000, 10).unwrap();
        assert_eq!(due2.len(), 1);
        assert_eq!(due2[0].attempts, 1);
        assert!(
            s.record_delivery(due2[0].key, &DeliveryResult::Delivered, now)
                .unwrap()
        );
        // A delivered one is not recorded again.
        assert!(
            !s.record_delivery(due2[0].key, &DeliveryResult::Delivered, now)
                .unwrap()
        );

        // The status of the finished build supersedes the pending one.
        let fin = [delivery("d3", "finished", "status x", true)];
        assert_eq!(s.plan_deliveries(b, Mark::Finished, &fin).unwrap(), 1);
        let all = s.deliveries(b).unwrap();
        let states: Vec<_> = all
            .iter()
            .map(|d| (d.delivery_id.as_str(), d.state))
            .collect();
        assert_eq!(
            states,
            vec![
                ("d1", DeliveryState::Superseded),
                ("d2", DeliveryState::Delivered),
                ("d3", DeliveryState::Pending),
            ]
        );
        assert!(
            !s.record_delivery(all[0].key, &DeliveryResult::Delivered, now)
                .unwrap()
        );
        let failed = DeliveryResult::Failed {
            error: "gone".into(),
        };
        assert!(s.record_delivery(all[2].key, &failed, now).unwrap());
        assert_eq!(s.next_delivery_at().unwrap(), None);
        crate::testing::check_tallies(s);
    }

    /// A build that starts and finishes needs planning again for each new mark; builds older
    /// than the window are left alone.
    fn unplanned_builds_follow_the_builds_life(b: Backend) {
        let opened = b.open();
        let s: &dyn TestStore = &*opened;
        let d = build(s, 'b');
        let b = d.build.id;
        s.plan_deliveries(b, Mark::Queued, &[]).unwrap();
        assert!(s.unplanned_builds(0, 10).unwrap().is_empty());
        let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
        let (attempt, _) = s.assign(d.jobs[0].id, r, "r").unwrap().unwrap();
        s.start_attempt(attempt).unwrap();
        assert_eq!(s.unplanned_builds(0, 10).unwrap(), vec![b]);
        s.plan_deliveries(b, Mark::Started, &[]).unwrap();
        assert!(s.unplanned_builds(0, 10).unwrap().is_empty());
        s.finish_attempt(attempt, JobState::Passed, None).unwrap();
        assert_eq!(s.unplanned_builds(0, 10).unwrap(), vec![b]);
        assert!(
            s.unplanned_builds(now_millis() + 1000, 10)
                .unwrap()
                .is_empty()
        );
        s.plan_deliveries(b, Mark::Finished, &[]).unwrap();
        assert!(s.unplanned_builds(0, 10).unwrap().is_empty());
    }

    /// A database made before the tallies (migration 13) gets them counted from its rows.
    #[test]
    fn the_tallies_migration_counts_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.db");
        {
            let s = SqliteStore::open(&path).unwrap();
            let d = build(&s, 'c');
            let plan = [
                delivery("m1", "queued", "webhook y", false),
                delivery("m2", "queued", "mail a@b", false),
            ];
            s.plan_deliveries(d.build.id, Mark::Queued, &plan).unwrap();
            let r = s.upsert_runner("r", &BTreeMap::new(), 1, "t").unwrap().id;
            let (a, _) = s.assign(d.jobs[0].id, r, "r").unwrap().unwrap();
            s.requeue_attempt(a, "lost", 3, true).unwrap();
            // Back to before migration 13.
            s.with_tx(|c| {
                Ok(c.execute_batch(
                    "DROP TABLE tallies; DROP TABLE tally_deltas; \
                     DROP TRIGGER jobs_tally_insert; DROP TRIGGER jobs_tally_update; \
                     DROP TRIGGER jobs_tally_delete; DROP TRIGGER unit_tries_tally_insert; \
                     DROP TRIGGER unit_tries_tally_update; DROP TRIGGER unit_tries_tally_delete; \
                     DROP TRIGGER deliveries_tally_insert; DROP TRIGGER deliveries_tally_update; \
                     DROP TRIGGER deliveries_tally_delete; \
                     ALTER TABLE deliveries DROP COLUMN kind; PRAGMA user_version = 12;",
                )?)
            })
            .unwrap();
        }
        let s = SqliteStore::open(&path).unwrap();
        let m = s.metrics().unwrap();
        assert_eq!(m.lost_attempts, 1);
        assert_eq!(m.deliveries.len(), 2);
        crate::testing::check_tallies(&s);
    }

    on_both_backends!(
        deliveries_are_planned_once_leased_and_recorded,
        unplanned_builds_follow_the_builds_life,
    );
}

/// The queries whose cost must not grow with the builds stored take the index meant for them
/// (`kiln-bench scale` measures the costs; this keeps the plans from sliding back).
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod plan_tests {
    use super::*;

    fn plan(s: &SqliteStore, sql: &str) -> String {
        let conn = s.reader().unwrap();
        let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
        let rows = stmt
            .query_map(params!["/tmp/repo", "a".repeat(40), "p"], |r| {
                r.get::<_, String>(3)
            })
            .unwrap();
        rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn dedupe_and_supersede_do_not_walk_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("kiln.db")).unwrap();
        let dedupe = plan(&s, DEDUPE_SQL);
        assert!(dedupe.contains("USING INDEX builds_once"), "{dedupe}");
        let superseded = plan(&s, SUPERSEDED_SQL);
        let mut lines = superseded.lines();
        assert!(
            lines
                .next()
                .unwrap()
                .contains("SEARCH j USING INDEX jobs_by_state"),
            "{superseded}"
        );
        assert!(
            lines
                .next()
                .unwrap()
                .contains("SEARCH b USING INTEGER PRIMARY KEY"),
            "{superseded}"
        );
    }
}

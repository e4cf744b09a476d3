//! The store's test suite runs against both backends: a behavioural test is a function of a
//! [`Backend`], listed in [`on_both_backends!`], which makes one `#[test]` per backend
//! (`on_sqlite::NAME` on a SQLite file in a temp dir, `on_postgres::NAME` on a new database of
//! the test process's throwaway PostgreSQL cluster, `kiln-pgtest`). Tests of what only one
//! backend has (SQLite files, reopening, its migrations) stay plain `#[test]`s.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ops::Deref;

use crate::{JobLogs, LogStore, PgLogStore, PgStore, Result, SqliteStore, Store};

/// What the shared tests need beyond [`Store`]: a look at the unit history, a statement to
/// bend stored data (SQL both backends understand), and seeding.
pub(crate) trait TestStore: Store {
    /// The recorded durations of a unit of (repository, split key).
    fn history(&self, repo: &str, key: &str, unit: &str) -> Vec<u64>;
    /// Runs one SQL statement (in the dialect both backends share).
    fn exec(&self, sql: &str);
    /// Rows of a query whose columns are all text (`CAST(x AS TEXT)` where they are not).
    fn text_rows(&self, sql: &str) -> Vec<Vec<String>>;
    /// See [`SqliteStore::seed_unit_durations`].
    fn seed_unit_durations(&self, repo: &str, key: &str, durations: &[(String, u64)])
    -> Result<()>;
}

impl TestStore for SqliteStore {
    fn history(&self, repo: &str, key: &str, unit: &str) -> Vec<u64> {
        crate::split::history_durations(&self.reader().unwrap(), repo, key, unit).unwrap()
    }

    fn exec(&self, sql: &str) {
        self.with_tx(|c| Ok(c.execute_batch(sql)?)).unwrap();
    }

    fn text_rows(&self, sql: &str) -> Vec<Vec<String>> {
        let conn = self.reader().unwrap();
        let mut stmt = conn.prepare(sql).unwrap();
        let n = stmt.column_count();
        stmt.query_map([], |r| (0..n).map(|i| r.get::<_, String>(i)).collect())
            .unwrap()
            .collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
    }

    fn seed_unit_durations(
        &self,
        repo: &str,
        key: &str,
        durations: &[(String, u64)],
    ) -> Result<()> {
        SqliteStore::seed_unit_durations(self, repo, key, durations)
    }
}

impl TestStore for PgStore {
    fn history(&self, repo: &str, key: &str, unit: &str) -> Vec<u64> {
        self.read(|db| crate::pg::split_history(db, repo, key, unit))
            .unwrap()
    }

    fn exec(&self, sql: &str) {
        self.write(|db| db.execute(sql, &[])).unwrap();
    }

    fn text_rows(&self, sql: &str) -> Vec<Vec<String>> {
        self.read(|db| {
            Ok(db
                .query(sql, &[])?
                .iter()
                .map(|r| (0..r.len()).map(|i| r.get::<_, String>(i)).collect())
                .collect())
        })
        .unwrap()
    }

    fn seed_unit_durations(
        &self,
        repo: &str,
        key: &str,
        durations: &[(String, u64)],
    ) -> Result<()> {
        PgStore::seed_unit_durations(self, repo, key, durations)
    }
}

/// Which store a shared test runs on.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A fresh, empty store (and the temp dir a SQLite file lives in).
pub(crate) struct Opened {
    store: Box<dyn TestStore>,
    /// Where another handle opens the same database: a SQLite file or a PostgreSQL URL.
    place: String,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl Opened {
    /// Another store on the same database, as a second dispatcher would open it (its own
    /// connection, or pool).
    pub(crate) fn another(&self) -> Box<dyn TestStore> {
        match self.backend {
            Backend::Sqlite => {
                Box::new(SqliteStore::open(std::path::Path::new(&self.place)).unwrap())
            }
            Backend::Postgres => Box::new(PgStore::connect(&self.place).unwrap()),
        }
    }
}

impl Deref for Opened {
    type Target = dyn TestStore;
    fn deref(&self) -> &Self::Target {
        self.store.as_ref()
    }
}

impl Backend {
    /// A fresh, empty store of this backend.
    pub(crate) fn open(self) -> Opened {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("kiln.db");
                let s = SqliteStore::open(&path).unwrap();
                Opened {
                    store: Box::new(s),
                    place: path.to_string_lossy().into_owned(),
                    backend: self,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
                Opened {
                    store: Box::new(PgStore::connect(&url).unwrap()),
                    place: url,
                    backend: self,
                    _dir: None,
                }
            }
        }
    }
}

/// A fresh, empty log store of a backend: the files of SQLite mode ([`LogStore`], in a temp
/// dir) or the database's ([`PgLogStore`], on a new database).
pub(crate) struct OpenedLogs {
    logs: Box<dyn JobLogs>,
    /// Where another handle opens the same logs: a directory or a PostgreSQL URL.
    place: String,
    backend: Backend,
    _dir: Option<tempfile::TempDir>,
}

impl OpenedLogs {
    /// Another handle on the same logs, as a second dispatcher would open it (PostgreSQL: its
    /// own pool; files: a second `LogStore` on the directory, which one process never does
    /// while the other writes).
    pub(crate) fn another(&self) -> Box<dyn JobLogs> {
        match self.backend {
            Backend::Sqlite => Box::new(LogStore::open(&self.place).unwrap()),
            Backend::Postgres => Box::new(PgLogStore::connect(&self.place).unwrap()),
        }
    }

    /// Where the logs are: a directory or a PostgreSQL URL.
    pub(crate) fn place(&self) -> &str {
        &self.place
    }
}

impl Deref for OpenedLogs {
    type Target = dyn JobLogs;
    fn deref(&self) -> &Self::Target {
        self.logs.as_ref()
    }
}

impl Backend {
    /// A fresh, empty log store of this backend.
    pub(crate) fn open_logs(self) -> OpenedLogs {
        match self {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("logs");
                OpenedLogs {
                    logs: Box::new(LogStore::open(&path).unwrap()),
                    place: path.to_string_lossy().into_owned(),
                    backend: self,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let url = kiln_pgtest::database().expect("a throwaway PostgreSQL database");
                OpenedLogs {
                    logs: Box::new(PgLogStore::connect(&url).unwrap()),
                    place: url,
                    backend: self,
                    _dir: None,
                }
            }
        }
    }
}

/// One `#[test]` per backend for each listed `fn NAME(b: Backend)` of the calling module.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::testing::Backend::Sqlite)
                }
            )*
        }
        mod on_postgres {
            $(
                #[test]
                fn $name() {
                    super::$name($crate::testing::Backend::Postgres)
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

/// Checks that what `/metrics` reads from the store's tallies is what counting the rows gives,
/// before and after folding the deltas (call it at the end of tests that change many rows).
pub(crate) fn check_tallies(s: &dyn TestStore) {
    use std::collections::BTreeMap;
    let counted = || {
        let jobs: Vec<(String, u64)> = s
            .text_rows(
                "SELECT state, CAST(COUNT(*) AS TEXT) FROM jobs GROUP BY state ORDER BY state",
            )
            .into_iter()
            .map(|r| (r[0].clone(), r[1].parse().unwrap()))
            .collect();
        let lost: u64 = s
            .text_rows("SELECT CAST(COALESCE(SUM(lost_attempts), 0) AS TEXT) FROM jobs")[0][0]
            .parse()
            .unwrap();
        let units: Vec<(String, bool, u64)> = s
            .text_rows(
                "SELECT COALESCE(outcome, ''), CASE WHEN try_number > 1 THEN 'retry' ELSE 'first' END, \
                 CAST(COUNT(*) AS TEXT) FROM unit_tries WHERE state = 'ended' GROUP BY 1, 2 ORDER BY 1, 2",
            )
            .into_iter()
            .map(|r| (r[0].clone(), r[1] == "retry", r[2].parse().unwrap()))
            .collect();
        let mut deliveries: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
        for r in s.text_rows("SELECT target, state, CAST(attempts AS TEXT) FROM deliveries") {
            let kind = r[0].split(' ').next().unwrap().to_string();
            let e = deliveries.entry((kind, r[1].clone())).or_default();
            e.0 += 1;
            e.1 += r[2].parse::<u64>().unwrap();
        }
        (jobs, lost, units, deliveries)
    };
    let read = || {
        let m = s.metrics().unwrap();
        let mut jobs: Vec<(String, u64)> = m
            .jobs_by_state
            .iter()
            .map(|(st, n)| (st.to_string(), *n))
            .collect();
        jobs.sort();
        let mut units: Vec<(String, bool, u64)> = m
            .unit_tries
            .iter()
            .map(|(o, retry, n)| (o.as_str().to_string(), *retry, *n))
            .collect();
        units.sort();
        let deliveries: BTreeMap<(String, String), (u64, u64)> = m
            .deliveries
            .iter()
            .map(|d| ((d.kind.clone(), d.state.to_string()), (d.count, d.tries)))
            .collect();
        (jobs, m.lost_attempts, units, deliveries)
    };
    let want = counted();
    assert_eq!(read(), want, "tallies with their deltas");
    s.fold_tallies().unwrap();
    assert_eq!(read(), want, "tallies folded");
    assert_eq!(s.fold_tallies().unwrap(), 0, "nothing left to fold");
    assert_eq!(read(), want, "tallies folded twice");
}

/// A build of `commit` with one job of one step (`true`).
pub(crate) fn one_job_build(commit: &str) -> kiln_domain::NewBuild {
    use kiln_domain::{NewBuild, NewJob, StepSpec};
    NewBuild {
        repo: "/tmp/repo".into(),
        commit: commit.into(),
        branch: "main".into(),
        trigger: "test".into(),
        jobs: vec![NewJob {
            name: "j".into(),
            steps: vec![StepSpec {
                name: "s".into(),
                run: "true".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        pipeline_hash: commit.into(),
        ..Default::default()
    }
}

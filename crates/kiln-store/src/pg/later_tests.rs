//! Writes held back to go with a transaction's next request (`Db::execute_later`): they
//! commit with the transaction, the statements after them see them, and one that fails fails
//! the transaction, commits nothing of it, and is the error returned.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio_postgres::error::SqlState;

use super::{Db, PgStore};
use crate::StoreError;

/// A store on a new database, with a table `t (id primary key, v > 0)`.
fn store() -> PgStore {
    let store = PgStore::connect(&kiln_pgtest::database().unwrap()).unwrap();
    store
        .write_committed(|db| {
            db.batch("CREATE TABLE t (id BIGINT PRIMARY KEY, v BIGINT NOT NULL CHECK (v > 0))")
        })
        .unwrap();
    store
}

fn rows(store: &PgStore) -> Vec<(i64, i64)> {
    store
        .read(|db| {
            Ok(db
                .query("SELECT id, v FROM t ORDER BY id", &[])?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
        .unwrap()
}

/// Holds back the insert of row (`id`, `v`).
fn hold(db: &Db<'_>, id: i64, v: i64) -> crate::Result<()> {
    db.execute_later(
        "INSERT INTO t (id, v) VALUES ($1, $2)",
        vec![Box::new(id), Box::new(v)],
    )
}

fn is_check_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Postgres(e) if e.code() == Some(&SqlState::CHECK_VIOLATION))
}

#[test]
fn a_transaction_of_held_back_writes_only_commits_them() {
    let store = store();
    store
        .write_committed(|db| {
            hold(db, 1, 10)?;
            hold(db, 2, 20)
        })
        .unwrap();
    assert_eq!(rows(&store), vec![(1, 10), (2, 20)]);
}

#[test]
fn the_statement_after_a_held_back_write_sees_it() {
    let store = store();
    let seen = store
        .write_committed(|db| {
            db.execute("INSERT INTO t (id, v) VALUES (1, 1)", &[])?;
            db.execute_later(
                "UPDATE t SET v = v + 41 WHERE id = $1",
                vec![Box::new(1i64)],
            )?;
            let v: i64 = db.query_one("SELECT v FROM t WHERE id = 1", &[])?.get(0);
            Ok(v)
        })
        .unwrap();
    assert_eq!(seen, 42);
    assert_eq!(rows(&store), vec![(1, 42)]);
}

#[test]
fn a_failing_held_back_write_before_commit_commits_nothing_and_is_the_error() {
    let store = store();
    let err = store
        .write_committed(|db| {
            db.execute("INSERT INTO t (id, v) VALUES (1, 1)", &[])?;
            hold(db, 2, -1)
        })
        .unwrap_err();
    assert!(is_check_violation(&err), "{err:?}");
    assert_eq!(rows(&store), vec![]);
    // The store goes on: the next transaction commits.
    store
        .write_committed(|db| db.execute("INSERT INTO t (id, v) VALUES (3, 3)", &[]))
        .unwrap();
    assert_eq!(rows(&store), vec![(3, 3)]);
}

#[test]
fn a_failing_held_back_write_is_the_error_of_the_statement_after_it() {
    let store = store();
    let err = store
        .write_committed(|db| {
            hold(db, 1, -1)?;
            // Refused by the server as part of an aborted transaction (25P02); the cause
            // returned is the write's.
            db.query("SELECT v FROM t", &[])
        })
        .unwrap_err();
    assert!(is_check_violation(&err), "{err:?}");
    assert_eq!(rows(&store), vec![]);
}

#[test]
fn a_transaction_that_fails_after_holding_a_write_back_never_sends_it() {
    let store = store();
    let err = store
        .write_committed(|db| {
            db.execute("INSERT INTO t (id, v) VALUES (1, 1)", &[])?;
            hold(db, 2, 2)?;
            Err::<(), _>(StoreError::Corrupt("the caller's own failure".into()))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert_eq!(rows(&store), vec![]);
    // Also when nothing but the held-back write was written (no BEGIN sent yet).
    let err = store
        .write_committed(|db| {
            hold(db, 2, 2)?;
            Err::<(), _>(StoreError::Corrupt("the caller's own failure".into()))
        })
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert_eq!(rows(&store), vec![]);
}

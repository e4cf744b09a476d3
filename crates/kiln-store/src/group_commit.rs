//! Group commit for [`crate::SqliteStore`]: the writes of concurrent callers share one
//! transaction and one fsync.
//!
//! With `synchronous=FULL` every commit waits for an fsync, and SQLite has one writer at a
//! time, so one transaction per store call caps the store at one call per fsync, whatever
//! the number of callers (a runner session's accept, step and result, the scheduler's
//! assignments, submits all queued on the one connection). Here a call does not commit alone:
//!
//! - A caller announces itself (`pending` + 1), takes the write connection, opens the batch's
//!   transaction if none is open (`BEGIN IMMEDIATE`), and runs its operation inside a
//!   `SAVEPOINT`. An operation that fails is rolled back to its savepoint and answered with
//!   its own error at once; it undoes nothing of the others (each operation is still atomic,
//!   and it sees the effects of every operation before it, committed or in its batch).
//! - The caller then lowers `pending`. When it finds nobody else announced (or the batch has
//!   grown large or old, see [`MAX_OPS`] and [`MAX_AGE`]), it commits the batch: `COMMIT`, one
//!   fsync for every operation in it, then it wakes the batch's callers. Otherwise it leaves
//!   the transaction open for the callers still to come and waits for the batch's commit.
//!   Callers keep arriving while a commit's fsync runs (it holds the connection), so under
//!   load a batch holds every call that arrived during the previous fsync.
//! - No caller returns success before its batch's `COMMIT` returned: nothing is acknowledged
//!   (an answered submit, an acked result, a sent assignment) before it is on disk. When the
//!   commit fails, or SQLite rolled the whole transaction back after an error (a full disk),
//!   every caller of the batch gets that error.
//!
//! Liveness: `pending` is raised before a caller waits for the connection and lowered, under
//! the connection's lock, after its operation ran. So whenever the lock is released with a
//! transaction open, `pending > 0`: some caller has yet to take the lock, and the last of them
//! commits. Operations run on the callers' own threads (the dispatcher's blocking pool), so
//! they can borrow their arguments; there is no writer thread to send them to.
//!
//! Reads do not come here: [`crate::SqliteStore`] reads on separate read-only connections (WAL
//! lets them read the last committed state while a batch is being written), each read in one
//! read transaction so its statements see one state.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::{Result, StoreError};

/// A batch with this many operations is committed by the next caller even if more are
/// announced (a bound on the latency an operation can add to the others of its batch).
pub(crate) const MAX_OPS: usize = 256;

/// A batch open this long is committed by the next caller even if more are announced.
pub(crate) const MAX_AGE: Duration = Duration::from_millis(5);

/// The write connection and its group commit.
pub(crate) struct GroupCommit {
    state: Mutex<WriterState>,
    /// Callers that announced an operation and have not yet run it.
    pending: AtomicUsize,
}

pub(crate) struct WriterState {
    /// The write connection (the only one that writes).
    pub(crate) conn: Connection,
    /// The batch whose transaction is open, if any.
    open: Option<OpenBatch>,
    /// Batches ended (committed or failed) so far.
    batches: u64,
    /// Operations run so far.
    ops: u64,
}

struct OpenBatch {
    slot: Arc<Slot>,
    ops: usize,
    since: Instant,
}

/// Where a batch's callers wait for its outcome.
#[derive(Default)]
struct Slot {
    done: Mutex<Option<std::result::Result<(), Failure>>>,
    cv: Condvar,
}

/// Why a batch did not commit, told to each of its callers.
#[derive(Debug, Clone)]
struct Failure {
    code: Option<rusqlite::ffi::Error>,
    message: String,
}

impl Failure {
    fn of(e: &StoreError) -> Self {
        let code = match e {
            StoreError::Sqlite(rusqlite::Error::SqliteFailure(code, _)) => Some(*code),
            _ => None,
        };
        Failure {
            code,
            message: match e {
                StoreError::Sqlite(e) => e.to_string(),
                e => e.to_string(),
            },
        }
    }

    /// The error a caller of the failed batch gets: the same SQLite code (so a full disk is
    /// still [`StoreError::is_disk_full`]), with what happened.
    fn to_error(&self) -> StoreError {
        let code = self
            .code
            .unwrap_or_else(|| rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR));
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(
            code,
            Some(format!(
                "the transaction of this write's batch did not commit: {}",
                self.message
            )),
        ))
    }
}

impl Slot {
    fn finish(&self, outcome: std::result::Result<(), Failure>) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        *done = Some(outcome);
        self.cv.notify_all();
    }

    fn wait(&self) -> std::result::Result<(), Failure> {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(outcome) = done.as_ref() {
                return outcome.clone();
            }
            done = self.cv.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// What running one operation did.
enum Ran<T> {
    Done(Result<T>),
    Panicked(Box<dyn std::any::Any + Send>),
}

impl WriterState {
    /// Opens the batch's transaction unless one is open.
    fn begin(&mut self) -> Result<()> {
        if self.open.is_some() {
            return Ok(());
        }
        if !self.conn.is_autocommit() {
            // Not expected (every path that ends a batch ends its transaction): start clean.
            self.conn.execute_batch("ROLLBACK")?;
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.open = Some(OpenBatch {
            slot: Arc::new(Slot::default()),
            ops: 0,
            since: Instant::now(),
        });
        Ok(())
    }

    /// Runs one operation in its own savepoint of the open batch.
    fn run_one<T>(&mut self, op: impl FnOnce(&Connection) -> Result<T>) -> Ran<T> {
        self.ops += 1;
        if let Some(open) = self.open.as_mut() {
            open.ops += 1;
        }
        if let Err(e) = self.conn.execute_batch("SAVEPOINT kiln_op") {
            let e = StoreError::from(e);
            self.after_error(&e);
            return Ran::Done(Err(e));
        }
        let ran = catch_unwind(AssertUnwindSafe(|| op(&self.conn)));
        match ran {
            Ok(Ok(v)) => match self.conn.execute_batch("RELEASE kiln_op") {
                Ok(()) => Ran::Done(Ok(v)),
                Err(e) => {
                    let e = StoreError::from(e);
                    self.undo_op(&e);
                    Ran::Done(Err(e))
                }
            },
            Ok(Err(e)) => {
                self.undo_op(&e);
                Ran::Done(Err(e))
            }
            Err(panic) => {
                let e = StoreError::Corrupt("a store operation panicked".into());
                self.undo_op(&e);
                Ran::Panicked(panic)
            }
        }
    }

    /// Rolls the failed operation back to its savepoint, leaving the batch's other operations.
    fn undo_op(&mut self, cause: &StoreError) {
        if self.conn.is_autocommit() {
            self.after_error(cause);
            return;
        }
        if let Err(e) = self
            .conn
            .execute_batch("ROLLBACK TO kiln_op; RELEASE kiln_op")
        {
            // The batch cannot be trusted any more: end it whole.
            self.abort(&StoreError::from(e));
        }
    }

    /// After an error: when SQLite rolled the whole transaction back (it does on a full disk,
    /// an I/O error, out of memory), the batch's other operations are gone too.
    fn after_error(&mut self, cause: &StoreError) {
        if self.open.is_some() && self.conn.is_autocommit() {
            self.abort(cause);
        }
    }

    /// Ends the open batch without committing: each of its callers gets `cause`.
    fn abort(&mut self, cause: &StoreError) {
        if !self.conn.is_autocommit() {
            // If even this fails the connection is unusable and the next `begin` says so.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if let Some(open) = self.open.take() {
            self.batches += 1;
            open.slot.finish(Err(Failure::of(cause)));
        }
    }

    /// Commits the open batch (one fsync) and wakes its callers.
    fn commit(&mut self) {
        let Some(open) = self.open.take() else {
            return;
        };
        self.batches += 1;
        let outcome = match self.conn.execute_batch("COMMIT") {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = StoreError::from(e);
                if !self.conn.is_autocommit() {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                Err(Failure::of(&e))
            }
        };
        open.slot.finish(outcome);
    }

    fn due(&self) -> bool {
        self.open
            .as_ref()
            .is_some_and(|o| o.ops >= MAX_OPS || o.since.elapsed() >= MAX_AGE)
    }
}

impl GroupCommit {
    pub(crate) fn new(conn: Connection) -> Self {
        GroupCommit {
            state: Mutex::new(WriterState {
                conn,
                open: None,
                batches: 0,
                ops: 0,
            }),
            pending: AtomicUsize::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, WriterState> {
        // An operation's panic is caught inside (its savepoint rolled back), so a poisoned lock
        // leaves a consistent state behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The write connection with no batch open (its transaction committed first), for what
    /// must run alone: reads of an in-memory database, which has no separate readers.
    pub(crate) fn exclusive(&self) -> MutexGuard<'_, WriterState> {
        let mut st = self.lock();
        st.commit();
        st
    }

    /// Callers announced and not yet past their operations.
    #[cfg(test)]
    pub(crate) fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// (batches committed or failed, operations run), since the store opened.
    pub(crate) fn stats(&self) -> (u64, u64) {
        let st = self.lock();
        (st.batches, st.ops)
    }

    /// Runs one operation as its own transaction in effect: atomic, durable when this returns
    /// `Ok`, committed together with whatever other callers run at the same time.
    pub(crate) fn write<T>(&self, op: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let mut op = Some(op);
        let mut out = self.write_each(1, |conn, _| match op.take() {
            Some(op) => op(conn),
            None => Err(StoreError::Corrupt("an operation ran twice".into())),
        });
        out.pop()
            .unwrap_or_else(|| Err(StoreError::Corrupt("an operation did not run".into())))
    }

    /// Runs `n` operations (`op(conn, i)` for i in 0..n), each in its own savepoint as if it
    /// were its own transaction (one failing undoes only itself), all in one batch: one wait
    /// for one commit. Every `Ok` is durable when this returns.
    pub(crate) fn write_each<T>(
        &self,
        n: usize,
        mut op: impl FnMut(&Connection, usize) -> Result<T>,
    ) -> Vec<Result<T>> {
        if n == 0 {
            return Vec::new();
        }
        self.pending.fetch_add(1, Ordering::SeqCst);
        let mut st = self.lock();
        let mut out: Vec<Result<T>> = Vec::with_capacity(n);
        let mut panicked = None;
        let mut slot = None;
        match st.begin() {
            Err(e) => {
                let f = Failure::of(&e);
                out.push(Err(e));
                out.extend((1..n).map(|_| Err(f.to_error())));
            }
            Ok(()) => {
                slot = st.open.as_ref().map(|o| o.slot.clone());
                for i in 0..n {
                    if st.open.is_none() || panicked.is_some() {
                        // The batch was aborted (its transaction rolled back) or an operation
                        // panicked: the rest of this caller's operations do not run.
                        out.push(Err(StoreError::Corrupt(
                            "not run: an earlier operation of the call ended its batch".into(),
                        )));
                        continue;
                    }
                    match st.run_one(|conn| op(conn, i)) {
                        Ran::Done(r) => out.push(r),
                        Ran::Panicked(p) => {
                            panicked = Some(p);
                            out.push(Err(StoreError::Corrupt("panicked".into())));
                        }
                    }
                }
            }
        }
        let last = self.pending.fetch_sub(1, Ordering::SeqCst) == 1;
        if last || st.due() {
            st.commit();
        }
        drop(st);
        if let Some(p) = panicked {
            resume_unwind(p);
        }
        // Nothing this caller did is acknowledged before its batch committed.
        if out.iter().any(|r| r.is_ok())
            && let Some(slot) = slot
            && let Err(f) = slot.wait()
        {
            return out
                .into_iter()
                .map(|r| r.and_then(|_| Err(f.to_error())))
                .collect();
        }
        out
    }
}

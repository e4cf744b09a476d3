//! [`PgStore`](super::PgStore)'s connections, each driven by the thread that uses it.
//!
//! A `tokio-postgres` connection is two halves: the `Client` that sends requests and the
//! `Connection` future that does the socket's I/O. Spawned on a shared runtime (as
//! `deadpool-postgres` does), every statement crossed threads four times: the caller handed
//! its request to the runtime's thread and parked, that thread wrote it, woke on the answer,
//! and woke the caller. Profiled at 1,000 runner sessions (`kiln-bench scale --sessions
//! --postgres`), context switches and futex wake-ups were most of the dispatcher's CPU. Here
//! each connection has its own current-thread runtime (its own reactor), and the caller that
//! holds the connection polls the `Connection` future itself beside its request
//! ([`Conn::run`]): it writes the request and waits on the socket in its own thread.
//!
//! Between two requests nobody polls the connection; PostgreSQL sends nothing a client must
//! answer meanwhile (a notice or parameter status waits in the socket until the next one).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::tls::NoTlsStream;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, Connection, NoTls, Row, Socket, Statement};

use super::{PgConfig, chain};
use crate::{Result, StoreError};

/// How long a caller waits for a connection when all of them are in use.
const WAIT: Duration = Duration::from_secs(60);
/// How long opening a connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// One connection and the runtime whose reactor its socket is registered with.
pub(crate) struct Conn {
    /// `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
    client: Client,
    connection: Pin<Box<Connection<Socket, NoTlsStream>>>,
    /// The connection future ended (the connection is closed or failed).
    ended: bool,
    /// Prepared statements by text.
    statements: HashMap<String, Statement>,
    /// Inside a transaction that was neither committed nor rolled back: not reusable.
    pub(crate) in_tx: bool,
    /// Writes whose answer nobody reads, not sent yet: they go out ahead of the next request
    /// (see [`Conn::execute_later`]).
    later: Vec<Later>,
}

/// A write held back until the next request on its connection.
struct Later {
    statement: Statement,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Without waiting: the store may be dropped on an async thread.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Conn {
    fn open(config: &PgConfig) -> Result<Conn> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|cause| StoreError::Open {
                path: "a PostgreSQL connection's runtime".into(),
                cause,
            })?;
        let (client, connection) = rt.block_on(config.connect(NoTls))?;
        Ok(Conn {
            rt: Some(rt),
            client,
            connection: Box::pin(connection),
            ended: false,
            statements: HashMap::new(),
            in_tx: false,
            later: Vec::new(),
        })
    }

    /// Whether the connection can be handed to the next caller.
    fn reusable(&self) -> bool {
        !self.ended && !self.in_tx && self.later.is_empty() && !self.client.is_closed()
    }

    /// Runs `f` (requests on the client) on this thread, polling the connection beside it
    /// until `f` is done.
    pub(crate) fn run<'a, T, F, Fut>(&'a mut self, f: F) -> T
    where
        F: FnOnce(&'a Client) -> Fut,
        Fut: Future<Output = T> + 'a,
    {
        let Conn {
            rt,
            client,
            connection,
            ended,
            ..
        } = self;
        let rt = rt
            .as_ref()
            .unwrap_or_else(|| unreachable!("runtime taken before drop"));
        let work = f(client);
        rt.block_on(async move {
            tokio::pin!(work);
            loop {
                tokio::select! {
                    biased;
                    out = &mut work => return out,
                    // The connection ended: the client's requests fail now, `work` with them.
                    r = connection.as_mut(), if !*ended => {
                        *ended = true;
                        if let Err(e) = r {
                            tracing::debug!(cause = %chain(&e), "PostgreSQL connection ended");
                        }
                    }
                }
            }
        })
    }

    /// The prepared statement for `sql` (prepared on this connection once).
    pub(crate) fn prepare(&mut self, sql: &str) -> Result<Statement> {
        if let Some(st) = self.statements.get(sql) {
            return Ok(st.clone());
        }
        let st = self.run(|c| c.prepare(sql))?;
        self.statements.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    /// Runs a query; returns its rows. With `first` (statements without parameters, such as
    /// `BEGIN` or `SAVEPOINT s`), sends them just before the query: one round trip.
    pub(crate) fn query(
        &mut self,
        first: Option<&str>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let st = self.prepare(sql)?;
        let later = std::mem::take(&mut self.later);
        self.run(|c| after(c, first, &later, c.query(&st, params)))
    }

    /// Runs a statement; returns the rows it changed.
    pub(crate) fn execute(
        &mut self,
        first: Option<&str>,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64> {
        let st = self.prepare(sql)?;
        let later = std::mem::take(&mut self.later);
        self.run(|c| after(c, first, &later, c.execute(&st, params)))
    }

    /// Prepares a write whose answer (rows changed) nobody reads and holds it back: it is sent
    /// ahead of the next request on this connection (the transaction's next statement, or its
    /// `COMMIT`: [`Conn::commit`]), in the order written, saving its own round trip. Its
    /// error, if any, is that next request's error. The statements of a transaction still
    /// run in the order they were written, so what follows sees it.
    pub(crate) fn execute_later(
        &mut self,
        sql: &str,
        params: Vec<Box<dyn ToSql + Sync + Send>>,
    ) -> Result<()> {
        let statement = self.prepare(sql)?;
        self.later.push(Later { statement, params });
        Ok(())
    }

    /// Sends what is held back (and `first`), if anything: for requests that must not carry it.
    fn flush(&mut self, first: Option<&str>) -> Result<()> {
        if first.is_none() && self.later.is_empty() {
            return Ok(());
        }
        let later = std::mem::take(&mut self.later);
        self.run(|c| after(c, first, &later, async { Ok(()) }))
    }

    /// `COMMIT`, sent with `first` (the transaction's `BEGIN` when no statement was sent yet)
    /// and the writes held back: one round trip. Nothing is sent when nothing was written
    /// (`first` given, nothing held back: no transaction was opened). A held-back write that
    /// fails makes the server answer the `COMMIT` with a rollback; its error is returned, and
    /// the connection is then not reused (`in_tx` stays set).
    pub(crate) fn commit(&mut self, first: Option<&str>) -> Result<()> {
        if first.is_some() && self.later.is_empty() {
            return Ok(());
        }
        let later = std::mem::take(&mut self.later);
        self.run(|c| after(c, first, &later, c.batch_execute("COMMIT")))
    }

    /// `ROLLBACK`; the writes held back are dropped unsent.
    pub(crate) fn rollback(&mut self) -> Result<()> {
        self.discard_later();
        self.batch("ROLLBACK")
    }

    /// Drops the writes held back, unsent.
    pub(crate) fn discard_later(&mut self) {
        self.later.clear();
    }

    /// Runs two queries sent together (one round trip), returning the rows of each. The
    /// server still runs them one after the other, the second after the first is done: at
    /// `READ COMMITTED` the second's snapshot is taken after the first's row locks were
    /// granted. With `first`, as in [`Conn::query`].
    pub(crate) fn query2(
        &mut self,
        first: Option<&str>,
        a: (&str, &[&(dyn ToSql + Sync)]),
        b: (&str, &[&(dyn ToSql + Sync)]),
    ) -> Result<(Vec<Row>, Vec<Row>)> {
        let mut rows = self.query_all(first, &[a, b])?.into_iter();
        match (rows.next(), rows.next()) {
            (Some(a), Some(b)) => Ok((a, b)),
            _ => unreachable!("two statements answered"),
        }
    }

    /// Runs queries sent together (one round trip), returning the rows of each, in order; the
    /// server runs each after the one before is done (see [`Conn::query2`]). The first error
    /// in that order is returned. With `first`, as in [`Conn::query`].
    pub(crate) fn query_all(
        &mut self,
        first: Option<&str>,
        queries: &[(&str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Vec<Row>>> {
        let statements = queries
            .iter()
            .map(|(sql, _)| self.prepare(sql))
            .collect::<Result<Vec<_>>>()?;
        let later = std::mem::take(&mut self.later);
        self.run(|c| {
            let all = async {
                let futs = statements
                    .iter()
                    .zip(queries)
                    .map(|(st, (_, params))| c.query(st, params))
                    .collect();
                join_all(futs).await.into_iter().collect()
            };
            after(c, first, &later, all)
        })
    }

    /// Runs one statement several times, all sent at once (one round trip), each run
    /// preceded by its own statements without parameters (`prefixes[i]`, such as a
    /// savepoint). Answers each run in order: its prefix's error, else its statement's.
    /// `first` and the writes held back go first, on their own (their error is not one run's).
    pub(crate) fn pipeline(
        &mut self,
        first: Option<&str>,
        sql: &str,
        runs: &[(&str, &[&(dyn ToSql + Sync)])],
    ) -> Result<Vec<Result<Vec<Row>>>> {
        let st = self.prepare(sql)?;
        self.flush(first)?;
        Ok(self.run(|c| {
            let st = &st;
            let futs: Vec<_> = runs
                .iter()
                .map(|(prefix, params)| after(c, Some(prefix), &[], c.query(st, params)))
                .collect();
            join_all(futs)
        }))
    }

    /// Runs statements without parameters (simple protocol), after `first` and the writes
    /// held back.
    pub(crate) fn batch_after(&mut self, first: Option<&str>, sql: &str) -> Result<()> {
        let later = std::mem::take(&mut self.later);
        self.run(|c| after(c, first, &later, c.batch_execute(sql)))
    }

    /// Runs statements without parameters (simple protocol).
    pub(crate) fn batch(&mut self, sql: &str) -> Result<()> {
        self.batch_after(None, sql)
    }
}

/// `work` (requests on `c`), preceded by the statements without parameters `first` when
/// given and by the held-back writes `later`, all sent together: one round trip. Requests go
/// out in the order their futures are first polled, and `join!` (like [`join_all`]) polls in
/// order: `first`, then `later`'s, then `work`'s. The first error in that order is returned:
/// after a failed statement the server refuses the rest of the transaction, and the failed
/// one is the cause.
async fn after<T>(
    c: &Client,
    first: Option<&str>,
    later: &[Later],
    work: impl Future<Output = std::result::Result<T, tokio_postgres::Error>>,
) -> Result<T> {
    if first.is_none() && later.is_empty() {
        return Ok(work.await?);
    }
    let before = async {
        match first {
            Some(first) => c.batch_execute(first).await,
            None => Ok(()),
        }
    };
    let writes = join_all(
        later
            .iter()
            .map(|l| {
                c.execute_raw(
                    &l.statement,
                    l.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)),
                )
            })
            .collect(),
    );
    let (before, writes, out) = tokio::join!(before, writes, work);
    before?;
    for w in writes {
        w?;
    }
    Ok(out?)
}

/// Polls every future until all are done, the first poll of each in order (so requests go
/// out in that order); answers in order. (`futures`' `join_all` promises no order of first
/// polls: past 30 futures it is a `FuturesOrdered`, and a chunk of assignments is 64.)
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut done = true;
        for (f, out) in futs.iter_mut().zip(outs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *out = Some(v),
                    std::task::Poll::Pending => done = false,
                }
            }
        }
        if done {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

/// The store's connections: at most `max` open, each used by one caller at a time.
///
/// Why not a pool crate: `deadpool-postgres` spawns each connection's I/O on a runtime (the
/// hand-offs above), and `r2d2` has one timeout for both "every connection is in use" and "a
/// connection cannot be opened", retrying the connect in the background until it ends. Here a
/// connection that cannot be opened fails the call at once with the driver's reason (as it
/// did with `deadpool-postgres`), while a call that finds every
/// connection in use waits up to [`WAIT`] for one (at 1,000 runner sessions, hundreds of
/// blocking threads share 16 connections).
pub(crate) struct Pool {
    config: PgConfig,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Connections open (idle, in use, or being opened).
    open: usize,
}

impl Pool {
    pub(crate) fn new(mut config: PgConfig, max: usize) -> Pool {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        Pool {
            config,
            max,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        // A panic while holding the lock leaves the counts as they were: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection: an idle one, a new one while fewer than `max` are open, or the next one
    /// given back (waiting at most a minute).
    pub(crate) fn get(&self) -> Result<Pooled<'_>> {
        let deadline = Instant::now() + WAIT;
        let mut st = self.lock();
        loop {
            if let Some(conn) = st.idle.pop() {
                return Ok(Pooled {
                    pool: self,
                    conn: Some(conn),
                });
            }
            if st.open < self.max {
                st.open += 1;
                drop(st);
                return match Conn::open(&self.config) {
                    Ok(conn) => Ok(Pooled {
                        pool: self,
                        conn: Some(conn),
                    }),
                    Err(e) => {
                        self.lock().open -= 1;
                        self.freed.notify_one();
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Pool(format!(
                    "all {} connections stayed in use for {WAIT:?}",
                    self.max
                )));
            }
            st = self
                .freed
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn put(&self, conn: Conn) {
        let mut st = self.lock();
        if conn.reusable() {
            st.idle.push(conn);
        } else {
            st.open -= 1;
            drop(st);
            drop(conn);
        }
        self.freed.notify_one();
    }
}

/// A connection taken from the [`Pool`]; given back when dropped (closed instead when it
/// broke or was left inside a transaction).
pub(crate) struct Pooled<'p> {
    pool: &'p Pool,
    conn: Option<Conn>,
}

impl Pooled<'_> {
    pub(crate) fn conn(&mut self) -> &mut Conn {
        self.conn
            .as_mut()
            .unwrap_or_else(|| unreachable!("connection taken before drop"))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.put(conn);
        }
    }
}

//! Notification deliveries in SQLite (migration 9 in `sqlite.rs`): the durable outbox of
//! kiln-notify.
//!
//! - `notify_marks`: which points of a build's life ([`Mark`]) had their deliveries planned.
//!   Written in the transaction that inserts the deliveries, so a crash leaves either both or
//!   neither, and a restarted notifier finds the build again ([`Store::unplanned_builds`]).
//! - `deliveries`: one row per (build, event, target), unique, so planning twice inserts once.
//!   A row is `pending` until it is `delivered`, `failed` (out of tries, or refused for good) or
//!   `superseded` (a newer commit status of the same build and target was planned). `next_at`
//!   is when it is due; taking it leases it by moving `next_at` forward.
//!
//! [`Store::unplanned_builds`]: crate::Store::unplanned_builds

use std::fmt;
use std::str::FromStr;

use kiln_domain::{BuildId, Millis, now_millis};
use rusqlite::{Row, params};
use serde::Serialize;

use crate::Result;
use crate::sqlite::{SqliteStore, corrupt};

/// A point of a build's life that notifications are planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mark {
    /// The build was accepted.
    Queued,
    /// Its first job started running.
    Started,
    /// It reached a final state.
    Finished,
}

impl Mark {
    /// Every mark, in the order a build reaches them.
    pub const ALL: [Mark; 3] = [Mark::Queued, Mark::Started, Mark::Finished];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Queued => "queued",
            Mark::Started => "started",
            Mark::Finished => "finished",
        }
    }
}

impl FromStr for Mark {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Mark::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown mark {s:?}"))
    }
}

/// The row id of a delivery.
pub type DeliveryKey = i64;

/// Where a delivery is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// Not sent yet, or to be tried again at `next_at`.
    Pending,
    /// The receiver took it.
    Delivered,
    /// Given up: out of tries, or refused for good.
    Failed,
    /// Replaced by a newer delivery to the same target (a newer commit status).
    Superseded,
}

impl DeliveryState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
            DeliveryState::Superseded => "superseded",
        }
    }
}

impl FromStr for DeliveryState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            DeliveryState::Pending,
            DeliveryState::Delivered,
            DeliveryState::Failed,
            DeliveryState::Superseded,
        ]
        .into_iter()
        .find(|m| m.as_str() == s)
        .ok_or_else(|| format!("unknown delivery state {s:?}"))
    }
}

impl fmt::Display for DeliveryState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A delivery to plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDelivery {
    /// The id receivers de-duplicate by (unique, kept across tries).
    pub delivery_id: String,
    /// The event (`started`, `failed`, ...).
    pub event: String,
    /// Where it goes (`webhook URL`, `mail ADDRESSES`, `status FORGE API REPO`): the notifier
    /// finds the target's settings and secrets by this name when it sends.
    pub target: String,
    /// What to send (the notifier's JSON), fixed at planning so every try sends the same.
    pub payload: String,
    /// Ends pending deliveries of the same build and target.
    pub supersedes: bool,
}

/// A stored delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// Row id.
    pub key: DeliveryKey,
    /// The id receivers de-duplicate by.
    pub delivery_id: String,
    /// The build.
    pub build_id: BuildId,
    /// The event.
    pub event: String,
    /// Where it goes.
    pub target: String,
    /// What to send.
    #[serde(skip)]
    pub payload: String,
    /// Where it is.
    pub state: DeliveryState,
    /// Tries made.
    pub attempts: u32,
    /// When it is due (pending), or was last tried.
    pub next_at: Millis,
    /// Why the last try failed.
    pub last_error: Option<String>,
    /// When it was planned.
    pub created_at: Millis,
    /// When it was delivered or given up.
    pub finished_at: Option<Millis>,
}

/// The outcome of one try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryResult {
    /// The receiver took it.
    Delivered,
    /// Failed; try again at `next_at`.
    Retry {
        /// When.
        next_at: Millis,
        /// Why it failed.
        error: String,
    },
    /// Failed for good.
    Failed {
        /// Why.
        error: String,
    },
}

const COLUMNS: &str = "id, delivery_id, build_id, event, target, payload, state, attempts, \
    next_at, last_error, created_at, finished_at";

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<(Delivery, String)> {
    Ok((
        Delivery {
            key: r.get(0)?,
            delivery_id: r.get(1)?,
            build_id: r.get(2)?,
            event: r.get(3)?,
            target: r.get(4)?,
            payload: r.get(5)?,
            state: DeliveryState::Pending,
            attempts: r.get(7)?,
            next_at: r.get(8)?,
            last_error: r.get(9)?,
            created_at: r.get(10)?,
            finished_at: r.get(11)?,
        },
        r.get(6)?,
    ))
}

fn finish((mut d, state): (Delivery, String)) -> Result<Delivery> {
    d.state = state.parse().map_err(|e| corrupt("delivery state", e))?;
    Ok(d)
}

impl SqliteStore {
    pub(crate) fn deliveries_plan(
        &self,
        build: BuildId,
        mark: Mark,
        deliveries: &[NewDelivery],
    ) -> Result<u64> {
        let now = now_millis();
        self.with_tx(|tx| {
            tx.execute(
                "INSERT OR IGNORE INTO notify_marks (build_id, mark, at) VALUES (?1, ?2, ?3)",
                params![build, mark.as_str(), now],
            )?;
            let mut new = 0;
            for d in deliveries {
                let exists: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM deliveries \
                     WHERE build_id = ?1 AND event = ?2 AND target = ?3)",
                    params![build, d.event, d.target],
                    |r| r.get(0),
                )?;
                if exists {
                    continue;
                }
                if d.supersedes {
                    tx.execute(
                        "UPDATE deliveries SET state = 'superseded', finished_at = ?3 \
                         WHERE build_id = ?1 AND target = ?2 AND state = 'pending'",
                        params![build, d.target, now],
                    )?;
                }
                new += tx.execute(
                    "INSERT INTO deliveries (delivery_id, build_id, event, target, payload, \
                     state, next_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
                    params![d.delivery_id, build, d.event, d.target, d.payload, now],
                )? as u64;
            }
            Ok(new)
        })
    }

    pub(crate) fn deliveries_marks(&self, build: BuildId) -> Result<Vec<Mark>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached("SELECT mark FROM notify_marks WHERE build_id = ?1")?;
        let rows = stmt.query_map([build], |r| r.get::<_, String>(0))?;
        let mut marks = rows
            .map(|m| m?.parse().map_err(|e| corrupt("notify mark", e)))
            .collect::<Result<Vec<Mark>>>()?;
        marks.sort();
        Ok(marks)
    }

    pub(crate) fn deliveries_unplanned(&self, since: Millis, limit: u32) -> Result<Vec<BuildId>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(
            "SELECT b.id FROM builds b WHERE b.created_at >= ?1 AND ( \
               NOT EXISTS (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'queued') \
               OR (b.finished_at IS NOT NULL AND NOT EXISTS \
                   (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'finished')) \
               OR (EXISTS (SELECT 1 FROM jobs j WHERE j.build_id = b.id AND j.started_at IS NOT NULL) \
                   AND NOT EXISTS \
                   (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'started'))) \
             ORDER BY b.id LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![since, i64::from(limit)], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub(crate) fn deliveries_take_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        self.with_tx(|tx| {
            let due = {
                let mut stmt = tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM deliveries WHERE state = 'pending' AND next_at <= ?1 \
                     ORDER BY next_at, id LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![now, i64::from(limit)], delivery_from_row)?;
                rows.map(|r| finish(r?)).collect::<Result<Vec<_>>>()?
            };
            for d in &due {
                tx.execute(
                    "UPDATE deliveries SET next_at = ?2 WHERE id = ?1",
                    params![d.key, lease_until],
                )?;
            }
            Ok(due)
        })
    }

    pub(crate) fn deliveries_next_at(&self) -> Result<Option<Millis>> {
        let conn = self.reader()?;
        Ok(conn.query_row(
            "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'",
            [],
            |r| r.get(0),
        )?)
    }

    pub(crate) fn deliveries_record(
        &self,
        key: DeliveryKey,
        result: &DeliveryResult,
        now: Millis,
    ) -> Result<bool> {
        let n = self.with_tx(|conn| {
            Ok(match result {
                DeliveryResult::Delivered => conn.execute(
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, \
                 last_error = NULL, next_at = ?2, finished_at = ?2 \
                 WHERE id = ?1 AND state = 'pending'",
                    params![key, now],
                )?,
                DeliveryResult::Retry { next_at, error } => conn.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, last_error = ?3, next_at = ?2 \
                 WHERE id = ?1 AND state = 'pending'",
                    params![key, next_at, error],
                )?,
                DeliveryResult::Failed { error } => conn.execute(
                    "UPDATE deliveries SET state = 'failed', attempts = attempts + 1, \
                 last_error = ?3, next_at = ?2, finished_at = ?2 \
                 WHERE id = ?1 AND state = 'pending'",
                    params![key, now, error],
                )?,
            })
        })?;
        Ok(n > 0)
    }

    pub(crate) fn deliveries_of(&self, build: BuildId) -> Result<Vec<Delivery>> {
        let conn = self.reader()?;
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM deliveries WHERE build_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([build], delivery_from_row)?;
        rows.map(|r| finish(r?)).collect()
    }
}

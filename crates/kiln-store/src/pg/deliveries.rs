//! Notification deliveries in PostgreSQL: the same tables and rules as `deliveries.rs`
//! (SQLite). Taking due deliveries is a `SKIP LOCKED` queue, so several senders (several
//! dispatchers) take disjoint rows.

use kiln_domain::{BuildId, Millis, now_millis};
use tokio_postgres::Row;

use super::{PgStore, get_u32};
use crate::sqlite::corrupt;
use crate::{Delivery, DeliveryKey, DeliveryResult, Mark, NewDelivery, Result};

const COLUMNS: &str = "id, delivery_id, build_id, event, target, payload, state, attempts, \
    next_at, last_error, created_at, finished_at";

fn delivery_from_row(r: &Row) -> Result<Delivery> {
    let state: String = r.try_get(6)?;
    Ok(Delivery {
        key: r.try_get(0)?,
        delivery_id: r.try_get(1)?,
        build_id: r.try_get(2)?,
        event: r.try_get(3)?,
        target: r.try_get(4)?,
        payload: r.try_get(5)?,
        state: state.parse().map_err(|e| corrupt("delivery state", e))?,
        attempts: get_u32(r, 7)?,
        next_at: r.try_get(8)?,
        last_error: r.try_get(9)?,
        created_at: r.try_get(10)?,
        finished_at: r.try_get(11)?,
    })
}

impl PgStore {
    pub(crate) fn deliveries_plan(
        &self,
        build: BuildId,
        mark: Mark,
        deliveries: &[NewDelivery],
    ) -> Result<u64> {
        let now = now_millis();
        // READ COMMITTED: the marks are keyed inserts (`ON CONFLICT DO NOTHING`), and the
        // unique (build, event, target) decides between two planners of one build: the later
        // insert fails (23505), the plan runs again and the check finds the row.
        self.write_committed(|db| {
            db.execute(
                "INSERT INTO notify_marks (build_id, mark, at) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&build, &mark.as_str(), &now],
            )?;
            let mut new = 0;
            for d in deliveries {
                let exists: bool = db
                    .query_one(
                        "SELECT EXISTS (SELECT 1 FROM deliveries \
                         WHERE build_id = $1 AND event = $2 AND target = $3)",
                        &[&build, &d.event, &d.target],
                    )?
                    .try_get(0)?;
                if exists {
                    continue;
                }
                if d.supersedes {
                    db.execute(
                        "UPDATE deliveries SET state = 'superseded', finished_at = $3 \
                         WHERE build_id = $1 AND target = $2 AND state = 'pending'",
                        &[&build, &d.target, &now],
                    )?;
                }
                new += db.execute(
                    "INSERT INTO deliveries (delivery_id, build_id, event, target, payload, \
                     state, next_at, created_at) VALUES ($1, $2, $3, $4, $5, 'pending', $6, $6)",
                    &[
                        &d.delivery_id,
                        &build,
                        &d.event,
                        &d.target,
                        &d.payload,
                        &now,
                    ],
                )?;
            }
            Ok(new)
        })
    }

    pub(crate) fn deliveries_marks(&self, build: BuildId) -> Result<Vec<Mark>> {
        self.read(|db| {
            let mut marks = db
                .query(
                    "SELECT mark FROM notify_marks WHERE build_id = $1",
                    &[&build],
                )?
                .iter()
                .map(|r| {
                    r.try_get::<_, String>(0)?
                        .parse()
                        .map_err(|e| corrupt("notify mark", e))
                })
                .collect::<Result<Vec<Mark>>>()?;
            marks.sort();
            Ok(marks)
        })
    }

    pub(crate) fn deliveries_unplanned(&self, since: Millis, limit: u32) -> Result<Vec<BuildId>> {
        self.read(|db| {
            db.query(
                "SELECT b.id FROM builds b WHERE b.created_at >= $1 AND ( \
                   NOT EXISTS (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'queued') \
                   OR (b.finished_at IS NOT NULL AND NOT EXISTS \
                       (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'finished')) \
                   OR (EXISTS (SELECT 1 FROM jobs j WHERE j.build_id = b.id AND j.started_at IS NOT NULL) \
                       AND NOT EXISTS \
                       (SELECT 1 FROM notify_marks m WHERE m.build_id = b.id AND m.mark = 'started'))) \
                 ORDER BY b.id LIMIT $2",
                &[&since, &i64::from(limit)],
            )?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
        })
    }

    pub(crate) fn deliveries_take_due(
        &self,
        now: Millis,
        lease_until: Millis,
        limit: u32,
    ) -> Result<Vec<Delivery>> {
        // READ COMMITTED with SKIP LOCKED: rows another sender is taking right now are left to
        // it; a row taken and committed by another is no longer due when re-checked.
        self.write_committed(|db| {
            let mut due = db
                .query(
                    &format!(
                        "SELECT {COLUMNS} FROM deliveries WHERE state = 'pending' \
                         AND next_at <= $1 ORDER BY next_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
                    ),
                    &[&now, &i64::from(limit)],
                )?
                .iter()
                .map(delivery_from_row)
                .collect::<Result<Vec<_>>>()?;
            for d in &mut due {
                db.execute(
                    "UPDATE deliveries SET next_at = $2 WHERE id = $1",
                    &[&d.key, &lease_until],
                )?;
            }
            Ok(due)
        })
    }

    pub(crate) fn deliveries_next_at(&self) -> Result<Option<Millis>> {
        self.read(|db| {
            Ok(db
                .query_one(
                    "SELECT MIN(next_at) FROM deliveries WHERE state = 'pending'",
                    &[],
                )?
                .try_get(0)?)
        })
    }

    pub(crate) fn deliveries_record(
        &self,
        key: DeliveryKey,
        result: &DeliveryResult,
        now: Millis,
    ) -> Result<bool> {
        // READ COMMITTED: one conditional UPDATE (`state = 'pending'`), re-checked on the
        // committed row after any wait: a delivery ends once.
        self.write_committed(|db| {
            let n = match result {
                DeliveryResult::Delivered => db.execute(
                    "UPDATE deliveries SET state = 'delivered', attempts = attempts + 1, \
                     last_error = NULL, next_at = $2, finished_at = $2 \
                     WHERE id = $1 AND state = 'pending'",
                    &[&key, &now],
                )?,
                DeliveryResult::Retry { next_at, error } => db.execute(
                    "UPDATE deliveries SET attempts = attempts + 1, last_error = $3, \
                     next_at = $2 WHERE id = $1 AND state = 'pending'",
                    &[&key, next_at, error],
                )?,
                DeliveryResult::Failed { error } => db.execute(
                    "UPDATE deliveries SET state = 'failed', attempts = attempts + 1, \
                     last_error = $3, next_at = $2, finished_at = $2 \
                     WHERE id = $1 AND state = 'pending'",
                    &[&key, &now, error],
                )?,
            };
            Ok(n > 0)
        })
    }

    pub(crate) fn deliveries_of(&self, build: BuildId) -> Result<Vec<Delivery>> {
        self.read(|db| {
            db.query(
                &format!("SELECT {COLUMNS} FROM deliveries WHERE build_id = $1 ORDER BY id"),
                &[&build],
            )?
            .iter()
            .map(delivery_from_row)
            .collect()
        })
    }
}

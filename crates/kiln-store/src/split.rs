//! Split steps in SQLite: the unit queue of each split, leases, results, retry rounds, the
//! merged reports and the per-repository unit history.
//!
//! Tables (migrations 4 and 5 in `sqlite.rs`):
//! - `splits`: one row per (build, split key), with the spec it was created with (shards,
//!   strategy, retry policy, batch limit), the current round and, once over, its verdict.
//! - `split_units`: the units in discovery order (`position`).
//! - `unit_tries`: one row per try of a unit; try `n` runs in round `n`. A try is `queued`,
//!   `leased` (to an attempt, with the request number that leased it) or `ended` (with its
//!   outcome, duration and test cases). Round 1 tries of a static strategy carry their shard.
//! - `split_members`: the attempts that asked for units (runner, last request number and time,
//!   whether it was sent away as done),
//!   used to fence stale re-sends and to spread retry rounds over runners.
//! - `unit_history`: per (repository, split key, unit) the last durations and how often the
//!   unit was flaky or failed. The row with the empty unit id (never a real unit's) holds the
//!   last per-process start costs seen in that split's batches ([`START_UNIT`]).

use std::collections::{BTreeMap, HashSet};

use kiln_domain::split::SplitId;
use kiln_domain::split::{
    FailedUnit, Interaction, InteractionPolicy, LeasedUnit, RetryPolicy, RoundDecision, RoundStats,
    SplitReport, SplitSpec, Strategy, TestCase, UnitOutcome, UnitPast, UnitSource, UnitSummary,
    UnitTry, UnitTryState, UnitVerdict, UnitsReply, UnitsRequest, batch_len, median, next_round,
    reliable, sizing_estimates, sizing_floor, start_cost, static_shards,
};
use kiln_domain::{AttemptId, BuildId, JobId, JobState, Millis, RunnerId, StepSpec, now_millis};
use rusqlite::{Connection, OptionalExtension, params};

use crate::Result;
use crate::sqlite::{SqliteStore, corrupt};

/// Estimate of every unit when no unit of the split has a recorded duration.
pub(crate) const DEFAULT_ESTIMATE_MS: u64 = 1000;
/// Durations kept per unit in the history (the estimate is their median).
pub(crate) const HISTORY_LEN: usize = 5;
/// The `unit_history` row of a (repository, split key) that holds per-process start costs.
pub(crate) const START_UNIT: &str = "";
/// Start costs kept per (repository, split key) (the estimate is their median).
pub(crate) const START_HISTORY_LEN: usize = 9;
/// A shard that asked this recently counts as available for a retry round's units.
pub(crate) const RECENT_MS: Millis = 5000;

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub(crate) fn to_u32(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

pub(crate) fn strategy_parse(s: &str) -> Result<Strategy> {
    match s {
        "dynamic" => Ok(Strategy::Dynamic),
        "hash" => Ok(Strategy::Hash),
        "count" => Ok(Strategy::Count),
        "timing" => Ok(Strategy::Timing),
        other => Err(corrupt("split strategy", other)),
    }
}

pub(crate) fn is_failure(o: Option<UnitOutcome>) -> bool {
    matches!(o, Some(UnitOutcome::Failed | UnitOutcome::Errored))
}

/// A stored split.
pub(crate) struct SplitRow {
    pub(crate) id: SplitId,
    pub(crate) build_id: BuildId,
    pub(crate) repo: String,
    pub(crate) key: String,
    pub(crate) shards: u32,
    pub(crate) strategy: Strategy,
    pub(crate) retry: RetryPolicy,
    pub(crate) max_batch: u32,
    pub(crate) round: u32,
    pub(crate) done: bool,
    pub(crate) passed: bool,
    pub(crate) summary: String,
    pub(crate) retry_note: String,
}

pub(crate) const SPLIT_COLUMNS: &str = "id, build_id, repo, split_key, shards, strategy, retry, max_batch, \
     round, done, passed, summary, retry_note";

type RawSplit = (
    SplitId,
    BuildId,
    String,
    String,
    u32,
    String,
    String,
    u32,
    u32,
    bool,
    bool,
    String,
    String,
);

fn split_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawSplit> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
    ))
}

fn finish_split(raw: RawSplit) -> Result<SplitRow> {
    let (
        id,
        build_id,
        repo,
        key,
        shards,
        strategy,
        retry,
        max_batch,
        round,
        done,
        passed,
        summary,
        retry_note,
    ) = raw;
    Ok(SplitRow {
        id,
        build_id,
        repo,
        key,
        shards,
        strategy: strategy_parse(&strategy)?,
        retry: serde_json::from_str(&retry).map_err(|e| corrupt("split retry policy", e))?,
        max_batch,
        round: round.max(1),
        done,
        passed,
        summary,
        retry_note,
    })
}

fn load_split(tx: &Connection, build: BuildId, key: &str) -> Result<Option<SplitRow>> {
    let raw = tx
        .query_row(
            &format!("SELECT {SPLIT_COLUMNS} FROM splits WHERE build_id = ?1 AND split_key = ?2"),
            params![build, key],
            split_from_row,
        )
        .optional()?;
    raw.map(finish_split).transpose()
}

/// The recorded durations of a unit, oldest first.
pub(crate) fn history_durations(
    tx: &Connection,
    repo: &str,
    key: &str,
    unit: &str,
) -> Result<Vec<u64>> {
    let text: Option<String> = tx
        .prepare_cached(
            "SELECT durations FROM unit_history WHERE repo = ?1 AND split_key = ?2 AND unit = ?3",
        )?
        .query_row(params![repo, key, unit], |r| r.get(0))
        .optional()?;
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(&t).map_err(|e| corrupt("unit history", e)),
    }
}

/// The per-process start cost of a split's batches: the median of the last ones seen for the
/// repository and split key (0 when none was seen).
fn start_estimate(tx: &Connection, repo: &str, key: &str) -> Result<u64> {
    Ok(median(history_durations(tx, repo, key, START_UNIT)?).unwrap_or(0))
}

/// Records a start cost seen in a batch, keeping the last [`START_HISTORY_LEN`].
fn record_start(tx: &Connection, repo: &str, key: &str, ms: u64, now: Millis) -> Result<()> {
    let mut list = history_durations(tx, repo, key, START_UNIT)?;
    list.push(ms);
    if list.len() > START_HISTORY_LEN {
        list.drain(..list.len() - START_HISTORY_LEN);
    }
    let text = serde_json::to_string(&list).map_err(|e| corrupt("start costs", e))?;
    tx.execute(
        "INSERT INTO unit_history (repo, split_key, unit, durations, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (repo, split_key, unit) DO UPDATE SET \
         durations = excluded.durations, updated_at = excluded.updated_at",
        params![repo, key, START_UNIT, text, now],
    )?;
    Ok(())
}

/// Why a split with no discovered units cannot start.
pub(crate) fn no_units(source: &UnitSource) -> String {
    match source {
        UnitSource::Glob(globs) => format!(
            "no units found: no file of the checkout matches {}",
            globs
                .iter()
                .map(|g| format!("`{g}`"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        UnitSource::Command(cmd) => {
            format!("no units found: the discovery command `{cmd}` printed no unit id")
        }
    }
}

/// Creates a split's queue from the first discovery: units deduplicated in discovery order,
/// estimates from the repository's history (the median of the known ones for the others), and
/// for a static strategy each round-1 unit's shard.
fn create_split(
    tx: &Connection,
    build: BuildId,
    repo: &str,
    spec: &SplitSpec,
    discovered: &[String],
    now: Millis,
) -> Result<SplitRow> {
    let mut seen = HashSet::new();
    let units: Vec<&String> = discovered
        .iter()
        .filter(|u| seen.insert(u.as_str()))
        .collect();
    let mut known: Vec<Option<u64>> = Vec::with_capacity(units.len());
    for u in &units {
        known.push(median(history_durations(tx, repo, &spec.key, u)?));
    }
    let fallback = median(known.iter().flatten().copied().collect()).unwrap_or(DEFAULT_ESTIMATE_MS);
    let with_estimates: Vec<(String, u64)> = units
        .iter()
        .zip(&known)
        .map(|(u, k)| ((*u).clone(), k.unwrap_or(fallback).max(1)))
        .collect();
    let shards = spec.shards.max(1);
    let fixed = static_shards(spec.strategy, &with_estimates, shards);
    let retry = serde_json::to_string(&spec.retry).map_err(|e| corrupt("split retry policy", e))?;
    tx.execute(
        "INSERT INTO splits (build_id, split_key, repo, shards, strategy, retry, max_batch, \
         created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            build,
            spec.key,
            repo,
            shards,
            spec.strategy.as_str(),
            retry,
            spec.max_batch,
            now
        ],
    )?;
    let id = SplitId::new(tx.last_insert_rowid() as u64);
    {
        let mut unit_stmt = tx.prepare_cached(
            "INSERT INTO split_units (split_id, position, unit) VALUES (?1, ?2, ?3)",
        )?;
        let mut try_stmt = tx.prepare_cached(
            "INSERT INTO unit_tries (split_id, position, try_number, state, shard, estimate_ms) \
             VALUES (?1, ?2, 1, 'queued', ?3, ?4)",
        )?;
        for (pos, ((unit, est), shard)) in with_estimates.iter().zip(&fixed).enumerate() {
            let pos = pos as i64;
            unit_stmt.execute(params![id, pos, unit])?;
            try_stmt.execute(params![id, pos, shard, to_i64(*est)])?;
        }
    }
    Ok(SplitRow {
        id,
        build_id: build,
        repo: repo.to_string(),
        key: spec.key.clone(),
        shards,
        strategy: spec.strategy,
        retry: spec.retry.clone(),
        max_batch: spec.max_batch,
        round: 1,
        done: false,
        passed: false,
        summary: String::new(),
        retry_note: String::new(),
    })
}

/// Returns the units leased by `attempt` and not ended to the queue. Called in the transaction
/// that ends the attempt (lost, finished, superseded).
pub(crate) fn release_units(tx: &Connection, attempt: AttemptId) -> Result<()> {
    tx.execute(
        "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
         runner_id = NULL, runner = NULL, leased_at = NULL \
         WHERE attempt_id = ?1 AND state = 'leased'",
        [to_i64(attempt.get())],
    )?;
    Ok(())
}

/// Puts the failed tries `attempt` ended in the current round of an unfinished split back in
/// the queue (see `Store::requeue_failed_units`).
pub(crate) fn requeue_failed_units(tx: &Connection, attempt: AttemptId) -> Result<u64> {
    let n = tx.execute(
        "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
         runner_id = NULL, runner = NULL, leased_at = NULL, outcome = NULL, duration_ms = 0, \
         cases = '[]', ended_at = NULL \
         WHERE attempt_id = ?1 AND state = 'ended' AND outcome IN ('failed', 'errored') \
         AND try_number = (SELECT s.round FROM splits s \
                           WHERE s.id = unit_tries.split_id AND s.done = 0)",
        [to_i64(attempt.get())],
    )?;
    Ok(n as u64)
}

/// A try that may be leased.
pub(crate) struct Candidate {
    pub(crate) position: i64,
    pub(crate) unit: String,
    pub(crate) try_number: u32,
    pub(crate) estimate: u64,
    /// Runner of the unit's previous (failed) try, in a retry round.
    pub(crate) previous_runner: Option<RunnerId>,
}

/// Estimated time of the tries of `round` other attempts hold.
fn in_flight_ms(tx: &Connection, split: SplitId, round: u32, attempt: AttemptId) -> Result<u64> {
    let ms: i64 = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(estimate_ms), 0) FROM unit_tries WHERE split_id = ?1 \
             AND try_number = ?2 AND state = 'leased' AND attempt_id != ?3",
        )?
        .query_row(params![split, round, attempt], |r| r.get(0))?;
    Ok(to_u64(ms))
}

/// Round-1 estimates of every unit of the split, those queued with the default estimate (no
/// history anywhere) taken as `seen` when known: what the split's units are estimated at.
fn split_estimates(tx: &Connection, split: SplitId, seen: Option<u64>) -> Result<Vec<u64>> {
    let mut stmt = tx.prepare_cached(
        "SELECT estimate_ms FROM unit_tries WHERE split_id = ?1 AND try_number = 1",
    )?;
    let rows = stmt.query_map([split], |r| r.get::<_, i64>(0))?;
    rows.map(|r| {
        let est = to_u64(r?);
        Ok(match seen {
            Some(ms) if est == DEFAULT_ESTIMATE_MS => ms.max(1),
            _ => est,
        })
    })
    .collect()
}

/// Units of (repository, split key) whose recorded durations are [`reliable`].
fn reliable_units(tx: &Connection, repo: &str, key: &str) -> Result<HashSet<String>> {
    let mut stmt = tx.prepare_cached(
        "SELECT unit, durations FROM unit_history WHERE repo = ?1 AND split_key = ?2 \
         AND unit != ?3",
    )?;
    let rows = stmt.query_map(params![repo, key, START_UNIT], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    let mut out = HashSet::new();
    for row in rows {
        let (unit, text) = row?;
        let durations: Vec<u64> =
            serde_json::from_str(&text).map_err(|e| corrupt("unit history", e))?;
        if reliable(&durations) {
            out.insert(unit);
        }
    }
    Ok(out)
}

/// Durations of the split's tries that ended with an outcome.
fn ended_durations(tx: &Connection, split: SplitId) -> Result<Vec<u64>> {
    let mut stmt = tx.prepare_cached(
        "SELECT duration_ms FROM unit_tries WHERE split_id = ?1 AND state = 'ended' \
         AND outcome IS NOT NULL",
    )?;
    let rows = stmt.query_map([split], |r| r.get::<_, i64>(0))?;
    rows.map(|r| Ok(to_u64(r?))).collect()
}

/// Queued tries of `round` that `shard` may take, longest estimate first, then discovery order.
fn leasable(tx: &Connection, split: SplitId, round: u32, shard: u32) -> Result<Vec<Candidate>> {
    let mut stmt = tx.prepare_cached(
        "SELECT t.position, u.unit, t.try_number, t.estimate_ms, p.runner_id \
         FROM unit_tries t JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
         LEFT JOIN unit_tries p ON p.split_id = t.split_id AND p.position = t.position \
              AND p.try_number = t.try_number - 1 \
         WHERE t.split_id = ?1 AND t.try_number = ?2 AND t.state = 'queued' \
         AND (t.shard IS NULL OR t.shard = ?3) \
         ORDER BY t.estimate_ms DESC, t.position",
    )?;
    let rows = stmt.query_map(params![split, round, shard], |r| {
        Ok(Candidate {
            position: r.get(0)?,
            unit: r.get(1)?,
            try_number: r.get(2)?,
            estimate: to_u64(r.get(3)?),
            previous_runner: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Attempts that took part in a round (a try of it leased or ended by them) and are still
/// their job's current, unfinished attempt.
fn round_holders(tx: &Connection, split: SplitId, round: u32) -> Result<HashSet<AttemptId>> {
    let mut stmt = tx.prepare_cached(
        "SELECT DISTINCT t.attempt_id FROM unit_tries t \
         JOIN attempts a ON a.id = t.attempt_id \
         JOIN jobs j ON j.id = a.job_id AND j.current_attempt = a.id \
         WHERE t.split_id = ?1 AND t.try_number = ?2 AND t.attempt_id IS NOT NULL \
         AND j.state IN ('assigned', 'running')",
    )?;
    let rows = stmt.query_map(params![split, round], |r| r.get::<_, AttemptId>(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Other shards (attempt, runner) of the split that asked within [`RECENT_MS`], were not sent
/// away (a shard told it is done never asks again), and are still their job's current,
/// unfinished attempt.
fn recent_members(
    tx: &Connection,
    split: SplitId,
    attempt: AttemptId,
    now: Millis,
) -> Result<Vec<(AttemptId, RunnerId)>> {
    let mut stmt = tx.prepare_cached(
        "SELECT m.attempt_id, m.runner_id FROM split_members m \
         JOIN attempts a ON a.id = m.attempt_id \
         JOIN jobs j ON j.id = a.job_id AND j.current_attempt = a.id \
         WHERE m.split_id = ?1 AND m.attempt_id != ?2 AND m.last_request_at >= ?3 \
         AND m.done = 0 AND j.state IN ('assigned', 'running')",
    )?;
    let rows = stmt.query_map(params![split, attempt, now - RECENT_MS], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Whether tries of `round` are still queued or leased.
fn round_busy(tx: &Connection, split: SplitId, round: u32) -> Result<bool> {
    Ok(tx
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM unit_tries WHERE split_id = ?1 AND try_number = ?2 \
             AND state IN ('queued', 'leased'))",
        )?
        .query_row(params![split, round], |r| r.get(0))?)
}

/// One stored try, as the round rules and the report see it.
pub(crate) struct TryRow {
    pub(crate) position: i64,
    pub(crate) try_number: u32,
    pub(crate) state: UnitTryState,
    pub(crate) duration: u64,
}

/// A stored try's state and outcome, or the store's corrupt-data error.
pub(crate) fn try_state(state: &str, outcome: Option<&str>) -> Result<UnitTryState> {
    UnitTryState::from_stored(state, outcome).map_err(|e| corrupt("unit try", e))
}

fn load_tries(tx: &Connection, split: SplitId) -> Result<Vec<TryRow>> {
    let mut stmt = tx.prepare_cached(
        "SELECT position, try_number, state, outcome, duration_ms FROM unit_tries \
         WHERE split_id = ?1 ORDER BY position, try_number",
    )?;
    let rows = stmt.query_map([split], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (position, try_number, state, outcome, duration) = row?;
        out.push(TryRow {
            position,
            try_number,
            state: try_state(&state, outcome.as_deref())?,
            duration: to_u64(duration),
        });
    }
    Ok(out)
}

pub(crate) fn round_stats(tries: &[TryRow], units: u64, round: u32) -> RoundStats {
    let mut s = RoundStats {
        round,
        units,
        first_failed: 0,
        failed: 0,
        recovered: 0,
        first_round_ms: 0,
        retry_ms: 0,
    };
    for t in tries {
        if t.try_number == 1 {
            s.first_round_ms = s.first_round_ms.saturating_add(t.duration);
            if is_failure(t.state.outcome()) {
                s.first_failed += 1;
            }
        } else {
            s.retry_ms = s.retry_ms.saturating_add(t.duration);
        }
        if t.try_number == round {
            if is_failure(t.state.outcome()) {
                s.failed += 1;
            } else if round > 1 && t.state == UnitTryState::Ended(UnitOutcome::Passed) {
                s.recovered += 1;
            }
        }
    }
    s
}

/// The units that failed in `round` (positions, and ids with their durations as estimates),
/// in position order.
fn failed_in_round(
    tx: &Connection,
    split: SplitId,
    round: u32,
) -> Result<(Vec<i64>, Vec<FailedUnit>)> {
    let mut stmt = tx.prepare_cached(
        "SELECT t.position, u.unit, t.duration_ms FROM unit_tries t \
         JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
         WHERE t.split_id = ?1 AND t.try_number = ?2 AND t.outcome IN ('failed', 'errored') \
         ORDER BY t.position",
    )?;
    let rows = stmt.query_map(params![split, round], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
        ))
    })?;
    let (mut positions, mut failed) = (Vec::new(), Vec::new());
    for row in rows {
        let (position, unit, ms) = row?;
        positions.push(position);
        failed.push(FailedUnit {
            unit,
            estimate_ms: to_u64(ms),
        });
    }
    Ok((positions, failed))
}

/// The interaction failures of a split, in the order they were reported.
fn interactions_of(tx: &Connection, split: SplitId) -> Result<Vec<Interaction>> {
    let mut stmt = tx.prepare_cached(
        "SELECT units, try_number, detail, runner FROM split_interactions WHERE split_id = ?1 \
         ORDER BY created_at, attempt_id, request, seq",
    )?;
    let rows = stmt.query_map([split], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, u32>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Option<String>>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (units, try_number, detail, runner) = row?;
        out.push(Interaction {
            units: serde_json::from_str(&units).map_err(|e| corrupt("interaction units", e))?,
            try_number,
            detail,
            runner,
        });
    }
    Ok(out)
}

/// Two notes of a split's retries as one.
pub(crate) fn join_notes(a: &str, b: &str) -> String {
    match (a.is_empty(), b.is_empty()) {
        (_, true) => a.to_string(),
        (true, false) => b.to_string(),
        (false, false) => format!("{a}; {b}"),
    }
}

/// The verdict of a unit from its tries (first first).
pub(crate) fn verdict(tries: &[&TryRow], no_more_tries: bool) -> UnitVerdict {
    let Some(last_ended) = tries.iter().rev().find(|t| t.state.outcome().is_some()) else {
        return UnitVerdict::NotRun;
    };
    if last_ended.state == UnitTryState::Ended(UnitOutcome::Passed) {
        if last_ended.try_number <= 1 {
            UnitVerdict::Passed
        } else {
            UnitVerdict::Flaky
        }
    } else if no_more_tries {
        UnitVerdict::Failed
    } else {
        UnitVerdict::NotRun
    }
}

/// Tries grouped by unit position.
pub(crate) fn by_unit(tries: &[TryRow]) -> BTreeMap<i64, Vec<&TryRow>> {
    let mut out: BTreeMap<i64, Vec<&TryRow>> = BTreeMap::new();
    for t in tries {
        out.entry(t.position).or_default().push(t);
    }
    out
}

pub(crate) fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// Ends a split after its last round: verdict, note, summary, and the repository's history.
fn finish_split_row(
    tx: &Connection,
    split: &mut SplitRow,
    tries: &[TryRow],
    note: String,
    now: Millis,
) -> Result<()> {
    let units: Vec<(i64, String)> = {
        let mut stmt = tx.prepare_cached(
            "SELECT position, unit FROM split_units WHERE split_id = ?1 ORDER BY position",
        )?;
        let rows = stmt.query_map([split.id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let note = join_notes(&split.retry_note, &note);
    let grouped = by_unit(tries);
    let (mut passed, mut flaky, mut failed, mut not_run) = (0u64, 0u64, 0u64, 0u64);
    let mut get_history = tx.prepare_cached(
        "SELECT durations FROM unit_history WHERE repo = ?1 AND split_key = ?2 AND unit = ?3",
    )?;
    let mut put_history = tx.prepare_cached(
        "INSERT INTO unit_history (repo, split_key, unit, durations, flaky, failed, updated_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (repo, split_key, unit) DO UPDATE SET \
         durations = excluded.durations, flaky = flaky + excluded.flaky, \
         failed = failed + excluded.failed, updated_at = excluded.updated_at",
    )?;
    for (pos, unit) in &units {
        let list = grouped.get(pos).map(Vec::as_slice).unwrap_or_default();
        let v = verdict(list, true);
        match v {
            UnitVerdict::Passed => passed += 1,
            UnitVerdict::Flaky => flaky += 1,
            UnitVerdict::Failed => failed += 1,
            UnitVerdict::NotRun => not_run += 1,
        }
        let old: Option<String> = get_history
            .query_row(params![split.repo, split.key, unit], |r| r.get(0))
            .optional()?;
        let mut durations: Vec<u64> = match old {
            Some(t) => serde_json::from_str(&t).map_err(|e| corrupt("unit history", e))?,
            None => Vec::new(),
        };
        durations.extend(
            list.iter()
                .filter(|t| t.state.outcome().is_some() && t.duration > 0)
                .map(|t| t.duration),
        );
        if durations.len() > HISTORY_LEN {
            durations.drain(..durations.len() - HISTORY_LEN);
        }
        let text = serde_json::to_string(&durations).map_err(|e| corrupt("unit history", e))?;
        put_history.execute(params![
            split.repo,
            split.key,
            unit,
            text,
            i64::from(v == UnitVerdict::Flaky),
            i64::from(v == UnitVerdict::Failed),
            now
        ])?;
    }
    let interactions = interactions_of(tx, split.id)?.len() as u64;
    let interaction_fails = interactions > 0 && split.retry.interaction == InteractionPolicy::Fail;
    let all_passed = failed == 0 && not_run == 0 && !interaction_fails;
    let mut summary = format!(
        "{} in {}: {passed} passed, {flaky} flaky, {failed} failed",
        plural(units.len() as u64, "unit"),
        plural(u64::from(split.round), "round")
    );
    if not_run > 0 {
        summary.push_str(&format!(", {not_run} not run"));
    }
    if interactions > 0 {
        summary.push_str(&format!(
            ", {} (batches that failed while each unit passed alone; interaction: {})",
            plural(interactions, "interaction failure"),
            split.retry.interaction.as_str()
        ));
    }
    if !note.is_empty() {
        summary.push_str(&format!(" ({note})"));
    }
    tx.execute(
        "UPDATE splits SET done = 1, passed = ?1, summary = ?2, retry_note = ?3, \
         finished_at = ?4 WHERE id = ?5",
        params![all_passed, summary, note, now, split.id],
    )?;
    tx.execute("DELETE FROM split_members WHERE split_id = ?1", [split.id])?;
    split.done = true;
    split.passed = all_passed;
    split.summary = summary;
    split.retry_note = note;
    Ok(())
}

/// The fencing of a request: the job's current, unfinished attempt held by the runner, at a
/// split step. `Err(reason)` when refused.
struct Fenced {
    build_id: BuildId,
    repo: String,
    spec: SplitSpec,
}

/// Job id, build id, job state, current attempt, steps JSON, the attempt's runner, repository.
type AttemptRow = (
    JobId,
    BuildId,
    String,
    Option<AttemptId>,
    String,
    RunnerId,
    String,
);

fn fence(tx: &Connection, req: &UnitsRequest) -> Result<std::result::Result<Fenced, String>> {
    let attempt = req.attempt;
    let row: Option<AttemptRow> = tx
        .query_row(
            "SELECT j.id, j.build_id, j.state, j.current_attempt, j.steps, a.runner_id, b.repo \
             FROM attempts a JOIN jobs j ON j.id = a.job_id JOIN builds b ON b.id = j.build_id \
             WHERE a.id = ?1",
            [attempt],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ))
            },
        )
        .optional()?;
    let Some((job, build_id, state, current, steps, runner, repo)) = row else {
        return Ok(Err(format!("unknown attempt {attempt}")));
    };
    if current != Some(attempt) {
        return Ok(Err(format!(
            "attempt {attempt} is not the current attempt of job {job}"
        )));
    }
    let state: JobState = state.parse().map_err(|e| corrupt("job state", e))?;
    if !matches!(state, JobState::Assigned | JobState::Running) {
        return Ok(Err(format!("job {job} is {state}, not running")));
    }
    if runner != req.runner {
        return Ok(Err(format!(
            "attempt {attempt} was not given to runner {}",
            req.runner
        )));
    }
    let steps: Vec<StepSpec> = serde_json::from_str(&steps).map_err(|e| corrupt("job steps", e))?;
    let Some(spec) = steps
        .get(req.step_index as usize)
        .and_then(|s| s.split.clone())
    else {
        return Ok(Err(format!(
            "step {} of job {job} is not a split step",
            req.step_index
        )));
    };
    Ok(Ok(Fenced {
        build_id,
        repo,
        spec,
    }))
}

/// One `NextUnits` request being answered, inside its transaction: who asks (fenced) and about
/// which split.
struct Ask<'t, 'r> {
    tx: &'t Connection,
    req: &'r UnitsRequest,
    attempt: AttemptId,
    runner: RunnerId,
    now: Millis,
}

/// Answers a shard's `NextUnits`: fences it, records what it reports, re-sends what a repeated
/// request got, else leases the next batch of the current round (or waits, or moves the split
/// to its next round or its end).
fn next_units_tx(tx: &Connection, req: &UnitsRequest, now: Millis) -> Result<UnitsReply> {
    let f = match fence(tx, req)? {
        Ok(f) => f,
        Err(why) => return Ok(UnitsReply::Refused(why)),
    };
    let ask = Ask {
        tx,
        req,
        attempt: req.attempt,
        runner: req.runner,
        now,
    };
    let mut split = match load_split(tx, f.build_id, &f.spec.key)? {
        Some(s) => s,
        None if req.discovered.is_empty() => {
            return Ok(UnitsReply::Refused(no_units(&f.spec.units)));
        }
        None => create_split(tx, f.build_id, &f.repo, &f.spec, &req.discovered, now)?,
    };
    if split.done {
        return Ok(UnitsReply::Done {
            passed: split.passed,
            summary: split.summary,
        });
    }
    if ask.is_late_duplicate(&split)? {
        return Ok(UnitsReply::Wait);
    }
    ask.record_results(&split)?;
    ask.record_interactions(&split)?;
    let again = ask.release_dropped_and_repeat(&split)?;
    if !again.is_empty() {
        return Ok(UnitsReply::Batch(again));
    }
    ask.lease_or_advance(&mut split, f.spec.shard)
}

impl Ask<'_, '_> {
    /// A request older than one already seen from this attempt is a late duplicate: its
    /// results were recorded when it first came and the shard no longer waits for its answer.
    /// Otherwise the attempt is (still) a member of the split, asking now.
    fn is_late_duplicate(&self, split: &SplitRow) -> Result<bool> {
        let last: Option<u32> = self
            .tx
            .query_row(
                "SELECT last_request FROM split_members WHERE split_id = ?1 AND attempt_id = ?2",
                params![split.id, self.attempt],
                |r| r.get(0),
            )
            .optional()?;
        if last.is_some_and(|l| self.req.request < l) {
            return Ok(true);
        }
        self.tx.execute(
            "INSERT INTO split_members (split_id, attempt_id, runner_id, last_request, \
             last_request_at) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (split_id, attempt_id) \
             DO UPDATE SET runner_id = excluded.runner_id, last_request = excluded.last_request, \
             last_request_at = excluded.last_request_at",
            params![
                split.id,
                self.attempt,
                self.runner,
                self.req.request,
                self.now
            ],
        )?;
        Ok(false)
    }

    /// Results: only for a try leased to this attempt and not ended, so a re-send is a no-op.
    /// The batch's start cost is learned only from results recorded now (not a re-send's) and
    /// only when every result of the batch was.
    fn record_results(&self, split: &SplitRow) -> Result<()> {
        let mut stmt = self.tx.prepare_cached(
            "UPDATE unit_tries SET state = 'ended', outcome = ?1, duration_ms = ?2, cases = ?3, \
             ended_at = ?4 WHERE split_id = ?5 AND try_number = ?6 AND attempt_id = ?7 \
             AND state = 'leased' AND position = \
             (SELECT position FROM split_units WHERE split_id = ?5 AND unit = ?8)",
        )?;
        let mut recorded = Vec::with_capacity(self.req.results.len());
        for r in &self.req.results {
            let cases = serde_json::to_string::<Vec<TestCase>>(&r.cases)
                .map_err(|e| corrupt("test cases", e))?;
            let n = stmt.execute(params![
                r.outcome.as_str(),
                to_i64(r.duration_ms),
                cases,
                self.now,
                split.id,
                r.try_number,
                self.attempt,
                r.unit
            ])?;
            if n > 0 {
                recorded.push(r.duration_ms);
            }
        }
        if recorded.len() == self.req.results.len()
            && let Some(ms) = start_cost(self.req.batch_ms, self.req.batch_processes, &recorded)
        {
            record_start(self.tx, &split.repo, &split.key, ms, self.now)?;
        }
        Ok(())
    }

    /// Interaction failures, once per request.
    fn record_interactions(&self, split: &SplitRow) -> Result<()> {
        if self.req.interactions.is_empty() {
            return Ok(());
        }
        let runner_name = self.runner_name()?;
        let mut stmt = self.tx.prepare_cached(
            "INSERT OR IGNORE INTO split_interactions (split_id, attempt_id, request, seq, \
             try_number, units, detail, runner, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        )?;
        for (seq, i) in self.req.interactions.iter().enumerate() {
            let units =
                serde_json::to_string(&i.units).map_err(|e| corrupt("interaction units", e))?;
            stmt.execute(params![
                split.id,
                self.attempt,
                self.req.request,
                seq as i64,
                i.try_number,
                units,
                i.detail,
                runner_name,
                self.now
            ])?;
        }
        Ok(())
    }

    /// Units leased by an earlier request of this attempt and not reported with this newer one
    /// were dropped by the shard: they go back to the queue. A re-sent request gets the units
    /// it got before (returned; empty for a new request).
    fn release_dropped_and_repeat(&self, split: &SplitRow) -> Result<Vec<LeasedUnit>> {
        self.tx.execute(
            "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
             runner_id = NULL, runner = NULL, leased_at = NULL \
             WHERE attempt_id = ?1 AND split_id = ?2 AND state = 'leased' AND request < ?3",
            params![self.attempt, split.id, self.req.request],
        )?;
        let mut stmt = self.tx.prepare_cached(
            "SELECT u.unit, t.try_number FROM unit_tries t \
             JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
             WHERE t.attempt_id = ?1 AND t.split_id = ?2 AND t.state = 'leased' AND t.request = ?3 \
             ORDER BY t.estimate_ms DESC, t.position",
        )?;
        let rows = stmt.query_map(params![self.attempt, split.id, self.req.request], |r| {
            Ok(LeasedUnit {
                unit: r.get(0)?,
                try_number: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The asking runner's name (kept on leases and interactions for reports).
    fn runner_name(&self) -> Result<Option<String>> {
        Ok(self
            .tx
            .query_row(
                "SELECT name FROM runners WHERE id = ?1",
                [self.runner],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Leases the next batch of the current round to this shard; when the round has nothing
    /// left for it, waits while the round runs elsewhere, or, once the round is over, starts
    /// the next round (and tries again) or ends the split.
    fn lease_or_advance(&self, split: &mut SplitRow, shard: u32) -> Result<UnitsReply> {
        let max = match (self.req.max_units, split.max_batch) {
            (0, m) | (m, 0) => m,
            (a, b) => a.min(b),
        };
        loop {
            let round = split.round;
            let (candidates, crowded, shards_for_round) = self.candidates(split, shard)?;
            if !candidates.is_empty() {
                let n = self.batch_size(split, &candidates, shards_for_round, max)?;
                return self.lease(split, candidates, n);
            }
            if round_busy(self.tx, split.id, round)? {
                if crowded {
                    self.tx.execute(
                        "UPDATE split_members SET done = 1 WHERE split_id = ?1 AND attempt_id = ?2",
                        params![split.id, self.attempt],
                    )?;
                    return Ok(UnitsReply::Done {
                        passed: true,
                        summary: format!(
                            "retry round {round} runs on fewer shards; this shard is done"
                        ),
                    });
                }
                return Ok(UnitsReply::Wait);
            }
            if let Some(done) = self.end_round(split)? {
                return Ok(done);
            }
        }
    }

    /// What this shard may lease in the current round, whether the round's shards are all
    /// taken by others (`crowded`: this shard is not needed), and how many shards share the
    /// round's queue.
    fn candidates(&self, split: &SplitRow, shard: u32) -> Result<(Vec<Candidate>, bool, u32)> {
        let round = split.round;
        let mut candidates = leasable(self.tx, split.id, round, shard)?;
        if round == 1 {
            let shards = if split.strategy == Strategy::Dynamic {
                split.shards
            } else {
                // The queue seen here is this shard's own: nobody shares it.
                1
            };
            return Ok((candidates, false, shards));
        }
        let cap = split.retry.retry_shards(split.shards) as usize;
        let holders = round_holders(self.tx, split.id, round)?;
        if !holders.contains(&self.attempt) && holders.len() >= cap {
            return Ok((Vec::new(), true, cap as u32));
        }
        // Prefer another runner than the one a unit failed on, when another shard that may
        // take units of this round asked recently.
        let other_runner = recent_members(self.tx, split.id, self.attempt, self.now)?
            .iter()
            .any(|&(a, r)| r != self.runner && (holders.contains(&a) || holders.len() < cap));
        if other_runner {
            candidates.retain(|c| c.previous_runner != Some(self.runner));
        }
        Ok((candidates, false, cap as u32))
    }

    /// How many of `candidates` (queue order) the next batch takes (`batch_len`), from their
    /// estimates, the learned start cost and the work other shards hold.
    fn batch_size(
        &self,
        split: &SplitRow,
        candidates: &[Candidate],
        shards_for_round: u32,
        max: u32,
    ) -> Result<usize> {
        let tx = self.tx;
        // Units queued with the default estimate (no history anywhere) are estimated by what
        // the split's units took so far, once some have ended.
        let seen = if candidates.iter().any(|c| c.estimate == DEFAULT_ESTIMATE_MS) {
            median(ended_durations(tx, split.id)?)
        } else {
            None
        };
        let estimates: Vec<u64> = candidates
            .iter()
            .map(|c| match seen {
                Some(ms) if c.estimate == DEFAULT_ESTIMATE_MS => ms.max(1),
                _ => c.estimate,
            })
            .collect();
        let start = start_estimate(tx, &split.repo, &split.key)?;
        if start == 0 {
            return Ok(batch_len(&estimates, shards_for_round, max, 0, 0));
        }
        let in_flight = in_flight_ms(tx, split.id, split.round, self.attempt)?;
        // With a start cost, units whose history is not to be trusted as it is count for at
        // least most of a typical unit of the split (see `sizing_floor`).
        let floor = sizing_floor(&split_estimates(tx, split.id, seen)?, start);
        let estimates = if floor > 0 {
            let trusted = reliable_units(tx, &split.repo, &split.key)?;
            let queue: Vec<(u64, bool)> = candidates
                .iter()
                .zip(&estimates)
                .map(|(c, &e)| (e, trusted.contains(&c.unit)))
                .collect();
            sizing_estimates(&queue, floor)
        } else {
            estimates
        };
        Ok(batch_len(
            &estimates,
            shards_for_round,
            max,
            start,
            in_flight,
        ))
    }

    /// Leases the first `n` candidates to this attempt.
    fn lease(&self, split: &SplitRow, candidates: Vec<Candidate>, n: usize) -> Result<UnitsReply> {
        let runner_name = self.runner_name()?;
        let mut stmt = self.tx.prepare_cached(
            "UPDATE unit_tries SET state = 'leased', attempt_id = ?1, request = ?2, \
             runner_id = ?3, runner = ?4, leased_at = ?5 \
             WHERE split_id = ?6 AND position = ?7 AND try_number = ?8",
        )?;
        let mut out = Vec::with_capacity(n);
        for c in candidates.into_iter().take(n) {
            stmt.execute(params![
                self.attempt,
                self.req.request,
                self.runner,
                runner_name,
                self.now,
                split.id,
                c.position,
                c.try_number
            ])?;
            out.push(LeasedUnit {
                unit: c.unit,
                try_number: c.try_number,
            });
        }
        Ok(UnitsReply::Batch(out))
    }

    /// The round is over: queues a retry round (`None`: lease again) or ends the split (its
    /// verdict).
    fn end_round(&self, split: &mut SplitRow) -> Result<Option<UnitsReply>> {
        let tx = self.tx;
        let round = split.round;
        let tries = load_tries(tx, split.id)?;
        let units: i64 = tx.query_row(
            "SELECT COUNT(*) FROM split_units WHERE split_id = ?1",
            [split.id],
            |r| r.get(0),
        )?;
        let stats = round_stats(&tries, to_u64(units), round);
        let (positions, failed) = failed_in_round(tx, split.id, round)?;
        match next_round(&split.retry, &stats, &failed) {
            RoundDecision::Retry { units, note } => {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO unit_tries (split_id, position, try_number, state, shard, \
                     estimate_ms) VALUES (?1, ?2, ?3, 'queued', NULL, ?4)",
                )?;
                for i in units {
                    insert.execute(params![
                        split.id,
                        positions[i],
                        round + 1,
                        to_i64(failed[i].estimate_ms.max(1))
                    ])?;
                }
                split.round = round + 1;
                split.retry_note = join_notes(&split.retry_note, &note);
                tx.execute(
                    "UPDATE splits SET round = ?1, retry_note = ?2 WHERE id = ?3",
                    params![split.round, split.retry_note, split.id],
                )?;
                Ok(None)
            }
            RoundDecision::Stop(note) => {
                finish_split_row(tx, split, &tries, note, self.now)?;
                Ok(Some(UnitsReply::Done {
                    passed: split.passed,
                    summary: split.summary.clone(),
                }))
            }
        }
    }
}

/// Whether the build has ended (so a split that is not done gets no more tries).
/// Closes the unfinished splits of `build` whose shard jobs have all ended (timed out,
/// cancelled, errored, superseded): no shard will ask for their units again, so what did not
/// run is `not_run` and the split failed. Called whenever a job of the build changes.
pub(crate) fn close_abandoned_splits(tx: &Connection, build: BuildId, now: Millis) -> Result<()> {
    let open: Vec<String> = {
        let mut stmt =
            tx.prepare_cached("SELECT split_key FROM splits WHERE build_id = ?1 AND done = 0")?;
        let rows = stmt.query_map([build], |r| r.get(0))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    if open.is_empty() {
        return Ok(());
    }
    let jobs: Vec<(String, String)> = {
        let mut stmt = tx.prepare_cached("SELECT state, steps FROM jobs WHERE build_id = ?1")?;
        let rows = stmt.query_map([build], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    for key in open {
        let mut shards_left = false;
        for (state, steps) in &jobs {
            let steps: Vec<StepSpec> =
                serde_json::from_str(steps).map_err(|e| corrupt("job steps", e))?;
            let of_split = steps
                .iter()
                .any(|st| st.split.as_ref().is_some_and(|sp| sp.key == key));
            let ended = state
                .parse::<JobState>()
                .map_err(|e| corrupt("job state", e))?
                .is_final();
            if of_split && !ended {
                shards_left = true;
                break;
            }
        }
        if shards_left {
            continue;
        }
        if let Some(mut split) = load_split(tx, build, &key)? {
            let tries = load_tries(tx, split.id)?;
            finish_split_row(
                tx,
                &mut split,
                &tries,
                "every shard ended before the split was over".into(),
                now,
            )?;
        }
    }
    Ok(())
}

fn build_final(tx: &Connection, build: BuildId) -> Result<bool> {
    let state: Option<String> = tx
        .query_row("SELECT state FROM builds WHERE id = ?1", [build], |r| {
            r.get(0)
        })
        .optional()?;
    match state {
        None => Ok(true),
        Some(s) => Ok(s
            .parse::<JobState>()
            .map_err(|e| corrupt("build state", e))?
            .is_final()),
    }
}

fn reports_of(tx: &Connection, build: BuildId) -> Result<Vec<SplitReport>> {
    let splits: Vec<SplitRow> = {
        let mut stmt = tx.prepare_cached(&format!(
            "SELECT {SPLIT_COLUMNS} FROM splits WHERE build_id = ?1 ORDER BY id"
        ))?;
        let rows = stmt.query_map([to_i64(build.get())], split_from_row)?;
        rows.map(|r| finish_split(r?)).collect::<Result<_>>()?
    };
    let mut out = Vec::with_capacity(splits.len());
    for split in splits {
        let ended = split.done || build_final(tx, split.build_id)?;
        let attempts = split.retry.attempts.max(1);
        let units: Vec<(i64, String, u32)> = {
            let mut stmt = tx.prepare_cached(
                "SELECT u.position, u.unit, COALESCE(h.flaky, 0) FROM split_units u \
                 LEFT JOIN unit_history h ON h.repo = ?2 AND h.split_key = ?3 AND h.unit = u.unit \
                 WHERE u.split_id = ?1 ORDER BY u.position",
            )?;
            let rows = stmt.query_map(params![split.id, split.repo, split.key], |r| {
                Ok((r.get(0)?, r.get(1)?, to_u32(r.get(2)?)))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        let mut tries: BTreeMap<i64, Vec<(TryRow, UnitTry)>> = BTreeMap::new();
        {
            let mut stmt = tx.prepare_cached(
                "SELECT position, try_number, state, outcome, runner, duration_ms, cases \
                 FROM unit_tries WHERE split_id = ?1 ORDER BY position, try_number",
            )?;
            let rows = stmt.query_map([split.id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, u32>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                    r.get::<_, String>(6)?,
                ))
            })?;
            for row in rows {
                let (position, try_number, state, outcome, runner, duration, cases) = row?;
                let state = try_state(&state, outcome.as_deref())?;
                let cases: Vec<TestCase> =
                    serde_json::from_str(&cases).map_err(|e| corrupt("test cases", e))?;
                tries.entry(position).or_default().push((
                    TryRow {
                        position,
                        try_number,
                        state,
                        duration: to_u64(duration),
                    },
                    UnitTry {
                        try_number,
                        state,
                        runner,
                        duration_ms: to_u64(duration),
                        cases,
                    },
                ));
            }
        }
        let mut summaries = Vec::with_capacity(units.len());
        for (pos, unit, flaky_history) in units {
            let list = tries.remove(&pos).unwrap_or_default();
            let rows: Vec<&TryRow> = list.iter().map(|(t, _)| t).collect();
            let no_more = ended
                || rows
                    .last()
                    .is_some_and(|t| t.state.outcome().is_some() && t.try_number >= attempts);
            let verdict = verdict(&rows, no_more);
            summaries.push(UnitSummary {
                unit,
                verdict,
                tries: list.into_iter().map(|(_, t)| t).collect(),
                flaky_history,
            });
        }
        out.push(SplitReport {
            id: split.id,
            build_id: split.build_id,
            key: split.key,
            shards: split.shards,
            strategy: split.strategy,
            rounds: split.round,
            done: split.done,
            passed: split.done && split.passed,
            retry_note: split.retry_note,
            units: summaries,
            interactions: interactions_of(tx, split.id)?,
            interaction_policy: split.retry.interaction,
        });
    }
    Ok(out)
}

impl SqliteStore {
    pub(crate) fn split_next_units(&self, req: &UnitsRequest) -> Result<UnitsReply> {
        let now = now_millis();
        self.with_tx(|tx| next_units_tx(tx, req, now))
    }

    pub(crate) fn split_reports_of(&self, build: BuildId) -> Result<Vec<SplitReport>> {
        let conn = self.reader()?;
        reports_of(&conn, build)
    }

    pub(crate) fn split_unit_pasts(
        &self,
        repo: &str,
        key: &str,
        units: &[String],
        until: BuildId,
        limit: u32,
    ) -> Result<Vec<UnitPast>> {
        let conn = self.reader()?;
        // The last `limit` splits that ran the unit (`splits_by_repo`, then
        // `split_units_by_unit`), each with the unit's tries.
        let mut recent = conn.prepare_cached(
            "SELECT s.build_id, s.done, t.try_number, t.state, t.outcome, \
             COALESCE(t.duration_ms, 0) \
             FROM (SELECT id, build_id, done FROM splits \
                   WHERE repo = ?1 AND split_key = ?2 AND build_id <= ?4 AND EXISTS \
                   (SELECT 1 FROM split_units u WHERE u.split_id = splits.id AND u.unit = ?3) \
                   ORDER BY build_id DESC LIMIT ?5) s \
             JOIN split_units su ON su.split_id = s.id AND su.unit = ?3 \
             LEFT JOIN unit_tries t ON t.split_id = s.id AND t.position = su.position \
             ORDER BY s.build_id DESC, t.try_number",
        )?;
        let mut totals = conn.prepare_cached(
            "SELECT flaky, failed FROM unit_history \
             WHERE repo = ?1 AND split_key = ?2 AND unit = ?3",
        )?;
        let mut out = Vec::with_capacity(units.len());
        for unit in units {
            let rows = recent.query_map(params![repo, key, unit, until, limit], |r| {
                Ok((
                    r.get::<_, BuildId>(0)?,
                    r.get::<_, bool>(1)?,
                    r.get::<_, Option<u32>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })?;
            // Tries per build, newest build first, each build's tries first first.
            let mut builds: Vec<(BuildId, bool, Vec<TryRow>)> = Vec::new();
            for row in rows {
                let (build, done, try_number, state, outcome, duration) = row?;
                if builds.last().is_none_or(|(b, _, _)| *b != build) {
                    builds.push((build, done, Vec::new()));
                }
                if let (Some(try_number), Some(state), Some(last)) =
                    (try_number, state, builds.last_mut())
                {
                    last.2.push(TryRow {
                        position: 0,
                        try_number,
                        state: try_state(&state, outcome.as_deref())?,
                        duration: to_u64(duration),
                    });
                }
            }
            let (flaky_total, failed_total) = totals
                .query_row(params![repo, key, unit], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                })
                .optional()?
                .unwrap_or((0, 0));
            out.push(UnitPast {
                unit: unit.clone(),
                recent: builds
                    .iter()
                    .map(|(b, done, tries)| {
                        let tries: Vec<&TryRow> = tries.iter().collect();
                        (*b, verdict(&tries, *done))
                    })
                    .collect(),
                flaky_total: to_u64(flaky_total),
                failed_total: to_u64(failed_total),
            });
        }
        Ok(out)
    }

    pub(crate) fn split_seed_durations(
        &self,
        repo: &str,
        key: &str,
        durations: &[(String, u64)],
    ) -> Result<()> {
        let now = now_millis();
        self.with_tx(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO unit_history (repo, split_key, unit, durations, updated_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (repo, split_key, unit) DO UPDATE SET \
                 durations = excluded.durations, updated_at = excluded.updated_at",
            )?;
            for (unit, ms) in durations {
                let text = serde_json::to_string(&[*ms]).map_err(|e| corrupt("unit history", e))?;
                stmt.execute(params![repo, key, unit, text, now])?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;

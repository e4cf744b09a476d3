//! Split steps in PostgreSQL: the same tables, rules and statements as `split.rs` (SQLite),
//! whose module documentation describes them; the pure rules (round statistics, verdicts,
//! notes) are shared with it.
//!
//! Where SQLite's single writer made a round trip exclusive, here `next_units` runs `READ
//! COMMITTED` with explicit locks, so each statement sees what committed before it:
//! - the asking attempt's job row `FOR SHARE` (the fence): the job cannot be finished, lost
//!   or ended (those take it `FOR UPDATE`) until the round trip commits, and then they
//!   release what it leased;
//! - the split's row `FOR UPDATE` once it exists: the round trips of one split's shards run
//!   one at a time, as in SQLite (leases are disjoint; a round ends once). Two shards creating
//!   the split at once collide on `splits_by_build`; the later one runs again and finds it;
//! - whatever else changes a split's tries (`release_units`, `requeue_failed_units`, closing
//!   an abandoned split) takes the same split row lock first;
//! - a unit history row is read for update (created first if missing), so two builds'
//!   splits of one repository and key cannot lose each other's durations.
//!
//! (A `SERIALIZABLE` round trip is correct too, but shards of one split all conflict with each
//! other on the split's tries: with eight shards at once most of them failed and ran again.)

use std::collections::{BTreeMap, HashSet};

use kiln_domain::split::SplitId;
use kiln_domain::split::{
    FailedUnit, Interaction, InteractionPolicy, LeasedUnit, RoundDecision, SplitReport, SplitSpec,
    Strategy, TestCase, UnitSummary, UnitTry, UnitVerdict, UnitsReply, UnitsRequest, batch_len,
    median, next_round, reliable, sizing_estimates, sizing_floor, start_cost, static_shards,
};
use kiln_domain::{AttemptId, BuildId, JobId, JobState, Millis, RunnerId, StepSpec};
use tokio_postgres::Row;

use super::{Db, get_u32, get_u64};
use crate::Result;
use crate::split::{
    Candidate, DEFAULT_ESTIMATE_MS, HISTORY_LEN, RECENT_MS, SPLIT_COLUMNS, START_HISTORY_LEN,
    START_UNIT, SplitRow, TryRow, by_unit, join_notes, no_units, plural, round_stats,
    strategy_parse, to_i64, try_state, verdict,
};
use crate::sqlite::corrupt;

fn split_from_row(r: &Row) -> Result<SplitRow> {
    let strategy: String = r.try_get(5)?;
    let retry: String = r.try_get(6)?;
    Ok(SplitRow {
        id: r.try_get(0)?,
        build_id: r.try_get(1)?,
        repo: r.try_get(2)?,
        key: r.try_get(3)?,
        shards: get_u32(r, 4)?,
        strategy: strategy_parse(&strategy)?,
        retry: serde_json::from_str(&retry).map_err(|e| corrupt("split retry policy", e))?,
        max_batch: get_u32(r, 7)?,
        round: get_u32(r, 8)?.max(1),
        done: r.try_get(9)?,
        passed: r.try_get(10)?,
        summary: r.try_get(11)?,
        retry_note: r.try_get(12)?,
    })
}

/// The split of (build, key), its row locked for this transaction.
fn load_split(db: &Db<'_>, build: BuildId, key: &str) -> Result<Option<SplitRow>> {
    db.query_opt(
        &format!(
            "SELECT {SPLIT_COLUMNS} FROM splits WHERE build_id = $1 AND split_key = $2 \
             FOR UPDATE"
        ),
        &[&build, &key],
    )?
    .map(|r| split_from_row(&r))
    .transpose()
}

/// The recorded durations of a unit, oldest first.
pub(crate) fn history_durations(
    db: &Db<'_>,
    repo: &str,
    key: &str,
    unit: &str,
) -> Result<Vec<u64>> {
    let text: Option<String> = db
        .query_opt(
            "SELECT durations FROM unit_history WHERE repo = $1 AND split_key = $2 AND unit = $3",
            &[&repo, &key, &unit],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(&t).map_err(|e| corrupt("unit history", e)),
    }
}

fn start_estimate(db: &Db<'_>, repo: &str, key: &str) -> Result<u64> {
    Ok(median(history_durations(db, repo, key, START_UNIT)?).unwrap_or(0))
}

const PUT_HISTORY: &str = "INSERT INTO unit_history (repo, split_key, unit, durations, updated_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (repo, split_key, unit) DO UPDATE SET \
     durations = excluded.durations, updated_at = excluded.updated_at";

fn record_start(db: &Db<'_>, repo: &str, key: &str, ms: u64, now: Millis) -> Result<()> {
    let mut list = history_for_update(db, repo, key, START_UNIT, now)?;
    list.push(ms);
    if list.len() > START_HISTORY_LEN {
        list.drain(..list.len() - START_HISTORY_LEN);
    }
    let text = serde_json::to_string(&list).map_err(|e| corrupt("start costs", e))?;
    db.execute(PUT_HISTORY, &[&repo, &key, &START_UNIT, &text, &now])?;
    Ok(())
}

/// Seeds unit durations (see `SqliteStore::seed_unit_durations`).
pub(crate) fn seed_durations(
    db: &Db<'_>,
    repo: &str,
    key: &str,
    durations: &[(String, u64)],
    now: Millis,
) -> Result<()> {
    for (unit, ms) in durations {
        let text = serde_json::to_string(&[*ms]).map_err(|e| corrupt("unit history", e))?;
        db.execute(PUT_HISTORY, &[&repo, &key, unit, &text, &now])?;
    }
    Ok(())
}

fn create_split(
    db: &Db<'_>,
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
        known.push(median(history_durations(db, repo, &spec.key, u)?));
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
    let id: SplitId = db
        .query_one(
            "INSERT INTO splits (build_id, split_key, repo, shards, strategy, retry, max_batch, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            &[
                &build,
                &spec.key,
                &repo,
                &i64::from(shards),
                &spec.strategy.as_str(),
                &retry,
                &i64::from(spec.max_batch),
                &now,
            ],
        )?
        .try_get(0)?;
    // Locked like a split found by `load_split` (a new row is the inserter's until commit).
    for (pos, ((unit, est), shard)) in with_estimates.iter().zip(&fixed).enumerate() {
        let pos = pos as i64;
        db.execute(
            "INSERT INTO split_units (split_id, position, unit) VALUES ($1, $2, $3)",
            &[&id, &pos, unit],
        )?;
        let shard = shard.map(i64::from);
        db.execute(
            "INSERT INTO unit_tries (split_id, position, try_number, state, shard, estimate_ms) \
             VALUES ($1, $2, 1, 'queued', $3, $4)",
            &[&id, &pos, &shard, &to_i64(*est)],
        )?;
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

/// Locks the rows of the splits `attempt` holds or ran tries of (in id order), so a change to
/// their tries waits for a shard's round trip in progress and the next one sees it.
/// Locks the splits whose tries `attempt` holds or held; returns whether there is any.
fn lock_splits_of(db: &Db<'_>, attempt: AttemptId) -> Result<bool> {
    Ok(!db.query(SPLITS_OF_SQL, &[&attempt])?.is_empty())
}

/// [`lock_splits_of`]'s statement (`$1` the attempt).
pub(crate) const SPLITS_OF_SQL: &str = "SELECT id FROM splits WHERE id IN \
     (SELECT split_id FROM unit_tries WHERE attempt_id = $1) ORDER BY id FOR UPDATE";

/// The durations of a unit's history row, the row created if missing and locked, for a
/// read-modify-write that no concurrent writer (another build's split of the same
/// repository and key) can lose.
fn history_for_update(
    db: &Db<'_>,
    repo: &str,
    key: &str,
    unit: &str,
    now: Millis,
) -> Result<Vec<u64>> {
    db.execute(
        "INSERT INTO unit_history (repo, split_key, unit, durations, updated_at) \
         VALUES ($1, $2, $3, '[]', $4) ON CONFLICT DO NOTHING",
        &[&repo, &key, &unit, &now],
    )?;
    let text: String = db
        .query_one(
            "SELECT durations FROM unit_history WHERE repo = $1 AND split_key = $2 \
             AND unit = $3 FOR UPDATE",
            &[&repo, &key, &unit],
        )?
        .try_get(0)?;
    serde_json::from_str(&text).map_err(|e| corrupt("unit history", e))
}

/// Returns the units leased by `attempt` and not ended to the queue.
pub(crate) fn release_units(db: &Db<'_>, attempt: AttemptId) -> Result<()> {
    // No split holds a try of this attempt (most jobs are not shards): nothing to release.
    // None can be leased to it meanwhile: every caller holds the attempt's job's row lock,
    // which `next_units` needs (`FOR SHARE`) to lease a try to it.
    if !lock_splits_of(db, attempt)? {
        return Ok(());
    }
    release_locked_units(db, attempt)
}

/// [`release_units`] once [`SPLITS_OF_SQL`] locked the splits (`$1` the attempt) and
/// answered rows: the caller sent it with other statements. The update is held back
/// ([`Db::execute_later`]): nothing reads its answer, and what reads the tries next sees it.
pub(crate) fn release_locked_units(db: &Db<'_>, attempt: AttemptId) -> Result<()> {
    db.execute_later(
        "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
         runner_id = NULL, runner = NULL, leased_at = NULL \
         WHERE attempt_id = $1 AND state = 'leased'",
        vec![Box::new(attempt)],
    )
}

/// See `Store::requeue_failed_units`.
pub(crate) fn requeue_failed_units(db: &Db<'_>, attempt: AttemptId) -> Result<u64> {
    lock_splits_of(db, attempt)?;
    db.execute(
        "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
         runner_id = NULL, runner = NULL, leased_at = NULL, outcome = NULL, duration_ms = 0, \
         cases = '[]', ended_at = NULL \
         WHERE attempt_id = $1 AND state = 'ended' AND outcome IN ('failed', 'errored') \
         AND try_number = (SELECT s.round FROM splits s \
                           WHERE s.id = unit_tries.split_id AND NOT s.done)",
        &[&attempt],
    )
}

fn in_flight_ms(db: &Db<'_>, split: SplitId, round: u32, attempt: AttemptId) -> Result<u64> {
    get_u64(
        &db.query_one(
            "SELECT COALESCE(SUM(estimate_ms), 0)::BIGINT FROM unit_tries WHERE split_id = $1 \
             AND try_number = $2 AND state = 'leased' AND attempt_id <> $3",
            &[&split, &i64::from(round), &attempt],
        )?,
        0,
    )
}

fn split_estimates(db: &Db<'_>, split: SplitId, seen: Option<u64>) -> Result<Vec<u64>> {
    db.query(
        "SELECT estimate_ms FROM unit_tries WHERE split_id = $1 AND try_number = 1",
        &[&split],
    )?
    .iter()
    .map(|r| {
        let est = get_u64(r, 0)?;
        Ok(match seen {
            Some(ms) if est == DEFAULT_ESTIMATE_MS => ms.max(1),
            _ => est,
        })
    })
    .collect()
}

fn reliable_units(db: &Db<'_>, repo: &str, key: &str) -> Result<HashSet<String>> {
    let mut out = HashSet::new();
    for r in db.query(
        "SELECT unit, durations FROM unit_history WHERE repo = $1 AND split_key = $2 \
         AND unit <> $3",
        &[&repo, &key, &START_UNIT],
    )? {
        let unit: String = r.try_get(0)?;
        let text: String = r.try_get(1)?;
        let durations: Vec<u64> =
            serde_json::from_str(&text).map_err(|e| corrupt("unit history", e))?;
        if reliable(&durations) {
            out.insert(unit);
        }
    }
    Ok(out)
}

fn ended_durations(db: &Db<'_>, split: SplitId) -> Result<Vec<u64>> {
    db.query(
        "SELECT duration_ms FROM unit_tries WHERE split_id = $1 AND state = 'ended' \
         AND outcome IS NOT NULL",
        &[&split],
    )?
    .iter()
    .map(|r| get_u64(r, 0))
    .collect()
}

fn leasable(db: &Db<'_>, split: SplitId, round: u32, shard: u32) -> Result<Vec<Candidate>> {
    db.query(
        "SELECT t.position, u.unit, t.try_number, t.estimate_ms, p.runner_id \
         FROM unit_tries t JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
         LEFT JOIN unit_tries p ON p.split_id = t.split_id AND p.position = t.position \
              AND p.try_number = t.try_number - 1 \
         WHERE t.split_id = $1 AND t.try_number = $2 AND t.state = 'queued' \
         AND (t.shard IS NULL OR t.shard = $3) \
         ORDER BY t.estimate_ms DESC, t.position",
        &[&split, &i64::from(round), &i64::from(shard)],
    )?
    .iter()
    .map(|r| {
        Ok(Candidate {
            position: r.try_get(0)?,
            unit: r.try_get(1)?,
            try_number: get_u32(r, 2)?,
            estimate: get_u64(r, 3)?,
            previous_runner: r.try_get(4)?,
        })
    })
    .collect()
}

fn round_holders(db: &Db<'_>, split: SplitId, round: u32) -> Result<HashSet<AttemptId>> {
    db.query(
        "SELECT DISTINCT t.attempt_id FROM unit_tries t \
         JOIN attempts a ON a.id = t.attempt_id \
         JOIN jobs j ON j.id = a.job_id AND j.current_attempt = a.id \
         WHERE t.split_id = $1 AND t.try_number = $2 AND t.attempt_id IS NOT NULL \
         AND j.state IN ('assigned', 'running')",
        &[&split, &i64::from(round)],
    )?
    .iter()
    .map(|r| Ok(r.try_get(0)?))
    .collect()
}

fn recent_members(
    db: &Db<'_>,
    split: SplitId,
    attempt: AttemptId,
    now: Millis,
) -> Result<Vec<(AttemptId, RunnerId)>> {
    db.query(
        "SELECT m.attempt_id, m.runner_id FROM split_members m \
         JOIN attempts a ON a.id = m.attempt_id \
         JOIN jobs j ON j.id = a.job_id AND j.current_attempt = a.id \
         WHERE m.split_id = $1 AND m.attempt_id <> $2 AND m.last_request_at >= $3 \
         AND NOT m.done AND j.state IN ('assigned', 'running')",
        &[&split, &attempt, &(now - RECENT_MS)],
    )?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

fn round_busy(db: &Db<'_>, split: SplitId, round: u32) -> Result<bool> {
    Ok(db
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM unit_tries WHERE split_id = $1 AND try_number = $2 \
             AND state IN ('queued', 'leased'))",
            &[&split, &i64::from(round)],
        )?
        .try_get(0)?)
}

fn load_tries(db: &Db<'_>, split: SplitId) -> Result<Vec<TryRow>> {
    db.query(
        "SELECT position, try_number, state, outcome, duration_ms FROM unit_tries \
         WHERE split_id = $1 ORDER BY position, try_number",
        &[&split],
    )?
    .iter()
    .map(|r| {
        let state: String = r.try_get(2)?;
        let outcome: Option<String> = r.try_get(3)?;
        Ok(TryRow {
            position: r.try_get(0)?,
            try_number: get_u32(r, 1)?,
            state: try_state(&state, outcome.as_deref())?,
            duration: get_u64(r, 4)?,
        })
    })
    .collect()
}

fn failed_in_round(db: &Db<'_>, split: SplitId, round: u32) -> Result<(Vec<i64>, Vec<FailedUnit>)> {
    let (mut positions, mut failed) = (Vec::new(), Vec::new());
    for r in db.query(
        "SELECT t.position, u.unit, t.duration_ms FROM unit_tries t \
         JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
         WHERE t.split_id = $1 AND t.try_number = $2 AND t.outcome IN ('failed', 'errored') \
         ORDER BY t.position",
        &[&split, &i64::from(round)],
    )? {
        positions.push(r.try_get(0)?);
        failed.push(FailedUnit {
            unit: r.try_get(1)?,
            estimate_ms: get_u64(&r, 2)?,
        });
    }
    Ok((positions, failed))
}

fn interactions_of(db: &Db<'_>, split: SplitId) -> Result<Vec<Interaction>> {
    db.query(
        "SELECT units, try_number, detail, runner FROM split_interactions WHERE split_id = $1 \
         ORDER BY created_at, attempt_id, request, seq",
        &[&split],
    )?
    .iter()
    .map(|r| {
        let units: String = r.try_get(0)?;
        Ok(Interaction {
            units: serde_json::from_str(&units).map_err(|e| corrupt("interaction units", e))?,
            try_number: get_u32(r, 1)?,
            detail: r.try_get(2)?,
            runner: r.try_get(3)?,
        })
    })
    .collect()
}

fn finish_split_row(
    db: &Db<'_>,
    split: &mut SplitRow,
    tries: &[TryRow],
    note: String,
    now: Millis,
) -> Result<()> {
    let units = db
        .query(
            "SELECT position, unit FROM split_units WHERE split_id = $1 ORDER BY position",
            &[&split.id],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(i64, String)>>>()?;
    let note = join_notes(&split.retry_note, &note);
    let grouped = by_unit(tries);
    let (mut passed, mut flaky, mut failed, mut not_run) = (0u64, 0u64, 0u64, 0u64);
    for (pos, unit) in &units {
        let list = grouped.get(pos).map(Vec::as_slice).unwrap_or_default();
        let v = verdict(list, true);
        match v {
            UnitVerdict::Passed => passed += 1,
            UnitVerdict::Flaky => flaky += 1,
            UnitVerdict::Failed => failed += 1,
            UnitVerdict::NotRun => not_run += 1,
        }
        let mut durations = history_for_update(db, &split.repo, &split.key, unit, now)?;
        durations.extend(
            list.iter()
                .filter(|t| t.state.outcome().is_some() && t.duration > 0)
                .map(|t| t.duration),
        );
        if durations.len() > HISTORY_LEN {
            durations.drain(..durations.len() - HISTORY_LEN);
        }
        let text = serde_json::to_string(&durations).map_err(|e| corrupt("unit history", e))?;
        db.execute(
            "INSERT INTO unit_history (repo, split_key, unit, durations, flaky, failed, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
             ON CONFLICT (repo, split_key, unit) DO UPDATE SET \
             durations = excluded.durations, flaky = unit_history.flaky + excluded.flaky, \
             failed = unit_history.failed + excluded.failed, updated_at = excluded.updated_at",
            &[
                &split.repo,
                &split.key,
                unit,
                &text,
                &i64::from(v == UnitVerdict::Flaky),
                &i64::from(v == UnitVerdict::Failed),
                &now,
            ],
        )?;
    }
    let interactions = interactions_of(db, split.id)?.len() as u64;
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
    db.execute(
        "UPDATE splits SET done = TRUE, passed = $1, summary = $2, retry_note = $3, \
         finished_at = $4 WHERE id = $5",
        &[&all_passed, &summary, &note, &now, &split.id],
    )?;
    db.execute(
        "DELETE FROM split_members WHERE split_id = $1",
        &[&split.id],
    )?;
    split.done = true;
    split.passed = all_passed;
    split.summary = summary;
    split.retry_note = note;
    Ok(())
}

struct Fenced {
    build_id: BuildId,
    repo: String,
    spec: SplitSpec,
}

fn fence(db: &Db<'_>, req: &UnitsRequest) -> Result<std::result::Result<Fenced, String>> {
    let attempt = req.attempt;
    let row = db.query_opt(
        "SELECT j.id, j.build_id, j.state, j.current_attempt, j.steps, a.runner_id, b.repo \
         FROM attempts a JOIN jobs j ON j.id = a.job_id JOIN builds b ON b.id = j.build_id \
         WHERE a.id = $1 FOR SHARE OF j",
        &[&attempt],
    )?;
    let Some(row) = row else {
        return Ok(Err(format!("unknown attempt {attempt}")));
    };
    let job: JobId = row.try_get(0)?;
    let build_id: BuildId = row.try_get(1)?;
    let state: String = row.try_get(2)?;
    let current: Option<AttemptId> = row.try_get(3)?;
    let steps: String = row.try_get(4)?;
    let runner: RunnerId = row.try_get(5)?;
    let repo: String = row.try_get(6)?;
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

struct Ask<'t, 'c, 'r> {
    db: &'t Db<'c>,
    req: &'r UnitsRequest,
    attempt: AttemptId,
    runner: RunnerId,
    now: Millis,
}

/// Answers a shard's `NextUnits` (see `split.rs`'s `next_units_tx`).
pub(crate) fn next_units_tx(db: &Db<'_>, req: &UnitsRequest, now: Millis) -> Result<UnitsReply> {
    let f = match fence(db, req)? {
        Ok(f) => f,
        Err(why) => return Ok(UnitsReply::Refused(why)),
    };
    let ask = Ask {
        db,
        req,
        attempt: req.attempt,
        runner: req.runner,
        now,
    };
    let mut split = match load_split(db, f.build_id, &f.spec.key)? {
        Some(s) => s,
        None if req.discovered.is_empty() => {
            return Ok(UnitsReply::Refused(no_units(&f.spec.units)));
        }
        None => create_split(db, f.build_id, &f.repo, &f.spec, &req.discovered, now)?,
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

impl Ask<'_, '_, '_> {
    fn is_late_duplicate(&self, split: &SplitRow) -> Result<bool> {
        let last: Option<u32> = self
            .db
            .query_opt(
                "SELECT last_request FROM split_members WHERE split_id = $1 AND attempt_id = $2",
                &[&split.id, &self.attempt],
            )?
            .map(|r| get_u32(&r, 0))
            .transpose()?;
        if last.is_some_and(|l| self.req.request < l) {
            return Ok(true);
        }
        self.db.execute(
            "INSERT INTO split_members (split_id, attempt_id, runner_id, last_request, \
             last_request_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (split_id, attempt_id) \
             DO UPDATE SET runner_id = excluded.runner_id, last_request = excluded.last_request, \
             last_request_at = excluded.last_request_at",
            &[
                &split.id,
                &self.attempt,
                &self.runner,
                &i64::from(self.req.request),
                &self.now,
            ],
        )?;
        Ok(false)
    }

    fn record_results(&self, split: &SplitRow) -> Result<()> {
        let mut recorded = Vec::with_capacity(self.req.results.len());
        for r in &self.req.results {
            let cases = serde_json::to_string::<Vec<TestCase>>(&r.cases)
                .map_err(|e| corrupt("test cases", e))?;
            let n = self.db.execute(
                "UPDATE unit_tries SET state = 'ended', outcome = $1, duration_ms = $2, \
                 cases = $3, ended_at = $4 WHERE split_id = $5 AND try_number = $6 \
                 AND attempt_id = $7 AND state = 'leased' AND position = \
                 (SELECT position FROM split_units WHERE split_id = $5 AND unit = $8)",
                &[
                    &r.outcome.as_str(),
                    &to_i64(r.duration_ms),
                    &cases,
                    &self.now,
                    &split.id,
                    &i64::from(r.try_number),
                    &self.attempt,
                    &r.unit,
                ],
            )?;
            if n > 0 {
                recorded.push(r.duration_ms);
            }
        }
        if recorded.len() == self.req.results.len()
            && let Some(ms) = start_cost(self.req.batch_ms, self.req.batch_processes, &recorded)
        {
            record_start(self.db, &split.repo, &split.key, ms, self.now)?;
        }
        Ok(())
    }

    fn record_interactions(&self, split: &SplitRow) -> Result<()> {
        if self.req.interactions.is_empty() {
            return Ok(());
        }
        let runner_name = self.runner_name()?;
        for (seq, i) in self.req.interactions.iter().enumerate() {
            let units =
                serde_json::to_string(&i.units).map_err(|e| corrupt("interaction units", e))?;
            self.db.execute(
                "INSERT INTO split_interactions (split_id, attempt_id, request, seq, \
                 try_number, units, detail, runner, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
                &[
                    &split.id,
                    &self.attempt,
                    &i64::from(self.req.request),
                    &(seq as i64),
                    &i64::from(i.try_number),
                    &units,
                    &i.detail,
                    &runner_name,
                    &self.now,
                ],
            )?;
        }
        Ok(())
    }

    fn release_dropped_and_repeat(&self, split: &SplitRow) -> Result<Vec<LeasedUnit>> {
        let request = i64::from(self.req.request);
        self.db.execute(
            "UPDATE unit_tries SET state = 'queued', attempt_id = NULL, request = NULL, \
             runner_id = NULL, runner = NULL, leased_at = NULL \
             WHERE attempt_id = $1 AND split_id = $2 AND state = 'leased' AND request < $3",
            &[&self.attempt, &split.id, &request],
        )?;
        self.db
            .query(
                "SELECT u.unit, t.try_number FROM unit_tries t \
                 JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
                 WHERE t.attempt_id = $1 AND t.split_id = $2 AND t.state = 'leased' \
                 AND t.request = $3 ORDER BY t.estimate_ms DESC, t.position",
                &[&self.attempt, &split.id, &request],
            )?
            .iter()
            .map(|r| {
                Ok(LeasedUnit {
                    unit: r.try_get(0)?,
                    try_number: get_u32(r, 1)?,
                })
            })
            .collect()
    }

    fn runner_name(&self) -> Result<Option<String>> {
        self.db
            .query_opt("SELECT name FROM runners WHERE id = $1", &[&self.runner])?
            .map(|r| Ok(r.try_get(0)?))
            .transpose()
    }

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
            if round_busy(self.db, split.id, round)? {
                if crowded {
                    self.db.execute(
                        "UPDATE split_members SET done = TRUE WHERE split_id = $1 \
                         AND attempt_id = $2",
                        &[&split.id, &self.attempt],
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

    fn candidates(&self, split: &SplitRow, shard: u32) -> Result<(Vec<Candidate>, bool, u32)> {
        let round = split.round;
        let mut candidates = leasable(self.db, split.id, round, shard)?;
        if round == 1 {
            let shards = if split.strategy == Strategy::Dynamic {
                split.shards
            } else {
                1
            };
            return Ok((candidates, false, shards));
        }
        let cap = split.retry.retry_shards(split.shards) as usize;
        let holders = round_holders(self.db, split.id, round)?;
        if !holders.contains(&self.attempt) && holders.len() >= cap {
            return Ok((Vec::new(), true, cap as u32));
        }
        let other_runner = recent_members(self.db, split.id, self.attempt, self.now)?
            .iter()
            .any(|&(a, r)| r != self.runner && (holders.contains(&a) || holders.len() < cap));
        if other_runner {
            candidates.retain(|c| c.previous_runner != Some(self.runner));
        }
        Ok((candidates, false, cap as u32))
    }

    fn batch_size(
        &self,
        split: &SplitRow,
        candidates: &[Candidate],
        shards_for_round: u32,
        max: u32,
    ) -> Result<usize> {
        let db = self.db;
        let seen = if candidates.iter().any(|c| c.estimate == DEFAULT_ESTIMATE_MS) {
            median(ended_durations(db, split.id)?)
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
        let start = start_estimate(db, &split.repo, &split.key)?;
        if start == 0 {
            return Ok(batch_len(&estimates, shards_for_round, max, 0, 0));
        }
        let in_flight = in_flight_ms(db, split.id, split.round, self.attempt)?;
        let floor = sizing_floor(&split_estimates(db, split.id, seen)?, start);
        let estimates = if floor > 0 {
            let trusted = reliable_units(db, &split.repo, &split.key)?;
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

    fn lease(&self, split: &SplitRow, candidates: Vec<Candidate>, n: usize) -> Result<UnitsReply> {
        let runner_name = self.runner_name()?;
        let mut out = Vec::with_capacity(n);
        for c in candidates.into_iter().take(n) {
            self.db.execute(
                "UPDATE unit_tries SET state = 'leased', attempt_id = $1, request = $2, \
                 runner_id = $3, runner = $4, leased_at = $5 \
                 WHERE split_id = $6 AND position = $7 AND try_number = $8",
                &[
                    &self.attempt,
                    &i64::from(self.req.request),
                    &self.runner,
                    &runner_name,
                    &self.now,
                    &split.id,
                    &c.position,
                    &i64::from(c.try_number),
                ],
            )?;
            out.push(LeasedUnit {
                unit: c.unit,
                try_number: c.try_number,
            });
        }
        Ok(UnitsReply::Batch(out))
    }

    fn end_round(&self, split: &mut SplitRow) -> Result<Option<UnitsReply>> {
        let db = self.db;
        let round = split.round;
        let tries = load_tries(db, split.id)?;
        let units = get_u64(
            &db.query_one(
                "SELECT COUNT(*) FROM split_units WHERE split_id = $1",
                &[&split.id],
            )?,
            0,
        )?;
        let stats = round_stats(&tries, units, round);
        let (positions, failed) = failed_in_round(db, split.id, round)?;
        match next_round(&split.retry, &stats, &failed) {
            RoundDecision::Retry { units, note } => {
                for i in units {
                    db.execute(
                        "INSERT INTO unit_tries (split_id, position, try_number, state, shard, \
                         estimate_ms) VALUES ($1, $2, $3, 'queued', NULL, $4)",
                        &[
                            &split.id,
                            &positions[i],
                            &i64::from(round + 1),
                            &to_i64(failed[i].estimate_ms.max(1)),
                        ],
                    )?;
                }
                split.round = round + 1;
                split.retry_note = join_notes(&split.retry_note, &note);
                db.execute(
                    "UPDATE splits SET round = $1, retry_note = $2 WHERE id = $3",
                    &[&i64::from(split.round), &split.retry_note, &split.id],
                )?;
                Ok(None)
            }
            RoundDecision::Stop(note) => {
                finish_split_row(db, split, &tries, note, self.now)?;
                Ok(Some(UnitsReply::Done {
                    passed: split.passed,
                    summary: split.summary.clone(),
                }))
            }
        }
    }
}

/// Closes the unfinished splits of `build` whose shard jobs have all ended (see `split.rs`).
pub(crate) fn close_abandoned_splits(db: &Db<'_>, build: BuildId, now: Millis) -> Result<()> {
    let open = db
        .query(
            "SELECT split_key FROM splits WHERE build_id = $1 AND NOT done",
            &[&build],
        )?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect::<Result<Vec<String>>>()?;
    if open.is_empty() {
        return Ok(());
    }
    let jobs = db
        .query(
            "SELECT state, steps FROM jobs WHERE build_id = $1",
            &[&build],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<Vec<(String, String)>>>()?;
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
        if let Some(mut split) = load_split(db, build, &key)? {
            let tries = load_tries(db, split.id)?;
            finish_split_row(
                db,
                &mut split,
                &tries,
                "every shard ended before the split was over".into(),
                now,
            )?;
        }
    }
    Ok(())
}

fn build_final(db: &Db<'_>, build: BuildId) -> Result<bool> {
    let state: Option<String> = db
        .query_opt("SELECT state FROM builds WHERE id = $1", &[&build])?
        .map(|r| r.try_get(0))
        .transpose()?;
    match state {
        None => Ok(true),
        Some(s) => Ok(s
            .parse::<JobState>()
            .map_err(|e| corrupt("build state", e))?
            .is_final()),
    }
}

/// The split reports of a build (see `Store::split_reports`).
pub(crate) fn reports_of(db: &Db<'_>, build: BuildId) -> Result<Vec<SplitReport>> {
    let splits = db
        .query(
            &format!("SELECT {SPLIT_COLUMNS} FROM splits WHERE build_id = $1 ORDER BY id"),
            &[&build],
        )?
        .iter()
        .map(split_from_row)
        .collect::<Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(splits.len());
    for split in splits {
        let ended = split.done || build_final(db, split.build_id)?;
        let attempts = split.retry.attempts.max(1);
        let units = db
            .query(
                "SELECT u.position, u.unit, COALESCE(h.flaky, 0) FROM split_units u \
                 LEFT JOIN unit_history h ON h.repo = $2 AND h.split_key = $3 \
                 AND h.unit = u.unit WHERE u.split_id = $1 ORDER BY u.position",
                &[&split.id, &split.repo, &split.key],
            )?
            .iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, get_u32(r, 2)?)))
            .collect::<Result<Vec<(i64, String, u32)>>>()?;
        let mut tries: BTreeMap<i64, Vec<(TryRow, UnitTry)>> = BTreeMap::new();
        for r in db.query(
            "SELECT position, try_number, state, outcome, runner, duration_ms, cases \
             FROM unit_tries WHERE split_id = $1 ORDER BY position, try_number",
            &[&split.id],
        )? {
            let position: i64 = r.try_get(0)?;
            let try_number = get_u32(&r, 1)?;
            let state: String = r.try_get(2)?;
            let outcome: Option<String> = r.try_get(3)?;
            let state = try_state(&state, outcome.as_deref())?;
            let duration = get_u64(&r, 5)?;
            let cases: String = r.try_get(6)?;
            let cases: Vec<TestCase> =
                serde_json::from_str(&cases).map_err(|e| corrupt("test cases", e))?;
            tries.entry(position).or_default().push((
                TryRow {
                    position,
                    try_number,
                    state,
                    duration,
                },
                UnitTry {
                    try_number,
                    state,
                    runner: r.try_get(4)?,
                    duration_ms: duration,
                    cases,
                },
            ));
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
            interactions: interactions_of(db, split.id)?,
            interaction_policy: split.retry.interaction,
        });
    }
    Ok(out)
}

/// The batches of a build's splits (see `Store::split_batches`).
pub(crate) fn batches_of(
    db: &Db<'_>,
    build: BuildId,
) -> Result<Vec<kiln_domain::split::BatchRecord>> {
    db.query(
        "SELECT s.id, s.split_key, t.attempt_id, COALESCE(MIN(j.name), ''), t.request, \
         t.try_number, COALESCE(MIN(t.runner), ''), MIN(t.leased_at), \
         CASE WHEN COUNT(t.ended_at) = COUNT(*) THEN MAX(t.ended_at) END, \
         string_agg(u.unit, E'\\n' ORDER BY t.position), \
         SUM(CASE WHEN t.outcome IS NOT NULL AND t.outcome <> 'passed' THEN 1 ELSE 0 END) \
         FROM unit_tries t JOIN splits s ON s.id = t.split_id \
         JOIN split_units u ON u.split_id = t.split_id AND u.position = t.position \
         LEFT JOIN attempts a ON a.id = t.attempt_id LEFT JOIN jobs j ON j.id = a.job_id \
         WHERE s.build_id = $1 AND t.attempt_id IS NOT NULL AND t.leased_at IS NOT NULL \
         GROUP BY s.id, t.attempt_id, t.request, t.try_number \
         ORDER BY s.id, MIN(t.leased_at), t.attempt_id, t.request",
        &[&build],
    )?
    .iter()
    .map(|r| {
        let request: Option<i64> = r.try_get(4)?;
        let units: Option<String> = r.try_get(9)?;
        Ok(kiln_domain::split::BatchRecord {
            split_id: r.try_get(0)?,
            split_key: r.try_get(1)?,
            attempt: r.try_get(2)?,
            job: r.try_get(3)?,
            request: request.map_or(Ok(0), |v| {
                u32::try_from(v).map_err(|e| corrupt("request number", e))
            })?,
            round: get_u32(r, 5)?,
            runner: r.try_get(6)?,
            leased_at: r.try_get(7)?,
            ended_at: r.try_get(8)?,
            units: units
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect(),
            failed: get_u32(r, 10)?,
        })
    })
    .collect()
}

/// The past of some units of a split key in a repository (see `Store::unit_pasts`).
pub(crate) fn unit_pasts_of(
    db: &Db<'_>,
    repo: &str,
    key: &str,
    units: &[String],
    until: BuildId,
    limit: u32,
) -> Result<Vec<kiln_domain::split::UnitPast>> {
    let limit = i64::from(limit);
    let mut out = Vec::with_capacity(units.len());
    for unit in units {
        // The last `limit` splits that ran the unit (`splits_by_repo`, then
        // `split_units_by_unit`), each with the unit's tries.
        let rows = db.query(
            "SELECT s.build_id, s.done, t.try_number, t.state, t.outcome, \
             COALESCE(t.duration_ms, 0) \
             FROM (SELECT id, build_id, done FROM splits \
                   WHERE repo = $1 AND split_key = $2 AND build_id <= $4 AND EXISTS \
                   (SELECT 1 FROM split_units u WHERE u.split_id = splits.id AND u.unit = $3) \
                   ORDER BY build_id DESC LIMIT $5) s \
             JOIN split_units su ON su.split_id = s.id AND su.unit = $3 \
             LEFT JOIN unit_tries t ON t.split_id = s.id AND t.position = su.position \
             ORDER BY s.build_id DESC, t.try_number",
            &[&repo, &key, unit, &until, &limit],
        )?;
        let mut builds: Vec<(BuildId, bool, Vec<TryRow>)> = Vec::new();
        for r in &rows {
            let build: BuildId = r.try_get(0)?;
            if builds.last().is_none_or(|(b, _, _)| *b != build) {
                builds.push((build, r.try_get(1)?, Vec::new()));
            }
            let try_number: Option<i64> = r.try_get(2)?;
            let state: Option<String> = r.try_get(3)?;
            let outcome: Option<String> = r.try_get(4)?;
            if let (Some(try_number), Some(state), Some(last)) =
                (try_number, state, builds.last_mut())
            {
                last.2.push(TryRow {
                    position: 0,
                    try_number: u32::try_from(try_number).map_err(|e| corrupt("try number", e))?,
                    state: try_state(&state, outcome.as_deref())?,
                    duration: get_u64(r, 5)?,
                });
            }
        }
        let totals = db.query_opt(
            "SELECT flaky, failed FROM unit_history WHERE repo = $1 AND split_key = $2 AND unit = $3",
            &[&repo, &key, unit],
        )?;
        let (flaky_total, failed_total) = match totals {
            Some(r) => (get_u64(&r, 0)?, get_u64(&r, 1)?),
            None => (0, 0),
        };
        out.push(kiln_domain::split::UnitPast {
            unit: unit.clone(),
            recent: builds
                .iter()
                .map(|(b, done, tries)| {
                    let tries: Vec<&TryRow> = tries.iter().collect();
                    (*b, verdict(&tries, *done))
                })
                .collect(),
            flaky_total,
            failed_total,
        });
    }
    Ok(out)
}

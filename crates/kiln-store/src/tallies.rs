//! What `/metrics` counts from the store (jobs per state, lost attempts, ended unit tries,
//! deliveries per target kind and state, and their tries), kept as the rows change rather than
//! counted at each scrape, so a scrape costs the same at a thousand stored builds and at a
//! million.
//!
//! Triggers (SQLite's migration 13, PostgreSQL's 3) add one row to `tally_deltas` per change,
//! in the changing transaction: only inserts, so writers on several dispatchers never wait on
//! a shared counter row. A scrape sums `tallies` and the deltas ([`READ`]); folding
//! ([`crate::Store::fold_tallies`], at each scrape and every minute) moves the deltas into
//! `tallies` in one transaction, so the deltas stay as few as the changes of a minute.

use std::collections::BTreeMap;

use crate::sqlite::corrupt;
use crate::{DeliveryCount, Result, StoreMetrics};

/// Every tally, its folded value plus its deltas (the same SQL on both backends).
pub(crate) const READ: &str = "SELECT metric, k1, k2, CAST(SUM(n) AS BIGINT) FROM \
     (SELECT metric, k1, k2, n FROM tallies UNION ALL SELECT metric, k1, k2, d FROM tally_deltas) t \
     GROUP BY metric, k1, k2 ORDER BY metric, k1, k2";

/// Puts tallies read by [`READ`] (metric, key, key, value) into `m`; counts of zero are left
/// out, as a count of rows would leave them.
pub(crate) fn into_metrics(
    rows: impl IntoIterator<Item = (String, String, String, i64)>,
    m: &mut StoreMetrics,
) -> Result<()> {
    let mut deliveries: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for (metric, k1, k2, n) in rows {
        let n =
            u64::try_from(n).map_err(|_| corrupt("tally", format!("{metric} {k1} {k2}: {n}")))?;
        match metric.as_str() {
            "jobs" if n > 0 => m
                .jobs_by_state
                .push((k1.parse().map_err(|e| corrupt("job state", e))?, n)),
            "lost" => m.lost_attempts += n,
            "unit_tries" if n > 0 => {
                let outcome = kiln_domain::split::UnitOutcome::parse(&k1)
                    .ok_or_else(|| corrupt("unit try outcome", &k1))?;
                m.unit_tries.push((outcome, k2 == "retry", n));
            }
            "deliveries" => deliveries.entry((k1, k2)).or_default().0 = n,
            "delivery_tries" => deliveries.entry((k1, k2)).or_default().1 = n,
            _ => {}
        }
    }
    for ((kind, state), (count, tries)) in deliveries {
        if count > 0 {
            m.deliveries.push(DeliveryCount {
                kind,
                state: state
                    .parse()
                    .map_err(|e: String| corrupt("delivery state", e))?,
                count,
                tries,
            });
        }
    }
    Ok(())
}

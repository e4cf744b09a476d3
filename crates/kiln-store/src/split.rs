//! Split steps in SQLite: the unit queue of each split, leases, results, retry rounds, the
//! merged reports and the per-repository unit history.

use kiln_domain::BuildId;
use kiln_domain::split::{SplitReport, UnitsReply, UnitsRequest};

use crate::Result;
use crate::sqlite::SqliteStore;

impl SqliteStore {
    pub(crate) fn split_next_units(&self, _req: &UnitsRequest) -> Result<UnitsReply> {
        Ok(UnitsReply::Refused(
            "split steps are not implemented yet".into(),
        ))
    }

    pub(crate) fn split_reports_of(&self, _build: BuildId) -> Result<Vec<SplitReport>> {
        Ok(Vec::new())
    }

    pub(crate) fn split_seed_durations(
        &self,
        _repo: &str,
        _key: &str,
        _durations: &[(String, u64)],
    ) -> Result<()> {
        Ok(())
    }
}

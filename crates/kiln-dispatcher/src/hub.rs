//! Tells log followers how far each job's log reached and when the job ended.
//!
//! The bytes themselves are read from the log store; the hub only publishes lengths through a
//! `watch` channel per followed job, so a slow follower never holds output in memory and can
//! never miss or repeat a chunk: it reads from its own offset up to the published length.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use kiln_domain::{JobId, JobState};
use kiln_store::LogError;
use tokio::sync::watch;

/// How far a job's log reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogProgress {
    /// Length of the stored log (every byte below it is whole frames).
    pub len: u64,
    /// Set once the job ended: its final state.
    pub done: Option<JobState>,
}

/// Progress channels of followed jobs.
#[derive(Default)]
pub struct Hub {
    /// One channel per job that has followers (or had, until it ended).
    jobs: Mutex<HashMap<JobId, watch::Sender<LogProgress>>>,
}

impl Hub {
    fn jobs(&self) -> MutexGuard<'_, HashMap<JobId, watch::Sender<LogProgress>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to a job's progress; `len` gives the stored length when nobody followed yet.
    pub fn subscribe(
        &self,
        job: JobId,
        len: impl FnOnce() -> Result<u64, LogError>,
    ) -> Result<watch::Receiver<LogProgress>, LogError> {
        let mut jobs = self.jobs();
        if let Some(tx) = jobs.get(&job) {
            return Ok(tx.subscribe());
        }
        let (tx, rx) = watch::channel(LogProgress {
            len: len()?,
            done: None,
        });
        jobs.insert(job, tx);
        Ok(rx)
    }

    /// The log of `job` grew to `len`.
    pub fn advance(&self, job: JobId, len: u64) {
        if let Some(tx) = self.jobs().get(&job) {
            tx.send_if_modified(|p| {
                let grew = len > p.len;
                if grew {
                    p.len = len;
                }
                grew
            });
        }
    }

    /// Whether `job` has followers now.
    pub fn is_followed(&self, job: JobId) -> bool {
        self.jobs().contains_key(&job)
    }

    /// The jobs followed now.
    pub fn followed(&self) -> Vec<JobId> {
        self.jobs().keys().copied().collect()
    }

    /// The job ended: followers read to the end and stop.
    pub fn finish(&self, job: JobId, state: JobState) {
        if let Some(tx) = self.jobs().remove(&job) {
            tx.send_modify(|p| p.done = Some(state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_see_growth_and_end() {
        let hub = Hub::default();
        let Ok(mut rx) = hub.subscribe(JobId::new(1), || Ok(10)) else {
            panic!("subscribe failed")
        };
        assert_eq!(rx.borrow_and_update().len, 10);
        hub.advance(JobId::new(1), 5); // never goes back
        assert!(!rx.has_changed().unwrap_or(true));
        hub.advance(JobId::new(1), 20);
        assert_eq!(rx.borrow_and_update().len, 20);
        hub.finish(JobId::new(1), JobState::Passed);
        assert_eq!(rx.borrow_and_update().done, Some(JobState::Passed));
        // A job nobody follows costs nothing.
        hub.advance(JobId::new(2), 5);
        hub.finish(JobId::new(2), JobState::Failed);
    }
}

//! With several dispatchers: what this dispatcher told its watchers (`WatchBuilds`, the web
//! page's `/events`, the notifier) of each build that is not final, so that after a bus gap
//! (`Heard::MayHaveMissed`: the events other dispatchers sent meanwhile may be lost) it can
//! re-read those builds from the store and tell its watchers every state they missed. A
//! watcher then never waits forever for an end that happened during a gap.
//!
//! Memory: one entry per build that is not final (its id and its jobs' last told states); an
//! entry goes when its build's final event is told.

use std::collections::HashMap;

use kiln_domain::{BuildId, Event, JobId, JobState, now_millis};

/// What was told of one open build (`None`/absent: nothing yet, since this dispatcher started).
#[derive(Debug, Default)]
struct Told {
    state: Option<JobState>,
    jobs: HashMap<JobId, JobState>,
    /// The count of events told when one of this build was last told.
    last: u64,
}

/// The open builds and what was told of them (see the module's documentation).
#[derive(Debug, Default)]
pub(crate) struct OpenBuilds {
    builds: HashMap<BuildId, Told>,
    /// The newest build known here: builds after it were created since (perhaps during a gap).
    newest: Option<BuildId>,
    /// Whether the store was looked at once (`seed`).
    seeded: bool,
    /// Events told so far.
    count: u64,
}

impl OpenBuilds {
    /// An event was told to this dispatcher's watchers.
    pub(crate) fn told(&mut self, e: &Event) {
        self.newest = self.newest.max(Some(e.build_id));
        self.count += 1;
        let count = self.count;
        match e.job_id {
            None if e.state.is_final() => {
                self.builds.remove(&e.build_id);
            }
            None => {
                let t = self.builds.entry(e.build_id).or_default();
                t.state = Some(e.state);
                t.last = count;
            }
            Some(job) => {
                // A job that ended in a build not open here: the build already ended (its
                // final event came first) and is not worth an entry.
                let open = self.builds.contains_key(&e.build_id);
                if open || !e.state.is_final() {
                    let t = self.builds.entry(e.build_id).or_default();
                    t.jobs.insert(job, e.state);
                    t.last = count;
                }
            }
        }
    }

    /// Whether the first look at the store was made (`seed`).
    pub(crate) fn seeded(&self) -> bool {
        self.seeded
    }

    /// At the bus's first listen: the builds that are not final (nothing told of them yet), and
    /// the newest build (`BuildId` 0 when there is none).
    pub(crate) fn seed(&mut self, open: impl IntoIterator<Item = BuildId>, newest: BuildId) {
        for b in open {
            self.builds.entry(b).or_default();
        }
        self.newest = self.newest.max(Some(newest));
        self.seeded = true;
    }

    /// The builds to re-read after a gap: the open ones, the newest known (builds after it
    /// are listed from the store), and the count of events told so far (for `missed`).
    pub(crate) fn to_check(&self) -> (Vec<BuildId>, Option<BuildId>, u64) {
        (
            self.builds.keys().copied().collect(),
            self.newest,
            self.count,
        )
    }

    /// The events a build's stored state means for watchers told what `self` holds: a job
    /// event for each job whose state differs (or was never told), then the build's own when
    /// it differs. Records them as told (the build goes once final); `None` for a build gone
    /// from the store. Nothing for a build an event was told of after `since` (the count
    /// `to_check` gave before the store was read): that event may be newer than what was read.
    pub(crate) fn missed(
        &mut self,
        id: BuildId,
        stored: Option<&kiln_store::BuildDetail>,
        since: u64,
    ) -> Vec<Event> {
        let Some(d) = stored else {
            self.builds.remove(&id);
            return Vec::new();
        };
        let told = self.builds.get(&id);
        if told.is_some_and(|t| t.last > since) {
            return Vec::new();
        }
        let at = now_millis();
        let mut out: Vec<Event> = d
            .jobs
            .iter()
            .filter(|j| told.and_then(|t| t.jobs.get(&j.id)) != Some(&j.state))
            .map(|j| Event {
                build_id: id,
                job_id: Some(j.id),
                state: j.state,
                at,
            })
            .collect();
        if told.and_then(|t| t.state) != Some(d.build.state) {
            out.push(Event {
                build_id: id,
                job_id: None,
                state: d.build.state,
                at,
            });
        }
        for e in &out {
            self.told(e);
        }
        if d.build.state.is_final() {
            self.builds.remove(&id);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(b: u64, j: Option<u64>, state: JobState) -> Event {
        Event {
            build_id: BuildId::new(b),
            job_id: j.map(JobId::new),
            state,
            at: 0,
        }
    }

    #[test]
    fn a_final_build_is_forgotten_and_told_states_are_kept() {
        let mut o = OpenBuilds::default();
        o.told(&ev(1, None, JobState::Queued));
        o.told(&ev(1, Some(10), JobState::Running));
        o.told(&ev(2, None, JobState::Queued));
        o.told(&ev(2, None, JobState::Passed));
        let (mut open, newest, _) = o.to_check();
        open.sort();
        assert_eq!(open, vec![BuildId::new(1)]);
        assert_eq!(newest, Some(BuildId::new(2)));
        assert_eq!(
            o.builds[&BuildId::new(1)].jobs[&JobId::new(10)],
            JobState::Running
        );
    }
}

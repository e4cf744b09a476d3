//! Pure rules: which events a point of a build's life gives, the retry schedule, the webhook
//! signature. No I/O.

use std::time::Duration;

use hmac::{Hmac, Mac};
use kiln_domain::JobState;
use kiln_store::Mark;
use sha2::Sha256;

use crate::config::{DeliverySettings, EventKind};

/// Whether a final build state is a failure (`failed` events, `failure`/`error` statuses).
pub fn is_failure(state: JobState) -> bool {
    matches!(
        state,
        JobState::Failed | JobState::TimedOut | JobState::Errored
    )
}

/// Whether a final build state is a verdict on the commit: passed or a failure. Cancelled
/// (by a user, or superseded by a newer commit) and skipped builds say nothing about it, so
/// `fixed` looks past them.
pub fn is_verdict(state: JobState) -> bool {
    state == JobState::Passed || is_failure(state)
}

/// The events of `mark` for a build now in `state`; `previous` is the state of the previous
/// build of the same repository and branch that ended with a verdict ([`is_verdict`]).
pub fn events_at(mark: Mark, state: JobState, previous: Option<JobState>) -> Vec<EventKind> {
    match mark {
        Mark::Queued => vec![EventKind::Queued],
        Mark::Started => vec![EventKind::Started],
        Mark::Finished => {
            let mut events = vec![EventKind::Finished];
            if is_failure(state) {
                events.push(EventKind::Failed);
            }
            if state == JobState::Passed && previous.is_some_and(|p| p != JobState::Passed) {
                events.push(EventKind::Fixed);
            }
            events
        }
    }
}

/// The wait after try `tries` (1 for the first) failed, before `jitter` (a fraction in
/// `[0, 1)`) adds up to a quarter more: `first_retry` doubled per try, at most `max_retry`;
/// `None` once `tries` tries were made.
pub fn retry_after(settings: &DeliverySettings, tries: u32, jitter: f64) -> Option<Duration> {
    if tries >= settings.tries {
        return None;
    }
    let doublings = tries.saturating_sub(1).min(30);
    let wait = settings
        .first_retry
        .saturating_mul(1 << doublings)
        .min(settings.max_retry);
    let extra = wait.mul_f64(jitter.clamp(0.0, 0.999) / 4.0);
    Some(wait + extra)
}

/// `X-Kiln-Signature-256`: `sha256=` and the hex HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use EventKind::*;

    #[test]
    fn events_of_each_mark() {
        assert_eq!(events_at(Mark::Queued, JobState::Queued, None), [Queued]);
        assert_eq!(events_at(Mark::Started, JobState::Running, None), [Started]);
        let fin = |s, p| events_at(Mark::Finished, s, p);
        assert_eq!(fin(JobState::Passed, None), [Finished]);
        assert_eq!(fin(JobState::Passed, Some(JobState::Passed)), [Finished]);
        assert_eq!(
            fin(JobState::Passed, Some(JobState::Failed)),
            [Finished, Fixed]
        );
        assert_eq!(
            fin(JobState::Passed, Some(JobState::Errored)),
            [Finished, Fixed]
        );
        assert_eq!(
            fin(JobState::Failed, Some(JobState::Failed)),
            [Finished, Failed]
        );
        assert_eq!(fin(JobState::TimedOut, None), [Finished, Failed]);
        assert_eq!(fin(JobState::Errored, None), [Finished, Failed]);
        assert_eq!(fin(JobState::Cancelled, Some(JobState::Failed)), [Finished]);
        assert!(!is_verdict(JobState::Cancelled) && !is_verdict(JobState::Skipped));
        assert!(is_verdict(JobState::TimedOut));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_then_gives_up() {
        let s = DeliverySettings {
            first_retry: Duration::from_secs(2),
            max_retry: Duration::from_secs(60),
            tries: 7,
            ..DeliverySettings::default()
        };
        let waits: Vec<_> = (1..=7).map(|t| retry_after(&s, t, 0.0)).collect();
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(
            waits,
            [
                secs(2),
                secs(4),
                secs(8),
                secs(16),
                secs(32),
                secs(60),
                None
            ]
        );
        // Jitter adds at most a quarter.
        assert_eq!(retry_after(&s, 1, 0.5), Some(Duration::from_millis(2250)));
        let most = retry_after(&s, 6, 0.9999).unwrap();
        assert!(most < Duration::from_secs(75) && most > Duration::from_secs(74));
        // Huge try counts saturate instead of overflowing.
        let many = DeliverySettings {
            tries: u32::MAX,
            ..s
        };
        assert_eq!(retry_after(&many, 1000, 0.0), secs(60));
    }

    #[test]
    fn signature_is_githubs_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}

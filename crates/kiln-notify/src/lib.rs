//! Notifications: webhooks, mail and commit statuses about builds, configured per repository
//! and branch (`kiln serve --notify-config FILE`), delivered at least once from a durable
//! outbox in the store.
//!
//! - `config`: the config file ([`Config`]), its rules and the secrets they name.
//! - `rules`: pure rules: the events of each point of a build's life (started, finished,
//!   failed, fixed), the retry schedule, the webhook signature.
//! - `plan`: planning a build: for each point reached (queued, a job started, finished) and
//!   not planned yet, its deliveries with what they send, stored with the point's mark in one
//!   transaction ([`kiln_store::Store::plan_deliveries`]).
//! - `send`: one try of one delivery (reqwest for webhooks and statuses, lettre for mail).
//! - [`run`]: the planner (the dispatcher's event broadcast, and the store at start, on lag and
//!   every minute, so nothing is missed when the broadcast lags or the process crashed) and the
//!   sender (due deliveries, bounded concurrency, a timeout on each try, exponential backoff
//!   with jitter, a last try recorded as failed). Both are tasks of their own: a notifier that
//!   is down or slow never holds a build.
//! - [`router`]: `GET /api/builds/{id}/deliveries`, a build's delivery log as JSON.
//!
//! Receivers de-duplicate by `X-Kiln-Delivery` (the delivery's id, the same on every try):
//! a try whose answer was lost in a crash is sent again.

mod config;
mod plan;
mod rules;
mod send;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kiln_dispatcher::Dispatcher;
use kiln_domain::{BuildId, JobState, Millis, now_millis};
use kiln_store::{Delivery, DeliveryResult, Store, StoreError};
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{
    Config, ConfigError, DeliverySettings, EventKind, Forge, Mail, Rule, Security, Smtp, Status,
    Webhook, derive_owner_repo,
};
pub use plan::{MAIL_LOG_LINES, STATUS_CONTEXT};
pub use rules::{events_at, retry_after, signature};

/// How far back a start (or a lagging broadcast) looks for builds whose notifications were
/// never planned.
pub const RECONCILE_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// How often the store is checked for unplanned builds anyway.
const RECONCILE_EVERY: Duration = Duration::from_secs(60);
/// Longest sleep of the sender with nothing due.
const IDLE_POLL: Duration = Duration::from_secs(30);

/// Errors of planning (logged; the next reconciliation tries again).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("{0}")]
    Dispatch(#[from] kiln_dispatcher::DispatchError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("store task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Runs a store call on the blocking pool.
pub(crate) async fn blocking<T, F>(store: &Arc<dyn Store>, f: F) -> Result<T, Error>
where
    T: Send + 'static,
    F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    Ok(tokio::task::spawn_blocking(move || f(store.as_ref())).await??)
}

/// Plans and sends notifications until `shutdown`. Deliveries in flight then are cut off;
/// their lease runs out and the next start sends them again.
pub async fn run(dispatcher: Dispatcher, config: Config, shutdown: CancellationToken) {
    let config = Arc::new(config);
    let store = dispatcher.store();
    let wake = Arc::new(Notify::new());
    let client = match send::client(config.delivery.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(cause = %kiln_domain::error_chain(&e), "notifications off: no HTTP client");
            return;
        }
    };
    let planner = tokio::spawn(planner(
        dispatcher,
        store.clone(),
        config.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    let sender = tokio::spawn(sender(store, config, client, wake, shutdown));
    let _ = planner.await;
    let _ = sender.await;
}

async fn planner(
    dispatcher: Dispatcher,
    store: Arc<dyn Store>,
    config: Arc<Config>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    // Subscribe first, then read the store: nothing reached between the two is missed.
    let mut events = dispatcher.subscribe();
    reconcile(&dispatcher, &store, &config, &wake).await;
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => reconcile(&dispatcher, &store, &config, &wake).await,
            event = events.recv() => match event {
                Ok(e) if e.job_id.is_none() || e.state == JobState::Running => {
                    plan_one(&dispatcher, &store, &config, &wake, e.build_id).await;
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::info!(missed = n, "notifications lagged behind the events; reading the store");
                    reconcile(&dispatcher, &store, &config, &wake).await;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn plan_one(
    dispatcher: &Dispatcher,
    store: &Arc<dyn Store>,
    config: &Config,
    wake: &Notify,
    build: BuildId,
) {
    match plan::plan_build(dispatcher, store, config, build).await {
        Ok(0) => {}
        Ok(_) => wake.notify_one(),
        Err(e) => {
            tracing::warn!(%build, cause = %e, "cannot plan notifications; retried later")
        }
    }
}

/// Plans every build of the window whose notifications were never planned.
async fn reconcile(
    dispatcher: &Dispatcher,
    store: &Arc<dyn Store>,
    config: &Config,
    wake: &Notify,
) {
    let since = now_millis() - RECONCILE_WINDOW.as_millis() as Millis;
    let mut failed: HashSet<BuildId> = HashSet::new();
    loop {
        let builds = match blocking(store, move |s| s.unplanned_builds(since, 100)).await {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(cause = %e, "cannot read unplanned builds");
                return;
            }
        };
        let todo: Vec<_> = builds.into_iter().filter(|b| !failed.contains(b)).collect();
        if todo.is_empty() {
            return;
        }
        for b in todo {
            match plan::plan_build(dispatcher, store, config, b).await {
                Ok(n) if n > 0 => wake.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(build = %b, cause = %e, "cannot plan notifications");
                    failed.insert(b);
                }
            }
        }
    }
}

/// What a finished try gives back.
struct Tried {
    key: String,
    delivery: Delivery,
    result: Result<(), send::SendError>,
}

async fn sender(
    store: Arc<dyn Store>,
    config: Arc<Config>,
    client: reqwest::Client,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let settings = config.delivery.clone();
    // One try's limit (a mail is a conversation of several commands), and the lease a taken
    // delivery gets in the store: past it, a sender that died leaves it due again.
    let limit = settings.timeout * 3;
    let lease = limit + Duration::from_secs(5);
    let mut tasks: JoinSet<Tried> = JoinSet::new();
    // Deliveries to the same build and target go one at a time, in order (a commit status
    // must not be overtaken by an older one).
    let mut busy: HashSet<String> = HashSet::new();
    let mut waiting: HashMap<String, Vec<Delivery>> = HashMap::new();
    // Rows in flight or waiting: one whose lease ran out while it waited is taken again by
    // the store, and must not be sent twice.
    let mut held: HashSet<kiln_store::DeliveryKey> = HashSet::new();
    loop {
        // Take what is due, up to the free slots.
        let free = settings.concurrency.saturating_sub(tasks.len());
        if free > 0 {
            let now = now_millis();
            let until = now + lease.as_millis() as Millis;
            match blocking(&store, move |s| {
                s.take_due_deliveries(now, until, free as u32)
            })
            .await
            {
                Ok(due) => {
                    for d in due {
                        if !held.insert(d.key) {
                            continue;
                        }
                        let key = format!("{} {}", d.build_id, d.target);
                        if busy.contains(&key) {
                            waiting.entry(key).or_default().push(d);
                        } else {
                            busy.insert(key.clone());
                            start(&mut tasks, &client, &config, limit, key, d);
                        }
                    }
                }
                Err(e) => tracing::warn!(cause = %e, "cannot read due deliveries"),
            }
        }
        let next = match blocking(&store, |s| s.next_delivery_at()).await {
            Ok(Some(at)) => Duration::from_millis((at - now_millis()).clamp(0, 30_000) as u64),
            _ => IDLE_POLL,
        };
        let sleep = if tasks.len() >= settings.concurrency {
            IDLE_POLL
        } else {
            next.max(Duration::from_millis(20))
        };
        tokio::select! {
            () = shutdown.cancelled() => {
                tasks.abort_all();
                return;
            }
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                let Ok(t) = done else { continue };
                record(&store, &settings, &t).await;
                held.remove(&t.delivery.key);
                busy.remove(&t.key);
                if let Some(list) = waiting.get_mut(&t.key) {
                    if list.is_empty() {
                        waiting.remove(&t.key);
                    } else {
                        let d = list.remove(0);
                        busy.insert(t.key.clone());
                        start(&mut tasks, &client, &config, limit, t.key, d);
                    }
                }
            }
            () = wake.notified() => {}
            () = tokio::time::sleep(sleep) => {}
        }
    }
}

fn start(
    tasks: &mut JoinSet<Tried>,
    client: &reqwest::Client,
    config: &Arc<Config>,
    limit: Duration,
    key: String,
    delivery: Delivery,
) {
    let (client, config) = (client.clone(), config.clone());
    tasks.spawn(async move {
        let result =
            match tokio::time::timeout(limit, send::send(&client, &config, &delivery)).await {
                Ok(r) => r,
                Err(_) => Err(send::SendError::Transient(format!(
                    "no answer within {}s",
                    limit.as_secs()
                ))),
            };
        Tried {
            key,
            delivery,
            result,
        }
    });
}

async fn record(store: &Arc<dyn Store>, settings: &DeliverySettings, t: &Tried) {
    let d = &t.delivery;
    let tries = d.attempts + 1;
    let now = now_millis();
    let result = match &t.result {
        Ok(()) => DeliveryResult::Delivered,
        Err(send::SendError::Permanent(e)) => DeliveryResult::Failed { error: e.clone() },
        Err(send::SendError::Transient(e)) => {
            match retry_after(settings, tries, rand::random::<f64>()) {
                Some(wait) => DeliveryResult::Retry {
                    next_at: now + wait.as_millis() as Millis,
                    error: e.clone(),
                },
                None => DeliveryResult::Failed {
                    error: format!("gave up after {tries} tries: {e}"),
                },
            }
        }
    };
    match &result {
        DeliveryResult::Delivered => {
            tracing::info!(build = %d.build_id, event = %d.event, target = %d.target, delivery = %d.delivery_id, tries, "delivered")
        }
        DeliveryResult::Retry { error, .. } => {
            tracing::info!(build = %d.build_id, event = %d.event, target = %d.target, tries, %error, "delivery failed; will retry")
        }
        DeliveryResult::Failed { error } => {
            tracing::warn!(build = %d.build_id, event = %d.event, target = %d.target, tries, %error, "delivery failed for good")
        }
    }
    let key = d.key;
    if let Err(e) = blocking(store, move |s| s.record_delivery(key, &result, now)).await {
        tracing::warn!(cause = %e, "cannot record a delivery's try (it is sent again after its lease)");
    }
}

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use strata_cache_tiers::{Cached, L2Cache, Put, invalidation_messages};
use strata_core::{Content, EventTime, FeatureView, Lifetime, Row};
use strata_shard_router::UpsertOutcome;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::{Lower, Repair, Tiers, sample};

impl Tiers {
    /// Writes distinct rows to their shards; then, for the rows applied,
    /// replaces the Redis copy (unless Redis holds a newer one), drops this
    /// instance's L1 copy, and tells every instance to drop its own.
    ///
    /// Runs to the end even if the caller goes away (a cancelled request):
    /// once PostgreSQL may have committed, the caches must follow. A shard
    /// that has not answered by `deadline` fails its rows, whose keys are
    /// queued for repair, since its commit may still land.
    pub async fn write(&self, view: &Arc<FeatureView>, rows: &[(String, Row)], deadline: Instant) -> UpsertOutcome {
        let (this, view, rows) = (self.clone(), view.clone(), rows.to_vec());
        finish(tokio::spawn(async move { this.write_now(&view, &rows, deadline).await })).await
    }

    /// Deletes keys at event time `at`; then, for the keys applied, leaves
    /// a "missing" entry in Redis (unless Redis holds a newer version) and
    /// drops the key from every instance's L1. Runs to the end even if the
    /// caller goes away.
    pub async fn delete(
        &self,
        view: &Arc<FeatureView>,
        keys: &[String],
        at: EventTime,
        deadline: Instant,
    ) -> UpsertOutcome {
        let (this, view, keys) = (self.clone(), view.clone(), keys.to_vec());
        finish(tokio::spawn(async move { this.delete_now(&view, &keys, at, deadline).await })).await
    }

    pub(crate) async fn write_now(
        &self,
        view: &Arc<FeatureView>,
        rows: &[(String, Row)],
        deadline: Instant,
    ) -> UpsertOutcome {
        let outcome = self.lower.shards.upsert(view, rows, deadline).await;
        self.repair_unknown(view, &outcome, |key| {
            rows.iter().find(|(k, _)| k == key).map_or(EventTime::NEVER, |(_, row)| row.event_time)
        });
        if outcome.written.is_empty() {
            return outcome;
        }
        let by_key: std::collections::HashMap<&str, &Row> = rows.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let protection = &self.lower.protection;
        let puts: Vec<Put<'_>> = outcome
            .written
            .iter()
            .filter_map(|key| {
                let row = by_key.get(key.as_str())?;
                let life = protection.row_lifetime(view, view.l2_ttl);
                Some(Put { key, content: Content::Found(row), version: row.event_time, life })
            })
            .collect();
        self.after_write(view, &puts, &outcome.written, deadline).await;
        outcome
    }

    pub(crate) async fn delete_now(
        &self,
        view: &Arc<FeatureView>,
        keys: &[String],
        at: EventTime,
        deadline: Instant,
    ) -> UpsertOutcome {
        let outcome = self.lower.shards.delete(view, keys, at, deadline).await;
        self.repair_unknown(view, &outcome, |_| at);
        if outcome.written.is_empty() {
            return outcome;
        }
        let life = self.lower.guard_life(view);
        let puts: Vec<Put<'_>> =
            outcome.written.iter().map(|key| Put { key, content: Content::Missing, version: at, life }).collect();
        self.after_write(view, &puts, &outcome.written, deadline).await;
        outcome
    }

    /// Queues for repair the keys of shards that did not answer a write in
    /// time: their commit may land later, and the caches must then follow.
    /// The repair waits until PostgreSQL shows the write's version
    /// (`version_of` the key), so it cannot copy the old row back while the
    /// commit is still on its way.
    pub(crate) fn repair_unknown(
        &self,
        view: &Arc<FeatureView>,
        outcome: &UpsertOutcome,
        version_of: impl Fn(&str) -> EventTime,
    ) {
        let unknown: Vec<(String, EventTime)> = outcome.unknown().map(|key| (key.clone(), version_of(key))).collect();
        if !unknown.is_empty() {
            self.queue_repair(&self.unknown_repairs, view, unknown);
        }
    }

    pub(crate) fn queue_repair(
        &self,
        queue: &mpsc::Sender<Repair>,
        view: &Arc<FeatureView>,
        keys: Vec<(String, EventTime)>,
    ) {
        let n = keys.len() as u64;
        let queued = queue.try_send((view.clone(), keys, Instant::now())).is_ok();
        let outcome = if queued { "queued" } else { "dropped" };
        metrics::counter!("strata_cache_repairs_total", "view" => view.name.clone(), "outcome" => outcome).increment(n);
    }

    /// The cache step of a write: store what it left in Redis (unless
    /// Redis holds a newer version), drop the keys from this instance's L1
    /// at once, and announce them so every other instance drops them too.
    /// If Redis fails, the keys are queued for repair: otherwise Redis
    /// would keep the old copy until its TTL, and every instance would
    /// read it again.
    pub(crate) async fn after_write(
        &self,
        view: &Arc<FeatureView>,
        puts: &[Put<'_>],
        written: &[String],
        deadline: Instant,
    ) {
        let keys: Vec<&str> = written.iter().map(String::as_str).collect();
        let injected = self.lower.injected_failure();
        let stored = !injected && self.lower.put_after_write(view, puts, deadline).await;
        // After Redis holds the new copy: a local read that refilled L1
        // from the old one in between is dropped here (this instance
        // ignores its own announcements).
        self.l1.invalidate_many(view.id, &keys).await;
        let announced =
            !injected && announce(&self.lower.l2, &self.lower.writes.channel, self.origin, view, &keys, deadline).await;
        if !(stored && announced) {
            self.queue_repair(&self.repairs, view, written.iter().map(|key| (key.clone(), EventTime::NEVER)).collect());
        }
    }
}

/// The outcome of a spawned write. A panic in it is a bug, passed on; a
/// write cancelled by the runtime shutting down reports no result for its
/// keys (they answer FAILED, and a retry is safe).
pub(crate) async fn finish(task: tokio::task::JoinHandle<UpsertOutcome>) -> UpsertOutcome {
    match task.await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => UpsertOutcome::default(),
    }
}

/// Publishes written keys of a view on the invalidation channel, so every
/// instance drops its L1 copy. `origin` is the announcing instance (0 for
/// none). Gives up at `deadline`. A failure is logged and counted, and
/// false returned.
pub async fn announce(
    l2: &L2Cache,
    channel: &str,
    origin: u64,
    view: &FeatureView,
    keys: &[&str],
    deadline: Instant,
) -> bool {
    let mut ok = true;
    for message in invalidation_messages(origin, &view.name, keys) {
        if let Err(error) = l2.publish(channel, message, deadline).await {
            tracing::warn!(view = %view.name, %error, "publishing an invalidation failed");
            metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "publish").increment(1);
            ok = false;
        }
    }
    ok
}

/// Leaves guards in Redis for rows written without copying their values
/// there (bulk loads): a reader sees a miss, and a cache fill older than
/// the row is refused for `guard_ttl`. Pipelines of a bounded size, each
/// tried again with backoff until it is taken or `deadline` has passed (a
/// busy Redis, a failover, an open breaker). Returns how many keys Redis
/// had not taken by then.
pub async fn guard(
    l2: &L2Cache,
    view: &FeatureView,
    written: &[(String, EventTime)],
    guard_ttl: Duration,
    deadline: Instant,
) -> usize {
    let life = Lifetime { soft: guard_ttl, hard: guard_ttl };
    let mut failed = 0;
    for chunk in written.chunks(GUARD_PIPELINE) {
        let puts: Vec<Put<'_>> =
            chunk.iter().map(|(key, at)| Put { key, content: Content::Guard, version: *at, life }).collect();
        let puts = &puts;
        let taken = retry_until(deadline, |attempt_deadline| async move {
            match l2.put_many(view, puts, attempt_deadline).await {
                Ok(_) => true,
                Err(error) => {
                    tracing::debug!(view = %view.name, keys = puts.len(), %error, "redis guard after a bulk write failed; retrying");
                    metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "write").increment(1);
                    false
                }
            }
        })
        .await;
        if !taken {
            tracing::warn!(view = %view.name, keys = puts.len(), "redis did not take the guards of bulk-written keys in time");
            failed += puts.len();
        }
    }
    failed
}

/// [`announce`], tried again with backoff until it succeeds or `deadline`
/// has passed; whether it succeeded.
pub async fn announce_until(
    l2: &L2Cache,
    channel: &str,
    origin: u64,
    view: &FeatureView,
    keys: &[&str],
    deadline: Instant,
) -> bool {
    retry_until(deadline, |attempt_deadline| announce(l2, channel, origin, view, keys, attempt_deadline)).await
}

/// Runs `attempt` until it returns true or `deadline` has passed, waiting
/// a growing, jittered time between attempts. Each attempt gets the time
/// left, at most [`ATTEMPT_BUDGET`].
pub(crate) async fn retry_until<F, Fut>(deadline: Instant, mut attempt: F) -> bool
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut retry = 0;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_BUDGET);
        if attempt(attempt_deadline).await {
            return true;
        }
        let wait = CACHE_STEP_RETRY.backoff(retry, sample());
        if Instant::now() + wait >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        retry += 1;
    }
}

/// Guards per Redis pipeline: small enough that a pipeline finishes well
/// within the command timeout on a busy machine.
pub(crate) const GUARD_PIPELINE: usize = 250;
/// The longest one attempt of a bulk load's cache step may take.
pub(crate) const ATTEMPT_BUDGET: Duration = Duration::from_secs(10);
/// Backoff between attempts of a bulk load's cache step: long enough for an
/// open Redis breaker to let a probe through.
pub(crate) const CACHE_STEP_RETRY: strata_core::RetryPolicy =
    strata_core::RetryPolicy { attempts: u32::MAX, base: Duration::from_millis(50), cap: Duration::from_secs(2) };

impl Lower {
    /// The lifetime of an entry that stands for a write without its value
    /// (a deletion): a negative entry's, but at least the guard TTL.
    pub(crate) fn guard_life(&self, view: &FeatureView) -> Lifetime {
        let life = self.protection.lifetime(view, &Cached::Missing, view.negative_ttl);
        Lifetime { soft: life.soft, hard: life.hard.max(self.writes.guard_ttl) }
    }

    /// Stores what writes left in Redis; a failure is logged, counted, and
    /// false returned.
    pub(crate) async fn put_after_write(&self, view: &FeatureView, puts: &[Put<'_>], deadline: Instant) -> bool {
        match self.l2.put_many(view, puts, deadline).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(view = %view.name, keys = puts.len(), %error, "redis update after a write failed");
                metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "write").increment(1);
                false
            }
        }
    }
}

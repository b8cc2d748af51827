use std::sync::Arc;
use std::time::Duration;

use strata_cache_tiers::L1Cache;
use strata_core::EventTime;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::write::announce;
use crate::{BACKGROUND_BUDGET, Loaded, Lower, REPAIRS_AT_ONCE, Repair, UNKNOWN_SETTLES};

/// Puts right the caches of written keys whose cache step failed: reads
/// them from PostgreSQL, stores them in Redis (never over a newer version),
/// then drops and announces them again, since instances may have re-read
/// the old Redis copy meanwhile. A key whose write may not have landed yet
/// is repaired only once PostgreSQL holds its version. Retries with
/// backoff, a few repairs at a time; gives up once every old copy has
/// expired: the view's L2 TTL, or its L1 TTL plus the time L1 keeps stale
/// copies, since the write.
pub(crate) async fn repair(lower: Arc<Lower>, l1: L1Cache, origin: u64, mut queue: mpsc::Receiver<Repair>) {
    let running = Arc::new(tokio::sync::Semaphore::new(REPAIRS_AT_ONCE));
    while let Some((view, keys, queued_at)) = queue.recv().await {
        let Ok(permit) = running.clone().acquire_owned().await else { return };
        let (lower, l1) = (lower.clone(), l1.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let (keys, wanted): (Vec<&str>, Vec<EventTime>) = keys.iter().map(|(k, v)| (k.as_str(), *v)).unzip();
            let old_copies_last = view.l2_ttl.max(view.l1_ttl.saturating_add(l1.kept_stale()));
            let give_up = queued_at.checked_add(old_copies_last).unwrap_or_else(far_future);
            let mut delay = Duration::from_millis(50);
            let outcome = loop {
                let (loaded, stored) = lower.fetch_and_put(&view, &keys, Instant::now() + BACKGROUND_BUDGET).await;
                // Past UNKNOWN_SETTLES, a write that is not in PostgreSQL never
                // landed, and what is there is what the caches must show.
                let settled = queued_at.elapsed() >= UNKNOWN_SETTLES;
                let fetched = loaded.iter().zip(&wanted).all(|((loaded, version), wanted)| {
                    !matches!(loaded, Loaded::Unavailable) && (settled || version >= wanted)
                });
                if fetched && stored.is_ok() {
                    l1.invalidate_many(view.id, &keys).await;
                    let deadline = Instant::now() + BACKGROUND_BUDGET;
                    if announce(&lower.l2, &lower.writes.channel, origin, &view, &keys, deadline).await {
                        break "repaired";
                    }
                }
                if tokio::time::Instant::now() + delay > give_up {
                    break "expired";
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            };
            tracing::info!(view = %view.name, keys = keys.len(), outcome, "cache repair after a write");
            metrics::counter!("strata_cache_repairs_total", "view" => view.name.clone(), "outcome" => outcome)
                .increment(keys.len() as u64);
        });
    }
}

/// An instant later than any deadline Strata sets.
pub(crate) fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

//! Refresh-ahead: a bounded queue of background reloads. A request that hits
//! an entry past its soft expiry schedules one reload and is answered from
//! the cache at once; when the queue is full the refresh is dropped (and
//! counted), never blocking the request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use strata_core::{FeatureView, Lifetime};
use tokio::sync::{Semaphore, mpsc};

use crate::{Cached, L1Cache};

/// Which tier a refresh reloads into.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RefreshTier {
    /// Reload an L1 entry from the tiers below it.
    L1,
    /// Reload a Redis entry from PostgreSQL, under a lease.
    L2,
}

impl RefreshTier {
    pub fn label(self) -> &'static str {
        match self {
            RefreshTier::L1 => "l1",
            RefreshTier::L2 => "l2",
        }
    }
}

/// Loads fresh values for a refresh. `None` for a key means its reload
/// failed or was left to another instance; the old value stays.
pub trait Reloader: Send + Sync + 'static {
    fn reload(
        &self,
        tier: RefreshTier,
        view: Arc<FeatureView>,
        keys: Vec<String>,
    ) -> impl Future<Output = Vec<Option<(Cached, Lifetime)>>> + Send;
}

struct Job {
    tier: RefreshTier,
    view: Arc<FeatureView>,
    key: String,
}

/// The sending side of the refresh queue. Cheap to clone.
#[derive(Clone)]
pub struct RefreshQueue {
    tx: mpsc::Sender<Job>,
    l1: L1Cache,
}

/// Jobs taken off the queue at once and reloaded as one batch per view.
const BATCH: usize = 256;

impl RefreshQueue {
    /// Starts the workers: at most `concurrency` batches reload at once;
    /// at most `capacity` refreshes wait. The workers hold the reloader
    /// weakly: the reloader (the tiers) usually holds this queue, and a
    /// strong reference back would keep both, with their connection pools,
    /// alive after the server is gone.
    pub fn start<R: Reloader>(l1: L1Cache, reloader: Arc<R>, capacity: usize, concurrency: usize) -> RefreshQueue {
        let (tx, mut rx) = mpsc::channel::<Job>(capacity.max(1));
        let worker_l1 = l1.clone();
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        let reloader = Arc::downgrade(&reloader);
        tokio::spawn(async move {
            let mut jobs = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut jobs, BATCH).await > 0 {
                let mut batches: HashMap<(RefreshTier, u32), (Arc<FeatureView>, Vec<String>)> = HashMap::new();
                for job in jobs.drain(..) {
                    batches.entry((job.tier, job.view.id)).or_insert_with(|| (job.view, Vec::new())).1.push(job.key);
                }
                for ((tier, _), (view, keys)) in batches {
                    let Ok(permit) = permits.clone().acquire_owned().await else { return };
                    // Gone: the server shut down, and nothing is left to refresh.
                    let Some(reloader) = reloader.upgrade() else { return };
                    let l1 = worker_l1.clone();
                    tokio::spawn(async move {
                        let _permit = permit;
                        let stamp = l1.stamp();
                        let results = reloader.reload(tier, view.clone(), keys.clone()).await;
                        let mut fresh = Vec::new();
                        let mut failed = 0u64;
                        for (key, result) in keys.into_iter().zip(results.into_iter().chain(std::iter::repeat(None))) {
                            match result {
                                Some((value, life)) => fresh.push((key, value, life)),
                                None => {
                                    failed += 1;
                                    l1.refresh_failed(&view, &key).await;
                                }
                            }
                        }
                        count(tier, &view, "completed", fresh.len() as u64);
                        count(tier, &view, "failed", failed);
                        l1.insert_many(&view, stamp, fresh).await;
                    });
                }
            }
        });
        RefreshQueue { tx, l1 }
    }

    /// Schedules one reload; returns false when the queue is full and the
    /// refresh was dropped.
    pub async fn schedule(&self, tier: RefreshTier, view: &Arc<FeatureView>, key: &str) -> bool {
        match self.tx.try_send(Job { tier, view: view.clone(), key: key.to_owned() }) {
            Ok(()) => {
                count(tier, view, "started", 1);
                true
            }
            Err(_) => {
                count(tier, view, "dropped", 1);
                self.l1.refresh_failed(view, key).await;
                false
            }
        }
    }
}

fn count(tier: RefreshTier, view: &FeatureView, outcome: &'static str, n: u64) {
    if n > 0 {
        metrics::counter!("strata_refreshes_total", "tier" => tier.label(), "view" => view.name.clone(), "outcome" => outcome)
            .increment(n);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::l1::tests::{registry, row};

    /// Answers reloads from a script: `Some(value)` or a failure.
    struct Scripted {
        answers: Mutex<Vec<Option<&'static str>>>,
        done: tokio::sync::mpsc::UnboundedSender<()>,
    }

    impl Reloader for Scripted {
        async fn reload(
            &self,
            _: RefreshTier,
            _: Arc<FeatureView>,
            keys: Vec<String>,
        ) -> Vec<Option<(Cached, Lifetime)>> {
            let answer = self.answers.lock().unwrap().remove(0);
            let _ = self.done.send(());
            keys.iter()
                .map(|_| answer.map(|v| (Cached::Found(row(v)), Lifetime::fixed(Duration::from_secs(10)))))
                .collect()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_replaces_the_value_and_a_failed_one_keeps_the_old() {
        let registry = registry();
        let view = registry.get("a").unwrap().clone();
        let l1 = L1Cache::new(1 << 20);
        let life = Lifetime { soft: Duration::from_secs(1), hard: Duration::from_secs(10) };
        l1.insert_many(&view, l1.stamp(), [("k".to_owned(), Cached::Found(row("old")), life)]).await;
        let (done, mut reloaded) = tokio::sync::mpsc::unbounded_channel();
        let reloader = Arc::new(Scripted { answers: Mutex::new(vec![None, Some("new")]), done });
        // Held here, as the tiers hold their reloader: the queue holds it weakly.
        let queue = RefreshQueue::start(l1.clone(), reloader.clone(), 16, 1);
        tokio::time::advance(Duration::from_secs(2)).await;

        // First reload fails: the old value stays and may be refreshed again.
        let hit = l1.get_many(&view, &["k"]).await.remove(0).unwrap();
        assert!(hit.refresh);
        assert!(queue.schedule(RefreshTier::L1, &view, "k").await);
        reloaded.recv().await.unwrap();
        let hit = loop {
            let hit = l1.get_many(&view, &["k"]).await.remove(0).unwrap();
            if hit.refresh {
                break hit;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(hit.value, Cached::Found(row("old")));

        // Second reload succeeds: the new value is served, fresh.
        assert!(queue.schedule(RefreshTier::L1, &view, "k").await);
        reloaded.recv().await.unwrap();
        loop {
            let hit = l1.get_many(&view, &["k"]).await.remove(0).unwrap();
            if hit.value == Cached::Found(row("new")) {
                assert!(!hit.refresh);
                break;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn the_queue_does_not_keep_its_reloader_alive() {
        let (done, _reloaded) = tokio::sync::mpsc::unbounded_channel();
        let reloader = Arc::new(Scripted { answers: Mutex::new(Vec::new()), done });
        let weak = Arc::downgrade(&reloader);
        let queue = RefreshQueue::start(L1Cache::new(1 << 20), reloader, 16, 1);
        tokio::task::yield_now().await;
        assert!(weak.upgrade().is_none(), "the workers hold the reloader (and so the tiers) alive");
        drop(queue);
    }

    #[tokio::test]
    async fn a_full_queue_drops_the_refresh_without_blocking() {
        let registry = registry();
        let view = registry.get("a").unwrap().clone();
        let l1 = L1Cache::new(1 << 20);
        let (tx, _rx) = mpsc::channel(1);
        // A queue nobody drains: the second refresh finds it full.
        let queue = RefreshQueue { tx, l1 };
        assert!(queue.schedule(RefreshTier::L1, &view, "a").await);
        assert!(!queue.schedule(RefreshTier::L1, &view, "b").await);
    }
}

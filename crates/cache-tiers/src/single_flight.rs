//! In-process single flight for batches: if request A is loading {k1, k2}
//! and request B asks for {k2, k3}, B waits for A's k2 and loads only k3.
//!
//! A leader's batch shares one result slot: claiming and completing take
//! the lock once per batch, and a batch nobody waits on hands its results
//! to no one (the common case, kept cheap).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The results of one leader's batch, in its `lead` order, once loaded.
type Slot<V> = watch::Sender<Option<Arc<Vec<V>>>>;

/// A key in flight: its leader's slot, and the key's place in it.
type InFlight<V> = (Arc<Slot<V>>, usize);

/// Loads in flight, by key. `V` is what a load produces for one key, failures included: a failure
/// is shared with the waiters like a value.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, InFlight<V>>>,
}

impl<K, V> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight { inflight: Mutex::new(HashMap::new()) }
    }
}

/// The outcome of claiming a batch of keys.
pub struct Claim<'a, K: Hash + Eq + Clone, V: Clone> {
    /// Positions of the keys this caller must load and then complete.
    pub lead: Vec<usize>,
    /// Positions of the keys another caller is loading, with their results
    /// to come.
    pub wait: Vec<(usize, Waiter<V>)>,
    pub leader: Leader<'a, K, V>,
}

/// Where a waiter's result arrives.
pub struct Waiter<V> {
    slot: watch::Receiver<Option<Arc<Vec<V>>>>,
    at: usize,
}

impl<V: Clone> Waiter<V> {
    /// The leader's result; `None` if the leader went away without one (its
    /// request was cancelled), in which case the caller loads it itself.
    pub async fn result(mut self) -> Option<V> {
        let at = self.at;
        self.slot.wait_for(Option::is_some).await.ok().and_then(|v| v.as_ref().and_then(|v| v.get(at).cloned()))
    }
}

/// The duty to complete the keys one leads. If it is dropped first, its
/// keys are released, and their waiters told to load for themselves.
pub struct Leader<'a, K: Hash + Eq + Clone, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    slot: Arc<Slot<V>>,
    keys: Vec<K>,
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// Claims `keys` (distinct): each is either led by this caller or
    /// already in flight.
    pub fn claim(&self, keys: Vec<K>) -> Claim<'_, K, V> {
        let slot = Arc::new(watch::Sender::new(None));
        let mut lead = Vec::new();
        let mut wait = Vec::new();
        let mut led = Vec::new();
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for (i, key) in keys.into_iter().enumerate() {
            match inflight.get(&key) {
                Some((theirs, at)) => wait.push((i, Waiter { slot: theirs.subscribe(), at: *at })),
                None => {
                    inflight.insert(key.clone(), (slot.clone(), led.len()));
                    led.push(key);
                    lead.push(i);
                }
            }
        }
        drop(inflight);
        Claim { lead, wait, leader: Leader { flight: self, slot, keys: led } }
    }

    /// Keys in flight now.
    pub fn len(&self) -> usize {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Leader<'_, K, V> {
    /// Ends the flights of the keys one leads and hands their results
    /// (`values()`, in `lead` order) to whoever waits on them. Nobody
    /// waiting, `values` is never called.
    pub fn complete(mut self, values: impl FnOnce() -> Vec<V>) {
        self.release();
        if self.slot.receiver_count() > 0 {
            self.slot.send_replace(Some(Arc::new(values())));
        }
    }

    fn release(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let mut inflight = self.flight.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for key in self.keys.drain(..) {
            inflight.remove(&key);
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Leader<'_, K, V> {
    fn drop(&mut self) {
        // Dropping the slot wakes the waiters with "no result".
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlapping_batch_waits_for_the_shared_key_and_loads_only_the_rest() {
        let flight: SingleFlight<&str, Result<u32, String>> = SingleFlight::default();
        let a = flight.claim(vec!["k1", "k2"]);
        assert_eq!(a.lead, vec![0, 1]);
        let b = flight.claim(vec!["k2", "k3"]);
        assert_eq!(b.lead, vec![1], "B leads only k3");
        assert_eq!(b.wait.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0], "B waits for k2");

        let mut b = b;
        let (_, waiter) = b.wait.pop().unwrap();
        let (shared, ()) = tokio::join!(waiter.result(), async {
            a.leader.complete(|| vec![Ok(1), Err("shard down".into())]);
        });
        assert_eq!(shared, Some(Err("shard down".into())), "a failure is shared with waiters");
        drop(b);
        assert!(flight.is_empty(), "completed keys leave the flight, so a failure is not cached");
    }

    #[test]
    fn a_batch_nobody_waits_on_hands_its_results_to_no_one() {
        let flight: SingleFlight<&str, u32> = SingleFlight::default();
        let a = flight.claim(vec!["k1", "k2"]);
        let b = flight.claim(vec!["k2"]);
        drop(b);
        a.leader.complete(|| unreachable!("the only waiter left"));
        assert!(flight.is_empty());
    }

    #[tokio::test]
    async fn waiters_of_a_vanished_leader_are_told_to_load_themselves() {
        let flight: SingleFlight<&str, u32> = SingleFlight::default();
        let a = flight.claim(vec!["k"]);
        let mut b = flight.claim(vec!["k"]);
        let (_, waiter) = b.wait.pop().unwrap();
        drop(a);
        assert_eq!(waiter.result().await, None);
        assert!(flight.is_empty());
        assert_eq!(flight.claim(vec!["k"]).lead, vec![0], "the next caller leads again");
    }
}

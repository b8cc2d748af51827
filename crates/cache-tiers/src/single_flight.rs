//! In-process single flight for batches: if request A is loading {k1, k2}
//! and request B asks for {k2, k3}, B waits for A's k2 and loads only k3.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// Loads in flight, by key. `V` is what a load produces for one key,
/// failures included: a failure is shared with the waiters like a value.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
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
pub struct Waiter<V>(watch::Receiver<Option<V>>);

impl<V: Clone> Waiter<V> {
    /// The leader's result; `None` if the leader went away without one (its
    /// request was cancelled), in which case the caller loads it itself.
    pub async fn result(mut self) -> Option<V> {
        self.0.wait_for(Option::is_some).await.ok().and_then(|v| v.clone())
    }
}

/// The duty to complete the keys one leads. Keys not completed when it is
/// dropped are released, and their waiters told to load for themselves.
pub struct Leader<'a, K: Hash + Eq + Clone, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    senders: HashMap<K, watch::Sender<Option<V>>>,
}

impl<K: Hash + Eq + Clone, V: Clone> SingleFlight<K, V> {
    /// Claims `keys` (distinct): each is either led by this caller or
    /// already in flight.
    pub fn claim(&self, keys: Vec<K>) -> Claim<'_, K, V> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        let mut claim =
            Claim { lead: Vec::new(), wait: Vec::new(), leader: Leader { flight: self, senders: HashMap::new() } };
        for (i, key) in keys.into_iter().enumerate() {
            match inflight.get(&key) {
                Some(rx) => claim.wait.push((i, Waiter(rx.clone()))),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx);
                    claim.leader.senders.insert(key, tx);
                    claim.lead.push(i);
                }
            }
        }
        claim
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
    /// Hands the result for `key` to its waiters and ends its flight.
    pub fn complete(&mut self, key: &K, value: V) {
        if let Some(tx) = self.senders.remove(key) {
            self.flight.inflight.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
            tx.send_replace(Some(value));
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Drop for Leader<'_, K, V> {
    fn drop(&mut self) {
        if self.senders.is_empty() {
            return;
        }
        let mut inflight = self.flight.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for key in self.senders.keys() {
            inflight.remove(key);
        }
        // Dropping the senders wakes the waiters with "no result".
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_overlapping_batch_waits_for_the_shared_key_and_loads_only_the_rest() {
        let flight: SingleFlight<&str, Result<u32, String>> = SingleFlight::default();
        let mut a = flight.claim(vec!["k1", "k2"]);
        assert_eq!(a.lead, vec![0, 1]);
        let b = flight.claim(vec!["k2", "k3"]);
        assert_eq!(b.lead, vec![1], "B leads only k3");
        assert_eq!(b.wait.iter().map(|(i, _)| *i).collect::<Vec<_>>(), vec![0], "B waits for k2");

        let mut b = b;
        let (_, waiter) = b.wait.pop().unwrap();
        let (shared, ()) = tokio::join!(waiter.result(), async {
            a.leader.complete(&"k1", Ok(1));
            a.leader.complete(&"k2", Err("shard down".into()));
        });
        assert_eq!(shared, Some(Err("shard down".into())), "a failure is shared with waiters");
        drop(b);
        assert!(flight.is_empty(), "completed keys leave the flight, so a failure is not cached");
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

//! Cross-instance L1 invalidation over Redis pub/sub.
//!
//! After a write is committed and its Redis copy replaced, the writer
//! publishes the written keys on one channel; every server instance
//! subscribes and drops those keys from its L1 (refusing fills by loads that
//! started earlier, see [`crate::Stamp`]). The channel is a sharded one
//! (SPUBLISH / SSUBSCRIBE): messages go to the shard owning the channel's
//! slot and straight to its subscribers, not over the cluster bus.
//!
//! Pub/sub is fire-and-forget: a subscriber whose connection drops cannot
//! know what it missed. So whenever a connection comes back, or the cluster
//! changes shape (the channel's slot may have moved, which ends a sharded
//! subscription silently), the listener subscribes again and then clears
//! the whole L1; the same when it fell so far behind that messages were
//! dropped. TTLs remain the final bound.

use std::collections::HashMap;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::{ClusterStateChange, Message};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio::time::{Duration, Instant};

use crate::l2::{builder, connect_within};
use crate::{L1Cache, L2Cache, L2Config, L2Error};

const FORMAT: u8 = 1;
/// Keys per message, so one huge write does not make one huge message.
pub const KEYS_PER_MESSAGE: usize = 1_000;

/// The messages announcing that `keys` of `view` changed, at most
/// [`KEYS_PER_MESSAGE`] keys each. `origin` names the announcing instance,
/// which dropped the keys itself and ignores its own messages (0: no
/// instance, e.g. `strata load`).
pub fn invalidation_messages(origin: u64, view: &str, keys: &[&str]) -> Vec<Vec<u8>> {
    // No keys still make one message (a heartbeat).
    let chunks: Vec<&[&str]> = if keys.is_empty() { vec![keys] } else { keys.chunks(KEYS_PER_MESSAGE).collect() };
    chunks
        .into_iter()
        .map(|chunk| {
            let size = 17 + view.len() + chunk.iter().map(|k| 4 + k.len()).sum::<usize>();
            let mut out = Vec::with_capacity(size);
            out.push(FORMAT);
            out.extend_from_slice(&origin.to_le_bytes());
            put_str(&mut out, view);
            out.extend_from_slice(&(chunk.len() as u32).to_le_bytes());
            for key in chunk {
                put_str(&mut out, key);
            }
            out
        })
        .collect()
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An announcement, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub origin: u64,
    pub view: String,
    pub keys: Vec<String>,
}

/// Decodes a message of [`invalidation_messages`].
pub fn decode_invalidation(bytes: &[u8]) -> Option<Invalidation> {
    let (&format, rest) = bytes.split_first()?;
    if format != FORMAT {
        return None;
    }
    let mut cursor = Cursor(rest);
    let origin = u64::from_le_bytes(cursor.take(8)?.try_into().ok()?);
    let view = cursor.string()?;
    let count = cursor.u32()? as usize;
    let mut keys = Vec::with_capacity(count.min(KEYS_PER_MESSAGE));
    for _ in 0..count {
        keys.push(cursor.string()?);
    }
    cursor.0.is_empty().then_some(Invalidation { origin, view, keys })
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }
}

/// Subscribes to the invalidation channel and applies what it hears to L1.
pub struct InvalidationListener {
    client: SubscriberClient,
    task: JoinHandle<()>,
    cleared: watch::Receiver<u64>,
    applied: watch::Receiver<u64>,
}

impl InvalidationListener {
    /// Subscribes to `channel` (returning once the subscription stands) and
    /// applies invalidations to `l1`, except those `origin` (this instance)
    /// announced; `views` maps view names to registry ids. Through `l2` it
    /// sends itself a heartbeat on the channel every second: a subscription
    /// that hears nothing of its own for [`SILENCE`] is renewed and L1
    /// cleared, whether the connection died quietly or the channel's slot
    /// moved (which ends a sharded subscription without a word from fred).
    pub async fn start(
        config: &L2Config,
        l2: L2Cache,
        channel: String,
        origin: u64,
        l1: L1Cache,
        views: HashMap<String, u32>,
    ) -> Result<InvalidationListener, L2Error> {
        let client = builder(config)?.build_subscriber_client()?;
        let connected = connect_within(&client, config.connect_timeout).await;
        let (cleared_tx, cleared) = watch::channel(0);
        let (applied_tx, applied) = watch::channel(0);
        let worker = Worker {
            client: client.clone(),
            l2,
            channel,
            origin,
            l1,
            views,
            heard: Instant::now(),
            cleared: cleared_tx,
            applied: applied_tx,
        };
        if connected {
            // Subscribed before returning, so no write announced after the
            // server's first answer can be missed.
            let started = worker.subscribe().await?;
            let task = tokio::spawn(worker.run(started));
            return Ok(InvalidationListener { client, task, cleared, applied });
        }
        // Redis does not answer yet: subscribe once it does, then clear L1,
        // which was filled while no announcement could be heard.
        let task = tokio::spawn(async move {
            let started = loop {
                if worker.client.wait_for_connect().await.is_ok()
                    && let Ok(started) = worker.subscribe().await
                {
                    break started;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            worker.clear("subscribed_late").await;
            worker.run(started).await;
        });
        Ok(InvalidationListener { client, task, cleared, applied })
    }

    /// How many times L1 was cleared because invalidations may have been
    /// missed (a re-connection, or messages dropped for lag).
    pub fn clears(&self) -> watch::Receiver<u64> {
        self.cleared.clone()
    }

    /// How many invalidation messages were applied.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Ends the subscription on the server while the connection stays up,
    /// as a slot move does. For tests of the heartbeat.
    #[doc(hidden)]
    pub async fn unsubscribe_quietly(&self, channel: &str) -> Result<(), L2Error> {
        self.client.sunsubscribe(channel).await?;
        Ok(())
    }

    /// The name the subscriber's connections carry in `CLIENT LIST`.
    pub fn client_name(&self) -> String {
        self.client.id().to_string()
    }

    pub async fn close(self) {
        self.task.abort();
        let _ = self.client.quit().await;
    }
}

/// How often a listener sends itself a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a listener may hear nothing of its own before it renews its
/// subscription and clears L1.
pub const SILENCE: Duration = Duration::from_secs(3);

struct Worker {
    client: SubscriberClient,
    /// Publishes the heartbeats.
    l2: L2Cache,
    channel: String,
    origin: u64,
    /// When a message of this instance's own came back last.
    heard: Instant,
    l1: L1Cache,
    views: HashMap<String, u32>,
    cleared: watch::Sender<u64>,
    applied: watch::Sender<u64>,
}

/// The event streams a subscribed worker listens to.
struct Streams {
    messages: broadcast::Receiver<Message>,
    reconnects: broadcast::Receiver<Server>,
    changes: broadcast::Receiver<Vec<ClusterStateChange>>,
}

impl Worker {
    /// Subscribes (the client is connected) and opens the event streams.
    async fn subscribe(&self) -> Result<Streams, L2Error> {
        // Sharded pub/sub: the subscription lives on the shard owning the
        // channel's slot; a failover or a slot move there is handled like a
        // re-connection (see `Worker::run`).
        self.client.ssubscribe(self.channel.as_str()).await?;
        // Created after the first connection, so only re-connections show.
        Ok(Streams {
            reconnects: self.client.reconnect_rx(),
            changes: self.client.cluster_change_rx(),
            messages: self.client.message_rx(),
        })
    }

    async fn run(mut self, streams: Streams) {
        let Streams { mut messages, mut reconnects, mut changes } = streams;
        self.heard = Instant::now();
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if self.heard.elapsed() > SILENCE {
                        tracing::warn!(silent_for = ?self.heard.elapsed(), "invalidation subscription went quiet; renewing it");
                        self.resubscribe().await;
                        self.clear("silent").await;
                        self.heard = Instant::now();
                    }
                    // An empty announcement of our own: hearing it back
                    // proves the subscription still stands.
                    let beat = invalidation_messages(self.origin, "", &[]);
                    for message in beat {
                        let deadline = Instant::now() + HEARTBEAT;
                        if let Err(error) = self.l2.publish_unguarded(&self.channel, message, deadline).await {
                            tracing::debug!(%error, "invalidation heartbeat failed");
                        }
                    }
                }
                message = messages.recv() => match message {
                    Ok(message) => self.apply(message).await,
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "invalidation messages dropped for lag; clearing L1");
                        self.clear("lagged").await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                reconnect = reconnects.recv() => match reconnect {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.resubscribe().await;
                        self.clear("reconnected").await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                // The channel's slot may have moved to another node, which
                // ends a sharded subscription without closing the connection
                // (and fred drops the SUNSUBSCRIBE that says so).
                change = changes.recv() => match change {
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        self.resubscribe().await;
                        self.clear("cluster_changed").await;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            }
        }
    }

    async fn apply(&mut self, message: Message) {
        let decoded = message.value.as_bytes().and_then(decode_invalidation);
        let Some(Invalidation { origin, view, keys }) = decoded else {
            tracing::warn!(channel = %message.channel, "ignoring an invalidation message that does not decode");
            return;
        };
        if origin == self.origin {
            self.heard = Instant::now();
        }
        // Its own writes this instance dropped before announcing them; a
        // view it does not serve (another config version) it has no copy of.
        if origin != self.origin
            && let Some(&id) = self.views.get(&view)
        {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            self.l1.invalidate_many(id, &keys).await;
            metrics::counter!("strata_invalidations_received_total").increment(1);
            metrics::counter!("strata_invalidated_keys_total").increment(keys.len() as u64);
        }
        self.applied.send_modify(|n| *n += 1);
    }

    /// Subscribes again after a re-connection, retrying until it holds: the
    /// subscription must stand before L1 is cleared, or writes published in
    /// between would be missed.
    async fn resubscribe(&self) {
        let mut delay = std::time::Duration::from_millis(10);
        // SSUBSCRIBE alone: fred's `resubscribe_all` also sends empty
        // SUBSCRIBE/PSUBSCRIBE commands whose error replies can be taken for
        // the answer to ours.
        while let Err(error) = self.client.ssubscribe(self.channel.as_str()).await {
            tracing::warn!(%error, "re-subscribing to invalidations failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(1));
        }
    }

    async fn clear(&self, reason: &'static str) {
        self.l1.clear().await;
        metrics::counter!("strata_l1_clears_total", "reason" => reason).increment(1);
        self.cleared.send_modify(|n| *n += 1);
        tracing::info!(reason, "L1 cleared: invalidations may have been missed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_in_chunks() {
        let keys: Vec<String> = (0..2_500).map(|i| format!("k{i}\n,ключ")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let messages = invalidation_messages(7, "user_features", &refs);
        assert_eq!(messages.len(), 3);
        let decoded: Vec<String> = messages
            .iter()
            .flat_map(|m| {
                let Invalidation { origin, view, keys } = decode_invalidation(m).unwrap();
                assert_eq!((origin, view.as_str()), (7, "user_features"));
                keys
            })
            .collect();
        assert_eq!(decoded, keys);
    }

    #[test]
    fn garbage_does_not_decode_and_does_not_panic() {
        assert_eq!(
            decode_invalidation(&invalidation_messages(3, "", &[])[0]),
            Some(Invalidation { origin: 3, view: String::new(), keys: vec![] }),
            "a heartbeat is one message without keys"
        );
        let message = &invalidation_messages(1, "v", &["a", "b"])[0];
        for cut in 0..message.len() {
            assert_eq!(decode_invalidation(&message[..cut]), None);
        }
        assert_eq!(decode_invalidation(&[9, 0, 0]), None);
    }
}

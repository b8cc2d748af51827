use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::bytes::Bytes;
use fred::prelude::*;
use strata_core::{FeatureView, Lifetime, Row, decode_entry, encode_entry};

use crate::Cached;

/// Where the Redis Cluster is and how patient to be with it.
#[derive(Clone, Debug)]
pub struct L2Config {
    /// Seed nodes as `host:port`; one reachable node is enough to discover
    /// the rest of the cluster.
    pub nodes: Vec<String>,
    /// Longest time one batch may take before it counts as failed. The
    /// cache is an optimisation: a slow Redis must not slow every request.
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    /// Prefix of every key Strata writes, so one cluster can be shared.
    pub key_prefix: String,
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("bad redis node address {0:?} (want host:port)")]
    BadAddress(String),
    #[error("no redis nodes are configured")]
    NoNodes,
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis answered {got} results for {want} commands")]
    ShortPipeline { got: usize, want: usize },
}

/// A hit in Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct L2Hit {
    pub value: Cached,
    /// Past its soft expiry: serve it, and reload it under a lease.
    pub stale: bool,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// The Redis Cluster tier. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct L2Cache {
    client: Client,
    prefix: String,
}

impl L2Cache {
    /// Connects to the cluster and waits until it is usable.
    pub async fn connect(config: &L2Config) -> Result<L2Cache, L2Error> {
        if config.nodes.is_empty() {
            return Err(L2Error::NoNodes);
        }
        let mut hosts = Vec::with_capacity(config.nodes.len());
        for node in &config.nodes {
            let (host, port) = node.rsplit_once(':').ok_or_else(|| L2Error::BadAddress(node.clone()))?;
            let port: u16 = port.parse().map_err(|_| L2Error::BadAddress(node.clone()))?;
            hosts.push((host.to_owned(), port));
        }
        let fred_config = Config { server: ServerConfig::new_clustered(hosts), fail_fast: true, ..Default::default() };
        let command_timeout = config.command_timeout;
        let connect_timeout = config.connect_timeout;
        let client = Builder::from_config(fred_config)
            .with_performance_config(|p| p.default_command_timeout = command_timeout)
            .with_connection_config(|c| {
                c.connection_timeout = connect_timeout;
                c.internal_command_timeout = connect_timeout;
                // A cache read is not worth retrying for long: the next tier
                // answers instead.
                c.max_command_attempts = 2;
            })
            .set_policy(ReconnectPolicy::new_exponential(0, 50, 5_000, 2))
            .build()?;
        client.init().await?;
        Ok(L2Cache { client, prefix: config.key_prefix.clone() })
    }

    fn key(&self, view: &FeatureView, entity: &str) -> String {
        format!("{}{}:{}", self.prefix, view.name, entity)
    }

    fn lease_key(&self, view: &FeatureView, entity: &str) -> String {
        format!("{}lease:{}:{}", self.prefix, view.name, entity)
    }

    /// Looks up a batch with one pipeline; the answer is aligned with `keys`.
    /// An entry of an older shape of the view reads as a miss.
    pub async fn get_many(&self, view: &FeatureView, keys: &[&str]) -> Result<Vec<Option<L2Hit>>, L2Error> {
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.get(self.key(view, key)).await?;
        }
        let results = pipeline.try_all::<Option<Bytes>>().await;
        if results.len() != keys.len() {
            return Err(match results.into_iter().find_map(Result::err) {
                Some(e) => e.into(),
                None => L2Error::ShortPipeline { got: 0, want: keys.len() },
            });
        }
        let now = now_ms();
        let mut out = Vec::with_capacity(keys.len());
        for (key, result) in keys.iter().zip(results) {
            out.push(match result? {
                None => None,
                Some(bytes) => match decode_entry(view.fingerprint, &bytes) {
                    Ok(entry) => Some(L2Hit {
                        value: entry.row.map_or(Cached::Missing, |row| Cached::Found(Arc::new(row))),
                        stale: entry.soft_expiry_ms <= now,
                    }),
                    Err(error) => {
                        tracing::debug!(view = %view.name, key, %error, "ignoring cached entry");
                        metrics::counter!("strata_l2_undecodable_total", "view" => view.name.clone()).increment(1);
                        None
                    }
                },
            });
        }
        Ok(out)
    }

    /// Stores entries of a view (a row, or `None` for "does not exist"),
    /// each expiring after its lifetime's hard TTL and turning stale after
    /// its soft one, with one pipeline.
    pub async fn set_many(
        &self,
        view: &FeatureView,
        entries: &[(&str, Option<&Row>, Lifetime)],
    ) -> Result<(), L2Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let pipeline = self.client.pipeline();
        for (key, row, life) in entries {
            let bytes = Bytes::from(encode_entry(view.fingerprint, now.saturating_add(millis(life.soft)), *row));
            let () =
                pipeline.set(self.key(view, key), bytes, Some(Expiration::PX(millis(life.hard))), None, false).await?;
        }
        Self::expect_all_ok(pipeline.try_all::<Value>().await, entries.len())
    }

    /// Tries to take a short lease on each key (`SET lease NX PX ttl`): the
    /// holder reloads the key from PostgreSQL, other instances wait for its
    /// result in Redis. Aligned with `keys`: true where the lease was taken.
    pub async fn try_leases(&self, view: &FeatureView, keys: &[&str], ttl: Duration) -> Result<Vec<bool>, L2Error> {
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline
                .set(self.lease_key(view, key), 1, Some(Expiration::PX(millis(ttl))), Some(SetOptions::NX), false)
                .await?;
        }
        let results = pipeline.try_all::<Option<String>>().await;
        if results.len() != keys.len() {
            return Err(L2Error::ShortPipeline { got: results.len(), want: keys.len() });
        }
        results.into_iter().map(|r| Ok(r?.is_some())).collect()
    }

    /// Gives leases back once their keys are reloaded.
    pub async fn release_leases(&self, view: &FeatureView, keys: &[&str]) -> Result<(), L2Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.del(self.lease_key(view, key)).await?;
        }
        Self::expect_all_ok(pipeline.try_all::<Value>().await, keys.len())
    }

    /// Removes cached rows of a view, with one pipeline (one DEL per key, so
    /// no command spans hash slots).
    pub async fn delete_many(&self, view: &FeatureView, keys: &[&str]) -> Result<(), L2Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.del(self.key(view, key)).await?;
        }
        Self::expect_all_ok(pipeline.try_all::<Value>().await, keys.len())
    }

    fn expect_all_ok(results: Vec<Result<Value, fred::error::Error>>, want: usize) -> Result<(), L2Error> {
        let got = results.len();
        for result in results {
            result?;
        }
        if got == want { Ok(()) } else { Err(L2Error::ShortPipeline { got, want }) }
    }

    /// Removes every key from every primary of the cluster (all of Strata's
    /// and anyone else's). For tests and operators starting over.
    pub async fn flush_all(&self) -> Result<(), L2Error> {
        self.client.flushall_cluster().await?;
        Ok(())
    }

    /// Closes the connections.
    pub async fn close(&self) {
        let _ = self.client.quit().await;
    }
}

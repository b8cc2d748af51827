use std::time::Duration;

use fred::bytes::Bytes;
use fred::prelude::*;
use strata_core::{FeatureView, Row, decode_row, encode_row};

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

    /// Looks up a batch with one pipeline; the answer is aligned with `keys`.
    /// A cached row of an older shape of the view reads as a miss.
    pub async fn get_many(&self, view: &FeatureView, keys: &[&str]) -> Result<Vec<Option<Row>>, L2Error> {
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
        let mut out = Vec::with_capacity(keys.len());
        for (key, result) in keys.iter().zip(results) {
            out.push(match result? {
                None => None,
                Some(bytes) => match decode_row(view.fingerprint, &bytes) {
                    Ok(row) => Some(row),
                    Err(error) => {
                        tracing::debug!(view = %view.name, key, %error, "ignoring cached row");
                        metrics::counter!("strata_l2_undecodable_total", "view" => view.name.clone()).increment(1);
                        None
                    }
                },
            });
        }
        Ok(out)
    }

    /// Stores rows of a view for the view's L2 TTL, with one pipeline.
    pub async fn set_many(&self, view: &FeatureView, rows: &[(&str, &Row)]) -> Result<(), L2Error> {
        if rows.is_empty() {
            return Ok(());
        }
        let ttl_ms = i64::try_from(view.l2_ttl.as_millis()).unwrap_or(i64::MAX).max(1);
        let pipeline = self.client.pipeline();
        for (key, row) in rows {
            let bytes = Bytes::from(encode_row(view.fingerprint, row));
            let () = pipeline.set(self.key(view, key), bytes, Some(Expiration::PX(ttl_ms)), None, false).await?;
        }
        Self::expect_all_ok(pipeline.try_all::<Value>().await, rows.len())
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

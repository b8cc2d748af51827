//! Continuous GetFeatures load for failure tests: workers read random
//! batches of known keys and check every row against the value it must
//! have, tallying RPC outcomes and row statuses by shard.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::seq::IndexedRandom;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_proto::v1::{self, value::Kind};
use tokio::time::Instant;
use tonic::transport::Channel;

/// A key the load reads, the value its feature `n` must have, and its
/// shard.
#[derive(Clone, Debug)]
pub struct Known {
    pub key: String,
    pub n: i64,
    pub shard: usize,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub view: String,
    pub workers: usize,
    pub keys_per_request: usize,
    /// The grpc-timeout each request carries.
    pub timeout: Duration,
}

/// What the load saw.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    /// RESOURCE_EXHAUSTED answers.
    pub shed: u64,
    /// Other failed RPCs, by "CODE: message".
    pub failed: BTreeMap<String, u64>,
    /// Row statuses per shard: [found, stale, unavailable, not_found].
    pub rows: Vec<[u64; 4]>,
    /// Rows whose value was not the one written.
    pub wrong: u64,
    /// Slowest successful RPC.
    pub slowest: Duration,
}

impl Tally {
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    fn column(&self, c: usize) -> u64 {
        self.rows.iter().map(|r| r[c]).sum()
    }

    pub fn stale(&self) -> u64 {
        self.column(1)
    }

    pub fn unavailable(&self) -> u64 {
        self.column(2)
    }

    /// One line of figures, for the test's output and the closing note.
    pub fn figures(&self) -> String {
        format!(
            "sent {} ok {} failed {} shed {} rows found {} stale {} unavailable {} not_found {} wrong {} slowest {:?}{}",
            self.sent,
            self.ok,
            self.failed_total(),
            self.shed,
            self.column(0),
            self.stale(),
            self.unavailable(),
            self.column(3),
            self.wrong,
            self.slowest,
            if self.failed.is_empty() { String::new() } else { format!(" errors {:?}", self.failed) },
        )
    }
}

/// A running load; [`Load::stop`] ends it and returns the tally.
pub struct Load {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    pub fn start(endpoint: &str, keys: Arc<Vec<Known>>, shards: usize, options: LoadOptions) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally { rows: vec![[0; 4]; shards], ..Tally::default() }));
        let endpoint = endpoint.to_owned();
        let workers = (0..options.workers)
            .map(|_| {
                let (stop, tally, keys, options) = (stop.clone(), tally.clone(), keys.clone(), options.clone());
                let endpoint = endpoint.clone();
                tokio::spawn(async move {
                    let Ok(channel) = Channel::from_shared(endpoint).map(|e| e.connect_lazy()) else { return };
                    let mut client = FeatureStoreClient::new(channel);
                    while !stop.load(Ordering::Relaxed) {
                        if !one(&mut client, &keys, &options, &tally).await {
                            // Refused or failed: a caller backs off a
                            // little instead of spinning on the CPU the
                            // server needs.
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                })
            })
            .collect();
        Load { stop, tally, workers }
    }

    /// The tally so far.
    pub fn tally(&self) -> Tally {
        self.tally.lock().expect("tally").clone()
    }

    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            let _ = worker.await;
        }
        self.tally.lock().expect("tally").clone()
    }

    /// Waits until `n` more requests have been answered (with anything),
    /// for at most a minute.
    pub async fn wait_for_requests(&self, n: u64) -> anyhow::Result<()> {
        let target = self.tally().sent + n;
        let give_up = Instant::now() + Duration::from_secs(60);
        while self.tally().sent < target {
            anyhow::ensure!(Instant::now() < give_up, "the load made no progress: {}", self.tally().figures());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Sends one request of a random batch and tallies what came back; false
/// if it was refused or failed.
pub async fn one(
    client: &mut FeatureStoreClient<Channel>,
    keys: &[Known],
    options: &LoadOptions,
    tally: &Mutex<Tally>,
) -> bool {
    let batch: Vec<&Known> = keys.choose_multiple(&mut rand::rng(), options.keys_per_request).collect();
    let mut request = tonic::Request::new(v1::GetFeaturesRequest {
        feature_view: options.view.clone(),
        entity_keys: batch.iter().map(|k| k.key.clone()).collect(),
        features: vec!["n".into()],
    });
    request.set_timeout(options.timeout);
    let started = Instant::now();
    let result = client.get_features(request).await;
    let took = started.elapsed();
    let mut tally = tally.lock().expect("tally");
    tally.sent += 1;
    match result {
        Ok(response) => {
            tally.ok += 1;
            tally.slowest = tally.slowest.max(took);
            let rows = &response.get_ref().rows;
            // A missing row is as wrong as a wrong value.
            tally.wrong += batch.len().abs_diff(rows.len()) as u64;
            for (known, row) in batch.iter().zip(rows) {
                let status = v1::RowStatus::try_from(row.status).unwrap_or(v1::RowStatus::Unspecified);
                let column = match status {
                    v1::RowStatus::Found | v1::RowStatus::OutsideMaxAge => 0,
                    v1::RowStatus::Stale => 1,
                    v1::RowStatus::Unavailable => 2,
                    v1::RowStatus::NotFound | v1::RowStatus::Unspecified => 3,
                };
                tally.rows[known.shard][column] += 1;
                let value = row.values.first().and_then(|v| v.kind.clone());
                let right = match column {
                    0 | 1 => row.entity_key == known.key && value == Some(Kind::Int64Value(known.n)),
                    2 => true,
                    // Every key the load reads was written.
                    _ => false,
                };
                tally.wrong += u64::from(!right);
            }
            true
        }
        Err(status) if status.code() == tonic::Code::ResourceExhausted => {
            tally.shed += 1;
            false
        }
        Err(status) => {
            *tally.failed.entry(format!("{:?}: {}", status.code(), status.message())).or_default() += 1;
            false
        }
    }
}

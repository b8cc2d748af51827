//! `strata-bench`: Strata's read path under load, against baselines measured
//! in the same run on the same machine.
//!
//! Starts a local stack (Redis Cluster 3+3, 2 PostgreSQL shards) and a
//! server in this process, writes the data set, then runs each scenario
//! and its baseline one after the other:
//!
//! | scenario | baseline |
//! |---|---|
//! | `l1-1`, `l1-10`, `l1-100`: L1 hits, 1/10/100 keys of 10 features | `floor-N`: a tonic server answering a canned response of the same bytes |
//! | `l2-100`: L2 hits, on a server with L1 off (`l1.max_bytes = 0`) | `redis-100`: the same GETs pipelined with fred |
//! | `l3-100`: cold keys (1 ms TTLs), 100 keys over 2 shards | `postgres-100`: the same `= ANY` queries through the pool (`ShardRouter::fetch`) |
//! | `secure-1`, `secure-100`: L1 hits over TLS with a bearer token, on a server with authentication on | `plain-N`: the same reads in plaintext without a token |
//! | `vectors-500`: GetFeatureVectors, 1 user + 500 items over two views (the ranking shape), all in L1; `vectors-500-grouped`: the same with the user given once and the answer grouped (each view's values once per distinct key) | `two-calls-500`: the same rows with two GetFeatures calls at once (the user once; `-rows`: once per candidate); `floor-vectors-500`: a canned answer of the same bytes |
//! | `mixed-10`: one call in ten writes 10 rows, the rest read 10 keys | `reads-10`: the same reads without the writes |
//! | `stampede`: 64 callers on 10 hot keys with 1 s/2 s TTLs over two instances, protections on | `stampede-off`: the same with them off; PostgreSQL lookups per key per TTL period for both |
//! | `zipf`: Zipf(0.99) over 1M bulk-loaded keys, L1 for a tenth | itself: max load (closed loop), then half of it (open loop), with the L1+L2 hit share |
//!
//! `cargo run --release -p strata-benches --bin strata-bench -- --help`.
//! Prints a table and writes `target/bench-load.json`.

/// The same allocator as the `strata` binary, since the server runs in
/// this process.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use fred::prelude::*;
use rand::seq::IndexedRandom;
use strata_benches::loadgen::{self, Failure, Mode, Report, Sample};
use strata_benches::{Bench, ten_feature_row};
use strata_proto::v1;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use tonic::transport::Channel;

#[derive(Parser, Debug)]
#[command(name = "strata-bench", about = "Strata's read path under load, against same-run baselines")]
struct Args {
    /// Scenarios to run (with their baselines): l1-1, l1-10, l1-100, l2-100,
    /// l3-100, secure-1, secure-100, vectors-500, mixed-10, stampede, zipf,
    /// or all.
    #[arg(long, value_delimiter = ',', default_value = "all")]
    scenarios: Vec<String>,
    /// Measured seconds per run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Unmeasured seconds before each run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Closed loop: calls in flight (callers).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Open loop instead: calls a second, sent on schedule.
    #[arg(long)]
    rate: Option<f64>,
    /// Keys written per view.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Keys of the Zipf scenario (bulk-loaded); L1 is sized for a tenth.
    #[arg(long, default_value_t = 1_000_000)]
    zipf_keys: usize,
    /// Keys per call in the Zipf scenario.
    #[arg(long, default_value_t = 10)]
    zipf_batch: usize,
    /// Where the JSON report goes.
    #[arg(long, default_value = "target/bench-load.json")]
    json: PathBuf,
}

/// Ten features per row: the scenarios' row shape.
const FEATURES: &str = r#"features = [
  { name = "f0", type = "int64" }, { name = "f1", type = "int64" }, { name = "f2", type = "int64" },
  { name = "f3", type = "int64" }, { name = "f4", type = "int64" }, { name = "f5", type = "double" },
  { name = "f6", type = "double" }, { name = "f7", type = "double" }, { name = "f8", type = "double" },
  { name = "f9", type = "double" },
]"#;

fn views() -> String {
    [
        ("bench_hot", "10m", "10m"),
        ("bench_l2", "1ms", "10m"),
        ("bench_cold", "1ms", "1ms"),
        ("bench_zipf", "10m", "10m"),
    ]
    .iter()
    .map(|(name, l1, l2)| {
        format!("\n[[views]]\nname = \"{name}\"\nl1_ttl = \"{l1}\"\nl2_ttl = \"{l2}\"\njitter = 0.0\n{FEATURES}\n")
    })
    .chain(
        // The ranking shape (vectors-500): a user view and an item view, by
        // the shipped `user` (string) and `item` (int64) entities.
        [("bench_vuser", "user"), ("bench_vitem", "item")].iter().map(|(name, entity)| {
            format!(
                "\n[[views]]\nname = \"{name}\"\nentity = \"{entity}\"\nl1_ttl = \"10m\"\nl2_ttl = \"10m\"\njitter = 0.0\n{FEATURES}\n"
            )
        }),
    )
    .collect()
}

/// Candidate items per call in vectors-500.
const CANDIDATES: usize = 500;

/// [`ten_feature_row`] `i` as a row to write under `key`.
fn row(key: String, i: usize) -> v1::WriteRow {
    let row = ten_feature_row(i);
    let features =
        row.values.iter().enumerate().map(|(f, value)| (format!("f{f}"), strata_proto::value_to_wire(value))).collect();
    v1::WriteRow {
        entity_key: key,
        features,
        event_time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 0 }),
        join_keys: Default::default(),
    }
}

fn key(i: usize) -> String {
    format!("user:{i:08}")
}

/// Which keys a call asks for.
#[derive(Clone, Copy, Debug)]
enum Pick {
    /// `n` keys at random.
    Random,
    /// Call `i` asks for keys `[i*n, (i+1)*n)` (wrapping): concurrent calls
    /// never share a key, and a key comes back only after every other.
    Sequential,
}

fn batch(keys: &[String], pick: Pick, i: u64, n: usize) -> Vec<String> {
    match pick {
        Pick::Random => keys.choose_multiple(&mut rand::rng(), n).cloned().collect(),
        Pick::Sequential => (0..n).map(|j| keys[(i as usize * n + j) % keys.len()].clone()).collect(),
    }
}

/// One GetFeatures of `batch` of `view`, with its rows' sources.
async fn get(client: &mut FeatureStoreClient<Channel>, view: &str, batch: Vec<String>) -> Result<Sample, Failure> {
    get_as(client, view, batch, None).await
}

/// [`get`], sending `authorization` if given.
async fn get_as(
    client: &mut FeatureStoreClient<Channel>,
    view: &str,
    batch: Vec<String>,
    authorization: Option<&tonic::metadata::AsciiMetadataValue>,
) -> Result<Sample, Failure> {
    let n = batch.len();
    let mut request = tonic::Request::new(v1::GetFeaturesRequest {
        feature_view: view.into(),
        entity_keys: batch,
        features: Vec::new(),
    });
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value.clone());
    }
    match client.get_features(request).await {
        Ok(response) => {
            let mut sample = Sample { keys: n as u64, sources: [0; 4] };
            for row in &response.get_ref().rows {
                let column = match (v1::Source::try_from(row.source), row.status) {
                    (Ok(v1::Source::L1), s) if s == v1::RowStatus::Found as i32 => 0,
                    (Ok(v1::Source::L2), s) if s == v1::RowStatus::Found as i32 => 1,
                    (Ok(v1::Source::L3), s) if s == v1::RowStatus::Found as i32 => 2,
                    _ => 3,
                };
                sample.sources[column] += 1;
            }
            Ok(sample)
        }
        Err(status) if status.code() == tonic::Code::ResourceExhausted => Err(Failure::Shed),
        Err(_) => Err(Failure::Error),
    }
}

struct Setup {
    args: Args,
    warmup: Duration,
    duration: Duration,
    mode: Mode,
    keys: Arc<Vec<String>>,
}

impl Setup {
    /// Runs GetFeatures of `n` keys of `view` against `endpoint`; one
    /// channel (HTTP/2 connection) per caller.
    async fn grpc(&self, name: &str, endpoint: String, view: &'static str, n: usize, pick: Pick) -> Result<Report> {
        self.grpc_in(name, endpoint, view, n, pick, self.mode).await
    }

    /// [`Setup::grpc`] against the secure server: TLS, and the token on
    /// every call.
    async fn grpc_secure(&self, name: &str, secure: &Secure, n: usize) -> Result<Report> {
        let callers = match self.mode {
            Mode::Closed { callers } => callers,
            Mode::Open { .. } => self.args.concurrency,
        };
        let mut clients = Vec::with_capacity(callers);
        for _ in 0..callers {
            clients.push(FeatureStoreClient::new(secure.channel().await?));
        }
        let (clients, keys, token) = (Arc::new(clients), self.keys.clone(), Arc::new(secure.authorization.clone()));
        Ok(loadgen::run(name, self.mode, self.warmup, self.duration, move |i| {
            let mut client = clients[i as usize % clients.len()].clone();
            let batch = batch(&keys, Pick::Random, i, n);
            let token = token.clone();
            async move { get_as(&mut client, "bench_hot", batch, Some(&token)).await }
        })
        .await)
    }

    async fn grpc_in(
        &self,
        name: &str,
        endpoint: String,
        view: &'static str,
        n: usize,
        pick: Pick,
        mode: Mode,
    ) -> Result<Report> {
        let callers = match mode {
            Mode::Closed { callers } => callers,
            Mode::Open { .. } => self.args.concurrency,
        };
        let mut clients = Vec::with_capacity(callers);
        for _ in 0..callers {
            clients.push(FeatureStoreClient::connect(endpoint.clone()).await?);
        }
        let (clients, keys) = (Arc::new(clients), self.keys.clone());
        Ok(loadgen::run(name, mode, self.warmup, self.duration, move |i| {
            let mut client = clients[i as usize % clients.len()].clone();
            let batch = batch(&keys, pick, i, n);
            async move { get(&mut client, view, batch).await }
        })
        .await)
    }
}

/// A server with TLS (a certificate made here) and authentication, its L1
/// warmed with every key of `bench_hot`.
struct Secure {
    server: strata_server::RunningServer,
    ca: String,
    authorization: tonic::metadata::AsciiMetadataValue,
    _dir: tempfile::TempDir,
}

const BENCH_TOKEN: &str = "bench-token-0b9c";

impl Secure {
    async fn start(bench: &Bench, keys: &[String]) -> Result<Secure> {
        let dir = tempfile::tempdir()?;
        let ca = strata_tests::tls::Ca::new("bench CA")?;
        let leaf = ca.server()?;
        let cert = strata_tests::tls::write(dir.path(), "server.pem", &leaf.cert)?;
        let key = strata_tests::tls::write(dir.path(), "server-key.pem", &leaf.key)?;
        let server = bench
            .server(&views(), |file| {
                file.hot_keys.sample_rate = 0.0;
                file.server.max_in_flight = 100_000;
                file.tls.cert_file = cert.display().to_string();
                file.tls.key_file = key.display().to_string();
                file.auth.enabled = true;
                file.auth.principals = vec![strata_server::config::PrincipalSection {
                    name: "bench".into(),
                    token_sha256: vec![strata_server::auth::hex(&strata_server::auth::token_hash(BENCH_TOKEN))],
                    certificate_names: Vec::new(),
                    read: vec!["*".into()],
                    write: Vec::new(),
                    per_second: 0,
                    burst: 0,
                }];
            })
            .await?;
        let secure =
            Secure { server, ca: ca.pem(), authorization: format!("Bearer {BENCH_TOKEN}").parse()?, _dir: dir };
        let mut client = FeatureStoreClient::new(secure.channel().await?);
        for chunk in keys.chunks(1_000) {
            let mut request = tonic::Request::new(v1::GetFeaturesRequest {
                feature_view: "bench_hot".into(),
                entity_keys: chunk.to_vec(),
                features: Vec::new(),
            });
            request.metadata_mut().insert("authorization", secure.authorization.clone());
            client.get_features(request).await?;
        }
        Ok(secure)
    }

    async fn channel(&self) -> Result<Channel> {
        strata_tests::tls::channel(self.server.grpc_addr(), &self.ca, None).await
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let scenarios = args.scenarios.clone();
    let wants = |s: &str| scenarios.iter().any(|w| w == "all" || w == s);
    let mode = match args.rate {
        Some(rate) => Mode::Open { rate, max_outstanding: 10_000 },
        None => Mode::Closed { callers: args.concurrency },
    };
    eprintln!("starting the local stack ...");
    let bench = Bench::start().await?;
    let server = bench
        .server(&views(), |file| {
            // Not what is measured here.
            file.hot_keys.sample_rate = 0.0;
            file.server.max_in_flight = 100_000;
        })
        .await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    let keys: Arc<Vec<String>> = Arc::new((0..args.keys).map(key).collect());

    eprintln!("writing {} keys to each view ...", keys.len());
    let mut client = FeatureStoreClient::connect(endpoint.clone()).await?;
    for view in ["bench_hot", "bench_l2", "bench_cold"] {
        for (c, chunk) in keys.chunks(1_000).enumerate() {
            let rows = chunk.iter().enumerate().map(|(i, k)| row(k.clone(), c * 1_000 + i)).collect();
            let response =
                client.write_features(v1::WriteFeaturesRequest { feature_view: view.into(), rows }).await?.into_inner();
            anyhow::ensure!(response.rows_failed == 0, "writing {view} failed: {response:?}");
        }
    }
    // Every key in L1 (bench_hot) and in Redis (bench_l2).
    for view in ["bench_hot", "bench_l2"] {
        for chunk in keys.chunks(1_000) {
            client
                .get_features(v1::GetFeaturesRequest {
                    feature_view: view.into(),
                    entity_keys: chunk.to_vec(),
                    features: Vec::new(),
                })
                .await?;
        }
    }
    // The floor answers what the real server answered.
    let mut canned = HashMap::new();
    for n in [1, 10, 100] {
        let request = v1::GetFeaturesRequest {
            feature_view: "bench_hot".into(),
            entity_keys: keys[..n].to_vec(),
            features: Vec::new(),
        };
        canned.insert(n, client.get_features(request).await?.into_inner());
    }
    let floor = format!("http://{}", strata_benches::floor::start(canned).await?);

    let setup = Setup {
        warmup: Duration::from_secs_f64(args.warmup),
        duration: Duration::from_secs_f64(args.secs),
        mode,
        keys: keys.clone(),
        args,
    };
    let mut pairs: Vec<(Report, Report)> = Vec::new();
    let mut notes = Vec::new();
    for n in [1, 10, 100] {
        let scenario = format!("l1-{n}");
        if wants(&scenario) {
            let base = setup.grpc(&format!("floor-{n}"), floor.clone(), "bench_hot", n, Pick::Random).await?;
            let strata = setup.grpc(&scenario, endpoint.clone(), "bench_hot", n, Pick::Random).await?;
            pairs.push((strata, base));
        }
    }
    if wants("secure-1") || wants("secure-100") {
        // The same L1 reads over TLS with a bearer token, against the
        // plaintext server without authentication: the cost of security.
        let secure = Secure::start(&bench, &keys).await?;
        for n in [1, 100] {
            let scenario = format!("secure-{n}");
            if wants(&scenario) {
                let plain = setup.grpc(&format!("plain-{n}"), endpoint.clone(), "bench_hot", n, Pick::Random).await?;
                let tls = setup.grpc_secure(&scenario, &secure, n).await?;
                pairs.push((tls, plain));
            }
        }
        secure.server.shutdown().await;
    }
    if wants("l2-100") {
        // A second server with L1 off (`l1.max_bytes = 0`): every read is
        // answered by Redis.
        let no_l1 = bench
            .server(&views(), |file| {
                file.hot_keys.sample_rate = 0.0;
                file.server.max_in_flight = 100_000;
                file.l1.max_bytes = 0;
            })
            .await?;
        let redis = raw_redis(&setup, &bench, &server).await?;
        let strata =
            setup.grpc("l2-100", format!("http://{}", no_l1.grpc_addr()), "bench_l2", 100, Pick::Random).await?;
        // What the gRPC call alone costs on this machine bounds the ratio:
        // the client and server share the cores with Redis and fred.
        let grpc = setup.grpc("floor-100", floor.clone(), "bench_hot", 100, Pick::Random).await?;
        let ceiling = 1.0 / (1.0 / redis.calls_per_sec() + 1.0 / grpc.calls_per_sec());
        notes.push(format!(
            "l2-100: raw fred plus the gRPC call alone (floor-100, {:.0} calls/s in this run) would reach about {ceiling:.0} calls/s on these shared cores, {:.2} of raw fred; Strata reached {:.0}, {:.2} of raw fred and {:.2} of that ceiling",
            grpc.calls_per_sec(),
            ceiling / redis.calls_per_sec(),
            strata.calls_per_sec(),
            strata.calls_per_sec() / redis.calls_per_sec(),
            strata.calls_per_sec() / ceiling,
        ));
        pairs.push((strata, redis));
        no_l1.shutdown().await;
    }
    if wants("l3-100") {
        // Cold: 1 ms TTLs and disjoint batches, so every key misses both
        // caches; one call at a time ("low load"), then the usual load.
        let view = bench.config(&views())?.validate()?.registry.get("bench_cold").context("view bench_cold")?.clone();
        let low = Mode::Closed { callers: 1 };
        let postgres = raw_postgres(&setup, &server, view.clone(), low).await?;
        let strata = setup.grpc_in("l3-100", endpoint.clone(), "bench_cold", 100, Pick::Sequential, low).await?;
        pairs.push((strata, postgres));
        let postgres = raw_postgres(&setup, &server, view, setup.mode).await?;
        let strata = setup.grpc("l3-100", endpoint.clone(), "bench_cold", 100, Pick::Sequential).await?;
        pairs.push((strata, postgres));
    }

    if wants("vectors-500") {
        let Vectors { one, grouped, two, two_rows, floor, note } = vectors(&setup, &bench, &server, &endpoint).await?;
        pairs.push((one.clone(), two.clone()));
        pairs.push((one.clone(), two_rows));
        pairs.push((one, floor));
        pairs.push((grouped, two));
        notes.push(note);
    }

    if wants("mixed-10") {
        let reads = setup.grpc("reads-10", endpoint.clone(), "bench_hot", 10, Pick::Random).await?;
        let mixed = mixed(&setup, &endpoint).await?;
        pairs.push((mixed, reads));
    }
    if wants("stampede") {
        let (on, off, note) = stampede(&setup, &bench).await?;
        pairs.push((on, off));
        notes.push(note);
    }
    if wants("zipf") {
        let (max, half, note) = zipf(&setup, &bench).await?;
        pairs.push((half, max));
        notes.push(note);
    }

    print_table(&pairs, &setup);
    for note in &notes {
        println!("{note}");
    }
    let json = serde_json::json!({
        "machine": { "cores": std::thread::available_parallelism().map_or(0, |n| n.get()), "shared": "server, load generator, Redis and PostgreSQL on one machine" },
        "mode": mode.label(),
        "results": pairs.iter().map(|(s, b)| serde_json::json!({
            "scenario": s.json(), "baseline": b.json(), "throughput_ratio": s.calls_per_sec() / b.calls_per_sec().max(1e-9),
        })).collect::<Vec<_>>(),
    });
    if let Some(dir) = setup.args.json.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&setup.args.json, serde_json::to_string_pretty(&json)? + "\n")?;
    eprintln!("wrote {}", setup.args.json.display());
    server.shutdown().await;
    bench.stop().await;
    Ok(())
}

/// Reads mixed with writes: one call in ten writes 10 rows (new event
/// times, so every write is applied and invalidates L1 everywhere), the
/// rest read 10 keys; keys at random over the hot view.
async fn mixed(setup: &Setup, endpoint: &str) -> Result<Report> {
    use rand::Rng;
    let mut clients = Vec::new();
    for _ in 0..setup.args.concurrency {
        clients.push(FeatureStoreClient::connect(endpoint.to_owned()).await?);
    }
    let (clients, keys) = (Arc::new(clients), setup.keys.clone());
    let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
    Ok(loadgen::run("mixed-10", setup.mode, setup.warmup, setup.duration, move |i| {
        let mut client = clients[i as usize % clients.len()].clone();
        let batch = batch(&keys, Pick::Random, i, 10);
        let write = rand::rng().random::<f64>() < 0.1;
        async move {
            if !write {
                return get(&mut client, "bench_hot", batch).await;
            }
            let rows = batch
                .into_iter()
                .enumerate()
                .map(|(j, k)| {
                    let mut row = row(k, j);
                    // Later than anything written before: every write applies.
                    row.event_time = Some(prost_types::Timestamp { seconds: start, nanos: (i % 1_000_000_000) as i32 });
                    row
                })
                .collect();
            match client.write_features(v1::WriteFeaturesRequest { feature_view: "bench_hot".into(), rows }).await {
                Ok(response) if response.get_ref().rows_failed == 0 => Ok(Sample { keys: 10, sources: [0; 4] }),
                Ok(_) => Err(Failure::Error),
                Err(status) if status.code() == tonic::Code::ResourceExhausted => Err(Failure::Shed),
                Err(_) => Err(Failure::Error),
            }
        }
    })
    .await)
}

/// Zipf(s) over `n` ranks: draws rank `i` (0-based) with probability
/// proportional to `1 / (i + 1)^s`, by binary search in the CDF.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for i in 0..n {
            total += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, u: f64) -> usize {
        self.cdf.partition_point(|c| *c < u).min(self.cdf.len() - 1)
    }
}

/// The Zipf(0.99) mix: `zipf_keys` keys bulk-loaded into PostgreSQL,
/// warmed into Redis, read through a server whose L1 holds a tenth of them.
/// First the most it answers (closed loop), then half of that in open
/// loop; reports the share of rows answered by L1 or L2 in the second.
async fn zipf(setup: &Setup, bench: &Bench) -> Result<(Report, Report, String)> {
    use rand::Rng;
    let n = setup.args.zipf_keys;
    let config = bench.config(&views())?.validate()?;
    let view = config.registry.get("bench_zipf").context("view bench_zipf")?.clone();
    // What one L1 entry weighs (see the L1 weigher): overhead, key, row.
    let entry_bytes = 128 + key(0).len() + ten_feature_row(0).approx_bytes();
    let server = bench
        .server(&views(), |file| {
            file.hot_keys.sample_rate = 0.0;
            file.server.max_in_flight = 100_000;
            file.l1.max_bytes = (n / 10 * entry_bytes) as u64;
        })
        .await?;
    eprintln!("zipf: bulk-loading {n} keys ...");
    let shards = server.tiers().shards().clone();
    let mut by_shard: Vec<Vec<(String, strata_core::Row)>> = vec![Vec::new(); shards.shard_count()];
    for i in 0..n {
        let k = key(i);
        let shard = shards.shard_of(&view, &k).context("every shard of the bench stack is configured")?;
        by_shard[shard].push((k, ten_feature_row(i)));
    }
    for (shard, rows) in by_shard.iter().enumerate() {
        for chunk in rows.chunks(20_000) {
            shards.copy_upsert(shard, &view, chunk, tokio::time::Instant::now() + Duration::from_secs(120)).await?;
        }
    }
    drop(by_shard);
    eprintln!("zipf: warming Redis ...");
    let endpoint = format!("http://{}", server.grpc_addr());
    let mut client = FeatureStoreClient::connect(endpoint.clone()).await?;
    let keys: Vec<String> = (0..n).map(key).collect();
    for chunk in keys.chunks(1_000) {
        let request = v1::GetFeaturesRequest {
            feature_view: "bench_zipf".into(),
            entity_keys: chunk.to_vec(),
            features: Vec::new(),
        };
        client.get_features(request).await?;
    }
    let zipf = Arc::new(Zipf::new(n, 0.99));
    let keys = Arc::new(keys);
    let batch_size = setup.args.zipf_batch;
    let mut clients = Vec::new();
    for _ in 0..setup.args.concurrency {
        clients.push(FeatureStoreClient::connect(endpoint.clone()).await?);
    }
    let clients = Arc::new(clients);
    let call = {
        let (clients, keys, zipf) = (clients.clone(), keys.clone(), zipf.clone());
        move |i: u64| {
            let mut client = clients[i as usize % clients.len()].clone();
            let mut rng = rand::rng();
            let mut batch: Vec<String> = Vec::with_capacity(batch_size);
            while batch.len() < batch_size {
                let k = &keys[zipf.sample(rng.random::<f64>())];
                if !batch.contains(k) {
                    batch.push(k.clone());
                }
            }
            async move { get(&mut client, "bench_zipf", batch).await }
        }
    };
    let name = format!("zipf-{batch_size}");
    let max = loadgen::run(
        &format!("{name} max"),
        Mode::Closed { callers: setup.args.concurrency },
        setup.warmup,
        setup.duration,
        call.clone(),
    )
    .await;
    let rate = max.calls_per_sec() / 2.0;
    let half = loadgen::run(
        &format!("{name} half"),
        Mode::Open { rate, max_outstanding: 10_000 },
        setup.warmup,
        setup.duration,
        call,
    )
    .await;
    let rows: u64 = half.sources.iter().sum();
    let cached = half.sources[0] + half.sources[1];
    let note = format!(
        "zipf(0.99) over {n} keys, {batch_size} keys a call, L1 sized for {} entries: at half of max load ({rate:.0} calls/s) {:.2}% of rows from L1+L2 ({:.2}% L1), p99 {:.3} ms (the generator itself sent calls late by p50 {:.3} ms, p99 {:.3} ms)",
        n / 10,
        100.0 * cached as f64 / rows.max(1) as f64,
        100.0 * half.sources[0] as f64 / rows.max(1) as f64,
        half.ms(0.99),
        half.lag_ms(0.5),
        half.lag_ms(0.99),
    );
    server.shutdown().await;
    Ok((max, half, note))
}

/// Hot keys with short TTLs read by many callers over two instances, with
/// the stampede protections (single flight, Redis leases, refresh-ahead)
/// on, against the same with them off; with PostgreSQL lookups per key per
/// L2 TTL period, counted by pg_stat_statements.
async fn stampede(setup: &Setup, bench: &Bench) -> Result<(Report, Report, String)> {
    const KEYS: usize = 10;
    const L2_TTL: Duration = Duration::from_secs(2);
    let callers = setup.args.concurrency.max(64);
    let mut reports = Vec::new();
    let mut lookups = Vec::new();
    for protection in [false, true] {
        let view = if protection { "bench_stampede_on" } else { "bench_stampede_off" };
        let extra = format!(
            "{}\n[[views]]\nname = \"{view}\"\nl1_ttl = \"1s\"\nl2_ttl = \"{}ms\"\njitter = 0.1\nrefresh_ahead = 0.8\n{FEATURES}\n",
            views(),
            L2_TTL.as_millis()
        );
        let mut servers = Vec::new();
        for _ in 0..2 {
            servers.push(
                bench
                    .server(&extra, |file| {
                        file.stampede.enabled = protection;
                        file.hot_keys.sample_rate = 0.0;
                        file.server.max_in_flight = 100_000;
                    })
                    .await?,
            );
        }
        let endpoint = |i: usize| format!("http://{}", servers[i % servers.len()].grpc_addr());
        let keys: Vec<String> = (0..KEYS).map(|i| format!("stampede:{i}")).collect();
        let rows = keys.iter().enumerate().map(|(i, k)| row(k.clone(), i)).collect();
        let mut writer = FeatureStoreClient::connect(endpoint(0)).await?;
        writer.write_features(v1::WriteFeaturesRequest { feature_view: view.into(), rows }).await?;
        let mut clients = Vec::with_capacity(callers);
        for i in 0..callers {
            clients.push(FeatureStoreClient::connect(endpoint(i)).await?);
        }
        let before = bench.postgres_reads(view).await?;
        let (clients, keys) = (Arc::new(clients), Arc::new(keys));
        let report = loadgen::run(
            &format!("stampede-{}", if protection { "on" } else { "off" }),
            Mode::Closed { callers },
            setup.warmup,
            setup.duration,
            move |i| {
                let mut client = clients[i as usize % clients.len()].clone();
                let key = keys[i as usize % keys.len()].clone();
                async move { get(&mut client, view, vec![key]).await }
            },
        )
        .await;
        lookups.push(bench.postgres_reads(view).await? - before);
        reports.push(report);
        for server in servers {
            server.shutdown().await;
        }
    }
    let periods = (setup.warmup + setup.duration).as_secs_f64() / L2_TTL.as_secs_f64();
    let per_key = |n: u64| n as f64 / KEYS as f64 / periods;
    let note = format!(
        "stampede: {callers} callers on {KEYS} hot keys (L1 TTL 1s, L2 TTL 2s) over 2 instances: PostgreSQL lookups per key per L2 TTL period {:.1} with the protections on, {:.1} with them off",
        per_key(lookups[1]),
        per_key(lookups[0]),
    );
    let on = reports.pop().context("on")?;
    let off = reports.pop().context("off")?;
    Ok((on, off, note))
}

/// The L2 baseline: the same 100-key batches as `l2-100`, as pipelined GETs
/// of Strata's Redis keys with fred, no decoding, no gRPC.
async fn raw_redis(setup: &Setup, bench: &Bench, server: &strata_server::RunningServer) -> Result<Report> {
    let hosts = bench
        .stack
        .redis_nodes()
        .iter()
        .map(|n| {
            let (h, p) = n.rsplit_once(':').context("node address")?;
            Ok((h.to_owned(), p.parse::<u16>()?))
        })
        .collect::<Result<Vec<_>>>()?;
    let client = Builder::from_config(fred::prelude::Config {
        server: ServerConfig::new_clustered(hosts),
        ..Default::default()
    })
    .with_connection_config(|c| c.tcp = fred::types::config::TcpConfig { nodelay: Some(true), ..Default::default() })
    .build()?;
    client.init().await?;
    let l2 = server.tiers().l2().clone();
    let redis_keys: Arc<Vec<String>> = Arc::new(setup.keys.iter().map(|k| l2.key_of("bench_l2", k)).collect());
    let report = loadgen::run("redis-100", setup.mode, setup.warmup, setup.duration, move |_| {
        let (client, keys) = (client.clone(), redis_keys.clone());
        async move {
            let batch: Vec<&String> = keys.choose_multiple(&mut rand::rng(), 100).collect();
            let pipeline = client.pipeline();
            for key in &batch {
                let _: () = pipeline.get(key.as_str()).await.map_err(|_| Failure::Error)?;
            }
            let results = pipeline.try_all::<Option<fred::bytes::Bytes>>().await;
            let hits = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count() as u64;
            if results.iter().any(Result::is_err) {
                return Err(Failure::Error);
            }
            Ok(Sample { keys: 100, sources: [0, hits, 0, 100 - hits] })
        }
    })
    .await;
    Ok(report)
}

/// The runs of the vectors-500 scenario.
struct Vectors {
    one: Report,
    grouped: Report,
    two: Report,
    two_rows: Report,
    floor: Report,
    note: String,
}

/// The ranking shape: one user and [`CANDIDATES`] items over two views.
/// `vectors-500` asks GetFeatureVectors for both in one call; its baselines
/// are the same rows through two GetFeatures calls at once (the user's, the
/// items'), and a canned-response floor of the one call's size. Every row is
/// in L1.
async fn vectors(
    setup: &Setup,
    bench: &Bench,
    server: &strata_server::RunningServer,
    endpoint: &str,
) -> Result<Vectors> {
    use rand::{Rng as _, SeedableRng as _};
    use strata_core::KeyValue;
    let config = bench.config(&views())?.validate()?;
    let items_view = config.registry.get("bench_vitem").context("view bench_vitem")?.clone();
    let items = setup.keys.len();
    let mut client = FeatureStoreClient::connect(endpoint.to_owned()).await?;
    let keyed = |join_key: &str, value: v1::Value, i: usize| {
        let mut row = row(String::new(), i);
        row.join_keys = [(join_key.to_owned(), value)].into();
        row
    };
    let user = v1::Value { kind: Some(v1::value::Kind::StringValue("u0".into())) };
    let item = |i: usize| v1::Value { kind: Some(v1::value::Kind::Int64Value(i as i64)) };
    client
        .write_features(v1::WriteFeaturesRequest {
            feature_view: "bench_vuser".into(),
            rows: vec![keyed("user_id", user.clone(), 0)],
        })
        .await?;
    for chunk in (0..items).collect::<Vec<_>>().chunks(1_000) {
        let rows = chunk.iter().map(|&i| keyed("item_id", item(i), i)).collect();
        let response =
            client.write_features(v1::WriteFeaturesRequest { feature_view: "bench_vitem".into(), rows }).await?;
        anyhow::ensure!(response.get_ref().rows_failed == 0, "writing bench_vitem failed");
    }
    let item_texts: Arc<Vec<String>> = Arc::new(
        (0..items)
            .map(|i| {
                let encoded = items_view.entity.encode([("item_id", KeyValue::Int64(i as i64))], 256)?;
                Ok(items_view.entity.key_text(&encoded))
            })
            .collect::<Result<_>>()?,
    );
    let features: Vec<String> =
        ["bench_vuser", "bench_vitem"].iter().flat_map(|v| (0..10).map(move |f| format!("{v}:f{f}"))).collect();
    // The user once per row (the column-wise rule), or once for every row.
    let request = move |picked: &[usize], users: usize| v1::GetFeatureVectorsRequest {
        features: features.clone(),
        feature_service: String::new(),
        entities: [
            ("user_id".to_owned(), v1::JoinKeyColumn { values: vec![user.clone(); users] }),
            ("item_id".to_owned(), v1::JoinKeyColumn { values: picked.iter().map(|&i| item(i)).collect() }),
        ]
        .into(),
        full_feature_names: true,
        grouped: false,
    };
    // Every item in L1.
    for chunk in (0..items).collect::<Vec<_>>().chunks(CANDIDATES) {
        client.get_feature_vectors(request(chunk, chunk.len())).await?;
    }
    let canned =
        client.get_feature_vectors(request(&(0..CANDIDATES).collect::<Vec<_>>(), CANDIDATES)).await?.into_inner();
    let floor = format!("http://{}", strata_benches::floor::start_vectors(canned).await?);
    let _ = server;

    let pick = move |i: u64| -> Vec<usize> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(i);
        (0..CANDIDATES).map(|_| rng.random_range(0..items)).collect()
    };
    let run_vectors = |name: &'static str, endpoint: String, grouped: bool| {
        let request = request.clone();
        async move {
            let clients = connect_all(setup, &endpoint).await?;
            Ok::<_, anyhow::Error>(
                loadgen::run(name, setup.mode, setup.warmup, setup.duration, move |i| {
                    let mut client = clients[i as usize % clients.len()].clone();
                    // Grouped, the user is given once, as it is answered.
                    let users = if grouped { 1 } else { CANDIDATES };
                    let request = v1::GetFeatureVectorsRequest { grouped, ..request(&pick(i), users) };
                    async move {
                        match client.get_feature_vectors(request).await {
                            Ok(answer) => {
                                let answer = answer.get_ref();
                                let mut sample = Sample { keys: CANDIDATES as u64 + 1, sources: [0; 4] };
                                // Each row's item (the last view) source.
                                let mut count = |source: Option<&i32>| {
                                    let column = match source.map(|&s| v1::Source::try_from(s)) {
                                        Some(Ok(v1::Source::L1)) => 0,
                                        Some(Ok(v1::Source::L2)) => 1,
                                        Some(Ok(v1::Source::L3)) => 2,
                                        _ => 3,
                                    };
                                    sample.sources[column] += 1;
                                };
                                for vector in &answer.vectors {
                                    count(vector.sources.last());
                                }
                                if let Some(items) = answer.groups.last() {
                                    for &index in &items.row_keys {
                                        count(items.keys.get(index as usize).map(|k| &k.source));
                                    }
                                }
                                Ok(sample)
                            }
                            Err(status) if status.code() == tonic::Code::ResourceExhausted => Err(Failure::Shed),
                            Err(_) => Err(Failure::Error),
                        }
                    }
                })
                .await,
            )
        }
    };
    let floor_report = run_vectors("floor-vectors-500", floor, false).await?;
    let one = run_vectors("vectors-500", endpoint.to_owned(), false).await?;
    let grouped = run_vectors("vectors-500-grouped", endpoint.to_owned(), true).await?;
    let clients = connect_all(setup, endpoint).await?;
    // Two GetFeatures calls at once: the user once (the client joins), or
    // once per candidate row (the same rows as the one call's answer).
    let two_calls = |name: &'static str, user_keys: usize, clients: Arc<Vec<FeatureStoreClient<Channel>>>| {
        let item_texts = item_texts.clone();
        loadgen::run(name, setup.mode, setup.warmup, setup.duration, move |i| {
            let (mut users, mut items) =
                (clients[i as usize % clients.len()].clone(), clients[i as usize % clients.len()].clone());
            let batch: Vec<String> = pick(i).into_iter().map(|k| item_texts[k].clone()).collect();
            async move {
                let (user, items) = tokio::join!(
                    get(&mut users, "bench_vuser", vec!["u0".to_owned(); user_keys]),
                    get(&mut items, "bench_vitem", batch)
                );
                let (user, items) = (user?, items?);
                let mut sources = items.sources;
                for (s, u) in sources.iter_mut().zip(user.sources) {
                    *s += u;
                }
                Ok(Sample { keys: user.keys + items.keys, sources })
            }
        })
    };
    let two = two_calls("two-calls-500", 1, clients.clone()).await;
    let two_rows = two_calls("two-calls-500-rows", CANDIDATES, clients).await;
    let note = format!(
        "vectors-500: one GetFeatureVectors call for 1 user + {CANDIDATES} items over two views, {:.2} of two GetFeatures calls at once (the user once), {:.2} of two calls with the user once per row, and {:.2} of a canned answer of its size; grouped (the user asked and answered once), {:.2} of the two calls",
        one.calls_per_sec() / two.calls_per_sec(),
        one.calls_per_sec() / two_rows.calls_per_sec(),
        one.calls_per_sec() / floor_report.calls_per_sec(),
        grouped.calls_per_sec() / two.calls_per_sec(),
    );
    Ok(Vectors { one, grouped, two, two_rows, floor: floor_report, note })
}

async fn connect_all(setup: &Setup, endpoint: &str) -> Result<Arc<Vec<FeatureStoreClient<Channel>>>> {
    let callers = match setup.mode {
        Mode::Closed { callers } => callers,
        Mode::Open { .. } => setup.args.concurrency,
    };
    let mut clients = Vec::with_capacity(callers);
    for _ in 0..callers {
        clients.push(FeatureStoreClient::connect(endpoint.to_owned()).await?);
    }
    Ok(Arc::new(clients))
}

/// The L3 baseline: the same 100-key batches as `l3-100`, read straight from
/// the shards with the server's own pools (`ShardRouter::fetch`: one `= ANY`
/// query per shard, in parallel), no caches, no gRPC.
async fn raw_postgres(
    setup: &Setup,
    server: &strata_server::RunningServer,
    view: Arc<strata_core::FeatureView>,
    mode: Mode,
) -> Result<Report> {
    let shards = server.tiers().shards().clone();
    let keys = setup.keys.clone();
    Ok(loadgen::run("postgres-100", mode, setup.warmup, setup.duration, move |i| {
        let (shards, view) = (shards.clone(), view.clone());
        let batch = batch(&keys, Pick::Sequential, i, 100);
        async move {
            let batch: Vec<&str> = batch.iter().map(String::as_str).collect();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let fetched = shards.fetch(&view, &batch, deadline).await;
            let found = fetched.iter().filter(|f| matches!(f, strata_shard_router::Fetched::Found(_))).count() as u64;
            if found < 100 {
                return Err(Failure::Error);
            }
            Ok(Sample { keys: 100, sources: [0, 0, found, 0] })
        }
    })
    .await)
}

fn print_table(pairs: &[(Report, Report)], setup: &Setup) {
    println!();
    println!(
        "{} s per run after {} s of warm-up, {}; server, load generator, Redis and PostgreSQL share this machine ({} cores)",
        setup.args.secs,
        setup.args.warmup,
        setup.mode.label(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!(
        "| run | load | calls/s | keys/s | p50 ms | p99 ms | p999 ms | errors | shed | rows L1/L2/L3/other | vs baseline |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (strata, base) in pairs {
        for (report, ratio) in [(base, None), (strata, Some(strata.calls_per_sec() / base.calls_per_sec().max(1e-9)))] {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {} | {} | {}/{}/{}/{} | {} |",
                report.name,
                report.mode,
                report.calls_per_sec(),
                report.keys_per_sec(),
                report.ms(0.5),
                report.ms(0.99),
                report.ms(0.999),
                report.errors,
                report.shed + report.dropped,
                report.sources[0],
                report.sources[1],
                report.sources[2],
                report.sources[3],
                ratio.map_or("baseline".to_owned(), |r| format!("{:.2}x of {}", r, base.name)),
            );
        }
    }
}

//! The writes benchmark, on a real local stack, each figure next to a
//! baseline measured in the same run:
//!
//! - **Bulk load**: `strata load` of a CSV file (parse, route, COPY into a
//!   staging table, merge with the event-time rule, Redis guards, L1
//!   invalidations) in rows per second, against the floor: the same rows,
//!   already in memory, COPYed straight into a plain table of the same shape
//!   on the same shards with the same batch size and concurrency.
//! - **Write-to-visibility**: a write acknowledged by instance A until
//!   instance B, which held the old value in its L1, answers the new one
//!   (p50/p99/p999), against the floor: a bare Redis PUBLISH acknowledged
//!   until a subscriber on the same cluster receives it.
//!
//! `cargo bench -p strata-benches --bench writes`; `STRATA_BENCH_ROWS` sets
//! the rows loaded (default 1,000,000), `STRATA_BENCH_WRITES` the writes
//! timed for visibility (default 1,000). Writes `target/bench-writes.json`.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fred::prelude::*;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use strata_benches::Bench;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_proto::v1::{self, value::Kind};
use strata_server::load::{Format, LoadOptions};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

const BATCH_ROWS: usize = 20_000;
const CONCURRENCY: usize = 2;

const VIEWS: &str = r#"
[[views]]
name = "bench_bulk"
l1_ttl = "5m"
l2_ttl = "10m"
features = [
  { name = "age", type = "int64" },
  { name = "score", type = "double" },
  { name = "country", type = "string" },
  { name = "premium", type = "bool" },
  { name = "embedding", type = "float_list" },
]

[[views]]
name = "bench_visibility"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]
"#;

/// Row `i` of the data set, as CSV cells after the key and event time.
fn cells(i: usize) -> (i64, f64, String, bool, Vec<f32>) {
    let emb = (0..16).map(|j| ((i * 31 + j * 7) % 2048) as f32 / 1024.0 - 1.0).collect();
    (
        (18 + i % 60) as i64,
        (i % 10_000) as f64 / 100.0,
        ["US", "DE", "FR", "JP"][i % 4].to_owned(),
        i.is_multiple_of(5),
        emb,
    )
}

fn key(i: usize) -> String {
    format!("user:{i:08}")
}

fn us(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() { 0 } else { h.value_at_quantile(q) }
}

/// The floor: the rows COPYed straight into a plain table of the same shape,
/// per shard, `CONCURRENCY` batches of `BATCH_ROWS` in flight per shard.
async fn raw_copy(bench: &Bench, rows: usize) -> Result<Duration> {
    let urls = bench.stack.shard_urls();
    let shards = urls.len() as u32;
    let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); urls.len()];
    for i in 0..rows {
        per_shard[strata_shard_router::shard_for(&key(i), shards) as usize].push(i);
    }
    let mut clients = Vec::new();
    for url in &urls {
        let mut conns = Vec::new();
        for _ in 0..CONCURRENCY {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            conns.push(client);
        }
        conns[0]
            .batch_execute(
                "DROP TABLE IF EXISTS bench_floor; CREATE TABLE bench_floor (entity_key text PRIMARY KEY, \
                 event_time timestamptz NOT NULL, age bigint, score double precision, country text, \
                 premium boolean, embedding real[])",
            )
            .await?;
        clients.push(conns);
    }
    let types = [Type::TEXT, Type::TIMESTAMPTZ, Type::INT8, Type::FLOAT8, Type::TEXT, Type::BOOL, Type::FLOAT4_ARRAY];
    let types = &types;
    let time = std::time::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
    let started = Instant::now();
    let jobs = per_shard.iter().zip(&clients).map(|(indexes, conns)| {
        let batches: Vec<&[usize]> = indexes.chunks(BATCH_ROWS).collect();
        futures::stream::iter(batches.into_iter().enumerate())
            .map(move |(b, batch)| {
                let client = &conns[b % CONCURRENCY];
                async move {
                    let sink = client
                        .copy_in("COPY bench_floor (entity_key, event_time, age, score, country, premium, embedding) FROM STDIN BINARY")
                        .await?;
                    let writer = BinaryCopyInWriter::new(sink, types);
                    futures::pin_mut!(writer);
                    for &i in batch {
                        let (age, score, country, premium, emb) = cells(i);
                        let k = key(i);
                        let values: [&(dyn ToSql + Sync); 7] = [&k, &time, &age, &score, &country, &premium, &emb];
                        writer.as_mut().write(&values).await?;
                    }
                    writer.finish().await?;
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect::<Vec<_>>()
    });
    for results in futures::future::join_all(jobs).await {
        results.into_iter().collect::<Result<Vec<_>>>()?;
    }
    Ok(started.elapsed())
}

/// The floor of visibility: an SPUBLISH (sharded pub/sub, as Strata uses)
/// sent until a subscriber on the same cluster has the message.
async fn raw_pubsub(bench: &Bench, rounds: usize) -> Result<Histogram<u64>> {
    let nodes = bench.stack.redis_nodes();
    let (host, port) = nodes[0].rsplit_once(':').context("node")?;
    let config = || Config {
        server: ServerConfig::new_clustered(vec![(host.to_owned(), port.parse().unwrap_or(0))]),
        ..Default::default()
    };
    let publisher = Builder::from_config(config()).build()?;
    publisher.init().await?;
    let subscriber = Builder::from_config(config()).build_subscriber_client()?;
    subscriber.init().await?;
    subscriber.ssubscribe("bench:floor").await?;
    let mut messages = subscriber.message_rx();
    let mut histogram = Histogram::new(3)?;
    for i in 0..rounds {
        let acked = Instant::now();
        let _: i64 = publisher.spublish("bench:floor", i.to_string()).await?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.recv()).await??;
            if message.value.as_string().as_deref() == Some(&i.to_string()) {
                break;
            }
        }
        histogram.record(acked.elapsed().as_micros() as u64)?;
    }
    let _ = subscriber.quit().await;
    let _ = publisher.quit().await;
    Ok(histogram)
}

/// Writes through A; for each, the time from acknowledgement until B,
/// which held the old value in its L1, answers the new one, and until B
/// applied the announcement.
async fn visibility(bench: &Bench, rounds: usize) -> Result<(Histogram<u64>, Histogram<u64>, u64)> {
    let (a, b) = (bench.server(VIEWS, |_| {}).await?, bench.server(VIEWS, |_| {}).await?);
    let mut ca = FeatureStoreClient::connect(format!("http://{}", a.grpc_addr())).await?;
    let mut cb = FeatureStoreClient::connect(format!("http://{}", b.grpc_addr())).await?;
    let write = |key: &str, n: i64, seconds: i64| v1::WriteFeaturesRequest {
        feature_view: "bench_visibility".into(),
        rows: vec![v1::WriteRow {
            entity_key: key.into(),
            features: [("n".to_owned(), v1::Value { kind: Some(Kind::Int64Value(n)) })].into(),
            event_time: Some(strata_proto::prost_types::Timestamp { seconds, nanos: 0 }),
            join_keys: Default::default(),
        }],
    };
    let get = |key: &str| v1::GetFeaturesRequest {
        feature_view: "bench_visibility".into(),
        entity_keys: vec![key.into()],
        features: vec![],
    };
    let n_of = |rows: &[v1::FeatureRow]| match rows.first().and_then(|r| r.values.first()).and_then(|v| v.kind.as_ref())
    {
        Some(Kind::Int64Value(n)) => Some(*n),
        _ => None,
    };
    let mut histogram = Histogram::new(3)?;
    let mut heard = Histogram::new(3)?;
    let mut applied = b.invalidations().applied();
    let mut polls = 0u64;
    for i in 0..rounds {
        let key = format!("vis:{}", i % 100);
        let round = i as i64 + 1;
        // B holds the current value in L1 (the first read may fill it).
        cb.get_features(get(&key)).await?;
        cb.get_features(get(&key)).await?;
        let before = *applied.borrow_and_update();
        ca.write_features(write(&key, round, round)).await?;
        let acked = Instant::now();
        let heard_at = async {
            applied.wait_for(|n| *n > before).await?;
            anyhow::Ok(acked.elapsed())
        };
        let served_at = async {
            loop {
                polls += 1;
                let rows = cb.get_features(get(&key)).await?.into_inner().rows;
                if n_of(&rows) == Some(round) {
                    return anyhow::Ok(acked.elapsed());
                }
                ensure!(acked.elapsed() < Duration::from_secs(5), "B never served write {round}");
            }
        };
        let (heard_at, served_at) = tokio::join!(heard_at, served_at);
        heard.record(heard_at?.as_micros() as u64)?;
        histogram.record(served_at?.as_micros() as u64)?;
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok((histogram, heard, polls))
}

fn main() -> Result<()> {
    let rows: usize = std::env::var("STRATA_BENCH_ROWS").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let writes: usize = std::env::var("STRATA_BENCH_WRITES").ok().and_then(|s| s.parse().ok()).unwrap_or(1_000);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let bench = Bench::start().await?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("bulk.csv");
        {
            let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
            writeln!(out, "entity_key,event_time,age,score,country,premium,embedding")?;
            for i in 0..rows {
                let (age, score, country, premium, emb) = cells(i);
                let emb: Vec<String> = emb.iter().map(f32::to_string).collect();
                writeln!(out, "{},1767225600,{age},{score},{country},{premium},\"[{}]\"", key(i), emb.join(","))?;
            }
        }
        let file_mb = std::fs::metadata(&path)?.len() as f64 / 1e6;

        // Floor first, then Strata, then the floor again: drift of the
        // shared machine favours neither.
        let floor_1 = raw_copy(&bench, rows).await?;
        let config = Arc::new(bench.config(VIEWS)?.validate()?);
        let options = LoadOptions {
            batch_rows: BATCH_ROWS,
            concurrency: CONCURRENCY,
            ..LoadOptions::new("bench_bulk", path.clone(), Format::Csv)
        };
        let load = strata_server::load::run(&config, &options).await?;
        ensure!(load.written == rows as u64 && load.failed == 0 && load.rejected.is_empty(), "{load:?}");
        // The same file again: every row has the stored event time, so
        // every row is merged again (the re-run after a crash).
        let reload = strata_server::load::run(&config, &options).await?;
        let floor_2 = raw_copy(&bench, rows).await?;
        let floor = (floor_1 + floor_2) / 2;
        let rate = |d: Duration| rows as f64 / d.as_secs_f64();

        let pubsub = raw_pubsub(&bench, writes).await?;
        let (visible, heard, polls) = visibility(&bench, writes).await?;
        bench.stop().await;

        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        println!();
        println!("writes: server, loader, Redis and PostgreSQL share this machine ({cores} cores); 2 shards, 3 Redis primaries");
        println!("bulk load of {rows} rows ({file_mb:.0} MB CSV, 5 features incl. a 16-float embedding), batches of {BATCH_ROWS}, {CONCURRENCY} in flight per shard:");
        println!("{:<40} {:>10} {:>12}", "", "seconds", "rows/s");
        println!("{:<40} {:>10.1} {:>12.0}", "floor: raw binary COPY, rows in memory", floor.as_secs_f64(), rate(floor));
        println!("{:<40} {:>10.1} {:>12.0}", "strata load (new rows)", load.elapsed.as_secs_f64(), load.rows_per_second());
        println!("{:<40} {:>10.1} {:>12.0}", "strata load again (same rows)", reload.elapsed.as_secs_f64(), reload.rows_per_second());
        println!("ratio strata load / floor: {:.2}", load.rows_per_second() / rate(floor));
        println!(
            "strata load, where the time went (batches overlap): parsing {:.1?}, postgres COPY+merge {:.1?} summed, redis guards+announcements {:.1?} summed",
            load.parse_time, load.postgres_time, load.cache_time
        );
        println!();
        println!("write-to-visibility over {writes} writes (A acknowledges -> B answers the new value):");
        println!("{:<40} {:>8} {:>8} {:>8} {:>8}", "", "p50us", "p99us", "p999us", "maxus");
        for (name, h) in [
            ("floor: redis SPUBLISH sent -> subscriber", &pubsub),
            ("strata: ack on A -> B heard it", &heard),
            ("strata: ack on A -> B serves it", &visible),
        ] {
            println!("{:<40} {:>8} {:>8} {:>8} {:>8}", name, us(h, 0.5), us(h, 0.99), us(h, 0.999), h.max());
        }
        println!("B was asked {:.2} times per write on average", polls as f64 / writes as f64);

        let json = serde_json::json!({
            "benchmark": "writes",
            "cores": cores,
            "bulk_load": {
                "rows": rows, "batch_rows": BATCH_ROWS, "concurrency_per_shard": CONCURRENCY,
                "floor_raw_copy_rows_per_second": rate(floor),
                "strata_load_rows_per_second": load.rows_per_second(),
                "strata_reload_rows_per_second": reload.rows_per_second(),
                "ratio_to_floor": load.rows_per_second() / rate(floor),
                "parse_seconds": load.parse_time.as_secs_f64(),
                "postgres_seconds_summed": load.postgres_time.as_secs_f64(),
                "redis_seconds_summed": load.cache_time.as_secs_f64(),
            },
            "visibility": {
                "writes": writes,
                "floor_pubsub_us": {"p50": us(&pubsub, 0.5), "p99": us(&pubsub, 0.99), "p999": us(&pubsub, 0.999)},
                "strata_heard_us": {"p50": us(&heard, 0.5), "p99": us(&heard, 0.99), "p999": us(&heard, 0.999), "max": heard.max()},
                "strata_us": {"p50": us(&visible, 0.5), "p99": us(&visible, 0.99), "p999": us(&visible, 0.999), "max": visible.max()},
            },
        });
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-writes.json");
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", out.display());
        anyhow::Ok(())
    })
}

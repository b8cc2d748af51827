//! The stampede benchmark: many concurrent clients on a few hot keys with a
//! short TTL, with the stampede protections on and then off, in one run.
//!
//! Reports, per mode: throughput; latency p50/p99/p999; p99 of requests
//! sent inside an expiry window (the first 100 ms after each multiple of
//! the L1 TTL since warm-up, where entries filled together expire
//! together) versus outside; and PostgreSQL lookups per key per L2 TTL
//! period, counted by pg_stat_statements.
//!
//! `cargo bench -p strata-benches --bench stampede`; `STRATA_BENCH_SECS`
//! sets the duration of each mode (default 12), run in two halves ordered
//! on, off, off, on. Writes
//! `target/bench-stampede.json`.

use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use strata_benches::Bench;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_proto::v1::{self, value::Kind};

const KEYS: usize = 10;
const CLIENTS: usize = 64;
const SERVERS: usize = 2;
const L1_TTL: Duration = Duration::from_secs(1);
const L2_TTL: Duration = Duration::from_secs(2);
const WINDOW: Duration = Duration::from_millis(100);

fn views(name: &str) -> String {
    format!(
        r#"
[[views]]
name = "{name}"
l1_ttl = "{l1}ms"
l2_ttl = "{l2}ms"
jitter = 0.1
refresh_ahead = 0.8
features = [{{ name = "n", type = "int64" }}, {{ name = "emb", type = "float_list" }}]
"#,
        l1 = L1_TTL.as_millis(),
        l2 = L2_TTL.as_millis()
    )
}

struct Report {
    mode: &'static str,
    requests: u64,
    seconds: f64,
    all: Histogram<u64>,
    inside: Histogram<u64>,
    outside: Histogram<u64>,
    by_source: [u64; 4],
    errors: u64,
    lookups: u64,
}

impl Report {
    /// Adds another run of the same mode.
    fn merge(mut self, other: Report) -> Result<Report> {
        self.requests += other.requests;
        self.seconds += other.seconds;
        self.all.add(&other.all)?;
        self.inside.add(&other.inside)?;
        self.outside.add(&other.outside)?;
        for (a, b) in self.by_source.iter_mut().zip(other.by_source) {
            *a += b;
        }
        self.errors += other.errors;
        self.lookups += other.lookups;
        Ok(self)
    }

    fn lookups_per_key_per_period(&self) -> f64 {
        self.lookups as f64 / KEYS as f64 / (self.seconds / L2_TTL.as_secs_f64())
    }
}

fn us(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() { 0 } else { h.value_at_quantile(q) }
}

async fn run_mode(
    bench: &Bench,
    mode: &'static str,
    protection: bool,
    round: usize,
    duration: Duration,
) -> Result<Report> {
    let view = format!("stampede_{mode}_{round}");
    let extra = views(&view);
    let mut servers = Vec::new();
    for _ in 0..SERVERS {
        servers.push(bench.server(&extra, |c| c.stampede.enabled = protection).await?);
    }
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(FeatureStoreClient::connect(format!("http://{}", server.grpc_addr())).await?);
    }
    let keys: Vec<String> = (0..KEYS).map(|i| format!("hot:{i}")).collect();
    let rows = keys
        .iter()
        .map(|k| v1::WriteRow {
            entity_key: k.clone(),
            features: [
                ("n".to_owned(), v1::Value { kind: Some(Kind::Int64Value(1)) }),
                (
                    "emb".to_owned(),
                    v1::Value { kind: Some(Kind::FloatListValue(v1::FloatList { values: vec![0.5; 16] })) },
                ),
            ]
            .into(),
            event_time: Some(strata_proto::prost_types::Timestamp { seconds: 1, nanos: 0 }),
            join_keys: Default::default(),
        })
        .collect();
    clients[0].clone().write_features(v1::WriteFeaturesRequest { feature_view: view.clone(), rows }).await?;
    // Warm every instance with every key, at once, as a deploy would.
    for client in &clients {
        client
            .clone()
            .get_features(v1::GetFeaturesRequest {
                feature_view: view.clone(),
                entity_keys: keys.clone(),
                features: vec![],
            })
            .await?;
    }
    let before = bench.postgres_reads(&view).await?;
    let warm = Instant::now();
    let deadline = warm + duration;

    let tasks: Vec<_> = (0..CLIENTS)
        .map(|t| {
            let mut client = clients[t % clients.len()].clone();
            let view = view.clone();
            let keys = keys.clone();
            tokio::spawn(async move {
                let mut samples = Vec::new();
                let mut errors = 0u64;
                let mut i = t;
                while Instant::now() < deadline {
                    let key = keys[i % keys.len()].clone();
                    i += 1;
                    let sent = Instant::now();
                    let request =
                        v1::GetFeaturesRequest { feature_view: view.clone(), entity_keys: vec![key], features: vec![] };
                    match client.get_features(request).await {
                        Ok(r) => samples.push((sent, sent.elapsed(), r.into_inner().rows[0].source)),
                        Err(_) => errors += 1,
                    }
                }
                (samples, errors)
            })
        })
        .collect();
    let mut report = Report {
        mode,
        requests: 0,
        seconds: duration.as_secs_f64(),
        all: Histogram::new(3)?,
        inside: Histogram::new(3)?,
        outside: Histogram::new(3)?,
        by_source: [0; 4],
        errors: 0,
        lookups: 0,
    };
    for task in tasks {
        let (samples, errors) = task.await?;
        report.errors += errors;
        for (sent, latency, source) in samples {
            let micros = latency.as_micros() as u64;
            report.all.record(micros)?;
            let since = sent.duration_since(warm);
            let in_window = since >= L1_TTL && (since.as_nanos() % L1_TTL.as_nanos()) < WINDOW.as_nanos();
            if in_window {
                report.inside.record(micros)?
            } else {
                report.outside.record(micros)?
            }
            report.by_source[usize::try_from(source).unwrap_or(0).min(3)] += 1;
            report.requests += 1;
        }
    }
    report.lookups = bench.postgres_reads(&view).await? - before;
    for server in servers {
        server.shutdown().await;
    }
    Ok(report)
}

fn main() -> Result<()> {
    let secs: u64 = std::env::var("STRATA_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let bench = Bench::start().await?;
        // Each mode runs in two halves, in the order on, off, off, on, so
        // that drift of the shared machine during the run favours neither.
        let half = Duration::from_secs(secs) / 2;
        let on_1 = run_mode(&bench, "protected", true, 1, half).await?;
        let off_1 = run_mode(&bench, "unprotected", false, 1, half).await?;
        let off = off_1.merge(run_mode(&bench, "unprotected", false, 2, half).await?)?;
        let on = on_1.merge(run_mode(&bench, "protected", true, 2, half).await?)?;
        bench.stop().await;

        println!();
        println!(
            "stampede: {KEYS} hot keys, {CLIENTS} closed-loop clients over {SERVERS} instances, L1 TTL {L1_TTL:?}, L2 TTL {L2_TTL:?}, {secs}s per mode"
        );
        println!("server, clients, Redis and PostgreSQL share this machine ({} cores)", std::thread::available_parallelism().map_or(0, |n| n.get()));
        println!(
            "{:<12} {:>9} {:>8} {:>7} {:>7} {:>7} {:>12} {:>12} {:>6} {:>6} {:>6} {:>6} {:>9} {:>15}",
            "mode", "requests", "req/s", "p50us", "p99us", "p999us", "p99in-win", "p99out-win", "L1", "L2", "L3", "errors", "pg", "pg/key/L2-TTL"
        );
        for r in [&on, &off] {
            println!(
                "{:<12} {:>9} {:>8.0} {:>7} {:>7} {:>7} {:>12} {:>12} {:>6} {:>6} {:>6} {:>6} {:>9} {:>15.2}",
                r.mode,
                r.requests,
                r.requests as f64 / r.seconds,
                us(&r.all, 0.5),
                us(&r.all, 0.99),
                us(&r.all, 0.999),
                us(&r.inside, 0.99),
                us(&r.outside, 0.99),
                r.by_source[1],
                r.by_source[2],
                r.by_source[3],
                r.errors,
                r.lookups,
                r.lookups_per_key_per_period()
            );
        }
        println!(
            "ratios (protected / unprotected): postgres lookups {:.3}, p99 inside expiry windows {:.2}, throughput {:.2}",
            on.lookups as f64 / off.lookups.max(1) as f64,
            us(&on.inside, 0.99) as f64 / us(&off.inside, 0.99).max(1) as f64,
            on.requests as f64 / off.requests.max(1) as f64
        );
        let modes: Vec<serde_json::Value> = [&on, &off].iter().map(|r| serde_json::json!({
                "mode": r.mode, "requests": r.requests, "requests_per_second": r.requests as f64 / r.seconds,
                "p50_us": us(&r.all, 0.5), "p99_us": us(&r.all, 0.99), "p999_us": us(&r.all, 0.999),
                "p99_inside_expiry_windows_us": us(&r.inside, 0.99), "p99_outside_expiry_windows_us": us(&r.outside, 0.99),
                "served_by": {"l1": r.by_source[1], "l2": r.by_source[2], "l3": r.by_source[3]},
                "errors": r.errors, "postgres_lookups": r.lookups,
                "postgres_lookups_per_key_per_l2_ttl": r.lookups_per_key_per_period(),
            })).collect();
        let json = serde_json::json!({
            "benchmark": "stampede",
            "keys": KEYS, "clients": CLIENTS, "servers": SERVERS,
            "l1_ttl_ms": L1_TTL.as_millis() as u64, "l2_ttl_ms": L2_TTL.as_millis() as u64, "seconds_per_mode": secs,
            "modes": modes,
        });
        let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-stampede.json");
        std::fs::write(&out, serde_json::to_string_pretty(&json)?)?;
        println!("wrote {}", out.display());
        anyhow::Ok(())
    })
}

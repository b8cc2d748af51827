//! `strata warm`: preloads keys of a feature view from PostgreSQL into
//! Redis, so a cold deploy (or a flushed cluster) does not start with a wall
//! of misses. Keys come from the command line, a file, or the servers' own
//! sample of the most-read keys (`--top N`). An entry newer than what was
//! read stays: warming goes through the same compare-on-event-time step as
//! every other cache fill.

use std::io::BufRead as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use strata_cache_tiers::{L1Cache, L2Cache};
use strata_shard_router::ShardRouter;

use crate::config::Config;
use strata_engine::{HotKeys, Tiers};

/// Keys warmed per round trip.
const CHUNK: usize = 1_000;

#[derive(Clone, Debug)]
pub struct WarmOptions {
    pub view: String,
    pub keys: Vec<String>,
    /// Also warm this many of the most-read keys.
    pub top: Option<usize>,
}

#[derive(Debug, Default)]
pub struct WarmReport {
    pub found: usize,
    pub missing: usize,
    /// Keys whose shard could not be read.
    pub unavailable: usize,
    pub elapsed: Duration,
}

/// Reads keys from a file, one per line (`-`: standard input); blank lines
/// are skipped.
pub fn read_keys(path: &Path) -> Result<Vec<String>> {
    let reader: Box<dyn std::io::BufRead> = if path == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        Box::new(std::io::BufReader::new(file))
    };
    let mut keys = Vec::new();
    for line in reader.lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let key = line.trim_end_matches('\r');
        if !key.is_empty() {
            keys.push(key.to_owned());
        }
    }
    Ok(keys)
}

/// Warms keys as configured.
pub async fn run(config: &Config, options: &WarmOptions) -> Result<WarmReport> {
    let (tiers, l2) = tiers(config).await?;
    let report = warm(&tiers, config, options).await;
    l2.close().await;
    report
}

/// Tiers for warming: the configured shards and Redis, a small L1 and no
/// sampling. Close the Redis client when done.
pub async fn tiers(config: &Config) -> Result<(Tiers, L2Cache)> {
    let shards = ShardRouter::new(&config.shards, &config.pool)?;
    shards.refresh_map(config.pool.connect_timeout).await.context("cannot read the shard map")?;
    let l2 = L2Cache::connect_now(&config.redis).await.context("cannot connect to the redis cluster")?;
    let tiers = Tiers::new(
        L1Cache::new(1 << 20),
        l2.clone(),
        shards,
        config.protection.clone(),
        config.writes.clone(),
        HotKeys { sample_rate: 0.0, keep: 0 },
    );
    Ok((tiers, l2))
}

/// Warms keys through existing tiers.
pub async fn warm(tiers: &Tiers, config: &Config, options: &WarmOptions) -> Result<WarmReport> {
    let started = Instant::now();
    let view = config.registry.get(&options.view).with_context(|| format!("unknown view {:?}", options.view))?;
    let mut keys = options.keys.clone();
    if let Some(n) = options.top {
        keys.extend(tiers.l2().top_keys(&view.name, n).await.context("cannot read the most-read keys")?);
    }
    let mut seen = std::collections::HashSet::new();
    keys.retain(|k| seen.insert(k.clone()));
    let mut report = WarmReport::default();
    for chunk in keys.chunks(CHUNK) {
        let chunk: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let (found, missing, unavailable) = tiers.warm(view, &chunk).await;
        report.found += found;
        report.missing += missing;
        report.unavailable += unavailable;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

pub fn print_report(report: &WarmReport) {
    println!(
        "warmed {} keys into redis in {:.1?}: {} found, {} do not exist, {} unavailable",
        report.found + report.missing + report.unavailable,
        report.elapsed,
        report.found,
        report.missing,
        report.unavailable
    );
}

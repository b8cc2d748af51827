//! Shared pieces of Strata's benchmarks: a local stack (the same one
//! `strata dev` and the tests start), servers on it, and PostgreSQL-side
//! query counts.
//!
//! Benchmarks report ratios between configurations measured in the same
//! run: the machine is shared and noisy, absolute numbers drift.

pub mod floor;
pub mod loadgen;

use std::path::PathBuf;

use anyhow::Result;
use strata_devstack::{PortPlan, Stack, StackOptions};
use strata_server::RunningServer;
use strata_server::config::FileConfig;

/// A running local stack in a temporary folder.
pub struct Bench {
    pub stack: Stack,
    _dir: tempfile::TempDir,
}

impl Bench {
    /// Starts the stack (pg_stat_statements enabled on every shard).
    pub async fn start() -> Result<Bench> {
        let dir = tempfile::Builder::new().prefix("strata-bench-").tempdir()?;
        let stack = Stack::start(StackOptions {
            data_dir: dir.path().join("stack"),
            ports: PortPlan::Ephemeral,
            shards: 2,
            replicas: false,
            security: None,
        })
        .await?;
        Ok(Bench { stack, _dir: dir })
    }

    /// The shipped configuration plus `extra_toml`, on this stack, on free
    /// ports.
    pub fn config(&self, extra_toml: &str) -> Result<FileConfig> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let shipped = std::fs::read_to_string(root.join("config/strata.toml"))?;
        let mut file = FileConfig::from_toml(&format!("{shipped}\n{extra_toml}"))?;
        strata_server::dev::use_stack(&mut file, &self.stack);
        file.server.grpc_addr = "127.0.0.1:0".into();
        file.server.metrics_addr = "127.0.0.1:0".into();
        file.server.feast_http_addr = "127.0.0.1:0".into();
        Ok(file)
    }

    /// A server with [`Bench::config`], changed by `change`.
    pub async fn server(&self, extra_toml: &str, change: impl FnOnce(&mut FileConfig)) -> Result<RunningServer> {
        let mut file = self.config(extra_toml)?;
        change(&mut file);
        RunningServer::start(file.validate()?).await
    }

    /// Executions of Strata's batch read of `view` on all shards.
    pub async fn postgres_reads(&self, view: &str) -> Result<u64> {
        strata_tests::postgres_reads(&self.stack.shard_urls(), view).await
    }

    pub async fn stop(self) {
        self.stack.stop().await;
    }
}

/// The benchmarks' row shape: ten features, `f0`..`f4` int64 and `f5`..`f9`
/// double, with values derived from `i`, written at a fixed event time.
pub fn ten_feature_row(i: usize) -> strata_core::Row {
    use strata_core::Value;
    let values = (0..10)
        .map(|f| if f < 5 { Value::Int64((i * 10 + f) as i64) } else { Value::Double(i as f64 + f as f64 / 10.0) })
        .collect();
    strata_core::Row { event_time: strata_core::EventTime(1_700_000_000_000_000), values }
}

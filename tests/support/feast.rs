//! Feast's own SDK (the pinned feast package in `.feast-venv`, installed by
//! `scripts/install-deps`) on a copy of `tests/feast/repo`: used by
//! `tests/feast.rs` and by the Feast benchmark (`strata-feast-bench`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, ensure};
use serde_json::Value as Json;

use crate::repo_root;

/// The pinned Feast SDK's Python.
pub fn feast_python() -> Result<PathBuf> {
    let python = repo_root().join(".feast-venv/bin/python");
    ensure!(python.is_file(), "{} not found: scripts/install-deps installs the Feast SDK", python.display());
    Ok(python)
}

/// The pinned Feast CLI.
pub fn feast_cli() -> Result<PathBuf> {
    Ok(feast_python()?.with_file_name("feast"))
}

/// A Feast repo (tests/feast/repo) in a folder of its own, applied.
pub struct FeastRepo {
    dir: tempfile::TempDir,
}

impl FeastRepo {
    /// `online_store` is the YAML of feature_store.yaml's online_store.
    pub async fn apply(online_store: &str) -> Result<FeastRepo> {
        let dir = tempfile::tempdir()?;
        std::fs::create_dir(dir.path().join("data"))?;
        std::fs::copy(repo_root().join("tests/feast/repo/features.py"), dir.path().join("features.py"))?;
        std::fs::write(
            dir.path().join("feature_store.yaml"),
            format!(
                "project: strata_test\nregistry: data/registry.db\nprovider: local\nonline_store:\n{online_store}\n\
                 offline_store:\n  type: file\nentity_key_serialization_version: 3\n"
            ),
        )?;
        let out = tokio::process::Command::new(feast_cli()?)
            .arg("-c")
            .arg(dir.path())
            .arg("apply")
            .output()
            .await
            .context("feast apply")?;
        ensure!(out.status.success(), "feast apply failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(FeastRepo { dir })
    }

    /// A repo whose online store is Strata's Feast API at `addr`.
    pub async fn on_strata(addr: std::net::SocketAddr) -> Result<FeastRepo> {
        FeastRepo::apply(&format!("  type: remote\n  path: http://{addr}")).await
    }

    /// A repo on Feast's own Redis online store, on the Redis Cluster of
    /// `nodes` (its keys do not meet Strata's).
    pub async fn on_redis(nodes: &[String]) -> Result<FeastRepo> {
        FeastRepo::apply(&format!(
            "  type: redis\n  redis_type: redis_cluster\n  connection_string: \"{}\"",
            nodes.join(",")
        ))
        .await
    }

    /// The repo's folder.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Runs SDK steps (see tests/feast/sdk.py) in one process.
    pub async fn run(&self, steps: Json) -> Result<Vec<Json>> {
        let out = tokio::process::Command::new(feast_python()?)
            .arg(repo_root().join("tests/feast/sdk.py"))
            .arg(self.dir.path())
            .arg(steps.to_string())
            .output()
            .await
            .context("python")?;
        ensure!(out.status.success(), "sdk.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let results: Vec<Json> = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("sdk.py printed {}", String::from_utf8_lossy(&out.stdout)))?;
        Ok(results)
    }
}

/// `seconds` ago as naive UTC ISO 8601, as Feast's data frames carry times.
pub fn ago(seconds: u64) -> String {
    let at = SystemTime::now() - Duration::from_secs(seconds);
    let unix = at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or_default();
    chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default().format("%Y-%m-%dT%H:%M:%S").to_string()
}

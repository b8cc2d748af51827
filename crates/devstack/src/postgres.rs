//! PostgreSQL shards: one `initdb` cluster and server process each.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use crate::process::{Managed, output, output_with, wait_until, which};
use crate::{Security, ShardInfo};

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The folder holding PostgreSQL's programs: `$STRATA_PG_BIN`, else the
/// newest `/usr/lib/postgresql/*/bin` (Debian's layout), else the PATH.
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("STRATA_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    which("initdb")
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .context("PostgreSQL server programs not found (apt-get install postgresql, or set STRATA_PG_BIN)")
}

/// PostgreSQL refuses to run as root. When we are root, it runs as the
/// `postgres` user that Debian's package creates.
fn run_as() -> Result<Option<(Uid, Gid)>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let user = User::from_name("postgres")?.context(
        "running as root needs a 'postgres' user to run PostgreSQL as (apt-get install postgresql creates it)",
    )?;
    Ok(Some((user.uid, user.gid)))
}

/// Whether every folder from `/` to `dir` lets other users through.
fn reachable_by_others(dir: &Path) -> bool {
    dir.ancestors().all(|d| std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0))
}

pub(crate) async fn start_shards(
    data_dir: &Path,
    ports: &[u16],
    security: Option<&Security>,
) -> Result<Vec<(ShardInfo, Managed)>> {
    let bin = bin_dir()?;
    let user = run_as()?;
    let runs = ports.iter().enumerate().map(|(i, &port)| start_shard(&bin, user, data_dir, i, port, security));
    futures::future::try_join_all(runs).await
}

async fn start_shard(
    bin: &Path,
    user: Option<(Uid, Gid)>,
    data_dir: &Path,
    index: usize,
    port: u16,
    security: Option<&Security>,
) -> Result<(ShardInfo, Managed)> {
    let name = format!("shard-{index}");
    let mut dir = data_dir.join(format!("postgres-{index}"));
    if user.is_some() && !reachable_by_others(data_dir) {
        // The postgres user cannot reach the data folder (under /root, say):
        // keep this shard's files in the temp folder, linked from the data
        // folder so they are still found there.
        let outside = std::env::temp_dir()
            .join(format!("strata-{}-postgres-{index}", path_tag(data_dir.to_string_lossy().as_bytes())));
        if outside.exists() {
            std::fs::remove_dir_all(&outside)?;
        }
        std::fs::create_dir_all(&outside)?;
        std::os::unix::fs::symlink(&outside, &dir)?;
        dir = outside;
    } else {
        std::fs::create_dir_all(&dir)?;
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&dir, Some(uid.as_raw()), Some(gid.as_raw()))?;
    }
    let pgdata = dir.join("data");
    let dir_str = dir.to_str().context("data folder path is not UTF-8")?;
    let pgdata_str = pgdata.to_str().context("data folder path is not UTF-8")?;

    // Files the server reads must be its own: the password for initdb,
    // and the certificate and key (which must not be readable by others).
    let own = |path: &Path, mode: u32| -> Result<()> {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(path, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        Ok(())
    };
    let mut initdb = Command::new(bin.join("initdb"));
    initdb.args(["-D", pgdata_str, "-U", "strata", "-E", "UTF8", "--locale=C", "--no-sync"]);
    let mut tls_files = None;
    match security {
        None => {
            initdb.arg("--auth=trust");
        }
        Some(security) => {
            let pwfile = dir.join("password");
            std::fs::write(&pwfile, &security.password)?;
            own(&pwfile, 0o600)?;
            initdb.arg("--auth=scram-sha-256").arg(format!("--pwfile={}", pwfile.display()));
            let (cert, key) = (dir.join("server.crt"), dir.join("server.key"));
            std::fs::copy(&security.cert_file, &cert)?;
            std::fs::copy(&security.key_file, &key)?;
            own(&cert, 0o600)?;
            own(&key, 0o600)?;
            tls_files = Some((cert, key));
        }
    }
    if let Some((uid, gid)) = user {
        initdb.uid(uid.as_raw()).gid(gid.as_raw());
    }
    let out = initdb.output().await.context("cannot run initdb")?;
    if !out.status.success() {
        bail!("initdb for {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    if tls_files.is_some() {
        // TCP connections without TLS are refused before any password.
        let hba = pgdata.join("pg_hba.conf");
        let rules = std::fs::read_to_string(&hba)?;
        std::fs::write(&hba, format!("hostnossl all all 0.0.0.0/0 reject\nhostnossl all all ::/0 reject\n{rules}"))?;
    }

    let mut args: Vec<String> =
        ["-D", pgdata_str, "-p", &port.to_string(), "-k", dir_str].into_iter().map(str::to_owned).collect();
    // A local development and test stack: durability is traded for speed.
    for setting in [
        "listen_addresses=127.0.0.1",
        "fsync=off",
        "synchronous_commit=off",
        "full_page_writes=off",
        "max_connections=200",
        "shared_buffers=128MB",
        "shared_preload_libraries=pg_stat_statements",
    ] {
        args.extend(["-c".to_owned(), setting.to_owned()]);
    }
    if let Some((cert, key)) = &tls_files {
        for setting in [
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", cert.display()),
            format!("ssl_key_file={}", key.display()),
        ] {
            args.extend(["-c".to_owned(), setting]);
        }
    }
    let program = bin.join("postgres");
    let recipe = Box::new(move || {
        let mut server = Command::new(&program);
        server.args(&args);
        if let Some((uid, gid)) = user {
            server.uid(uid.as_raw()).gid(gid.as_raw());
        }
        server
    });
    let log = data_dir.join(format!("postgres-{index}.log"));
    let mut process = Managed::spawn(&format!("postgres {name} on port {port}"), recipe, &log, Signal::SIGINT)?;

    let isready = bin.join("pg_isready");
    let port_arg = port.to_string();
    wait_until(&format!("postgres {name} on port {port}"), READY_TIMEOUT, || {
        let running = process.check_running(&log);
        let isready = isready.clone();
        let port_arg = port_arg.clone();
        async move {
            running?;
            Ok(output(&isready, &["-h", "127.0.0.1", "-p", &port_arg, "-U", "strata", "-d", "postgres"]).await.is_ok())
        }
    })
    .await?;
    let password = security.map(|s| s.password.clone()).unwrap_or_default();
    let env: Vec<(&str, &str)> =
        if security.is_some() { vec![("PGPASSWORD", &password), ("PGSSLMODE", "require")] } else { Vec::new() };
    output_with(&bin.join("createdb"), &["-h", "127.0.0.1", "-p", &port_arg, "-U", "strata", "strata"], &env).await?;
    // Query statistics, so tests and benchmarks can count lookups on the
    // PostgreSQL side.
    output_with(
        &bin.join("psql"),
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port_arg,
            "-U",
            "strata",
            "-d",
            "strata",
            "-qc",
            "CREATE EXTENSION pg_stat_statements",
        ],
        &env,
    )
    .await?;

    // With security, the password is the caller's to give (not in the URL).
    let tls = if security.is_some() { " sslmode=require" } else { "" };
    let url = format!("host=127.0.0.1 port={port} user=strata dbname=strata{tls}");
    let pid = process.pid();
    Ok((ShardInfo { name, url, port, data_dir: pgdata, pid }, process))
}

fn path_tag(bytes: &[u8]) -> String {
    // A short, stable tag for a path (FNV-1a); collisions only matter
    // between two stacks started as root from unreachable folders at once.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Waits until the shard on `port` accepts connections again (after a
/// restart).
pub(crate) async fn wait_ready(port: u16) -> Result<()> {
    let isready = bin_dir()?.join("pg_isready");
    let port_arg = port.to_string();
    wait_until(&format!("postgres on port {port}"), READY_TIMEOUT, || {
        let isready = isready.clone();
        let port_arg = port_arg.clone();
        async move {
            Ok(output(&isready, &["-h", "127.0.0.1", "-p", &port_arg, "-U", "strata", "-d", "postgres"]).await.is_ok())
        }
    })
    .await
}

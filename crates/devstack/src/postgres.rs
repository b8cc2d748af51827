//! PostgreSQL shards: one `initdb` cluster and server process each.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Uid, User};
use tokio::process::Command;

use crate::process::{Managed, output, output_with, wait_until, which};
use crate::{ReplicaInfo, Security, ShardInfo};

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

/// A shard's processes: its primary and, if asked for, one streaming
/// replica.
pub(crate) struct ShardProcesses {
    pub(crate) primary: Managed,
    pub(crate) replica: Option<Managed>,
}

/// Starts a primary on each of `ports` and, where `replica_ports` names
/// one, a streaming replica of it there.
pub(crate) async fn start_shards(
    data_dir: &Path,
    ports: &[u16],
    replica_ports: &[u16],
    security: Option<&Security>,
) -> Result<Vec<(ShardInfo, ShardProcesses)>> {
    let bin = bin_dir()?;
    let user = run_as()?;
    let runs = ports.iter().enumerate().map(|(i, &port)| {
        let bin = &bin;
        let replica_port = replica_ports.get(i).copied();
        async move {
            let (mut info, primary) = start_shard(bin, user, data_dir, i, port, replica_port, security).await?;
            let mut replica = None;
            if let Some(replica_port) = replica_port {
                let (replica_info, process) = start_replica(bin, user, data_dir, &info, replica_port, security).await?;
                info.replica = Some(replica_info);
                replica = Some(process);
            }
            Ok::<_, anyhow::Error>((info, ShardProcesses { primary, replica }))
        }
    });
    futures::future::try_join_all(runs).await
}

/// A folder for one PostgreSQL server's files, owned by the user it runs
/// as (see [`run_as`]).
fn server_dir(data_dir: &Path, name: &str, user: Option<(Uid, Gid)>) -> Result<PathBuf> {
    let mut dir = data_dir.join(name);
    if user.is_some() && !reachable_by_others(data_dir) {
        // The postgres user cannot reach the data folder (under /root, say):
        // keep this server's files in the temp folder, linked from the data
        // folder so they are still found there.
        let outside =
            std::env::temp_dir().join(format!("strata-{}-{name}", path_tag(data_dir.to_string_lossy().as_bytes())));
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
    Ok(dir)
}

async fn start_shard(
    bin: &Path,
    user: Option<(Uid, Gid)>,
    data_dir: &Path,
    index: usize,
    port: u16,
    replica_port: Option<u16>,
    security: Option<&Security>,
) -> Result<(ShardInfo, Managed)> {
    let name = format!("shard-{index}");
    let dir = server_dir(data_dir, &format!("postgres-{index}"), user)?;
    let pgdata = dir.join("data");
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

    let tls_settings = tls_files.iter().flat_map(|(cert, key)| {
        ["ssl=on".to_owned(), format!("ssl_cert_file={}", cert.display()), format!("ssl_key_file={}", key.display())]
    });
    let settings: Vec<String> = tls_settings.collect();
    let log = data_dir.join(format!("postgres-{index}.log"));
    let what = format!("postgres {name} on port {port}");
    let process = spawn_server(bin, user, &pgdata, &dir, port, replica_port.is_some(), settings, &log, &what).await?;
    let port_arg = port.to_string();
    let password = security.map(|s| s.password.clone()).unwrap_or_default();
    let env = client_env(security, &password);
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
    // With a replica, the shard lists both hosts and asks for the one that
    // takes writes, so writes follow a promotion.
    let url = match replica_port {
        None => format!("host=127.0.0.1 port={port} user=strata dbname=strata{tls}"),
        Some(replica) => format!(
            "host=127.0.0.1,127.0.0.1 port={port},{replica} user=strata dbname=strata \
             target_session_attrs=read-write{tls}"
        ),
    };
    let pid = process.pid();
    Ok((ShardInfo { name, url, port, data_dir: pgdata, pid, replica: None }, process))
}

/// The environment psql and friends need to reach a server of the stack.
fn client_env<'a>(security: Option<&Security>, password: &'a str) -> Vec<(&'static str, &'a str)> {
    if security.is_some() { vec![("PGPASSWORD", password), ("PGSSLMODE", "require")] } else { Vec::new() }
}

/// Starts `postgres` on `pgdata` and waits until it accepts connections.
#[allow(clippy::too_many_arguments)]
async fn spawn_server(
    bin: &Path,
    user: Option<(Uid, Gid)>,
    pgdata: &Path,
    dir: &Path,
    port: u16,
    replicated: bool,
    extra: Vec<String>,
    log: &Path,
    what: &str,
) -> Result<Managed> {
    let pgdata_str = pgdata.to_str().context("data folder path is not UTF-8")?;
    let dir_str = dir.to_str().context("data folder path is not UTF-8")?;
    let mut args: Vec<String> =
        ["-D", pgdata_str, "-p", &port.to_string(), "-k", dir_str].into_iter().map(str::to_owned).collect();
    // A local development and test stack: durability is traded for speed,
    // except that a replicated shard acknowledges a commit only once its
    // replica has applied it (set after the replica is up), so that a
    // promotion loses nothing acknowledged.
    let settings = [
        "listen_addresses=127.0.0.1",
        "fsync=off",
        "full_page_writes=off",
        "max_connections=200",
        "shared_buffers=128MB",
        "shared_preload_libraries=pg_stat_statements",
    ];
    let unreplicated = (!replicated).then_some("synchronous_commit=off");
    for setting in settings.into_iter().chain(unreplicated).map(str::to_owned).chain(extra) {
        args.extend(["-c".to_owned(), setting]);
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
    let mut process = Managed::spawn(what, recipe, log, Signal::SIGINT)?;
    let isready = bin.join("pg_isready");
    let port_arg = port.to_string();
    wait_until(what, READY_TIMEOUT, || {
        let running = process.check_running(log);
        let isready = isready.clone();
        let port_arg = port_arg.clone();
        async move {
            running?;
            Ok(output(&isready, &["-h", "127.0.0.1", "-p", &port_arg, "-U", "strata", "-d", "postgres"]).await.is_ok())
        }
    })
    .await?;
    Ok(process)
}

/// Starts a streaming replica of `primary` on `port`: a base backup of
/// it (`pg_basebackup -R`), started as a hot standby. The primary then
/// waits for it on every commit (`synchronous_commit = remote_apply`), so
/// the replica holds every acknowledged write and reads from it see them.
async fn start_replica(
    bin: &Path,
    user: Option<(Uid, Gid)>,
    data_dir: &Path,
    primary: &ShardInfo,
    port: u16,
    security: Option<&Security>,
) -> Result<(ReplicaInfo, Managed)> {
    let index = primary.name.trim_start_matches("shard-");
    let dir = server_dir(data_dir, &format!("postgres-{index}-replica"), user)?;
    let pgdata = dir.join("data");
    let pgdata_str = pgdata.to_str().context("data folder path is not UTF-8")?;
    let password = security.map(|s| s.password.clone()).unwrap_or_default();
    let env = client_env(security, &password);
    let primary_port = primary.port.to_string();
    let mut backup = Command::new(bin.join("pg_basebackup"));
    backup
        .args(["-h", "127.0.0.1", "-p", &primary_port, "-U", "strata", "-D", pgdata_str])
        .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"])
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null());
    if let Some((uid, gid)) = user {
        backup.uid(uid.as_raw()).gid(gid.as_raw());
    }
    let out = backup.output().await.context("cannot run pg_basebackup")?;
    if !out.status.success() {
        bail!("pg_basebackup of {} failed: {}", primary.name, String::from_utf8_lossy(&out.stderr));
    }
    // The primary's TLS files, where it has them, serve the replica too.
    let tls = security.map(|_| {
        let primary_dir = primary.data_dir.parent().unwrap_or(Path::new("/"));
        vec![
            "ssl=on".to_owned(),
            format!("ssl_cert_file={}", primary_dir.join("server.crt").display()),
            format!("ssl_key_file={}", primary_dir.join("server.key").display()),
        ]
    });
    let log = data_dir.join(format!("postgres-{index}-replica.log"));
    let what = format!("postgres replica of {} on port {port}", primary.name);
    let process = spawn_server(bin, user, &pgdata, &dir, port, true, tls.unwrap_or_default(), &log, &what).await?;
    // From now on a commit on the primary waits until the replica applied it.
    let psql = bin.join("psql");
    let conn = ["-h", "127.0.0.1", "-p", &primary_port, "-U", "strata", "-d", "strata"];
    let settings = [
        "ALTER SYSTEM SET synchronous_standby_names = '*'",
        "ALTER SYSTEM SET synchronous_commit = 'remote_apply'",
        "SELECT pg_reload_conf()",
    ];
    for statement in settings {
        output_with(&psql, &[&conn[..], &["-qc", statement]].concat(), &env).await?;
    }
    let tls = if security.is_some() { " sslmode=require" } else { "" };
    let url = format!("host=127.0.0.1 port={port} user=strata dbname=strata{tls}");
    let pid = process.pid();
    Ok((ReplicaInfo { url, port, data_dir: pgdata, pid }, process))
}

/// Promotes the replica on `port` to a primary (as Patroni or an operator
/// would: `pg_promote()`), waiting until it takes writes.
pub(crate) async fn promote(port: u16, security: Option<&Security>) -> Result<()> {
    let psql = bin_dir()?.join("psql");
    let password = security.map(|s| s.password.clone()).unwrap_or_default();
    let env = client_env(security, &password);
    let port_arg = port.to_string();
    let args =
        ["-h", "127.0.0.1", "-p", &port_arg, "-U", "strata", "-d", "strata", "-qAtc", "SELECT pg_promote(true, 60)"];
    let promoted = output_with(&psql, &args, &env).await?;
    if promoted.trim() != "t" {
        bail!("the replica on port {port} was not promoted within 60 s");
    }
    Ok(())
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

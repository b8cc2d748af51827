//! A Redis Cluster of three primaries with one replica each.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokio::process::Command;

use crate::process::{Managed, output, wait_until, which};
use crate::{RedisNode, Security};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `redis-cli`, with TLS and the ACL user's credentials where the stack
/// has them.
#[derive(Clone)]
pub(crate) struct Cli {
    path: std::path::PathBuf,
    base: Vec<String>,
}

impl Cli {
    pub(crate) fn new(security: Option<&Security>) -> Result<Cli> {
        let path = which("redis-cli").context("redis-cli is not installed (apt-get install redis-tools)")?;
        let base = match security {
            None => Vec::new(),
            Some(s) => vec![
                "--tls".to_owned(),
                "--cacert".to_owned(),
                s.ca_file.display().to_string(),
                "--user".to_owned(),
                "strata".to_owned(),
                "--pass".to_owned(),
                s.password.clone(),
                "--no-auth-warning".to_owned(),
            ],
        };
        Ok(Cli { path, base })
    }

    async fn run(&self, args: &[&str]) -> Result<String> {
        let mut all: Vec<&str> = self.base.iter().map(String::as_str).collect();
        all.extend_from_slice(args);
        output(&self.path, &all).await
    }
}

pub(crate) async fn start_cluster(
    data_dir: &Path,
    ports: &[u16],
    cli: &Cli,
    security: Option<&Security>,
) -> Result<Vec<(RedisNode, Managed)>> {
    let server = which("redis-server").context("redis-server is not installed (apt-get install redis-server)")?;
    let mut nodes = Vec::with_capacity(ports.len());
    for &port in ports {
        let dir = data_dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir)?;
        let port_arg = port.to_string();
        // With TLS the node's one port is its TLS port, and the cluster bus
        // and replication use TLS too.
        let listen: Vec<String> = match security {
            None => vec!["--port".into(), port_arg.clone()],
            Some(s) => {
                let password = format!(">{}", s.password);
                [
                    "--port",
                    "0",
                    "--tls-port",
                    &port_arg,
                    "--tls-cluster",
                    "yes",
                    "--tls-replication",
                    "yes",
                    "--tls-auth-clients",
                    "no",
                    "--tls-cert-file",
                    &s.cert_file.display().to_string(),
                    "--tls-key-file",
                    &s.key_file.display().to_string(),
                    "--tls-ca-cert-file",
                    &s.ca_file.display().to_string(),
                    "--user",
                    "default",
                    "off",
                    "--user",
                    "strata",
                    "on",
                    &password,
                    "~*",
                    "&*",
                    "+@all",
                    "--masteruser",
                    "strata",
                    "--masterauth",
                    &s.password,
                ]
                .into_iter()
                .map(str::to_owned)
                .collect()
            }
        };
        let args: Vec<String> = listen
            .into_iter()
            .chain(
                [
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    dir.to_str().context("data folder path is not UTF-8")?,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    // A replica's first full sync starts at once instead of after
                    // the default 5 s; until it is done the replica cannot take
                    // over from its primary.
                    "--repl-diskless-sync-delay",
                    "0",
                ]
                .into_iter()
                .map(str::to_owned),
            )
            .collect();
        let server = server.clone();
        let recipe = Box::new(move || {
            let mut command = Command::new(&server);
            command.args(&args);
            command
        });
        let log = dir.join("redis.log");
        let process = Managed::spawn(&format!("redis-server on port {port}"), recipe, &log, Signal::SIGTERM)?;
        nodes.push((port, process, log));
    }
    for (port, process, log) in &mut nodes {
        let port_arg = port.to_string();
        wait_until(&format!("redis on port {port}"), READY_TIMEOUT, || {
            let ready = process.check_running(log).map(|()| {
                let cli = cli.clone();
                let port_arg = port_arg.clone();
                async move { Ok(cli.run(&["-p", &port_arg, "ping"]).await.is_ok_and(|o| o.trim() == "PONG")) }
            });
            async move { ready?.await }
        })
        .await?;
    }

    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut create: Vec<&str> = vec!["--cluster", "create"];
    create.extend(addresses.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "1", "--cluster-yes"]);
    cli.run(&create).await.context("cannot form the redis cluster")?;

    // `--cluster create` returns once the primaries agree on the slots;
    // wait until every node, replicas included, says the cluster is ok.
    for &port in ports {
        let port_arg = port.to_string();
        wait_until(&format!("cluster state ok on port {port}"), READY_TIMEOUT, || {
            let cli = cli.clone();
            let port_arg = port_arg.clone();
            async move {
                let info = cli.run(&["-p", &port_arg, "cluster", "info"]).await?;
                Ok(info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:6"))
            }
        })
        .await?;
    }
    // And until every replica holds its primary's data: a replica that has
    // not finished its first sync cannot be promoted, so a primary that dies
    // before then is not failed over.
    for &port in ports {
        let port_arg = port.to_string();
        wait_until(&format!("replication on port {port}"), READY_TIMEOUT, || {
            let cli = cli.clone();
            let port_arg = port_arg.clone();
            async move {
                let info = cli.run(&["-p", &port_arg, "info", "replication"]).await?;
                Ok(info.contains("role:master") || info.contains("master_link_status:up"))
            }
        })
        .await?;
    }

    let mut started = Vec::with_capacity(nodes.len());
    for (port, process, _) in nodes {
        let role = cli.run(&["-p", &port.to_string(), "role"]).await?;
        let role = match role.lines().next().map(str::trim) {
            Some("master") => "master",
            Some("slave") => "replica",
            other => bail!("redis on port {port} reports an unknown role {other:?}"),
        };
        let pid = process.pid();
        started.push((RedisNode { host: "127.0.0.1".into(), port, role: role.into(), pid }, process));
    }
    Ok(started)
}

/// Waits until the node on `port` answers PING again (after a restart).
pub(crate) async fn wait_ready(cli: &Cli, port: u16) -> Result<()> {
    let port_arg = port.to_string();
    wait_until(&format!("redis on port {port}"), READY_TIMEOUT, || {
        let cli = cli.clone();
        let port_arg = port_arg.clone();
        async move { Ok(cli.run(&["-p", &port_arg, "ping"]).await.is_ok_and(|o| o.trim() == "PONG")) }
    })
    .await
}

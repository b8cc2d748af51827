use std::net::TcpListener;

use anyhow::{Result, bail};
use rand::Rng;

/// Which ports the stack listens on.
#[derive(Clone, Copy, Debug)]
pub enum PortPlan {
    /// Consecutive ports from fixed bases, for a demo users can remember:
    /// Redis on `redis..redis+6`, PostgreSQL on `postgres..postgres+shards`
    /// (replicas, if any, on the next `shards` ports).
    Fixed { redis: u16, postgres: u16 },
    /// Free ports picked at random, for tests that may run side by side.
    Ephemeral,
}

/// Redis Cluster nodes also listen on their port + 10000 (the cluster bus).
const BUS_OFFSET: u16 = 10_000;

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

impl PortPlan {
    pub(crate) fn redis_ports(self, n: usize) -> Result<Vec<u16>> {
        self.ports(n, true)
    }

    pub(crate) fn postgres_ports(self, n: usize) -> Result<Vec<u16>> {
        self.ports(n, false)
    }

    fn ports(self, n: usize, with_bus: bool) -> Result<Vec<u16>> {
        let usable = |p: u16| is_free(p) && (!with_bus || is_free(p + BUS_OFFSET));
        match self {
            PortPlan::Fixed { redis, postgres } => {
                let base = if with_bus { redis } else { postgres };
                let ports: Vec<u16> = (0..n as u16).map(|i| base + i).collect();
                if let Some(busy) = ports.iter().find(|p| !usable(**p)) {
                    bail!(
                        "port {busy} is in use{}; stop whatever holds it (another stack?) and try again",
                        if with_bus {
                            format!(" (or its cluster bus port {})", busy + BUS_OFFSET)
                        } else {
                            String::new()
                        }
                    );
                }
                Ok(ports)
            }
            PortPlan::Ephemeral => {
                // Ports and bus ports both stay below Linux's ephemeral range
                // (32768 and up), where outgoing connections take theirs.
                let mut rng = rand::rng();
                let mut ports = Vec::with_capacity(n);
                for _ in 0..1_000 {
                    if ports.len() == n {
                        break;
                    }
                    let p = rng.random_range(12_000..22_000);
                    if !ports.contains(&p) && usable(p) {
                        ports.push(p);
                    }
                }
                if ports.len() < n {
                    bail!("cannot find {n} free ports");
                }
                Ok(ports)
            }
        }
    }
}

//! Child processes of the stack: spawning with logs, stopping politely,
//! and cleaning up after a stack that was killed without stopping.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// How long a process gets to stop after its stop signal.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Builds the command that starts a process, so it can be started again.
pub(crate) type Recipe = Box<dyn Fn() -> Command + Send + Sync>;

/// A process the stack started.
pub(crate) struct Managed {
    name: String,
    child: Child,
    stop_signal: Signal,
    recipe: Recipe,
    log: std::path::PathBuf,
}

impl Managed {
    /// Starts the command `recipe` builds, with stdout and stderr appended
    /// to `log`. The process gets its own process group, so a Ctrl-C meant
    /// for the stack's owner does not kill it before the owner stops it in
    /// order.
    pub(crate) fn spawn(name: &str, recipe: Recipe, log: &Path, stop_signal: Signal) -> Result<Managed> {
        let child = Self::start(name, &recipe, log)?;
        Ok(Managed { name: name.to_owned(), child, stop_signal, recipe, log: log.to_owned() })
    }

    fn start(name: &str, recipe: &Recipe, log: &Path) -> Result<Child> {
        let out = File::options().create(true).append(true).open(log)?;
        let err = out.try_clone()?;
        let mut command = recipe();
        command.stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true).process_group(0);
        command.spawn().with_context(|| format!("cannot start {name}"))
    }

    /// Sends `signal` to the process (SIGSTOP and SIGCONT freeze and thaw
    /// it, for tests of a hung dependency).
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        let pid = self.child.id().with_context(|| format!("{} is not running", self.name))?;
        kill(Pid::from_raw(pid as i32), signal).with_context(|| format!("cannot signal {}", self.name))
    }

    /// Sends `signal` to the process and its children. (PostgreSQL puts
    /// each backend in a process group of its own, so the group is not
    /// enough.) The children are found in /proc.
    pub(crate) fn signal_tree(&self, signal: Signal) -> Result<()> {
        let pid = self.child.id().with_context(|| format!("{} is not running", self.name))?;
        // The parent first, so it forks no new child while we look.
        let _ = kill(Pid::from_raw(pid as i32), signal);
        for entry in std::fs::read_dir("/proc")?.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // pid (comm) state ppid …: the comm may hold spaces, so split after ')'.
            let ppid = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
            if ppid == Some(pid) {
                let _ = kill(Pid::from_raw(child as i32), signal);
            }
        }
        Ok(())
    }

    /// Sends `signal` and waits for the process to exit.
    pub(crate) async fn end(&mut self, signal: Signal) -> Result<()> {
        self.signal(signal)?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the process again after it ended.
    pub(crate) fn restart(&mut self) -> Result<()> {
        anyhow::ensure!(self.child.try_wait()?.is_some(), "{} is still running", self.name);
        self.child = Self::start(&self.name, &self.recipe, &self.log)?;
        Ok(())
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Fails if the process has already exited, pointing at its log.
    pub(crate) fn check_running(&mut self, log: &Path) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("{} exited ({status}); last lines of {}:\n{}", self.name, log.display(), tail.join("\n"));
        }
        Ok(())
    }

    pub(crate) async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), self.stop_signal);
            if tokio::time::timeout(STOP_GRACE, self.child.wait()).await.is_ok() {
                return;
            }
            tracing::warn!(process = %self.name, "did not stop in time; killing it");
        }
        let _ = self.child.kill().await;
    }
}

/// Stops processes recorded in an earlier stack's description that are
/// still running, so their ports are free again.
pub(crate) async fn stop_leftovers(description: &Path) {
    let Ok(text) = std::fs::read_to_string(description) else { return };
    let Ok(old) = serde_json::from_str::<crate::Description>(&text) else { return };
    let replicas = old.shards.iter().filter_map(|s| s.replica.as_ref().map(|r| r.pid));
    let pids = old.redis_nodes.iter().map(|n| n.pid).chain(old.shards.iter().map(|s| s.pid)).chain(replicas);
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if !(comm.starts_with("redis-server") || comm.starts_with("postgres")) {
            continue;
        }
        tracing::info!(pid, process = comm.trim(), "stopping a leftover process of an earlier stack");
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        let gone = async {
            while Path::new(&format!("/proc/{pid}")).exists() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        if tokio::time::timeout(STOP_GRACE, gone).await.is_err() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
    }
}

/// Lets other users enter (not list) `dir`.
pub(crate) fn make_traversable(dir: &Path) -> Result<()> {
    let mut perms = std::fs::metadata(dir)?.permissions();
    perms.set_mode(perms.mode() | 0o711);
    std::fs::set_permissions(dir, perms)?;
    Ok(())
}

/// Polls `check` until it succeeds or `timeout` passes. For readiness of a
/// process that offers no event to wait on (a port that starts answering).
pub(crate) async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut delay = Duration::from_millis(20);
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

/// Runs a short command to completion and returns its stdout; fails with
/// its stderr if it exits non-zero.
pub(crate) async fn output(program: &Path, args: &[&str]) -> Result<String> {
    output_with(program, args, &[]).await
}

/// [`output`], with these environment variables set.
pub(crate) async fn output_with(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({}): {}{}",
            program.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Finds an executable on the PATH.
pub(crate) fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|p| p.is_file())
}

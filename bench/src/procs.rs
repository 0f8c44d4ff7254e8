//! Processes the bench starts and what it reads off them: temporary
//! directories, free ports, logged children killed on drop, RSS and CPU time
//! from /proc, and waiting until a public address serves.

use anyhow::{bail, Context as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::{Child, Command};

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A fresh directory under the system's temp dir, named for this run.
    pub fn new(tag: &str) -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!("tunnel-bench-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(TempDir(dir))
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port on 127.0.0.1 free a moment ago, and never handed out before in this process.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released at once: a small race with other processes, fine on a
    // bench host. The kernel may give the port just released to the next bind,
    // which once handed a server the same port for its gRPC and admin listeners;
    // remembering what we gave out rules that out.
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..64 {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
    bail!("no free port on 127.0.0.1 that this run has not used already")
}

/// Starts `program args` with stderr and stdout in `log`, killed when dropped.
pub fn spawn(program: &Path, args: &[&std::ffi::OsStr], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))
}

/// Finds `name` on PATH (or in ~/.cargo/bin, where `cargo install` puts it).
pub fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Sends `kill -SIG` to a child.
pub fn signal(child: &Child, sig: &str) -> anyhow::Result<()> {
    let pid = child.id().context("process running")?;
    let ok = std::process::Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status()?.success();
    if !ok {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// A field of /proc/PID/status in KiB (VmRSS, VmHWM), 0 when unreadable.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0 };
    s.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// User plus system CPU time the process has used.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // The command name (field 2) may hold spaces: count fields after its ')'.
    let Some(rest) = s.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the ')'.
    let ticks: u64 = [11, 12].iter().filter_map(|&i| f.get(i)?.parse::<u64>().ok()).sum();
    // USER_HZ is 100 on every Linux the bench targets.
    Duration::from_millis(ticks * 10)
}

/// Waits until `GET path` on `addr` answers 200 (a tunnel is up end to end).
pub async fn wait_serving(addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if get_status(addr, path).await.ok() == Some(200) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("http://{addr}{path} did not answer 200 within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `wait_serving`, failing with the tail of each of `logs` when it times out.
pub async fn wait_serving_or_logs(
    what: &str,
    addr: SocketAddr,
    path: &str,
    within: Duration,
    logs: &[PathBuf],
) -> anyhow::Result<()> {
    if let Err(e) = wait_serving(addr, path, within).await {
        let tails: Vec<String> = logs.iter().map(|l| log_tail(l)).collect();
        bail!("{what} did not come up: {e}\n{}", tails.join("\n"));
    }
    Ok(())
}

/// One HTTP/1.1 GET on a fresh connection; the response's status code.
pub async fn get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        anyhow::Ok(head)
    };
    let head = tokio::time::timeout(Duration::from_secs(2), io).await??;
    let code = std::str::from_utf8(&head[9..12])?.parse()?;
    Ok(code)
}

/// POSTs `n` bytes to `path` at `addr`; the response's status.
pub async fn post_status(addr: SocketAddr, path: &str, n: usize) -> anyhow::Result<u16> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!("POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(&vec![b'p'; n]).await?;
        let mut head = [0u8; 12];
        s.read_exact(&mut head).await?;
        anyhow::Ok(head)
    };
    let head = tokio::time::timeout(Duration::from_secs(5), io).await??;
    Ok(std::str::from_utf8(&head[9..12])?.parse()?)
}

/// The server's current state, through its introspection service.
pub async fn snapshot(admin: SocketAddr) -> anyhow::Result<tunnel_lib::introspection::WatchUpdate> {
    use tunnel_lib::introspection::{introspection_client::IntrospectionClient, WatchRequest};
    let call = async {
        // A busy fleet's first update carries every client's series: past tonic's 4 MiB default.
        let mut c = IntrospectionClient::connect(format!("http://{admin}")).await?.max_decoding_message_size(64 << 20);
        let mut s = c.watch(WatchRequest::default()).await?.into_inner();
        s.message().await?.context("watch closed")
    };
    tokio::time::timeout(Duration::from_secs(5), call).await.context("introspection timed out")?
}

/// The last lines of a log, to explain a failure after its directory is gone.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    format!("{}:\n{}", path.display(), lines[lines.len().saturating_sub(15)..].join("\n"))
}

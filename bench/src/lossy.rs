//! The lossy link: the bulk load with delay and loss between client and
//! server. This kernel has no `netem` qdisc, so the two are made apart: a
//! relay in the bench delays every byte each way, and nftables, in a network
//! namespace the bench creates and removes, drops packets at random on the
//! relay's port. The namespace's loopback has an Ethernet MTU (1500), so loss
//! hits packets of a real link's size, not 64 KiB loopback super-packets.
//! TCP therefore sees real loss and retransmits, but on a loopback round
//! trip; the delay sits outside its congestion control.

use crate::isolation::Timers;
use crate::procs::{which, TempDir};
use crate::{load, procs};
use anyhow::{bail, Context as _};
use bytes::{Bytes, BytesMut};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tunnel_lib::config::LinkTuning;

/// The relay's port inside the namespace (fresh, so a fixed port is free).
pub const RELAY_PORT: u16 = 17999;
/// Added to each direction of the link.
pub const DELAY: Duration = Duration::from_millis(20);
/// Packets dropped on the link, percent, each direction.
pub const LOSS_PERCENT: u32 = 1;
/// The lossy link's shape.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    /// Packets dropped, percent, each direction.
    pub loss: u32,
    /// Added to each direction.
    pub delay: Duration,
}

/// Set in the re-executed bench so it knows it is in the namespace.
const NETNS_ENV: &str = "TUNNEL_BENCH_NETNS";

/// Whether this process runs inside the bench's namespace.
pub fn inside_netns() -> bool {
    std::env::var_os(NETNS_ENV).is_some()
}

/// A delaying TCP relay from `addr` to `target`; stops when dropped.
pub struct Relay {
    pub addr: SocketAddr,
    /// Where it forwards to: the server's gRPC port, free at start.
    pub target: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Listens on 127.0.0.1:`port` and forwards each connection with `delay`
    /// each way. Its accepted sockets are the far end of the lossy segment,
    /// where the server's would be: they get `timers`, as the server's do.
    pub async fn start(port: u16, delay: Duration, timers: LinkTuning) -> anyhow::Result<Relay> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.with_context(|| format!("relay port {port}"))?;
        // Inherited by accepted sockets, in force from their handshake on.
        tunnel_daemon::tunnel::tuning::apply(&listener, &timers);
        let addr = listener.local_addr()?;
        let target = procs::free_port()?;
        let task = tokio::spawn(async move {
            // Owned by the accept loop: aborting it ends every connection.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                conns.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else { return };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(pump(ir, ow, delay), pump(or, iw, delay));
                });
                while conns.try_join_next().is_some() {}
            }
        });
        Ok(Relay { addr, target, task })
    }
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    // Bounded: a full queue stops the reading, so TCP pushes back on the sender.
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(1024);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(64 << 10);
        loop {
            buf.reserve(64 << 10);
            match from.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send((Instant::now() + delay, buf.split().freeze())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

/// Runs the lossy cell for `transport` in a fresh network namespace and
/// returns its table row, or a row saying why it was skipped.
pub async fn run_in_netns(bins: &Path, transport: &str, timers: Timers, link: Link, cfg: &load::Config) -> String {
    match in_netns(bins, transport, timers, link, cfg).await {
        Ok(row) => row,
        Err(e) => {
            let reason = format!("{e:#}").replace('|', "/").replace('\n', " ");
            eprintln!("lossy cell skipped: {reason}");
            format!("| {transport} | {} | {timers} | | skipped: {reason} | | | | | | | |", load::Scenario::Lossy.name())
        }
    }
}

/// Segments retransmitted, over their lives, by the sockets at either end
/// of the lossy segment (`ss -ti`'s "retrans:now/total", summed).
pub async fn retransmits(port: u16) -> anyhow::Result<u64> {
    let filter = format!("( sport = :{port} or dport = :{port} )");
    let out = Command::new(which("ss").context("ss (iproute2) not found")?)
        .args(["-tinH", "state", "established"])
        .arg(filter)
        .output()
        .await?;
    if !out.status.success() {
        bail!("ss: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(parse_retransmits(&String::from_utf8_lossy(&out.stdout)))
}

fn parse_retransmits(ss: &str) -> u64 {
    ss.split_whitespace()
        .filter_map(|w| w.strip_prefix("retrans:"))
        .filter_map(|r| r.split_once('/').and_then(|(_, total)| total.parse::<u64>().ok()))
        .sum()
}

async fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(which("ip").context("ip (iproute2) not found")?).args(args).output().await?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Kills whatever still runs in `ns`, then removes it.
async fn remove_netns(ns: &str) {
    if let Ok(ip_bin) = which("ip").context("ip") {
        if let Ok(out) = Command::new(ip_bin).args(["netns", "pids", ns]).output().await {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).output().await;
            }
        }
    }
    let _ = ip(&["netns", "del", ns]).await;
}

/// Removes namespaces left by benches that were killed before cleaning up.
async fn remove_stale_netns() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("tunnel-bench-") else { continue };
        if !Path::new("/proc").join(pid).exists() {
            remove_netns(&name).await;
        }
    }
}

async fn in_netns(
    bins: &Path,
    transport: &str,
    timers: Timers,
    link: Link,
    cfg: &load::Config,
) -> anyhow::Result<String> {
    which("nft").context("nft (nftables) not found")?;
    remove_stale_netns().await;
    let ns = format!("tunnel-bench-{}", std::process::id());
    ip(&["netns", "add", &ns]).await.context("creating a network namespace (needs root)")?;
    // Removed on every path out, including errors and an overrun, with
    // whatever still runs inside (the re-executed bench's daemons).
    let result = async {
        ip(&["-n", &ns, "link", "set", "lo", "mtu", "1500", "up"]).await?;
        let dir = TempDir::new("netns")?;
        let rules = dir.join("loss.nft");
        std::fs::write(
            &rules,
            format!(
                "table inet tunnel_bench {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp dport {RELAY_PORT} numgen random mod 100 < {loss} drop\n    tcp sport {RELAY_PORT} numgen random mod 100 < {loss} drop\n  }}\n}}\n",
                loss = link.loss
            ),
        )?;
        let rules = rules.display().to_string();
        ip(&["netns", "exec", &ns, "nft", "-f", &rules]).await.context("loading the loss rules")?;
        let exe = std::env::current_exe()?;
        let mut cmd = Command::new(which("ip").context("ip not found")?);
        cmd.args(["netns", "exec", &ns])
            .arg(exe)
            .arg("--bin-dir")
            .arg(bins)
            .arg("--duration")
            .arg(format!("{}ms", cfg.duration.as_millis()));
        if cfg.quick {
            cmd.arg("--quick");
        }
        cmd.args(["isolation", "--scenarios", "lossy", "--transports", transport])
            .arg("--link-timers")
            .arg(timers.to_string())
            .arg("--loss")
            .arg(link.loss.to_string())
            .arg("--link-delay")
            .arg(format!("{}ms", link.delay.as_millis()))
            .env(NETNS_ENV, &ns)
            .kill_on_drop(true);
        let limit = cfg.duration + Duration::from_secs(120);
        let out = tokio::time::timeout(limit, cmd.output()).await.context("the lossy cell overran")??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("the bench in the namespace failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        let prefix = format!("| {transport} |");
        stdout.lines().find(|l| l.starts_with(&prefix)).map(str::to_string).context("no row from the namespace")
    }
    .await;
    remove_netns(&ns).await;
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn retransmits_sum_each_sockets_total() {
        let ss = "0 0 127.0.0.1:17999 127.0.0.1:40000\n\t cubic rto:204 rtt:0.1/0.05 retrans:0/12 rcv_space:1\n0 0 127.0.0.1:40000 127.0.0.1:17999\n\t cubic retrans:1/30 lost:1\n0 0 127.0.0.1:1 127.0.0.1:2\n\t cubic rto:200\n";
        assert_eq!(super::parse_retransmits(ss), 42);
    }
}

//! The design's question: how late do heartbeats arrive under load, per
//! transport? Each cell runs fresh tunnel-server and tunnel-client processes
//! against the bench's upstream and reads the server's per-stream heartbeat
//! figures through introspection.

use crate::procs::{self, free_port, TempDir};
use crate::upstream;
use crate::{load, lossy};
use anyhow::bail;
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tunnel_lib::config::LinkTuning;
use tunnel_lib::introspection::WatchUpdate;
use tunnel_lib::units::ByteSize;

/// The link sockets' TCP timers a set of cells runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timers {
    /// Whatever the daemons default to (no key written).
    Default,
    /// Written out: `LinkTuning::OFF` is the kernel's own timers.
    Set(LinkTuning),
}

impl std::str::FromStr for Timers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "default" => return Ok(Timers::Default),
            "off" => return Ok(Timers::Set(LinkTuning::OFF)),
            _ => {}
        }
        let mut t = LinkTuning::OFF;
        let timer = |v: &str| humantime::parse_duration(v).map_err(|e| format!("{v:?}: {e}"));
        for item in s.trim().split('+') {
            match item.split_once('=') {
                Some(("rto", v)) => t.rto_min = Some(timer(v)?),
                Some(("delack", v)) => t.delack_max = Some(timer(v)?),
                Some(("lowat", v)) => t.notsent_lowat = Some(ByteSize::parse(v)?.0 as u32),
                None if item == "thin" => t.thin_timeouts = true,
                _ => {
                    return Err(format!(
                        "{item:?} in {s:?}: write default, off, or options joined by +: rto=20ms, delack=8ms, lowat=128KiB, thin"
                    ))
                }
            }
        }
        Ok(Timers::Set(t))
    }
}

impl std::fmt::Display for Timers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self {
            Timers::Default => return write!(f, "default"),
            Timers::Set(t) if t.is_off() => return write!(f, "off"),
            Timers::Set(t) => t,
        };
        let mut items = Vec::new();
        if let Some(d) = t.rto_min {
            items.push(format!("rto={}ms", d.as_millis()));
        }
        if let Some(d) = t.delack_max {
            items.push(format!("delack={}ms", d.as_millis()));
        }
        if let Some(n) = t.notsent_lowat {
            items.push(format!("lowat={}KiB", n >> 10));
        }
        if t.thin_timeouts {
            items.push("thin".into());
        }
        write!(f, "{}", items.join("+"))
    }
}

impl Timers {
    /// The keys as a config file writes them (none for the daemons' defaults).
    fn keys(&self) -> String {
        let Timers::Set(t) = self else { return String::new() };
        let v = |d: Option<Duration>| d.map_or("off".to_string(), |d| format!("{}ms", d.as_millis()));
        format!(
            "link_rto_min = \"{}\"\nlink_delack_max = \"{}\"\nlink_thin_timeouts = {}\nlink_notsent_lowat = {}\n",
            v(t.rto_min),
            v(t.delack_max),
            t.thin_timeouts,
            t.notsent_lowat.unwrap_or(0)
        )
    }

    /// What the daemons' sockets get.
    pub fn tuning(&self) -> LinkTuning {
        match self {
            Timers::Default => LinkTuning::default(),
            Timers::Set(t) => *t,
        }
    }
}

/// What one cell measured.
pub struct Cell {
    transport: String,
    timers: Timers,
    /// Segments retransmitted on the lossy link, both ends (None off it).
    retransmits: Option<u64>,
    scenario: load::Scenario,
    /// Median of the streams' p50 delays, the worst p99, the worst max (ms).
    delay: (i64, i64, i64),
    /// The worst delay of the control stream (of the only stream with
    /// `single`): on a shared connection it waits with the data.
    control_max: i64,
    rtt_p99: i64,
    reaped: u64,
    streams: usize,
    load: load::Outcome,
}

struct Tunnel {
    http: SocketAddr,
    admin: SocketAddr,
    children: Vec<Child>,
    _dir: TempDir,
}

impl Tunnel {
    /// Starts the daemons; with `link`, the client dials the server through
    /// that relay address instead of directly.
    async fn start(
        bins: &Path,
        transport: &str,
        upstream: SocketAddr,
        grpc: SocketAddr,
        link: Option<SocketAddr>,
        timers: Timers,
    ) -> anyhow::Result<Tunnel> {
        let dir = TempDir::new(transport)?;
        let (http, admin) = (free_port()?, free_port()?);
        let dial = link.unwrap_or(grpc);
        let server_toml = format!(
            r#"
[server]
http_listen = "{http}"
grpc_listen = "{grpc}"
admin_listen = "{admin}"
shutdown_grace = "1s"
{}[[groups]]
name = "bench"
token = "bench-token"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
group = "bench"
upstream = "up"
timeout = "60s"
"#,
            timers.keys()
        );
        let client_toml = format!(
            "server = \"http://{dial}\"\nclient_id = \"bench-client\"\ngroup = \"bench\"\ntoken = \"bench-token\"\ntransport = \"{transport}\"\nheartbeat_interval = \"1s\"\nshutdown_grace = \"1s\"\n{}[upstreams]\nup = \"http://{upstream}\"\n",
            timers.keys()
        );
        let server_cfg = dir.join("server.toml");
        let client_cfg = dir.join("client.toml");
        std::fs::write(&server_cfg, server_toml)?;
        std::fs::write(&client_cfg, client_toml)?;
        let daemon = |bin: &str, cfg: &Path, log: &str| {
            procs::spawn(&bins.join(bin), &[OsStr::new("--config"), cfg.as_os_str()], &dir.join(log))
        };
        let mut children = vec![daemon("tunnel-server", &server_cfg, "server.log")?];
        // The client retries until the server listens.
        children.push(daemon("tunnel-client", &client_cfg, "client.log")?);
        let want = if transport == "single" { 1 } else { 3 };
        let t = Tunnel { http, admin, children, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(u) = t.snapshot().await {
                if u.streams.len() == want {
                    return Ok(t);
                }
            }
            if Instant::now() > deadline {
                bail!("the tunnel did not register {want} streams within 20s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn snapshot(&self) -> anyhow::Result<WatchUpdate> {
        procs::snapshot(self.admin).await
    }

    async fn stop(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}

fn median(mut v: Vec<i64>) -> i64 {
    if v.is_empty() {
        return -1;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

async fn run_cell(
    bins: &Path,
    transport: &str,
    scenario: load::Scenario,
    timers: Timers,
    link: lossy::Link,
    cfg: &load::Config,
) -> anyhow::Result<Cell> {
    let up = upstream::start().await?;
    // The lossy link: the client reaches the server through a relay that
    // delays every byte, on the port the namespace's firewall drops from.
    // The relay's end of that segment stands in for the server's socket,
    // so it gets the server's timers.
    let (grpc, relay) = if scenario == load::Scenario::Lossy {
        let relay = lossy::Relay::start(lossy::RELAY_PORT, link.delay, timers.tuning()).await?;
        (relay.target, Some(relay))
    } else {
        (free_port()?, None)
    };
    let dial = relay.as_ref().map(|r| r.addr);
    let tunnel = Tunnel::start(bins, transport, up.addr, grpc, dial, timers).await?;
    tokio::time::sleep(cfg.settle).await;
    let outcome = load::run(scenario, tunnel.http, cfg).await;
    let retransmits = match relay {
        Some(_) => Some(lossy::retransmits(lossy::RELAY_PORT).await?),
        None => None,
    };
    let after = tunnel.snapshot().await?;
    tunnel.stop().await;
    up.stop();
    drop(relay);
    // The server keeps each stream's last 128 heartbeats; each cell runs on
    // fresh processes, so at 1 s intervals the window is this cell's.
    let delays: Vec<_> = after.streams.iter().filter(|s| s.delay_max_ms >= 0).collect();
    Ok(Cell {
        transport: transport.to_string(),
        timers,
        retransmits,
        scenario,
        delay: (
            median(delays.iter().map(|s| s.delay_p50_ms).collect()),
            delays.iter().map(|s| s.delay_p99_ms).max().unwrap_or(-1),
            delays.iter().map(|s| s.delay_max_ms).max().unwrap_or(-1),
        ),
        control_max: after
            .streams
            .iter()
            .filter(|s| s.stream_type != tunnel_lib::proto::StreamType::Http as i32 || after.streams.len() == 1)
            .map(|s| s.delay_max_ms)
            .max()
            .unwrap_or(-1),
        rtt_p99: after.streams.iter().map(|s| s.rtt_p99_ms).max().unwrap_or(-1),
        reaped: after.server.map_or(0, |s| s.streams_reaped),
        streams: after.streams.len(),
        load: outcome,
    })
}

impl Cell {
    /// The cell's row of the markdown table.
    pub fn row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.transport,
            self.scenario.name(),
            self.timers,
            self.retransmits.map_or("-".to_string(), |r| r.to_string()),
            self.delay.0,
            self.delay.1,
            self.delay.2,
            self.control_max,
            self.rtt_p99,
            self.streams,
            self.reaped,
            self.load.summary()
        )
    }
}

fn print_table(rows: &[String], link: lossy::Link, cfg: &load::Config) {
    println!("\nHeartbeat one-way delay (ms) per transport and load; heartbeat interval 1 s, reap timeout 3 s.");
    println!("The lossy link: {}% of packets dropped each way, {:?} added each way.", link.loss, link.delay);
    println!("Each cell: fresh server and client processes, {:?} of load. {}\n", cfg.duration, cfg.describe());
    println!("Link options: the link sockets' TCP options (default: the daemons' own; off: the kernel's); retrans: segments retransmitted on the lossy link.\n");
    println!("| transport | load | link options | retrans | hb delay p50 | p99 | max | control max | hb rtt p99 | streams | reaped | throughput |");
    println!("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!("{r}");
    }
}

/// Runs every requested cell and prints the table. Lossy cells run in a
/// network namespace of their own (`lossy::run_in_netns`) unless this
/// process already is in one.
pub async fn run(
    bins: &Path,
    transports: &[String],
    scenarios: &[String],
    timers: &[Timers],
    link: lossy::Link,
    cfg: &load::Config,
) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for scenario in scenarios {
        let scenario = load::Scenario::parse(scenario)?;
        for &t in timers {
            for transport in transports {
                if !["split", "single", "split-connection"].contains(&transport.as_str()) {
                    bail!("unknown transport {transport:?}");
                }
                eprintln!("running {transport} / {} / link timers {t} for {:?}", scenario.name(), cfg.duration);
                if scenario == load::Scenario::Lossy && !lossy::inside_netns() {
                    rows.push(lossy::run_in_netns(bins, transport, t, link, cfg).await);
                    continue;
                }
                rows.push(run_cell(bins, transport, scenario, t, link, cfg).await?.row());
            }
        }
    }
    print_table(&rows, link, cfg);
    Ok(())
}

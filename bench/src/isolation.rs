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
use tunnel_lib::introspection::WatchUpdate;

/// What one cell measured.
pub struct Cell {
    transport: String,
    scenario: load::Scenario,
    /// Median of the streams' p50 delays, the worst p99, the worst max (ms).
    delay: (i64, i64, i64),
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
[[groups]]
name = "bench"
token = "bench-token"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
group = "bench"
upstream = "up"
timeout = "60s"
"#
        );
        let client_toml = format!(
            "server = \"http://{dial}\"\nclient_id = \"bench-client\"\ngroup = \"bench\"\ntoken = \"bench-token\"\ntransport = \"{transport}\"\nheartbeat_interval = \"1s\"\nshutdown_grace = \"1s\"\n[upstreams]\nup = \"http://{upstream}\"\n"
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

async fn run_cell(bins: &Path, transport: &str, scenario: load::Scenario, cfg: &load::Config) -> anyhow::Result<Cell> {
    let up = upstream::start().await?;
    // The lossy link: the client reaches the server through a relay that
    // delays every byte, on the port the namespace's firewall drops from.
    let (grpc, relay) = if scenario == load::Scenario::Lossy {
        let relay = lossy::Relay::start(lossy::RELAY_PORT, lossy::DELAY).await?;
        (relay.target, Some(relay))
    } else {
        (free_port()?, None)
    };
    let link = relay.as_ref().map(|r| r.addr);
    let tunnel = Tunnel::start(bins, transport, up.addr, grpc, link).await?;
    tokio::time::sleep(cfg.settle).await;
    let outcome = load::run(scenario, tunnel.http, cfg).await;
    let after = tunnel.snapshot().await?;
    tunnel.stop().await;
    up.stop();
    drop(relay);
    // The server keeps each stream's last 128 heartbeats; each cell runs on
    // fresh processes, so at 1 s intervals the window is this cell's.
    let delays: Vec<_> = after.streams.iter().filter(|s| s.delay_max_ms >= 0).collect();
    Ok(Cell {
        transport: transport.to_string(),
        scenario,
        delay: (
            median(delays.iter().map(|s| s.delay_p50_ms).collect()),
            delays.iter().map(|s| s.delay_p99_ms).max().unwrap_or(-1),
            delays.iter().map(|s| s.delay_max_ms).max().unwrap_or(-1),
        ),
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
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            self.transport,
            self.scenario.name(),
            self.delay.0,
            self.delay.1,
            self.delay.2,
            self.rtt_p99,
            self.streams,
            self.reaped,
            self.load.summary()
        )
    }
}

fn print_table(rows: &[String], cfg: &load::Config) {
    println!("\nHeartbeat one-way delay (ms) per transport and load; heartbeat interval 1 s, reap timeout 3 s.");
    println!("Each cell: fresh server and client processes, {:?} of load. {}\n", cfg.duration, cfg.describe());
    println!("| transport | load | hb delay p50 | p99 | max | hb rtt p99 | streams | reaped | throughput |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!("{r}");
    }
}

/// Runs every requested cell and prints the table. Lossy cells run in a
/// network namespace of their own (`lossy::run_in_netns`) unless this
/// process already is in one.
pub async fn run(bins: &Path, transports: &[String], scenarios: &[String], cfg: &load::Config) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for scenario in scenarios {
        let scenario = load::Scenario::parse(scenario)?;
        for transport in transports {
            if !["split", "single", "split-connection"].contains(&transport.as_str()) {
                bail!("unknown transport {transport:?}");
            }
            eprintln!("running {transport} / {} for {:?}", scenario.name(), cfg.duration);
            if scenario == load::Scenario::Lossy && !lossy::inside_netns() {
                rows.push(lossy::run_in_netns(bins, transport, cfg).await);
                continue;
            }
            rows.push(run_cell(bins, transport, scenario, cfg).await?.row());
        }
    }
    print_table(&rows, cfg);
    Ok(())
}

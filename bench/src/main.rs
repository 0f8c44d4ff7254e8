//! tunnel-bench: starts real tunnel-server and tunnel-client processes on
//! 127.0.0.1 with a built-in upstream, drives load, and prints a markdown
//! table. This first part answers the design's question: how late do
//! heartbeats arrive under load, per transport (docs/benchmarks.md).

mod load;
mod upstream;

use anyhow::{bail, Context as _};
use clap::Parser;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};
use tunnel_lib::introspection::introspection_client::IntrospectionClient;
use tunnel_lib::introspection::{WatchRequest, WatchUpdate};

#[derive(Parser)]
#[command(about = "Heartbeat isolation benchmark of the tunnel, per transport and load")]
struct Args {
    /// Short runs with small loads (under a minute in all), for CI.
    #[arg(long)]
    quick: bool,
    /// Transports to measure.
    #[arg(long, value_delimiter = ',', default_value = "split,single,split-connection")]
    transports: Vec<String>,
    /// Scenarios: idle, bulk, slow, slowreader.
    #[arg(long, value_delimiter = ',', default_value = "idle,bulk,slow,slowreader")]
    scenarios: Vec<String>,
    /// Length of each cell (default 60s, 3s with --quick).
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Where tunnel-server and tunnel-client are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// What one cell measured.
struct Cell {
    transport: String,
    scenario: load::Scenario,
    /// Median of the streams' p50 delays, the worst p99, the worst max (ms).
    delay: (i64, i64, i64),
    rtt_p99: i64,
    reaped: u64,
    streams: usize,
    load: load::Outcome,
}

fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released at once: a small race with other processes, fine on a bench host.
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

struct Tunnel {
    http: SocketAddr,
    admin: SocketAddr,
    children: Vec<Child>,
    _dir: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Tunnel {
    async fn start(bins: &Path, transport: &str, upstream: SocketAddr) -> anyhow::Result<Tunnel> {
        let dir = std::env::temp_dir().join(format!("tunnel-bench-{}-{transport}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
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
            "server = \"http://{grpc}\"\nclient_id = \"bench-client\"\ngroup = \"bench\"\ntoken = \"bench-token\"\ntransport = \"{transport}\"\nheartbeat_interval = \"1s\"\nshutdown_grace = \"1s\"\n[upstreams]\nup = \"http://{upstream}\"\n"
        );
        let server_cfg = dir.0.join("server.toml");
        let client_cfg = dir.0.join("client.toml");
        std::fs::write(&server_cfg, server_toml)?;
        std::fs::write(&client_cfg, client_toml)?;
        let spawn = |bin: &str, cfg: &Path, log: &str| -> anyhow::Result<Child> {
            let path = bins.join(bin);
            let log = std::fs::File::create(dir.0.join(log))?;
            Command::new(&path)
                .arg("--config")
                .arg(cfg)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", path.display()))
        };
        let mut children = vec![spawn("tunnel-server", &server_cfg, "server.log")?];
        // The client retries until the server listens.
        children.push(spawn("tunnel-client", &client_cfg, "client.log")?);
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

    /// The server's current state, through introspection.
    async fn snapshot(&self) -> anyhow::Result<WatchUpdate> {
        let mut c = IntrospectionClient::connect(format!("http://{}", self.admin)).await?;
        let mut s = c.watch(WatchRequest::default()).await?.into_inner();
        let u = tokio::time::timeout(Duration::from_secs(5), s.message()).await??;
        u.context("watch closed")
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
    let tunnel = Tunnel::start(bins, transport, up.addr).await?;
    tokio::time::sleep(cfg.settle).await;
    let outcome = load::run(scenario, tunnel.http, cfg).await;
    let after = tunnel.snapshot().await?;
    tunnel.stop().await;
    up.stop();
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

fn print_table(cells: &[Cell], cfg: &load::Config) {
    println!("\nHeartbeat one-way delay (ms) per transport and load; heartbeat interval 1 s, reap timeout 3 s.");
    println!("Each cell: fresh server and client processes, {:?} of load. {}\n", cfg.duration, cfg.describe());
    println!("| transport | load | hb delay p50 | p99 | max | hb rtt p99 | streams | reaped | throughput |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for c in cells {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            c.transport,
            c.scenario.name(),
            c.delay.0,
            c.delay.1,
            c.delay.2,
            c.rtt_p99,
            c.streams,
            c.reaped,
            c.load.summary()
        );
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bins = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    for b in ["tunnel-server", "tunnel-client"] {
        if !bins.join(b).exists() {
            bail!("{b} not found in {}: build it (cargo build --release) or pass --bin-dir", bins.display());
        }
    }
    let cfg = load::Config::new(args.quick, args.duration);
    let mut cells = Vec::new();
    for scenario in &args.scenarios {
        let scenario = load::Scenario::parse(scenario)?;
        for transport in &args.transports {
            if !["split", "single", "split-connection"].contains(&transport.as_str()) {
                bail!("unknown transport {transport:?}");
            }
            eprintln!("running {transport} / {} for {:?}", scenario.name(), cfg.duration);
            cells.push(run_cell(&bins, transport, scenario, &cfg).await?);
        }
    }
    print_table(&cells, &cfg);
    Ok(())
}

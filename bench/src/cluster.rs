//! A cluster in etcd, with real processes: what forwarding a request to a
//! peer costs against serving it where it lands (latency at 1000 req/s,
//! throughput and CPU at saturation), and a simulated large fleet: many
//! tunnel-server processes sharing one etcd and thousands of real clients
//! (the daemon's own client code, in this process) holding `connections = 2`
//! sessions each. Reports sessions per server, etcd writes per session,
//! server memory, and how long the registry takes to converge after a
//! server is killed.

use crate::load::{client, get_ok, open_loop, Sent};
use crate::procs::{self, cpu_time, free_port, signal, spawn, status_kib, TempDir};
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::Client;
use tunnel_lib::config::ClientConfig;

/// The open-loop rate of the latency cells.
const RATE: u32 = 1000;
/// Concurrent requests of the throughput cells.
const CONCURRENCY: usize = 64;

/// Sizes of one run.
pub struct Config {
    /// Length of each latency and throughput cell.
    cell: Duration,
    /// Servers and clients of the simulated fleet.
    servers: usize,
    clients: usize,
}

impl Config {
    pub fn new(quick: bool) -> Self {
        if quick {
            Config { cell: Duration::from_secs(3), servers: 4, clients: 200 }
        } else {
            Config { cell: Duration::from_secs(10), servers: 20, clients: 2000 }
        }
    }
}

/// Where etcd is, or why the bench cannot run it.
pub fn etcd_binary() -> Result<PathBuf, String> {
    procs::which("etcd").ok_or_else(|| "etcd not installed (apt-get install etcd-server; bench/setup.sh does)".into())
}

/// A single etcd member on loopback, data in the run's directory.
struct Etcd {
    client: SocketAddr,
    _child: Child,
}

impl Etcd {
    async fn start(bin: &Path, dir: &TempDir) -> anyhow::Result<Etcd> {
        let (client, peer) = (free_port()?, free_port()?);
        let data = dir.join("etcd-data");
        let args: Vec<String> = vec![
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            format!("http://{client}"),
            "--advertise-client-urls".into(),
            format!("http://{client}"),
            "--listen-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-advertise-peer-urls".into(),
            format!("http://{peer}"),
            "--initial-cluster".into(),
            format!("default=http://{peer}"),
            "--log-level".into(),
            "error".into(),
            "--logger".into(),
            "zap".into(),
        ];
        let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        let child = spawn(bin, &args, &dir.join("etcd.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !health(client).await {
            if Instant::now() > deadline {
                bail!("etcd did not become healthy: {}", procs::log_tail(&dir.join("etcd.log")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Etcd { client, _child: child })
    }
}

async fn health(addr: SocketAddr) -> bool {
    get_text(addr, "/health").await.is_some_and(|b| b.contains("\"health\":\"true\""))
}

/// The whole answer to one HTTP/1.1 GET (head and body), within 2 s.
async fn get_text(addr: SocketAddr, path: &str) -> Option<String> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut text = String::new();
        s.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    tokio::time::timeout(Duration::from_secs(2), io).await.ok()?.ok()
}

/// One clustered server process.
struct Edge {
    http: SocketAddr,
    grpc: SocketAddr,
    metrics: SocketAddr,
    child: Option<Child>,
}

impl Edge {
    async fn start(bins: &Path, dir: &TempDir, i: usize, etcd: SocketAddr) -> anyhow::Result<Edge> {
        let (http, grpc, admin, metrics, peer) = (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);
        let config = dir.join(&format!("edge-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nserver_id = \"edge-{i}\"\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nmetrics_listen = \"{metrics}\"\nlog_level = \"warn\"\n\
                 [[groups]]\nname = \"bench\"\ntoken = \"bench-token\"\n[[rules]]\ngroup = \"bench\"\nupstream = \"web\"\ntimeout = \"10s\"\n\
                 [cluster]\netcd = [\"http://{etcd}\"]\nprefix = \"/bench\"\nadvertise = \"http://{grpc}\"\npeer_listen = \"{peer}\"\npeer_advertise = \"http://{peer}\"\nlease_ttl = \"3s\"\n"
            ),
        )?;
        let log = dir.join(&format!("edge-{i}.log"));
        let child = spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), config.as_os_str()], &log)?;
        let edge = Edge { http, grpc, metrics, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while metric(edge.metrics, "tunnel_cluster_etcd_up").await != Some(1.0) {
            if Instant::now() > deadline {
                bail!("edge-{i} did not join the cluster: {}", procs::log_tail(&log));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(edge)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().and_then(|c| c.id()).unwrap_or(0)
    }
}

/// One value of the server's /metrics (the first sample named `name`).
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let text = get_text(addr, "/metrics").await?;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// p50, p99 and max of the OK requests, ms.
fn percentiles(sent: &[Sent]) -> (f64, f64, f64) {
    let mut ms: Vec<f64> = sent.iter().filter(|s| s.ok).map(|s| s.took.as_secs_f64() * 1000.0).collect();
    if ms.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), ms[ms.len() - 1])
}

/// `CONCURRENCY` requests at a time for `length`: (requests answered 200, failed).
async fn saturate(url: String, length: Duration) -> (u64, u64) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let deadline = tokio::time::Instant::now() + length;
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (c, url, ok, failed) = (c.clone(), url.clone(), ok.clone(), failed.clone());
        tasks.spawn(async move {
            while tokio::time::Instant::now() < deadline {
                match tokio::time::timeout(Duration::from_secs(5), get_ok(&c, url.clone())).await {
                    Ok(Ok(())) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// Runs both parts and prints their tables.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let bin = match etcd_binary() {
        Ok(b) => b,
        Err(why) => {
            println!("\n### A cluster in etcd\n\nskipped: {why}");
            return Ok(());
        }
    };
    let upstream = crate::upstream::start().await?;
    let result = async {
        forwarding_cost(bins, &bin, upstream.addr, cfg).await?;
        large_fleet(bins, &bin, upstream.addr, cfg).await
    }
    .await;
    upstream.stop();
    result
}

/// Local vs forwarded: edge-2 holds the only client; edge-1 forwards to it.
async fn forwarding_cost(bins: &Path, etcd_bin: &Path, upstream: SocketAddr, cfg: &Config) -> anyhow::Result<()> {
    let dir = TempDir::new("cluster-fwd")?;
    let etcd = Etcd::start(etcd_bin, &dir).await?;
    let e1 = Edge::start(bins, &dir, 1, etcd.client).await?;
    let e2 = Edge::start(bins, &dir, 2, etcd.client).await?;
    let client_toml = dir.join("client.toml");
    std::fs::write(
        &client_toml,
        format!(
            "server = \"http://{}\"\nclient_id = \"bench-1\"\ngroup = \"bench\"\ntoken = \"bench-token\"\nlog_level = \"warn\"\n[upstreams]\nweb = \"http://{upstream}\"\n",
            e2.grpc
        ),
    )?;
    let client = spawn(
        &bins.join("tunnel-client"),
        &[OsStr::new("--config"), client_toml.as_os_str()],
        &dir.join("client.log"),
    )?;
    let client_pid = client.id().context("client pid")?;
    procs::wait_serving(e1.http, "/small", Duration::from_secs(20)).await?;
    let pids = [e1.pid(), e2.pid(), client_pid];
    println!("\n### Forwarded vs local (2 servers, 1 client on edge-2; edge-1 forwards every request to edge-2)\n");
    println!("| route | p50 ms at {RATE} req/s | p99 ms | max ms | failed | req/s at {CONCURRENCY} concurrent | CPU µs/req (both servers + client) |");
    println!("|---|---|---|---|---|---|---|");
    for (name, edge) in [("local (edge-2)", &e2), ("forwarded (edge-1 -> edge-2)", &e1)] {
        let url = format!("http://{}/small", edge.http);
        let stop = CancellationToken::new();
        let traffic = tokio::spawn(open_loop(url.clone(), RATE, Duration::from_secs(5), stop.clone()));
        tokio::time::sleep(cfg.cell).await;
        stop.cancel();
        let sent = traffic.await?;
        let (p50, p99, max) = percentiles(&sent);
        let failed = sent.iter().filter(|s| !s.ok).count();
        let cpu_before: Duration = pids.iter().map(|&p| cpu_time(p)).sum();
        let started = Instant::now();
        let (ok, bad) = saturate(url, cfg.cell).await;
        let secs = started.elapsed().as_secs_f64();
        let cpu: Duration = pids.iter().map(|&p| cpu_time(p)).sum::<Duration>() - cpu_before;
        let per_req = cpu.as_secs_f64() * 1e6 / ok.max(1) as f64;
        println!(
            "| {name} | {p50:.2} | {p99:.2} | {max:.1} | {} of {} | {:.0} ({bad} failed) | {per_req:.1} |",
            failed,
            sent.len(),
            ok as f64 / secs
        );
        if let Some(first) = sent.iter().find(|s| !s.ok) {
            eprintln!("{name}: first failure: {}", first.error);
        }
    }
    drop(client);
    drop((e1, e2, etcd));
    Ok(())
}

/// Many servers, thousands of clients with `connections = 2`.
async fn large_fleet(bins: &Path, etcd_bin: &Path, upstream: SocketAddr, cfg: &Config) -> anyhow::Result<()> {
    let dir = TempDir::new("cluster-fleet")?;
    let etcd = Etcd::start(etcd_bin, &dir).await?;
    let mut edges = Vec::new();
    for i in 1..=cfg.servers {
        edges.push(Edge::start(bins, &dir, i, etcd.client).await?);
    }
    let idle_rss: Vec<u64> = edges.iter().map(|e| status_kib(e.pid(), "VmRSS")).collect();
    let stop = CancellationToken::new();
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..cfg.clients {
        // Two seeds each, spread: the fleet is learned from either.
        let (a, b) = (&edges[i % edges.len()], &edges[(i + 1) % edges.len()]);
        let text = format!(
            "servers = [\"http://{}\", \"http://{}\"]\nconnections = 2\nclient_id = \"c-{i}\"\ngroup = \"bench\"\ntoken = \"bench-token\"\ndata_streams = 1\nreconnect_min = \"100ms\"\nreconnect_max = \"2s\"\n[upstreams]\nweb = \"http://{upstream}\"\n",
            a.grpc, b.grpc
        );
        let cfg = ClientConfig::from_str_named(&text, "fleet client")?;
        let stop = stop.clone();
        clients.spawn(async move { Client::new(cfg).run(stop.cancelled_owned()).await });
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let sessions = 2 * cfg.clients;
    // When half, 99% and all of the sessions were registered (summed over the servers).
    let mut marks: Vec<Option<Duration>> = vec![None; 3];
    let deadline = Instant::now() + Duration::from_secs(180);
    while marks[2].is_none() && Instant::now() < deadline {
        let mut registered = 0.0;
        for e in &edges {
            registered += metric(e.metrics, "tunnel_clients").await.unwrap_or(0.0);
        }
        for (m, share) in marks.iter_mut().zip([0.5, 0.99, 1.0]) {
            if m.is_none() && registered >= share * sessions as f64 {
                *m = Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged = wait_holdings(&edges, sessions, Duration::from_secs(180)).await?;
    let came_up = started.elapsed();
    let secs = |m: Option<Duration>| m.map_or("-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
    let mut per_server = Vec::new();
    for e in &edges {
        per_server.push(metric(e.metrics, "tunnel_clients").await.unwrap_or(0.0) as usize);
    }
    let rss: Vec<u64> = edges.iter().map(|e| status_kib(e.pid(), "VmRSS")).collect();
    let mut writes = 0.0;
    for e in &edges {
        writes += metric(e.metrics, "tunnel_cluster_registry_writes_total").await.unwrap_or(0.0);
    }
    let (min, max) = (per_server.iter().min().copied().unwrap_or(0), per_server.iter().max().copied().unwrap_or(0));
    let mean_mib = |v: &[u64]| v.iter().sum::<u64>() as f64 / v.len().max(1) as f64 / 1024.0;
    println!(
        "\n### A simulated fleet: {} servers, {} clients with connections = 2 (one etcd)\n",
        cfg.servers, cfg.clients
    );
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| every session registered and in every server's view | {:.1} s after the clients started (half registered at {}, 99% at {}, all at {}; views agreed {:.1} s later) |",
        came_up.as_secs_f64(),
        secs(marks[0]),
        secs(marks[1]),
        secs(marks[2]),
        converged.as_secs_f64()
    );
    println!("| sessions per server | min {min}, mean {:.0}, max {max} |", sessions as f64 / cfg.servers as f64);
    println!(
        "| etcd writes per session registered | {:.2} ({writes} writes for {sessions} sessions) |",
        writes / sessions as f64
    );
    println!(
        "| server RSS | {:.1} MiB idle, {:.1} MiB mean with the fleet (max {:.1}) |",
        mean_mib(&idle_rss),
        mean_mib(&rss),
        rss.iter().max().copied().unwrap_or(0) as f64 / 1024.0
    );

    // kill -9 one server: its lease expires; its clients move to other servers.
    let victim = edges.len() / 2;
    let held_by_victim = per_server[victim];
    let killed_at = Instant::now();
    if let Some(c) = edges[victim].child.as_ref() {
        signal(c, "KILL")?;
    }
    if let Some(mut c) = edges[victim].child.take() {
        let _ = tokio::time::timeout(Duration::from_secs(5), c.wait()).await;
    }
    let rest: Vec<&Edge> = edges.iter().enumerate().filter(|(i, _)| *i != victim).map(|(_, e)| e).collect();
    let members_gone =
        wait_metric_all(&rest, "tunnel_cluster_members", (cfg.servers - 1) as f64, Duration::from_secs(30)).await?;
    let restored = wait_metric_all(&rest, "tunnel_cluster_holdings", sessions as f64, Duration::from_secs(60)).await?;
    println!(
        "| kill -9 of a server holding {held_by_victim} sessions (lease_ttl 3 s) | gone from every view {:.1} s after; all {sessions} sessions back and agreed on by every server {:.1} s after |",
        (members_gone - killed_at).as_secs_f64(),
        (restored - killed_at).as_secs_f64()
    );
    stop.cancel();
    let drained =
        tokio::time::timeout(Duration::from_secs(30), async { while clients.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        clients.abort_all();
    }
    drop(etcd);
    Ok(())
}

/// Waits until every server's view holds `sessions` client sessions; how long after the call.
async fn wait_holdings(edges: &[Edge], sessions: usize, within: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let all: Vec<&Edge> = edges.iter().collect();
    wait_metric_all(&all, "tunnel_cluster_holdings", sessions as f64, within).await?;
    Ok(started.elapsed())
}

/// Waits until `name` reads `want` on every one of `edges`; when it did.
async fn wait_metric_all(edges: &[&Edge], name: &str, want: f64, within: Duration) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + within;
    loop {
        let mut seen = Vec::new();
        for e in edges {
            seen.push(metric(e.metrics, name).await.unwrap_or(-1.0));
        }
        if seen.iter().all(|v| *v == want) {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!("{name} not {want} on every server within {within:?}: {seen:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

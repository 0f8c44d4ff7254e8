//! The soak: real processes (a server and two clients of one group) under a
//! mixed open-loop load for a set time (1 h documented in
//! docs/reliability.md), with the bad days an operator has: a client
//! restarted every minute, the upstream restarted and the server reloaded
//! now and then, public clients hanging up mid-request. Every few seconds it
//! samples each daemon's RSS, open fds and live tasks (the last from its own
//! /metrics) into a CSV; at the end it prints the drift of the server's after
//! warm-up, whether the gauges went back to zero when idle, and whether any
//! request outlived its deadline.

use crate::procs::{self, free_port, signal, spawn, TempDir};
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::task::JoinSet;

/// Each request's deadline; one answered later than this plus a second is "overdue".
const DEADLINE: Duration = Duration::from_secs(5);

/// Lengths and rates of one run.
pub struct Config {
    length: Duration,
    rate: u32,
    sample_every: Duration,
    client_restart_every: Duration,
    upstream_restart_every: Duration,
    reload_every: Duration,
    csv: PathBuf,
}

impl Config {
    pub fn new(quick: bool, duration: Option<Duration>, csv: Option<PathBuf>) -> Self {
        let csv = csv.unwrap_or_else(|| PathBuf::from("soak.csv"));
        if quick {
            return Config {
                length: duration.unwrap_or(Duration::from_secs(24)),
                rate: 50,
                sample_every: Duration::from_secs(1),
                client_restart_every: Duration::from_secs(6),
                upstream_restart_every: Duration::from_secs(10),
                reload_every: Duration::from_secs(8),
                csv,
            };
        }
        Config {
            length: duration.unwrap_or(Duration::from_secs(3600)),
            rate: 100,
            sample_every: Duration::from_secs(5),
            client_restart_every: Duration::from_secs(60),
            upstream_restart_every: Duration::from_secs(300),
            reload_every: Duration::from_secs(180),
            csv,
        }
    }
}

/// What the load saw, counted as it goes.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    ok: AtomicU64,
    /// Hung up on purpose by the load (the public side cancelling).
    hung_up: AtomicU64,
    failed: AtomicU64,
    /// No answer within the deadline.
    overdue: AtomicU64,
    /// Slowest answer, in ms.
    worst_ms: AtomicU64,
    /// Failures by what the public client got.
    why: std::sync::Mutex<std::collections::BTreeMap<String, u64>>,
}

impl Tally {
    fn failed_with(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        *self.why.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_default() += 1;
    }
}

/// The mixed load: of every 20 requests, 16 small, 2 slow (300 ms), 2
/// slow ones the public client abandons after 100 ms.
async fn load(http: SocketAddr, rate: u32, tally: Arc<Tally>, stop: tokio_util::sync::CancellationToken) {
    let client = crate::load::client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        n += 1;
        let (path, give_up) = match n % 20 {
            0 | 1 => ("/slow?ms=300", None),
            2 | 3 => ("/slow?ms=3000", Some(Duration::from_millis(100))),
            _ => ("/small", None),
        };
        tally.sent.fetch_add(1, Ordering::Relaxed);
        let (c, tally, url) = (client.clone(), tally.clone(), format!("http://{http}{path}"));
        tasks.spawn(async move {
            let start = Instant::now();
            let Ok(req) = http::Request::get(url).body(crate::load::empty()) else { return };
            let whole = async {
                let resp = c.request(req).await.map_err(|e| e.to_string())?;
                let status = resp.status();
                http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(status)
            };
            if let Some(after) = give_up {
                // Dropping the request mid-flight is the hang-up.
                if tokio::time::timeout(after, whole).await.is_err() {
                    tally.hung_up.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            let r = tokio::time::timeout(DEADLINE + Duration::from_secs(1), whole).await;
            let took = start.elapsed();
            tally.worst_ms.fetch_max(took.as_millis() as u64, Ordering::Relaxed);
            match r {
                Err(_) => {
                    tally.overdue.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(s)) if s == http::StatusCode::OK => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(s)) => tally.failed_with(format!("status {}", s.as_u16())),
                Ok(Err(e)) => tally.failed_with(e),
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    let bound = tokio::time::Instant::now() + DEADLINE + Duration::from_secs(2);
    while let Ok(Some(_)) = tokio::time::timeout_at(bound, tasks.join_next()).await {}
    tally.overdue.fetch_add(tasks.len() as u64, Ordering::Relaxed);
    tasks.abort_all();
}

struct Daemon {
    child: Child,
    metrics: SocketAddr,
}

impl Daemon {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }
}

/// One sample of a daemon.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    fds: u64,
    tasks: u64,
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}

/// `GET /metrics` from `addr`: the value of each named series (no labels).
async fn scrape(addr: SocketAddr, names: &[&str]) -> Vec<u64> {
    let fetch = async {
        let c = crate::load::client();
        let req = http::Request::get(format!("http://{addr}/metrics")).body(crate::load::empty()).ok()?;
        let resp = c.request(req).await.ok()?;
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.ok()?.to_bytes();
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fetch).await.ok().flatten().unwrap_or_default();
    names
        .iter()
        .map(|n| {
            text.lines()
                .find_map(|l| l.strip_prefix(n)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
                .map_or(0, |v| v as u64)
        })
        .collect()
}

async fn sample(d: &Daemon, tasks_metric: &str) -> Sample {
    let pid = d.pid();
    let tasks = scrape(d.metrics, &[tasks_metric]).await[0];
    Sample { rss_kib: procs::status_kib(pid, "VmRSS"), fds: open_fds(pid), tasks }
}

fn server_toml(http: SocketAddr, grpc: SocketAddr, admin: SocketAddr, metrics: SocketAddr, variant: u64) -> String {
    // Each reload changes a pushed setting, so the clients get a new config.
    let heartbeat = if variant.is_multiple_of(2) { "5s" } else { "4s" };
    format!(
        "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nmetrics_listen = \"{metrics}\"\nshutdown_grace = \"10s\"\nlog_level = \"warn\"\n[[groups]]\nname = \"soak\"\ntoken = \"soak-token\"\nheartbeat_interval = \"{heartbeat}\"\n[[rules]]\ngroup = \"soak\"\nupstream = \"web\"\ntimeout = \"{}s\"\n",
        DEADLINE.as_secs()
    )
}

struct Fleet {
    dir: TempDir,
    bins: PathBuf,
    server: Daemon,
    server_config: PathBuf,
    addrs: (SocketAddr, SocketAddr, SocketAddr, SocketAddr),
    clients: Vec<Daemon>,
    client_metrics: Vec<SocketAddr>,
    starts: usize,
}

impl Fleet {
    async fn start(bins: &Path, upstream: SocketAddr) -> anyhow::Result<Fleet> {
        let dir = TempDir::new("soak")?;
        let addrs = (free_port()?, free_port()?, free_port()?, free_port()?);
        let (http, grpc, admin, metrics) = addrs;
        let server_config = dir.join("server.toml");
        std::fs::write(&server_config, server_toml(http, grpc, admin, metrics, 0))?;
        let child = spawn(
            &bins.join("tunnel-server"),
            &[OsStr::new("--config"), server_config.as_os_str()],
            &dir.join("server.log"),
        )?;
        let client_metrics = vec![free_port()?, free_port()?];
        for (i, m) in client_metrics.iter().enumerate() {
            std::fs::write(
                dir.join(&format!("client-{}.toml", i + 1)),
                format!(
                    "server = \"http://{grpc}\"\nclient_id = \"soak-{}\"\ngroup = \"soak\"\ntoken = \"soak-token\"\nshutdown_grace = \"10s\"\nreconnect_max = \"2s\"\nmetrics_listen = \"{m}\"\nlog_level = \"warn\"\n[upstreams]\nweb = \"http://{upstream}\"\n",
                    i + 1
                ),
            )?;
        }
        let mut fleet = Fleet {
            dir,
            bins: bins.to_path_buf(),
            server: Daemon { child, metrics },
            server_config,
            addrs,
            clients: Vec::new(),
            client_metrics,
            starts: 0,
        };
        for i in 0..2 {
            let c = fleet.spawn_client(i)?;
            fleet.clients.push(c);
        }
        fleet.wait_streams(6, Duration::from_secs(20)).await?;
        procs::wait_serving(http, "/small", Duration::from_secs(10)).await?;
        Ok(fleet)
    }

    fn spawn_client(&mut self, i: usize) -> anyhow::Result<Daemon> {
        let config = self.dir.join(&format!("client-{}.toml", i + 1));
        self.starts += 1;
        let log = self.dir.join(&format!("client-{}-start{}.log", i + 1, self.starts));
        let child = spawn(&self.bins.join("tunnel-client"), &[OsStr::new("--config"), config.as_os_str()], &log)?;
        Ok(Daemon { child, metrics: self.client_metrics[i] })
    }

    async fn wait_streams(&self, n: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            if procs::snapshot(self.addrs.2).await.map(|u| u.streams.len()).unwrap_or(0) == n {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{n} streams not registered\n{}", procs::log_tail(&self.dir.join("server.log")));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM (drain), wait for the exit, start again.
    async fn restart_client(&mut self, i: usize) -> anyhow::Result<()> {
        signal(&self.clients[i].child, "TERM")?;
        let status = tokio::time::timeout(Duration::from_secs(20), self.clients[i].child.wait())
            .await
            .context("client exit")??;
        if !status.success() {
            bail!("client {} exited {status}", i + 1);
        }
        self.clients[i] = self.spawn_client(i)?;
        Ok(())
    }

    fn reload(&self, variant: u64) -> anyhow::Result<()> {
        let (http, grpc, admin, metrics) = self.addrs;
        std::fs::write(&self.server_config, server_toml(http, grpc, admin, metrics, variant))?;
        signal(&self.server.child, "HUP")
    }
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// Runs the soak and prints its summary.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let mut upstream = crate::upstream::start().await?;
    let up_addr = upstream.addr;
    let mut fleet = Fleet::start(bins, up_addr).await?;
    let mut csv = std::fs::File::create(&cfg.csv).with_context(|| format!("creating {}", cfg.csv.display()))?;
    writeln!(
        csv,
        "t_s,server_rss_kib,server_fds,server_tasks,server_in_flight,server_streams,client1_rss_kib,client1_fds,client1_tasks,client2_rss_kib,client2_fds,client2_tasks,sent,ok,failed,hung_up,overdue"
    )?;
    let tally = Arc::new(Tally::default());
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn(load(fleet.addrs.0, cfg.rate, tally.clone(), stop.clone()));

    let start = Instant::now();
    let (mut next_client, mut next_upstream, mut next_reload) =
        (cfg.client_restart_every, cfg.upstream_restart_every, cfg.reload_every);
    let (mut restarts, mut upstream_restarts, mut reloads) = (0u64, 0u64, 0u64);
    let mut server_samples: Vec<(Duration, Sample)> = Vec::new();
    let mut tick = tokio::time::interval(cfg.sample_every);
    while start.elapsed() < cfg.length {
        tick.tick().await;
        let t = start.elapsed();
        if t >= next_client {
            fleet.restart_client((restarts % 2) as usize).await?;
            restarts += 1;
            next_client += cfg.client_restart_every;
        }
        if t >= next_upstream {
            upstream.stop();
            tokio::time::sleep(Duration::from_millis(200)).await;
            upstream = crate::upstream::start_on(up_addr).await?;
            upstream_restarts += 1;
            next_upstream += cfg.upstream_restart_every;
        }
        if t >= next_reload {
            reloads += 1;
            fleet.reload(reloads)?;
            next_reload += cfg.reload_every;
        }
        let s = sample(&fleet.server, "tunnel_runtime_alive_tasks").await;
        let gauges = scrape(fleet.server.metrics, &["tunnel_in_flight_requests"]).await;
        let streams = procs::snapshot(fleet.addrs.2).await.map(|u| u.streams.len()).unwrap_or(0);
        let c1 = sample(&fleet.clients[0], "tunnel_client_runtime_alive_tasks").await;
        let c2 = sample(&fleet.clients[1], "tunnel_client_runtime_alive_tasks").await;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        writeln!(
            csv,
            "{:.0},{},{},{},{},{streams},{},{},{},{},{},{},{},{},{},{},{}",
            t.as_secs_f64(),
            s.rss_kib,
            s.fds,
            s.tasks,
            gauges[0],
            c1.rss_kib,
            c1.fds,
            c1.tasks,
            c2.rss_kib,
            c2.fds,
            c2.tasks,
            get(&tally.sent),
            get(&tally.ok),
            get(&tally.failed),
            get(&tally.hung_up),
            get(&tally.overdue),
        )?;
        server_samples.push((t, s));
    }
    stop.cancel();
    traffic.await?;
    // Idle: everything in flight must drain back to zero.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_in_flight = scrape(fleet.server.metrics, &["tunnel_in_flight_requests"]).await[0];
    let idle_streams = procs::snapshot(fleet.addrs.2).await.map(|u| u.streams.len()).unwrap_or(0);
    let idle = sample(&fleet.server, "tunnel_runtime_alive_tasks").await;
    upstream.stop();

    // Drift: medians of the samples after warm-up (the first 20%) in the
    // first and last quarters of the rest.
    let rest: Vec<Sample> = server_samples.iter().skip(server_samples.len() / 5).map(|(_, s)| *s).collect();
    let q = (rest.len() / 4).max(1);
    let (early, late) = (&rest[..q.min(rest.len())], &rest[rest.len().saturating_sub(q)..]);
    let drift = |f: fn(&Sample) -> u64| {
        let (a, b) = (median(early.iter().map(f).collect()), median(late.iter().map(f).collect()));
        let pct = if a == 0 { 0.0 } else { (b as f64 - a as f64) * 100.0 / a as f64 };
        (a, b, pct)
    };
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    println!(
        "\n### Soak: {}, {} req/s mixed, client restarts every {:?}, upstream restarts every {:?}, reloads every {:?}\n",
        humantime::format_duration(cfg.length),
        cfg.rate,
        cfg.client_restart_every,
        cfg.upstream_restart_every,
        cfg.reload_every
    );
    println!("| server | after warm-up | at the end | drift |");
    println!("|---|---|---|---|");
    for (name, f) in [
        ("RSS (KiB)", (|s: &Sample| s.rss_kib) as fn(&Sample) -> u64),
        ("open fds", |s: &Sample| s.fds),
        ("live tasks", |s: &Sample| s.tasks),
    ] {
        let (a, b, pct) = drift(f);
        println!("| {name} | {a} | {b} | {pct:+.1}% |");
    }
    println!(
        "\nrequests: {} sent, {} ok, {} hung up on purpose, {} failed, {} overdue (past {:?} + 1 s), slowest {} ms",
        get(&tally.sent),
        get(&tally.ok),
        get(&tally.hung_up),
        get(&tally.failed),
        get(&tally.overdue),
        DEADLINE,
        get(&tally.worst_ms)
    );
    println!("failures by what the public client got: {:?}", tally.why.lock().unwrap_or_else(|e| e.into_inner()));
    println!("events: {restarts} client restarts, {upstream_restarts} upstream restarts, {reloads} reloads");
    println!(
        "idle at the end: {idle_in_flight} in flight, {idle_streams} streams, server {} fds, {} tasks, {} KiB",
        idle.fds, idle.tasks, idle.rss_kib
    );
    println!("samples: {} ({})", server_samples.len(), cfg.csv.display());
    if idle_in_flight != 0 {
        bail!("{idle_in_flight} exchanges still in flight when idle");
    }
    if get(&tally.overdue) != 0 {
        bail!("{} requests outlived their deadline", get(&tally.overdue));
    }
    Ok(())
}

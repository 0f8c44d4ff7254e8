//! Several servers behind a real load balancer, with real processes: three
//! tunnel-servers behind HAProxy (health-checking each one's `/ready`), two
//! clients of one group each holding a session to all three, and an
//! open-loop load of 200 req/s through HAProxy, every request with a 5 s
//! deadline. One server at a time is killed (-9), stopped (SIGSTOP, then
//! SIGCONT), drained (SIGTERM with drain_delay above HAProxy's detection
//! time) and, last, all three are restarted one after another. Each cell
//! counts failed requests, those sent after HAProxy had marked the server
//! down, the worst latency, and how long the clients took to register on a
//! restarted server. A second table prices a session per server: client RSS
//! and idle CPU with 1, 3 and 5 servers, and what each client costs a server.

use crate::load::{open_loop, timed_get, Sent};
use crate::procs::{self, free_port, signal, spawn, TempDir};
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::process::Child;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const RATE: u32 = 200;
const DEADLINE: Duration = Duration::from_secs(5);
const SERVERS: usize = 3;
/// HAProxy checks every 300 ms and marks a server down after 2 failures:
/// detection within about 0.6-0.9 s (plus a check's own timeout when the
/// server does not answer at all).
const CHECK_INTER_MS: u64 = 300;
/// Above HAProxy's detection time (fall 2 x inter, and a 300 ms check timeout).
const DRAIN_DELAY: &str = "1500ms";
/// Slow requests in flight when a drain starts, spread over the servers.
const SLOW_REQUESTS: usize = 30;

/// Lengths of one run.
pub struct Config {
    /// Load before and after each fault.
    settle: Duration,
    /// How long a server stays stopped (SIGSTOP).
    stopped: Duration,
    /// Client processes per cell of the sessions table.
    clients: usize,
    /// How long the sessions table's idle CPU is measured.
    idle: Duration,
}

impl Config {
    pub fn new(quick: bool) -> Self {
        if quick {
            Config {
                settle: Duration::from_secs(1),
                stopped: Duration::from_secs(4),
                clients: 4,
                idle: Duration::from_secs(3),
            }
        } else {
            Config {
                settle: Duration::from_secs(3),
                stopped: Duration::from_secs(10),
                clients: 10,
                idle: Duration::from_secs(20),
            }
        }
    }
}

/// Where HAProxy is, or why the bench cannot run it.
pub fn haproxy() -> Result<PathBuf, String> {
    procs::which("haproxy").ok_or_else(|| "haproxy not installed (apt-get install haproxy; bench/setup.sh does)".into())
}

/// One server process and its addresses.
struct Edge {
    name: String,
    http: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
    metrics: SocketAddr,
    config: PathBuf,
    child: Option<Child>,
    starts: usize,
}

impl Edge {
    /// edge-`i` on free ports, its server.toml written in `dir` with `group_extra` keys for the group.
    fn new(dir: &TempDir, i: usize, group_extra: &str) -> anyhow::Result<Edge> {
        let name = format!("edge-{i}");
        let config = dir.join(&format!("{name}.toml"));
        let (http, grpc, admin, metrics) = (free_port()?, free_port()?, free_port()?, free_port()?);
        let e = Edge { name, http, grpc, admin, metrics, config, child: None, starts: 0 };
        std::fs::write(
            &e.config,
            format!(
                "[server]\nserver_id = \"{}\"\nhttp_listen = \"{}\"\ngrpc_listen = \"{}\"\nadmin_listen = \"{}\"\nmetrics_listen = \"{}\"\nshutdown_grace = \"10s\"\ndrain_delay = \"{DRAIN_DELAY}\"\nlog_level = \"warn\"\n[[groups]]\nname = \"ha\"\ntoken = \"ha-token\"\n{group_extra}[[rules]]\ngroup = \"ha\"\nupstream = \"web\"\ntimeout = \"10s\"\n",
                e.name, e.http, e.grpc, e.admin, e.metrics
            ),
        )?;
        Ok(e)
    }

    fn start(&mut self, bins: &Path, dir: &TempDir) -> anyhow::Result<()> {
        self.starts += 1;
        let log = dir.join(&format!("{}-{}.log", self.name, self.starts));
        self.child =
            Some(spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), self.config.as_os_str()], &log)?);
        Ok(())
    }

    fn child(&self) -> anyhow::Result<&Child> {
        self.child.as_ref().context("server running")
    }

    /// Waits for the process to exit, within `within`.
    async fn exited(&mut self, within: Duration) -> anyhow::Result<()> {
        let mut child = self.child.take().context("server running")?;
        tokio::time::timeout(within, child.wait()).await.context("server exit")??;
        Ok(())
    }
}

/// Client ids registered on the server with this admin address now.
async fn clients_on(admin: SocketAddr) -> Vec<String> {
    of_clients_on(admin, |c| c.client_id).await
}

/// `field` of each client on the server with this admin address, sorted.
async fn of_clients_on(admin: SocketAddr, field: fn(tunnel_lib::introspection::ClientInfo) -> String) -> Vec<String> {
    let Ok(u) = procs::snapshot(admin).await else { return Vec::new() };
    let mut v: Vec<String> = u.clients.into_iter().map(field).collect();
    v.sort();
    v
}

/// HAProxy in front of the servers' public listeners.
struct Balancer {
    front: SocketAddr,
    stats: PathBuf,
    _child: Child,
}

impl Balancer {
    fn config(front: SocketAddr, stats: &Path, edges: &[Edge]) -> String {
        let mut s = format!(
            "global\n  maxconn 4096\n  stats socket {} mode 600 level admin\n\
             defaults\n  mode http\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n  timeout check 300ms\n  retries 2\n  option redispatch\n\
             frontend public\n  bind {front}\n  default_backend tunnel\n\
             backend tunnel\n  balance roundrobin\n  option httpchk GET /ready\n  http-check expect status 200\n\
             \x20 default-server inter {CHECK_INTER_MS}ms fall 2 rise 2\n",
            stats.display()
        );
        for e in edges {
            s.push_str(&format!("  server {} {} check port {}\n", e.name, e.http, e.metrics.port()));
        }
        s
    }

    async fn start(haproxy: &Path, dir: &TempDir, edges: &[Edge]) -> anyhow::Result<Balancer> {
        let front = free_port()?;
        let stats = dir.join("haproxy.sock");
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, Self::config(front, &stats, edges))?;
        let child = spawn(haproxy, &[OsStr::new("-db"), OsStr::new("-f"), cfg.as_os_str()], &dir.join("haproxy.log"))?;
        Ok(Balancer { front, stats, _child: child })
    }

    /// Each server's status as HAProxy's stats socket tells it ("UP", "DOWN"...).
    async fn states(&self) -> anyhow::Result<Vec<(String, String)>> {
        let io = async {
            let mut s = tokio::net::UnixStream::connect(&self.stats).await?;
            s.write_all(b"show stat\n").await?;
            let mut text = String::new();
            s.read_to_string(&mut text).await?;
            anyhow::Ok(text)
        };
        let text = tokio::time::timeout(Duration::from_secs(2), io).await??;
        // CSV: pxname,svname,...; status is the 18th column.
        Ok(text
            .lines()
            .filter(|l| l.starts_with("tunnel,") && !l.starts_with("tunnel,BACKEND"))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                Some((f.get(1)?.to_string(), f.get(17)?.to_string()))
            })
            .collect())
    }

    /// Waits until `name`'s state starts with `want` ("UP", "DOWN"); when that was seen.
    async fn wait_state(&self, name: &str, want: &str, within: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + within;
        loop {
            let states = self.states().await.unwrap_or_default();
            if states.iter().any(|(n, s)| n == name && s.starts_with(want)) {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("HAProxy did not mark {name} {want} within {within:?}: {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The whole set-up.
struct Fleet {
    dir: TempDir,
    bins: PathBuf,
    edges: Vec<Edge>,
    balancer: Balancer,
    _clients: Vec<Child>,
    /// From starting the clients to both registered on every server.
    came_up: Duration,
}

impl Fleet {
    async fn start(bins: &Path, haproxy: &Path, upstream: SocketAddr) -> anyhow::Result<Fleet> {
        let dir = TempDir::new("ha")?;
        let mut edges = (1..=SERVERS).map(|i| Edge::new(&dir, i, "")).collect::<anyhow::Result<Vec<_>>>()?;
        for e in &mut edges {
            e.start(bins, &dir)?;
        }
        let grpc: Vec<SocketAddr> = edges.iter().map(|e| e.grpc).collect();
        let quick_reconnects = "reconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nshutdown_grace = \"10s\"\n";
        let started = Instant::now();
        let clients = start_clients(bins, &dir, "ha", &grpc, upstream, 2, quick_reconnects)?;
        let balancer = Balancer::start(haproxy, &dir, &edges).await?;
        let mut fleet =
            Fleet { dir, bins: bins.to_path_buf(), edges, balancer, _clients: clients, came_up: Duration::ZERO };
        for i in 0..SERVERS {
            fleet.wait_clients(i, Duration::from_secs(20)).await?;
        }
        fleet.came_up = started.elapsed();
        for i in 0..SERVERS {
            fleet.balancer.wait_state(&fleet.edges[i].name, "UP", Duration::from_secs(10)).await?;
        }
        procs::wait_serving(fleet.balancer.front, "/small", Duration::from_secs(10)).await?;
        Ok(fleet)
    }

    /// The client session ids on every server but `i`: equal before and after
    /// a fault on `i` means the others' sessions never reconnected.
    async fn sessions_except(&self, i: usize) -> Vec<Vec<String>> {
        let mut out = Vec::new();
        for (j, e) in self.edges.iter().enumerate() {
            if j != i {
                out.push(of_clients_on(e.admin, |c| c.session_id).await);
            }
        }
        out
    }

    /// Waits until both clients are registered on server `i`.
    async fn wait_clients(&self, i: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while clients_on(self.edges[i].admin).await != ["ha-1", "ha-2"] {
            if Instant::now() > deadline {
                let logs: Vec<String> = std::fs::read_dir(&self.dir.0)?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .map(|p| procs::log_tail(&p))
                    .collect();
                bail!("both clients not on {} within {within:?}\n{}", self.edges[i].name, logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until server `i` listens on its gRPC port again; when it did.
    async fn wait_listening(&self, i: usize) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(self.edges[i].grpc).await.is_err() {
            if Instant::now() > deadline {
                bail!("{} did not listen again", self.edges[i].name);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(Instant::now())
    }

    /// Starts server `i` again; how long after it listened both clients were registered on it.
    async fn restart(&mut self, i: usize) -> anyhow::Result<Duration> {
        self.edges[i].start(&self.bins, &self.dir)?;
        let listening = self.wait_listening(i).await?;
        self.wait_clients(i, Duration::from_secs(20)).await?;
        let rejoined = listening.elapsed();
        self.balancer.wait_state(&self.edges[i].name, "UP", Duration::from_secs(10)).await?;
        Ok(rejoined)
    }

    fn load(&self, stop: &CancellationToken) -> tokio::task::JoinHandle<Vec<Sent>> {
        tokio::spawn(open_loop(format!("http://{}/slow?ms=20", self.balancer.front), RATE, DEADLINE, stop.clone()))
    }
}

/// One cell's figures.
struct Row {
    what: String,
    sent: usize,
    failed: usize,
    /// Failed among those sent after HAProxy had marked the server down.
    failed_after_down: usize,
    worst: Duration,
    notes: String,
    first_failure: Option<String>,
}

impl Row {
    fn new(what: &str, sent: &[Sent], down_at: Option<Instant>, notes: String) -> Row {
        let failed: Vec<&Sent> = sent.iter().filter(|s| !s.ok).collect();
        Row {
            what: what.to_string(),
            sent: sent.len(),
            failed: failed.len(),
            failed_after_down: down_at.map_or(0, |d| failed.iter().filter(|s| s.at > d).count()),
            worst: sent.iter().map(|s| s.took).max().unwrap_or_default(),
            notes,
            first_failure: failed.first().map(|s| s.error.clone()),
        }
    }
}

/// Runs the cells and prints the tables.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let upstream = crate::upstream::start().await?;
    let result = match haproxy() {
        Ok(haproxy) => behind_haproxy(bins, &haproxy, upstream.addr, cfg).await,
        Err(why) => {
            println!("\n### Several servers behind HAProxy\n\nskipped: {why}");
            Ok(())
        }
    };
    let result = match result {
        Ok(()) => sessions_cost(bins, upstream.addr, cfg).await,
        Err(e) => Err(e),
    };
    upstream.stop();
    result
}

/// The fault cells behind HAProxy.
async fn behind_haproxy(bins: &Path, haproxy: &Path, upstream: SocketAddr, cfg: &Config) -> anyhow::Result<()> {
    let mut fleet = Fleet::start(bins, haproxy, upstream).await?;
    let mut rows = Vec::new();

    // kill -9 of edge-1.
    let stop = CancellationToken::new();
    let traffic = fleet.load(&stop);
    tokio::time::sleep(cfg.settle).await;
    let others = fleet.sessions_except(0).await;
    let killed_at = Instant::now();
    signal(fleet.edges[0].child()?, "KILL")?;
    fleet.edges[0].exited(Duration::from_secs(5)).await?;
    let down_at = fleet.balancer.wait_state("edge-1", "DOWN", Duration::from_secs(10)).await?;
    tokio::time::sleep(cfg.settle).await;
    let rejoin = fleet.restart(0).await?;
    tokio::time::sleep(cfg.settle).await;
    stop.cancel();
    let sent = traffic.await?;
    let untouched = others == fleet.sessions_except(0).await;
    let in_flight_fail_slowest = sent.iter().filter(|s| !s.ok).map(|s| s.took).max().unwrap_or_default();
    rows.push(Row::new(
        "kill -9 one server",
        &sent,
        Some(down_at),
        format!(
            "down in HAProxy {:.2} s after the kill; clients back {:.0} ms after it listened again; slowest failure {:.0} ms; other servers' sessions {}",
            (down_at - killed_at).as_secs_f64(),
            rejoin.as_secs_f64() * 1000.0,
            in_flight_fail_slowest.as_secs_f64() * 1000.0,
            if untouched { "untouched" } else { "RECONNECTED" }
        ),
    ));

    // SIGSTOP of edge-2, SIGCONT after `stopped`.
    let stop = CancellationToken::new();
    let traffic = fleet.load(&stop);
    tokio::time::sleep(cfg.settle).await;
    let others = fleet.sessions_except(1).await;
    let stopped_at = Instant::now();
    signal(fleet.edges[1].child()?, "STOP")?;
    let down_at = fleet.balancer.wait_state("edge-2", "DOWN", Duration::from_secs(10)).await?;
    tokio::time::sleep(cfg.stopped.saturating_sub(stopped_at.elapsed())).await;
    signal(fleet.edges[1].child()?, "CONT")?;
    let resumed = Instant::now();
    fleet.wait_clients(1, Duration::from_secs(30)).await?;
    let up_at = fleet.balancer.wait_state("edge-2", "UP", Duration::from_secs(30)).await?;
    tokio::time::sleep(cfg.settle).await;
    stop.cancel();
    let sent = traffic.await?;
    let untouched = others == fleet.sessions_except(1).await;
    rows.push(Row::new(
        &format!("SIGSTOP one server for {} s", cfg.stopped.as_secs()),
        &sent,
        Some(down_at),
        format!(
            "down in HAProxy {:.2} s after the stop, up {:.2} s after SIGCONT; other servers' sessions {}",
            (down_at - stopped_at).as_secs_f64(),
            (up_at - resumed).as_secs_f64(),
            if untouched { "untouched" } else { "RECONNECTED" }
        ),
    ));

    // SIGTERM of edge-3 with drain_delay, slow requests in flight.
    let stop = CancellationToken::new();
    let traffic = fleet.load(&stop);
    tokio::time::sleep(cfg.settle).await;
    let client = crate::load::client();
    let mut slow = JoinSet::new();
    for i in 0..SLOW_REQUESTS {
        let (c, url) = (client.clone(), format!("http://{}/slow?ms=1500&i={i}", fleet.balancer.front));
        slow.spawn(async move { timed_get(&c, url, Duration::from_secs(15)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term_at = Instant::now();
    signal(fleet.edges[2].child()?, "TERM")?;
    let down_at = fleet.balancer.wait_state("edge-3", "DOWN", Duration::from_secs(10)).await?;
    fleet.edges[2].exited(Duration::from_secs(20)).await?;
    let exited = term_at.elapsed();
    let rejoin = fleet.restart(2).await?;
    tokio::time::sleep(cfg.settle).await;
    stop.cancel();
    let mut sent = traffic.await?;
    while let Some(r) = slow.join_next().await {
        sent.push(r?);
    }
    rows.push(Row::new(
        &format!("SIGTERM one server, drain_delay {DRAIN_DELAY}, {SLOW_REQUESTS} slow requests in flight"),
        &sent,
        None,
        format!(
            "down in HAProxy {:.2} s after SIGTERM; exited after {:.2} s; clients back {:.0} ms after it listened again",
            (down_at - term_at).as_secs_f64(),
            exited.as_secs_f64(),
            rejoin.as_secs_f64() * 1000.0
        ),
    ));

    // Rolling restart: each server in turn, SIGTERM, exit, start, wait until HAProxy has it UP.
    let stop = CancellationToken::new();
    let traffic = fleet.load(&stop);
    tokio::time::sleep(cfg.settle).await;
    let mut rejoins = Vec::new();
    for i in 0..SERVERS {
        signal(fleet.edges[i].child()?, "TERM")?;
        fleet.edges[i].exited(Duration::from_secs(20)).await?;
        rejoins.push(format!("{:.0}", fleet.restart(i).await?.as_secs_f64() * 1000.0));
    }
    tokio::time::sleep(cfg.settle).await;
    stop.cancel();
    let sent = traffic.await?;
    rows.push(Row::new(
        "rolling restart of all 3 servers (SIGTERM, exit, start, UP)",
        &sent,
        None,
        format!("clients back {} ms after each listened again", rejoins.join(" / ")),
    ));

    println!("\n### Several servers behind HAProxy: 3 servers, 2 clients on all 3, {RATE} req/s open loop through HAProxy, 5 s deadline\n");
    println!(
        "both clients registered on all 3 servers {:.0} ms after the clients started\n",
        fleet.came_up.as_secs_f64() * 1000.0
    );
    println!("| what | requests | failed | failed after HAProxy marked it down | worst latency ms | notes |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let why = r.first_failure.as_ref().map(|f| format!(" (first: {f})")).unwrap_or_default();
        println!(
            "| {} | {} | {}{why} | {} | {:.0} | {} |",
            r.what,
            r.sent,
            r.failed,
            r.failed_after_down,
            r.worst.as_secs_f64() * 1000.0,
            r.notes
        );
    }
    Ok(())
}

/// `n` client processes of group "ha" (ids `{tag}-1`...), each given every
/// one of `servers` and `extra` keys; their configs and logs in `dir`.
fn start_clients(
    bins: &Path,
    dir: &TempDir,
    tag: &str,
    servers: &[SocketAddr],
    upstream: SocketAddr,
    n: usize,
    extra: &str,
) -> anyhow::Result<Vec<Child>> {
    let list: Vec<String> = servers.iter().map(|g| format!("\"http://{g}\"")).collect();
    let mut out = Vec::new();
    for i in 1..=n {
        let path = dir.join(&format!("{tag}-client-{i}.toml"));
        std::fs::write(
            &path,
            format!(
                "servers = [{}]\nclient_id = \"{tag}-{i}\"\ngroup = \"ha\"\ntoken = \"ha-token\"\nlog_level = \"warn\"\n{extra}[upstreams]\nweb = \"http://{upstream}\"\n",
                list.join(", ")
            ),
        )?;
        out.push(spawn(
            &bins.join("tunnel-client"),
            &[OsStr::new("--config"), path.as_os_str()],
            &dir.join(&format!("{tag}-client-{i}.log")),
        )?);
    }
    Ok(out)
}

/// What a session per server costs: for 1, 3 and 5 servers, `cfg.clients`
/// client processes each holding a session to every server (heartbeats every
/// second, so their cost shows): each client's RSS and idle CPU, and the
/// first server's RSS per client.
async fn sessions_cost(bins: &Path, upstream: SocketAddr, cfg: &Config) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for servers in [1usize, 3, 5] {
        let dir = TempDir::new(&format!("sessions-{servers}"))?;
        // One-second heartbeats: the per-session work an idle client does.
        let mut edges = (1..=servers)
            .map(|i| Edge::new(&dir, i, "heartbeat_interval = \"1s\"\n"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        for e in &mut edges {
            e.start(bins, &dir)?;
        }
        let first = &edges[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        while procs::snapshot(first.admin).await.is_err() {
            if Instant::now() > deadline {
                bail!("{} did not start\n{}", first.name, procs::log_tail(&dir.join("edge-1-1.log")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let server_pid = first.child()?.id().context("server pid")?;
        let server_idle = procs::status_kib(server_pid, "VmRSS");
        let grpc: Vec<SocketAddr> = edges.iter().map(|e| e.grpc).collect();
        let clients = start_clients(bins, &dir, "cost", &grpc, upstream, cfg.clients, "worker_threads = 1\n")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for e in &edges {
            loop {
                let on = procs::snapshot(e.admin).await.map(|u| u.streams.len()).unwrap_or(0);
                if on == cfg.clients * 3 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{} clients not all on {}: {on} streams", cfg.clients, e.name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let pids: Vec<u32> = clients.iter().filter_map(|c| c.id()).collect();
        let cpu_before: Duration = pids.iter().map(|&p| procs::cpu_time(p)).sum();
        let t = Instant::now();
        tokio::time::sleep(cfg.idle).await;
        let cpu = pids.iter().map(|&p| procs::cpu_time(p)).sum::<Duration>().saturating_sub(cpu_before);
        let per_client_cpu = cpu.as_secs_f64() * 1000.0 / t.elapsed().as_secs_f64() / pids.len() as f64;
        let rss: u64 = pids.iter().map(|&p| procs::status_kib(p, "VmRSS")).sum::<u64>() / pids.len() as u64;
        let server_rss = procs::status_kib(server_pid, "VmRSS");
        let per_client_server = server_rss.saturating_sub(server_idle) as f64 / cfg.clients as f64;
        rows.push((servers, rss, per_client_cpu, per_client_server));
        drop(clients);
        drop(edges);
    }
    println!(
        "\n### A session per server: {} client processes on 1, 3 and 5 servers, heartbeats every second, idle\n",
        cfg.clients
    );
    println!("| servers per client | client RSS MiB | client CPU ms/s idle | first server's RSS per client KiB |");
    println!("|---|---|---|---|");
    for (servers, rss, cpu, per_client) in rows {
        println!("| {servers} | {:.1} | {cpu:.2} | {per_client:.0} |", rss as f64 / 1024.0);
    }
    Ok(())
}

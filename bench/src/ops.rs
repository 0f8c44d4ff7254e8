//! Deploys under load, with real processes: a server and two clients of one
//! group behind an open-loop load of 200 req/s (each request with a 5 s
//! deadline, counted failed unless it gets 200 in full). Three cells:
//! restarting each client in turn (SIGTERM, wait for the exit, start again),
//! ten reloads of server.toml by SIGHUP, and SIGTERM on the server with 50
//! slow requests in flight.

use crate::procs::{self, free_port, signal, spawn, TempDir};
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Child;
use tokio::task::JoinSet;

const RATE: u32 = 200;
const DEADLINE: Duration = Duration::from_secs(5);
const SLOW_REQUESTS: usize = 50;

/// Lengths of one run.
pub struct Config {
    /// Load before, between and after the restarts or reloads.
    settle: Duration,
    reloads: usize,
}

impl Config {
    pub fn new(quick: bool) -> Self {
        if quick {
            Config { settle: Duration::from_millis(500), reloads: 3 }
        } else {
            Config { settle: Duration::from_secs(2), reloads: 10 }
        }
    }
}

/// A load run's count.
#[derive(Default)]
struct Count {
    sent: u64,
    failed: u64,
    first_failure: Option<String>,
}

/// Requests GET `url` at RATE per second until `stop` fires.
async fn load(url: String, stop: tokio_util::sync::CancellationToken) -> Count {
    let client = crate::load::client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / RATE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = JoinSet::new();
    let mut count = Count::default();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        count.sent += 1;
        let (c, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            match tokio::time::timeout(DEADLINE, crate::load::get_ok(&c, url)).await {
                Err(_) => Err("no answer within 5s".to_string()),
                Ok(r) => r,
            }
        });
        while let Some(r) = tasks.try_join_next() {
            count.record(r);
        }
    }
    let deadline = tokio::time::Instant::now() + DEADLINE + Duration::from_secs(1);
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next()).await {
        count.record(r);
    }
    count.failed += tasks.len() as u64;
    tasks.abort_all();
    count
}

impl Count {
    fn record(&mut self, r: Result<Result<(), String>, tokio::task::JoinError>) {
        let failure = match r {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(e) => e.to_string(),
        };
        self.failed += 1;
        self.first_failure.get_or_insert(failure);
    }
}

struct Fleet {
    dir: TempDir,
    bins: PathBuf,
    http: SocketAddr,
    server_config: PathBuf,
    server: Child,
    clients: Vec<Option<Child>>,
    /// Client processes started, for their log names.
    starts: usize,
}

fn server_toml(http: SocketAddr, grpc: SocketAddr, admin: SocketAddr, variant: usize) -> String {
    // Each reload changes a pushed setting and the rules.
    let heartbeat = if variant.is_multiple_of(2) { "5s" } else { "4s" };
    let extra = if variant % 3 == 1 {
        "[[rules]]\npath_prefix = \"/extra\"\ngroup = \"ops\"\nupstream = \"web\"\n"
    } else {
        ""
    };
    format!(
        "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nshutdown_grace = \"10s\"\n[[groups]]\nname = \"ops\"\ntoken = \"ops-token\"\nheartbeat_interval = \"{heartbeat}\"\n{extra}[[rules]]\ngroup = \"ops\"\nupstream = \"web\"\ntimeout = \"10s\"\n"
    )
}

impl Fleet {
    async fn start(bins: &Path, upstream: SocketAddr) -> anyhow::Result<Fleet> {
        let dir = TempDir::new("ops")?;
        let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
        let server_config = dir.join("server.toml");
        std::fs::write(&server_config, server_toml(http, grpc, admin, 0))?;
        let server = spawn(
            &bins.join("tunnel-server"),
            &[OsStr::new("--config"), server_config.as_os_str()],
            &dir.join("server.log"),
        )?;
        for i in 1..=2 {
            std::fs::write(
                dir.join(&format!("client-{i}.toml")),
                format!(
                    "server = \"http://{grpc}\"\nclient_id = \"ops-{i}\"\ngroup = \"ops\"\ntoken = \"ops-token\"\nshutdown_grace = \"10s\"\n[upstreams]\nweb = \"http://{upstream}\"\n"
                ),
            )?;
        }
        let mut fleet =
            Fleet { dir, bins: bins.to_path_buf(), http, server_config, server, clients: vec![None, None], starts: 0 };
        for i in 0..2 {
            fleet.start_client(i)?;
        }
        // Both clients' streams registered: requests spread over both.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let streams = procs::snapshot(admin).await.map(|u| u.streams.len()).unwrap_or(0);
            if streams == 6 {
                break;
            }
            if Instant::now() > deadline {
                bail!("the fleet did not come up\n{}", procs::log_tail(&fleet.dir.join("server.log")));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        procs::wait_serving(http, "/small", Duration::from_secs(10)).await?;
        Ok(fleet)
    }

    fn start_client(&mut self, i: usize) -> anyhow::Result<()> {
        let config = self.dir.join(&format!("client-{}.toml", i + 1));
        self.starts += 1;
        let log = self.dir.join(&format!("client-{}-start{}.log", i + 1, self.starts));
        self.clients[i] =
            Some(spawn(&self.bins.join("tunnel-client"), &[OsStr::new("--config"), config.as_os_str()], &log)?);
        Ok(())
    }

    /// SIGTERM, wait for the exit (the drain), start again; the exit status.
    async fn restart_client(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self.clients[i].take().context("client running")?;
        signal(&child, "TERM")?;
        let status = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.context("client exit")??;
        self.start_client(i)?;
        Ok(status)
    }
}

/// Runs the three cells and prints the table.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let upstream = crate::upstream::start().await?;
    let mut rows = Vec::new();

    // Rolling restart of both clients.
    let mut fleet = Fleet::start(bins, upstream.addr).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn(load(format!("http://{}/slow?ms=20", fleet.http), stop.clone()));
    tokio::time::sleep(cfg.settle).await;
    let mut exits = Vec::new();
    for i in 0..2 {
        let t = Instant::now();
        let status = fleet.restart_client(i).await?;
        exits.push(format!("exit {} after {:.2} s", status.code().unwrap_or(-1), t.elapsed().as_secs_f64()));
        tokio::time::sleep(cfg.settle).await;
    }
    stop.cancel();
    let c = traffic.await?;
    rows.push(("restart both clients in turn (SIGTERM, wait, start)".to_string(), c, exits.join(", ")));

    // Reloads by SIGHUP.
    let stop = tokio_util::sync::CancellationToken::new();
    let traffic = tokio::spawn(load(format!("http://{}/slow?ms=20", fleet.http), stop.clone()));
    let (grpc, admin) = parse_listens(&fleet.server_config)?;
    for n in 1..=cfg.reloads {
        tokio::time::sleep(cfg.settle / 2).await;
        std::fs::write(&fleet.server_config, server_toml(fleet.http, grpc, admin, n))?;
        signal(&fleet.server, "HUP")?;
    }
    tokio::time::sleep(cfg.settle).await;
    stop.cancel();
    let c = traffic.await?;
    rows.push((format!("{} reloads of server.toml (SIGHUP)", cfg.reloads), c, String::new()));

    // SIGTERM on the server with slow requests in flight.
    let client = crate::load::client();
    let mut slow = JoinSet::new();
    for i in 0..SLOW_REQUESTS {
        let (c, url) = (client.clone(), format!("http://{}/slow?ms=2000&i={i}", fleet.http));
        slow.spawn(async move {
            let req = http::Request::get(url).body(crate::load::empty()).ok()?;
            let r = tokio::time::timeout(Duration::from_secs(15), c.request(req)).await.ok()?.ok()?;
            Some(r.status() == http::StatusCode::OK)
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    signal(&fleet.server, "TERM")?;
    let exit = tokio::time::timeout(Duration::from_secs(20), fleet.server.wait()).await.context("server exit")??;
    let exited = t.elapsed();
    let mut ok = 0u64;
    while let Some(r) = slow.join_next().await {
        if matches!(r, Ok(Some(true))) {
            ok += 1;
        }
    }
    let c = Count {
        sent: SLOW_REQUESTS as u64,
        failed: SLOW_REQUESTS as u64 - ok,
        first_failure: (ok < SLOW_REQUESTS as u64).then(|| "not 200".to_string()),
    };
    let note = format!("exit {} after {:.2} s (grace 10 s)", exit.code().unwrap_or(-1), exited.as_secs_f64());
    rows.push((format!("server SIGTERM with {SLOW_REQUESTS} requests of 2 s in flight"), c, note));
    upstream.stop();

    println!("\n### Deploys under load: real processes, {RATE} req/s open loop, 5 s deadline per request\n");
    println!("| what | requests | failed | notes |");
    println!("|---|---|---|---|");
    for (what, c, note) in rows {
        let why = c.first_failure.map(|f| format!(" (first: {f})")).unwrap_or_default();
        println!("| {what} | {} | {}{why} | {note} |", c.sent, c.failed);
    }
    Ok(())
}

/// The grpc and admin addresses of a server.toml this module wrote.
fn parse_listens(path: &Path) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let cfg = tunnel_lib::config::ServerConfig::from_file(path)?;
    Ok((cfg.server.grpc_listen, cfg.server.admin_listen))
}

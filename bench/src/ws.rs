//! WebSocket through the tunnel against the same echo server reached
//! directly, in one run: pipelined echo throughput, one-at-a-time round
//! trips, and a 16 MiB message. The daemons are real processes; the echo
//! server and the client run in this process.

use crate::procs::{self, free_port, spawn, TempDir};
use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Sizes of one run.
pub struct Config {
    /// Small messages echoed, pipelined on one connection.
    echoes: usize,
    /// One-at-a-time round trips, for latency.
    round_trips: usize,
    /// 16 MiB messages, each echoed.
    big: usize,
}

impl Config {
    pub fn new(quick: bool) -> Self {
        if quick {
            Config { echoes: 5_000, round_trips: 200, big: 1 }
        } else {
            Config { echoes: 100_000, round_trips: 2_000, big: 5 }
        }
    }
}

const BIG: usize = 16 << 20;
/// A bound on every wait, so a stuck tunnel fails the run instead of hanging it.
const WAIT: Duration = Duration::from_secs(60);

fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

/// An echo server on 127.0.0.1: every message back, as is. Aborted on drop.
struct Echo {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_echo() -> anyhow::Result<Echo> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            // Ends when its connection closes.
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async_with_config(tcp, Some(ws_config())).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(Echo { addr, task })
}

async fn connect(addr: SocketAddr) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}/echo"), tcp, Some(ws_config())).await?;
    Ok(ws)
}

/// What one route measured.
struct Figures {
    echo_per_s: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    big_ms: f64,
}

async fn next(
    ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
) -> anyhow::Result<Message> {
    match tokio::time::timeout(WAIT, ws.next()).await {
        Err(_) => bail!("no echo within {WAIT:?}"),
        Ok(None) => bail!("connection closed"),
        Ok(Some(m)) => Ok(m?),
    }
}

async fn measure(addr: SocketAddr, cfg: &Config) -> anyhow::Result<Figures> {
    // Pipelined: a writer sends all while this reads, as a chatty app does.
    let (mut tx, mut rx) = connect(addr).await?.split();
    let n = cfg.echoes;
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            tx.send(Message::text(format!("message {i:08}"))).await?;
        }
        anyhow::Ok(tx)
    });
    for i in 0..n {
        let m = next(&mut rx).await?;
        if m.to_text().ok() != Some(format!("message {i:08}").as_str()) {
            bail!("echo {i} out of order or altered: {m:?}");
        }
    }
    let echo_per_s = n as f64 / started.elapsed().as_secs_f64();
    drop(writer.await??);

    // One at a time: the latency of a message each way.
    let mut ws = connect(addr).await?;
    let mut rtts = Vec::with_capacity(cfg.round_trips);
    for _ in 0..cfg.round_trips {
        let t = Instant::now();
        ws.send(Message::text("ping")).await?;
        next(&mut ws).await?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }
    rtts.sort_by(f64::total_cmp);
    let pct = |p: f64| rtts[((rtts.len() as f64 * p) as usize).min(rtts.len() - 1)];

    // 16 MiB messages: sent, echoed whole, checked.
    let payload = Bytes::from((0..BIG).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let mut times = Vec::new();
    for _ in 0..cfg.big {
        let t = Instant::now();
        ws.send(Message::Binary(payload.clone())).await?;
        match next(&mut ws).await? {
            Message::Binary(b) if b == payload => {}
            _ => bail!("the 16 MiB message came back altered"),
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(Figures { echo_per_s, rtt_p50_us: pct(0.5), rtt_p99_us: pct(0.99), big_ms: times[times.len() / 2] })
}

/// The tunnel's daemons, routing everything to the echo server.
async fn start_tunnel(
    bins: &Path,
    dir: &TempDir,
    echo: SocketAddr,
) -> anyhow::Result<(SocketAddr, Vec<tokio::process::Child>)> {
    let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
    let server_toml = format!(
        "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\n[[groups]]\nname = \"ws\"\ntoken = \"ws-token\"\n[[rules]]\ngroup = \"ws\"\nupstream = \"echo\"\n"
    );
    let client_toml = format!(
        "server = \"http://{grpc}\"\nclient_id = \"ws-bench\"\ngroup = \"ws\"\ntoken = \"ws-token\"\n[upstreams]\necho = \"http://{echo}\"\n"
    );
    let (sc, cc) = (dir.join("ws-server.toml"), dir.join("ws-client.toml"));
    std::fs::write(&sc, server_toml)?;
    std::fs::write(&cc, client_toml)?;
    let logs = [dir.join("ws-server.log"), dir.join("ws-client.log")];
    let server = spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), sc.as_os_str()], &logs[0])?;
    let client = spawn(&bins.join("tunnel-client"), &[OsStr::new("--config"), cc.as_os_str()], &logs[1])?;
    // Up when a WebSocket handshake goes through end to end.
    let deadline = Instant::now() + Duration::from_secs(20);
    while connect(http).await.is_err() {
        if Instant::now() > deadline {
            let tails: Vec<String> = logs.iter().map(|l| procs::log_tail(l)).collect();
            bail!("the tunnel did not pass a WebSocket handshake within 20s\n{}", tails.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((http, vec![server, client]))
}

/// Runs both routes and prints the table.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let dir = TempDir::new("ws")?;
    let echo = start_echo().await?;
    let (tunnel, _children) = start_tunnel(bins, &dir, echo.addr).await.context("starting the tunnel")?;
    let direct = measure(echo.addr, cfg).await.context("direct")?;
    let through = measure(tunnel, cfg).await.context("through the tunnel")?;
    println!("\n### WebSocket: echo server direct vs through the tunnel (same run)\n");
    println!(
        "{} messages pipelined on one connection; {} one-at-a-time round trips; {} x 16 MiB message echoed.\n",
        cfg.echoes, cfg.round_trips, cfg.big
    );
    println!("| route | echo msg/s | round trip p50 µs | round trip p99 µs | 16 MiB echo ms (median) |");
    println!("|---|---|---|---|---|");
    for (name, f) in [("direct", &direct), ("tunnel", &through)] {
        println!("| {name} | {:.0} | {:.0} | {:.0} | {:.1} |", f.echo_per_s, f.rtt_p50_us, f.rtt_p99_us, f.big_ms);
    }
    Ok(())
}

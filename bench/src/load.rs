//! The loads the bench puts on the tunnel, each bounded in time and count.

use anyhow::bail;
use bytes::Bytes;
use http::Request;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// One load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Nothing but heartbeats.
    Idle,
    /// Parallel large downloads and uploads through the same client.
    Bulk,
    /// Many requests parked on a slow upstream, plus a steady rate of small ones.
    Slow,
    /// Public clients reading big responses at a trickle, plus small requests:
    /// the load that stalls heartbeats on a naively multiplexed stream.
    SlowReader,
    /// Bulk over a link with delay and loss (see `lossy`).
    Lossy,
}

impl Scenario {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        Ok(match s {
            "idle" => Scenario::Idle,
            "bulk" => Scenario::Bulk,
            "slow" => Scenario::Slow,
            "slowreader" => Scenario::SlowReader,
            "lossy" => Scenario::Lossy,
            other => bail!("unknown scenario {other:?} (idle, bulk, slow, slowreader, lossy)"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Bulk => "bulk",
            Scenario::Slow => "slow+small",
            Scenario::SlowReader => "slow reader+small",
            Scenario::Lossy => "bulk, lossy link",
        }
    }
}

/// Sizes of the loads.
pub struct Config {
    /// Small loads, for `--quick`.
    pub quick: bool,
    pub duration: Duration,
    /// Pause after start-up so the pushed config (1 s heartbeats) is in force.
    pub settle: Duration,
    /// Downloads and, as many, uploads running at once.
    bulk_parallel: usize,
    /// Size of each transfer (a task starts another while time remains).
    bulk_size: u64,
    slow_in_flight: usize,
    slow_ms: u64,
    small_per_second: u32,
    /// Public clients reading at SLOW_READ_RATE.
    slow_readers: usize,
}

/// How fast a slow reader reads, bytes per second.
const SLOW_READ_RATE: u64 = 100_000;

impl Config {
    /// The full loads, or small ones for `--quick`.
    pub fn new(quick: bool, duration: Option<Duration>) -> Self {
        if quick {
            Config {
                quick,
                duration: duration.unwrap_or(Duration::from_millis(1500)),
                settle: Duration::from_millis(500),
                bulk_parallel: 4,
                bulk_size: 64 << 20,
                slow_in_flight: 200,
                slow_ms: 2000,
                small_per_second: 100,
                slow_readers: 4,
            }
        } else {
            Config {
                quick,
                duration: duration.unwrap_or(Duration::from_secs(60)),
                settle: Duration::from_secs(2),
                bulk_parallel: 4,
                bulk_size: 1 << 30,
                slow_in_flight: 1000,
                slow_ms: 5000,
                small_per_second: 500,
                slow_readers: 8,
            }
        }
    }

    /// The loads, in words, for the table's caption.
    pub fn describe(&self) -> String {
        format!(
            "bulk: {} downloads + {} uploads of {} MiB at a time; lossy link: bulk with {} ms added each way and {}% of packets dropped each way (1500-byte MTU); slow+small: {} requests held {} ms by the upstream + {} small req/s; slow reader: {} downloads read at {} KB/s + {} small req/s.",
            self.bulk_parallel,
            self.bulk_parallel,
            self.bulk_size >> 20,
            crate::lossy::DELAY.as_millis(),
            crate::lossy::LOSS_PERCENT,
            self.slow_in_flight,
            self.slow_ms,
            self.small_per_second,
            self.slow_readers,
            SLOW_READ_RATE / 1000,
            self.small_per_second
        )
    }
}

/// What a load achieved.
pub enum Outcome {
    Idle,
    Bulk { down: u64, up: u64, secs: f64 },
    Slow { small_ok: u64, small_failed: u64, small_p99_ms: u64, slow_ok: u64, slow_failed: u64, secs: f64 },
}

impl Outcome {
    pub fn summary(&self) -> String {
        match self {
            Outcome::Idle => "-".into(),
            Outcome::Bulk { down, up, secs } => {
                format!("{:.0} MB/s down + {:.0} MB/s up", *down as f64 / secs / 1e6, *up as f64 / secs / 1e6)
            }
            Outcome::Slow { small_ok, small_failed, small_p99_ms, slow_ok, slow_failed, secs } => {
                let small = format!(
                    "{:.0} small req/s (p99 {small_p99_ms} ms, {small_failed} failed)",
                    *small_ok as f64 / secs
                );
                if slow_ok + slow_failed == 0 {
                    small
                } else {
                    format!("{small}, {slow_ok} slow ok, {slow_failed} failed")
                }
            }
        }
    }
}

/// A request or response body of the bench's client.
pub type Body = BoxBody<Bytes, Infallible>;

/// The bench's HTTP client.
pub type HttpClient = Client<HttpConnector, Body>;

/// A pooled HTTP/1.1 client with TCP_NODELAY.
pub fn client() -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(2048).build(c)
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().boxed()
}

/// GETs `url` and reads the whole body: Ok only for a 200 in full, else why not.
pub async fn get_ok(client: &HttpClient, url: String) -> Result<(), String> {
    let req = http::Request::get(url).body(empty()).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e}"))?;
    let status = resp.status();
    http_body_util::BodyExt::collect(resp.into_body()).await.map_err(|e| format!("body cut: {e}"))?;
    if status == http::StatusCode::OK {
        Ok(())
    } else {
        Err(format!("status {status}"))
    }
}

/// Runs `scenario` against the tunnel's public address for the configured time.
pub async fn run(scenario: Scenario, http: SocketAddr, cfg: &Config) -> Outcome {
    let start = Instant::now();
    let deadline = start + cfg.duration;
    match scenario {
        Scenario::Idle => {
            tokio::time::sleep_until(deadline).await;
            Outcome::Idle
        }
        Scenario::Bulk | Scenario::Lossy => bulk(http, cfg, deadline).await,
        Scenario::Slow => slow(http, cfg, deadline, cfg.slow_in_flight, 0).await,
        Scenario::SlowReader => slow(http, cfg, deadline, 0, cfg.slow_readers).await,
    }
}

async fn bulk(http: SocketAddr, cfg: &Config, deadline: Instant) -> Outcome {
    let start = Instant::now();
    let down = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let c = client();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..cfg.bulk_parallel {
        let (dc, down, size) = (c.clone(), down.clone(), cfg.bulk_size);
        tasks.spawn(async move {
            while Instant::now() < deadline {
                let req = Request::get(format!("http://{http}/bytes?n={size}")).body(empty());
                let Ok(req) = req else { return };
                let Ok(resp) = dc.request(req).await else { return };
                let mut body = resp.into_body();
                while let Some(Ok(f)) = body.frame().await {
                    down.fetch_add(f.data_ref().map_or(0, |d| d.len() as u64), Ordering::Relaxed);
                }
            }
        });
        let (c, up, size) = (c.clone(), up.clone(), cfg.bulk_size);
        tasks.spawn(async move {
            static BLOCK: [u8; 65536] = [b'u'; 65536];
            while Instant::now() < deadline {
                let counter = up.clone();
                let chunks = (0..size / BLOCK.len() as u64).map(move |_| {
                    counter.fetch_add(BLOCK.len() as u64, Ordering::Relaxed);
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(&BLOCK)))
                });
                let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
                let Ok(req) = Request::post(format!("http://{http}/sink")).body(body) else { return };
                if c.request(req).await.is_err() {
                    return;
                }
            }
        });
    }
    // Transfers in progress at the deadline are cut there: count what moved.
    let _ = tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    let secs = start.elapsed().as_secs_f64();
    Outcome::Bulk { down: down.load(Ordering::Relaxed), up: up.load(Ordering::Relaxed), secs }
}

/// Reads a huge response at SLOW_READ_RATE until the deadline.
async fn trickle(c: Client<HttpConnector, Body>, http: SocketAddr, deadline: Instant) {
    let Ok(req) = Request::get(format!("http://{http}/bytes?n={}", 8u64 << 30)).body(empty()) else { return };
    let Ok(Ok(resp)) = tokio::time::timeout_at(deadline, c.request(req)).await else { return };
    let mut body = resp.into_body();
    let mut read = 0u64;
    let start = Instant::now();
    while Instant::now() < deadline {
        let Ok(Some(Ok(f))) = tokio::time::timeout_at(deadline, body.frame()).await else { return };
        read += f.data_ref().map_or(0, |d| d.len() as u64);
        // Sleep until this many bytes are due at the trickle rate.
        let due = start + Duration::from_secs_f64(read as f64 / SLOW_READ_RATE as f64);
        tokio::time::sleep_until(due.min(deadline)).await;
    }
}

/// `parked` requests held by a slow upstream and `trickling` slow readers,
/// plus a steady rate of small requests.
async fn slow(http: SocketAddr, cfg: &Config, deadline: Instant, parked_count: usize, trickling: usize) -> Outcome {
    let c = client();
    let slow_ok = Arc::new(AtomicU64::new(0));
    let slow_failed = Arc::new(AtomicU64::new(0));
    let timeout = Duration::from_millis(cfg.slow_ms) + Duration::from_secs(10);
    let mut parked = tokio::task::JoinSet::new();
    for _ in 0..trickling {
        parked.spawn(trickle(c.clone(), http, deadline));
    }
    for _ in 0..parked_count {
        let (c, ok, failed, ms) = (c.clone(), slow_ok.clone(), slow_failed.clone(), cfg.slow_ms);
        parked.spawn(async move {
            while Instant::now() < deadline {
                let Ok(req) = Request::get(format!("http://{http}/slow?ms={ms}")).body(empty()) else { return };
                let done = match tokio::time::timeout(timeout, c.request(req)).await {
                    Ok(Ok(r)) => r.status().is_success() && r.into_body().collect().await.is_ok(),
                    _ => false,
                };
                if done {
                    ok.fetch_add(1, Ordering::Relaxed)
                } else {
                    failed.fetch_add(1, Ordering::Relaxed)
                };
            }
        });
    }
    // The steady small load: one request every 1/rate, each on its own task.
    let mut small = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / cfg.small_per_second);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < deadline {
        tick.tick().await;
        let c = c.clone();
        small.spawn(async move {
            let t = Instant::now();
            let req = Request::get(format!("http://{http}/small")).body(empty()).ok()?;
            let r = tokio::time::timeout(Duration::from_secs(10), c.request(req)).await.ok()?.ok()?;
            if !r.status().is_success() {
                return None;
            }
            r.into_body().collect().await.ok()?;
            Some(t.elapsed().as_millis() as u64)
        });
    }
    let mut latencies = Vec::new();
    let mut small_failed = 0;
    let drain = async {
        while let Some(r) = small.join_next().await {
            match r {
                Ok(Some(ms)) => latencies.push(ms),
                _ => small_failed += 1,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(15), drain).await;
    small.abort_all();
    parked.abort_all();
    latencies.sort_unstable();
    let p99 = latencies.get((latencies.len() * 99 / 100).min(latencies.len().saturating_sub(1))).copied().unwrap_or(0);
    Outcome::Slow {
        small_ok: latencies.len() as u64,
        small_failed,
        small_p99_ms: p99,
        slow_ok: slow_ok.load(Ordering::Relaxed),
        slow_failed: slow_failed.load(Ordering::Relaxed),
        secs: cfg.duration.as_secs_f64(),
    }
}

/// One request of an open-loop load.
#[derive(Debug, Clone)]
pub struct Sent {
    pub at: std::time::Instant,
    pub took: Duration,
    /// False: it failed (why in `error`).
    pub ok: bool,
    pub error: String,
}

/// One GET given `within`, timed.
pub async fn timed_get(c: &HttpClient, url: String, within: Duration) -> Sent {
    let at = std::time::Instant::now();
    let error = match tokio::time::timeout(within, get_ok(c, url)).await {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => e,
        Err(_) => format!("no answer within {within:?}"),
    };
    Sent { at, took: at.elapsed(), ok: error.is_empty(), error }
}

/// GET `url` at `rate` per second, each sent on time whatever the others
/// do (open loop) and given `deadline`, until `stop` fires; every request.
pub async fn open_loop(
    url: String,
    rate: u32,
    deadline: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<Sent> {
    let client = client();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let (c, url) = (client.clone(), url.clone());
        tasks.spawn(async move { timed_get(&c, url, deadline).await });
    }
    let mut out = Vec::new();
    let bound = tokio::time::Instant::now() + deadline + Duration::from_secs(2);
    while let Ok(Some(r)) = tokio::time::timeout_at(bound, tasks.join_next()).await {
        if let Ok(s) = r {
            out.push(s);
        }
    }
    tasks.abort_all();
    out
}

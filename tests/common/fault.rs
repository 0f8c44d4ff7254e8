//! Fault injection on loopback: a relay that black-holes a link, a tarpit
//! that accepts and never speaks, an upstream that resets mid-body, a server
//! that can crash, and an open-loop load whose every request has a deadline.

use super::{WAIT, *};
use std::sync::Mutex;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

/// A group of clients with 1 s heartbeats reaped after 3 s, and one rule
/// that times out at 2 s: the server the fault and chaos tests run.
pub const FAULT_SERVER: &str = r#"
[server]
heartbeat_timeout = "3s"
shutdown_grace = "2s"
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
group = "demo"
upstream = "web"
timeout = "2s"
"#;

/// A client.toml for `FAULT_SERVER`'s group: quick reconnects, `extra` keys,
/// and its upstream "web".
pub fn client_of(grpc: SocketAddr, id: &str, upstream: &Upstream, extra: &str) -> String {
    format!(
        "server = \"http://{grpc}\"\nclient_id = \"{id}\"\ngroup = \"demo\"\ntoken = \"t-demo\"\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\nshutdown_grace = \"2s\"\n{extra}\n[upstreams]\nweb = \"{}\"\n",
        upstream.url()
    )
}

/// Binds 127.0.0.1:0 and hands each connection to `serve`, on a task of its
/// own, until `stop` fires.
async fn serve_loopback<F, Fut>(stop: CancellationToken, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let tcp = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => match r { Ok((s, _)) => s, Err(_) => continue },
            };
            tokio::spawn(serve(tcp));
        }
    });
    addr
}

/// A TCP relay to `target`. Frozen, it moves no byte either way and closes
/// nothing: to both ends it looks like a peer that froze, or a link that
/// black-holes its packets.
pub struct Relay {
    pub addr: SocketAddr,
    frozen: watch::Sender<bool>,
    stop: CancellationToken,
    /// Ends the connections open now (a `cut`); replaced for later ones.
    current: Arc<Mutex<CancellationToken>>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let (frozen, _) = watch::channel(false);
        let stop = CancellationToken::new();
        let current = Arc::new(Mutex::new(stop.child_token()));
        let (tx, current2) = (frozen.clone(), current.clone());
        let addr = serve_loopback(stop.clone(), move |down| {
            let (tx, generation) = (tx.clone(), current2.lock().unwrap().clone());
            async move {
                let Ok(up) = TcpStream::connect(target).await else { return };
                let (dr, dw) = down.into_split();
                let (ur, uw) = up.into_split();
                tokio::spawn(pipe(dr, uw, tx.subscribe(), generation.clone()));
                tokio::spawn(pipe(ur, dw, tx.subscribe(), generation));
            }
        })
        .await;
        Relay { addr, frozen, stop, current }
    }

    /// Closes every connection through the relay now; new ones pass.
    pub fn cut(&self) {
        let mut g = self.current.lock().unwrap();
        g.cancel();
        *g = self.stop.child_token();
    }

    /// Stops moving bytes; nothing is closed.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Copies until EOF or stop; while frozen neither reads nor writes, so the
/// sender's kernel buffers fill as they would against a stopped process.
async fn pipe(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
    stop: CancellationToken,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = frozen.wait_for(|f| !*f) => if r.is_err() { return },
        }
        let n = tokio::select! {
            _ = stop.cancelled() => return,
            r = r.read(&mut buf) => match r { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        // Frozen while reading: hold what was read until thawed.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = frozen.wait_for(|f| !*f) => {}
        }
        let wrote = tokio::select! {
            _ = stop.cancelled() => return,
            r = w.write_all(&buf[..n]) => r,
        };
        if wrote.is_err() {
            break;
        }
    }
    let _ = w.shutdown().await;
}

/// A connection to the tarpit: when it came, when its peer gave up.
pub type Attempt = (Instant, Option<Instant>);

/// Accepts TCP connections and never sends a byte: a server stuck before
/// its HTTP/2 handshake. Records when each connection came and when its
/// peer gave up on it.
pub struct Tarpit {
    pub addr: SocketAddr,
    pub conns: Arc<Mutex<Vec<Attempt>>>,
    stop: CancellationToken,
}

impl Tarpit {
    pub async fn start() -> Tarpit {
        let conns: Arc<Mutex<Vec<Attempt>>> = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (c2, stop2) = (conns.clone(), stop.clone());
        let addr = serve_loopback(stop.clone(), move |mut tcp| {
            let i = {
                let mut v = c2.lock().unwrap();
                v.push((Instant::now(), None));
                v.len() - 1
            };
            let (c3, stop3) = (c2.clone(), stop2.clone());
            async move {
                let mut sink = [0u8; 4096];
                loop {
                    tokio::select! {
                        _ = stop3.cancelled() => return,
                        r = tcp.read(&mut sink) => if matches!(r, Ok(0) | Err(_)) { break },
                    }
                }
                c3.lock().unwrap()[i].1 = Some(Instant::now());
            }
        })
        .await;
        Tarpit { addr, conns, stop }
    }
}

impl Drop for Tarpit {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// An HTTP/1.1 upstream that answers every request with a head promising
/// `declared` bytes (Content-Length, or chunked when `chunked`), sends
/// `sent` of them, then resets the connection.
pub async fn resetting_upstream(declared: usize, sent: usize, chunked: bool) -> (SocketAddr, CancellationToken) {
    let stop = CancellationToken::new();
    let addr = serve_loopback(stop.clone(), move |mut tcp| async move {
        let mut head = Vec::new();
        let mut b = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut b).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&b[..n]),
            }
        }
        let payload = vec![b'x'; sent];
        let out = if chunked {
            let mut o = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            o.extend_from_slice(format!("{sent:x}\r\n").as_bytes());
            o.extend_from_slice(&payload);
            o.extend_from_slice(b"\r\n");
            o
        } else {
            let mut o = format!("HTTP/1.1 200 OK\r\nContent-Length: {declared}\r\n\r\n").into_bytes();
            o.extend_from_slice(&payload);
            o
        };
        let _ = tcp.write_all(&out).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // SO_LINGER 0: close with RST, not FIN.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        drop(tcp);
    })
    .await;
    (addr, stop)
}

/// A server on a runtime of its own, so that `crash` drops every task and
/// socket at once, as a killed process would.
pub struct OwnServer {
    rt: Option<tokio::runtime::Runtime>,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    /// Fires what SIGTERM fires.
    stop: CancellationToken,
    /// Resolves when `run` has returned.
    stopped: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl OwnServer {
    /// Starts `toml` on the given (public, gRPC, admin) addresses, or on
    /// ephemeral ones when None.
    pub fn start(toml: &str, addrs: Option<(SocketAddr, SocketAddr, SocketAddr)>) -> OwnServer {
        let mut cfg = ServerConfig::from_str_named(toml, "test server.toml").expect("valid test config");
        // Built on a plain thread: a runtime cannot be entered from inside the test's.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
            let listeners = rt.block_on(async {
                match addrs {
                    None => Listeners::ephemeral().await.unwrap(),
                    Some((http, grpc, admin)) => {
                        (cfg.server.http_listen, cfg.server.grpc_listen, cfg.server.admin_listen) = (http, grpc, admin);
                        cfg.server.https_listen = None;
                        cfg.server.metrics_listen = None;
                        Listeners::bind(&cfg).await.expect("the old ports are free again")
                    }
                }
            });
            let (http, grpc, admin) = listeners.addrs().unwrap();
            let server = Server::new(cfg, None);
            let shared = server.shared();
            let stop = CancellationToken::new();
            let (done, stopped) = tokio::sync::oneshot::channel();
            let run = server.run(listeners, stop.clone().cancelled_owned());
            rt.spawn(async move {
                if let Err(e) = run.await {
                    eprintln!("server: {e:#}");
                }
                let _ = done.send(());
            });
            OwnServer { rt: Some(rt), http, grpc, admin, shared, stop, stopped: Some(stopped) }
        })
        .join()
        .unwrap()
    }

    /// (public, gRPC, admin) addresses, to start again on.
    pub fn addrs(&self) -> (SocketAddr, SocketAddr, SocketAddr) {
        (self.http, self.grpc, self.admin)
    }

    /// What SIGTERM does: the server starts draining.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Waits for a stop begun with `begin_stop` to finish.
    pub async fn wait_stopped(mut self) {
        let stopped = self.stopped.take().expect("not waited for before");
        tokio::time::timeout(WAIT, stopped).await.expect("server stops in time").expect("server task ran");
    }

    /// Every task and socket gone at once, no goodbye.
    pub fn crash(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Streams registered by `client_id`.
    pub fn streams_of(&self, client_id: &str) -> usize {
        self.shared.registry.streams().iter().filter(|s| s.client_id == client_id).count()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// One request of an open-loop load.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// When it was sent, from the start of the load.
    pub at: Duration,
    pub sent: Instant,
    pub took: Duration,
    /// None: no response within the deadline, or a transport error (`error`).
    pub status: Option<u16>,
    /// The `x-upstream` that answered.
    pub upstream: Option<String>,
    pub error: Option<String>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.status == Some(200)
    }

    pub fn ended(&self) -> Instant {
        self.sent + self.took
    }
}

/// `rate` requests per second to `url` for `length`, each sent on time
/// whatever the others are doing (open loop), each given `deadline`.
pub async fn open_loop(url: String, rate: u32, length: Duration, deadline: Duration) -> Vec<Outcome> {
    let client = http_client();
    let start = Instant::now();
    let every = Duration::from_secs(1) / rate;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut running = JoinSet::new();
    let total = (length.as_secs_f64() * rate as f64) as usize;
    for i in 0..total {
        tick.tick().await;
        // A unique query per request: the echo names it back, so a response
        // that reached the wrong request shows.
        let sep = if url.contains('?') { '&' } else { '?' };
        let (client, url, id) = (client.clone(), format!("{url}{sep}n={i}"), format!("n={i}"));
        let at = start.elapsed();
        running.spawn(async move {
            let sent = Instant::now();
            let r = tokio::time::timeout(deadline, async {
                let resp = client.request(Request::get(url).body(empty()).unwrap()).await?;
                let status = resp.status().as_u16();
                let upstream = resp.headers().get("x-upstream").and_then(|v| v.to_str().ok()).map(str::to_string);
                if let Some(seen) = resp.headers().get("x-seen-uri").and_then(|v| v.to_str().ok()) {
                    if !seen.ends_with(&id) {
                        return Err(format!("wrong response: {id} answered with {seen}").into());
                    }
                }
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, upstream))
            })
            .await;
            let took = sent.elapsed();
            match r {
                Ok(Ok((status, upstream))) => Outcome { at, sent, took, status: Some(status), upstream, error: None },
                Ok(Err(e)) => Outcome { at, sent, took, status: None, upstream: None, error: Some(e.to_string()) },
                Err(_) => Outcome { at, sent, took, status: None, upstream: None, error: Some("deadline".into()) },
            }
        });
    }
    let mut out = Vec::with_capacity(total);
    let bound = tokio::time::timeout(deadline + WAIT, async {
        while let Some(r) = running.join_next().await {
            out.push(r.expect("request task"));
        }
    });
    bound.await.expect("every request ends by its deadline");
    out.sort_by_key(|o| o.at);
    out
}

/// Resident memory of this process (the daemons the test runs in it), MiB.
pub fn rss_mib() -> f64 {
    rss_mib_of("/proc/self/status")
}

/// Resident memory, MiB, from a `/proc/<pid>/status` file (0 if unreadable).
pub fn rss_mib_of(status_file: &str) -> f64 {
    let status = std::fs::read_to_string(status_file).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

/// Open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// A one-line summary: counts by status, worst latency.
pub fn summary(out: &[Outcome]) -> String {
    let mut by = std::collections::BTreeMap::<String, usize>::new();
    for o in out {
        let k = o.status.map_or_else(|| o.error.clone().unwrap_or_default(), |s| s.to_string());
        *by.entry(k).or_default() += 1;
    }
    let worst = out.iter().map(|o| o.took).max().unwrap_or_default();
    format!("{} requests {by:?}, worst {worst:?}", out.len())
}

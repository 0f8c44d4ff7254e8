//! Test harness: a recording upstream, a tunnel (server + clients) on loopback
//! port 0, and a small HTTP client. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::client::legacy::{connect::HttpConnector, Client as HttpClient};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::{Client, ClientStatus};
use tunnel_daemon::server::{Listeners, Server, Shared};
use tunnel_lib::config::{ClientConfig, ServerConfig};

pub mod child;
pub mod etcd;
pub mod fault;
pub mod logs;
pub mod pki;
pub mod ws;

/// Every wait in these tests ends by this deadline at the latest.
pub const WAIT: Duration = Duration::from_secs(15);

/// Polls `f` until it is true or the deadline passes.
pub async fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ------------------------------------------------------------------ upstream

/// Counters of what the upstream saw.
#[derive(Default)]
pub struct Seen {
    pub requests: AtomicUsize,
    /// Requests whose handler was dropped before it finished (cancelled).
    pub cancelled: AtomicUsize,
    /// Request bodies that broke off before their end (the sender gave up).
    pub cut_bodies: AtomicUsize,
    /// Every request head the upstream parsed, in order.
    pub heads: std::sync::Mutex<Vec<SeenHead>>,
    /// `/upload-sha` bodies read to their end: (request URI, length).
    pub whole_bodies: std::sync::Mutex<Vec<(String, usize)>>,
    /// `/stream` responses whose reader went away before their end.
    pub cut_streams: AtomicUsize,
}

/// A request head as the upstream parsed it.
#[derive(Debug, Clone)]
pub struct SeenHead {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
}

impl Seen {
    /// The heads whose URI contains `needle`.
    pub fn heads_with(&self, needle: &str) -> Vec<SeenHead> {
        self.heads.lock().unwrap().iter().filter(|h| h.uri.contains(needle)).cloned().collect()
    }
}

struct CancelProbe(Arc<Seen>, bool);
impl Drop for CancelProbe {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// A deterministic 64 KiB block that downloads repeat: one allocation for
/// the whole test, so that the test upstream's memory is not counted as
/// the daemons'.
pub fn pattern_block() -> Bytes {
    static BLOCK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    BLOCK
        .get_or_init(|| {
            let mut rng = fastrand_like(0x5eed);
            Bytes::from((0..65536).map(|_| rng()).collect::<Vec<u8>>())
        })
        .clone()
}

fn fastrand_like(mut state: u64) -> impl FnMut() -> u8 {
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 24) as u8
    }
}

/// The first `n` bytes of the repeated pattern, as 64 KiB chunks.
pub fn pattern_chunks(n: usize) -> impl Iterator<Item = Bytes> {
    let block = pattern_block();
    (0..n.div_ceil(65536)).map(move |i| {
        let len = (n - i * 65536).min(65536);
        block.slice(..len)
    })
}

pub fn sha256_of_pattern(n: usize) -> String {
    let mut h = Sha256::new();
    for c in pattern_chunks(n) {
        h.update(&c);
    }
    hex(&h.finalize())
}

/// `N` distinct ports on 127.0.0.1, free a moment ago. All are held until all
/// are picked: the kernel may hand a just-released port to the next bind, and
/// a daemon given one port twice fails to start.
pub fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let held: [std::net::TcpListener; N] = std::array::from_fn(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap())
}

/// Microseconds since the Unix epoch.
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type UpBody = BoxBody<Bytes, Infallible>;

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn full(b: impl Into<Bytes>) -> UpBody {
    Full::new(b.into()).boxed()
}

async fn upstream_handler(
    seen: Arc<Seen>,
    name: String,
    req: Request<Incoming>,
) -> Result<Response<UpBody>, Infallible> {
    seen.heads.lock().unwrap().push(SeenHead {
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        // Copied, not cloned: a cloned value is a slice of hyper's read
        // buffer and keeps all of it (~14 KiB a request), which the memory
        // tests would count as the tunnel's growth.
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| (k.clone(), HeaderValue::from_bytes(v.as_bytes()).unwrap()))
            .collect(),
    });
    seen.requests.fetch_add(1, Ordering::SeqCst);
    let mut probe = CancelProbe(seen.clone(), false);
    let path = req.uri().path().to_string();
    let resp = match path.as_str() {
        "/never" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Response::new(full("late"))
        }
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(200))).await;
            Response::new(full("slow done"))
        }
        "/download" => {
            let n = query(&req, "bytes").unwrap_or(0) as usize;
            let stream = tokio_stream::iter(pattern_chunks(n).map(|c| Ok::<_, Infallible>(Frame::data(c))));
            let mut r = Response::new(StreamBody::new(stream).boxed());
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/bighead" => {
            // A response head of about `bytes`, in one header.
            let n = query(&req, "bytes").unwrap_or(0) as usize;
            let mut r = Response::new(full("big head"));
            r.headers_mut().insert("x-big", HeaderValue::from_str(&"h".repeat(n)).unwrap());
            r
        }
        "/stream" => {
            // /download, written by a task of its own, so that a response
            // abandoned mid-way is counted (the task's next send fails).
            let n = query(&req, "bytes").unwrap_or(0) as usize;
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            let seen = seen.clone();
            // Ends with the last chunk, or when the response is dropped.
            tokio::spawn(async move {
                for c in pattern_chunks(n) {
                    if tx.send(Ok(Frame::data(c))).await.is_err() {
                        seen.cut_streams.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
            });
            let mut r = Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed());
            r.headers_mut().insert("content-length", n.into());
            r
        }
        "/events" => {
            // Server-sent events, one every `every` ms, each stamped with the
            // unix time in µs at which the upstream wrote it.
            let (n, every) = (query(&req, "n").unwrap_or(5), query(&req, "every").unwrap_or(100));
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            // Ends with the last event, or when the response is dropped (send fails).
            tokio::spawn(async move {
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(every)).await;
                    let event = format!("id: {i}\ndata: {}\n\n", unix_micros());
                    if tx.send(Ok(Frame::data(Bytes::from(event)))).await.is_err() {
                        return;
                    }
                }
            });
            let mut r = Response::new(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)).boxed());
            r.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            r
        }
        "/upload-sha" => {
            let mut h = Sha256::new();
            let uri = req.uri().to_string();
            let mut body = req.into_body();
            let mut len = 0usize;
            let mut whole = true;
            while let Some(f) = body.frame().await {
                let Ok(f) = f else {
                    seen.cut_bodies.fetch_add(1, Ordering::SeqCst);
                    whole = false;
                    break;
                };
                if let Ok(d) = f.into_data() {
                    len += d.len();
                    h.update(&d);
                }
            }
            if whole {
                seen.whole_bodies.lock().unwrap().push((uri, len));
            }
            Response::new(full(format!("{len} {}", hex(&h.finalize()))))
        }
        "/trailers" => {
            // The body back, then trailers: its length, and the request's
            // x-checksum trailer as the upstream received it.
            let mut body = req.into_body();
            let (mut data, mut checksum) = (Vec::new(), None);
            while let Some(Ok(f)) = body.frame().await {
                match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => checksum = f.into_trailers().ok().and_then(|t| t.get("x-checksum").cloned()),
                }
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("x-body-bytes", data.len().into());
            trailers.insert("x-got-checksum", checksum.unwrap_or_else(|| "none".parse().unwrap()));
            let frames = vec![Ok::<_, Infallible>(Frame::data(Bytes::from(data))), Ok(Frame::trailers(trailers))];
            Response::new(StreamBody::new(tokio_stream::iter(frames)).boxed())
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::from_u16(code).unwrap();
            r.headers_mut().insert("x-status-test", "yes".parse().unwrap());
            r
        }
        _ => {
            // Echo: the request as the upstream saw it, in headers; its body back.
            let (parts, body) = req.into_parts();
            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let mut r = Response::new(full(body));
            let h = r.headers_mut();
            h.insert("x-upstream", name.parse().unwrap());
            h.insert("x-seen-method", parts.method.as_str().parse().unwrap());
            h.insert("x-seen-uri", parts.uri.to_string().parse().unwrap());
            for (k, v) in &parts.headers {
                if let Ok(name) = http::HeaderName::from_bytes(format!("x-seen-{k}").as_bytes()) {
                    h.append(name, v.clone());
                }
            }
            h.insert("x-multi", "a".parse().unwrap());
            h.append("x-multi", "b".parse().unwrap());
            r
        }
    };
    probe.1 = true;
    let mut resp = resp;
    // Which upstream answered, on every response (the echo sets it too).
    if let Ok(v) = name.parse() {
        resp.headers_mut().entry("x-upstream").or_insert(v);
    }
    Ok(resp)
}

/// A recording upstream on 127.0.0.1:0.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    stop: CancellationToken,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let stop = CancellationToken::new();
        let (s2, stop2, name) = (seen.clone(), stop.clone(), name.to_string());
        tokio::spawn(async move {
            loop {
                let tcp = tokio::select! {
                    _ = stop2.cancelled() => return,
                    r = listener.accept() => r.unwrap().0,
                };
                let (seen, name, stop) = (s2.clone(), name.clone(), stop2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| upstream_handler(seen.clone(), name.clone(), req));
                    let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .into_owned();
                    tokio::select! { _ = stop.cancelled() => {}, _ = conn => {} }
                });
            }
        });
        Upstream { addr, seen, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

// ------------------------------------------------------------------ config files

/// A server.toml for the tests: `[server]` with a 2 s grace and
/// `server_extra`, the group "demo" (token "t-demo", 1 s heartbeats, 2 data
/// streams) followed by `after_group` (more keys of that group, or more
/// groups), then `rules`.
pub fn demo_server_toml(server_extra: &str, after_group: &str, rules: &str) -> String {
    format!(
        "\n[server]\nshutdown_grace = \"2s\"\n{server_extra}\n[[groups]]\nname = \"demo\"\ntoken = \"t-demo\"\nheartbeat_interval = \"1s\"\ndata_streams = 2\n{after_group}\n{rules}\n"
    )
}

/// A server.toml on disk, in its own directory, removed when dropped.
pub struct ConfigFile {
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!("tunnel-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { path }
    }

    /// Replaces the file's contents (the server notices within a second),
    /// atomically: a poll must never read it truncated and half written.
    pub fn write(&self, text: &str) {
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Waits for the client's applied config version to satisfy `f`, and returns it.
pub async fn config_version(status: &mut watch::Receiver<ClientStatus>, f: impl Fn(&str) -> bool) -> String {
    tokio::time::timeout(WAIT, status.wait_for(|s| f(&s.config_version)))
        .await
        .expect("config version in time")
        .expect("client running")
        .config_version
        .clone()
}

// ------------------------------------------------------------------ tunnel

/// A running server on loopback port 0.
pub struct TestServer {
    pub http: SocketAddr,
    /// Served only when the config sets https_listen (any value: the test's port is used).
    pub https: SocketAddr,
    /// Served only when the config sets metrics_listen (likewise).
    pub metrics: SocketAddr,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    pub config_path: Option<PathBuf>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Rewrites the [server] listen addresses to port 0 and starts a server.
pub async fn start_server(toml: &str, config_path: Option<PathBuf>) -> TestServer {
    let cfg = ServerConfig::from_str_named(toml, "test server.toml").expect("valid test config");
    let listeners = Listeners::ephemeral().await.unwrap();
    let (http, grpc, admin) = listeners.addrs().unwrap();
    let https = listeners.https_addr().unwrap().expect("ephemeral listeners include https");
    let metrics = listeners.metrics_addr().unwrap().expect("ephemeral listeners include metrics");
    let server = Server::new(cfg, config_path.clone());
    let shared = server.shared();
    let stop = CancellationToken::new();
    let task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    TestServer { http, https, metrics, grpc, admin, shared, config_path, stop, task }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Waits until `n` streams of `group` are registered.
    pub async fn wait_streams(&self, n: usize) {
        let shared = self.shared.clone();
        eventually(&format!("{n} registered streams"), WAIT, || shared.registry.streams().len() == n).await;
    }

    pub async fn stop(self) {
        self.begin_stop();
        self.wait_stopped().await;
    }

    /// What SIGTERM does: the server starts draining.
    pub fn begin_stop(&self) {
        self.stop.cancel();
    }

    /// Waits for a stop begun with `begin_stop` to finish.
    pub async fn wait_stopped(self) {
        tokio::time::timeout(WAIT, self.task).await.expect("server stops").unwrap().unwrap();
    }
}

/// A client running on its own runtime and thread, so that `kill` can drop
/// every task and socket at once, as a killed process would.
pub struct TestClient {
    rt: Option<tokio::runtime::Runtime>,
    pub status: watch::Receiver<ClientStatus>,
    stop: CancellationToken,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestClient {
    pub fn start(toml: &str) -> TestClient {
        let cfg = ClientConfig::from_str_named(toml, "test client.toml").expect("valid test client config");
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = Client::new(cfg);
        let status = client.status();
        let stop = CancellationToken::new();
        let done = rt.spawn(client.run(stop.clone().cancelled_owned()));
        TestClient { rt: Some(rt), status, stop, done: Some(done) }
    }

    /// Tasks alive on the client's runtime.
    pub fn alive_tasks(&self) -> usize {
        self.rt.as_ref().map_or(0, |rt| rt.metrics().num_alive_tasks())
    }

    /// Abrupt death: every task dropped, every socket closed, no goodbye.
    pub fn kill(mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }

    /// Graceful stop (drain), waited for.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(done) = self.done.take() {
            tokio::time::timeout(WAIT, done).await.expect("client stops").unwrap().unwrap();
        }
    }
}

impl Drop for TestClient {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub fn client_toml(
    server: &TestServer,
    client_id: &str,
    group: &str,
    token: &str,
    extra: &str,
    upstreams: &[(&str, String)],
) -> String {
    let mut s = format!(
        "server = \"http://{}\"\nclient_id = \"{client_id}\"\ngroup = \"{group}\"\ntoken = \"{token}\"\nreconnect_max = \"1s\"\nshutdown_grace = \"5s\"\n{extra}\n[upstreams]\n",
        server.grpc
    );
    for (name, url) in upstreams {
        if url.starts_with('{') {
            // The table form, e.g. { url = "...", http2 = true }.
            s.push_str(&format!("{name} = {url}\n"));
        } else {
            s.push_str(&format!("{name} = \"{url}\"\n"));
        }
    }
    s
}

// ------------------------------------------------------------------ http client

pub type ReqBody = BoxBody<Bytes, Infallible>;

pub fn http_client() -> HttpClient<HttpConnector, ReqBody> {
    HttpClient::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub fn h2c_client() -> HttpClient<HttpConnector, ReqBody> {
    HttpClient::builder(TokioExecutor::new()).http2_only(true).build(HttpConnector::new())
}

pub fn body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into()).boxed()
}

pub fn empty() -> ReqBody {
    body(Bytes::new())
}

/// A body sent as a stream of chunks (chunked on HTTP/1.1).
pub fn streamed(chunks: Vec<Bytes>) -> ReqBody {
    StreamBody::new(tokio_stream::iter(chunks.into_iter().map(|c| Ok::<_, Infallible>(Frame::data(c))))).boxed()
}

pub struct Got {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request and reads the whole response, within WAIT.
pub async fn send(client: &HttpClient<HttpConnector, ReqBody>, req: Request<ReqBody>) -> Got {
    tokio::time::timeout(WAIT, async {
        let resp = client.request(req).await.expect("response");
        let (parts, b) = resp.into_parts();
        let body = b.collect().await.expect("body").to_bytes();
        Got { status: parts.status, headers: parts.headers, body }
    })
    .await
    .expect("request finished in time")
}

/// GETs `url` and reads the body as it streams, within 60 s: its length and
/// SHA-256, and the response's Content-Length header if it had one.
pub async fn download_sha(client: &HttpClient<HttpConnector, ReqBody>, url: &str) -> (usize, String, Option<String>) {
    let resp = tokio::time::timeout(WAIT, client.request(Request::get(url).body(empty()).unwrap()))
        .await
        .expect("response head in time")
        .expect("response");
    let length = resp.headers().get("content-length").and_then(|v| v.to_str().ok()).map(str::to_string);
    let mut body = resp.into_body();
    let (mut h, mut len) = (Sha256::new(), 0);
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(f) = body.frame().await {
            if let Ok(d) = f.expect("body frame").into_data() {
                len += d.len();
                h.update(&d);
            }
        }
    })
    .await
    .expect("body in time");
    (len, hex(&h.finalize()), length)
}

pub async fn get(url: &str) -> Got {
    send(&http_client(), Request::get(url).body(empty()).unwrap()).await
}

//! The speed race: the same nginx reached directly, through this tunnel and
//! through rathole, in one run, with wrk (HTTP/1.1), h2load (h2c) and curl
//! (1 GiB transfers) as load generators. Ratios to direct are what count:
//! absolute figures move with whatever else the machine is doing.

use crate::procs::{self, free_port, spawn, which, TempDir};
use crate::upstream;
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::process::{Child, Command};

/// Sizes of the race.
pub struct Config {
    /// Length of each small-request run.
    pub duration: Duration,
    pub connections: u32,
    /// Size of the big file and of each upload.
    pub bulk_size: u64,
    /// Tunnel runtimes to race: worker_threads values (0 = one per core).
    pub workers: Vec<usize>,
    /// Leave rathole out even when installed.
    pub no_rathole: bool,
    /// Access policies on the tunnel's rule, each raced as a route of its own.
    pub policies: Vec<Policy>,
}

/// An access policy on the raced rule, to measure what its check costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// No access keys: the rule as users run it by default.
    None,
    /// `allow` and `deny` lists the client passes.
    Allow,
    /// `rate_limit` per client address, far above the race's rate.
    Rate,
    /// `basic_auth`, a bcrypt (cost 10) user, credentials on every request.
    Basic,
    /// `jwt`, an EdDSA token on every request, one claim to a header.
    Jwt,
}

impl Policy {
    fn name(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Allow => "allow",
            Policy::Rate => "rate",
            Policy::Basic => "basic",
            Policy::Jwt => "jwt",
        }
    }

    /// The rule's keys (files written to `dir`), and the header every request then carries.
    fn setup(self, dir: &TempDir) -> anyhow::Result<(String, Option<String>)> {
        use base64::Engine as _;
        Ok(match self {
            Policy::None => (String::new(), None),
            Policy::Allow => ("allow = [\"127.0.0.0/8\", \"::1\"]\ndeny = [\"10.0.0.0/8\"]\n".into(), None),
            Policy::Rate => ("rate_limit = { requests = 10000000, per = \"1s\", by = \"client_ip\" }\n".into(), None),
            Policy::Basic => {
                let path = dir.join("users.htpasswd");
                std::fs::write(&path, format!("bench:{}\n", bcrypt::hash("bench-password", 10)?))?;
                let creds = base64::engine::general_purpose::STANDARD.encode("bench:bench-password");
                (format!("basic_auth = \"{}\"\n", path.display()), Some(format!("Authorization: Basic {creds}")))
            }
            Policy::Jwt => {
                use ring::signature::KeyPair as _;
                let rng = ring::rand::SystemRandom::new();
                let pkcs8 =
                    ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| anyhow::anyhow!("{e}"))?;
                let pair =
                    ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| anyhow::anyhow!("{e}"))?;
                let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
                let jwks = format!(
                    r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","kid":"bench","x":"{}"}}]}}"#,
                    b64(pair.public_key().as_ref())
                );
                let path = dir.join("jwks.json");
                std::fs::write(&path, jwks)?;
                let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
                header.kid = Some("bench".into());
                let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
                let claims = serde_json::json!({"sub": "bench", "iss": "bench", "aud": "race", "exp": exp});
                let token =
                    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()))?;
                let keys = format!(
                    "jwt = {{ jwks = \"{}\", issuer = \"bench\", audience = \"race\" }}\njwt_claims_to_headers = {{ sub = \"X-User\" }}\n",
                    path.display()
                );
                (keys, Some(format!("Authorization: Bearer {token}")))
            }
        })
    }
}

impl Config {
    /// The issue's sizes, or small ones for `--quick`.
    pub fn new(
        quick: bool,
        duration: Option<Duration>,
        workers: Vec<usize>,
        no_rathole: bool,
        policies: Vec<Policy>,
    ) -> Self {
        let (d, size) = if quick { (Duration::from_secs(1), 64 << 20) } else { (Duration::from_secs(15), 1 << 30) };
        Config { duration: duration.unwrap_or(d), connections: 64, bulk_size: size, workers, no_rathole, policies }
    }
}

/// External programs the race drives.
struct Tools {
    nginx: PathBuf,
    wrk: PathBuf,
    h2load: PathBuf,
    curl: PathBuf,
    rathole: Option<PathBuf>,
}

impl Tools {
    fn find(no_rathole: bool) -> anyhow::Result<Tools> {
        let need = |n: &str| {
            which(n).with_context(|| format!("{n} not found: run bench/setup.sh to install the race's tools"))
        };
        Ok(Tools {
            nginx: need("nginx")?,
            wrk: need("wrk")?,
            h2load: need("h2load")?,
            curl: need("curl")?,
            rathole: if no_rathole { None } else { which("rathole") },
        })
    }
}

/// One way of reaching nginx.
struct Route {
    name: String,
    /// Public address for HTTP/1.1 and for h2c (the same for the tunnel).
    h1: SocketAddr,
    h2: SocketAddr,
    /// Where uploads go (a sink that counts and answers 200).
    upload: SocketAddr,
    /// The tunnel's processes (server, client), for RSS and CPU.
    pids: Vec<u32>,
    /// A header every request carries (the policy's credentials).
    header: Option<String>,
    _children: Vec<Child>,
}

/// Small-request figures of one route and protocol.
#[derive(Default, Clone)]
struct Small {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
    /// CPU the route's own processes spent per request (µs), 0 for direct.
    cpu_us: f64,
}

/// Requests per second of the open-loop latency probe.
const PACED_RATE: u32 = 1000;

/// What one route measured.
#[derive(Default, Clone)]
struct Results {
    /// Latency at a fixed rate, far below saturation.
    paced: Small,
    h1: Small,
    h2: Small,
    /// MB/s for (h1 down, h1 up, h2 down, h2 up).
    bulk: [f64; 4],
    idle_kib: Vec<u64>,
    peak_small_kib: Vec<u64>,
    peak_bulk_kib: Vec<u64>,
}

/// Runs the race and prints its tables.
pub async fn run(bins: &Path, cfg: &Config) -> anyhow::Result<()> {
    let tools = Tools::find(cfg.no_rathole)?;
    let dir = TempDir::new("race")?;
    std::fs::write(dir.join("small.txt"), [b'x'; 100])?;
    write_big(&dir.join("big.bin"), cfg.bulk_size)?;
    let sink = upstream::start().await?;
    let (nginx, h1, h2) = start_nginx(&tools.nginx, &dir).await?;
    let mut routes = vec![Route {
        name: "direct nginx".into(),
        h1,
        h2,
        upload: sink.addr,
        pids: vec![],
        header: None,
        _children: vec![nginx],
    }];
    for &w in &cfg.workers {
        for &policy in &cfg.policies {
            routes.push(start_tunnel(bins, &dir, w, policy, h1, sink.addr).await?);
        }
    }
    match &tools.rathole {
        Some(r) => routes.push(start_rathole(r, &dir, h1, h2, sink.addr).await?),
        None => eprintln!("rathole not found (bench/setup.sh installs it): racing without it"),
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut results = vec![Results::default(); routes.len()];
    for (r, route) in results.iter_mut().zip(&routes) {
        r.idle_kib = route.pids.iter().map(|&p| procs::status_kib(p, "VmRSS")).collect();
    }
    // Each test runs every route in turn, back to back, so that each ratio
    // compares runs minutes apart at most; the two documented runs show the
    // spread that remains.
    for (i, route) in routes.iter().enumerate() {
        eprintln!("race: {} / {PACED_RATE} req/s, open loop", route.name);
        results[i].paced = paced(route, cfg).await;
    }
    for (i, route) in routes.iter().enumerate() {
        eprintln!("race: {} / HTTP/1.1 small requests", route.name);
        results[i].h1 = wrk(&tools.wrk, route, cfg).await?;
    }
    for (i, route) in routes.iter().enumerate() {
        eprintln!("race: {} / h2c small requests", route.name);
        results[i].h2 = h2load(&tools.h2load, route, cfg, &dir).await?;
    }
    for (r, route) in results.iter_mut().zip(&routes) {
        r.peak_small_kib = route.pids.iter().map(|&p| procs::status_kib(p, "VmHWM")).collect();
    }
    for (n, (h2, up)) in [(false, false), (false, true), (true, false), (true, true)].into_iter().enumerate() {
        for (i, route) in routes.iter().enumerate() {
            eprintln!(
                "race: {} / {} {}",
                route.name,
                if h2 { "h2c" } else { "HTTP/1.1" },
                if up { "upload" } else { "download" }
            );
            results[i].bulk[n] = curl(&tools.curl, route, h2, up, &dir, cfg.bulk_size).await?;
        }
    }
    for (r, route) in results.iter_mut().zip(&routes) {
        r.peak_bulk_kib = route.pids.iter().map(|&p| procs::status_kib(p, "VmHWM")).collect();
    }
    sink.stop();
    print!("{}", tables(&routes, &results, cfg));
    Ok(())
}

fn write_big(path: &Path, size: u64) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let block = vec![b'b'; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// nginx with one worker (as the tunnel's daemons are compared per core),
/// serving the directory on an HTTP/1.1 port and an h2c port.
async fn start_nginx(nginx: &Path, dir: &TempDir) -> anyhow::Result<(Child, SocketAddr, SocketAddr)> {
    let (h1, h2) = (free_port()?, free_port()?);
    let d = dir.0.display();
    let conf = format!(
        r#"
daemon off;
# One process: the bench's kill then ends all of nginx (a master's workers
# outlive a SIGKILLed master), and one worker as before.
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    open_file_cache max=64;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen {h1};
        root {d};
    }}
    # nginx's HTTP/2 with sendfile stalls small responses for 40 ms (Nagle
    # and delayed ACKs: 1.5k req/s measured); without it h2c runs at speed.
    server {{
        listen {h2} http2;
        sendfile off;
        root {d};
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let errors = dir.join("nginx-error.log");
    let args = [OsStr::new("-e"), errors.as_os_str(), OsStr::new("-c"), path.as_os_str()];
    let child = spawn(nginx, &args, &dir.join("nginx.log"))?;
    procs::wait_serving(h1, "/small.txt", Duration::from_secs(10))
        .await
        .context("nginx did not start (see its log)")?;
    Ok((child, h1, h2))
}

/// A tunnel-server and one tunnel-client on default settings but for the
/// runtime's size; `/upload` goes to the sink, the rest to nginx.
async fn start_tunnel(
    bins: &Path,
    dir: &TempDir,
    workers: usize,
    policy: Policy,
    nginx: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<Route> {
    let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
    let (keys, header) = policy.setup(dir)?;
    let server_toml = format!(
        r#"
[server]
http_listen = "{http}"
grpc_listen = "{grpc}"
admin_listen = "{admin}"
worker_threads = {workers}
[[groups]]
name = "race"
token = "race-token"
[[rules]]
path_prefix = "/upload"
group = "race"
upstream = "sink"
timeout = "60s"
[[rules]]
group = "race"
upstream = "web"
timeout = "60s"
{keys}"#
    );
    let client_toml = format!(
        "server = \"http://{grpc}\"\nclient_id = \"race-{workers}\"\ngroup = \"race\"\ntoken = \"race-token\"\nworker_threads = {workers}\n[upstreams]\nweb = \"http://{nginx}\"\nsink = \"http://{sink}\"\n"
    );
    let tag = format!("tunnel-w{workers}-{}", policy.name());
    let (sc, cc) = (dir.join(&format!("{tag}-server.toml")), dir.join(&format!("{tag}-client.toml")));
    std::fs::write(&sc, server_toml)?;
    std::fs::write(&cc, client_toml)?;
    let logs = [dir.join(&format!("{tag}-server.log")), dir.join(&format!("{tag}-client.log"))];
    let server = spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), sc.as_os_str()], &logs[0])?;
    let client = spawn(&bins.join("tunnel-client"), &[OsStr::new("--config"), cc.as_os_str()], &logs[1])?;
    let pids = [&server, &client].iter().filter_map(|c| c.id()).collect();
    // /upload has no policy: the sink answers it whatever the raced rule asks.
    procs::wait_serving_or_logs("the tunnel", http, "/upload", Duration::from_secs(20), &logs).await?;
    let mut name =
        if workers == 0 { "tunnel (workers = cores)".into() } else { format!("tunnel (workers = {workers})") };
    if policy != Policy::None {
        name = format!("{name}, {}", policy.name());
    }
    Ok(Route { name, h1: http, h2: http, upload: http, pids, header, _children: vec![server, client] })
}

/// rathole server and client forwarding three ports: nginx's two and the sink.
async fn start_rathole(
    rathole: &Path,
    dir: &TempDir,
    nginx_h1: SocketAddr,
    nginx_h2: SocketAddr,
    sink: SocketAddr,
) -> anyhow::Result<Route> {
    let control = free_port()?;
    let (h1, h2, upload) = (free_port()?, free_port()?, free_port()?);
    // nodelay is rathole's default; said here so the comparison is explicit.
    let mut server =
        format!("[server]\nbind_addr = \"{control}\"\ndefault_token = \"race\"\n[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n");
    let mut client =
        format!("[client]\nremote_addr = \"{control}\"\ndefault_token = \"race\"\n[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n");
    for (name, public, local) in [("h1", h1, nginx_h1), ("h2", h2, nginx_h2), ("sink", upload, sink)] {
        let _ = write!(server, "[server.services.{name}]\nbind_addr = \"{public}\"\n");
        let _ = write!(client, "[client.services.{name}]\nlocal_addr = \"{local}\"\n");
    }
    let (sc, cc) = (dir.join("rathole-server.toml"), dir.join("rathole-client.toml"));
    std::fs::write(&sc, server)?;
    std::fs::write(&cc, client)?;
    let s = spawn(rathole, &[OsStr::new("--server"), sc.as_os_str()], &dir.join("rathole-server.log"))?;
    let c = spawn(rathole, &[OsStr::new("--client"), cc.as_os_str()], &dir.join("rathole-client.log"))?;
    let pids = [&s, &c].iter().filter_map(|c| c.id()).collect();
    let logs = [dir.join("rathole-server.log"), dir.join("rathole-client.log")];
    procs::wait_serving_or_logs("rathole", h1, "/small.txt", Duration::from_secs(20), &logs).await?;
    procs::wait_serving(upload, "/small", Duration::from_secs(20)).await.context("rathole's sink service")?;
    Ok(Route { name: "rathole".into(), h1, h2, upload, pids, header: None, _children: vec![s, c] })
}

fn cpu_total(pids: &[u32]) -> Duration {
    pids.iter().map(|&p| procs::cpu_time(p)).sum()
}

/// Runs a load generator to the end, or kills it after `limit`.
async fn output(cmd: &mut Command, what: &str, limit: Duration) -> anyhow::Result<String> {
    let out = tokio::time::timeout(limit, cmd.kill_on_drop(true).output())
        .await
        .with_context(|| format!("{what} overran {limit:?}"))?
        .with_context(|| format!("running {what}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{what} failed: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(text)
}

/// Open-loop latency: PACED_RATE requests a second, each on its own task and
/// timed alone, over the bench's pooled keep-alive client. Under wrk's closed
/// loop a route's latency is mostly queueing (connections / throughput); here
/// the path is far from saturated, so the difference to direct is what the
/// route itself adds to a request.
async fn paced(route: &Route, cfg: &Config) -> Small {
    let p =
        probe_with(&format!("http://{}/small.txt", route.h1), route.header.as_deref(), PACED_RATE, cfg.duration).await;
    Small { rps: p.rps, p50_us: p.p50_us, p99_us: p.p99_us, errors: p.errors, cpu_us: 0.0 }
}

/// What an open-loop probe measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Probe {
    /// Requests answered in full per second of the run.
    pub rps: f64,
    /// Median latency of the answered requests, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
    /// Failed, timed out (5 s) or unfinished requests.
    pub errors: u64,
}

/// GETs `url` `rate` times a second for `duration`, each request on its own
/// task and timed alone, and gives the latency distribution of those answered.
pub async fn probe(url: &str, rate: u32, duration: Duration) -> Probe {
    probe_with(url, None, rate, duration).await
}

/// [`probe`], each request carrying `header` ("Name: value").
pub async fn probe_with(url: &str, header: Option<&str>, rate: u32, duration: Duration) -> Probe {
    let header = header.and_then(|h| h.split_once(": ")).map(|(k, v)| (k.to_string(), v.to_string()));
    let client = crate::load::client();
    let mut tasks = tokio::task::JoinSet::new();
    let start = tokio::time::Instant::now();
    let deadline = start + duration;
    // A million a second is past any loopback route here, and keeps the
    // tick above zero (interval refuses a zero period).
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.clamp(1, 1_000_000));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while tokio::time::Instant::now() < deadline {
        tick.tick().await;
        let (c, url, header) = (client.clone(), url.to_string(), header.clone());
        tasks.spawn(async move {
            let t = tokio::time::Instant::now();
            let mut req = http::Request::get(url);
            if let Some((k, v)) = header {
                req = req.header(k, v);
            }
            let req = req.body(crate::load::empty()).ok()?;
            let r = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await.ok()?.ok()?;
            let ok = r.status().is_success();
            http_body_util::BodyExt::collect(r.into_body()).await.ok()?;
            ok.then(|| t.elapsed().as_secs_f64() * 1e6)
        });
    }
    let mut lat = Vec::new();
    let mut p = Probe::default();
    let drain = async {
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Some(us)) => lat.push(us),
                _ => p.errors += 1,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    p.errors += tasks.len() as u64;
    tasks.abort_all();
    lat.sort_unstable_by(f64::total_cmp);
    let pct = |per_mille: usize| {
        lat.get((lat.len() * per_mille / 1000).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0)
    };
    (p.p50_us, p.p99_us, p.p999_us) = (pct(500), pct(990), pct(999));
    p.max_us = lat.last().copied().unwrap_or(0.0);
    p.rps = lat.len() as f64 / duration.as_secs_f64();
    p
}

/// `tunnel-bench paced`: each URL probed in turn, `rounds` times over, so
/// that a route and direct are compared minutes apart at most and the
/// spread between rounds shows.
pub async fn paced_command(urls: &[String], rate: u32, rounds: u32, duration: Duration) -> anyhow::Result<()> {
    println!("\nOpen loop, {rate} req/s for {} s per run, HTTP/1.1 keep-alive; µs.\n", duration.as_secs_f64());
    println!("| round | url | req/s | p50 | p99 | p99.9 | max | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for round in 1..=rounds {
        for url in urls {
            let p = probe(url, rate, duration).await;
            println!(
                "| {round} | {url} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {} |",
                p.rps, p.p50_us, p.p99_us, p.p999_us, p.max_us, p.errors
            );
        }
    }
    Ok(())
}

/// wrk, 2 threads, `connections` keep-alive connections, with its latency
/// distribution.
async fn wrk(wrk: &Path, route: &Route, cfg: &Config) -> anyhow::Result<Small> {
    let before = cpu_total(&route.pids);
    let text = output(
        Command::new(wrk)
            .arg("-t2")
            .arg(format!("-c{}", cfg.connections))
            .arg(format!("-d{}s", cfg.duration.as_secs().max(1)))
            .arg("--latency")
            .args(route.header.iter().flat_map(|h| ["-H", h.as_str()]))
            .arg(format!("http://{}/small.txt", route.h1)),
        "wrk",
        cfg.duration + Duration::from_secs(30),
    )
    .await?;
    let cpu = cpu_total(&route.pids).saturating_sub(before);
    parse_wrk(&text, cpu).with_context(|| format!("reading wrk's output:\n{text}"))
}

fn parse_wrk(text: &str, cpu: Duration) -> anyhow::Result<Small> {
    let mut s = Small::default();
    let mut requests = 0f64;
    for line in text.lines().map(str::trim) {
        let mut w = line.split_whitespace();
        match (w.next(), w.next()) {
            (Some("50%"), Some(v)) => s.p50_us = wrk_duration_us(v)?,
            (Some("99%"), Some(v)) => s.p99_us = wrk_duration_us(v)?,
            (Some("Requests/sec:"), Some(v)) => s.rps = v.parse()?,
            (Some("Non-2xx"), _) => s.errors += line.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(1),
            // "Socket errors: connect 0, read 0, write 0, timeout 0"
            (Some("Socket"), Some("errors:")) => {
                s.errors += line.split(", ").filter_map(|f| f.rsplit(' ').next()?.parse::<u64>().ok()).sum::<u64>()
            }
            _ => {}
        }
        if let Some(rest) = line.split_once(" requests in ") {
            requests = rest.0.parse().unwrap_or(0.0);
        }
    }
    if s.rps <= 0.0 || requests <= 0.0 {
        bail!("no requests/sec in wrk's output");
    }
    s.cpu_us = cpu.as_secs_f64() * 1e6 / requests;
    Ok(s)
}

fn wrk_duration_us(v: &str) -> anyhow::Result<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic()).context("a unit")?;
    let n: f64 = v[..split].parse()?;
    Ok(match &v[split..] {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        u => bail!("unknown unit {u}"),
    })
}

/// h2load over h2c (prior knowledge), one stream per connection as wrk has
/// one request per connection; percentiles from its per-request log.
async fn h2load(h2load: &Path, route: &Route, cfg: &Config, dir: &TempDir) -> anyhow::Result<Small> {
    let log = dir.join("h2load.log");
    let before = cpu_total(&route.pids);
    let text = output(
        Command::new(h2load)
            .arg("-t2")
            .arg(format!("-c{}", cfg.connections))
            .arg("-m1")
            .arg(format!("-D{}", cfg.duration.as_secs().max(1)))
            .arg(format!("--log-file={}", log.display()))
            .args(route.header.iter().flat_map(|h| ["-H", h.as_str()]))
            .arg(format!("http://{}/small.txt", route.h2)),
        "h2load",
        cfg.duration + Duration::from_secs(30),
    )
    .await?;
    let cpu = cpu_total(&route.pids).saturating_sub(before);
    let mut s = Small::default();
    let mut requests = 0f64;
    for line in text.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 15.00s, 41234.56 req/s, 5.12MB/s"
            s.rps = rest.split(", ").nth(1).and_then(|v| v.strip_suffix(" req/s")?.parse().ok()).unwrap_or(0.0);
        }
        if let Some(rest) = line.strip_prefix("requests: ") {
            // "requests: 600000 total, 600000 started, 600000 done, 599990 succeeded, 10 failed, ..."
            let field = |name: &str| {
                rest.split(", ").find_map(|f| f.strip_suffix(name)?.trim().parse::<f64>().ok()).unwrap_or(0.0)
            };
            // "failed" already counts the errored and timed-out ones.
            requests = field(" done");
            s.errors = field(" failed") as u64;
        }
    }
    if s.rps <= 0.0 || requests <= 0.0 {
        bail!("no req/s in h2load's output:\n{text}");
    }
    s.cpu_us = cpu.as_secs_f64() * 1e6 / requests;
    let mut lat: Vec<f64> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (_, status, us) = (f.next()?, f.next()?, f.next()?);
            (status == "200").then(|| us.parse().ok()).flatten()
        })
        .collect();
    let _ = std::fs::remove_file(&log);
    lat.sort_unstable_by(f64::total_cmp);
    let pct = |p: usize| lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    (s.p50_us, s.p99_us) = (pct(50), pct(99));
    Ok(s)
}

/// One transfer of the big file with curl; MB/s.
async fn curl(curl: &Path, route: &Route, h2: bool, up: bool, dir: &TempDir, size: u64) -> anyhow::Result<f64> {
    let mut cmd = Command::new(curl);
    cmd.args(["-sS", "-o", "/dev/null", "-H", "Expect:", "--max-time", "300"]);
    if h2 {
        cmd.arg("--http2-prior-knowledge");
    }
    let addr = if h2 { route.h2 } else { route.h1 };
    if let Some(h) = &route.header {
        cmd.args(["-H", h.as_str()]);
    }
    if up {
        cmd.arg("-T").arg(dir.join("big.bin")).arg(format!("http://{}/upload", route.upload));
        cmd.args(["-w", "%{http_code} %{size_upload} %{speed_upload}"]);
    } else {
        cmd.arg(format!("http://{addr}/big.bin"));
        cmd.args(["-w", "%{http_code} %{size_download} %{speed_download}"]);
    }
    let text = output(&mut cmd, "curl", Duration::from_secs(310)).await?;
    let f: Vec<&str> = text.split_whitespace().collect();
    let (code, bytes, speed) = match f.as_slice() {
        [c, b, s] => (*c, b.parse::<u64>()?, s.parse::<f64>()?),
        _ => bail!("unexpected curl output {text:?}"),
    };
    if code != "200" || bytes != size {
        bail!("{} {}: status {code}, {bytes} of {size} bytes", route.name, if up { "upload" } else { "download" });
    }
    Ok(speed / 1e6)
}

fn mib(kib: &[u64]) -> String {
    if kib.is_empty() {
        return "-".into();
    }
    kib.iter().map(|k| format!("{:.1}", *k as f64 / 1024.0)).collect::<Vec<_>>().join(" / ")
}

/// The race's markdown tables; the first route is direct nginx.
fn tables(routes: &[Route], res: &[Results], cfg: &Config) -> String {
    let mut t = String::new();
    let base = &res[0];
    let _ = writeln!(
        t,
        "\nSmall requests (100-byte file), {} connections, {} s per route and protocol; wrk -t2 (HTTP/1.1 keep-alive), h2load -t2 -m1 (h2c).\nDirect h2c is nginx's own HTTP/2; the tunnel speaks HTTP/1.1 to nginx whatever the public protocol; rathole passes bytes to nginx's h2c port.\nCPU: user + system time of the route's own processes (tunnel or rathole server + client) per request.\n",
        cfg.connections,
        cfg.duration.as_secs().max(1)
    );
    let _ =
        writeln!(t, "| route | protocol | req/s | x direct | p50 ms | p99 ms | added p99 ms | errors | CPU µs/req |");
    let _ = writeln!(t, "|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for (proto, pick) in
        [("HTTP/1.1", (|r: &Results| r.h1.clone()) as fn(&Results) -> Small), ("h2c", |r| r.h2.clone())]
    {
        let b = pick(base);
        for (route, r) in routes.iter().zip(res) {
            let s = pick(r);
            let _ = writeln!(
                t,
                "| {} | {proto} | {:.0} | {:.2} | {:.2} | {:.2} | {:+.2} | {} | {} |",
                route.name,
                s.rps,
                s.rps / b.rps,
                s.p50_us / 1e3,
                s.p99_us / 1e3,
                (s.p99_us - b.p99_us) / 1e3,
                s.errors,
                if route.pids.is_empty() { "-".into() } else { format!("{:.1}", s.cpu_us) },
            );
        }
    }
    let _ = writeln!(
        t,
        "\nAdded latency: {PACED_RATE} req/s at a fixed rate (open loop) for {} s per route, HTTP/1.1 keep-alive from the bench's client; each request timed alone.\n",
        cfg.duration.as_secs_f64()
    );
    let _ = writeln!(t, "| route | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | errors |");
    let _ = writeln!(t, "|---|---:|---:|---:|---:|---:|---:|");
    for (route, r) in routes.iter().zip(res) {
        let (s, b) = (&r.paced, &base.paced);
        let _ = writeln!(
            t,
            "| {} | {:.0} | {:.3} | {:.3} | {:+.3} | {:+.3} | {} |",
            route.name,
            s.rps,
            s.p50_us / 1e3,
            s.p99_us / 1e3,
            (s.p50_us - b.p50_us) / 1e3,
            (s.p99_us - b.p99_us) / 1e3,
            s.errors
        );
    }
    let _ = writeln!(
        t,
        "\nBulk: one transfer of {} MiB at a time with curl (MB/s; x direct in brackets).\n",
        cfg.bulk_size >> 20
    );
    let _ = writeln!(t, "| route | HTTP/1.1 down | HTTP/1.1 up | h2c down | h2c up |");
    let _ = writeln!(t, "|---|---:|---:|---:|---:|");
    for (route, r) in routes.iter().zip(res) {
        let cells: Vec<String> = (0..4)
            .map(|i| format!("{:.0} ({:.2})", r.bulk[i], r.bulk[i] / base.bulk[i].max(f64::MIN_POSITIVE)))
            .collect();
        let _ = writeln!(t, "| {} | {} |", route.name, cells.join(" | "));
    }
    let _ = writeln!(
        t,
        "\nMemory (MiB, server / client): RSS idle, peak after the small-request runs, peak after the transfers.\n"
    );
    let _ = writeln!(t, "| route | idle | peak, small requests | peak, transfers |");
    let _ = writeln!(t, "|---|---:|---:|---:|");
    for (route, r) in routes.iter().zip(res).skip(1) {
        let _ = writeln!(
            t,
            "| {} | {} | {} | {} |",
            route.name,
            mib(&r.idle_kib),
            mib(&r.peak_small_kib),
            mib(&r.peak_bulk_kib)
        );
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 2s test @ http://127.0.0.1:1/small.txt\n  Latency Distribution\n     50%  301.00us\n     75%  1.20ms\n     99%    2.50ms\n  100 requests in 2.00s, 1.00MB read\n  Socket errors: connect 0, read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 3\nRequests/sec:  50.00\n";
        let s = parse_wrk(text, Duration::from_millis(1)).ok().unwrap_or_default();
        assert_eq!((s.p50_us, s.p99_us, s.rps, s.errors), (301.0, 2500.0, 50.0, 6));
        assert!((s.cpu_us - 10.0).abs() < 1e-9);
    }
}

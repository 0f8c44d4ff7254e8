//! The tunnel link's TCP options on real processes: by default both ends'
//! link sockets carry the short timers (read back from the live sockets
//! with `ss`, which asks the kernel), and on a kernel without them (forced
//! with TUNNEL_LINK_TUNING_UNSUPPORTED) each daemon says so once, its
//! metrics say "unsupported", and the tunnel serves as before. On a lossy
//! link (a network namespace whose nftables drop 1% of the link's packets),
//! 250 ms heartbeats under load are never reaped at 750 ms, and the
//! console reports the live sockets' options and retransmissions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes of GET /big.
const BIG: usize = 1 << 20;

/// An upstream answering GET /big with BIG bytes and every other request
/// with 200 "ok", on a thread that lives as long as the test process.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s);
                loop {
                    let mut line = String::new();
                    let mut big = false;
                    // The head ends at an empty line; requests carry no body here.
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        big |= line.starts_with("GET /big ");
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let w = r.get_mut();
                    if big {
                        let _ = w.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {BIG}\r\n\r\n").as_bytes());
                        let _ = w.write_all(&vec![b'x'; BIG]);
                    } else {
                        let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                    }
                }
            });
        }
    });
    addr
}

/// One GET through the tunnel; the status, if an answer came.
fn get(http: SocketAddr) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&http, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The body of GET /metrics on `addr`.
fn metrics(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nhost: m\r\nconnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// GET /big through the tunnel, read whole; whether all of it came.
fn get_big(http: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&http, Duration::from_secs(1)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    if s.write_all(b"GET /big HTTP/1.1\r\nhost: app.test\r\nconnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut all = Vec::with_capacity(BIG + 1024);
    let _ = s.read_to_end(&mut all);
    all.starts_with(b"HTTP/1.1 200") && all.ends_with(&[b'x'; 64]) && all.len() > BIG
}

struct Tunnel {
    http: SocketAddr,
    grpc: SocketAddr,
    admin: SocketAddr,
    server_metrics: SocketAddr,
    client_metrics: SocketAddr,
    logs: [PathBuf; 2],
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A server and a client with default link options, serving `upstream`;
/// with `unsupported`, both run as on a kernel without the options.
/// `keys` adds `[server]` keys and group keys; `grpc` fixes the link's port.
fn start(tag: &str, upstream: SocketAddr, unsupported: bool, keys: [&str; 2], grpc: Option<SocketAddr>) -> Tunnel {
    let [server, group] = keys;
    let [http, free_grpc, admin, server_metrics, client_metrics] = common::free_ports();
    let grpc = grpc.unwrap_or(free_grpc);
    let dir = std::env::temp_dir().join(format!("tunnel-link-tuning-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server_cfg, client_cfg) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(
        &server_cfg,
        format!("[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nmetrics_listen = \"{server_metrics}\"\n{server}\n[[groups]]\nname = \"demo\"\ntoken = \"t\"\n{group}\n[[rules]]\ngroup = \"demo\"\nupstream = \"web\"\n"),
    )
    .unwrap();
    std::fs::write(
        &client_cfg,
        format!("server = \"http://{grpc}\"\ngroup = \"demo\"\ntoken = \"t\"\nmetrics_listen = \"{client_metrics}\"\nreconnect_max = \"200ms\"\n[upstreams]\nweb = \"http://{upstream}\"\n"),
    )
    .unwrap();
    let logs = [dir.join("server.log"), dir.join("client.log")];
    let spawn = |bin: &str, cfg: &Path, log: &Path| {
        let mut c = Command::new(bin);
        c.arg("--config").arg(cfg).env("RUST_LOG", "info").stdout(Stdio::null());
        c.stderr(std::fs::File::create(log).unwrap());
        if unsupported {
            c.env("TUNNEL_LINK_TUNING_UNSUPPORTED", "1");
        } else {
            c.env_remove("TUNNEL_LINK_TUNING_UNSUPPORTED");
        }
        c.spawn().unwrap()
    };
    let children = vec![
        spawn(env!("CARGO_BIN_EXE_tunnel-server"), &server_cfg, &logs[0]),
        spawn(env!("CARGO_BIN_EXE_tunnel-client"), &client_cfg, &logs[1]),
    ];
    let t = Tunnel { http, grpc, admin, server_metrics, client_metrics, logs, children, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(t.http) != Some(200) {
        assert!(Instant::now() < deadline, "the tunnel did not serve within 20 s:\n{}", t.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    t
}

impl Tunnel {
    fn log_text(&self) -> String {
        self.logs.iter().map(|l| std::fs::read_to_string(l).unwrap_or_default()).collect::<Vec<_>>().join("\n")
    }

    /// `ss -tip` for both ends of the link connections: (local port, rto ms,
    /// ato ms) each. Only our daemons' sockets: another test's client may
    /// have drawn our link's port as its own ephemeral port.
    fn link_sockets(&self) -> Option<Vec<(u16, f64, f64)>> {
        let port = self.grpc.port();
        let out = Command::new("ss")
            .args(["-tinpH", "state", "established"])
            .arg(format!("( sport = :{port} or dport = :{port} )"))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let ours: Vec<String> = self.children.iter().map(|c| format!("pid={},", c.id())).collect();
        // Each socket: an address line (with its process), then its info line.
        let mut sockets = Vec::new();
        let mut local = None;
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            let field = |name: &str| words.iter().find_map(|w| w.strip_prefix(name)?.parse::<f64>().ok());
            match (field("rto:"), local) {
                (Some(rto), Some(p)) => {
                    sockets.push((p, rto, field("ato:").unwrap_or(-1.0)));
                    local = None;
                }
                _ => {
                    local = words
                        .iter()
                        .find(|w| w.starts_with("127.0.0.1:"))
                        .and_then(|w| w.rsplit(':').next()?.parse().ok())
                        .filter(|_| ours.iter().any(|pid| line.contains(pid.as_str())))
                }
            }
        }
        Some(sockets)
    }
}

fn ss_available() -> bool {
    let ok = Command::new("ss").arg("-V").output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "ss (iproute2) is required under CI");
        eprintln!("skipped: ss (iproute2) not found");
    }
    ok
}

#[test]
fn link_sockets_carry_the_short_timers_at_both_ends() {
    if !tunnel_daemon::tunnel::tuning::support().rto_min {
        eprintln!("skipped: this kernel has no TCP_RTO_MIN_US (Linux 6.15+); the fallback test covers it");
        return;
    }
    if !ss_available() {
        return;
    }
    let t = start("tuned", upstream(), false, ["", ""], None);
    let sockets = t.link_sockets().unwrap();
    // The client's end and the server's, at least one connection.
    assert!(sockets.len() >= 2, "{sockets:?}");
    for (port, rto, ato) in &sockets {
        // The kernel's floor is 200 ms; ours 20 ms (plus the smoothed RTT
        // and variance, small on loopback), and delayed ACKs within 8 ms.
        assert!(*rto < 200.0, "socket :{port} keeps the kernel's RTO floor: rto {rto} ms\n{sockets:?}");
        assert!(*ato <= 8.0, "socket :{port} delays ACKs {ato} ms\n{sockets:?}");
    }
    for m in [metrics(t.server_metrics), metrics(t.client_metrics)] {
        for option in ["rto_min", "delack_max", "notsent_lowat"] {
            let line = format!("link_tuning{{option=\"{option}\",state=\"applied\"}} 1");
            assert!(m.contains(&line), "no {line} in:\n{m}");
        }
    }
}

#[test]
fn without_kernel_support_each_daemon_says_so_once_and_serves() {
    let t = start("unsupported", upstream(), true, ["", ""], None);
    for _ in 0..5 {
        assert_eq!(get(t.http), Some(200));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for (log, side) in t.logs.iter().zip(["server", "client"]) {
        let text = loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if text.contains("this kernel does not support") || Instant::now() > deadline {
                break text;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert_eq!(text.matches("this kernel does not support").count(), 1, "the {side} says it once:\n{text}");
        assert!(text.contains("TCP_RTO_MIN_US (link_rto_min)"), "{text}");
    }
    for m in [metrics(t.server_metrics), metrics(t.client_metrics)] {
        let line = "link_tuning{option=\"rto_min\",state=\"unsupported\"} 1";
        assert!(m.contains(line), "no {line} in:\n{m}");
    }
    if ss_available() {
        for (port, rto, _) in t.link_sockets().unwrap() {
            assert!(rto >= 200.0, "socket :{port} was tuned anyway: rto {rto} ms");
        }
    }
}

/// Set in the test re-run inside the lossy namespace.
const NETNS_ENV: &str = "TUNNEL_TEST_NETNS";
/// The link's port inside the namespace (fresh, so a fixed port is free):
/// the nftables rule drops packets to and from it.
const LOSSY_GRPC_PORT: u16 = 17000;
/// How long the lossy link is watched, as issue 23's acceptance asks.
const LOSSY_RUN: Duration = Duration::from_secs(60);

/// Runs `ip` with `args`; whether it succeeded, and what it said.
fn ip(args: &[&str]) -> Result<(), String> {
    match Command::new("ip").args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A network namespace of this test's, removed (with what runs in it) on drop.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace does not end what runs in it.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.0]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        }
        let _ = ip(&["netns", "del", &self.0]);
    }
}

/// 1% of the link's packets dropped each way, 250 ms heartbeats reaped at
/// 750 ms, bulk downloads running for 60 s: nothing is reaped, the live
/// sockets keep the short timers at both ends, and the console reports the
/// loss as retransmissions. Re-runs itself inside a network namespace
/// (needs root, ip and nft; skipped with a message where they are missing,
/// required under CI).
#[test]
fn a_lossy_link_keeps_its_timers_and_reaps_nothing() {
    if std::env::var_os(NETNS_ENV).is_some() {
        return lossy_link_inside_the_namespace();
    }
    if !tunnel_daemon::tunnel::tuning::support().rto_min {
        eprintln!("skipped: this kernel has no TCP_RTO_MIN_US (Linux 6.15+)");
        return;
    }
    let ci = std::env::var_os("CI").is_some();
    let ns = Netns(format!("tunnel-test-{}", std::process::id()));
    if let Err(e) = ip(&["netns", "add", &ns.0]) {
        assert!(!ci, "creating a network namespace failed under CI: {e}");
        eprintln!("skipped: cannot create a network namespace (needs root and iproute2): {e}");
        return;
    }
    ip(&["-n", &ns.0, "link", "set", "lo", "mtu", "1500", "up"]).unwrap();
    let rules = format!(
        "table inet tunnel_test {{\n  chain out {{\n    type filter hook output priority 0; policy accept;\n    tcp dport {LOSSY_GRPC_PORT} numgen random mod 100 < 1 drop\n    tcp sport {LOSSY_GRPC_PORT} numgen random mod 100 < 1 drop\n  }}\n}}\n"
    );
    let loaded = Command::new("ip")
        .args(["netns", "exec", &ns.0, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().expect("piped").write_all(rules.as_bytes())?;
            c.wait_with_output()
        });
    match loaded {
        Ok(o) if o.status.success() => {}
        other => {
            let why = other.map_or_else(|e| e.to_string(), |o| String::from_utf8_lossy(&o.stderr).to_string());
            assert!(!ci, "loading the nftables loss rule failed under CI: {why}");
            eprintln!("skipped: cannot load the nftables loss rule (nft missing?): {why}");
            return;
        }
    }
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", "a_lossy_link_keeps_its_timers_and_reaps_nothing", "--nocapture", "--test-threads=1"])
        .env(NETNS_ENV, &ns.0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read on threads so that a chatty child never blocks on a full pipe.
    let drain = |r: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let _ = r.read_to_string(&mut text);
            }
            text
        })
    };
    let out = drain(child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let err = drain(child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>));
    let deadline = Instant::now() + LOSSY_RUN + Duration::from_secs(90);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, err) = (out.join().unwrap_or_default(), err.join().unwrap_or_default());
    let err = format!("{out}\n{err}");
    // What the run measured (shown with --nocapture).
    eprintln!(
        "{}",
        err.lines().filter(|l| l.starts_with("lossy link") || l.starts_with("stream ")).collect::<Vec<_>>().join("\n")
    );
    assert!(status.is_some(), "the run in the namespace overran:\n{err}");
    assert!(status.is_some_and(|s| s.success()), "the run in the namespace failed:\n{err}");
}

/// The test proper, inside the namespace: everything on its loopback, the
/// link's packets dropped at 1% each way.
fn lossy_link_inside_the_namespace() {
    let grpc: SocketAddr = format!("127.0.0.1:{LOSSY_GRPC_PORT}").parse().unwrap();
    let t = start(
        "lossy",
        upstream(),
        false,
        ["heartbeat_timeout = \"750ms\"", "heartbeat_interval = \"250ms\""],
        Some(grpc),
    );
    let stop = Instant::now() + LOSSY_RUN;
    let http = t.http;
    // Two bulk downloads, paced so that a debug build's daemons keep CPU
    // for their heartbeats on two cores: the loss, not the load, is tested.
    let loaders: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, 0u32);
                while Instant::now() < stop {
                    if get_big(http) {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (ok, failed)
            })
        })
        .collect();
    let (mut ok, mut failed) = (0, 0);
    for l in loaders {
        let (o, f) = l.join().unwrap();
        ok += o;
        failed += f;
    }
    // Both ends' live sockets carry the timers. Under loss a socket's RTO
    // backs off (doubles) until its next round-trip sample, so the check
    // waits for the link to settle once the load is over.
    let settle = Instant::now() + Duration::from_secs(10);
    let sockets = loop {
        let sockets = t.link_sockets().expect("ss");
        let settled = sockets.iter().all(|(_, rto, ato)| *rto < 200.0 && *ato <= 8.0);
        if (sockets.len() >= 2 && settled) || Instant::now() > settle {
            break sockets;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    // Both ends of the link connection.
    assert!(sockets.len() >= 2, "{sockets:?}");
    for (port, rto, ato) in &sockets {
        assert!(*rto < 200.0, "socket :{port} keeps the kernel's RTO floor: rto {rto} ms\n{sockets:?}");
        assert!(*ato <= 8.0, "socket :{port} delays ACKs {ato} ms\n{sockets:?}");
    }
    eprintln!("lossy link: {ok} downloads of {BIG} bytes, {failed} failed");
    assert!(ok >= 20, "the load hardly ran: {ok} downloads, {failed} failed\n{}", t.log_text());

    let m = metrics(t.server_metrics);
    assert!(m.contains("tunnel_streams_reaped_total 0"), "streams were reaped:\n{m}\n{}", t.log_text());

    // The console's view: the options read from the live server sockets,
    // the client's word for its end, and the loss seen as retransmissions.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let update = rt.block_on(async {
        use tunnel_lib::introspection::{introspection_client::IntrospectionClient, WatchRequest};
        let mut c = IntrospectionClient::connect(format!("http://{}", t.admin)).await.unwrap();
        let mut s = c.watch(WatchRequest { max_updates_per_second: 1, heads: false }).await.unwrap().into_inner();
        tokio::time::timeout(Duration::from_secs(10), s.message()).await.unwrap().unwrap().unwrap()
    });
    let client = update.clients.first().expect("the client in the console");
    let link = client.link.clone().unwrap_or_default();
    let server_end = link.server_options.clone().unwrap_or_default();
    let client_end = client.client_link_options.clone().unwrap_or_default();
    for end in [&server_end, &client_end] {
        assert!(end.rto_min_us == 20_000 && (8_000..=10_000).contains(&end.delack_max_us), "{client:?}");
        assert_eq!(end.notsent_lowat, 128 << 10, "{client:?}");
    }
    // The downloads cross the link from the client: its socket resends what the nftables rule dropped.
    let client_counts = link.client.unwrap_or_default();
    assert!(client_counts.retransmits > 0 && client_counts.bytes_retrans > 0, "no loss seen: {client:?}");
    for s in &update.streams {
        let link = s.link.clone().unwrap_or_default();
        assert_eq!(link.server_options.map(|o| o.rto_min_us), Some(20_000), "{s:?}");
        let (server, client) = (link.server.unwrap_or_default(), link.client.unwrap_or_default());
        eprintln!(
            "stream {} type {}: heartbeat delay p50/p99/max {}/{}/{} ms; server resent {} segments ({} of {} bytes), client {} ({} of {} bytes)",
            s.stream_id, s.stream_type, s.delay_p50_ms, s.delay_p99_ms, s.delay_max_ms,
            server.retransmits, server.bytes_retrans, server.bytes_sent, client.retransmits, client.bytes_retrans, client.bytes_sent
        );
    }
}

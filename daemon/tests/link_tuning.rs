//! The tunnel link's TCP options on real processes: by default both ends'
//! link sockets carry the short timers (read back from the live sockets
//! with `ss`, which asks the kernel), and on a kernel without them (forced
//! with TUNNEL_LINK_TUNING_UNSUPPORTED) each daemon says so once, its
//! metrics say "unsupported", and the tunnel serves as before.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// An upstream answering every request with 200 "ok", on a thread that
/// lives as long as the test process.
fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = BufReader::new(s);
                loop {
                    let mut line = String::new();
                    // The head ends at an empty line; requests carry no body here.
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line == "\r\n" {
                            break;
                        }
                    }
                    let _ = r.get_mut().write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
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

struct Tunnel {
    http: SocketAddr,
    grpc: SocketAddr,
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
fn start(tag: &str, upstream: SocketAddr, unsupported: bool) -> Tunnel {
    let [http, grpc, admin, server_metrics, client_metrics] = common::free_ports();
    let dir = std::env::temp_dir().join(format!("tunnel-link-tuning-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (server_cfg, client_cfg) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(
        &server_cfg,
        format!("[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nmetrics_listen = \"{server_metrics}\"\n[[groups]]\nname = \"demo\"\ntoken = \"t\"\n[[rules]]\ngroup = \"demo\"\nupstream = \"web\"\n"),
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
    let t = Tunnel { http, grpc, server_metrics, client_metrics, logs, children, dir };
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

    /// `ss -ti` for both ends of the link connections: (local port, rto ms, ato ms) each.
    fn link_sockets(&self) -> Option<Vec<(u16, f64, f64)>> {
        let port = self.grpc.port();
        let out = Command::new("ss")
            .args(["-tinH", "state", "established"])
            .arg(format!("( sport = :{port} or dport = :{port} )"))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        // Each socket: an address line, then its info line.
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
    let t = start("tuned", upstream(), false);
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
    let t = start("unsupported", upstream(), true);
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

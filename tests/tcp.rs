//! `[[tcp]]` services over real sockets: bytes carried both ways exactly
//! (a large echo, compared by hash), a public peer that stops reading stalls
//! nothing else, an upstream that refuses gets the public connection closed
//! at once, allow/deny, and a PROXY protocol v2 header a real parser (the
//! `ppp` crate) reads the public client's address from; and a real OpenSSH
//! session through a TCP service.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP upstream on 127.0.0.1:0: `echo` sends back what it reads, `flood`
/// writes without end (until the peer goes), `proxy` reads a PROXY v2
/// header and answers the source address it names.
async fn tcp_upstream(kind: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Lives as long as the test's runtime.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                match kind {
                    "echo" => {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    }
                    "flood" => {
                        let block = vec![b'f'; 64 << 10];
                        // Bounded: 4 GiB at most, far past any window.
                        for _ in 0..(1 << 16) {
                            if s.write_all(&block).await.is_err() {
                                return;
                            }
                        }
                    }
                    _ => {
                        let mut buf = vec![0u8; 512];
                        let mut got = 0;
                        let answer = loop {
                            match s.read(&mut buf[got..]).await {
                                Ok(0) | Err(_) => break "no header".to_string(),
                                Ok(n) => got += n,
                            }
                            match ppp::v2::Header::try_from(&buf[..got]) {
                                Ok(h) => break format!("{:?}", h.addresses),
                                Err(e) if e.to_string().contains("ncomplete") || got < 16 => continue,
                                Err(e) => break format!("bad header: {e}"),
                            }
                        };
                        let _ = s.write_all(answer.as_bytes()).await;
                        let _ = s.shutdown().await;
                    }
                }
            });
        }
    });
    addr
}

struct Tcp {
    server: TestServer,
    _client: TestClient,
    /// Each service's bound public address, in the order of `services`.
    public: Vec<SocketAddr>,
}

/// A tunnel with `services` ([[tcp]] entries' extra keys, one per upstream
/// name, each on its own port) and the client's `upstreams`.
async fn tunnel(services: &[(&str, &str)], upstreams: &[(&str, String)]) -> Tcp {
    let mut entries = String::new();
    for (upstream, extra) in services {
        entries.push_str(&format!(
            "[[tcp]]\nlisten = \"127.0.0.1:0\"\ngroup = \"demo\"\nupstream = \"{upstream}\"\n{extra}\n"
        ));
    }
    let server = start_server(&demo_server_toml("", "", &entries), None).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", upstreams));
    server.wait_streams(3).await;
    let public = server.shared.tcp_addrs.get().expect("tcp services bound").iter().map(|(_, a)| *a).collect();
    Tcp { server, _client: client, public }
}

/// Reads until EOF or `limit`; whether EOF came within it.
async fn closes_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + limit;
    // Bounded by the deadline.
    loop {
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_carries_bytes_both_ways_exactly() {
    let echo = tcp_upstream("echo").await;
    let t = tunnel(&[("echo", "")], &[("echo", format!("tcp://{echo}"))]).await;
    const SIZE: usize = 1 << 30;
    let s = TcpStream::connect(t.public[0]).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        for c in pattern_chunks(SIZE) {
            h.update(&c);
            w.write_all(&c).await.unwrap();
        }
        // Half-close: the echo sees EOF, ends its side, and ours reads EOF.
        w.shutdown().await.unwrap();
        hex(&h.finalize())
    });
    let reader = async {
        let (mut h, mut n, mut buf) = (Sha256::new(), 0usize, vec![0u8; 256 << 10]);
        loop {
            let got = r.read(&mut buf).await.unwrap();
            if got == 0 {
                break;
            }
            h.update(&buf[..got]);
            n += got;
        }
        (n, hex(&h.finalize()))
    };
    let (n, back) = tokio::time::timeout(Duration::from_secs(120), reader).await.expect("echoed in time");
    let sent = writer.await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    println!("tcp echo through the tunnel: {} MiB each way in {secs:.1} s", SIZE >> 20);
    assert_eq!(n, SIZE);
    assert_eq!(back, sent, "the bytes came back exactly");
    let rec = t.server.shared.requests.since(0);
    let rec = rec.iter().find(|r| r.method == "TCP").expect("recorded");
    assert_eq!((rec.status, rec.bytes_in, rec.bytes_out), (200, SIZE as u64, SIZE as u64));
    assert_eq!(rec.upgrade, "tcp");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_stalls_nothing_else() {
    let (echo, flood) = (tcp_upstream("echo").await, tcp_upstream("flood").await);
    let ups = [("echo", format!("tcp://{echo}")), ("flood", format!("tcp://{flood}"))];
    let t = tunnel(&[("echo", ""), ("flood", "")], &ups).await;
    // Reads nothing: the flood fills its window and stops there.
    let _stalled = TcpStream::connect(t.public[1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(t.public[0]).await.unwrap();
    let mut worst = Duration::ZERO;
    for i in 0..20u32 {
        let msg = format!("ping {i}\n");
        let t0 = Instant::now();
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut buf = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await.expect("echo in time").unwrap();
        assert_eq!(buf, msg.as_bytes());
        worst = worst.max(t0.elapsed());
    }
    println!("20 echoes beside a stalled flood: worst {worst:?}");
    assert!(worst < Duration::from_secs(1), "an echo waited {worst:?} behind the stalled connection");
}

#[tokio::test]
async fn an_upstream_that_refuses_closes_the_public_connection_at_once() {
    // A port nobody listens on.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let t = tunnel(&[("gone", "")], &[("gone", format!("tcp://{closed}"))]).await;
    let mut s = TcpStream::connect(t.public[0]).await.unwrap();
    let started = Instant::now();
    assert!(closes_within(&mut s, Duration::from_secs(5)).await, "closed");
    println!("refused upstream: public connection closed after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(2));
    let shared = t.server.shared.clone();
    eventually("the failure recorded", WAIT, || {
        shared.requests.since(0).iter().any(|r| r.method == "TCP" && r.status == 502 && r.error.contains("connect"))
    })
    .await;
}

#[tokio::test]
async fn denied_addresses_are_closed_and_proxy_v2_names_the_client() {
    let (echo, proxy) = (tcp_upstream("echo").await, tcp_upstream("proxy").await);
    let ups = [("echo", format!("tcp://{echo}")), ("proxy", format!("tcp://{proxy}"))];
    let t = tunnel(&[("echo", "deny = [\"127.0.0.0/8\"]"), ("proxy", "proxy_protocol = true")], &ups).await;
    let mut denied = TcpStream::connect(t.public[0]).await.unwrap();
    assert!(closes_within(&mut denied, Duration::from_secs(2)).await, "a denied address is closed at once");
    let shared = t.server.shared.clone();
    eventually("the refusal recorded", WAIT, || {
        shared.requests.since(0).iter().any(|r| r.method == "TCP" && r.refused == "address" && r.status == 403)
    })
    .await;

    let mut s = TcpStream::connect(t.public[1]).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut answer = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut answer)).await.expect("answer in time").unwrap();
    // The upstream's parser read our public address and the service's.
    let records: Vec<_> = t.server.shared.requests.since(0).iter().map(|r| (r.status, r.error.clone())).collect();
    assert!(
        answer.contains(&local.ip().to_string()) && answer.contains(&local.port().to_string()),
        "{answer:?} {records:?}"
    );
    assert!(answer.contains(&t.public[1].port().to_string()), "{answer}");
}

/// A real OpenSSH server (Debian's openssh-server) on a loopback port,
/// reached through a `[[tcp]]` service by the real ssh client, runs a
/// command. Skipped, saying so, where either is missing (never under CI,
/// where .ci/run installs them).
#[tokio::test]
async fn ssh_runs_a_command_through_a_tcp_service() {
    let (sshd, ssh) = (std::path::Path::new("/usr/sbin/sshd"), which("ssh"));
    let (true, Some(ssh)) = (sshd.exists(), ssh) else {
        assert!(std::env::var_os("CI").is_none(), "sshd and ssh are required under CI (.ci/run installs them)");
        eprintln!("SKIPPED: /usr/sbin/sshd or ssh missing (apt-get install openssh-server openssh-client)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("tunnel-ssh-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    for key in ["host_key", "id"] {
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join(key))
            .status()
            .unwrap();
        assert!(ok.success(), "ssh-keygen");
    }
    std::fs::copy(dir.join("id.pub"), dir.join("authorized_keys")).unwrap();
    // sshd wants its privilege separation directory (made by its package's service, which is not running here).
    let _ = std::fs::create_dir_all("/run/sshd");
    let [port] = free_ports::<1>();
    let d = dir.display();
    let config = format!(
        "Port {}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\nLogLevel ERROR\n",
        port.port()
    );
    std::fs::write(dir.join("sshd_config"), config).unwrap();
    let mut daemon = tokio::process::Command::new(sshd)
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // Up when its port answers, within the bound.
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(port).await.is_err() {
        assert!(Instant::now() < deadline, "sshd did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = tunnel(&[("ssh", "")], &[("ssh", format!("tcp://{port}"))]).await;
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let run = tokio::process::Command::new(ssh)
        .args(["-i"])
        .arg(dir.join("id"))
        .args(["-p", &t.public[0].port().to_string()])
        .args(["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["-o", "LogLevel=ERROR", &format!("{user}@127.0.0.1"), "echo", "through-the-tunnel"])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(30), run).await.expect("ssh finished in time").unwrap();
    let _ = daemon.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "ssh failed: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "through-the-tunnel");
}

/// The program `name` on PATH.
fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| std::path::Path::new(d).join(name)).find(|p| p.exists())
}

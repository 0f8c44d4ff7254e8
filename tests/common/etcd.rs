//! A real etcd (Debian's `etcd-server`) for the cluster tests: members on
//! loopback addresses of their own, data in a temporary directory, killed when
//! dropped. Where `etcd` is not installed the tests skip, saying so, except
//! under CI, where .ci/run installs it. Self-contained, so that the
//! console's tests include it too (`#[path]`), using only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd cluster of one or more members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
    /// Client-side TLS: https:// endpoints, clients must present a certificate.
    tls: Option<EtcdTlsFiles>,
}

/// etcd's certificate and key, and the CA its clients' certificates must be signed by.
#[derive(Clone)]
pub struct EtcdTlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Whether etcdctl (Debian's etcd-client) is installed; under CI its absence fails the test.
pub fn etcdctl_available() -> bool {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("etcdctl").is_file()))
        .unwrap_or(false);
    if !found {
        assert!(std::env::var_os("CI").is_none(), "etcdctl is required under CI (.ci/run installs etcd-client)");
        eprintln!("skipped: etcdctl not installed (apt-get install etcd-client)");
    }
    found
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

/// Whether etcd is installed; under CI its absence fails the test.
pub fn etcd_available() -> bool {
    let found =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file())).unwrap_or(false);
    if !found {
        assert!(std::env::var_os("CI").is_none(), "etcd is required under CI (.ci/run installs etcd-server)");
        eprintln!("skipped: etcd not installed (apt-get install etcd-server)");
    }
    found
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers; None (after
    /// saying so) when etcd is not installed.
    pub fn start(n: usize) -> Option<EtcdCluster> {
        Self::start_with(n, |_| None)
    }

    /// One member serving clients over TLS with client certificates
    /// required: `tls` makes the files for the member's address.
    pub fn start_tls(tls: impl Fn(&str) -> EtcdTlsFiles) -> Option<EtcdCluster> {
        Self::start_with(1, |ip| Some(tls(ip)))
    }

    fn start_with(n: usize, tls: impl Fn(&str) -> Option<EtcdTlsFiles>) -> Option<EtcdCluster> {
        if !etcd_available() {
            return None;
        }
        // Tests start together: a count keeps two clusters of one process apart.
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let nth = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("tunnel-etcd-{}-{nth}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        assert!((1..=3).contains(&n), "1 to 3 members");
        // Each cluster on loopback addresses of its own (all of 127/8 is on
        // lo) with etcd's usual ports: ports picked free and released could
        // be taken by a parallel test before etcd binds them, and then a
        // health check would find another test's etcd there.
        // 127.a.b.c: a from the process, b from the count, so no two clusters
        // of concurrent test processes or of one process share an address.
        let pid = std::process::id();
        let (a, b, c) = (1 + pid % 250, (pid / 250 + nth * 7) % 256, 1 + (pid / 64_000 + nth * 4) % 250);
        let members = (0..n)
            .map(|i| {
                let ip: std::net::IpAddr = format!("127.{a}.{b}.{}", c + i as u32).parse().expect("a loopback address");
                Member {
                    name: format!("m{i}"),
                    client: SocketAddr::new(ip, 2379),
                    peer: SocketAddr::new(ip, 2380),
                    child: None,
                }
            })
            .collect();
        let first: Vec<Member> = members;
        let tls = tls(&first[0].client.ip().to_string());
        let mut c = EtcdCluster { members: first, dir, tls };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy(Duration::from_secs(60));
        Some(c)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        let scheme = self.scheme();
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(t) = &self.tls {
            tls_args = vec![
                "--cert-file".into(),
                t.cert.display().to_string(),
                "--key-file".into(),
                t.key.display().to_string(),
                "--trusted-ca-file".into(),
                t.ca.display().to_string(),
                "--client-cert-auth".into(),
            ];
        }
        let m = &mut self.members[i];
        let data = self.dir.join(&m.name);
        let child = Command::new("etcd")
            .args(&tls_args)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("{scheme}://{}", m.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", m.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(format!("tunnel-test-{}", std::process::id()))
            // etcd's defaults: quicker elections flap on a loaded 2-core CI machine.
            .args(["--heartbeat-interval", "100", "--election-timeout", "1000"])
            .args(["--log-level", "error", "--logger", "zap"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(format!("{}.log", m.name)))
                    .expect("etcd log file"),
            )
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// The client URLs, as `[cluster] etcd = [...]` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("{}://{}", self.scheme(), m.client)).collect()
    }

    /// Runs etcdctl (API v3) against this cluster, with the client
    /// certificate `as_client` when it has TLS; its stdout, or panics with its stderr.
    pub fn etcdctl(&self, args: &[&str], as_client: Option<(&Path, &Path)>) -> String {
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3").arg("--endpoints").arg(self.endpoints().join(","));
        if let (Some(t), Some((cert, key))) = (&self.tls, as_client) {
            cmd.arg("--cacert").arg(&t.ca).arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let out = cmd.args(args).output().expect("etcdctl runs");
        assert!(out.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `etcd = [...]` for server.toml.
    pub fn toml_list(&self) -> String {
        let quoted: Vec<String> = self.endpoints().iter().map(|e| format!("\"{e}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Kills every member (SIGKILL): etcd gone, data kept.
    pub fn stop_all(&mut self) {
        for m in &mut self.members {
            if let Some(mut c) = m.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Starts every stopped member again on its data and waits until the cluster answers.
    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.start_member(i);
            }
        }
        self.wait_healthy(Duration::from_secs(60));
    }

    /// Waits until every running member says it is healthy (it has a leader);
    /// fails with the member's log if it exited or never got there.
    fn wait_healthy(&mut self, limit: Duration) {
        let started = Instant::now();
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            loop {
                // Over TLS, a member that accepts connections is up (the servers under
                // test then wait for it to answer, as they would for a real one).
                let up = match self.tls {
                    None => health(self.members[i].client),
                    Some(_) => {
                        std::net::TcpStream::connect_timeout(&self.members[i].client, Duration::from_millis(200))
                            .is_ok()
                    }
                };
                if up {
                    break;
                }
                let exited = self.members[i].child.as_mut().and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || started.elapsed() > limit {
                    let name = &self.members[i].name;
                    let log = std::fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
                    panic!(
                        "etcd member {name} not healthy within {limit:?} (exit: {exited:?}); its log ends:\n{}",
                        tail.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// GET /health over plain HTTP/1.1; true on `"health":"true"`.
fn health(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: etcd\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! A real etcd (Debian's `etcd-server`) for the cluster tests: members on
//! loopback ports of their own, data in a temporary directory, killed when
//! dropped. Where `etcd` is not installed the tests skip, saying so, except
//! under CI, where .ci/run installs it. Self-contained, so that the
//! console's tests include it too (`#[path]`), using only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One etcd cluster of one or more members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    dir: PathBuf,
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
        if !etcd_available() {
            return None;
        }
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros());
        let dir = std::env::temp_dir().join(format!("tunnel-etcd-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("etcd data directory");
        assert!((1..=3).contains(&n), "1 to 3 members");
        // All held until all are picked, so no port is handed out twice.
        let held: Vec<std::net::TcpListener> =
            (0..2 * n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port")).collect();
        let ports: Vec<SocketAddr> = held.iter().map(|l| l.local_addr().expect("bound")).collect();
        drop(held);
        let members = (0..n)
            .map(|i| Member { name: format!("m{i}"), client: ports[2 * i], peer: ports[2 * i + 1], child: None })
            .collect();
        let mut c = EtcdCluster { members, dir };
        for i in 0..n {
            c.start_member(i);
        }
        c.wait_healthy(Duration::from_secs(20));
        Some(c)
    }

    fn start_member(&mut self, i: usize) {
        let initial: Vec<String> = self.members.iter().map(|m| format!("{}=http://{}", m.name, m.peer)).collect();
        let m = &mut self.members[i];
        let data = self.dir.join(&m.name);
        let child = Command::new("etcd")
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://{}", m.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", m.client))
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
            // Quick elections: a test stops members and waits for the rest.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd starts");
        m.child = Some(child);
    }

    /// The client URLs, as `[cluster] etcd = [...]` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| format!("http://{}", m.client)).collect()
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
        self.wait_healthy(Duration::from_secs(20));
    }

    /// Waits until every running member says it is healthy (it has a leader).
    fn wait_healthy(&self, limit: Duration) {
        let started = Instant::now();
        for m in self.members.iter().filter(|m| m.child.is_some()) {
            loop {
                if health(m.client) {
                    break;
                }
                assert!(started.elapsed() < limit, "etcd member {} not healthy within {limit:?}", m.name);
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

//! The daemons as systemd runs them (`Type=notify`): real processes with
//! NOTIFY_SOCKET pointing at a datagram socket of this test, which reads
//! READY, WATCHDOG, RELOADING (with MONOTONIC_USEC), STOPPING and STATUS.
//! And the shipped unit files pass `systemd-analyze verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A notify socket and everything it received.
struct Manager {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn new(path: &Path) -> Manager {
        let socket = UnixDatagram::bind(path).unwrap();
        socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        Manager { socket, seen: Vec::new() }
    }

    /// Waits (bounded) for a datagram containing every one of `parts`; returns it.
    fn expect(&mut self, parts: &[&str], within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let mut buf = [0u8; 4096];
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if parts.iter().all(|p| msg.contains(p)) {
                    return msg;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no notification with {parts:?} within {within:?}; got {:#?}",
                self.seen
            );
        }
    }
}

fn spawn(bin: &str, config: &Path, socket: &Path, log: &Path) -> Child {
    Command::new(bin)
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", "400000")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap().success());
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code().unwrap_or(-1);
        }
        assert!(Instant::now() < deadline, "did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn both_daemons_speak_the_notify_protocol() {
    let dir = std::env::temp_dir().join(format!("tunnel-systemd-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let [http, grpc, admin] = common::free_ports();
    let server_cfg = dir.join("server.toml");
    std::fs::write(
        &server_cfg,
        format!("[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nshutdown_grace = \"2s\"\n[[groups]]\nname = \"demo\"\ntoken = \"t\"\n"),
    )
    .unwrap();
    let client_cfg = dir.join("client.toml");
    std::fs::write(
        &client_cfg,
        format!("server = \"http://{grpc}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"t\"\nshutdown_grace = \"2s\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n"),
    )
    .unwrap();

    let server_sock = dir.join("server.sock");
    let mut manager = Manager::new(&server_sock);
    let mut server = spawn(env!("CARGO_BIN_EXE_tunnel-server"), &server_cfg, &server_sock, &dir.join("server.log"));
    let ready = manager.expect(&["READY=1", "STATUS="], Duration::from_secs(15));
    assert!(ready.contains("0 clients"), "{ready}");
    manager.expect(&["WATCHDOG=1"], Duration::from_secs(2));

    let client_sock = dir.join("client.sock");
    let mut client_manager = Manager::new(&client_sock);
    let mut client = spawn(env!("CARGO_BIN_EXE_tunnel-client"), &client_cfg, &client_sock, &dir.join("client.log"));
    let ready = client_manager.expect(&["READY=1"], Duration::from_secs(15));
    assert!(ready.contains("STATUS=connected to"), "{ready}");
    client_manager.expect(&["WATCHDOG=1"], Duration::from_secs(2));
    // The server's status line now counts the client.
    manager.expect(&["WATCHDOG=1", "1 clients, 3 streams"], Duration::from_secs(5));

    signal(&server, "HUP");
    let reloading = manager.expect(&["RELOADING=1"], Duration::from_secs(5));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    manager.expect(&["READY=1"], Duration::from_secs(5));

    // The client reloads too: new upstreams apply, a broken file is refused,
    // and SIGHUP never ends the process.
    let client_log = dir.join("client.log");
    let log_has = |needle: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::fs::read_to_string(&client_log).unwrap_or_default().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    };
    let good = std::fs::read_to_string(&client_cfg).unwrap();
    std::fs::write(&client_cfg, format!("{good}api = \"http://127.0.0.1:10\"\n")).unwrap();
    signal(&client, "HUP");
    let reloading = client_manager.expect(&["RELOADING=1"], Duration::from_secs(5));
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    client_manager.expect(&["READY=1"], Duration::from_secs(5));
    assert!(log_has("new upstreams serve new requests"), "the new upstreams applied");
    std::fs::write(&client_cfg, "server = 12\n").unwrap();
    signal(&client, "HUP");
    client_manager.expect(&["RELOADING=1"], Duration::from_secs(5));
    client_manager.expect(&["READY=1"], Duration::from_secs(5));
    assert!(log_has("config reload refused"), "a broken file is refused, naming why");
    assert!(client.try_wait().unwrap().is_none(), "SIGHUP never ends the client");

    signal(&client, "TERM");
    client_manager.expect(&["STOPPING=1"], Duration::from_secs(5));
    assert_eq!(wait_exit(&mut client, Duration::from_secs(10)), 0);
    signal(&server, "TERM");
    manager.expect(&["STOPPING=1"], Duration::from_secs(5));
    assert_eq!(wait_exit(&mut server, Duration::from_secs(10)), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `systemd-analyze verify` is clean on both units (with ExecStart pointed
/// at the binaries just built, as verify checks that they exist).
#[test]
fn unit_files_verify() {
    let Ok(out) = Command::new("systemd-analyze").arg("--version").output() else {
        assert!(std::env::var_os("CI").is_none(), "systemd-analyze is required under CI");
        eprintln!("systemd-analyze not installed: unit files not verified");
        return;
    };
    assert!(out.status.success());
    let dir = std::env::temp_dir().join(format!("tunnel-units-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut units = Vec::new();
    for (name, bin) in
        [("tunnel-server", env!("CARGO_BIN_EXE_tunnel-server")), ("tunnel-client", env!("CARGO_BIN_EXE_tunnel-client"))]
    {
        let text = std::fs::read_to_string(root().join(format!("config/{name}.service"))).unwrap();
        assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{name}");
        assert!(text.contains("ExecReload=/bin/kill -HUP $MAINPID"), "{name}");
        let unit = dir.join(format!("{name}.service"));
        std::fs::write(&unit, text.replace(&format!("/usr/local/bin/{name}"), bin)).unwrap();
        units.push(unit);
    }
    let out = Command::new("systemd-analyze").arg("verify").args(&units).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.trim().is_empty(), "systemd-analyze verify:\n{text}");
}

//! The server's logs as a log shipper reads them: with `[log] format =
//! "json"` every line is one JSON object, each public request has an access
//! line with its fields, and the group token appears nowhere, in the logs or
//! in `--check`'s output.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "s3cret-token-do-not-log";

/// One HTTP/1.1 GET, bounded; the status code.
fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: app.test\r\nx-request-id: trace-77\r\nconnection: close\r\n\r\n")
            .as_bytes(),
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// The log file's text once it contains `needle`, or as it is at `deadline`.
fn log_once_it_has(log: &std::path::Path, needle: &str, deadline: Instant) -> String {
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every line parsed as one JSON object (a line that is not fails the test).
fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
}

#[test]
fn json_logs_with_an_access_line_and_no_secrets() {
    let [http, grpc, admin] = common::free_ports();
    let dir = std::env::temp_dir().join(format!("tunnel-logs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\n[log]\nformat = \"json\"\n[[groups]]\nname = \"demo\"\ntoken = \"{TOKEN}\"\n[[rules]]\ngroup = \"demo\"\nupstream = \"web\"\n"
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tunnel-server");
    let check = Command::new(bin).arg("--config").arg(&config).arg("--check").output().unwrap();
    let check_text = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{check_text}");
    assert!(!check_text.contains(TOKEN), "--check shows the token: {check_text}");

    let log = dir.join("server.log");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // No client is connected: a 503, answered by the server itself, logged all the same.
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = get(http, "/page?q=1") {
            break s;
        }
        assert!(Instant::now() < deadline, "the server did not answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503);
    // The access line is written as the request completes; give it a moment.
    let text = log_once_it_has(&log, "\"target\":\"access\"", deadline);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let lines = json_lines(&text);
    assert!(lines.len() >= 2, "{text}");
    let access = lines.iter().find(|l| l["target"] == "access").unwrap_or_else(|| panic!("no access line:\n{text}"));
    assert_eq!(access["method"], "GET");
    assert_eq!(access["host"], "app.test");
    assert_eq!(access["path"], "/page");
    assert_eq!(access["status"], 503);
    assert_eq!(access["group"], "demo");
    assert_eq!(access["trace_id"], "trace-77");
    for field in ["timestamp", "level", "duration_ms", "bytes_in", "bytes_out", "client", "stream", "request_id"] {
        assert!(access.get(field).is_some(), "access line lacks {field}: {access}");
    }
    assert!(!text.contains(TOKEN), "the token was logged:\n{text}");
}

/// The client's logs too: the flat `log_format` and `log_level` keys apply
/// (JSON lines; info lines gone at "warn"), and neither its logs nor
/// `--check` show the token.
#[test]
fn client_json_logs_honour_log_level_and_hide_the_token() {
    let dir = std::env::temp_dir().join(format!("tunnel-client-logs-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("client.toml");
    // Nobody listens on the server port: the client logs failed sessions (warnings).
    std::fs::write(
        &config,
        format!(
            "server = \"http://{}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"{TOKEN}\"\nreconnect_max = \"200ms\"\nlog_format = \"json\"\nlog_level = \"warn\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n",
            common::free_ports::<1>()[0]
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tunnel-client");
    let check = Command::new(bin).arg("--config").arg(&config).arg("--check").output().unwrap();
    let check_text = format!("{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(check.status.success(), "{check_text}");
    assert!(!check_text.contains(TOKEN), "--check shows the token: {check_text}");

    let log = dir.join("client.log");
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = log_once_it_has(&log, "session failed", Instant::now() + Duration::from_secs(15));
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let lines = json_lines(&text);
    assert!(lines.iter().any(|l| l["level"] == "WARN"), "a warning for the failed session:\n{text}");
    assert!(
        lines.iter().all(|l| l["level"] == "WARN" || l["level"] == "ERROR"),
        "log_level = warn drops info:\n{text}"
    );
    assert!(!text.contains(TOKEN), "the token was logged:\n{text}");
}

//! `tunnel-tui --once` and `--json` against a real server: one snapshot,
//! exit 0 when connected; one line and a non-zero exit when not.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::Client;
use tunnel_daemon::server::{Listeners, Server};
use tunnel_lib::config::{ClientConfig, ServerConfig};

const SERVER: &str = r#"
[server]
admin_token = "adm"
[[groups]]
name = "demo"
token = "t"
[[rules]]
group = "demo"
upstream = "web"
"#;

async fn tui(args: &[&str]) -> std::process::Output {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tunnel-tui")).args(args).output();
    tokio::time::timeout(Duration::from_secs(15), out).await.expect("tunnel-tui --once finishes").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_prints_a_snapshot_or_a_reason() {
    let listeners = Listeners::ephemeral().await.unwrap();
    let (_, grpc, admin) = listeners.addrs().unwrap();
    let server = Server::new(ServerConfig::from_str_named(SERVER, "test").unwrap(), None);
    let shared = server.shared();
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    let cfg = format!("server = \"http://{grpc}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"t\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n");
    let client = tokio::spawn(
        Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap()).run(stop.clone().cancelled_owned()),
    );
    let start = Instant::now();
    while shared.registry.streams().len() < 3
        || shared.registry.clients().first().is_none_or(|c| c.config_version.is_empty())
    {
        assert!(start.elapsed() < Duration::from_secs(15), "client registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let admin = admin.to_string();

    let out = tui(&["--server", &admin, "--token", "adm", "--once"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("server ") && lines[0].contains("streams 3"), "{text}");
    assert!(lines[1].starts_with("STREAM"), "{text}");
    let version = shared.group_version("demo").unwrap();
    for s in shared.registry.streams() {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&s.stream_id))
            .unwrap_or_else(|| panic!("{} missing:\n{text}", s.stream_id));
        assert!(line.contains("edge-1") && line.contains("demo") && line.contains("/64"), "{line}");
        assert!(line.ends_with(&format!("{version}/{version}")), "{line}");
    }

    let out = tui(&["--server", &admin, "--token", "adm", "--once", "--json"]).await;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["streams"].as_array().unwrap().len(), 3);
    assert_eq!(v["clients"][0]["client_id"], "edge-1");
    assert_eq!(v["server"]["groups"][0]["config_version"], version.as_str());

    let out = tui(&["--server", &admin, "--token", "wrong", "--once"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("admin token"), "{err}");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;

    let out = tui(&["--server", &admin, "--once"]).await;
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach"), "{err}");
}

//! `tunnel-tui --once` and `--json` against real servers: one snapshot,
//! exit 0 when connected; one line and a non-zero exit when not. With
//! several servers, one merged table, and exit 0 while any answers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
#[path = "../../tests/common/etcd.rs"]
mod etcd;

use common::{start_clients, TestServer};
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
    let (http, grpc, admin) = listeners.addrs().unwrap();
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

    // One public request (its upstream refuses: 502), then a console that
    // connects afterwards still gets it in the series and the request log.
    let resp = get(http).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    let start = Instant::now();
    let v = loop {
        let out = tui(&["--server", &admin, "--token", "adm", "--once", "--json"]).await;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let server_seconds =
            v["traffic"].as_array().unwrap().iter().find(|s| s["subject"] == "server" && s["step_ms"] == 1000).cloned();
        let sum = |s: &serde_json::Value, col: &str| {
            s[col].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum::<u64>()
        };
        if server_seconds.as_ref().is_some_and(|s| sum(s, "requests") == 1) {
            assert_eq!(sum(server_seconds.as_ref().unwrap(), "errors"), 1, "{v}");
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "the request shows in the series: {v}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let traffic = v["traffic"].as_array().unwrap();
    for (subject, name) in [("group", "demo"), ("client", "edge-1"), ("rule", "*/")] {
        assert!(
            traffic.iter().any(|s| s["subject"] == subject && s["name"] == name && s["step_ms"] == 1000),
            "{subject} {name}: {v}"
        );
    }
    assert!(traffic.iter().any(|s| s["subject"] == "server" && s["step_ms"] == 60_000), "the hour: {v}");
    let r = &v["requests"][0];
    assert_eq!(
        (r["status"].as_u64(), r["rule"].as_str(), r["client_id"].as_str()),
        (Some(502), Some("*/"), Some("edge-1")),
        "{v}"
    );

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

/// GET / on the public listener at `addr`: the response's head and body.
async fn get(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    tokio::time::timeout(Duration::from_secs(10), exchange).await.expect("the public request is answered")
}

/// A server named `id` (servers on one host must not share the host name) on ephemeral ports.
/// An address nothing listens on: a port the kernel just handed out and took back.
fn refused() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Several servers: one merged table with a SERVER column, JSON keyed by
/// address; success while any server answers, failure when none does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_merges_several_servers() {
    let one = TestServer::start(SERVER, "tui-one").await;
    let two = TestServer::start(SERVER, "tui-two").await;
    let (admin1, admin2) = (one.admin.clone(), two.admin.clone());
    let stop = CancellationToken::new();
    let clients = start_clients(&["edge-1", "edge-2"], &[&one.grpc, &two.grpc], &stop);
    for s in [&one, &two] {
        s.wait("both clients registered", |s| s.shared.registry.streams().len() == 6).await;
    }

    let both = format!("{admin1},{admin2}");
    let out = tui(&["--server", &both, "--token", "adm", "--once"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "servers 2/2 up", "{text}");
    assert!(lines[1].starts_with("server tui-one ") && lines[1].ends_with(&format!("at {admin1}")), "{text}");
    assert!(lines[2].starts_with("server tui-two ") && lines[2].ends_with(&format!("at {admin2}")), "{text}");
    assert_eq!(lines[3].split_whitespace().take(3).collect::<Vec<_>>(), ["SERVER", "STREAM", "TYPE"], "{text}");
    assert_eq!(lines.len(), 4 + 12, "{text}");
    for (id, server) in [("tui-one", &one), ("tui-two", &two)] {
        for s in server.shared.registry.streams() {
            let line = lines
                .iter()
                .find(|l| l.contains(&s.stream_id))
                .unwrap_or_else(|| panic!("{} of {id} missing:\n{text}", s.stream_id));
            assert_eq!(line.split_whitespace().next(), Some(id), "{line}");
            assert!(line.contains(&s.client_id), "{line}");
        }
    }

    // Repeated --server works as well as a list; JSON is keyed by the address as given.
    let out = tui(&["--server", &admin1, "--server", &admin2, "--token", "adm", "--once", "--json"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v.as_object().unwrap().len(), 2, "{v}");
    for (admin, id) in [(&admin1, "tui-one"), (&admin2, "tui-two")] {
        assert_eq!(v[admin]["server"]["server_id"], id, "{v}");
        assert_eq!(v[admin]["streams"].as_array().unwrap().len(), 6, "{v}");
        let mut ids: Vec<&str> =
            v[admin]["clients"].as_array().unwrap().iter().filter_map(|c| c["client_id"].as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["edge-1", "edge-2"], "{v}");
    }

    // One of two unreachable: the other's rows, the dead one named, success.
    let dead = refused();
    let out = tui(&["--server", &format!("{dead},{admin2}"), "--token", "adm", "--once"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "servers 1/2 up", "{text}");
    assert!(lines[1].starts_with(&format!("server {dead} down: cannot reach")), "{text}");
    let rows: Vec<&&str> = lines.iter().skip(4).collect();
    assert_eq!(rows.len(), 6, "{text}");
    assert!(rows.iter().all(|l| l.starts_with("tui-two ")), "{text}");
    let out = tui(&["--server", &format!("{dead},{admin2}"), "--token", "adm", "--once", "--json"]).await;
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v[&dead]["error"].as_str().unwrap().contains("cannot reach"), "{v}");
    assert_eq!(v[&admin2]["streams"].as_array().unwrap().len(), 6, "{v}");

    // None answers: a reason per server on stderr, exit 1.
    let dead2 = refused();
    let out = tui(&["--server", &format!("{dead},{dead2}"), "--once"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 2, "{err}");
    for d in [&dead, &dead2] {
        assert!(err.lines().any(|l| l.contains(&format!("{d}: cannot reach"))), "{err}");
    }

    stop.cancel();
    for t in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    for s in [one, two] {
        s.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    }
}

/// Pointed at one server of a cluster, the console finds the others in its
/// membership and shows them all; --no-discover keeps to the one given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_finds_every_member_of_a_cluster() {
    let Some(etcd) = etcd::EtcdCluster::start(1) else { return };
    let prefix = format!("/tui-test-{}", std::process::id());
    let mut servers = Vec::new();
    for id in ["fleet-a", "fleet-b", "fleet-c"] {
        servers.push(TestServer::start_clustered(SERVER, id, &etcd.toml_list(), &prefix).await);
    }
    for s in &servers {
        let cluster = s.shared.cluster.clone().unwrap();
        s.wait("all three members seen", |_| cluster.with_view(|v| v.members.len()) == 3).await;
    }
    let out = tui(&["--server", &servers[1].admin, "--token", "adm", "--once"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "servers 3/3 up", "{text}");
    // The one given first, then the members it listed, in server_id order.
    for (line, s) in lines[1..4].iter().zip([&servers[1], &servers[0], &servers[2]]) {
        let id = &s.shared.server_id;
        assert!(line.starts_with(&format!("server {id} ")) && line.ends_with(&format!("at {}", s.admin)), "{text}");
    }
    let out = tui(&["--server", &servers[1].admin, "--token", "adm", "--once", "--no-discover"]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.lines().next().is_some_and(|l| l.starts_with("server fleet-b ")), "{text}");
    for s in servers {
        s.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    }
}

/// `--once --events`: the timeline a real server kept of a client that
/// connected, a reload that pushed it a new config it acknowledged, a reload refused, the client closed
/// from the console and its reconnection, oldest first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_prints_the_events_timeline() {
    let dir = std::env::temp_dir().join(format!("tui-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server.toml");
    std::fs::write(&path, SERVER).unwrap();
    let listeners = Listeners::ephemeral().await.unwrap();
    let (_, grpc, admin) = listeners.addrs().unwrap();
    let server = Server::new(ServerConfig::from_file(&path).unwrap(), Some(path.clone()));
    let shared = server.shared();
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    let cfg = format!("server = \"http://{grpc}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"t\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n");
    let client = tokio::spawn(
        Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap()).run(stop.clone().cancelled_owned()),
    );
    let acked = |shared: &tunnel_daemon::server::Shared, version: &str| {
        shared.registry.clients().first().is_some_and(|c| c.config_version == version)
    };
    let start = Instant::now();
    while !acked(&shared, &shared.group_version("demo").unwrap()) {
        assert!(start.elapsed() < Duration::from_secs(15), "client registered and applied the config");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A new heartbeat interval for the group: pushed, applied, acknowledged.
    let changed = SERVER.replace("token = \"t\"\n", "token = \"t\"\nheartbeat_interval = \"1s\"\n");
    assert_ne!(changed, SERVER);
    std::fs::write(&path, &changed).unwrap();
    let applied = tunnel_daemon::server::reload::reload_from_file(&shared);
    assert!(matches!(applied, tunnel_daemon::server::reload::Reload::Applied(ref g) if g == &["demo"]), "{applied:?}");
    let start = Instant::now();
    while !acked(&shared, &shared.group_version("demo").unwrap()) {
        assert!(start.elapsed() < Duration::from_secs(40), "the client acknowledged the pushed config");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(&path, "[server\nbroken").unwrap();
    let refused = tunnel_daemon::server::reload::reload_from_file(&shared);
    assert!(matches!(refused, tunnel_daemon::server::reload::Reload::Refused(_)), "{refused:?}");

    let mut console =
        tunnel_tui::net::connect(&tunnel_tui::net::Target::new(&admin.to_string(), Some("adm".into()))).await.unwrap();
    let mut req = tonic::Request::new(tunnel_lib::introspection::CloseClientRequest { client_id: "edge-1".into() });
    req.metadata_mut().insert("authorization", "Bearer adm".parse().unwrap());
    console.close_client(req).await.unwrap();
    let start = Instant::now();
    while shared.registry.streams().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(15), "the client reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let admin = admin.to_string();
    let out = tui(&["--server", &admin, "--token", "adm", "--once", "--events", "--utc"]).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TIME (UTC)") && lines[0].contains("WHAT HAPPENED"), "{text}");
    // Each kind in the order it happened (others, such as config pushes, may come between).
    let mut at = 0;
    for (kind, words) in [
        ("connected", "version"),
        // The push is part of the reload, recorded as it goes out.
        ("config pushed", "sent to 1 of 1 clients"),
        ("reloaded", "config changed for demo"),
        ("config acked", "the group's current version"),
        ("reload refused", "server.toml"),
        ("closed (console)", "every stream closed"),
        ("reconnected", "back after its control stream ended"),
    ] {
        let found = lines[at..].iter().position(|l| l.contains(&format!(" {kind} ")) && l.contains(words));
        let Some(i) = found else { panic!("no {kind:?} event after line {at}:\n{text}") };
        let about_the_server = ["reload refused", "reloaded", "config pushed"].contains(&kind);
        assert!(lines[at + i].contains("edge-1") || about_the_server, "{}", lines[at + i]);
        at += i + 1;
    }

    let out = tui(&["--server", &admin, "--token", "adm", "--once", "--json"]).await;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let kinds: Vec<&str> = v["events"].as_array().unwrap().iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"reload refused") && kinds.contains(&"reconnected"), "{v}");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
    let _ = std::fs::remove_dir_all(&dir);
}

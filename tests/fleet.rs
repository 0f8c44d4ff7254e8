//! Several servers, one fleet: a client keeps a session to every server it is
//! given, independent of each other; servers answer `/ready` for load
//! balancers and drain for `drain_delay` before closing. In process, over
//! loopback; `tunnel-bench ha` runs real processes behind a real HAProxy
//! (bench/tests/quick.rs asserts its promises).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fault::{client_of, OwnServer, Relay, Tarpit, FAULT_SERVER};
use common::logs::{clear_logs, log_text};
use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;

/// The tests that read the log capture run one at a time.
static SERIAL: AsyncMutex<()> = AsyncMutex::const_new(());

/// FAULT_SERVER under a name of its own (servers on one host must not share the host name).
fn server_toml(id: &str, extra: &str) -> String {
    FAULT_SERVER.replacen("[server]\n", &format!("[server]\nserver_id = \"{id}\"\n{extra}\n"), 1)
}

/// A client.toml naming every one of `grpc` in `servers`.
fn fleet_client(grpc: &[String], id: &str, up: &Upstream, extra: &str) -> String {
    let list: Vec<String> = grpc.iter().map(|g| format!("\"{g}\"")).collect();
    let one = client_of("127.0.0.1:1".parse().unwrap(), id, up, extra);
    one.replacen("server = \"http://127.0.0.1:1\"", &format!("servers = [{}]", list.join(", ")), 1)
}

fn url(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

fn clients_on(server: &OwnServer) -> Vec<String> {
    server.shared.registry.clients().into_iter().map(|c| c.client_id).collect()
}

/// 3 servers, 2 clients each given all 3: every server holds both clients,
/// any server's public port reaches the same upstream, and the same
/// server.toml gives the same config version on every server.
#[tokio::test]
async fn every_client_holds_a_session_to_every_server() {
    let up = Upstream::start("web").await;
    let servers: Vec<OwnServer> =
        (1..=3).map(|i| OwnServer::start(&server_toml(&format!("edge-{i}"), ""), None)).collect();
    let grpc: Vec<String> = servers.iter().map(|s| url(s.grpc)).collect();
    let started = Instant::now();
    let clients = [
        TestClient::start(&fleet_client(&grpc, "c1", &up, "")),
        TestClient::start(&fleet_client(&grpc, "c2", &up, "")),
    ];
    eventually("both clients on all 3 servers", Duration::from_secs(5), || {
        servers.iter().all(|s| clients_on(s) == ["c1", "c2"])
    })
    .await;
    println!("both clients on all 3 servers {:?} after start", started.elapsed());

    let version = servers[0].shared.group_version("demo").expect("group demo");
    for s in &servers {
        assert_eq!(s.shared.group_version("demo").as_deref(), Some(version.as_str()), "one server.toml, one version");
    }
    for c in &clients {
        let mut status = c.status.clone();
        let status = tokio::time::timeout(
            WAIT,
            status.wait_for(|s| {
                s.servers.len() == 3
                    && s.servers.values().all(|v| v.config_version == version && v.registered_streams == 3)
            }),
        )
        .await
        .expect("every session applied its server's config")
        .unwrap()
        .clone();
        let mut ids: Vec<&str> = status.servers.values().map(|v| v.server_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["edge-1", "edge-2", "edge-3"], "{status:?}");
        assert_eq!(status.server_id, "edge-1,edge-2,edge-3");
    }
    for s in &servers {
        for i in 0..4 {
            let got = get(&format!("http://{}/echo?i={i}", s.http)).await;
            assert_eq!(got.status, 200, "{}", got.text());
        }
    }
    assert_eq!(up.seen.requests.load(std::sync::atomic::Ordering::SeqCst), 12, "every server reaches the one upstream");
}

/// A refused address and a tarpit first in the list cost the live server
/// nothing: its session is up within the first second.
#[tokio::test]
async fn dead_servers_first_in_the_list_do_not_delay_the_live_one() {
    let up = Upstream::start("web").await;
    let live = OwnServer::start(&server_toml("live", ""), None);
    let tarpit = Tarpit::start().await;
    let refused = free_ports::<1>()[0];
    let grpc = [url(refused), url(tarpit.addr), url(live.grpc)];
    let started = Instant::now();
    let client = TestClient::start(&fleet_client(&grpc, "c1", &up, "connect_timeout = \"10s\""));
    eventually("the client on the live server", Duration::from_secs(2), || live.streams_of("c1") == 3).await;
    let took = started.elapsed();
    println!("registered on the live server {took:?} after start (refused and tarpit first)");
    assert_eq!(get(&format!("http://{}/echo", live.http)).await.status, 200);
    let status = client.status.borrow().clone();
    assert_eq!(status.connected_servers(), 1, "{status:?}");
    assert_eq!(status.servers.len(), 3, "a session slot per address: {status:?}");
}

/// Two URLs that lead to the same server (two relays in front of it, as
/// balancers in front of the link would be) keep one session: the second
/// finds the server held and registers nothing, so the first is never
/// replaced there; when the holder's path is cut, the other takes over.
#[tokio::test]
async fn two_addresses_of_one_server_keep_one_session() {
    let up = Upstream::start("web").await;
    let server = OwnServer::start(&server_toml("only", ""), None);
    let relays = [Relay::start(server.grpc).await, Relay::start(server.grpc).await];
    let grpc = [url(relays[0].addr), url(relays[1].addr)];
    let client = TestClient::start(&fleet_client(&grpc, "c1", &up, ""));
    let mut status = client.status.clone();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| s.registered_streams == 3 && s.servers.values().any(|v| v.duplicate_of.is_some())),
    )
    .await
    .expect("one session, one duplicate")
    .unwrap();
    let session = server.shared.registry.clients()[0].session_id.clone();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let clients = server.shared.registry.clients();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].session_id, session, "the session was never replaced");
    assert_eq!(server.streams_of("c1"), 3);
    // Whichever address answered first holds the server; the other waits.
    let status = client.status.borrow().clone();
    let (held, waiting): (Vec<_>, Vec<_>) = status.servers.iter().partition(|(_, v)| v.duplicate_of.is_none());
    assert_eq!((held.len(), waiting.len()), (1, 1), "{status:?}");
    assert_eq!((held[0].1.sessions, held[0].1.registered_streams), (1, 3), "{status:?}");
    assert_eq!(
        (waiting[0].1.sessions, waiting[0].1.registrations),
        (0, 0),
        "the duplicate registered nothing: {status:?}"
    );
    // Cut the holder's path: the other address takes the server over.
    let (holder, other) = if *held[0].0 == grpc[0] { (0, 1) } else { (1, 0) };
    relays[holder].freeze();
    relays[holder].cut();
    let mut status = client.status.clone();
    tokio::time::timeout(
        WAIT,
        status.wait_for(|s| {
            s.servers.get(&grpc[other]).is_some_and(|v| v.registered_streams == 3 && v.duplicate_of.is_none())
        }),
    )
    .await
    .expect("the other address took over")
    .unwrap();
    eventually("one session at the server", WAIT, || server.streams_of("c1") == 3).await;
}

/// A crashed server costs the others nothing (same session, no reconnect),
/// and the client is back on it soon after it listens again.
#[tokio::test]
async fn a_crashed_server_leaves_the_other_sessions_alone() {
    let up = Upstream::start("web").await;
    let a = OwnServer::start(&server_toml("edge-a", ""), None);
    let b = OwnServer::start(&server_toml("edge-b", ""), None);
    let client = TestClient::start(&fleet_client(&[url(a.grpc), url(b.grpc)], "c1", &up, ""));
    eventually("on both", WAIT, || a.streams_of("c1") == 3 && b.streams_of("c1") == 3).await;
    let session_on_b = b.shared.registry.clients()[0].session_id.clone();
    let addrs = a.addrs();
    a.crash();
    let mut status = client.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.registered_streams == 3))
        .await
        .expect("a's streams gone")
        .unwrap();
    // Requests through b go on while a is away.
    for _ in 0..5 {
        assert_eq!(get(&format!("http://{}/echo", b.http)).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = OwnServer::start(&server_toml("edge-a", ""), Some(addrs));
    let back = Instant::now();
    eventually("back on a", Duration::from_secs(3), || a.streams_of("c1") == 3).await;
    println!("registered on the restarted server {:?} after it listened", back.elapsed());
    assert_eq!(b.shared.registry.clients()[0].session_id, session_on_b, "b's session was never touched");
    let key_b = url(b.grpc);
    assert_eq!(client.status.borrow().servers[&key_b].sessions, 1, "no reconnect to b");
}

/// `/ready` on the metrics and admin listeners: 503 until a client can take
/// requests, 200 then, 503 "draining" from SIGTERM on while the server still
/// serves for drain_delay; the client takes the drain as planned (no warning).
#[tokio::test]
async fn ready_follows_clients_and_the_drain() {
    let _one = SERIAL.lock().await;
    clear_logs();
    let up = Upstream::start("web").await;
    let toml = server_toml("edge-r", "metrics_listen = \"127.0.0.1:0\"\ndrain_delay = \"1500ms\"");
    let server = start_server(&toml, None).await;
    let ready = |addr: SocketAddr| async move { get(&format!("http://{addr}/ready")).await };
    for addr in [server.metrics, server.admin] {
        let got = ready(addr).await;
        assert_eq!((got.status.as_u16(), got.text()), (503, "not ready: no tunnel client registered\n".to_string()));
    }
    let client = TestClient::start(&fleet_client(&[url(server.grpc)], "c1", &up, ""));
    server.wait_streams(3).await;
    for addr in [server.metrics, server.admin] {
        let got = ready(addr).await;
        assert_eq!((got.status.as_u16(), got.text()), (200, "ready\n".to_string()));
    }
    let server_grpc = server.grpc;
    let stopping = Instant::now();
    server.begin_stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = ready(server.metrics).await;
    assert_eq!(
        (got.status.as_u16(), got.text()),
        (503, "not ready: draining: the server is shutting down\n".to_string())
    );
    // Still serving public traffic through the drain delay.
    let served = get(&server.url("/echo")).await;
    assert_eq!(served.status, 200, "{}", served.text());
    assert!(stopping.elapsed() < Duration::from_millis(1500));
    let metrics = get(&format!("http://{}/metrics", server.metrics)).await.text();
    assert!(metrics.contains("tunnel_draining 1"), "{metrics}");
    // The console sees it too.
    let watched = tokio::time::timeout(WAIT, async {
        use tunnel_lib::introspection::{introspection_client::IntrospectionClient, WatchRequest};
        let mut c = IntrospectionClient::connect(format!("http://{}", server.admin)).await.unwrap();
        let mut updates = c.watch(WatchRequest::default()).await.unwrap().into_inner();
        updates.message().await.unwrap().unwrap()
    })
    .await
    .expect("a snapshot");
    assert!(watched.server.is_some_and(|s| s.draining), "introspection says draining");
    assert!(metrics.contains("tunnel_server_info{server_id=\"edge-r\""), "{metrics}");
    server.wait_stopped().await;
    assert!(stopping.elapsed() >= Duration::from_millis(1500), "closed only after drain_delay");
    let mut status = client.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.registered_streams == 0)).await.expect("session ended").unwrap();
    // The client retries the stopped server: planned, so info lines, no warning.
    tokio::time::timeout(WAIT, status.wait_for(|s| s.sessions >= 3)).await.expect("retrying").unwrap();
    let text = log_text();
    // Other tests in this binary run clients too: only this server's lines count.
    let ours = format!("server={}", url(server_grpc));
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") && l.contains("tunnel_daemon::client") && l.contains(&ours))
        .collect();
    assert!(warnings.is_empty(), "a planned drain warned:\n{}", warnings.join("\n"));
    assert!(text.contains("the server is draining (a planned stop)"), "{text}");
}

/// After a planned drain the client retries the server at most about 2 s
/// apart, however long it stays away, so a restarted server has its client
/// back at once. With reconnect_min = 1s and reconnect_max = 60s a doubling
/// backoff would make at most 3 attempts between 2 s and 10 s after the
/// drain (at 1.5-3, 3.5-7 and 7.5-15 s); capped, there are at least 4.
#[tokio::test]
async fn a_drained_server_has_its_client_back_soon_after_it_returns() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("edge-d", ""), None).await;
    let (http, grpc, admin) = (server.http, server.grpc, server.admin);
    let text = fleet_client(&[url(grpc)], "c1", &up, "")
        .replace("reconnect_min = \"100ms\"", "reconnect_min = \"1s\"")
        .replace("reconnect_max = \"1s\"", "reconnect_max = \"60s\"");
    let client = TestClient::start(&text);
    server.wait_streams(3).await;
    server.stop().await;
    let mut status = client.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.registered_streams == 0)).await.expect("session ended").unwrap();
    let ended = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = status.borrow().sessions;
    tokio::time::sleep_until((ended + Duration::from_secs(10)).into()).await;
    let attempts = status.borrow().sessions - before;
    assert!(attempts >= 4, "{attempts} attempts between 2 s and 10 s away");
    let toml = server_toml(
        "edge-d",
        &format!("http_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\""),
    );
    let cfg = tunnel_lib::config::ServerConfig::from_str_named(&toml, "restarted server.toml").unwrap();
    let listeners = tunnel_daemon::server::Listeners::bind(&cfg).await.expect("the old ports are free again");
    let listening = Instant::now();
    let stop = tokio_util::sync::CancellationToken::new();
    let again =
        tokio::spawn(tunnel_daemon::server::Server::new(cfg, None).run(listeners, stop.clone().cancelled_owned()));
    tokio::time::timeout(Duration::from_secs(4), status.wait_for(|s| s.registered_streams == 3))
        .await
        .expect("back within a capped retry")
        .unwrap();
    println!(
        "{attempts} attempts in 8 s away; client back {:?} after the drained server listened again",
        listening.elapsed()
    );
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, again).await;
}

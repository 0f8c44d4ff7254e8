//! Upgraded connections through the whole tunnel over loopback: WebSocket
//! with a real client and server (tokio-tungstenite), a raw Upgrade to a
//! protocol of our own, refusals, half-close, vanishing clients and idle close.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::ws::{ws_config, WsUpstream};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self as ws, Message};
use tokio_tungstenite::WebSocketStream;

/// An upstream speaking a made-up protocol after `Upgrade: shout`: it
/// answers 101, then echoes bytes in upper case; when its peer half-closes it
/// writes "bye" and closes. Any other request gets 400.
async fn start_shout_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let head = read_head(&mut tcp).await;
                if !head.to_ascii_lowercase().contains("upgrade: shout") {
                    let _ = tcp.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n").await;
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: shout\r\n\r\n")
                    .await;
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = tcp.write_all(b"bye").await;
                let _ = tcp.shutdown().await;
            });
        }
    });
    (addr, task)
}

/// Reads an HTTP head (up to the blank line) byte by byte, so nothing after it is consumed.
async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        match tcp.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn server_toml(idle_timeout: &str) -> String {
    let rules = format!(
        r#"
[[rules]]
path_prefix = "/ws"
group = "demo"
upstream = "ws"
timeout = "5s"
idle_timeout = "{idle_timeout}"
[[rules]]
path_prefix = "/shout"
group = "demo"
upstream = "shout"
timeout = "5s"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#
    );
    demo_server_toml("", "", &rules)
}

struct Tunnel {
    server: TestServer,
    _client: TestClient,
    ws: WsUpstream,
    _web: Upstream,
    _shout: tokio::task::JoinHandle<()>,
}

async fn tunnel(idle_timeout: &str) -> Tunnel {
    let ws = WsUpstream::start().await;
    let web = Upstream::start("web").await;
    let (shout, shout_task) = start_shout_upstream().await;
    let server = start_server(&server_toml(idle_timeout), None).await;
    let upstreams = [("ws", ws.url()), ("web", web.url()), ("shout", format!("http://{shout}"))];
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &upstreams));
    server.wait_streams(3).await;
    Tunnel { server, _client: client, ws, _web: web, _shout: shout_task }
}

async fn ws_connect(addr: SocketAddr, path: &str) -> Result<WebSocketStream<TcpStream>, ws::Error> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (socket, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{addr}{path}"), tcp, Some(ws_config())).await?;
    Ok(socket)
}

fn upgraded_now(server: &TestServer) -> usize {
    server.shared.registry.streams().iter().map(|s| s.upgraded).sum()
}

fn in_flight_now(server: &TestServer) -> usize {
    server.shared.registry.streams().iter().map(|s| s.in_flight).sum()
}

/// Echoes `n` small messages, sent while reading, and checks their order; returns messages/s.
async fn echo_messages(socket: WebSocketStream<TcpStream>, n: usize) -> f64 {
    let started = Instant::now();
    let (mut tx, mut rx) = socket.split();
    let writer = tokio::spawn(async move {
        for i in 0..n {
            tx.send(Message::text(format!("m{i}"))).await.unwrap();
        }
        tx
    });
    for i in 0..n {
        let msg = tokio::time::timeout(WAIT, rx.next()).await.expect("echo in time").expect("open").unwrap();
        assert_eq!(msg, Message::text(format!("m{i}")), "echo {i} in order");
    }
    let _ = writer.await.unwrap();
    n as f64 / started.elapsed().as_secs_f64()
}

/// Sends one binary message and waits for its echo; returns the round trip.
async fn echo_big(socket: &mut WebSocketStream<TcpStream>, payload: Bytes) -> Duration {
    let started = Instant::now();
    socket.send(Message::Binary(payload.clone())).await.unwrap();
    let back = tokio::time::timeout(WAIT, socket.next()).await.expect("echo in time").expect("open").unwrap();
    let took = started.elapsed();
    assert!(back == Message::Binary(payload), "the 16 MiB message came back intact");
    took
}

#[tokio::test]
async fn websocket_echo_in_order_and_a_16_mib_message_intact() {
    let t = tunnel("5m").await;
    let n = 10_000;
    let direct = echo_messages(ws_connect(t.ws.addr, "/ws/chat").await.unwrap(), n).await;
    let tunneled = echo_messages(ws_connect(t.server.http, "/ws/chat").await.unwrap(), n).await;
    let payload: Bytes = pattern_chunks(16 << 20).flat_map(|c| c.to_vec()).collect::<Vec<u8>>().into();
    let mut d = ws_connect(t.ws.addr, "/ws/big").await.unwrap();
    let big_direct = echo_big(&mut d, payload.clone()).await;
    let mut s = ws_connect(t.server.http, "/ws/big").await.unwrap();
    eventually("the upgraded connection counted", WAIT, || upgraded_now(&t.server) == 1).await;
    let big_tunneled = echo_big(&mut s, payload).await;
    println!(
        "websocket echo of {n} messages: {direct:.0} msg/s direct, {tunneled:.0} msg/s through the tunnel; \
         16 MiB message round trip: {big_direct:?} direct, {big_tunneled:?} through the tunnel"
    );
}

#[tokio::test]
async fn websocket_close_codes_pass_both_ways_and_the_log_shows_the_upgrade() {
    let t = tunnel("5m").await;
    // Client closes: the upstream echoes the code, and it comes back.
    let mut s = ws_connect(t.server.http, "/ws/a").await.unwrap();
    s.send(Message::text("hi")).await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), Message::text("hi"));
    s.close(Some(CloseFrame { code: CloseCode::from(4001), reason: "client bye".into() })).await.unwrap();
    let reply = tokio::time::timeout(WAIT, s.next()).await.expect("close reply in time");
    match reply {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4001),
        other => panic!("expected the echoed close 4001, got {other:?}"),
    }
    // The upstream closed its side after the handshake; ours closes now.
    drop(s);
    // Upstream closes: its code reaches the public client.
    let mut s = ws_connect(t.server.http, "/ws/b").await.unwrap();
    s.send(Message::text("close:4002")).await.unwrap();
    let got = tokio::time::timeout(WAIT, s.next()).await.expect("close in time");
    match got {
        Some(Ok(Message::Close(Some(f)))) => {
            assert_eq!(u16::from(f.code), 4002);
            assert_eq!(f.reason.as_str(), "server bye");
        }
        other => panic!("expected the upstream's close 4002, got {other:?}"),
    }
    drop(s);
    // Both recorded when closed, as upgrades.
    let shared = t.server.shared.clone();
    eventually("both upgraded connections recorded", WAIT, || {
        shared.requests.since(0).iter().filter(|r| r.status == 101 && r.upgrade == "websocket").count() == 2
    })
    .await;
    eventually("nothing left in flight", WAIT, || in_flight_now(&t.server) == 0).await;
    assert_eq!(upgraded_now(&t.server), 0, "the upgraded count returns to 0");
}

#[tokio::test]
async fn an_upstream_refusing_the_upgrade_gives_its_status() {
    let t = tunnel("5m").await;
    match ws_connect(t.server.http, "/ws/forbidden").await {
        Err(ws::Error::Http(resp)) => assert_eq!(resp.status(), StatusCode::FORBIDDEN),
        Err(e) => panic!("expected the upstream's 403, got {e}"),
        Ok(_) => panic!("expected the upstream's 403, got a WebSocket"),
    }
    // The refusal's body arrives too (tungstenite does not decode chunked bodies, hence hyper here).
    let req = http::Request::get(t.server.url("/ws/forbidden"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(empty())
        .unwrap();
    let got = send(&http_client(), req).await;
    assert_eq!((got.status, got.text().as_str()), (StatusCode::FORBIDDEN, "not for you"));
    // A refused upgrade ends like any request, and the tunnel serves on.
    assert_eq!(get(&t.server.url("/status/200")).await.status, StatusCode::OK);
    eventually("nothing left in flight", WAIT, || in_flight_now(&t.server) == 0).await;
}

#[tokio::test]
async fn a_slow_websocket_reader_does_not_delay_other_requests() {
    let t = tunnel("5m").await;
    let mut slow = ws_connect(t.server.http, "/ws/flood").await.unwrap();
    // 64 MiB toward a reader that never reads: the exchange's credit stops it.
    slow.send(Message::text("flood:64")).await.unwrap();
    eventually("the upgraded connection counted", WAIT, || upgraded_now(&t.server) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = http_client();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let got = send(&c, http::Request::get(t.server.url("/status/200")).body(empty()).unwrap()).await;
        assert_eq!(got.status, StatusCode::OK);
        worst = worst.max(started.elapsed());
    }
    println!("while a WebSocket reader stalls 64 MiB: worst of 20 requests through the same client {worst:?}");
    assert!(worst < Duration::from_secs(2), "requests were held up behind a stalled WebSocket: {worst:?}");
    // The stalled connection still works once its reader catches up.
    let mut received = 0usize;
    while received < 64 << 20 {
        match tokio::time::timeout(WAIT, slow.next()).await.expect("data in time") {
            Some(Ok(Message::Binary(b))) => received += b.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_raw_upgrade_carries_bytes_both_ways_and_half_closes() {
    let t = tunnel("5m").await;
    let mut tcp = TcpStream::connect(t.server.http).await.unwrap();
    tcp.write_all(b"GET /shout HTTP/1.1\r\nhost: shout.test\r\nconnection: upgrade\r\nupgrade: shout\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(WAIT, read_head(&mut tcp)).await.expect("head in time");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: shout"), "{head}");
    let mut buf = [0u8; 64];
    for word in ["hello", "tunnel"] {
        tcp.write_all(word.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < word.len() {
            let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("echo in time").unwrap();
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, word.to_ascii_uppercase().as_bytes());
    }
    // Our half-close reaches the upstream, which answers and closes its side.
    tcp.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut rest)).await.expect("close in time").unwrap();
    assert_eq!(rest, b"bye");
    eventually("nothing left in flight", WAIT, || in_flight_now(&t.server) == 0).await;
    // An Upgrade the upstream does not speak is answered like any request.
    let mut tcp = TcpStream::connect(t.server.http).await.unwrap();
    tcp.write_all(b"GET /shout HTTP/1.1\r\nhost: shout.test\r\nconnection: upgrade\r\nupgrade: whisper\r\n\r\n")
        .await
        .unwrap();
    let head = tokio::time::timeout(WAIT, read_head(&mut tcp)).await.expect("head in time");
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

#[tokio::test]
async fn a_vanished_public_client_frees_the_upstream_connection() {
    let t = tunnel("5m").await;
    let mut s = ws_connect(t.server.http, "/ws/gone").await.unwrap();
    s.send(Message::text("hi")).await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), Message::text("hi"));
    assert_eq!(t.ws.open.load(Ordering::SeqCst), 1);
    let started = Instant::now();
    drop(s);
    let open = t.ws.open.clone();
    eventually("the upstream connection closed", WAIT, || open.load(Ordering::SeqCst) == 0).await;
    eventually("the exchange freed", WAIT, || in_flight_now(&t.server) == 0).await;
    println!("public WebSocket client vanished: upstream connection and exchange freed after {:?}", started.elapsed());
}

#[tokio::test]
async fn a_silent_upgraded_connection_is_closed_at_the_idle_timeout() {
    let t = tunnel("400ms").await;
    let mut s = ws_connect(t.server.http, "/ws/quiet").await.unwrap();
    s.send(Message::text("hi")).await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), Message::text("hi"));
    let started = Instant::now();
    // Silence both ways: the tunnel closes it, so the reader sees the end.
    let end = tokio::time::timeout(WAIT, s.next()).await.expect("closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_) | Message::Binary(_)))), "{end:?}");
    println!("silent upgraded connection closed after {:?} (idle_timeout 400ms)", started.elapsed());
    let open = t.ws.open.clone();
    eventually("the upstream connection closed", WAIT, || open.load(Ordering::SeqCst) == 0).await;
    assert!(t.server.shared.exchanges_idle_closed.load(Ordering::Relaxed) >= 1);
    // Recorded as cut short, with the bytes it did move.
    let shared = t.server.shared.clone();
    eventually("the closed connection recorded", WAIT, || {
        shared.requests.since(0).iter().any(|r| r.upgrade == "websocket" && !r.error.is_empty() && r.bytes_in > 0)
    })
    .await;
}

/// An upgraded connection keeps its place under max_connections until it closes.
#[tokio::test]
async fn upgraded_connections_count_against_max_connections() {
    let ws = WsUpstream::start().await;
    let toml = server_toml("5m").replace("shutdown_grace = \"2s\"", "shutdown_grace = \"2s\"\nmax_connections = 2");
    let server = start_server(&toml, None).await;
    let upstreams = [("ws", ws.url()), ("web", ws.url()), ("shout", ws.url())];
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &upstreams));
    server.wait_streams(3).await;
    let first = ws_connect(server.http, "/ws/1").await.unwrap();
    let second = ws_connect(server.http, "/ws/2").await.unwrap();
    eventually("both upgraded", WAIT, || upgraded_now(&server) == 2).await;
    assert!(ws_connect(server.http, "/ws/3").await.is_err(), "a third connection is over the limit");
    drop(first);
    let open = ws.open.clone();
    eventually("the first closed upstream", WAIT, || open.load(Ordering::SeqCst) == 1).await;
    // Its place is free again (the count drops as the connection task ends).
    let mut third = None;
    for _ in 0..100 {
        if let Ok(s) = ws_connect(server.http, "/ws/3").await {
            third = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(third.is_some(), "a place freed by a closed WebSocket is reused");
    drop((second, third));
}

/// At shutdown an open WebSocket gets the grace period, then is closed; the server exits.
#[tokio::test]
async fn shutdown_closes_upgraded_connections_after_the_grace() {
    let t = tunnel("5m").await;
    let mut s = ws_connect(t.server.http, "/ws/stay").await.unwrap();
    s.send(Message::text("hi")).await.unwrap();
    assert_eq!(s.next().await.unwrap().unwrap(), Message::text("hi"));
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        // Ends when the tunnel closes the connection.
        while let Some(Ok(_)) = s.next().await {}
        Instant::now()
    });
    t.server.stop().await;
    let closed = tokio::time::timeout(WAIT, reader).await.expect("closed in time").unwrap();
    let waited = closed.duration_since(started);
    println!("open WebSocket at shutdown (grace 2s): closed after {waited:?}");
    assert!(waited >= Duration::from_millis(1500), "the WebSocket got the grace period: {waited:?}");
    let open = t.ws.open.clone();
    eventually("the upstream connection closed", WAIT, || open.load(Ordering::SeqCst) == 0).await;
}

//! Public-side limits over real sockets: heads too large (431), URIs too long
//! (414), bodies over a rule's max_body (413, up front and mid-stream), a
//! client at max_in_flight (503 with Retry-After, at once), and connections
//! that trickle their head (closed at header_read_timeout without slowing
//! anyone else).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn server_toml(server_extra: &str) -> String {
    demo_server_toml(server_extra, "max_in_flight = 2", RULES)
}

const RULES: &str = r#"
[[rules]]
path_prefix = "/upload-sha"
group = "demo"
upstream = "web"
timeout = "5s"
max_body = "64KiB"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#;

async fn tunnel(server_extra: &str) -> (TestServer, TestClient, Upstream) {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml(server_extra), None).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    (server, client, up)
}

/// Sends raw bytes on a fresh connection and returns the response's status line.
async fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading everything: a write error is fine.
    let _ = tcp.write_all(request).await;
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("answer in time").unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn oversized_heads_and_uris_are_refused() {
    let (server, _client, up) = tunnel("").await;
    let big_header = format!("GET /echo HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n", "a".repeat(70 << 10));
    assert_eq!(raw_status(server.http, big_header.as_bytes()).await, "HTTP/1.1 431 Request Header Fields Too Large");
    let mut many = String::from("GET /echo HTTP/1.1\r\nhost: x\r\n");
    for i in 0..150 {
        many.push_str(&format!("x-h{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(raw_status(server.http, many.as_bytes()).await, "HTTP/1.1 431 Request Header Fields Too Large");
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "u".repeat(9 << 10));
    assert_eq!(raw_status(server.http, long_uri.as_bytes()).await, "HTTP/1.1 414 URI Too Long");
    // HTTP/2 too: too many headers is refused by our check.
    let mut req = Request::get(server.url("/echo"));
    for i in 0..150 {
        req = req.header(format!("x-h{i}"), "v");
    }
    let got = send(&h2c_client(), req.body(empty()).unwrap()).await;
    assert_eq!(got.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 0, "nothing reached the upstream");
    // Within the limits all is well.
    assert_eq!(get(&server.url("/echo")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn bodies_over_max_body_get_413() {
    let (server, _client, up) = tunnel("").await;
    let c = http_client();
    // Content-Length says so: refused at once, the upstream sees nothing.
    let big = Bytes::from(vec![b'x'; 100 << 10]);
    let got = send(&c, Request::post(server.url("/upload-sha")).body(body(big)).unwrap()).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 0);
    // Chunked: caught mid-stream, the upstream request is cancelled.
    let chunks: Vec<Bytes> = (0..20).map(|_| Bytes::from(vec![b'y'; 8 << 10])).collect();
    let got = send(&c, Request::post(server.url("/upload-sha")).body(streamed(chunks)).unwrap()).await;
    assert_eq!(got.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", got.text());
    // Whether the request reached the upstream before the cancel did is a
    // race; what must hold is that no upstream got it whole.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = up.seen.clone();
    eventually("any upstream request cut off", WAIT, || {
        let cut = seen.cut_bodies.load(Ordering::SeqCst) + seen.cancelled.load(Ordering::SeqCst);
        seen.requests.load(Ordering::SeqCst) == cut
    })
    .await;
    // At the limit is fine, and other rules have none.
    let ok = Bytes::from(vec![b'z'; 64 << 10]);
    let got = send(&c, Request::post(server.url("/upload-sha")).body(body(ok)).unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    let got = send(&c, Request::post(server.url("/echo")).body(body(vec![b'w'; 200 << 10])).unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
}

#[tokio::test]
async fn a_client_at_max_in_flight_gets_503_at_once() {
    let (server, _client, _up) = tunnel("").await;
    let slow = |n: u32| {
        let url = server.url(&format!("/slow?ms=1500&n={n}"));
        tokio::spawn(async move { get(&url).await.status })
    };
    let (a, b) = (slow(1), slow(2));
    let shared = server.shared.clone();
    eventually("two requests in flight", WAIT, || {
        shared.registry.streams().iter().map(|s| s.in_flight).sum::<usize>() == 2
    })
    .await;
    let started = Instant::now();
    let got = get(&server.url("/echo")).await;
    let took = started.elapsed();
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{}", got.text());
    assert_eq!(got.headers["retry-after"], "1");
    assert!(took < Duration::from_millis(1000), "refused at once, not after a wait: {took:?}");
    println!("a request past max_in_flight answered 503 in {took:?}");
    assert_eq!(a.await.unwrap(), StatusCode::OK);
    assert_eq!(b.await.unwrap(), StatusCode::OK);
    assert_eq!(get(&server.url("/echo")).await.status, StatusCode::OK, "served again once below the limit");
}

#[tokio::test]
async fn trickled_heads_are_closed_at_the_timeout_without_slowing_others() {
    let (server, _client, _up) = tunnel("header_read_timeout = \"1s\"").await;
    let mut tricklers = Vec::new();
    for _ in 0..300 {
        let mut tcp = TcpStream::connect(server.http).await.unwrap();
        tcp.write_all(b"GET /echo HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        tricklers.push(tcp);
    }
    let started = Instant::now();
    // One more header byte each 200 ms, never the blank line; count closes.
    let trickle = tokio::spawn(async move {
        let mut closed_at = Vec::new();
        let mut open = tricklers;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut still = Vec::new();
            for mut t in open {
                if t.write_all(b"x").await.is_err() {
                    closed_at.push(started.elapsed());
                    continue;
                }
                let mut b = [0u8; 64];
                match tokio::time::timeout(Duration::from_millis(1), t.read(&mut b)).await {
                    Ok(Ok(_)) | Ok(Err(_)) => closed_at.push(started.elapsed()),
                    Err(_) => still.push(t),
                }
            }
            open = still;
            if open.is_empty() {
                break;
            }
        }
        (closed_at, open.len())
    });
    let c = http_client();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        assert_eq!(send(&c, Request::get(server.url("/echo")).body(empty()).unwrap()).await.status, StatusCode::OK);
        worst = worst.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (closed_at, left) = tokio::time::timeout(WAIT, trickle).await.expect("done in time").unwrap();
    let last = closed_at.iter().max().copied().unwrap_or_default();
    println!("300 trickling connections: all closed by {last:?} (header_read_timeout 1s); worst normal request meanwhile {worst:?}");
    assert_eq!(left, 0, "every trickling connection was closed");
    assert_eq!(closed_at.len(), 300);
    assert!(worst < Duration::from_secs(1), "normal requests were slowed: {worst:?}");
}

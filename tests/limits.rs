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
    // Heads hyper refused itself still get an access record, with their status.
    // (hyper's are recorded as their connection ends, just after the answer.)
    let refused = || server.shared.requests.since(0).iter().filter(|r| r.status == 431).count();
    eventually("the HTTP/1.1 431s (hyper's) and the HTTP/2 one (ours) recorded", WAIT, || refused() == 3).await;
    let bad = raw_status(server.http, b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert_eq!(bad, "HTTP/1.1 400 Bad Request");
    eventually("the 400 recorded", WAIT, || server.shared.requests.since(0).iter().any(|r| r.status == 400)).await;
    // Within the limits all is well.
    assert_eq!(get(&server.url("/echo")).await.status, StatusCode::OK);
}

/// Reads one HTTP/1.1 response (head and Content-Length body) off `tcp`; its status line.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_string();
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return head.lines().next().unwrap_or_default().to_string();
            }
        }
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("response in time").unwrap();
        assert!(n > 0, "connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
}

/// How long until the server closes `tcp`, which must send nothing meanwhile.
async fn closed_after(tcp: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut b = [0u8; 64];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut b)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "closed without a response: {:?}", String::from_utf8_lossy(&b[..n]));
    start.elapsed()
}

/// An idle keep-alive connection lives for keepalive_timeout, not
/// header_read_timeout; the next head, once it starts, has
/// header_read_timeout from its first byte.
#[tokio::test]
async fn keepalive_and_head_clocks_are_separate() {
    let (server, _client, _up) = tunnel("header_read_timeout = \"500ms\"\nkeepalive_timeout = \"2s\"").await;
    let request = b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut tcp = TcpStream::connect(server.http).await.unwrap();
    tcp.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut tcp).await, "HTTP/1.1 200 OK");
    // Idle for longer than the head deadline: the connection is still served.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    tcp.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut tcp).await, "HTTP/1.1 200 OK", "kept alive past header_read_timeout");
    let idle = closed_after(&mut tcp).await;
    println!("idle keep-alive connection (keepalive_timeout 2s, header_read_timeout 500ms): closed after {idle:?}");
    assert!(idle >= Duration::from_millis(1800) && idle < Duration::from_secs(4), "closed after {idle:?}");

    // A head that starts after an idle spell and never ends.
    let mut tcp = TcpStream::connect(server.http).await.unwrap();
    tcp.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut tcp).await, "HTTP/1.1 200 OK");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    tcp.write_all(b"GET /echo HTTP/1.1\r\nhost").await.unwrap();
    let head = closed_after(&mut tcp).await;
    println!("a second head left unfinished (header_read_timeout 500ms): closed after {head:?}");
    assert!(head >= Duration::from_millis(400) && head < Duration::from_millis(900), "closed after {head:?}");
}

/// An idle h2c connection is closed (GOAWAY) after keepalive_timeout; one
/// with a response still streaming is not.
#[tokio::test]
async fn idle_h2c_connections_close_at_keepalive_timeout() {
    let (server, _client, _up) = tunnel("header_read_timeout = \"500ms\"\nkeepalive_timeout = \"1500ms\"").await;
    let tcp = TcpStream::connect(server.http).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // A response that takes longer than the keep-alive: the connection is busy, not idle.
    let req = Request::get(format!("http://{}/slow?ms=2500", server.http)).body(empty()).unwrap();
    let resp = tokio::time::timeout(WAIT, sender.send_request(req)).await.expect("in time").unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(&body[..], b"slow done");
    let idle_from = Instant::now();
    tokio::time::timeout(WAIT, conn).await.expect("closed in time").unwrap().unwrap();
    let idle = idle_from.elapsed();
    println!("idle h2c connection (keepalive_timeout 1.5s): closed after {idle:?}");
    assert!(idle >= Duration::from_millis(1300) && idle < Duration::from_secs(4), "closed after {idle:?}");
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
    // Closed at the timeout: none before it, all soon after (seen in 200 ms steps).
    let first = closed_at.iter().min().copied().unwrap_or_default();
    assert!(first >= Duration::from_millis(600), "a trickler was closed before header_read_timeout: {first:?}");
    assert!(last < Duration::from_secs(4), "tricklers outlived header_read_timeout: {last:?}");
    assert!(worst < Duration::from_secs(1), "normal requests were slowed: {worst:?}");
}

/// Past max_connections a new public connection is closed at once, while
/// the open ones are served; a freed place is taken again.
#[tokio::test]
async fn connections_past_max_connections_are_closed() {
    let (server, _client, _up) = tunnel("max_connections = 2").await;
    let request = b"GET /echo HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut first = TcpStream::connect(server.http).await.unwrap();
    let mut second = TcpStream::connect(server.http).await.unwrap();
    first.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut first).await, "HTTP/1.1 200 OK");
    second.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut second).await, "HTTP/1.1 200 OK");
    let mut third = TcpStream::connect(server.http).await.unwrap();
    let _ = third.write_all(request).await;
    let refused = closed_after(&mut third).await;
    assert!(refused < Duration::from_secs(1), "the third connection was closed at once: {refused:?}");
    // The first two are still served on their connections.
    first.write_all(request).await.unwrap();
    assert_eq!(read_response(&mut first).await, "HTTP/1.1 200 OK");
    drop(first);
    let mut again = None;
    for _ in 0..50 {
        let mut tcp = TcpStream::connect(server.http).await.unwrap();
        let _ = tcp.write_all(request).await;
        let mut buf = [0u8; 12];
        if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), tcp.read(&mut buf)).await {
            if n > 0 {
                again = Some(String::from_utf8_lossy(&buf[..n]).to_string());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(again.as_deref(), Some("HTTP/1.1 200"), "a freed place is taken again");
}

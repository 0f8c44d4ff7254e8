//! What the client's own HTTP/1.1 codec makes of upstream responses, seen
//! from the public side: every framing RFC 9112 allows arrives whole, a
//! response that cannot be framed is a 502 rather than a guess, and a
//! connection is reused only when nothing about its last response was in
//! doubt (an upstream that sends more than it framed cannot answer the next
//! request with those bytes).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const RULES: &str = r#"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#;

/// The scripted answer to a request for `path`, and whether the upstream
/// closes the connection after it.
fn answer(path: &str) -> (&'static [u8], bool) {
    match path {
        "/ok" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", false),
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-sum: 11\r\n\r\n",
            false,
        ),
        "/close" => (b"HTTP/1.1 200 OK\r\nX-Framing: close\r\n\r\nuntil the end", true),
        // Kept open by the upstream: HTTP/1.0 without keep-alive must not be reused all the same.
        "/http10" => (b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nold!", false),
        "/continue" => (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade", false),
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n", false),
        "/none" => (b"HTTP/1.1 204 No Content\r\nX-Why: nothing\r\n\r\n", false),
        "/conflict" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!", false),
        "/extra" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen", false),
        "/short" => (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", true),
        "/hop" => (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    }
}

/// An upstream speaking raw HTTP/1.1 from the script above; counts the
/// connections it accepted.
async fn scripted_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // Requests here have no body: a head ends at its blank line.
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let (bytes, close) = answer(&path);
                    if tcp.write_all(bytes).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn get(
    url: String,
    method: &str,
) -> Result<(StatusCode, http::HeaderMap, Bytes, Option<http::HeaderMap>), String> {
    let req = Request::builder().method(method).uri(url).body(empty()).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), h2c_client().request(req))
        .await
        .map_err(|_| "no answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let collected = tokio::time::timeout(Duration::from_secs(10), body.collect())
        .await
        .map_err(|_| "no body in time".to_string())?
        .map_err(|e| format!("body: {e}"))?;
    let trailers = collected.trailers().cloned();
    Ok((parts.status, parts.headers, collected.to_bytes(), trailers))
}

#[tokio::test]
async fn every_response_framing_arrives_whole_and_doubt_is_not_reused() {
    let (addr, accepted) = scripted_upstream().await;
    let server = start_server(&demo_server_toml("", "", RULES), None).await;
    let _client =
        TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", format!("http://{addr}"))]));
    server.wait_streams(3).await;

    // Kept-alive: three requests in turn, one upstream connection.
    for _ in 0..3 {
        let (status, _, body, _) = get(server.url("/ok"), "GET").await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection for requests in turn");

    // Chunked, with extensions and a trailer (HTTP/2 carries it to the public client).
    let (status, headers, body, trailers) = get(server.url("/chunked"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"hello world"[..]));
    assert!(headers.get("transfer-encoding").is_none() && headers.get("trailer").is_none(), "{headers:?}");
    assert_eq!(trailers.and_then(|t| t.get("x-sum").cloned()).unwrap(), "11");

    // No body for HEAD, whatever its Content-Length says; nor for 204.
    let (status, headers, body, _) = get(server.url("/head"), "HEAD").await.unwrap();
    assert_eq!((status, body.len()), (StatusCode::OK, 0));
    assert_eq!(headers.get("content-length").unwrap(), "1000");
    let (status, headers, body, _) = get(server.url("/none"), "GET").await.unwrap();
    assert_eq!(
        (status, body.len(), headers.get("x-why").unwrap().as_bytes()),
        (StatusCode::NO_CONTENT, 0, &b"nothing"[..])
    );
    // An interim 100 is skipped for the final answer.
    let (status, _, body, _) = get(server.url("/continue"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::CREATED, &b"made"[..]));
    // Hop-by-hop headers, and those Connection names, stay on their hop.
    let (_, headers, _, _) = get(server.url("/hop"), "GET").await.unwrap();
    assert!(headers.get("x-private").is_none() && headers.get("keep-alive").is_none(), "{headers:?}");
    assert_eq!(headers.get("x-kept").unwrap(), "yes");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "all of these reused the one connection");

    // Until the upstream closes; and HTTP/1.0, one request per connection
    // unless it says keep-alive (this upstream would keep it open).
    let (status, _, body, _) = get(server.url("/close"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"until the end"[..]));
    let (status, _, body, _) = get(server.url("/http10"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"old!"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "the kept one ended with the first, the second was its own");
    let (status, _, _, _) = get(server.url("/ok"), "GET").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "the HTTP/1.0 connection was not reused");

    // Two Content-Lengths that disagree: 502, not a guess.
    let (status, _, _, _) = get(server.url("/conflict"), "GET").await.unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    // Bytes past the framed end: the response is the framed part, and the
    // next request does not get the rest as its answer.
    let (status, _, body, _) = get(server.url("/extra"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
    let before = accepted.load(Ordering::SeqCst);
    let (status, _, body, _) = get(server.url("/ok"), "GET").await.unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]), "the extra bytes were taken for a response");
    assert_eq!(accepted.load(Ordering::SeqCst), before + 1, "the connection with extra bytes was reused");

    // A body cut short is an error at the public client (a reset stream,
    // or a 502 when the failure reaches the server before the head went
    // out), never a short 200.
    match get(server.url("/short"), "GET").await {
        Ok((StatusCode::BAD_GATEWAY, _, _, _)) | Err(_) => {}
        Ok((status, _, body, _)) => panic!("a cut body arrived as {status} with {} bytes", body.len()),
    }
}

//! Hostile HTTP/1.1 on the public port: ambiguous or malformed framing in its
//! known forms (RFC 9112 §6, the request-smuggling literature), hosts that
//! disagree, hop-by-hop abuse, h2c upgrades. Each must be refused with a 4xx
//! or reach the upstream as exactly one normalized request; no byte of one
//! request may become a second request at an upstream, and the upstream a
//! request reaches is the one its Host names. The recording upstream logs
//! every head it parses, so the tests count what really arrived.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

const RULES: &str = r#"
[[rules]]
host = "a.example"
group = "demo"
upstream = "a"
timeout = "5s"
[[rules]]
host = "b.example"
group = "demo"
upstream = "b"
timeout = "5s"
"#;

/// How long a connection may stay silent before we stop reading it.
const QUIET: Duration = Duration::from_millis(800);

struct Tunnel {
    server: TestServer,
    _client: TestClient,
    a: Upstream,
    b: Upstream,
}

async fn tunnel() -> Tunnel {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let server = start_server(&demo_server_toml("", "", RULES), None).await;
    let client =
        TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("a", a.url()), ("b", b.url())]));
    server.wait_streams(3).await;
    Tunnel { server, _client: client, a, b }
}

/// What one raw connection got back: every status code in order.
#[derive(Debug)]
struct Answer {
    statuses: Vec<u16>,
    text: String,
    /// Whether the server closed the connection (rather than went quiet).
    closed: bool,
}

/// Writes `request` on a fresh connection and reads until the server closes
/// it or stays quiet for QUIET.
async fn exchange(addr: std::net::SocketAddr, request: Vec<u8>) -> Answer {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    // The server may answer (and close) before reading everything.
    let _ = tcp.write_all(&request).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    let mut closed = false;
    // Bounded: at most 30 reads of QUIET each.
    for _ in 0..30 {
        match tokio::time::timeout(QUIET, tcp.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            Ok(_) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    let text = String::from_utf8_lossy(&got).to_string();
    Answer { statuses: statuses_of(&got), text, closed }
}

/// The status of each response in `b`, read in sequence by their framing
/// (Content-Length or chunked); stops at anything it cannot parse.
fn statuses_of(mut b: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    // Bounded by the input: each round consumes at least a head.
    while let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&b[..end]).to_ascii_lowercase();
        let Some(status) = head.strip_prefix("http/1.1 ").and_then(|r| r.get(..3)?.parse::<u16>().ok()) else {
            break;
        };
        out.push(status);
        b = &b[end + 4..];
        let field = |name: &str| head.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()));
        if field("transfer-encoding:").is_some_and(|v| v.contains("chunked")) {
            // Chunks until the zero-size one and its blank line.
            loop {
                let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else { return out };
                let size = usize::from_str_radix(
                    String::from_utf8_lossy(&b[..eol]).split(';').next().unwrap_or("").trim(),
                    16,
                );
                let Ok(size) = size else { return out };
                b = &b[(eol + 2 + size + 2).min(b.len())..];
                if size == 0 {
                    break;
                }
            }
        } else {
            let n = field("content-length:").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            b = &b[n.min(b.len())..];
        }
    }
    out
}

/// What a case may do.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// A 4xx, and no head of this case at any upstream.
    Refused,
    /// One 2xx, one head at the upstream.
    One,
    /// Either of the two.
    RefusedOrOne,
    /// Malformed framing: 400 at once and the connection closed; no whole
    /// body at any upstream, and no head either when the bad bytes came
    /// with it.
    Malformed { head_may_pass: bool },
}

struct Case {
    name: &'static str,
    bytes: String,
    expect: Expect,
}

fn case(name: &'static str, expect: Expect, bytes: impl Into<String>) -> Case {
    Case { name, bytes: bytes.into(), expect }
}

/// The framing cases; `{c}` in a path is the case's marker, `/smuggled` a
/// request that must never reach an upstream.
fn framing_cases() -> Vec<Case> {
    use Expect::*;
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: a.example\r\n\r\n";
    vec![
        case(
            "cl-te",
            RefusedOrOne,
            format!("POST /upload-sha?c=cl-te HTTP/1.1\r\nHost: a.example\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "te-cl",
            RefusedOrOne,
            format!("POST /upload-sha?c=te-cl HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 60\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "two-lengths",
            Refused,
            format!("POST /upload-sha?c=two-lengths HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\nContent-Length: 45\r\n\r\nAAAA{smuggled}"),
        ),
        case(
            "length-list",
            Refused,
            format!("POST /upload-sha?c=length-list HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4, 45\r\n\r\nAAAA{smuggled}"),
        ),
        case(
            "length-plus",
            Refused,
            format!("POST /upload-sha?c=length-plus HTTP/1.1\r\nHost: a.example\r\nContent-Length: +4\r\n\r\nAAAA{smuggled}"),
        ),
        case(
            "te-chunked-identity",
            Refused,
            format!("POST /upload-sha?c=te-chunked-identity HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked, identity\r\nContent-Length: 4\r\n\r\nAAAA{smuggled}"),
        ),
        case(
            "te-xchunked",
            Refused,
            format!("POST /upload-sha?c=te-xchunked HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: xchunked\r\nContent-Length: 4\r\n\r\nAAAA{smuggled}"),
        ),
        case(
            "te-space-before-colon",
            Refused,
            format!("POST /upload-sha?c=te-space-before-colon HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding : chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "te-obs-fold",
            Refused,
            format!("POST /upload-sha?c=te-obs-fold HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "te-twice",
            RefusedOrOne,
            format!("POST /upload-sha?c=te-twice HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "te-in-http10",
            Refused,
            format!("POST /upload-sha?c=te-in-http10 HTTP/1.0\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "te-upper-case",
            One,
            "POST /upload-sha?c=te-upper-case HTTP/1.1\r\nHost: a.example\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        ),
        case(
            "chunk-size-junk",
            Malformed { head_may_pass: false },
            format!("POST /upload-sha?c=chunk-size-junk HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "chunk-size-overflow",
            Malformed { head_may_pass: false },
            format!("POST /upload-sha?c=chunk-size-overflow HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "chunk-size-negative",
            Malformed { head_may_pass: false },
            format!("POST /upload-sha?c=chunk-size-negative HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n-3\r\nabc\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "chunk-ext-huge",
            Malformed { head_may_pass: true },
            format!(
                "POST /upload-sha?c=chunk-ext-huge HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3;{}\r\nabc\r\n0\r\n\r\n",
                "x".repeat(200 << 10)
            ),
        ),
        case(
            "chunk-data-overrun",
            Malformed { head_may_pass: true },
            format!("POST /upload-sha?c=chunk-data-overrun HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n{smuggled}"),
        ),
        case(
            "body-holds-a-request",
            One,
            format!("POST /upload-sha?c=body-holds-a-request HTTP/1.1\r\nHost: a.example\r\nContent-Length: {}\r\n\r\n{smuggled}", smuggled.len()),
        ),
        case("bare-lf", RefusedOrOne, "GET /echo?c=bare-lf HTTP/1.1\nHost: a.example\n\n"),
        case("nul-in-value", Refused, "GET /echo?c=nul-in-value HTTP/1.1\r\nHost: a.example\r\nX-A: a\0b\r\n\r\n"),
        case("cr-in-value", Refused, "GET /echo?c=cr-in-value HTTP/1.1\r\nHost: a.example\r\nX-A: a\rX-B: b\r\n\r\n"),
        case("space-in-name", Refused, "GET /echo?c=space-in-name HTTP/1.1\r\nHost: a.example\r\nX A: b\r\n\r\n"),
        case("line-extra-token", Refused, "GET /echo?c=line-extra-token HTTP/1.1 x\r\nHost: a.example\r\n\r\n"),
        case("line-double-space", RefusedOrOne, "GET  /echo?c=line-double-space HTTP/1.1\r\nHost: a.example\r\n\r\n"),
        case("version-junk", Malformed { head_may_pass: false }, "GET /echo?c=version-junk HTTP/9.9\r\nHost: a.example\r\n\r\n"),
        case("version-2", Malformed { head_may_pass: false }, "GET /echo?c=version-2 HTTP/2.0\r\nHost: a.example\r\n\r\n"),
        case("version-lower", Malformed { head_may_pass: false }, "GET /echo?c=version-lower http/1.1\r\nHost: a.example\r\n\r\n"),
        case("http09", Malformed { head_may_pass: false }, "GET /echo?c=http09\r\n\r\n"),
        case("no-version", Malformed { head_may_pass: false }, "GET /echo?c=no-version \r\nHost: a.example\r\n\r\n"),
        case("not-http", Malformed { head_may_pass: false }, "HELLO?c=not-http\r\n\r\n"),
        case("two-hosts", Refused, "GET /echo?c=two-hosts HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n"),
        case("no-host", Refused, "GET /echo?c=no-host HTTP/1.1\r\n\r\n"),
        case("host-userinfo", Refused, "GET /echo?c=host-userinfo HTTP/1.1\r\nHost: b.example@a.example\r\n\r\n"),
        case("host-path", Refused, "GET /echo?c=host-path HTTP/1.1\r\nHost: a.example/x\r\n\r\n"),
        case("host-two-ports", Refused, "GET /echo?c=host-two-ports HTTP/1.1\r\nHost: a.example:80:81\r\n\r\n"),
        case("connect", Refused, "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n"),
    ]
}

/// Every framing case at once, each on its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_or_normalized() {
    let t = tunnel().await;
    let cases = framing_cases();
    let mut runs = JoinSet::new();
    for (i, c) in cases.iter().enumerate() {
        let (addr, bytes) = (t.server.http, c.bytes.clone().into_bytes());
        runs.spawn(async move { (i, exchange(addr, bytes).await) });
    }
    let mut answers: Vec<Option<Answer>> = (0..cases.len()).map(|_| None).collect();
    while let Some(r) = runs.join_next().await {
        let (i, a) = r.unwrap();
        answers[i] = Some(a);
    }
    // Let cancelled exchanges settle at the upstream before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut report = Vec::new();
    for (c, a) in cases.iter().zip(answers) {
        let a = a.unwrap();
        let marker = if c.name == "connect" { "a.example:443".to_string() } else { format!("c={}", c.name) };
        let heads = t.a.seen.heads_with(&marker).len() + t.b.seen.heads_with(&marker).len();
        let whole = t.a.seen.whole_bodies.lock().unwrap().iter().filter(|(u, _)| u.contains(&marker)).count();
        let first = a.statuses.first().copied();
        let refused = first.is_some_and(|s| (400..500).contains(&s)) && heads == 0;
        let one = a.statuses.len() == 1 && first.is_some_and(|s| (200..300).contains(&s)) && heads == 1;
        let ok = match c.expect {
            Expect::Refused => refused,
            Expect::One => one,
            Expect::RefusedOrOne => refused || one,
            Expect::Malformed { head_may_pass } => {
                a.statuses == [400] && a.closed && whole == 0 && (head_may_pass && heads <= 1 || heads == 0)
            }
        };
        report.push(format!(
            "{:<24} {:?} -> statuses {:?}, closed {}, heads at upstream {heads}, whole bodies {whole}",
            c.name, c.expect, a.statuses, a.closed
        ));
        assert!(ok, "case {}: expected {:?}, got statuses {:?} with {heads} heads and {whole} whole bodies at the upstream; answer: {:?}", c.name, c.expect, a.statuses, a.text.chars().take(300).collect::<String>());
    }
    println!("{}", report.join("\n"));
    for up in [&t.a, &t.b] {
        assert!(up.seen.heads_with("/smuggled").is_empty(), "a smuggled request reached an upstream");
    }
    // The port still serves.
    let ok =
        exchange(t.server.http, b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert_eq!(ok.statuses, [200]);
}

/// The one head `up` parsed whose URI holds `marker` (fails unless exactly one).
fn one_head(up: &Upstream, marker: &str) -> SeenHead {
    let mut seen = up.seen.heads_with(marker);
    assert_eq!(seen.len(), 1, "heads with {marker:?}: {seen:?}");
    seen.remove(0)
}

/// Absolute-form: the request-target's host is the tenant, and the upstream
/// is told that host, not the Host header's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routed_host_is_the_host_the_upstream_sees() {
    let t = tunnel().await;
    let a = exchange(
        t.server.http,
        b"GET http://b.example/echo?c=absolute HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(a.statuses, [200], "{}", a.text);
    assert!(t.a.seen.heads_with("c=absolute").is_empty(), "not served by a.example's upstream");
    let seen = one_head(&t.b, "c=absolute");
    let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
    assert_eq!(hosts, ["b.example"], "exactly one Host, the routed one");

    // `Connection` naming Host or X-Forwarded-For strips neither: the
    // upstream still learns the routed host and the real peer.
    let a = exchange(
        t.server.http,
        b"GET /echo?c=conn-names HTTP/1.1\r\nHost: a.example\r\nConnection: host, x-forwarded-for, content-length\r\nX-Forwarded-For: 10.9.9.9\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(a.statuses, [200], "{}", a.text);
    let seen = one_head(&t.a, "c=conn-names");
    assert_eq!(seen.headers.get_all("host").iter().collect::<Vec<_>>(), ["a.example"]);
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1", "the spoofed value went with Connection; ours is set");
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) and those `Connection` names never
/// reach the upstream; end-to-end ones do. An h2c upgrade is served as an
/// ordinary request: the upstream never sees the offer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_h2c_upgrades_stop_at_the_tunnel() {
    let t = tunnel().await;
    let a = exchange(
        t.server.http,
        b"GET /echo?c=hop HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive, x-drop\r\nX-Drop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: gzip\r\nTrailer: x-t\r\nUpgrade: foo\r\nX-Keep: 1\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(a.statuses, [200], "{}", a.text);
    let seen = one_head(&t.a, "c=hop");
    let h = &seen.headers;
    for gone in ["x-drop", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer", "upgrade"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream");
    }
    assert_eq!(h["x-keep"], "1");

    let a = exchange(
        t.server.http,
        b"GET /echo?c=h2c HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(a.statuses, [200], "served as an ordinary request: {}", a.text);
    let seen = one_head(&t.a, "c=h2c");
    for gone in ["upgrade", "http2-settings", "connection"] {
        assert!(seen.headers.get(gone).is_none(), "{gone} reached the upstream");
    }
}

/// Two requests pipelined in one write reach the upstream as two requests,
/// answered in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_stay_two() {
    let t = tunnel().await;
    let a = exchange(
        t.server.http,
        b"POST /upload-sha?c=pipe1 HTTP/1.1\r\nHost: a.example\r\nContent-Length: 3\r\n\r\nabcGET /echo?c=pipe2 HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n".to_vec(),
    )
    .await;
    assert_eq!(a.statuses, [200, 200], "{}", a.text);
    assert_eq!(
        t.a.seen.whole_bodies.lock().unwrap().iter().filter(|(u, n)| u.contains("c=pipe1") && *n == 3).count(),
        1
    );
    assert_eq!(t.b.seen.heads_with("c=pipe2").len(), 1);
    assert!(t.a.seen.heads_with("c=pipe2").is_empty());
}

/// Deterministic junk: a xorshift stream, so a failure can be replayed.
fn junk(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `bytes` and waits for the server to close the connection (any
/// answer before that is fine); true if it closed within WAIT.
async fn closes_after(addr: std::net::SocketAddr, bytes: &[u8]) -> bool {
    let Ok(mut tcp) = TcpStream::connect(addr).await else { return false };
    let _ = tcp.write_all(bytes).await;
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + WAIT;
    // Bounded by the deadline: reads until EOF or a reset.
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Garbage on every port (random bytes, a TLS hello on the plaintext public
/// port, HTTP/1.1 on the gRPC and admin ports): each such connection is
/// closed, and the daemons keep serving with the client still registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_any_port_is_closed_and_nothing_else_notices() {
    let a = Upstream::start("a").await;
    let server = start_server(
        &demo_server_toml("metrics_listen = \"127.0.0.1:0\"\nheader_read_timeout = \"2s\"", "", RULES),
        None,
    )
    .await;
    let _client =
        TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("a", a.url()), ("b", a.url())]));
    server.wait_streams(3).await;
    // A TLS 1.2 ClientHello's record header and start, as a browser opens https://.
    let tls_hello: Vec<u8> =
        [&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03][..], &junk(7, 500)].concat();
    let http1 = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n".to_vec();
    let mut probes: Vec<(&str, std::net::SocketAddr, Vec<u8>)> = Vec::new();
    for (name, addr) in
        [("public", server.http), ("grpc", server.grpc), ("admin", server.admin), ("metrics", server.metrics)]
    {
        for seed in 1..=3u64 {
            probes.push((name, addr, junk(seed * 31, 4096)));
        }
        // Random bytes after a valid-looking start.
        probes.push((name, addr, [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), junk(99, 2048)].concat()));
    }
    probes.push(("public", server.http, tls_hello));
    probes.push(("grpc", server.grpc, http1.clone()));
    probes.push(("admin", server.admin, http1));
    let mut runs = JoinSet::new();
    for (name, addr, bytes) in probes {
        runs.spawn(async move { (name, closes_after(addr, &bytes).await) });
    }
    while let Some(r) = runs.join_next().await {
        let (name, closed) = r.unwrap();
        assert!(closed, "a garbage connection to the {name} port was left open");
    }
    let ok =
        exchange(server.http, b"GET /echo HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert_eq!(ok.statuses, [200], "the public port still serves");
    assert_eq!(server.shared.registry.streams().len(), 3, "the client's streams are untouched");
    let metrics =
        exchange(server.metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec()).await;
    assert_eq!(metrics.statuses, [200], "metrics still served");
    server.stop().await;
}

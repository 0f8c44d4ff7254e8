//! HTTP through the whole tunnel over loopback: methods, bodies, large
//! transfers, concurrency, isolation of slow readers, routing and errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn server_toml(extra_groups: &str, rules: &str) -> String {
    demo_server_toml("", extra_groups, rules)
}

const DEFAULT_RULES: &str = r#"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#;

async fn tunnel(transport: &str) -> (TestServer, TestClient, Upstream) {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("", DEFAULT_RULES), None).await;
    let extra = format!("transport = \"{transport}\"");
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", &extra, &[("web", up.url())]));
    let streams = if transport == "single" { 1 } else { 3 };
    server.wait_streams(streams).await;
    (server, client, up)
}

async fn methods_round_trip(transport: &str) {
    let (server, _client, _up) = tunnel(transport).await;
    let c = http_client();
    for method in ["GET", "POST", "PUT", "DELETE", "PATCH"] {
        let payload = format!("{method} body");
        let req = Request::builder()
            .method(method)
            .uri(server.url("/echo/caf%C3%A9/%E2%9C%93?q=a%20b&x=%C3%A9&empty="))
            .header("x-custom", "value 1")
            .header("x-bin", http::HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap())
            .body(body(payload.clone()))
            .unwrap();
        let got = send(&c, req).await;
        assert_eq!(got.status, StatusCode::OK, "{method} via {transport}");
        assert_eq!(got.headers["x-seen-method"], method);
        assert_eq!(got.headers["x-seen-uri"], "/echo/caf%C3%A9/%E2%9C%93?q=a%20b&x=%C3%A9&empty=");
        assert_eq!(got.headers["x-seen-x-custom"], "value 1");
        assert_eq!(got.headers["x-seen-x-bin"].as_bytes(), b"caf\xc3\xa9");
        assert_eq!(got.headers["x-seen-x-forwarded-for"], "127.0.0.1");
        assert_eq!(got.headers["x-seen-x-forwarded-proto"], "http");
        assert_eq!(got.headers["x-seen-x-forwarded-host"], server.http.to_string());
        assert_eq!(got.headers["x-seen-host"], server.http.to_string(), "the public Host reaches the upstream");
        let multi: Vec<_> = got.headers.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"], "repeated response headers kept in order");
        assert_eq!(got.text(), payload);
    }
    // HEAD: headers, no body.
    let got = send(&c, Request::head(server.url("/echo")).body(empty()).unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["x-seen-method"], "HEAD");
    assert!(got.body.is_empty());
    // 204 and 304: no body.
    for code in [204u16, 304] {
        let got = get(&server.url(&format!("/status/{code}"))).await;
        assert_eq!(got.status.as_u16(), code);
        assert_eq!(got.headers["x-status-test"], "yes");
        assert!(got.body.is_empty());
    }
    // Request bodies: chunked (streamed) and with Content-Length.
    let chunks: Vec<Bytes> = (0..50).map(|i| Bytes::from(format!("chunk {i};"))).collect();
    let want: String = (0..50).map(|i| format!("chunk {i};")).collect();
    let got = send(&c, Request::post(server.url("/echo")).body(streamed(chunks)).unwrap()).await;
    assert_eq!(got.text(), want);
    let got = send(&c, Request::post(server.url("/echo")).body(body(want.clone())).unwrap()).await;
    assert_eq!(got.headers["x-seen-content-length"], want.len().to_string().as_str());
    assert_eq!(got.text(), want);
    // Hop-by-hop headers from the public client are removed, and those named in Connection.
    let req = Request::get(server.url("/echo"))
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("te", "gzip")
        .body(empty())
        .unwrap();
    let got = send(&c, req).await;
    assert!(got.headers.get("x-seen-x-private").is_none());
    assert!(got.headers.get("x-seen-te").is_none());
    // Except `te: trailers`, which gRPC needs end to end.
    let req = Request::get(server.url("/echo")).header("te", "trailers").body(empty()).unwrap();
    assert_eq!(send(&c, req).await.headers["x-seen-te"], "trailers");
    // h2c public clients work too.
    let got = send(&h2c_client(), Request::get(server.url("/echo?h2")).body(empty()).unwrap()).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.headers["x-seen-uri"], "/echo?h2");
    // Every exchange above is finished and freed on the server.
    let shared = server.shared.clone();
    eventually("no exchange left in flight", WAIT, || shared.registry.streams().iter().all(|s| s.in_flight == 0)).await;
    assert_eq!(
        shared.requests.errors(),
        0,
        "{:?}",
        shared.requests.since(0).iter().map(|r| &r.error).collect::<Vec<_>>()
    );
    server.stop().await;
}

/// Methods, headers, bodies, odd paths and empty responses survive the split transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_split() {
    methods_round_trip("split").await;
}

/// The same through a single stream (plan A).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_single() {
    methods_round_trip("single").await;
}

/// The same with the control stream on its own connection (plan 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trips_split_connection() {
    methods_round_trip("split-connection").await;
}

/// 100 MiB each way arrives byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_mib_upload_and_download_are_intact() {
    let (server, _client, _up) = tunnel("split").await;
    const N: usize = 100 << 20;
    let c = http_client();
    let got =
        send(&c, Request::post(server.url("/upload-sha")).body(streamed(pattern_chunks(N).collect())).unwrap()).await;
    assert_eq!(got.text(), format!("{N} {}", sha256_of_pattern(N)));

    let (len, sha, length) = download_sha(&c, &server.url(&format!("/download?bytes={N}"))).await;
    assert_eq!(length.as_deref(), Some(N.to_string().as_str()));
    assert_eq!(len, N);
    assert_eq!(sha, sha256_of_pattern(N));
    server.stop().await;
}

/// 200 concurrent requests to an upstream that waits 200 ms take about one wait, not 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_are_served_concurrently() {
    let (server, _client, up) = tunnel("split").await;
    let c = http_client();
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let (c, url) = (c.clone(), server.url("/slow?ms=200"));
        tasks.spawn(async move { send(&c, Request::get(url).body(empty()).unwrap()).await.status });
    }
    while let Some(s) = tasks.join_next().await {
        assert_eq!(s.unwrap(), StatusCode::OK);
    }
    let took = start.elapsed();
    assert_eq!(up.seen.requests.load(Ordering::SeqCst), 200);
    // Serial would be 40 s; the bound leaves room for a loaded CI machine.
    assert!(took < Duration::from_secs(5), "200 x 200ms took {took:?}");
    println!("200 concurrent 200ms requests took {took:?}");
    server.stop().await;
}

/// A public client that stops reading a big response does not delay other
/// requests through the same client, even on a single data stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_stall_other_requests() {
    let up = Upstream::start("web").await;
    let server =
        start_server(&server_toml("", DEFAULT_RULES).replace("data_streams = 2", "data_streams = 1"), None).await;
    let _client =
        TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "data_streams = 1", &[("web", up.url())]));
    server.wait_streams(2).await;
    // Start a 200 MiB download and read only its first frames, then stop reading.
    let stalled = http_client();
    let resp = stalled
        .request(Request::get(server.url(&format!("/download?bytes={}", 200 << 20))).body(empty()).unwrap())
        .await
        .unwrap();
    let mut stalled_body = resp.into_body();
    stalled_body.frame().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Other requests, small and large, go through the same stream.
    let c = http_client();
    for i in 0..20 {
        let start = Instant::now();
        let got = send(&c, Request::post(server.url("/echo")).body(body(format!("req {i}"))).unwrap()).await;
        assert_eq!(got.text(), format!("req {i}"));
        assert!(start.elapsed() < Duration::from_secs(2), "request {i} took {:?}", start.elapsed());
    }
    let got = get(&server.url(&format!("/download?bytes={}", 8 << 20))).await;
    assert_eq!(got.body.len(), 8 << 20);
    drop(stalled_body);
    server.stop().await;
}

/// Host and path rules choose the group; unroutable requests get 404, 503,
/// 502 and 504 fast, each with a one-line reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_error_statuses() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let groups = r#"
[[groups]]
name = "api"
token = "t-api"
heartbeat_interval = "1s"
[[groups]]
name = "empty"
token = "t-empty"
"#;
    let rules = r#"
[[rules]]
host = "api.example.test"
group = "api"
upstream = "api"
[[rules]]
host = "*.example.test"
path_prefix = "/never"
group = "demo"
upstream = "web"
timeout = "500ms"
[[rules]]
host = "*.example.test"
path_prefix = "/gone"
group = "demo"
upstream = "closed"
[[rules]]
host = "*.example.test"
path_prefix = "/unknown"
group = "demo"
upstream = "not-in-client"
[[rules]]
host = "*.example.test"
group = "demo"
upstream = "web"
[[rules]]
host = "nobody.test"
group = "empty"
upstream = "web"
"#;
    let server = start_server(&server_toml(groups, rules), None).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let _web_client = TestClient::start(&client_toml(
        &server,
        "edge-web",
        "demo",
        "t-demo",
        "",
        &[("web", web.url()), ("closed", format!("http://{closed}"))],
    ));
    let _api_client = TestClient::start(&client_toml(&server, "edge-api", "api", "t-api", "", &[("api", api.url())]));
    server.wait_streams(6).await;
    let c = http_client();
    let with_host = |host: &str, path: &str| Request::get(server.url(path)).header("host", host).body(empty()).unwrap();
    let got = send(&c, with_host("API.example.test:8080", "/x")).await;
    assert_eq!(got.headers["x-upstream"], "api");
    let got = send(&c, with_host("www.example.test", "/x")).await;
    assert_eq!(got.headers["x-upstream"], "web");

    struct Case {
        host: &'static str,
        path: &'static str,
        status: u16,
        reason: &'static str,
    }
    let cases = [
        Case { host: "other.test", path: "/", status: 404, reason: "no route for host \"other.test\"" },
        Case { host: "nobody.test", path: "/", status: 503, reason: "no tunnel client connected for group \"empty\"" },
        Case { host: "www.example.test", path: "/gone", status: 502, reason: "upstream \"closed\" unreachable" },
        Case {
            host: "www.example.test",
            path: "/unknown",
            status: 502,
            reason: "tunnel client has no upstream \"not-in-client\"",
        },
        Case { host: "www.example.test", path: "/never", status: 504, reason: "upstream did not answer within 500ms" },
    ];
    for case in cases {
        let start = Instant::now();
        let got = send(&c, with_host(case.host, case.path)).await;
        let took = start.elapsed();
        assert_eq!(got.status.as_u16(), case.status, "{} {}: {}", case.host, case.path, got.text());
        assert!(got.text().starts_with(case.reason), "{:?} should start with {:?}", got.text(), case.reason);
        assert_eq!(got.text().lines().count(), 1);
        assert!(took < Duration::from_secs(2), "{} took {took:?}", case.status);
    }
    // The 504's upstream request was cancelled at the upstream.
    let seen = web.seen.clone();
    eventually("upstream sees the timed-out request cancelled", WAIT, || seen.cancelled.load(Ordering::SeqCst) >= 1)
        .await;
    server.stop().await;
}

/// A public client that hangs up cancels the request at the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_hang_up_cancels_upstream_request() {
    let (server, _client, up) = tunnel("split").await;
    let c = http_client();
    let fut = c.request(Request::get(server.url("/never")).body(empty()).unwrap());
    let seen = up.seen.clone();
    // Give the request time to reach the upstream, then hang up.
    let _ = tokio::time::timeout(Duration::from_millis(500), fut).await;
    assert_eq!(seen.requests.load(Ordering::SeqCst), 1);
    eventually("upstream sees the cancel", Duration::from_secs(3), || seen.cancelled.load(Ordering::SeqCst) == 1).await;
    eventually("no exchange left in flight", Duration::from_secs(3), || {
        server.shared.registry.streams().iter().all(|s| s.in_flight == 0)
    })
    .await;
    server.stop().await;
}

/// Server-sent events reach the public client as the upstream writes them:
/// nothing waits for a buffer to fill or a timer (issue 7 aims at 5 ms on
/// loopback; this asserts a generous 50 ms and prints the figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_events_arrive_as_written() {
    for proto in ["HTTP/1.1", "h2c"] {
        let (server, _client, _up) = tunnel("split").await;
        let c = if proto == "h2c" { h2c_client() } else { http_client() };
        let req = Request::get(server.url("/events?n=10&every=50")).body(empty()).unwrap();
        let resp = tokio::time::timeout(WAIT, c.request(req)).await.expect("head in time").expect("response");
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let (mut events, mut worst) = (0, 0u64);
        let mut pending = String::new();
        while let Some(frame) = tokio::time::timeout(WAIT, body.frame()).await.expect("event in time") {
            let Ok(data) = frame.expect("body frame").into_data() else { continue };
            let now = unix_micros();
            pending.push_str(std::str::from_utf8(&data).expect("utf-8 events"));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let sent: u64 = event.lines().find_map(|l| l.strip_prefix("data: ")).unwrap().parse().unwrap();
                worst = worst.max(now.saturating_sub(sent));
                events += 1;
            }
        }
        assert_eq!(events, 10, "{proto}: every event arrived");
        println!("{proto}: worst event delay upstream write -> public client {:.2} ms", worst as f64 / 1e3);
        assert!(worst < 50_000, "{proto}: an event took {} µs to cross the tunnel", worst);
        server.stop().await;
    }
}

/// After the response head, an exchange with nothing moving either way for
/// its rule's idle_timeout is closed (the public client sees the body cut,
/// the server counts it); one that keeps moving lives on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_closed_active_ones_live() {
    let up = Upstream::start("web").await;
    let rules = format!("{DEFAULT_RULES}idle_timeout = \"300ms\"\n");
    let server = start_server(&server_toml("", &rules), None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let c = http_client();

    // Events 100 ms apart: never 300 ms of silence, so all of them arrive.
    let got = send(&c, Request::get(server.url("/events?n=8&every=100")).body(empty()).unwrap()).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text().matches("data: ").count(), 8, "an active stream is not cut: {}", got.text());

    // The first event would come after 5 s: the head arrives, then silence.
    let start = Instant::now();
    let resp = tokio::time::timeout(
        WAIT,
        c.request(Request::get(server.url("/events?n=2&every=5000")).body(empty()).unwrap()),
    )
    .await
    .expect("head in time")
    .expect("response");
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(WAIT, resp.into_body().collect()).await.expect("the body ends in time");
    let after = start.elapsed();
    assert!(body.is_err(), "an idle stream ends in an error, not a complete-looking body");
    // 300 ms of silence, found by a sweep every 500 ms; well before the first event.
    assert!(after >= Duration::from_millis(300) && after < Duration::from_secs(3), "closed after {after:?}");
    println!("idle exchange closed {after:?} after the request (idle_timeout 300ms)");
    // The sweep counts right after it cuts the body, so the count may trail the error a moment.
    let idle_closed = || server.shared.exchanges_idle_closed.load(Ordering::SeqCst);
    eventually("the close is counted", Duration::from_secs(3), || idle_closed() >= 1).await;
    assert_eq!(idle_closed(), 1, "counted once");
    eventually("no exchange left in flight", Duration::from_secs(3), || {
        server.shared.registry.streams().iter().all(|s| s.in_flight == 0)
    })
    .await;
    server.stop().await;
}

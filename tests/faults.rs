//! Bad days, under a steady open-loop load (fixed rate, a deadline per
//! request, so a hang shows as latency): a client that dies, a link that
//! black-holes, a tarpit server, a server that crashes and comes back, an
//! upstream that fails. Each asserts the bound docs/reliability.md states
//! and prints the figure measured.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::child::ChildClient;
use common::fault::*;
use common::*;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    eventually(what, limit, &mut f).await;
    start.elapsed()
}

/// A client killed under load: only the requests on it fail, each with 502
/// within 1 s; the rest of the group takes the new ones; restarted, it
/// serves again within 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_client_fails_only_its_requests() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let server = start_server(FAULT_SERVER, None).await;
    let client_a = TestClient::start(&client_of(server.grpc, "edge-a", &a, ""));
    let _client_b = TestClient::start(&client_of(server.grpc, "edge-b", &b, ""));
    server.wait_streams(6).await;

    // 300 ms requests at 40/s: about 6 in flight on each client at any time.
    let load = tokio::spawn(open_loop(server.url("/slow?ms=300"), 40, Duration::from_secs(4), Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let at_a_before = a.seen.requests.load(Ordering::SeqCst);
    let killed_at = Instant::now();
    client_a.kill();
    let out = load.await.unwrap();
    println!("dead client: {}", summary(&out));

    let failed: Vec<&Outcome> = out.iter().filter(|o| !o.ok()).collect();
    let answered_by_a = out.iter().filter(|o| o.upstream.as_deref() == Some("a")).count();
    let reached_a = a.seen.requests.load(Ordering::SeqCst);
    // Every failure is a request that was on edge-a: it reached a's upstream
    // and got no answer from it (its body cut), or was on its way there.
    assert!(
        failed.len() <= reached_a - answered_by_a + 2,
        "{} failed; {reached_a} reached a, {answered_by_a} answered",
        failed.len()
    );
    assert!(at_a_before > 0 && reached_a <= at_a_before + 2, "nothing new went to the dead client");
    for f in &failed {
        assert_eq!(f.status, Some(502), "{f:?}");
        assert!(f.ended().saturating_duration_since(killed_at) < Duration::from_secs(1), "502 too late: {f:?}");
    }
    let last_502 = failed.iter().map(|f| f.ended().saturating_duration_since(killed_at)).max();
    println!("dead client: {} requests failed (all 502), the last {last_502:?} after the kill", failed.len());
    // The server sees the socket close at once; 300 ms covers a busy machine.
    let after: Vec<&Outcome> = out.iter().filter(|o| o.sent > killed_at + Duration::from_millis(300)).collect();
    let strays: Vec<&&Outcome> = after.iter().filter(|o| !(o.ok() && o.upstream.as_deref() == Some("b"))).collect();
    assert!(strays.is_empty(), "sent after the kill, not served by edge-b: {strays:?}");

    let restarted = Instant::now();
    let _client_a = TestClient::start(&client_of(server.grpc, "edge-a", &a, ""));
    let shared = server.shared.clone();
    wait_for("edge-a registered again", Duration::from_secs(2), || {
        shared.registry.streams().iter().filter(|s| s.client_id == "edge-a").count() == 3
    })
    .await;
    // Requests spread over the group again: a reaches edge-a within 2 s.
    let before = a.seen.requests.load(Ordering::SeqCst);
    let c = http_client();
    let deadline = restarted + Duration::from_secs(2);
    while a.seen.requests.load(Ordering::SeqCst) == before && Instant::now() < deadline {
        let got = send(&c, http::Request::get(server.url("/echo")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200);
    }
    let back = restarted.elapsed();
    assert!(a.seen.requests.load(Ordering::SeqCst) > before, "edge-a served nothing within 2 s of its restart");
    println!("dead client: restarted, serving again after {back:?}");
    server.stop().await;
}

/// A link that black-holes (a frozen client process looks much the same to
/// the server: its kernel keeps the socket open and stops acknowledging
/// data once buffers fill): within heartbeat timeout + 1 s the server
/// routes around it, no public request waits past its rule's timeout, and
/// thawed, the client comes back by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_link_is_routed_around_and_recovers() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let server = start_server(FAULT_SERVER, None).await;
    let relay = Relay::start(server.grpc).await;
    let _client_a = TestClient::start(&client_of(relay.addr, "edge-a", &a, ""));
    let _client_b = TestClient::start(&client_of(server.grpc, "edge-b", &b, ""));
    frozen_then_thawed("frozen link", &server, &a, || relay.freeze(), || relay.thaw()).await;
    server.stop().await;
}

/// The same with a real process stopped by SIGSTOP and woken by SIGCONT:
/// its kernel still acknowledges what fits in the socket buffers, but no
/// heartbeat comes and no request is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_client_process_is_routed_around_and_recovers() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let server = start_server(FAULT_SERVER, None).await;
    let client_a = ChildClient::start(&client_of(server.grpc, "edge-a", &a, ""));
    let _client_b = TestClient::start(&client_of(server.grpc, "edge-b", &b, ""));
    frozen_then_thawed("SIGSTOP", &server, &a, || client_a.signal("STOP"), || client_a.signal("CONT")).await;
    server.stop().await;
}

/// The tunnel client of `ChildClient`, when this binary runs as one.
#[test]
#[ignore = "run by ChildClient, in a process of its own"]
fn child_client_process() {
    common::child::serve_client_if_asked();
}

/// Under load, freezes edge-a (upstream `a`) and checks it is routed
/// around within heartbeat timeout + 1 s, that no request waits past its
/// rule's timeout and only requests sent to it fail, then thaws it and
/// checks it registers and serves again by itself.
async fn frozen_then_thawed(name: &str, server: &TestServer, a: &Upstream, freeze: impl FnOnce(), thaw: impl FnOnce()) {
    server.wait_streams(6).await;
    let shared = server.shared.clone();
    let streams_of = move |id: &str| shared.registry.streams().iter().filter(|s| s.client_id == id).count();

    let load = tokio::spawn(open_loop(server.url("/echo"), 40, Duration::from_secs(8), Duration::from_secs(5)));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let frozen_at = Instant::now();
    freeze();
    let s = streams_of.clone();
    let detected = wait_for("edge-a reaped", Duration::from_secs(5), || s("edge-a") == 0).await;
    println!("{name}: edge-a's streams reaped {detected:?} after the freeze (heartbeat_timeout 3s)");
    assert!(detected <= Duration::from_secs(4), "routed around after {detected:?}, bound heartbeat_timeout + 1 s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    thaw();
    let s = streams_of.clone();
    let back = wait_for("edge-a registered again", Duration::from_secs(10), || s("edge-a") == 3).await;
    println!("{name}: thawed, edge-a registered again {back:?} after the thaw");
    let out = load.await.unwrap();
    println!("{name}: {}", summary(&out));

    // No request waited past its rule's timeout (2 s) by more than 0.5 s.
    let worst = out.iter().map(|o| o.took).max().unwrap();
    assert!(worst < Duration::from_millis(2500), "a request took {worst:?}");
    // The ones that failed were sent to edge-a before it was routed around:
    // 504 at the rule's timeout, or 502 when the reaping ended them first.
    let routed_around = frozen_at + detected;
    for o in out.iter().filter(|o| !o.ok()) {
        assert!(matches!(o.status, Some(502 | 504)), "{o:?}");
        assert!(o.sent < routed_around, "failed after edge-a was routed around: {o:?}");
    }
    let failed = out.iter().filter(|o| !o.ok()).count();
    println!("{name}: {failed} requests failed (504 at the rule's 2 s timeout, or 502 at the reaping); worst latency {worst:?}");

    let before = a.seen.requests.load(Ordering::SeqCst);
    let c = http_client();
    for _ in 0..20 {
        let got = send(&c, http::Request::get(server.url("/echo")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200);
    }
    assert!(a.seen.requests.load(Ordering::SeqCst) > before, "edge-a serves again");
}

/// A server that accepts TCP and never starts HTTP/2: the client gives up
/// on each attempt at its connect timeout and retries with jittered,
/// growing delays up to its cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tarpit_server_costs_a_connect_timeout_then_backoff() {
    let tarpit = Tarpit::start().await;
    let up = Upstream::start("a").await;
    let toml = client_of(tarpit.addr, "edge-a", &up, "connect_timeout = \"500ms\"")
        .replace("reconnect_min = \"100ms\"", "reconnect_min = \"200ms\"");
    let client = TestClient::start(&toml);
    tokio::time::sleep(Duration::from_secs(6)).await;
    client.kill();
    let conns = tarpit.conns.lock().unwrap().clone();
    println!("tarpit: {} attempts in 6 s", conns.len());
    assert!((3..=12).contains(&conns.len()), "{} attempts", conns.len());
    let mut held = Vec::new();
    for (accepted, closed) in &conns[..conns.len() - 1] {
        let closed = closed.expect("the client gave up on the attempt");
        held.push(closed - *accepted);
    }
    let gaps: Vec<Duration> = conns.windows(2).map(|w| w[1].0 - w[0].1.unwrap()).collect();
    println!("tarpit: each attempt held {held:?}; delays before the next {gaps:?}");
    for h in &held {
        assert!(
            *h >= Duration::from_millis(450) && *h < Duration::from_millis(900),
            "attempt held {h:?}, connect_timeout 500ms"
        );
    }
    // Jittered (50-100% of the step, the step doubling from 200 ms to 1 s).
    for g in &gaps {
        assert!(*g >= Duration::from_millis(90) && *g <= Duration::from_millis(1100), "delay {g:?}");
    }
    let spread = gaps.iter().max().unwrap().saturating_sub(*gaps.iter().min().unwrap());
    assert!(spread >= Duration::from_millis(50), "delays not spread: {gaps:?}");
}

/// A server killed and started again on the same ports: every client
/// serves again within 5 s, with no step by anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_server_restarted_on_same_ports_gets_its_clients_back() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let server = OwnServer::start(FAULT_SERVER, None);
    let addrs = server.addrs();
    let _client_a = TestClient::start(&client_of(server.grpc, "edge-a", &a, ""));
    let _client_b = TestClient::start(&client_of(server.grpc, "edge-b", &b, ""));
    let shared = server.shared.clone();
    eventually("6 streams", WAIT, || shared.registry.streams().len() == 6).await;
    let url = format!("http://{}/echo", server.http);
    assert_eq!(get(&url).await.status, 200);

    server.crash();
    // Down a moment: the clients' first retries find nothing listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = Instant::now();
    let server = OwnServer::start(FAULT_SERVER, Some(addrs));
    let shared = server.shared.clone();
    let back = wait_for("both clients back", Duration::from_secs(5), || {
        let s = shared.registry.streams();
        ["edge-a", "edge-b"].iter().all(|id| s.iter().filter(|v| v.client_id == *id).count() == 3)
    })
    .await;
    println!("server crash: both clients registered {back:?} after the restart (reconnect_max 1s)");
    let (before_a, before_b) = (a.seen.requests.load(Ordering::SeqCst), b.seen.requests.load(Ordering::SeqCst));
    let c = http_client();
    for _ in 0..20 {
        let got = send(&c, http::Request::get(url.as_str()).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200);
    }
    assert!(a.seen.requests.load(Ordering::SeqCst) > before_a && b.seen.requests.load(Ordering::SeqCst) > before_b);
    println!("server crash: serving through both clients {:?} after the restart", restarted.elapsed());
    assert!(restarted.elapsed() < Duration::from_secs(5));
}

/// Reads one HTTP/1.1 response to its end (EOF) from a raw connection:
/// (head, body bytes as sent on the wire).
async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> (String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let read = tokio::time::timeout(WAIT, async {
        let mut b = [0u8; 16 << 10];
        loop {
            match tcp.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(n) => all.extend_from_slice(&b[..n]),
            }
        }
    });
    read.await.expect("the connection ends");
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
    (String::from_utf8_lossy(&all[..split]).into_owned(), all[split..].to_vec())
}

/// The upstream fails: a closed port gives 502 at once, one that never
/// answers 504 at the rule's timeout, and one that resets mid-body leaves the
/// public client with a visibly cut message (short of its Content-Length, or
/// chunked without its last chunk; an h2c stream reset), never a complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstreams_give_fast_honest_answers() {
    let web = Upstream::start("web").await;
    let (reset_cl, _s1) = resetting_upstream(1 << 20, 64 << 10, false).await;
    let (reset_chunked, _s2) = resetting_upstream(0, 64 << 10, true).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let rules = r#"
[[rules]]
path_prefix = "/gone"
group = "demo"
upstream = "closed"
[[rules]]
path_prefix = "/never"
group = "demo"
upstream = "web"
timeout = "1s"
[[rules]]
path_prefix = "/bighead"
group = "demo"
upstream = "web"
[[rules]]
path_prefix = "/reset-length"
group = "demo"
upstream = "reset_cl"
[[rules]]
path_prefix = "/reset-chunked"
group = "demo"
upstream = "reset_chunked"
"#;
    let server = start_server(&demo_server_toml("", "", rules), None).await;
    let ups = [
        ("web", web.url()),
        ("closed", format!("http://{closed}")),
        ("reset_cl", format!("http://{reset_cl}")),
        ("reset_chunked", format!("http://{reset_chunked}")),
    ];
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &ups));
    server.wait_streams(3).await;

    let started = Instant::now();
    let got = get(&server.url("/gone")).await;
    let took = started.elapsed();
    assert_eq!(got.status, 502, "{}", got.text());
    assert!(took < Duration::from_millis(500), "closed port: 502 after {took:?}");
    println!("upstream port closed: 502 after {took:?}");

    let started = Instant::now();
    let got = get(&server.url("/never")).await;
    let took = started.elapsed();
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(took >= Duration::from_secs(1) && took < Duration::from_millis(1500), "never answers: 504 after {took:?}");
    println!("upstream never answers: 504 after {took:?} (rule timeout 1s)");

    // An upstream response head is read into at most 64 KiB (nginx's
    // default is 8 KiB): past it, 502.
    let got = get(&server.url("/bighead?bytes=30000")).await;
    assert_eq!((got.status.as_u16(), got.headers["x-big"].len()), (200, 30000));
    let got = get(&server.url("/bighead?bytes=70000")).await;
    assert_eq!(got.status, 502, "{}", got.text());
    println!("upstream head of 70 KB: 502 {:?}", got.text());

    for path in ["/reset-length", "/reset-chunked"] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x.test\r\n\r\n");
        let (head, body) = raw_exchange(server.http, &req).await;
        let lower = head.to_ascii_lowercase();
        assert!(lower.starts_with("http/1.1 200"), "{head}");
        if let Some(cl) = lower.lines().find_map(|l| l.strip_prefix("content-length: ")) {
            let cl: usize = cl.trim().parse().unwrap();
            assert!(body.len() < cl, "{path}: all {cl} bytes arrived from an upstream that reset");
            println!("upstream reset ({path}), HTTP/1.1: {} of {cl} bytes, then the connection closed", body.len());
        } else {
            assert!(lower.contains("transfer-encoding: chunked"), "{head}");
            assert!(!body.ends_with(b"0\r\n\r\n"), "{path}: a last chunk made a cut body look complete");
            println!(
                "upstream reset ({path}), HTTP/1.1: {} bytes chunked, no last chunk, connection closed",
                body.len()
            );
        }
        // h2c: the stream is reset; the body read fails.
        let resp = h2c_client().request(http::Request::get(server.url(path)).body(empty()).unwrap()).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = tokio::time::timeout(WAIT, http_body_util::BodyExt::collect(resp.into_body())).await.unwrap();
        assert!(body.is_err(), "{path}: h2c body read completed from an upstream that reset");
    }
    server.stop().await;
}

/// Reloads under load: an unparsable file, then a file that parses but
/// names a group that does not exist. Each is refused with its file, line
/// and key in the log, the old config keeps serving, no request fails; the
/// good file after them applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reloads_under_load_lose_nothing_and_a_good_one_applies() {
    use common::logs::{log_text, logs};
    logs();
    let (web, other) = (Upstream::start("web").await, Upstream::start("other").await);
    let file = ConfigFile::new(FAULT_SERVER);
    let server = start_server(FAULT_SERVER, Some(file.path.clone())).await;
    let toml = client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", web.url()), ("other", other.url())]);
    let _client = TestClient::start(&toml);
    server.wait_streams(3).await;
    let name = file.path.display().to_string();

    let load = tokio::spawn(open_loop(server.url("/echo"), 50, Duration::from_secs(7), Duration::from_secs(3)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    file.write(&format!("{FAULT_SERVER}\n[[rules]\ngroup = \"demo\"\n"));
    eventually("the unparsable file refused", WAIT, || {
        log_text().lines().any(|l| l.contains("config reload refused") && l.contains(&format!("{name}:")))
    })
    .await;
    let bad_group = FAULT_SERVER.replace("group = \"demo\"\nupstream", "group = \"nope\"\nupstream");
    file.write(&bad_group);
    eventually("the invalid file refused, naming line and key", WAIT, || {
        log_text().lines().any(|l| l.contains("config reload refused") && l.contains("rules[0].group"))
    })
    .await;
    let refused: Vec<String> =
        log_text().lines().filter(|l| l.contains("config reload refused")).map(str::to_string).collect();
    println!("bad reloads: {}", refused.join("\n  "));
    // A rule for /new ahead of the catch-all.
    let good = FAULT_SERVER.replace(
        "[[rules]]\ngroup",
        "[[rules]]\npath_prefix = \"/new\"\ngroup = \"demo\"\nupstream = \"other\"\n[[rules]]\ngroup",
    );
    file.write(&good);
    let shared = server.shared.clone();
    eventually("the good file applied", WAIT, || shared.config().rules.rules().iter().any(|r| r.path_prefix == "/new"))
        .await;
    let got = get(&server.url("/new/x")).await;
    assert_eq!((got.status.as_u16(), got.headers["x-upstream"].to_str().unwrap()), (200, "other"));
    let out = load.await.unwrap();
    println!("bad reloads: {}", summary(&out));
    assert!(out.iter().all(Outcome::ok), "{}", summary(&out));
    let text = server.shared.render_metrics();
    assert!(text.contains("tunnel_config_reloads_total{result=\"failed\"} 2"), "{text}");
    server.stop().await;
}

//! Deploys and reloads under a steady open-loop load (200 req/s, every
//! request with its own deadline): restarting each client of a group in turn,
//! ten reloads of server.toml, and a server shutdown with 50 slow requests in
//! flight. Each must fail no request; the figures are printed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::{Request, StatusCode};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

const RATE: u64 = 200;

fn server_toml(heartbeat: &str, extra_rule: bool) -> String {
    let extra = if extra_rule {
        "[[rules]]\npath_prefix = \"/extra\"\ngroup = \"demo\"\nupstream = \"web\"\ntimeout = \"5s\"\n"
    } else {
        ""
    };
    format!(
        r#"
[server]
shutdown_grace = "5s"
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "{heartbeat}"
data_streams = 2
{extra}
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#
    )
}

/// What a load run saw.
struct Outcome {
    sent: usize,
    failed: Vec<String>,
}

/// Sends GET `path` at RATE per second for `length`, each request bounded
/// by 5 s; a request counts as failed unless it gets 200.
async fn load(url: String, length: Duration) -> Outcome {
    let c = http_client();
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut running = JoinSet::new();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < length {
        tick.tick().await;
        sent += 1;
        let (c, url) = (c.clone(), url.clone());
        running.spawn(async move {
            let req = Request::get(url).body(empty()).unwrap();
            match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                Err(_) => Some("no answer within 5s".to_string()),
                Ok(Err(e)) => Some(format!("error: {e}")),
                Ok(Ok(r)) if r.status() == StatusCode::OK => {
                    use http_body_util::BodyExt;
                    match r.into_body().collect().await {
                        Ok(_) => None,
                        Err(e) => Some(format!("body cut: {e}")),
                    }
                }
                Ok(Ok(r)) => Some(format!("status {}", r.status())),
            }
        });
    }
    let mut failed = Vec::new();
    while let Some(r) = tokio::time::timeout(WAIT, running.join_next()).await.expect("requests end") {
        if let Some(f) = r.unwrap() {
            failed.push(f);
        }
    }
    Outcome { sent, failed }
}

fn client(server: &TestServer, id: &str, up: &Upstream) -> TestClient {
    TestClient::start(&client_toml(server, id, "demo", "t-demo", "", &[("web", up.url())]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_each_client_in_turn_fails_no_request() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("1s", false), None).await;
    let mut clients = [Some(client(&server, "edge-1", &up)), Some(client(&server, "edge-2", &up))];
    server.wait_streams(6).await;
    let traffic = tokio::spawn(load(server.url("/slow?ms=20"), Duration::from_secs(6)));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut restarts = Vec::new();
    for (i, id) in ["edge-1", "edge-2"].into_iter().enumerate() {
        let t = Instant::now();
        // SIGTERM, wait for the exit (the drain), start again: meanwhile the other client serves.
        clients[i].take().expect("running").stop().await;
        clients[i] = Some(client(&server, id, &up));
        server.wait_streams(6).await;
        restarts.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let out = traffic.await.unwrap();
    println!(
        "rolling restart of 2 clients under {RATE} req/s: {} requests, {} failed; restarts took {restarts:?}",
        out.sent,
        out.failed.len()
    );
    assert!(out.failed.is_empty(), "failed requests: {:?}", out.failed);
    assert!(out.sent >= 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_reloads_under_load_fail_no_request() {
    let up = Upstream::start("web").await;
    let cfg = ConfigFile::new(&server_toml("1s", false));
    let server = start_server(&server_toml("1s", false), Some(cfg.path.clone())).await;
    let _clients = [client(&server, "edge-1", &up), client(&server, "edge-2", &up)];
    server.wait_streams(6).await;
    let traffic = tokio::spawn(load(server.url("/slow?ms=20"), Duration::from_secs(5)));
    let mut applied = 0;
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Alternately a pushed setting and a rule change.
        cfg.write(&server_toml(if i % 2 == 0 { "2s" } else { "1s" }, i % 3 == 0));
        if matches!(
            tunnel_daemon::server::reload::reload_from_file(&server.shared),
            tunnel_daemon::server::reload::Reload::Applied(_)
        ) {
            applied += 1;
        }
    }
    let out = traffic.await.unwrap();
    println!("10 reloads under {RATE} req/s ({applied} applied): {} requests, {} failed", out.sent, out.failed.len());
    assert_eq!(applied, 10);
    assert!(out.failed.is_empty(), "failed requests: {:?}", out.failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_shutdown_lets_50_slow_requests_finish() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("1s", false), None).await;
    let _client = client(&server, "edge-1", &up);
    server.wait_streams(3).await;
    let c = http_client();
    let mut requests = JoinSet::new();
    for i in 0..50 {
        let (c, url) = (c.clone(), server.url(&format!("/slow?ms=1500&i={i}")));
        requests.spawn(async move { send(&c, Request::get(url).body(empty()).unwrap()).await.status });
    }
    let shared = server.shared.clone();
    eventually("50 requests in flight", WAIT, || {
        shared.registry.streams().iter().map(|s| s.in_flight).sum::<usize>() == 50
    })
    .await;
    let t = Instant::now();
    server.stop().await;
    let stopped = t.elapsed();
    let mut ok = 0;
    while let Some(r) = requests.join_next().await {
        if r.unwrap() == StatusCode::OK {
            ok += 1;
        }
    }
    println!("server shutdown with 50 slow requests in flight: {ok} of 50 got 200; the server stopped after {stopped:?} (grace 5s)");
    assert_eq!(ok, 50);
    assert!(stopped < Duration::from_secs(5) + Duration::from_secs(2), "stopped within the grace: {stopped:?}");
}

/// A client stopped with a request that outlasts its shutdown_grace cancels
/// it at the deadline: the public client gets 502 with the reason, the
/// upstream request is cancelled, and the client exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_grace_deadline_cancels_what_is_left() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("1s", false), None).await;
    let toml = client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())])
        .replace("shutdown_grace = \"5s\"", "shutdown_grace = \"1s\"");
    let client = TestClient::start(&toml);
    server.wait_streams(3).await;
    let url = server.url("/slow?ms=8000");
    let pending = tokio::spawn(async move { get(&url).await });
    let seen = up.seen.clone();
    eventually("the slow request reached the upstream", WAIT, || {
        seen.requests.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    let t = Instant::now();
    client.stop().await;
    let stopped = t.elapsed();
    let got = tokio::time::timeout(WAIT, pending).await.expect("answered in time").unwrap();
    let answered = t.elapsed();
    println!("client stop with an 8 s request in flight (grace 1s): exited after {stopped:?}, public answer {} after {answered:?}", got.status);
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(got.text().contains("shut down before the request finished"), "{}", got.text());
    assert!(stopped >= Duration::from_millis(900) && stopped < Duration::from_secs(3), "{stopped:?}");
    assert!(answered < Duration::from_secs(3), "{answered:?}");
    eventually("the upstream request cancelled", WAIT, || {
        seen.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1
    })
    .await;
    server.stop().await;
}

//! Prometheus metrics of both daemons, scraped over HTTP from the real
//! endpoints and parsed with a Prometheus text parser: the counters move
//! with traffic, reloads, refused registrations and upstream failures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::StatusCode;
use prometheus_parse::{Sample, Scrape, Value};
use std::net::SocketAddr;

const RULES: &str = r#"
[[rules]]
path_prefix = "/missing"
group = "demo"
upstream = "nowhere"
timeout = "5s"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web"
timeout = "5s"
"#;

async fn scrape(addr: SocketAddr) -> Vec<Sample> {
    let got = get(&format!("http://{addr}/metrics")).await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.headers["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
    let lines = got.text().lines().map(|l| Ok(l.to_string())).collect::<Vec<_>>();
    Scrape::parse(lines.into_iter()).expect("valid Prometheus text").samples
}

/// The value of the series `name` whose labels include all of `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.iter().find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))).map(|s| {
        match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        }
    })
}

#[tokio::test]
async fn both_daemons_count_what_happens() {
    let up = Upstream::start("web").await;
    let toml = demo_server_toml("metrics_listen = \"127.0.0.1:0\"", "", RULES);
    let cfg = ConfigFile::new(&toml);
    let server = start_server(&toml, Some(cfg.path.clone())).await;
    let [client_metrics] = free_ports();
    let extra = format!("metrics_listen = \"{client_metrics}\"");
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", &extra, &[("web", up.url())]));
    server.wait_streams(3).await;

    let c = http_client();
    for _ in 0..3 {
        let req = http::Request::post(server.url("/echo")).body(body("12345")).unwrap();
        assert_eq!(send(&c, req).await.status, StatusCode::OK);
    }
    assert_eq!(get(&server.url("/status/404")).await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&server.url("/missing")).await.status, StatusCode::BAD_GATEWAY);
    // A client with a wrong token is refused and counted.
    let intruder = TestClient::start(&client_toml(&server, "intruder", "demo", "wrong", "", &[]));
    // A reload of the unchanged file counts as ok; a broken file as failed.
    tunnel_daemon::server::reload::reload_from_file(&server.shared);
    cfg.write("[server\n");
    tunnel_daemon::server::reload::reload_from_file(&server.shared);
    cfg.write(&toml);

    let mut s = Vec::new();
    for _ in 0..100 {
        s = scrape(server.metrics).await;
        if value(&s, "tunnel_auth_failures_total", &[]).unwrap_or(0.0) >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(intruder);
    let demo = [("group", "demo")];
    assert_eq!(value(&s, "tunnel_requests_total", &[("group", "demo"), ("class", "2xx")]), Some(3.0));
    assert_eq!(value(&s, "tunnel_requests_total", &[("group", "demo"), ("class", "4xx")]), Some(1.0));
    assert_eq!(value(&s, "tunnel_requests_total", &[("group", "demo"), ("class", "5xx")]), Some(1.0));
    assert_eq!(value(&s, "tunnel_request_duration_seconds_count", &demo), Some(5.0));
    assert_eq!(value(&s, "tunnel_body_bytes_total", &[("group", "demo"), ("direction", "in")]), Some(15.0));
    assert!(value(&s, "tunnel_body_bytes_total", &[("group", "demo"), ("direction", "out")]).unwrap() >= 15.0);
    assert_eq!(value(&s, "tunnel_clients", &[]), Some(1.0));
    assert_eq!(value(&s, "tunnel_streams", &[("type", "data")]), Some(2.0));
    assert_eq!(value(&s, "tunnel_streams", &[("type", "control")]), Some(1.0));
    assert_eq!(value(&s, "tunnel_in_flight_requests", &[]), Some(0.0));
    let version = server.shared.group_version("demo").unwrap();
    assert_eq!(value(&s, "tunnel_config_info", &[("group", "demo"), ("version", version.as_str())]), Some(1.0));
    // (The file watcher may also have seen the broken file and its repair.)
    assert!(value(&s, "tunnel_config_reloads_total", &[("result", "ok")]).unwrap() >= 1.0);
    assert!(value(&s, "tunnel_config_reloads_total", &[("result", "failed")]).unwrap() >= 1.0);
    // Idle now: the gauges read zero, and nothing was reaped.
    assert_eq!(value(&s, "tunnel_outbound_queue_depth", &[]), Some(0.0));
    assert_eq!(value(&s, "tunnel_upgraded_connections", &[]), Some(0.0));
    assert_eq!(value(&s, "tunnel_streams_reaped_total", &[]), Some(0.0));
    assert!(value(&s, "tunnel_auth_failures_total", &[]).unwrap() >= 1.0);

    // The client: registrations, upstream timing and errors, heartbeats, config.
    let shared = server.shared.clone();
    eventually("a heartbeat round trip", WAIT, || shared.registry.streams().iter().any(|s| s.last_rtt_ms >= 0)).await;
    let s = scrape(server.metrics).await;
    assert!(value(&s, "tunnel_heartbeat_delay_seconds_count", &[]).unwrap() >= 1.0);
    let cs = scrape(client_metrics).await;
    assert_eq!(value(&cs, "tunnel_client_registrations_total", &[]), Some(3.0));
    assert_eq!(value(&cs, "tunnel_client_reconnects_total", &[]), Some(0.0));
    assert_eq!(value(&cs, "tunnel_client_upstream_duration_seconds_count", &[("upstream", "web")]), Some(4.0));
    let unknown = [("upstream", "nowhere"), ("kind", "unknown_upstream")];
    assert_eq!(value(&cs, "tunnel_client_upstream_errors_total", &unknown), Some(1.0));
    // What it served, as the server counts it (the unknown upstream's 502 is
    // the server's answer for no upstream of the client's).
    let served = |class| value(&cs, "tunnel_client_requests_total", &[("upstream", "web"), ("class", class)]);
    assert_eq!((served("2xx"), served("4xx"), served("5xx")), (Some(3.0), Some(1.0), None));
    assert!(value(&cs, "tunnel_client_heartbeat_rtt_seconds_count", &[]).unwrap() >= 1.0);
    assert_eq!(value(&cs, "tunnel_client_config_info", &[("version", version.as_str())]), Some(1.0));
    // Anything but /metrics is a 404.
    assert_eq!(get(&format!("http://{}/other", server.metrics)).await.status, StatusCode::NOT_FOUND);
}

/// A client that cannot reach its server counts each new attempt.
#[tokio::test]
async fn client_counts_reconnects_while_the_server_is_away() {
    let [nowhere, client_metrics] = free_ports();
    let toml = format!(
        "server = \"http://{nowhere}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"t\"\nreconnect_max = \"200ms\"\nmetrics_listen = \"{client_metrics}\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n"
    );
    let _client = TestClient::start(&toml);
    let mut reconnects = 0.0;
    for _ in 0..100 {
        if let Ok(Ok(_)) = tokio::time::timeout(WAIT, tokio::net::TcpStream::connect(client_metrics)).await {
            let cs = scrape(client_metrics).await;
            reconnects = value(&cs, "tunnel_client_reconnects_total", &[]).unwrap_or(0.0);
            if reconnects >= 3.0 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(reconnects >= 3.0, "reconnects counted: {reconnects}");
}

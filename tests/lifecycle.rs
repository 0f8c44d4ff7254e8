//! Streams over time: client death and restart, heartbeats and reaping,
//! config pushes and reloads, authentication, and malformed peer messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use http::{Request, StatusCode};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request as GrpcRequest;
use tunnel_lib::proto::tunnel_service_client::TunnelServiceClient;
use tunnel_lib::proto::{self, tunnel_message::Payload, Direction, StreamType, TunnelMessage};

const SERVER: &str = r#"
[server]
heartbeat_timeout = "3s"
shutdown_grace = "2s"
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
group = "demo"
upstream = "web"
timeout = "20s"
"#;

/// Killing a client mid-request gives the public side a 502 within 1 s; a
/// restarted client serves again without touching the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_gives_502_then_restart_recovers() {
    let up = Upstream::start("web").await;
    let server = start_server(SERVER, None).await;
    let toml = client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]);
    let client = TestClient::start(&toml);
    server.wait_streams(3).await;
    let c = http_client();
    let url = server.url("/slow?ms=10000");
    let pending = tokio::spawn(async move { send(&c, Request::get(url).body(empty()).unwrap()).await });
    let seen = up.seen.clone();
    eventually("request reached the upstream", WAIT, || seen.requests.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await;
    let killed = Instant::now();
    client.kill();
    let got = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    let took = killed.elapsed();
    assert_eq!(got.status, StatusCode::BAD_GATEWAY, "{}", got.text());
    assert_eq!(got.text(), "tunnel client disconnected\n");
    assert!(took < Duration::from_secs(1), "502 after {took:?}");
    println!("502 {took:?} after the client was killed");
    server.wait_streams(0).await;

    let _client = TestClient::start(&toml);
    server.wait_streams(3).await;
    let got = get(&server.url("/echo")).await;
    assert_eq!(got.status, StatusCode::OK);
    server.stop().await;
}

fn open_msg(stream_id: &str, seq: u64) -> TunnelMessage {
    let now = tunnel_lib::frame::now_ms();
    TunnelMessage {
        client_id: "raw".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        direction: Direction::ClientToServer as i32,
        trace_id: String::new(),
        payload: Some(Payload::StreamOpen(proto::StreamOpenRequest {
            client_id: "raw".into(),
            group: "demo".into(),
            version: "test".into(),
            stream_id: stream_id.into(),
            stream_type: StreamType::Http as i32,
            timestamp: now / 1000,
            timestamp_ms: now,
            sequence: seq,
            session_id: "raw-session".into(),
            config_version: String::new(),
            last_rtt_ms: -1,
            session_started_ms: 0,
            fleet_version: String::new(),
            // As a client that predates header blocks and link options.
            header_block: false,
            link_options: None,
            link_counters: None,
        })),
    }
}

fn authed<T>(msg: T, token: &str) -> GrpcRequest<T> {
    let mut r = GrpcRequest::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r.metadata_mut().insert("x-tunnel-group", "demo".parse().unwrap());
    r
}

/// A hand-driven Proxy stream: what we send, and what the server answers.
struct RawStream {
    tx: mpsc::Sender<TunnelMessage>,
    rx: tonic::Streaming<TunnelMessage>,
}

async fn raw_stream(server: &TestServer, stream_id: &str, token: &str) -> Result<RawStream, tonic::Status> {
    let mut grpc = TunnelServiceClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let (tx, rx) = mpsc::channel(16);
    tx.send(open_msg(stream_id, 0)).await.unwrap();
    let resp = grpc.proxy(authed(ReceiverStream::new(rx), token)).await?;
    Ok(RawStream { tx, rx: resp.into_inner() })
}

impl RawStream {
    async fn next(&mut self) -> TunnelMessage {
        tokio::time::timeout(WAIT, self.rx.message()).await.unwrap().unwrap().expect("stream open")
    }
}

/// Heartbeats update last_heartbeat per stream_id and are acknowledged with
/// echoed timestamps; a stream that stops heartbeating is removed after the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_reaping() {
    let up = Upstream::start("web").await;
    let server = start_server(SERVER, None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    // Every stream of the real client heartbeats on its own (interval 1s, pushed by the server).
    let shared = server.shared.clone();
    eventually("each stream has heartbeated twice", WAIT, || {
        shared.registry.streams().iter().all(|s| s.heartbeats >= 2 && s.heartbeat_age < Duration::from_millis(1500))
    })
    .await;

    // A raw stream: registered, acknowledged, then silent.
    let mut raw = raw_stream(&server, "silent-stream", "t-demo").await.unwrap();
    match raw.next().await.payload {
        Some(Payload::StreamOpenResponse(ack)) => {
            assert!(ack.accepted);
            assert_eq!(ack.stream_id, "silent-stream");
            assert!(!ack.server_id.is_empty());
            assert!(ack.echo_timestamp_ms > 0);
        }
        other => panic!("expected an acknowledgement, got {other:?}"),
    }
    raw.tx.send(open_msg("silent-stream", 1)).await.unwrap();
    match raw.next().await.payload {
        Some(Payload::StreamOpenResponse(ack)) => assert_eq!(ack.sequence, 1),
        other => panic!("expected a heartbeat acknowledgement, got {other:?}"),
    }
    let find = |id: &str| shared.registry.streams().into_iter().find(|s| s.stream_id == id);
    assert_eq!(find("silent-stream").unwrap().heartbeats, 1);
    let silent_since = Instant::now();
    eventually("silent stream reaped", WAIT, || find("silent-stream").is_none()).await;
    let took = silent_since.elapsed();
    assert!(took >= Duration::from_millis(2500), "reaped too early: {took:?}");
    println!("silent stream reaped after {took:?} (timeout 3s)");
    // The real client's streams, which heartbeat, are untouched.
    assert_eq!(shared.registry.streams().len(), 3);
    server.stop().await;
}

/// A client with a wrong token is refused and nothing is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused() {
    let server = start_server(SERVER, None).await;
    let err = raw_stream(&server, "s", "wrong").await.err().expect("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let client = TestClient::start(&client_toml(&server, "edge-bad", "demo", "wrong", "", &[]));
    let mut status = client.status.clone();
    // It keeps trying (sessions count up) and never registers.
    tokio::time::timeout(WAIT, status.wait_for(|s| s.sessions >= 2)).await.unwrap().unwrap();
    assert_eq!(status.borrow().registered_streams, 0);
    assert!(server.shared.registry.streams().is_empty());
    assert!(server.shared.registry.clients().is_empty());
    server.stop().await;
}

/// Malformed messages (no payload, unknown request_id, frames out of order,
/// wrong direction) are logged and dropped; the stream and others carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dropped() {
    let up = Upstream::start("web").await;
    let server = start_server(SERVER, None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let mut raw = raw_stream(&server, "raw-stream", "t-demo").await.unwrap();
    raw.next().await; // registration ack
    let base = |payload: Option<Payload>, request_id: &str| TunnelMessage {
        client_id: "raw".into(),
        request_id: request_id.into(),
        direction: Direction::ClientToServer as i32,
        trace_id: String::new(),
        payload,
    };
    let junk = vec![
        base(None, "x"),
        base(Some(Payload::Body(proto::BodyChunk { data: "orphan".into() })), "unknown-id"),
        base(Some(Payload::End(proto::BodyEnd::default())), "unknown-id"),
        base(Some(Payload::HttpResponse(proto::HttpResponse { status: 200, ..Default::default() })), "unknown-id"),
        base(Some(Payload::WindowUpdate(proto::WindowUpdate { credit: u32::MAX })), "unknown-id"),
        base(Some(Payload::HttpRequest(proto::HttpRequest::default())), "wrong-kind"),
        TunnelMessage { direction: Direction::ServerToClient as i32, ..open_msg("raw-stream", 5) },
    ];
    for m in junk {
        raw.tx.send(m).await.unwrap();
    }
    // The stream is still served: a heartbeat after the junk is acknowledged.
    raw.tx.send(open_msg("raw-stream", 9)).await.unwrap();
    match raw.next().await.payload {
        Some(Payload::StreamOpenResponse(ack)) => assert_eq!(ack.sequence, 9),
        other => panic!("expected the heartbeat acknowledgement, got {other:?}"),
    }
    // An exchange sent to the raw stream that gets frames out of order fails
    // alone (502), and requests through the real client are unaffected.
    let shared = server.shared.clone();
    for s in shared.registry.streams() {
        if s.client_id == "edge-1" {
            // Only the raw stream can be picked.
            shared.registry.remove(&s.stream_id);
        }
    }
    let url = server.url("/echo");
    let pending = tokio::spawn(async move { get(&url).await });
    let req = loop {
        let m = raw.next().await;
        if let Some(Payload::HttpRequest(_)) = m.payload {
            break m;
        }
    };
    // Body before head: out of order.
    raw.tx.send(base(Some(Payload::Body(proto::BodyChunk { data: "early".into() })), &req.request_id)).await.unwrap();
    let got = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    assert_eq!(got.status, StatusCode::BAD_GATEWAY);
    assert!(got.text().starts_with("tunnel protocol error: body frame before the exchange's head"), "{}", got.text());
    server.stop().await;
}

/// A client that does not announce header blocks is sent its heads' headers
/// listed; a block in a client's response head reaches the public client,
/// and a block that does not parse fails that exchange alone with a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_blocks_only_to_clients_that_read_them() {
    let server = start_server(SERVER, None).await;
    let mut raw = raw_stream(&server, "raw-stream", "t-demo").await.unwrap();
    raw.next().await; // registration ack
    let reply = |request_id: &str, block: &'static [u8]| TunnelMessage {
        client_id: "raw".into(),
        request_id: request_id.into(),
        direction: Direction::ClientToServer as i32,
        trace_id: String::new(),
        payload: Some(Payload::HttpResponse(proto::HttpResponse {
            status: 200,
            end_of_stream: true,
            header_block: bytes::Bytes::from_static(block),
            ..Default::default()
        })),
    };
    for (block, want) in
        [(&b"x-from-block:yes\nx-two:a:b\n"[..], StatusCode::OK), (b"bad name:1\n", StatusCode::BAD_GATEWAY)]
    {
        let url = server.url("/echo");
        let pending = tokio::spawn(async move { get(&url).await });
        let (request_id, head) = loop {
            let m = raw.next().await;
            if let Some(Payload::HttpRequest(head)) = m.payload {
                break (m.request_id, head);
            }
        };
        assert!(head.header_block.is_empty(), "no block to a client that did not ask for one");
        assert!(head.headers.iter().any(|h| h.name == "x-forwarded-for"), "{:?}", head.headers);
        raw.tx.send(reply(&request_id, block)).await.unwrap();
        let got = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
        assert_eq!(got.status, want, "{}", got.text());
        if want == StatusCode::OK {
            assert_eq!(got.headers["x-from-block"], "yes");
            assert_eq!(got.headers["x-two"], "a:b");
        } else {
            assert!(got.text().contains("invalid header"), "{}", got.text());
        }
    }
    server.stop().await;
}

/// A config change on disk reaches a connected client without a restart; an
/// invalid change is refused and the old config keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reload_pushes_to_clients_and_refuses_invalid() {
    let file = ConfigFile::new(SERVER);
    let up = Upstream::start("web").await;
    let server = start_server(SERVER, Some(file.path.clone())).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let mut status = client.status.clone();
    let first = config_version(&mut status, |v| !v.is_empty()).await;

    // Valid change: 3 data streams instead of 2.
    file.write(&SERVER.replace("data_streams = 2", "data_streams = 3"));
    let second = config_version(&mut status, |v| v != first).await;
    server.wait_streams(4).await;
    let shared = server.shared.clone();
    eventually("server sees the client acknowledge the new version", WAIT, || {
        shared.registry.clients().first().is_some_and(|c| c.config_version == second)
    })
    .await;

    // Invalid change: refused, old config keeps serving.
    file.write(&SERVER.replace("data_streams = 2", "data_streams = \"many\""));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status.borrow().config_version, second);
    assert_eq!(server.shared.config().groups[0].data_streams, 3);
    let got = get(&server.url("/echo")).await;
    assert_eq!(got.status, StatusCode::OK);
    server.stop().await;
}

/// A graceful client stop lets its in-flight request finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_client_stop_finishes_in_flight() {
    let up = Upstream::start("web").await;
    let server = start_server(SERVER, None).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let url = server.url("/slow?ms=1000");
    let pending = tokio::spawn(async move { get(&url).await });
    let seen = up.seen.clone();
    eventually("request reached the upstream", WAIT, || seen.requests.load(std::sync::atomic::Ordering::SeqCst) == 1)
        .await;
    client.stop().await;
    let got = tokio::time::timeout(WAIT, pending).await.unwrap().unwrap();
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.text(), "slow done");
    server.stop().await;
}

/// The unary ConfigSync RPC answers the group's config and version to its
/// token holders, names the upstreams the caller lacks, and refuses others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_config_sync() {
    let server = start_server(SERVER, None).await;
    let mut grpc = TunnelServiceClient::connect(format!("http://{}", server.grpc)).await.unwrap();
    let ask = |upstreams: Vec<String>| proto::ConfigSyncRequest {
        client_id: "tool".into(),
        group: "demo".into(),
        config_version: String::new(),
        upstreams,
    };
    let err = grpc.config_sync(authed(ask(vec![]), "wrong")).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let resp = grpc.config_sync(authed(ask(vec![]), "t-demo")).await.unwrap().into_inner();
    let (version, cfg) = server.shared.config().group_sync("demo").unwrap();
    assert_eq!(resp.config_version, version);
    assert_eq!(resp.config.as_ref(), Some(&cfg));
    assert_eq!(cfg.heartbeat_interval_ms, 1000);
    assert_eq!(resp.missing_upstreams, ["web"]);
    let resp = grpc.config_sync(authed(ask(vec!["web".into()]), "t-demo")).await.unwrap().into_inner();
    assert!(resp.missing_upstreams.is_empty());
    server.stop().await;
}

/// A public connection that never sends a request is closed after
/// header_read_timeout, even before hyper knows its protocol.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_public_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let server = start_server(&SERVER.replace("[server]", "[server]\nheader_read_timeout = \"1s\""), None).await;
    let mut tcp = tokio::net::TcpStream::connect(server.http).await.unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "closed without a response");
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "closed after {took:?}");
    server.stop().await;
}

/// Rotating a group's token on reload closes the streams opened with the old one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotation_disconnects_old_token_holders() {
    let file = ConfigFile::new(SERVER);
    let server = start_server(SERVER, Some(file.path.clone())).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[]));
    server.wait_streams(3).await;
    file.write(&SERVER.replace("t-demo", "t-rotated"));
    server.wait_streams(0).await;
    // It keeps retrying with the old token and stays out.
    let mut status = client.status.clone();
    let sessions = status.borrow().sessions;
    tokio::time::timeout(WAIT, status.wait_for(|s| s.sessions >= sessions + 2)).await.unwrap().unwrap();
    assert!(server.shared.registry.streams().is_empty());
    server.stop().await;
}

/// A client id already connected in one group cannot be taken over from another group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_is_not_taken_over_across_groups() {
    let toml = format!("{SERVER}\n[[groups]]\nname = \"other\"\ntoken = \"t-other\"\nheartbeat_interval = \"1s\"\n");
    let server = start_server(&toml, None).await;
    let _owner = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[]));
    server.wait_streams(3).await;
    let intruder = TestClient::start(&client_toml(&server, "edge-1", "other", "t-other", "", &[]));
    let mut status = intruder.status.clone();
    tokio::time::timeout(WAIT, status.wait_for(|s| s.sessions >= 2)).await.unwrap().unwrap();
    let streams = server.shared.registry.streams();
    assert_eq!(streams.len(), 3);
    assert!(streams.iter().all(|s| s.group == "demo"));
    server.stop().await;
}

//! The introspection service, called directly: authorization, Watch
//! snapshots and deltas, ForceResync, CloseStream, CloseClient, health.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Request;
use tunnel_lib::introspection::introspection_client::IntrospectionClient;
use tunnel_lib::introspection::{
    CloseClientRequest, CloseStreamRequest, ForceResyncRequest, GetCaptureRequest, ReplayRequest, WatchRequest,
    WatchUpdate,
};
use tunnel_lib::proto::StreamType;

fn server_toml(push: &str, token: Option<&str>) -> String {
    let token = token.map(|t| format!("admin_token = \"{t}\"")).unwrap_or_default();
    format!(
        r#"
[server]
config_push = "{push}"
{token}
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
group = "demo"
upstream = "web"
"#
    )
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

async fn admin(server: &TestServer) -> IntrospectionClient<Channel> {
    IntrospectionClient::connect(format!("http://{}", server.admin)).await.unwrap()
}

/// The server's link options as its first Watch update says.
async fn view_server_tuning(c: &mut IntrospectionClient<Channel>) -> Vec<tunnel_lib::introspection::LinkOptionState> {
    let mut s = c.watch(WatchRequest::default()).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, s.message()).await.unwrap().unwrap().unwrap();
    first.server.map(|s| s.link_tuning).unwrap_or_default()
}

/// Holds the state a watcher builds from updates, as the console does.
#[derive(Default)]
struct View {
    clients: std::collections::HashMap<String, tunnel_lib::introspection::ClientInfo>,
    streams: std::collections::HashMap<String, tunnel_lib::introspection::StreamInfo>,
    requests: Vec<tunnel_lib::introspection::RequestInfo>,
    updates: usize,
}

impl View {
    fn apply(&mut self, u: WatchUpdate) {
        if u.full {
            self.clients.clear();
            self.streams.clear();
        }
        for c in u.clients {
            self.clients.insert(c.client_id.clone(), c);
        }
        for id in u.removed_clients {
            self.clients.remove(&id);
        }
        for s in u.streams {
            self.streams.insert(s.stream_id.clone(), s);
        }
        for id in u.removed_streams {
            self.streams.remove(&id);
        }
        self.requests.extend(u.requests);
        self.updates += 1;
    }
}

/// Reads updates into `view` until `done` holds, within WAIT.
async fn watch_until(
    stream: &mut tonic::Streaming<WatchUpdate>,
    view: &mut View,
    what: &str,
    done: impl Fn(&View) -> bool,
) {
    tokio::time::timeout(WAIT, async {
        while !done(view) {
            let u = stream.message().await.unwrap().expect("watch stream open");
            view.apply(u);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for: {what}"));
}

/// With an admin token configured, calls without it or with a wrong one are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_set() {
    let server = start_server(&server_toml("auto", Some("s3cret")), None).await;
    let mut c = admin(&server).await;
    let err = c.watch(WatchRequest::default()).await.expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = c.watch(with_token(WatchRequest::default(), "wrong")).await.expect_err("wrong token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err =
        c.close_stream(with_token(CloseStreamRequest { stream_id: "x".into() }, "nope")).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let mut s = c.watch(with_token(WatchRequest::default(), "s3cret")).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, s.message()).await.unwrap().unwrap().unwrap();
    assert!(first.full);
    assert_eq!(first.server.unwrap().groups[0].name, "demo");
    server.stop().await;
}

/// Watch sends a full snapshot of streams and clients, then deltas with new
/// requests and advancing heartbeats; the standard health service answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_streams_clients_and_requests() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("auto", None), None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let mut c = admin(&server).await;
    let mut s = c.watch(WatchRequest { max_updates_per_second: 10, heads: true }).await.unwrap().into_inner();
    let mut view = View::default();
    watch_until(&mut s, &mut view, "three streams", |v| v.streams.len() == 3).await;
    let control = view.streams.values().filter(|s| s.stream_type == StreamType::Control as i32).count();
    assert_eq!(control, 1);
    let client = &view.clients["edge-1"];
    assert_eq!(client.group, "demo");
    assert_eq!(client.streams, 3);
    assert!(!client.config_version_current.is_empty());
    let first_beats: u64 = view.streams.values().map(|s| s.heartbeats).sum();

    let got = get(&server.url("/echo?from-test")).await;
    assert_eq!(got.status, http::StatusCode::OK);
    watch_until(&mut s, &mut view, "the request recorded", |v| v.requests.iter().any(|r| r.path == "/echo")).await;
    let r = view.requests.iter().find(|r| r.path == "/echo").unwrap();
    assert_eq!((r.method.as_str(), r.status, r.client_id.as_str()), ("GET", 200, "edge-1"));
    assert!(view.streams.contains_key(&r.stream_id));
    assert!(!r.trace_id.is_empty());
    // Its head came with it: the URI as received, the headers in order, timings.
    let head = r.head.clone().expect("heads asked for");
    assert_eq!((head.uri.as_str(), head.scheme.as_str()), ("/echo?from-test", "http"));
    assert!(head.request_headers.iter().any(|h| h.name == "host"), "{head:?}");
    assert!(!head.response_headers.is_empty() && !head.bodies, "{head:?}");
    assert!(0 < head.routed_us && head.routed_us <= head.sent_us && head.sent_us <= head.response_us, "{head:?}");

    // GetCapture has it by id; Replay sends it again (GET: no confirmation
    // needed) and answers with the new request, which names the old.
    let cap = c.get_capture(GetCaptureRequest { request_id: r.request_id.clone() }).await.unwrap().into_inner();
    assert_eq!(cap.request.as_ref().map(|q| q.path.as_str()), Some("/echo"));
    let again = c.replay(ReplayRequest { request_id: r.request_id.clone(), force: false }).await.unwrap().into_inner();
    let new = again.request.expect("the replay's record");
    assert_eq!((new.status, new.replay_of.as_str()), (200, r.request_id.as_str()));
    assert_ne!(new.request_id, r.request_id);
    assert_eq!(new.head.map(|h| h.uri), Some("/echo?from-test".to_string()));
    // A POST whose rule keeps no bodies: refused without force, with the reason.
    let post = http::Request::post(server.url("/echo")).body(body("payload")).unwrap();
    assert_eq!(send(&http_client(), post).await.status, http::StatusCode::OK);
    watch_until(&mut s, &mut view, "the POST recorded", |v| v.requests.iter().any(|r| r.method == "POST")).await;
    let posted = view.requests.iter().find(|r| r.method == "POST").unwrap().request_id.clone();
    let refused = c.replay(ReplayRequest { request_id: posted, force: false }).await.expect_err("needs confirming");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("not idempotent"), "{}", refused.message());
    let missing = c.get_capture(GetCaptureRequest { request_id: "nope".into() }).await.expect_err("unknown id");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    watch_until(&mut s, &mut view, "heartbeats advance", |v| {
        v.streams.values().map(|s| s.heartbeats).sum::<u64>() >= first_beats + 3
    })
    .await;
    assert!(view.streams.values().any(|s| s.last_rtt_ms >= 0), "round trips reported");
    // Each stream names its link connection as both ends' sockets count it
    // (the client's in its heartbeats), and the client sums its
    // connections; both ends' options (the short timers where the kernel
    // has them).
    watch_until(&mut s, &mut view, "link counters from both ends", |v| {
        v.clients.get("edge-1").and_then(|c| c.link.as_ref()).is_some_and(|l| {
            l.server.as_ref().is_some_and(|c| c.bytes_sent > 0) && l.client.as_ref().is_some_and(|c| c.bytes_sent > 0)
        })
    })
    .await;
    let client = &view.clients["edge-1"];
    let link = client.link.clone().unwrap();
    assert!(link.server.as_ref().is_some_and(|c| c.rtt_us > 0), "{client:?}");
    let server_end = link.server_options.expect("server's options");
    let client_end = client.client_link_options.clone().expect("client's options");
    if tunnel_daemon::tunnel::tuning::support().rto_min {
        for end in [&server_end, &client_end] {
            // 8 ms rounds up to the kernel's tick (10 ms at HZ=100).
            assert!(end.rto_min_us == 20_000 && (8_000..=10_000).contains(&end.delack_max_us), "{client:?}");
        }
    }
    assert_eq!((server_end.notsent_lowat, client_end.notsent_lowat), (128 << 10, 128 << 10), "{client:?}");
    assert!(view.streams.values().all(|s| s.link.is_some() && s.client_link_options.is_some()));
    let tuning = view_server_tuning(&mut c).await;
    assert!(tuning.iter().any(|o| o.option == "rto_min" && o.value == "20ms"), "{tuning:?}");

    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.admin)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let resp = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(resp.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    // Reflection lists our services, so grpcurl and friends can talk to the server.
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = reflection.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let services = match resp.message().await.unwrap().unwrap().message_response {
        Some(MessageResponse::ListServicesResponse(l)) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
        other => panic!("unexpected reflection answer {other:?}"),
    };
    assert!(services.contains(&"tunnel.introspection.v1.Introspection".to_string()), "{services:?}");
    assert!(services.contains(&"grpc.health.v1.Health".to_string()), "{services:?}");
    server.stop().await;
}

/// With manual pushes, a changed config reaches a client only when forced:
/// ForceResync sends it and the client's acknowledged version follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_resync_pushes_config() {
    let text = server_toml("manual", None);
    let file = ConfigFile::new(&text);
    let up = Upstream::start("web").await;
    let server = start_server(&text, Some(file.path.clone())).await;
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let mut status = client.status.clone();
    let v1 = config_version(&mut status, |v| !v.is_empty()).await;

    file.write(&text.replace("heartbeat_interval = \"1s\"", "heartbeat_interval = \"2s\""));
    let shared = server.shared.clone();
    eventually("server reloaded", WAIT, || shared.group_version("demo").is_some_and(|v| v != v1)).await;
    let v2 = shared.group_version("demo").unwrap();
    // Manual: nothing reaches the client on its own, even across heartbeats.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(status.borrow().config_version, v1);

    let mut c = admin(&server).await;
    let err = c
        .force_resync(ForceResyncRequest { client_id: "nobody".into(), group: String::new() })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
    let resp = c
        .force_resync(ForceResyncRequest { client_id: "edge-1".into(), group: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.config_version.as_str(), resp.clients), (v2.as_str(), 1));
    tokio::time::timeout(Duration::from_secs(2), status.wait_for(|s| s.config_version == v2)).await.unwrap().unwrap();
    eventually("the server sees the new version acknowledged", Duration::from_secs(2), || {
        shared.registry.clients().first().is_some_and(|c| c.config_version == v2)
    })
    .await;
    let resp = c
        .force_resync(ForceResyncRequest { client_id: String::new(), group: "demo".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.clients, 1);
    server.stop().await;
}

/// CloseStream closes one stream and the client opens a replacement;
/// CloseClient closes them all and the client reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_stream_and_client() {
    let up = Upstream::start("web").await;
    let server = start_server(&server_toml("auto", None), None).await;
    let _client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    let shared = server.shared.clone();
    let data = shared.registry.streams().into_iter().find(|s| s.stream_type == StreamType::Http).unwrap();
    let mut c = admin(&server).await;
    c.close_stream(CloseStreamRequest { stream_id: data.stream_id.clone() }).await.unwrap();
    eventually("replacement data stream", WAIT, || {
        let s = shared.registry.streams();
        s.len() == 3 && s.iter().all(|x| x.stream_id != data.stream_id)
    })
    .await;
    let err = c.close_stream(CloseStreamRequest { stream_id: data.stream_id.clone() }).await.expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound);

    let before: Vec<String> = shared.registry.streams().into_iter().map(|s| s.stream_id).collect();
    let resp = c.close_client(CloseClientRequest { client_id: "edge-1".into() }).await.unwrap().into_inner();
    assert_eq!(resp.streams_closed, 3);
    eventually("client reconnected with new streams", WAIT, || {
        let s = shared.registry.streams();
        s.len() == 3 && s.iter().all(|x| !before.contains(&x.stream_id))
    })
    .await;
    assert_eq!(get(&server.url("/echo")).await.status, http::StatusCode::OK);
    server.stop().await;
}

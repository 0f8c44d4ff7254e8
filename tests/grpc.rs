//! HTTP/2 end to end: a real tonic gRPC client calling a real tonic server
//! through the tunnel's public h2c listener and an h2c upstream (unary,
//! server streaming, error status), trailers both ways, and routing on
//! `:authority`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};

mod echo {
    tonic::include_proto!("echo.v1");
}
use echo::echo_client::EchoClient;
use echo::echo_server::{Echo, EchoServer};
use echo::{CountRequest, EchoReply, EchoRequest};

struct EchoService;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let tag = req.metadata().get("x-tag").cloned();
        let message = req.into_inner().message;
        if message == "missing" {
            return Err(Status::not_found("no such thing: missing"));
        }
        let mut resp = Response::new(EchoReply { message, n: 1 });
        if let Some(tag) = tag {
            resp.metadata_mut().insert("x-tag-seen", tag);
        }
        Ok(resp)
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn count(&self, req: Request<CountRequest>) -> Result<Response<Self::CountStream>, Status> {
        let n = req.into_inner().n;
        let replies = tokio_stream::iter((0..n).map(|i| Ok(EchoReply { message: format!("reply {i}"), n: i })));
        Ok(Response::new(Box::pin(replies)))
    }
}

async fn start_grpc_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Ends with the test's runtime.
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    addr
}

const RULES: &str = r#"
[[rules]]
host = "grpc.test"
path_prefix = "/"
group = "demo"
upstream = "grpc"
timeout = "5s"
[[rules]]
path_prefix = "/"
group = "demo"
upstream = "web2"
timeout = "5s"
"#;

struct Tunnel {
    server: TestServer,
    _client: TestClient,
    grpc: SocketAddr,
    _web: Upstream,
}

async fn tunnel() -> Tunnel {
    let grpc = start_grpc_upstream().await;
    let web = Upstream::start("web2").await;
    let server = start_server(&demo_server_toml("", "", RULES), None).await;
    let upstreams = [
        ("grpc", format!("{{ url = \"http://{grpc}\", http2 = true }}")),
        ("web2", format!("{{ url = \"{}\", http2 = true }}", web.url())),
    ];
    let client = TestClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &upstreams));
    server.wait_streams(3).await;
    Tunnel { server, _client: client, grpc, _web: web }
}

/// A gRPC client to `addr` that names `grpc.test:443` as its authority, as a
/// client resolving that name to the tunnel would.
async fn grpc_client(addr: SocketAddr, authority: &str) -> EchoClient<Channel> {
    let ep = Endpoint::from_shared(format!("http://{addr}")).unwrap().origin(authority.parse().unwrap());
    EchoClient::new(tokio::time::timeout(WAIT, ep.connect()).await.expect("connect in time").unwrap())
}

async fn unary(c: &mut EchoClient<Channel>, message: &str) -> Result<(String, Option<String>), (Code, String)> {
    let mut req = Request::new(EchoRequest { message: message.into() });
    req.metadata_mut().insert("x-tag", "t-1".parse().unwrap());
    match tokio::time::timeout(WAIT, c.unary(req)).await.expect("answer in time") {
        Ok(r) => {
            let tag = r.metadata().get("x-tag-seen").and_then(|v| v.to_str().ok()).map(str::to_string);
            Ok((r.into_inner().message, tag))
        }
        Err(s) => Err((s.code(), s.message().to_string())),
    }
}

async fn count(c: &mut EchoClient<Channel>, n: u64) -> Vec<(String, u64)> {
    tokio::time::timeout(WAIT, async {
        let mut stream = c.count(CountRequest { n }).await.unwrap().into_inner();
        let mut got = Vec::new();
        while let Some(r) = stream.next().await {
            let r = r.unwrap();
            got.push((r.message, r.n));
        }
        got
    })
    .await
    .expect("stream in time")
}

#[tokio::test]
async fn grpc_through_the_tunnel_answers_exactly_as_direct() {
    let t = tunnel().await;
    let mut direct = grpc_client(t.grpc, "http://grpc.test").await;
    // Routed on :authority, its port ignored.
    let mut tunneled = grpc_client(t.server.http, "http://grpc.test:443").await;

    let want = unary(&mut direct, "hello").await;
    assert_eq!(want, Ok(("hello".to_string(), Some("t-1".to_string()))));
    assert_eq!(unary(&mut tunneled, "hello").await, want, "unary, with metadata both ways");

    let want = unary(&mut direct, "missing").await;
    assert_eq!(want, Err((Code::NotFound, "no such thing: missing".to_string())));
    assert_eq!(unary(&mut tunneled, "missing").await, want, "error status and message");

    let want = count(&mut direct, 1000).await;
    assert_eq!(want.len(), 1000);
    assert_eq!(count(&mut tunneled, 1000).await, want, "server streaming of 1000 messages");
}

#[tokio::test]
async fn trailers_cross_the_tunnel_both_ways() {
    let t = tunnel().await;
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first "))),
        Ok(Frame::data(Bytes::from_static(b"second"))),
        Ok(Frame::trailers(trailers)),
    ];
    let req = http::Request::post(t.server.url("/trailers"))
        .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
        .unwrap();
    let resp = tokio::time::timeout(WAIT, h2c_client().request(req)).await.expect("in time").unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let collected = tokio::time::timeout(WAIT, resp.into_body().collect()).await.expect("in time").unwrap();
    let got_trailers = collected.trailers().cloned().expect("response trailers arrive");
    assert_eq!(collected.to_bytes(), "first second");
    assert_eq!(got_trailers["x-body-bytes"], "12");
    assert_eq!(got_trailers["x-got-checksum"], "abc123", "the request's trailer reached the upstream");
}

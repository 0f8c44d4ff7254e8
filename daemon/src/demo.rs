//! `tunnel-server --demo`: the whole product on loopback in one process, with
//! built-in defaults: a server, a client and a small demo upstream.

use crate::client::Client;
use crate::server::{Listeners, Server};
use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::future::Future;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tunnel_lib::config::{ClientConfig, ServerConfig};

/// Answers `/` with a greeting naming the request, and echoes bodies sent to `/echo`.
async fn demo_handler(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let summary = format!(
        "hello from the demo upstream, through the tunnel\n{} {} (host {:?}, x-forwarded-for {:?})\n",
        req.method(),
        req.uri(),
        req.headers().get("host").and_then(|v| v.to_str().ok()).unwrap_or(""),
        req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()).unwrap_or(""),
    );
    if req.uri().path() == "/echo" {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Ok(Response::new(Full::new(body)));
    }
    Ok(Response::new(Full::new(Bytes::from(summary))))
}

/// Serves the demo upstream on `listener` until `stop` fires.
pub async fn serve_upstream(listener: TcpListener, stop: CancellationToken) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok((tcp, _)) => tcp, Err(_) => continue },
        };
        let stop = stop.clone();
        tokio::spawn(async move {
            let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(demo_handler))
                .into_owned();
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

/// Runs server, client and demo upstream until `shutdown` resolves.
pub async fn run(shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let token = format!("demo-{}", uuid::Uuid::new_v4().simple());
    let server_cfg = ServerConfig::from_str_named(
        &format!(
            r#"
[server]
shutdown_grace = "2s"
[[groups]]
name = "demo"
token = "{token}"
heartbeat_interval = "5s"
[[rules]]
group = "demo"
upstream = "web"
timeout = "30s"
"#
        ),
        "built-in demo server config",
    )?;
    let listeners = Listeners::bind(&server_cfg)
        .await
        .context("the demo uses 127.0.0.1:8080, 7000 and 7001; free them or use --config")?;
    let (http_addr, grpc_addr, admin_addr) = listeners.addrs()?;
    let upstream = TcpListener::bind("127.0.0.1:0").await?;
    let upstream_addr = upstream.local_addr()?;
    let client_cfg = ClientConfig::from_str_named(
        &format!(
            r#"
server = "http://{grpc_addr}"
client_id = "demo-client"
group = "demo"
token = "{token}"
shutdown_grace = "2s"
[upstreams]
web = "http://{upstream_addr}"
"#
        ),
        "built-in demo client config",
    )?;
    let stop = CancellationToken::new();
    let up = tokio::spawn(serve_upstream(upstream, stop.clone()));
    let server = tokio::spawn(Server::new(server_cfg, None).run(listeners, stop.clone().cancelled_owned()));
    let client = Client::new(client_cfg);
    let mut status = client.status();
    let client = tokio::spawn(client.run(stop.clone().cancelled_owned()));
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(10), status.wait_for(|s| s.registered_streams >= 3)).await;
    println!("\nTunnel demo running: server {http_addr} (public) / {grpc_addr} (gRPC) / {admin_addr} (admin), client \"demo-client\", demo upstream {upstream_addr}.");
    println!(
        "Try:\n  curl http://{http_addr}/hello\n  curl --data 'round trip' http://{http_addr}/echo\nWatch it live:\n  cargo run --release --bin tunnel-tui -- --server {admin_addr}\nCtrl-C stops it.\n"
    );
    shutdown.await;
    stop.cancel();
    let _ = client.await;
    let _ = server.await;
    let _ = up.await;
    Ok(())
}

//! The bench's own upstream: small, slow and bulk responses, and a sink.

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

type Body = BoxBody<Bytes, Infallible>;

/// A running upstream; `stop` ends it.
pub struct Upstream {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Upstream {
    pub fn stop(self) {
        self.task.abort();
    }
}

fn param(req: &Request<Incoming>, key: &str) -> u64 {
    req.uri()
        .query()
        .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse().ok()))
        .unwrap_or(0)
}

async fn handle(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    static BLOCK: [u8; 65536] = [b'x'; 65536];
    let small = || Full::new(Bytes::from_static(&BLOCK[..100])).boxed();
    Ok(match req.uri().path() {
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(param(&req, "ms"))).await;
            Response::new(small())
        }
        "/bytes" => {
            let n = param(&req, "n") as usize;
            let chunks = (0..n.div_ceil(BLOCK.len())).map(move |i| {
                let len = (n - i * BLOCK.len()).min(BLOCK.len());
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(&BLOCK[..len])))
            });
            let mut r = Response::new(StreamBody::new(tokio_stream::iter(chunks)).boxed());
            r.headers_mut().insert(http::header::CONTENT_LENGTH, n.into());
            r
        }
        "/sink" | "/upload" => {
            let mut body = req.into_body();
            let mut n = 0usize;
            while let Some(Ok(f)) = body.frame().await {
                n += f.data_ref().map_or(0, |d| d.len());
            }
            Response::new(Full::new(Bytes::from(n.to_string())).boxed())
        }
        _ => Response::new(small()),
    })
}

/// Starts the upstream on 127.0.0.1 with a port of the system's choosing.
pub async fn start() -> anyhow::Result<Upstream> {
    start_on("127.0.0.1:0".parse()?).await
}

/// Starts the upstream on `addr` (again, after a `stop`: the soak restarts it).
pub async fn start_on(addr: SocketAddr) -> anyhow::Result<Upstream> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let _ = tcp.set_nodelay(true);
            conns.spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), hyper::service::service_fn(handle))
                    .await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    Ok(Upstream { addr, task })
}

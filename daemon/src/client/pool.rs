//! Kept-alive HTTP/1.1 connections to the upstreams, on hyper's connection
//! API.
//!
//! hyper_util's pooled client cost about 9k instructions per small request
//! here, plus a task spawned per request to watch the connection go idle
//! (issue 20, docs/benchmarks.md section 8). Our use is narrower: plain
//! `http://` upstreams, origin-form requests, and a caller that always reads
//! a response's body to its end before it hands the connection back. So a
//! connection goes back to its upstream's idle list as soon as its response
//! ended, and the next request waits the moment it may take the connection
//! to see the end too.

use http::{header, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections kept per upstream at most; past it they are closed.
const MAX_IDLE: usize = 256;
/// How long a connection just handed back may take to be ready again (its
/// response's end seen by its task) before another is used.
const READY_WAIT: Duration = Duration::from_millis(50);

/// Why no response came.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (refused, unresolvable, timed out).
    #[error("{0}")]
    Connect(String),
    /// The request failed on an open connection.
    #[error(transparent)]
    Request(#[from] hyper::Error),
}

/// A connection in use; `Pool::give_back` returns it for reuse.
pub struct Lease<B> {
    sender: SendRequest<B>,
    key: Arc<str>,
}

struct Idle<B> {
    sender: SendRequest<B>,
    since: Instant,
}

/// The idle connections of every upstream, by `host:port`.
pub struct Pool<B> {
    idle: Mutex<HashMap<Arc<str>, Vec<Idle<B>>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_buf: usize,
}

impl<B> Pool<B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// A pool whose connections close after `idle_timeout` unused; a task
    /// sweeps them, and ends when the pool is dropped.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_buf: usize) -> Arc<Self> {
        let pool = Arc::new(Pool { idle: Mutex::default(), connect_timeout, idle_timeout, max_buf });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&pool), idle_timeout));
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Idle<B>>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` (origin-form URI) to the upstream at `base`: on an idle
    /// connection if one is ready, else a new one. A kept connection that
    /// closed before the request went out is passed over, as hyper_util does.
    pub async fn send(&self, base: &Uri, mut req: Request<B>) -> Result<(Response<Incoming>, Lease<B>), PoolError> {
        let authority = base.authority().map_or("", |a| a.as_str());
        if !req.headers().contains_key(header::HOST) {
            if let Ok(v) = HeaderValue::from_str(authority) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
        let key = self.key(authority);
        while let Some(mut sender) = self.take_idle(&key) {
            // Usually ready already; just handed back, it may need its task to run once.
            match tokio::time::timeout(READY_WAIT, sender.ready()).await {
                Ok(Ok(())) => {}
                _ => continue,
            }
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease { sender, key })),
                Err(mut e) => match e.take_message() {
                    // Never written: the connection had closed. Try another.
                    Some(r) => req = r,
                    None => return Err(PoolError::Request(e.into_error())),
                },
            }
        }
        let mut sender = self.connect(authority).await?;
        let resp = sender.send_request(req).await?;
        Ok((resp, Lease { sender, key }))
    }

    /// The map's key for `authority`, shared rather than allocated per request.
    fn key(&self, authority: &str) -> Arc<str> {
        match self.lock().get_key_value(authority) {
            Some((k, _)) => k.clone(),
            None => Arc::from(authority),
        }
    }

    fn take_idle(&self, key: &str) -> Option<SendRequest<B>> {
        let mut idle = self.lock();
        let list = idle.get_mut(key)?;
        while let Some(c) = list.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout {
                return Some(c.sender);
            }
        }
        None
    }

    /// Keeps a connection whose response was read to its end.
    pub fn give_back(&self, lease: Lease<B>) {
        if lease.sender.is_closed() {
            return;
        }
        let mut idle = self.lock();
        let list = idle.entry(lease.key).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle { sender: lease.sender, since: Instant::now() });
        }
    }

    async fn connect(&self, authority: &str) -> Result<SendRequest<B>, PoolError> {
        let addr = if authority.contains(':') && !authority.ends_with(']') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, TcpStream::connect(&addr)).await {
            Err(_) => return Err(PoolError::Connect(format!("no connection within {:?}", self.connect_timeout))),
            Ok(Err(e)) => return Err(PoolError::Connect(e.to_string())),
            Ok(Ok(t)) => t,
        };
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .max_buf_size(self.max_buf)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        // Owned by its sender: ends when the upstream closes the connection
        // or every sender of it is gone (dropped, or swept when idle).
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        Ok(sender)
    }

    /// Closes connections idle past the timeout.
    fn sweep_idle(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            list.retain(|c| !c.sender.is_closed() && c.since.elapsed() < self.idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// Sweeps `pool` every half idle timeout until it is dropped.
async fn sweep<B>(pool: Weak<Pool<B>>, idle_timeout: Duration)
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.sweep_idle(),
            None => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers every request on a connection with 2 bytes,
    /// counting its connections and how many have closed.
    async fn upstream() -> (Uri, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base: Uri = format!("http://{}", listener.local_addr().expect("addr")).parse().expect("uri");
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {
                                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                                if tcp.write_all(answer).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (base, opened, closed)
    }

    async fn get(pool: &Pool<Empty<Bytes>>, base: &Uri) {
        let req = Request::builder().uri("/").body(Empty::new()).expect("request");
        let (resp, lease) = pool.send(base, req).await.expect("response");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
        pool.give_back(lease);
    }

    /// Requests one after another share one connection; one left idle past
    /// the idle timeout is closed by the sweep, and the next request opens
    /// a new one.
    #[tokio::test]
    async fn connections_are_reused_and_closed_when_idle() {
        let (base, opened, closed) = upstream().await;
        let pool = Pool::new(Duration::from_secs(5), Duration::from_millis(300), 64 << 10);
        for _ in 0..20 {
            tokio::time::timeout(Duration::from_secs(5), get(&pool, &base)).await.expect("in time");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1, "one connection for 20 requests in turn");
        let swept = tokio::time::timeout(Duration::from_secs(5), async {
            while closed.load(Ordering::SeqCst) < 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        assert!(swept.await.is_ok(), "the idle connection was not closed");
        tokio::time::timeout(Duration::from_secs(5), get(&pool, &base)).await.expect("in time");
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    /// Nothing listening: a connect error, not a hang.
    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let base: Uri = format!("http://{port}").parse().expect("uri");
        let pool = Pool::<Empty<Bytes>>::new(Duration::from_secs(5), Duration::from_secs(60), 64 << 10);
        let req = Request::builder().uri("/").body(Empty::new()).expect("request");
        let r = tokio::time::timeout(Duration::from_secs(10), pool.send(&base, req)).await.expect("in time");
        assert!(matches!(r, Err(PoolError::Connect(_))), "{:?}", r.err());
    }
}

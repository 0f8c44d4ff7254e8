//! Replaying a captured request from the console: the server sends it again
//! to its own public listener, built from the capture (method, path and
//! query, the headers as received, the kept body), so it takes exactly the
//! path a public request takes (routing, a client, its upstream) and is
//! recorded like one. A one-time marker header tells the ingress which
//! capture it replays and hands its request id back; while a replay is
//! pending the ingress removes the header from every request, and only
//! the marker of a pending replay counts (nothing else can be learnt or
//! done by sending it).
//!
//! The replay carries the host the original was routed by, whatever its
//! Host header said (an HTTP/2 request has none; an absolute URI names
//! its own), so it is served by the same rule.

use super::capture::Recorded;
use super::Shared;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The marker header: its value names a replay the server is waiting for.
const MARKER: HeaderName = HeaderName::from_static("x-tunnel-replay");
/// Replays waiting at once, at most: each is an operator's key press.
const MAX_PENDING: usize = 64;
/// How long the record of a replay's request may take to appear after its
/// response ended (it is written as the body's end passes the server).
const RECORD_WAIT: Duration = Duration::from_secs(2);

/// Why a replay was not sent, or did not come back.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no capture of request {0:?} (only the last 256 requests, and those with bodies within capture_limit, are kept)")]
    NotFound(String),
    /// Needs confirmation: not idempotent, or its body was not kept whole.
    #[error("{0}")]
    Unsafe(String),
    #[error("too many replays in progress; try again")]
    Busy,
    #[error("replay failed: {0}")]
    Failed(String),
}

/// Replays the server is waiting for, by marker.
#[derive(Default)]
pub struct Replays {
    /// Lets the ingress skip the marker lookup while none is pending.
    pending: AtomicUsize,
    waiting: Mutex<HashMap<String, (String, oneshot::Sender<String>)>>,
}

impl Replays {
    /// If `headers` carry the marker of a pending replay: removes it and
    /// returns the replayed request's id and where to send the new one's.
    /// A marker nobody waits for is removed and ignored.
    pub fn claim(&self, headers: &mut HeaderMap) -> Option<(String, oneshot::Sender<String>)> {
        if self.pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let marker = headers.remove(MARKER)?;
        let key = marker.to_str().ok()?;
        let claimed = self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        if claimed.is_some() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        claimed
    }

    fn expect(&self, original: &str) -> Result<(String, oneshot::Receiver<String>), ReplayError> {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        if waiting.len() >= MAX_PENDING {
            return Err(ReplayError::Busy);
        }
        let key = uuid::Uuid::new_v4().simple().to_string();
        let (tx, rx) = oneshot::channel();
        waiting.insert(key.clone(), (original.to_string(), tx));
        self.pending.fetch_add(1, Ordering::Relaxed);
        Ok((key, rx))
    }

    /// Forgets a pending replay (it ended or failed before its marker arrived).
    fn forget(&self, key: &str) {
        if self.waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(key).is_some() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Methods that may be sent twice with the effect of once (RFC 9110 9.2.2).
fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS | Method::TRACE)
}

/// A pending replay, forgotten however its wait ends (error, timeout, or
/// the console hanging up and the call being dropped).
struct Pending<'a> {
    replays: &'a Replays,
    key: String,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.replays.forget(&self.key);
    }
}

/// Why replaying `r` needs confirmation, if it does.
pub fn needs_confirmation(r: &Recorded) -> Option<String> {
    let head = r.head.as_ref()?;
    if !idempotent(&head.method) {
        return Some(format!("{} is not idempotent: sent again, it may act again (P replays anyway)", head.method));
    }
    if r.info.bytes_in > 0 {
        match &head.bodies {
            None => {
                return Some(
                    "its body was not kept (its rule has no capture_bodies): the replay would go without it (P replays anyway)"
                        .into(),
                )
            }
            Some((request, _)) => {
                let (kept, total) = request.kept();
                if (kept.len() as u64) < total {
                    return Some(format!(
                        "its body was cut short ({} of {total} bytes kept): the replay would send only those (P replays anyway)",
                        kept.len()
                    ));
                }
            }
        }
    }
    None
}

/// Where the server's own public listener answers on this host.
fn own_listener(http: SocketAddr) -> SocketAddr {
    let ip = match http.ip() {
        IpAddr::V4(a) if a.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(a) if a.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, http.port())
}

/// How long a replay may take: its rule's timeout bounds the wait for the
/// head (the longest of the rules', not knowing which it will match), this
/// the whole answer. The console waits a little longer.
pub fn replay_limit(shared: &Shared) -> Duration {
    shared.config().rules.rules().iter().map(|r| r.timeout).max().unwrap_or_default() + Duration::from_secs(30)
}

/// Sends the capture of `original` again and returns the record of the new request.
pub async fn replay(shared: &Arc<Shared>, original: &Arc<Recorded>, force: bool) -> Result<Arc<Recorded>, ReplayError> {
    let id = &original.info.request_id;
    let head = original.head.as_ref().ok_or_else(|| ReplayError::NotFound(id.clone()))?;
    if original.info.status == 101 || !original.info.upgrade.is_empty() {
        return Err(ReplayError::Failed("an upgraded connection (WebSocket...) cannot be replayed".into()));
    }
    if head.timings.routed_us == 0 {
        return Err(ReplayError::Failed("it was refused before it was routed: nothing to replay".into()));
    }
    if !force {
        if let Some(why) = needs_confirmation(original) {
            return Err(ReplayError::Unsafe(why));
        }
    }
    let Some((http, _, _)) = shared.addrs.get().copied() else {
        return Err(ReplayError::Failed("the public listener is not up".into()));
    };
    let mut headers = tunnel_lib::frame::headers_from_block(&head.request)
        .map_err(|e| ReplayError::Failed(format!("the captured head does not parse: {e}")))?;
    // What framed the original connection is not the replay's: the client
    // library frames the kept body itself.
    tunnel_lib::frame::strip_hop_by_hop(&mut headers);
    headers.remove(http::header::CONTENT_LENGTH);
    if let Some(authority) = &head.authority {
        let host = HeaderValue::from_str(authority).map_err(|e| ReplayError::Failed(e.to_string()))?;
        headers.insert(http::header::HOST, host);
    }
    let body = head.bodies.as_ref().map(|(q, _)| q.kept().0).unwrap_or_default();
    let uri: http::Uri = format!("http://{}{}", own_listener(http), head.uri)
        .parse()
        .map_err(|e| ReplayError::Failed(format!("{:?} cannot be sent again: {e}", head.uri)))?;
    let (key, new_id) = shared.replays.expect(id)?;
    let _pending = Pending { replays: &shared.replays, key: key.clone() };
    let marker = HeaderValue::from_str(&key).map_err(|e| ReplayError::Failed(e.to_string()))?;
    headers.insert(MARKER, marker);
    let mut req = http::Request::builder()
        .method(head.method.clone())
        .uri(uri)
        .body(Full::new(body))
        .map_err(|e| ReplayError::Failed(e.to_string()))?;
    *req.headers_mut() = headers;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let limit = replay_limit(shared);
    let sent = async {
        let resp = client.request(req).await.map_err(|e| ReplayError::Failed(e.to_string()))?;
        // Read to the end, keeping nothing: the record is written when the
        // response ends, and a large or endless one must not fill memory.
        let mut body = resp.into_body();
        while let Some(frame) = body.frame().await {
            frame.map_err(|e| ReplayError::Failed(e.to_string()))?;
        }
        Ok::<_, ReplayError>(())
    };
    tokio::time::timeout(limit, sent)
        .await
        .map_err(|_| ReplayError::Failed(format!("no answer within {limit:?}")))??;
    let new_id = new_id.await.map_err(|_| ReplayError::Failed("the replay never reached the ingress".into()))?;
    let start = tokio::time::Instant::now();
    loop {
        if let Some(r) = shared.requests.find(&new_id) {
            return Ok(r);
        }
        if start.elapsed() > RECORD_WAIT {
            return Err(ReplayError::Failed(format!("request {new_id} was sent but its record did not appear")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

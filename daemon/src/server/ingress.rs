//! Public HTTP ingress (HTTP/1.1 and h2c, and both over TLS): routes each request by the rules
//! to a data stream of a client in the target group and streams the response
//! back; answers what it cannot serve with a status and a one-line reason.

use super::accept::{next_connection, MaybeTls};
use super::budget::WindowBudget;
use super::capture::Head;
use super::gate::{self, Refused};
use super::keepalive::{Activity, Counted, Verdict};
use super::registry::NoStream;
use super::Shared;
use crate::tunnel::body::{send_body, Peeked, Prepended, SendError, Tapped};
use crate::tunnel::exchange::{ExchangeFailure, ExchangeGuard, ExchangeIo};
use crate::tunnel::{next_request_id, upgrade};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_lib::config;
use tunnel_lib::frame::{self, now_ms, strip_hop_by_hop};
use tunnel_lib::head::{self, PublicHost};
use tunnel_lib::introspection::RequestInfo;
use tunnel_lib::policy;
use tunnel_lib::proto::{self, exchange_error::Kind, tunnel_message::Payload};
use tunnel_lib::rules::Rule;

/// Response bytes hyper's h2 may hold per public stream, past one chunk.
const PUBLIC_H2_SEND_BUFFER: usize = 16 << 10;

/// After the grace period, how long closing upgraded connections may take.
const UPGRADE_CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Body of a public response: the tunnel's stream, or a short local answer.
pub type ProxyBody = Either<crate::tunnel::body::InboundBody, Full<Bytes>>;

/// Which public listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    /// TLS, certificates chosen by SNI.
    Https,
}

impl Scheme {
    /// The URL scheme, as X-Forwarded-Proto and the request head carry it.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// Accepts public connections until `stop` fires, then waits up to the
/// shutdown grace for in-flight requests.
pub async fn run(
    shared: Arc<Shared>,
    listener: TcpListener,
    scheme: Scheme,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let cfg = shared.config();
    let limit = Arc::new(tokio::sync::Semaphore::new(cfg.server.max_connections));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Our watchdog (keepalive.rs) owns the head and keep-alive clocks:
        // hyper's would close idle keep-alive connections at the head
        // deadline, and defaults to 30 s once a timer is set.
        .header_read_timeout(None)
        // A head past these gets 431 from hyper before any of our code runs.
        .max_buf_size(usize::try_from(cfg.server.max_header_bytes).unwrap_or(usize::MAX));
    // hyper's own limit is our default: set only when it differs, since a
    // set limit makes hyper fill a fresh 3 KiB array of header slots for
    // every request it parses (1.7k instructions a request, callgrind).
    if cfg.server.max_headers != config::DEFAULT_MAX_HEADERS {
        builder.http1().max_headers(cfg.server.max_headers);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        // A silent h2c peer is noticed and closed.
        .keep_alive_interval(Some(cfg.server.public_ping_interval))
        .keep_alive_timeout(cfg.server.public_ping_timeout)
        .max_concurrent_streams(cfg.server.public_max_streams)
        .max_pending_accept_reset_streams(cfg.server.h2_max_remote_resets)
        .max_local_error_reset_streams(cfg.server.h2_max_local_resets)
        // 64 KiB frames: a quarter of the per-frame work on h2c uploads.
        .max_frame_size(64 << 10)
        // What h2 buffers per stream beyond the peer's window: its 400 KiB
        // default let a peer that opens its windows and never reads hold
        // 0.5 MiB per stream. Measured no slower for one h2c download.
        .max_send_buf_size(PUBLIC_H2_SEND_BUFFER)
        .max_header_list_size(u32::try_from(cfg.server.max_header_bytes).unwrap_or(u32::MAX));
    let (connections, upgrades, closing) = (TaskTracker::new(), TaskTracker::new(), CancellationToken::new());
    while let Some((tcp, peer)) = next_connection(&listener, "public", &stop).await {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; connection refused");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let conn = Arc::new(Conn {
            peer,
            peer_ip: HeaderValue::from_str(&peer.ip().to_string()).unwrap_or(HeaderValue::from_static("unknown")),
            scheme,
            _permit: permit,
            upgrades: upgrades.clone(),
            draining: stop.clone(),
            closing: closing.clone(),
            budget: WindowBudget::new(shared.config().server.public_connection_window),
        });
        let public = Public { shared: shared.clone(), builder: builder.clone(), conn };
        // Owned by the connection: ends when it closes, at its watchdog's
        // deadlines, or when shutdown closes it.
        connections.spawn(public.serve(tcp));
    }
    drop(listener);
    // Each connection saw `stop` and is finishing its requests. Upgraded
    // connections left hyper when they switched: they get the rest of the
    // grace period too. Connections first: only they start upgrades.
    let grace = shared.config().server.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    connections.close();
    upgrades.close();
    let all_closed = || async {
        connections.wait().await;
        upgrades.wait().await;
    };
    if tokio::time::timeout_at(deadline, all_closed()).await.is_err() {
        tracing::warn!(
            ?grace,
            connections = connections.len(),
            upgraded = upgrades.len(),
            "public connections still open after the grace period; closing them"
        );
        closing.cancel();
        let _ = tokio::time::timeout(UPGRADE_CLOSE_WAIT, all_closed()).await;
    }
    Ok(())
}

/// What serving one public connection needs.
struct Public {
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    conn: Arc<Conn>,
}

/// What the requests of one public connection share.
struct Conn {
    peer: SocketAddr,
    /// The peer's IP as X-Forwarded-For carries it.
    peer_ip: HeaderValue,
    scheme: Scheme,
    /// The connection's place under max_connections, released when the last
    /// holder drops: an upgraded connection holds it until it closes.
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Upgraded connections, which shutdown waits for (hyper's graceful
    /// shutdown stops seeing a connection once it switches protocols).
    upgrades: TaskTracker,
    /// Fires at shutdown: finish the requests in flight, take no more.
    draining: CancellationToken,
    /// Fires at the end of the shutdown grace: whatever is still open closes.
    closing: CancellationToken,
    /// The exchange window its requests share (`public_connection_window`).
    budget: Arc<WindowBudget>,
}

impl Public {
    async fn serve(self, tcp: TcpStream) {
        let Public { shared, builder, conn: ctx } = self;
        let (peer, scheme) = (ctx.peer, ctx.scheme);
        let cfg = shared.config();
        let (header_timeout, keepalive) = (cfg.server.header_read_timeout, cfg.server.keepalive_timeout);
        drop(cfg);
        let activity = Activity::new(tokio::time::Instant::now());
        let io = match scheme {
            Scheme::Http => MaybeTls::Plain(tcp),
            Scheme::Https => {
                let Some(tls) = shared.ingress_tls() else {
                    tracing::warn!(%peer, "HTTPS connection but no certificates are loaded; closed");
                    return;
                };
                // The TLS handshake counts toward the first request's deadline.
                let accept = tokio_rustls::TlsAcceptor::from(tls).accept(tcp);
                match tokio::time::timeout(header_timeout, accept).await {
                    Err(_) => {
                        tracing::debug!(%peer, "no TLS handshake within {header_timeout:?}; connection closed");
                        return;
                    }
                    Ok(Ok(s)) => MaybeTls::Tls(Box::new(s)),
                    Ok(Err(e)) => {
                        // Scanners and bad clients: routine on a public port.
                        tracing::debug!(%peer, "public TLS handshake failed: {}", super::accept::handshake_error(&e));
                        return;
                    }
                }
            }
        };
        let (svc_shared, svc_ctx, svc_activity) = (shared.clone(), ctx.clone(), activity.clone());
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let in_service = svc_activity.request_started(req.version() == http::Version::HTTP_2);
            // Boxed: a request's future is some 5 KiB, and hyper's HTTP/2
            // spawns each stream as a task holding it, which tokio moves by
            // value several times from spawn to completion (it boxes only
            // futures past 16 KiB): measured at ten copies a request.
            let response = Box::pin(handle(svc_shared.clone(), svc_ctx.clone(), req));
            async move {
                let response = response.await?;
                Ok::<_, Infallible>(response.map(|body| Counted::new(body, in_service)))
            }
        });
        // Every read tells the connection's clocks that bytes arrived.
        let reads = activity.clone();
        let io = TokioIo::new(tokio_util::io::InspectReader::new(io, move |bytes: &[u8]| {
            if !bytes.is_empty() {
                reads.on_read();
            }
        }));
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        tokio::pin!(conn);
        let mut check_at = tokio::time::Instant::now() + header_timeout;
        let mut finishing = false;
        // Set once an idle connection was asked to close: a peer that does
        // not read cannot be sent the GOAWAY, and would hold it open.
        let mut drop_at: Option<tokio::time::Instant> = None;
        let result = loop {
            tokio::select! {
                r = conn.as_mut() => break r,
                _ = tokio::time::sleep_until(drop_at.unwrap_or(check_at)), if drop_at.is_some() => {
                    tracing::debug!(%peer, "idle connection did not close within {header_timeout:?} of being asked; dropped");
                    return;
                }
                _ = ctx.draining.cancelled(), if !finishing => {
                    // Requests in flight finish; an idle connection closes at once.
                    finishing = true;
                    conn.as_mut().graceful_shutdown();
                }
                _ = ctx.closing.cancelled() => {
                    tracing::debug!(%peer, "public connection closed at the end of the shutdown grace");
                    return;
                }
                _ = tokio::time::sleep_until(check_at), if !finishing => {
                    match activity.verdict(tokio::time::Instant::now(), header_timeout, keepalive) {
                        Verdict::CheckAt(t) => check_at = t,
                        Verdict::HeadTimedOut => {
                            // Also covers a peer that connects and says nothing,
                            // which hyper's protocol detection would wait on forever.
                            tracing::debug!(%peer, "no complete request head within {header_timeout:?}; connection closed");
                            return;
                        }
                        Verdict::Idle => {
                            tracing::debug!(%peer, "keep-alive connection idle for {keepalive:?}; closing it");
                            finishing = true;
                            drop_at = Some(tokio::time::Instant::now() + header_timeout);
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
        };
        if let Err(e) = result {
            match refused_head(e.as_ref()) {
                Some(status) => record_refused_head(&shared, status, e.as_ref()),
                None => tracing::debug!(%peer, "public connection: {e}"),
            }
        }
    }
}

/// The status hyper itself answered an HTTP/1.1 head it refused to parse, if
/// that is how the connection ended (its automatic 400, 414 and 431).
fn refused_head(e: &(dyn std::error::Error + 'static)) -> Option<StatusCode> {
    let e = e.downcast_ref::<hyper::Error>()?;
    if e.is_parse_too_large() {
        // hyper's one public hint which of the two it was.
        return Some(if e.to_string().starts_with("URI too long") {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        });
    }
    (e.is_parse() && !e.is_parse_status() && !e.is_parse_version_h2()).then_some(StatusCode::BAD_REQUEST)
}

/// An access line and a metric for a head hyper refused before any of our
/// code saw it: nothing of the request is known but that it was refused.
fn record_refused_head(shared: &Shared, status: StatusCode, e: &(dyn std::error::Error + 'static)) {
    let request_id = next_request_id();
    let rec = RequestInfo {
        unix_ms: now_ms(),
        status: u32::from(status.as_u16()),
        trace_id: request_id.clone(),
        request_id,
        error: e.to_string(),
        ..Default::default()
    };
    shared.record_request(rec, Duration::ZERO, None);
}

/// Why the tunnel answered a request itself (kept with the response for the request log).
#[derive(Clone)]
struct LocalReason(String);

/// Marks a 101 response: the upgraded connection's task writes the request
/// log record when the connection closes.
#[derive(Clone)]
struct RecordedOnClose;

/// A local answer: status and a one-line reason.
fn reply(status: StatusCode, reason: impl Into<String>) -> Response<ProxyBody> {
    let reason = reason.into();
    let mut r = Response::new(Either::Right(Full::new(Bytes::from(format!("{reason}\n")))));
    *r.status_mut() = status;
    r.extensions_mut().insert(LocalReason(reason));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// The trace id of a request: the W3C traceparent's, the X-Request-Id, or a new one.
fn trace_id(headers: &HeaderMap, request_id: &str) -> String {
    const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
    const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    if let Some(tp) = headers.get(TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.split('-').collect();
        if parts.len() == 4 && parts[1].len() == 32 && parts[1].bytes().all(|b| b.is_ascii_hexdigit()) {
            return parts[1].to_string();
        }
    }
    if let Some(id) = headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 {
            return id.to_string();
        }
    }
    if request_id.contains('-') {
        request_id.replace('-', "")
    } else {
        request_id.to_string()
    }
}

/// A version as the head carries it (as `http::Version`'s Debug writes it).
fn version_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2.0",
        http::Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

/// Names set on every request, parsed once.
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Sets X-Forwarded-For (appended), -Proto and -Host. `peer_ip` is the
/// connection's address as a header value, made once per connection. A
/// chain split over several X-Forwarded-For lines is joined, hops in order.
fn set_forwarded(headers: &mut HeaderMap, peer_ip: &HeaderValue, scheme: Scheme, host: &str) {
    let mut prev = headers.get_all(&X_FORWARDED_FOR).iter();
    let xff = match (prev.next(), prev.next()) {
        (None, _) => Some(peer_ip.clone()),
        (Some(first), second) => {
            let mut v = Vec::with_capacity(first.len() + 2 + peer_ip.len());
            for line in [first].into_iter().chain(second).chain(prev) {
                v.extend_from_slice(line.as_bytes());
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(peer_ip.as_bytes());
            HeaderValue::from_maybe_shared(Bytes::from(v)).ok()
        }
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(scheme.as_str()));
    // The Host header set just before names the same host: its value is reused.
    let value = match headers.get(header::HOST) {
        Some(h) if h.as_bytes() == host.as_bytes() => Some(h.clone()),
        _ => HeaderValue::from_str(host).ok(),
    };
    if let Some(v) = value {
        headers.insert(X_FORWARDED_HOST, v);
    }
}

async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let started = Instant::now();
    let mut rec = RequestInfo {
        unix_ms: now_ms(),
        method: req.method().as_str().to_string(),
        path: req.uri().path().to_string(),
        ..Default::default()
    };
    let uploaded = Arc::new(AtomicU64::new(0));
    // A replay from the console says so, in a header that goes no further.
    let replay = shared.replays.claim(req.headers_mut());
    let mut head = Head::of(&req, conn.scheme.as_str(), started);
    let resp = forward(&shared, &conn, req, &mut rec, &uploaded, &mut head).await;
    if let Some((original, tx)) = replay {
        rec.replay_of = original;
        let _ = tx.send(rec.request_id.clone());
    }
    rec.status = u32::from(resp.status().as_u16());
    let (mut parts, body) = resp.into_parts();
    let body = match body {
        Either::Left(tunnel) => {
            // Recorded when the response body ends, with its size and duration.
            let hook = Box::new(move |bytes, error: Option<String>| {
                rec.bytes_out = bytes;
                rec.bytes_in = uploaded.load(Ordering::Relaxed);
                let took = started.elapsed();
                rec.duration_ms = took.as_millis() as u64;
                rec.error = error.unwrap_or_default();
                shared.record_request(rec, took, Some(head));
            });
            Either::Left(tunnel.on_finish(hook))
        }
        Either::Right(local) if parts.extensions.remove::<RecordedOnClose>().is_some() => Either::Right(local),
        Either::Right(local) => {
            let took = started.elapsed();
            rec.duration_ms = took.as_millis() as u64;
            rec.bytes_in = uploaded.load(Ordering::Relaxed);
            rec.error = parts.extensions.remove::<LocalReason>().map(|r| r.0).unwrap_or_default();
            shared.record_request(rec, took, Some(head));
            Either::Right(local)
        }
    };
    Ok(Response::from_parts(parts, body))
}

async fn forward(
    shared: &Arc<Shared>,
    conn: &Arc<Conn>,
    mut req: Request<Incoming>,
    rec: &mut RequestInfo,
    uploaded: &Arc<AtomicU64>,
    capture: &mut Head,
) -> Response<ProxyBody> {
    // Named before anything can fail, so that every access log line has both.
    let request_id = next_request_id();
    let trace = trace_id(req.headers(), &request_id);
    rec.request_id = request_id.clone();
    rec.trace_id = trace.clone();
    let cfg = shared.config();
    let server = &cfg.server;
    let client = if server.trusted_proxies.is_empty() {
        conn.peer.ip()
    } else {
        policy::client_address(conn.peer.ip(), req.headers(), &server.trusted_proxies, server.client_address_header)
    };
    // The connection's own address was made text once, when it was accepted.
    rec.remote_addr = match conn.peer_ip.to_str() {
        Ok(ip) if client == conn.peer.ip() => ip.to_owned(),
        _ => client.to_string(),
    };
    let path = req.uri().path().to_string();
    let PublicHost { authority, host } = match head::check_host(req.version(), req.uri(), req.headers()) {
        Ok(h) => h,
        Err(e) => {
            tracing::info!(%path, "refused head: {e}: 400");
            return reply(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    rec.host = host.clone();
    // The replay's Host: copied only when the Host header does not say it.
    if req.headers().get(header::HOST).is_none_or(|h| h.as_bytes() != authority.as_bytes()) {
        capture.authority = Some(authority.clone());
    }
    if req.method() == http::Method::CONNECT {
        // A reverse proxy serves its own hosts; it is not a way out to others.
        return reply(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served");
    }
    // HTTP/1.1 heads past the limits are refused by hyper itself (431/414
    // before a service runs); these also cover HTTP/2.
    let uri_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len()) as u64;
    if uri_len > cfg.server.max_uri_bytes {
        return reply(StatusCode::URI_TOO_LONG, format!("URI over {} bytes", cfg.server.max_uri_bytes));
    }
    if req.headers().len() > cfg.server.max_headers {
        let why = format!("more than {} headers", cfg.server.max_headers);
        return reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, why);
    }
    let Some(rule) = cfg.rules.route(&host, &path) else {
        tracing::info!(%host, %path, "no rule matches: 404");
        return reply(StatusCode::NOT_FOUND, format!("no route for host {host:?} path {path:?}"));
    };
    rec.group = rule.group.clone();
    rec.rule = rule.label.clone();
    capture.routed();
    // Headers the tunnel sets from verified claims are never the client's.
    for name in cfg.rules.claim_headers() {
        req.headers_mut().remove(name);
    }
    let group = cfg.group(&rule.group);
    let mut admitted = gate::Admitted::default();
    if gate::applies(rule, group) {
        match shared.gate.admit(&cfg, rule, group, client, req.headers_mut()).await {
            Ok(a) => admitted = a,
            Err(refused) => return refuse(shared, rule, rec, refused),
        }
    }
    // The inspector's copies of the bodies' first bytes, with capture_bodies.
    let taps = rule.capture_bodies.map(|n| shared.captures.taps(n, cfg.server.capture_limit));
    capture.bodies = taps.clone();
    if let Some(max) = rule.max_body {
        let length = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if length.is_some_and(|n| n > max) {
            return reply(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over the {max}-byte limit"));
        }
    }
    // HTTP/1.x: the body's first bytes, when they came with the head, are
    // read before the head goes anywhere, so that a malformed chunk line in
    // them gets 400 and the upstream sees nothing of the request. (One look,
    // and one yield for hyper to decode what it holds: a body still on its
    // way is not waited for.)
    let mut peeked = Peeked::Nothing;
    // Not with `Expect: 100-continue`: reading the body would have hyper
    // send 100 before we know a client can take the request (and the body
    // cannot have come with the head anyway).
    let expects_continue =
        req.headers().get(header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if req.version() <= http::Version::HTTP_11 && !expects_continue && !hyper::body::Body::is_end_stream(req.body()) {
        let body = req.body_mut();
        tokio::select! {
            biased;
            f = http_body_util::BodyExt::frame(body) => match f {
                None => peeked = Peeked::Ended,
                Some(Ok(f)) => peeked = Peeked::Frame(f),
                Some(Err(e)) => return malformed(&host, &path, &e),
            },
            _ = tokio::task::yield_now() => {}
        }
    }
    // Taken out of the connection's budget before the exchange opens, and
    // given back when its body is dropped.
    let lease = conn.budget.lease(group.map_or(frame::DEFAULT_EXCHANGE_WINDOW, |g| g.exchange_window));
    let window = lease.window();
    let max_in_flight = group.map_or(config::DEFAULT_MAX_IN_FLIGHT, |g| g.max_in_flight) as usize;
    // A stream can end between the pick and the open: then pick again.
    let mut opened = Err(NoStream::NoClient);
    for _ in 0..3 {
        match shared.registry.pick(&rule.group, max_in_flight) {
            Ok(stream) => {
                if let Some(x) = stream.exchanges.open(&request_id, window, rule.idle_timeout) {
                    opened = Ok((stream, x));
                    break;
                }
            }
            Err(e) => {
                opened = Err(e);
                break;
            }
        }
    }
    // No client of the group here: a peer server that holds one serves it.
    if matches!(opened, Err(NoStream::NoClient)) {
        if let Some((stream, peer)) = super::peer::forwarder(shared, &rule.group) {
            if let Some(x) = stream.exchanges.open(&request_id, window, rule.idle_timeout) {
                tracing::debug!(%host, %path, group = %rule.group, %peer, "no client here: forwarding to a peer server");
                rec.forwarded_to = peer;
                opened = Ok((stream, x));
            }
        }
    }
    let (stream, (mut io, head_rx)) = match opened {
        Ok(x) => x,
        Err(NoStream::Busy) => {
            tracing::info!(%host, %path, group = %rule.group, max_in_flight, "every client at max_in_flight: 503");
            let mut r = reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("every tunnel client of group {:?} has {max_in_flight} requests in flight", rule.group),
            );
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return r;
        }
        Err(NoStream::NoClient) => {
            tracing::info!(%host, %path, group = %rule.group, "no client connected: 503");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no tunnel client connected for group {:?}", rule.group),
            );
        }
    };
    // Shared by the response body and the upload task: the window goes back
    // to the connection only when both directions are done with it.
    let lease = Arc::new(lease);
    io.body = io.body.hold(lease.clone());
    // An upgrade without a request body: its body frames will be the
    // upgraded connection's. (With a body it goes as an ordinary request.)
    let upgrade = match req.version() {
        http::Version::HTTP_11 if hyper::body::Body::is_end_stream(req.body()) && matches!(peeked, Peeked::Nothing) => {
            upgrade::requested(req.headers())
        }
        _ => None,
    };
    let on_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    rec.client_id = stream.client_id.clone();
    rec.stream_id = stream.stream_id.clone();
    let (parts, body) = req.into_parts();
    let body = Prepended::new(peeked, body);
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    // The host the request was routed by is the one its upstream is told,
    // whatever the Host header said or `Connection` asked to strip.
    head::set_host(&mut headers, &authority);
    set_forwarded(&mut headers, &conn.peer_ip, conn.scheme, &authority);
    for (name, value) in admitted.claims {
        headers.insert(name, value);
    }
    let end_of_stream = upgrade.is_none() && hyper::body::Body::is_end_stream(&body);
    let (header_block, headers) = stream.exchanges.headers_for_peer(&headers);
    let head = proto::HttpRequest {
        method: parts.method.as_str().to_string(),
        path_and_query: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        authority,
        scheme: conn.scheme.as_str().into(),
        headers,
        upstream: rule.upstream.clone(),
        timeout_ms: rule.timeout.as_millis() as u64,
        end_of_stream,
        version: version_name(parts.version).to_owned(),
        window,
        upgrade: upgrade.clone().unwrap_or_default(),
        header_block,
        ..Default::default()
    };
    let exchanges = stream.exchanges.clone();
    // From here, dropping the guard (public client gone, timeout) cancels the exchange at the client.
    let guard = ExchangeGuard::new(exchanges.clone(), io.request_id.clone());
    let mut msg = exchanges.message(&request_id, Payload::HttpRequest(head));
    msg.trace_id = trace;
    // The rule's timeout bounds everything up to the response head, including
    // waiting for room in a busy stream's queue.
    let deadline = tokio::time::Instant::now() + rule.timeout;
    match tokio::time::timeout_at(deadline, exchanges.outbound().send_data(msg)).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return reply(StatusCode::BAD_GATEWAY, "tunnel client disconnected"),
        Err(_) => return timeout_reply(&host, &path, rule.timeout),
    }
    capture.sent();
    let too_large = Arc::new(AtomicBool::new(false));
    let failed_body: Arc<std::sync::OnceLock<String>> = Arc::default();
    if end_of_stream {
        exchanges.finish_outbound(&request_id);
    } else if upgrade.is_some() {
        // The request direction stays open until the response says whether
        // the connection switched.
    } else {
        let (ex, id, credit, cancel, max_chunk) =
            (exchanges.clone(), request_id.clone(), io.credit.clone(), io.cancel.clone(), io.max_chunk);
        let uploaded = uploaded.clone();
        let (limit, flag, failed) = (rule.max_body, too_large.clone(), failed_body.clone());
        let tap = taps.as_ref().map(|(request, _)| request.clone());
        // Owned by the exchange: it ends when the body is sent or the exchange is cancelled.
        tokio::spawn(async move {
            let _lease = lease;
            let sent = match tap {
                Some(t) => send_body(Tapped::new(body, t), &id, &credit, &cancel, &ex, max_chunk, limit).await,
                None => send_body(body, &id, &credit, &cancel, &ex, max_chunk, limit).await,
            };
            match sent {
                Ok(n) => uploaded.store(n, Ordering::Relaxed),
                Err(SendError::TooLarge(_)) => {
                    // Chunked bodies have no length to check up front: caught as they stream.
                    flag.store(true, Ordering::Relaxed);
                    ex.abandon(&id, "request body over max_body");
                }
                Err(SendError::Cancelled) => {}
                Err(SendError::Body(e)) => {
                    // Malformed framing, or the client gone: either way the
                    // upstream's request is cut off, and whoever is still
                    // there gets 400.
                    tracing::debug!(request_id = %id, "public request body failed: {e}");
                    let _ = failed.set(e);
                    ex.abandon(&id, "public request body failed");
                }
            }
        });
    }
    let resp_head = tokio::time::timeout_at(deadline, head_rx).await;
    if too_large.load(Ordering::Relaxed) {
        // The upstream request was cancelled when the body passed the limit.
        let max = rule.max_body.unwrap_or_default();
        tracing::info!(%host, %path, max_body = max, "request body over max_body: 413");
        return reply(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over the {max}-byte limit"));
    }
    if let Some(e) = failed_body.get() {
        tracing::info!(%host, %path, "request body failed: 400: {e}");
        return close_after(reply(StatusCode::BAD_REQUEST, format!("malformed request body: {e}")));
    }
    let resp_head = match resp_head {
        Err(_) => return timeout_reply(&host, &path, rule.timeout),
        Ok(Err(_)) => return reply(StatusCode::BAD_GATEWAY, "tunnel client disconnected"),
        Ok(Ok(Err(failure))) => return failure_reply(&failure, &rule.upstream),
        Ok(Ok(Ok(h))) => h,
    };
    let ends = resp_head.end_of_stream;
    // Body bytes that came with the head (already in the body's buffer).
    let inline_len = resp_head.body.len() as u64;
    let status = match u16::try_from(resp_head.status).ok().and_then(|s| StatusCode::from_u16(s).ok()) {
        Some(s) => s,
        None => {
            exchanges.abandon(&request_id, "invalid status");
            return reply(StatusCode::BAD_GATEWAY, "tunnel client sent an invalid status");
        }
    };
    let mut resp_headers = match frame::head_headers(&resp_head.header_block, resp_head.headers) {
        Ok(h) => h,
        Err(e) => {
            exchanges.abandon(&request_id, "invalid headers");
            return reply(StatusCode::BAD_GATEWAY, format!("tunnel client sent {e}"));
        }
    };
    // A copy: the block is a slice of the link's read buffer, which a
    // kept reference would pin whole for as long as the record lives.
    capture.answered(if resp_head.header_block.is_empty() {
        frame::headers_to_block(&resp_headers)
    } else {
        Bytes::copy_from_slice(&resp_head.header_block)
    });
    strip_hop_by_hop(&mut resp_headers);
    match (on_upgrade, status) {
        (Some(on_upgrade), StatusCode::SWITCHING_PROTOCOLS) => {
            let protocol = if resp_head.upgrade.is_empty() { upgrade.unwrap_or_default() } else { resp_head.upgrade };
            upgrade::restore_headers(&mut resp_headers, &protocol);
            rec.status = u32::from(status.as_u16());
            rec.upgrade = protocol;
            let carried = Upgrading {
                shared: shared.clone(),
                conn: conn.clone(),
                rec: rec.clone(),
                head: capture.clone(),
                io,
                guard,
            };
            conn.upgrades.spawn(carried.run(on_upgrade));
            let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
            *resp.status_mut() = status;
            *resp.headers_mut() = resp_headers;
            resp.extensions_mut().insert(RecordedOnClose);
            return resp;
        }
        (None, StatusCode::SWITCHING_PROTOCOLS) => {
            exchanges.abandon(&request_id, "101 to a request that asked for no upgrade");
            return reply(StatusCode::BAD_GATEWAY, "upstream switched protocols unasked");
        }
        (Some(_), _) => {
            // Refused (any other status): an ordinary response, and the
            // request, which had no body, ends here.
            let end = exchanges.message(&request_id, Payload::End(proto::BodyEnd::default()));
            match tokio::time::timeout_at(deadline, exchanges.outbound().send_data(end)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return reply(StatusCode::BAD_GATEWAY, "tunnel client disconnected"),
                Err(_) => return timeout_reply(&host, &path, rule.timeout),
            }
            exchanges.finish_outbound(&request_id);
        }
        (None, _) => {}
    }
    // HEAD, 204 and 304 responses have no body whatever their Content-Length says.
    let length = if ends {
        Some(inline_len)
    } else {
        resp_headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
    };
    let mut body = io.body.guard(guard).expect_len(length);
    if let Some((_, response)) = taps {
        body = body.tap(response);
    }
    let mut resp = Response::new(Either::Left(body));
    *resp.status_mut() = status;
    *resp.headers_mut() = resp_headers;
    resp
}

/// A public connection that switched protocols, to carry over its exchange.
struct Upgrading {
    shared: Arc<Shared>,
    /// Holds the connection's place under max_connections while it is open.
    conn: Arc<Conn>,
    rec: RequestInfo,
    head: Head,
    io: ExchangeIo,
    guard: ExchangeGuard,
}

impl Upgrading {
    /// Waits for hyper to hand over the connection (after it wrote the 101),
    /// carries it until both sides close it or shutdown's grace runs out,
    /// then logs and records it.
    async fn run(self, on_upgrade: hyper::upgrade::OnUpgrade) {
        let Upgrading { shared, conn, mut rec, head, io, guard } = self;
        let exchanges = guard.exchanges().clone();
        let request_id = io.request_id.clone();
        let outcome = tokio::select! {
            _ = conn.closing.cancelled() => Err("server shutting down".to_string()),
            r = on_upgrade => match r {
                Err(e) => Err(format!("public connection did not switch: {e}")),
                Ok(upgraded) => {
                    exchanges.mark_upgraded(&request_id);
                    tracing::info!(request_id = %request_id, host = %rec.host, path = %rec.path, client = %rec.client_id, protocol = %rec.upgrade, "upgraded connection open");
                    let pipe = upgrade::pipe(TokioIo::new(upgraded), io, &exchanges);
                    tokio::pin!(pipe);
                    tokio::select! {
                        // Dropping the pipe closes the public side; the guard cancels the client's.
                        _ = conn.closing.cancelled() => Err("server shutting down".to_string()),
                        o = &mut pipe => Ok(o),
                    }
                }
            },
        };
        let error = match outcome {
            Ok(o) => {
                rec.bytes_in = o.moved.sent;
                rec.bytes_out = o.moved.received;
                o.error
            }
            Err(e) => Some(e),
        };
        match error {
            None => {
                tracing::info!(request_id = %request_id, bytes_in = rec.bytes_in, bytes_out = rec.bytes_out, "upgraded connection closed");
                guard.disarm();
            }
            Some(e) => {
                tracing::info!(request_id = %request_id, bytes_in = rec.bytes_in, bytes_out = rec.bytes_out, "upgraded connection ended: {e}");
                rec.error = e;
                // Dropping the guard cancels the exchange at the client.
                drop(guard);
            }
        }
        rec.duration_ms = u64::try_from(now_ms() - rec.unix_ms).unwrap_or(0);
        let took = Duration::from_millis(rec.duration_ms);
        shared.record_request(rec, took, Some(head));
        drop(conn);
    }
}

/// The gate's refusal, answered: counted by rule and reason, and recorded.
fn refuse(shared: &Shared, rule: &Rule, rec: &mut RequestInfo, refused: Refused) -> Response<ProxyBody> {
    let reason = refused.refusal.as_str();
    tracing::info!(host = %rec.host, path = %rec.path, rule = %rule.label, client = %rec.remote_addr, reason, "refused: {}: {}", refused.reason, refused.status.as_u16());
    shared.metrics.refused.get_or_create(&vec![("rule", rule.label.clone()), ("reason", reason.to_string())]).inc();
    rec.refused = reason.to_string();
    let mut r = reply(refused.status, refused.reason);
    for (name, value) in refused.headers {
        r.headers_mut().insert(name, value);
    }
    r
}

/// 400 for a body whose framing is malformed, and the connection closed:
/// nothing after the bad bytes can be trusted to start a request.
fn malformed(host: &str, path: &str, e: &hyper::Error) -> Response<ProxyBody> {
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    // Bounded by the error's chain.
    while let Some(s) = source {
        why = format!("{why}: {s}");
        source = s.source();
    }
    tracing::info!(%host, %path, "malformed request body: 400: {why}");
    close_after(reply(StatusCode::BAD_REQUEST, format!("malformed request body: {why}")))
}

/// `r`, closing its HTTP/1.1 connection once written (HTTP/2 ignores it).
fn close_after(mut r: Response<ProxyBody>) -> Response<ProxyBody> {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

fn timeout_reply(host: &str, path: &str, timeout: Duration) -> Response<ProxyBody> {
    tracing::info!(%host, %path, ?timeout, "no response head in time: 504");
    reply(StatusCode::GATEWAY_TIMEOUT, format!("upstream did not answer within {}", humantime(timeout)))
}

fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// The status and reason for an exchange that failed before its response head.
fn failure_reply(failure: &ExchangeFailure, upstream: &str) -> Response<ProxyBody> {
    match failure {
        ExchangeFailure::StreamLost => reply(StatusCode::BAD_GATEWAY, "tunnel client disconnected"),
        ExchangeFailure::Cancelled(r) => {
            reply(StatusCode::BAD_GATEWAY, format!("tunnel client cancelled the request: {r}"))
        }
        ExchangeFailure::Protocol(e) => reply(StatusCode::BAD_GATEWAY, format!("tunnel protocol error: {e}")),
        ExchangeFailure::Idle(_) => reply(StatusCode::GATEWAY_TIMEOUT, failure.to_string()),
        ExchangeFailure::Forward(why) => reply(StatusCode::BAD_GATEWAY, why.clone()),
        ExchangeFailure::Peer { kind, message } => match kind {
            Kind::UpstreamTimeout => {
                reply(StatusCode::GATEWAY_TIMEOUT, format!("upstream {upstream:?} timed out: {message}"))
            }
            Kind::UnknownUpstream => {
                reply(StatusCode::BAD_GATEWAY, format!("tunnel client has no upstream {upstream:?}"))
            }
            Kind::UpstreamUnreachable => {
                reply(StatusCode::BAD_GATEWAY, format!("upstream {upstream:?} unreachable: {message}"))
            }
            // Cut off mid-request at the client's grace deadline: the upstream
            // may have acted on it, so not 503 (which says "retry, nothing was done").
            Kind::ShuttingDown => reply(StatusCode::BAD_GATEWAY, "tunnel client shut down before the request finished"),
            _ => reply(StatusCode::BAD_GATEWAY, format!("upstream {upstream:?} failed: {message}")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_id_prefers_traceparent_then_request_id() {
        let mut h = HeaderMap::new();
        assert_eq!(trace_id(&h, "a-b"), "ab");
        h.insert("x-request-id", HeaderValue::from_static("req-7"));
        assert_eq!(trace_id(&h, "a-b"), "req-7");
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(trace_id(&h, "a-b"), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn forwarded_for_lines_are_joined_before_the_peer() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2, 10.0.0.3"));
        set_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), Scheme::Http, "a");
        let lines: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(lines, ["10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.1"]);
    }

    #[test]
    fn forwarded_headers_append() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        set_forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), Scheme::Https, "app.localhost:8080");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "app.localhost:8080");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}

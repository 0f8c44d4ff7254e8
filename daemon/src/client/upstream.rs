//! Forwarding an exchange to a local upstream through a pooled HTTP client,
//! and streaming the response back under the exchange's credit.

use super::h1;
use super::pool::{self, Pool, PoolError};
use crate::metrics::ClientMetrics;
use crate::tunnel::body::{send_body, InboundBody, SendError};
use crate::tunnel::exchange::{ExchangeGuard, ExchangeIo, Exchanges, NewRequest};
use crate::tunnel::upgrade;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{Either, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tunnel_lib::config::{ClientConfig, Upstream};
use tunnel_lib::frame::{self, strip_hop_by_hop, DEFAULT_EXCHANGE_WINDOW};
use tunnel_lib::proto::{self, exchange_error::Kind, tunnel_message::Payload};

/// Largest response head of an HTTP/1.1 upstream, and hyper's read buffer
/// for an Upgrade's connection.
const UPSTREAM_READ_BUFFER: usize = 64 << 10;
/// Added to the server's timeout for our own.
const TIMEOUT_BACKSTOP: Duration = Duration::from_secs(1);
/// Used when a request carries no timeout.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

type UpstreamBody = Either<InboundBody, Empty<Bytes>>;

/// The client's upstreams by name, and two connection pools: HTTP/1.1 and h2c.
pub struct Upstreams {
    targets: BTreeMap<String, Upstream>,
    metrics: Arc<ClientMetrics>,
    /// Each upstream's response-time histogram, looked up on its first
    /// answer (so that only upstreams that answered are exported, as before).
    durations: BTreeMap<String, OnceLock<prometheus_client::metrics::histogram::Histogram>>,
    /// Each upstream's request counters by status class (index: status /
    /// 100), made on first use, so that only the classes seen are exported.
    served: BTreeMap<String, [OnceLock<prometheus_client::metrics::counter::Counter>; 6]>,
    http1: Arc<Pool>,
    /// One multiplexed HTTP/2 connection per upstream (gRPC services).
    h2c: Client<HttpConnector, UpstreamBody>,
    /// Bound on connecting to a tcp:// upstream.
    connect_timeout: Duration,
}

impl Upstreams {
    /// `targets` (client.toml's `[upstreams]`), with the pools tuned by `cfg`.
    pub fn new(targets: BTreeMap<String, Upstream>, cfg: &ClientConfig, metrics: Arc<ClientMetrics>) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.upstream_connect_timeout));
        // hyper's read buffer grows to 400 KiB on a fast body and keeps it
        // while the exchange waits for credit: 0.4 MiB per stalled
        // download. Chunks cross the tunnel at 64 KiB at most anyway.
        let http1 = Pool::new(cfg.upstream_connect_timeout, cfg.upstream_idle_timeout, UPSTREAM_READ_BUFFER);
        let mut builder = Client::builder(TokioExecutor::new());
        builder.pool_idle_timeout(cfg.upstream_idle_timeout).pool_timer(TokioTimer::new());
        let h2c = builder
            .http2_only(true)
            .timer(TokioTimer::new())
            // A silently dead upstream connection is noticed, not waited on.
            .http2_keep_alive_interval(cfg.ping_interval)
            .http2_keep_alive_timeout(cfg.ping_timeout)
            // An exchange's window: HTTP/2's 64 KiB default would stall bulk streams.
            .http2_initial_stream_window_size(DEFAULT_EXCHANGE_WINDOW)
            .http2_initial_connection_window_size(4 * DEFAULT_EXCHANGE_WINDOW)
            .build(connector);
        let durations = targets.keys().map(|name| (name.clone(), OnceLock::new())).collect();
        let served = targets.keys().map(|name| (name.clone(), Default::default())).collect();
        Arc::new(Upstreams {
            targets,
            metrics,
            durations,
            served,
            http1,
            h2c,
            connect_timeout: cfg.upstream_connect_timeout,
        })
    }

    /// The upstream named `name`, when it is of the kind the exchange needs:
    /// a tcp:// one for a `[[tcp]]` connection, an http:// one otherwise.
    fn target(&self, name: &str, tcp: bool) -> Result<&Upstream, Failure> {
        let Some(target) = self.targets.get(name) else {
            return Err(Failure(Kind::UnknownUpstream, format!("no upstream named {name:?} in client.toml")));
        };
        if target.is_tcp() != tcp {
            let why = if tcp {
                format!("upstream {name:?} is not a tcp:// upstream; a [[tcp]] service needs one")
            } else {
                format!("upstream {name:?} is a tcp:// upstream, for [[tcp]] services only")
            };
            return Err(Failure(Kind::UpstreamFailed, why));
        }
        Ok(target)
    }

    /// Records how long `upstream` took to answer a request asked at `asked`.
    fn observe(&self, upstream: &str, asked: std::time::Instant) {
        if let Some(h) = self.durations.get(upstream) {
            let h = h.get_or_init(|| {
                self.metrics.upstream_duration.get_or_create(&vec![("upstream", upstream.to_string())]).clone()
            });
            h.observe(asked.elapsed().as_secs_f64());
        }
    }

    /// Sends an Upgrade request on a connection of its own, through hyper,
    /// which hands the connection over after a 101. Upgrades are rare and
    /// their connections are not reused, so none is pooled.
    async fn upgrade_request(
        &self,
        base: &Uri,
        req: Request<UpstreamBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, PoolError> {
        let tcp = pool::connect(base.authority().map_or("", |a| a.as_str()), self.connect_timeout).await?;
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(UPSTREAM_READ_BUFFER)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        // Owned by its sender and the upgrade: ends when the upstream closes
        // the connection, the request is dropped, or hands it over after a 101.
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!("upstream connection ended: {e}");
            }
        });
        sender.send_request(req).await.map_err(|e| PoolError::Failed(source_chain(&e)))
    }

    /// Counts a request to `upstream` answered with `status`.
    fn count(&self, upstream: &str, status: u16) {
        let Some(classes) = self.served.get(upstream) else { return };
        // 1xx to 5xx; the odd status past 599 counts with the 5xx.
        let i = usize::from(status / 100).clamp(1, classes.len() - 1);
        let labels = || vec![("upstream", upstream.to_string()), ("class", format!("{i}xx"))];
        classes[i].get_or_init(|| self.metrics.requests.get_or_create(&labels()).clone()).inc();
    }

    /// The names, for config sync.
    pub fn names(&self) -> Vec<String> {
        self.targets.keys().cloned().collect()
    }
}

/// Why forwarding failed before a response head.
struct Failure(Kind, String);

/// Serves one exchange: forwards the request, streams the response back.
/// Returns when the exchange is complete, failed or cancelled.
pub async fn serve(up: Arc<Upstreams>, exchanges: Arc<Exchanges>, new: NewRequest) {
    let NewRequest { head, io, trace_id } = new;
    let request_id = io.request_id.clone();
    let upstream_name = head.upstream.clone();
    // Dropped on every way out: frees the exchange, and cancels it at the
    // server if it is still open (e.g. the upstream answered before reading
    // the whole request body).
    let _guard = ExchangeGuard::new(exchanges.clone(), request_id.clone());
    let cancel = io.cancel.clone();
    // The status the public client was sent, once the head went back.
    let mut answered = None;
    let mut failed = false;
    tokio::select! {
        // Cancelled by the server (public client gone): dropping the request
        // future closes the upstream connection, so the upstream sees it too.
        _ = cancel.cancelled() => {
            tracing::debug!(request_id = %request_id, trace_id = %trace_id, "exchange cancelled; upstream request dropped");
        }
        r = async {
            if head.tcp {
                // Boxed, as forward's hyper path is.
                Box::pin(connect_tcp(&up, &exchanges, head, io, &mut answered)).await
            } else {
                forward(&up, &exchanges, head, io, &mut answered).await
            }
        } => {
            if let Err(Failure(kind, message)) = r {
                tracing::info!(request_id = %request_id, trace_id = %trace_id, ?kind, "{message}");
                let labels = vec![("upstream", upstream_name.clone()), ("kind", kind.as_str_name().trim_start_matches("KIND_").to_ascii_lowercase())];
                up.metrics.upstream_errors.get_or_create(&labels).inc();
                failed = kind != Kind::ShuttingDown;
                exchanges.fail(&request_id, kind, message);
            }
        }
    }
    // Counted once, as the public client saw it: the status it was sent, or
    // for a failure before the head, the 5xx the server answers it with.
    match (answered, failed) {
        (Some(status), _) => up.count(&upstream_name, status),
        (None, true) => up.count(&upstream_name, 502),
        (None, false) => {}
    }
}

async fn forward(
    up: &Upstreams,
    exchanges: &Arc<Exchanges>,
    head: proto::HttpRequest,
    io: ExchangeIo,
    answered: &mut Option<u16>,
) -> Result<(), Failure> {
    let target = up.target(&head.upstream, false)?;
    if target.http2 || !head.upgrade.is_empty() {
        // Boxed: hyper's request and upgrade futures are large, and the
        // exchange's future, which is as large as its largest path, is
        // copied whole into its task at every spawn (issue 20).
        return Box::pin(forward_hyper(up, exchanges, target, head, io, answered)).await;
    }
    let upstream_authority = target.url.authority().map_or("", |a| a.as_str());
    let request = h1::RequestHead {
        method: &head.method,
        target: &head.path_and_query,
        // HTTP/2 public requests carry the host as :authority only.
        authority: if head.authority.is_empty() { upstream_authority } else { &head.authority },
        block: &head.header_block,
        listed: &head.headers,
        has_body: !head.end_of_stream,
    };
    let mut bytes = Vec::new();
    let framing = h1::encode_request(&request, &mut bytes).map_err(|e| Failure(Kind::Protocol, e.to_string()))?;
    let ExchangeIo { request_id, credit, cancel, max_chunk, body: inbound } = io;
    let idempotent = matches!(head.method.as_str(), "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE");
    // Told its length, the body is whole once that many bytes were read,
    // and the writer need not wait for its end frame.
    let length = match framing {
        h1::RequestFraming::Length(n) => Some(n),
        _ => None,
    };
    let req = pool::Request {
        head: bytes,
        body: (!head.end_of_stream).then(|| (inbound.expect_len(length), framing)),
        head_request: head.method == "HEAD",
        retryable: idempotent && head.end_of_stream,
    };
    let timeout = answer_timeout(&head);
    let asked = std::time::Instant::now();
    let sent = up.http1.send(upstream_authority, req);
    let (resp, mut body) = match tokio::time::timeout(timeout, sent).await {
        Err(_) => return Err(too_late(&head.upstream, timeout)),
        Ok(Err(PoolError::Connect(why))) => {
            return Err(Failure(Kind::UpstreamUnreachable, format!("cannot connect to {}: {why}", target.url)))
        }
        Ok(Err(PoolError::Failed(why))) => return Err(Failure(Kind::UpstreamFailed, why)),
        Ok(Ok(r)) => r,
    };
    up.observe(&head.upstream, asked);
    *answered = Some(resp.status);
    let mut end_of_stream = hyper::body::Body::is_end_stream(&body);
    let mut inline = Bytes::new();
    if !end_of_stream && exchanges.inline_body() {
        // A small body read with its head goes in the head, paying its
        // credit as a body frame would (a fresh exchange has its window).
        if let Some(n) = body.whole_buffered(INLINE_MAX.min(max_chunk)) {
            if let Ok(p) = credit.try_acquire_many(frame::frame_cost(n)) {
                p.forget();
                inline = body.take_whole().ok_or_else(|| {
                    Failure(Kind::UpstreamFailed, "upstream response body failed: not as buffered".into())
                })?;
                end_of_stream = true;
            }
        }
    }
    exchanges.count_sent(inline.len());
    let (header_block, headers) = exchanges.block_for_peer(resp.block);
    let resp_head = proto::HttpResponse {
        status: u32::from(resp.status),
        headers,
        end_of_stream,
        upgrade: String::new(),
        body: inline,
        header_block,
    };
    exchanges
        .outbound()
        .send_data(exchanges.message(&request_id, Payload::HttpResponse(resp_head)))
        .await
        .map_err(|_| Failure(Kind::ShuttingDown, "stream closed".into()))?;
    if end_of_stream {
        exchanges.finish_outbound(&request_id);
        body.finish().await;
        return Ok(());
    }
    // Boxed: small responses, the most, end above.
    match Box::pin(send_body(&mut body, &request_id, &credit, &cancel, exchanges, max_chunk, None)).await {
        Ok(_) => {
            body.finish().await;
            Ok(())
        }
        Err(SendError::Cancelled) => Ok(()),
        // No limit is passed, so TooLarge cannot happen; treated as a failure all the same.
        Err(e @ (SendError::Body(_) | SendError::TooLarge(_))) => {
            Err(Failure(Kind::UpstreamFailed, format!("upstream response body failed: {e}")))
        }
    }
}

/// How long the upstream has to answer: the server's deadline is
/// authoritative (it answers 504 and cancels); ours, a little later, only
/// frees the upstream request if the cancel is lost.
fn answer_timeout(head: &proto::HttpRequest) -> Duration {
    let timeout = if head.timeout_ms == 0 { DEFAULT_TIMEOUT } else { Duration::from_millis(head.timeout_ms) };
    timeout + TIMEOUT_BACKSTOP
}

fn too_late(upstream: &str, timeout: Duration) -> Failure {
    Failure(Kind::UpstreamTimeout, format!("upstream {upstream:?} did not answer within {timeout:?}"))
}

/// An exchange for an h2c upstream, or an HTTP/1.1 Upgrade, through hyper's
/// client: multiplexed HTTP/2, and the hand-over of an upgraded connection.
async fn forward_hyper(
    up: &Upstreams,
    exchanges: &Arc<Exchanges>,
    target: &Upstream,
    head: proto::HttpRequest,
    io: ExchangeIo,
    answered: &mut Option<u16>,
) -> Result<(), Failure> {
    let timeout = answer_timeout(&head);
    let bad = |what: &str| Failure(Kind::Protocol, format!("invalid {what} in request head"));
    let method = Method::from_bytes(head.method.as_bytes()).map_err(|_| bad("method"))?;
    let base = &target.url;
    let uri = if target.http2 {
        Uri::builder()
            .scheme(base.scheme_str().unwrap_or("http"))
            .authority(base.authority().map_or("", |a| a.as_str()))
            .path_and_query(head.path_and_query.as_str())
            .build()
            .ok()
    } else {
        // An Upgrade goes out as HTTP/1.1 sends it: origin-form.
        Uri::try_from(head.path_and_query.as_str()).ok()
    };
    let uri = match uri {
        Some(u) if u.scheme().is_some() || head.path_and_query.starts_with('/') || head.path_and_query == "*" => u,
        _ => return Err(bad("path")),
    };
    let mut headers =
        frame::head_headers(&head.header_block, head.headers).map_err(|e| Failure(Kind::Protocol, e.to_string()))?;
    strip_hop_by_hop(&mut headers);
    if target.http2 {
        // HTTP/2 carries the host as :authority, which is the upstream's own
        // address here; a Host header naming the public host beside it would
        // be two conflicting hosts (RFC 9113 8.3.1). X-Forwarded-Host keeps it.
        headers.remove(header::HOST);
    } else if !headers.contains_key(header::HOST) {
        // HTTP/2 public requests carry the host as :authority only.
        let host =
            if head.authority.is_empty() { base.authority().map_or("", |a| a.as_str()) } else { &head.authority };
        if let Ok(v) = HeaderValue::from_str(host) {
            headers.insert(header::HOST, v);
        }
    }
    let ExchangeIo { request_id, credit, cancel, max_chunk, body: inbound } = io;
    // An upgrade's body frames are the upgraded connection's, after a 101.
    let upgrade = (!head.upgrade.is_empty()).then_some(head.upgrade.as_str());
    if upgrade.is_some() && target.http2 {
        let why = format!("upstream {:?} is HTTP/2 (h2c); an Upgrade needs an HTTP/1.1 upstream", head.upstream);
        return Err(Failure(Kind::UpstreamFailed, why));
    }
    let (body, held) = match upgrade {
        Some(protocol) => {
            upgrade::restore_headers(&mut headers, protocol);
            (Either::Right(Empty::new()), Some(inbound))
        }
        None if head.end_of_stream => (Either::Right(Empty::new()), None),
        None => (Either::Left(inbound), None),
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;

    let asked = std::time::Instant::now();
    let unreachable = |why: String| Failure(Kind::UpstreamUnreachable, format!("cannot connect to {base}: {why}"));
    let sent = async {
        if target.http2 {
            up.h2c.request(req).await.map_err(|e| {
                if e.is_connect() {
                    unreachable(source_chain(&e))
                } else {
                    Failure(Kind::UpstreamFailed, source_chain(&e))
                }
            })
        } else {
            up.upgrade_request(base, req).await.map_err(|e| match e {
                PoolError::Connect(why) => unreachable(why),
                PoolError::Failed(why) => Failure(Kind::UpstreamFailed, why),
            })
        }
    };
    let resp = match tokio::time::timeout(timeout, sent).await {
        Err(_) => return Err(too_late(&head.upstream, timeout)),
        Ok(r) => r?,
    };
    up.observe(&head.upstream, asked);
    *answered = Some(resp.status().as_u16());
    if let (Some(inbound), StatusCode::SWITCHING_PROTOCOLS) = (held, resp.status()) {
        let io = ExchangeIo { request_id, credit, cancel, max_chunk, body: inbound };
        return switch(exchanges, &head.upstream, resp, io).await;
    }
    let (parts, mut body) = resp.into_parts();
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    let mut end_of_stream = hyper::body::Body::is_end_stream(&body);
    let inline = if end_of_stream || !exchanges.inline_body() {
        Inline::default()
    } else {
        take_inline(&mut body, &credit, max_chunk)
    };
    if let Some(e) = &inline.failed {
        return Err(Failure(Kind::UpstreamFailed, format!("upstream response body failed: {e}")));
    }
    end_of_stream |= inline.ended && inline.trailers.is_none();
    exchanges.count_sent(inline.data.len());
    let (header_block, headers) = exchanges.headers_for_peer(&headers);
    let resp_head = proto::HttpResponse {
        status: u32::from(parts.status.as_u16()),
        headers,
        end_of_stream,
        upgrade: String::new(),
        body: inline.data,
        header_block,
    };
    let closed = |_| Failure(Kind::ShuttingDown, "stream closed".into());
    exchanges
        .outbound()
        .send_data(exchanges.message(&request_id, Payload::HttpResponse(resp_head)))
        .await
        .map_err(closed)?;
    if end_of_stream {
        exchanges.finish_outbound(&request_id);
        return Ok(());
    }
    if inline.ended {
        // It ended with trailers: they go in the end frame.
        let end =
            proto::BodyEnd { trailers: inline.trailers.as_ref().map(frame::headers_to_proto).unwrap_or_default() };
        exchanges.outbound().send_data(exchanges.message(&request_id, Payload::End(end))).await.map_err(closed)?;
        exchanges.finish_outbound(&request_id);
        return Ok(());
    }
    match send_body(body, &request_id, &credit, &cancel, exchanges, max_chunk, None).await {
        Ok(_) | Err(SendError::Cancelled) => Ok(()),
        // No limit is passed, so TooLarge cannot happen; treated as a failure all the same.
        Err(e @ (SendError::Body(_) | SendError::TooLarge(_))) => {
            Err(Failure(Kind::UpstreamFailed, format!("upstream response body failed: {e}")))
        }
    }
}

/// Response bytes sent in the head at most: a small response, the case
/// where a message less per frame pays (issue 20).
const INLINE_MAX: usize = 16 << 10;

/// What a response body had ready at once, for its head.
#[derive(Default)]
struct Inline {
    data: Bytes,
    /// The body ended within it.
    ended: bool,
    trailers: Option<http::HeaderMap>,
    failed: Option<hyper::Error>,
}

/// Takes the body bytes that are ready now (hyper usually read a small
/// response's body with its head), up to INLINE_MAX and no more than the
/// body's announced size, paying their credit as a body frame would. Stops
/// at the first frame not ready: the rest goes as body frames.
fn take_inline(body: &mut hyper::body::Incoming, credit: &tokio::sync::Semaphore, max_chunk: usize) -> Inline {
    use hyper::body::Body as _;
    let mut inline = Inline::default();
    // Only a body known to fit: a frame taken can not be put back.
    let limit = INLINE_MAX.min(max_chunk) as u64;
    let upper = match body.size_hint().upper() {
        Some(n) if n > 0 && n <= limit => n as usize,
        _ => return inline,
    };
    // Credit for all of it first: a fresh exchange has its whole window.
    let reserved = frame::frame_cost(upper);
    match credit.try_acquire_many(reserved) {
        Ok(p) => p.forget(),
        Err(_) => return inline,
    }
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut data = bytes::BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        match std::pin::Pin::new(&mut *body).poll_frame(&mut cx) {
            std::task::Poll::Ready(Some(Ok(f))) => match f.into_data() {
                Ok(d) => {
                    // One chunk (the usual case) is kept as it is, not copied.
                    match first.take() {
                        None if data.is_empty() => first = Some(d),
                        prev => {
                            if let Some(p) = prev {
                                data.extend_from_slice(&p);
                            }
                            data.extend_from_slice(&d);
                        }
                    }
                }
                Err(f) => {
                    inline.trailers = f.into_trailers().ok();
                    inline.ended = true;
                    break;
                }
            },
            std::task::Poll::Ready(Some(Err(e))) => {
                inline.failed = Some(e);
                break;
            }
            std::task::Poll::Ready(None) => {
                inline.ended = true;
                break;
            }
            std::task::Poll::Pending => break,
        }
        if body.is_end_stream() {
            inline.ended = true;
            break;
        }
    }
    inline.data = first.unwrap_or_else(|| data.freeze());
    // What was not used goes back (all of it when nothing was ready).
    let used = if inline.data.is_empty() { 0 } else { frame::frame_cost(inline.data.len()) };
    credit.add_permits((reserved - used.min(reserved)) as usize);
    inline
}

/// The upstream switched protocols: answer 101, then carry the upgraded
/// connection until both sides have closed it.
async fn switch(
    exchanges: &Arc<Exchanges>,
    upstream: &str,
    mut resp: http::Response<hyper::body::Incoming>,
    io: ExchangeIo,
) -> Result<(), Failure> {
    let upgraded = hyper::upgrade::on(&mut resp)
        .await
        .map_err(|e| Failure(Kind::UpstreamFailed, format!("upstream {upstream:?} upgrade failed: {e}")))?;
    let protocol = resp.headers().get(header::UPGRADE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut headers = resp.headers().clone();
    strip_hop_by_hop(&mut headers);
    let (header_block, headers) = exchanges.headers_for_peer(&headers);
    let head = proto::HttpResponse {
        status: u32::from(StatusCode::SWITCHING_PROTOCOLS.as_u16()),
        headers,
        end_of_stream: false,
        upgrade: protocol.clone(),
        body: Bytes::new(),
        header_block,
    };
    let request_id = io.request_id.clone();
    exchanges
        .outbound()
        .send_data(exchanges.message(&request_id, Payload::HttpResponse(head)))
        .await
        .map_err(|_| Failure(Kind::ShuttingDown, "stream closed".into()))?;
    exchanges.mark_upgraded(&request_id);
    tracing::info!(request_id = %request_id, %upstream, %protocol, "upgraded connection open");
    let outcome = upgrade::pipe(TokioIo::new(upgraded), io, exchanges).await;
    let (sent, received) = (outcome.moved.sent, outcome.moved.received);
    match outcome.error {
        None => tracing::info!(request_id = %request_id, sent, received, "upgraded connection closed"),
        // The guard in `serve` tells the server.
        Some(e) => tracing::info!(request_id = %request_id, sent, received, "upgraded connection ended: {e}"),
    }
    Ok(())
}

/// A `[[tcp]]` connection: connects to the tcp:// upstream (after a PROXY
/// protocol v2 header when the service asks for one), says so with status
/// 200, and carries the bytes both ways until both sides are done.
async fn connect_tcp(
    up: &Upstreams,
    exchanges: &Arc<Exchanges>,
    head: proto::HttpRequest,
    io: ExchangeIo,
    answered: &mut Option<u16>,
) -> Result<(), Failure> {
    use tokio::io::AsyncWriteExt as _;
    let target = up.target(&head.upstream, true)?;
    let addr = target.url.authority().map_or(String::new(), |a| a.as_str().to_string());
    let unreachable =
        |why: String| Failure(Kind::UpstreamUnreachable, format!("cannot connect to tcp://{addr}: {why}"));
    let mut conn = match tokio::time::timeout(up.connect_timeout, tokio::net::TcpStream::connect(&addr)).await {
        Err(_) => return Err(unreachable(format!("no answer within {:?}", up.connect_timeout))),
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Ok(Ok(c)) => c,
    };
    let _ = conn.set_nodelay(true);
    if head.proxy_protocol {
        let header = proxy_v2(&head.client_addr, &head.service_addr).map_err(|e| Failure(Kind::Protocol, e))?;
        conn.write_all(&header).await.map_err(|e| unreachable(format!("writing the PROXY header: {e}")))?;
    }
    let request_id = io.request_id.clone();
    let connected = proto::HttpResponse { status: 200, ..Default::default() };
    exchanges
        .outbound()
        .send_data(exchanges.message(&request_id, Payload::HttpResponse(connected)))
        .await
        .map_err(|_| Failure(Kind::ShuttingDown, "stream closed".into()))?;
    *answered = Some(200);
    exchanges.mark_upgraded(&request_id);
    tracing::info!(request_id = %request_id, upstream = %head.upstream, client = %head.client_addr, "tcp connection open");
    let outcome = upgrade::pipe(conn, io, exchanges).await;
    let (sent, received) = (outcome.moved.sent, outcome.moved.received);
    match outcome.error {
        None => tracing::info!(request_id = %request_id, sent, received, "tcp connection closed"),
        // The guard in `serve` tells the server.
        Some(e) => tracing::info!(request_id = %request_id, sent, received, "tcp connection ended: {e}"),
    }
    Ok(())
}

/// A PROXY protocol v2 header (the `ppp` crate) saying that `client`
/// connected to `service` over TCP.
fn proxy_v2(client: &str, service: &str) -> Result<Vec<u8>, String> {
    use ppp::v2::{Builder, Command, Protocol, Version};
    let parse = |s: &str| s.parse::<std::net::SocketAddr>().map_err(|_| format!("invalid address {s:?} for PROXY"));
    let (src, dst) = (parse(client)?, parse(service)?);
    // Both of one family, as v2 wants: an IPv4 client of an IPv6 socket is mapped.
    let (src, dst) = match (src, dst) {
        (std::net::SocketAddr::V4(s), std::net::SocketAddr::V6(d)) => {
            (std::net::SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()), std::net::SocketAddr::V6(d))
        }
        (std::net::SocketAddr::V6(s), std::net::SocketAddr::V4(d)) => {
            (std::net::SocketAddr::V6(s), std::net::SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port()))
        }
        pair => pair,
    };
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .build()
        .map_err(|e| format!("building the PROXY header: {e}"))
}

/// An error with its causes, on one line.
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

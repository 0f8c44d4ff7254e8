//! `[[tcp]]` services: each accepted connection is an exchange whose bytes
//! flow both ways as an upgraded HTTP connection's do (the same
//! per-exchange credit, half-closes, cancellation and idle timeout), to
//! the `tcp://` upstream of a client of the service's group. Listen
//! addresses are fixed at start; everything else (group, upstream,
//! allow/deny, limits) is read from the config in force at each accept.

use super::Shared;
use crate::tunnel::exchange::ExchangeGuard;
use crate::tunnel::{next_request_id, upgrade};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tunnel_lib::config::TcpService;
use tunnel_lib::frame::{self, now_ms};
use tunnel_lib::introspection::RequestInfo;
use tunnel_lib::proto::{self, tunnel_message::Payload};

/// How long a client may take to reach its upstream and say so.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// Accepts the connections of the service configured at `listen` (entry
/// `index` of `[[tcp]]` at start) until `stop` fires; then gives open ones
/// the shutdown grace, and closes them.
pub async fn run(
    shared: Arc<Shared>,
    index: usize,
    listen: SocketAddr,
    listener: TcpListener,
    stop: CancellationToken,
) {
    let (connections, closing) = (TaskTracker::new(), CancellationToken::new());
    let open = Arc::new(AtomicUsize::new(0));
    let public = listener.local_addr().unwrap_or(listen);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: pause rather than spin.
                    tracing::warn!(%listen, "tcp service accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let cfg = shared.config();
        let Some(service) = cfg.tcp_service(index, listen).cloned() else {
            tracing::warn!(%listen, %peer, "no [[tcp]] service at this address any more (removed by a reload; the port closes at the next restart): connection closed");
            continue;
        };
        let started = Instant::now();
        let mut rec = RequestInfo {
            unix_ms: now_ms(),
            method: "TCP".into(),
            host: service.label.clone(),
            rule: service.label.clone(),
            group: service.group.clone(),
            remote_addr: peer.ip().to_string(),
            request_id: next_request_id(),
            ..Default::default()
        };
        rec.trace_id = rec.request_id.clone();
        if !service.addresses.admits(peer.ip()) {
            tracing::info!(service = %service.label, %peer, "address may not use this service: connection closed");
            refused(&shared, rec, &service);
            continue;
        }
        if open.load(Ordering::Relaxed) >= service.max_connections {
            tracing::warn!(service = %service.label, %peer, max = service.max_connections, "max_connections reached: connection closed");
            rec.error = format!("over max_connections ({})", service.max_connections);
            rec.status = 503;
            shared.record_request(rec, started.elapsed(), None);
            continue;
        }
        let _ = tcp.set_nodelay(true);
        open.fetch_add(1, Ordering::Relaxed);
        let (shared, open, closing) = (shared.clone(), open.clone(), closing.clone());
        // Owned by the listener's tracker: ends when either side closes, at
        // the idle timeout, or at the end of the shutdown grace.
        connections.spawn(async move {
            carry(&shared, &service, tcp, peer, public, rec, started, &closing).await;
            open.fetch_sub(1, Ordering::Relaxed);
        });
    }
    drop(listener);
    connections.close();
    let grace = shared.config().server.shutdown_grace;
    if tokio::time::timeout(grace, connections.wait()).await.is_err() {
        tracing::info!(%listen, open = connections.len(), "tcp connections still open after the grace period; closing them");
        closing.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), connections.wait()).await;
    }
}

/// Records a connection refused by the service's allow/deny.
fn refused(shared: &Shared, mut rec: RequestInfo, service: &TcpService) {
    rec.status = 403;
    rec.refused = tunnel_lib::policy::Refusal::Address.as_str().into();
    rec.error = format!("address {} may not use this service", rec.remote_addr);
    let labels = vec![("rule", service.label.clone()), ("reason", rec.refused.clone())];
    shared.metrics.refused.get_or_create(&labels).inc();
    shared.record_request(rec, Duration::ZERO, None);
}

/// One connection: an exchange to a client of the group, its upstream
/// connected, then the bytes both ways until both sides are done.
#[allow(clippy::too_many_arguments)]
async fn carry(
    shared: &Arc<Shared>,
    service: &TcpService,
    tcp: TcpStream,
    peer: SocketAddr,
    public: SocketAddr,
    mut rec: RequestInfo,
    started: Instant,
    closing: &CancellationToken,
) {
    let cfg = shared.config();
    let group = cfg.group(&service.group);
    let window = group.map_or(frame::DEFAULT_EXCHANGE_WINDOW, |g| g.exchange_window);
    let max_in_flight = group.map_or(tunnel_lib::config::DEFAULT_MAX_IN_FLIGHT, |g| g.max_in_flight) as usize;
    drop(cfg);
    let request_id = rec.request_id.clone();
    let mut opened = None;
    // A stream can end between the pick and the open: then pick again.
    for _ in 0..3 {
        match shared.registry.pick(&service.group, max_in_flight) {
            Ok(stream) => {
                if let Some(x) = stream.exchanges.open(&request_id, window, service.idle_timeout) {
                    opened = Some((stream, x));
                    break;
                }
            }
            Err(e) => {
                rec.error = format!("no tunnel client can take it: {e:?}");
                break;
            }
        }
    }
    let Some((stream, (io, head_rx))) = opened else {
        // Dropping the connection closes it: nothing to answer in raw TCP.
        tracing::info!(service = %service.label, %peer, group = %service.group, "no client of the group connected: connection closed");
        if rec.error.is_empty() {
            rec.error = "no tunnel client connected".into();
        }
        rec.status = 503;
        shared.record_request(rec, started.elapsed(), None);
        return;
    };
    rec.client_id = stream.client_id.clone();
    rec.stream_id = stream.stream_id.clone();
    let exchanges = stream.exchanges.clone();
    // From here, dropping the guard cancels the exchange at the client.
    let guard = ExchangeGuard::new(exchanges.clone(), io.request_id.clone());
    let head = proto::HttpRequest {
        upstream: service.upstream.clone(),
        timeout_ms: CONNECT_WAIT.as_millis() as u64,
        window,
        tcp: true,
        client_addr: peer.to_string(),
        service_addr: public.to_string(),
        proxy_protocol: service.proxy_protocol,
        ..Default::default()
    };
    let msg = exchanges.message(&request_id, Payload::HttpRequest(head));
    let connected = async {
        exchanges.outbound().send_data(msg).await.map_err(|_| "tunnel client disconnected".to_string())?;
        match head_rx.await {
            Err(_) => Err("tunnel client disconnected".to_string()),
            Ok(Err(failure)) => Err(failure.to_string()),
            Ok(Ok(h)) if h.status == 200 => Ok(()),
            Ok(Ok(h)) => Err(format!("tunnel client answered status {}", h.status)),
        }
    };
    let outcome = tokio::select! {
        _ = closing.cancelled() => Err("server shutting down".to_string()),
        r = tokio::time::timeout(CONNECT_WAIT, connected) => match r {
            Err(_) => Err(format!("the upstream was not connected within {CONNECT_WAIT:?}")),
            Ok(r) => r,
        },
    };
    if let Err(e) = outcome {
        // The public connection closes at once: its client sees a reset or
        // EOF, as it would from the upstream itself.
        tracing::info!(request_id = %request_id, service = %service.label, %peer, "tcp connection not carried: {e}");
        rec.status = 502;
        rec.error = e;
        shared.record_request(rec, started.elapsed(), None);
        return;
    }
    exchanges.mark_upgraded(&request_id);
    rec.status = 200;
    rec.upgrade = "tcp".into();
    tracing::info!(request_id = %request_id, service = %service.label, %peer, client = %rec.client_id, "tcp connection open");
    let pipe = upgrade::pipe(tcp, io, &exchanges);
    let result = tokio::select! {
        _ = closing.cancelled() => Err("server shutting down".to_string()),
        o = pipe => Ok(o),
    };
    let error = match result {
        Ok(o) => {
            rec.bytes_in = o.moved.sent;
            rec.bytes_out = o.moved.received;
            o.error
        }
        Err(e) => Some(e),
    };
    match error {
        None => guard.disarm(),
        Some(e) => {
            rec.error = e;
            drop(guard);
        }
    }
    tracing::info!(request_id = %request_id, bytes_in = rec.bytes_in, bytes_out = rec.bytes_out, error = %rec.error, "tcp connection closed");
    let took = started.elapsed();
    rec.duration_ms = took.as_millis() as u64;
    shared.record_request(rec, took, None);
}

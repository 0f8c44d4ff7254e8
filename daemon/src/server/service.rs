//! The gRPC side of the server: authentication, stream registration,
//! heartbeats, config sync, and the reader task of every stream.

use super::events::About;
use super::registry::{RegisterError, Registry, StreamHandle};
use super::Shared;
use crate::tunnel::exchange::{payload_name, ExchangeFailure, Exchanges, Role};
use crate::tunnel::link::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE, STREAM_WINDOW};
use crate::tunnel::outbound::{Outbound, ServerOutbound};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status, Streaming};
use tunnel_lib::config::ConfigPush;
use tunnel_lib::frame::now_ms;
use tunnel_lib::introspection::EventKind;
use tunnel_lib::proto::tunnel_service_server::{TunnelService, TunnelServiceServer};
use tunnel_lib::proto::{
    tunnel_message::Payload, ConfigSyncRequest, ConfigSyncResponse, Direction, Drain, StreamOpenRequest,
    StreamOpenResponse, StreamType, TunnelMessage,
};
use tunnel_lib::GROUP_METADATA;

/// Bound on one gRPC header block on the link (h2 would default to 16 MiB).
const LINK_MAX_HEADER_LIST: u32 = 64 << 10;

/// Serves the tunnel gRPC service on `listener` until `stop` fires.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) -> anyhow::Result<()> {
    let cfg = shared.config();
    let s = &cfg.server;
    let svc_shared = shared.clone();
    let svc = TunnelServiceServer::new(TunnelSvc { shared })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = super::accept::link_connections(svc_shared, listener, stop.clone());
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(s.max_streams_per_connection))
        // Ours, not the stack's: tonic passes no cap on local error resets
        // unless told (turning that protection off), and h2's own defaults
        // may change under us.
        .http2_max_pending_accept_reset_streams(Some(s.h2_max_remote_resets))
        .http2_max_local_error_reset_streams(Some(s.h2_max_local_resets))
        // Only metadata travels in gRPC headers: a peer sending more is hostile.
        .http2_max_header_list_size(LINK_MAX_HEADER_LIST)
        .http2_keepalive_interval(Some(s.link_ping_interval))
        .http2_keepalive_timeout(Some(s.link_ping_timeout))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

/// The TunnelService implementation.
pub struct TunnelSvc {
    shared: Arc<Shared>,
}

fn bearer(md: &MetadataMap) -> &str {
    md.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("")
}

impl TunnelSvc {
    /// The caller's group, if its token is that group's.
    fn authenticate(&self, md: &MetadataMap, peer: Option<SocketAddr>) -> Result<String, Status> {
        let group = md.get(GROUP_METADATA).and_then(|v| v.to_str().ok()).unwrap_or("");
        let cfg = self.shared.config();
        match cfg.group(group) {
            Some(g) if g.token.matches(bearer(md).as_bytes()) => Ok(group.to_string()),
            _ => {
                tracing::warn!(peer = ?peer, group, "authentication failed: unknown group or wrong token");
                self.shared.metrics.auth_failures.inc();
                Err(Status::unauthenticated("unknown group or wrong token"))
            }
        }
    }

    /// The group's config for a client; `warn` logs the upstreams it lacks.
    fn sync_response(
        &self,
        client_id: &str,
        group: &str,
        req: &ConfigSyncRequest,
        warn: bool,
    ) -> Result<ConfigSyncResponse, Status> {
        let cfg = self.shared.config();
        let (version, config) = cfg.group_sync(group).ok_or_else(|| Status::not_found("group no longer configured"))?;
        let missing: Vec<String> =
            config.routes.iter().filter(|r| !req.upstreams.contains(&r.upstream)).map(|r| r.upstream.clone()).collect();
        if warn && !missing.is_empty() {
            tracing::warn!(client = client_id, group, ?missing, "client lacks upstreams that its group's rules use");
        }
        Ok(ConfigSyncResponse {
            config_version: version,
            config: Some(config),
            server_id: self.shared.server_id.clone(),
            missing_upstreams: missing,
            ..Default::default()
        })
    }

    async fn open_stream(
        &self,
        req: Request<Streaming<TunnelMessage>>,
        rpc_type: StreamType,
    ) -> Result<Response<ServerOutbound>, Status> {
        let (peer, probe) = super::accept::link_of(&req);
        let group = self.authenticate(req.metadata(), peer)?;
        let mut inbound = req.into_inner();
        let bound = self.shared.config().server.registration_timeout;
        let first = tokio::time::timeout(bound, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no registration within {bound:?}")))??;
        let open = match first.and_then(|m| m.payload) {
            Some(Payload::StreamOpen(o)) => o,
            _ => return Err(Status::invalid_argument("the first message must be a StreamOpen")),
        };
        let stream_type = StreamType::try_from(open.stream_type).unwrap_or(StreamType::Unspecified);
        let type_ok = match rpc_type {
            StreamType::Control => stream_type == StreamType::Control,
            _ => stream_type == StreamType::Http,
        };
        if !type_ok || open.stream_id.is_empty() || open.client_id.is_empty() || open.group != group {
            tracing::warn!(peer = ?peer, client = %open.client_id, "invalid registration: stream type, ids or group");
            return Err(Status::invalid_argument(
                "StreamOpen must carry stream_id, client_id, its group and the RPC's stream type",
            ));
        }

        let cancel = self.shared.streams.child_token();
        let (out, outbound) = Outbound::new(cancel.clone());
        let exchanges = Exchanges::new(out, Role::Server, open.client_id.clone());
        exchanges.set_header_block(open.header_block);
        let handle = Arc::new(
            StreamHandle::new(
                open.stream_id.clone(),
                open.client_id.clone(),
                group.clone(),
                stream_type,
                open.session_id.clone(),
                peer,
                exchanges,
                cancel,
            )
            .with_link(probe, open.link_options.clone()),
        );
        let stale = self
            .shared
            .registry
            .register(handle.clone(), &open.version, &open.config_version, open.session_started_ms)
            .map_err(|e| {
                tracing::warn!(peer = ?peer, client = %open.client_id, group = %group, "registration refused: {e}");
                match e {
                    RegisterError::StaleSession => Status::failed_precondition(e.to_string()),
                    _ => Status::already_exists(e.to_string()),
                }
            })?;
        let replaced = stale.len();
        for old in stale {
            tracing::info!(stream = %old.stream_id, client = %old.client_id, "closing a stream the client left behind");
            old.cancel.cancel();
        }
        if stream_type == StreamType::Control {
            let about = About { client_id: &open.client_id, group: &group, stream_id: &open.stream_id };
            let from = peer.map_or_else(|| "?".to_string(), |p| p.to_string());
            let who = format!("version {} from {from}, session {}", open.version, open.session_id);
            let events = &self.shared.events;
            if replaced > 0 {
                let detail = format!("a new session replaced the previous one ({replaced} streams closed); {who}");
                events.record(EventKind::Reconnected, about, detail);
                events.seen_before(&open.client_id);
            } else if events.seen_before(&open.client_id) {
                events.record(EventKind::Reconnected, about, format!("back after its control stream ended; {who}"));
            } else {
                events.record(EventKind::Connected, about, who);
            }
        }
        tracing::info!(stream = %open.stream_id, client = %open.client_id, group = %group, r#type = ?stream_type, peer = ?peer, "stream registered");
        self.ack(&handle, &open);
        let shared = self.shared.clone();
        self.shared.tasks.spawn(read_stream(shared, handle, inbound));
        Ok(Response::new(ServerOutbound(outbound)))
    }

    fn ack(&self, handle: &StreamHandle, open: &StreamOpenRequest) {
        ack(&self.shared, handle, open);
    }
}

/// Acknowledges a registration or heartbeat, ahead of any queued data.
fn ack(shared: &Shared, handle: &StreamHandle, open: &StreamOpenRequest) {
    // With manual pushes the ack names no version, so clients do not fetch a
    // new config on their own before the operator pushes it.
    let version = match shared.config().server.config_push {
        ConfigPush::Auto => shared.group_version(&handle.group).unwrap_or_default(),
        ConfigPush::Manual => String::new(),
    };
    // The fleet goes to the control stream (or the only one), on the
    // registration and whenever the client's copy is out of date.
    let (fleet, fleet_version) = match &shared.cluster {
        Some(c) if handle.stream_type == StreamType::Control || Registry::syncs_config(handle) => c.with_view(|v| {
            let version = v.members_revision.to_string();
            if open.sequence == 0 || open.fleet_version != version {
                v.fleet()
            } else {
                (Vec::new(), version)
            }
        }),
        Some(c) => (Vec::new(), c.with_view(|v| v.members_revision.to_string())),
        None => (Vec::new(), String::new()),
    };
    let msg = TunnelMessage {
        client_id: handle.client_id.clone(),
        request_id: String::new(),
        direction: Direction::ServerToClient as i32,
        trace_id: String::new(),
        payload: Some(Payload::StreamOpenResponse(StreamOpenResponse {
            stream_id: handle.stream_id.clone(),
            accepted: true,
            reason: String::new(),
            echo_timestamp_ms: open.timestamp_ms,
            sequence: open.sequence,
            server_timestamp_ms: now_ms(),
            server_id: shared.server_id.clone(),
            config_version: version,
            fleet,
            fleet_version,
            inline_body: true,
            header_block: true,
        })),
    };
    if !handle.outbound().try_priority(msg) {
        tracing::warn!(stream = %handle.stream_id, "priority queue full: heartbeat acknowledgement dropped");
    }
}

/// Removes a stream and fails its exchanges when its reader ends, however it
/// ends (a panic included), so no public request waits on a dead stream.
struct StreamCleanup {
    shared: Arc<Shared>,
    handle: Arc<StreamHandle>,
}

impl Drop for StreamCleanup {
    fn drop(&mut self) {
        self.shared.registry.remove_if_same(&self.handle);
        self.handle.exchanges.fail_all(ExchangeFailure::StreamLost);
        self.handle.cancel.cancel();
    }
}

/// Reads one stream until it ends, never waiting on any one exchange.
async fn read_stream(shared: Arc<Shared>, handle: Arc<StreamHandle>, mut inbound: Streaming<TunnelMessage>) {
    let _cleanup = StreamCleanup { shared: shared.clone(), handle: handle.clone() };
    let svc = TunnelSvc { shared: shared.clone() };
    loop {
        let msg = tokio::select! {
            _ = handle.cancel.cancelled() => break,
            m = inbound.message() => m,
        };
        match msg {
            Ok(Some(m)) => on_message(&svc, &handle, m),
            Ok(None) => {
                tracing::info!(stream = %handle.stream_id, client = %handle.client_id, "stream ended by client");
                disconnected(&shared, &handle, "the client ended its control stream".into());
                break;
            }
            Err(status) => {
                // A peer hanging up is routine.
                tracing::info!(stream = %handle.stream_id, client = %handle.client_id, error = %status.message(), "stream lost");
                disconnected(&shared, &handle, format!("control stream lost: {}", status.message()));
                break;
            }
        }
    }
}

/// An event for a control stream that ended from the client's side (the
/// server's own closes, reaps and console closes, have events of their own).
fn disconnected(shared: &Shared, handle: &StreamHandle, why: String) {
    if handle.stream_type == StreamType::Control {
        let about = About { client_id: &handle.client_id, group: &handle.group, stream_id: &handle.stream_id };
        shared.events.record(EventKind::Disconnected, about, why);
    }
}

/// An event when a client says it applies a config version it did not before.
fn acked(shared: &Shared, handle: &StreamHandle, version: &str) {
    let current = shared.group_version(&handle.group).unwrap_or_default();
    let detail = if version == current {
        format!("applies {version}, the group's current version")
    } else {
        format!("applies {version}; the group's current version is {current}")
    };
    let about = About { client_id: &handle.client_id, group: &handle.group, stream_id: &handle.stream_id };
    shared.events.record(EventKind::ConfigAcked, about, detail);
}

fn on_message(svc: &TunnelSvc, handle: &Arc<StreamHandle>, m: TunnelMessage) {
    if m.direction != Direction::ClientToServer as i32 {
        tracing::warn!(stream = %handle.stream_id, direction = m.direction, "message marked with the wrong direction; dropped");
        return;
    }
    let Some(payload) = &m.payload else {
        tracing::warn!(stream = %handle.stream_id, request_id = %m.request_id, "message with no payload; dropped");
        return;
    };
    match payload {
        Payload::StreamOpen(open) => {
            if open.stream_id != handle.stream_id {
                tracing::warn!(stream = %handle.stream_id, other = %open.stream_id, "heartbeat names another stream; dropped");
                return;
            }
            let delay = now_ms().saturating_sub(open.timestamp_ms);
            svc.shared.metrics.heartbeat_delay.observe(delay.max(0) as f64 / 1000.0);
            let registry = &svc.shared.registry;
            let counters = open.link_counters;
            if registry.heartbeat(&handle.stream_id, delay, open.last_rtt_ms, &open.config_version, counters) {
                acked(&svc.shared, handle, &open.config_version);
            }
            if delay > 1000 {
                tracing::warn!(stream = %handle.stream_id, client = %handle.client_id, delay_ms = delay, "late heartbeat");
            }
            ack(&svc.shared, handle, open);
        }
        Payload::ConfigSync(req) => {
            handle.set_syncs_config();
            if svc.shared.registry.set_config_version(&handle.client_id, &req.config_version)
                && !req.config_version.is_empty()
            {
                acked(&svc.shared, handle, &req.config_version);
            }
            match svc.sync_response(&handle.client_id, &handle.group, req, true) {
                Ok(resp) => {
                    let msg = handle.exchanges.message(&m.request_id, Payload::ConfigSyncResponse(resp));
                    if !handle.outbound().try_priority(msg) {
                        tracing::warn!(stream = %handle.stream_id, "priority queue full: config response dropped");
                    }
                }
                Err(status) => {
                    tracing::warn!(stream = %handle.stream_id, "config sync: {}", status.message())
                }
            }
        }
        Payload::Drain(d) => {
            tracing::info!(stream = %handle.stream_id, client = %handle.client_id, reason = %d.reason, "client draining: no new requests to it");
            if handle.stream_type == StreamType::Control {
                let about = About { client_id: &handle.client_id, group: &handle.group, stream_id: &handle.stream_id };
                svc.shared.events.record(EventKind::Draining, about, format!("client draining: {}", d.reason));
                svc.shared.registry.drain_client(&handle.client_id);
            } else {
                svc.shared.registry.drain_stream(handle);
                handle.exchanges.stop_opening();
                if d.ack_wanted {
                    // Behind any request already queued here: once the client
                    // reads it, nothing new can follow on this stream.
                    let ack =
                        Drain { reason: "no new requests on this stream".into(), ack: true, ..Default::default() };
                    handle.exchanges.send_ordered(handle.exchanges.message("", Payload::Drain(ack)));
                }
            }
        }
        Payload::StreamOpenResponse(_) | Payload::ConfigSyncResponse(_) | Payload::HttpRequest(_) => {
            tracing::warn!(stream = %handle.stream_id, payload = payload_name(payload), "server-bound message of a server-sent kind; dropped");
        }
        _ if handle.stream_type == StreamType::Control => {
            tracing::warn!(stream = %handle.stream_id, payload = payload_name(payload), "exchange frame on a control stream; dropped");
        }
        _ => {
            handle.exchanges.dispatch(m);
        }
    }
}

#[tonic::async_trait]
impl TunnelService for TunnelSvc {
    type ControlStreamStream = ServerOutbound;
    type ProxyStream = ServerOutbound;

    async fn control_stream(
        &self,
        req: Request<Streaming<TunnelMessage>>,
    ) -> Result<Response<Self::ControlStreamStream>, Status> {
        self.open_stream(req, StreamType::Control).await
    }

    async fn proxy(&self, req: Request<Streaming<TunnelMessage>>) -> Result<Response<Self::ProxyStream>, Status> {
        self.open_stream(req, StreamType::Http).await
    }

    async fn config_sync(&self, req: Request<ConfigSyncRequest>) -> Result<Response<ConfigSyncResponse>, Status> {
        let group = self.authenticate(req.metadata(), super::accept::link_of(&req).0)?;
        let body = req.into_inner();
        if body.group != group {
            return Err(Status::invalid_argument("group does not match the authenticated group"));
        }
        // A client's session asks this first, then again on its control
        // stream: that one says what the client lacks (once per session).
        let mut resp = self.sync_response(&body.client_id, &group, &body, false)?;
        if let Some(c) = &self.shared.cluster {
            (resp.fleet, resp.fleet_version) = c.with_view(|v| v.fleet());
        }
        Ok(Response::new(resp))
    }
}

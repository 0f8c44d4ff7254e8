//! The admin listener: the introspection service the console watches and
//! steers the server with, gRPC health and reflection for standard tools, and
//! `GET /ready` (HTTP/1.1 or HTTP/2) for load balancers.

use super::events::About;
use super::reload;
use super::replay::{self, ReplayError};
use super::Shared;
use crate::tunnel::tuning::{self, LinkProbe, LinkSample};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataMap;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tunnel_lib::config::LinkTuning;
use tunnel_lib::frame::now_ms;
use tunnel_lib::introspection::introspection_server::{Introspection, IntrospectionServer};
use tunnel_lib::introspection::{
    Capture, ClientInfo, CloseClientRequest, CloseClientResponse, CloseStreamRequest, CloseStreamResponse, EventKind,
    ForceResyncRequest, ForceResyncResponse, GetCaptureRequest, GroupInfo, LinkInfo, LinkOptionState, ReplayRequest,
    ServerInfo, StreamInfo, WatchRequest, WatchUpdate,
};
use tunnel_lib::proto::{LinkCounters, LinkOptions, StreamType};

/// Update rate when the watcher asks for none, and the most it may ask for.
const DEFAULT_RATE: u32 = 4;
const MAX_RATE: u32 = 20;
/// An update goes out at least this often, so a watcher sees the link is alive.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Updates queued per watcher; a slow one gets fewer, coalesced updates.
const WATCH_QUEUE: usize = 2;

/// Serves introspection, health and reflection on `listener` until `stop` fires.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) -> anyhow::Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IntrospectionServer<Introspect>>().await;
    health
        .set_serving::<tunnel_lib::proto::tunnel_service_server::TunnelServiceServer<super::service::TunnelSvc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(tunnel_lib::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let ready = ReadyLayer(shared.clone());
    let svc = IntrospectionServer::new(Introspect { shared, stop: stop.clone() });
    tonic::transport::Server::builder()
        // Load balancers check /ready over HTTP/1.1; gRPC stays HTTP/2.
        .accept_http1(true)
        .layer(ready)
        .add_service(svc)
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), stop.cancelled_owned())
        .await?;
    Ok(())
}

/// Answers `GET /ready` ahead of the gRPC routes.
#[derive(Clone)]
struct ReadyLayer(Arc<Shared>);

impl<S> tower_layer::Layer<S> for ReadyLayer {
    type Service = WithReady<S>;

    fn layer(&self, inner: S) -> WithReady<S> {
        WithReady { inner, shared: self.0.clone() }
    }
}

/// The admin service with `/ready` in front.
#[derive(Clone)]
struct WithReady<S> {
    inner: S,
    shared: Arc<Shared>,
}

type AdminResponse = http::Response<tonic::body::Body>;

impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for WithReady<S>
where
    S: tonic::codegen::Service<http::Request<tonic::body::Body>, Response = AdminResponse>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = AdminResponse;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<AdminResponse, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let http1 = req.version() < http::Version::HTTP_2;
        let (status, text) = match (req.uri().path(), http1) {
            ("/ready", _) => crate::metrics::ready_response(self.shared.readiness()),
            (_, false) => return Box::pin(self.inner.call(req)),
            // HTTP/1.1 is accepted for health checks only: anything else gets
            // a plain answer, not a gRPC one it cannot read.
            (_, true) => (
                http::StatusCode::NOT_FOUND,
                "this is the admin listener: gRPC over HTTP/2, and GET /ready\n".to_string(),
            ),
        };
        let mut resp = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(bytes::Bytes::from(text))));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
        headers.insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
        if http1 {
            // One answer per connection: nothing keeps an HTTP/1.1 connection
            // to this port open (tonic bounds none of its timers).
            headers.insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        Box::pin(std::future::ready(Ok(resp)))
    }
}

/// The Introspection implementation.
pub struct Introspect {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Introspect {
    fn authorize(&self, md: &MetadataMap) -> Result<(), Status> {
        let cfg = self.shared.config();
        let Some(token) = &cfg.server.admin_token else { return Ok(()) };
        let given =
            md.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if token.matches(given.as_bytes()) {
            Ok(())
        } else {
            tracing::warn!("introspection call with a missing or wrong admin token refused");
            Err(Status::unauthenticated("missing or wrong admin token"))
        }
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

fn server_info(shared: &Shared, clients: usize, streams: &HashMap<String, StreamInfo>) -> ServerInfo {
    let cfg = shared.config();
    let (http, grpc, admin) = shared.addrs.get().copied().unwrap_or((
        cfg.server.http_listen,
        cfg.server.grpc_listen,
        cfg.server.admin_listen,
    ));
    ServerInfo {
        server_id: shared.server_id.clone(),
        version: tunnel_lib::VERSION.to_string(),
        started_unix_ms: unix_ms(shared.started_at),
        now_unix_ms: now_ms(),
        http_listen: http.to_string(),
        grpc_listen: grpc.to_string(),
        admin_listen: admin.to_string(),
        groups: cfg
            .groups
            .iter()
            .map(|g| GroupInfo {
                name: g.name.clone(),
                config_version: shared.group_version(&g.name).unwrap_or_default(),
                heartbeat_interval_ms: g.heartbeat_interval.as_millis() as u64,
                heartbeat_timeout_ms: g.heartbeat_timeout.as_millis() as u64,
                data_streams: g.data_streams,
            })
            .collect(),
        clients: clients as u64,
        streams: streams.len() as u64,
        requests_total: shared.requests.total(),
        errors_total: shared.requests.errors(),
        in_flight: streams.values().map(|s| u64::from(s.in_flight)).sum(),
        config_push: cfg.server.config_push.to_string(),
        streams_reaped: shared.streams_reaped.load(std::sync::atomic::Ordering::Relaxed),
        exchanges_idle_closed: shared.exchanges_idle_closed.load(std::sync::atomic::Ordering::Relaxed),
        draining: shared.is_draining(),
        cluster: shared.cluster.as_ref().map(|c| c.info()),
        link_tuning: link_tuning(&cfg.server.link_tuning),
    }
}

/// Each link option's state on this server, and its configured value.
fn link_tuning(wanted: &LinkTuning) -> Vec<LinkOptionState> {
    tuning::states(wanted)
        .into_iter()
        .zip(tuning::values(wanted))
        .map(|((option, state), value)| LinkOptionState {
            option: option.to_string(),
            state: state.to_string(),
            value: value.unwrap_or_default(),
        })
        .collect()
}

/// One link connection of a client: its server socket's probe, its counts,
/// and the client's options for its end.
type HeldLink = (Arc<LinkProbe>, LinkInfo, Option<LinkOptions>);

/// The registry as introspection messages, keyed by id.
fn current(shared: &Shared) -> (HashMap<String, ClientInfo>, HashMap<String, StreamInfo>) {
    let wanted = shared.config().server.link_tuning;
    // Each client's link connections (one entry per connection, whichever
    // of its streams came on it), the control stream's first.
    let mut links: HashMap<String, Vec<HeldLink>> = HashMap::new();
    let streams = shared
        .registry
        .streams()
        .into_iter()
        .map(|s| {
            let link = s.link.as_ref().map(|p| link_info(p, &wanted, s.client_counters));
            if let (Some(probe), Some(info)) = (&s.link, &link) {
                let held = links.entry(s.client_id.clone()).or_default();
                if !held.iter().any(|(p, _, _)| Arc::ptr_eq(p, probe)) {
                    let entry = (probe.clone(), info.clone(), s.client_link.clone());
                    if s.stream_type == StreamType::Control {
                        held.insert(0, entry);
                    } else {
                        held.push(entry);
                    }
                }
            }
            let info = StreamInfo {
                stream_id: s.stream_id.clone(),
                stream_type: s.stream_type as i32,
                client_id: s.client_id,
                group: s.group,
                peer: s.peer.map(|p| p.to_string()).unwrap_or_default(),
                connected_unix_ms: unix_ms(s.connected_at),
                last_heartbeat_unix_ms: unix_ms(s.last_heartbeat),
                last_delay_ms: s.last_delay_ms,
                last_rtt_ms: s.last_rtt_ms,
                heartbeats: s.heartbeats,
                queue_depth: s.queue_depth as u32,
                queue_capacity: s.queue_capacity as u32,
                in_flight: s.in_flight as u32,
                upgraded: s.upgraded as u32,
                requests: s.requests,
                bytes_to_client: s.bytes_to_client,
                bytes_from_client: s.bytes_from_client,
                draining: s.draining,
                delay_p50_ms: s.delay.p50,
                delay_p99_ms: s.delay.p99,
                delay_max_ms: s.delay.max,
                rtt_p50_ms: s.rtt.p50,
                rtt_p99_ms: s.rtt.p99,
                rtt_max_ms: s.rtt.max,
                delay_history_ms: s.delay_history,
                link,
                client_link_options: s.client_link,
            };
            (s.stream_id, info)
        })
        .collect();
    let clients = shared
        .registry
        .clients()
        .into_iter()
        .map(|c| {
            let held = links.remove(&c.client_id).unwrap_or_default();
            let info = ClientInfo {
                client_id: c.client_id.clone(),
                config_version_current: shared.group_version(&c.group).unwrap_or_default(),
                group: c.group,
                peer: c.peer.map(|p| p.to_string()).unwrap_or_default(),
                connected_unix_ms: unix_ms(c.connected_at),
                version: c.version,
                config_version_acked: c.config_version,
                streams: c.streams.len() as u32,
                session_id: c.session_id,
                client_link_options: held.first().and_then(|(_, _, o)| o.clone()),
                link: summed(held.into_iter().map(|(_, info, _)| info)),
            };
            (c.client_id, info)
        })
        .collect();
    (clients, streams)
}

/// One link connection: the server's socket as read now, and the client's
/// as its last heartbeat on the stream said.
fn link_info(probe: &LinkProbe, wanted: &LinkTuning, client: Option<LinkCounters>) -> LinkInfo {
    let LinkSample { options, counters } = probe.sample();
    LinkInfo { server_options: Some(options.to_proto(wanted)), server: Some(counters.to_proto()), client }
}

/// A client's connections together: counts summed, the first's (the
/// control connection's) round trips and options.
fn summed(links: impl Iterator<Item = LinkInfo>) -> Option<LinkInfo> {
    let add = |sum: &mut Option<LinkCounters>, more: Option<LinkCounters>| {
        if let Some(m) = more {
            let s =
                sum.get_or_insert_with(|| LinkCounters { rtt_us: m.rtt_us, rto_us: m.rto_us, ..Default::default() });
            s.retransmits += m.retransmits;
            s.bytes_sent += m.bytes_sent;
            s.bytes_retrans += m.bytes_retrans;
        }
    };
    links.fold(None, |total: Option<LinkInfo>, one| {
        let mut total = total.unwrap_or(LinkInfo { server_options: one.server_options.clone(), ..Default::default() });
        add(&mut total.server, one.server);
        add(&mut total.client, one.client);
        Some(total)
    })
}

/// What changed from `old` to `new`: added or changed entries, and removed keys.
fn diff<T: Clone + PartialEq>(old: &HashMap<String, T>, new: &HashMap<String, T>) -> (Vec<T>, Vec<String>) {
    let changed = new.iter().filter(|(k, v)| old.get(*k) != Some(*v)).map(|(_, v)| v.clone()).collect();
    let removed = old.keys().filter(|k| !new.contains_key(*k)).cloned().collect();
    (changed, removed)
}

/// Feeds one watcher until it goes away or the server stops.
async fn watch(
    shared: Arc<Shared>,
    rate: u32,
    heads: bool,
    tx: mpsc::Sender<Result<WatchUpdate, Status>>,
    stop: CancellationToken,
) {
    let period = Duration::from_millis(1000 / u64::from(rate));
    let mut sent_clients = HashMap::new();
    let mut sent_streams = HashMap::new();
    let mut last_seq = 0u64;
    let mut last_event = 0u64;
    let mut last_sent: Option<Instant> = None;
    // The open second of the series at the last update sent.
    let mut traffic_head: Option<i64> = None;
    loop {
        let (clients, streams) = current(&shared);
        let requests = shared.requests.recorded_since(last_seq);
        let events = shared.events.since(last_event);
        let full = last_sent.is_none();
        let (traffic, head) = shared.traffic.export(traffic_head);
        let (changed_clients, removed_clients) = diff(&sent_clients, &clients);
        let (changed_streams, removed_streams) = diff(&sent_streams, &streams);
        let quiet = changed_clients.is_empty()
            && removed_clients.is_empty()
            && changed_streams.is_empty()
            && removed_streams.is_empty()
            && requests.is_empty()
            && events.is_empty()
            && traffic_head == Some(head);
        if full || !quiet || last_sent.is_some_and(|t| t.elapsed() >= KEEPALIVE) {
            if let Some(r) = requests.last() {
                last_seq = r.info.seq;
            }
            let secrets = if heads { shared.secrets() } else { Vec::new() };
            let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
            let requests = requests.iter().map(|r| r.info(heads, &secrets)).collect();
            if let Some(e) = events.last() {
                last_event = e.seq;
            }
            let update = WatchUpdate {
                full,
                server: Some(server_info(&shared, clients.len(), &streams)),
                clients: if full { clients.values().cloned().collect() } else { changed_clients },
                removed_clients,
                streams: if full { streams.values().cloned().collect() } else { changed_streams },
                removed_streams,
                requests,
                traffic,
                traffic_head_unix_ms: head,
                events,
            };
            // Waiting here is what coalesces updates for a slow watcher: the
            // next diff is taken against what it was actually sent.
            tokio::select! {
                _ = stop.cancelled() => return,
                r = tx.send(Ok(update)) => if r.is_err() { return },
            }
            sent_clients = clients;
            sent_streams = streams;
            traffic_head = Some(head);
            last_sent = Some(Instant::now());
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}

#[tonic::async_trait]
impl Introspection for Introspect {
    type WatchStream = ReceiverStream<Result<WatchUpdate, Status>>;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        self.authorize(req.metadata())?;
        let ask = req.into_inner();
        let rate = match ask.max_updates_per_second {
            0 => DEFAULT_RATE,
            r => r.min(MAX_RATE),
        };
        let (tx, rx) = mpsc::channel(WATCH_QUEUE);
        // Owned by the watcher: ends when it hangs up or the server stops.
        tokio::spawn(watch(self.shared.clone(), rate, ask.heads, tx, self.stop.clone()));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn force_resync(&self, req: Request<ForceResyncRequest>) -> Result<Response<ForceResyncResponse>, Status> {
        self.authorize(req.metadata())?;
        let r = req.into_inner();
        let pushed = match (r.client_id.is_empty(), r.group.is_empty()) {
            (false, true) => reload::push_client(&self.shared, &r.client_id)
                .ok_or_else(|| Status::not_found(format!("no connected client {:?}", r.client_id)))?,
            (true, false) => {
                if self.shared.config().group(&r.group).is_none() {
                    return Err(Status::not_found(format!("no group {:?}", r.group)));
                }
                reload::push_group(&self.shared, &r.group).unwrap_or_default()
            }
            _ => return Err(Status::invalid_argument("give exactly one of client_id and group")),
        };
        tracing::info!(client = %r.client_id, group = %r.group, version = %pushed.0, clients = pushed.1, "resync forced from the console");
        let about = About { client_id: &r.client_id, group: &r.group, ..Default::default() };
        let detail = format!("version {} sent to {} clients", pushed.0, pushed.1);
        self.shared.events.record(EventKind::ResyncFromConsole, about, detail);
        Ok(Response::new(ForceResyncResponse { config_version: pushed.0, clients: pushed.1 as u32 }))
    }

    async fn close_stream(&self, req: Request<CloseStreamRequest>) -> Result<Response<CloseStreamResponse>, Status> {
        self.authorize(req.metadata())?;
        let id = req.into_inner().stream_id;
        let handle = self.shared.registry.remove(&id).ok_or_else(|| Status::not_found(format!("no stream {id:?}")))?;
        tracing::info!(stream = %id, client = %handle.client_id, "stream closed from the console");
        let about = About { client_id: &handle.client_id, group: &handle.group, stream_id: &id };
        self.shared.events.record(EventKind::ClosedFromConsole, about, "stream closed; the client opens a replacement");
        handle.cancel.cancel();
        Ok(Response::new(CloseStreamResponse {}))
    }

    async fn get_capture(&self, req: Request<GetCaptureRequest>) -> Result<Response<Capture>, Status> {
        self.authorize(req.metadata())?;
        let id = req.into_inner().request_id;
        let r = self.shared.capture_of(&id).ok_or_else(|| Status::not_found(ReplayError::NotFound(id).to_string()))?;
        let secrets = self.shared.secrets();
        Ok(Response::new(r.capture(&secrets.iter().map(String::as_str).collect::<Vec<_>>())))
    }

    async fn replay(&self, req: Request<ReplayRequest>) -> Result<Response<Capture>, Status> {
        self.authorize(req.metadata())?;
        let ask = req.into_inner();
        let original = self
            .shared
            .capture_of(&ask.request_id)
            .ok_or_else(|| Status::not_found(ReplayError::NotFound(ask.request_id.clone()).to_string()))?;
        let new = replay::replay(&self.shared, &original, ask.force).await.map_err(|e| match e {
            ReplayError::NotFound(_) => Status::not_found(e.to_string()),
            ReplayError::Unsafe(_) => Status::failed_precondition(e.to_string()),
            ReplayError::Busy => Status::resource_exhausted(e.to_string()),
            ReplayError::Failed(_) => Status::unavailable(e.to_string()),
        })?;
        tracing::info!(request_id = %ask.request_id, replay = %new.info.request_id, status = new.info.status, "request replayed from the console");
        let secrets = self.shared.secrets();
        Ok(Response::new(new.capture(&secrets.iter().map(String::as_str).collect::<Vec<_>>())))
    }

    async fn close_client(&self, req: Request<CloseClientRequest>) -> Result<Response<CloseClientResponse>, Status> {
        self.authorize(req.metadata())?;
        let id = req.into_inner().client_id;
        let streams = self.shared.registry.client_streams(&id);
        if streams.is_empty() {
            return Err(Status::not_found(format!("no connected client {id:?}")));
        }
        for s in &streams {
            self.shared.registry.remove(&s.stream_id);
            s.cancel.cancel();
        }
        tracing::info!(client = %id, streams = streams.len(), "client closed from the console");
        let group = streams.first().map(|s| s.group.as_str()).unwrap_or_default();
        let about = About { client_id: &id, group, ..Default::default() };
        let detail = format!("every stream closed ({}); the client reconnects", streams.len());
        self.shared.events.record(EventKind::ClosedFromConsole, about, detail);
        Ok(Response::new(CloseClientResponse { streams_closed: streams.len() as u32 }))
    }
}

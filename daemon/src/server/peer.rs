//! Forwarding between the servers of a cluster: a request whose group has
//! no client here goes to a server that holds one (from the cluster's view),
//! over `PeerService.Forward`, one call per exchange.
//!
//! The calling side makes the call look like one more data stream of the
//! group (`forwarder`), so the ingress serves it exactly as a local one:
//! same frames, credit, deadlines, cancellation and upgrades. The called
//! side (`PeerSvc`) relays each frame to and from one of its own clients'
//! streams as it is (`Exchanges::open_relay`), so credit and cancellation
//! hold end to end, and never forwards again: one hop at most.

use super::registry::{NoStream, StreamHandle};
use super::Shared;
use crate::tunnel::exchange::{ExchangeFailure, Exchanges, Role};
use crate::tunnel::link::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE, STREAM_WINDOW};
use crate::tunnel::outbound::Outbound;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};
use tunnel_lib::config::PeerTls;
use tunnel_lib::frame::{self, body_buffer_capacity};
use tunnel_lib::proto::peer_service_client::PeerServiceClient;
use tunnel_lib::proto::peer_service_server::{PeerService, PeerServiceServer};
use tunnel_lib::proto::{exchange_error::Kind, tunnel_message::Payload, Direction, StreamType, TunnelMessage};
use tunnel_lib::GROUP_METADATA;

/// Metadata naming the server that forwarded a call (for logs).
const FORWARDED_BY: &str = "x-tunnel-forwarded-by";
/// Bound on a forwarded call's first frame.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames beyond a window's worth of body the relay may queue towards the
/// caller: heads, ends and credit.
const RELAY_SLACK: usize = 16;
/// HTTP/2 PINGs between servers: a peer that vanished is noticed.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on connecting to a peer server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A peer whose call failed is passed over this long (if another holder of
/// the group is there): a killed server refuses at once, while its lease
/// would keep it in the view for the lease's TTL.
const PEER_DOWN_FOR: Duration = Duration::from_secs(5);

/// Serves `PeerService` on the peer listener until `stop` fires.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, stop: CancellationToken) -> anyhow::Result<()> {
    let cfg = shared.config();
    let s = &cfg.server;
    let svc = PeerServiceServer::new(PeerSvc { shared: shared.clone() })
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|c| {
        if let Ok(c) = &c {
            let _ = c.set_nodelay(true);
        }
        c
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = shared.cluster.as_ref().and_then(|c| c.settings.peer_tls.as_ref()) {
        // mTLS: only servers whose certificates the fleet's peer CA signed may forward here.
        let (identity, ca) = (identity(tls)?, Certificate::from_pem(read(&tls.ca)?));
        builder = builder.tls_config(ServerTlsConfig::new().identity(identity).client_ca_root(ca))?;
    }
    builder
        .http2_keepalive_interval(Some(PING_INTERVAL))
        .http2_keepalive_timeout(Some(PING_TIMEOUT))
        .http2_max_pending_accept_reset_streams(Some(s.h2_max_remote_resets))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

/// A TLS file, bounded (a FIFO or device named by mistake fails).
fn read(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context as _;
    tunnel_lib::units::read_bounded(path, 1 << 20).with_context(|| format!("reading {}", path.display()))
}

fn identity(tls: &PeerTls) -> anyhow::Result<Identity> {
    Ok(Identity::from_pem(read(&tls.cert)?, read(&tls.key)?))
}

/// The called side: relays forwarded exchanges to this server's clients.
pub struct PeerSvc {
    shared: Arc<Shared>,
}

type Frames = Pin<Box<dyn Stream<Item = Result<TunnelMessage, Status>> + Send>>;

/// An exchange frame as a client would send it, for answers the relay gives itself.
fn client_frame(request_id: &str, payload: Payload) -> TunnelMessage {
    frame::message("", request_id, Direction::ClientToServer, payload)
}

#[tonic::async_trait]
impl PeerService for PeerSvc {
    type ForwardStream = Frames;

    async fn forward(&self, req: Request<Streaming<TunnelMessage>>) -> Result<Response<Frames>, Status> {
        let shared = &self.shared;
        let Some(cluster) = &shared.cluster else {
            return Err(Status::failed_precondition("this server is not clustered"));
        };
        if let Some(token) = &cluster.settings.peer_token {
            if !token.matches(bearer(req.metadata()).as_bytes()) {
                tracing::warn!(peer = ?req.remote_addr(), "forwarded call with a wrong peer_token; refused");
                return Err(Status::unauthenticated("wrong peer_token"));
            }
        }
        let text = |k: &str| req.metadata().get(k).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let (group, from) = (text(GROUP_METADATA), text(FORWARDED_BY));
        let mut inbound = req.into_inner();
        let first = match tokio::time::timeout(HEAD_TIMEOUT, inbound.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return Err(Status::invalid_argument("no request head")),
            Ok(Err(s)) => return Err(s),
            Err(_) => return Err(Status::deadline_exceeded("no request head in time")),
        };
        let (request_id, window) = match &first.payload {
            Some(Payload::HttpRequest(h)) => (first.request_id.clone(), h.window),
            _ => return Err(Status::invalid_argument("the first frame must be a request head")),
        };
        let window = if window == 0 { frame::DEFAULT_EXCHANGE_WINDOW } else { window };
        let (tx, rx) = mpsc::channel(body_buffer_capacity(window) + RELAY_SLACK);
        let frames: Frames = Box::pin(ReceiverStream::new(rx).map(Ok));
        let cfg = shared.config();
        let max_in_flight = cfg.group(&group).map_or(tunnel_lib::config::DEFAULT_MAX_IN_FLIGHT, |g| g.max_in_flight);
        let mut picked = Err(NoStream::NoClient);
        for _ in 0..3 {
            match shared.registry.pick(&group, max_in_flight as usize) {
                Ok(stream) if stream.exchanges.open_relay(&request_id, tx.clone()) => {
                    picked = Ok(stream);
                    break;
                }
                Ok(_) => continue,
                Err(e) => {
                    picked = Err(e);
                    break;
                }
            }
        }
        let stream = match picked {
            Ok(s) => s,
            Err(why) => {
                let message = match why {
                    NoStream::Busy => format!(
                        "every tunnel client of group {group:?} on server {} has {max_in_flight} requests in flight",
                        shared.server_id
                    ),
                    NoStream::NoClient => {
                        format!("server {} holds no tunnel client of group {group:?} (any more)", shared.server_id)
                    }
                };
                tracing::info!(request_id = %request_id, from = %from, %group, "forwarded request refused: {message}");
                let kind = Kind::UpstreamUnreachable as i32;
                let err = tunnel_lib::proto::ExchangeError { kind, message };
                let _ = tx.try_send(client_frame(&request_id, Payload::Error(err)));
                return Ok(Response::new(frames));
            }
        };
        drop(tx);
        shared.metrics.forwarded_in.get_or_create(&vec![("group", group.clone())]).inc();
        tracing::debug!(request_id = %request_id, from = %from, client = %stream.client_id, stream = %stream.stream_id, "relaying a forwarded exchange");
        let cancel = shared.streams.child_token();
        // Owned by the relayed exchange: ends with the caller's call, or
        // when the relay or this server's streams are done.
        shared.tasks.spawn(relay_from_peer(stream, inbound, first, request_id, cancel));
        Ok(Response::new(frames))
    }
}

/// Sends the caller's frames of one exchange to the client until the caller
/// ends its call; a call that ends before the exchange did cancels it at the client.
async fn relay_from_peer(
    stream: Arc<StreamHandle>,
    mut inbound: Streaming<TunnelMessage>,
    first: TunnelMessage,
    request_id: String,
    cancel: CancellationToken,
) {
    let exchanges = stream.exchanges.clone();
    let mut next = Some(first);
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => tokio::select! {
                _ = cancel.cancelled() => break,
                _ = stream.cancel.cancelled() => break,
                m = inbound.message() => match m {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                },
            },
        };
        if msg.request_id != request_id || msg.direction != Direction::ServerToClient as i32 {
            tracing::warn!(request_id = %request_id, other = %msg.request_id, "forwarded call carried a frame of another exchange or direction; dropped");
            continue;
        }
        if !exchanges.relay_to_client(msg).await {
            break;
        }
    }
    exchanges.abandon_relay(&request_id, "the forwarding server gave the exchange up");
}

fn bearer(md: &tonic::metadata::MetadataMap) -> &str {
    md.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("")
}

/// The calling side's connections to peers, one HTTP/2 connection per peer URL.
#[derive(Default)]
pub struct Peers {
    channels: Mutex<HashMap<String, Channel>>,
    /// server_id -> until when it is passed over after a failed call.
    down: Mutex<HashMap<String, std::time::Instant>>,
}

impl Peers {
    fn mark_down(&self, server_id: &str) {
        let until = std::time::Instant::now() + PEER_DOWN_FOR;
        self.down.lock().unwrap_or_else(|e| e.into_inner()).insert(server_id.to_string(), until);
    }

    fn is_down(&self, server_id: &str) -> bool {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        match down.get(server_id) {
            Some(until) if *until > std::time::Instant::now() => true,
            Some(_) => {
                down.remove(server_id);
                false
            }
            None => false,
        }
    }

    fn channel(&self, url: &str, tls: Option<&PeerTls>) -> Option<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(url) {
            return Some(c.clone());
        }
        let mut ep = Endpoint::from_shared(url.to_string()).ok()?;
        if let Some(tls) = tls {
            let host = ep.uri().host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
            let config = match (identity(tls), read(&tls.ca)) {
                (Ok(id), Ok(ca)) => {
                    ClientTlsConfig::new().identity(id).ca_certificate(Certificate::from_pem(ca)).domain_name(host)
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!("peer TLS files: {e:#}; not forwarding");
                    return None;
                }
            };
            ep = match ep.tls_config(config) {
                Ok(ep) => ep,
                Err(e) => {
                    tracing::warn!("peer TLS settings: {e}; not forwarding");
                    return None;
                }
            };
        }
        let ep = ep
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true)
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        // Connects on first use and again after a failure, on its own.
        let c = ep.connect_lazy();
        channels.insert(url.to_string(), c.clone());
        Some(c)
    }
}

/// A data stream of `group` on a peer server that holds a client of it (one
/// chosen at random among the holders that take forwarded requests), for
/// one exchange; None when no peer does. The call starts at once; its
/// frames are dispatched as a client stream's are.
pub fn forwarder(shared: &Arc<Shared>, group: &str) -> Option<(Arc<StreamHandle>, String)> {
    let cluster = shared.cluster.as_ref()?;
    let holders: Vec<(String, String)> = cluster.with_view(|v| {
        v.holders(group, &shared.server_id)
            .into_iter()
            .filter(|(m, _)| !m.peer_advertise.is_empty())
            .map(|(m, _)| (m.server_id.clone(), m.peer_advertise.clone()))
            .collect()
    });
    // Peers whose last call failed go last: tried only if no other holds the group.
    let up: Vec<&(String, String)> = holders.iter().filter(|(id, _)| !shared.peers.is_down(id)).collect();
    let (peer_id, url) = match (up.is_empty(), holders.is_empty()) {
        (_, true) => return None,
        (false, _) => up[fastrand::usize(..up.len())].clone(),
        (true, false) => holders[fastrand::usize(..holders.len())].clone(),
    };
    let channel = shared.peers.channel(&url, cluster.settings.peer_tls.as_ref())?;
    let cancel = shared.streams.child_token();
    let (out, out_stream) = Outbound::new(cancel.clone());
    let exchanges = Exchanges::new(out, Role::Server, String::new());
    let handle = Arc::new(StreamHandle::new(
        format!("via {peer_id}"),
        String::new(),
        group.to_string(),
        StreamType::Http,
        String::new(),
        None::<SocketAddr>,
        exchanges.clone(),
        cancel.clone(),
    ));
    let mut req = Request::new(out_stream);
    let md = req.metadata_mut();
    if let Ok(v) = group.parse() {
        md.insert(GROUP_METADATA, v);
    }
    if let Ok(v) = shared.server_id.parse() {
        md.insert(FORWARDED_BY, v);
    }
    if let Some(t) = &cluster.settings.peer_token {
        if let Ok(v) = format!("Bearer {}", t.expose()).parse() {
            md.insert("authorization", v);
        }
    }
    let peer = peer_id.clone();
    let owner = shared.clone();
    let url = url.clone();
    // Owned by the exchange: ends when the peer ends the call (the exchange
    // is over), the call fails, or the server's streams close.
    shared.tasks.spawn(async move {
        let mut client = PeerServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let mut inbound = tokio::select! {
            _ = cancel.cancelled() => return,
            r = client.forward(req) => match r {
                Ok(r) => r.into_inner(),
                Err(s) => {
                    let why = format!(
                        "forwarding to {peer} ({url}) failed: {}; check that its peer_listen is reachable from here",
                        s.message()
                    );
                    tracing::info!(peer = %peer, "{why}");
                    if s.code() == tonic::Code::Unavailable {
                        owner.peers.mark_down(&peer);
                    }
                    exchanges.fail_all(ExchangeFailure::Forward(why));
                    return;
                }
            },
        };
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => break,
                m = inbound.message() => m,
            };
            match msg {
                Ok(Some(m)) if m.direction == Direction::ClientToServer as i32 => {
                    exchanges.dispatch(m);
                }
                Ok(Some(_)) => {
                    tracing::warn!(peer = %peer, "forwarded call: frame marked with the wrong direction; dropped")
                }
                Ok(None) => break,
                Err(s) => {
                    if s.code() == tonic::Code::Unavailable {
                        owner.peers.mark_down(&peer);
                    }
                    exchanges.fail_all(ExchangeFailure::Forward(format!("forwarding to {peer}: {}", s.message())));
                    return;
                }
            }
        }
        exchanges.fail_all(ExchangeFailure::Forward(format!("{peer} ended the forwarded call")));
    });
    Some((handle, peer_id))
}

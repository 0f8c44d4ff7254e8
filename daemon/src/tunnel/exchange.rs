//! The exchanges of one gRPC stream: the table that routes each inbound frame
//! to its exchange without ever blocking the stream's reader, and the
//! cancellation that frees an exchange on either side.

use super::body::{BodyEvent, InboundBody};
use super::outbound::Outbound;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tunnel_lib::frame::{
    self, body_buffer_capacity, FrameError, FrameKind, Phase, RecvWindow, DEFAULT_EXCHANGE_WINDOW,
};
use tunnel_lib::proto::{self, exchange_error::Kind, tunnel_message::Payload, Direction, TunnelMessage};

/// A table keyed by request id. The ids are drawn at random by the server
/// that opened the exchange, the only party that inserts them (this server,
/// a peer server forwarding to it, or a client's own server): all
/// authenticated, and the hash is seeded per process, so a fast hash is
/// enough.
/// Exchanges by request id; the id is shared with the exchange's io and
/// body (one allocation per exchange, not one per holder).
type Table<T> = HashMap<Arc<str>, T, foldhash::fast::RandomState>;

/// Window per chunk that may wait for an exchange's reader as a slice of
/// the decoder's buffer; past that, chunks are copied out (see `dispatch`).
/// At the default 1 MiB window, four; at a window under 256 KiB, none.
const WINDOW_PER_SLICE: u32 = 256 << 10;

/// Why an exchange ended without completing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExchangeFailure {
    /// The gRPC stream carrying it ended.
    #[error("tunnel stream lost")]
    StreamLost,
    /// The peer cancelled it.
    #[error("cancelled by peer: {0}")]
    Cancelled(String),
    /// The peer reported an error.
    #[error("{message}")]
    Peer { kind: Kind, message: String },
    /// A frame broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(FrameError),
    /// Nothing moved either way for this long after the head.
    #[error("idle for {0:?}: closed")]
    Idle(std::time::Duration),
    /// A forwarded exchange's call to the peer server failed or ended early.
    #[error("{0}")]
    Forward(String),
}

/// The server's wait for a response head.
pub type HeadReceiver = oneshot::Receiver<Result<proto::HttpResponse, ExchangeFailure>>;

/// Our side of one exchange: credit to send our body, the peer's body, and
/// the token that fires when the exchange is abandoned.
pub struct ExchangeIo {
    pub request_id: Arc<str>,
    /// Our send credit, in bytes (see `frame::frame_cost`).
    pub credit: Arc<Semaphore>,
    pub cancel: CancellationToken,
    /// Largest chunk we may send in one frame under the exchange's window.
    pub max_chunk: usize,
    /// The body the peer sends us.
    pub body: InboundBody,
}

struct Slot {
    phase: Phase,
    window: Arc<Mutex<RecvWindow>>,
    head: Option<oneshot::Sender<Result<proto::HttpResponse, ExchangeFailure>>>,
    body: mpsc::Sender<BodyEvent>,
    credit: Arc<Semaphore>,
    cancel: CancellationToken,
    outbound_done: bool,
    /// Server side: the rule's idle timeout, counted from the response head.
    idle_timeout: Option<Duration>,
    /// Last body frame either way (or the response head).
    last_activity: Instant,
    /// Switched protocols (101): its body frames are an upgraded connection.
    upgraded: bool,
    /// Chunks that may wait for the reader as slices of the decoder's buffer.
    slices: usize,
}

/// A request that arrived on the client side, to serve.
pub struct NewRequest {
    pub head: proto::HttpRequest,
    pub io: ExchangeIo,
    pub trace_id: String,
}

/// What the reader should do after a frame was dispatched.
pub enum Dispatched {
    /// Delivered, or logged and dropped.
    Done,
    /// A new request arrived (client side): serve it.
    NewRequest(Box<NewRequest>),
}

/// Which side of the tunnel this table serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// Totals of one stream since it opened.
#[derive(Debug, Default)]
pub struct StreamStats {
    /// Exchanges started.
    pub exchanges: AtomicU64,
    /// Body bytes received from the peer and delivered.
    pub bytes_received: AtomicU64,
    /// Body bytes sent to the peer.
    pub bytes_sent: AtomicU64,
}

/// An exchange this server only relays for a peer server (forwarding): its
/// frames from the client go to the peer as they are, under the credit the
/// peer grants end to end, so nothing of it is buffered here beyond that.
struct Relay {
    to_peer: mpsc::Sender<TunnelMessage>,
    /// The client has ended its side (response end, error or cancel).
    client_done: bool,
    /// The peer has ended its side (request end).
    peer_done: bool,
}

/// The exchanges in flight on one stream.
pub struct Exchanges {
    // std Mutex: held only for map updates, never across an await.
    slots: Mutex<Table<Slot>>,
    /// Server side: exchanges relayed for a peer server, by request id.
    relays: Mutex<Table<Relay>>,
    /// How many there are: a stream with none (nearly all) never takes
    /// the relays' lock on its frames' path.
    relaying: AtomicUsize,
    in_flight: AtomicUsize,
    /// Of those, upgraded connections.
    upgraded: AtomicUsize,
    /// Set when the stream ended: no new exchange may open on it.
    closed: AtomicBool,
    /// Set when the peer drains the stream: no new exchange may open on it.
    draining: AtomicBool,
    /// Client side: the server takes a response's first bytes in its head.
    inline_body: AtomicBool,
    /// The peer reads a head's headers as one block (`header_block`).
    header_block: AtomicBool,
    /// Totals, for introspection.
    pub stats: StreamStats,
    out: Outbound,
    role: Role,
    client_id: String,
}

impl Exchanges {
    /// An empty table for a stream whose outbound queues are `out`.
    pub fn new(out: Outbound, role: Role, client_id: String) -> Arc<Self> {
        Arc::new(Exchanges {
            slots: Mutex::new(Table::default()),
            relays: Mutex::new(Table::default()),
            relaying: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            inline_body: AtomicBool::new(false),
            header_block: AtomicBool::new(false),
            stats: StreamStats::default(),
            out,
            role,
            client_id,
        })
    }

    /// Client side: the server announced that it takes a response's first
    /// bytes in its head (`StreamOpenResponse.inline_body`).
    pub fn set_inline_body(&self, on: bool) {
        self.inline_body.store(on, Ordering::Relaxed);
    }

    /// Whether responses may carry their first bytes in their head.
    pub fn inline_body(&self) -> bool {
        self.inline_body.load(Ordering::Relaxed)
    }

    /// The peer announced that it reads heads' headers as one block
    /// (`StreamOpenRequest.header_block` from a client,
    /// `StreamOpenResponse.header_block` from a server).
    pub fn set_header_block(&self, on: bool) {
        self.header_block.store(on, Ordering::Relaxed);
    }

    /// Headers of a head for this stream's peer, in the form it reads.
    pub fn headers_for_peer(&self, headers: &http::HeaderMap) -> (bytes::Bytes, Vec<proto::Header>) {
        if self.header_block.load(Ordering::Relaxed) {
            (frame::headers_to_block(headers), Vec::new())
        } else {
            (bytes::Bytes::new(), frame::headers_to_proto(headers))
        }
    }

    /// A head's `name:value\n` block for this stream's peer, in the form it reads.
    pub fn block_for_peer(&self, block: bytes::Bytes) -> (bytes::Bytes, Vec<proto::Header>) {
        if self.header_block.load(Ordering::Relaxed) {
            (block, Vec::new())
        } else {
            (bytes::Bytes::new(), frame::block_to_proto(&block))
        }
    }

    /// Exchanges in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// The peer drains this stream: refuses new exchanges from now. Taken
    /// under the table's lock, so an exchange either opened before (and its
    /// head is on its way) or is refused and goes to another stream.
    pub fn stop_opening(&self) {
        let _slots = self.lock();
        self.draining.store(true, Ordering::Release);
    }

    /// Upgraded connections in flight (they count in `in_flight` too).
    pub fn upgraded(&self) -> usize {
        self.upgraded.load(Ordering::Relaxed)
    }

    /// The exchange switched protocols: counted as upgraded until it ends.
    pub fn mark_upgraded(&self, request_id: &str) {
        if let Some(s) = self.lock().get_mut(request_id) {
            if !s.upgraded {
                s.upgraded = true;
                self.upgraded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes a slot that left the table out of the counts.
    fn uncount(&self, slot: &Slot) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if slot.upgraded {
            self.upgraded.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The stream's outbound queues.
    pub fn outbound(&self) -> &Outbound {
        &self.out
    }

    fn our_direction(&self) -> Direction {
        match self.role {
            Role::Server => Direction::ServerToClient,
            Role::Client => Direction::ClientToServer,
        }
    }

    /// A frame of ours for `request_id`.
    pub fn message(&self, request_id: &str, payload: Payload) -> TunnelMessage {
        frame::message(&self.client_id, request_id, self.our_direction(), payload)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<Slot>> {
        // A panic while holding this lock leaves a consistent map (every
        // update is a single insert or remove), so poisoning is ignored.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_slot(self: &Arc<Self>, request_id: &Arc<str>, window: u32, phase: Phase) -> (Slot, ExchangeIo) {
        let window = if window == 0 { DEFAULT_EXCHANGE_WINDOW } else { window };
        let (tx, rx) = mpsc::channel(body_buffer_capacity(window));
        let recv = Arc::new(Mutex::new(RecvWindow::new(window)));
        let credit = Arc::new(Semaphore::new(window as usize));
        let cancel = CancellationToken::new();
        let slot = Slot {
            phase,
            window: recv.clone(),
            head: None,
            body: tx,
            credit: credit.clone(),
            cancel: cancel.clone(),
            outbound_done: false,
            idle_timeout: None,
            last_activity: Instant::now(),
            upgraded: false,
            slices: (window / WINDOW_PER_SLICE) as usize,
        };
        let io = ExchangeIo {
            request_id: request_id.clone(),
            credit,
            cancel,
            max_chunk: frame::max_chunk(window),
            body: InboundBody::new(rx, recv, self.clone(), request_id.clone()),
        };
        (slot, io)
    }

    /// Adds an exchange; false when the stream has already ended. The check is
    /// made under the lock that fail_all drains, so no slot slips in after it.
    fn insert(&self, request_id: Arc<str>, slot: Slot) -> bool {
        let mut slots = self.lock();
        if self.closed.load(Ordering::Acquire) || self.draining.load(Ordering::Acquire) {
            return false;
        }
        if slots.insert(request_id, slot).is_none() {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        }
        true
    }

    /// Counts body bytes delivered from the peer.
    pub fn count_received(&self, n: usize) {
        self.stats.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Counts body bytes sent to the peer.
    pub fn count_sent(&self, n: usize) {
        self.stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn remove(&self, request_id: &str) -> Option<Slot> {
        let slot = self.lock().remove(request_id);
        if let Some(s) = &slot {
            self.uncount(s);
        }
        slot
    }

    /// Server side: opens an exchange before its request head is sent; None
    /// when the stream has already ended (the caller picks another). Once
    /// the response head is in, `expire_idle` closes it after `idle_timeout`
    /// with nothing moving either way.
    pub fn open(
        self: &Arc<Self>,
        request_id: &str,
        window: u32,
        idle_timeout: Duration,
    ) -> Option<(ExchangeIo, HeadReceiver)> {
        let id: Arc<str> = Arc::from(request_id);
        let (mut slot, io) = self.new_slot(&id, window, Phase::AwaitHead);
        let (head_tx, head_rx) = oneshot::channel();
        slot.head = Some(head_tx);
        slot.idle_timeout = Some(idle_timeout);
        self.insert(id, slot).then_some((io, head_rx))
    }

    /// Server side: opens an exchange relayed for a peer server. The
    /// client's frames for it go to `to_peer` as they are; the peer's reach
    /// the client through `relay_to_client`. False when the stream has ended
    /// or the id is in use.
    pub fn open_relay(&self, request_id: &str, to_peer: mpsc::Sender<TunnelMessage>) -> bool {
        // The slots' lock orders this against fail_all and stop_opening.
        let slots = self.lock();
        if self.closed.load(Ordering::Acquire)
            || self.draining.load(Ordering::Acquire)
            || slots.contains_key(request_id)
        {
            return false;
        }
        let mut relays = self.relays();
        if relays.contains_key(request_id) {
            return false;
        }
        relays.insert(Arc::from(request_id), Relay { to_peer, client_done: false, peer_done: false });
        self.relaying.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.stats.exchanges.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn relays(&self) -> std::sync::MutexGuard<'_, Table<Relay>> {
        self.relays.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end_relay(&self, request_id: &str) -> Option<Relay> {
        let r = self.relays().remove(request_id);
        if r.is_some() {
            self.relaying.fetch_sub(1, Ordering::Relaxed);
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        r
    }

    /// Server side: sends a peer's frame of a relayed exchange to the client,
    /// waiting for room in the stream's queue (only the peer's call for this
    /// exchange waits). False when the frame belongs to no open relay or the
    /// stream is gone: the caller stops.
    pub async fn relay_to_client(&self, mut msg: TunnelMessage) -> bool {
        {
            let mut relays = self.relays();
            let Some(r) = relays.get_mut(msg.request_id.as_str()) else { return false };
            let over = match &msg.payload {
                Some(Payload::Cancel(_)) => true,
                // A head that ends the request has no End frame behind it.
                Some(Payload::End(_)) | Some(Payload::HttpRequest(proto::HttpRequest { end_of_stream: true, .. })) => {
                    r.peer_done = true;
                    r.client_done
                }
                _ => false,
            };
            drop(relays);
            if over {
                self.end_relay(&msg.request_id);
            }
        }
        msg.client_id = self.client_id.clone();
        match msg.payload {
            // Credit goes ahead of queued data, as the peer's own would.
            Some(Payload::WindowUpdate(_)) => self.out.priority_sender().send(Box::new(msg)).await.is_ok(),
            _ => self.out.send_data(msg).await.is_ok(),
        }
    }

    /// Server side: the peer's call for a relayed exchange ended early (the
    /// peer server failed or gave up): the client is told to stop work on it.
    pub fn abandon_relay(&self, request_id: &str, reason: &str) {
        if let Some(r) = self.end_relay(request_id) {
            if !(r.client_done && r.peer_done) {
                let msg = self.message(request_id, Payload::Cancel(proto::Cancel { reason: reason.to_string() }));
                self.send_ordered(msg);
            }
        }
    }

    /// A client frame of a relayed exchange, handed to its peer; None when
    /// `msg` belongs to no relay. Never blocks: the peer's credit bounds
    /// what can be queued, so a full queue is the client breaking it.
    fn relay_to_peer(&self, msg: TunnelMessage) -> Option<Dispatched> {
        let mut relays = self.relays();
        let r = relays.get_mut(msg.request_id.as_str())?;
        let id = msg.request_id.clone();
        let terminal = matches!(msg.payload, Some(Payload::Error(_)) | Some(Payload::Cancel(_)));
        // A head that ends the response (HEAD, 204, 304) has no End frame behind it.
        let ends = matches!(
            msg.payload,
            Some(Payload::End(_)) | Some(Payload::HttpResponse(proto::HttpResponse { end_of_stream: true, .. }))
        );
        // A peer server may predate heads that carry body bytes or a header
        // block: those go on in the forms it reads. A block that does not
        // parse cannot, and an older peer would drop it unread: the relay
        // ends as if the client had broken its credit.
        let sent = for_older_peer(msg).map(|frames| frames.into_iter().all(|m| r.to_peer.try_send(m).is_ok()));
        let broken = !matches!(sent, Ok(true));
        if ends {
            r.client_done = true;
        }
        let over = terminal || broken || (r.client_done && r.peer_done);
        drop(relays);
        if over {
            self.end_relay(&id);
        }
        if broken {
            let reason = match sent {
                Err(e) => e.to_string(),
                Ok(_) => "credit exceeded".to_string(),
            };
            tracing::warn!(request_id = %id, %reason, "relayed exchange: the client broke the protocol (or the peer is gone); reset");
            let msg = self
                .message(&id, Payload::Error(proto::ExchangeError { kind: Kind::Protocol as i32, message: reason }));
            self.send_ordered(msg);
        }
        Some(Dispatched::Done)
    }

    /// Our body is fully sent (end or error frame queued).
    pub fn finish_outbound(&self, request_id: &str) {
        let mut slots = self.lock();
        let done = match slots.get_mut(request_id) {
            Some(s) => {
                s.outbound_done = true;
                s.phase == Phase::Ended
            }
            None => false,
        };
        if done {
            if let Some(s) = slots.remove(request_id) {
                self.uncount(&s);
            }
        }
    }

    /// Our side moved body data: the exchange is not idle.
    pub fn touch(&self, request_id: &str) {
        if let Some(s) = self.lock().get_mut(request_id) {
            s.last_activity = Instant::now();
        }
    }

    /// Closes every exchange past its response head that has moved nothing
    /// either way for its idle timeout: its local body fails, the peer gets
    /// a cancel. A sweep rather than a timer in the body, because a public
    /// client that stops reading never polls its body. Returns the ids closed.
    pub fn expire_idle(&self, now: Instant) -> Vec<String> {
        let expired: Vec<(String, Duration)> = self
            .lock()
            .iter()
            .filter_map(|(id, s)| {
                let limit = s.idle_timeout?;
                (s.phase != Phase::AwaitHead && now.saturating_duration_since(s.last_activity) >= limit)
                    .then(|| (id.to_string(), limit))
            })
            .collect();
        for (id, limit) in &expired {
            if let Some(slot) = self.remove(id) {
                slot.cancel.cancel();
                let failure = ExchangeFailure::Idle(*limit);
                let reason = failure.to_string();
                Self::deliver_failure(slot, failure);
                self.send_ordered(self.message(id, Payload::Cancel(proto::Cancel { reason })));
            }
        }
        expired.into_iter().map(|(id, _)| id).collect()
    }

    /// We give the exchange up: free it and tell the peer, if it was still open.
    pub fn abandon(&self, request_id: &str, reason: &str) {
        if let Some(slot) = self.remove(request_id) {
            slot.cancel.cancel();
            let msg = self.message(request_id, Payload::Cancel(proto::Cancel { reason: reason.to_string() }));
            self.send_ordered(msg);
        }
    }

    /// Fails the exchange locally and reports it to the peer as `kind`.
    pub fn fail(&self, request_id: &str, kind: Kind, message: String) {
        if let Some(slot) = self.remove(request_id) {
            slot.cancel.cancel();
            let failure = ExchangeFailure::Peer { kind, message: message.clone() };
            Self::deliver_failure(slot, failure);
            let msg = self.message(request_id, Payload::Error(proto::ExchangeError { kind: kind as i32, message }));
            self.send_ordered(msg);
        }
    }

    /// Queues a frame behind the exchange's earlier frames (so a cancel never
    /// overtakes the head it refers to), without waiting.
    pub fn send_ordered(&self, msg: TunnelMessage) {
        if let Some(msg) = self.out.try_data(msg) {
            // The queue is full: wait for room off the caller's path. The task
            // ends when the frame is queued or the stream closes.
            let out = self.out.clone();
            tokio::spawn(async move {
                let _ = out.send_data(msg).await;
            });
        }
    }

    /// Fails every exchange in flight and tells the peer why (shutting down).
    pub fn fail_all_to_peer(&self, kind: Kind, message: &str) {
        let ids: Vec<Arc<str>> = self.lock().keys().cloned().collect();
        for id in ids {
            self.fail(&id, kind, message.to_string());
        }
    }

    /// The stream ended: fail every exchange on it; none can open after this.
    pub fn fail_all(&self, failure: ExchangeFailure) {
        let drained: Vec<Slot> = {
            let mut slots = self.lock();
            self.closed.store(true, Ordering::Release);
            slots.drain().map(|(_, s)| s).collect()
        };
        let relays: Vec<(Arc<str>, Relay)> = self.relays().drain().collect();
        for (id, r) in relays {
            self.relaying.fetch_sub(1, Ordering::Relaxed);
            self.in_flight.fetch_sub(1, Ordering::Relaxed);
            // The peer answers its public client as a lost stream would.
            let msg = frame::message(
                &self.client_id,
                &id,
                Direction::ClientToServer,
                Payload::Error(proto::ExchangeError {
                    kind: Kind::UpstreamFailed as i32,
                    message: format!("tunnel stream lost: {failure}"),
                }),
            );
            let _ = r.to_peer.try_send(msg);
        }
        for slot in drained {
            self.uncount(&slot);
            slot.cancel.cancel();
            Self::deliver_failure(slot, failure.clone());
        }
    }

    fn deliver_failure(mut slot: Slot, failure: ExchangeFailure) {
        slot.credit.close();
        if let Some(head) = slot.head.take() {
            let _ = head.send(Err(failure.clone()));
        }
        // The buffer may be full of data the consumer has not read; the
        // failure is then seen as the sender's end, which also fails the body.
        let _ = slot.body.try_send(BodyEvent::Failed(failure));
    }

    /// Routes one exchange frame from the peer. Never blocks.
    pub fn dispatch(self: &Arc<Self>, msg: TunnelMessage) -> Dispatched {
        if self.relaying.load(Ordering::Relaxed) > 0 && self.relays().contains_key(msg.request_id.as_str()) {
            return self.relay_to_peer(msg).unwrap_or(Dispatched::Done);
        }
        let id = msg.request_id;
        let Some(payload) = msg.payload else {
            return Dispatched::Done;
        };
        match payload {
            Payload::HttpRequest(head) if self.role == Role::Client => {
                if self.lock().contains_key(id.as_str()) {
                    self.protocol_error(&id, FrameError::DuplicateHead);
                    return Dispatched::Done;
                }
                let w = head.window;
                if w != 0 && !(frame::MIN_EXCHANGE_WINDOW..=frame::MAX_EXCHANGE_WINDOW).contains(&w) {
                    return self.protocol_error(&id, FrameError::BadHead("window"));
                }
                let phase = match Phase::AwaitHead.advance(FrameKind::Head { ends: head.end_of_stream }) {
                    Ok(p) => p,
                    Err(e) => return self.protocol_error(&id, e),
                };
                let key: Arc<str> = Arc::from(id.as_str());
                let (slot, io) = self.new_slot(&key, head.window, phase);
                if head.end_of_stream {
                    let _ = slot.body.try_send(BodyEvent::End(None));
                }
                if !self.insert(key, slot) {
                    return Dispatched::Done;
                }
                Dispatched::NewRequest(Box::new(NewRequest { head, io, trace_id: msg.trace_id }))
            }
            Payload::HttpResponse(head) if self.role == Role::Server => {
                let mut slots = self.lock();
                let Some(slot) = slots.get_mut(id.as_str()) else {
                    drop(slots);
                    return self.unknown(&id, "response head");
                };
                match slot.phase.advance(FrameKind::Head { ends: head.end_of_stream }) {
                    Ok(p) => slot.phase = p,
                    Err(e) => {
                        drop(slots);
                        return self.protocol_error(&id, e);
                    }
                }
                let ends = head.end_of_stream;
                slot.last_activity = Instant::now();
                // The body's first bytes, carried in the head: credit as a
                // chunk. (The head keeps them too: their length is the
                // body's when the head ends it.)
                let inline = head.body.clone();
                if !inline.is_empty() {
                    let checked = if head.status == 101 {
                        Err(FrameError::BadHead("body with a 101"))
                    } else {
                        slot.window.lock().unwrap_or_else(|e| e.into_inner()).on_chunk(inline.len())
                    };
                    if let Err(e) = checked {
                        drop(slots);
                        return self.protocol_error(&id, e);
                    }
                    // The buffer is empty yet: it has room.
                    let _ = slot.body.try_send(BodyEvent::Data(inline));
                }
                if ends {
                    let _ = slot.body.try_send(BodyEvent::End(None));
                }
                if let Some(tx) = slot.head.take() {
                    let _ = tx.send(Ok(head));
                }
                let remove = ends && slot.outbound_done;
                drop(slots);
                if remove {
                    self.remove(&id);
                }
                Dispatched::Done
            }
            Payload::Body(chunk) => {
                let mut slots = self.lock();
                let Some(slot) = slots.get_mut(id.as_str()) else {
                    drop(slots);
                    return self.unknown(&id, "body");
                };
                let checked = slot
                    .phase
                    .advance(FrameKind::Body)
                    .and_then(|_| slot.window.lock().unwrap_or_else(|e| e.into_inner()).on_chunk(chunk.data.len()));
                if let Err(e) = checked {
                    drop(slots);
                    return self.protocol_error(&id, e);
                }
                slot.last_activity = Instant::now();
                // A chunk is a slice of the gRPC decoder's buffer and keeps
                // all of it alive. Read at once, that costs nothing; queued
                // behind a slow reader, it pins a buffer per chunk (measured
                // 1.6x the window per stalled exchange). Past a few per
                // exchange (none for a small window: those are the many
                // streams of one connection), chunks are copied out to
                // their own size instead.
                let queued = slot.body.max_capacity() - slot.body.capacity();
                let data = if queued >= slot.slices && !slot.body.is_closed() {
                    Bytes::copy_from_slice(&chunk.data)
                } else {
                    chunk.data
                };
                // Cannot be full: the buffer holds a whole window of minimum-cost frames.
                if slot.body.try_send(BodyEvent::Data(data)).is_err() && !slot.body.is_closed() {
                    drop(slots);
                    return self.protocol_error(&id, FrameError::CreditExceeded { cost: 0, available: 0 });
                }
                Dispatched::Done
            }
            Payload::End(end) => {
                let mut slots = self.lock();
                let Some(slot) = slots.get_mut(id.as_str()) else {
                    drop(slots);
                    return self.unknown(&id, "end");
                };
                match slot.phase.advance(FrameKind::End) {
                    Ok(p) => slot.phase = p,
                    Err(e) => {
                        drop(slots);
                        return self.protocol_error(&id, e);
                    }
                }
                let trailers = if end.trailers.is_empty() {
                    None
                } else {
                    match frame::headers_from_proto(end.trailers) {
                        Ok(t) => Some(t),
                        Err(e) => {
                            drop(slots);
                            return self.protocol_error(&id, e);
                        }
                    }
                };
                let _ = slot.body.try_send(BodyEvent::End(trailers));
                let remove = slot.outbound_done;
                drop(slots);
                if remove {
                    self.remove(&id);
                }
                Dispatched::Done
            }
            Payload::WindowUpdate(w) => {
                let slots = self.lock();
                let Some(slot) = slots.get(id.as_str()) else {
                    // Credit for an exchange that just finished: normal.
                    return Dispatched::Done;
                };
                let credit = slot.credit.clone();
                drop(slots);
                let granted = w.credit as usize;
                if credit.available_permits() + granted > frame::MAX_EXCHANGE_WINDOW as usize {
                    return self.protocol_error(&id, FrameError::CreditOverflow);
                }
                credit.add_permits(granted);
                Dispatched::Done
            }
            Payload::Cancel(c) => {
                if let Some(slot) = self.remove(&id) {
                    tracing::debug!(request_id = %id, reason = %c.reason, "exchange cancelled by peer");
                    slot.cancel.cancel();
                    Self::deliver_failure(slot, ExchangeFailure::Cancelled(c.reason));
                }
                Dispatched::Done
            }
            Payload::Error(e) => {
                if let Some(slot) = self.remove(&id) {
                    let kind = Kind::try_from(e.kind).unwrap_or(Kind::Unspecified);
                    tracing::debug!(request_id = %id, ?kind, message = %e.message, "exchange failed at peer");
                    slot.cancel.cancel();
                    Self::deliver_failure(slot, ExchangeFailure::Peer { kind, message: e.message });
                }
                Dispatched::Done
            }
            other => {
                tracing::warn!(request_id = %id, payload = payload_name(&other), "unexpected frame on a data stream; dropped");
                Dispatched::Done
            }
        }
    }

    fn unknown(&self, id: &str, what: &str) -> Dispatched {
        // Frames in flight when an exchange was cancelled land here: normal,
        // so debug, not warn.
        tracing::debug!(request_id = %id, frame = what, "frame for an unknown exchange; dropped");
        Dispatched::Done
    }

    fn protocol_error(&self, id: &str, e: FrameError) -> Dispatched {
        tracing::warn!(request_id = %id, error = %e, "protocol error; exchange reset, other exchanges unaffected");
        if let Some(slot) = self.remove(id) {
            slot.cancel.cancel();
            Self::deliver_failure(slot, ExchangeFailure::Protocol(e.clone()));
        }
        let msg = self
            .message(id, Payload::Error(proto::ExchangeError { kind: Kind::Protocol as i32, message: e.to_string() }));
        self.send_ordered(msg);
        Dispatched::Done
    }
}

/// A response head as the frames an older receiver understands: its header
/// block as listed headers, and body bytes it carries as the head alone, a
/// body frame, and an end frame if it ended. Any other message is returned
/// as it is; a header block that does not parse is an error.
fn for_older_peer(mut msg: TunnelMessage) -> Result<Vec<TunnelMessage>, FrameError> {
    let Some(Payload::HttpResponse(head)) = &mut msg.payload else { return Ok(vec![msg]) };
    if !head.header_block.is_empty() {
        let headers = frame::headers_from_block(&head.header_block)?;
        let listed = std::mem::take(&mut head.headers);
        head.headers = frame::headers_to_proto(&headers);
        head.headers.extend(listed);
        head.header_block = Bytes::new();
    }
    if head.body.is_empty() {
        return Ok(vec![msg]);
    }
    let data = std::mem::take(&mut head.body);
    let ends = std::mem::take(&mut head.end_of_stream);
    let frame = |payload| TunnelMessage { payload: Some(payload), ..msg.clone() };
    let mut out = vec![frame(Payload::Body(proto::BodyChunk { data }))];
    if ends {
        out.push(frame(Payload::End(proto::BodyEnd::default())));
    }
    out.insert(0, msg);
    Ok(out)
}

/// A payload's name, for logs.
pub fn payload_name(p: &Payload) -> &'static str {
    match p {
        Payload::StreamOpen(_) => "stream_open",
        Payload::StreamOpenResponse(_) => "stream_open_response",
        Payload::ConfigSync(_) => "config_sync",
        Payload::ConfigSyncResponse(_) => "config_sync_response",
        Payload::HttpRequest(_) => "http_request",
        Payload::HttpResponse(_) => "http_response",
        Payload::Body(_) => "body",
        Payload::End(_) => "end",
        Payload::Error(_) => "error",
        Payload::Cancel(_) => "cancel",
        Payload::WindowUpdate(_) => "window_update",
        Payload::Drain(_) => "drain",
    }
}

/// Frees the exchange when dropped before it completed (public client hung
/// up, handler aborted), telling the peer to stop work on it.
pub struct ExchangeGuard {
    exchanges: Arc<Exchanges>,
    request_id: Arc<str>,
    armed: bool,
}

impl ExchangeGuard {
    /// Guards `request_id` in `exchanges`.
    pub fn new(exchanges: Arc<Exchanges>, request_id: impl Into<Arc<str>>) -> Self {
        ExchangeGuard { exchanges, request_id: request_id.into(), armed: true }
    }

    /// The table the guarded exchange is in.
    pub fn exchanges(&self) -> &Arc<Exchanges> {
        &self.exchanges
    }

    /// The exchange completed: dropping the guard does nothing.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ExchangeGuard {
    fn drop(&mut self) {
        // A no-op when both directions already finished (the slot is gone).
        if self.armed {
            self.exchanges.abandon(&self.request_id, "abandoned");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::outbound::Outbound;
    use http_body_util::BodyExt;

    fn response(body: &'static [u8], ends: bool) -> TunnelMessage {
        let head = proto::HttpResponse {
            status: 200,
            end_of_stream: ends,
            body: Bytes::from_static(body),
            ..Default::default()
        };
        frame::message("c", "r1", Direction::ClientToServer, Payload::HttpResponse(head))
    }

    /// For a peer that may predate them, a head with body bytes becomes the
    /// head, a body frame and an end frame, in that order; other messages pass.
    #[test]
    fn inline_bodies_split_into_the_frames_older_peers_know() {
        let names = |msgs: Vec<TunnelMessage>| -> Vec<&'static str> {
            msgs.iter().map(|m| payload_name(m.payload.as_ref().expect("payload"))).collect()
        };
        let split = for_older_peer(response(b"hello", true)).expect("no block");
        assert!(matches!(&split[0].payload, Some(Payload::HttpResponse(h)) if h.body.is_empty() && !h.end_of_stream));
        assert!(matches!(&split[1].payload, Some(Payload::Body(b)) if &b.data[..] == b"hello"));
        assert!(split.iter().all(|m| m.request_id == "r1"));
        assert_eq!(names(split), ["http_response", "body", "end"]);
        assert_eq!(names(for_older_peer(response(b"more follows", false)).expect("ok")), ["http_response", "body"]);
        assert_eq!(names(for_older_peer(response(b"", true)).expect("ok")), ["http_response"]);
    }

    /// For a peer that may predate them, a header block becomes listed
    /// headers, ahead of any listed already.
    #[test]
    fn header_blocks_become_listed_headers_for_older_peers() {
        let mut h = http::HeaderMap::new();
        h.append("content-type", http::HeaderValue::from_static("text/plain"));
        h.append("x-a", http::HeaderValue::from_static("1"));
        h.append("x-a", http::HeaderValue::from_static("2"));
        let mut msg = response(b"", true);
        if let Some(Payload::HttpResponse(head)) = &mut msg.payload {
            head.header_block = frame::headers_to_block(&h);
            head.headers = vec![proto::Header { name: "x-late".into(), value: Bytes::from_static(b"9") }];
        }
        let out = for_older_peer(msg.clone()).expect("a valid block");
        let Some(Payload::HttpResponse(head)) = &out[0].payload else { panic!("a head") };
        assert!(head.header_block.is_empty());
        let listed: Vec<(&str, &[u8])> = head.headers.iter().map(|h| (h.name.as_str(), &h.value[..])).collect();
        assert_eq!(listed, [("content-type", &b"text/plain"[..]), ("x-a", b"1"), ("x-a", b"2"), ("x-late", b"9")]);
    }

    /// A head's body bytes reach the response body and pay credit: more
    /// than the window is a protocol error for that exchange alone.
    #[tokio::test]
    async fn inline_body_bytes_are_delivered_and_bound_by_credit() {
        let cancel = CancellationToken::new();
        let (out, _stream) = Outbound::new(cancel.clone());
        let exchanges = Exchanges::new(out, Role::Server, "c".into());
        let (io, head) = exchanges.open("r1", 0, Duration::from_secs(60)).expect("open");
        exchanges.dispatch(response(b"hello", true));
        let head = head.await.expect("head").expect("no failure");
        assert!(head.end_of_stream);
        let body = tokio::time::timeout(Duration::from_secs(5), io.body.collect()).await.expect("in time");
        assert_eq!(&body.expect("body").to_bytes()[..], b"hello");

        let (io, head) = exchanges.open("r2", frame::MIN_EXCHANGE_WINDOW, Duration::from_secs(60)).expect("open");
        let big = vec![7u8; frame::MIN_EXCHANGE_WINDOW as usize + 1];
        let mut msg = response(b"", true);
        msg.request_id = "r2".into();
        if let Some(Payload::HttpResponse(h)) = &mut msg.payload {
            h.body = Bytes::from(big);
        }
        exchanges.dispatch(msg);
        assert!(matches!(head.await, Ok(Err(ExchangeFailure::Protocol(FrameError::CreditExceeded { .. })))));
        drop(io);
    }
}

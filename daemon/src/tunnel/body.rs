//! Bodies crossing the tunnel in both directions: sending one as credit-bound
//! frames, and receiving one as an `http_body::Body` that grants credit back as
//! its consumer (a public client or an upstream) reads it.

use super::exchange::{ExchangeFailure, ExchangeGuard, Exchanges};
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::{CancellationToken, PollSender};
use tunnel_lib::frame::{self, RecvWindow, MAX_CHUNK};
use tunnel_lib::proto::{self, tunnel_message::Payload};

/// What the stream reader hands to a body's consumer.
#[derive(Debug)]
pub enum BodyEvent {
    Data(Bytes),
    /// The body is complete, with optional trailers.
    End(Option<HeaderMap>),
    Failed(ExchangeFailure),
}

/// Called once when an inbound body ends: the bytes delivered, and why it
/// ended early if it did.
pub type FinishHook = Box<dyn FnOnce(u64, Option<String>) + Send>;

/// The peer's body of one exchange, read from a bounded per-exchange buffer.
pub struct InboundBody {
    rx: mpsc::Receiver<BodyEvent>,
    window: Arc<Mutex<RecvWindow>>,
    exchanges: Arc<Exchanges>,
    request_id: Arc<str>,
    /// Credit owed to the peer and not yet queued.
    grant: u32,
    /// Made when credit is first owed: most bodies are small and never
    /// grant any, and making one costs an allocation.
    sender: Option<PollSender<crate::tunnel::outbound::Queued>>,
    done: bool,
    guard: Option<ExchangeGuard>,
    delivered: u64,
    /// The Content-Length the peer announced, if any.
    expected: Option<u64>,
    on_finish: Option<FinishHook>,
    /// Keeps the body's first bytes for the console's inspector.
    tap: Option<Tap>,
    /// Whatever must live exactly as long as the body (a window lease).
    _held: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl InboundBody {
    pub(super) fn new(
        rx: mpsc::Receiver<BodyEvent>,
        window: Arc<Mutex<RecvWindow>>,
        exchanges: Arc<Exchanges>,
        request_id: Arc<str>,
    ) -> Self {
        InboundBody {
            rx,
            window,
            exchanges,
            request_id,
            grant: 0,
            sender: None,
            done: false,
            guard: None,
            delivered: 0,
            expected: None,
            on_finish: None,
            tap: None,
            _held: None,
        }
    }

    /// Copies the body's first bytes into `tap` as they pass.
    pub fn tap(mut self, tap: Tap) -> Self {
        tap.expect(self.expected);
        self.tap = Some(tap);
        self
    }

    /// Keeps `value` until this body is dropped, wherever it goes (a
    /// response, an upgraded connection's pipe).
    pub fn hold<T: std::any::Any + Send + Sync>(mut self, value: T) -> Self {
        self._held = Some(Box::new(value));
        self
    }

    /// The body's announced length: a consumer that stops after reading that
    /// many bytes (as hyper does with Content-Length) has read it all.
    pub fn expect_len(mut self, len: Option<u64>) -> Self {
        self.expected = len;
        self
    }

    /// Calls `hook` once the body ends, completely or not (also when dropped early).
    pub fn on_finish(mut self, hook: FinishHook) -> Self {
        self.on_finish = Some(hook);
        self
    }

    fn finish(&mut self, error: Option<String>) {
        self.done = true;
        if let Some(hook) = self.on_finish.take() {
            hook(self.delivered, error);
        }
    }

    /// Makes dropping this body (before the exchange finished) abandon the exchange.
    pub fn guard(mut self, guard: ExchangeGuard) -> Self {
        self.guard = Some(guard);
        self
    }

    /// Queues owed credit as a WindowUpdate if the priority queue has room;
    /// otherwise the waker is registered and the next poll retries.
    fn flush_grant(&mut self, cx: &mut Context<'_>) {
        if self.grant == 0 {
            return;
        }
        let (exchanges, request_id, grant) = (&self.exchanges, &self.request_id, self.grant);
        let sender = self.sender.get_or_insert_with(|| PollSender::new(exchanges.outbound().priority_sender()));
        match sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                let _ = sender.send_item(Box::new(grant_message(exchanges, request_id, grant)));
                self.grant = 0;
            }
            // The stream is gone; the peer will never need the credit.
            Poll::Ready(Err(_)) => self.grant = 0,
            Poll::Pending => {}
        }
    }
}

impl Body for InboundBody {
    type Data = Bytes;
    type Error = ExchangeFailure;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ExchangeFailure>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        this.flush_grant(cx);
        match this.rx.poll_recv(cx) {
            Poll::Ready(Some(BodyEvent::Data(b))) => {
                this.delivered += b.len() as u64;
                if let Some(t) = &this.tap {
                    t.take(&b);
                }
                this.exchanges.count_received(b.len());
                let granted = this.window.lock().unwrap_or_else(|e| e.into_inner()).on_consumed(b.len());
                if let Some(g) = granted {
                    this.grant += g;
                    this.flush_grant(cx);
                }
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(BodyEvent::End(trailers))) => {
                this.finish(None);
                Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
            }
            Poll::Ready(Some(BodyEvent::Failed(f))) => {
                this.finish(Some(f.to_string()));
                Poll::Ready(Some(Err(f)))
            }
            Poll::Ready(None) => {
                this.finish(Some(ExchangeFailure::StreamLost.to_string()));
                Poll::Ready(Some(Err(ExchangeFailure::StreamLost)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

/// `grant` bytes of credit for `request_id`, as a WindowUpdate to the peer.
fn grant_message(exchanges: &Exchanges, request_id: &str, grant: u32) -> proto::TunnelMessage {
    exchanges.message(request_id, Payload::WindowUpdate(proto::WindowUpdate { credit: grant }))
}

impl Drop for InboundBody {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if self.expected == Some(self.delivered) {
            // Complete by length; the end frame is still on its way and frees
            // the exchange, so there is nothing to cancel. The sender may be
            // waiting for credit before it sends that end: hand over what we
            // owe. Owing means the queue was full at our last try (freed
            // slots go to waiters first, so a try_send now would fail too):
            // wait for room off the dropper's path; the task ends when the
            // credit is queued or the stream closes.
            if self.grant > 0 {
                if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    let tx = self.exchanges.outbound().priority_sender();
                    let msg = grant_message(&self.exchanges, &self.request_id, self.grant);
                    rt.spawn(async move {
                        let _ = tx.send(Box::new(msg)).await;
                    });
                }
            }
            if let Some(g) = self.guard.take() {
                g.disarm();
            }
            self.finish(None);
        } else {
            self.finish(Some("reader went away before the end".into()));
        }
    }
}

/// The first bytes of a body and its whole length so far, kept for the
/// console's inspector (a rule's `capture_bodies`); shared by the body
/// that passes the bytes and the record that shows them.
#[derive(Clone)]
pub struct Tap(Arc<Mutex<TapState>>);

/// Bytes held by every tap alive, against the most they may hold in all
/// (`capture_limit`): requests in flight count too, not only kept ones.
#[derive(Clone, Default)]
pub struct TapBudget {
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl TapBudget {
    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

struct TapState {
    /// What is kept.
    data: Vec<u8>,
    /// Bytes drawn from the budget for `data`: what goes back when it goes.
    charged: usize,
    limit: usize,
    total: u64,
    /// The body's announced length, when known: room for all of it (to
    /// `limit`) is taken at once, not grown a chunk at a time.
    expected: Option<u64>,
    budget: TapBudget,
    /// The most all taps may hold.
    most: usize,
}

impl TapState {
    /// Gives the kept bytes and their budget back.
    fn release(&mut self) {
        self.budget.held.fetch_sub(self.charged, std::sync::atomic::Ordering::Relaxed);
        self.charged = 0;
        self.data = Vec::new();
    }
}

impl Drop for TapState {
    fn drop(&mut self) {
        self.release();
    }
}

impl Tap {
    /// A tap keeping at most `limit` bytes, and nothing that would take
    /// `budget` past `most`.
    pub fn new(limit: usize, budget: TapBudget, most: usize) -> Tap {
        let state = TapState { data: Vec::new(), charged: 0, limit, total: 0, expected: None, budget, most };
        Tap(Arc::new(Mutex::new(state)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The body's announced length (Content-Length), when it has one.
    pub fn expect(&self, len: Option<u64>) {
        self.lock().expected = len;
    }

    /// Counts `b` and keeps what fits. Room is drawn from the budget in
    /// exact amounts, allocated once for an announced length: a doubling
    /// Vec would hold up to twice capture_limit, and regrowing by chunks
    /// left the allocator holding the smaller buffers freed on the way.
    pub fn take(&self, b: &[u8]) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut s = self.lock();
        s.total += b.len() as u64;
        let mut want = s.limit.saturating_sub(s.data.len()).min(b.len());
        if want == 0 {
            return;
        }
        let len = s.data.len();
        if len + want > s.charged {
            // Room for the whole announced body at once, or for this chunk.
            let whole = s.expected.map_or(0, |e| usize::try_from(e).unwrap_or(usize::MAX)).min(s.limit);
            let extra = (len + want).max(whole) - s.charged;
            let most = s.most;
            let granted = s
                .budget
                .held
                .fetch_update(Relaxed, Relaxed, |held| Some(held + extra.min(most.saturating_sub(held))))
                .map_or(0, |before| extra.min(most.saturating_sub(before)));
            s.charged += granted;
            let room = s.charged - len;
            s.data.reserve_exact(room);
            want = want.min(room);
        }
        s.data.extend_from_slice(&b[..want]);
    }

    /// Bytes kept.
    pub fn kept_len(&self) -> usize {
        self.lock().data.len()
    }

    /// What was kept, and the body's length so far (more than the bytes
    /// kept when the body was cut short for the inspector).
    pub fn kept(&self) -> (Bytes, u64) {
        let s = self.lock();
        (Bytes::copy_from_slice(&s.data), s.total)
    }

    /// Forgets the kept bytes and gives their room back to the budget,
    /// however many records still hold the tap (the capture ring let it go).
    pub fn release(&self) {
        self.lock().release();
    }
}

/// A body whose data frames also go through a [`Tap`].
pub struct Tapped<B> {
    inner: B,
    tap: Tap,
}

impl<B> Tapped<B> {
    /// `inner`, tapped.
    pub fn new(inner: B, tap: Tap) -> Self
    where
        B: Body,
    {
        tap.expect(inner.size_hint().exact());
        Tapped { inner, tap }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tapped<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                self.tap.take(d);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// What a look at a body's first frame found.
pub enum Peeked<D> {
    /// Nothing yet: the body's bytes are still on their way.
    Nothing,
    /// Its first frame.
    Frame(Frame<D>),
    /// Its end: the body is empty.
    Ended,
}

/// A body whose first frame was read ahead (to look at it before the
/// request went anywhere): that frame, then the rest.
pub struct Prepended<B: Body> {
    peeked: Peeked<B::Data>,
    rest: B,
}

impl<B: Body> Prepended<B> {
    /// `rest` after what was `peeked` of it.
    pub fn new(peeked: Peeked<B::Data>, rest: B) -> Self {
        Prepended { peeked, rest }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Prepended<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match std::mem::replace(&mut self.peeked, Peeked::Nothing) {
            Peeked::Frame(f) => Poll::Ready(Some(Ok(f))),
            Peeked::Ended => {
                self.peeked = Peeked::Ended;
                Poll::Ready(None)
            }
            Peeked::Nothing => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.peeked {
            Peeked::Ended => true,
            Peeked::Frame(_) => false,
            Peeked::Nothing => self.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let first = match &self.peeked {
            Peeked::Ended => return http_body::SizeHint::with_exact(0),
            Peeked::Frame(f) => f.data_ref().map_or(0, |d| d.len() as u64),
            Peeked::Nothing => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + first);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + first);
        }
        hint
    }
}

/// Why sending a body stopped.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The exchange was cancelled or the stream closed.
    #[error("exchange cancelled")]
    Cancelled,
    /// Reading the body we were sending failed.
    #[error("body failed: {0}")]
    Body(String),
    /// The body passed the given limit; nothing past it was sent.
    #[error("body over {0} bytes")]
    TooLarge(u64),
}

/// Sends `body` on exchange `request_id` as chunks of at most `max_chunk`
/// bytes (the exchange's `ExchangeIo::max_chunk`), each waiting for credit,
/// then the end frame with any trailers. On success our
/// direction of the exchange is finished; on error (the body failed, or
/// passed `limit` bytes) the caller decides how to end the exchange. Returns
/// the body bytes sent.
pub async fn send_body<B>(
    mut body: B,
    request_id: &str,
    credit: &Semaphore,
    cancel: &CancellationToken,
    exchanges: &Arc<Exchanges>,
    max_chunk: usize,
    limit: Option<u64>,
) -> Result<u64, SendError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let out = exchanges.outbound();
    let max_chunk = max_chunk.clamp(1, MAX_CHUNK);
    let mut trailers = None;
    let mut sent = 0u64;
    loop {
        // Credit for a whole chunk before reading more: behind a stalled
        // receiver the body's data stays where it is (an upstream's socket,
        // a public client's), not in our memory (measured 135 -> 70 KiB per
        // stalled download at the client). Only this task takes from
        // `credit`, so what is there now is there when the chunk goes.
        // A body that says it has ended, or has less than a chunk left, waits
        // only for what it still has: its end must not wait for credit it
        // will never use.
        let left = if body.is_end_stream() {
            0
        } else {
            body.size_hint().upper().map_or(max_chunk, |n| n.min(max_chunk as u64) as usize)
        };
        if left > 0 {
            tokio::select! {
                _ = cancel.cancelled() => return Err(SendError::Cancelled),
                p = credit.acquire_many(frame::frame_cost(left)) => drop(p.map_err(|_| SendError::Cancelled)?),
            }
        }
        let next = tokio::select! {
            _ = cancel.cancelled() => return Err(SendError::Cancelled),
            f = body.frame() => f,
        };
        let frame = match next {
            None => break,
            Some(Err(e)) => return Err(SendError::Body(e.to_string())),
            Some(Ok(f)) => f,
        };
        let mut data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                // Trailers end the body.
                trailers = f.into_trailers().ok();
                break;
            }
        };
        if let Some(max) = limit {
            if sent + data.len() as u64 > max {
                return Err(SendError::TooLarge(max));
            }
        }
        while !data.is_empty() {
            let chunk = data.split_to(data.len().min(max_chunk));
            let cost = frame::frame_cost(chunk.len());
            let permit = tokio::select! {
                _ = cancel.cancelled() => return Err(SendError::Cancelled),
                p = credit.acquire_many(cost) => p.map_err(|_| SendError::Cancelled)?,
            };
            // The credit is the peer's; it comes back only as a WindowUpdate.
            permit.forget();
            sent += chunk.len() as u64;
            exchanges.count_sent(chunk.len());
            exchanges.touch(request_id);
            let msg = exchanges.message(request_id, Payload::Body(proto::BodyChunk { data: chunk }));
            // A wedged stream must not hold a cancelled exchange here.
            tokio::select! {
                _ = cancel.cancelled() => return Err(SendError::Cancelled),
                r = out.send_data(msg) => r.map_err(|_| SendError::Cancelled)?,
            }
        }
    }
    let end = proto::BodyEnd { trailers: trailers.as_ref().map(frame::headers_to_proto).unwrap_or_default() };
    out.send_data(exchanges.message(request_id, Payload::End(end))).await.map_err(|_| SendError::Cancelled)?;
    exchanges.finish_outbound(request_id);
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::exchange::Role;
    use crate::tunnel::outbound::Outbound;
    use std::time::Duration;

    /// A body with less than a chunk left, and credit for just that much,
    /// is sent to its end: the end never waits for credit it would not use
    /// (a receiver that owes the rest may be gone already).
    #[tokio::test]
    async fn the_end_of_a_body_waits_for_no_unneeded_credit() {
        let cancel = CancellationToken::new();
        let (out, _stream) = Outbound::new(cancel.clone());
        let exchanges = Exchanges::new(out, Role::Server, "client".into());
        let body = http_body_util::Full::new(Bytes::from(vec![7u8; 1000]));
        let credit = Semaphore::new(frame::frame_cost(1000) as usize);
        let sent = tokio::time::timeout(
            Duration::from_secs(5),
            send_body(body, "r1", &credit, &cancel, &exchanges, 64 * 1024, None),
        )
        .await;
        assert!(matches!(sent, Ok(Ok(1000))), "{sent:?}");
        assert_eq!(credit.available_permits(), 0, "the one chunk took the credit");
    }

    /// A body read to its Content-Length while the priority queue is full.
    fn read_to_length_with_queue_full(
        stream_cancel: &CancellationToken,
    ) -> (crate::tunnel::outbound::OutboundStream, u32) {
        let (out, stream) = Outbound::new(stream_cancel.clone());
        let filler = proto::TunnelMessage::default();
        let mut queued = 0;
        while out.try_priority(filler.clone()) {
            queued += 1;
            assert!(queued <= 10_000, "the priority queue never filled");
        }
        let exchanges = Exchanges::new(out, Role::Server, "client".into());
        let (tx, rx) = mpsc::channel(4);
        let window = Arc::new(Mutex::new(RecvWindow::new(4096)));
        let mut body = InboundBody::new(rx, window, exchanges, "r1".into()).expect_len(Some(2048));
        assert!(tx.try_send(BodyEvent::Data(Bytes::from(vec![1u8; 2048]))).is_ok());
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(matches!(Pin::new(&mut body).poll_frame(&mut cx), Poll::Ready(Some(Ok(_)))));
        let owed = body.grant;
        assert!(owed > 0, "reading half the window owes credit");
        // As hyper does at Content-Length: stop reading and drop the body.
        drop(body);
        (stream, owed)
    }

    /// Credit owed by a body dropped at its Content-Length reaches the peer
    /// once the queue has room, so a sender waiting for it goes on.
    #[tokio::test]
    async fn a_body_dropped_at_its_length_hands_over_its_credit() {
        use tokio_stream::StreamExt;
        let cancel = CancellationToken::new();
        let (mut stream, owed) = read_to_length_with_queue_full(&cancel);
        // The fillers come first; the queue is bounded, and so is the wait.
        let found = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(m) = stream.next().await {
                if let Some(Payload::WindowUpdate(w)) = m.payload {
                    return Some((m.request_id, w.credit));
                }
            }
            None
        })
        .await;
        assert_eq!(found, Ok(Some(("r1".to_string(), owed))));
    }

    /// If the stream closes instead, the task that waited to hand over the
    /// credit ends: none is left behind per body.
    #[tokio::test]
    async fn a_hand_over_on_a_closed_stream_leaves_no_task() {
        let cancel = CancellationToken::new();
        let (stream, _owed) = read_to_length_with_queue_full(&cancel);
        let tasks = tokio::runtime::Handle::current().metrics();
        assert_eq!(tasks.num_alive_tasks(), 1, "the hand-over waits for room");
        drop(stream);
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            while tasks.num_alive_tasks() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(ended.is_ok(), "the hand-over task outlived its stream");
    }
}

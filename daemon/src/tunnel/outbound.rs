//! The outbound side of one gRPC stream: a small priority queue (heartbeats,
//! credit, config) that the writer always drains before the data queue, so
//! control messages never wait behind queued body frames.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tunnel_lib::proto::TunnelMessage;

/// Priority messages queued per stream; they are small and few.
pub const PRIORITY_QUEUE: usize = 256;
/// Data frames queued per stream: at 64 KiB each, at most 4 MiB per stream
/// waiting for HTTP/2 to take them.
pub const DATA_QUEUE: usize = 64;

/// A queued message, boxed: tokio allocates a channel's slots 32 at a time,
/// and 32 inline messages (272 bytes each) cost 8.5 KiB per queue, 17 KiB
/// per stream, even idle; boxed, the slots cost 256 bytes.
pub type Queued = Box<TunnelMessage>;

/// Sending handle of a stream's outbound queues.
#[derive(Clone, Debug)]
pub struct Outbound {
    prio: mpsc::Sender<Queued>,
    data: mpsc::Sender<Queued>,
}

/// The stream is gone: nothing more can be sent on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream closed")]
pub struct Closed;

impl Outbound {
    /// New queues and the stream that writes them out; the stream ends when
    /// `cancel` fires.
    pub fn new(cancel: CancellationToken) -> (Outbound, OutboundStream) {
        let (prio, prio_rx) = mpsc::channel(PRIORITY_QUEUE);
        let (data, data_rx) = mpsc::channel(DATA_QUEUE);
        let cancelled = Box::pin(cancel.clone().cancelled_owned());
        let stream = OutboundStream { prio: prio_rx, data: data_rx, cancel, cancelled };
        (Outbound { prio, data }, stream)
    }

    /// Queues a control message ahead of data. False when the queue is full
    /// (the stream is wedged) or closed; the caller decides what that means.
    pub fn try_priority(&self, msg: TunnelMessage) -> bool {
        self.prio.try_send(Box::new(msg)).is_ok()
    }

    /// Queues a data frame, waiting for room.
    pub async fn send_data(&self, msg: TunnelMessage) -> Result<(), Closed> {
        self.data.send(Box::new(msg)).await.map_err(|_| Closed)
    }

    /// Queues a data frame if there is room now; hands the frame back when
    /// the queue is full (a closed stream drops it: nothing can be sent).
    pub fn try_data(&self, msg: TunnelMessage) -> Option<TunnelMessage> {
        match self.data.try_send(Box::new(msg)) {
            Err(mpsc::error::TrySendError::Full(m)) => Some(*m),
            _ => None,
        }
    }

    /// The priority sender, for code that must wait for room inside `poll`.
    pub fn priority_sender(&self) -> mpsc::Sender<Queued> {
        self.prio.clone()
    }

    /// Data frames waiting to be written.
    pub fn depth(&self) -> usize {
        self.data.max_capacity() - self.data.capacity()
    }

    /// Capacity of the data queue.
    pub fn capacity(&self) -> usize {
        self.data.max_capacity()
    }
}

/// The messages of one stream in the order they go on the wire.
pub struct OutboundStream {
    prio: mpsc::Receiver<Queued>,
    data: mpsc::Receiver<Queued>,
    cancel: CancellationToken,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl Stream for OutboundStream {
    type Item = TunnelMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<TunnelMessage>> {
        // Cancellation first: a closed stream sends nothing more. (Checked
        // here; the wake-up is registered only before waiting, since
        // re-registering it on every message cost more than the check.)
        if self.cancel.is_cancelled() {
            return Poll::Ready(None);
        }
        // Biased: every ready priority message goes before any data frame.
        if let Poll::Ready(Some(m)) = self.prio.poll_recv(cx) {
            return Poll::Ready(Some(*m));
        }
        match self.data.poll_recv(cx) {
            Poll::Ready(Some(m)) => Poll::Ready(Some(*m)),
            // Both senders live in the stream's handle; their end means the handle is gone.
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.cancelled.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

/// The same stream as gRPC server responses.
pub struct ServerOutbound(pub OutboundStream);

impl Stream for ServerOutbound {
    type Item = Result<TunnelMessage, tonic::Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx).map(|m| m.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;
    use tunnel_lib::proto::{tunnel_message::Payload, Drain};

    fn msg(id: &str) -> TunnelMessage {
        TunnelMessage { request_id: id.into(), payload: Some(Payload::Drain(Drain::default())), ..Default::default() }
    }

    /// A heartbeat queued after data frames is written before them.
    #[tokio::test]
    async fn priority_goes_first() {
        let cancel = CancellationToken::new();
        let (out, mut stream) = Outbound::new(cancel.clone());
        out.send_data(msg("d1")).await.expect("open");
        out.send_data(msg("d2")).await.expect("open");
        assert!(out.try_priority(msg("hb")));
        assert_eq!(out.depth(), 2);
        let order: Vec<String> = (&mut stream).take(3).map(|m| m.request_id).collect().await;
        assert_eq!(order, ["hb", "d1", "d2"]);
        cancel.cancel();
        assert!(stream.next().await.is_none(), "cancel ends the stream");
    }
}

//! An upgraded connection (101 Switching Protocols) carried by its exchange:
//! bytes read from the local side leave as body frames under the exchange's
//! credit, the peer's body frames are written to the local side, and the end
//! of either direction is a half-close. Both daemons use it: the server with
//! the public client's connection, the client with the upstream's.

use super::body::{send_body, SendError};
use super::exchange::{ExchangeIo, Exchanges};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_stream::StreamExt;
use tokio_util::io::ReaderStream;

/// Bytes an upgraded connection moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Moved {
    /// From the local side to the peer.
    pub sent: u64,
    /// From the peer to the local side.
    pub received: u64,
}

/// The protocol an HTTP/1.1 request asks to switch to: its Upgrade header,
/// when `Connection` names `upgrade`.
pub fn requested(headers: &HeaderMap) -> Option<String> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if !asks {
        return None;
    }
    // h2c is never passed on: an upstream that took it would serve any
    // number of requests on that connection that no rule ever looked at
    // (h2c smuggling). The request goes as an ordinary one.
    let offered: Vec<&str> = headers
        .get(header::UPGRADE)?
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && !p.eq_ignore_ascii_case("h2c"))
        .collect();
    (!offered.is_empty()).then(|| offered.join(", "))
}

/// Puts back the hop-by-hop headers of an upgrade (stripped in transit).
pub fn restore_headers(headers: &mut HeaderMap, protocol: &str) {
    if let Ok(v) = HeaderValue::from_str(protocol) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, v);
    }
}

/// How an upgraded connection ended: what it moved, and why it ended early if it did.
#[derive(Debug, Default)]
pub struct Outcome {
    pub moved: Moved,
    /// None when both directions ended cleanly.
    pub error: Option<String>,
}

/// Carries `local` over the exchange until both directions have ended, one
/// fails, or the exchange is cancelled (idle, peer gone). On error the
/// caller abandons the exchange.
pub async fn pipe<T>(local: T, io: ExchangeIo, exchanges: &Arc<Exchanges>) -> Outcome
where
    T: AsyncRead + AsyncWrite + Send,
{
    let ExchangeIo { request_id, credit, cancel, max_chunk, mut body } = io;
    let (rd, mut wr) = tokio::io::split(local);
    // Counted as they move, so a connection that fails still reports its bytes.
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let outgoing = async {
        // A read returns what has arrived, so small messages leave at once.
        let frames = ReaderStream::with_capacity(rd, max_chunk).map(|r| {
            if let Ok(b) = &r {
                sent.fetch_add(b.len() as u64, Ordering::Relaxed);
            }
            r.map(Frame::data)
        });
        match send_body(StreamBody::new(frames), &request_id, &credit, &cancel, exchanges, max_chunk, None).await {
            Ok(_) => Ok(()),
            Err(SendError::Cancelled) => Err("exchange cancelled".to_string()),
            Err(e @ (SendError::Body(_) | SendError::TooLarge(_))) => Err(format!("reading the connection: {e}")),
        }
    };
    let incoming = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                received.fetch_add(data.len() as u64, Ordering::Relaxed);
                write(&mut wr, data).await?;
            }
        }
        // The peer half-closed: so do we.
        wr.shutdown().await.map_err(|e| format!("closing the connection: {e}"))
    };
    let error = tokio::try_join!(outgoing, incoming).err();
    Outcome { moved: Moved { sent: sent.into_inner(), received: received.into_inner() }, error }
}

async fn write<W: AsyncWrite + Unpin>(wr: &mut W, data: Bytes) -> Result<(), String> {
    wr.write_all(&data).await.map_err(|e| format!("writing the connection: {e}"))?;
    wr.flush().await.map_err(|e| format!("writing the connection: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(requested(&h), None, "Upgrade without Connection: upgrade is not a request to switch");
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, Upgrade"));
        assert_eq!(requested(&h).as_deref(), Some("websocket"));
        let mut back = HeaderMap::new();
        restore_headers(&mut back, "websocket");
        assert_eq!(requested(&back).as_deref(), Some("websocket"));
    }

    /// h2c is dropped from what a request offers; offering only h2c is no upgrade.
    #[test]
    fn h2c_is_never_passed_on() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade, HTTP2-Settings"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        assert_eq!(requested(&h), None);
        h.insert(header::UPGRADE, HeaderValue::from_static("H2C, websocket"));
        assert_eq!(requested(&h).as_deref(), Some("websocket"));
    }
}

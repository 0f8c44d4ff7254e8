//! A WebSocket upstream for the tests (tokio-tungstenite): echoes messages
//! and close codes, floods or closes on command, refuses /forbidden.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self as ws, Message};
use tokio_tungstenite::WebSocketStream;

/// Room for the 16 MiB message in one frame.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default().max_message_size(Some(64 << 20)).max_frame_size(Some(64 << 20))
}

/// A WebSocket upstream: echoes every message and every close code; the text
/// "flood:N" makes it send N MiB in 64 KiB messages, "close:CODE" makes it
/// close with that code; a path ending in /forbidden is refused with 403.
pub struct WsUpstream {
    pub addr: SocketAddr,
    /// Connections open now.
    pub open: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl WsUpstream {
    pub async fn start() -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let count = count.clone();
                tokio::spawn(async move {
                    // tungstenite's callback type fixes the (large) error type.
                    #[allow(clippy::result_large_err)]
                    let refuse = |req: &ws::handshake::server::Request, resp| {
                        if req.uri().path().ends_with("/forbidden") {
                            let mut no = ws::handshake::server::ErrorResponse::new(Some("not for you".into()));
                            *no.status_mut() = StatusCode::FORBIDDEN;
                            Err(no)
                        } else {
                            Ok(resp)
                        }
                    };
                    let Ok(mut socket) =
                        tokio_tungstenite::accept_hdr_async_with_config(tcp, refuse, Some(ws_config())).await
                    else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = serve_ws(&mut socket).await;
                    count.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        WsUpstream { addr, open, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_ws(socket: &mut WebSocketStream<TcpStream>) -> Result<(), ws::Error> {
    while let Some(msg) = socket.next().await {
        match msg? {
            Message::Text(t) if t.starts_with("flood:") => {
                let mib: usize = t["flood:".len()..].parse().unwrap_or(1);
                let block = Bytes::from(vec![7u8; 64 << 10]);
                for _ in 0..mib * 16 {
                    socket.send(Message::Binary(block.clone())).await?;
                }
            }
            Message::Text(t) if t.starts_with("close:") => {
                let code: u16 = t["close:".len()..].parse().unwrap_or(1000);
                let frame = CloseFrame { code: CloseCode::from(code), reason: "server bye".into() };
                socket.close(Some(frame)).await?;
            }
            // tungstenite answers a Close itself, echoing its code.
            m @ (Message::Text(_) | Message::Binary(_)) => socket.send(m).await?,
            _ => {}
        }
    }
    Ok(())
}

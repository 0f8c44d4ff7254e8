//! The client's TCP dialer for the tunnel link. tonic's own returns as soon
//! as TCP (and TLS) is up, and HTTP/2's client handshake waits for nothing
//! from the server: against a peer that accepts and never speaks (a tarpit,
//! a wedged server) a session would only notice at its first registration's
//! timeout. This dialer reports the first byte the server sends (its HTTP/2
//! SETTINGS, or with TLS its ServerHello), so that connecting can wait for
//! proof of life within `connect_timeout`. With TLS that proof is the
//! handshake itself: a TLS terminator in front of a wedged server passes,
//! and the registration timeout is what notices it.

use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tonic::codegen::Service;

/// Dials the server; the first connection it makes signals its first byte.
#[derive(Clone)]
pub struct Dialer {
    tcp_keepalive: Duration,
    connect_timeout: Duration,
    heard: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl Dialer {
    /// A dialer, and what resolves when its connection's first byte arrives.
    pub fn new(tcp_keepalive: Duration, connect_timeout: Duration) -> (Dialer, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        (Dialer { tcp_keepalive, connect_timeout, heard: Arc::new(Mutex::new(Some(tx))) }, rx)
    }
}

/// Tries each address in turn, each with its share of `within`: a name
/// whose first address black-holes (IPv6 on an IPv4-only path) still
/// reaches the next before the connect timeout.
async fn connect_any(host: &str, port: u16, within: Duration) -> io::Result<TcpStream> {
    let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    let share = within / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolved to no address"));
    for addr in addrs {
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = e,
            Err(_) => last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr}: no answer within {share:?}")),
        }
    }
    Err(last)
}

impl Service<http::Uri> for Dialer {
    type Response = TokioIo<Heard>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Heard>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host =
                uri.host().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "server URL has no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
            let tcp = connect_any(host, port, this.connect_timeout).await?;
            // Tuning that fails costs speed or dead-peer detection, not the connection.
            let _ = tcp.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(this.tcp_keepalive);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            let heard = this.heard.lock().unwrap_or_else(|e| e.into_inner()).take();
            Ok(TokioIo::new(Heard { tcp, heard }))
        })
    }
}

/// A TCP stream that fires its signal on the first byte read.
pub struct Heard {
    tcp: TcpStream,
    heard: Option<oneshot::Sender<()>>,
}

impl AsyncRead for Heard {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if buf.filled().len() > before {
            if let Some(tx) = this.heard.take() {
                let _ = tx.send(());
            }
        }
        r
    }
}

impl AsyncWrite for Heard {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

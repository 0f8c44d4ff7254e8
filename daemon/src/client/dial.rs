//! The client's dialer for the tunnel link: a TCP connection to the one
//! address a session is for (connect timeout, TCP keepalive, nodelay and the
//! link's TCP timers, all set before the SYN), plus a signal on the first
//! byte the server sends.
//!
//! That signal is why this is not tonic's own connector: tonic returns as
//! soon as TCP (and TLS) is up, and HTTP/2's client handshake waits for
//! nothing from the server, so against a peer that accepts and never speaks
//! (a tarpit, a wedged server) a session would only notice at its first
//! registration's timeout. The first byte (the server's HTTP/2 SETTINGS, or
//! with TLS its ServerHello) lets connecting wait for proof of life within
//! `connect_timeout`. With TLS that proof is the handshake itself: a TLS
//! terminator in front of a wedged server passes, and the registration
//! timeout is what notices it.

use crate::tunnel::tuning::{Applied, LinkProbe, LinkSample, Probed};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio_util::io::InspectReader;
use tonic::codegen::Service;
use tunnel_lib::config::LinkTuning;

/// Called with each read's bytes.
type OnRead = Box<dyn FnMut(&[u8]) + Send>;

/// What the dialer hands tonic: the TCP stream, watched for its first byte.
pub type LinkIo = TokioIo<InspectReader<Probed, OnRead>>;

/// The link socket a dialer made last, read for the heartbeats' counts
/// (the server sees only its own direction of the link).
#[derive(Clone, Default)]
pub struct LinkSlot(Arc<Mutex<Option<Arc<LinkProbe>>>>);

impl LinkSlot {
    /// The socket's options and counters; None before it connected.
    pub fn sample(&self) -> Option<LinkSample> {
        let probe = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        probe.map(|p| p.sample())
    }

    fn set(&self, probe: Arc<LinkProbe>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(probe);
    }
}

/// Dials one server address (the client resolves server names itself, one
/// session per address, while the URL keeps the name for the `:authority`
/// and TLS); the first connection it makes signals its first byte.
#[derive(Clone)]
pub struct Dialer {
    addr: SocketAddr,
    tcp_keepalive: Duration,
    connect_timeout: Duration,
    timers: LinkTuning,
    heard: Arc<Mutex<Option<oneshot::Sender<()>>>>,
    slot: LinkSlot,
}

impl Dialer {
    /// A dialer of `addr`, and what resolves when its connection's first byte arrives.
    pub fn new(
        addr: SocketAddr,
        tcp_keepalive: Duration,
        connect_timeout: Duration,
        timers: LinkTuning,
    ) -> (Dialer, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let heard = Arc::new(Mutex::new(Some(tx)));
        (Dialer { addr, tcp_keepalive, connect_timeout, timers, heard, slot: LinkSlot::default() }, rx)
    }

    /// Where the socket of its connection can be read, once it is made.
    pub fn slot(&self) -> LinkSlot {
        self.slot.clone()
    }
}

/// Connects to `addr` with the link's socket options set before the SYN:
/// the timers must be in place when the handshake takes the first RTT
/// sample, or the kernel's 200 ms floor lingers in the RTO for many round
/// trips (docs/benchmarks.md section 12).
async fn connect(
    addr: SocketAddr,
    keepalive: Duration,
    timeout: Duration,
    timers: LinkTuning,
) -> io::Result<(TcpStream, Applied)> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    sock.set_nodelay(true)?;
    socket2::SockRef::from(&sock).set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(keepalive))?;
    let options = crate::tunnel::tuning::apply(&sock, &timers);
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => r.map(|tcp| (tcp, options)),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr} took over {timeout:?}"))),
    }
}

impl Service<http::Uri> for Dialer {
    type Response = LinkIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<LinkIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    /// tonic puts TLS on top for https:// URLs; this only makes the TCP connection.
    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (addr, keepalive, timeout, timers) = (self.addr, self.tcp_keepalive, self.connect_timeout, self.timers);
        let (heard, slot) = (self.heard.clone(), self.slot.clone());
        Box::pin(async move {
            let (tcp, options) = connect(addr, keepalive, timeout, timers).await?;
            let tcp = Probed::new(tcp, options);
            slot.set(tcp.probe());
            let mut heard = heard.lock().unwrap_or_else(|e| e.into_inner()).take();
            let on_read: OnRead = Box::new(move |bytes: &[u8]| {
                if !bytes.is_empty() {
                    if let Some(tx) = heard.take() {
                        let _ = tx.send(());
                    }
                }
            });
            Ok(TokioIo::new(InspectReader::new(tcp, on_read)))
        })
    }
}

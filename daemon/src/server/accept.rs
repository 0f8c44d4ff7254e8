//! Accepting tunnel-link connections in our own loop rather than tonic's:
//! TLS handshakes run here, so that every failure is logged once with the
//! peer's address and its cause (a listener that drops them silently leaves
//! an operator guessing), and a client speaking the wrong one of TLS and
//! plaintext is recognised from its first byte and named as such.

use super::Shared;
use crate::tunnel::link::StallGuard;
use crate::tunnel::tuning::{self, Applied, Probed};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tunnel_lib::tls::rustls;

/// The first byte of every TLS connection (a handshake record).
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Pause after an accept error (fd exhaustion), so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Connections handed to the gRPC server and not yet taken.
const READY_QUEUE: usize = 64;
/// A peer failing the same way again within this is logged at debug only:
/// a misconfigured client retries with backoff, and must not flood the log.
const REPEAT_QUIET: Duration = Duration::from_secs(60);
/// Bound on the failures remembered for REPEAT_QUIET.
const REPEAT_MEMORY: usize = 1024;
/// Handshakes in progress at once; past it new connections are closed at
/// once, so a flood of silent or slow peers cannot take every descriptor.
const MAX_HANDSHAKES: usize = 512;

/// An accepted link connection: its socket guarded against a peer that
/// stops taking our bytes (`link_ping_timeout`), and open to the console's
/// probe (its requests carry a `tuning::LinkConnectInfo`).
pub type LinkIo = MaybeTls<StallGuard<Probed>>;

/// Handshake failures seen lately, by peer address and cause.
#[derive(Default)]
struct Failures {
    // std Mutex: held for a lookup and insert, never across an await.
    seen: std::sync::Mutex<std::collections::HashMap<(std::net::IpAddr, String), std::time::Instant>>,
}

impl Failures {
    /// Logs a failure at warn the first time in REPEAT_QUIET, at debug after.
    fn report(&self, peer: SocketAddr, cause: String) {
        let now = std::time::Instant::now();
        let fresh = {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() >= REPEAT_MEMORY {
                seen.retain(|_, at| now.duration_since(*at) < REPEAT_QUIET);
            }
            match seen.get(&(peer.ip(), cause.clone())) {
                Some(at) if now.duration_since(*at) < REPEAT_QUIET => false,
                // Full of recent failures from many peers: an attack, not a
                // misconfigured client; debug only, and remember no more.
                None if seen.len() >= REPEAT_MEMORY => false,
                _ => {
                    seen.insert((peer.ip(), cause.clone()), now);
                    true
                }
            }
        };
        if fresh {
            tracing::warn!(%peer, "tunnel link: {cause}");
        } else {
            tracing::debug!(%peer, "tunnel link (again): {cause}");
        }
    }
}

/// An accepted connection, plaintext or TLS (tunnel link and public
/// listeners), over a TCP socket or a wrapper of one.
pub enum MaybeTls<S = TcpStream> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: Connected> Connected for MaybeTls<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> S::ConnectInfo {
        match self {
            MaybeTls::Plain(t) => t.connect_info(),
            MaybeTls::Tls(t) => t.get_ref().0.connect_info(),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(t) => Pin::new(t).poll_read(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(t) => Pin::new(t).poll_write(cx, buf),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(t) => Pin::new(t).poll_flush(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(t) => Pin::new(t).poll_shutdown(cx),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(t) => t.is_write_vectored(),
            MaybeTls::Tls(t) => t.is_write_vectored(),
        }
    }
}

/// The next connection on `listener`, or None once `stop` fires. An accept
/// error (descriptors exhausted) is logged and retried after a pause, so the
/// loop neither spins nor ends on it.
pub async fn next_connection(
    listener: &TcpListener,
    what: &str,
    stop: &CancellationToken,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(x) => return Some(x),
                Err(e) => {
                    tracing::warn!("{what} accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Accepts tunnel-link connections until `stop` fires; yields them once
/// their handshake (TLS or a first plaintext byte) succeeded, guarded
/// against a peer that stops taking our bytes (`link_ping_timeout`).
pub fn link_connections(
    shared: Arc<Shared>,
    listener: TcpListener,
    stop: CancellationToken,
) -> ReceiverStream<io::Result<LinkIo>> {
    let (tx, rx) = mpsc::channel(READY_QUEUE);
    let failures = Arc::new(Failures::default());
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    // Fixed at start like hyper's PING timeout it goes with (a restart-only key).
    let stall = shared.config().server.link_ping_timeout;
    // Set on the listener too: accepted sockets inherit them, so they are in
    // force when the handshake takes the first RTT sample (set only after
    // accept, the kernel's 200 ms floor lingers in the RTO for many round
    // trips). A reload's new values reach the listener at the next accept.
    let mut listening = shared.config().server.link_tuning;
    tuning::apply(&listener, &listening);
    tokio::spawn(async move {
        while let Some((tcp, peer)) = next_connection(&listener, "tunnel link", &stop).await {
            let Ok(slot) = pending.clone().try_acquire_owned() else {
                failures.report(peer, format!("{MAX_HANDSHAKES} handshakes already in progress; connection closed"));
                continue;
            };
            let cfg = shared.config();
            let _ = tcp.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(cfg.server.tcp_keepalive);
            let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            if cfg.server.link_tuning != listening {
                listening = cfg.server.link_tuning;
                tuning::apply(&listener, &listening);
            }
            // Not all of them are inherited from the listener (the RTO floor
            // is not), so each socket gets them, and says what it has.
            let options = tuning::apply(&tcp, &listening);
            let (tx, tls, failures) = (tx.clone(), shared.link_tls(), failures.clone());
            let bound = cfg.server.link_handshake_timeout;
            // Ends with the handshake, bounded by link_handshake_timeout.
            tokio::spawn(async move {
                let _slot = slot;
                match handshake(tcp, options, tls, bound, stall).await {
                    Ok(io) => {
                        let _ = tx.send(Ok(io)).await;
                    }
                    Err(Some(cause)) => failures.report(peer, cause),
                    Err(None) => {}
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Completes a connection's handshake; the error is the cause to log, if any.
async fn handshake(
    tcp: TcpStream,
    options: Applied,
    tls: Option<Arc<rustls::ServerConfig>>,
    bound: Duration,
    stall: Duration,
) -> Result<LinkIo, Option<String>> {
    // One deadline for the first byte and the TLS handshake together.
    let deadline = tokio::time::Instant::now() + bound;
    let first = match tokio::time::timeout_at(deadline, first_byte(&tcp)).await {
        Err(_) => return Err(Some(format!("the peer sent nothing within {bound:?}; connection closed"))),
        // Closed before a byte: a port probe, nothing to say.
        Ok(None) => return Err(None),
        Ok(Some(b)) => b,
    };
    let Some(cfg) = tls else {
        if first == TLS_HANDSHAKE_RECORD {
            return Err(Some("a TLS client on the plaintext port; refused (turn TLS on with [server.tls], or give the client an http:// server URL)".into()));
        }
        return Ok(MaybeTls::Plain(StallGuard::new(Probed::new(tcp, options), stall)));
    };
    if first != TLS_HANDSHAKE_RECORD {
        return Err(Some("a plaintext client on the TLS port; refused (its server URL must be https://)".into()));
    }
    // Guarded beneath TLS: progress is what the socket takes, whatever
    // rustls buffers or answers Pending for above it.
    let tcp = StallGuard::new(Probed::new(tcp, options), stall);
    match tokio::time::timeout_at(deadline, TlsAcceptor::from(cfg).accept(tcp)).await {
        Err(_) => Err(Some(format!("TLS handshake not done within {bound:?}; connection closed"))),
        Ok(Err(e)) => Err(Some(format!("TLS handshake failed: {}", handshake_error(&e)))),
        Ok(Ok(s)) => Ok(MaybeTls::Tls(Box::new(s))),
    }
}

/// Waits for the connection's first byte without consuming it; None if it closed.
async fn first_byte(tcp: &TcpStream) -> Option<u8> {
    let mut b = [0u8; 1];
    match tcp.peek(&mut b).await {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// A handshake error in an operator's words, the rustls cause included.
pub fn handshake_error(e: &io::Error) -> String {
    let cause = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match cause {
        Some(rustls::Error::NoCertificatesPresented) => {
            "the client presented no certificate, and [server.tls] client_ca requires one".into()
        }
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::CertificateExpired)) => {
            "the client refused our certificate: it has expired (renew [server.tls] cert)".into()
        }
        Some(rustls::Error::AlertReceived(
            alert @ (rustls::AlertDescription::BadCertificate
            | rustls::AlertDescription::UnknownCA
            | rustls::AlertDescription::CertificateUnknown
            | rustls::AlertDescription::UnsupportedCertificate
            | rustls::AlertDescription::CertificateRevoked),
        )) => {
            format!("the client refused our certificate (alert {alert:?}): does it trust our CA, and is our certificate valid for the name it dials?")
        }
        Some(rustls::Error::AlertReceived(alert)) => format!("the client aborted the handshake (alert {alert:?})"),
        Some(rustls::Error::InvalidCertificate(c)) => format!("the client's certificate is not acceptable: {c:?}"),
        Some(other) => other.to_string(),
        None => e.to_string(),
    }
}

/// The peer's address and the console's probe on a tunnel-link request's
/// connection (tonic's `remote_addr` knows only its own connect info).
pub fn link_of<T>(req: &tonic::Request<T>) -> (Option<SocketAddr>, Option<Arc<tuning::LinkProbe>>) {
    match req.extensions().get::<tuning::LinkConnectInfo>() {
        Some(info) => (info.tcp.remote_addr(), Some(info.probe.clone())),
        None => (req.remote_addr(), None),
    }
}

//! The client's dialer for the tunnel link: hyper-util's `HttpConnector`
//! (connect timeout, TCP keepalive, nodelay) pinned to the one address a
//! session is for, plus a signal on the first byte the server sends.
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

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::io::InspectReader;
use tonic::codegen::Service;

/// Called with each read's bytes.
type OnRead = Box<dyn FnMut(&[u8]) + Send>;

/// What the dialer hands tonic: the TCP stream, watched for its first byte.
pub type LinkIo = TokioIo<InspectReader<TcpStream, OnRead>>;

/// A "resolver" that answers every name with the session's own address: the
/// client resolves server names itself, one session per address, while the
/// URL keeps the name for the `:authority` and TLS.
#[derive(Clone, Copy)]
pub struct Pinned(SocketAddr);

impl Service<Name> for Pinned {
    type Response = std::iter::Once<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(std::iter::once(self.0)))
    }
}

/// Dials one server address; the first connection it makes signals its first byte.
#[derive(Clone)]
pub struct Dialer {
    http: HttpConnector<Pinned>,
    heard: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl Dialer {
    /// A dialer of `addr`, and what resolves when its connection's first byte arrives.
    pub fn new(
        addr: SocketAddr,
        tcp_keepalive: Duration,
        connect_timeout: Duration,
    ) -> (Dialer, oneshot::Receiver<()>) {
        let mut http = HttpConnector::new_with_resolver(Pinned(addr));
        // tonic puts TLS on top for https:// URLs; this only makes the TCP connection.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(tcp_keepalive));
        http.set_connect_timeout(Some(connect_timeout));
        let (tx, rx) = oneshot::channel();
        (Dialer { http, heard: Arc::new(Mutex::new(Some(tx))) }, rx)
    }
}

impl Service<http::Uri> for Dialer {
    type Response = LinkIo;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = Pin<Box<dyn Future<Output = Result<LinkIo, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let connecting = self.http.call(uri);
        let heard = self.heard.clone();
        Box::pin(async move {
            let tcp = connecting.await?.into_inner();
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

//! Transport settings of the tunnel's gRPC link, shared by both ends so that
//! they agree; set explicitly rather than left to tonic/hyper defaults. The
//! timeouts and keepalives an operator may want to tune are config keys
//! (`tunnel_lib::config`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tonic::transport::server::Connected;

/// HTTP/2 windows. Our stream readers always drain h2 at once into
/// per-exchange buffers, so h2 windows only bound what is in transit; large
/// ones keep a bulk transfer from waiting on WINDOW_UPDATE round trips, and a
/// connection window above the stream window keeps one stream from using it up.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 frames up to 64 KiB (the default is 16 KiB): a 64 KiB body chunk
/// then crosses as one DATA frame instead of four.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;
/// Largest message accepted: a 64 KiB chunk, or a head with up to 1 MiB of headers.
pub const MAX_MESSAGE: usize = 2 << 20;

/// A link connection's socket, failed once the peer has taken none of our
/// bytes for `limit` while we had some to send. hyper's PING timeout cannot
/// see such a peer (its PING is never written), so a peer that floods
/// SETTINGS or PINGs and never reads their answers, or a frozen one whose
/// socket buffer filled, would otherwise hold the connection for good.
pub struct StallGuard<T> {
    inner: T,
    limit: Duration,
    /// Set when a write could not go; cleared by any write that did.
    armed: bool,
    /// When the current stall runs out, while `armed`; one timer for the
    /// connection's life, reset when a stall starts.
    clock: Pin<Box<Sleep>>,
}

impl<T> StallGuard<T> {
    /// Guards `inner`: a write stall of `limit` fails the connection. Must be
    /// called within a tokio runtime (it makes the timer).
    pub fn new(inner: T, limit: Duration) -> Self {
        StallGuard { inner, limit, armed: false, clock: Box::pin(tokio::time::sleep(limit)) }
    }

    /// Passes a write's outcome on, arming the stall clock while it waits
    /// (polled with the writer's waker, so the writer is woken when it
    /// runs out) and failing the write once it has.
    fn watch<R>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match r {
            Poll::Pending => {
                let limit = self.limit;
                if !self.armed {
                    self.armed = true;
                    self.clock.as_mut().reset(tokio::time::Instant::now() + limit);
                }
                match self.clock.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer took none of our bytes for {limit:?}"),
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
            done => {
                self.armed = false;
                done
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for StallGuard<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for StallGuard<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}

impl<T: Connected> Connected for StallGuard<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A peer that reads nothing fails our writes after the limit; one that
    /// reads, however slowly, never does.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_takes_nothing_fails_the_writes_after_the_limit() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut guarded = StallGuard::new(ours, Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        // The peer reads 512 bytes a second for 10 s: a slow reader is no stall.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tokio::io::AsyncReadExt::read(&mut theirs, &mut buf).await;
            }
            theirs
        });
        guarded.write_all(&[7u8; 5 * 1024]).await.expect("a slow reader takes it all");
        let _theirs = reader.await.expect("reader");
        // Now it reads nothing: the write fails 5 s after it could not go on.
        let err = guarded.write_all(&[7u8; 4096]).await.expect_err("a stalled peer fails the write");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(took >= Duration::from_secs(15) && took < Duration::from_secs(16), "{took:?}");
    }
}

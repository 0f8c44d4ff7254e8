//! Kept-alive HTTP/1.1 connections to the upstreams, and a request and its
//! response on one of them, spoken with our own codec (`h1`).
//!
//! A connection goes back to its upstream's idle list once its response was
//! read to its end, its framing allowed reuse and nothing unasked-for
//! followed it. Before one is taken again, a read that must find nothing
//! checks that the upstream has not closed it meanwhile.

use super::h1::{self, BodyDecoder, BodyFraming, Decoded, Parsed, RequestFraming, ResponseHead};
use bytes::{Buf as _, Bytes, BytesMut};
use http_body::{Body, Frame};
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tunnel_lib::frame::MAX_CHUNK;

/// Idle connections kept per upstream at most; past it they are closed.
const MAX_IDLE: usize = 256;
/// Room made for a response head's first read.
const HEAD_READ: usize = 8 << 10;
/// Room made for each read of a response body: a tunnel chunk's worth.
const BODY_READ: usize = MAX_CHUNK;
/// A read buffer larger than this is not kept with an idle connection.
const KEEP_BUFFER: usize = 16 << 10;

/// Why no response, or not all of it, came.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection could be made (refused, unresolvable, timed out).
    #[error("{0}")]
    Connect(String),
    /// The request or its response failed on an open connection.
    #[error("{0}")]
    Failed(String),
}

/// An open connection and what was read from it and not yet used.
struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
    key: Arc<str>,
    /// It carried a request before this one.
    reused: bool,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A request to send: its head as bytes and how its body is framed.
pub struct Request<B> {
    /// The head, `h1::encode_request`'s output.
    pub head: Vec<u8>,
    /// The body, framed as `framing` says; `None` for none.
    pub body: Option<(B, RequestFraming)>,
    /// The method is HEAD: the response has no body whatever it says.
    pub head_request: bool,
    /// The request may be sent again on another connection when a kept one
    /// turns out closed before any of the response came: its method is
    /// idempotent (RFC 9110 9.2.2) and it has no body.
    pub retryable: bool,
}

/// The idle connections of every upstream, by `host:port`.
pub struct Pool {
    idle: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_head: usize,
}

impl Pool {
    /// A pool whose connections close after `idle_timeout` unused (a task
    /// sweeps them, and ends when the pool is dropped), reading response
    /// heads of up to `max_head` bytes.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_head: usize) -> Arc<Self> {
        let pool = Arc::new(Pool { idle: Mutex::default(), connect_timeout, idle_timeout, max_head });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&pool), idle_timeout));
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `req` to the upstream at `authority` (`host:port`) on an idle
    /// connection if one is open, else a new one, and reads the response's
    /// head. The body that comes with it holds the connection and gives it
    /// back when read to its end (`ResponseBody::finish`).
    pub async fn send<B>(
        self: &Arc<Self>,
        authority: &str,
        req: Request<B>,
    ) -> Result<(ResponseHead, ResponseBody), PoolError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let key = self.key(authority);
        let conn = match self.take_idle(&key) {
            Some(c) => c,
            None => Box::pin(self.connect(authority, key.clone())).await?,
        };
        let Request { head, body, head_request, retryable } = req;
        let Some((body, framing)) = body else {
            let mut conn = conn;
            let head_read = match exchange(&mut conn, &head, head_request, self.max_head).await {
                Err(e) if e.untouched && conn.reused && retryable => {
                    // The upstream closed the kept connection as we sent: once more, on a new one.
                    tracing::debug!("kept upstream connection closed under a request ({}); sent again", e.why);
                    conn = Box::pin(self.connect(authority, key)).await?;
                    exchange(&mut conn, &head, head_request, self.max_head).await
                }
                r => r,
            };
            let head = head_read.map_err(|e| PoolError::Failed(e.why))?;
            let body = ResponseBody::new(self, conn.key, Reader::Whole(conn.tcp), conn.buf, &head, Writer::None);
            return Ok((head, body));
        };
        Box::pin(self.send_with_body(conn, head, body, framing, head_request)).await
    }

    /// `send` for a request with a body (boxed there: most requests have
    /// none, and a future is as large as its largest path).
    async fn send_with_body<B>(
        self: &Arc<Self>,
        conn: Conn,
        head: Vec<u8>,
        body: B,
        framing: RequestFraming,
        head_request: bool,
    ) -> Result<(ResponseHead, ResponseBody), PoolError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: std::fmt::Display + Send,
    {
        // The body goes on in a task of its own, as long as the upstream
        // reads it: an upstream may answer, even stream its answer, before
        // it has read the whole request (an echo, an early 413).
        let Conn { tcp, mut buf, key, .. } = conn;
        let (mut rd, wr) = tcp.into_split();
        let mut writer = Writing(tokio::spawn(write_request(wr, head, body, framing)));
        let mut written = None;
        let head = {
            let read = read_head(&mut rd, &mut buf, head_request, self.max_head);
            tokio::pin!(read);
            loop {
                tokio::select! {
                    h = &mut read => break h,
                    w = &mut writer.0, if written.is_none() => {
                        written = Some(w.unwrap_or_else(|e| Err(format!("request body task: {e}"))));
                    }
                }
            }
        };
        let head = head.map_err(|e| match &written {
            Some(Err(w)) => PoolError::Failed(format!("{}; writing the request: {w}", e.why)),
            _ => PoolError::Failed(e.why),
        })?;
        // An upstream that answered before it had the whole request may
        // not read the rest as a body: its connection is not reused.
        let writer = match written {
            Some(w) => Writer::Done(w),
            None if writer.0.is_finished() => Writer::Running(writer),
            None => Writer::Early { _writing: writer },
        };
        let body = ResponseBody::new(self, key, Reader::Half(rd), buf, &head, writer);
        Ok((head, body))
    }

    /// The map's key for `authority`, shared rather than allocated per request.
    fn key(&self, authority: &str) -> Arc<str> {
        match self.lock().get_key_value(authority) {
            Some((k, _)) => k.clone(),
            None => Arc::from(authority),
        }
    }

    /// An idle connection to `key` still open, if there is one.
    fn take_idle(&self, key: &str) -> Option<Conn> {
        loop {
            let Idle { mut conn, since } = self.lock().get_mut(key)?.pop()?;
            if since.elapsed() >= self.idle_timeout {
                continue;
            }
            // Nothing may be waiting on an idle connection: bytes are an
            // upstream's error, and an end of file its close.
            match conn.tcp.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    conn.reused = true;
                    return Some(conn);
                }
                _ => continue,
            }
        }
    }

    /// Keeps a connection whose response was read to its end.
    fn give_back(&self, mut conn: Conn) {
        if conn.buf.capacity() > KEEP_BUFFER {
            conn.buf = BytesMut::new();
        }
        let mut idle = self.lock();
        let list = idle.entry(conn.key.clone()).or_default();
        if list.len() < MAX_IDLE {
            list.push(Idle { conn, since: Instant::now() });
        }
    }

    async fn connect(&self, authority: &str, key: Arc<str>) -> Result<Conn, PoolError> {
        let tcp = connect(authority, self.connect_timeout).await?;
        Ok(Conn { tcp, buf: BytesMut::new(), key, reused: false })
    }

    /// Closes connections idle past the timeout.
    fn sweep_idle(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            list.retain(|c| c.since.elapsed() < self.idle_timeout);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// A connection to an upstream's `host[:port]` (port 80 when none), made
/// within `timeout`, with Nagle off.
pub async fn connect(authority: &str, timeout: Duration) -> Result<TcpStream, PoolError> {
    let addr = if authority.contains(':') && !authority.ends_with(']') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let tcp = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
        Err(_) => return Err(PoolError::Connect(format!("no connection within {timeout:?}"))),
        Ok(Err(e)) => return Err(PoolError::Connect(e.to_string())),
        Ok(Ok(t)) => t,
    };
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Sweeps `pool` every half idle timeout until it is dropped.
async fn sweep(pool: Weak<Pool>, idle_timeout: Duration) {
    let every = (idle_timeout / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.sweep_idle(),
            None => return,
        }
    }
}

/// Why a response head did not come; `untouched` when nothing of a
/// response was read (the request may not have reached the upstream).
struct HeadError {
    why: String,
    untouched: bool,
}

/// Writes a request without a body and reads its response's head.
async fn exchange(
    conn: &mut Conn,
    head: &[u8],
    head_request: bool,
    max_head: usize,
) -> Result<ResponseHead, HeadError> {
    if let Err(e) = conn.tcp.write_all(head).await {
        return Err(HeadError { why: format!("writing the request: {e}"), untouched: true });
    }
    read_head(&mut conn.tcp, &mut conn.buf, head_request, max_head).await
}

/// Reads until a final response head, skipping interim (1xx) ones.
async fn read_head<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    head_request: bool,
    max_head: usize,
) -> Result<ResponseHead, HeadError> {
    let mut untouched = buf.is_empty();
    loop {
        if !buf.is_empty() {
            let failed = |e: h1::H1Error| HeadError { why: e.to_string(), untouched: false };
            match h1::parse_response(buf, head_request).map_err(failed)? {
                Parsed::Final(head, used) => {
                    buf.advance(used);
                    return Ok(head);
                }
                Parsed::Interim(used) => {
                    buf.advance(used);
                    continue;
                }
                Parsed::Partial if buf.len() >= max_head => {
                    return Err(HeadError { why: h1::H1Error::HeadTooLarge(max_head).to_string(), untouched: false })
                }
                Parsed::Partial => {}
            }
        }
        buf.reserve(HEAD_READ);
        match rd.read_buf(buf).await {
            Ok(0) => {
                let why = if untouched {
                    "upstream closed the connection without a response"
                } else {
                    "upstream closed the connection within a response head"
                };
                return Err(HeadError { why: why.into(), untouched });
            }
            Ok(_) => untouched = false,
            Err(e) => return Err(HeadError { why: format!("reading the response: {e}"), untouched }),
        }
    }
}

/// Writes the request's head, then its body framed as `framing`. Returns
/// the write half once all of it went, for the connection's reuse. On an
/// error the write side is shut, so that the upstream sees a request cut
/// short rather than waiting for the rest.
async fn write_request<B>(
    mut wr: OwnedWriteHalf,
    head: Vec<u8>,
    body: B,
    framing: RequestFraming,
) -> Result<OwnedWriteHalf, String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Send,
{
    match write_body(&mut wr, head, body, framing).await {
        Ok(()) => Ok(wr),
        Err(e) => {
            let _ = wr.shutdown().await;
            Err(e)
        }
    }
}

async fn write_body<B>(
    wr: &mut OwnedWriteHalf,
    head: Vec<u8>,
    mut body: B,
    framing: RequestFraming,
) -> Result<(), String>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display + Send,
{
    use http_body_util::BodyExt as _;
    wr.write_all(&head).await.map_err(|e| e.to_string())?;
    let mut sent = 0u64;
    let mut chunk_head = Vec::with_capacity(20);
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("request body: {e}"))?;
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(f) => {
                trailers = f.into_trailers().ok();
                break;
            }
        };
        if data.is_empty() {
            continue;
        }
        sent += data.len() as u64;
        match framing {
            RequestFraming::Length(n) if sent > n => {
                return Err(format!("request body longer than its Content-Length {n}"))
            }
            RequestFraming::Length(n) => {
                wr.write_all(&data).await.map_err(|e| e.to_string())?;
                if sent == n {
                    // Whole: the end frame is not waited for (the body was
                    // told its length, so dropping it cancels nothing), and
                    // an upstream that answers at once finds this done.
                    return Ok(());
                }
            }
            RequestFraming::Empty => {
                wr.write_all(&data).await.map_err(|e| e.to_string())?;
            }
            RequestFraming::Chunked => {
                chunk_head.clear();
                h1::chunk_head(data.len(), &mut chunk_head);
                let mut piece = bytes::Buf::chain(bytes::Buf::chain(&chunk_head[..], data), &b"\r\n"[..]);
                wr.write_all_buf(&mut piece).await.map_err(|e| e.to_string())?;
            }
        }
    }
    match framing {
        RequestFraming::Length(n) if sent != n => {
            Err(format!("request body of {sent} bytes for a Content-Length of {n}"))
        }
        RequestFraming::Empty if sent > 0 => Err("request body where none was announced".into()),
        RequestFraming::Chunked => wr.write_all(&h1::last_chunk(trailers.as_ref())).await.map_err(|e| e.to_string()),
        _ => Ok(()),
    }
}

/// A request body's task; aborted when dropped, so that it ends with the
/// exchange that owns it (cancelled, failed or done).
struct Writing(JoinHandle<Result<OwnedWriteHalf, String>>);

impl Drop for Writing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the request body stands, for the connection's reuse.
enum Writer {
    /// There was none.
    None,
    /// Still being written.
    Running(Writing),
    /// Written, or failed.
    Done(Result<OwnedWriteHalf, String>),
    /// Still being written when the response head came: it goes on (an
    /// upstream may stream its answer as it reads), but the connection
    /// is not reused.
    Early { _writing: Writing },
}

/// The side of the connection a response is read from.
enum Reader {
    Whole(TcpStream),
    Half(OwnedReadHalf),
}

impl AsyncRead for Reader {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Whole(t) => Pin::new(t).poll_read(cx, buf),
            Reader::Half(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// A response body read from its connection. `finish` gives the
/// connection back to the pool once the body was read to its end; dropped
/// before, it closes the connection.
pub struct ResponseBody {
    pool: Weak<Pool>,
    key: Arc<str>,
    reader: Reader,
    buf: BytesMut,
    decoder: BodyDecoder,
    keep_alive: bool,
    writer: Writer,
    failed: bool,
    /// The end (or trailers) has been handed out.
    ended: bool,
}

impl ResponseBody {
    fn new(
        pool: &Arc<Pool>,
        key: Arc<str>,
        reader: Reader,
        buf: BytesMut,
        head: &ResponseHead,
        writer: Writer,
    ) -> Self {
        ResponseBody {
            pool: Arc::downgrade(pool),
            key,
            reader,
            buf,
            decoder: BodyDecoder::new(head.framing),
            keep_alive: head.keep_alive,
            writer,
            failed: false,
            ended: head.framing == BodyFraming::Empty,
        }
    }

    /// The body's length when the connection has already read all of it
    /// and it is at most `max` bytes: a small response, for its head.
    pub fn whole_buffered(&self, max: usize) -> Option<usize> {
        let n = usize::try_from(self.decoder.remaining()?).ok()?;
        (n > 0 && n <= max && self.buf.len() >= n).then_some(n)
    }

    /// The whole body `whole_buffered` found, which ends it.
    pub fn take_whole(&mut self) -> Option<Bytes> {
        match self.decoder.decode(&mut self.buf, usize::MAX) {
            Ok(Decoded::Data(d)) if self.decoder.is_done() => {
                self.ended = true;
                Some(d)
            }
            _ => {
                self.failed = true;
                None
            }
        }
    }

    /// Gives the connection back to its pool when this body was read to its
    /// end, the upstream allows another request on it, the request went
    /// whole, and nothing followed the response.
    pub async fn finish(self) {
        let ResponseBody { pool, key, reader, buf, decoder, keep_alive, writer, failed, .. } = self;
        if failed || !keep_alive || !decoder.is_done() || !buf.is_empty() {
            return;
        }
        let Some(pool) = pool.upgrade() else { return };
        let tcp = match (reader, writer) {
            (Reader::Whole(tcp), Writer::None) => tcp,
            (Reader::Half(rd), Writer::Done(Ok(wr))) => match rd.reunite(wr) {
                Ok(t) => t,
                Err(_) => return,
            },
            (Reader::Half(rd), Writer::Running(mut w)) if w.0.is_finished() => match (&mut w.0).await {
                Ok(Ok(wr)) => match rd.reunite(wr) {
                    Ok(t) => t,
                    Err(_) => return,
                },
                _ => return,
            },
            // The upstream answered before the request's body was all sent.
            _ => return,
        };
        pool.give_back(Conn { tcp, buf, key, reused: true });
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = PoolError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, PoolError>>> {
        let this = &mut *self;
        loop {
            if this.failed || this.ended {
                return Poll::Ready(None);
            }
            let fail = |this: &mut ResponseBody, why: String| {
                this.failed = true;
                Poll::Ready(Some(Err(PoolError::Failed(why))))
            };
            match this.decoder.decode(&mut this.buf, MAX_CHUNK) {
                Err(e) => return fail(this, e.to_string()),
                Ok(Decoded::Data(d)) => return Poll::Ready(Some(Ok(Frame::data(d)))),
                Ok(Decoded::End(trailers)) => {
                    this.ended = true;
                    if trailers.is_empty() {
                        return Poll::Ready(None);
                    }
                    return match tunnel_lib::frame::headers_from_block(&trailers) {
                        Ok(map) => Poll::Ready(Some(Ok(Frame::trailers(map)))),
                        Err(e) => fail(this, format!("upstream trailers: {e}")),
                    };
                }
                Ok(Decoded::NeedMore) => {}
            }
            if this.buf.capacity() - this.buf.len() < HEAD_READ {
                this.buf.reserve(BODY_READ);
            }
            match tokio_util::io::poll_read_buf(Pin::new(&mut this.reader), cx, &mut this.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => {
                    if let Err(e) = this.decoder.on_eof() {
                        return fail(this, e.to_string());
                    }
                    // A close-delimited body ended; its connection is done.
                    this.keep_alive = false;
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return fail(this, format!("reading the response body: {e}")),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // A Content-Length body is done with its last byte, before its
        // end is polled (and an empty one from the start).
        self.ended || self.failed || self.decoder.is_done()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self.decoder.remaining() {
            Some(n) => http_body::SizeHint::with_exact(n),
            None => http_body::SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An upstream that answers each request (read as one read) with
    /// `answer`, counting its connections and how many have closed; with
    /// `drop_second`, it closes a connection at its second request instead.
    async fn upstream(answer: &'static [u8], drop_second: bool) -> (String, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let (opened, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let mut served = 0;
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) if drop_second && served == 1 => break,
                            Ok(_) => {
                                served += 1;
                                if tcp.write_all(answer).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        (authority, opened, closed)
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    fn get(method: &str, retryable: bool) -> Request<Empty<Bytes>> {
        let head = format!("{method} / HTTP/1.1\r\nhost: x\r\n\r\n").into_bytes();
        Request { head, body: None, head_request: false, retryable }
    }

    async fn read(pool: &Arc<Pool>, authority: &str, req: Request<Empty<Bytes>>) -> Result<Bytes, PoolError> {
        let (head, mut body) = pool.send(authority, req).await?;
        assert_eq!(head.status, 200);
        let mut data = BytesMut::new();
        while let Some(f) = body.frame().await {
            if let Ok(d) = f?.into_data() {
                data.extend_from_slice(&d);
            }
        }
        body.finish().await;
        Ok(data.freeze())
    }

    /// Requests one after another share one connection; one left idle past
    /// the idle timeout is closed by the sweep, and the next request opens
    /// a new one.
    #[tokio::test]
    async fn connections_are_reused_and_closed_when_idle() {
        let (authority, opened, closed) = upstream(OK, false).await;
        let pool = Pool::new(Duration::from_secs(5), Duration::from_millis(300), 64 << 10);
        for _ in 0..20 {
            let got = tokio::time::timeout(Duration::from_secs(5), read(&pool, &authority, get("GET", true))).await;
            assert_eq!(&got.expect("in time").expect("response")[..], b"ok");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1, "one connection for 20 requests in turn");
        let swept = tokio::time::timeout(Duration::from_secs(5), async {
            while closed.load(Ordering::SeqCst) < 1 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        assert!(swept.await.is_ok(), "the idle connection was not closed");
        let got = tokio::time::timeout(Duration::from_secs(5), read(&pool, &authority, get("GET", true))).await;
        assert!(got.expect("in time").is_ok());
        assert_eq!(opened.load(Ordering::SeqCst), 2);
    }

    /// A kept connection the upstream closes under a request: a GET is
    /// sent again on a new connection, a POST is not (it may have been
    /// acted on) and fails.
    #[tokio::test]
    async fn a_closed_kept_connection_retries_only_what_may_be_repeated() {
        let (authority, opened, _) = upstream(OK, true).await;
        let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 64 << 10);
        let limit = Duration::from_secs(5);
        assert!(tokio::time::timeout(limit, read(&pool, &authority, get("GET", true))).await.expect("in time").is_ok());
        assert!(tokio::time::timeout(limit, read(&pool, &authority, get("GET", true))).await.expect("in time").is_ok());
        assert_eq!(opened.load(Ordering::SeqCst), 2, "the GET went again on a second connection");
        let post = tokio::time::timeout(limit, read(&pool, &authority, get("POST", false))).await.expect("in time");
        assert!(matches!(post, Err(PoolError::Failed(_))), "{post:?}");
    }

    /// A chunked request body reaches the upstream framed, and the
    /// connection is kept once both directions ended.
    #[tokio::test]
    async fn a_request_body_is_framed_and_the_connection_kept() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string();
        let seen = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.ends_with(b"0\r\n\r\n") {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "closed early");
                got.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(OK).await.expect("write");
            // Stays open: the pool keeps it.
            let _ = tcp.read(&mut buf).await;
            got
        });
        let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 64 << 10);
        let req = Request {
            head: b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            body: Some((Full::new(Bytes::from_static(b"hello")), RequestFraming::Chunked)),
            head_request: false,
            retryable: false,
        };
        let run = async {
            let (head, mut body) = pool.send(&authority, req).await.expect("response");
            assert_eq!(head.status, 200);
            while let Some(f) = body.frame().await {
                f.expect("body");
            }
            body.finish().await;
        };
        tokio::time::timeout(Duration::from_secs(5), run).await.expect("in time");
        assert_eq!(pool.lock().values().map(Vec::len).sum::<usize>(), 1, "the connection was kept");
        drop(pool);
        let got = tokio::time::timeout(Duration::from_secs(5), seen).await.expect("in time").expect("upstream");
        assert!(got.ends_with(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"), "{:?}", String::from_utf8_lossy(&got));
    }

    /// Nothing listening: a connect error, not a hang.
    #[tokio::test]
    async fn an_unreachable_upstream_is_a_connect_error() {
        let port = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 64 << 10);
        let r = tokio::time::timeout(Duration::from_secs(10), pool.send(&port.to_string(), get("GET", true)))
            .await
            .expect("in time");
        assert!(matches!(r, Err(PoolError::Connect(_))), "{:?}", r.err());
    }
}

//! HTTP/2 abuse on the public h2c listener and the gRPC listener, spoken
//! frame by frame over raw sockets: rapid reset, CONTINUATION, SETTINGS and
//! PING floods, a stream flood, and whole connections of downloads their
//! peer never takes. Meanwhile normal requests must answer within 1 s,
//! neither daemon may grow by 50 MiB (the client runs in a process of its
//! own; the server's figure also holds the test's upstream), and the
//! abusive connection gets GOAWAY or is closed where the stack has a limit
//! for it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

// The daemons' allocator, so that memory figures are theirs.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use common::child::{serve_client_if_asked, ChildClient};
use common::fault::rss_mib;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// One abuse at a time: memory is measured for the whole process.
static SERIAL: Mutex<()> = Mutex::const_new(());

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK block: the method, scheme and path from the static table, the
/// rest as literals without indexing (no Huffman), as any encoder may send.
fn request_block(method_post: bool, path: &str, authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut b = vec![if method_post { 0x83 } else { 0x82 }, 0x86];
    let lit = |b: &mut Vec<u8>, name_index: u8, value: &str| {
        b.push(name_index);
        b.push(value.len() as u8);
        b.extend_from_slice(value.as_bytes());
    };
    // :path (index 4) and :authority (index 1), literal values.
    lit(&mut b, 0x04, path);
    lit(&mut b, 0x01, authority);
    for (n, v) in extra {
        b.push(0x00);
        b.push(n.len() as u8);
        b.extend_from_slice(n.as_bytes());
        b.push(v.len() as u8);
        b.extend_from_slice(v.as_bytes());
    }
    b
}

/// What the server sent back on an abusive connection.
#[derive(Default)]
struct Heard {
    goaway: AtomicBool,
    goaway_code: AtomicU64,
    closed: AtomicBool,
    rst_streams: AtomicU64,
    ping_acks: AtomicU64,
    frames: AtomicU64,
}

/// An abusive HTTP/2 connection: we write frames; a reader (unless told not
/// to read, to hold the server's writes) records what comes back.
struct Abuser {
    w: OwnedWriteHalf,
    heard: Arc<Heard>,
}

impl Abuser {
    async fn connect(addr: SocketAddr, read: bool) -> (Abuser, Option<OwnedReadHalf>) {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (r, mut w) = tcp.into_split();
        w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        w.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let heard = Arc::new(Heard::default());
        if read {
            tokio::spawn(read_frames(r, heard.clone()));
            (Abuser { w, heard }, None)
        } else {
            (Abuser { w, heard }, Some(r))
        }
    }

    /// Writes; false once the server has closed or reset the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        matches!(tokio::time::timeout(Duration::from_secs(5), self.w.write_all(bytes)).await, Ok(Ok(())))
    }

    fn cut_off(&self) -> bool {
        self.heard.goaway.load(Ordering::SeqCst) || self.heard.closed.load(Ordering::SeqCst)
    }
}

async fn read_frames(mut r: OwnedReadHalf, heard: Arc<Heard>) {
    let mut head = [0u8; 9];
    loop {
        if r.read_exact(&mut head).await.is_err() {
            break;
        }
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let mut payload = vec![0u8; len];
        if r.read_exact(&mut payload).await.is_err() {
            break;
        }
        heard.frames.fetch_add(1, Ordering::SeqCst);
        match head[3] {
            GOAWAY if payload.len() >= 8 => {
                let code = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
                heard.goaway_code.store(u64::from(code), Ordering::SeqCst);
                heard.goaway.store(true, Ordering::SeqCst);
            }
            RST_STREAM => {
                heard.rst_streams.fetch_add(1, Ordering::SeqCst);
            }
            PING if head[4] & 0x1 != 0 => {
                heard.ping_acks.fetch_add(1, Ordering::SeqCst);
            }
            _ => {}
        }
    }
    heard.closed.store(true, Ordering::SeqCst);
}

/// Normal requests through the tunnel every 20 ms while an abuse runs;
/// returns the worst latency and the count, failures counted apart.
struct Probe {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Duration, usize, usize)>,
}

impl Probe {
    fn start(url: String) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let c = http_client();
            let (mut worst, mut n, mut failed) = (Duration::ZERO, 0, 0);
            while !s.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = tokio::time::timeout(
                    Duration::from_secs(5),
                    c.request(http::Request::get(url.as_str()).body(empty()).unwrap()),
                )
                .await;
                let took = t.elapsed();
                match r {
                    Ok(Ok(resp)) if resp.status() == 200 => {
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    }
                    _ => failed += 1,
                }
                worst = worst.max(took);
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (worst, n, failed)
        });
        Probe { stop, task }
    }

    async fn finish(self) -> (Duration, usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        tokio::time::timeout(WAIT, self.task).await.expect("probe ends").unwrap()
    }
}

/// The server (with the upstream and this harness) in the test's process,
/// the client in a process of its own: each daemon's memory is read apart.
struct Tunnel {
    server: TestServer,
    client: ChildClient,
    up: Upstream,
}

/// The tunnel client of `ChildClient`, when this binary runs as one.
#[test]
#[ignore = "run by ChildClient, in a process of its own"]
fn child_client_process() {
    serve_client_if_asked();
}

async fn tunnel() -> Tunnel {
    tunnel_with("").await
}

/// A tunnel whose `[server]` has `server_extra` keys.
async fn tunnel_with(server_extra: &str) -> Tunnel {
    let up = Upstream::start("web").await;
    let rules = "[[rules]]\ngroup = \"demo\"\nupstream = \"web\"\n";
    let server = start_server(&demo_server_toml(server_extra, "", rules), None).await;
    let client = ChildClient::start(&client_toml(&server, "edge-1", "demo", "t-demo", "", &[("web", up.url())]));
    server.wait_streams(3).await;
    Tunnel { server, client, up }
}

/// What neither daemon may grow by under any abuse (issue 9), MiB.
const MAX_GROWTH_MIB: f64 = 50.0;

/// Runs `abuse` against `target` while probing; checks the bounds, prints
/// the figures, and returns what the abuser heard.
async fn under_abuse<F, Fut>(name: &str, t: &Tunnel, abuse: F) -> Arc<Heard>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Arc<Heard>>,
{
    // Warm up allocator and pools so growth is the abuse's.
    for _ in 0..20 {
        assert_eq!(get(&t.server.url("/echo")).await.status, 200);
    }
    let before = (rss_mib(), t.client.rss_mib());
    // A growth check on an unreadable RSS (0) would pass whatever happened.
    assert!(before.0 > 0.0 && before.1 > 0.0, "both daemons' RSS readable: {before:?}");
    let probe = Probe::start(t.server.url("/echo"));
    let started = Instant::now();
    let heard = tokio::time::timeout(Duration::from_secs(60), abuse()).await.expect("abuse bounded");
    let took = started.elapsed();
    let peak = (rss_mib(), t.client.rss_mib());
    let (worst, n, failed) = probe.finish().await;
    let code = heard.goaway_code.load(Ordering::SeqCst);
    println!(
        "{name}: {took:.1?}; goaway={} (code {code:#x}) closed={} rst_streams={}; RSS server {:.1} -> {:.1} MiB, client {:.1} -> {:.1} MiB; {n} normal requests, worst {worst:?}, {failed} failed",
        heard.goaway.load(Ordering::SeqCst),
        heard.closed.load(Ordering::SeqCst),
        heard.rst_streams.load(Ordering::SeqCst),
        before.0,
        peak.0,
        before.1,
        peak.1,
    );
    assert_eq!(failed, 0, "{name}: normal requests failed");
    assert!(worst < Duration::from_secs(1), "{name}: a normal request took {worst:?}");
    // The server's figure also holds the test's upstream and harness.
    let grew = (peak.0 - before.0, peak.1 - before.1);
    assert!(grew.0 < MAX_GROWTH_MIB, "{name}: the server grew {:.1} MiB", grew.0);
    assert!(grew.1 < MAX_GROWTH_MIB, "{name}: the client grew {:.1} MiB", grew.1);
    // Still serving after it.
    assert_eq!(get(&t.server.url("/echo")).await.status, 200);
    heard
}

/// Streams opened and reset at once (CVE-2023-44487), `limit` at most;
/// stops once the server has had enough.
async fn rapid_reset(addr: SocketAddr, path: &str, extra: &[(&str, &str)], limit: u32) -> Arc<Heard> {
    let (mut a, _) = Abuser::connect(addr, true).await;
    let block = request_block(true, path, "a.test", extra);
    let mut batch = Vec::new();
    for i in 0..limit {
        let id = 2 * i + 1;
        batch.extend(frame(HEADERS, END_HEADERS, id, &block));
        batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if batch.len() > 16 << 10 {
            if !a.send(&batch).await || a.cut_off() {
                break;
            }
            batch.clear();
            tokio::task::yield_now().await;
        }
    }
    let _ = a.send(&batch).await;
    let heard = a.heard.clone();
    eventually("the server ends the connection", WAIT, || {
        heard.goaway.load(Ordering::SeqCst) || heard.closed.load(Ordering::SeqCst)
    })
    .await;
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_on_both_listeners() {
    let _serial = SERIAL.lock().await;
    let t = tunnel().await;
    let public = t.server.http;
    let heard = under_abuse("rapid reset, public h2c", &t, || rapid_reset(public, "/echo", &[], 100_000)).await;
    // ENHANCE_YOUR_CALM (0xb) past h2_max_remote_resets.
    assert!(heard.goaway.load(Ordering::SeqCst), "no GOAWAY on the public listener");
    let grpc = t.server.grpc;
    let extra = [("content-type", "application/grpc"), ("te", "trailers")];
    let heard =
        under_abuse("rapid reset, gRPC", &t, || rapid_reset(grpc, "/tunnel.v1.TunnelService/Proxy", &extra, 100_000))
            .await;
    assert!(heard.goaway.load(Ordering::SeqCst), "no GOAWAY on the gRPC listener");
    t.server.stop().await;
}

/// The cap is ours, not h2's default (which is also 20): raised to 1000,
/// a burst of 100 resets is served on, on both listeners (a PING after
/// it is answered and no GOAWAY comes), where the default gave GOAWAY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_reset_cap_is_the_configured_one() {
    let _serial = SERIAL.lock().await;
    let t = tunnel_with("h2_max_remote_resets = 1000").await;
    let extra = [("content-type", "application/grpc"), ("te", "trailers")];
    for (addr, path, extra) in
        [(t.server.http, "/echo", &[][..]), (t.server.grpc, "/tunnel.v1.TunnelService/Proxy", &extra[..])]
    {
        let (mut a, _) = Abuser::connect(addr, true).await;
        let block = request_block(true, path, "a.test", extra);
        let mut burst = Vec::new();
        for i in 0..100u32 {
            burst.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
            burst.extend(frame(RST_STREAM, 0, 2 * i + 1, &8u32.to_be_bytes()));
        }
        burst.extend(frame(PING, 0, 0, &[1u8; 8]));
        assert!(a.send(&burst).await);
        let heard = a.heard.clone();
        eventually("the PING after the burst answered", WAIT, || heard.ping_acks.load(Ordering::SeqCst) >= 1).await;
        assert!(!a.cut_off(), "{addr}: GOAWAY or close under the configured cap of 1000");
    }
    t.server.stop().await;
}

/// A header block that never ends: CONTINUATION frames without END_HEADERS.
async fn continuation_flood(addr: SocketAddr) -> Arc<Heard> {
    let (mut a, _) = Abuser::connect(addr, true).await;
    let block = request_block(true, "/echo", "a.test", &[]);
    a.send(&frame(HEADERS, 0, 1, &block)).await;
    // Each continuation adds a 4000-byte header literal (HPACK: literal
    // without indexing, new name "x-a", value length 4000 as a 7-bit-prefix integer).
    let mut big = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f, 0x80 | (3873 % 128) as u8, (3873 / 128) as u8];
    big.extend(std::iter::repeat_n(b'v', 4000));
    let chunk = frame(CONTINUATION, 0, 1, &big);
    let mut sent = 0usize;
    while sent < 64 << 20 && !a.cut_off() {
        if !a.send(&chunk).await {
            break;
        }
        sent += chunk.len();
    }
    let heard = a.heard.clone();
    eventually("the server ends the connection", WAIT, || {
        heard.goaway.load(Ordering::SeqCst) || heard.closed.load(Ordering::SeqCst)
    })
    .await;
    println!("continuation flood: cut off after {} KiB of header block", sent >> 10);
    assert!(sent < 8 << 20, "the server took {} MiB of one header block", sent >> 20);
    heard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_on_both_listeners() {
    let _serial = SERIAL.lock().await;
    let t = tunnel().await;
    let (public, grpc) = (t.server.http, t.server.grpc);
    under_abuse("CONTINUATION flood, public h2c", &t, || continuation_flood(public)).await;
    under_abuse("CONTINUATION flood, gRPC", &t, || continuation_flood(grpc)).await;
    t.server.stop().await;
}

/// SETTINGS or PING frames as fast as the socket takes them, their ACKs
/// never read: the server must neither queue answers without bound nor
/// stall anyone else.
async fn control_flood(addr: SocketAddr, kind: u8) -> (Abuser, Option<OwnedReadHalf>) {
    let (mut a, unread) = Abuser::connect(addr, false).await;
    // One whole request first: past its first request a connection is
    // bounded by keepalive_timeout, not header_read_timeout.
    a.send(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &request_block(false, "/echo", "a.test", &[]))).await;
    let one = if kind == PING { frame(PING, 0, 0, &[7u8; 8]) } else { frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100]) };
    let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 1000).collect();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut frames = 0u64;
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_millis(500), a.w.write_all(&batch)).await {
            Ok(Ok(())) => frames += 1000,
            // The server stopped reading (its answers are not read): backpressure, as it should.
            Err(_) => break,
            Ok(Err(_)) => {
                a.heard.closed.store(true, Ordering::SeqCst);
                break;
            }
        }
    }
    println!(
        "{} flood: {frames} frames written before the server pushed back or closed",
        if kind == PING { "PING" } else { "SETTINGS" }
    );
    (a, unread)
}

/// SETTINGS and PING floods whose answers are never read, after one whole
/// request. On the public listener the flooding connection then falls idle
/// and is closed at `keepalive_timeout` (dropped `header_read_timeout`
/// later if it cannot take the GOAWAY); on the gRPC listener it is failed
/// once it has taken none of the server's bytes for `link_ping_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_and_ping_floods_are_bounded_on_both_listeners() {
    let _serial = SERIAL.lock().await;
    let t = tunnel_with("keepalive_timeout = \"2s\"\nheader_read_timeout = \"1s\"\nlink_ping_timeout = \"2s\"").await;
    let (public, grpc) = (t.server.http, t.server.grpc);
    for (name, addr) in [("public h2c", public), ("gRPC", grpc)] {
        for kind in [SETTINGS, PING] {
            let what = format!("{} flood, {name}", if kind == PING { "PING" } else { "SETTINGS" });
            let (a, unread) = (Arc::new(tokio::sync::Mutex::new(None)), Arc::new(tokio::sync::Mutex::new(None)));
            let (a2, unread2) = (a.clone(), unread.clone());
            under_abuse(&what, &t, || async move {
                let (abuser, r) = control_flood(addr, kind).await;
                *a2.lock().await = Some(abuser);
                *unread2.lock().await = r;
                Arc::new(Heard::default())
            })
            .await;
            // Ended: a write fails once the server has closed (its unread
            // data makes the close a reset).
            let mut abuser = a.lock().await.take().expect("abuser");
            let started = Instant::now();
            let mut ended = false;
            while started.elapsed() < Duration::from_secs(8) {
                let probe = frame(PING, 0, 0, &[9u8; 8]);
                if let Ok(Err(_)) = tokio::time::timeout(Duration::from_millis(200), abuser.w.write_all(&probe)).await {
                    ended = true;
                    break;
                }
            }
            println!("{what}: connection ended {:?} after the flood", started.elapsed());
            assert!(ended, "{what}: the flooding connection is still open");
        }
    }
    t.server.stop().await;
}

/// More concurrent streams than the server allows, each a request whose
/// body never comes: those past `public_max_streams` (50 here, not hyper's
/// default) are refused, exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_flood_is_capped() {
    let _serial = SERIAL.lock().await;
    let t = tunnel_with("public_max_streams = 50").await;
    let public = t.server.http;
    let heard = under_abuse("stream flood, public h2c (1000 open uploads, cap 50)", &t, || async move {
        let (mut a, _) = Abuser::connect(public, true).await;
        let block = request_block(true, "/upload-sha", "a.test", &[]);
        let mut batch = Vec::new();
        for i in 0..1000u32 {
            batch.extend(frame(HEADERS, END_HEADERS, 2 * i + 1, &block));
        }
        a.send(&batch).await;
        let heard = a.heard.clone();
        eventually("streams past the cap refused", WAIT, || heard.rst_streams.load(Ordering::SeqCst) >= 950).await;
        heard
    })
    .await;
    assert_eq!(heard.rst_streams.load(Ordering::SeqCst), 950, "refused: all past the cap, none under it");
    t.server.stop().await;
}

/// A whole connection of big downloads its peer never takes: as many
/// streams as the server allows (`public_max_streams`), the peer's window held at 0, or
/// opened wide while the peer never reads its socket. The exchanges of one
/// connection share one budget (`public_connection_window`), so what they
/// hold stays within it plus a small floor each, far under 50 MiB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_downloads_cost_a_bounded_buffer() {
    stuck_downloads("zero window", false).await;
}

/// As above, the peer's windows opened wide and its socket never read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_downloads_cost_a_bounded_buffer() {
    stuck_downloads("wide window, socket never read", true).await;
}

async fn stuck_downloads(name: &str, wide: bool) {
    // As many as one connection may open; each download larger than the
    // daemons may hold for it.
    const STREAMS: u32 = tunnel_lib::config::DEFAULT_PUBLIC_MAX_STREAMS;
    let _serial = SERIAL.lock().await;
    let t = tunnel().await;
    let public = t.server.http;
    {
        let what = format!("{name}, public h2c ({STREAMS} x 2 MiB downloads)");
        let heard = under_abuse(&what, &t, || async move {
            let tcp = TcpStream::connect(public).await.unwrap();
            let (r, mut w) = tcp.into_split();
            w.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
            let heard = Arc::new(Heard::default());
            if wide {
                // SETTINGS_INITIAL_WINDOW_SIZE (0x4) = 2^31-1, and the
                // connection's window opened as far: only the socket holds
                // the server's writes back.
                w.write_all(&frame(SETTINGS, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff])).await.unwrap();
                w.write_all(&frame(WINDOW_UPDATE, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes())).await.unwrap();
            } else {
                w.write_all(&frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0, 0])).await.unwrap();
                tokio::spawn(read_frames(r, heard.clone()));
            }
            let block = request_block(false, "/download?bytes=2097152", "a.test", &[]);
            let mut batch = Vec::new();
            for i in 0..STREAMS {
                batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
            }
            w.write_all(&batch).await.unwrap();
            // Let every exchange fill what it may; the connection stays
            // open (closed a moment after memory is read).
            tokio::time::sleep(Duration::from_secs(4)).await;
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                drop(w);
            });
            heard
        })
        .await;
        // Every download was really under way: it reached the upstream and
        // was not refused on the way.
        assert_eq!(t.up.seen.heads_with("/download").len(), STREAMS as usize, "{name}: downloads at the upstream");
        if !wide {
            // (With its socket never read, the abuser hears nothing.)
            assert_eq!(heard.rst_streams.load(Ordering::SeqCst), 0, "{name}: no download refused");
        }
    }
    t.server.stop().await;
}

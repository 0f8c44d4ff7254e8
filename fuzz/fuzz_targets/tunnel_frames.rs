//! Tunnel frames from a peer, in any order: decoded from bytes as the gRPC
//! codec would (prost), aimed at exchanges that are open, finished or never
//! existed, on a server-side and a client-side table at once; every body a
//! frame feeds is read as its consumer would. No frame may panic, and after
//! the stream ends every exchange is gone, and so is every task the frames
//! spawned (a task left waiting on a closed stream would be a leak per frame).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tunnel_daemon::tunnel::exchange::{Dispatched, ExchangeFailure, ExchangeIo, Exchanges, Role};
use tunnel_daemon::tunnel::outbound::Outbound;
use tunnel_lib::proto::TunnelMessage;

/// Request ids frames are aimed at: three opened by the server, two unknown.
const IDS: [&str; 5] = ["r0", "r1", "r2", "r3", "r4"];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime"))
}

/// Reads whatever the body has ready, as a consumer would (granting credit back).
fn drain(io: &mut ExchangeIo) {
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1024 {
        match http_body::Body::poll_frame(Pin::new(&mut io.body), &mut cx) {
            Poll::Ready(Some(_)) => continue,
            _ => break,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = runtime();
    rt.block_on(run(data));
    // Frames may leave tasks waiting for room in a full queue; the streams
    // are gone now, so each must end once it runs.
    for _ in 0..64 {
        if rt.metrics().num_alive_tasks() == 0 {
            break;
        }
        rt.block_on(tokio::task::yield_now());
    }
    assert_eq!(rt.metrics().num_alive_tasks(), 0, "tasks left after the stream ended");
});

async fn run(data: &[u8]) {
    let (out_s, _server_stream) = Outbound::new(CancellationToken::new());
    let (out_c, _client_stream) = Outbound::new(CancellationToken::new());
    let server = Exchanges::new(out_s, Role::Server, "fuzz".into());
    let client = Exchanges::new(out_c, Role::Client, "fuzz".into());
    let mut ios = Vec::new();
    let mut heads = Vec::new();
    for id in &IDS[..3] {
        if let Some((io, head)) = server.open(id, 256 << 10, Duration::from_secs(60)) {
            ios.push(io);
            heads.push(head);
        }
    }
    let mut buf = data;
    while buf.len() > 1 {
        let pick = buf[0];
        buf = &buf[1..];
        let Ok(mut msg) = TunnelMessage::decode_length_delimited(&mut buf) else { break };
        msg.request_id = IDS[usize::from(pick & 0x7f) % IDS.len()].to_string();
        let table = if pick & 0x80 == 0 { &server } else { &client };
        if let Dispatched::NewRequest(req) = table.dispatch(msg) {
            ios.push(req.io);
        }
        for io in &mut ios {
            drain(io);
        }
    }
    for h in &mut heads {
        let _ = h.try_recv();
    }
    server.fail_all(ExchangeFailure::StreamLost);
    client.fail_all(ExchangeFailure::StreamLost);
    assert_eq!(server.in_flight(), 0, "server exchanges left after the stream ended");
    assert_eq!(client.in_flight(), 0, "client exchanges left after the stream ended");
}

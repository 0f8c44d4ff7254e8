//! Per-exchange flow control and frame order: any sequence of chunks,
//! consumptions and frame kinds. The receiver never lets a peer past its
//! credit, never grants more than was consumed, and the order checker
//! accepts exactly head, body*, end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_lib::frame::{
    frame_cost, max_chunk, FrameKind, Phase, RecvWindow, DEFAULT_EXCHANGE_WINDOW, MAX_CHUNK, MAX_EXCHANGE_WINDOW,
    MIN_EXCHANGE_WINDOW,
};

fuzz_target!(|data: &[u8]| {
    let Some((&w, ops)) = data.split_first() else { return };
    // The floor and its multiples, the default and the largest allowed.
    let window = match w % 18 {
        16 => DEFAULT_EXCHANGE_WINDOW,
        17 => MAX_EXCHANGE_WINDOW,
        n => MIN_EXCHANGE_WINDOW * (u32::from(n) + 1),
    };
    // A sender chunking for this window can always send a chunk.
    let chunk = max_chunk(window);
    assert!(chunk > 0 && chunk <= MAX_CHUNK && frame_cost(chunk) <= window / 2, "{window}: chunk {chunk}");
    let mut rw = RecvWindow::new(window);
    // What the peer may still send, by our own account.
    let mut credit = i64::from(window);
    // Received and not yet consumed.
    let mut held: Vec<usize> = Vec::new();
    let mut granted_total = 0i64;
    let mut consumed_total = 0i64;
    let mut phase = Phase::AwaitHead;
    let mut seen_head = false;
    let mut ended = false;
    for op in ops.chunks(3) {
        let len = usize::from(u16::from_le_bytes([op[0], *op.get(1).unwrap_or(&0)])) * (MAX_CHUNK / 32768 + 1);
        match op.get(2).copied().unwrap_or(0) % 5 {
            0 => match rw.on_chunk(len) {
                Ok(()) => {
                    assert!(len > 0 && len <= MAX_CHUNK);
                    credit -= i64::from(frame_cost(len));
                    assert!(credit >= 0, "a chunk past the credit was accepted");
                    held.push(len);
                }
                Err(_) => assert!(len == 0 || len > MAX_CHUNK || i64::from(frame_cost(len)) > credit),
            },
            1 => {
                if let Some(len) = held.pop() {
                    consumed_total += i64::from(frame_cost(len));
                    if let Some(grant) = rw.on_consumed(len) {
                        granted_total += i64::from(grant);
                        credit += i64::from(grant);
                        assert!(granted_total <= consumed_total, "granted more than was consumed");
                    }
                }
                assert!(credit <= i64::from(window), "credit above the window");
            }
            k => {
                let kind = match k {
                    2 => FrameKind::Head { ends: len % 2 == 0 },
                    3 => FrameKind::Body,
                    _ => FrameKind::End,
                };
                let legal = match kind {
                    FrameKind::Head { .. } => !seen_head,
                    FrameKind::Body | FrameKind::End => seen_head && !ended,
                };
                match phase.advance(kind) {
                    Ok(next) => {
                        assert!(legal, "{kind:?} accepted in {phase:?}");
                        seen_head = true;
                        ended = next == Phase::Ended;
                        phase = next;
                    }
                    Err(_) => assert!(!legal, "{kind:?} refused in {phase:?}"),
                }
            }
        }
    }
});

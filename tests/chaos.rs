//! Seeded chaos over real sockets: for each seed, a schedule of link holds
//! (a frozen client or black-holed link), cuts (every connection closed),
//! client crashes and restarts, drawn from the seed, played against two
//! clients of one group under an open-loop load. For every seed: every
//! public request ends before its deadline, no response reaches the wrong
//! request, and after the last repair both clients serve again within the
//! reconnect cap plus a heartbeat timeout. The schedule is reproducible from its
//! seed; the timing of real sockets is not (turmoil would make it so, but
//! the transport runs on tokio's own sockets: docs/reliability.md).
//!
//! CI runs 4 seeds; `cargo test --test chaos -- --ignored` runs 40.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::fault::*;
use common::*;
use std::time::{Duration, Instant};

/// Request deadline: the rule's 2 s timeout and a margin.
const DEADLINE: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The link moves nothing for this long, then resumes.
    Hold(Duration),
    /// Every connection through the relay closed.
    Cut,
    /// The client process dies; started again after this long.
    Crash(Duration),
}

/// Four faults at random times, each on a client no other fault holds at
/// that moment (a fault on a client already down would change the plan
/// silently: a thaw ending two holds, a crash of a dead client).
fn schedule(seed: u64) -> Vec<(Duration, usize, Fault)> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut at = Duration::from_millis(500);
    let mut busy_until = [Duration::ZERO; 2];
    let mut plan = Vec::new();
    for _ in 0..4 {
        at += Duration::from_millis(rng.u64(300..1200));
        let mut who = rng.usize(0..2);
        if busy_until[who] > at {
            who = 1 - who;
        }
        if busy_until[who] > at {
            who = if busy_until[0] <= busy_until[1] { 0 } else { 1 };
            at = busy_until[who] + Duration::from_millis(100);
        }
        let fault = match rng.u8(0..3) {
            0 => Fault::Hold(Duration::from_millis(rng.u64(200..2500))),
            1 => Fault::Cut,
            _ => Fault::Crash(Duration::from_millis(rng.u64(0..1000))),
        };
        busy_until[who] = at
            + match fault {
                Fault::Hold(d) | Fault::Crash(d) => d,
                Fault::Cut => Duration::ZERO,
            };
        plan.push((at, who, fault));
    }
    plan
}

async fn run_seed(seed: u64) {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let server = start_server(FAULT_SERVER, None).await;
    let relays = [Relay::start(server.grpc).await, Relay::start(server.grpc).await];
    let ids = ["edge-a", "edge-b"];
    let tomls: Vec<String> =
        (0..2).map(|i| client_of(relays[i].addr, ids[i], &ups[i], "connect_timeout = \"1s\"")).collect();
    let mut clients: Vec<Option<TestClient>> = tomls.iter().map(|t| Some(TestClient::start(t))).collect();
    server.wait_streams(6).await;

    let plan = schedule(seed);
    let length = plan.last().map_or(Duration::ZERO, |p| p.0) + Duration::from_secs(3);
    let load = tokio::spawn(open_loop(server.url("/echo"), 30, length, DEADLINE));
    let start = Instant::now();
    let mut repairs = Vec::new();
    for (at, who, fault) in &plan {
        tokio::time::sleep(at.saturating_sub(start.elapsed())).await;
        match fault {
            Fault::Hold(d) => {
                relays[*who].freeze();
                repairs.push((start.elapsed() + *d, *who, true));
            }
            Fault::Cut => relays[*who].cut(),
            Fault::Crash(d) => {
                if let Some(c) = clients[*who].take() {
                    c.kill();
                }
                repairs.push((start.elapsed() + *d, *who, false));
            }
        }
        // Repairs that are due.
        repairs.retain(|(when, who, hold)| {
            if start.elapsed() < *when {
                return true;
            }
            if *hold {
                relays[*who].thaw();
            } else if clients[*who].is_none() {
                clients[*who] = Some(TestClient::start(&tomls[*who]));
            }
            false
        });
    }
    // The rest of the repairs, each at its time.
    repairs.sort_by_key(|r| r.0);
    for (when, who, hold) in repairs {
        tokio::time::sleep(when.saturating_sub(start.elapsed())).await;
        if hold {
            relays[who].thaw();
        } else if clients[who].is_none() {
            clients[who] = Some(TestClient::start(&tomls[who]));
        }
    }
    for (i, c) in clients.iter_mut().enumerate() {
        if c.is_none() {
            *c = Some(TestClient::start(&tomls[i]));
        }
    }
    let repaired = Instant::now();
    let shared = server.shared.clone();
    // Back within the reconnect cap (1 s), plus a heartbeat timeout for a
    // held stream the server must first reap (3 s), plus a margin.
    eventually(&format!("seed {seed}: both clients back"), Duration::from_secs(6), || {
        let s = shared.registry.streams();
        ids.iter().all(|id| s.iter().filter(|v| v.client_id == *id).count() == 3)
    })
    .await;
    let back = repaired.elapsed();
    let out = load.await.unwrap();
    let wrong: Vec<&Outcome> =
        out.iter().filter(|o| o.error.as_deref().is_some_and(|e| e.starts_with("wrong response"))).collect();
    let late: Vec<&Outcome> = out.iter().filter(|o| o.error.as_deref() == Some("deadline")).collect();
    println!("seed {seed}: {plan:?}\n  {}; both clients back {back:?} after the last repair", summary(&out));
    assert!(wrong.is_empty(), "seed {seed}: responses reached the wrong request: {wrong:?}");
    assert!(late.is_empty(), "seed {seed}: requests past their deadline: {late:?}");
    // Both serve again.
    let c = http_client();
    let seen_before: Vec<usize> =
        ups.iter().map(|u| u.seen.requests.load(std::sync::atomic::Ordering::SeqCst)).collect();
    for _ in 0..20 {
        let got = send(&c, http::Request::get(server.url("/echo")).body(empty()).unwrap()).await;
        assert_eq!(got.status, 200, "seed {seed}: {}", got.text());
    }
    for (i, u) in ups.iter().enumerate() {
        assert!(
            u.seen.requests.load(std::sync::atomic::Ordering::SeqCst) > seen_before[i],
            "seed {seed}: {} idle",
            ids[i]
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_seeds_quick() {
    for seed in 1..=4 {
        run_seed(seed).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long: 40 seeds, about 6 minutes; cargo test --test chaos -- --ignored"]
async fn chaos_seeds_long() {
    for seed in 1..=40 {
        run_seed(seed).await;
    }
}

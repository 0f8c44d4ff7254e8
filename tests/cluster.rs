//! Servers with `[cluster]` share membership and their registry of clients
//! through a real etcd: each sees the others and who holds which client; a
//! crashed server vanishes after its lease's TTL, a drained one at once; an
//! etcd outage costs no request and the views agree again when it returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::etcd::EtcdCluster;
use common::fault::{client_of, OwnServer, FAULT_SERVER};
use common::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A server of the fleet: FAULT_SERVER with `[cluster]` on `etcd`.
fn edge_toml(id: &str, etcd: &EtcdCluster, grpc: SocketAddr, admin: SocketAddr, prefix: &str, extra: &str) -> String {
    let server = FAULT_SERVER.replacen("[server]\n", &format!("[server]\nserver_id = \"{id}\"\n{extra}\n"), 1);
    format!(
        "{server}\n[cluster]\netcd = {}\nprefix = \"{prefix}\"\nadvertise = \"http://{grpc}\"\nadmin_advertise = \"http://{admin}\"\nlease_ttl = \"2s\"\n",
        etcd.toml_list()
    )
}

/// Starts server `id` on ports of its own.
fn start_edge(id: &str, etcd: &EtcdCluster, prefix: &str, extra: &str) -> OwnServer {
    let [http, grpc, admin] = free_ports::<3>();
    OwnServer::start(&edge_toml(id, etcd, grpc, admin, prefix, extra), Some((http, grpc, admin)))
}

/// A prefix of its own per test: tests share no etcd, but a prefix per test
/// keeps a failure's leftovers out of the next run's way too.
fn prefix(test: &str) -> String {
    format!("/tunnel-test/{test}-{}", unix_micros())
}

/// (members, group demo's client -> servers holding it) as `edge` sees the fleet.
fn seen_by(edge: &OwnServer) -> (Vec<String>, BTreeMap<String, Vec<String>>) {
    let view = edge.shared.cluster.as_ref().expect("clustered").view();
    let members = view.members.keys().cloned().collect();
    let held = view
        .holdings
        .get("demo")
        .map(|clients| clients.iter().map(|(c, servers)| (c.clone(), servers.keys().cloned().collect())).collect())
        .unwrap_or_default();
    (members, held)
}

fn held(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs.iter().map(|(c, s)| (c.to_string(), s.iter().map(|x| x.to_string()).collect())).collect()
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Three servers, two clients on different servers: every server sees all
/// three members (with the URLs to reach them) and who holds which client;
/// a client that leaves disappears everywhere; a crashed server's entries
/// vanish within its lease TTL; a drained server is marked draining at
/// SIGTERM and gone as soon as it stops, without waiting for the TTL.
#[tokio::test]
async fn servers_share_membership_and_holdings_through_etcd() {
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("share");
    let up = Upstream::start("web").await;
    let edges: Vec<OwnServer> =
        (1..=3).map(|i| start_edge(&format!("edge-{i}"), &etcd, &prefix, "drain_delay = \"1s\"")).collect();
    let all_seen = tokio::time::timeout(Duration::from_secs(5), async {
        while !edges.iter().all(|e| seen_by(e).0 == names(&["edge-1", "edge-2", "edge-3"])) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if all_seen.await.is_err() {
        let states: Vec<_> = edges.iter().map(|e| (seen_by(e), e.shared.cluster.as_ref().unwrap().outage())).collect();
        panic!("not every server sees all three within 5s: {states:#?}");
    }
    let view = edges[2].shared.cluster.as_ref().unwrap().view();
    let one = &view.members["edge-1"];
    assert_eq!(one.advertise, format!("http://{}", edges[0].grpc));
    assert_eq!(one.admin_advertise, format!("http://{}", edges[0].admin));
    assert!(!one.draining);

    let c1 = TestClient::start(&client_of(edges[0].grpc, "c1", &up, ""));
    let c2 = TestClient::start(&client_of(edges[1].grpc, "c2", &up, ""));
    let expected = held(&[("c1", &["edge-1"]), ("c2", &["edge-2"])]);
    let started = Instant::now();
    eventually("every server sees c1 on edge-1 and c2 on edge-2", Duration::from_secs(5), || {
        edges.iter().all(|e| seen_by(e).1 == expected)
    })
    .await;
    println!("holdings seen by all 3 servers {:?} after the clients started", started.elapsed());
    let holders = |e: &OwnServer| {
        e.shared.cluster.as_ref().unwrap().with_view(|v| {
            v.holders("demo", &e.shared.server_id).iter().map(|(m, n)| (m.server_id.clone(), *n)).collect::<Vec<_>>()
        })
    };
    assert_eq!(holders(&edges[2]), vec![("edge-1".to_string(), 1), ("edge-2".to_string(), 1)]);
    assert_eq!(holders(&edges[0]), vec![("edge-2".to_string(), 1)], "a server never lists itself");

    // Registration answers carry the fleet: c1 learned every server's URL.
    let fleet_of = |c: &TestClient| -> Vec<(String, String)> {
        let status = c.status.borrow();
        status.servers.values().flat_map(|s| s.fleet.iter().map(|f| (f.server_id.clone(), f.url.clone()))).collect()
    };
    let urls: Vec<(String, String)> =
        edges.iter().map(|e| (e.shared.server_id.clone(), format!("http://{}", e.grpc))).collect();
    eventually("c1 knows the fleet", Duration::from_secs(3), || fleet_of(&c1) == urls).await;

    // Introspection carries the fleet for the console.
    let info = edges[1].shared.cluster.as_ref().unwrap().info();
    assert!(info.etcd_up);
    assert_eq!(info.members.len(), 3);
    assert_eq!(info.holdings, 2);
    assert_eq!(info.members.iter().find(|m| m.server_id == "edge-1").unwrap().clients, 1);

    // A client that stops is deleted from the registry, not left to a TTL.
    c2.stop().await;
    eventually("c2 gone from every view", Duration::from_secs(3), || {
        edges.iter().all(|e| seen_by(e).1 == held(&[("c1", &["edge-1"])]))
    })
    .await;

    let mut edges = edges.into_iter();
    let (e1, e2, e3) = (edges.next().unwrap(), edges.next().unwrap(), edges.next().unwrap());
    // kill -9: nothing is revoked; the lease (2 s) expires.
    let crashed = Instant::now();
    e2.crash();
    eventually("edge-2 gone from the others' views", Duration::from_secs(4), || {
        [&e1, &e3].iter().all(|e| seen_by(e).0 == names(&["edge-1", "edge-3"]))
    })
    .await;
    println!("crashed server left the membership {:?} after the crash (lease_ttl 2s)", crashed.elapsed());
    // c1's next heartbeat acknowledgement (1 s) tells it, since its fleet version is out of date.
    let without_2: Vec<(String, String)> = urls.iter().filter(|(id, _)| id != "edge-2").cloned().collect();
    eventually("c1 hears edge-2 is gone", Duration::from_secs(3), || fleet_of(&c1) == without_2).await;
    assert!(crashed.elapsed() >= Duration::from_millis(900), "gone before its lease could have expired");

    // SIGTERM: draining at once (peers stop counting on it), gone at exit.
    e1.begin_stop();
    eventually("edge-1 marked draining", Duration::from_secs(2), || {
        e3.shared.cluster.as_ref().unwrap().with_view(|v| v.members.get("edge-1").is_some_and(|m| m.draining))
    })
    .await;
    assert!(holders(&e3).is_empty(), "a draining server is not a holder to forward to");
    e1.wait_stopped().await;
    let stopped = Instant::now();
    eventually("edge-1 and its client gone at once", Duration::from_secs(1), || {
        seen_by(&e3) == (names(&["edge-3"]), BTreeMap::new())
    })
    .await;
    println!("drained server left the membership {:?} after it stopped", stopped.elapsed());
    assert!(e3.shared.metrics.cluster_registry_writes.get() == 0, "edge-3 held no client and wrote no holding");
    drop(c1);
}

/// All three etcd members stopped for 30 s under load: no request fails,
/// /ready stays 200 and says why the cluster is degraded, a client that
/// registers meanwhile serves requests landing on its server, and when etcd
/// is back every server's view has that client within 2 s.
#[tokio::test]
async fn an_etcd_outage_costs_no_request_and_views_converge_after_it() {
    let Some(mut etcd) = EtcdCluster::start(3) else { return };
    let prefix = prefix("outage");
    let up = Upstream::start("web").await;
    let e1 = start_edge("edge-1", &etcd, &prefix, "");
    let e2 = start_edge("edge-2", &etcd, &prefix, "");
    let _c1 = TestClient::start(&client_of(e1.grpc, "c1", &up, ""));
    eventually("edge-2 sees c1", Duration::from_secs(5), || seen_by(&e2).1 == held(&[("c1", &["edge-1"])])).await;

    etcd.stop_all();
    let stopped = Instant::now();
    eventually("edge-1 notices etcd is gone", Duration::from_secs(15), || {
        !e1.shared.cluster.as_ref().unwrap().etcd_up()
    })
    .await;
    println!("etcd outage noticed {:?} after it began", stopped.elapsed());
    let (status, body) = tunnel_daemon::metrics::ready_response(e1.shared.readiness());
    assert_eq!(status, http::StatusCode::OK, "an etcd outage leaves the server ready: {body}");
    assert!(body.contains("etcd unreachable"), "/ready says why: {body}");
    // A client that connects during the outage serves what lands on its server.
    let _c2 = TestClient::start(&client_of(e2.grpc, "c2", &up, ""));
    eventually("c2 registered on edge-2", Duration::from_secs(5), || {
        e2.shared.registry.clients().iter().any(|c| c.client_id == "c2")
    })
    .await;
    // Load until the outage has lasted 30 s: 40 requests/s over both servers.
    let (mut failed, mut sent) = (Vec::new(), 0);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while stopped.elapsed() < Duration::from_secs(30) {
        tick.tick().await;
        for e in [&e1, &e2] {
            let got = get(&format!("http://{}/outage/{sent}", e.http)).await;
            sent += 1;
            if got.status != 200 {
                failed.push((e.shared.server_id.clone(), got.status, got.text()));
            }
        }
    }
    assert!(failed.is_empty(), "{} of {sent} requests failed during the etcd outage: {failed:?}", failed.len());
    println!("{sent} requests during a 30 s etcd outage, none failed");
    assert_eq!(seen_by(&e1).0, names(&["edge-1", "edge-2"]), "the membership held through the outage");

    etcd.restart_all();
    let back = Instant::now();
    let expected = held(&[("c1", &["edge-1"]), ("c2", &["edge-2"])]);
    eventually("both views agree within 2 s of etcd's return", Duration::from_secs(2), || {
        [&e1, &e2].iter().all(|e| seen_by(e).1 == expected && e.shared.cluster.as_ref().unwrap().etcd_up())
    })
    .await;
    println!("views agreed {:?} after etcd answered again", back.elapsed());
    let (_, body) = tunnel_daemon::metrics::ready_response(e1.shared.readiness());
    assert_eq!(body, "ready\n");
}

/// Which servers hold each client, by client id.
fn placement(edges: &[&OwnServer]) -> BTreeMap<String, Vec<String>> {
    let mut by_client: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in edges {
        for c in e.shared.registry.clients() {
            by_client.entry(c.client_id).or_default().push(e.shared.server_id.clone());
        }
    }
    by_client
}

/// `connections = 2`, one seed: each client learns the fleet from the seed
/// and holds sessions to exactly 2 of the 4 servers, spread over all of
/// them; a draining server's clients move to another server before it
/// stops, a killed server's within seconds, long before its lease would say.
#[tokio::test]
async fn clients_hold_k_sessions_spread_over_the_fleet_and_move_off_a_server_that_goes() {
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("k");
    let up = Upstream::start("web").await;
    let edges: Vec<OwnServer> =
        (1..=4).map(|i| start_edge(&format!("edge-{i}"), &etcd, &prefix, "drain_delay = \"3s\"")).collect();
    eventually("every server sees all four", Duration::from_secs(5), || edges.iter().all(|e| seen_by(e).0.len() == 4))
        .await;
    let ids: Vec<String> = (1..=6).map(|i| format!("k{i}")).collect();
    let started = Instant::now();
    let _clients: Vec<TestClient> =
        ids.iter().map(|id| TestClient::start(&client_of(edges[0].grpc, id, &up, "connections = 2"))).collect();
    let all: Vec<&OwnServer> = edges.iter().collect();
    let on_two = |edges: &[&OwnServer]| {
        let p = placement(edges);
        p.len() == 6 && p.values().all(|servers| servers.len() == 2)
    };
    eventually("each client on exactly 2 servers", Duration::from_secs(5), || on_two(&all)).await;
    println!("6 clients on 2 servers each {:?} after start: {:?}", started.elapsed(), placement(&all));
    let per_server: Vec<usize> = edges.iter().map(|e| e.shared.registry.clients().len()).collect();
    assert!(per_server.iter().all(|&n| n >= 1), "the clients spread over every server: {per_server:?}");
    assert_eq!(per_server.iter().sum::<usize>(), 12);

    // Drain the server holding the most clients: its clients move while it still serves.
    let busiest = (0..4).max_by_key(|&i| per_server[i]).unwrap();
    let mut edges: Vec<Option<OwnServer>> = edges.into_iter().map(Some).collect();
    let drained = edges[busiest].take().unwrap();
    let drain_begun = Instant::now();
    drained.begin_stop();
    let rest: Vec<&OwnServer> = edges.iter().flatten().collect();
    eventually("the drained server's clients on 2 other servers", Duration::from_secs(3), || on_two(&rest)).await;
    println!("clients moved off a draining server {:?} after SIGTERM (drain_delay 3 s)", drain_begun.elapsed());
    assert!(drain_begun.elapsed() < Duration::from_secs(3), "moved before the drained server closed");
    drained.wait_stopped().await;

    // Kill one of the other three: its clients move to the remaining two.
    let victim = edges.iter().position(|e| e.is_some()).unwrap();
    let killed = edges[victim].take().unwrap();
    let crash_at = Instant::now();
    killed.crash();
    let rest: Vec<&OwnServer> = edges.iter().flatten().collect();
    eventually("every client on the 2 remaining servers", Duration::from_secs(4), || on_two(&rest)).await;
    println!("clients back to 2 sessions {:?} after a server was killed (lease_ttl 2 s)", crash_at.elapsed());
}

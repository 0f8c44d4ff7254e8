//! Servers with `[cluster]` share membership and their registry of clients
//! through a real etcd: each sees the others and who holds which client; a
//! crashed server vanishes after its lease's TTL, a drained one at once; an
//! etcd outage costs no request and the views agree again when it returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::etcd::EtcdCluster;
use common::fault::{client_of, open_loop, OwnServer, FAULT_SERVER};
use common::ws::{ws_config, WsUpstream};
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::{Duration, Instant};

/// Starts server `id` of the fleet on ports of its own: FAULT_SERVER with
/// `extra` in [server], and `[cluster]` on `etcd`, taking forwarded requests.
fn start_edge(id: &str, etcd: &EtcdCluster, prefix: &str, extra: &str) -> OwnServer {
    start_edge_of(FAULT_SERVER, id, etcd, prefix, extra)
}

/// `start_edge` with another server.toml than FAULT_SERVER.
fn start_edge_of(base: &str, id: &str, etcd: &EtcdCluster, prefix: &str, extra: &str) -> OwnServer {
    start_edge_with(base, id, etcd, prefix, extra, "").0
}

/// `start_edge_of` with `cluster_extra` keys in [cluster] (peer TLS keys
/// make the peer URL https://); the server and its peer address.
fn start_edge_with(
    base: &str,
    id: &str,
    etcd: &EtcdCluster,
    prefix: &str,
    extra: &str,
    cluster_extra: &str,
) -> (OwnServer, std::net::SocketAddr) {
    let [http, grpc, admin, peer] = free_ports::<4>();
    let server = base.replacen("[server]\n", &format!("[server]\nserver_id = \"{id}\"\n{extra}\n"), 1);
    let scheme = if cluster_extra.contains("peer_ca") { "https" } else { "http" };
    let toml = format!(
        "{server}\n[cluster]\netcd = {}\nprefix = \"{prefix}\"\nadvertise = \"http://{grpc}\"\nadmin_advertise = \"http://{admin}\"\npeer_listen = \"{peer}\"\npeer_advertise = \"{scheme}://{peer}\"\nlease_ttl = \"2s\"\n{cluster_extra}\n",
        etcd.toml_list()
    );
    (OwnServer::start(&toml, Some((http, grpc, admin))), peer)
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

/// A server of its own for forwarding: WebSocket under /ws, trailers over
/// h2c (an HTTP/1.1 upstream sends none), the rest to web.
const FORWARD_SERVER: &str = r#"
[server]
heartbeat_timeout = "3s"
shutdown_grace = "2s"
[[groups]]
name = "demo"
token = "t-demo"
heartbeat_interval = "1s"
data_streams = 2
[[rules]]
path_prefix = "/ws"
group = "demo"
upstream = "ws"
timeout = "5s"
[[rules]]
path_prefix = "/trailers"
group = "demo"
upstream = "web2"
timeout = "5s"
[[rules]]
group = "demo"
upstream = "web"
timeout = "5s"
"#;

/// A request that lands on a server holding no client of its group is
/// answered through the peer that holds one: an ordinary request, 100 MiB
/// each way byte-identical, trailers both ways, a WebSocket; the access
/// record and metrics say it was forwarded and to whom; and a forwarded
/// download whose reader stalls holds up no other forwarded request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_a_client_forwards_to_a_peer_that_has_one() {
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("forward");
    let (web, ws) = (Upstream::start("web").await, WsUpstream::start().await);
    let e1 = start_edge_of(FORWARD_SERVER, "edge-1", &etcd, &prefix, "");
    let e2 = start_edge_of(FORWARD_SERVER, "edge-2", &etcd, &prefix, "");
    let upstreams = format!(
        "[upstreams]\nweb = \"{}\"\nws = \"{}\"\nweb2 = {{ url = \"{}\", http2 = true }}\n",
        web.url(),
        ws.url(),
        web.url()
    );
    let toml =
        client_of(e2.grpc, "c1", &web, "").replace(&format!("[upstreams]\nweb = \"{}\"\n", web.url()), &upstreams);
    let _c1 = TestClient::start(&toml);
    eventually("edge-1 sees c1 on edge-2", Duration::from_secs(5), || seen_by(&e1).1 == held(&[("c1", &["edge-2"])]))
        .await;
    assert!(e1.shared.registry.clients().is_empty(), "edge-1 holds no client itself");
    // Ready all the same: it serves through edge-2 (a balancer must keep it in rotation).
    eventually("edge-1 ready by forwarding", Duration::from_secs(3), || e1.shared.readiness().is_ok()).await;
    let url = |path: &str| format!("http://{}{path}", e1.http);

    let got = get(&url("/hello?x=1")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.headers["x-upstream"], "web");
    assert_eq!(got.headers["x-seen-uri"], "/hello?x=1");
    let last = e1.shared.requests.since(0).pop().expect("a request record");
    assert_eq!((last.forwarded_to.as_str(), last.status), ("edge-2", 200), "{last:?}");

    // 100 MiB each way, byte-identical.
    const N: usize = 100 << 20;
    let c = http_client();
    let up = send(&c, Request::post(url("/upload-sha")).body(streamed(pattern_chunks(N).collect())).unwrap()).await;
    assert_eq!(up.text(), format!("{N} {}", sha256_of_pattern(N)));
    let (len, sha, _) = download_sha(&c, &url(&format!("/download?bytes={N}"))).await;
    assert_eq!((len, sha), (N, sha256_of_pattern(N)));

    // Trailers both ways (gRPC's need), over h2c.
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", "abc123".parse().unwrap());
    let frames =
        vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"first second"))), Ok(Frame::trailers(trailers))];
    let req =
        Request::post(url("/trailers")).body(BodyExt::boxed(StreamBody::new(tokio_stream::iter(frames)))).unwrap();
    let resp = tokio::time::timeout(WAIT, h2c_client().request(req)).await.unwrap().unwrap();
    let collected = tokio::time::timeout(WAIT, resp.into_body().collect()).await.unwrap().unwrap();
    let got_trailers = collected.trailers().cloned().expect("response trailers arrive");
    assert_eq!(got_trailers["x-got-checksum"], "abc123", "the request's trailer reached the upstream");
    assert_eq!(got_trailers["x-body-bytes"], "12");

    // A WebSocket, upgraded through the peer.
    let tcp = tokio::net::TcpStream::connect(e1.http).await.unwrap();
    let (mut socket, _) =
        tokio_tungstenite::client_async_with_config(format!("ws://{}/ws/chat", e1.http), tcp, Some(ws_config()))
            .await
            .expect("the upgrade is forwarded");
    for i in 0..20 {
        let text = format!("hello {i}");
        socket.send(tokio_tungstenite::tungstenite::Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(WAIT, socket.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    socket.close(None).await.unwrap();
    drop(socket);

    // A forwarded download nobody reads: other forwarded requests go on.
    let stalled = c.request(Request::get(url(&format!("/download?bytes={}", 64 << 20))).body(empty()).unwrap());
    let stalled = tokio::time::timeout(WAIT, stalled).await.unwrap().unwrap();
    for i in 0..20 {
        let started = Instant::now();
        let got = get(&url(&format!("/beside-a-stall/{i}"))).await;
        assert_eq!(got.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} took {:?} beside a stalled one",
            started.elapsed()
        );
    }
    drop(stalled);

    // 26 forwarded (the WebSocket and the abandoned download are recorded when they close).
    let forwarded =
        || e1.shared.metrics.forwarded.get_or_create(&vec![("group", "demo".into()), ("peer", "edge-2".into())]).get();
    let counted = tokio::time::timeout(Duration::from_secs(3), async {
        while forwarded() != 26 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    if counted.await.is_err() {
        let paths: Vec<(String, u32, String)> =
            e1.shared.requests.since(0).into_iter().map(|r| (r.path, r.status, r.forwarded_to)).collect();
        panic!("{} forwarded, not 26: {paths:?}", forwarded());
    }
    assert_eq!(e2.shared.metrics.forwarded_in.get_or_create(&vec![("group", "demo".into())]).get(), 26);
    // Every relayed exchange ended with its request: none left counting against max_in_flight.
    let in_flight = || e2.shared.registry.streams().iter().map(|s| s.in_flight).sum::<usize>();
    eventually("no relayed exchange left in flight on edge-2", Duration::from_secs(3), || in_flight() == 0).await;
}

/// kill -9 of a server that a peer forwards to, under 200 req/s: only
/// requests in flight to it or sent in the moment after fail (each at once,
/// none hangs); the forwarding server moves to the other holder, and once
/// the lease has expired nothing is forwarded to the dead server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_peer_costs_only_the_requests_in_flight_to_it() {
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("kill");
    let web = Upstream::start("web").await;
    let edges: Vec<OwnServer> = (1..=3).map(|i| start_edge(&format!("edge-{i}"), &etcd, &prefix, "")).collect();
    // edge-1 holds no client: everything it gets is forwarded to edge-2 or edge-3.
    let _c2 = TestClient::start(&client_of(edges[1].grpc, "c2", &web, ""));
    let _c3 = TestClient::start(&client_of(edges[2].grpc, "c3", &web, ""));
    let expected = held(&[("c2", &["edge-2"]), ("c3", &["edge-3"])]);
    eventually("edge-1 sees both clients", Duration::from_secs(5), || seen_by(&edges[0]).1 == expected).await;
    let length = Duration::from_secs(7);
    let deadline = Duration::from_secs(5);
    let to_1 = tokio::spawn(open_loop(format!("http://{}/load", edges[0].http), 100, length, deadline));
    let to_3 = tokio::spawn(open_loop(format!("http://{}/load", edges[2].http), 100, length, deadline));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut edges = edges.into_iter();
    let (e1, e2, e3) = (edges.next().unwrap(), edges.next().unwrap(), edges.next().unwrap());
    let killed_at = Instant::now();
    e2.crash();
    let gone = Duration::from_secs(2 + 1);
    let forwarded_to_2 =
        || e1.shared.metrics.forwarded.get_or_create(&vec![("group", "demo".into()), ("peer", "edge-2".into())]).get();
    tokio::time::sleep(gone).await;
    let after_lease = forwarded_to_2();
    let (via_1, at_3) = (to_1.await.unwrap(), to_3.await.unwrap());
    assert_eq!(forwarded_to_2(), after_lease, "forwarded to the dead server after lease_ttl + 1 s");
    let failed: Vec<&common::fault::Outcome> = via_1.iter().filter(|o| !o.ok()).collect();
    println!(
        "{} of {} requests via edge-1 failed after edge-2's kill: {}",
        failed.len(),
        via_1.len(),
        common::fault::summary(&via_1)
    );
    assert!(failed.len() <= 5, "only those in flight to edge-2 fail: {failed:?}");
    for o in &failed {
        assert!(o.took < Duration::from_secs(1), "a failed request hung: {o:?}");
        let since_kill = o.sent.saturating_duration_since(killed_at);
        assert!(since_kill < Duration::from_secs(1), "failed {since_kill:?} after the kill: {o:?}");
    }
    assert!(at_3.iter().all(|o| o.ok()), "edge-3 serves its own client throughout: {}", common::fault::summary(&at_3));
    drop((e1, e3));
}

/// `config push`: a new set of groups and rules stored in etcd is served by
/// every server within 1 s, with the etcd revision as every group's version
/// on every server and client; an invalid push is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_config_reaches_every_server_within_a_second() {
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("push");
    let web = Upstream::start("web").await;
    let edges: Vec<OwnServer> = (1..=2).map(|i| start_edge(&format!("edge-{i}"), &etcd, &prefix, "")).collect();
    let grpc: Vec<String> = edges.iter().map(|e| format!("\"http://{}\"", e.grpc)).collect();
    let toml = client_of(edges[0].grpc, "c1", &web, "").replacen(
        &format!("server = \"http://{}\"", edges[0].grpc),
        &format!("servers = [{}]", grpc.join(", ")),
        1,
    );
    let c1 = TestClient::start(&toml);
    eventually("c1 on both servers", Duration::from_secs(5), || {
        edges.iter().all(|e| e.shared.registry.clients().len() == 1)
    })
    .await;
    let c = http_client();
    let host_get = |e: &OwnServer, host: &str| {
        Request::get(format!("http://{}/pushed", e.http)).header("host", host).body(empty()).unwrap()
    };
    for e in &edges {
        assert_eq!(send(&c, host_get(e, "other.localhost")).await.status, 200, "the file's catch-all rule");
    }

    let settings = edges[0].shared.config().cluster.clone().unwrap();
    let fleet =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/push/fleet.toml")).unwrap();
    let only_new = fleet.replace("[[rules]]\ngroup = \"demo\"\nupstream = \"web\"\ntimeout = \"5s\"\n", "");
    let pushed_at = Instant::now();
    let revision = tunnel_daemon::server::cluster::push_config(&settings, &only_new, "fleet.toml").await.unwrap();
    let version = format!("r{revision}");
    eventually("both servers apply the push", Duration::from_secs(1), || {
        edges.iter().all(|e| e.shared.group_version("demo").as_deref() == Some(version.as_str()))
    })
    .await;
    println!("pushed config in force on both servers {:?} after the push", pushed_at.elapsed());
    for e in &edges {
        assert_eq!(send(&c, host_get(e, "new.localhost")).await.status, 200, "the pushed rule serves");
        assert_eq!(send(&c, host_get(e, "other.localhost")).await.status, 404, "the file's rules are replaced");
        assert_eq!(e.shared.cluster.as_ref().unwrap().info().config_revision, revision);
    }
    let mut status = c1.status.clone();
    let applied = config_version(&mut status, |v| v == version).await;
    assert_eq!(applied, version, "the client applies the fleet's version");

    // Invalid: a rule for a group that does not exist. Refused before etcd; nothing changes.
    let bad = only_new.replace("group = \"demo\"\nupstream", "group = \"nope\"\nupstream");
    let err = tunnel_daemon::server::cluster::push_config(&settings, &bad, "bad.toml").await.unwrap_err();
    assert!(format!("{err:#}").contains("bad.toml:"), "{err:#}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for e in &edges {
        assert_eq!(e.shared.group_version("demo").as_deref(), Some(version.as_str()));
    }
}

/// mTLS between servers: forwarding works with certificates the fleet's
/// peer CA signed, and the peer port refuses a plaintext caller and one
/// whose certificate another CA signed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_between_servers_can_require_mtls() {
    use tunnel_lib::proto::peer_service_client::PeerServiceClient;
    let Some(etcd) = EtcdCluster::start(1) else { return };
    let prefix = prefix("mtls");
    let dir = common::pki::TempDir::new("peers");
    let (ca, rogue) = (common::pki::Ca::new(&dir.0, "peers"), common::pki::Ca::new(&dir.0, "rogue"));
    let keys = |file: &str| {
        let (cert, key) = ca.peer(file, &["127.0.0.1"]);
        format!(
            "peer_ca = \"{}\"\npeer_cert = \"{}\"\npeer_key = \"{}\"",
            ca.cert_path().display(),
            cert.display(),
            key.display()
        )
    };
    let web = Upstream::start("web").await;
    let (e1, _) = start_edge_with(FAULT_SERVER, "edge-1", &etcd, &prefix, "", &keys("edge-1"));
    let (e2, peer2) = start_edge_with(FAULT_SERVER, "edge-2", &etcd, &prefix, "", &keys("edge-2"));
    let _c1 = TestClient::start(&client_of(e2.grpc, "c1", &web, ""));
    eventually("edge-1 sees c1 on edge-2", Duration::from_secs(5), || seen_by(&e1).1 == held(&[("c1", &["edge-2"])]))
        .await;
    let got = get(&format!("http://{}/over-mtls", e1.http)).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(e1.shared.requests.since(0).pop().unwrap().forwarded_to, "edge-2");

    let call = |channel: tonic::transport::Channel| async move {
        let (tx, rx) = tokio::sync::mpsc::channel::<tunnel_lib::proto::TunnelMessage>(1);
        let r = PeerServiceClient::new(channel).forward(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
        drop(tx);
        r
    };
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{peer2}")).unwrap().connect_lazy();
    assert!(tokio::time::timeout(WAIT, call(plain)).await.unwrap().is_err(), "a plaintext caller is refused");
    let (cert, key) = rogue.peer("rogue", &["127.0.0.1"]);
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(std::fs::read(ca.cert_path()).unwrap()))
        .identity(tonic::transport::Identity::from_pem(std::fs::read(cert).unwrap(), std::fs::read(key).unwrap()))
        .domain_name("127.0.0.1");
    let ep = tonic::transport::Endpoint::from_shared(format!("https://{peer2}")).unwrap().tls_config(tls).unwrap();
    assert!(
        tokio::time::timeout(WAIT, call(ep.connect_lazy())).await.unwrap().is_err(),
        "another CA's certificate is refused"
    );
}

/// etcd as production runs it: with authentication on, a server joins with
/// its user and password, and one with a wrong password says why it cannot;
/// over mTLS, a server with the CA and a client certificate joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_reach_etcd_with_a_password_and_over_mtls() {
    use common::etcd::{etcdctl_available, EtcdTlsFiles};
    let Some(etcd) = EtcdCluster::start(1) else { return };
    if !etcdctl_available() {
        return;
    }
    etcd.etcdctl(&["user", "add", "root:s3cret"], None);
    etcd.etcdctl(&["auth", "enable"], None);
    let prefix = prefix("auth");
    let good = start_edge_with(
        FAULT_SERVER,
        "edge-1",
        &etcd,
        &prefix,
        "",
        "etcd_username = \"root\"\netcd_password = \"s3cret\"",
    )
    .0;
    let bad = start_edge_with(
        FAULT_SERVER,
        "edge-2",
        &etcd,
        &prefix,
        "",
        "etcd_username = \"root\"\netcd_password = \"wrong\"",
    )
    .0;
    eventually("edge-1 joins with its password", Duration::from_secs(5), || seen_by(&good).0 == names(&["edge-1"]))
        .await;
    let why = || bad.shared.cluster.as_ref().unwrap().outage().map(|(_, why)| why).unwrap_or_default();
    eventually("edge-2 says why it cannot", Duration::from_secs(5), || why().contains("authenticate")).await;
    assert!(why().contains("authentication failed"), "{}", why());
    assert_eq!(seen_by(&good).0, names(&["edge-1"]), "a server that cannot authenticate writes nothing");

    let dir = common::pki::TempDir::new("etcd");
    let ca = common::pki::Ca::new(&dir.0, "etcd-ca");
    let Some(secure) = EtcdCluster::start_tls(|ip| {
        let (cert, key) = ca.server("etcd", &[ip]);
        EtcdTlsFiles { ca: ca.cert_path(), cert, key }
    }) else {
        return;
    };
    let (cert, key) = ca.client("tunnel-server");
    let keys = format!(
        "etcd_ca = \"{}\"\netcd_cert = \"{}\"\netcd_key = \"{}\"",
        ca.cert_path().display(),
        cert.display(),
        key.display()
    );
    let over_tls = start_edge_with(FAULT_SERVER, "edge-3", &secure, &prefix, "", &keys).0;
    eventually("edge-3 joins over mTLS", Duration::from_secs(10), || seen_by(&over_tls).0 == names(&["edge-3"])).await;
    let listed = secure.etcdctl(&["get", "--prefix", &prefix, "--keys-only"], Some((&cert, &key)));
    assert!(listed.contains(&format!("{prefix}/members/edge-3")), "{listed}");
}

//! The real `tunnel-tui` driven in tmux against real servers and two real
//! clients on loopback: every stream listed with ages advancing, `r` brings a
//! stale client's config in sync on screen, `x` `y` closes a stream and its
//! replacement appears; watching two servers, steering a row acts on its own
//! server only, and one server going down leaves the other live. Needs tmux
//! (CI installs it).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{start_clients, TestServer};
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::sync::Mutex as AsyncMutex;
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::Client;
use tunnel_daemon::server::{Listeners, Server};
use tunnel_lib::config::{ClientConfig, ServerConfig};

const SERVER: &str = r#"
[server]
config_push = "manual"
shutdown_grace = "1s"
[[groups]]
name = "demo"
token = "t"
heartbeat_interval = "5s"
data_streams = 2
[[rules]]
group = "demo"
upstream = "web"
"#;

/// The tests run one at a time: each runs servers, clients and a console on
/// two cores, and the first times how fast a resync shows.
static SERIAL: AsyncMutex<()> = AsyncMutex::const_new(());

/// Whether tmux is here; without it, skips (saying so) unless under CI, which must run these.
fn have_tmux() -> bool {
    let have = Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success());
    if !have {
        // CI installs tmux (.ci/run) and must run this test; a developer's
        // machine without tmux skips it, saying so.
        assert!(std::env::var_os("CI").is_none(), "tmux is required under CI");
        eprintln!("skipped: tmux is not installed (apt-get install tmux)");
    }
    have
}

/// A tmux server of its own (a private socket: the developer's sessions,
/// options and paste buffers are not touched) with one session, killed
/// when dropped.
struct Tmux(String);

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let name = format!("tunnel-tui-test-{}", uuid::Uuid::new_v4().simple());
        let t = Tmux(name);
        let ok = t
            .command()
            .args(["new-session", "-d", "-s", &t.0, "-x", "80", "-y", "24", cmd])
            .status()
            .expect("tmux is installed (apt-get install tmux)")
            .success();
        assert!(ok, "tmux new-session failed");
        t
    }

    /// A tmux command on this test's own server.
    fn command(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.0]);
        c
    }

    /// Runs a tmux command on this server; its standard output.
    fn run(&self, args: &[&str]) -> String {
        let out = self.command().args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.run(&["capture-pane", "-p", "-t", &self.0])
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let ok = self.command().args(["send-keys", "-t", &self.0, k]).status().unwrap().success();
            assert!(ok, "send-keys {k}");
        }
    }

    /// Polls the screen until `f` holds; panics with the screen after `limit`.
    async fn wait(&self, what: &str, limit: Duration, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen();
            if f(&s) {
                return s;
            }
            assert!(start.elapsed() < limit, "timed out waiting for {what}; screen:\n{s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command().arg("kill-server").status();
    }
}

/// The rows of the Streams table: (short stream id, client, heartbeat age in s, config cell).
fn rows(screen: &str) -> Vec<(String, String, u64, String)> {
    screen
        .lines()
        .filter_map(|l| {
            let l = l.trim_start_matches(['›', ' ']);
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 9 || !(cols[1] == "ctrl" || cols[1] == "http") {
                return None;
            }
            let age = cols[4].strip_suffix('s')?.parse().ok()?;
            let config = format!("{} {}", cols[cols.len() - 2], cols[cols.len() - 1]);
            Some((cols[0].to_string(), cols[2].to_string(), age, config))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_lists_resyncs_and_closes_streams() {
    if !have_tmux() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let dir = std::env::temp_dir().join(format!("tunnel-tmux-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("server.toml");
    std::fs::write(&path, SERVER).unwrap();
    let listeners = Listeners::ephemeral().await.unwrap();
    let (_, grpc, admin) = listeners.addrs().unwrap();
    let server = Server::new(ServerConfig::from_str_named(SERVER, "test").unwrap(), Some(path.clone()));
    let shared = server.shared();
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    let mut clients = Vec::new();
    for id in ["edge-a", "edge-b"] {
        let cfg = format!(
            "server = \"http://{grpc}\"\nclient_id = \"{id}\"\ngroup = \"demo\"\ntoken = \"t\"\nreconnect_max = \"1s\"\nshutdown_grace = \"1s\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n"
        );
        let client = Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap());
        clients.push(tokio::spawn(client.run(stop.clone().cancelled_owned())));
    }
    let start = Instant::now();
    while shared.registry.streams().len() < 6 {
        assert!(start.elapsed() < Duration::from_secs(15), "clients registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let tui = Tmux::start(&format!("{} --server {admin}", env!("CARGO_BIN_EXE_tunnel-tui")));
    // Every stream is listed, with its client.
    let screen = tui.wait("six streams", Duration::from_secs(10), |s| rows(s).len() == 6).await;
    for s in shared.registry.streams() {
        assert!(screen.contains(&s.stream_id[..8]), "{} missing:\n{screen}", s.stream_id);
    }
    assert_eq!(rows(&screen).iter().filter(|r| r.1 == "edge-a").count(), 3);
    // Heartbeat ages count up live between heartbeats (interval 5 s).
    let before = rows(&tui.screen());
    tui.wait("ages advancing", Duration::from_secs(3), |s| {
        let after = rows(s);
        before.iter().filter(|b| after.iter().any(|a| a.0 == b.0 && a.2 > b.2)).count() >= 3
    })
    .await;

    // A config change the server holds back (config_push = manual): clients go stale.
    let old = shared.group_version("demo").unwrap();
    std::fs::write(&path, SERVER.replace("heartbeat_interval = \"5s\"", "heartbeat_interval = \"4s\"")).unwrap();
    let start = Instant::now();
    while shared.group_version("demo").unwrap() == old {
        assert!(start.elapsed() < Duration::from_secs(10), "server reloaded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let new = shared.group_version("demo").unwrap();
    tui.wait("every row stale", Duration::from_secs(5), |s| {
        let r = rows(s);
        r.len() == 6 && r.iter().all(|r| r.3.starts_with('✗'))
    })
    .await;
    // `r` on the first row (edge-a) pushes the config; edge-a's rows turn in sync.
    tui.keys(&["g", "r"]);
    let pressed = Instant::now();
    let want = format!("✓ {}", &new[..6]);
    let screen = tui
        .wait("edge-a in sync", Duration::from_secs(5), |s| {
            let r = rows(s);
            r.iter().filter(|r| r.1 == "edge-a").all(|r| r.3 == want) && r.iter().any(|r| r.1 == "edge-a")
        })
        .await;
    let took = pressed.elapsed();
    assert!(rows(&screen).iter().filter(|r| r.1 == "edge-b").all(|r| r.3.starts_with('✗')), "only edge-a resynced");
    assert!(took < Duration::from_millis(1500), "resync shown after {took:?}");
    println!("r -> acknowledged version on screen in {took:?}");

    // `x` `y` on edge-a's first data stream closes it; a replacement appears.
    tui.keys(&["j"]);
    let screen = tui.screen();
    let target = rows(&screen)[1].clone();
    assert_eq!(target.1, "edge-a");
    tui.keys(&["x"]);
    tui.wait("confirm dialog", Duration::from_secs(3), |s| s.contains("Close stream")).await;
    tui.keys(&["y"]);
    let screen = tui
        .wait("replacement stream", Duration::from_secs(10), |s| {
            let r = rows(s);
            r.len() == 6 && r.iter().all(|r| r.0 != target.0) && r.iter().filter(|r| r.1 == "edge-a").count() == 3
        })
        .await;
    assert!(screen.contains("closed"), "the outcome is shown:\n{screen}");

    tui.keys(&["q"]);
    drop(tui);
    stop.cancel();
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A row of the fleet Streams table.
#[derive(Debug, Clone, PartialEq)]
struct FleetRow {
    /// The SERVER cell: the server's id, `✗` in front while it is down.
    server: String,
    stream: String,
    kind: String,
    client: String,
    selected: bool,
}

/// The rows of the fleet Streams table (SERVER STREAM TYPE CLIENT ...).
fn fleet_rows(screen: &str) -> Vec<FleetRow> {
    screen
        .lines()
        .filter_map(|l| {
            let selected = l.starts_with('›');
            let cols: Vec<&str> = l.trim_start_matches(['›', ' ']).split_whitespace().collect();
            if cols.len() < 9 || !(cols[2] == "ctrl" || cols[2] == "http") {
                return None;
            }
            let [server, stream, kind, client] = [cols[0], cols[1], cols[2], cols[3]].map(String::from);
            Some(FleetRow { server, stream, kind, client, selected })
        })
        .collect()
}

/// Moves the selection to the first row matching `want`, checking on screen that it is selected.
async fn select(tui: &Tmux, want: impl Fn(&FleetRow) -> bool) -> FleetRow {
    let rows = fleet_rows(&tui.screen());
    let k = rows.iter().position(&want).unwrap_or_else(|| panic!("no such row in {rows:?}"));
    let target = rows[k].clone();
    tui.keys(&["g"]);
    for _ in 0..k {
        tui.keys(&["j"]);
    }
    tui.wait("the row selected", Duration::from_secs(3), |s| {
        fleet_rows(s).iter().any(|r| r.selected && r.stream == target.stream && r.server == target.server)
    })
    .await;
    target
}

/// Two servers, both holding the same two clients, and a third that never
/// answers: one merged view with a SERVER column; `x` `y` on a row of the
/// second server closes that stream there and nowhere else; the second
/// server going away leaves its rows marked down while the first stays live
/// and steerable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_watches_two_servers_and_steers_the_owner() {
    if !have_tmux() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let one = TestServer::start(SERVER, "tui-s1").await;
    let two = TestServer::start(SERVER, "tui-s2").await;
    let stop_clients = CancellationToken::new();
    let clients = start_clients(&["edge-a", "edge-b"], &[&one.grpc, &two.grpc], &stop_clients);
    for s in [&one, &two] {
        s.wait("both clients on the server", |s| s.streams_of("edge-a") == 3 && s.streams_of("edge-b") == 3).await;
    }

    // A third "server" that takes connections and never answers, first in
    // the list: it must hold up neither the others' rows nor their steering.
    let tarpit = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hung = tarpit.local_addr().unwrap().to_string();
    let tarpit = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = tarpit.accept().await {
            held.push(sock);
        }
    });

    let bin = env!("CARGO_BIN_EXE_tunnel-tui");
    let tui = Tmux::start(&format!("{bin} --server {hung} --server {},{}", one.admin, two.admin));
    let screen = tui.wait("twelve rows", Duration::from_secs(10), |s| fleet_rows(s).len() == 12).await;
    assert!(screen.contains("2/3 servers up"), "{screen}");
    // The hung server is named as not up (connecting, or failed by now on a
    // busy machine) while the others' rows are live.
    assert!(screen.contains(&hung), "{screen}");
    assert!(screen.lines().any(|l| l.split_whitespace().take(2).eq(["SERVER", "STREAM"])), "{screen}");
    let rows = fleet_rows(&screen);
    for (label, s) in [("tui-s1", &one), ("tui-s2", &two)] {
        for id in s.stream_ids() {
            assert!(
                rows.iter().any(|r| r.server == label && r.stream == id[..8]),
                "{id} of {label} missing:\n{screen}"
            );
        }
        for c in ["edge-a", "edge-b"] {
            assert_eq!(rows.iter().filter(|r| r.server == label && r.client == c).count(), 3, "{screen}");
        }
    }

    // `x` `y` on edge-a's data stream on the SECOND server.
    let before_one = one.stream_ids();
    let target = select(&tui, |r| r.server == "tui-s2" && r.client == "edge-a" && r.kind == "http").await;
    let full = two.full_id(&target.stream);
    tui.keys(&["x"]);
    tui.wait("confirm dialog", Duration::from_secs(3), |s| s.contains("Close stream") && s.contains("tui-s2")).await;
    tui.keys(&["y"]);
    two.wait("the stream closed and reopened on server 2", |s| {
        !s.stream_ids().contains(&full) && s.streams_of("edge-a") == 3
    })
    .await;
    let screen = tui
        .wait("the replacement on screen", Duration::from_secs(10), |s| {
            let r = fleet_rows(s);
            r.len() == 12
                && r.iter().all(|r| r.stream != target.stream)
                && r.iter().filter(|r| r.server == "tui-s2" && r.client == "edge-a").count() == 3
        })
        .await;
    assert!(screen.contains("tui-s2: stream"), "the outcome names the server:\n{screen}");
    assert_eq!(one.stream_ids(), before_one, "server 1's streams untouched");

    // Server 2 goes away: its rows stay, marked; server 1 stays live and steerable.
    two.stop.cancel();
    let screen = tui
        .wait("server 2 down", Duration::from_secs(15), |s| {
            s.contains("1/3 servers up") && fleet_rows(s).iter().filter(|r| r.server == "✗tui-s2").count() == 6
        })
        .await;
    let banner = screen.lines().find(|l| l.contains("down, retrying")).unwrap_or_else(|| panic!("banner:\n{screen}"));
    assert!(banner.contains("tui-s2"), "{screen}");
    let before_two: Vec<FleetRow> = fleet_rows(&screen).into_iter().filter(|r| r.server == "✗tui-s2").collect();
    let target = select(&tui, |r| r.server == "tui-s1" && r.client == "edge-b" && r.kind == "http").await;
    let full = one.full_id(&target.stream);
    tui.keys(&["x"]);
    tui.wait("confirm dialog", Duration::from_secs(3), |s| s.contains("Close stream") && s.contains("tui-s1")).await;
    tui.keys(&["y"]);
    one.wait("the stream closed and reopened on server 1", |s| {
        !s.stream_ids().contains(&full) && s.streams_of("edge-b") == 3
    })
    .await;
    let screen = tui
        .wait("server 1's replacement on screen", Duration::from_secs(10), |s| {
            let r = fleet_rows(s);
            r.iter().all(|r| r.stream != target.stream)
                && r.iter().filter(|r| r.server == "tui-s1" && r.client == "edge-b").count() == 3
        })
        .await;
    let after_two: Vec<FleetRow> = fleet_rows(&screen)
        .into_iter()
        .filter(|r| r.server == "✗tui-s2")
        .map(|r| FleetRow { selected: false, ..r })
        .collect();
    let before_two: Vec<FleetRow> = before_two.into_iter().map(|r| FleetRow { selected: false, ..r }).collect();
    assert_eq!(after_two, before_two, "server 2's last rows stay as they were");

    tui.keys(&["q"]);
    drop(tui);
    stop_clients.cancel();
    one.stop.cancel();
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    for s in [one, two] {
        let _ = tokio::time::timeout(Duration::from_secs(10), s.task).await;
    }
    tarpit.abort();
}

const TRAFFIC_SERVER: &str = r#"
[server]
shutdown_grace = "1s"
[[groups]]
name = "demo"
token = "t"
data_streams = 2
[[rules]]
group = "demo"
upstream = "web"
"#;

/// An upstream answering `200 ok`, or `502` to every `fail_every`th request
/// (0: never), until `stop` fires.
async fn upstream(fail_every: u64, stop: CancellationToken) -> std::net::SocketAddr {
    use hyper::service::service_fn;
    use std::sync::atomic::{AtomicU64, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(AtomicU64::new(0));
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let seen = seen.clone();
            let svc = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
                let status = if fail_every > 0 && n.is_multiple_of(fail_every) { 502 } else { 200 };
                let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")));
                *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn =
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(sock), svc);
            tokio::spawn(conn);
        }
    });
    addr
}

/// Sends GETs to `url` at `rate` a second, open loop, until `stop` fires or
/// `limit` passes, at most 64 in flight; returns how many were answered.
async fn load(url: String, rate: u32, limit: Duration, stop: CancellationToken) -> u64 {
    use hyper_util::client::legacy::Client as HttpClient;
    let client: HttpClient<_, http_body_util::Empty<bytes::Bytes>> =
        HttpClient::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let end = Instant::now() + limit;
    while Instant::now() < end {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let Ok(permit) = gate.clone().try_acquire_owned() else { continue };
        let (client, url, answered) = (client.clone(), url.clone(), answered.clone());
        tokio::spawn(async move {
            let req =
                hyper::Request::get(url.as_str()).header("host", "app.example.com").body(http_body_util::Empty::new());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(5), client.request(req.unwrap())).await {
                answered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    answered.load(std::sync::atomic::Ordering::Relaxed)
}

/// A Traffic view row: (subject, name, req/s, error share in %) of each
/// row; ASCII trend last.
fn traffic_rows(screen: &str) -> Vec<(String, String, f64, f64, String)> {
    screen
        .lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.trim_start_matches(['›', ' ']).split_whitespace().collect();
            if cols.len() < 7 || !["server", "group", "client", "rule"].contains(&cols[0]) {
                return None;
            }
            let rate = cols[2].parse().ok()?;
            let err = if cols[4] == "-" { 0.0 } else { cols[4].strip_suffix('%')?.parse().ok()? };
            // The trend is what follows the P99 column, spaces and all.
            let trend = l.get(l.find(cols[5])? + cols[5].len()..)?.trim_start_matches(' ').to_string();
            Some((cols[0].to_string(), cols[1].to_string(), rate, err, trend))
        })
        .collect()
}

/// The Traffic view against real daemons and real load, one client's
/// upstream answering a tenth of its requests with 502: at 200 req/s the
/// server's row says about 200; at 500 req/s it says about 500, that
/// client's error share reads about 10%, the other's 0, and the trend steps up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_view_follows_the_load() {
    if !have_tmux() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let stop = CancellationToken::new();
    let good = upstream(0, stop.clone()).await;
    let flaky = upstream(10, stop.clone()).await;
    let listeners = Listeners::ephemeral().await.unwrap();
    let (http, grpc, admin) = listeners.addrs().unwrap();
    let server = Server::new(ServerConfig::from_str_named(TRAFFIC_SERVER, "test").unwrap(), None);
    let shared = server.shared();
    let server_task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    let mut clients = Vec::new();
    for (id, up) in [("edge-ok", good), ("edge-bad", flaky)] {
        let cfg = format!(
            "server = \"http://{grpc}\"\nclient_id = \"{id}\"\ngroup = \"demo\"\ntoken = \"t\"\nshutdown_grace = \"1s\"\n[upstreams]\nweb = \"http://{up}\"\n"
        );
        let client = Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap());
        clients.push(tokio::spawn(client.run(stop.clone().cancelled_owned())));
    }
    let start = Instant::now();
    while shared.registry.streams().len() < 6 {
        assert!(start.elapsed() < Duration::from_secs(15), "clients registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://{http}/");
    let tui = Tmux::start(&format!("{} --ascii --server {admin}", env!("CARGO_BIN_EXE_tunnel-tui")));
    tui.wait("the console", Duration::from_secs(10), |s| s.contains("Streams (6)")).await;
    tui.keys(&["Tab", "Tab", "Tab"]);
    tui.wait("the Traffic view", Duration::from_secs(5), |s| s.contains("Traffic (")).await;

    let phase = CancellationToken::new();
    let slow = tokio::spawn(load(url.clone(), 200, Duration::from_secs(30), phase.clone()));
    let server_row = |s: &str| traffic_rows(s).into_iter().find(|r| r.0 == "server");
    let screen = tui
        .wait("about 200 req/s", Duration::from_secs(20), |s| {
            server_row(s).is_some_and(|r| (150.0..=250.0).contains(&r.2))
        })
        .await;
    let before = server_row(&screen).unwrap().4;
    phase.cancel();
    let sent_slow = slow.await.unwrap();

    let fast = tokio::spawn(load(url, 500, Duration::from_secs(40), stop.clone()));
    let screen = tui
        .wait("about 500 req/s and 10% errors for edge-bad", Duration::from_secs(30), |s| {
            let rows = traffic_rows(s);
            let of = |name: &str| rows.iter().find(|r| r.0 == "client" && r.1 == name).cloned();
            server_row(s).is_some_and(|r| r.2 >= 400.0)
                && of("edge-bad").is_some_and(|r| (6.0..=14.0).contains(&r.3))
                && of("edge-ok").is_some_and(|r| r.3 == 0.0)
        })
        .await;
    let after = server_row(&screen).unwrap().4;
    // The trend's newest end is the tallest bar; what came before is lower now.
    assert!(after.ends_with('@'), "{after:?}\n{screen}");
    assert!(after.chars().any(|c| ":-=+*".contains(c)), "before {before:?}, after {after:?}\n{screen}");
    assert_ne!(before, after);
    println!("Traffic view at 200 then 500 req/s ({sent_slow} answered in the first phase):\n{screen}");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), fast).await;
    for c in clients {
        let _ = tokio::time::timeout(Duration::from_secs(10), c).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
}

const CAPTURE_SERVER: &str = r#"
[server]
shutdown_grace = "1s"
[[groups]]
name = "demo"
token = "t"
[[rules]]
group = "demo"
upstream = "web"
capture_bodies = "16KiB"
"#;

/// What an upstream saw of one request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    method: String,
    uri: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// An upstream that notes every request and answers 200 with a small JSON body.
async fn noting_upstream(
    stop: CancellationToken,
) -> (std::net::SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<Seen>>>) {
    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let (sock, _) = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let log = log.clone();
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes().to_vec()).unwrap_or_default();
                    log.lock().unwrap().push(Seen {
                        method: parts.method.to_string(),
                        uri: parts.uri.to_string(),
                        authorization: parts.headers.get("authorization").map(|v| v.to_str().unwrap().to_string()),
                        body,
                    });
                    let mut resp =
                        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"{\"ok\":true}")));
                    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(sock), svc),
            );
        }
    });
    (addr, seen)
}

/// The request inspector against real daemons: a PUT with a JSON body on a
/// rule that keeps bodies shows its heads with Authorization masked and its
/// body pretty-printed; `p` replays it and the upstream sees the same
/// request again (its real Authorization included); `y` puts a curl line on
/// the clipboard (tmux's buffer, through OSC 52) that, run in a shell, gets
/// the same status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_shows_replays_and_copies_a_request() {
    if !have_tmux() {
        return;
    }
    let _serial = SERIAL.lock().await;
    let stop = CancellationToken::new();
    let (up, seen) = noting_upstream(stop.clone()).await;
    let listeners = Listeners::ephemeral().await.unwrap();
    let (http, grpc, admin) = listeners.addrs().unwrap();
    let server = Server::new(ServerConfig::from_str_named(CAPTURE_SERVER, "test").unwrap(), None);
    let shared = server.shared();
    let server_task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
    let cfg = format!(
        "server = \"http://{grpc}\"\nclient_id = \"edge-1\"\ngroup = \"demo\"\ntoken = \"t\"\nshutdown_grace = \"1s\"\n[upstreams]\nweb = \"http://{up}\"\n"
    );
    let client = tokio::spawn(
        Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap()).run(stop.clone().cancelled_owned()),
    );
    let start = Instant::now();
    while shared.registry.streams().len() < 3 {
        assert!(start.elapsed() < Duration::from_secs(15), "client registered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let body = r#"{"name":"widget","count":3,"tags":["a","b"]}"#;
    let url = format!("http://{http}/api/items/7?x=1");
    let put = hyper::Request::put(url.as_str())
        .header("authorization", "Bearer s3cret-token-value")
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let http_client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let resp = tokio::time::timeout(Duration::from_secs(10), http_client.request(put)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);

    let tui = Tmux::start(&format!("{} --server {admin}", env!("CARGO_BIN_EXE_tunnel-tui")));
    // tmux takes an application's OSC 52 into its paste buffer with this on.
    tui.run(&["set-option", "-g", "set-clipboard", "on"]);
    tui.wait("the console", Duration::from_secs(10), |s| s.contains("Streams (3)")).await;
    tui.keys(&["Tab", "Tab"]);
    tui.wait("the request", Duration::from_secs(5), |s| s.contains("Requests (1)") && s.contains("PUT")).await;
    tui.keys(&["Enter"]);
    let screen = tui.wait("the heads", Duration::from_secs(10), |s| s.contains("request headers")).await;
    assert!(screen.contains("authorization: Bearer ••• (masked"), "{screen}");
    assert!(screen.contains("content-type: application/json"), "{screen}");
    assert!(!screen.contains("s3cret"), "the token never reaches the console:\n{screen}");
    // The body is further down the pane.
    tui.keys(&["PageDown"]);
    let screen = tui.wait("the body", Duration::from_secs(10), |s| s.contains("\"name\": \"widget\"")).await;
    // Pretty-printed: a key a line.
    assert!(screen.lines().any(|l| l.trim() == "\"count\": 3,"), "{screen}");

    tui.keys(&["p"]);
    let screen = tui.wait("the replay's outcome", Duration::from_secs(15), |s| s.contains("status 200 → 200")).await;
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:#?}\n{screen}");
    assert_eq!(requests[0], requests[1], "the upstream saw the same request again");
    assert_eq!(requests[1].authorization.as_deref(), Some("Bearer s3cret-token-value"));
    assert_eq!((requests[1].method.as_str(), requests[1].uri.as_str()), ("PUT", "/api/items/7?x=1"));

    tui.run(&["delete-buffer"]);
    tui.keys(&["y"]);
    tui.wait("the curl line", Duration::from_secs(5), |s| s.contains("curl (y)")).await;
    let start = Instant::now();
    let line = loop {
        let text = tui.run(&["show-buffer"]);
        if text.starts_with("curl ") {
            break text;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no curl line in tmux's buffer: {text:?}\n{}", tui.screen());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(line.contains("$AUTHORIZATION") && !line.contains("s3cret"), "{line}");
    let run = format!("{line} -s -o /dev/null -w '%{{http_code}}'");
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new("sh")
            .args(["-c", &run])
            .env("AUTHORIZATION", "Bearer s3cret-token-value")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{line}\n{}", String::from_utf8_lossy(&out.stderr));
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[2], requests[0], "curl sent the same request");

    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), client).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), server_task).await;
}

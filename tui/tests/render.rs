//! Whole screens of the console on ratatui's TestBackend, at 80x24 and at a
//! wide size, compared with reviewed snapshots (tests/snapshots/). The clock
//! and the data are fixed, so the screens are exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use tunnel_lib::introspection::{
    Capture, ClientInfo, Event, EventKind, GroupInfo, Header, LinkInfo, LinkOptionState, RequestHead, RequestInfo,
    ServerInfo, StreamInfo, TrafficSeries, TrafficSubject, WatchUpdate,
};
use tunnel_lib::proto::{LinkCounters, LinkOptions, StreamType};
use tunnel_lib::traffic::{series, Point, MINUTE_MS, SECOND_MS};
use tunnel_tui::app::{update, Action, App};
use tunnel_tui::model::ConnState;
use tunnel_tui::ui;

/// The fixed "now": 2026-11-25 10:00:00 UTC.
const NOW: i64 = 1_795_600_800_000;

fn stream(id: &str, client: &str, ty: StreamType, hb_age_ms: i64, depth: u32, in_flight: u32) -> StreamInfo {
    StreamInfo {
        stream_id: id.into(),
        stream_type: ty as i32,
        client_id: client.into(),
        group: "demo".into(),
        peer: format!("10.1.0.1{}:51234", &client[5..]),
        connected_unix_ms: NOW - 3_720_000,
        last_heartbeat_unix_ms: NOW - hb_age_ms,
        last_delay_ms: 1,
        last_rtt_ms: 2,
        heartbeats: 124,
        queue_depth: depth,
        queue_capacity: 64,
        in_flight,
        requests: 1500,
        bytes_to_client: 3 << 20,
        bytes_from_client: 250 << 20,
        draining: false,
        delay_p50_ms: 1,
        delay_p99_ms: 4,
        delay_max_ms: 9,
        rtt_p50_ms: 2,
        rtt_p99_ms: 6,
        rtt_max_ms: 11,
        // The busiest stream carries a WebSocket.
        upgraded: u32::from(in_flight >= 3),
        delay_history_ms: vec![1, 1, 2, 1, 9, 1, 1, 3, 1, 2],
        link: Some(LinkInfo {
            server_options: Some(tuned()),
            server: Some(counts(12, 9_800 << 10, 17 << 10)),
            client: Some(counts(3, 250 << 20, 4 << 10)),
        }),
        client_link_options: Some(tuned()),
    }
}

/// A link direction's counters: 41 ms round trip.
fn counts(retransmits: u64, bytes_sent: u64, bytes_retrans: u64) -> LinkCounters {
    LinkCounters { rtt_us: 41_250, rto_us: 62_000, retransmits, bytes_sent, bytes_retrans }
}

/// The daemons' default link options.
fn tuned() -> LinkOptions {
    LinkOptions { rto_min_us: 20_000, delack_max_us: 8_000, notsent_lowat: 128 << 10, ..Default::default() }
}

fn fixture() -> App {
    let mut app = App::new(["127.0.0.1:7001"], NOW);
    update(&mut app, Action::Update(0, Box::new(snapshot("edge-eu-1", None))));
    app
}

/// The fixture's server as `server_id`: the same clients and streams, with
/// `mark` in place of each stream id's first digit (stream ids are unique per
/// server; the clients are the same on every server).
fn snapshot(server_id: &str, mark: Option<char>) -> WatchUpdate {
    let id = |s: &str| match mark {
        Some(m) => format!("{m}{}", &s[1..]),
        None => s.to_string(),
    };
    let server = ServerInfo {
        server_id: server_id.into(),
        version: "0.1.0".into(),
        started_unix_ms: NOW - 7_260_000,
        now_unix_ms: NOW,
        http_listen: "0.0.0.0:8080".into(),
        grpc_listen: "0.0.0.0:7000".into(),
        admin_listen: "127.0.0.1:7001".into(),
        groups: vec![GroupInfo {
            name: "demo".into(),
            config_version: "a1b2c3d4e5f6".into(),
            heartbeat_interval_ms: 30_000,
            heartbeat_timeout_ms: 90_000,
            data_streams: 2,
        }],
        clients: 2,
        streams: 6,
        requests_total: 3000,
        errors_total: 3,
        in_flight: 5,
        config_push: "auto".into(),
        streams_reaped: 1,
        exchanges_idle_closed: 0,
        draining: false,
        cluster: None,
        link_tuning: [("rto_min", "20ms"), ("delack_max", "8ms"), ("thin_timeouts", ""), ("notsent_lowat", "128KiB")]
            .into_iter()
            .map(|(option, value)| LinkOptionState {
                option: option.into(),
                state: if value.is_empty() { "off" } else { "applied" }.into(),
                value: value.into(),
            })
            .collect(),
    };
    let clients = ["edge-1", "edge-2"]
        .iter()
        .map(|c| ClientInfo {
            client_id: (*c).into(),
            group: "demo".into(),
            peer: format!("10.1.0.1{}:51234", &c[5..]),
            connected_unix_ms: NOW - 3_720_000,
            version: "0.1.0".into(),
            // edge-2 still runs the previous config.
            config_version_acked: if *c == "edge-1" { "a1b2c3d4e5f6" } else { "0f9e8d7c6b5a" }.into(),
            config_version_current: "a1b2c3d4e5f6".into(),
            streams: 3,
            session_id: format!("5e55{}-0000-4000-8000-000000000000", &c[5..]),
            // edge-2's path loses packets, and its own kernel lacks the timers.
            link: Some(LinkInfo {
                server_options: Some(tuned()),
                server: Some(counts(12, 19 << 20, 17 << 10)),
                client: Some(if *c == "edge-1" {
                    counts(3, 500 << 20, 4 << 10)
                } else {
                    counts(1_450, 61 << 20, 1_450 << 10)
                }),
            }),
            client_link_options: Some(if *c == "edge-1" {
                tuned()
            } else {
                LinkOptions {
                    notsent_lowat: 128 << 10,
                    unsupported: vec!["rto_min".into(), "delack_max".into()],
                    ..Default::default()
                }
            }),
        })
        .collect();
    let streams = vec![
        stream(&id("0a1b2c3d-0000-4000-8000-000000000001"), "edge-1", StreamType::Control, 4_000, 0, 0),
        stream(&id("1b2c3d4e-0000-4000-8000-000000000002"), "edge-1", StreamType::Http, 12_000, 3, 2),
        stream(&id("2c3d4e5f-0000-4000-8000-000000000003"), "edge-1", StreamType::Http, 29_000, 0, 0),
        stream(&id("3d4e5f60-0000-4000-8000-000000000004"), "edge-2", StreamType::Control, 1_000, 0, 0),
        // Late, and about to be reaped.
        stream(&id("4e5f6071-0000-4000-8000-000000000005"), "edge-2", StreamType::Http, 45_000, 60, 3),
        stream(&id("5f607182-0000-4000-8000-000000000006"), "edge-2", StreamType::Http, 75_000, 0, 0),
    ];
    let requests = (0..5)
        .map(|i| RequestInfo {
            seq: i + 1,
            unix_ms: NOW - 60_000 + i as i64 * 1000,
            method: if i == 2 { "POST" } else { "GET" }.into(),
            host: "app.example.com".into(),
            path: if i == 1 { "/ws/chat".into() } else { format!("/api/items/{i}") },
            status: [200, 101, 201, 404, 502][i as usize],
            duration_ms: 3 + i * 40,
            bytes_in: if i == 2 { 512 } else { 0 },
            bytes_out: 1024 * (i + 1),
            client_id: "edge-1".into(),
            stream_id: id("1b2c3d4e-0000-4000-8000-000000000002"),
            trace_id: format!("4bf92f3577b34da6a3ce929d0e0e473{i}"),
            error: if i == 4 { "upstream \"web\" unreachable".into() } else { String::new() },
            upgrade: if i == 1 { "websocket".into() } else { String::new() },
            group: "demo".into(),
            request_id: format!("{i:032x}"),
            forwarded_to: String::new(),
            rule: "app.example.com/".into(),
            head: Some(head(i)),
            replay_of: String::new(),
            remote_addr: format!("198.51.100.{}", i + 10),
            refused: String::new(),
        })
        .collect();
    WatchUpdate {
        full: true,
        server: Some(server),
        clients,
        streams,
        requests,
        traffic: traffic(),
        traffic_head_unix_ms: NOW,
        events: events(),
        ..Default::default()
    }
}

/// A morning's timeline: two clients connect, a config goes out and is
/// acknowledged, a reload is refused, a stream is reaped and its client comes back.
fn events() -> Vec<Event> {
    let ev = |seq: u64, ago_s: i64, kind: EventKind, client: &str, detail: &str| Event {
        seq,
        unix_ms: NOW - ago_s * 1000,
        kind: kind as i32,
        client_id: client.into(),
        group: if client.is_empty() { String::new() } else { "demo".into() },
        stream_id: if client.is_empty() { String::new() } else { "4e5f6071-0000-4000-8000-000000000005".into() },
        detail: detail.into(),
    };
    vec![
        ev(1, 3720, EventKind::Connected, "edge-1", "version 0.1.0 from 10.1.0.11:51234, session 5e551"),
        ev(2, 3719, EventKind::Connected, "edge-2", "version 0.1.0 from 10.1.0.12:51234, session 5e552"),
        ev(3, 600, EventKind::ConfigPushed, "", "version a1b2c3d4e5f6 sent to 2 of 2 clients"),
        ev(4, 600, EventKind::Reloaded, "", "/etc/tunnel/server.toml (SIGHUP): applied; config changed for demo"),
        ev(5, 599, EventKind::ConfigAcked, "edge-1", "applies a1b2c3d4e5f6, the group's current version"),
        ev(
            6,
            300,
            EventKind::ReloadRefused,
            "",
            "/etc/tunnel/server.toml (file changed): line 12: unknown key \"tokn\"",
        ),
        ev(7, 90, EventKind::Reaped, "edge-2", "no heartbeat for 91.2s (timeout 90s): data stream closed"),
        ev(8, 88, EventKind::Reconnected, "edge-2", "back after its control stream ended; version 0.1.0"),
    ]
}

/// Request `i`'s head: a browser's GET, or the POST (i = 2) with its body kept.
fn head(i: u64) -> RequestHead {
    let h = |name: &str, value: &str, masked: bool| Header { name: name.into(), value: value.into(), masked };
    let mut request_headers = vec![
        h("host", "app.example.com", false),
        h("user-agent", "curl/8.5.0", false),
        h("accept", "*/*", false),
        h("authorization", "Bearer ••• (masked, 47 bytes)", true),
    ];
    if i == 2 {
        request_headers.push(h("content-type", "application/json", false));
        request_headers.push(h("content-length", "27", false));
    }
    RequestHead {
        scheme: "https".into(),
        uri: if i == 1 { "/ws/chat".into() } else { format!("/api/items/{i}?page=2") },
        version: "HTTP/1.1".into(),
        request_headers,
        response_headers: vec![
            h("content-type", "application/json", false),
            h("content-length", &(1024 * (i + 1)).to_string(), false),
            h("set-cookie", "••• (masked, 32 bytes)", true),
        ],
        routed_us: 41,
        sent_us: 120,
        response_us: 2_800,
        end_us: 3_100 + i as i64 * 40_000,
        bodies: i == 2,
    }
}

/// Second `i` of the last five minutes for one client: 100 req/s, 250 in
/// the last 100 s; edge-2 answers 10% 502s in the last 20 s.
fn client_point(client: &str, i: usize) -> Point {
    let requests = if i >= 200 { 250 } else { 100 } + (i % 7) as u32;
    let errors = if client == "edge-2" && i >= 280 { requests / 10 } else { 0 };
    Point {
        requests,
        status_4xx: requests / 50,
        errors,
        p50_us: 900 + (i % 5) as u32 * 50,
        p99_us: if errors > 0 { 48_000 } else { 4_000 + (i % 11) as u32 * 300 },
        in_flight: 3 + (i % 4) as u32,
        bytes_in: 200 * u64::from(requests),
        bytes_out: 3000 * u64::from(requests),
    }
}

/// Adds two points as the server would count their requests together.
fn sum(a: Point, b: Point) -> Point {
    Point {
        requests: a.requests + b.requests,
        status_4xx: a.status_4xx + b.status_4xx,
        errors: a.errors + b.errors,
        p50_us: a.p50_us.max(b.p50_us),
        p99_us: a.p99_us.max(b.p99_us),
        in_flight: a.in_flight + b.in_flight,
        bytes_in: a.bytes_in + b.bytes_in,
        bytes_out: a.bytes_out + b.bytes_out,
    }
}

/// Fixed series ending at NOW: each client's, and the server's, the
/// group's and the rule's as their sum; an hour of minutes for the latter three.
fn traffic() -> Vec<TrafficSeries> {
    let seconds = |f: &dyn Fn(usize) -> Point| (0..300).map(f).collect::<Vec<Point>>();
    let edge1 = seconds(&|i| client_point("edge-1", i));
    let edge2 = seconds(&|i| client_point("edge-2", i));
    let all: Vec<Point> = edge1.iter().zip(&edge2).map(|(a, b)| sum(*a, *b)).collect();
    // An hour: quiet, a busy half hour, then today's rate.
    let minutes: Vec<Point> = (0..60)
        .map(|m| {
            let per_s = if m < 20 {
                50
            } else if m < 50 {
                400
            } else {
                200
            };
            Point { requests: per_s * 60, errors: if m == 45 { 600 } else { 0 }, p99_us: 5_000, ..Default::default() }
        })
        .collect();
    let start_s = NOW - 300_000;
    let start_m = NOW - 3_600_000;
    let mut out = vec![
        series(TrafficSubject::Client, "edge-1", SECOND_MS, start_s, edge1.iter()),
        series(TrafficSubject::Client, "edge-2", SECOND_MS, start_s, edge2.iter()),
    ];
    for (subject, name) in
        [(TrafficSubject::Server, ""), (TrafficSubject::Group, "demo"), (TrafficSubject::Rule, "app.example.com/")]
    {
        out.push(series(subject, name, SECOND_MS, start_s, all.iter()));
        out.push(series(subject, name, MINUTE_MS, start_m, minutes.iter()));
    }
    out
}

fn screen(app: &App, w: u16, h: u16) -> TestBackend {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| ui::render(app, f)).unwrap();
    t.backend().clone()
}

/// Each view at 80x24 and at 160x40.
#[test]
fn views_at_both_sizes() {
    let mut app = fixture();
    for (name, steps) in [("streams", 0), ("clients", 1), ("requests", 2)] {
        for _ in 0..steps {
            update(&mut app, Action::NextView);
        }
        insta::assert_snapshot!(format!("{name}_80x24"), screen(&app, 80, 24));
        insta::assert_snapshot!(format!("{name}_160x40"), screen(&app, 160, 40));
        app = fixture();
    }
}

/// The Traffic view at 80x24 and 200x50 (the last hour added), with a
/// client selected, and in ASCII.
#[test]
fn traffic_view() {
    let mut app = fixture();
    for _ in 0..3 {
        update(&mut app, Action::NextView);
    }
    let s = screen(&app, 80, 24);
    let text = lines(&s);
    assert!(text[1].contains(" Traffic "), "{text:#?}");
    let edge2 = text.iter().find(|l| row_text(l).starts_with("client  edge-2")).expect("edge-2's row");
    // A tenth of its requests (rounded down) were 502s over the last 10 s; its p99 48 ms.
    assert!(edge2.contains(" 9.9% ") && edge2.contains("48.0ms"), "{edge2}");
    assert!(text.iter().any(|l| l.contains("server edge-eu-1 · last 5 minutes")), "{text:#?}");
    insta::assert_snapshot!("traffic_80x24", s);
    insta::assert_snapshot!("traffic_200x50", screen(&app, 200, 50));
    // edge-2 is the third row: server, group, then the clients.
    for _ in 0..3 {
        update(&mut app, Action::Down);
    }
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().any(|l| l.contains("client edge-2 · last 5 minutes")), "{:#?}", lines(&s));
    insta::assert_snapshot!("traffic_client_80x24", s);
    app.ascii = true;
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().skip(3).all(|l| !l.contains('█') && !l.contains('▁')), "{:#?}", lines(&s));
    insta::assert_snapshot!("traffic_ascii_80x24", s);
}

/// The request inspector: heads with secrets masked, timings, the kept
/// body pretty-printed, a replay's outcome beside the original with the
/// heads' diff, the curl line; the filter's terms narrow the rows.
#[test]
fn request_inspector() {
    let mut app = fixture();
    for _ in 0..2 {
        update(&mut app, Action::NextView);
    }
    // Newest first: the POST is the third row.
    update(&mut app, Action::Down);
    update(&mut app, Action::Down);
    let steer = update(&mut app, Action::ToggleDetail);
    let (server, post) = app.selected_request().expect("a request");
    assert_eq!(post.method, "POST");
    // Its rule keeps bodies: the console asks for them.
    assert_eq!(steer.map(|s| s.command), Some(tunnel_tui::app::Command::Capture(post.request_id.clone())));
    insta::assert_snapshot!("inspector_80x24", screen(&app, 80, 24));
    let body = br#"{"name":"widget","count":3}"#;
    let cap = Capture {
        request: Some(post.clone()),
        request_body: body.to_vec().into(),
        request_body_size: 27,
        response_body: b"upstream error".to_vec().into(),
        response_body_size: 14,
    };
    update(&mut app, Action::Captured(server, post.request_id.clone(), Ok(Box::new(cap))));
    update(&mut app, Action::Scroll(10));
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().any(|l| l.trim() == "\"count\": 3,"), "{:#?}", lines(&s));
    insta::assert_snapshot!("inspector_body_80x24", s);
    // A replay that now succeeds, and the curl line.
    update(&mut app, Action::Replay(true));
    let mut new = post.clone();
    new.status = 200;
    new.request_id = "f".repeat(32);
    new.replay_of = post.request_id.clone();
    if let Some(h) = new.head.as_mut() {
        h.response_headers.retain(|h| h.name != "set-cookie");
        h.response_headers.push(Header { name: "location".into(), value: "/api/items/9".into(), masked: false });
    }
    let replayed = Capture { request: Some(new), ..Default::default() };
    update(&mut app, Action::Replayed(server, post.request_id.clone(), Ok(Box::new(replayed))));
    update(&mut app, Action::CopyCurl);
    assert!(
        app.clipboard
            .as_deref()
            .is_some_and(|c| c.starts_with("curl -X 'POST' 'https://app.example.com/api/items/2?page=2'")),
        "{:?}",
        app.clipboard
    );
    insta::assert_snapshot!("inspector_replay_160x40", screen(&app, 160, 40));
    // Filter terms: only 4xx and 5xx, only those slower than 100 ms.
    update(&mut app, Action::ToggleDetail);
    for c in "status:5xx".chars() {
        update(&mut app, Action::FilterChar(c));
    }
    assert_eq!(app.rows().len(), 1);
    app.filter = ">100ms".into();
    assert_eq!(app.rows().len(), 2);
}

/// The Events view, newest first, at both sizes, and an event's detail.
#[test]
fn events_view() {
    let mut app = fixture();
    for _ in 0..4 {
        update(&mut app, Action::NextView);
    }
    let s = screen(&app, 80, 24);
    let text = lines(&s);
    assert!(text[2].contains(" Events (8) · times UTC "), "{text:#?}");
    assert!(row_text(&text[4]).starts_with("09:58:32 reconnected"), "newest first: {text:#?}");
    insta::assert_snapshot!("events_80x24", s);
    insta::assert_snapshot!("events_160x40", screen(&app, 160, 40));
    update(&mut app, Action::Down);
    update(&mut app, Action::ToggleDetail);
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().any(|l| l.contains("time: 2026-11-25 09:58:30.000 UTC")), "{:#?}", lines(&s));
    insta::assert_snapshot!("events_detail_80x24", s);
}

/// Disconnected: a banner says so, the last data stays.
#[test]
fn disconnected() {
    let mut app = fixture();
    update(&mut app, Action::Conn(0, ConnState::Lost("cannot reach http://127.0.0.1:7001: Connection refused".into())));
    insta::assert_snapshot!("disconnected_80x24", screen(&app, 80, 24));
    insta::assert_snapshot!("disconnected_160x40", screen(&app, 160, 40));
    let never = App::new(["127.0.0.1:7001"], NOW);
    insta::assert_snapshot!("connecting_80x24", screen(&never, 80, 24));
}

/// Detail pane, close confirmation, help, filter prompt and a command notice.
#[test]
fn panes_and_dialogs() {
    let mut app = fixture();
    update(&mut app, Action::Down);
    update(&mut app, Action::ToggleDetail);
    insta::assert_snapshot!("detail_80x24", screen(&app, 80, 24));
    update(&mut app, Action::ToggleDetail);
    update(&mut app, Action::AskCloseStream);
    insta::assert_snapshot!("confirm_80x24", screen(&app, 80, 24));
    update(&mut app, Action::ConfirmNo);
    update(&mut app, Action::ToggleHelp);
    insta::assert_snapshot!("help_80x24", screen(&app, 80, 24));
    update(&mut app, Action::ToggleHelp);
    update(&mut app, Action::StartFilter);
    for c in "edge-2".chars() {
        update(&mut app, Action::FilterChar(c));
    }
    insta::assert_snapshot!("filter_80x24", screen(&app, 80, 24));
    update(&mut app, Action::EndFilter);
    update(&mut app, Action::CommandDone(0, Ok("config a1b2c3d4e5f6 pushed to edge-2".into())));
    insta::assert_snapshot!("notice_80x24", screen(&app, 80, 24));
}

/// The header line, cell by cell.
#[test]
fn header_line() {
    let app = fixture();
    let backend = screen(&app, 80, 24);
    let first: String = (0..80).map(|x| backend.buffer()[(x, 0)].symbol().to_string()).collect();
    assert_eq!(first.trim_end(), " edge-eu-1 · up 2h01m · 2 clients · 6 streams · 3000 req · 3 err · 5 in flight");
}

/// A draining server (SIGTERM, drain_delay) says so in the header, alone
/// and in a fleet, while it is still up.
#[test]
fn draining_shows_in_the_header() {
    let mut app = fixture();
    let mut u = snapshot("edge-eu-1", None);
    if let Some(s) = u.server.as_mut() {
        s.draining = true;
    }
    update(&mut app, Action::Update(0, Box::new(u)));
    let first = lines(&screen(&app, 80, 24))[0].clone();
    assert!(first.starts_with(" edge-eu-1 · up 2h01m · draining · 2 clients"), "{first}");

    let mut app = fleet_fixture();
    let mut u = snapshot("edge-eu-2", Some('f'));
    if let Some(s) = u.server.as_mut() {
        s.draining = true;
    }
    update(&mut app, Action::Update(1, Box::new(u)));
    let first = lines(&screen(&app, 100, 24))[0].clone();
    assert!(first.contains(" 2/3 servers up (edge-eu-2 draining) · 2 clients"), "{first}");
}

/// The screen's lines as text.
fn lines(backend: &TestBackend) -> Vec<String> {
    let area = backend.buffer().area;
    (0..area.height).map(|y| (0..area.width).map(|x| backend.buffer()[(x, y)].symbol().to_string()).collect()).collect()
}

/// A table line without the selection marker.
fn row_text(line: &str) -> &str {
    line.trim_start_matches(['›', ' '])
}

/// Three servers: edge-eu-1 and edge-eu-2 up with the same two clients, the third never reached.
fn fleet_fixture() -> App {
    let mut app = App::new(["127.0.0.1:7001", "127.0.0.1:7101", "127.0.0.1:7201"], NOW);
    update(&mut app, Action::Update(0, Box::new(snapshot("edge-eu-1", None))));
    update(&mut app, Action::Update(1, Box::new(snapshot("edge-eu-2", Some('f')))));
    update(&mut app, Action::Conn(2, ConnState::Lost("cannot reach http://127.0.0.1:7201: Connection refused".into())));
    app
}

/// Several servers: the header counts servers up, the tables have a SERVER
/// column with every server's rows, and the detail pane names the server.
#[test]
fn fleet_views() {
    let mut app = fleet_fixture();
    let s = screen(&app, 80, 24);
    let text = lines(&s);
    assert_eq!(
        text[0].trim_end(),
        " 2/3 servers up · 2 clients · 12 streams · 6000 req · 6 err · 10 in flight",
        "{text:#?}"
    );
    assert!(text[2].starts_with(" ✗ 127.0.0.1:7201 down, retrying: cannot reach"), "banner: {text:#?}");
    assert_eq!(text[4].split_whitespace().take(3).collect::<Vec<_>>(), ["SERVER", "STREAM", "TYPE"], "{text:#?}");
    let rows_of = |id: &str| text.iter().filter(|l| row_text(l).starts_with(id)).count();
    assert_eq!((rows_of("edge-eu-1 "), rows_of("edge-eu-2 ")), (6, 6), "{text:#?}");
    insta::assert_snapshot!("fleet_streams_80x24", s);
    insta::assert_snapshot!("fleet_streams_160x40", screen(&app, 160, 40));
    // edge-1's rows on edge-eu-2 follow its rows on edge-eu-1.
    for _ in 0..3 {
        update(&mut app, Action::Down);
    }
    update(&mut app, Action::ToggleDetail);
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().any(|l| l.contains("server: edge-eu-2 at 127.0.0.1:7101")), "{:#?}", lines(&s));
    insta::assert_snapshot!("fleet_detail_80x24", s);
    update(&mut app, Action::ToggleDetail);
    update(&mut app, Action::AskCloseStream);
    let s = screen(&app, 80, 24);
    assert!(lines(&s).iter().any(|l| l.contains("on server edge-eu-2?")), "{:#?}", lines(&s));
    update(&mut app, Action::ConfirmNo);
    update(&mut app, Action::NextView);
    let s = screen(&app, 80, 24);
    let text = lines(&s);
    assert_eq!(text[4].split_whitespace().take(2).collect::<Vec<_>>(), ["SERVER", "CLIENT"], "{text:#?}");
    assert_eq!(text.iter().filter(|l| l.split_whitespace().take(1).eq(["edge-eu-2"])).count(), 2, "{text:#?}");
    insta::assert_snapshot!("fleet_clients_80x24", s);
    update(&mut app, Action::NextView);
    insta::assert_snapshot!("fleet_requests_80x24", screen(&app, 80, 24));
}

/// A server that goes away: counted down, its rows kept but greyed and
/// marked, while another server's rows stay live and keep updating.
#[test]
fn fleet_server_down_keeps_the_others_live() {
    let mut app = App::new(["127.0.0.1:7001", "127.0.0.1:7101"], NOW);
    update(&mut app, Action::Update(0, Box::new(snapshot("edge-eu-1", None))));
    update(&mut app, Action::Update(1, Box::new(snapshot("edge-eu-2", Some('f')))));
    let text = lines(&screen(&app, 80, 24));
    assert!(text[0].starts_with(" 2/2 servers up · 2 clients · 12 streams"), "{text:#?}");
    assert!(text[1].contains("● live · 2 servers"), "{text:#?}");

    update(&mut app, Action::Conn(1, ConnState::Lost("the server closed the watch".into())));
    // The live server keeps updating: a stream opens on edge-eu-1.
    let mut opened = snapshot("edge-eu-1", None);
    opened.full = false;
    opened.streams.truncate(1);
    opened.streams[0].stream_id = "7a7a7a7a-0000-4000-8000-000000000007".into();
    opened.clients.clear();
    opened.requests.clear();
    update(&mut app, Action::Update(0, Box::new(opened)));
    let s = screen(&app, 80, 24);
    let text = lines(&s);
    assert!(text[0].starts_with(" 1/2 servers up · 2 clients · 6 streams"), "{text:#?}");
    assert!(text[1].contains("✗ 1 down · 2 servers"), "{text:#?}");
    assert!(text[2].starts_with(" ✗ edge-eu-2 down, retrying: the server closed the watch"), "{text:#?}");
    let rows: Vec<usize> = (0..text.len()).filter(|&y| text[y].contains("demo")).collect();
    assert_eq!(rows.len(), 13, "every row stays: {text:#?}");
    assert!(text.iter().any(|l| l.contains("7a7a7a7a")), "the live server's new stream shows: {text:#?}");
    for y in rows {
        let line = &text[y];
        let down = row_text(line).starts_with("✗edge-eu-2");
        assert!(down || row_text(line).starts_with("edge-eu-1"), "{line}");
        // A down server's row is grey throughout, even its CONFIG cell; a live one's is coloured.
        let config = s.buffer()[(79, y as u16)].fg;
        assert_eq!(config == ratatui::style::Color::DarkGray, down, "row {y}: {line}");
    }
    insta::assert_snapshot!("fleet_down_80x24", s);
}

fn mouse(kind: crossterm::event::MouseEventKind, column: u16, row: u16) -> crossterm::event::MouseEvent {
    crossterm::event::MouseEvent { kind, column, row, modifiers: crossterm::event::KeyModifiers::NONE }
}

/// Clicks land where the screen shows things: a tab shows its view, a row
/// is selected; the wheel moves the selection, or scrolls the pane under it.
#[test]
fn mouse_clicks_and_wheel() {
    use crossterm::event::{MouseButton, MouseEventKind};
    use tunnel_tui::app::View;
    let mut app = fixture();
    let area = ratatui::layout::Rect::new(0, 0, 80, 24);
    let text = lines(&screen(&app, 80, 24));
    let click = MouseEventKind::Down(MouseButton::Left);
    // Each tab where its title is drawn.
    for v in View::ALL {
        let x = text[1].find(&format!(" {} ", v.title())).expect("tab drawn");
        let x = text[1][..x].chars().count() as u16 + 2;
        assert_eq!(ui::on_mouse(&app, mouse(click, x, 1), area), Some(Action::ShowView(v)), "{}", v.title());
    }
    // The third stream row (screen line 6) is the third of the rows.
    let a = ui::on_mouse(&app, mouse(click, 20, 6), area).expect("a row");
    update(&mut app, a);
    let rows = app.rows();
    assert_eq!(app.selected_index(&rows), 2);
    assert!(text[6].contains(&app.selected.as_ref().unwrap().id[..8]), "{}", text[6]);
    assert_eq!(ui::on_mouse(&app, mouse(click, 20, 20), area), None, "below the last row");
    assert_eq!(ui::on_mouse(&app, mouse(MouseEventKind::ScrollDown, 20, 6), area), Some(Action::Down));
    update(&mut app, Action::ToggleDetail);
    assert_eq!(ui::on_mouse(&app, mouse(MouseEventKind::ScrollDown, 20, 20), area), Some(Action::Scroll(3)));
    update(&mut app, Action::ShowView(View::Events));
    assert_eq!(app.view, View::Events);
}

/// NO_COLOR: not a cell keeps a colour; the selection keeps reverse video.
#[test]
fn no_color() {
    let mut app = fixture();
    app.no_color = true;
    let s = screen(&app, 80, 24);
    for cell in s.buffer().content.iter() {
        assert_eq!((cell.fg, cell.bg), (ratatui::style::Color::Reset, ratatui::style::Color::Reset), "{cell:?}");
    }
    assert!(s.buffer()[(5, 4)].modifier.contains(ratatui::style::Modifier::REVERSED), "the selected row");
}

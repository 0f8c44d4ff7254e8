//! Whole screens of the console on ratatui's TestBackend, at 80x24 and at a
//! wide size, compared with reviewed snapshots (tests/snapshots/). The clock
//! and the data are fixed, so the screens are exact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use ratatui::backend::TestBackend;
use ratatui::Terminal;
use tunnel_lib::introspection::{ClientInfo, GroupInfo, RequestInfo, ServerInfo, StreamInfo, WatchUpdate};
use tunnel_lib::proto::StreamType;
use tunnel_tui::app::{update, Action, App, ConnState};
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
    }
}

fn fixture() -> App {
    let mut app = App::new("127.0.0.1:7001", NOW);
    let server = ServerInfo {
        server_id: "edge-eu-1".into(),
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
        })
        .collect();
    let streams = vec![
        stream("0a1b2c3d-0000-4000-8000-000000000001", "edge-1", StreamType::Control, 4_000, 0, 0),
        stream("1b2c3d4e-0000-4000-8000-000000000002", "edge-1", StreamType::Http, 12_000, 3, 2),
        stream("2c3d4e5f-0000-4000-8000-000000000003", "edge-1", StreamType::Http, 29_000, 0, 0),
        stream("3d4e5f60-0000-4000-8000-000000000004", "edge-2", StreamType::Control, 1_000, 0, 0),
        // Late, and about to be reaped.
        stream("4e5f6071-0000-4000-8000-000000000005", "edge-2", StreamType::Http, 45_000, 60, 3),
        stream("5f607182-0000-4000-8000-000000000006", "edge-2", StreamType::Http, 75_000, 0, 0),
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
            stream_id: "1b2c3d4e-0000-4000-8000-000000000002".into(),
            trace_id: format!("4bf92f3577b34da6a3ce929d0e0e473{i}"),
            error: if i == 4 { "upstream \"web\" unreachable".into() } else { String::new() },
            upgrade: if i == 1 { "websocket".into() } else { String::new() },
            group: "demo".into(),
            request_id: format!("{i:032x}"),
        })
        .collect();
    let u = WatchUpdate { full: true, server: Some(server), clients, streams, requests, ..Default::default() };
    update(&mut app, Action::Update(Box::new(u)));
    app
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

/// Disconnected: a banner says so, the last data stays.
#[test]
fn disconnected() {
    let mut app = fixture();
    update(&mut app, Action::Conn(ConnState::Lost("cannot reach http://127.0.0.1:7001: Connection refused".into())));
    insta::assert_snapshot!("disconnected_80x24", screen(&app, 80, 24));
    insta::assert_snapshot!("disconnected_160x40", screen(&app, 160, 40));
    let never = App::new("127.0.0.1:7001", NOW);
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
    update(&mut app, Action::CommandDone(Ok("config a1b2c3d4e5f6 pushed to edge-2".into())));
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

//! Drawing the console: header, view tabs, the table of the current view, a
//! detail pane, dialogs and the footer. Pure functions of [`App`]; no I/O.

use crate::app::{App, Confirm, ConnState, RowRef, View};
use crate::model::{short_age, short_bytes, short_duration, short_id, Freshness, Model};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;
use tunnel_lib::introspection::{ClientInfo, RequestInfo, StreamInfo};
use tunnel_lib::proto::StreamType;

/// Width from which tables show their extra columns.
const WIDE: u16 = 140;
/// How long a command's outcome stays in the footer.
const NOTICE_MS: i64 = 5_000;

/// "ctrl" or "http".
pub fn stream_type_name(t: i32) -> &'static str {
    match StreamType::try_from(t) {
        Ok(StreamType::Control) => "ctrl",
        Ok(StreamType::Http) => "http",
        _ => "?",
    }
}

fn freshness_style(f: Freshness) -> Style {
    match f {
        Freshness::Fresh => Style::new().fg(Color::Green),
        Freshness::Late => Style::new().fg(Color::Yellow),
        Freshness::Critical => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
    }
}

/// "✓ 1a2b3c" in sync, "✗ 1a2b3c" stale (acknowledged version shown).
fn config_cell(model: &Model, client_id: &str) -> Cell<'static> {
    match model.config_of(client_id) {
        Some((acked, current)) if !current.is_empty() && acked == current => {
            Cell::from(format!("✓ {}", acked.get(..6).unwrap_or(acked))).style(Style::new().fg(Color::Green))
        }
        Some((acked, _)) => {
            let shown = if acked.is_empty() { "none" } else { acked.get(..6).unwrap_or(acked) };
            Cell::from(format!("✗ {shown}")).style(Style::new().fg(Color::Yellow))
        }
        None => Cell::from("-"),
    }
}

/// "3/64 ▮▮▯▯": depth against capacity.
fn queue_text(depth: u32, cap: u32) -> String {
    const BAR: usize = 4;
    let filled = if cap == 0 { 0 } else { ((depth as usize * BAR).div_ceil(cap as usize)).min(BAR) };
    format!("{depth}/{cap} {}{}", "▮".repeat(filled), "▯".repeat(BAR - filled))
}

fn clock(unix_ms: i64) -> String {
    let s = (unix_ms / 1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// Draws the whole console.
pub fn render(app: &App, f: &mut Frame) {
    let live = app.conn == ConnState::Live;
    let banner = if live { 0 } else { 1 };
    let [header, tabs, banner_area, main, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(banner),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(f.area());
    render_header(app, f, header);
    render_tabs(app, f, tabs);
    if !live {
        render_banner(app, f, banner_area);
    }
    let (table_area, detail_area) = if app.detail {
        let [t, d] = Layout::vertical([Constraint::Min(3), Constraint::Length(10)]).areas(main);
        (t, Some(d))
    } else {
        (main, None)
    };
    render_table(app, f, table_area);
    if let Some(d) = detail_area {
        render_detail(app, f, d);
    }
    render_footer(app, f, footer);
    if let Some(c) = &app.confirm {
        render_confirm(c, f);
    }
    if app.help {
        render_help(f);
    }
}

fn render_header(app: &App, f: &mut Frame, area: Rect) {
    let dim = Style::new().fg(Color::DarkGray);
    let title = Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan);
    // The product name and version only where there is room for them.
    let roomy = area.width >= 100;
    let mut spans = vec![Span::raw(" ")];
    if roomy {
        spans.push(Span::styled("tunnel-tui  ", title));
    }
    match &app.model.server {
        Some(s) => {
            let up = app.model.server_now(app.now_ms) - s.started_unix_ms;
            let sep = || Span::styled(" · ", dim);
            spans.push(Span::styled(s.server_id.clone(), title));
            if roomy {
                spans.push(Span::styled(format!(" v{}", s.version), dim));
            }
            spans.extend([
                sep(),
                Span::raw(format!("up {}", short_duration(up))),
                sep(),
                Span::raw(format!("{} clients", s.clients)),
                sep(),
                Span::raw(format!("{} streams", s.streams)),
                sep(),
                Span::raw(format!("{} req", s.requests_total)),
                sep(),
                Span::styled(
                    format!("{} err", s.errors_total),
                    if s.errors_total > 0 { Style::new().fg(Color::Yellow) } else { Style::new() },
                ),
                sep(),
                Span::raw(format!("{} in flight", s.in_flight)),
            ]);
        }
        None => spans.push(Span::styled("no data yet", dim)),
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

fn render_tabs(app: &App, f: &mut Frame, area: Rect) {
    let mut spans = vec![Span::raw(" ")];
    for v in View::ALL {
        let style = if v == app.view {
            Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED)
        } else {
            Style::new().fg(Color::Gray)
        };
        spans.push(Span::styled(format!(" {} ", v.title()), style));
        spans.push(Span::raw(" "));
    }
    spans.push(Span::styled(format!(" sort: {}", app.sort.label(app.view)), Style::new().fg(Color::DarkGray)));
    if !app.filter.is_empty() {
        spans.push(Span::styled(format!("  filter: {}", app.filter), Style::new().fg(Color::Magenta)));
    }
    let (dot, style) = match &app.conn {
        ConnState::Live => ("● live", Style::new().fg(Color::Green)),
        ConnState::Connecting => ("○ connecting", Style::new().fg(Color::Yellow)),
        ConnState::Lost(_) => ("✗ lost", Style::new().fg(Color::Red)),
    };
    let right = format!("  {dot} {} ", app.target);
    let [left_area, right_area] =
        Layout::horizontal([Constraint::Min(0), Constraint::Length(right.chars().count() as u16)]).areas(area);
    f.render_widget(Paragraph::new(Line::from(spans)), left_area);
    f.render_widget(Paragraph::new(Span::styled(right, style)), right_area);
}

fn render_banner(app: &App, f: &mut Frame, area: Rect) {
    let text = match &app.conn {
        ConnState::Lost(why) => format!(" ✗ {why} · retrying · data below is from before"),
        _ => format!(" connecting to {}…", app.target),
    };
    let style = match app.conn {
        ConnState::Lost(_) => Style::new().bg(Color::Red).fg(Color::White).add_modifier(Modifier::BOLD),
        _ => Style::new().bg(Color::Yellow).fg(Color::Black),
    };
    f.render_widget(Paragraph::new(text).style(style), area);
}

fn header_row(cols: &[&'static str]) -> Row<'static> {
    Row::new(cols.iter().map(|c| Cell::from(*c))).style(Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan))
}

fn render_table(app: &App, f: &mut Frame, area: Rect) {
    let rows = app.rows();
    let wide = area.width >= WIDE;
    let selected = app.selected_index(&rows);
    let (header, widths, body): (Row, Vec<Constraint>, Vec<Row>) = match app.view {
        View::Streams => {
            let body = rows
                .iter()
                .filter_map(|r| if let RowRef::Stream(s) = r { Some(stream_row(app, s, wide)) } else { None })
                .collect();
            if wide {
                (
                    header_row(&[
                        "STREAM", "TYPE", "CLIENT", "GROUP", "PEER", "HB AGE", "DELAY", "RTT", "QUEUE", "INFL", "REQS",
                        "↓BYTES", "↑BYTES", "CONFIG",
                    ]),
                    vec![
                        Constraint::Length(8),
                        Constraint::Length(4),
                        Constraint::Min(10),
                        Constraint::Length(10),
                        Constraint::Length(21),
                        Constraint::Length(6),
                        Constraint::Length(6),
                        Constraint::Length(6),
                        Constraint::Length(11),
                        Constraint::Length(6),
                        Constraint::Length(6),
                        Constraint::Length(9),
                        Constraint::Length(9),
                        Constraint::Length(8),
                    ],
                    body,
                )
            } else {
                (
                    header_row(&["STREAM", "TYPE", "CLIENT", "GROUP", "HB AGE", "DELAY", "QUEUE", "INFL", "CONFIG"]),
                    vec![
                        Constraint::Length(8),
                        Constraint::Length(4),
                        Constraint::Min(8),
                        Constraint::Length(8),
                        Constraint::Length(6),
                        Constraint::Length(6),
                        Constraint::Length(11),
                        Constraint::Length(6),
                        Constraint::Length(8),
                    ],
                    body,
                )
            }
        }
        View::Clients => {
            let body = rows
                .iter()
                .filter_map(|r| if let RowRef::Client(c) = r { Some(client_row(app, c, wide)) } else { None })
                .collect();
            let mut cols = vec!["CLIENT", "GROUP", "PEER", "CONNECTED", "VERSION", "STREAMS", "CONFIG"];
            let mut widths = vec![
                Constraint::Min(10),
                Constraint::Length(10),
                Constraint::Length(21),
                Constraint::Length(9),
                Constraint::Length(8),
                Constraint::Length(7),
                Constraint::Length(8),
            ];
            if wide {
                cols.extend(["CURRENT", "SESSION"]);
                widths.extend([Constraint::Length(12), Constraint::Length(36)]);
            }
            (header_row(&cols), widths, body)
        }
        View::Requests => {
            let body = rows
                .iter()
                .filter_map(|r| if let RowRef::Request(q) = r { Some(request_row(q, wide)) } else { None })
                .collect();
            let mut cols = vec!["TIME", "METH", "HOST", "PATH", "STATUS", "DUR", "BYTES", "CLIENT"];
            let mut widths = vec![
                Constraint::Length(8),
                Constraint::Length(6),
                Constraint::Length(14),
                Constraint::Min(10),
                Constraint::Length(6),
                Constraint::Length(6),
                Constraint::Length(9),
                Constraint::Length(10),
            ];
            if wide {
                cols.extend(["TRACE", "ERROR"]);
                widths.extend([Constraint::Length(32), Constraint::Length(24)]);
            }
            (header_row(&cols), widths, body)
        }
    };
    let title = format!(" {} ({}) ", app.view.title(), rows.len());
    let empty = body.is_empty();
    let table = Table::new(body, widths)
        .header(header)
        .block(Block::new().borders(Borders::TOP).title(title))
        .column_spacing(1)
        .row_highlight_style(Style::new().add_modifier(Modifier::REVERSED))
        // A marker as well as reverse video, for terminals without colour or styles.
        .highlight_symbol("›");
    let mut state = TableState::default().with_selected(if empty { None } else { Some(selected) });
    f.render_stateful_widget(table, area, &mut state);
    if empty {
        let msg = if app.filter.is_empty() { "nothing here yet" } else { "no rows match the filter" };
        let inner = Rect { y: area.y + 2, height: 1, ..area };
        if area.height > 2 {
            f.render_widget(Paragraph::new(format!("  {msg}")).style(Style::new().fg(Color::DarkGray)), inner);
        }
    }
}

fn stream_row<'a>(app: &App, s: &StreamInfo, wide: bool) -> Row<'a> {
    let m = &app.model;
    let age = m.heartbeat_age_ms(s, app.now_ms);
    let age_cell = Cell::from(short_age(age)).style(freshness_style(m.freshness(s, app.now_ms)));
    let mut cells = vec![
        Cell::from(short_id(&s.stream_id).to_string()),
        Cell::from(stream_type_name(s.stream_type)),
        Cell::from(s.client_id.clone()),
        Cell::from(s.group.clone()),
    ];
    if wide {
        cells.push(Cell::from(s.peer.clone()));
    }
    cells.push(age_cell);
    cells.push(Cell::from(format!("{}ms", s.last_delay_ms)));
    if wide {
        cells.push(Cell::from(if s.last_rtt_ms < 0 { "-".to_string() } else { format!("{}ms", s.last_rtt_ms) }));
    }
    let q = Cell::from(queue_text(s.queue_depth, s.queue_capacity));
    let q = if s.queue_capacity > 0 && s.queue_depth * 4 >= s.queue_capacity * 3 {
        q.style(Style::new().fg(Color::Yellow))
    } else {
        q
    };
    cells.push(q);
    // Upgraded connections (WebSocket...) are long-lived in-flight exchanges: marked so they read as such.
    cells.push(if s.upgraded > 0 {
        Cell::from(format!("{}^{}", s.in_flight, s.upgraded)).style(Style::new().fg(Color::Magenta))
    } else {
        Cell::from(s.in_flight.to_string())
    });
    if wide {
        cells.push(Cell::from(s.requests.to_string()));
        cells.push(Cell::from(short_bytes(s.bytes_to_client)));
        cells.push(Cell::from(short_bytes(s.bytes_from_client)));
    }
    cells.push(config_cell(m, &s.client_id));
    let row = Row::new(cells);
    if s.draining {
        row.style(Style::new().fg(Color::DarkGray))
    } else {
        row
    }
}

fn client_row<'a>(app: &App, c: &ClientInfo, wide: bool) -> Row<'a> {
    let since = app.model.server_now(app.now_ms) - c.connected_unix_ms;
    let mut cells = vec![
        Cell::from(c.client_id.clone()),
        Cell::from(c.group.clone()),
        Cell::from(c.peer.clone()),
        Cell::from(short_duration(since)),
        Cell::from(c.version.clone()),
        Cell::from(c.streams.to_string()),
        config_cell(&app.model, &c.client_id),
    ];
    if wide {
        cells.push(Cell::from(c.config_version_current.clone()));
        cells.push(Cell::from(c.session_id.clone()));
    }
    Row::new(cells)
}

fn request_row<'a>(r: &RequestInfo, wide: bool) -> Row<'a> {
    let status_style = match r.status {
        500.. => Style::new().fg(Color::Red),
        400..=499 => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Green),
    };
    let mut cells = vec![
        Cell::from(clock(r.unix_ms)),
        Cell::from(r.method.clone()),
        Cell::from(r.host.clone()),
        Cell::from(if r.upgrade.is_empty() { r.path.clone() } else { format!("{} [{}]", r.path, r.upgrade) }),
        Cell::from(r.status.to_string()).style(status_style),
        Cell::from(short_duration(r.duration_ms as i64)),
        Cell::from(short_bytes(r.bytes_out)),
        Cell::from(r.client_id.clone()),
    ];
    if wide {
        cells.push(Cell::from(r.trace_id.clone()));
        cells.push(Cell::from(r.error.clone()));
    }
    Row::new(cells)
}

fn kv(k: &str, v: impl Into<String>) -> Line<'static> {
    Line::from(vec![Span::styled(format!("{k:>10}: "), Style::new().fg(Color::Cyan)), Span::raw(v.into())])
}

fn render_detail(app: &App, f: &mut Frame, area: Rect) {
    let m = &app.model;
    let lines: Vec<Line> = match app.selected_row() {
        None => vec![Line::from("nothing selected")],
        Some(RowRef::Stream(s)) => {
            let g = m.group(&s.group);
            vec![
                kv("stream", format!("{} ({})", s.stream_id, stream_type_name(s.stream_type))),
                kv("client", format!("{} in group {} from {}", s.client_id, s.group, s.peer)),
                kv(
                    "heartbeat",
                    format!(
                        "{} ago, #{}, delay {}ms, rtt {}; interval {}, timeout {}",
                        short_duration(m.heartbeat_age_ms(s, app.now_ms)),
                        s.heartbeats,
                        s.last_delay_ms,
                        if s.last_rtt_ms < 0 { "-".into() } else { format!("{}ms", s.last_rtt_ms) },
                        g.map_or("?".into(), |g| short_duration(g.heartbeat_interval_ms as i64)),
                        g.map_or("?".into(), |g| short_duration(g.heartbeat_timeout_ms as i64)),
                    ),
                ),
                kv(
                    "hb window",
                    format!(
                        "delay p50/p99/max {}/{}/{} ms, rtt {}/{}/{} ms",
                        s.delay_p50_ms, s.delay_p99_ms, s.delay_max_ms, s.rtt_p50_ms, s.rtt_p99_ms, s.rtt_max_ms
                    ),
                ),
                kv(
                    "queue",
                    format!(
                        "{} of {} frames, {} in flight ({} upgraded connections)",
                        s.queue_depth, s.queue_capacity, s.in_flight, s.upgraded
                    ),
                ),
                kv(
                    "traffic",
                    format!(
                        "{} requests, {} to client, {} from client",
                        s.requests,
                        short_bytes(s.bytes_to_client),
                        short_bytes(s.bytes_from_client)
                    ),
                ),
                kv(
                    "connected",
                    format!(
                        "{} ago{}",
                        short_duration(m.server_now(app.now_ms) - s.connected_unix_ms),
                        if s.draining { ", draining" } else { "" }
                    ),
                ),
                kv("config", m.config_of(&s.client_id).map_or("-".into(), |(a, c)| format!("acked {a}, current {c}"))),
            ]
        }
        Some(RowRef::Client(c)) => vec![
            kv("client", format!("{} (version {})", c.client_id, c.version)),
            kv("group", c.group.clone()),
            kv("peer", c.peer.clone()),
            kv("connected", format!("{} ago", short_duration(m.server_now(app.now_ms) - c.connected_unix_ms))),
            kv("streams", c.streams.to_string()),
            kv("config", format!("acked {}, current {}", c.config_version_acked, c.config_version_current)),
            kv("session", c.session_id.clone()),
        ],
        Some(RowRef::Request(r)) => vec![
            kv("request", format!("{} {}{}", r.method, r.host, r.path)),
            kv("status", format!("{} in {}", r.status, short_duration(r.duration_ms as i64))),
            kv("upgrade", if r.upgrade.is_empty() { "-".into() } else { format!("{} (connection closed)", r.upgrade) }),
            kv("bytes", format!("{} in, {} out", short_bytes(r.bytes_in), short_bytes(r.bytes_out))),
            kv("via", format!("client {} stream {}", r.client_id, r.stream_id)),
            kv("trace", r.trace_id.clone()),
            kv("error", if r.error.is_empty() { "-".into() } else { r.error.clone() }),
        ],
    };
    let block = Block::new().borders(Borders::TOP).title(" Detail (Enter/Esc to close) ");
    f.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }), area);
}

fn render_footer(app: &App, f: &mut Frame, area: Rect) {
    let key = Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD);
    let line = if app.editing_filter {
        Line::from(vec![
            Span::styled(" / ", key),
            Span::raw(format!("{}▏", app.filter)),
            Span::styled("  Enter keep  Esc clear", Style::new().fg(Color::DarkGray)),
        ])
    } else if let Some((r, at)) = app.notice.as_ref().filter(|(_, at)| app.now_ms - at < NOTICE_MS) {
        let _ = at;
        match r {
            Ok(m) => Line::from(Span::styled(format!(" ✓ {m}"), Style::new().fg(Color::Green))),
            Err(m) => Line::from(Span::styled(format!(" ✗ {m}"), Style::new().fg(Color::Red))),
        }
    } else {
        // (key, meaning, priority): on a narrow terminal the least important go first.
        let mut keys: Vec<(&str, &str, u8)> =
            vec![("↑↓", "move", 3), ("Tab", "view", 4), ("/", "filter", 1), ("s", "sort", 0), ("⏎", "detail", 2)];
        match app.view {
            View::Streams => keys.extend([("r", "resync", 5), ("x", "close", 5), ("X", "close client", 5)]),
            View::Clients => keys.extend([("r", "resync", 5), ("R", "group", 5), ("X", "close", 5)]),
            View::Requests => {}
        }
        keys.extend([("?", "help", 9), ("q", "quit", 9)]);
        let width = |keys: &[(&str, &str, u8)]| -> usize {
            1 + keys.iter().map(|(k, w, _)| k.chars().count() + w.chars().count() + 3).sum::<usize>()
        };
        while width(&keys) > area.width as usize {
            let Some(i) = keys.iter().enumerate().min_by_key(|(_, k)| k.2).map(|(i, _)| i) else { break };
            keys.remove(i);
        }
        let mut spans = vec![Span::raw(" ")];
        for (k, what, _) in keys {
            spans.push(Span::styled(k, key));
            spans.push(Span::raw(format!(" {what}  ")));
        }
        Line::from(spans)
    };
    f.render_widget(Paragraph::new(line), area);
}

fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h }
}

fn render_confirm(c: &Confirm, f: &mut Frame) {
    let text = match c {
        Confirm::CloseStream { stream_id, client_id } => {
            format!("Close stream {} of {client_id}?\nThe client will open a replacement.", short_id(stream_id))
        }
        Confirm::CloseClient { client_id } => format!("Close every stream of {client_id}?\nIt will reconnect."),
    };
    let area = centered(f.area(), 48, 6);
    f.render_widget(Clear, area);
    let block = Block::bordered().title(" Confirm ").border_style(Style::new().fg(Color::Yellow));
    let body = format!("{text}\n  y yes   n no");
    f.render_widget(Paragraph::new(body).block(block).wrap(Wrap { trim: false }), area);
}

/// The key reference shown by `?`.
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓  j k", "move the selection"),
    ("g G", "first / last row"),
    ("Tab ← →", "switch view: Streams, Clients, Requests"),
    ("/", "filter rows (Enter keeps, Esc clears)"),
    ("s", "cycle the sort order"),
    ("Enter", "show / hide the detail pane"),
    ("r", "force a config resync of the selected client"),
    ("R", "force a resync of its whole group"),
    ("x", "close the selected stream (asks y/n)"),
    ("X", "close every stream of the client (asks y/n)"),
    ("Esc", "close the detail pane, clear the filter"),
    ("q  Ctrl-C", "quit"),
];

fn render_help(f: &mut Frame) {
    let area = centered(f.area(), 62, HELP.len() as u16 + 5);
    f.render_widget(Clear, area);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, v)| Line::from(vec![Span::styled(format!(" {k:<10} "), Style::new().fg(Color::Cyan)), Span::raw(*v)]))
        .collect();
    lines.push(Line::from(""));
    for note in [
        " heartbeat age: green fresh, yellow late, red near timeout",
        " INFL 3^1: 3 in flight, 1 of them upgraded (WebSocket...)",
    ] {
        lines.push(Line::from(Span::styled(note, Style::new().fg(Color::DarkGray))));
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Keys (any key closes) ")), area);
}

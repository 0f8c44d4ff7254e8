//! Drawing the console: header, view tabs, the table of the current view, a
//! detail pane, dialogs and the footer. Pure functions of [`App`]; no I/O.
//! With one server the screen is the single-server console; with several,
//! the header counts servers up, tables gain a SERVER column and a down
//! server's rows stay, greyed, under a banner.

use crate::app::{event_kind_name, Action, App, Confirm, RowRef, View};
use crate::model::{
    link_counts, link_loss, link_options_text, link_state, link_tuning_summary, share_text, short_age, short_bytes,
    short_duration, short_id, ConnState, Fleet, Freshness, Model, Watched,
};
use crossterm::event::{MouseButton, MouseEvent, MouseEventKind};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Clear, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;
use std::collections::BTreeSet;
use tunnel_lib::introspection::{ClientInfo, Event, EventKind, LinkInfo, RequestInfo, StreamInfo, TrafficSubject};
use tunnel_lib::proto::{LinkCounters, LinkOptions, StreamType};

mod inspect;
mod traffic;
pub use traffic::{short_rate, short_us};

/// Width from which tables show their extra columns.
const WIDE: u16 = 140;
/// How long a command's outcome stays in the footer.
const NOTICE_MS: i64 = 5_000;
/// The Clients view's trend column, narrow and wide.
const CLIENT_TREND: (u16, u16) = (12, 20);
/// Narrowest the SERVER column gets, and widest on narrow and on wide terminals.
const SERVER_COL: (u16, u16, u16) = (6, 12, 24);

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

/// A cell in `style`, unless its row is from a server that is down: those
/// rows are greyed as a whole, and colours would claim they are current.
fn tint(cell: Cell<'static>, style: Style, stale: bool) -> Cell<'static> {
    if stale {
        cell
    } else {
        cell.style(style)
    }
}

/// "✓ 1a2b3c" in sync, "✗ 1a2b3c" stale (acknowledged version shown).
fn config_cell(model: &Model, client_id: &str, stale: bool) -> Cell<'static> {
    match model.config_of(client_id) {
        Some((acked, current)) if !current.is_empty() && acked == current => {
            tint(Cell::from(format!("✓ {}", acked.get(..6).unwrap_or(acked))), Style::new().fg(Color::Green), stale)
        }
        Some((acked, _)) => {
            let shown = if acked.is_empty() { "none" } else { acked.get(..6).unwrap_or(acked) };
            tint(Cell::from(format!("✗ {shown}")), Style::new().fg(Color::Yellow), stale)
        }
        None => Cell::from("-"),
    }
}

/// A row's server: its name, marked `✗` while the server is down.
fn server_cell(fleet: &Fleet, i: usize) -> Cell<'static> {
    let label = fleet.label(i);
    if fleet.get(i).is_some_and(Watched::is_up) {
        Cell::from(label.to_string())
    } else {
        Cell::from(format!("✗{label}"))
    }
}

/// Whether server `i`'s rows are from before: it is down, and there are
/// others to tell them from (alone, the banner already says so).
pub(crate) fn is_stale(fleet: &Fleet, i: usize) -> bool {
    fleet.is_fleet() && !fleet.get(i).is_some_and(Watched::is_up)
}

/// "3/64 ▮▮▯▯": depth against capacity.
fn queue_text(depth: u32, cap: u32) -> String {
    const BAR: usize = 4;
    let filled = if cap == 0 { 0 } else { ((depth as usize * BAR).div_ceil(cap as usize)).min(BAR) };
    format!("{depth}/{cap} {}{}", "▮".repeat(filled), "▯".repeat(BAR - filled))
}

/// A clock time, "10:00:00", in UTC or the local zone.
pub fn clock(utc: bool, unix_ms: i64) -> String {
    stamp(utc, unix_ms, "%H:%M:%S")
}

/// A date and time to the millisecond, "2026-12-07 10:00:00.123", in UTC or the local zone.
pub fn timestamp(utc: bool, unix_ms: i64) -> String {
    stamp(utc, unix_ms, "%Y-%m-%d %H:%M:%S%.3f")
}

/// `unix_ms` formatted with `fmt` in UTC or the local zone.
fn stamp(utc: bool, unix_ms: i64, fmt: &str) -> String {
    match chrono::DateTime::from_timestamp_millis(unix_ms) {
        Some(t) if utc => t.format(fmt).to_string(),
        Some(t) => t.with_timezone(&chrono::Local).format(fmt).to_string(),
        None => "--:--:--".into(),
    }
}

/// The zone clock times are shown in: "UTC", or the local offset, "UTC+01:00".
pub fn zone(utc: bool, unix_ms: i64) -> String {
    if utc {
        return "UTC".into();
    }
    match chrono::DateTime::from_timestamp_millis(unix_ms).map(|t| t.with_timezone(&chrono::Local)) {
        Some(t) if chrono::Offset::fix(t.offset()).local_minus_utc() == 0 => "UTC".into(),
        Some(t) => t.format("UTC%:z").to_string(),
        None => "local time".into(),
    }
}

/// Where each part of the screen goes: one computation for drawing and for
/// telling what a mouse click landed on.
struct Areas {
    header: Rect,
    tabs: Rect,
    banner: Option<Rect>,
    table: Rect,
    /// The detail pane, or the Traffic view's charts.
    below: Option<Rect>,
    footer: Rect,
}

fn areas(app: &App, area: Rect) -> Areas {
    let live = app.fleet.up() == app.fleet.servers.len();
    let banner = if live { 0 } else { 1 };
    let [header, tabs, banner_area, main, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(banner),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(area);
    let (table, below) = if app.view == View::Traffic {
        // The charts are this view's detail: always there, for the selected row.
        let rows = app.rows().len() as u16;
        // A third of the room, at least four lines (clamp would panic on a
        // terminal short enough to leave a third under four).
        let table = (rows + 2).min(main.height / 3).max(4);
        let [t, c] = Layout::vertical([Constraint::Length(table), Constraint::Min(6)]).areas(main);
        (t, Some(c))
    } else if app.detail {
        // The inspector has heads and bodies to show: it takes most of the room.
        let pane = if app.view == View::Requests { Constraint::Percentage(65) } else { Constraint::Length(10) };
        let [t, d] = Layout::vertical([Constraint::Min(3), pane]).areas(main);
        (t, Some(d))
    } else {
        (main, None)
    };
    Areas { header, tabs, banner: (!live).then_some(banner_area), table, below, footer }
}

/// What a click at (`column`, `row`) on a screen of `area` landed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hit {
    Tab(View),
    /// The table's row with this index in `App::rows`.
    Row(usize),
    /// The detail pane (or the charts).
    Below,
}

/// What is at (`column`, `row`), as drawn now.
pub fn hit(app: &App, area: Rect, column: u16, row: u16) -> Option<Hit> {
    let a = areas(app, area);
    if row == a.tabs.y {
        // The tabs as render_tabs lays them out: a space, then " Title " and a space each.
        let mut x = a.tabs.x + 1;
        for v in View::ALL {
            let w = v.title().chars().count() as u16 + 2;
            if (x..x + w).contains(&column) {
                return Some(Hit::Tab(v));
            }
            x += w + 1;
        }
        return None;
    }
    if a.below.is_some_and(|b| b.contains(ratatui::layout::Position { x: column, y: row })) {
        return Some(Hit::Below);
    }
    // The table: its title line, its header line, then rows; scrolled as
    // ratatui scrolls it, just far enough to show the selection.
    let first = a.table.y + 2;
    let shown = a.table.height.saturating_sub(2);
    if row < first || row >= first + shown {
        return None;
    }
    let rows = app.rows();
    let offset = (app.selected_index(&rows) + 1).saturating_sub(usize::from(shown));
    let i = offset + usize::from(row - first);
    (i < rows.len()).then_some(Hit::Row(i))
}

/// Maps a mouse event to an action: a click on a tab shows its view, on a
/// row selects it; the wheel moves the selection, or scrolls the detail pane under it.
pub fn on_mouse(app: &App, m: MouseEvent, area: ratatui::layout::Rect) -> Option<Action> {
    if app.confirm.is_some() || app.help || app.editing_filter {
        return None;
    }
    let hit = hit(app, area, m.column, m.row);
    match (m.kind, hit) {
        (MouseEventKind::Down(MouseButton::Left), Some(Hit::Tab(v))) => Some(Action::ShowView(v)),
        (MouseEventKind::Down(MouseButton::Left), Some(Hit::Row(i))) => Some(Action::Select(i)),
        (MouseEventKind::ScrollDown, Some(Hit::Below)) if app.detail => Some(Action::Scroll(3)),
        (MouseEventKind::ScrollUp, Some(Hit::Below)) if app.detail => Some(Action::Scroll(-3)),
        (MouseEventKind::ScrollDown, _) => Some(Action::Down),
        (MouseEventKind::ScrollUp, _) => Some(Action::Up),
        _ => None,
    }
}

/// Draws the whole console.
pub fn render(app: &App, f: &mut Frame) {
    let a = areas(app, f.area());
    render_header(app, f, a.header);
    render_tabs(app, f, a.tabs);
    if let Some(b) = a.banner {
        render_banner(app, f, b);
    }
    render_table(app, f, a.table);
    match (app.view, a.below) {
        (View::Traffic, Some(c)) => traffic::render_charts(app, app.selected_row(), f, c),
        (_, Some(d)) => render_detail(app, f, d),
        _ => {}
    }
    render_footer(app, f, a.footer);
    if let Some(c) = &app.confirm {
        render_confirm(app, c, f);
    }
    if app.help {
        render_help(app, f);
    }
    if app.no_color {
        // NO_COLOR: every colour goes; bold, reverse video and the marker stay.
        for cell in f.buffer_mut().content.iter_mut() {
            cell.set_fg(Color::Reset);
            cell.set_bg(Color::Reset);
        }
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
    let sep = || Span::styled(" · ", dim);
    let totals = |clients: usize, streams: u64, req: u64, err: u64, in_flight: u64| {
        [
            sep(),
            Span::raw(format!("{clients} clients")),
            sep(),
            Span::raw(format!("{streams} streams")),
            sep(),
            Span::raw(format!("{req} req")),
            sep(),
            Span::styled(format!("{err} err"), if err > 0 { Style::new().fg(Color::Yellow) } else { Style::new() }),
            sep(),
            Span::raw(format!("{in_flight} in flight")),
        ]
    };
    let fleet = &app.fleet;
    match fleet.servers.as_slice() {
        [one] => match &one.model.server {
            Some(s) => {
                let up = one.model.server_now(app.now_ms) - s.started_unix_ms;
                spans.push(Span::styled(s.server_id.clone(), title));
                if roomy {
                    spans.push(Span::styled(format!(" v{}", s.version), dim));
                }
                spans.extend([sep(), Span::raw(format!("up {}", short_duration(up)))]);
                if roomy {
                    if let Some((text, warn)) = link_tuning_summary(&s.link_tuning, true) {
                        spans.extend([
                            sep(),
                            Span::styled(text, if warn { Style::new().fg(Color::Yellow) } else { dim }),
                        ]);
                    }
                }
                if s.draining {
                    spans.extend([
                        sep(),
                        Span::styled("draining", Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
                    ]);
                }
                spans.extend(totals(s.clients as usize, s.streams, s.requests_total, s.errors_total, s.in_flight));
            }
            None => spans.push(Span::styled("no data yet", dim)),
        },
        servers => {
            let (up, n) = (fleet.up(), servers.len());
            let style = match up {
                0 => Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
                _ if up < n => Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
                _ => title,
            };
            spans.push(Span::styled(format!("{up}/{n} servers up"), style));
            // A server draining (SIGTERM, drain_delay) is up but on its way out.
            let draining: Vec<String> = (0..n)
                .filter(|&i| {
                    fleet.get(i).is_some_and(|w| w.is_up() && w.model.server.as_ref().is_some_and(|s| s.draining))
                })
                .map(|i| fleet.label(i).to_string())
                .collect();
            if !draining.is_empty() {
                spans.push(Span::styled(
                    format!(" ({} draining)", draining.join(", ")),
                    Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
                ));
            }
            // Totals of the servers up now: a down server's numbers are from before.
            let live: Vec<_> =
                servers.iter().filter(|w| w.is_up()).filter_map(|w| Some((w, w.model.server.as_ref()?))).collect();
            if live.is_empty() {
                spans.extend([sep(), Span::styled("no data yet", dim)]);
            } else {
                // Every client holds a session to every server: count each client once.
                let clients: BTreeSet<&str> =
                    live.iter().flat_map(|(w, _)| w.model.clients.keys().map(String::as_str)).collect();
                let sum = |f: fn(&tunnel_lib::introspection::ServerInfo) -> u64| live.iter().map(|(_, s)| f(s)).sum();
                spans.extend(totals(
                    clients.len(),
                    sum(|s| s.streams),
                    sum(|s| s.requests_total),
                    sum(|s| s.errors_total),
                    sum(|s| s.in_flight),
                ));
            }
        }
    }
    // The time and the zone the console's times are in, where there is room.
    let now = format!("{} {}", clock(app.utc, app.now_ms), zone(app.utc, app.now_ms));
    let used: usize = spans.iter().map(|s| s.width()).sum();
    if used + 3 + now.chars().count() < usize::from(area.width) {
        spans.extend([sep(), Span::styled(now, dim)]);
    }
    f.render_widget(Paragraph::new(Line::from(spans)), area);
}

/// The width of `spans` on screen.
fn used_by(spans: &[Span]) -> usize {
    spans.iter().map(|s| s.width()).sum()
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
    let sort = Span::styled(format!(" sort: {}", app.sort.label(app.view)), Style::new().fg(Color::DarkGray));
    let filter = (!app.filter.is_empty())
        .then(|| Span::styled(format!("  filter: {}", app.filter), Style::new().fg(Color::Magenta)));
    let fleet = &app.fleet;
    let (right, style) = match fleet.servers.as_slice() {
        [one] => {
            let (dot, style) = match &one.conn {
                ConnState::Live => ("● live", Style::new().fg(Color::Green)),
                ConnState::Connecting => ("○ connecting", Style::new().fg(Color::Yellow)),
                ConnState::Lost(_) => ("✗ lost", Style::new().fg(Color::Red)),
            };
            // The address goes first when the line is short of room: the
            // filter in force matters more, and the banner names a lost server.
            let (sort_w, filter_w) = (sort.width(), filter.as_ref().map_or(0, |f| f.width()));
            let full = format!("  {dot} {} ", one.addr);
            let room = usize::from(area.width).saturating_sub(used_by(&spans));
            if room >= full.chars().count() + sort_w + filter_w {
                (full, style)
            } else {
                (format!("  {dot} "), style)
            }
        }
        servers => {
            let n = servers.len();
            let lost = servers.iter().filter(|w| matches!(w.conn, ConnState::Lost(_))).count();
            if lost > 0 {
                (format!("  ✗ {lost} down · {n} servers "), Style::new().fg(Color::Red))
            } else if fleet.up() < n {
                (format!("  ○ connecting · {n} servers "), Style::new().fg(Color::Yellow))
            } else {
                (format!("  ● live · {n} servers "), Style::new().fg(Color::Green))
            }
        }
    };
    // The filter, then the sort, where they fit whole: a cut "sor" helps nobody.
    let sort_fits = used_by(&spans) + sort.width() + filter.as_ref().map_or(0, |f| f.width()) + right.chars().count()
        <= usize::from(area.width);
    if sort_fits {
        spans.push(sort);
    }
    if let Some(extra) = filter {
        if used_by(&spans) + extra.width() + right.chars().count() <= usize::from(area.width) {
            spans.push(extra);
        }
    }
    let [left_area, right_area] =
        Layout::horizontal([Constraint::Min(0), Constraint::Length(right.chars().count() as u16)]).areas(area);
    f.render_widget(Paragraph::new(Line::from(spans)), left_area);
    f.render_widget(Paragraph::new(Span::styled(right, style)), right_area);
}

fn render_banner(app: &App, f: &mut Frame, area: Rect) {
    let fleet = &app.fleet;
    let lost: Vec<(usize, &str)> = fleet
        .servers
        .iter()
        .enumerate()
        .filter_map(|(i, w)| match &w.conn {
            ConnState::Lost(why) => Some((i, why.as_str())),
            _ => None,
        })
        .collect();
    let text = match (fleet.servers.as_slice(), lost.as_slice()) {
        ([_], [(_, why)]) => format!(" ✗ {why} · retrying · data below is from before"),
        ([one], _) => format!(" connecting to {}…", one.addr),
        // Which server first: on a narrow screen the reason is what gets cut.
        (_, [(i, why)]) => format!(" ✗ {} down, retrying: {why}", fleet.label(*i)),
        (_, []) => {
            let waiting: Vec<&str> = fleet.servers.iter().filter(|w| !w.is_up()).map(|w| w.addr.as_str()).collect();
            format!(" connecting to {}…", waiting.join(", "))
        }
        (_, many) => {
            let names: Vec<&str> = many.iter().map(|(i, _)| fleet.label(*i)).collect();
            format!(" ✗ {} servers down, retrying: {}", many.len(), names.join(", "))
        }
    };
    let style = if lost.is_empty() {
        Style::new().bg(Color::Yellow).fg(Color::Black)
    } else {
        Style::new().bg(Color::Red).fg(Color::White).add_modifier(Modifier::BOLD)
    };
    f.render_widget(Paragraph::new(text).style(style), area);
}

/// The optional columns a table shows at its width.
#[derive(Clone, Copy)]
pub(crate) struct Cols {
    /// Peer, round trip, counts, trace...: from `WIDE` columns (plus room for SERVER).
    wide: bool,
    /// The SERVER column's width, with several servers.
    server: Option<u16>,
}

impl Cols {
    fn new(app: &App, width: u16) -> Cols {
        let fleet = &app.fleet;
        if !fleet.is_fleet() {
            return Cols { wide: width >= WIDE, server: None };
        }
        let (min, narrow_max, wide_max) = SERVER_COL;
        // Only servers that have said something have rows to name; room for
        // the down mark is kept throughout, so the table does not shift when a server goes.
        let longest = (0..fleet.servers.len())
            .filter(|&i| fleet.servers[i].model.server.is_some())
            .map(|i| fleet.label(i).chars().count() + 1)
            .max()
            .unwrap_or(0);
        let want = u16::try_from(longest).unwrap_or(u16::MAX).max(min);
        // The wide columns plus the SERVER column and its spacing.
        let wide = width > WIDE + want.min(wide_max);
        Cols { wide, server: Some(want.min(if wide { wide_max } else { narrow_max })) }
    }

    /// A narrow table with a SERVER column gives up one column to make room for it.
    fn crowded(self) -> bool {
        !self.wide && self.server.is_some()
    }
}

fn render_table(app: &App, f: &mut Frame, area: Rect) {
    use Constraint::{Length as L, Min};
    let rows = app.rows();
    let c = Cols::new(app, area.width);
    let selected = app.selected_index(&rows);
    let mut cols: Vec<(&'static str, Constraint)> = Vec::new();
    if let Some(w) = c.server {
        cols.push(("SERVER", L(w)));
    }
    let body: Vec<Row> = match app.view {
        View::Streams => {
            if c.wide {
                cols.extend([
                    ("STREAM", L(8)),
                    ("TYPE", L(4)),
                    ("CLIENT", Min(10)),
                    ("GROUP", L(10)),
                    ("PEER", L(21)),
                    ("HB AGE", L(6)),
                    ("DELAY", L(6)),
                    ("RTT", L(6)),
                    ("QUEUE", L(11)),
                    ("INFL", L(6)),
                    ("REQS", L(6)),
                    ("↓BYTES", L(9)),
                    ("↑BYTES", L(9)),
                    ("CONFIG", L(8)),
                ]);
            } else {
                cols.extend([("STREAM", L(8)), ("TYPE", L(4)), ("CLIENT", Min(8)), ("GROUP", L(8)), ("HB AGE", L(6))]);
                // The last heartbeat's delay is in the detail pane.
                if !c.crowded() {
                    cols.push(("DELAY", L(6)));
                }
                cols.extend([("QUEUE", L(11)), ("INFL", L(6)), ("CONFIG", L(8))]);
            }
            rows.iter()
                .filter_map(|r| if let RowRef::Stream(i, s) = r { Some(stream_row(app, *i, s, c)) } else { None })
                .collect()
        }
        View::Clients => {
            cols.extend([("CLIENT", Min(10)), ("GROUP", L(10))]);
            // The peer is in the detail pane.
            if c.wide {
                cols.push(("PEER", L(21)));
            }
            cols.extend([("CONNECTED", L(9)), ("VERSION", L(8)), ("STREAMS", L(7)), ("CONFIG", L(8)), ("REQ/S", L(6))]);
            if c.wide {
                cols.extend([("P99", L(7)), ("TREND (5 min)", L(CLIENT_TREND.1)), ("LINK", L(8)), ("SESSION", L(36))]);
            } else if !c.crowded() {
                cols.push(("TREND", L(CLIENT_TREND.0)));
            }
            rows.iter()
                .filter_map(|r| if let RowRef::Client(i, cl) = r { Some(client_row(app, *i, cl, c)) } else { None })
                .collect()
        }
        View::Requests => {
            cols.extend([
                ("TIME", L(8)),
                ("METH", L(6)),
                ("HOST", L(14)),
                ("PATH", Min(10)),
                ("STATUS", L(6)),
                ("DUR", L(6)),
            ]);
            // The byte counts are in the detail pane.
            if !c.crowded() {
                cols.push(("BYTES", L(9)));
            }
            cols.push(("CLIENT", L(10)));
            if c.wide {
                cols.extend([("TRACE", L(32)), ("ERROR", L(24))]);
            }
            rows.iter()
                .filter_map(|r| if let RowRef::Request(i, q) = r { Some(request_row(app, *i, q, c)) } else { None })
                .collect()
        }
        View::Traffic => {
            let (more, body) = traffic::table(app, &rows, c, area.width);
            cols.extend(more);
            body
        }
        View::Events => {
            cols.extend([("TIME", L(8)), ("KIND", L(16)), ("CLIENT", L(14))]);
            // On a narrow terminal what happened gets the room; the rest is in the detail pane.
            if c.wide {
                cols.extend([("GROUP", L(10)), ("STREAM", L(8))]);
            }
            cols.push(("WHAT HAPPENED", Min(20)));
            rows.iter()
                .filter_map(|r| if let RowRef::Event(i, e) = r { Some(event_row(app, *i, e, c)) } else { None })
                .collect()
        }
    };
    let header = Row::new(cols.iter().map(|(name, _)| Cell::from(*name)))
        .style(Style::new().add_modifier(Modifier::BOLD).fg(Color::Cyan));
    let widths: Vec<Constraint> = cols.iter().map(|(_, w)| *w).collect();
    let title = match app.view {
        View::Requests | View::Events => {
            format!(" {} ({}) · times {} ", app.view.title(), rows.len(), zone(app.utc, app.now_ms))
        }
        _ => format!(" {} ({}) ", app.view.title(), rows.len()),
    };
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
        let msg = match (app.filter.is_empty(), app.view) {
            (false, _) => "no rows match the filter",
            (true, View::Traffic) => "no traffic yet",
            (true, _) => "nothing here yet",
        };
        let inner = Rect { y: area.y + 2, height: 1, ..area };
        if area.height > 2 {
            f.render_widget(Paragraph::new(format!("  {msg}")).style(Style::new().fg(Color::DarkGray)), inner);
        }
    }
}

/// The row's cells with the SERVER cell in front when there is one, greyed
/// as a whole when its server is down (`dim` too: a draining stream).
pub(crate) fn finish_row(app: &App, server: usize, c: Cols, cells: Vec<Cell<'static>>, dim: bool) -> Row<'static> {
    let mut all = Vec::with_capacity(cells.len() + 1);
    if c.server.is_some() {
        all.push(server_cell(&app.fleet, server));
    }
    all.extend(cells);
    let row = Row::new(all);
    if dim || is_stale(&app.fleet, server) {
        row.style(Style::new().fg(Color::DarkGray))
    } else {
        row
    }
}

fn stream_row(app: &App, server: usize, s: &StreamInfo, c: Cols) -> Row<'static> {
    let Some(m) = app.fleet.get(server).map(|w| &w.model) else { return Row::default() };
    let stale = is_stale(&app.fleet, server);
    let wide = c.wide;
    let age = m.heartbeat_age_ms(s, app.now_ms);
    let age_cell = tint(Cell::from(short_age(age)), freshness_style(m.freshness(s, app.now_ms)), stale);
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
    if !c.crowded() {
        cells.push(Cell::from(format!("{}ms", s.last_delay_ms)));
    }
    if wide {
        cells.push(Cell::from(if s.last_rtt_ms < 0 { "-".to_string() } else { format!("{}ms", s.last_rtt_ms) }));
    }
    let q = Cell::from(queue_text(s.queue_depth, s.queue_capacity));
    let q = if s.queue_capacity > 0 && s.queue_depth * 4 >= s.queue_capacity * 3 {
        tint(q, Style::new().fg(Color::Yellow), stale)
    } else {
        q
    };
    cells.push(q);
    // Upgraded connections (WebSocket...) are long-lived in-flight exchanges: marked so they read as such.
    cells.push(if s.upgraded > 0 {
        tint(Cell::from(format!("{}^{}", s.in_flight, s.upgraded)), Style::new().fg(Color::Magenta), stale)
    } else {
        Cell::from(s.in_flight.to_string())
    });
    if wide {
        cells.push(Cell::from(s.requests.to_string()));
        cells.push(Cell::from(short_bytes(s.bytes_to_client)));
        cells.push(Cell::from(short_bytes(s.bytes_from_client)));
    }
    cells.push(config_cell(m, &s.client_id, stale));
    finish_row(app, server, c, cells, s.draining)
}

fn client_row(app: &App, server: usize, cl: &ClientInfo, c: Cols) -> Row<'static> {
    let Some(m) = app.fleet.get(server).map(|w| &w.model) else { return Row::default() };
    let since = m.server_now(app.now_ms) - cl.connected_unix_ms;
    let mut cells = vec![Cell::from(cl.client_id.clone()), Cell::from(cl.group.clone())];
    if c.wide {
        cells.push(Cell::from(cl.peer.clone()));
    }
    let series = m.traffic.seconds_of(TrafficSubject::Client, &cl.client_id);
    let now = series.map(|s| crate::traffic::summary(s, crate::app::SUMMARY_SPAN, 1.0)).unwrap_or_default();
    cells.extend([
        Cell::from(short_duration(since)),
        Cell::from(cl.version.clone()),
        Cell::from(cl.streams.to_string()),
        config_cell(m, &cl.client_id, is_stale(&app.fleet, server)),
        Cell::from(short_rate(now.requests_per_s)),
    ]);
    let trend = |w: u16| {
        let text = series.map_or_else(|| " ".repeat(usize::from(w)), |s| traffic::trend_cell(s, w, app.ascii));
        Cell::from(text).style(Style::new().fg(Color::Cyan))
    };
    if c.wide {
        cells.push(Cell::from(if now.p99_us > 0 { short_us(u64::from(now.p99_us)) } else { "-".into() }));
        cells.push(trend(CLIENT_TREND.1));
        cells.push(link_cell(cl));
        cells.push(Cell::from(cl.session_id.clone()));
    } else if !c.crowded() {
        cells.push(trend(CLIENT_TREND.0));
    }
    finish_row(app, server, c, cells, false)
}

/// "✓ 0.06%": whether both ends of the client's link lowered their TCP
/// timers (✓ both, ✗ not both), and the share of bytes resent in the worse
/// direction, yellow from 1% (a lossy path), red from 5%.
fn link_cell(cl: &ClientInfo) -> Cell<'static> {
    let Some(link) = &cl.link else { return Cell::from("-") };
    let state = link_state(link.server_options.as_ref(), cl.client_link_options.as_ref());
    let loss = link_loss(link);
    let style = match loss.unwrap_or(0.0) {
        s if s >= 0.05 => Style::new().fg(Color::Red),
        s if s >= 0.01 => Style::new().fg(Color::Yellow),
        _ if state != "tuned" => Style::new().fg(Color::Yellow),
        _ => Style::new(),
    };
    let mark = if state == "tuned" { "✓" } else { "✗" };
    Cell::from(format!("{mark} {}", share_text(loss))).style(style)
}

/// The detail pane's lines for a link: each direction's counts, and each
/// end's options.
fn link_lines(link: Option<&LinkInfo>, client_options: Option<&LinkOptions>) -> [Line<'static>; 3] {
    let counts = |c: Option<&LinkCounters>| c.map_or("-".into(), link_counts);
    [
        kv("server→", counts(link.and_then(|l| l.server.as_ref()))),
        kv("client→", counts(link.and_then(|l| l.client.as_ref()))),
        kv(
            "tcp opts",
            format!(
                "{}; server: {}; client: {}",
                link_state(link.and_then(|l| l.server_options.as_ref()), client_options),
                link.and_then(|l| l.server_options.as_ref()).map_or("-".into(), link_options_text),
                client_options.map_or("-".into(), link_options_text)
            ),
        ),
    ]
}

fn request_row(app: &App, server: usize, r: &RequestInfo, c: Cols) -> Row<'static> {
    let status_style = match r.status {
        500.. => Style::new().fg(Color::Red),
        400..=499 => Style::new().fg(Color::Yellow),
        _ => Style::new().fg(Color::Green),
    };
    let mut cells = vec![
        Cell::from(clock(app.utc, r.unix_ms)),
        Cell::from(r.method.clone()),
        Cell::from(r.host.clone()),
        Cell::from(if r.upgrade.is_empty() { r.path.clone() } else { format!("{} [{}]", r.path, r.upgrade) }),
        tint(Cell::from(r.status.to_string()), status_style, is_stale(&app.fleet, server)),
        Cell::from(short_duration(r.duration_ms as i64)),
    ];
    if !c.crowded() {
        cells.push(Cell::from(short_bytes(r.bytes_out)));
    }
    cells.push(Cell::from(r.client_id.clone()));
    if c.wide {
        cells.push(Cell::from(r.trace_id.clone()));
        cells.push(Cell::from(r.error.clone()));
    }
    finish_row(app, server, c, cells, false)
}

fn event_row(app: &App, server: usize, e: &Event, c: Cols) -> Row<'static> {
    let style = match EventKind::try_from(e.kind) {
        Ok(EventKind::Reaped | EventKind::ReloadRefused | EventKind::Revoked) => Style::new().fg(Color::Red),
        Ok(EventKind::Disconnected | EventKind::Draining | EventKind::ClosedFromConsole) => {
            Style::new().fg(Color::Yellow)
        }
        Ok(EventKind::Connected | EventKind::Reconnected) => Style::new().fg(Color::Green),
        _ => Style::new(),
    };
    let mut cells = vec![
        Cell::from(clock(app.utc, e.unix_ms)),
        tint(Cell::from(event_kind_name(e.kind)), style, is_stale(&app.fleet, server)),
        Cell::from(e.client_id.clone()),
    ];
    if c.wide {
        cells.push(Cell::from(e.group.clone()));
        cells.push(Cell::from(short_id(&e.stream_id).to_string()));
    }
    cells.push(Cell::from(e.detail.clone()));
    finish_row(app, server, c, cells, false)
}

fn kv(k: &str, v: impl Into<String>) -> Line<'static> {
    Line::from(vec![Span::styled(format!("{k:>10}: "), Style::new().fg(Color::Cyan)), Span::raw(v.into())])
}

/// "edge-2 at 127.0.0.1:7101, down: why": which server the selected row is from, and how its link stands.
fn server_line(fleet: &Fleet, i: usize) -> Line<'static> {
    let Some(w) = fleet.get(i) else { return kv("server", "?") };
    let state = match &w.conn {
        ConnState::Live => String::new(),
        ConnState::Connecting => ", connecting".into(),
        ConnState::Lost(why) => format!(", down: {why} (this row is from before)"),
    };
    let at = if fleet.label(i) == w.addr { String::new() } else { format!(" at {}", w.addr) };
    kv("server", format!("{}{at}{state}", fleet.label(i)))
}

/// "▁▁▂▁█▁ last 6, newest right (max 12ms)": the stream's last heartbeats' delays.
fn delay_history(s: &StreamInfo, ascii: bool) -> String {
    let h = &s.delay_history_ms;
    if h.is_empty() {
        return "none yet".into();
    }
    let values: Vec<u64> = h.iter().map(|&d| d.max(0) as u64).collect();
    let max = h.iter().copied().max().unwrap_or(0);
    format!("{} last {}, newest right (max {max}ms)", crate::traffic::sparkline_text(&values, ascii), h.len())
}

fn render_detail(app: &App, f: &mut Frame, area: Rect) {
    let row = app.selected_row();
    let Some(m) = app.fleet.get(row.as_ref().map_or(0, |r| r.server())).map(|w| &w.model) else { return };
    let mut lines: Vec<Line> = match row {
        None => vec![Line::from("nothing selected")],
        Some(RowRef::Stream(_, s)) => {
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
                kv("hb delays", delay_history(s, app.ascii)),
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
            .into_iter()
            .chain(link_lines(s.link.as_ref(), s.client_link_options.as_ref()))
            .collect()
        }
        Some(RowRef::Client(_, c)) => vec![
            kv("client", format!("{} (version {})", c.client_id, c.version)),
            kv("group", c.group.clone()),
            kv("peer", c.peer.clone()),
            kv("connected", format!("{} ago", short_duration(m.server_now(app.now_ms) - c.connected_unix_ms))),
            kv("streams", c.streams.to_string()),
            kv("config", format!("acked {}, current {}", c.config_version_acked, c.config_version_current)),
            kv("session", c.session_id.clone()),
        ]
        .into_iter()
        .chain(link_lines(c.link.as_ref(), c.client_link_options.as_ref()))
        .collect(),
        // The Traffic view draws charts instead.
        Some(RowRef::Subject(..)) => Vec::new(),
        Some(RowRef::Event(_, e)) => vec![
            kv("time", format!("{} {}", timestamp(app.utc, e.unix_ms), zone(app.utc, e.unix_ms))),
            kv("event", event_kind_name(e.kind)),
            kv("client", if e.client_id.is_empty() { "-".into() } else { e.client_id.clone() }),
            kv("group", if e.group.is_empty() { "-".into() } else { e.group.clone() }),
            kv("stream", if e.stream_id.is_empty() { "-".into() } else { e.stream_id.clone() }),
            kv("detail", e.detail.clone()),
        ],
        Some(RowRef::Request(i, r)) => inspect::request_lines(app, i, r),
    };
    if let Some(r) = app.selected_row().filter(|_| app.fleet.is_fleet()) {
        lines.insert(0, server_line(&app.fleet, r.server()));
    }
    let title = if app.view == View::Requests {
        " Request (Enter/Esc close · PgUp/PgDn scroll · p replay · y curl) "
    } else {
        " Detail (Enter/Esc to close) "
    };
    let block = Block::new().borders(Borders::TOP).title(title);
    f.render_widget(Paragraph::new(lines).block(block).wrap(Wrap { trim: false }).scroll((app.scroll, 0)), area);
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
            vec![("↑↓", "move", 3), ("Tab", "view", 4), ("/", "filter", 1), ("s", "sort", 0)];
        // The Traffic view's charts are always there: no detail pane to open.
        if app.view != View::Traffic {
            keys.push(("⏎", "detail", 2));
        }
        match app.view {
            View::Streams => keys.extend([("r", "resync", 5), ("x", "close", 5), ("X", "close client", 5)]),
            View::Clients => keys.extend([("r", "resync", 5), ("R", "group", 5), ("X", "close", 5)]),
            View::Requests => keys.extend([("p", "replay", 5), ("y", "curl", 5)]),
            View::Traffic | View::Events => {}
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

fn render_confirm(app: &App, c: &Confirm, f: &mut Frame) {
    let fleet = &app.fleet;
    // With several servers the question names the one it goes to, on a line of its own.
    let on = |i: usize| if fleet.is_fleet() { format!("\non server {}", fleet.label(i)) } else { String::new() };
    let text = match c {
        Confirm::CloseStream { server, stream_id, client_id } => format!(
            "Close stream {} of {client_id}{}?\nThe client will open a replacement.",
            short_id(stream_id),
            on(*server)
        ),
        Confirm::CloseClient { server, client_id } => {
            format!("Close every stream of {client_id}{}?\nIt will reconnect.", on(*server))
        }
    };
    let area = centered(f.area(), 48, 6 + u16::from(fleet.is_fleet()));
    f.render_widget(Clear, area);
    let block = Block::bordered().title(" Confirm ").border_style(Style::new().fg(Color::Yellow));
    let body = format!("{text}\n  y yes   n no");
    f.render_widget(Paragraph::new(body).block(block).wrap(Wrap { trim: false }), area);
}

/// The key reference shown by `?`.
pub const HELP: &[(&str, &str)] = &[
    ("↑ ↓  j k", "move the selection"),
    ("g G", "first / last row"),
    ("Tab ← →", "next / previous view (Streams ... Events)"),
    ("/", "filter rows (Enter keeps, Esc clears); requests also by"),
    ("", "status:5xx host: path: client: slower:250ms"),
    ("s", "cycle the sort order"),
    ("Enter", "show / hide the detail pane"),
    ("r", "force a config resync of the selected client"),
    ("R", "force a resync of its whole group"),
    ("x", "close the selected stream (asks y/n)"),
    ("X", "close every stream of the client (asks y/n)"),
    ("p / P", "replay the request (P: even if not idempotent)"),
    ("y", "copy a curl line for the request (OSC 52)"),
    ("PgUp PgDn", "scroll the detail pane"),
    ("Esc", "close the detail pane, clear the filter"),
    ("q  Ctrl-C", "quit"),
];

fn render_help(app: &App, f: &mut Frame) {
    let fleet = app.fleet.is_fleet();
    let area = centered(f.area(), 62, HELP.len() as u16 + 5 + u16::from(fleet));
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
    if fleet {
        let note = " SERVER ✗edge-2: down; its rows are greyed, from before";
        lines.push(Line::from(Span::styled(note, Style::new().fg(Color::DarkGray))));
    }
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Keys (any key closes) ")), area);
}

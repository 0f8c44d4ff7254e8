//! The Traffic view: a table of subjects (the server, groups, clients,
//! rules) with their figures now and a trend, and charts of the selected
//! one over the last five minutes (and the last hour on a tall terminal).

use super::{finish_row, is_stale, Cols};
use crate::app::{App, RowRef, SUMMARY_SPAN};
use crate::model::{short_bytes, Watched};
use crate::traffic::{columns, sparkline_text, subject_name, summary, Key, Metric, Series};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Style};
use ratatui::symbols::bar;
use ratatui::text::{Line, Span};
use ratatui::widgets::RenderDirection;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Sparkline};
use ratatui::Frame;
use tunnel_lib::introspection::TrafficSubject;
use tunnel_lib::traffic::{MINUTES, SECONDS};

/// Terminal height from which the charts add the last hour.
const TALL: u16 = 40;

/// "850µs", "4.2ms", "1.3s".
pub fn short_us(us: u64) -> String {
    if us < 1000 {
        format!("{us}µs")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.1}s", us as f64 / 1e6)
    }
}

/// "12.5%", "0%", "-" with nothing to divide.
fn percent(ratio: f64, any: bool) -> String {
    if !any {
        "-".into()
    } else if ratio == 0.0 {
        "0%".into()
    } else if ratio < 0.1 {
        format!("{:.1}%", ratio * 100.0)
    } else {
        format!("{:.0}%", ratio * 100.0)
    }
}

/// "1.2k", "35", "0.4": requests a second in a narrow column.
pub fn short_rate(r: f64) -> String {
    if r >= 10_000.0 {
        format!("{:.0}k", r / 1000.0)
    } else if r >= 1000.0 {
        format!("{:.1}k", r / 1000.0)
    } else if r >= 10.0 || r == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r:.1}")
    }
}

/// A trend cell: the last five minutes of requests a second in `width` characters.
pub fn trend_cell(s: &Series, width: u16, ascii: bool) -> String {
    let mut v = columns(s, SECONDS, usize::from(width), Metric::Requests, 1.0);
    v.reverse();
    let text = sparkline_text(&v, ascii);
    format!("{text:>w$}", w = usize::from(width))
}

/// The columns and rows of the Traffic view's table.
pub fn table(
    app: &App,
    rows: &[RowRef<'_>],
    c: Cols,
    width: u16,
) -> (Vec<(&'static str, Constraint)>, Vec<Row<'static>>) {
    use Constraint::{Length as L, Min};
    let mut cols =
        vec![("SUBJECT", L(7)), ("NAME", Min(12)), ("REQ/S", L(6)), ("4XX", L(5)), ("ERR", L(5)), ("P99", L(7))];
    if c.wide {
        cols.extend([("IN/S", L(10)), ("OUT/S", L(10)), ("INFL", L(5))]);
    }
    let fixed: u16 = cols.iter().map(|(_, w)| if let L(n) = w { *n + 1 } else { 13 }).sum::<u16>()
        + c.server.map_or(0, |w| w + 1)
        + 2;
    // NAME keeps room for a rule such as "app.example.com/api".
    let trend = width.saturating_sub(fixed + 8).clamp(8, 60);
    cols.push(("TREND (5 min)", L(trend)));
    let body = rows
        .iter()
        .filter_map(|r| match r {
            RowRef::Subject(i, (subject, name), s) => Some(subject_row(app, *i, *subject, name, s, c, trend)),
            _ => None,
        })
        .collect();
    (cols, body)
}

fn subject_row(
    app: &App,
    server: usize,
    subject: TrafficSubject,
    name: &str,
    s: &Series,
    c: Cols,
    trend: u16,
) -> Row<'static> {
    let now = summary(s, SUMMARY_SPAN, 1.0);
    let any = now.requests_per_s > 0.0;
    let stale = is_stale(&app.fleet, server);
    let warn = |ratio: f64, bad: f64| {
        if stale || ratio == 0.0 {
            Style::new()
        } else if ratio >= bad {
            Style::new().fg(Color::Red)
        } else {
            Style::new().fg(Color::Yellow)
        }
    };
    let shown = if subject == TrafficSubject::Server { app.fleet.label(server).to_string() } else { name.to_string() };
    let mut cells = vec![
        Cell::from(subject_name(subject)),
        Cell::from(shown),
        Cell::from(short_rate(now.requests_per_s)),
        Cell::from(percent(now.ratio_4xx, any)).style(warn(now.ratio_4xx, 0.5)),
        Cell::from(percent(now.ratio_errors, any)).style(warn(now.ratio_errors, 0.05)),
        Cell::from(if any { short_us(u64::from(now.p99_us)) } else { "-".into() }),
    ];
    if c.wide {
        cells.push(Cell::from(format!("{}/s", short_bytes(now.bytes_in_per_s as u64))));
        cells.push(Cell::from(format!("{}/s", short_bytes(now.bytes_out_per_s as u64))));
        cells.push(Cell::from(now.in_flight.to_string()));
    }
    cells.push(Cell::from(trend_cell(s, trend, app.ascii)).style(Style::new().fg(Color::Cyan)));
    finish_row(app, server, c, cells, false)
}

/// The bars of a chart, Unicode or ASCII.
fn bars(ascii: bool) -> bar::Set<'static> {
    if ascii {
        bar::Set {
            full: "@",
            seven_eighths: "#",
            three_quarters: "*",
            five_eighths: "+",
            half: "=",
            three_eighths: "-",
            one_quarter: ":",
            one_eighth: ".",
            empty: " ",
        }
    } else {
        bar::NINE_LEVELS
    }
}

/// One line of a chart: its label, the metric over the window, a colour.
struct Trace {
    label: &'static str,
    metric: Metric,
    color: Color,
}

/// A chart panel: a title and one or two traces sharing a scale.
struct Panel {
    title: &'static str,
    traces: &'static [Trace],
    /// How a value shows in the title.
    fmt: fn(u64) -> String,
}

const PANELS: [Panel; 5] = [
    Panel {
        title: "requests/s",
        traces: &[Trace { label: "", metric: Metric::Requests, color: Color::Cyan }],
        fmt: |v| short_rate(v as f64 / 1000.0),
    },
    Panel {
        title: "errors",
        traces: &[
            Trace { label: "5xx", metric: Metric::RatioErrors, color: Color::Red },
            Trace { label: "4xx", metric: Metric::Ratio4xx, color: Color::Yellow },
        ],
        fmt: |v| format!("{:.1}%", v as f64 / 10.0),
    },
    Panel {
        title: "latency",
        traces: &[
            Trace { label: "p99", metric: Metric::P99, color: Color::Magenta },
            Trace { label: "p50", metric: Metric::P50, color: Color::Blue },
        ],
        fmt: short_us,
    },
    Panel {
        title: "bytes/s",
        traces: &[
            Trace { label: "out", metric: Metric::BytesOut, color: Color::Green },
            Trace { label: "in", metric: Metric::BytesIn, color: Color::Cyan },
        ],
        fmt: |v| short_bytes(v / 1000),
    },
    Panel {
        title: "in flight",
        traces: &[Trace { label: "", metric: Metric::InFlight, color: Color::White }],
        fmt: |v| v.to_string(),
    },
];

/// The subject the charts show: the selected row's, or the first server's.
fn charted<'a>(app: &'a App, row: Option<RowRef<'a>>) -> Option<(usize, Key, &'a Watched)> {
    match row {
        Some(RowRef::Subject(i, k, _)) => Some((i, k.clone(), app.fleet.get(i)?)),
        _ => Some((0, (TrafficSubject::Server, String::new()), app.fleet.get(0)?)),
    }
}

/// Charts of the selected subject.
pub fn render_charts(app: &App, row: Option<RowRef<'_>>, f: &mut Frame, area: Rect) {
    let Some((i, (subject, name), w)) = charted(app, row) else { return };
    let who = match subject {
        TrafficSubject::Server => format!("server {}", app.fleet.label(i)),
        s => format!("{} {name}", subject_name(s)),
    };
    let block = Block::new().borders(Borders::TOP).title(format!(" {who} · last 5 minutes "));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(seconds) = w.model.traffic.seconds_of(subject, &name) else {
        f.render_widget(
            Paragraph::new("  no traffic in the last 5 minutes").style(Style::new().fg(Color::DarkGray)),
            inner,
        );
        return;
    };
    let minutes = w.model.traffic.minutes_of(subject, &name).filter(|_| f.area().height >= TALL);
    let (now_area, hour_area) = match minutes {
        Some(_) => {
            let [a, b] = Layout::vertical([Constraint::Fill(3), Constraint::Fill(1)]).areas(inner);
            (a, Some(b))
        }
        None => (inner, None),
    };
    // Two panels a row where there is room, one a row on a narrow terminal.
    let per_row = if now_area.width >= 70 { 2 } else { 1 };
    let panels: Vec<&Panel> = PANELS.iter().collect();
    let rows = panels.len().div_ceil(per_row);
    let row_areas = Layout::vertical(vec![Constraint::Fill(1); rows]).split(now_area);
    for (r, chunk) in panels.chunks(per_row).enumerate() {
        let cells = Layout::horizontal(vec![Constraint::Fill(1); per_row]).spacing(1).split(row_areas[r]);
        for (p, cell) in chunk.iter().zip(cells.iter()) {
            render_panel(app, p, seconds, SECONDS, 1.0, "", f, *cell);
        }
    }
    if let (Some(area), Some(m)) = (hour_area, minutes) {
        let cells = Layout::horizontal([Constraint::Fill(1), Constraint::Fill(1)]).spacing(1).split(area);
        render_panel(app, &PANELS[0], m, MINUTES, 60.0, ", last hour", f, cells[0]);
        render_panel(app, &PANELS[1], m, MINUTES, 60.0, ", last hour", f, cells[1]);
    }
}

#[allow(clippy::too_many_arguments)]
fn render_panel(app: &App, p: &Panel, s: &Series, window: usize, step_s: f64, span: &str, f: &mut Frame, area: Rect) {
    if area.height < 2 || area.width < 10 {
        return;
    }
    let [title_area, chart] = Layout::vertical([Constraint::Length(1), Constraint::Min(1)]).areas(area);
    let label_w: u16 = if p.traces.len() > 1 { 4 } else { 0 };
    let width = usize::from(chart.width.saturating_sub(label_w));
    let data: Vec<Vec<u64>> = p.traces.iter().map(|t| columns(s, window, width, t.metric, step_s)).collect();
    // The title: what, and the newest column's value of each trace; with
    // one trace, the top of its scale too.
    let mut spans = vec![Span::styled(p.title, Style::new().fg(Color::Cyan))];
    for (t, d) in p.traces.iter().zip(&data) {
        let now = d.first().copied().unwrap_or(0);
        let label = if t.label.is_empty() { String::new() } else { format!("{} ", t.label) };
        spans.push(Span::raw(format!("  {label}")));
        spans.push(Span::styled((p.fmt)(now), Style::new().fg(t.color)));
    }
    if let [only] = data.as_slice() {
        let max = only.iter().copied().max().unwrap_or(0);
        spans.push(Span::styled(format!("  max {}", (p.fmt)(max)), Style::new().fg(Color::DarkGray)));
    }
    spans.push(Span::styled(span.to_string(), Style::new().fg(Color::DarkGray)));
    f.render_widget(Paragraph::new(Line::from(spans)), title_area);
    let heights: Vec<Constraint> = vec![Constraint::Fill(1); p.traces.len()];
    let lanes = Layout::vertical(heights).split(chart);
    for ((t, d), lane) in p.traces.iter().zip(&data).zip(lanes.iter()) {
        let [label, spark] = Layout::horizontal([Constraint::Length(label_w), Constraint::Min(1)]).areas(*lane);
        if label_w > 0 {
            f.render_widget(Paragraph::new(t.label).style(Style::new().fg(t.color)), label);
        }
        // Each lane on its own scale: a p50 would not show beside a p99 spike.
        let max = d.iter().copied().max().unwrap_or(0).max(1);
        let sparkline = Sparkline::default()
            .data(d.iter().copied())
            .max(max)
            .direction(RenderDirection::RightToLeft)
            .bar_set(bars(app.ascii))
            .style(Style::new().fg(t.color));
        f.render_widget(sparkline, spark);
    }
}

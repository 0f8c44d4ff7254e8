//! The Requests view's detail pane: the request inspector. Its heads in
//! full (secrets masked by the server), timings, kept bodies, the last
//! replay beside the original, and the curl line of `y`.

use super::kv;
use crate::app::{App, Fetched};
use crate::inspect::{body_lines, diff, header, response_lines, Diff};
use crate::model::{short_bytes, short_duration};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use tunnel_lib::introspection::{Header, RequestInfo};

fn section(title: &str) -> Line<'static> {
    Line::from(Span::styled(format!("── {title} "), Style::new().fg(Color::Cyan).add_modifier(Modifier::BOLD)))
}

fn header_lines(headers: &[Header]) -> Vec<Line<'static>> {
    if headers.is_empty() {
        return vec![Line::from(Span::styled("  (none)", Style::new().fg(Color::DarkGray)))];
    }
    headers
        .iter()
        .map(|h| {
            let value = if h.masked {
                Span::styled(h.value.clone(), Style::new().fg(Color::DarkGray))
            } else {
                Span::raw(h.value.clone())
            };
            Line::from(vec![Span::styled(format!("  {}: ", h.name), Style::new().fg(Color::Cyan)), value])
        })
        .collect()
}

/// "1.2ms": microseconds for a timing line; "-" when not reached.
fn at(us: i64) -> String {
    if us <= 0 {
        "-".into()
    } else {
        crate::ui::short_us(us as u64)
    }
}

/// The inspector's lines for request `r` of server `server`.
pub fn request_lines(app: &App, server: usize, r: &RequestInfo) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let uri = r.head.as_ref().map_or(r.path.clone(), |h| h.uri.clone());
    let version = r.head.as_ref().map_or(String::new(), |h| format!(" {} ({})", h.version, h.scheme));
    lines.push(kv("request", format!("{} {}{uri}{version}", r.method, r.host)));
    let mut status = format!("{} in {}", r.status, short_duration(r.duration_ms as i64));
    if !r.upgrade.is_empty() {
        status.push_str(&format!(", upgraded to {} (connection closed)", r.upgrade));
    }
    lines.push(kv("status", status));
    if !r.refused.is_empty() {
        lines.push(kv("refused", format!("by the rule's {} check, before any client", r.refused)));
    }
    if !r.error.is_empty() {
        lines.push(Line::from(vec![
            Span::styled(format!("{:>10}: ", "error"), Style::new().fg(Color::Cyan)),
            Span::styled(r.error.clone(), Style::new().fg(Color::Red)),
        ]));
    }
    let from = if r.remote_addr.is_empty() { String::new() } else { format!(" · from {}", r.remote_addr) };
    lines.push(kv("bytes", format!("{} in, {} out{from}", short_bytes(r.bytes_in), short_bytes(r.bytes_out))));
    let rule = if r.rule.is_empty() { "no rule".to_string() } else { format!("rule {} → group {}", r.rule, r.group) };
    lines.push(kv("via", format!("{rule}, client {} stream {}", r.client_id, crate::model::short_id(&r.stream_id))));
    lines.push(kv("ids", format!("trace {} · request {}", r.trace_id, r.request_id)));

    if !r.replay_of.is_empty() {
        lines.push(kv("replay of", r.replay_of.clone()));
    }
    let Some(head) = &r.head else {
        lines.push(kv("head", "not kept (the server keeps the last 256 requests' heads)"));
        return lines;
    };
    lines.push(kv(
        "timings",
        format!(
            "routed {} · sent to client {} · response head {} · end {}",
            at(head.routed_us),
            at(head.sent_us),
            at(head.response_us),
            at(head.end_us)
        ),
    ));
    // What the operator just asked for first: the replay's outcome, the curl line.
    if let Some(c) = &app.curl {
        lines.push(section("curl (y)"));
        lines.push(Line::from(c.clone()));
    }
    if let Some(rs) = app.replay.as_ref().filter(|rs| rs.server == server && rs.request_id == r.request_id) {
        lines.push(section("replay (p)"));
        match &rs.outcome {
            Fetched::Pending => lines.push(Line::from("  replaying…")),
            Fetched::Failed(why) => {
                lines.push(Line::from(Span::styled(format!("  {why}"), Style::new().fg(Color::Yellow))))
            }
            Fetched::Got(c) => {
                let new = c.request.clone().unwrap_or_default();
                lines.push(Line::from(format!(
                    "  status {} → {}, {} → {}, request {}",
                    r.status,
                    new.status,
                    short_duration(r.duration_ms as i64),
                    short_duration(new.duration_ms as i64),
                    new.request_id
                )));
                for d in diff(&response_lines(r), &response_lines(&new)) {
                    lines.push(match d {
                        Diff::Same(l) => Line::from(format!("    {l}")),
                        Diff::Gone(l) => Line::from(Span::styled(format!("  - {l}"), Style::new().fg(Color::Red))),
                        Diff::New(l) => Line::from(Span::styled(format!("  + {l}"), Style::new().fg(Color::Green))),
                    });
                }
            }
        }
    }
    lines.push(section("request headers"));
    lines.extend(header_lines(&head.request_headers));
    lines.push(section("response headers"));
    lines.extend(header_lines(&head.response_headers));
    if head.bodies {
        match app.capture(server, &r.request_id) {
            Some(Fetched::Got(c)) => {
                let ct = |h: &[Header]| header(h, "content-type").map(str::to_string);
                lines.push(section(&format!("request body ({})", short_bytes(c.request_body_size))));
                for l in body_lines(&c.request_body, c.request_body_size, ct(&head.request_headers).as_deref()) {
                    lines.push(Line::from(format!("  {l}")));
                }
                lines.push(section(&format!("response body ({})", short_bytes(c.response_body_size))));
                for l in body_lines(&c.response_body, c.response_body_size, ct(&head.response_headers).as_deref()) {
                    lines.push(Line::from(format!("  {l}")));
                }
            }
            Some(Fetched::Failed(why)) => lines.push(kv("bodies", format!("not available: {why}"))),
            _ => lines.push(kv("bodies", "fetching…")),
        }
    } else {
        lines.push(kv("bodies", "not kept: its rule has no capture_bodies"));
    }
    lines
}

//! `--once`: one plain-text (or JSON) snapshot, for scripts and a quick look
//! over SSH. With several servers, one merged table with a SERVER column, and
//! JSON keyed by each server's address as given.

use crate::model::{short_age, short_duration, ConnState, Fleet, Model};
use crate::ui::stream_type_name;
use serde_json::{json, Map, Value};
use tunnel_lib::introspection::ServerInfo;

/// What `--once` prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// JSON instead of text.
    pub json: bool,
    /// The events timeline instead of the streams (text).
    pub events: bool,
    /// Times in UTC rather than the local zone.
    pub utc: bool,
}

/// The events timeline as text, oldest first: a header naming the zone,
/// then a line per event (with several servers, a SERVER column and the
/// servers' events merged by time).
pub fn events_text(fleet: &Fleet, utc: bool) -> String {
    let mut events: Vec<(usize, &tunnel_lib::introspection::Event)> =
        fleet.servers.iter().enumerate().flat_map(|(i, w)| w.model.events.iter().map(move |e| (i, e))).collect();
    events.sort_by_key(|(i, e)| (e.unix_ms, *i, e.seq));
    let zone = crate::ui::zone(utc, events.last().map_or(0, |(_, e)| e.unix_ms));
    let server = fleet.is_fleet();
    let width = (0..fleet.servers.len()).map(|i| fleet.label(i).chars().count()).max().unwrap_or(0).max(6);
    let mut out = String::new();
    if server {
        out.push_str(&format!("{:<width$}  ", "SERVER"));
    }
    out.push_str(&format!(
        "{:<23}  {:<16}  {:<16}  {:<10}  WHAT HAPPENED\n",
        format!("TIME ({zone})"),
        "KIND",
        "CLIENT",
        "GROUP"
    ));
    for (i, e) in events {
        if server {
            out.push_str(&format!("{:<width$}  ", fleet.label(i)));
        }
        let dash = |s: &str| if s.is_empty() { "-".to_string() } else { printable(s) };
        out.push_str(&format!(
            "{:<23}  {:<16}  {:<16}  {:<10}  {}\n",
            crate::ui::timestamp(utc, e.unix_ms),
            crate::app::event_kind_name(e.kind),
            dash(&e.client_id),
            dash(&e.group),
            printable(&e.detail)
        ));
    }
    out
}

/// `s` with control characters shown as `\u{..}` escapes: what a client
/// sent (a drain reason, an id) must not drive the operator's terminal.
fn printable(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { c.escape_unicode().to_string() } else { c.to_string() }).collect()
}

/// The snapshot as text: with one server, a header line then one line per
/// stream; with several, a count of servers up, a line per server (the
/// reason for one that did not answer) and the streams of all with a SERVER
/// column.
pub fn text(fleet: &Fleet, now_ms: i64) -> String {
    match fleet.servers.as_slice() {
        [one] => model_text(&one.model, now_ms),
        _ => fleet_text(fleet, now_ms),
    }
}

/// The snapshot as JSON: one server's as an object; several keyed by address
/// as given, a server that did not answer as `{"error": reason}`.
pub fn json(fleet: &Fleet, now_ms: i64) -> Value {
    match fleet.servers.as_slice() {
        [one] => model_json(&one.model, now_ms),
        _ => {
            let mut by_addr = Map::new();
            for w in &fleet.servers {
                let v = match &w.conn {
                    ConnState::Live => model_json(&w.model, now_ms),
                    ConnState::Lost(why) => json!({ "error": why }),
                    ConnState::Connecting => json!({ "error": "no answer" }),
                };
                by_addr.insert(w.addr.clone(), v);
            }
            Value::Object(by_addr)
        }
    }
}

fn server_line(s: &ServerInfo, m: &Model, now_ms: i64) -> String {
    format!(
        "server {} v{} up {}  clients {}  streams {}  requests {}  errors {}  in-flight {}  http {}  grpc {}",
        s.server_id,
        s.version,
        short_duration(m.server_now(now_ms) - s.started_unix_ms),
        s.clients,
        s.streams,
        s.requests_total,
        s.errors_total,
        s.in_flight,
        s.http_listen,
        s.grpc_listen,
    ) + &crate::model::link_tuning_summary(&s.link_tuning, false).map_or(String::new(), |(t, _)| format!("  {t}"))
        + if s.draining { "  DRAINING" } else { "" }
}

fn fleet_text(fleet: &Fleet, now_ms: i64) -> String {
    let mut out = format!("servers {}/{} up\n", fleet.up(), fleet.servers.len());
    for w in &fleet.servers {
        match (&w.conn, &w.model.server) {
            (ConnState::Live, Some(s)) => {
                out.push_str(&format!("{}  at {}\n", server_line(s, &w.model, now_ms), w.addr));
            }
            (ConnState::Lost(why), _) => out.push_str(&format!("server {} down: {why}\n", w.addr)),
            _ => out.push_str(&format!("server {} down: no answer\n", w.addr)),
        }
    }
    let width = (0..fleet.servers.len()).map(|i| fleet.label(i).chars().count()).max().unwrap_or(0).max(6);
    out.push_str(&format!(
        "{:<width$}  {:<36}  {:<4}  {:<16}  {:<10}  {:>7}  {:>9}  {:>4}  CONFIG (ACKED/CURRENT)\n",
        "SERVER", "STREAM", "TYPE", "CLIENT", "GROUP", "HB_AGE", "QUEUE", "INFL"
    ));
    let mut streams: Vec<_> = fleet
        .servers
        .iter()
        .enumerate()
        .filter(|(_, w)| w.is_up())
        .flat_map(|(i, w)| w.model.streams.values().map(move |s| (i, &w.model, s)))
        .collect();
    streams.sort_by(|(i, _, a), (j, _, b)| {
        (&a.client_id, i, a.stream_type, &a.stream_id).cmp(&(&b.client_id, j, b.stream_type, &b.stream_id))
    });
    for (i, m, s) in streams {
        out.push_str(&format!("{:<width$}  {}", fleet.label(i), stream_line(m, s, now_ms)));
    }
    out
}

fn stream_line(m: &Model, s: &tunnel_lib::introspection::StreamInfo, now_ms: i64) -> String {
    let (acked, current) = m.config_of(&s.client_id).unwrap_or(("", ""));
    format!(
        "{:<36}  {:<4}  {:<16}  {:<10}  {:>7}  {:>9}  {:>4}  {}/{}\n",
        s.stream_id,
        stream_type_name(s.stream_type),
        s.client_id,
        s.group,
        short_age(m.heartbeat_age_ms(s, now_ms)),
        format!("{}/{}", s.queue_depth, s.queue_capacity),
        s.in_flight,
        if acked.is_empty() { "-" } else { acked },
        if current.is_empty() { "-" } else { current },
    )
}

fn model_text(m: &Model, now_ms: i64) -> String {
    let mut out = String::new();
    if let Some(s) = &m.server {
        out.push_str(&server_line(s, m, now_ms));
        out.push('\n');
    }
    out.push_str(&format!(
        "{:<36}  {:<4}  {:<16}  {:<10}  {:>7}  {:>9}  {:>4}  CONFIG (ACKED/CURRENT)\n",
        "STREAM", "TYPE", "CLIENT", "GROUP", "HB_AGE", "QUEUE", "INFL"
    ));
    let mut streams: Vec<_> = m.streams.values().collect();
    streams
        .sort_by(|a, b| (&a.client_id, a.stream_type, &a.stream_id).cmp(&(&b.client_id, b.stream_type, &b.stream_id)));
    for s in streams {
        out.push_str(&stream_line(m, s, now_ms));
    }
    out
}

/// One server's snapshot as JSON.
fn model_json(m: &Model, now_ms: i64) -> Value {
    let server = m.server.as_ref().map(|s| {
        json!({
            "server_id": s.server_id,
            "version": s.version,
            "draining": s.draining,
            "uptime_ms": m.server_now(now_ms) - s.started_unix_ms,
            "http_listen": s.http_listen,
            "grpc_listen": s.grpc_listen,
            "admin_listen": s.admin_listen,
            "clients": s.clients,
            "streams": s.streams,
            "requests_total": s.requests_total,
            "errors_total": s.errors_total,
            "in_flight": s.in_flight,
            "config_push": s.config_push,
            "streams_reaped": s.streams_reaped,
            "exchanges_idle_closed": s.exchanges_idle_closed,
            "groups": s.groups.iter().map(|g| json!({
                "name": g.name,
                "config_version": g.config_version,
                "heartbeat_interval_ms": g.heartbeat_interval_ms,
                "heartbeat_timeout_ms": g.heartbeat_timeout_ms,
                "data_streams": g.data_streams,
            })).collect::<Vec<_>>(),
        })
    });
    let streams: Vec<Value> = m
        .streams
        .values()
        .map(|s| {
            let (acked, current) = m.config_of(&s.client_id).unwrap_or(("", ""));
            json!({
                "stream_id": s.stream_id,
                "type": stream_type_name(s.stream_type),
                "client_id": s.client_id,
                "group": s.group,
                "peer": s.peer,
                "heartbeat_age_ms": m.heartbeat_age_ms(s, now_ms),
                "last_delay_ms": s.last_delay_ms,
                "last_rtt_ms": s.last_rtt_ms,
                "delay_ms": { "p50": s.delay_p50_ms, "p99": s.delay_p99_ms, "max": s.delay_max_ms },
                "rtt_ms": { "p50": s.rtt_p50_ms, "p99": s.rtt_p99_ms, "max": s.rtt_max_ms },
                "heartbeats": s.heartbeats,
                "queue_depth": s.queue_depth,
                "queue_capacity": s.queue_capacity,
                "in_flight": s.in_flight,
                "upgraded": s.upgraded,
                "requests": s.requests,
                "bytes_to_client": s.bytes_to_client,
                "bytes_from_client": s.bytes_from_client,
                "draining": s.draining,
                "config_version_acked": acked,
                "config_version_current": current,
            })
        })
        .collect();
    let clients: Vec<Value> = m
        .clients
        .values()
        .map(|c| {
            json!({
                "client_id": c.client_id,
                "group": c.group,
                "peer": c.peer,
                "version": c.version,
                "connected_unix_ms": c.connected_unix_ms,
                "streams": c.streams,
                "config_version_acked": c.config_version_acked,
                "config_version_current": c.config_version_current,
                "link": c.link.as_ref().map(|l| {
                    let counts = |c: Option<&tunnel_lib::proto::LinkCounters>| c.map(|c| json!({
                        "rtt_us": c.rtt_us,
                        "retransmits": c.retransmits,
                        "bytes_sent": c.bytes_sent,
                        "bytes_retrans": c.bytes_retrans,
                    }));
                    json!({
                        "state": crate::model::link_state(l.server_options.as_ref(), c.client_link_options.as_ref()),
                        "resent_share": crate::model::link_loss(l),
                        "server": counts(l.server.as_ref()),
                        "client": counts(l.client.as_ref()),
                    })
                }),
            })
        })
        .collect();
    let requests: Vec<Value> = m
        .requests
        .iter()
        .map(|r| {
            json!({
                "seq": r.seq,
                "unix_ms": r.unix_ms,
                "method": r.method,
                "host": r.host,
                "path": r.path,
                "status": r.status,
                "duration_ms": r.duration_ms,
                "bytes_in": r.bytes_in,
                "bytes_out": r.bytes_out,
                "group": r.group,
                "rule": r.rule,
                "client_id": r.client_id,
                "stream_id": r.stream_id,
                "request_id": r.request_id,
                "trace_id": r.trace_id,
                "upgrade": r.upgrade,
                "forwarded_to": r.forwarded_to,
                "replay_of": r.replay_of,
                "remote_addr": r.remote_addr,
                "refused": r.refused,
                "error": r.error,
                "head": r.head.as_ref().map(head_json),
            })
        })
        .collect();
    let events: Vec<Value> = m
        .events
        .iter()
        .map(|e| {
            json!({
                "seq": e.seq,
                "unix_ms": e.unix_ms,
                "kind": crate::app::event_kind_name(e.kind),
                "client_id": e.client_id,
                "group": e.group,
                "stream_id": e.stream_id,
                "detail": e.detail,
            })
        })
        .collect();
    json!({
        "server": server,
        "clients": clients,
        "streams": streams,
        "requests": requests,
        "traffic": traffic_json(&m.traffic),
        "events": events,
    })
}

/// A request's heads and timings; headers as [name, value] pairs in order,
/// secrets masked by the server.
fn head_json(h: &tunnel_lib::introspection::RequestHead) -> Value {
    let pairs =
        |hs: &[tunnel_lib::introspection::Header]| hs.iter().map(|h| json!([h.name, h.value])).collect::<Vec<_>>();
    json!({
        "scheme": h.scheme,
        "uri": h.uri,
        "version": h.version,
        "request_headers": pairs(&h.request_headers),
        "response_headers": pairs(&h.response_headers),
        "timings_us": { "routed": h.routed_us, "sent": h.sent_us, "response": h.response_us, "end": h.end_us },
        "bodies_kept": h.bodies,
    })
}

/// The series as columns, a point per step, oldest first: the same shape
/// as `TrafficSeries` in introspection.proto.
fn traffic_json(t: &crate::traffic::Traffic) -> Vec<Value> {
    let steps = [(tunnel_lib::traffic::SECOND_MS, &t.seconds), (tunnel_lib::traffic::MINUTE_MS, &t.minutes)];
    steps
        .into_iter()
        .flat_map(|(step, map)| map.iter().map(move |(k, s)| (step, k, s)))
        .map(|(step, (subject, name), s)| {
            let col32 = |f: fn(&tunnel_lib::traffic::Point) -> u32| s.points.iter().map(f).collect::<Vec<u32>>();
            let col64 = |f: fn(&tunnel_lib::traffic::Point) -> u64| s.points.iter().map(f).collect::<Vec<u64>>();
            json!({
                "subject": crate::traffic::subject_name(*subject),
                "name": name,
                "step_ms": step,
                "start_unix_ms": s.start_ms,
                "requests": col32(|p| p.requests),
                "status_4xx": col32(|p| p.status_4xx),
                "errors": col32(|p| p.errors),
                "p50_us": col32(|p| p.p50_us),
                "p99_us": col32(|p| p.p99_us),
                "bytes_in": col64(|p| p.bytes_in),
                "bytes_out": col64(|p| p.bytes_out),
                "in_flight": col32(|p| p.in_flight),
            })
        })
        .collect()
}

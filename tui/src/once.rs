//! `--once`: one plain-text (or JSON) snapshot, for scripts and a quick look over SSH.

use crate::model::{short_age, short_duration, Model};
use crate::ui::stream_type_name;
use serde_json::{json, Value};

/// A header line, then one line per stream.
pub fn text(m: &Model, now_ms: i64) -> String {
    let mut out = String::new();
    if let Some(s) = &m.server {
        out.push_str(&format!(
            "server {} v{} up {}  clients {}  streams {}  requests {}  errors {}  in-flight {}  http {}  grpc {}\n",
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
        ));
    }
    out.push_str(&format!(
        "{:<36}  {:<4}  {:<16}  {:<10}  {:>7}  {:>9}  {:>4}  CONFIG (ACKED/CURRENT)\n",
        "STREAM", "TYPE", "CLIENT", "GROUP", "HB_AGE", "QUEUE", "INFL"
    ));
    let mut streams: Vec<_> = m.streams.values().collect();
    streams
        .sort_by(|a, b| (&a.client_id, a.stream_type, &a.stream_id).cmp(&(&b.client_id, b.stream_type, &b.stream_id)));
    for s in streams {
        let (acked, current) = m.config_of(&s.client_id).unwrap_or(("", ""));
        out.push_str(&format!(
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
        ));
    }
    out
}

/// The same snapshot as JSON.
pub fn json(m: &Model, now_ms: i64) -> Value {
    let server = m.server.as_ref().map(|s| {
        json!({
            "server_id": s.server_id,
            "version": s.version,
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
            })
        })
        .collect();
    json!({ "server": server, "clients": clients, "streams": streams })
}

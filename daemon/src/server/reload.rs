//! Config reloads: on SIGHUP and when server.toml changes on disk. An invalid
//! file is refused (the old config keeps serving); a valid one is applied and
//! pushed to the connected clients of every group whose config changed.

use super::events::About;
use super::registry::StreamHandle;
use super::Shared;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;
use tunnel_lib::config::{ConfigPush, ServerConfig};
use tunnel_lib::introspection::EventKind;
use tunnel_lib::proto::{tunnel_message::Payload, ConfigSyncResponse};

/// How often the file is checked for changes. Polling (rather than inotify)
/// also catches configs swapped in by symlink, as config-management tools do.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Result of one reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reload {
    /// Applied; the groups whose config version changed.
    Applied(Vec<String>),
    /// Nothing changed.
    Unchanged,
    /// Refused; the old config keeps serving.
    Refused(String),
}

fn stamp(path: &std::path::Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reloads on SIGHUP and on file change until `stop` fires.
pub async fn watch(shared: Arc<Shared>, stop: CancellationToken) {
    let Some(path) = shared.config_path.clone() else {
        stop.cancelled().await;
        return;
    };
    #[cfg(unix)]
    let mut hup = crate::signal::hangups();
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hangup => "SIGHUP",
            _ = tick.tick() => {
                let now = stamp(&path);
                if now == last { continue; }
                last = now;
                "file changed"
            }
        };
        tracing::info!(path = %path.display(), trigger = why, "reloading config");
        crate::systemd::reloading();
        reload_because(&shared, why);
        crate::systemd::ready(&shared.status_line());
    }
}

/// Re-reads the config file and applies it.
pub fn reload_from_file(shared: &Shared) -> Reload {
    reload_because(shared, "requested")
}

/// Re-reads the config file and applies it; `why` names the trigger in the event.
fn reload_because(shared: &Shared, why: &str) -> Reload {
    let Some(path) = &shared.config_path else {
        return Reload::Unchanged;
    };
    let result = match ServerConfig::from_file(path) {
        // A clustered server's groups and rules come from the fleet's push,
        // if there is one: the file's own stand in only until then.
        Ok(cfg) => match shared.pushed() {
            Some((pushed, revision)) => apply(shared, cfg.with_pushed(&pushed, revision)),
            None => apply(shared, cfg),
        },
        Err(e) => {
            tracing::error!("config reload refused, old config keeps serving: {e}");
            Reload::Refused(e.to_string())
        }
    };
    let outcome = if matches!(result, Reload::Refused(_)) { "failed" } else { "ok" };
    shared.metrics.reloads.get_or_create(&vec![("result", outcome.to_string())]).inc();
    reload_event(shared, &result, &format!("{} ({why})", path.display()));
    result
}

/// The event a reload leaves in the console's timeline.
fn reload_event(shared: &Shared, result: &Reload, source: &str) {
    let (kind, detail) = match result {
        Reload::Applied(groups) if groups.is_empty() => {
            (EventKind::Reloaded, format!("{source}: applied; no group's config changed"))
        }
        Reload::Applied(groups) => {
            (EventKind::Reloaded, format!("{source}: applied; config changed for {}", groups.join(", ")))
        }
        Reload::Unchanged => (EventKind::Reloaded, format!("{source}: nothing changed")),
        Reload::Refused(e) => (EventKind::ReloadRefused, format!("{source}: {e}")),
    };
    shared.events.record(kind, About::default(), detail);
}

/// Applies a new config and pushes changed group configs to their clients.
pub fn apply(shared: &Shared, new: ServerConfig) -> Reload {
    // Certificates are re-read on every reload, even when the file is the
    // same: renewals replace the PEM files, not server.toml.
    if let Err(e) = shared.load_tls(&new) {
        tracing::error!("config reload refused, old config and certificates keep serving: {e}");
        return Reload::Refused(e.to_string());
    }
    let old = shared.config();
    let (o, n) = (&old.server, &new.server);
    let restart_only = [
        ("http_listen", o.http_listen != n.http_listen),
        ("grpc_listen", o.grpc_listen != n.grpc_listen),
        ("admin_listen", o.admin_listen != n.admin_listen),
        ("https_listen", o.https_listen != n.https_listen),
        ("metrics_listen", o.metrics_listen != n.metrics_listen),
        ("worker_threads", o.worker_threads != n.worker_threads),
        ("max_connections", o.max_connections != n.max_connections),
        ("max_streams_per_connection", o.max_streams_per_connection != n.max_streams_per_connection),
        ("max_header_bytes", o.max_header_bytes != n.max_header_bytes),
        ("max_headers", o.max_headers != n.max_headers),
        ("public_max_streams", o.public_max_streams != n.public_max_streams),
        ("public_ping_interval", o.public_ping_interval != n.public_ping_interval),
        ("public_ping_timeout", o.public_ping_timeout != n.public_ping_timeout),
        ("h2_max_remote_resets", o.h2_max_remote_resets != n.h2_max_remote_resets),
        ("h2_max_local_resets", o.h2_max_local_resets != n.h2_max_local_resets),
        ("link_ping_interval", o.link_ping_interval != n.link_ping_interval),
        ("link_ping_timeout", o.link_ping_timeout != n.link_ping_timeout),
    ];
    let tcp_ports = |c: &ServerConfig| c.tcp.iter().map(|t| t.listen).collect::<Vec<_>>();
    if tcp_ports(&old) != tcp_ports(&new) {
        tracing::warn!("[[tcp]] listen addresses changed in the file; new ports open and removed ones close at the next restart (the other keys of each service apply now)");
    }
    let changed: Vec<&str> = restart_only.iter().filter(|(_, c)| *c).map(|(k, _)| *k).collect();
    if !changed.is_empty() {
        tracing::warn!(keys = ?changed, "these [server] settings changed in the file; they apply at the next restart");
    }
    let (before, after) = (super::group_versions(&old), super::group_versions(&new));
    if *old == new {
        return Reload::Unchanged;
    }
    shared.set_config(new);
    let changed: Vec<String> =
        after.iter().filter(|(g, v)| before.get(*g) != Some(v)).map(|(g, _)| g.clone()).collect();
    // Groups removed from the file, or whose token changed (a rotated, maybe
    // leaked, token): close their streams, so only holders of the current
    // token stay connected.
    let current = shared.config();
    let revoked = |g: &str| match (old.group(g), current.group(g)) {
        (Some(o), Some(n)) => o.token != n.token,
        (Some(_), None) => true,
        _ => false,
    };
    for s in shared.registry.all_streams().into_iter().filter(|s| revoked(&s.group)) {
        tracing::info!(stream = %s.stream_id, client = %s.client_id, group = %s.group, "group removed or its token changed: stream closed");
        let about = About { client_id: &s.client_id, group: &s.group, stream_id: &s.stream_id };
        shared.events.record(EventKind::Revoked, about, "group removed or its token changed: stream closed");
        shared.registry.remove(&s.stream_id);
        s.cancel.cancel();
    }
    let cfg = shared.config();
    if cfg.server.config_push == ConfigPush::Manual {
        if !changed.is_empty() {
            tracing::info!(groups = ?changed, "config changed; config_push = \"manual\": connected clients get it when an operator forces a resync");
        }
        return Reload::Applied(changed);
    }
    for group in &changed {
        push_group(shared, group);
    }
    Reload::Applied(changed)
}

/// Puts the fleet's pushed groups and rules (etcd revision `revision`) in
/// force, in place of the file's, and pushes them to clients as a reload
/// would. An invalid push is refused: the config in force keeps serving.
pub fn apply_pushed(shared: &Shared, text: &str, revision: i64) -> Reload {
    let name = match &shared.cluster {
        Some(c) => format!("etcd {}/config (revision {revision})", c.settings.prefix),
        None => format!("pushed config (revision {revision})"),
    };
    let pushed = match tunnel_lib::config::PushedConfig::from_str_named(text, &name) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!("pushed config refused, the config in force keeps serving: {e}");
            shared.metrics.reloads.get_or_create(&vec![("result", "failed".to_string())]).inc();
            let result = Reload::Refused(e.to_string());
            reload_event(shared, &result, &name);
            return result;
        }
    };
    let new = shared.config().with_pushed(&pushed, revision);
    shared.set_pushed(pushed, revision);
    let result = apply(shared, new);
    reload_event(shared, &result, &name);
    tracing::info!(revision, outcome = ?result, "fleet config from etcd applied");
    shared.metrics.reloads.get_or_create(&vec![("result", "ok".to_string())]).inc();
    result
}

/// Sends the group's current config to its connected clients' config streams.
/// Returns the version sent and the number of clients it reached.
pub fn push_group(shared: &Shared, group: &str) -> Option<(String, usize)> {
    let streams = shared.registry.config_streams(group);
    push(shared, group, streams)
}

/// Sends the current config to one client.
pub fn push_client(shared: &Shared, client_id: &str) -> Option<(String, usize)> {
    let streams: Vec<_> = shared
        .registry
        .client_streams(client_id)
        .into_iter()
        .filter(|s| super::registry::Registry::syncs_config(s))
        .collect();
    let group = streams.first()?.group.clone();
    push(shared, &group, streams)
}

fn push(shared: &Shared, group: &str, streams: Vec<Arc<StreamHandle>>) -> Option<(String, usize)> {
    let cfg = shared.config();
    let (version, config) = cfg.group_sync(group)?;
    tracing::info!(group = %group, %version, clients = streams.len(), "pushing config to connected clients");
    let mut reached = std::collections::BTreeSet::new();
    for s in &streams {
        let resp = ConfigSyncResponse {
            config_version: version.clone(),
            config: Some(config.clone()),
            server_id: shared.server_id.clone(),
            ..Default::default()
        };
        let msg = s.exchanges.message(&crate::tunnel::next_request_id(), Payload::ConfigSyncResponse(resp));
        if s.outbound().try_priority(msg) {
            reached.insert(s.client_id.clone());
        } else {
            tracing::warn!(stream = %s.stream_id, "priority queue full: config push dropped (the next heartbeat acknowledgement names the new version)");
        }
    }
    let about = About { group, ..Default::default() };
    let detail = format!("version {version} sent to {} of {} clients", reached.len(), client_count(&streams));
    shared.events.record(EventKind::ConfigPushed, about, detail);
    Some((version, reached.len()))
}

/// Distinct clients of `streams`.
fn client_count(streams: &[Arc<StreamHandle>]) -> usize {
    streams.iter().map(|s| s.client_id.as_str()).collect::<std::collections::BTreeSet<_>>().len()
}

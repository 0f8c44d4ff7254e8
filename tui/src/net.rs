//! The console's links to its servers, one background task per server:
//! each connects (and reconnects), follows Watch and carries out commands on
//! its own, so a slow or dead server never holds up another. Never called
//! from render or update code.

use crate::app::{Action, Command};
use crate::model::ConnState;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;
use tunnel_lib::introspection::introspection_client::IntrospectionClient;
use tunnel_lib::introspection::{
    CloseClientRequest, CloseStreamRequest, ForceResyncRequest, GetCaptureRequest, ReplayRequest, WatchRequest,
    WatchUpdate,
};

/// Bound on connecting (TCP and HTTP/2 handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The server sends an update at least every 2 s: silence this long means the link is gone.
const SILENCE: Duration = Duration::from_secs(6);
/// Bound on one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a replay: the request's whole answer (the server bounds it by its rule's timeout).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(90);
/// Pause between reconnect attempts.
const RETRY: Duration = Duration::from_secs(1);
/// Updates per second asked of the server.
const RATE: u32 = 4;
/// Bound on one server's `--once` snapshot: connecting, asking, and the first update.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(10);

/// The servers named by `--server` (repeated, or comma-separated), trimmed,
/// empty entries dropped, each address once, in the order given.
pub fn addresses(given: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for a in given.iter().flat_map(|g| g.split(',')).map(str::trim).filter(|a| !a.is_empty()) {
        if !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    out
}

/// `given`, then the console addresses (admin_advertise) of every other
/// member of the clusters the given servers belong to, as each given server
/// sees its membership now. A server that does not answer, or that runs
/// standalone, adds nothing. Addresses are compared as URLs, so
/// `127.0.0.1:7001` and `http://127.0.0.1:7001` count as one.
pub async fn with_cluster_members(given: Vec<String>, token: Option<String>) -> Vec<String> {
    let targets: Vec<Target> = given.iter().map(|a| Target::new(a, token.clone())).collect();
    let mut known: Vec<String> = targets.iter().map(|t| t.url.clone()).collect();
    let mut out = given;
    for snapshot in first_snapshots(&targets).await.into_iter().flatten() {
        let members = snapshot.server.and_then(|s| s.cluster).map(|c| c.members).unwrap_or_default();
        for m in members.into_iter().filter(|m| !m.admin_advertise.is_empty()) {
            let url = Target::new(&m.admin_advertise, None).url;
            if !known.contains(&url) {
                known.push(url);
                // Shown as host:port, like addresses given on the command line.
                out.push(m.admin_advertise.strip_prefix("http://").unwrap_or(&m.admin_advertise).to_string());
            }
        }
    }
    out
}

/// Where the server's admin listener is, and its token.
#[derive(Debug, Clone)]
pub struct Target {
    /// `http://host:port`.
    pub url: String,
    pub token: Option<String>,
}

impl Target {
    /// From `host:port` or a URL.
    pub fn new(server: &str, token: Option<String>) -> Self {
        let url = if server.contains("://") { server.to_string() } else { format!("http://{server}") };
        Target { url, token }
    }

    fn request<T>(&self, msg: T) -> Result<Request<T>, String> {
        let mut r = Request::new(msg);
        if let Some(t) = &self.token {
            let v = format!("Bearer {t}").parse().map_err(|_| "the token has characters not allowed in a header")?;
            r.metadata_mut().insert("authorization", v);
        }
        Ok(r)
    }
}

/// The largest Watch update read: a full snapshot of 2000 busy clients' series with room to spare.
const MAX_SNAPSHOT: usize = 64 << 20;

/// Connects to the admin listener.
pub async fn connect(target: &Target) -> Result<IntrospectionClient<Channel>, String> {
    let ep = Endpoint::from_shared(target.url.clone())
        .map_err(|e| format!("invalid address {}: {e}", target.url))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    let channel = tokio::time::timeout(CONNECT_TIMEOUT, ep.connect())
        .await
        .map_err(|_| format!("no answer from {} within {CONNECT_TIMEOUT:?}", target.url))?
        .map_err(|e| format!("cannot reach {}: {}", target.url, root_cause(&e)))?;
    // A full snapshot carries five minutes of series for every busy client:
    // about 5 KiB each, past tonic's 4 MiB default with a large fleet.
    Ok(IntrospectionClient::new(channel).max_decoding_message_size(MAX_SNAPSHOT))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Opens a Watch and returns the stream of updates, bounded so that a server
/// that takes the connection but never answers counts as lost.
async fn open_watch(
    client: &mut IntrospectionClient<Channel>,
    target: &Target,
) -> Result<tonic::Streaming<WatchUpdate>, String> {
    // Heads too: the Requests view's inspector shows them.
    let req = target.request(WatchRequest { max_updates_per_second: RATE, heads: true })?;
    match tokio::time::timeout(SILENCE, client.watch(req)).await {
        Ok(Ok(resp)) => Ok(resp.into_inner()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no answer to Watch from {} within {SILENCE:?}", target.url)),
    }
}

/// Opens a Watch and returns its first (full) update.
pub async fn first_snapshot(target: &Target) -> Result<WatchUpdate, String> {
    let mut client = connect(target).await?;
    let mut stream = open_watch(&mut client, target).await?;
    match tokio::time::timeout(SILENCE, stream.message()).await {
        Ok(Ok(Some(u))) => Ok(u),
        Ok(Ok(None)) => Err("the server closed the watch".into()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no snapshot within {SILENCE:?}")),
    }
}

/// Every target's first snapshot, asked of all at once (so the slowest
/// bounds the wait, not the sum), in the targets' order.
pub async fn first_snapshots(targets: &[Target]) -> Vec<Result<WatchUpdate, String>> {
    let mut set = JoinSet::new();
    for (i, t) in targets.iter().enumerate() {
        let t = t.clone();
        set.spawn(async move {
            let r = tokio::time::timeout(SNAPSHOT_TIMEOUT, first_snapshot(&t))
                .await
                .unwrap_or_else(|_| Err(format!("no snapshot from {} within {SNAPSHOT_TIMEOUT:?}", t.url)));
            (i, r)
        });
    }
    let mut out: Vec<Result<WatchUpdate, String>> =
        targets.iter().map(|_| Err("the snapshot task failed".to_string())).collect();
    while let Some(done) = set.join_next().await {
        if let Ok((i, r)) = done {
            if let Some(slot) = out.get_mut(i) {
                *slot = r;
            }
        }
    }
    out
}

/// Runs one command; the action that reports how it went.
async fn execute(client: &mut IntrospectionClient<Channel>, target: &Target, server: usize, cmd: Command) -> Action {
    let fail = |s: tonic::Status| s.message().to_string();
    match cmd {
        Command::Capture(id) => {
            let r = match target.request(GetCaptureRequest { request_id: id.clone() }) {
                Ok(req) => client.get_capture(req).await.map(|r| Box::new(r.into_inner())).map_err(fail),
                Err(e) => Err(e),
            };
            Action::Captured(server, id, r)
        }
        Command::Replay { request_id, force } => {
            let r = match target.request(ReplayRequest { request_id: request_id.clone(), force }) {
                Ok(req) => client.replay(req).await.map(|r| Box::new(r.into_inner())).map_err(fail),
                Err(e) => Err(e),
            };
            Action::Replayed(server, request_id, r)
        }
        other => Action::CommandDone(server, steer(client, target, other).await),
    }
}

/// A command that answers with a line for the footer.
async fn steer(client: &mut IntrospectionClient<Channel>, target: &Target, cmd: Command) -> Result<String, String> {
    let fail = |s: tonic::Status| s.message().to_string();
    match cmd {
        Command::Capture(_) | Command::Replay { .. } => Err("not a steering command".into()),
        Command::ResyncClient(c) => {
            let req = ForceResyncRequest { client_id: c.clone(), group: String::new() };
            let r = client.force_resync(target.request(req)?).await.map_err(fail)?.into_inner();
            Ok(format!("config {} pushed to {c}", r.config_version))
        }
        Command::ResyncGroup(g) => {
            let req = ForceResyncRequest { client_id: String::new(), group: g.clone() };
            let r = client.force_resync(target.request(req)?).await.map_err(fail)?.into_inner();
            Ok(format!("config {} pushed to {} clients of {g}", r.config_version, r.clients))
        }
        Command::CloseStream(id) => {
            client.close_stream(target.request(CloseStreamRequest { stream_id: id.clone() })?).await.map_err(fail)?;
            Ok(format!("stream {} closed", crate::model::short_id(&id)))
        }
        Command::CloseClient(id) => {
            let r = client
                .close_client(target.request(CloseClientRequest { client_id: id.clone() })?)
                .await
                .map_err(fail)?;
            Ok(format!("{} streams of {id} closed", r.into_inner().streams_closed))
        }
    }
}

/// Follows the server at fleet index `server` until `stop` fires, reporting
/// to `events`; reconnects whenever the link is lost. Commands run beside the
/// update stream in tasks this link owns: they end with it.
pub async fn run(
    server: usize,
    target: Target,
    events: mpsc::Sender<Action>,
    mut commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    let mut running = JoinSet::new();
    loop {
        // Stop is heard while connecting too, not only once the watch is up.
        let reason = tokio::select! {
            _ = stop.cancelled() => return,
            r = follow(server, &target, &events, &mut commands, &mut running) => match r {
                Some(reason) => reason,
                None => return,
            },
        };
        if events.send(Action::Conn(server, ConnState::Lost(reason))).await.is_err() {
            return;
        }
        let retry = tokio::time::sleep(RETRY);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut retry => break,
                Some(_) = running.join_next() => {}
                Some(cmd) = commands.recv() => {
                    let _ = events.send(cmd.failed(server, "not connected to the server".into())).await;
                }
            }
        }
    }
}

/// One connection's life: connects, watches and serves commands until the
/// link is lost (the reason) or the console has gone (None).
async fn follow(
    server: usize,
    target: &Target,
    events: &mpsc::Sender<Action>,
    commands: &mut mpsc::Receiver<Command>,
    running: &mut JoinSet<()>,
) -> Option<String> {
    let mut client = match connect(target).await {
        Ok(c) => c,
        Err(e) => return Some(e),
    };
    let mut stream = match open_watch(&mut client, target).await {
        Ok(s) => s,
        Err(e) => return Some(e),
    };
    loop {
        tokio::select! {
            // Reaps finished commands, so the set holds only those in flight.
            Some(_) = running.join_next() => {}
            Some(cmd) = commands.recv() => {
                let (mut c, t, ev) = (client.clone(), target.clone(), events.clone());
                // Bounded by COMMAND_TIMEOUT; the update stream keeps flowing meanwhile.
                running.spawn(async move {
                    let late = cmd.failed(server, "the server did not answer in time".into());
                    // A replay waits for its request's whole answer, bounded by the rule's timeout on the server.
                    let limit = if matches!(cmd, Command::Replay { .. }) { REPLAY_TIMEOUT } else { COMMAND_TIMEOUT };
                    let done = tokio::time::timeout(limit, execute(&mut c, &t, server, cmd)).await.unwrap_or(late);
                    let _ = ev.send(done).await;
                });
            }
            m = tokio::time::timeout(SILENCE, stream.message()) => match m {
                Ok(Ok(Some(u))) => {
                    if events.send(Action::Update(server, Box::new(u))).await.is_err() {
                        return None;
                    }
                }
                Ok(Ok(None)) => return Some("the server closed the watch".to_string()),
                Ok(Err(s)) => return Some(s.message().to_string()),
                Err(_) => return Some(format!("no update for {SILENCE:?}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_split_trim_and_dedupe() {
        let given = ["a:1,b:2".to_string(), " c:3 ".into(), "a:1".into(), ",".into()];
        assert_eq!(addresses(&given), ["a:1", "b:2", "c:3"]);
        assert!(addresses(&[]).is_empty());
    }
}

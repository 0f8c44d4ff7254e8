//! The console's link to the server, in a background task: connects (and
//! reconnects), follows Watch, and carries out commands. Never called from
//! render or update code.

use crate::app::{Action, Command, ConnState};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;
use tunnel_lib::introspection::introspection_client::IntrospectionClient;
use tunnel_lib::introspection::{
    CloseClientRequest, CloseStreamRequest, ForceResyncRequest, WatchRequest, WatchUpdate,
};

/// Bound on connecting (TCP and HTTP/2 handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The server sends an update at least every 2 s: silence this long means the link is gone.
const SILENCE: Duration = Duration::from_secs(6);
/// Bound on one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between reconnect attempts.
const RETRY: Duration = Duration::from_secs(1);
/// Updates per second asked of the server.
const RATE: u32 = 4;

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
    Ok(IntrospectionClient::new(channel))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Opens a Watch and returns its first (full) update.
pub async fn first_snapshot(target: &Target) -> Result<WatchUpdate, String> {
    let mut client = connect(target).await?;
    let mut stream = client
        .watch(target.request(WatchRequest { max_updates_per_second: RATE })?)
        .await
        .map_err(|s| s.message().to_string())?
        .into_inner();
    match tokio::time::timeout(SILENCE, stream.message()).await {
        Ok(Ok(Some(u))) => Ok(u),
        Ok(Ok(None)) => Err("the server closed the watch".into()),
        Ok(Err(s)) => Err(s.message().to_string()),
        Err(_) => Err(format!("no snapshot within {SILENCE:?}")),
    }
}

async fn execute(client: &mut IntrospectionClient<Channel>, target: &Target, cmd: Command) -> Result<String, String> {
    let fail = |s: tonic::Status| s.message().to_string();
    match cmd {
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

/// Follows the server until `stop` fires, reporting to `events`; reconnects
/// whenever the link is lost.
pub async fn run(
    target: Target,
    events: mpsc::Sender<Action>,
    mut commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    loop {
        let reason = match connect(&target).await {
            Err(e) => e,
            Ok(mut client) => match target.request(WatchRequest { max_updates_per_second: RATE }) {
                Err(e) => e,
                Ok(req) => {
                    match client.watch(req).await {
                        Err(s) => s.message().to_string(),
                        Ok(resp) => {
                            let mut stream = resp.into_inner();
                            loop {
                                tokio::select! {
                                    _ = stop.cancelled() => return,
                                    Some(cmd) = commands.recv() => {
                                        let (mut c, t, ev) = (client.clone(), target.clone(), events.clone());
                                        // Bounded by COMMAND_TIMEOUT; the update stream keeps flowing meanwhile.
                                        tokio::spawn(async move {
                                            let r = tokio::time::timeout(COMMAND_TIMEOUT, execute(&mut c, &t, cmd))
                                                .await
                                                .unwrap_or_else(|_| Err("the server did not answer in time".into()));
                                            let _ = ev.send(Action::CommandDone(r)).await;
                                        });
                                    }
                                    m = tokio::time::timeout(SILENCE, stream.message()) => match m {
                                        Ok(Ok(Some(u))) => {
                                            if events.send(Action::Update(Box::new(u))).await.is_err() {
                                                return;
                                            }
                                        }
                                        Ok(Ok(None)) => break "the server closed the watch".to_string(),
                                        Ok(Err(s)) => break s.message().to_string(),
                                        Err(_) => break format!("no update for {SILENCE:?}"),
                                    },
                                }
                            }
                        }
                    }
                }
            },
        };
        if events.send(Action::Conn(ConnState::Lost(reason))).await.is_err() {
            return;
        }
        let retry = tokio::time::sleep(RETRY);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = &mut retry => break,
                Some(_) = commands.recv() => {
                    let _ = events.send(Action::CommandDone(Err("not connected to the server".into()))).await;
                }
            }
        }
    }
}

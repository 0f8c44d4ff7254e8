//! One connection session of the client to one server address: its
//! channel(s), the control stream and the data streams, each registered and
//! heartbeating on its own, and the config that server pushes. Any loss of
//! the connection ends the session; its link reconnects with backoff and a
//! new session id.

use super::dial::LinkSlot;
use super::fleet::{Claim, Link, Releases};
use super::upstream;
use crate::tunnel::exchange::{payload_name, Dispatched, ExchangeFailure, Exchanges, Role};
use crate::tunnel::link::{CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_MESSAGE, STREAM_WINDOW};
use crate::tunnel::next_request_id;
use crate::tunnel::outbound::Outbound;
use anyhow::{bail, Context as _};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Request;
use tunnel_lib::config::{ClientConfig, ClientTls, Transport};
use tunnel_lib::frame::now_ms;
use tunnel_lib::proto::exchange_error::Kind as ErrorKind;
use tunnel_lib::proto::tunnel_service_client::TunnelServiceClient;
use tunnel_lib::proto::{
    tunnel_message::Payload, ConfigSyncRequest, ConfigSyncResponse, Direction, Drain, StreamOpenRequest,
    StreamOpenResponse, StreamType, TunnelMessage,
};
use tunnel_lib::GROUP_METADATA;

/// Pause before reopening a data stream the server closed.
const REOPEN_DELAY: Duration = Duration::from_millis(200);
/// How often a drain checks for in-flight exchanges.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// How long a draining stream waits for the server's acknowledgement (a
/// server without it still drains, a little less safely).
const DRAIN_ACK_WAIT: Duration = Duration::from_secs(2);
/// How long a drained client stays quiet before closing: covers a request
/// whose head the server queued in the instant it processed our drain.
const DRAIN_LINGER: Duration = Duration::from_millis(100);

/// What the server manages for us; client.toml's values until it speaks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Settings {
    heartbeat_interval: Duration,
    data_streams: u32,
    config_version: String,
}

/// How a session ended without an error.
#[derive(Debug)]
pub enum Ended {
    /// The client is stopping: the session drained.
    Stopped,
    /// The server said it is draining: a planned stop, not a failure.
    ServerDrained,
    /// This address leads to a server another link already holds (`holder`):
    /// nothing was registered; `releases` tells when the holder lets go.
    Duplicate { server_id: String, holder: String, releases: Releases },
}

/// State shared by the streams of one session.
struct Session {
    /// The link this session is for: its config, address, status and metrics.
    link: Arc<Link>,
    id: String,
    /// When this session started (unix ms): newer sessions win at the server.
    started_ms: i64,
    settings: watch::Sender<Settings>,
    /// Fires to end the session (a stream lost, or shutdown).
    cancel: CancellationToken,
    /// The server told us it is draining.
    server_drained: AtomicBool,
    /// The upstreams the server last said we lack, as warned about.
    missing_warned: Mutex<Vec<String>>,
    /// Data streams alive now, for draining.
    live: Mutex<HashMap<String, Arc<Exchanges>>>,
    /// Set once a drain starts: closed streams are not reopened.
    draining: AtomicBool,
    /// The first stream failure: why the session ended.
    failure: Mutex<Option<String>>,
    /// Data streams whose drain the server acknowledged: no request follows on them.
    drain_acked: Mutex<std::collections::HashSet<String>>,
    /// The sockets of the data and the control connections (one and the
    /// same unless `split-connection`), whose counts the heartbeats carry.
    data_link: LinkSlot,
    control_link: LinkSlot,
}

/// What a stream does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// ControlStream: heartbeats and config.
    Control,
    /// Proxy: exchanges.
    Data,
    /// Proxy with everything (transport "single").
    Single,
}

async fn connect(link: &Link) -> anyhow::Result<(Channel, LinkSlot)> {
    let cfg = &link.cfg;
    let server = &link.key;
    // No tonic connect_timeout: the dialer bounds the TCP connect, and the
    // whole connect (TLS and the server's first bytes too) is bounded below.
    let mut ep = Endpoint::from(link.target.url.clone())
        .http2_keep_alive_interval(cfg.ping_interval)
        .keep_alive_timeout(cfg.ping_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE);
    if let Some(tls) = &cfg.tls {
        ep = ep.tls_config(client_tls(&link.target.url, tls)?).context("TLS settings")?;
    }
    let (dialer, heard) =
        super::dial::Dialer::new(link.target.addr, cfg.tcp_keepalive, cfg.connect_timeout, cfg.link_tuning);
    let slot = dialer.slot();
    // Connected means the server spoke: TCP, TLS, and its first bytes, all
    // within connect_timeout (a tarpit costs this, not a registration timeout).
    let connected = tokio::time::timeout(cfg.connect_timeout, async {
        let channel = ep.connect_with_connector(dialer).await.map_err(|e| {
            anyhow::anyhow!("connecting to {}: {}", server, explain_link_error(&e, cfg.tls.is_some(), Stage::Connect))
        })?;
        if heard.await.is_err() {
            // A TLS server closes a plaintext client's connection unanswered.
            let hint = if cfg.tls.is_none() {
                " (if the server's link has TLS on, the server URL must be https://)"
            } else {
                ""
            };
            bail!("connecting to {server}: connection closed before the server spoke{hint}");
        }
        Ok::<_, anyhow::Error>((channel, slot))
    })
    .await;
    match connected {
        Ok(r) => r,
        Err(_) => bail!(
            "no connection to {server} within {:?} (connect_timeout: TCP, TLS, and the server's first bytes)",
            cfg.connect_timeout
        ),
    }
}

/// tonic's TLS settings from client.toml's `[tls]`. The files are read at
/// every connection, so renewed certificates apply at the next reconnect.
fn client_tls(server: &http::Uri, tls: &ClientTls) -> anyhow::Result<ClientTlsConfig> {
    // Bounded, and refusing a FIFO or device: this runs at every connect.
    let read = |p: &std::path::Path| {
        tunnel_lib::units::read_bounded(p, 1 << 20).with_context(|| format!("reading {}", p.display()))
    };
    let mut c = ClientTlsConfig::new();
    c = match &tls.ca {
        Some(ca) => c.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => c.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        c = c.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    if let Some(name) = tls.server_name.as_deref().or(server.host()) {
        c = c.domain_name(name);
    }
    Ok(c)
}

/// Where a link error happened: tonic's connect covers TCP and, with TLS,
/// the TLS handshake; HTTP/2's own handshake only runs when the first
/// stream opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Connect,
    Open,
}

/// A failed connection or stream in an operator's words: the cause chain on
/// one line, with what to check when the cause looks like a TLS mismatch.
fn explain_link_error(e: &(dyn std::error::Error + 'static), tls: bool, stage: Stage) -> String {
    // A Status displays as a debug dump; its message and causes read better.
    let mut chain = match e.downcast_ref::<tonic::Status>() {
        Some(status) => status.message().to_string(),
        None => e.to_string(),
    };
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !chain.contains(&s) {
            chain.push_str(": ");
            chain.push_str(&s);
        }
        cur = c.source();
    }
    let lower = chain.to_ascii_lowercase();
    let cut_off = lower.contains("eof") || lower.contains("closed") || lower.contains("reset");
    let hint = if lower.contains("connection refused") {
        ""
    } else if tls && lower.contains("certificaterequired") {
        " (the server requires a client certificate: set [tls] cert and key, signed by its client_ca)"
    } else if tls && (lower.contains("corrupt message") || lower.contains("invalidcontenttype")) {
        " (the server answered without TLS: is [server.tls] off there? then use an http:// URL)"
    } else if tls && lower.contains("invalid peer certificate") {
        " (check [tls] ca, and server_name against the names in the server's certificate)"
    } else if tls && lower.contains("alert") {
        " (the server refused our TLS: is our certificate ([tls] cert) signed by its client_ca and still valid?)"
    } else if tls && cut_off && stage == Stage::Connect {
        " (the server closed the connection during the TLS handshake: is TLS on there ([server.tls])?)"
    } else if !tls && cut_off && stage == Stage::Open {
        " (if the server's link has TLS on, the server URL must be https://)"
    } else {
        ""
    };
    format!("{chain}{hint}")
}

/// Asks the server who it is (and for our group's config) before anything
/// registers: the unary ConfigSync. A second address of a server we already
/// hold must learn that before it opens streams, since a new session of this
/// client would replace the one there.
async fn hello(link: &Link, channel: Channel) -> anyhow::Result<ConfigSyncResponse> {
    let cfg = &link.cfg;
    let req = ConfigSyncRequest {
        client_id: cfg.client_id.clone(),
        group: cfg.group.clone(),
        config_version: String::new(),
        upstreams: link.upstreams.borrow().names(),
    };
    let mut client =
        TunnelServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    let bound = cfg.registration_timeout;
    match tokio::time::timeout(bound, client.config_sync(authed(cfg, req)?)).await {
        Err(_) => bail!("no answer to our first request within {bound:?} (registration_timeout)"),
        Ok(Err(status)) => Err(refusal(cfg, &status, "our first request")),
        Ok(Ok(resp)) => Ok(resp.into_inner()),
    }
}

/// Dials for the control connection of `split-connection` before giving up
/// on reaching the data connection's server.
const CONTROL_DIALS: usize = 4;

/// The control stream's own connection (`split-connection`), to the server
/// the session's first connection reached. Behind a balancer that spreads
/// connections, a second dial may land on another server, whose registry
/// would then hold a control stream without its data streams: it is dialled
/// again until it reaches the same server. After CONTROL_DIALS tries (a dial
/// that fails counts as one), the session carries control on its data
/// connection, as `split` does.
async fn control_connection(link: &Link, server_id: &str, data: &(Channel, LinkSlot)) -> (Channel, LinkSlot) {
    let mut last = String::new();
    for _ in 0..CONTROL_DIALS {
        let (channel, slot) = match connect(link).await {
            Ok(c) => c,
            Err(e) => {
                last = format!("{e:#}");
                continue;
            }
        };
        match hello(link, channel.clone()).await {
            Ok(other) if other.server_id == server_id => return (channel, slot),
            Ok(other) => last = format!("it reached server {:?}", other.server_id),
            Err(e) => last = format!("{e:#}"),
        }
        tracing::debug!(server = %link.key, "the control connection failed: {last}; dialling again");
    }
    tracing::warn!(
        server = %link.key,
        server_id,
        "no control connection of its own in {CONTROL_DIALS} dials (the last: {last}): this session carries control on its data connection; behind a balancer, balance by source address to keep a client's connections together"
    );
    data.clone()
}

/// A call the server answered with an error, in an operator's words.
fn refusal(cfg: &ClientConfig, status: &tonic::Status, what: &str) -> anyhow::Error {
    if status.code() == tonic::Code::Unauthenticated {
        return anyhow::anyhow!("server refused our token for group {:?}: {}", cfg.group, status.message());
    }
    let why = explain_link_error(status, cfg.tls.is_some(), Stage::Open);
    anyhow::anyhow!("server refused {what} ({:?}): {why}", status.code())
}

/// Runs one session to `link`'s server until the connection is lost
/// (error), the server drains, or `stop` fires (drain, then Ok).
pub async fn run(link: Arc<Link>, stop: CancellationToken) -> anyhow::Result<Ended> {
    let cfg = link.cfg.clone();
    // A stop (or this address leaving DNS) must not wait for a tarpit's connect_timeout.
    let setup = async {
        let data = connect(&link).await?;
        let first = hello(&link, data.0.clone()).await?;
        anyhow::Ok((data, first))
    };
    let ((data_channel, data_link), first) = tokio::select! {
        _ = stop.cancelled() => return Ok(Ended::Stopped),
        r = setup => r?,
    };
    let releases = link.claims.watch(&first.server_id);
    let claim: Claim = match link.claims.claim(&first.server_id, &link.key) {
        Ok(c) => c,
        Err(holder) => return Ok(Ended::Duplicate { server_id: first.server_id, holder, releases }),
    };
    drop(releases);
    let data = (data_channel.clone(), data_link.clone());
    let (control_channel, control_link) = match cfg.transport {
        Transport::SplitConnection => tokio::select! {
            _ = stop.cancelled() => return Ok(Ended::Stopped),
            c = control_connection(&link, &first.server_id, &data) => c,
        },
        _ => data,
    };
    link.update(|s| s.server_id = first.server_id.clone());
    let held_version = link.status().config_version;
    let session = Arc::new(Session {
        id: uuid::Uuid::new_v4().to_string(),
        started_ms: now_ms(),
        settings: watch::Sender::new(Settings {
            heartbeat_interval: cfg.heartbeat_interval,
            data_streams: cfg.data_streams,
            config_version: held_version,
        }),
        cancel: CancellationToken::new(),
        server_drained: AtomicBool::new(false),
        missing_warned: Mutex::new(Vec::new()),
        live: Mutex::new(HashMap::new()),
        draining: AtomicBool::new(false),
        failure: Mutex::new(None),
        drain_acked: Mutex::new(std::collections::HashSet::new()),
        link,
        data_link,
        control_link,
    });
    // The first streams open with the server's config in force.
    if adopt_config(&session, &first) {
        log_applied(&session, &first);
    }
    // Debug: with a server that refuses us after connecting, this repeats every retry.
    tracing::debug!(server = %session.link.key, session = %session.id, "connected");
    let mut tasks = JoinSet::new();
    match session.link.cfg.transport {
        Transport::Single => {
            tasks.spawn(stream_task(session.clone(), data_channel, Kind::Single, CancellationToken::new()));
        }
        Transport::Split | Transport::SplitConnection => {
            tasks.spawn(stream_task(session.clone(), control_channel, Kind::Control, CancellationToken::new()));
            tasks.spawn(supervise_data_streams(session.clone(), data_channel));
        }
    }
    let result = tokio::select! {
        _ = session.cancel.cancelled() => {
            if session.server_drained.load(Ordering::Relaxed) {
                Ok(Ended::ServerDrained)
            } else {
                let first = session.failure.lock().unwrap_or_else(|e| e.into_inner()).take();
                Err(anyhow::anyhow!(first.unwrap_or_else(|| "connection lost".into())))
            }
        }
        _ = stop.cancelled() => {
            drain(&session).await;
            Ok(Ended::Stopped)
        }
    };
    session.cancel.cancel();
    // Every task watches the session token: they end promptly, the data
    // streams with their supervisor, before the claim goes.
    while tasks.join_next().await.is_some() {}
    if matches!(result, Ok(Ended::ServerDrained)) {
        claim.ends_planned();
    }
    drop(claim);
    result
}

/// Tells the server we are draining, then waits (within the grace period)
/// for in-flight exchanges to finish.
async fn drain(session: &Session) {
    session.draining.store(true, Ordering::Relaxed);
    let streams: Vec<(String, Arc<Exchanges>)> = session
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(id, ex)| (id.clone(), ex.clone()))
        .collect();
    for (_, ex) in &streams {
        let msg = ex.message(
            "",
            Payload::Drain(Drain {
                reason: "client shutting down".into(),
                grace_ms: session.link.cfg.shutdown_grace.as_millis() as u64,
                ack_wanted: true,
                ..Default::default()
            }),
        );
        ex.outbound().try_priority(msg);
    }
    let started = Instant::now();
    let deadline = started + session.link.cfg.shutdown_grace;
    // Requests the server sent before it saw our drain are still on their
    // way: only its acknowledgement, which comes behind them, says a
    // stream is done receiving.
    let ack_deadline = started + DRAIN_ACK_WAIT.min(session.link.cfg.shutdown_grace);
    let mut quiet_since: Option<Instant> = None;
    loop {
        let acked = {
            let acks = session.drain_acked.lock().unwrap_or_else(|e| e.into_inner());
            let live = session.live.lock().unwrap_or_else(|e| e.into_inner());
            // A stream that ended during the drain has nothing more to receive.
            streams.iter().all(|(id, _)| acks.contains(id) || !live.contains_key(id))
        };
        let in_flight: usize = streams.iter().map(|(_, e)| e.in_flight()).sum();
        if in_flight == 0 && (acked || Instant::now() >= ack_deadline) {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= DRAIN_LINGER {
                if !acked {
                    tracing::warn!("the server did not acknowledge the drain within {DRAIN_ACK_WAIT:?}");
                }
                tracing::info!(took = ?started.elapsed(), "drained: no requests in flight");
                return;
            }
        } else {
            quiet_since = None;
        }
        if Instant::now() >= deadline {
            tracing::warn!(in_flight, "grace period over: cancelling the requests still in flight");
            for (_, ex) in &streams {
                // The server answers these 503 "shutting down", not "disconnected".
                ex.fail_all_to_peer(ErrorKind::ShuttingDown, "tunnel client shut down before the request finished");
            }
            // Give the error frames a moment to leave before the streams close.
            tokio::time::sleep(DRAIN_POLL).await;
            return;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// Keeps as many data streams as the config asks for; retires extra ones by
/// draining them. Owns the streams: it returns once they all ended.
async fn supervise_data_streams(session: Arc<Session>, channel: Channel) {
    let mut settings = session.settings.subscribe();
    let mut retire: Vec<CancellationToken> = Vec::new();
    let mut streams = JoinSet::new();
    loop {
        let want = settings.borrow_and_update().data_streams as usize;
        while retire.len() < want {
            let token = CancellationToken::new();
            retire.push(token.clone());
            streams.spawn(stream_task(session.clone(), channel.clone(), Kind::Data, token));
        }
        while retire.len() > want {
            if let Some(t) = retire.pop() {
                t.cancel();
            }
        }
        tokio::select! {
            _ = session.cancel.cancelled() => break,
            r = settings.changed() => if r.is_err() { break },
            Some(_) = streams.join_next() => {}
        }
    }
    // Every stream watches the session token.
    while streams.join_next().await.is_some() {}
}

/// Runs one stream; a data stream the server closes is reopened with a new id.
async fn stream_task(session: Arc<Session>, channel: Channel, kind: Kind, retire: CancellationToken) {
    loop {
        match run_stream(&session, channel.clone(), kind, &retire).await {
            Ok(End::Retired) => return,
            Ok(End::ClosedByServer)
                if kind == Kind::Data
                    && !session.cancel.is_cancelled()
                    && !session.draining.load(Ordering::Relaxed) =>
            {
                tokio::select! {
                    _ = session.cancel.cancelled() => return,
                    _ = tokio::time::sleep(REOPEN_DELAY) => continue,
                }
            }
            Ok(_) => {}
            Err(e) => {
                if !session.cancel.is_cancelled() {
                    // The session's error: the caller logs it, once per repeat window.
                    let text = format!("{kind:?} stream failed: {e:#}");
                    tracing::debug!("{text}");
                    session.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(text);
                }
            }
        }
        // The control stream, or a stream that could not be (re)opened: the session is over.
        session.cancel.cancel();
        return;
    }
}

enum End {
    Retired,
    ClosedByServer,
    SessionOver,
}

/// Keeps the fleet a clustered server sent (it sends the list only when ours is out of date).
fn learn_fleet(session: &Session, ack: &StreamOpenResponse) {
    if ack.fleet.is_empty() {
        return;
    }
    let servers: Vec<String> = ack.fleet.iter().map(|f| f.server_id.clone()).collect();
    tracing::debug!(server = %session.link.key, fleet_version = %ack.fleet_version, ?servers, "fleet membership");
    session.link.update(|s| {
        s.fleet = ack.fleet.clone();
        s.fleet_version = ack.fleet_version.clone();
    });
}

fn open_message(session: &Session, stream_id: &str, kind: Kind, seq: u64, last_rtt_ms: i64) -> TunnelMessage {
    let sample = match kind {
        Kind::Control => &session.control_link,
        Kind::Data | Kind::Single => &session.data_link,
    }
    .sample();
    let settings = session.settings.borrow();
    let now = now_ms();
    TunnelMessage {
        client_id: session.link.cfg.client_id.clone(),
        request_id: next_request_id(),
        direction: Direction::ClientToServer as i32,
        trace_id: String::new(),
        payload: Some(Payload::StreamOpen(StreamOpenRequest {
            client_id: session.link.cfg.client_id.clone(),
            group: session.link.cfg.group.clone(),
            version: tunnel_lib::VERSION.to_string(),
            stream_id: stream_id.to_string(),
            stream_type: match kind {
                Kind::Control => StreamType::Control,
                Kind::Data | Kind::Single => StreamType::Http,
            } as i32,
            timestamp: now / 1000,
            timestamp_ms: now,
            sequence: seq,
            session_id: session.id.clone(),
            session_started_ms: session.started_ms,
            config_version: settings.config_version.clone(),
            last_rtt_ms,
            fleet_version: session.link.status().fleet_version,
            header_block: true,
            // The options with the registration only: they do not change.
            // (The dialer fills the slot before any stream opens.)
            link_options: sample.filter(|_| seq == 0).map(|s| s.options.to_proto(&session.link.cfg.link_tuning)),
            link_counters: sample.map(|s| s.counters.to_proto()),
        })),
    }
}

fn sync_message(session: &Session) -> TunnelMessage {
    TunnelMessage {
        client_id: session.link.cfg.client_id.clone(),
        request_id: next_request_id(),
        direction: Direction::ClientToServer as i32,
        trace_id: String::new(),
        payload: Some(Payload::ConfigSync(ConfigSyncRequest {
            client_id: session.link.cfg.client_id.clone(),
            group: session.link.cfg.group.clone(),
            config_version: session.settings.borrow().config_version.clone(),
            upstreams: session.link.upstreams.borrow().names(),
        })),
    }
}

fn authed<T>(cfg: &ClientConfig, msg: T) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    let md = req.metadata_mut();
    md.insert(
        "authorization",
        format!("Bearer {}", cfg.token.expose())
            .parse()
            .map_err(|_| anyhow::anyhow!("token has characters not allowed in a header"))?,
    );
    md.insert(
        GROUP_METADATA,
        cfg.group.parse().map_err(|_| anyhow::anyhow!("group has characters not allowed in a header"))?,
    );
    Ok(req)
}

async fn run_stream(
    session: &Arc<Session>,
    channel: Channel,
    kind: Kind,
    retire: &CancellationToken,
) -> anyhow::Result<End> {
    let stream_id = uuid::Uuid::new_v4().to_string();
    let cancel = session.cancel.child_token();
    // Closing the outbound ends our half of the RPC whenever this function returns.
    let _close = cancel.clone().drop_guard();
    let (out, outbound) = Outbound::new(cancel.clone());
    let exchanges = Exchanges::new(out.clone(), Role::Client, session.link.cfg.client_id.clone());
    out.try_priority(open_message(session, &stream_id, kind, 0, -1));
    // The session began with the config (its hello); this sync marks the
    // stream as the one the server pushes config on.
    if kind != Kind::Data {
        out.try_priority(sync_message(session));
    }
    let mut client =
        TunnelServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE).max_encoding_message_size(MAX_MESSAGE);
    let req = authed(&session.link.cfg, outbound)?;
    let bound = session.link.cfg.registration_timeout;
    let call = async {
        match kind {
            Kind::Control => client.control_stream(req).await,
            _ => client.proxy(req).await,
        }
    };
    // A session that ends while this stream registers must not register it late.
    let call = async {
        tokio::select! {
            _ = session.cancel.cancelled() => Ok(Err(tonic::Status::cancelled("session ended"))),
            r = tokio::time::timeout(bound, call) => r,
        }
    };
    let mut inbound = match call.await {
        Err(_) => bail!("no answer to registration within {bound:?}"),
        Ok(Err(status)) => return Err(refusal(&session.link.cfg, &status, "the stream")),
        Ok(Ok(resp)) => resp.into_inner(),
    };
    let first = tokio::select! {
        _ = session.cancel.cancelled() => bail!("session ended"),
        r = tokio::time::timeout(bound, inbound.message()) => r
            .map_err(|_| anyhow::anyhow!("no registration acknowledgement within {bound:?}"))??,
    };
    let first_rtt = match first.and_then(|m| m.payload) {
        Some(Payload::StreamOpenResponse(r)) if r.accepted => {
            exchanges.set_inline_body(r.inline_body);
            exchanges.set_header_block(r.header_block);
            session.link.update(|s| {
                s.registered_streams += 1;
                s.registrations += 1;
            });
            learn_fleet(session, &r);
            session.link.metrics.registrations.inc();
            now_ms() - r.echo_timestamp_ms
        }
        Some(Payload::StreamOpenResponse(r)) => bail!("registration refused: {}", r.reason),
        _ => bail!("the server's first message was not a registration acknowledgement"),
    };
    tracing::info!(server = %session.link.key, stream = %stream_id, kind = ?kind, "stream registered");
    if kind != Kind::Control {
        session.live.lock().unwrap_or_else(|e| e.into_inner()).insert(stream_id.clone(), exchanges.clone());
    }
    let stream = Registered { stream_id: &stream_id, kind, out: &out, exchanges: &exchanges };
    let end = stream_loop(session, stream, &mut inbound, retire, first_rtt).await;
    session.live.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream_id);
    session.drain_acked.lock().unwrap_or_else(|e| e.into_inner()).remove(&stream_id);
    session.link.update(|s| s.registered_streams = s.registered_streams.saturating_sub(1));
    exchanges.fail_all(ExchangeFailure::StreamLost);
    Ok(end)
}

/// A registered stream, as its loop uses it.
struct Registered<'a> {
    stream_id: &'a str,
    kind: Kind,
    out: &'a Outbound,
    exchanges: &'a Arc<Exchanges>,
}

async fn stream_loop(
    session: &Arc<Session>,
    stream: Registered<'_>,
    inbound: &mut tonic::Streaming<TunnelMessage>,
    retire: &CancellationToken,
    first_rtt: i64,
) -> End {
    let Registered { stream_id, kind, out, exchanges } = stream;
    let mut settings = session.settings.subscribe();
    let mut interval = settings.borrow_and_update().heartbeat_interval;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    // The registration counts as the first heartbeat.
    let mut last_beat = tokio::time::Instant::now();
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    let mut last_rtt = first_rtt;
    let mut retiring: Option<Instant> = None;
    loop {
        if let Some(since) = retiring {
            let acked = session.drain_acked.lock().unwrap_or_else(|e| e.into_inner()).contains(stream_id);
            let settled = acked || since.elapsed() > DRAIN_ACK_WAIT;
            if (exchanges.in_flight() == 0 && settled) || since.elapsed() > session.link.cfg.shutdown_grace {
                tracing::info!(stream = %stream_id, "retired data stream closed");
                return End::Retired;
            }
        }
        tokio::select! {
            _ = session.cancel.cancelled() => return End::SessionOver,
            _ = retire.cancelled(), if retiring.is_none() => {
                let msg = exchanges.message("", Payload::Drain(Drain { reason: "fewer data streams configured".into(), ack_wanted: true, ..Default::default() }));
                out.try_priority(msg);
                retiring = Some(Instant::now());
            }
            _ = tokio::time::sleep(DRAIN_POLL), if retiring.is_some() => {}
            _ = tick.tick() => {
                seq += 1;
                last_beat = tokio::time::Instant::now();
                if !out.try_priority(open_message(session, stream_id, kind, seq, last_rtt)) {
                    tracing::warn!(stream = %stream_id, "priority queue full: heartbeat not sent");
                }
            }
            r = settings.changed() => {
                if r.is_err() { return End::SessionOver; }
                let now = settings.borrow_and_update().heartbeat_interval;
                if now != interval {
                    interval = now;
                    // From the last heartbeat, not from now: config changes in
                    // quick succession must not keep pushing the next one out
                    // (the server would reap a stream that kept quiet that long).
                    let next = (last_beat + interval).max(tokio::time::Instant::now());
                    tick = tokio::time::interval_at(next, interval);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                }
            }
            m = inbound.message() => match m {
                Ok(Some(m)) => {
                    if let Some(rtt) = on_message(session, stream_id, kind, out, exchanges, m) {
                        last_rtt = rtt;
                    }
                }
                Ok(None) => {
                    tracing::info!(stream = %stream_id, "stream closed by server");
                    return End::ClosedByServer;
                }
                Err(status) => {
                    tracing::info!(stream = %stream_id, "stream lost: {}", status.message());
                    return End::ClosedByServer;
                }
            },
        }
    }
}

fn on_message(
    session: &Arc<Session>,
    stream_id: &str,
    kind: Kind,
    out: &Outbound,
    exchanges: &Arc<Exchanges>,
    m: TunnelMessage,
) -> Option<i64> {
    if m.direction != Direction::ServerToClient as i32 {
        tracing::warn!(stream = %stream_id, direction = m.direction, "message marked with the wrong direction; dropped");
        return None;
    }
    let Some(payload) = &m.payload else {
        tracing::warn!(stream = %stream_id, request_id = %m.request_id, "message with no payload; dropped");
        return None;
    };
    match payload {
        Payload::StreamOpenResponse(ack) => {
            let rtt = now_ms() - ack.echo_timestamp_ms;
            session.link.metrics.heartbeat_rtt.observe(rtt.max(0) as f64 / 1000.0);
            tracing::debug!(stream = %stream_id, seq = ack.sequence, rtt_ms = rtt, "heartbeat acknowledged");
            learn_fleet(session, ack);
            if kind != Kind::Data
                && !ack.config_version.is_empty()
                && ack.config_version != session.settings.borrow().config_version
            {
                // The server holds a config we have not applied (a push was lost): ask for it.
                out.try_priority(sync_message(session));
            }
            return Some(rtt);
        }
        Payload::ConfigSyncResponse(resp) => apply_config(session, stream_id, out, kind, resp),
        Payload::Drain(d) if d.ack => {
            tracing::debug!(stream = %stream_id, "the server acknowledged our drain");
            session.drain_acked.lock().unwrap_or_else(|e| e.into_inner()).insert(stream_id.to_string());
        }
        Payload::Drain(d) => {
            // Every stream hears it: one line per session.
            if !session.server_drained.swap(true, Ordering::Relaxed) {
                tracing::info!(server = %session.link.key, reason = %d.reason, "server is draining; this session ends");
            }
            session.cancel.cancel();
        }
        Payload::StreamOpen(_) | Payload::ConfigSync(_) | Payload::HttpResponse(_) => {
            tracing::warn!(stream = %stream_id, payload = payload_name(payload), "client-bound message of a client-sent kind; dropped");
        }
        _ if kind == Kind::Control => {
            tracing::warn!(stream = %stream_id, payload = payload_name(payload), "exchange frame on the control stream; dropped");
        }
        _ => {
            if let Dispatched::NewRequest(new) = exchanges.dispatch(m) {
                // Owned by the exchange: ends when it completes or is cancelled
                // (stream loss cancels every exchange on the stream).
                let upstreams = session.link.upstreams.borrow().clone();
                // Boxed: the exchange's future is several KiB, and tokio
                // moves a future it is given by value three or four times
                // before first polling it (a fifth of the client's
                // instructions per small request were those copies).
                tokio::spawn(Box::pin(upstream::serve(upstreams, exchanges.clone(), *new)));
            }
        }
    }
    None
}

fn apply_config(session: &Session, stream_id: &str, out: &Outbound, kind: Kind, resp: &ConfigSyncResponse) {
    if adopt_config(session, resp) {
        log_applied(session, resp);
        // Acknowledge at once with a heartbeat naming the new version.
        out.try_priority(open_message(session, stream_id, kind, 0, -1));
    }
}

/// Puts the server's config in force for this session; true if it changed anything.
fn adopt_config(session: &Session, resp: &ConfigSyncResponse) -> bool {
    let Some(cfg) = &resp.config else {
        tracing::warn!(server = %session.link.key, "config response without a config; dropped");
        return false;
    };
    // Once per session and list: the hello and the stream's sync both carry it.
    let mut warned = session.missing_warned.lock().unwrap_or_else(|e| e.into_inner());
    if !resp.missing_upstreams.is_empty() && *warned != resp.missing_upstreams {
        tracing::warn!(server = %session.link.key, missing = ?resp.missing_upstreams, "the server routes to upstreams this client does not have; add them to [upstreams] in client.toml");
    }
    *warned = resp.missing_upstreams.clone();
    drop(warned);
    let interval = Duration::from_millis(cfg.heartbeat_interval_ms).max(tunnel_lib::config::MIN_HEARTBEAT_INTERVAL);
    let streams = cfg.data_streams.clamp(1, tunnel_lib::config::MAX_DATA_STREAMS);
    session.settings.send_if_modified(|s| {
        let new = Settings {
            heartbeat_interval: interval,
            data_streams: streams,
            config_version: resp.config_version.clone(),
        };
        let changed = *s != new;
        *s = new;
        changed
    })
}

fn log_applied(session: &Session, resp: &ConfigSyncResponse) {
    let s = session.settings.borrow().clone();
    tracing::info!(server = %session.link.key, version = %resp.config_version, heartbeat_interval = ?s.heartbeat_interval, data_streams = s.data_streams, "config applied");
    session.link.config_applied(&resp.config_version);
}

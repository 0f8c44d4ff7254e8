//! The console's state and how keys and server updates change it. No I/O
//! here: keys become [`Action`]s, [`update`] applies them and returns the
//! [`Steer`] (if any) for the network task of the server that owns the row.

use crate::inspect::RequestFilter;
use crate::model::{ConnState, Fleet};
use crate::traffic::{subject_name, summary, Key, Series};
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use std::cmp::Reverse;
use std::collections::VecDeque;
use tunnel_lib::introspection::{
    Capture, ClientInfo, Event, EventKind, RequestInfo, StreamInfo, TrafficSubject, WatchUpdate,
};

/// Seconds the tables' "now" figures (req/s, error shares, p99) cover.
pub const SUMMARY_SPAN: usize = 10;

/// The views, in Tab order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Streams,
    Clients,
    Requests,
    /// Traffic over time: the server, groups, clients and rules, and charts of the selected one.
    Traffic,
    /// The timeline: connections, reaps, config pushes and acks, reloads, drains.
    Events,
}

impl View {
    pub const ALL: [View; 5] = [View::Streams, View::Clients, View::Requests, View::Traffic, View::Events];

    pub fn title(self) -> &'static str {
        match self {
            View::Streams => "Streams",
            View::Clients => "Clients",
            View::Requests => "Requests",
            View::Traffic => "Traffic",
            View::Events => "Events",
        }
    }

    fn next(self) -> View {
        let i = View::ALL.iter().position(|v| *v == self).unwrap_or(0);
        View::ALL[(i + 1) % View::ALL.len()]
    }

    fn prev(self) -> View {
        let i = View::ALL.iter().position(|v| *v == self).unwrap_or(0);
        View::ALL[(i + View::ALL.len() - 1) % View::ALL.len()]
    }
}

/// Orders of the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Streams and clients by client id; requests newest first; traffic by subject.
    Natural,
    /// Oldest heartbeat first (streams); slowest first (requests, traffic's p99).
    Age,
    /// Deepest queue first (streams); by group (clients); by status
    /// (requests); busiest first (traffic).
    Load,
}

impl Sort {
    fn next(self) -> Sort {
        match self {
            Sort::Natural => Sort::Age,
            Sort::Age => Sort::Load,
            Sort::Load => Sort::Natural,
        }
    }

    /// The sort's name in `view`.
    pub fn label(self, view: View) -> &'static str {
        match (view, self) {
            (View::Streams | View::Clients, Sort::Natural) => "client",
            (View::Requests, Sort::Natural) => "newest",
            (View::Streams, Sort::Age) => "heartbeat age",
            (View::Clients, Sort::Age) => "connected",
            (View::Requests, Sort::Age) => "duration",
            (View::Streams, Sort::Load) => "queue",
            (View::Clients, Sort::Load) => "group",
            (View::Requests, Sort::Load) => "status",
            (View::Traffic, Sort::Natural) => "subject",
            (View::Traffic, Sort::Age) => "p99",
            (View::Traffic, Sort::Load) => "req/s",
            (View::Events, Sort::Natural) => "newest",
            (View::Events, Sort::Age) => "client",
            (View::Events, Sort::Load) => "kind",
        }
    }
}

/// A destructive action waiting for y/n, on the server (fleet index) that owns the row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    CloseStream { server: usize, stream_id: String, client_id: String },
    CloseClient { server: usize, client_id: String },
}

/// What the console asks a server to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ResyncClient(String),
    ResyncGroup(String),
    CloseStream(String),
    CloseClient(String),
    /// A request's capture (its bodies), by request id.
    Capture(String),
    /// Send a captured request again; `force` past the refusal of a
    /// request that is not idempotent or whose body was cut.
    Replay {
        request_id: String,
        force: bool,
    },
}

impl Command {
    /// The action that reports this command failing with `why`.
    pub fn failed(&self, server: usize, why: String) -> Action {
        match self {
            Command::Capture(id) => Action::Captured(server, id.clone(), Err(why)),
            Command::Replay { request_id, .. } => Action::Replayed(server, request_id.clone(), Err(why)),
            _ => Action::CommandDone(server, Err(why)),
        }
    }
}

/// A capture the console asked for: on its way, here, or refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Fetched {
    Pending,
    Got(Box<Capture>),
    Failed(String),
}

/// A replay from the console and how it went.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayState {
    /// The server's fleet index and the replayed request's id.
    pub server: usize,
    pub request_id: String,
    pub outcome: Fetched,
}

/// Captures kept by the console (the selected request's, and a few before).
const KEPT_CAPTURES: usize = 32;

/// A command and the server (fleet index) it goes to: the one that owns the selected row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Steer {
    /// The server's fleet index.
    pub server: usize,
    /// What to ask of it.
    pub command: Command,
}

/// Everything that can change the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Up,
    Down,
    Top,
    Bottom,
    NextView,
    PrevView,
    StartFilter,
    FilterChar(char),
    FilterBackspace,
    EndFilter,
    ClearFilter,
    CycleSort,
    ToggleDetail,
    Resync,
    ResyncGroup,
    AskCloseStream,
    AskCloseClient,
    ConfirmYes,
    ConfirmNo,
    ToggleHelp,
    /// Replay the selected request (`true`: even when it needs confirming).
    Replay(bool),
    /// A curl line for the selected request: shown, and copied (OSC 52).
    CopyCurl,
    /// Scroll the detail pane by lines (negative: up).
    Scroll(i32),
    /// A tab clicked.
    ShowView(View),
    /// A row clicked: its index in `App::rows`.
    Select(usize),
    Back,
    Quit,
    /// From the network task of the server at this fleet index.
    Update(usize, Box<WatchUpdate>),
    Conn(usize, ConnState),
    CommandDone(usize, Result<String, String>),
    /// A capture asked for, by request id.
    Captured(usize, String, Result<Box<Capture>, String>),
    /// A replay's new request, by the replayed request's id.
    Replayed(usize, String, Result<Box<Capture>, String>),
    /// The clock moved (local unix ms).
    Tick(i64),
}

/// A row's identity: its server's fleet index and its id there (stream id,
/// client id, request seq), so equal ids on two servers never collide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowKey {
    /// The server's fleet index.
    pub server: usize,
    /// The row's id on that server.
    pub id: String,
}

/// The console's state.
#[derive(Debug, Clone)]
pub struct App {
    /// Every watched server: its address, link and what it last said.
    pub fleet: Fleet,
    pub view: View,
    pub sort: Sort,
    pub filter: String,
    pub editing_filter: bool,
    /// Selected row, by key, so it stays put as rows change.
    pub selected: Option<RowKey>,
    pub detail: bool,
    pub help: bool,
    pub confirm: Option<Confirm>,
    /// The last command's outcome and when it came (local ms), shown in the footer for a while.
    pub notice: Option<(Result<String, String>, i64)>,
    /// Local unix ms: the injected clock every age is computed from.
    pub now_ms: i64,
    /// Charts and sparklines in ASCII (`--ascii`, or a locale that is not UTF-8).
    pub ascii: bool,
    /// No colours (`NO_COLOR` set): bold, reverse video and the marker stay.
    pub no_color: bool,
    /// Captures fetched, by (server, request id), oldest first.
    pub captures: VecDeque<((usize, String), Fetched)>,
    /// The last replay, shown in the detail pane of the request it replayed.
    pub replay: Option<ReplayState>,
    /// The last curl line made with `y`, for the detail pane.
    pub curl: Option<String>,
    /// Text for the terminal's clipboard (OSC 52), taken by the drawing loop.
    pub clipboard: Option<String>,
    /// Lines the detail pane is scrolled down.
    pub scroll: u16,
    /// Clock times in UTC; otherwise in the local zone (what `tunnel-tui`
    /// shows unless given `--utc`). UTC from [`App::new`], so that screens
    /// drawn in tests are the same on every machine.
    pub utc: bool,
    pub quit: bool,
}

/// One row of the current view: the owning server's fleet index and the item.
pub enum RowRef<'a> {
    Stream(usize, &'a StreamInfo),
    Client(usize, &'a ClientInfo),
    Request(usize, &'a RequestInfo),
    /// A subject of the Traffic view and its per-second series.
    Subject(usize, &'a Key, &'a Series),
    Event(usize, &'a Event),
}

impl RowRef<'_> {
    /// The fleet index of the server the row came from.
    pub fn server(&self) -> usize {
        match self {
            RowRef::Stream(i, _)
            | RowRef::Client(i, _)
            | RowRef::Request(i, _)
            | RowRef::Subject(i, _, _)
            | RowRef::Event(i, _) => *i,
        }
    }

    /// The row's key, for selection.
    pub fn key(&self) -> RowKey {
        let id = match self {
            RowRef::Stream(_, s) => s.stream_id.clone(),
            RowRef::Client(_, c) => c.client_id.clone(),
            RowRef::Request(_, r) => r.seq.to_string(),
            RowRef::Subject(_, (subject, name), _) => format!("{}:{name}", subject_name(*subject)),
            RowRef::Event(_, e) => e.seq.to_string(),
        };
        RowKey { server: self.server(), id }
    }

    fn client_id(&self) -> &str {
        match self {
            RowRef::Stream(_, s) => &s.client_id,
            RowRef::Client(_, c) => &c.client_id,
            RowRef::Request(_, r) => &r.client_id,
            RowRef::Subject(_, (TrafficSubject::Client, name), _) => name,
            RowRef::Subject(..) => "",
            RowRef::Event(_, e) => &e.client_id,
        }
    }
}

impl App {
    /// A console for the servers at `servers` (addresses as given), with the clock at `now_ms`.
    pub fn new<S: Into<String>>(servers: impl IntoIterator<Item = S>, now_ms: i64) -> Self {
        App {
            fleet: Fleet::new(servers),
            view: View::Streams,
            sort: Sort::Natural,
            filter: String::new(),
            editing_filter: false,
            selected: None,
            detail: false,
            help: false,
            confirm: None,
            notice: None,
            now_ms,
            ascii: false,
            no_color: false,
            captures: VecDeque::new(),
            replay: None,
            curl: None,
            clipboard: None,
            scroll: 0,
            utc: true,
            quit: false,
        }
    }

    /// Whether the row's fields (and, with several servers, its SERVER cell) match the filter.
    fn matches(&self, server: usize, fields: &[&str]) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let f = self.filter.to_lowercase();
        let hit = |x: &str| x.to_lowercase().contains(&f);
        fields.iter().any(|x| hit(x)) || (self.fleet.is_fleet() && hit(self.fleet.label(server)))
    }

    /// The rows of the current view, from every server, filtered and sorted.
    pub fn rows(&self) -> Vec<RowRef<'_>> {
        let servers = || self.fleet.servers.iter().enumerate();
        match self.view {
            View::Streams => {
                let mut v: Vec<(usize, &StreamInfo)> = servers()
                    .flat_map(|(i, w)| w.model.streams.values().map(move |s| (i, s)))
                    .filter(|(i, s)| {
                        let ty = crate::ui::stream_type_name(s.stream_type);
                        self.matches(*i, &[&s.stream_id, &s.client_id, &s.group, ty, &s.peer])
                    })
                    .collect();
                // A client's rows on every server sit together, server by server.
                match self.sort {
                    Sort::Natural => v.sort_by(|(i, a), (j, b)| {
                        (&a.client_id, i, a.stream_type, &a.stream_id).cmp(&(
                            &b.client_id,
                            j,
                            b.stream_type,
                            &b.stream_id,
                        ))
                    }),
                    Sort::Age => v.sort_by(|(i, a), (j, b)| {
                        (a.last_heartbeat_unix_ms, &a.stream_id, i).cmp(&(b.last_heartbeat_unix_ms, &b.stream_id, j))
                    }),
                    Sort::Load => v.sort_by(|(_, a), (_, b)| {
                        b.queue_depth.cmp(&a.queue_depth).then(b.in_flight.cmp(&a.in_flight))
                    }),
                }
                v.into_iter().map(|(i, s)| RowRef::Stream(i, s)).collect()
            }
            View::Clients => {
                let mut v: Vec<(usize, &ClientInfo)> = servers()
                    .flat_map(|(i, w)| w.model.clients.values().map(move |c| (i, c)))
                    .filter(|(i, c)| self.matches(*i, &[&c.client_id, &c.group, &c.peer, &c.version]))
                    .collect();
                match self.sort {
                    Sort::Natural => v.sort_by(|(i, a), (j, b)| (&a.client_id, i).cmp(&(&b.client_id, j))),
                    Sort::Age => v.sort_by_key(|(_, c)| c.connected_unix_ms),
                    Sort::Load => {
                        v.sort_by(|(i, a), (j, b)| (&a.group, &a.client_id, i).cmp(&(&b.group, &b.client_id, j)))
                    }
                }
                v.into_iter().map(|(i, c)| RowRef::Client(i, c)).collect()
            }
            View::Requests => {
                let filter = RequestFilter::parse(&self.filter);
                let fleet = self.fleet.is_fleet();
                let mut v: Vec<(usize, &RequestInfo)> = servers()
                    .flat_map(|(i, w)| w.model.requests.iter().map(move |r| (i, r)))
                    .filter(|(i, r)| {
                        let label = if fleet { self.fleet.label(*i) } else { "" };
                        filter.matches(r, &[label])
                    })
                    .collect();
                match self.sort {
                    Sort::Natural => {
                        v.reverse();
                        // Each server's log is in its own order; across servers only the clock orders them.
                        if self.fleet.is_fleet() {
                            v.sort_by_key(|(i, r)| (Reverse(r.unix_ms), *i));
                        }
                    }
                    Sort::Age => v.sort_by_key(|(_, r)| Reverse(r.duration_ms)),
                    Sort::Load => v.sort_by(|(i, a), (j, b)| (b.status, b.seq, j).cmp(&(a.status, a.seq, i))),
                }
                v.into_iter().map(|(i, r)| RowRef::Request(i, r)).collect()
            }
            View::Traffic => {
                let mut v: Vec<(usize, &Key, &Series)> = servers()
                    .flat_map(|(i, w)| w.model.traffic.seconds.iter().map(move |(k, s)| (i, k, s)))
                    .filter(|(i, (subject, name), _)| self.matches(*i, &[subject_name(*subject), name]))
                    .collect();
                let now = |s: &Series| summary(s, SUMMARY_SPAN, 1.0);
                match self.sort {
                    // Server, groups, clients, rules (the enum's order), then by name.
                    Sort::Natural => {
                        v.sort_by(|(i, a, _), (j, b, _)| (a.0 as i32, &a.1, i).cmp(&(b.0 as i32, &b.1, j)))
                    }
                    Sort::Age => v.sort_by_key(|(_, _, s)| Reverse(now(s).p99_us)),
                    Sort::Load => {
                        v.sort_by(|(_, _, a), (_, _, b)| now(b).requests_per_s.total_cmp(&now(a).requests_per_s))
                    }
                }
                v.into_iter().map(|(i, k, s)| RowRef::Subject(i, k, s)).collect()
            }
            View::Events => {
                let mut v: Vec<(usize, &Event)> = servers()
                    .flat_map(|(i, w)| w.model.events.iter().map(move |e| (i, e)))
                    .filter(|(i, e)| {
                        self.matches(*i, &[event_kind_name(e.kind), &e.client_id, &e.group, &e.stream_id, &e.detail])
                    })
                    .collect();
                match self.sort {
                    // Across servers only the clock orders them; on one, its own order.
                    Sort::Natural => v.sort_by_key(|(i, e)| (Reverse(e.unix_ms), Reverse(e.seq), *i)),
                    Sort::Age => v.sort_by(|(i, a), (j, b)| {
                        (&a.client_id, Reverse(a.unix_ms), i).cmp(&(&b.client_id, Reverse(b.unix_ms), j))
                    }),
                    Sort::Load => v.sort_by_key(|(i, e)| (e.kind, Reverse(e.unix_ms), *i)),
                }
                v.into_iter().map(|(i, e)| RowRef::Event(i, e)).collect()
            }
        }
    }

    /// Index of the selected row (the first row when none is selected).
    pub fn selected_index(&self, rows: &[RowRef<'_>]) -> usize {
        self.selected.as_ref().and_then(|k| rows.iter().position(|r| &r.key() == k)).unwrap_or(0)
    }

    /// The selected row.
    pub fn selected_row(&self) -> Option<RowRef<'_>> {
        let rows = self.rows();
        let i = self.selected_index(&rows);
        rows.into_iter().nth(i)
    }

    fn move_selection(&mut self, to: impl Fn(usize, usize) -> usize) {
        let key = {
            let rows = self.rows();
            if rows.is_empty() {
                None
            } else {
                let i = to(self.selected_index(&rows), rows.len()).min(rows.len() - 1);
                Some(rows[i].key())
            }
        };
        self.selected = key;
    }

    /// The capture fetched for request `id` of server `server`.
    pub fn capture(&self, server: usize, id: &str) -> Option<&Fetched> {
        self.captures.iter().rev().find(|((s, i), _)| *s == server && i == id).map(|(_, f)| f)
    }

    fn set_capture(&mut self, server: usize, id: String, f: Fetched) {
        self.captures.retain(|((s, i), _)| !(*s == server && *i == id));
        if self.captures.len() == KEPT_CAPTURES {
            self.captures.pop_front();
        }
        self.captures.push_back(((server, id), f));
    }

    /// The selected request, with its server, when the Requests view shows one.
    pub fn selected_request(&self) -> Option<(usize, RequestInfo)> {
        match self.selected_row()? {
            RowRef::Request(i, r) => Some((i, r.clone())),
            _ => None,
        }
    }

    /// Asks for the bodies of the request in the open detail pane, once,
    /// when its rule keeps them and its server is up.
    fn want_capture(&mut self) -> Option<Steer> {
        if !self.detail || self.view != View::Requests {
            return None;
        }
        let (server, r) = self.selected_request()?;
        let bodies = r.head.as_ref().is_some_and(|h| h.bodies);
        // Asked again after a failure, when the operator comes back to it.
        let asked = matches!(self.capture(server, &r.request_id), Some(Fetched::Pending | Fetched::Got(_)));
        if !bodies || asked || !self.fleet.get(server)?.is_up() {
            return None;
        }
        self.set_capture(server, r.request_id.clone(), Fetched::Pending);
        Some(Steer { server, command: Command::Capture(r.request_id) })
    }

    /// The curl line for the selected request, with its kept body.
    fn curl_line(&self) -> Result<String, String> {
        let (server, r) = self.selected_request().ok_or("select a request in the Requests view")?;
        let head = r.head.as_ref().ok_or("this request's head was not kept (the server keeps the last 256)")?;
        let body = match self.capture(server, &r.request_id) {
            Some(Fetched::Got(c)) => Some((c.request_body.as_ref(), c.request_body_size)),
            _ => None,
        };
        Ok(crate::inspect::curl(&r, head, body))
    }

    /// The selected row's server, if its link is up; otherwise says why in the footer.
    fn live_server_of_selection(&mut self) -> Option<(usize, String)> {
        let (server, client) = {
            let row = self.selected_row()?;
            (row.server(), row.client_id().to_string())
        };
        if self.fleet.get(server).is_some_and(|w| w.is_up()) {
            return Some((server, client));
        }
        let why = format!("not connected to {}: its rows are from before", self.fleet.label(server));
        self.notice = Some((Err(why), self.now_ms));
        None
    }
}

/// How the Events view names an event's kind.
pub fn event_kind_name(kind: i32) -> &'static str {
    match EventKind::try_from(kind) {
        Ok(EventKind::Connected) => "connected",
        Ok(EventKind::Reconnected) => "reconnected",
        Ok(EventKind::Disconnected) => "disconnected",
        Ok(EventKind::Reaped) => "reaped",
        Ok(EventKind::ConfigPushed) => "config pushed",
        Ok(EventKind::ConfigAcked) => "config acked",
        Ok(EventKind::Reloaded) => "reloaded",
        Ok(EventKind::ReloadRefused) => "reload refused",
        Ok(EventKind::Draining) => "draining",
        Ok(EventKind::ClosedFromConsole) => "closed (console)",
        Ok(EventKind::ResyncFromConsole) => "resync (console)",
        Ok(EventKind::Revoked) => "revoked",
        _ => "?",
    }
}

/// Maps a key to an action, given what is on screen (a dialog or the filter takes keys first).
pub fn on_key(app: &App, key: KeyEvent) -> Option<Action> {
    if key.modifiers.contains(KeyModifiers::CONTROL) && matches!(key.code, KeyCode::Char('c')) {
        return Some(Action::Quit);
    }
    if app.confirm.is_some() {
        return match key.code {
            KeyCode::Char('y') | KeyCode::Char('Y') => Some(Action::ConfirmYes),
            KeyCode::Char('n') | KeyCode::Char('N') | KeyCode::Esc => Some(Action::ConfirmNo),
            _ => None,
        };
    }
    if app.editing_filter {
        return match key.code {
            KeyCode::Enter => Some(Action::EndFilter),
            KeyCode::Esc => Some(Action::ClearFilter),
            KeyCode::Backspace => Some(Action::FilterBackspace),
            KeyCode::Char(c) => Some(Action::FilterChar(c)),
            _ => None,
        };
    }
    if app.help {
        return match key.code {
            KeyCode::Char('q') => Some(Action::Quit),
            _ => Some(Action::ToggleHelp),
        };
    }
    Some(match key.code {
        KeyCode::Up | KeyCode::Char('k') => Action::Up,
        KeyCode::Down | KeyCode::Char('j') => Action::Down,
        KeyCode::Home | KeyCode::Char('g') => Action::Top,
        KeyCode::End | KeyCode::Char('G') => Action::Bottom,
        KeyCode::Tab | KeyCode::Right | KeyCode::Char('l') => Action::NextView,
        KeyCode::BackTab | KeyCode::Left | KeyCode::Char('h') => Action::PrevView,
        KeyCode::Char('/') => Action::StartFilter,
        KeyCode::Char('s') => Action::CycleSort,
        KeyCode::Enter => Action::ToggleDetail,
        KeyCode::Char('r') => Action::Resync,
        KeyCode::Char('R') => Action::ResyncGroup,
        KeyCode::Char('x') => Action::AskCloseStream,
        KeyCode::Char('X') => Action::AskCloseClient,
        KeyCode::Char('?') => Action::ToggleHelp,
        KeyCode::Char('p') => Action::Replay(false),
        KeyCode::Char('P') => Action::Replay(true),
        KeyCode::Char('y') => Action::CopyCurl,
        KeyCode::PageDown => Action::Scroll(10),
        KeyCode::PageUp => Action::Scroll(-10),
        KeyCode::Esc => Action::Back,
        KeyCode::Char('q') => Action::Quit,
        _ => return None,
    })
}

/// Applies an action; returns what to ask which server, if anything.
pub fn update(app: &mut App, action: Action) -> Option<Steer> {
    let moved = matches!(
        action,
        Action::Up
            | Action::Down
            | Action::Top
            | Action::Bottom
            | Action::NextView
            | Action::PrevView
            | Action::ToggleDetail
            | Action::ShowView(_)
            | Action::Select(_)
    );
    if moved {
        app.scroll = 0;
        app.curl = None;
    }
    let arrived = matches!(action, Action::Update(..));
    let steer = apply(app, action);
    if app.detail && app.selected.is_none() {
        // The pane stays on its row while new ones arrive above it.
        app.selected = app.selected_row().map(|r| r.key());
    }
    if moved || arrived {
        return steer.or_else(|| app.want_capture());
    }
    steer
}

fn apply(app: &mut App, action: Action) -> Option<Steer> {
    match action {
        Action::Up => app.move_selection(|i, _| i.saturating_sub(1)),
        Action::Down => app.move_selection(|i, _| i + 1),
        Action::Top => app.move_selection(|_, _| 0),
        Action::Bottom => app.move_selection(|_, n| n.saturating_sub(1)),
        Action::NextView | Action::PrevView => {
            app.view = if action == Action::NextView { app.view.next() } else { app.view.prev() };
            app.selected = None;
            app.detail = false;
        }
        Action::StartFilter => app.editing_filter = true,
        Action::FilterChar(c) => app.filter.push(c),
        Action::FilterBackspace => {
            app.filter.pop();
        }
        Action::EndFilter => app.editing_filter = false,
        Action::ClearFilter => {
            app.filter.clear();
            app.editing_filter = false;
        }
        Action::CycleSort => app.sort = app.sort.next(),
        Action::ToggleDetail => app.detail = !app.detail,
        Action::ToggleHelp => app.help = !app.help,
        Action::Back => {
            if app.detail {
                app.detail = false;
            } else if !app.filter.is_empty() {
                app.filter.clear();
            }
        }
        Action::Quit => app.quit = true,
        Action::Resync | Action::ResyncGroup => {
            let (server, client) = app.live_server_of_selection()?;
            let command = if action == Action::ResyncGroup {
                // The group as this server knows it: R resyncs it on this server only.
                let model = &app.fleet.get(server)?.model;
                Command::ResyncGroup(model.clients.get(&client).map(|c| c.group.clone())?)
            } else if client.is_empty() {
                return None;
            } else {
                Command::ResyncClient(client)
            };
            return Some(Steer { server, command });
        }
        Action::AskCloseStream => {
            let stream = match app.selected_row() {
                Some(RowRef::Stream(i, s)) => Some((i, s.stream_id.clone(), s.client_id.clone())),
                _ => None,
            };
            match stream {
                Some((server, stream_id, client_id)) => {
                    if app.live_server_of_selection().is_some() {
                        app.confirm = Some(Confirm::CloseStream { server, stream_id, client_id });
                    }
                }
                None => {
                    app.notice = Some((Err("select a stream in the Streams view to close it".into()), app.now_ms));
                }
            }
        }
        Action::AskCloseClient => {
            if let Some((server, client_id)) = app.live_server_of_selection() {
                if !client_id.is_empty() {
                    app.confirm = Some(Confirm::CloseClient { server, client_id });
                }
            }
        }
        Action::ConfirmYes => {
            return match app.confirm.take()? {
                Confirm::CloseStream { server, stream_id, .. } => {
                    Some(Steer { server, command: Command::CloseStream(stream_id) })
                }
                Confirm::CloseClient { server, client_id } => {
                    Some(Steer { server, command: Command::CloseClient(client_id) })
                }
            }
        }
        Action::ConfirmNo => app.confirm = None,
        Action::Update(i, u) => {
            let now = app.now_ms;
            if let Some(w) = app.fleet.servers.get_mut(i) {
                w.model.apply(*u, now);
                w.conn = ConnState::Live;
            }
        }
        Action::Conn(i, c) => {
            if let Some(w) = app.fleet.servers.get_mut(i) {
                w.conn = c;
            }
        }
        Action::CommandDone(i, r) => {
            // With several servers the outcome says whose it is.
            let r = if app.fleet.is_fleet() {
                let who = app.fleet.label(i).to_string();
                r.map(|m| format!("{who}: {m}")).map_err(|m| format!("{who}: {m}"))
            } else {
                r
            };
            app.notice = Some((r, app.now_ms));
        }
        Action::Tick(now) => app.now_ms = now,
        Action::ShowView(v) => {
            if app.view != v {
                app.view = v;
                app.selected = None;
                app.detail = false;
            }
        }
        Action::Select(i) => app.move_selection(|_, _| i),
        Action::Scroll(by) => {
            app.scroll = u16::try_from((i32::from(app.scroll) + by).max(0)).unwrap_or(u16::MAX);
        }
        Action::Replay(force) => {
            let Some((server, r)) = app.selected_request() else {
                app.notice = Some((Err("select a request in the Requests view to replay it".into()), app.now_ms));
                return None;
            };
            app.live_server_of_selection()?;
            app.detail = true;
            app.scroll = 0;
            app.replay = Some(ReplayState { server, request_id: r.request_id.clone(), outcome: Fetched::Pending });
            return Some(Steer { server, command: Command::Replay { request_id: r.request_id, force } });
        }
        Action::CopyCurl => match app.curl_line() {
            Ok(line) => {
                app.clipboard = Some(line.clone());
                app.curl = Some(line);
                app.detail = true;
                app.scroll = 0;
                app.notice = Some((Ok("curl line copied (OSC 52) and shown in the detail pane".into()), app.now_ms));
            }
            Err(why) => app.notice = Some((Err(why.to_string()), app.now_ms)),
        },
        Action::Captured(server, id, r) => {
            let f = match r {
                Ok(c) => Fetched::Got(c),
                Err(e) => Fetched::Failed(e),
            };
            app.set_capture(server, id, f);
        }
        Action::Replayed(server, id, r) => {
            if let Some(rs) = app.replay.as_mut().filter(|rs| rs.server == server && rs.request_id == id) {
                rs.outcome = match r {
                    Ok(c) => Fetched::Got(c),
                    Err(e) => Fetched::Failed(e),
                };
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::{KeyEventKind, KeyEventState};
    use tunnel_lib::introspection::{ClientInfo, ServerInfo, StreamInfo};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent { code, modifiers: KeyModifiers::NONE, kind: KeyEventKind::Press, state: KeyEventState::NONE }
    }

    /// Streams s1, s2 (client a) and s3 (client b), each id prefixed with `prefix`, from server `id`.
    fn snapshot(id: &str, prefix: &str) -> WatchUpdate {
        let mut u = WatchUpdate {
            full: true,
            server: Some(ServerInfo { server_id: id.into(), ..Default::default() }),
            ..Default::default()
        };
        for (sid, client) in [("s1", "a"), ("s2", "a"), ("s3", "b")] {
            u.streams.push(StreamInfo {
                stream_id: format!("{prefix}{sid}"),
                client_id: client.into(),
                group: "g".into(),
                ..Default::default()
            });
        }
        for c in ["a", "b"] {
            u.clients.push(ClientInfo { client_id: c.into(), group: "g".into(), ..Default::default() });
        }
        u
    }

    fn app_with_streams() -> App {
        let mut app = App::new(["127.0.0.1:7001"], 0);
        update(&mut app, Action::Update(0, Box::new(snapshot("one", ""))));
        app
    }

    /// Two servers holding the same clients a and b.
    fn fleet_app() -> App {
        let mut app = App::new(["h1:7001", "h2:7001"], 0);
        update(&mut app, Action::Update(0, Box::new(snapshot("edge-1", "x"))));
        update(&mut app, Action::Update(1, Box::new(snapshot("edge-2", "y"))));
        app
    }

    fn selected_id(app: &App) -> Option<&str> {
        app.selected.as_ref().map(|k| k.id.as_str())
    }

    /// Keys map to actions; dialogs and the filter take keys first.
    #[test]
    fn keys_map_to_actions() {
        let mut app = App::new(["x"], 0);
        assert_eq!(on_key(&app, key(KeyCode::Char('j'))), Some(Action::Down));
        assert_eq!(on_key(&app, key(KeyCode::Up)), Some(Action::Up));
        assert_eq!(on_key(&app, key(KeyCode::Tab)), Some(Action::NextView));
        assert_eq!(on_key(&app, key(KeyCode::Char('x'))), Some(Action::AskCloseStream));
        assert_eq!(on_key(&app, key(KeyCode::Char('q'))), Some(Action::Quit));
        let ctrl_c = KeyEvent { modifiers: KeyModifiers::CONTROL, ..key(KeyCode::Char('c')) };
        assert_eq!(on_key(&app, ctrl_c), Some(Action::Quit));
        app.editing_filter = true;
        assert_eq!(on_key(&app, key(KeyCode::Char('q'))), Some(Action::FilterChar('q')));
        app.editing_filter = false;
        app.confirm = Some(Confirm::CloseClient { server: 0, client_id: "a".into() });
        assert_eq!(on_key(&app, key(KeyCode::Char('y'))), Some(Action::ConfirmYes));
        assert_eq!(on_key(&app, key(KeyCode::Char('j'))), None);
    }

    /// Selection moves by row and stays on its row when rows change.
    #[test]
    fn selection_follows_rows() {
        let mut app = app_with_streams();
        update(&mut app, Action::Down);
        assert_eq!(selected_id(&app), Some("s2"));
        update(&mut app, Action::Bottom);
        update(&mut app, Action::Down);
        assert_eq!(selected_id(&app), Some("s3"));
        // s1 goes away: s3 stays selected.
        let u = WatchUpdate { removed_streams: vec!["s1".into()], ..Default::default() };
        update(&mut app, Action::Update(0, Box::new(u)));
        let rows = app.rows();
        assert_eq!(rows[app.selected_index(&rows)].key().id, "s3");
    }

    /// x asks, y confirms and yields the close command; n cancels.
    #[test]
    fn close_needs_confirmation() {
        let mut app = app_with_streams();
        assert_eq!(update(&mut app, Action::AskCloseStream), None);
        assert!(matches!(app.confirm, Some(Confirm::CloseStream { ref stream_id, .. }) if stream_id == "s1"));
        let want = Steer { server: 0, command: Command::CloseStream("s1".into()) };
        assert_eq!(update(&mut app, Action::ConfirmYes), Some(want));
        assert!(app.confirm.is_none());
        update(&mut app, Action::AskCloseClient);
        update(&mut app, Action::ConfirmNo);
        assert!(app.confirm.is_none());
    }

    /// r resyncs the selected row's client, R its group.
    #[test]
    fn resync_targets_selection() {
        let mut app = app_with_streams();
        update(&mut app, Action::Bottom);
        let on = |command| Some(Steer { server: 0, command });
        assert_eq!(update(&mut app, Action::Resync), on(Command::ResyncClient("b".into())));
        assert_eq!(update(&mut app, Action::ResyncGroup), on(Command::ResyncGroup("g".into())));
    }

    /// The filter narrows rows; Esc clears it.
    #[test]
    fn filter_narrows_rows() {
        let mut app = app_with_streams();
        update(&mut app, Action::StartFilter);
        update(&mut app, Action::FilterChar('b'));
        update(&mut app, Action::EndFilter);
        assert_eq!(app.rows().len(), 1);
        update(&mut app, Action::Back);
        assert_eq!(app.rows().len(), 3);
    }

    /// The same client on two servers is two rows; a client's rows sit
    /// together, server by server; the filter matches the server's name.
    #[test]
    fn fleet_rows_are_keyed_by_server() {
        let mut app = fleet_app();
        let keys = |app: &App| app.rows().iter().map(|r| (r.server(), r.key().id)).collect::<Vec<_>>();
        let ids = |v: &[(usize, &str)]| v.iter().map(|(i, s)| (*i, s.to_string())).collect::<Vec<_>>();
        assert_eq!(keys(&app), ids(&[(0, "xs1"), (0, "xs2"), (1, "ys1"), (1, "ys2"), (0, "xs3"), (1, "ys3")]));
        update(&mut app, Action::NextView);
        assert_eq!(keys(&app), ids(&[(0, "a"), (1, "a"), (0, "b"), (1, "b")]));
        // Moving down from a's row on edge-1 lands on a's row on edge-2.
        update(&mut app, Action::Down);
        assert_eq!(app.selected, Some(RowKey { server: 1, id: "a".into() }));
        for c in "edge-2".chars() {
            update(&mut app, Action::FilterChar(c));
        }
        assert_eq!(keys(&app), ids(&[(1, "a"), (1, "b")]));
        // With one server its name is on every row: the filter does not look at it.
        let mut one = app_with_streams();
        for c in "one".chars() {
            update(&mut one, Action::FilterChar(c));
        }
        assert!(one.rows().is_empty());
    }

    /// Steering goes to the server that owns the row; a down server's rows
    /// are refused with a notice, and outcomes name their server.
    #[test]
    fn fleet_steering_targets_the_owning_server() {
        let mut app = fleet_app();
        // Streams view: xs1 xs2 ys1 ys2 ...; ys2 is edge-2's data stream of client a.
        for _ in 0..3 {
            update(&mut app, Action::Down);
        }
        update(&mut app, Action::AskCloseStream);
        assert_eq!(
            app.confirm,
            Some(Confirm::CloseStream { server: 1, stream_id: "ys2".into(), client_id: "a".into() })
        );
        assert_eq!(
            update(&mut app, Action::ConfirmYes),
            Some(Steer { server: 1, command: Command::CloseStream("ys2".into()) })
        );
        assert_eq!(
            update(&mut app, Action::Resync),
            Some(Steer { server: 1, command: Command::ResyncClient("a".into()) })
        );
        update(&mut app, Action::AskCloseClient);
        assert_eq!(
            update(&mut app, Action::ConfirmYes),
            Some(Steer { server: 1, command: Command::CloseClient("a".into()) })
        );
        update(&mut app, Action::Top);
        assert_eq!(
            update(&mut app, Action::ResyncGroup),
            Some(Steer { server: 0, command: Command::ResyncGroup("g".into()) })
        );

        update(&mut app, Action::Conn(1, ConnState::Lost("gone".into())));
        assert_eq!(app.fleet.up(), 1);
        assert_eq!(app.rows().len(), 6, "a down server's rows stay");
        update(&mut app, Action::Bottom);
        assert_eq!(update(&mut app, Action::Resync), None);
        update(&mut app, Action::AskCloseStream);
        assert!(app.confirm.is_none());
        assert!(matches!(&app.notice, Some((Err(m), _)) if m.contains("edge-2")), "{:?}", app.notice);

        update(&mut app, Action::CommandDone(0, Ok("stream xs1 closed".into())));
        assert!(matches!(&app.notice, Some((Ok(m), _)) if m == "edge-1: stream xs1 closed"));
        // Updates for a server the console does not watch change nothing.
        update(&mut app, Action::Update(9, Box::new(snapshot("edge-9", "z"))));
        assert_eq!(app.rows().len(), 6);
    }
}

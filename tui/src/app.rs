//! The console's state and how keys and server updates change it. No I/O
//! here: keys become [`Action`]s, [`update`] applies them and returns the
//! [`Command`] (if any) for the network task.

use crate::model::Model;
use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use tunnel_lib::introspection::{RequestInfo, StreamInfo, WatchUpdate};

/// The link to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnState {
    Connecting,
    Live,
    /// Lost or unreachable, with the reason; the network task keeps retrying.
    Lost(String),
}

/// The three views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Streams,
    Clients,
    Requests,
}

impl View {
    pub const ALL: [View; 3] = [View::Streams, View::Clients, View::Requests];

    pub fn title(self) -> &'static str {
        match self {
            View::Streams => "Streams",
            View::Clients => "Clients",
            View::Requests => "Requests",
        }
    }

    fn next(self) -> View {
        match self {
            View::Streams => View::Clients,
            View::Clients => View::Requests,
            View::Requests => View::Streams,
        }
    }

    fn prev(self) -> View {
        self.next().next()
    }
}

/// Orders of the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    /// Streams and clients by client id; requests newest first.
    Natural,
    /// Oldest heartbeat first (streams); slowest first (requests).
    Age,
    /// Deepest queue first (streams); by group (clients); by status (requests).
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
        }
    }
}

/// A destructive action waiting for y/n.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confirm {
    CloseStream { stream_id: String, client_id: String },
    CloseClient { client_id: String },
}

/// What the console asks the server to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    ResyncClient(String),
    ResyncGroup(String),
    CloseStream(String),
    CloseClient(String),
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
    Back,
    Quit,
    /// From the network task.
    Update(Box<WatchUpdate>),
    Conn(ConnState),
    CommandDone(Result<String, String>),
    /// The clock moved (local unix ms).
    Tick(i64),
}

/// The console's state.
#[derive(Debug, Clone)]
pub struct App {
    /// Where the server is, for the header.
    pub target: String,
    pub conn: ConnState,
    pub model: Model,
    pub view: View,
    pub sort: Sort,
    pub filter: String,
    pub editing_filter: bool,
    /// Selected row, by id (stream id, client id, request seq), so it stays put as rows change.
    pub selected: Option<String>,
    pub detail: bool,
    pub help: bool,
    pub confirm: Option<Confirm>,
    /// The last command's outcome and when it came (local ms), shown in the footer for a while.
    pub notice: Option<(Result<String, String>, i64)>,
    /// Local unix ms: the injected clock every age is computed from.
    pub now_ms: i64,
    pub quit: bool,
}

/// One row of the current view, as a key and the item.
pub enum RowRef<'a> {
    Stream(&'a StreamInfo),
    Client(&'a tunnel_lib::introspection::ClientInfo),
    Request(&'a RequestInfo),
}

impl RowRef<'_> {
    /// The row's id, for selection.
    pub fn key(&self) -> String {
        match self {
            RowRef::Stream(s) => s.stream_id.clone(),
            RowRef::Client(c) => c.client_id.clone(),
            RowRef::Request(r) => r.seq.to_string(),
        }
    }

    fn client_id(&self) -> &str {
        match self {
            RowRef::Stream(s) => &s.client_id,
            RowRef::Client(c) => &c.client_id,
            RowRef::Request(r) => &r.client_id,
        }
    }
}

impl App {
    /// A console for the server at `target`, with the clock at `now_ms`.
    pub fn new(target: impl Into<String>, now_ms: i64) -> Self {
        App {
            target: target.into(),
            conn: ConnState::Connecting,
            model: Model::default(),
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
            quit: false,
        }
    }

    fn matches(&self, fields: &[&str]) -> bool {
        if self.filter.is_empty() {
            return true;
        }
        let f = self.filter.to_lowercase();
        fields.iter().any(|x| x.to_lowercase().contains(&f))
    }

    /// The rows of the current view, filtered and sorted.
    pub fn rows(&self) -> Vec<RowRef<'_>> {
        let m = &self.model;
        match self.view {
            View::Streams => {
                let mut v: Vec<&StreamInfo> = m
                    .streams
                    .values()
                    .filter(|s| {
                        let ty = crate::ui::stream_type_name(s.stream_type);
                        self.matches(&[&s.stream_id, &s.client_id, &s.group, ty, &s.peer])
                    })
                    .collect();
                match self.sort {
                    Sort::Natural => v.sort_by(|a, b| {
                        (&a.client_id, a.stream_type, &a.stream_id).cmp(&(&b.client_id, b.stream_type, &b.stream_id))
                    }),
                    Sort::Age => v.sort_by_key(|s| (s.last_heartbeat_unix_ms, s.stream_id.clone())),
                    Sort::Load => {
                        v.sort_by(|a, b| b.queue_depth.cmp(&a.queue_depth).then(b.in_flight.cmp(&a.in_flight)))
                    }
                }
                v.into_iter().map(RowRef::Stream).collect()
            }
            View::Clients => {
                let mut v: Vec<_> = m
                    .clients
                    .values()
                    .filter(|c| self.matches(&[&c.client_id, &c.group, &c.peer, &c.version]))
                    .collect();
                match self.sort {
                    Sort::Natural => {}
                    Sort::Age => v.sort_by_key(|c| c.connected_unix_ms),
                    Sort::Load => v.sort_by(|a, b| (&a.group, &a.client_id).cmp(&(&b.group, &b.client_id))),
                }
                v.into_iter().map(RowRef::Client).collect()
            }
            View::Requests => {
                let mut v: Vec<&RequestInfo> = m
                    .requests
                    .iter()
                    .filter(|r| self.matches(&[&r.method, &r.host, &r.path, &r.client_id, &r.trace_id, &r.error]))
                    .collect();
                match self.sort {
                    Sort::Natural => v.reverse(),
                    Sort::Age => v.sort_by_key(|r| std::cmp::Reverse(r.duration_ms)),
                    Sort::Load => v.sort_by(|a, b| b.status.cmp(&a.status).then(b.seq.cmp(&a.seq))),
                }
                v.into_iter().map(RowRef::Request).collect()
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
        KeyCode::Esc => Action::Back,
        KeyCode::Char('q') => Action::Quit,
        _ => return None,
    })
}

/// Applies an action; returns what to ask the server, if anything.
pub fn update(app: &mut App, action: Action) -> Option<Command> {
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
            let row = app.selected_row()?;
            let client = row.client_id().to_string();
            if action == Action::ResyncGroup {
                let group = app.model.clients.get(&client).map(|c| c.group.clone())?;
                return Some(Command::ResyncGroup(group));
            }
            if client.is_empty() {
                return None;
            }
            return Some(Command::ResyncClient(client));
        }
        Action::AskCloseStream => {
            if let Some(RowRef::Stream(s)) = app.selected_row() {
                let c = Confirm::CloseStream { stream_id: s.stream_id.clone(), client_id: s.client_id.clone() };
                app.confirm = Some(c);
            } else {
                app.notice = Some((Err("select a stream in the Streams view to close it".into()), app.now_ms));
            }
        }
        Action::AskCloseClient => {
            let client = app.selected_row().map(|r| r.client_id().to_string()).filter(|c| !c.is_empty());
            if let Some(client_id) = client {
                app.confirm = Some(Confirm::CloseClient { client_id });
            }
        }
        Action::ConfirmYes => {
            return match app.confirm.take()? {
                Confirm::CloseStream { stream_id, .. } => Some(Command::CloseStream(stream_id)),
                Confirm::CloseClient { client_id } => Some(Command::CloseClient(client_id)),
            }
        }
        Action::ConfirmNo => app.confirm = None,
        Action::Update(u) => {
            app.model.apply(*u, app.now_ms);
            app.conn = ConnState::Live;
        }
        Action::Conn(c) => app.conn = c,
        Action::CommandDone(r) => app.notice = Some((r, app.now_ms)),
        Action::Tick(now) => app.now_ms = now,
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossterm::event::{KeyEventKind, KeyEventState};
    use tunnel_lib::introspection::{ClientInfo, StreamInfo};

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent { code, modifiers: KeyModifiers::NONE, kind: KeyEventKind::Press, state: KeyEventState::NONE }
    }

    fn app_with_streams() -> App {
        let mut app = App::new("127.0.0.1:7001", 0);
        let mut u = WatchUpdate { full: true, ..Default::default() };
        for (id, client) in [("s1", "a"), ("s2", "a"), ("s3", "b")] {
            u.streams.push(StreamInfo {
                stream_id: id.into(),
                client_id: client.into(),
                group: "g".into(),
                ..Default::default()
            });
        }
        for c in ["a", "b"] {
            u.clients.push(ClientInfo { client_id: c.into(), group: "g".into(), ..Default::default() });
        }
        update(&mut app, Action::Update(Box::new(u)));
        app
    }

    /// Keys map to actions; dialogs and the filter take keys first.
    #[test]
    fn keys_map_to_actions() {
        let mut app = App::new("x", 0);
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
        app.confirm = Some(Confirm::CloseClient { client_id: "a".into() });
        assert_eq!(on_key(&app, key(KeyCode::Char('y'))), Some(Action::ConfirmYes));
        assert_eq!(on_key(&app, key(KeyCode::Char('j'))), None);
    }

    /// Selection moves by row and stays on its row when rows change.
    #[test]
    fn selection_follows_rows() {
        let mut app = app_with_streams();
        update(&mut app, Action::Down);
        assert_eq!(app.selected.as_deref(), Some("s2"));
        update(&mut app, Action::Bottom);
        update(&mut app, Action::Down);
        assert_eq!(app.selected.as_deref(), Some("s3"));
        // s1 goes away: s3 stays selected.
        let u = WatchUpdate { removed_streams: vec!["s1".into()], ..Default::default() };
        update(&mut app, Action::Update(Box::new(u)));
        let rows = app.rows();
        assert_eq!(rows[app.selected_index(&rows)].key(), "s3");
    }

    /// x asks, y confirms and yields the close command; n cancels.
    #[test]
    fn close_needs_confirmation() {
        let mut app = app_with_streams();
        assert_eq!(update(&mut app, Action::AskCloseStream), None);
        assert!(matches!(app.confirm, Some(Confirm::CloseStream { ref stream_id, .. }) if stream_id == "s1"));
        assert_eq!(update(&mut app, Action::ConfirmYes), Some(Command::CloseStream("s1".into())));
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
        assert_eq!(update(&mut app, Action::Resync), Some(Command::ResyncClient("b".into())));
        assert_eq!(update(&mut app, Action::ResyncGroup), Some(Command::ResyncGroup("g".into())));
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
}

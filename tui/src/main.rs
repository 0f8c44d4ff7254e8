//! tunnel-tui: watch and steer one running tunnel-server, or several at
//! once, from a terminal.

use anyhow::Context as _;
use clap::Parser;
use crossterm::event::{Event, EventStream, KeyEventKind};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tunnel_tui::app::{self, Action, App};
use tunnel_tui::model::{ConnState, Fleet};
use tunnel_tui::{net, now_ms, once, ui};

#[derive(Parser)]
#[command(version, about = "Live console for tunnel-server: streams, heartbeats, queues, config; resync and close")]
struct Args {
    /// A server's admin listener (admin_listen), host:port or http://host:port;
    /// repeat it (or separate with commas) to watch several servers at once.
    #[arg(long, short, default_value = "127.0.0.1:7001", value_delimiter = ',')]
    server: Vec<String>,
    /// The servers' admin_token, if they have one (the same for every server).
    #[arg(long, env = "TUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one plain-text snapshot and exit (0 if any server answered, 1 if none).
    #[arg(long)]
    once: bool,
    /// With --once: print the snapshot as JSON (several servers: keyed by address).
    #[arg(long, requires = "once")]
    json: bool,
    /// With --once: print the events timeline (connections, reaps, config
    /// pushes and acks, reloads, drains) instead of the streams.
    #[arg(long, requires = "once", conflicts_with = "json")]
    events: bool,
    /// Show clock times in UTC (the default is the local zone).
    #[arg(long)]
    utc: bool,
    /// Watch only the servers given, not the other members of their cluster.
    #[arg(long)]
    no_discover: bool,
    /// Draw charts and trends in plain ASCII (the default when the locale is not UTF-8).
    #[arg(long)]
    ascii: bool,
    /// Write the console's own logs to this file (the screen is the terminal's).
    #[arg(long)]
    log_file: Option<std::path::PathBuf>,
}

/// How often ages on screen are brought up to date (they show whole seconds).
const TICK: Duration = Duration::from_millis(250);

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.log_file {
        match std::fs::OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => {
                let _ = tracing_subscriber::fmt().with_ansi(false).with_writer(std::sync::Mutex::new(file)).try_init();
            }
            Err(e) => {
                eprintln!("tunnel-tui: log file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tunnel-tui: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut addrs = net::addresses(&args.server);
    if addrs.is_empty() {
        eprintln!("tunnel-tui: --server names no server");
        return ExitCode::from(2);
    }
    if !args.no_discover {
        // A clustered server lists the fleet: watch all of it.
        addrs = rt.block_on(net::with_cluster_members(addrs, args.token.clone()));
    }
    let targets: Vec<net::Target> = addrs.iter().map(|a| net::Target::new(a, args.token.clone())).collect();
    if args.once {
        let how = once::Options { json: args.json, events: args.events, utc: args.utc };
        return rt.block_on(print_once(addrs, &targets, how));
    }
    let ascii = args.ascii || !tunnel_tui::locale_is_utf8(|k| std::env::var(k).ok());
    match rt.block_on(interactive(addrs, targets, ascii, args.utc)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel-tui: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn print_once(addrs: Vec<String>, targets: &[net::Target], how: once::Options) -> ExitCode {
    let results = net::first_snapshots(targets).await;
    let now = now_ms();
    let mut fleet = Fleet::new(addrs);
    let mut reasons = Vec::new();
    for (w, r) in fleet.servers.iter_mut().zip(results) {
        match r {
            Ok(update) => {
                w.model.apply(update, now);
                w.conn = ConnState::Live;
            }
            Err(e) => {
                reasons.push(if targets.len() > 1 { format!("{}: {e}", w.addr) } else { e.clone() });
                w.conn = ConnState::Lost(e);
            }
        }
    }
    // Nothing answered: a line per server on stderr and a failure, for scripts.
    if fleet.up() == 0 {
        for r in reasons {
            eprintln!("tunnel-tui: {r}");
        }
        return ExitCode::FAILURE;
    }
    if how.json {
        println!("{}", once::json(&fleet, now));
    } else if how.events {
        print!("{}", once::events_text(&fleet, how.utc));
    } else {
        print!("{}", once::text(&fleet, now));
    }
    ExitCode::SUCCESS
}

/// Puts `text` on the terminal's clipboard with OSC 52: the terminal the
/// operator sits at does it, over SSH and tmux too (where it allows it).
fn copy_to_clipboard(text: &str) {
    use base64::Engine as _;
    use std::io::Write as _;
    let seq = format!("\x1b]52;c;{}\x07", base64::engine::general_purpose::STANDARD.encode(text));
    let mut out = std::io::stdout();
    // A terminal without OSC 52 ignores it; the line is in the detail pane either way.
    let _ = out.write_all(seq.as_bytes()).and_then(|()| out.flush());
}

/// Restores the terminal when dropped, on every way out (ratatui's init also
/// restores it first thing on a panic).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        let _ = crossterm::execute!(std::io::stdout(), crossterm::event::DisableMouseCapture);
        ratatui::restore();
    }
}

async fn interactive(addrs: Vec<String>, targets: Vec<net::Target>, ascii: bool, utc: bool) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let _guard = TerminalGuard;
    // Clicks and the wheel; the guard turns it off again.
    let _ = crossterm::execute!(std::io::stdout(), crossterm::event::EnableMouseCapture);
    let stop = CancellationToken::new();
    let (events_tx, mut events) = mpsc::channel(64);
    // One link per server, each with its own command queue: a server that is
    // slow to answer fills only its own.
    let mut links = JoinSet::new();
    let mut commands = Vec::with_capacity(targets.len());
    for (i, target) in targets.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(8);
        links.spawn(net::run(i, target, events_tx.clone(), rx, stop.clone()));
        commands.push(tx);
    }
    drop(events_tx);
    let mut keys = EventStream::new();
    let mut app = App::new(addrs, now_ms());
    app.ascii = ascii;
    // https://no-color.org: set and not empty.
    app.no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    app.utc = utc;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut dirty = true;
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    while !app.quit {
        if dirty {
            terminal.draw(|f| ui::render(&app, f)).context("drawing")?;
            dirty = false;
        }
        #[cfg(unix)]
        let signalled = async {
            match (hangup.as_mut(), term.as_mut()) {
                (Some(h), Some(t)) => {
                    tokio::select! { _ = h.recv() => {}, _ = t.recv() => {} }
                }
                _ => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        let action = tokio::select! {
            // The SSH session went away, or we were asked to stop.
            _ = signalled => Some(Action::Quit),
            ev = keys.next() => match ev {
                Some(Ok(Event::Key(k))) if k.kind != KeyEventKind::Release => app::on_key(&app, k),
                Some(Ok(Event::Mouse(m))) => terminal.size().ok().and_then(|s| ui::on_mouse(&app, m, s.into())),
                Some(Ok(Event::Resize(_, _))) => {
                    dirty = true;
                    None
                }
                Some(Ok(_)) => None,
                Some(Err(e)) => return Err(e).context("reading the terminal"),
                None => Some(Action::Quit),
            },
            Some(a) = events.recv() => {
                // Ages and clock offsets are computed against a fresh clock.
                app::update(&mut app, Action::Tick(now_ms()));
                Some(a)
            }
            // Ages count up on screen. Redrawing is cheap: ratatui sends the
            // terminal only the cells that changed, which over SSH is nothing
            // most ticks.
            _ = tick.tick() => Some(Action::Tick(now_ms())),
        };
        if let Some(a) = action {
            let steer = app::update(&mut app, a);
            if let Some(text) = app.clipboard.take() {
                copy_to_clipboard(&text);
            }
            if let Some(steer) = steer {
                // A full queue answers the command as failed, so that a
                // capture or a replay does not wait on screen for ever.
                let refused = match commands.get(steer.server) {
                    Some(tx) => tx.try_send(steer.command).err().map(|e| e.into_inner()),
                    None => Some(steer.command),
                };
                if let Some(cmd) = refused {
                    app::update(&mut app, cmd.failed(steer.server, "busy: try again".into()));
                }
            }
            dirty = true;
        }
    }
    stop.cancel();
    // Each link stops at once when told; any still busy after a second is aborted when the set drops.
    let _ = tokio::time::timeout(Duration::from_secs(1), async { while links.join_next().await.is_some() {} }).await;
    Ok(())
}

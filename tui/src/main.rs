//! tunnel-tui: watch and steer a running tunnel-server from a terminal.

use anyhow::Context as _;
use clap::Parser;
use crossterm::event::{Event, EventStream, KeyEventKind};
use std::process::ExitCode;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tunnel_tui::app::{self, Action, App};
use tunnel_tui::{net, now_ms, once, ui};

#[derive(Parser)]
#[command(version, about = "Live console for tunnel-server: streams, heartbeats, queues, config; resync and close")]
struct Args {
    /// The server's admin listener (admin_listen), host:port or http://host:port.
    #[arg(long, short, default_value = "127.0.0.1:7001")]
    server: String,
    /// The server's admin_token, if it has one.
    #[arg(long, env = "TUNNEL_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one plain-text snapshot and exit (0 connected, 1 not).
    #[arg(long)]
    once: bool,
    /// With --once: print the snapshot as JSON.
    #[arg(long, requires = "once")]
    json: bool,
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
    let target = net::Target::new(&args.server, args.token.clone());
    if args.once {
        return rt.block_on(print_once(&target, args.json));
    }
    match rt.block_on(interactive(target, args.server)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunnel-tui: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn print_once(target: &net::Target, as_json: bool) -> ExitCode {
    match net::first_snapshot(target).await {
        Ok(update) => {
            let now = now_ms();
            let mut model = tunnel_tui::model::Model::default();
            model.apply(update, now);
            if as_json {
                println!("{}", once::json(&model, now));
            } else {
                print!("{}", once::text(&model, now));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tunnel-tui: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Restores the terminal when dropped, on every way out (ratatui's init also
/// restores it first thing on a panic).
struct TerminalGuard;

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

async fn interactive(target: net::Target, label: String) -> anyhow::Result<()> {
    let mut terminal = ratatui::try_init().context("setting up the terminal")?;
    let _guard = TerminalGuard;
    let stop = CancellationToken::new();
    let (events_tx, mut events) = mpsc::channel(64);
    let (commands, commands_rx) = mpsc::channel(8);
    let net_task = tokio::spawn(net::run(target, events_tx, commands_rx, stop.clone()));
    let mut keys = EventStream::new();
    let mut app = App::new(label, now_ms());
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
            if let Some(cmd) = app::update(&mut app, a) {
                if commands.try_send(cmd).is_err() {
                    app::update(&mut app, Action::CommandDone(Err("busy: try again".into())));
                }
            }
            dirty = true;
        }
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), net_task).await;
    Ok(())
}

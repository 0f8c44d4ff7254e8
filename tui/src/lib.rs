//! tunnel-tui: a live console for tunnel-server. `model` holds what the
//! server said, `app` turns keys and updates into state, `ui` draws it, `net`
//! talks to the server in the background, `once` prints a snapshot.

pub mod app;
pub mod model;
pub mod net;
pub mod once;
pub mod ui;

/// Unix time now, milliseconds.
pub fn now_ms() -> i64 {
    tunnel_lib::frame::now_ms()
}

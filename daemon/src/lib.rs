//! The tunnel daemons: `tunnel-server` (public ingress, registry, rules) and
//! `tunnel-client` (streams to the server, forwarding to local upstreams).

pub mod client;
pub mod demo;
pub mod etcd;
pub mod logging;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod signal;
pub mod systemd;
pub mod tunnel;

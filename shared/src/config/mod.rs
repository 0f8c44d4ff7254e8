//! Configuration of both daemons: the TOML file formats, their defaults, and
//! validation into checked runtime types. Every error names the file, the line
//! and the key.
//!
//! Layout: `server` and `client` are the two file formats, each a checker
//! per section; `tls`, `log` and `link` (the link's TCP timers) are sections both files have; `defaults`
//! holds every key's default and bounds; `ranged` checks the many keys that
//! are a duration, size or count with a default and a bound; `source`
//! locates errors in a file's text; `version` names a group's config by its
//! content, the same on every server.

mod client;
mod defaults;
mod link;
mod log;
mod ranged;
mod secret;
mod server;
mod source;
mod tls;
mod version;

#[cfg(test)]
mod tests;

pub use client::{ClientConfig, Transport, Upstream};
pub use defaults::*;
pub use link::{LinkTuning, LINK_TIMER_MAX, LINK_TIMER_MIN};
pub use log::{LogConfig, LogFormat};
pub use secret::Secret;
pub use server::{
    ClusterSettings, ConfigPush, EtcdTls, GroupSettings, IngressCert, PeerTls, PushedConfig, ServerConfig,
    ServerSettings, TcpService,
};
pub use source::ConfigError;
pub use tls::{ClientTls, LinkTls};
pub use version::config_version;

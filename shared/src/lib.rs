//! tunnel-lib: the protocol, its frame rules, the rules engine and the
//! configuration shared by `tunnel-server`, `tunnel-client` and `tunnel-tui`.

#![forbid(unsafe_code)]

pub mod config;
pub mod frame;
pub mod rules;
pub mod units;

/// Code generated from `proto/tunnel.proto`.
#[allow(clippy::all, missing_docs)]
pub mod proto {
    tonic::include_proto!("tunnel.v1");
}

/// Software version sent in every registration.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// gRPC metadata key carrying the client's group name.
pub const GROUP_METADATA: &str = "x-tunnel-group";
/// gRPC metadata key carrying the client's session id.
pub const SESSION_METADATA: &str = "x-tunnel-session";

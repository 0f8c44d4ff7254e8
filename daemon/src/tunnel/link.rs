//! Transport settings of the tunnel's gRPC link, shared by both ends so that
//! they agree; set explicitly rather than left to tonic/hyper defaults. The
//! timeouts and keepalives an operator may want to tune are config keys
//! (`tunnel_lib::config`).

/// HTTP/2 windows. Our stream readers always drain h2 at once into
/// per-exchange buffers, so h2 windows only bound what is in transit; large
/// ones keep a bulk transfer from waiting on WINDOW_UPDATE round trips, and a
/// connection window above the stream window keeps one stream from using it up.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// HTTP/2 frames up to 64 KiB (the default is 16 KiB): a 64 KiB body chunk
/// then crosses as one DATA frame instead of four.
pub const MAX_FRAME_SIZE: u32 = 64 << 10;
/// Largest message accepted: a 64 KiB chunk, or a head with up to 1 MiB of headers.
pub const MAX_MESSAGE: usize = 2 << 20;

//! Stream plumbing both daemons share: the outbound queues of a gRPC stream,
//! the table of exchanges on it, and bodies and upgraded connections crossing
//! it under credit; and the link sockets' TCP timers.

pub mod body;
pub mod exchange;
pub mod link;
pub mod outbound;
pub mod tuning;
pub mod upgrade;

/// A request id: 128 random bits from a user-space generator, the shape of
/// a W3C trace id (it doubles as one), without the getrandom syscall that
/// `Uuid::new_v4` costs (measured in issue 5) on every request, heartbeat,
/// sync and push. Ids are scoped to a stream, so uniqueness needs no more
/// than this.
pub fn next_request_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

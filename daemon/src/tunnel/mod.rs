//! Stream plumbing both daemons share: the outbound queues of a gRPC stream,
//! the table of exchanges on it, and bodies and upgraded connections crossing
//! it under credit.

pub mod body;
pub mod exchange;
pub mod link;
pub mod outbound;
pub mod upgrade;

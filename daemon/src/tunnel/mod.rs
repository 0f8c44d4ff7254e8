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
    // Written digit by digit: `format!` cost 800 instructions per request (issue 20).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let n = fastrand::u128(..);
    (0..32).rev().map(|i| char::from(HEX[((n >> (i * 4)) & 0xf) as usize])).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_32_lowercase_hex_digits_and_differ() {
        let (a, b) = (super::next_request_id(), super::next_request_id());
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)), "{a}");
        assert_ne!(a, b);
    }
}

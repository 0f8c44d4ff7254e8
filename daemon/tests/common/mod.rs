//! Helpers the daemons' process tests share.

use std::net::{SocketAddr, TcpListener};

/// `N` distinct ports on 127.0.0.1, free a moment ago. All are held until all
/// are picked: the kernel may hand a just-released port to the next bind, and
/// a daemon given one port twice fails to start.
pub fn free_ports<const N: usize>() -> [SocketAddr; N] {
    let held: [TcpListener; N] = std::array::from_fn(|_| TcpListener::bind("127.0.0.1:0").unwrap());
    held.map(|l| l.local_addr().unwrap())
}

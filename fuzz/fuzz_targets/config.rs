//! server.toml and client.toml text, parsed and validated. Any text gets a
//! checked config or an error naming the file; nothing panics or hangs
//! (paths it names are read bounded: a device or FIFO is refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tunnel_lib::config::{ClientConfig, ServerConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = ServerConfig::from_str_named(text, "fuzz.toml") {
        assert!(e.to_string().contains("fuzz.toml"), "error without the file name: {e}");
    }
    if let Err(e) = ClientConfig::from_str_named(text, "fuzz.toml") {
        assert!(e.to_string().contains("fuzz.toml"), "error without the file name: {e}");
    }
});

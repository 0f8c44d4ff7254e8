//! `tunnel-bench --quick` runs to the end against the real daemons and prints
//! a complete table. Only what cannot flake is asserted: no timing thresholds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn quick_run_prints_a_complete_table() {
    let out = Command::new(env!("CARGO_BIN_EXE_tunnel-bench")).arg("--quick").output().expect("tunnel-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tunnel-bench failed:\n{stderr}\n{stdout}");
    let rows: Vec<Vec<String>> = stdout
        .lines()
        .filter(|l| l.starts_with("| split") || l.starts_with("| single"))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect();
    assert_eq!(rows.len(), 12, "3 transports x 4 loads:\n{stdout}");
    for r in &rows {
        let (transport, load) = (r[0].as_str(), r[1].as_str());
        let num = |i: usize| r[i].parse::<i64>().unwrap_or_else(|_| panic!("column {i} of {r:?}"));
        // Heartbeats were measured: delays are present and ordered.
        assert!(num(2) >= 0 && num(2) <= num(3) && num(3) <= num(4), "{r:?}");
        let streams = num(6);
        assert_eq!(streams, if transport == "single" { 1 } else { 3 }, "{r:?}");
        assert!(num(7) >= 0);
        if load == "bulk" {
            assert!(r[8].contains("MB/s down") && !r[8].starts_with("0 MB/s"), "{r:?}");
        }
        if load.starts_with("slow") {
            assert!(r[8].contains("small req/s"), "{r:?}");
        }
    }
}

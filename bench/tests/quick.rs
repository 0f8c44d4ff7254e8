//! `tunnel-bench --quick` runs to the end against the real daemons and prints
//! complete tables. Only what cannot flake is asserted: the run completes and
//! its numbers are present and sane, never a timing threshold.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The runs share two cores: one at a time keeps each within its bounds.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A quick run far longer than this is hung, and fails the test.
const LIMIT: Duration = Duration::from_secs(300);

fn bench(args: &[&str]) -> String {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::env::temp_dir().join(format!("tunnel-bench-test-{}-{}", std::process::id(), args[0]));
    std::fs::create_dir_all(&dir).unwrap();
    let (out, err) = (dir.join("stdout"), dir.join("stderr"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_tunnel-bench"))
        .arg("--quick")
        .args(args)
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .expect("tunnel-bench starts");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = std::fs::read_to_string(&out).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let status = status.unwrap_or_else(|| panic!("tunnel-bench {args:?} ran past {LIMIT:?}:\n{stderr}\n{stdout}"));
    assert!(status.success(), "tunnel-bench {args:?} failed:\n{stderr}\n{stdout}");
    stdout
}

/// Table rows whose first cell starts with `first`, split into cells.
fn rows(stdout: &str, first: &[&str]) -> Vec<Vec<String>> {
    stdout
        .lines()
        .filter(|l| first.iter().any(|f| l.starts_with(&format!("| {f}"))))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().to_string()).collect())
        .collect()
}

fn num(r: &[String], i: usize) -> f64 {
    r[i].parse::<f64>().unwrap_or_else(|_| panic!("column {i} of {r:?} is not a number"))
}

#[test]
fn isolation_prints_every_cell() {
    let stdout = bench(&["isolation"]);
    let rows = rows(&stdout, &["split", "single"]);
    assert_eq!(rows.len(), 15, "3 transports x 5 loads:\n{stdout}");
    for r in &rows {
        let (transport, load) = (r[0].as_str(), r[1].as_str());
        assert_eq!(r[2], "default", "the daemons' own link timers: {r:?}");
        // The lossy cell needs root and nftables; without them it says why,
        // except under CI, which has both.
        if load == "bulk, lossy link" && r[4].starts_with("skipped:") {
            assert!(std::env::var_os("CI").is_none(), "the lossy cell must run under CI: {r:?}");
            continue;
        }
        if load == "bulk, lossy link" {
            // Counted from the link's sockets (how many depends on chance
            // in a 1.5 s run: with the default low-water mark, often none).
            assert!(num(r, 3) >= 0.0, "retransmits counted on the lossy link: {r:?}");
        } else {
            assert_eq!(r[3], "-", "{r:?}");
        }
        // Heartbeats were measured: delays are present and ordered.
        assert!(num(r, 4) >= 0.0 && num(r, 4) <= num(r, 5) && num(r, 5) <= num(r, 6), "{r:?}");
        // The control stream's worst is one of the streams' worst.
        assert!(num(r, 7) >= 0.0 && num(r, 7) <= num(r, 6), "{r:?}");
        assert_eq!(num(r, 9) as usize, if transport == "single" { 1 } else { 3 }, "{r:?}");
        assert!(num(r, 10) >= 0.0);
        if load.starts_with("bulk") {
            assert!(r[11].contains("MB/s down") && !r[11].starts_with("0 MB/s"), "{r:?}");
        }
        if load.starts_with("slow") {
            assert!(r[11].contains("small req/s"), "{r:?}");
        }
    }
}

#[test]
fn race_against_nginx_prints_ratios() {
    let tools = ["nginx", "wrk", "h2load", "curl"];
    let missing: Vec<_> = tools
        .iter()
        .filter(|t| {
            !["/usr/bin", "/usr/sbin", "/usr/local/bin"].iter().any(|d| std::path::Path::new(d).join(t).exists())
        })
        .collect();
    if !missing.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "the race's tools are required under CI: {missing:?}");
        eprintln!("skipped: {missing:?} not installed (bench/setup.sh installs them)");
        return;
    }
    let stdout = bench(&["race"]);
    let small = rows(&stdout, &["direct nginx", "tunnel", "rathole"]);
    let by = |route: &str, proto: &str| small.iter().find(|r| r[0] == route && r[1] == proto).cloned();
    for proto in ["HTTP/1.1", "h2c"] {
        for route in ["direct nginx", "tunnel (workers = cores)", "tunnel (workers = 1)"] {
            let r = by(route, proto).unwrap_or_else(|| panic!("no {route} {proto} row:\n{stdout}"));
            assert!(num(&r, 2) > 0.0, "requests went through: {r:?}");
            assert!(num(&r, 3) > 0.0 && num(&r, 4) > 0.0 && num(&r, 4) <= num(&r, 5), "{r:?}");
            assert_eq!(num(&r, 7), 0.0, "no request failed: {r:?}");
        }
    }
    // Open-loop latency rows: route, req/s, p50, p99, added p50, added p99, errors.
    let paced: Vec<_> = small.iter().filter(|r| r.len() == 7 && r[1].parse::<f64>().is_ok()).collect();
    assert!(paced.len() >= 3, "open-loop rows of direct and both tunnels:\n{stdout}");
    for r in paced {
        assert!(num(r, 1) > 0.0 && num(r, 2) > 0.0 && num(r, 2) <= num(r, 3), "{r:?}");
    }
    // Bulk rows: four MB/s figures, each with its ratio, all moved data.
    let bulk: Vec<_> = stdout.lines().filter(|l| l.starts_with("| tunnel") && l.matches('(').count() >= 5).collect();
    assert_eq!(bulk.len(), 2, "bulk rows of both tunnels:\n{stdout}");
    for l in bulk {
        assert!(!l.contains("| 0 ("), "{l}");
    }
}

#[test]
fn fleet_of_clients_connects_and_serves() {
    let stdout = bench(&["fleet", "--clients", "50"]);
    assert!(stdout.contains("50 clients connected") && stdout.contains("150 streams"), "{stdout}");
    assert!(stdout.contains("200 of 200 requests"), "the fleet served every request:\n{stdout}");
    let row = rows(&stdout, &["50 clients"]);
    assert_eq!(row.len(), 1, "{stdout}");
    assert!(row[0][1].ends_with("MiB"), "{:?}", row[0]);
    // Traffic through every client gives each its series; the capture ring fills.
    assert!(stdout.contains("(50 clients with series)"), "{stdout}");
    let later = rows(&stdout, &["with traffic", "after"]);
    assert_eq!(later.len(), 3, "{stdout}");
    assert!(later.iter().all(|r| r[1].ends_with("MiB")), "{later:?}");
    assert!(stdout.contains("of 400 more on a rule keeping bodies"), "{stdout}");
}

#[test]
fn websocket_race_prints_both_routes() {
    let stdout = bench(&["ws"]);
    let table = rows(&stdout, &["direct", "tunnel"]);
    assert_eq!(table.len(), 2, "{stdout}");
    for r in &table {
        assert!(num(r, 1) > 0.0 && num(r, 2) > 0.0 && num(r, 4) > 0.0, "{r:?}");
    }
}

#[test]
fn deploys_under_load_print_every_cell() {
    let stdout = bench(&["ops"]);
    let table = rows(&stdout, &["restart", "3 reloads", "server SIGTERM"]);
    assert_eq!(table.len(), 3, "{stdout}");
    // Real processes, real SIGTERM and SIGHUP: nothing may fail, and every
    // process that was stopped exits 0 (a correctness bound, not a timing).
    for r in &table {
        assert!(num(r, 1) > 0.0, "{r:?}");
        assert_eq!(r[2], "0", "no failed request: {r:?}");
        let exits: Vec<&str> = r[3].split("exit ").skip(1).collect();
        assert!(exits.iter().all(|e| e.starts_with("0 ")), "every stop exits 0: {r:?}");
    }
    assert_eq!(table[0][3].matches("exit 0").count(), 2, "both clients exited 0: {:?}", table[0]);
    assert!(table[2][3].starts_with("exit 0"), "the server exited 0: {:?}", table[2]);
}

#[test]
fn soak_runs_its_events_and_drains_to_idle() {
    let csv = std::env::temp_dir().join(format!("tunnel-soak-test-{}.csv", std::process::id()));
    let stdout = bench(&["soak", "--csv", csv.to_str().unwrap()]);
    // The run itself fails (and so this test) if a request outlived its
    // deadline or an exchange stayed in flight when idle.
    let table = rows(&stdout, &["RSS", "open fds", "live tasks"]);
    assert_eq!(table.len(), 3, "{stdout}");
    assert!(stdout.contains("0 overdue"), "{stdout}");
    assert!(stdout.contains("idle at the end: 0 in flight, 6 streams"), "{stdout}");
    let events = stdout.lines().find(|l| l.starts_with("events:")).expect("events line");
    assert!(!events.contains(" 0 client restarts") && !events.contains(" 0 reloads"), "{events}");
    let samples = std::fs::read_to_string(&csv).unwrap();
    let _ = std::fs::remove_file(&csv);
    assert!(samples.lines().count() > 10, "a time series: {samples}");
    // Every sample read each daemon: RSS, fds and tasks above zero.
    for line in samples.lines().skip(1) {
        let v: Vec<u64> = line.split(',').map(|c| c.parse().unwrap()).collect();
        assert!(v[1] > 0 && v[2] > 0 && v[3] > 0, "server sample {line}");
    }
}

/// Three servers behind a real HAProxy: the promises, asserted on
/// counts (never timings). A server killed with -9 fails only requests sent
/// before HAProxy marked it down; a drain with drain_delay and a rolling
/// restart fail none; the other servers' sessions never reconnect.
#[test]
fn servers_behind_haproxy_survive_kill_stop_drain_and_rolling_restart() {
    // Where the bench looks: PATH, then the sbin directories.
    let mut dirs: Vec<std::path::PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(std::path::PathBuf::from));
    let installed = dirs.iter().any(|d| d.join("haproxy").is_file());
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "haproxy is required under CI");
        eprintln!("skipped: haproxy not installed (bench/setup.sh installs it)");
        return;
    }
    let stdout = bench(&["ha"]);
    let table = rows(&stdout, &["kill -9", "SIGSTOP", "SIGTERM", "rolling"]);
    assert_eq!(table.len(), 4, "{stdout}");
    for r in &table {
        assert!(num(r, 1) > 0.0, "requests were sent: {r:?}");
        assert_eq!(r[3], "0", "no request sent after HAProxy marked the server down failed: {r:?}");
    }
    let (kill, stop, drain, rolling) = (&table[0], &table[1], &table[2], &table[3]);
    assert!(kill[5].contains("sessions untouched") && stop[5].contains("sessions untouched"), "{stdout}");
    assert_eq!(drain[2], "0", "a drain fails nothing: {drain:?}");
    assert_eq!(rolling[2], "0", "a rolling restart fails nothing: {rolling:?}");
    // Killed: only what was in flight on it (at 200 req/s with 20 ms
    // requests, a few, and fewer than HAProxy's detection window holds).
    let failed: f64 = kill[2].split_whitespace().next().and_then(|n| n.parse().ok()).expect("a count first");
    assert!(failed < 200.0, "{kill:?}");
}

/// A cluster in etcd: forwarded requests are all answered, and the simulated
/// fleet converges (every session in every server's view) and recovers from
/// a killed server. Counts only, never timings.
#[test]
fn cluster_forwards_and_its_fleet_recovers_from_a_killed_server() {
    let installed =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file())).unwrap_or(false);
    if !installed {
        assert!(std::env::var_os("CI").is_none(), "etcd is required under CI");
        eprintln!("skipped: etcd not installed (bench/setup.sh installs it)");
        return;
    }
    let stdout = bench(&["cluster"]);
    let routes = rows(&stdout, &["local", "forwarded"]);
    assert_eq!(routes.len(), 2, "{stdout}");
    for r in &routes {
        assert!(r[4].starts_with("0 of "), "no request failed at 1000 req/s: {r:?}");
        assert!(num(r, 1) > 0.0 && r[5].contains("(0 failed)"), "{r:?}");
    }
    let fleet = rows(&stdout, &["every session", "sessions per server", "kill -9"]);
    assert_eq!(fleet.len(), 3, "{stdout}");
    assert!(fleet[2][1].contains("sessions back and agreed on by every server"), "{stdout}");
}

#[test]
fn tcp_services_print_setup_and_throughput() {
    let stdout = bench(&["tcp"]);
    let r = rows(&stdout, &["direct", "tunnel", "rathole"]);
    for route in ["direct", "tunnel (workers = 1)"] {
        let row = r.iter().find(|x| x[0] == route).unwrap_or_else(|| panic!("no {route} row:\n{stdout}"));
        assert!(num(row, 1) > 0.0 && num(row, 1) <= num(row, 2), "{row:?}");
        assert!(num(row, 3) > 0.0 && num(row, 4) > 0.0, "bytes moved: {row:?}");
    }
}

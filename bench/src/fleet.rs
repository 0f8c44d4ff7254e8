//! Many connected clients: one real tunnel-server process and `count` real
//! clients (the daemon's own client code) in this process, each with its
//! control stream and data streams. Reports the server's RSS idle and with
//! the fleet connected, so the per-client cost on each side; then with
//! traffic through every client (each with five minutes of series) and the
//! console's capture ring full (a rule keeping bodies, capture_limit's 16 MiB).

use crate::procs::{self, free_port, spawn, TempDir};
use crate::upstream;
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::Client;
use tunnel_lib::config::ClientConfig;

/// Connects `count` clients and prints the memory table.
pub async fn run(bins: &Path, count: usize) -> anyhow::Result<()> {
    let dir = TempDir::new("fleet")?;
    let up = upstream::start().await?;
    let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
    let server_toml = format!(
        "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\n[[groups]]\nname = \"fleet\"\ntoken = \"fleet-token\"\n[[rules]]\ngroup = \"fleet\"\nupstream = \"web\"\n"
    );
    let sc = dir.join("server.toml");
    std::fs::write(&sc, &server_toml)?;
    let server =
        spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), sc.as_os_str()], &dir.join("server.log"))?;
    let pid = server.id().context("server pid")?;
    let own = std::process::id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while procs::snapshot(admin).await.is_err() {
        if Instant::now() > deadline {
            bail!("tunnel-server did not start (log in {})", dir.0.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (server_idle, own_idle) = (procs::status_kib(pid, "VmRSS"), procs::status_kib(own, "VmRSS"));

    let stop = CancellationToken::new();
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..count {
        let text = format!(
            "server = \"http://{grpc}\"\nclient_id = \"fleet-{i}\"\ngroup = \"fleet\"\ntoken = \"fleet-token\"\n[upstreams]\nweb = \"http://{}\"\n",
            up.addr
        );
        let cfg = ClientConfig::from_str_named(&text, "fleet client")?;
        let stop = stop.clone();
        clients.spawn(async move { Client::new(cfg).run(stop.cancelled_owned()).await });
        // Spread the connects a little, as a real fleet's would be.
        if i % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let want_streams = count * 3;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut streams = 0;
    while streams < want_streams {
        if Instant::now() > deadline {
            stop.cancel();
            bail!("only {streams} of {want_streams} streams registered within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        streams = procs::snapshot(admin).await.map(|u| u.streams.len()).unwrap_or(0);
    }
    let connect_time = started.elapsed();
    // A round of requests proves the fleet serves, and touches the paths a
    // working fleet touches.
    let mut ok = 0;
    for _ in 0..200 {
        if crate::procs::get_status(http, "/small").await.ok() == Some(200) {
            ok += 1;
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let server_rss = procs::status_kib(pid, "VmRSS");
    let server_peak = procs::status_kib(pid, "VmHWM");
    let own_rss = procs::status_kib(own, "VmRSS");

    // Requests through every client: a new exchange goes to the least
    // loaded stream, so one after another they go round all of them.
    let rounds = count * 3;
    let mut served = 0;
    for _ in 0..rounds {
        if crate::procs::get_status(http, "/small").await.ok() == Some(200) {
            served += 1;
        }
    }
    let with_series = procs::snapshot(admin).await.map(|u| {
        u.traffic
            .iter()
            .filter(|s| s.subject == tunnel_lib::introspection::TrafficSubject::Client as i32 && s.step_ms == 1000)
            .count()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let series_rss = procs::status_kib(pid, "VmRSS");
    // 64 KiB uploads, first with no bodies kept (what moving them costs the
    // server's memory by itself), then on a rule keeping 64 KiB of each
    // body (put in force by a reload): past 16 MiB, the ring is full.
    let uploads = 400;
    let upload_all = || async move {
        let mut ok = 0;
        for _ in 0..uploads {
            if crate::procs::post_status(http, "/upload", 64 * 1024).await.ok() == Some(200) {
                ok += 1;
            }
        }
        ok
    };
    // As many plain uploads as there are data streams: each stream's
    // buffers grow to carry its first 64 KiB upload and keep that size
    // (about 48 KiB a stream), so only once every stream has carried one
    // does what follows measure the captures alone.
    let mut plain = 0;
    for _ in 0..(count * 2).div_ceil(uploads) {
        plain += upload_all().await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let uploads_rss = procs::status_kib(pid, "VmRSS");
    std::fs::write(
        &sc,
        server_toml.replace("upstream = \"web\"\n", "upstream = \"web\"\ncapture_bodies = \"64KiB\"\n"),
    )?;
    // The server polls its file each second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let uploaded = upload_all().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let captured_rss = procs::status_kib(pid, "VmRSS");
    let captured_peak = procs::status_kib(pid, "VmHWM");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), async { while clients.join_next().await.is_some() {} }).await;
    clients.abort_all();
    drop(server);
    up.stop();

    let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / count as f64;
    println!("\n{count} clients connected to one tunnel-server (split transport: a control stream and 2 data streams each, {want_streams} streams), connected in {:.1} s; {ok} of 200 requests through the fleet answered 200.", connect_time.as_secs_f64());
    println!("Client side: all clients in one process (this bench's, with the daemons' allocator), not {count} processes; a lone tunnel-client's RSS is in the race's memory table.\n");
    println!(
        "| | server RSS | server peak | per client, server side | clients' process RSS | per client, client side |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| idle, no clients | {:.1} MiB | | | {:.1} MiB | |",
        server_idle as f64 / 1024.0,
        own_idle as f64 / 1024.0
    );
    println!(
        "| {count} clients | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {:.1} KiB |",
        server_rss as f64 / 1024.0,
        server_peak as f64 / 1024.0,
        per(server_rss, server_idle),
        own_rss as f64 / 1024.0,
        per(own_rss, own_idle),
    );
    println!(
        "| with traffic: {served} of {rounds} requests through them ({} clients with series) | {:.1} MiB | | {:.1} KiB | | |",
        with_series.map_or("?".to_string(), |n| n.to_string()),
        series_rss as f64 / 1024.0,
        per(series_rss, server_rss),
    );
    println!(
        "| after {plain} 64 KiB uploads (one through each data stream), no bodies kept | {:.1} MiB | | | | |",
        uploads_rss as f64 / 1024.0,
    );
    println!(
        "| after {uploaded} of {uploads} more on a rule keeping bodies: the capture ring full (capture_limit 16 MiB) | {:.1} MiB | {:.1} MiB | | | |",
        captured_rss as f64 / 1024.0,
        captured_peak as f64 / 1024.0,
    );
    println!(
        "\nThe clients' series cost {:.1} MiB (the third row less the second); the captures {:.1} MiB (the fifth less the fourth).",
        (series_rss.saturating_sub(server_rss)) as f64 / 1024.0,
        (captured_rss.saturating_sub(uploads_rss)) as f64 / 1024.0
    );
    Ok(())
}

//! `tunnel-bench tcp`: a `[[tcp]]` service against rathole and direct, in
//! one run: connection setup (connect, one byte echoed, close; sequential)
//! and one-way throughput each direction through a single connection.

use crate::procs::{self, free_port, spawn, which, TempDir};
use anyhow::{bail, Context as _};
use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Child;

/// The three local services every route reaches.
#[derive(Clone, Copy)]
struct Ports {
    echo: SocketAddr,
    /// Reads to EOF, then answers "ok".
    sink: SocketAddr,
    /// Writes `size` bytes, then closes.
    source: SocketAddr,
}

struct Route {
    name: &'static str,
    ports: Ports,
    children: Vec<Child>,
    /// The daemons' logs, shown when a measurement fails.
    logs: Vec<std::path::PathBuf>,
}

/// Runs the comparison and prints its table; `size` per transfer.
pub async fn run(bins: &Path, quick: bool) -> anyhow::Result<()> {
    let size: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let connects = if quick { 50 } else { 500 };
    let dir = TempDir::new("tcp")?;
    let local =
        Ports { echo: serve("echo", 0).await?, sink: serve("sink", 0).await?, source: serve("source", size).await? };
    let mut routes = vec![Route { name: "direct", ports: local, children: vec![], logs: vec![] }];
    routes.push(start_tunnel(bins, &dir, local).await?);
    match which("rathole") {
        Some(r) => routes.push(start_rathole(&r, &dir, local).await?),
        None => eprintln!("rathole not found (bench/setup.sh installs it): running without it"),
    }
    println!("\nTCP services: connection setup ({connects} sequential: connect, 1 byte echoed, close) and one transfer of {} MiB each way.\n", size >> 20);
    println!("| route | setup p50 ms | setup p99 ms | upload MB/s | download MB/s |");
    println!("|---|---:|---:|---:|---:|");
    for r in &mut routes {
        let (p50, p99, up, down) = match measure(r.ports, connects, size).await {
            Ok(m) => m,
            Err(e) => {
                // Whatever the daemons said, and whether they still run, is the
                // first thing whoever reads this failure needs.
                let alive: Vec<String> = r.children.iter_mut().map(|c| format!("{:?}", c.try_wait())).collect();
                let tails: Vec<String> = r.logs.iter().map(|l| procs::log_tail(l)).collect();
                bail!("{}: {e:#}\nprocesses (None = running): {}\n{}", r.name, alive.join(", "), tails.join("\n"));
            }
        };
        println!("| {} | {:.3} | {:.3} | {:.0} | {:.0} |", r.name, p50 * 1e3, p99 * 1e3, up, down);
    }
    Ok(())
}

/// A local service of `kind` on a port of its own.
async fn serve(kind: &'static str, size: u64) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // Lives as long as the bench.
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                match kind {
                    "echo" => {
                        let (mut r, mut w) = s.split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                    "sink" => {
                        let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
                        let _ = s.write_all(b"ok").await;
                    }
                    _ => {
                        let block = vec![b's'; 256 << 10];
                        let mut left = size;
                        while left > 0 {
                            let n = left.min(block.len() as u64) as usize;
                            if s.write_all(&block[..n]).await.is_err() {
                                return;
                            }
                            left -= n as u64;
                        }
                        let _ = s.shutdown().await;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Setup p50 and p99 (seconds), upload and download MB/s through one route.
async fn measure(ports: Ports, connects: usize, size: u64) -> anyhow::Result<(f64, f64, f64, f64)> {
    let (p50, p99) = setup(ports.echo, connects).await.context("setup")?;
    let up = upload(ports.sink, size).await.context("upload")?;
    let down = download(ports.source, size).await.context("download")?;
    Ok((p50, p99, up, down))
}

/// Median and 99th percentile, seconds, of `n` connects with one echoed byte.
async fn setup(echo: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let one = async {
            let mut s = TcpStream::connect(echo).await?;
            s.set_nodelay(true)?;
            s.write_all(b"x").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(10), one).await.context("a connection took over 10 s")??;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: usize| times[(times.len() * p / 100).min(times.len() - 1)];
    Ok((pct(50), pct(99)))
}

/// MB/s writing `size` bytes to the sink until it says it read them all.
async fn upload(sink: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let run = async {
        let mut s = TcpStream::connect(sink).await?;
        let block = vec![b'u'; 256 << 10];
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            s.write_all(&block[..n]).await?;
            left -= n as u64;
        }
        s.shutdown().await?;
        let mut ack = Vec::new();
        s.read_to_end(&mut ack).await?;
        if ack != b"ok" {
            bail!("the sink did not acknowledge");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), run).await.context("upload over 300 s")??;
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// MB/s reading the source's `size` bytes to its end.
async fn download(source: SocketAddr, size: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    let run = async {
        let mut s = TcpStream::connect(source).await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        if got != size {
            bail!("read {got} of {size} bytes");
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(300), run).await.context("download over 300 s")??;
    Ok(size as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// A tunnel-server with three [[tcp]] services and one tunnel-client.
async fn start_tunnel(bins: &Path, dir: &TempDir, local: Ports) -> anyhow::Result<Route> {
    let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
    let public = Ports { echo: free_port()?, sink: free_port()?, source: free_port()? };
    let mut server = format!(
        "[server]\nhttp_listen = \"{http}\"\ngrpc_listen = \"{grpc}\"\nadmin_listen = \"{admin}\"\nworker_threads = 1\n[[groups]]\nname = \"bench\"\ntoken = \"bench-token\"\n"
    );
    let mut client = format!(
        "server = \"http://{grpc}\"\nclient_id = \"bench-tcp\"\ngroup = \"bench\"\ntoken = \"bench-token\"\nworker_threads = 1\n[upstreams]\n"
    );
    for (name, p, l) in
        [("echo", public.echo, local.echo), ("sink", public.sink, local.sink), ("source", public.source, local.source)]
    {
        server.push_str(&format!("[[tcp]]\nlisten = \"{p}\"\ngroup = \"bench\"\nupstream = \"{name}\"\n"));
        client.push_str(&format!("{name} = \"tcp://{l}\"\n"));
    }
    let (sc, cc) = (dir.join("server.toml"), dir.join("client.toml"));
    std::fs::write(&sc, server)?;
    std::fs::write(&cc, client)?;
    let logs = [dir.join("server.log"), dir.join("client.log")];
    let s = spawn(&bins.join("tunnel-server"), &[OsStr::new("--config"), sc.as_os_str()], &logs[0])?;
    let c = spawn(&bins.join("tunnel-client"), &[OsStr::new("--config"), cc.as_os_str()], &logs[1])?;
    echoing(public.echo, "the tunnel", &logs).await?;
    Ok(Route { name: "tunnel (workers = 1)", ports: public, children: vec![s, c], logs: logs.to_vec() })
}

/// rathole forwarding the same three services.
async fn start_rathole(rathole: &Path, dir: &TempDir, local: Ports) -> anyhow::Result<Route> {
    let control = free_port()?;
    let public = Ports { echo: free_port()?, sink: free_port()?, source: free_port()? };
    let mut server =
        format!("[server]\nbind_addr = \"{control}\"\ndefault_token = \"bench\"\n[server.transport]\ntype = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n");
    let mut client =
        format!("[client]\nremote_addr = \"{control}\"\ndefault_token = \"bench\"\n[client.transport]\ntype = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n");
    for (name, p, l) in
        [("echo", public.echo, local.echo), ("sink", public.sink, local.sink), ("source", public.source, local.source)]
    {
        server.push_str(&format!("[server.services.{name}]\nbind_addr = \"{p}\"\n"));
        client.push_str(&format!("[client.services.{name}]\nlocal_addr = \"{l}\"\n"));
    }
    let (sc, cc) = (dir.join("rathole-server.toml"), dir.join("rathole-client.toml"));
    std::fs::write(&sc, server)?;
    std::fs::write(&cc, client)?;
    let logs = [dir.join("rathole-server.log"), dir.join("rathole-client.log")];
    let s = spawn(rathole, &[OsStr::new("--server"), sc.as_os_str()], &logs[0])?;
    let c = spawn(rathole, &[OsStr::new("--client"), cc.as_os_str()], &logs[1])?;
    echoing(public.echo, "rathole", &logs).await?;
    Ok(Route { name: "rathole", ports: public, children: vec![s, c], logs: logs.to_vec() })
}

/// Waits until `echo` echoes a byte (its client connected), within 20 s.
async fn echoing(echo: SocketAddr, what: &str, logs: &[std::path::PathBuf]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let probe = async {
            let mut s = TcpStream::connect(echo).await?;
            s.write_all(b"?").await?;
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await?;
            anyhow::Ok(())
        };
        if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), probe).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            let tails: Vec<String> = logs.iter().map(|l| procs::log_tail(l)).collect();
            bail!("{what} did not carry a tcp connection within 20 s\n{}", tails.join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

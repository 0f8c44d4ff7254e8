//! tunnel-bench: starts real tunnel-server and tunnel-client processes on
//! 127.0.0.1, drives load, and prints markdown tables (docs/benchmarks.md):
//! heartbeat isolation per transport (the design's question), the speed race
//! against direct nginx and rathole, the memory of a large fleet, and
//! several servers behind HAProxy under faults.

mod cluster;
mod fleet;
mod ha;
mod isolation;
mod load;
mod lossy;
mod ops;
mod procs;
mod race;
mod soak;
mod tcp;
mod upstream;
mod ws;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::Duration;

/// The daemons' allocator: the fleet runs real client code in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(about = "Benchmarks of the tunnel: heartbeat isolation, the speed race, fleet memory, WebSocket, deploys")]
struct Args {
    /// Short runs with small loads, for the test suite (under a minute for
    /// isolation; the race and fleet add a few seconds each).
    #[arg(long, global = true)]
    quick: bool,
    /// Length of each cell or run (defaults: isolation 60s, race 15s).
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Where tunnel-server and tunnel-client are (default: beside this binary).
    #[arg(long, global = true)]
    bin_dir: Option<PathBuf>,
    /// Without a command: all of them, in turn.
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Heartbeat delay per transport under idle, bulk, slow, slow-reader and lossy-link loads.
    Isolation {
        #[arg(long, value_delimiter = ',', default_value = "split,single,split-connection")]
        transports: Vec<String>,
        /// idle, bulk, slow, slowreader, lossy.
        #[arg(long, value_delimiter = ',', default_value = "idle,bulk,slow,slowreader,lossy")]
        scenarios: Vec<String>,
        /// The link sockets' TCP options, each a set of rows: default (the
        /// daemons'), off (the kernel's), or options joined by +
        /// ("rto=20ms+delack=8ms+lowat=128KiB+thin"; those not named are off).
        #[arg(long, value_delimiter = ',', default_value = "default")]
        link_timers: Vec<isolation::Timers>,
        /// Packets dropped on the lossy link, percent each way.
        #[arg(long, default_value_t = lossy::LOSS_PERCENT)]
        loss: u32,
        /// Delay added to each direction of the lossy link.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "20ms")]
        link_delay: Duration,
    },
    /// Direct nginx vs this tunnel vs rathole: small requests (wrk, h2load), 1 GiB transfers (curl), memory.
    Race {
        /// Tunnel runtimes to race, as worker_threads values (0 = one per core, 1 = single-threaded).
        #[arg(long, value_delimiter = ',', default_value = "0,1")]
        workers: Vec<usize>,
        /// Race without rathole even when it is installed.
        #[arg(long)]
        no_rathole: bool,
        /// Access policies on the tunnel's rule, each a route of its own: none, allow, rate, basic, jwt.
        #[arg(long, value_delimiter = ',', default_value = "none")]
        policies: Vec<race::Policy>,
    },
    /// A [[tcp]] service vs rathole vs direct: connection setup and one-way throughput each direction.
    Tcp,
    /// Server memory with many connected clients (real client code, in this process).
    Fleet {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
    },
    /// WebSocket echo direct vs through the tunnel: throughput, round trips, a 16 MiB message.
    Ws,
    /// Deploys under 200 req/s with real processes: rolling client restarts, reloads, server SIGTERM.
    Ops,
    /// Three servers behind HAProxy at 200 req/s: kill -9, SIGSTOP, drain and a rolling restart of one.
    Ha,
    /// A cluster in etcd: forwarded vs local requests, and a simulated fleet (20 servers, 2000 clients) with a server killed.
    Cluster,
    /// Open-loop latency at a fixed rate against each URL in turn, repeated: p50, p99, p99.9 and max (a route against direct).
    Paced {
        /// URLs to GET, e.g. direct nginx and the same file through the tunnel.
        #[arg(required = true)]
        urls: Vec<String>,
        /// Requests per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// How many times each URL is probed, in turn.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
    },
    /// Long mixed load with restarts and reloads, sampling RSS, fds and tasks (default 1 h; not in the all-commands run).
    Soak {
        /// Where the time series goes.
        #[arg(long)]
        csv: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bins = match args.bin_dir {
        Some(d) => d,
        None => std::env::current_exe()?.parent().context("binary directory")?.to_path_buf(),
    };
    for b in ["tunnel-server", "tunnel-client"] {
        if !bins.join(b).exists() {
            bail!("{b} not found in {}: build it (cargo build --release) or pass --bin-dir", bins.display());
        }
    }
    let defaults = Cmd::Isolation {
        transports: vec!["split".into(), "single".into(), "split-connection".into()],
        scenarios: ["idle", "bulk", "slow", "slowreader", "lossy"].map(String::from).to_vec(),
        link_timers: vec![isolation::Timers::Default],
        loss: lossy::LOSS_PERCENT,
        link_delay: lossy::DELAY,
    };
    let commands = match args.command {
        Some(c) => vec![c],
        // The fleet first: it measures this process's memory, which the
        // others' loads would have grown.
        None => vec![
            Cmd::Fleet { clients: if args.quick { 100 } else { 1000 } },
            defaults,
            Cmd::Race { workers: vec![0, 1], no_rathole: false, policies: vec![race::Policy::None] },
            Cmd::Tcp,
            Cmd::Ws,
            Cmd::Ops,
            Cmd::Ha,
            Cmd::Cluster,
        ],
    };
    for c in commands {
        match c {
            Cmd::Isolation { transports, scenarios, link_timers, loss, link_delay } => {
                let cfg = load::Config::new(args.quick, args.duration);
                let link = lossy::Link { loss, delay: link_delay };
                isolation::run(&bins, &transports, &scenarios, &link_timers, link, &cfg).await?;
            }
            Cmd::Race { workers, no_rathole, policies } => {
                let cfg = race::Config::new(args.quick, args.duration, workers, no_rathole, policies);
                race::run(&bins, &cfg).await?;
            }
            Cmd::Fleet { clients } => fleet::run(&bins, clients).await?,
            Cmd::Tcp => tcp::run(&bins, args.quick).await?,
            Cmd::Ws => ws::run(&bins, &ws::Config::new(args.quick)).await?,
            Cmd::Ops => ops::run(&bins, &ops::Config::new(args.quick)).await?,
            Cmd::Ha => ha::run(&bins, &ha::Config::new(args.quick)).await?,
            Cmd::Cluster => cluster::run(&bins, &cluster::Config::new(args.quick)).await?,
            Cmd::Paced { urls, rate, rounds } => {
                race::paced_command(&urls, rate, rounds, args.duration.unwrap_or(Duration::from_secs(8))).await?
            }
            Cmd::Soak { csv } => soak::run(&bins, &soak::Config::new(args.quick, args.duration, csv)).await?,
        }
    }
    Ok(())
}

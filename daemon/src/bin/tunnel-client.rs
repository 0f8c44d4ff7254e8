//! tunnel-client: dials the tunnel server and forwards its requests to local upstreams.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tunnel_daemon::client::Client;
use tunnel_lib::config::ClientConfig;

/// mimalloc: allocation was 12% of each daemon's CPU on small requests
/// with the system allocator (docs/benchmarks.md, profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Reverse HTTP tunnel client: serves the tunnel server's requests from local upstreams")]
struct Args {
    /// Path to client.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// Validate the config, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match ClientConfig::from_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        let servers: Vec<String> = config.servers.iter().map(tunnel_daemon::client::fleet::url_text).collect();
        let (noun, sessions) = match (config.connections, servers.len()) {
            (0, 1) => ("server", String::new()),
            (0, _) => ("servers", String::new()),
            (k, _) => ("seeds", format!(", sessions to {k} of the fleet's servers")),
        };
        println!(
            "{}: OK ({noun} {}{sessions}, client {}, group {}, transport {}, {} upstreams)",
            args.config.display(),
            servers.join(", "),
            config.client_id,
            config.group,
            config.transport,
            config.upstreams.len()
        );
        return ExitCode::SUCCESS;
    }
    let _guard = match tunnel_daemon::logging::init(&config.log, "tunnel-client") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("logging: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = tunnel_daemon::runtime::build(config.worker_threads).and_then(|rt| {
        rt.block_on(Client::new(config).with_config_path(args.config).run(tunnel_daemon::signal::shutdown()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tunnel-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

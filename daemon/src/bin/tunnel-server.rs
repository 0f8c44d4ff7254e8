//! tunnel-server: public HTTP ingress and the gRPC endpoint tunnel clients dial.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use tunnel_daemon::server::{Listeners, Server};
use tunnel_lib::config::ServerConfig;

/// mimalloc: allocation was 12% of each daemon's CPU on small requests
/// with the system allocator (docs/benchmarks.md, profile).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Reverse HTTP tunnel server: public ingress, routed to tunnel clients over gRPC")]
struct Args {
    /// Path to server.toml.
    #[arg(long, short, required_unless_present = "demo")]
    config: Option<PathBuf>,
    /// Validate the config, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
    /// Run server, client and a demo upstream on loopback with built-in defaults.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    demo: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.demo {
        let _ = tunnel_daemon::logging::init(&Default::default(), "tunnel-server");
        return finish(
            tunnel_daemon::runtime::build(0)
                .and_then(|rt| rt.block_on(tunnel_daemon::demo::run(tunnel_daemon::signal::shutdown()))),
        );
    }
    let Some(path) = args.config else {
        return ExitCode::from(2);
    };
    let config = match ServerConfig::from_file(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "{}: OK ({} groups, {} rules, http {}, grpc {})",
            path.display(),
            config.groups.len(),
            config.rules.rules().len(),
            config.server.http_listen,
            config.server.grpc_listen
        );
        return ExitCode::SUCCESS;
    }
    let _guard = match tunnel_daemon::logging::init(&config.log, "tunnel-server") {
        Ok(g) => g,
        Err(e) => {
            eprintln!("logging: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = tunnel_daemon::runtime::build(config.server.worker_threads).and_then(|rt| {
        rt.block_on(async move {
            let listeners = Listeners::bind(&config).await?;
            Server::new(config, Some(path)).run(listeners, tunnel_daemon::signal::shutdown()).await
        })
    });
    finish(result)
}

fn finish(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("tunnel-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! tunnel-server: public HTTP ingress and the gRPC endpoint tunnel clients dial.

use clap::{Parser, Subcommand};
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
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Validate the config, print the result and exit (0 valid, 2 invalid).
    #[arg(long)]
    check: bool,
    /// Run server, client and a demo upstream on loopback with built-in defaults.
    #[arg(long, conflicts_with_all = ["config", "check"])]
    demo: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The fleet's shared config in etcd (servers with [cluster]).
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check FILE ([[groups]] and [[rules]] only) and store it in etcd: every
    /// server of the fleet applies it and pushes it to its clients. Reaches
    /// etcd with the [cluster] section of the file given by --config.
    Push {
        /// The groups and rules to push.
        file: PathBuf,
        /// Only check FILE (0 valid, 2 invalid); store nothing.
        #[arg(long)]
        check: bool,
    },
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
    if let Some(Command::Config(ConfigCommand::Push { file, check })) = &args.command {
        return push(args.config.as_deref(), file, *check);
    }
    let Some(path) = args.config else {
        eprintln!("tunnel-server: --config server.toml is required (or --demo to try it on built-in defaults)");
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
        let cluster = match &config.cluster {
            None => String::new(),
            Some(c) => format!(
                "; cluster: {} etcd endpoint(s), prefix {}, advertise {}, {}",
                c.etcd.len(),
                c.prefix,
                c.advertise,
                match (&c.peer_listen, &c.peer_tls, &c.peer_token) {
                    (None, ..) => "takes no forwarded requests".to_string(),
                    (Some(l), Some(_), _) => format!("forwarded requests on {l} (mTLS)"),
                    (Some(l), None, Some(_)) => format!("forwarded requests on {l} (peer_token)"),
                    (Some(l), None, None) => format!("forwarded requests on {l} (loopback, no authentication)"),
                }
            ),
        };
        println!(
            "{}: OK ({} groups, {} rules, http {}, grpc {}{cluster})",
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

/// `config push`: exit 0 when stored (or valid, with --check), 2 when the
/// file is invalid, 1 when etcd could not take it.
fn push(server_toml: Option<&std::path::Path>, file: &std::path::Path, check_only: bool) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    let name = file.display().to_string();
    match tunnel_lib::config::PushedConfig::from_str_named(&text, &name) {
        Ok(p) => {
            if check_only {
                println!("{name}: OK ({} groups, {} rules)", p.groups.len(), p.rules.rules().len());
                return ExitCode::SUCCESS;
            }
        }
        Err(e) => {
            eprintln!("invalid config: {e}");
            return ExitCode::from(2);
        }
    }
    let Some(server_toml) = server_toml else {
        eprintln!("config push: --config server.toml is needed to find etcd (its [cluster] section)");
        return ExitCode::from(2);
    };
    let cluster = match ServerConfig::from_file(server_toml) {
        Ok(ServerConfig { cluster: Some(c), .. }) => c,
        Ok(_) => {
            eprintln!("config push: {} has no [cluster] section: nothing to push to", server_toml.display());
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    let pushed = tunnel_daemon::runtime::build(1)
        .and_then(|rt| rt.block_on(tunnel_daemon::server::cluster::push_config(&cluster, &text, &name)));
    match pushed {
        Ok(revision) => {
            println!(
                "{name}: pushed to {}/config at etcd revision {revision} (config version r{revision})",
                cluster.prefix
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("config push: {e:#}");
            ExitCode::FAILURE
        }
    }
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

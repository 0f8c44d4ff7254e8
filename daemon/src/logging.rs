//! Tracing set-up for both daemons: stderr, or daily-rolling files.

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tunnel_lib::config::LogConfig;

/// Installs the global subscriber. Keep the returned guard alive for the
/// life of the process: dropping it flushes and stops the file writer.
pub fn init(cfg: &LogConfig, binary: &str) -> anyhow::Result<Option<WorkerGuard>> {
    let default = cfg.level.clone().unwrap_or_else(|| "info".into());
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&default))
        .map_err(|e| anyhow::anyhow!("log level {default:?}: {e}"))?;
    match &cfg.directory {
        None => {
            use std::io::IsTerminal;
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                // Colour only on a terminal: journald and log files get plain text.
                .with_ansi(std::io::stderr().is_terminal())
                .with_writer(std::io::stderr)
                .try_init()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(None)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("log directory {}: {e}", dir.display()))?;
            let prefix = cfg.file_prefix.clone().unwrap_or_else(|| binary.to_string());
            let appender = tracing_appender::rolling::daily(dir, format!("{prefix}.log"));
            let (writer, guard) = tracing_appender::non_blocking(appender);
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(writer)
                .try_init()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Some(guard))
        }
    }
}

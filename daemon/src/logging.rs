//! Tracing set-up for both daemons: stderr or daily-rolling files, as text
//! or as one JSON object per line. Public requests are logged one line each
//! under the `access` target (filter it with e.g. `RUST_LOG=info,access=off`).

use std::io::Write;
use std::sync::{Arc, OnceLock};
use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;
use tunnel_lib::config::{LogConfig, LogFormat};

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
            // Colour only on a terminal: journald and log files get plain text.
            let ansi = std::io::stderr().is_terminal();
            if !ansi {
                set_line_sink(std::io::stderr, cfg.format);
            }
            install(filter, cfg.format, ansi, std::io::stderr)?;
            Ok(None)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("log directory {}: {e}", dir.display()))?;
            let prefix = cfg.file_prefix.clone().unwrap_or_else(|| binary.to_string());
            let appender = tracing_appender::rolling::daily(dir, format!("{prefix}.log"));
            let (writer, guard) = tracing_appender::non_blocking(appender);
            set_line_sink(writer.clone(), cfg.format);
            install(filter, cfg.format, false, writer)?;
            Ok(Some(guard))
        }
    }
}

fn install<W>(filter: EnvFilter, format: LogFormat, ansi: bool, writer: W) -> anyhow::Result<()>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    let done = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        // Fields at the top level of each object, where log shippers look for them.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    done.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Writes whole lines to the installed subscriber's writer.
pub type LineSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// The installed writer and format, for lines formatted without tracing
/// (the access log's): plain text or JSON, not a terminal's colours.
static LINE_SINK: OnceLock<(LogFormat, LineSink)> = OnceLock::new();

/// The installed writer and its format, for a writer of whole lines that
/// formats them itself; None without an installed subscriber or on a terminal.
pub fn line_sink() -> Option<(LogFormat, &'static LineSink)> {
    LINE_SINK.get().map(|(f, s)| (*f, s))
}

/// Makes `writer` (a handle to the subscriber's own) the line sink.
fn set_line_sink<M>(writer: M, format: LogFormat)
where
    M: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    // First installed wins; a process installs one subscriber.
    let _ = LINE_SINK.set((
        format,
        Arc::new(move |bytes: &[u8]| {
            let _ = writer.make_writer().write_all(bytes);
        }),
    ));
}

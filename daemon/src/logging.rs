//! Tracing set-up for both daemons: stderr or daily-rolling files, as text
//! or as one JSON object per line. Public requests are logged one line each
//! under the `access` target (filter it with e.g. `RUST_LOG=info,access=off`).

use std::cell::RefCell;
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
            install(filter, cfg.format, ansi, Batching::new(std::io::stderr, (!ansi).then_some(cfg.format)))?;
            Ok(None)
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("log directory {}: {e}", dir.display()))?;
            let prefix = cfg.file_prefix.clone().unwrap_or_else(|| binary.to_string());
            let appender = tracing_appender::rolling::daily(dir, format!("{prefix}.log"));
            let (writer, guard) = tracing_appender::non_blocking(appender);
            install(filter, cfg.format, false, Batching::new(writer, Some(cfg.format)))?;
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

thread_local! {
    /// Output of the events this thread emits inside `batch`.
    static BATCH: RefCell<Option<Vec<u8>>> = const { RefCell::new(None) };
}

/// Bytes a batch holds before they are written.
const BATCH_LIMIT: usize = 1 << 20;

/// Writes whole lines to the installed subscriber's writer.
pub type LineSink = Arc<dyn Fn(&[u8]) + Send + Sync>;

/// Where a finished batch is written: the installed subscriber's writer.
static SINK: OnceLock<LineSink> = OnceLock::new();

/// The installed format, when lines written without tracing (the access
/// log's) can match it: plain text or JSON, not a terminal's colours.
static PLAIN_FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The installed writer and its format, for a writer of whole lines that
/// formats them itself; None without an installed subscriber or on a terminal.
pub fn line_sink() -> Option<(LogFormat, &'static LineSink)> {
    Some((*PLAIN_FORMAT.get()?, SINK.get()?))
}

/// Runs `f`, writing the log lines it emits on this thread with one write
/// at its end instead of one per line (the access log's thread uses it).
/// Without an installed subscriber it just runs `f`.
pub fn batch(f: impl FnOnce()) {
    let Some(sink) = SINK.get() else {
        f();
        return;
    };
    BATCH.with(|b| *b.borrow_mut() = Some(Vec::with_capacity(64 << 10)));
    f();
    let out = BATCH.with(|b| b.borrow_mut().take()).unwrap_or_default();
    if !out.is_empty() {
        sink(&out);
    }
}

/// A writer that, inside `batch`, appends to the thread's batch instead.
struct Batching<M>(Arc<M>);

impl<M> Batching<M>
where
    M: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    fn new(inner: M, plain: Option<LogFormat>) -> Self {
        if let Some(f) = plain {
            let _ = PLAIN_FORMAT.set(f);
        }
        let inner = Arc::new(inner);
        let sink = inner.clone();
        // First installed wins; a process installs one subscriber.
        let _ = SINK.set(Arc::new(move |bytes: &[u8]| {
            let _ = sink.make_writer().write_all(bytes);
        }));
        Batching(inner)
    }
}

enum BatchWriter<W> {
    Direct(W),
    Batched,
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Batching<M> {
    type Writer = BatchWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        if BATCH.with(|b| b.borrow().is_some()) {
            BatchWriter::Batched
        } else {
            BatchWriter::Direct(self.0.make_writer())
        }
    }
}

impl<W: Write> Write for BatchWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            BatchWriter::Direct(w) => w.write(buf),
            BatchWriter::Batched => {
                BATCH.with(|b| {
                    if let Some(v) = b.borrow_mut().as_mut() {
                        v.extend_from_slice(buf);
                        // A large batch goes out in parts: bounded memory.
                        if v.len() >= BATCH_LIMIT {
                            if let Some(sink) = SINK.get() {
                                sink(v);
                            }
                            v.clear();
                        }
                    }
                });
                Ok(buf.len())
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            // One write per line, as the plain writer did.
            BatchWriter::Direct(w) => w.write_all(buf),
            BatchWriter::Batched => self.write(buf).map(|_| ()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            BatchWriter::Direct(w) => w.flush(),
            BatchWriter::Batched => Ok(()),
        }
    }
}

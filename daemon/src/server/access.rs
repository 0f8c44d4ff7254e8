//! The access log: one line per public request, target `access`, written
//! off the runtime thread.
//!
//! Formatting a line through tracing's fmt layer and writing it took 17% of
//! the server's CPU at saturation, all of it on the one runtime thread that
//! also serves the requests (docs/benchmarks.md, issue 20). Here a request's
//! record is only queued; a thread of the log's own wakes when the queue
//! fills from empty, lets a batch gather for `GATHER`, and emits the batch
//! as tracing events whose output is written with one write per batch
//! (`logging::batch`). The lines keep their format, fields and filter; they
//! appear at most `GATHER` later than the response.

use prometheus_client::metrics::counter::Counter;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};
use tunnel_lib::config::LogFormat;
use tunnel_lib::introspection::RequestInfo;

/// How long the thread lets a batch gather after it woke for one.
const GATHER: Duration = Duration::from_millis(20);
/// Records queued at most: at 20k requests a second the thread takes about
/// 400 per batch, so a full queue means it is starved of CPU; then records
/// are dropped and counted rather than grow memory without bound.
const QUEUE_LIMIT: usize = 16 * 1024;

/// The queue of access records and the thread that writes them.
pub struct AccessLog {
    inner: Arc<Inner>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

struct Inner {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Records dropped because the queue was full, since start.
    dropped: AtomicU64,
    /// The same, as the `tunnel_access_log_dropped` metric.
    dropped_metric: Counter,
}

#[derive(Default)]
struct Queue {
    /// Each with the time its request ended: the line's timestamp.
    records: Vec<(SystemTime, Arc<RequestInfo>)>,
    closed: bool,
}

impl AccessLog {
    /// An empty log and its writer thread; lines dropped are counted in `dropped`.
    pub fn new(dropped: Counter) -> Self {
        let inner = Arc::new(Inner::new(dropped));
        let worker = inner.clone();
        let thread = std::thread::Builder::new().name("access-log".into()).spawn(move || worker.run());
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!("no access log thread ({e}): access lines are written as requests end");
                inner.lock().closed = true;
                None
            }
        };
        AccessLog { inner, thread: Mutex::new(thread) }
    }

    /// Queues one request's line; never blocks on the writing.
    pub fn record(&self, rec: Arc<RequestInfo>) {
        // Filtered out (`access=off`): nothing to queue.
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        match self.inner.push((SystemTime::now(), rec)) {
            Push::Queued { first } => {
                // One wake per batch: while a batch gathers the queue is not empty.
                if first {
                    self.inner.wake.notify_one();
                }
            }
            Push::Dropped => {}
            Push::Closed((_, rec)) => emit(&rec),
        }
    }

    /// Lines dropped because the writer fell behind, since start.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Writes what is queued and stops the thread; later records are written
    /// as they come. Waits for the writing (at shutdown, so that no line is lost).
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The thread writes what is left and ends; nothing waits for it.
        self.inner.lock().closed = true;
        self.inner.wake.notify_one();
    }
}

/// What became of a pushed record.
enum Push {
    /// In the queue; `first` if the queue was empty (the thread needs waking).
    Queued { first: bool },
    /// The queue was full: counted in `dropped`.
    Dropped,
    /// The thread has stopped: the caller writes it.
    Closed((SystemTime, Arc<RequestInfo>)),
}

impl Inner {
    fn new(dropped_metric: Counter) -> Self {
        Inner { queue: Mutex::default(), wake: Condvar::new(), dropped: AtomicU64::new(0), dropped_metric }
    }

    fn push(&self, rec: (SystemTime, Arc<RequestInfo>)) -> Push {
        let mut q = self.lock();
        if q.closed {
            return Push::Closed(rec);
        }
        if q.records.len() >= QUEUE_LIMIT {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped_metric.inc();
            return Push::Dropped;
        }
        q.records.push(rec);
        Push::Queued { first: q.records.len() == 1 }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn run(&self) {
        let mut batch = Vec::new();
        let mut reported = 0;
        loop {
            let closed = {
                let mut q = self.lock();
                while q.records.is_empty() && !q.closed {
                    q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                std::mem::swap(&mut batch, &mut q.records);
                q.closed
            };
            match crate::logging::line_sink() {
                // Formatted here, as the installed format would, and written
                // with one write per batch.
                Some((format, sink)) => {
                    let mut out = Vec::with_capacity(batch.len() * 400);
                    for (at, rec) in batch.drain(..) {
                        write_line(&mut out, format, at, &rec);
                        if out.len() >= WRITE_LIMIT {
                            sink(&out);
                            out.clear();
                        }
                    }
                    if !out.is_empty() {
                        sink(&out);
                    }
                }
                // No installed subscriber we can match (tests, a terminal's
                // colours): tracing formats them.
                None => crate::logging::batch(|| {
                    for (_, rec) in batch.drain(..) {
                        emit(&rec);
                    }
                }),
            }
            let dropped = self.dropped.load(Ordering::Relaxed);
            if dropped > reported {
                tracing::warn!(dropped = dropped - reported, "access log fell behind: lines dropped");
                reported = dropped;
            }
            if closed {
                return;
            }
            std::thread::sleep(GATHER);
        }
    }
}

/// Bytes formatted before they are written.
const WRITE_LIMIT: usize = 1 << 20;

/// The access line of one request, written as tracing-subscriber's fmt layer
/// writes the same event in `format` (its text layout, or its JSON object
/// with the event's fields flattened), at `at`. Measured at a fifth of the
/// server's instructions per small request when tracing formatted it.
fn write_line(out: &mut Vec<u8>, format: LogFormat, at: SystemTime, rec: &RequestInfo) {
    let time = humantime::format_rfc3339_micros(at);
    let strings: [(&str, &str); 4] =
        [("trace_id", &rec.trace_id), ("request_id", &rec.request_id), ("method", &rec.method), ("host", &rec.host)];
    let path = ("path", rec.path.as_str());
    let numbers: [(&str, u64); 4] = [
        ("status", u64::from(rec.status)),
        ("duration_ms", rec.duration_ms),
        ("bytes_in", rec.bytes_in),
        ("bytes_out", rec.bytes_out),
    ];
    let tail: [(&str, &str); 6] = [
        ("group", &rec.group),
        ("client", &rec.client_id),
        ("stream", &rec.stream_id),
        ("upgrade", &rec.upgrade),
        ("error", &rec.error),
        ("forwarded_to", &rec.forwarded_to),
    ];
    match format {
        LogFormat::Text => {
            let _ = write!(out, "{time}  INFO access: request");
            let field = |out: &mut Vec<u8>, k: &str, v: &[u8]| {
                out.push(b' ');
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                out.extend_from_slice(v);
            };
            for (k, v) in strings.into_iter().chain([path]) {
                field(out, k, v.as_bytes());
            }
            for (k, v) in numbers {
                field(out, k, v.to_string().as_bytes());
            }
            for (k, v) in tail {
                field(out, k, v.as_bytes());
            }
        }
        LogFormat::Json => {
            let _ = write!(out, r#"{{"timestamp":"{time}","level":"INFO","message":"request""#);
            let string = |out: &mut Vec<u8>, k: &str, v: &str| {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b"\":");
                let _ = serde_json::to_writer(&mut *out, v);
            };
            for (k, v) in strings.into_iter().chain([path]) {
                string(out, k, v);
            }
            for (k, v) in numbers {
                let _ = write!(out, r#","{k}":{v}"#);
            }
            for (k, v) in tail {
                string(out, k, v);
            }
            out.extend_from_slice(br#","target":"access"}"#);
        }
    }
    out.push(b'\n');
}

/// The access line of one request, through tracing.
fn emit(rec: &RequestInfo) {
    tracing::info!(
        target: "access",
        trace_id = %rec.trace_id,
        request_id = %rec.request_id,
        method = %rec.method,
        host = %rec.host,
        path = %rec.path,
        status = rec.status,
        duration_ms = rec.duration_ms,
        bytes_in = rec.bytes_in,
        bytes_out = rec.bytes_out,
        group = %rec.group,
        client = %rec.client_id,
        stream = %rec.stream_id,
        upgrade = %rec.upgrade,
        error = %rec.error,
        forwarded_to = %rec.forwarded_to,
        "request"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full queue drops and counts records instead of growing; closing
    /// writes what was queued, ends the thread, and later records go out
    /// directly.
    #[test]
    fn the_queue_is_bounded_and_close_writes_it_out() {
        // No thread: the queue alone.
        let inner = Inner::new(Counter::default());
        let rec = || (SystemTime::now(), Arc::new(RequestInfo::default()));
        assert!(matches!(inner.push(rec()), Push::Queued { first: true }));
        assert!(matches!(inner.push(rec()), Push::Queued { first: false }));
        inner.lock().records.resize(QUEUE_LIMIT, rec());
        assert!(matches!(inner.push(rec()), Push::Dropped));
        assert_eq!(inner.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(inner.lock().records.len(), QUEUE_LIMIT);

        let log = AccessLog::new(Counter::default());
        for _ in 0..100 {
            let _ = log.inner.push(rec());
        }
        log.close();
        assert!(log.inner.lock().records.is_empty(), "close writes the queue out");
        assert!(log.thread.lock().expect("lock").is_none(), "the thread ended");
        assert!(matches!(log.inner.push(rec()), Push::Closed(_)));
    }

    /// Captures what a subscriber writes on this thread.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The line as tracing-subscriber formats the same event, without its timestamp.
    fn through_tracing(format: LogFormat, rec: &RequestInfo) -> String {
        let capture = Capture::default();
        let writer = {
            let c = capture.clone();
            move || c.clone()
        };
        let builder = tracing_subscriber::fmt().with_writer(writer).with_ansi(false);
        match format {
            LogFormat::Text => tracing::subscriber::with_default(builder.finish(), || emit(rec)),
            LogFormat::Json => tracing::subscriber::with_default(
                builder.json().flatten_event(true).with_current_span(false).finish(),
                || emit(rec),
            ),
        }
        let bytes = capture.0.lock().expect("capture").clone();
        String::from_utf8(bytes).expect("utf-8")
    }

    /// Our own formatting writes exactly the line tracing would, in both
    /// formats, fields, quoting and escaping included: operators' parsers
    /// see no difference.
    #[test]
    fn access_lines_match_tracing_formatting() {
        let rec = RequestInfo {
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736".into(),
            request_id: "0af7651916cd43dd8448eb211c80319c".into(),
            method: "GET".into(),
            host: "app.example".into(),
            path: "/a b/\"quoted\"\\".into(),
            status: 502,
            duration_ms: 12,
            bytes_in: 3,
            bytes_out: 4567,
            group: "web".into(),
            client_id: "edge-1".into(),
            stream_id: "s-1".into(),
            error: "upstream \"web\" unreachable: connection refused\n".into(),
            ..Default::default()
        };
        let at = SystemTime::now();
        for format in [LogFormat::Text, LogFormat::Json] {
            let mut ours = Vec::new();
            write_line(&mut ours, format, at, &rec);
            let ours = String::from_utf8(ours).expect("utf-8");
            let theirs = through_tracing(format, &rec);
            let strip = |line: &str| match format {
                LogFormat::Text => line.split_once(' ').map(|(_, rest)| rest.to_string()).unwrap_or_default(),
                LogFormat::Json => {
                    // The object must parse; the rest compares byte for byte, in order.
                    let v: serde_json::Value = serde_json::from_str(line).expect("json");
                    assert!(v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')), "{line}");
                    line.split_once(r#"Z","level""#).map(|(_, rest)| rest.to_string()).unwrap_or_default()
                }
            };
            assert_eq!(strip(&ours), strip(&theirs), "{format:?}");
            assert!(ours.ends_with('\n'));
        }
    }
}

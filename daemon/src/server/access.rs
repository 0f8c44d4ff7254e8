//! The access log: one line per public request, target `access`, written
//! off the runtime thread.
//!
//! Formatting a line through tracing's fmt layer and writing it took 17% of
//! the server's CPU at saturation, all of it on the one runtime thread that
//! also serves the requests (docs/benchmarks.md, issue 20). Here a request's
//! record is only queued; a thread of the log's own wakes for the first
//! record of a batch, lets the batch gather for `GATHER`, and writes it with
//! one write. The lines keep their format, fields and filter; they appear
//! at most `GATHER` later than the response.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use prometheus_client::metrics::counter::Counter;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tunnel_lib::config::LogFormat;
use tunnel_lib::introspection::RequestInfo;

/// How long the thread lets a batch gather after it woke for one.
const GATHER: Duration = Duration::from_millis(20);
/// Records queued at most: at 20k requests a second the thread takes about
/// 400 per batch, so a full queue means it is starved of CPU; then records
/// are dropped and counted rather than grow memory without bound.
const QUEUE_LIMIT: usize = 16 * 1024;

/// A request's record, with the time it ended: its line's timestamp.
type Entry = (SystemTime, Arc<RequestInfo>);

enum Msg {
    Line(Entry),
    /// Write what is queued and end.
    Stop,
}

/// The queue of access records and the thread that writes them. The queue
/// is lock-free (crossbeam's bounded channel): the runtime thread never
/// waits on the log's thread, which a shared lock would make it do whenever
/// that thread lost its CPU while holding it (measured as a 1-2 ms tail at
/// 1000 req/s with a mutex and condvar).
pub struct AccessLog {
    tx: Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Records dropped because the queue was full, since start: the
    /// `tunnel_access_log_dropped` metric (the thread warns of them too).
    dropped: Counter,
}

impl AccessLog {
    /// An empty log and its writer thread; lines dropped are counted in `dropped`.
    pub fn new(dropped: Counter) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_LIMIT);
        let seen = dropped.clone();
        let thread = std::thread::Builder::new().name("access-log".into()).spawn(move || run(rx, &seen));
        let thread = match thread {
            Ok(t) => Some(t),
            // The receiver went with the closure: every record is written
            // as it comes (Disconnected).
            Err(e) => {
                tracing::warn!("no access log thread ({e}): access lines are written as requests end");
                None
            }
        };
        AccessLog { tx, thread: Mutex::new(thread), dropped }
    }

    /// Queues one request's line; never blocks on the writing.
    pub fn record(&self, rec: Arc<RequestInfo>) {
        // Filtered out (`access=off`): nothing to queue.
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        match self.tx.try_send(Msg::Line((SystemTime::now(), rec))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
            }
            // The thread has stopped (shutdown): written here.
            Err(TrySendError::Disconnected(Msg::Line((_, rec)))) => emit(&rec),
            Err(TrySendError::Disconnected(Msg::Stop)) => {}
        }
    }

    /// Lines dropped because the writer fell behind, since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Writes what is queued and stops the thread; later records are written
    /// as they come. Waits for the writing (at shutdown, so that no line is lost).
    pub fn close(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = thread {
            // Waits for room: the thread is draining.
            let _ = self.tx.send(Msg::Stop);
            let _ = t.join();
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The thread writes what is left and ends; nothing waits for it.
        let _ = self.tx.try_send(Msg::Stop);
    }
}

/// The log's thread: sleeps until a record comes, lets a batch gather, writes it.
fn run(rx: Receiver<Msg>, dropped: &Counter) {
    let mut batch: Vec<Entry> = Vec::new();
    let mut reported = 0;
    loop {
        let mut stop = match rx.recv() {
            Ok(Msg::Line(e)) => {
                batch.push(e);
                false
            }
            Ok(Msg::Stop) | Err(_) => true,
        };
        if !stop {
            std::thread::sleep(GATHER);
        }
        // What gathered (and, when stopping, what was queued before the stop).
        loop {
            match rx.try_recv() {
                Ok(Msg::Line(e)) => batch.push(e),
                Ok(Msg::Stop) => stop = true,
                Err(_) => break,
            }
        }
        write_batch(&mut batch);
        let now = dropped.get();
        if now > reported {
            tracing::warn!(dropped = now - reported, "access log fell behind: lines dropped");
            reported = now;
        }
        if stop {
            return;
        }
    }
}

/// Writes `batch` (emptying it) through the installed writer in one write.
fn write_batch(batch: &mut Vec<Entry>) {
    match crate::logging::line_sink() {
        // Formatted here, as the installed format would, and written
        // with one write per batch.
        Some((format, sink)) => {
            let mut out = Vec::with_capacity(batch.len() * 400);
            let mut clock = Clock::default();
            for (at, rec) in batch.drain(..) {
                write_line(&mut out, format, &mut clock, at, &rec);
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
        // colours): tracing formats and writes them, a line at a time.
        None => {
            for (_, rec) in batch.drain(..) {
                emit(&rec);
            }
        }
    }
}

/// Bytes formatted before they are written.
const WRITE_LIMIT: usize = 1 << 20;

/// The access line of one request, written as tracing-subscriber's fmt layer
/// writes the same event in `format` (its text layout, or its JSON object
/// with the event's fields flattened), at `at`. Measured at a fifth of the
/// server's instructions per small request when tracing formatted it.
fn write_line(out: &mut Vec<u8>, format: LogFormat, clock: &mut Clock, at: SystemTime, rec: &RequestInfo) {
    let strings: [(&str, &str); 4] =
        [("trace_id", &rec.trace_id), ("request_id", &rec.request_id), ("method", &rec.method), ("host", &rec.host)];
    let path = ("path", rec.path.as_str());
    let numbers: [(&str, u64); 4] = [
        ("status", u64::from(rec.status)),
        ("duration_ms", rec.duration_ms),
        ("bytes_in", rec.bytes_in),
        ("bytes_out", rec.bytes_out),
    ];
    let tail: [(&str, &str); 8] = [
        ("remote_addr", &rec.remote_addr),
        ("refused", &rec.refused),
        ("group", &rec.group),
        ("client", &rec.client_id),
        ("stream", &rec.stream_id),
        ("upgrade", &rec.upgrade),
        ("error", &rec.error),
        ("forwarded_to", &rec.forwarded_to),
    ];
    match format {
        LogFormat::Text => {
            clock.write(out, at);
            out.extend_from_slice(b"  INFO access: request");
            let field = |out: &mut Vec<u8>, k: &str, v: &[u8]| {
                out.push(b' ');
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                out.extend_from_slice(v);
            };
            for (k, v) in strings.into_iter().chain([path]) {
                field(out, k, v.as_bytes());
            }
            let mut digits = itoa::Buffer::new();
            for (k, v) in numbers {
                field(out, k, digits.format(v).as_bytes());
            }
            for (k, v) in tail {
                field(out, k, v.as_bytes());
            }
        }
        LogFormat::Json => {
            out.extend_from_slice(br#"{"timestamp":""#);
            clock.write(out, at);
            out.extend_from_slice(br#"","level":"INFO","message":"request""#);
            let string = |out: &mut Vec<u8>, k: &str, v: &str| {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b"\":");
                let _ = serde_json::to_writer(&mut *out, v);
            };
            for (k, v) in strings.into_iter().chain([path]) {
                string(out, k, v);
            }
            let mut digits = itoa::Buffer::new();
            for (k, v) in numbers {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(k.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(digits.format(v).as_bytes());
            }
            for (k, v) in tail {
                string(out, k, v);
            }
            out.extend_from_slice(br#","target":"access"}"#);
        }
    }
    out.push(b'\n');
}

/// Writes a line's RFC 3339 timestamp with microseconds, as tracing's
/// fmt layer does; the date and time to the second are formatted once per
/// second, since a batch's lines share them.
#[derive(Default)]
struct Clock {
    /// The second last formatted, and its text up to the seconds.
    second: Option<(u64, String)>,
}

impl Clock {
    fn write(&mut self, out: &mut Vec<u8>, at: SystemTime) {
        let Ok(since) = at.duration_since(UNIX_EPOCH) else {
            let mut text = String::new();
            let _ = write!(text, "{}", humantime::format_rfc3339_micros(at));
            out.extend_from_slice(text.as_bytes());
            return;
        };
        let secs = since.as_secs();
        let prefix = match &mut self.second {
            Some((s, text)) if *s == secs => text,
            slot => {
                // "YYYY-MM-DDTHH:MM:SSZ" without its Z. (humantime refuses
                // years past 9999: the line then has what it wrote, as
                // tracing's would.)
                let mut text = String::with_capacity(20);
                let _ = write!(text, "{}", humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)));
                text.pop();
                &slot.insert((secs, text)).1
            }
        };
        out.extend_from_slice(prefix.as_bytes());
        let micros = since.subsec_micros();
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(micros);
        out.push(b'.');
        out.extend_from_slice(&b"000000"[digits.len()..]);
        out.extend_from_slice(digits.as_bytes());
        out.push(b'Z');
    }
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
        remote_addr = %rec.remote_addr,
        refused = %rec.refused,
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
    /// writes what was queued, ends the thread, and later records are
    /// written directly.
    #[test]
    fn the_queue_is_bounded_and_close_writes_it_out() {
        let _on = tracing::subscriber::set_default(tracing_subscriber::fmt().with_writer(std::io::sink).finish());
        // A log whose thread never reads: the queue alone.
        let (tx, _rx) = crossbeam_channel::bounded(QUEUE_LIMIT);
        let log = AccessLog { tx, thread: Mutex::new(None), dropped: Counter::default() };
        for _ in 0..QUEUE_LIMIT + 5 {
            log.record(Arc::new(RequestInfo::default()));
        }
        assert_eq!(log.dropped(), 5);
        assert_eq!(log.dropped.get(), 5);

        let log = AccessLog::new(Counter::default());
        for _ in 0..100 {
            log.record(Arc::new(RequestInfo::default()));
        }
        log.close();
        assert!(log.tx.is_empty(), "close writes the queue out");
        assert!(log.thread.lock().expect("lock").is_none(), "the thread ended");
        // Written at once now, not queued.
        log.record(Arc::new(RequestInfo::default()));
        assert!(log.tx.is_empty());
        assert_eq!(log.dropped(), 0);
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
            write_line(&mut ours, format, &mut Clock::default(), at, &rec);
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

    /// The timestamp, its seconds formatted once, reads as humantime's own
    /// (tracing's) in every case: microseconds with leading zeros, the
    /// second changing within a batch, the same second again.
    #[test]
    fn timestamps_match_humantime() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_688_000);
        let mut clock = Clock::default();
        for (secs, micros) in [(0, 0), (0, 7), (0, 123_456), (1, 999_999), (1, 50), (86_400 * 400, 1_000)] {
            let at = base + Duration::from_secs(secs) + Duration::from_micros(micros);
            let mut ours = Vec::new();
            clock.write(&mut ours, at);
            assert_eq!(String::from_utf8(ours).expect("utf-8"), humantime::format_rfc3339_micros(at).to_string());
        }
    }
}

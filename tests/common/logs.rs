//! Every log line the daemons in a test binary write, captured for the
//! tests that check what an operator would read. Tests using it run one at
//! a time, so the lines since one cleared the buffer are its own.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

/// The capture buffer; installs the subscriber on first use.
pub fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info,tunnel_daemon=debug,h2=off,hyper=off,tonic=off,rustls=off")
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .init();
        buf
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lines captured since the last `clear_logs`.
pub fn log_text() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap()).into_owned()
}

pub fn clear_logs() {
    logs().lock().unwrap().clear();
}

//! A tunnel client in a process of its own, so that a test can read each
//! daemon's memory apart. The test binary runs itself with only the
//! ignored test `child_client_process` selected; that test serves the
//! client of the config in its environment until its stdin closes, which
//! happens when the parent drops the handle or dies.

use super::TestClient;
use std::io::Read;
use std::process::{Child, Command, Stdio};

/// The test each binary that uses `ChildClient` defines to call `serve_client_if_asked`.
pub const CHILD_TEST: &str = "child_client_process";
const CONFIG_ENV: &str = "TUNNEL_TEST_CHILD_CLIENT";

/// A client daemon in a child process.
pub struct ChildClient {
    child: Child,
}

impl ChildClient {
    /// Starts the client of `toml` in a copy of this test binary.
    pub fn start(toml: &str) -> ChildClient {
        let exe = std::env::current_exe().expect("the test binary's path");
        let child = Command::new(exe)
            .args([CHILD_TEST, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env(CONFIG_ENV, toml)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("a child test process");
        ChildClient { child }
    }

    /// Sends the process a signal by name (`STOP`, `CONT`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args(["-s", name, &self.child.id().to_string()]).status().expect("kill(1) runs");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Resident memory of the client's process, MiB.
    pub fn rss_mib(&self) -> f64 {
        super::fault::rss_mib_of(&format!("/proc/{}/status", self.child.id()))
    }
}

impl Drop for ChildClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// In the child: serves the client of the config in the environment until
/// stdin closes. Returns at once in a test run that did not ask for it.
pub fn serve_client_if_asked() {
    let Ok(toml) = std::env::var(CONFIG_ENV) else {
        return;
    };
    let client = TestClient::start(&toml);
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
    client.kill();
}

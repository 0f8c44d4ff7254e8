//! What the console's tests share: servers of one group started in this
//! process, each with its own stop, and clients holding sessions to them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tunnel_daemon::client::Client;
use tunnel_daemon::server::{Listeners, Server, Shared};
use tunnel_lib::config::{ClientConfig, ServerConfig};

/// A server of `toml` (group "demo", token "t") under its own id, with its own stop.
pub struct TestServer {
    pub shared: std::sync::Arc<Shared>,
    /// `http://host:port` of its gRPC listener, as clients are given it.
    pub grpc: String,
    /// host:port of its admin listener, as the console is given it.
    pub admin: String,
    pub stop: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    pub async fn start(toml: &str, id: &str) -> TestServer {
        Self::start_in(toml, id, None).await
    }

    /// A server of a cluster whose membership lives in `etcd` (an etcd
    /// `[cluster]` list) under `prefix`, advertising its own addresses.
    pub async fn start_clustered(toml: &str, id: &str, etcd: &str, prefix: &str) -> TestServer {
        Self::start_in(toml, id, Some((etcd, prefix))).await
    }

    async fn start_in(toml: &str, id: &str, cluster: Option<(&str, &str)>) -> TestServer {
        let mut toml = toml.replacen("[server]\n", &format!("[server]\nserver_id = \"{id}\"\n"), 1);
        let listeners = Listeners::ephemeral().await.unwrap();
        let (_, grpc, admin) = listeners.addrs().unwrap();
        if let Some((etcd, prefix)) = cluster {
            toml.push_str(&format!(
                "\n[cluster]\netcd = {etcd}\nprefix = \"{prefix}\"\nadvertise = \"http://{grpc}\"\nadmin_advertise = \"http://{admin}\"\nlease_ttl = \"2s\"\n"
            ));
        }
        let server = Server::new(ServerConfig::from_str_named(&toml, "test").unwrap(), None);
        let shared = server.shared();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(listeners, stop.clone().cancelled_owned()));
        TestServer { shared, grpc: format!("http://{grpc}"), admin: admin.to_string(), stop, task }
    }

    pub fn stream_ids(&self) -> BTreeSet<String> {
        self.shared.registry.streams().into_iter().map(|s| s.stream_id).collect()
    }

    pub fn streams_of(&self, client: &str) -> usize {
        self.shared.registry.streams().iter().filter(|s| s.client_id == client).count()
    }

    /// The full id of the stream shown as `short`.
    pub fn full_id(&self, short: &str) -> String {
        self.stream_ids()
            .into_iter()
            .find(|id| id.starts_with(short))
            .unwrap_or_else(|| panic!("{short} not on server"))
    }

    /// Waits (bounded) until `f` holds.
    pub async fn wait(&self, what: &str, f: impl Fn(&TestServer) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Clients of group "demo" named `ids`, each holding a session to every one
/// of `grpc` (`http://` URLs), until `stop` fires.
pub fn start_clients(ids: &[&str], grpc: &[&str], stop: &CancellationToken) -> Vec<JoinHandle<anyhow::Result<()>>> {
    let servers: Vec<String> = grpc.iter().map(|g| format!("\"{g}\"")).collect();
    ids.iter()
        .map(|id| {
            let cfg = format!(
                "servers = [{}]\nclient_id = \"{id}\"\ngroup = \"demo\"\ntoken = \"t\"\nreconnect_max = \"1s\"\nshutdown_grace = \"1s\"\n[upstreams]\nweb = \"http://127.0.0.1:9\"\n",
                servers.join(", ")
            );
            let client = Client::new(ClientConfig::from_str_named(&cfg, "test").unwrap());
            tokio::spawn(client.run(stop.clone().cancelled_owned()))
        })
        .collect()
}

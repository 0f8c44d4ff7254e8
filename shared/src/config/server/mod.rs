//! server.toml: its sections as written, and their checks into a
//! `ServerConfig`, one checker per section.

mod certificates;
mod cluster;
mod groups;
mod policy;
mod rules;
mod settings;
mod tcp;

pub use certificates::IngressCert;
pub use cluster::{ClusterSettings, EtcdTls, PeerTls};
pub use groups::GroupSettings;
pub use settings::{ConfigPush, ServerSettings};
pub use tcp::TcpService;

use super::log::{merge_log, LogConfig};
use super::source::{read, ConfigError, Source};
use super::version::{config_version, group_config};
use crate::proto;
use crate::rules::RuleSet;
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// server.toml as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    #[serde(default)]
    server: settings::ServerSection,
    #[serde(default)]
    log: LogConfig,
    #[serde(default)]
    groups: Vec<groups::GroupSection>,
    #[serde(default)]
    rules: Vec<rules::RuleSection>,
    #[serde(default)]
    certificates: Vec<certificates::CertificateSection>,
    #[serde(default)]
    tcp: Vec<tcp::TcpSection>,
    cluster: Option<cluster::ClusterSection>,
}

/// The whole server configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub server: ServerSettings,
    pub log: LogConfig,
    pub groups: Vec<GroupSettings>,
    pub rules: RuleSet,
    /// HTTPS ingress certificates; the first is the default.
    pub certificates: Vec<IngressCert>,
    /// Services that are not HTTP, each on a public TCP port of its own.
    pub tcp: Vec<TcpService>,
    /// Membership and registry in etcd; None = a standalone server.
    pub cluster: Option<ClusterSettings>,
    /// The etcd revision of the groups and rules when they came from a
    /// `config push` (then it is every group's config version, ordered
    /// fleet-wide); None when they came from this file.
    pub pushed_revision: Option<i64>,
}

/// What `tunnel-server config push` stores in etcd: groups and rules, the
/// part of server.toml the whole fleet shares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedConfig {
    pub groups: Vec<GroupSettings>,
    pub rules: RuleSet,
}

impl PushedConfig {
    /// Checks a pushed file: only `[[groups]]` and `[[rules]]` (each
    /// server's `[server]`, `[cluster]` and `[log]` stay in its own file),
    /// checked as server.toml checks them; errors name file, line and key.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct PushFile {
            #[serde(default)]
            groups: Vec<groups::GroupSection>,
            #[serde(default)]
            rules: Vec<rules::RuleSection>,
        }
        let raw: PushFile = src.parse()?;
        if raw.groups.is_empty() {
            return Err(src.error(None, "groups", "a pushed config needs at least one [[groups]]"));
        }
        let groups = groups::check(&src, &raw.groups, None)?;
        let rules = rules::check(&src, &raw.rules, &groups)?;
        Ok(PushedConfig { groups, rules })
    }
}

impl ServerConfig {
    /// Reads and checks a server.toml.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = read(path)?;
        Self::from_str_named(&text, &path.display().to_string())
    }

    /// Parses and checks server.toml text; `file` names it in errors.
    pub fn from_str_named(text: &str, file: &str) -> Result<Self, ConfigError> {
        let src = Source { file, text };
        let raw: ServerFile = src.parse()?;
        // The order of the checks is the order in which errors are found.
        let server = settings::check(&src, &raw.server)?;
        let certificates = certificates::check(&src, &raw.certificates, raw.server.https_listen.as_ref())?;
        let groups = groups::check(&src, &raw.groups, raw.server.heartbeat_timeout.as_ref())?;
        let rules = rules::check(&src, &raw.rules, &groups)?;
        let tcp = tcp::check(&src, &raw.tcp, &groups)?;
        let cluster = raw.cluster.as_ref().map(|c| cluster::check(&src, c)).transpose()?;
        let log = merge_log(&src, raw.log, raw.server.log_level, raw.server.log_format, "server.")?;
        Ok(ServerConfig { server, log, groups, rules, certificates, tcp, cluster, pushed_revision: None })
    }

    /// This config with the fleet's pushed groups and rules in place of the
    /// file's, at etcd revision `revision`.
    pub fn with_pushed(&self, pushed: &PushedConfig, revision: i64) -> ServerConfig {
        ServerConfig {
            groups: pushed.groups.clone(),
            rules: pushed.rules.clone(),
            pushed_revision: Some(revision),
            ..self.clone()
        }
    }

    /// The HTTPS ingress's rustls settings, read from the files now; None without https_listen.
    pub fn ingress_tls(&self) -> Result<Option<Arc<crate::tls::rustls::ServerConfig>>, crate::tls::TlsError> {
        if self.server.https_listen.is_none() {
            return Ok(None);
        }
        let certs: Vec<_> =
            self.certificates.iter().map(|c| (c.hosts.clone(), c.cert.as_path(), c.key.as_path())).collect();
        crate::tls::ingress_server_config(&certs).map(Some)
    }

    /// The TCP service listening on `listen` (as configured), which was
    /// entry `index` when its port was bound: that entry if it still
    /// listens there (several may say port 0), else the one that does.
    pub fn tcp_service(&self, index: usize, listen: std::net::SocketAddr) -> Option<&TcpService> {
        match self.tcp.get(index) {
            Some(t) if t.listen == listen => Some(t),
            _ => self.tcp.iter().find(|t| t.listen == listen && t.listen.port() != 0),
        }
    }

    /// The group named `name`.
    pub fn group(&self, name: &str) -> Option<&GroupSettings> {
        self.groups.iter().find(|g| g.name == name)
    }

    /// What `ConfigSync` carries for a group, and its version: the content
    /// hash, or with pushed config "r" and the etcd revision of the push.
    pub fn group_sync(&self, name: &str) -> Option<(String, proto::GroupConfig)> {
        let cfg = group_config(self.group(name)?, &self.rules);
        let version = match self.pushed_revision {
            Some(r) => format!("r{r}"),
            None => config_version(&cfg),
        };
        Some((version, cfg))
    }
}

//! The `[log]` section both files have, and the flat `log_level` /
//! `log_format` keys that say the same.

use super::source::{ConfigError, Source};
use serde::Deserialize;
use std::path::PathBuf;
use toml::Spanned;

/// Where and how a daemon logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// Filter such as "info" or "tunnel_daemon=debug"; `RUST_LOG` overrides it.
    #[serde(default)]
    pub level: Option<String>,
    /// Write daily-rolling files in this directory instead of stderr.
    #[serde(default)]
    pub directory: Option<PathBuf>,
    /// File name prefix of the rolling files (default: the binary's name).
    #[serde(default)]
    pub file_prefix: Option<String>,
    /// "text" (default) or "json": one JSON object per line, for journald or a log shipper.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Plain lines for a terminal.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `[log]` section with the flat `log_level` / `log_format` keys folded
/// in (either place works; both at once is an error, naming the key).
pub(super) fn merge_log(
    src: &Source,
    mut log: LogConfig,
    level: Option<Spanned<String>>,
    format: Option<Spanned<LogFormat>>,
    prefix: &str,
) -> Result<LogConfig, ConfigError> {
    if let Some(l) = level {
        if log.level.is_some() {
            return Err(src.at(&l, format!("{prefix}log_level"), "set either this or [log] level, not both"));
        }
        log.level = Some(l.into_inner());
    }
    if let Some(f) = format {
        if log.format != LogFormat::Text {
            return Err(src.at(&f, format!("{prefix}log_format"), "set either this or [log] format, not both"));
        }
        log.format = f.into_inner();
    }
    Ok(log)
}

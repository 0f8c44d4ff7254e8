//! What both file formats share: reading a file, parsing it with errors that
//! name the file, line and key, and checking URLs.

use serde::de::DeserializeOwned;
use std::collections::BTreeSet;
use std::path::Path;
use toml::Spanned;

/// A configuration that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a key is wrong.
    #[error("{file}:{line}: {key}: {message}")]
    Invalid { file: String, line: usize, key: String, message: String },
}

/// Where a config text came from, to locate errors in it.
pub(super) struct Source<'a> {
    /// Names the file in errors.
    pub(super) file: &'a str,
    /// The whole file, to turn byte offsets into line numbers.
    pub(super) text: &'a str,
}

impl Source<'_> {
    /// The 1-based line of a byte offset.
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// An error at `offset` (line 1 when unknown), naming `key`.
    pub(super) fn error(
        &self,
        offset: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            line: offset.map_or(1, |o| self.line_of(o)),
            key: key.into(),
            message: message.into(),
        }
    }

    /// An error at the line where `spanned` was written, naming `key`.
    pub(super) fn at<T>(
        &self,
        spanned: &Spanned<T>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error(Some(spanned.span().start), key, message)
    }

    /// The text deserialized as a file format; errors name the key's path.
    pub(super) fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let de = toml::Deserializer::parse(self.text)
            .map_err(|e| self.error(e.span().map(|s| s.start), "syntax", e.message().trim()))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            // Spanned<T> shows up in serde's path as a private field: hide it.
            let key = e.path().to_string().replace(".$__serde_spanned_private_value", "");
            let inner = e.into_inner();
            let key = if key == "." { "top level".to_string() } else { key };
            self.error(inner.span().map(|s| s.start), key, inner.message().trim())
        })
    }
}

/// Largest config file read.
const MAX_CONFIG_FILE: u64 = 4 << 20;

/// A config file's text, read bounded: a device or FIFO named by mistake fails.
pub(super) fn read(path: &Path) -> Result<String, ConfigError> {
    let error = |source| ConfigError::Read { path: path.display().to_string(), source };
    let bytes = crate::units::read_bounded(path, MAX_CONFIG_FILE).map_err(error)?;
    String::from_utf8(bytes).map_err(|_| error(std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8")))
}

/// Names for an error message that lists what is defined: "a, b" or "none".
pub(super) fn join(names: &BTreeSet<String>) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.iter().cloned().collect::<Vec<_>>().join(", ")
    }
}

/// Checks a `scheme://host:port[/]` URL with one of `schemes`.
pub(super) fn parse_url(s: &str, schemes: &[&str]) -> Result<http::Uri, String> {
    let uri: http::Uri = s.trim().parse().map_err(|e| format!("invalid URL {s:?}: {e}"))?;
    match uri.scheme_str() {
        Some(x) if schemes.contains(&x) => {}
        Some(other) => {
            let want = schemes.iter().map(|x| format!("{x}://")).collect::<Vec<_>>().join(" or ");
            return Err(format!("scheme {other:?} is not supported in {s:?}; use {want}"));
        }
        None => return Err(format!("{s:?} has no scheme; write e.g. \"http://127.0.0.1:3000\"")),
    }
    if uri.authority().is_none() {
        return Err(format!("{s:?} has no host"));
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Err(format!("{s:?} has a path; give only scheme, host and port"));
    }
    Ok(uri)
}

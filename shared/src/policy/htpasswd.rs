//! `basic_auth` users: an htpasswd file of bcrypt (`htpasswd -B`) and
//! argon2 (PHC string) hashes. Weaker schemes (apr1-MD5, SHA-1, crypt and
//! plain text) are refused when the file is read, so none can slip in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest htpasswd file read.
const MAX_FILE: u64 = 4 << 20;

/// A checked htpasswd file. Verifying a password costs a bcrypt or argon2
/// run (tens of milliseconds by design): callers keep it off the runtime
/// threads.
#[derive(Clone, PartialEq, Eq)]
pub struct Htpasswd {
    /// The file, as the config names it.
    pub path: PathBuf,
    users: BTreeMap<String, Hash>,
}

#[derive(Clone, PartialEq, Eq)]
enum Hash {
    Bcrypt(String),
    Argon2(String),
}

impl std::fmt::Debug for Htpasswd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The hashes stay out of logs and config dumps.
        f.debug_struct("Htpasswd").field("path", &self.path).field("users", &self.users.len()).finish()
    }
}

/// Why an htpasswd file was refused.
#[derive(Debug, thiserror::Error)]
pub enum HtpasswdError {
    /// It could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A line is not `user:hash` with a supported hash.
    #[error("{path}:{line}: {message}")]
    Line { path: String, line: usize, message: String },
    /// It names no user.
    #[error("{path}: no users (lines of user:hash)")]
    Empty { path: String },
}

impl Htpasswd {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, HtpasswdError> {
        let name = path.display().to_string();
        let bytes = crate::units::read_bounded(path, MAX_FILE)
            .map_err(|source| HtpasswdError::Read { path: name.clone(), source })?;
        let text = String::from_utf8(bytes).map_err(|_| HtpasswdError::Read {
            path: name.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
        })?;
        let htpasswd = Self::parse(&text, path)?;
        if htpasswd.users.is_empty() {
            return Err(HtpasswdError::Empty { path: name });
        }
        Ok(htpasswd)
    }

    /// Checks htpasswd text; `path` names it.
    pub fn parse(text: &str, path: &Path) -> Result<Self, HtpasswdError> {
        let mut users = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: String| HtpasswdError::Line { path: path.display().to_string(), line: i + 1, message };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((user, hash)) = line.split_once(':') else {
                return Err(err("not user:hash".into()));
            };
            if user.is_empty() {
                return Err(err("empty user name".into()));
            }
            let hash = Hash::parse(hash).map_err(|m| err(format!("user {user:?}: {m}")))?;
            if users.insert(user.to_string(), hash).is_some() {
                return Err(err(format!("user {user:?} is listed twice")));
            }
        }
        Ok(Htpasswd { path: path.to_path_buf(), users })
    }

    /// How many users the file names.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// Whether it names no user.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The hash the file holds for `user`: what a verified password is
    /// remembered with, so that a changed one is checked afresh.
    pub fn hash_of(&self, user: &str) -> Option<&str> {
        self.users.get(user).map(|h| match h {
            Hash::Bcrypt(s) | Hash::Argon2(s) => s.as_str(),
        })
    }

    /// Whether `password` is `user`'s. Slow by design (see the type).
    pub fn verify(&self, user: &str, password: &[u8]) -> bool {
        match self.users.get(user) {
            Some(hash) => hash.verify(password),
            None => {
                // An unknown user costs a check too (against some user's
                // hash, the answer no whatever it says), so that the time
                // taken does not tell which users exist.
                if let Some(any) = self.users.values().next() {
                    let _ = any.verify(password);
                }
                false
            }
        }
    }
}

impl Hash {
    fn verify(&self, password: &[u8]) -> bool {
        match self {
            Hash::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Hash::Argon2(h) => {
                use argon2::PasswordVerifier as _;
                argon2::Argon2::default().verify_password(password, h.as_str()).is_ok()
            }
        }
    }

    fn parse(hash: &str) -> Result<Hash, String> {
        let weak = "re-hash it with bcrypt (htpasswd -B) or argon2";
        if ["$2a$", "$2b$", "$2y$", "$2x$"].iter().any(|p| hash.starts_with(p)) {
            hash.parse::<bcrypt::HashParts>().map_err(|e| format!("invalid bcrypt hash: {e}"))?;
            return Ok(Hash::Bcrypt(hash.to_string()));
        }
        if hash.starts_with("$argon2") {
            argon2::PasswordHash::new(hash).map_err(|e| format!("invalid argon2 hash: {e}"))?;
            return Ok(Hash::Argon2(hash.to_string()));
        }
        if hash.starts_with("$apr1$") || hash.starts_with("$1$") {
            return Err(format!("MD5 hashes are refused: {weak}"));
        }
        if hash.starts_with("{SHA}") || hash.starts_with("$5$") || hash.starts_with("$6$") {
            return Err(format!("SHA hashes are refused: {weak}"));
        }
        Err(format!("plain text or crypt(3) passwords are refused: {weak}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argon2_hash(password: &str) -> String {
        use argon2::PasswordHasher as _;
        // Cheap parameters: a test, not a deployment.
        let params = argon2::Params::new(256, 1, 1, None).expect("params");
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        argon.hash_password_with_salt(password.as_bytes(), b"saltsaltsaltsalt").expect("hash").to_string()
    }

    #[test]
    fn bcrypt_and_argon2_verify_and_wrong_passwords_do_not() {
        let text = format!(
            "# users\nalice:{}\n\nbob:{}\n",
            bcrypt::hash("wonderland", 4).expect("hash"),
            argon2_hash("builder")
        );
        let h = Htpasswd::parse(&text, Path::new("users.htpasswd")).expect("valid");
        assert_eq!(h.len(), 2);
        assert!(h.verify("alice", b"wonderland"));
        assert!(!h.verify("alice", b"Wonderland"));
        assert!(h.verify("bob", b"builder"));
        assert!(!h.verify("bob", b"wonderland"));
        assert!(!h.verify("carol", b"wonderland"), "unknown user");
        assert!(!format!("{h:?}").contains("$2"), "no hash in Debug");
    }

    #[test]
    fn weak_and_malformed_lines_are_refused_with_their_line() {
        let cases = [
            ("alice:secret\n", "plain text"),
            ("alice:$apr1$abc$def\n", "MD5"),
            ("alice:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n", "SHA"),
            ("alice\n", "not user:hash"),
            ("$2b$10$abc\n", "not user:hash"),
            ("alice:$2b$10$short\n", "invalid bcrypt"),
            ("alice:$argon2id$v=19$nonsense\n", "invalid argon2"),
        ];
        for (text, want) in cases {
            let text = format!("# header\n{text}");
            let e = Htpasswd::parse(&text, Path::new("u.htpasswd")).expect_err(text.as_str()).to_string();
            assert!(e.starts_with("u.htpasswd:2: "), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
        let dup = format!("a:{h}\na:{h}\n", h = bcrypt::hash("x", 4).expect("hash"));
        assert!(Htpasswd::parse(&dup, Path::new("u")).expect_err("dup").to_string().contains("twice"));
    }
}

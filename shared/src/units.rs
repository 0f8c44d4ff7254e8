//! Human units in config files: durations ("30s", "500ms") and sizes ("256KiB").

use serde::{de, Deserialize, Deserializer};
use std::time::Duration;

/// A duration written as a string such as "30s", "500ms" or "1m 30s".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim())
            .map(HumanDuration)
            .map_err(|e| de::Error::custom(format!("invalid duration {s:?} ({e}); write e.g. \"30s\" or \"500ms\"")))
    }
}

/// A byte size written as an integer or a string such as "256KiB" or "8MiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses "123", "64KiB", "8 MiB", "1GiB", "10KB" (KB/MB/GB are decimal).
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid size {s:?}; write e.g. \"256KiB\""))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("unknown size unit {other:?} in {s:?}; use B, KiB, MiB, GiB")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Str(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Str(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// Reads a file the operator named, refusing what is not a regular file or
/// is larger than `limit`: a path to a FIFO, a device such as /dev/zero, or
/// a huge file by mistake must fail with a message, not hang or fill memory.
pub fn read_bounded(path: &std::path::Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Checked before opening: opening a FIFO blocks until a writer comes.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut out = Vec::with_capacity(meta.len().min(limit) as usize);
    file.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {} KiB", limit >> 10)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(ByteSize::parse("256KiB"), Ok(ByteSize(256 * 1024)));
        assert_eq!(ByteSize::parse("8 MiB"), Ok(ByteSize(8 << 20)));
        assert_eq!(ByteSize::parse("10"), Ok(ByteSize(10)));
        assert!(ByteSize::parse("10 parsecs").is_err());
        assert!(ByteSize::parse("KiB").is_err());
    }

    /// A device or an oversized file named as a config or PEM path fails at once.
    #[test]
    fn bounded_reads_refuse_devices_and_huge_files() {
        let e = read_bounded(std::path::Path::new("/dev/zero"), 1024).expect_err("a device");
        assert!(e.to_string().contains("not a regular file"), "{e}");
        // A FIFO with no writer: opening it would block forever.
        let fifo = std::env::temp_dir().join(format!("tunnel-fifo-{}", std::process::id()));
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
        if made {
            let e = read_bounded(&fifo, 1024).expect_err("a FIFO");
            assert!(e.to_string().contains("not a regular file"), "{e}");
            let _ = std::fs::remove_file(&fifo);
        }
        let path = std::env::temp_dir().join(format!("tunnel-bounded-{}", std::process::id()));
        std::fs::write(&path, vec![b'x'; 2048]).expect("temp file");
        let e = read_bounded(&path, 1024).expect_err("too large");
        assert!(e.to_string().contains("larger than 1 KiB"), "{e}");
        assert_eq!(read_bounded(&path, 4096).expect("fits").len(), 2048);
        let _ = std::fs::remove_file(&path);
    }
}

/// A duration, or "off" for the system's own value: `Some` when a duration
/// was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationOrOff(pub Option<Duration>);

impl<'de> Deserialize<'de> for DurationOrOff {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s.trim().eq_ignore_ascii_case("off") {
            return Ok(DurationOrOff(None));
        }
        humantime::parse_duration(s.trim()).map(|d| DurationOrOff(Some(d))).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"20ms\", or \"off\" for the kernel's own"
            ))
        })
    }
}

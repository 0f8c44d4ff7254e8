//! Keys that are a duration, a size or a count with a default and a bound:
//! one checker for all of them, so that each key is one call and every
//! bound is worded the same way ("must be at least 1s", "must be 1 to 64").

use super::source::{ConfigError, Source};
use crate::units::{ByteSize, HumanDuration};
use std::time::Duration;
use toml::Spanned;

/// One second, the least of the keys where a shorter time is surely a typo.
pub(super) const SECOND: Duration = Duration::from_secs(1);
/// A tenth of a second, the least of the keys that tests set short.
pub(super) const TENTH: Duration = Duration::from_millis(100);

/// The values a key accepts, and how its error words them.
#[derive(Debug, Clone, Copy)]
pub(super) enum Bound<T> {
    /// More than this: "must be more than {x}".
    Above(T),
    /// This or more: "must be at least {x}".
    Min(T),
    /// From the first to the second, both included: "must be {lo} to {hi}".
    Range(T, T),
}

/// A key's type as written in the file: its checked value, and how a bound
/// of it is written in an error.
pub(super) trait Ranged {
    /// The checked value.
    type Value: Copy + PartialOrd;
    /// The value as checked and kept.
    fn value(&self) -> Self::Value;
    /// A bound as an error shows it, in the key's own units.
    fn show(v: Self::Value) -> String;
}

impl Ranged for HumanDuration {
    type Value = Duration;
    fn value(&self) -> Duration {
        self.0
    }
    fn show(v: Duration) -> String {
        humantime::format_duration(v).to_string()
    }
}

impl Ranged for ByteSize {
    type Value = u64;
    fn value(&self) -> u64 {
        self.0
    }
    /// The largest of MiB, KiB and B that writes it whole: "8KiB", "256B";
    /// never GiB, so that the errors read as they always have ("1024MiB").
    fn show(v: u64) -> String {
        match v {
            0 => "0B".into(),
            v if v % (1 << 20) == 0 => format!("{}MiB", v >> 20),
            v if v % (1 << 10) == 0 => format!("{}KiB", v >> 10),
            v => format!("{v}B"),
        }
    }
}

impl Ranged for u32 {
    type Value = u32;
    fn value(&self) -> u32 {
        *self
    }
    fn show(v: u32) -> String {
        v.to_string()
    }
}

impl Ranged for usize {
    type Value = usize;
    fn value(&self) -> usize {
        *self
    }
    fn show(v: usize) -> String {
        v.to_string()
    }
}

/// A key's value: `default` when absent, refused (at its line, naming
/// `key`) outside `bound`. The default is not checked: it is ours.
pub(super) fn value<R: Ranged>(
    src: &Source,
    raw: &Option<Spanned<R>>,
    key: impl Into<String>,
    default: R::Value,
    bound: Bound<R::Value>,
) -> Result<R::Value, ConfigError> {
    let Some(spanned) = raw else { return Ok(default) };
    let v = spanned.get_ref().value();
    let refused = match bound {
        Bound::Above(x) if v <= x => format!("must be more than {}", R::show(x)),
        Bound::Min(x) if v < x => format!("must be at least {}", R::show(x)),
        Bound::Range(lo, hi) if !(lo..=hi).contains(&v) => format!("must be {} to {}", R::show(lo), R::show(hi)),
        _ => return Ok(v),
    };
    Err(src.at(spanned, key, refused))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bounds read as the errors always have: the fixtures and the
    /// documentation quote these texts.
    #[test]
    fn bounds_are_worded_in_the_keys_units() {
        let text = "k = 0\nd = \"0s\"\nb = 0\n";
        let src = Source { file: "f", text };
        #[derive(serde::Deserialize)]
        struct Raw {
            k: Option<Spanned<u32>>,
            d: Option<Spanned<HumanDuration>>,
            b: Option<Spanned<ByteSize>>,
        }
        let raw: Raw = src.parse().expect("valid");
        let count = |bound| value(&src, &raw.k, "k", 7, bound).expect_err("refused").to_string();
        assert_eq!(count(Bound::Range(1, 1000)), "f:1: k: must be 1 to 1000");
        assert_eq!(count(Bound::Min(1)), "f:1: k: must be at least 1");
        let duration = |bound| value(&src, &raw.d, "d", SECOND, bound).expect_err("refused").to_string();
        assert_eq!(duration(Bound::Above(Duration::ZERO)), "f:2: d: must be more than 0s");
        assert_eq!(duration(Bound::Min(SECOND)), "f:2: d: must be at least 1s");
        assert_eq!(duration(Bound::Min(TENTH)), "f:2: d: must be at least 100ms");
        let size = |bound| value(&src, &raw.b, "b", 1, bound).expect_err("refused").to_string();
        assert_eq!(size(Bound::Min(8 << 10)), "f:3: b: must be at least 8KiB");
        assert_eq!(size(Bound::Min(256)), "f:3: b: must be at least 256B");
        assert_eq!(size(Bound::Range(32 << 10, 1 << 30)), "f:3: b: must be 32KiB to 1024MiB");
        assert_eq!(size(Bound::Range(32 << 10, 16 << 20)), "f:3: b: must be 32KiB to 16MiB");

        assert_eq!(value(&src, &raw.k, "k", 7, Bound::Min(0)).expect("in bounds"), 0);
        let absent: Option<Spanned<u32>> = None;
        assert_eq!(value(&src, &absent, "k", 7, Bound::Min(9)).expect("the default"), 7, "the default is not checked");
    }
}

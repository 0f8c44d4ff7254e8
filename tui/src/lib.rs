//! tunnel-tui: a live console for tunnel-server. `model` holds what the
//! server said, `app` turns keys and updates into state, `ui` draws it, `net`
//! talks to the server in the background, `once` prints a snapshot,
//! `traffic` holds the series over time and the figures drawn from them.

pub mod app;
pub mod inspect;
pub mod model;
pub mod net;
pub mod once;
pub mod traffic;
pub mod ui;

/// Unix time now, milliseconds.
pub fn now_ms() -> i64 {
    tunnel_lib::frame::now_ms()
}

/// Whether the locale's character set is UTF-8, as the C library decides
/// it: the first of LC_ALL, LC_CTYPE and LANG that is set and not empty.
/// None set is the "C" locale: not UTF-8.
pub fn locale_is_utf8(var: impl Fn(&str) -> Option<String>) -> bool {
    let locale = ["LC_ALL", "LC_CTYPE", "LANG"].into_iter().filter_map(var).find(|v| !v.is_empty());
    locale.is_some_and(|l| {
        let l = l.to_ascii_lowercase();
        l.contains("utf-8") || l.contains("utf8")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn locale() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert!(super::locale_is_utf8(env(&[("LANG", "en_US.UTF-8")])));
        assert!(super::locale_is_utf8(env(&[("LC_ALL", ""), ("LC_CTYPE", "C.utf8"), ("LANG", "C")])));
        assert!(!super::locale_is_utf8(env(&[("LC_ALL", "C"), ("LANG", "en_US.UTF-8")])));
        assert!(!super::locale_is_utf8(env(&[])));
    }
}

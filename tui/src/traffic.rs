//! Traffic over time as the console holds it: each server's series, merged
//! from Watch updates, and the figures the views draw from them. Pure
//! functions of the series; no I/O and no clock.

use std::collections::{BTreeMap, VecDeque};
use tunnel_lib::introspection::{TrafficSeries, TrafficSubject};
use tunnel_lib::traffic::{points, Point, MINUTES, MINUTE_MS, SECONDS, SECOND_MS};

/// A subject: what the series is about, and its name (empty for the server).
pub type Key = (TrafficSubject, String);

/// One subject's points at one step, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    /// Unix ms at which the first point's step began.
    pub start_ms: i64,
    pub points: VecDeque<Point>,
}

impl Series {
    fn end_ms(&self, step: i64) -> i64 {
        self.start_ms + self.points.len() as i64 * step
    }

    /// Adds `pts` starting at `start_ms`: after a gap, zeros fill it; over
    /// what is held, they replace it. Keeps the last `cap`.
    fn merge(&mut self, start_ms: i64, pts: Vec<Point>, step: i64, cap: usize) {
        if self.points.is_empty() || start_ms < self.start_ms {
            self.start_ms = start_ms;
            self.points.clear();
        } else {
            let end = self.end_ms(step);
            if start_ms > end {
                let gap = usize::try_from((start_ms - end) / step).unwrap_or(0);
                if gap >= cap {
                    self.start_ms = start_ms;
                    self.points.clear();
                } else {
                    self.points.extend(std::iter::repeat_n(Point::default(), gap));
                }
            } else {
                self.points.truncate(usize::try_from((start_ms - self.start_ms) / step).unwrap_or(0));
            }
        }
        self.points.extend(pts);
        self.trim(step, cap);
    }

    /// Zeros up to `to_ms`: nothing came for the subject meanwhile.
    fn pad(&mut self, to_ms: i64, step: i64, cap: usize) {
        let end = self.end_ms(step);
        if to_ms > end {
            let n = usize::try_from((to_ms - end) / step).unwrap_or(0).min(cap);
            if n == cap {
                self.start_ms = to_ms - cap as i64 * step;
                self.points.clear();
            }
            self.points.extend(std::iter::repeat_n(Point::default(), n));
            self.trim(step, cap);
        }
    }

    fn trim(&mut self, step: i64, cap: usize) {
        while self.points.len() > cap {
            self.points.pop_front();
            self.start_ms += step;
        }
    }
}

/// Every series one server sent: per second and per minute, by subject.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Traffic {
    pub seconds: BTreeMap<Key, Series>,
    pub minutes: BTreeMap<Key, Series>,
    /// Where the series end: the start of the second being counted (unix ms).
    pub head_ms: i64,
}

impl Traffic {
    /// Applies one update's series; `full` starts over.
    pub fn apply(&mut self, full: bool, series: Vec<TrafficSeries>, head_ms: i64) {
        if full {
            self.seconds.clear();
            self.minutes.clear();
        }
        for s in series {
            let subject = TrafficSubject::try_from(s.subject).unwrap_or(TrafficSubject::Unspecified);
            let (map, cap) = match s.step_ms {
                SECOND_MS => (&mut self.seconds, SECONDS),
                MINUTE_MS => (&mut self.minutes, MINUTES),
                // A step this console does not know: not drawn.
                _ => continue,
            };
            let pts = points(&s);
            map.entry((subject, s.name)).or_default().merge(s.start_unix_ms, pts, i64::from(s.step_ms), cap);
        }
        if head_ms > 0 {
            self.head_ms = self.head_ms.max(head_ms);
        }
        let head = self.head_ms;
        for (map, step, cap, to) in [
            (&mut self.seconds, SECOND_MS, SECONDS, head),
            (&mut self.minutes, MINUTE_MS, MINUTES, head - head.rem_euclid(i64::from(MINUTE_MS))),
        ] {
            for s in map.values_mut() {
                s.pad(to, i64::from(step), cap);
            }
            // A subject with nothing left in its window is gone (the server's stays).
            map.retain(|(subject, _), s| *subject == TrafficSubject::Server || s.points.iter().any(|p| !p.is_zero()));
        }
    }

    /// The subject's per-second series.
    pub fn seconds_of(&self, subject: TrafficSubject, name: &str) -> Option<&Series> {
        self.seconds.get(&(subject, name.to_string()))
    }

    /// The subject's per-minute series.
    pub fn minutes_of(&self, subject: TrafficSubject, name: &str) -> Option<&Series> {
        self.minutes.get(&(subject, name.to_string()))
    }
}

/// "server", "group", "client", "rule".
pub fn subject_name(s: TrafficSubject) -> &'static str {
    match s {
        TrafficSubject::Server => "server",
        TrafficSubject::Group => "group",
        TrafficSubject::Client => "client",
        TrafficSubject::Rule => "rule",
        TrafficSubject::Unspecified => "?",
    }
}

/// The last seconds of a series in a few figures, for a table row.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    pub requests_per_s: f64,
    /// Shares of the requests, 0..=1.
    pub ratio_4xx: f64,
    pub ratio_errors: f64,
    /// The highest per-second p99 of the span, µs.
    pub p99_us: u32,
    pub bytes_in_per_s: f64,
    pub bytes_out_per_s: f64,
    pub in_flight: u32,
}

/// The last `span` points of `s` summed up (rates per `step_s` seconds).
pub fn summary(s: &Series, span: usize, step_s: f64) -> Summary {
    let n = s.points.len();
    let tail = s.points.range(n.saturating_sub(span)..);
    let span_s = span.max(1) as f64 * step_s;
    let (mut req, mut c4, mut err, mut bin, mut bout) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut out = Summary::default();
    for p in tail {
        req += u64::from(p.requests);
        c4 += u64::from(p.status_4xx);
        err += u64::from(p.errors);
        bin += p.bytes_in;
        bout += p.bytes_out;
        out.p99_us = out.p99_us.max(p.p99_us);
    }
    out.in_flight = s.points.back().map_or(0, |p| p.in_flight);
    out.requests_per_s = req as f64 / span_s;
    if req > 0 {
        out.ratio_4xx = c4 as f64 / req as f64;
        out.ratio_errors = err as f64 / req as f64;
    }
    out.bytes_in_per_s = bin as f64 / span_s;
    out.bytes_out_per_s = bout as f64 / span_s;
    out
}

/// What a chart plots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Requests a second, in thousandths (a request every ten seconds is
    /// 100, not a rounded 0: a quiet subject's trend still shows).
    Requests,
    /// 4xx answers, per mille of the requests.
    Ratio4xx,
    /// 5xx and cut-short answers, per mille of the requests.
    RatioErrors,
    /// µs; the highest of the steps a column covers.
    P50,
    P99,
    /// Bytes a second, in thousandths.
    BytesIn,
    BytesOut,
    /// The most in flight in the steps a column covers.
    InFlight,
}

impl Metric {
    fn of(self, pts: &[Point], step_s: f64) -> u64 {
        let sum = |f: fn(&Point) -> u64| pts.iter().map(f).sum::<u64>();
        let max = |f: fn(&Point) -> u64| pts.iter().map(f).max().unwrap_or(0);
        let per_s = |total: u64| (total as f64 * 1000.0 / (pts.len().max(1) as f64 * step_s)).round() as u64;
        let ratio = |part: u64| (part * 1000).checked_div(sum(|p| u64::from(p.requests))).unwrap_or(0);
        match self {
            Metric::Requests => per_s(sum(|p| u64::from(p.requests))),
            Metric::Ratio4xx => ratio(sum(|p| u64::from(p.status_4xx))),
            Metric::RatioErrors => ratio(sum(|p| u64::from(p.errors))),
            Metric::P50 => max(|p| u64::from(p.p50_us)),
            Metric::P99 => max(|p| u64::from(p.p99_us)),
            Metric::BytesIn => per_s(sum(|p| p.bytes_in)),
            Metric::BytesOut => per_s(sum(|p| p.bytes_out)),
            Metric::InFlight => max(|p| u64::from(p.in_flight)),
        }
    }
}

/// `metric` of a window of `window` steps ending with the series' last
/// point, in at most `width` columns, newest first (the charts draw right
/// to left, so the newest is always at the right edge). Each column covers
/// the same number of steps; steps before the series began read as zero.
pub fn columns(s: &Series, window: usize, width: usize, metric: Metric, step_s: f64) -> Vec<u64> {
    if width == 0 || window == 0 {
        return Vec::new();
    }
    let per = window.div_ceil(width);
    let pts: Vec<Point> = s.points.iter().rev().take(window).copied().collect();
    (0..window.div_ceil(per))
        .map(|c| {
            let from = (c * per).min(pts.len());
            let to = ((c + 1) * per).min(pts.len()).min(window);
            metric.of(&pts[from..to], step_s)
        })
        .collect()
}

/// Eight heights of bar, in Unicode blocks or in ASCII.
pub fn bar_glyphs(ascii: bool) -> [&'static str; 9] {
    if ascii {
        [" ", ".", ":", "-", "=", "+", "*", "#", "@"]
    } else {
        [" ", "▁", "▂", "▃", "▄", "▅", "▆", "▇", "█"]
    }
}

/// A one-line sparkline of `values` (oldest first) scaled to their maximum,
/// for a table cell. Any value above zero shows at least the lowest bar.
pub fn sparkline_text(values: &[u64], ascii: bool) -> String {
    let glyphs = bar_glyphs(ascii);
    let max = values.iter().copied().max().unwrap_or(0);
    values
        .iter()
        .map(|&v| if v == 0 || max == 0 { glyphs[0] } else { glyphs[((v * 8).div_ceil(max)).clamp(1, 8) as usize] })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tunnel_lib::traffic::series;

    fn pts(reqs: &[u32]) -> Vec<Point> {
        reqs.iter().map(|&r| Point { requests: r, ..Default::default() }).collect()
    }

    fn msg(subject: TrafficSubject, name: &str, start_ms: i64, reqs: &[u32]) -> TrafficSeries {
        series(subject, name, SECOND_MS, start_ms, pts(reqs).iter())
    }

    fn reqs(s: &Series) -> Vec<u32> {
        s.points.iter().map(|p| p.requests).collect()
    }

    /// A full update replaces; later ones append, fill gaps with zeros, pad
    /// to the head; a subject with nothing left goes, the server stays.
    #[test]
    fn series_merge() {
        let mut t = Traffic::default();
        let server = TrafficSubject::Server;
        t.apply(true, vec![msg(server, "", 10_000, &[1, 2]), msg(TrafficSubject::Client, "a", 11_000, &[5])], 12_000);
        assert_eq!(reqs(t.seconds_of(server, "").expect("series")), [1, 2]);
        // Two seconds later: only the server had traffic in the second second.
        t.apply(false, vec![msg(server, "", 13_000, &[7])], 14_000);
        let s = t.seconds_of(server, "").expect("series");
        assert_eq!((s.start_ms, reqs(s)), (10_000, vec![1, 2, 0, 7]));
        assert_eq!(reqs(t.seconds_of(TrafficSubject::Client, "a").expect("series")), [5, 0, 0]);
        // A resent stretch replaces what is held from its start.
        t.apply(false, vec![msg(server, "", 12_000, &[3, 8])], 14_000);
        assert_eq!(reqs(t.seconds_of(server, "").expect("series")), [1, 2, 3, 8]);
        // Five minutes on, client a has nothing in its window.
        t.apply(false, vec![], 14_000 + 300_000);
        assert!(t.seconds_of(TrafficSubject::Client, "a").is_none());
        let s = t.seconds_of(server, "").expect("series");
        assert_eq!(s.points.len(), SECONDS);
        assert_eq!(s.start_ms, 14_000);
        // A full update starts over.
        t.apply(true, vec![], 400_000);
        assert!(t.seconds.is_empty());
    }

    /// Summaries over the tail: rates, ratios, the highest p99.
    #[test]
    fn summaries() {
        let mut s = Series { start_ms: 0, points: pts(&[100, 10, 20]).into() };
        s.points[1].errors = 1;
        s.points[2].status_4xx = 5;
        s.points[2].p99_us = 900;
        s.points[2].bytes_out = 3000;
        let sum = summary(&s, 2, 1.0);
        assert_eq!(sum.requests_per_s, 15.0);
        assert!((sum.ratio_4xx - 5.0 / 30.0).abs() < 1e-9);
        assert!((sum.ratio_errors - 1.0 / 30.0).abs() < 1e-9);
        assert_eq!((sum.p99_us, sum.bytes_out_per_s), (900, 1500.0));
    }

    /// Columns cover equal spans from the newest back; ratios come from
    /// sums, not from averaging ratios.
    #[test]
    fn columns_fit_the_width() {
        let mut s = Series { start_ms: 0, points: pts(&[1, 2, 3, 4, 5, 6]).into() };
        assert_eq!(columns(&s, 6, 3, Metric::Requests, 1.0), [5500, 3500, 1500]);
        assert_eq!(columns(&s, 6, 10, Metric::Requests, 1.0), [6000, 5000, 4000, 3000, 2000, 1000]);
        // A window longer than the series: the older columns are zero.
        assert_eq!(columns(&s, 10, 5, Metric::Requests, 1.0), [5500, 3500, 1500, 0, 0]);
        // One request in a minute is a sixtieth of one a second, not zero.
        let quiet = Series { start_ms: 0, points: pts(&[0, 0, 1, 0, 0, 0]).into() };
        assert_eq!(columns(&quiet, 6, 1, Metric::Requests, 10.0), [17]);
        s.points[4].errors = 5; // of 5 requests
        s.points[5].errors = 0; // of 6
        assert_eq!(columns(&s, 6, 3, Metric::RatioErrors, 1.0), [454, 0, 0]);
        assert!(columns(&s, 6, 0, Metric::Requests, 1.0).is_empty());
    }

    #[test]
    fn sparkline_cells() {
        assert_eq!(sparkline_text(&[0, 1, 4, 8], false), " ▁▄█");
        assert_eq!(sparkline_text(&[0, 1, 4, 8], true), " .=@");
        assert_eq!(sparkline_text(&[0, 0], true), "  ");
    }
}

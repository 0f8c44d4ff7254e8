//! Traffic over time as both ends hold it: a [`Point`] per step (a second or
//! a minute) and the columns of `TrafficSeries` that carry a run of them on
//! Watch (`proto/introspection.proto`).

use crate::introspection::{TrafficSeries, TrafficSubject};

/// Seconds in the per-second window (five minutes).
pub const SECONDS: usize = 300;
/// Minutes in the per-minute window (an hour).
pub const MINUTES: usize = 60;
/// The two steps, in milliseconds.
pub const SECOND_MS: u32 = 1_000;
pub const MINUTE_MS: u32 = 60_000;

/// Public requests that ended in one step, for one subject.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Point {
    pub requests: u32,
    /// Answered with a 4xx status.
    pub status_4xx: u32,
    /// Answered with a 5xx status or cut short.
    pub errors: u32,
    /// Latency of the step's requests, µs (0 when there were none).
    pub p50_us: u32,
    pub p99_us: u32,
    /// Requests in flight: the most of a sample taken each second and of
    /// the step's mean (its requests' durations added up over its length).
    pub in_flight: u32,
    /// Body bytes from public clients, and to them.
    pub bytes_in: u64,
    pub bytes_out: u64,
}

impl Point {
    /// Nothing happened in the step.
    pub fn is_zero(&self) -> bool {
        *self == Point::default()
    }
}

/// The points a series message carries, oldest first; a column shorter than
/// `requests` (a sender that left it out) reads as zeros.
pub fn points(s: &TrafficSeries) -> Vec<Point> {
    let at32 = |c: &[u32], i: usize| c.get(i).copied().unwrap_or(0);
    let at64 = |c: &[u64], i: usize| c.get(i).copied().unwrap_or(0);
    (0..s.requests.len())
        .map(|i| Point {
            requests: s.requests[i],
            status_4xx: at32(&s.status_4xx, i),
            errors: at32(&s.errors, i),
            p50_us: at32(&s.p50_us, i),
            p99_us: at32(&s.p99_us, i),
            in_flight: at32(&s.in_flight, i),
            bytes_in: at64(&s.bytes_in, i),
            bytes_out: at64(&s.bytes_out, i),
        })
        .collect()
}

/// A series message of `points`, the first of which began at `start_ms`.
pub fn series<'a>(
    subject: TrafficSubject,
    name: &str,
    step_ms: u32,
    start_ms: i64,
    points: impl ExactSizeIterator<Item = &'a Point>,
) -> TrafficSeries {
    let n = points.len();
    let mut s = TrafficSeries {
        subject: subject as i32,
        name: name.to_string(),
        step_ms,
        start_unix_ms: start_ms,
        requests: Vec::with_capacity(n),
        status_4xx: Vec::with_capacity(n),
        errors: Vec::with_capacity(n),
        p50_us: Vec::with_capacity(n),
        p99_us: Vec::with_capacity(n),
        bytes_in: Vec::with_capacity(n),
        bytes_out: Vec::with_capacity(n),
        in_flight: Vec::with_capacity(n),
    };
    for p in points {
        s.requests.push(p.requests);
        s.status_4xx.push(p.status_4xx);
        s.errors.push(p.errors);
        s.p50_us.push(p.p50_us);
        s.p99_us.push(p.p99_us);
        s.bytes_in.push(p.bytes_in);
        s.bytes_out.push(p.bytes_out);
        s.in_flight.push(p.in_flight);
    }
    s
}

/// Buckets of [`Latency`]: 16 exact ones under 16 µs, then 8 per power of
/// two up to 2^32 µs (71 minutes).
const BUCKETS: usize = 16 + 28 * 8;

/// A latency histogram in log-scale buckets (8 per power of two, so a
/// percentile read from it is within about 6% of the true value): fixed
/// size whatever the request rate, and cheap to add to.
#[derive(Clone)]
pub struct Latency {
    counts: Box<[u32; BUCKETS]>,
    n: u32,
}

impl Default for Latency {
    fn default() -> Self {
        Latency { counts: Box::new([0; BUCKETS]), n: 0 }
    }
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Latency({} samples)", self.n)
    }
}

fn bucket(us: u32) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 31 - us.leading_zeros(); // 4..=31
    let sub = (us >> (e - 3)) & 7;
    16 + (e as usize - 4) * 8 + sub as usize
}

/// The middle of bucket `i`.
fn value(i: usize) -> u32 {
    if i < 16 {
        return i as u32;
    }
    let e = (i - 16) / 8 + 4;
    let sub = ((i - 16) % 8) as u64;
    let low = (8 + sub) << (e - 3);
    let width = 1u64 << (e - 3);
    (low + width / 2).min(u64::from(u32::MAX)) as u32
}

impl Latency {
    /// Counts one request that took `us` microseconds.
    pub fn add(&mut self, us: u32) {
        self.counts[bucket(us)] += 1;
        self.n += 1;
    }

    /// Adds every sample of `other`.
    pub fn merge(&mut self, other: &Latency) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.n += other.n;
    }

    /// How many samples.
    pub fn len(&self) -> u32 {
        self.n
    }

    /// No samples.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The `q` quantile (0 < q <= 1), µs; 0 with no samples.
    pub fn quantile(&self, q: f64) -> u32 {
        if self.n == 0 {
            return 0;
        }
        let rank = ((q * f64::from(self.n)).ceil() as u32).clamp(1, self.n);
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return value(i);
            }
        }
        value(BUCKETS - 1)
    }

    /// Forgets every sample.
    pub fn clear(&mut self) {
        if self.n > 0 {
            self.counts.fill(0);
            self.n = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every value lands in a bucket whose middle is within 1/16 of it.
    #[test]
    fn buckets_are_close() {
        for us in (0..100_000u32).chain([u32::MAX / 3, u32::MAX - 1, u32::MAX]) {
            let v = value(bucket(us));
            let err = (f64::from(v) - f64::from(us)).abs() / f64::from(us.max(1));
            assert!(err <= 1.0 / 16.0 + 1e-9, "{us} -> {v}");
        }
        assert_eq!(bucket(u32::MAX), BUCKETS - 1);
    }

    /// Quantiles of a known spread, within the bucket error.
    #[test]
    fn quantiles() {
        let mut l = Latency::default();
        assert_eq!(l.quantile(0.5), 0);
        for us in 1..=1000 {
            l.add(us);
        }
        let near = |got: u32, want: f64| (f64::from(got) - want).abs() <= want / 16.0;
        assert!(near(l.quantile(0.5), 500.0), "{}", l.quantile(0.5));
        assert!(near(l.quantile(0.99), 990.0), "{}", l.quantile(0.99));
        let mut m = Latency::default();
        m.add(5_000_000);
        m.merge(&l);
        assert_eq!(m.len(), 1001);
        assert!(near(m.quantile(1.0), 5e6));
        m.clear();
        assert!(m.is_empty());
    }

    /// Points survive the trip through a message's columns.
    #[test]
    fn columns_round_trip() {
        let pts = [
            Point {
                requests: 3,
                status_4xx: 1,
                errors: 1,
                p50_us: 800,
                p99_us: 2000,
                in_flight: 2,
                bytes_in: 10,
                bytes_out: 99,
            },
            Point::default(),
        ];
        let s = series(TrafficSubject::Client, "c1", SECOND_MS, 5_000, pts.iter());
        assert_eq!((s.name.as_str(), s.step_ms, s.start_unix_ms), ("c1", 1000, 5000));
        assert_eq!(points(&s), pts);
        // A sender that leaves a column out: zeros.
        let short = TrafficSeries { requests: vec![4], ..Default::default() };
        assert_eq!(points(&short), [Point { requests: 4, ..Default::default() }]);
    }
}

//! Latency histograms and error counters, per worker and merged.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency tracked exactly (1 hour, in microseconds); larger ones saturate.
const MAX_TRACKED_US: u64 = 3_600_000_000;

/// Kinds of failed operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// The TCP connection (or HTTP handshake) could not be set up.
    Connect,
    /// The connection broke while sending or receiving.
    Io,
    /// No answer within `--timeout`.
    Timeout,
    /// A read found no value.
    NotFound,
    /// Any other HTTP status.
    Status(u16),
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::Connect => f.write_str("connect"),
            ErrorKind::Io => f.write_str("io"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::NotFound => f.write_str("not_found"),
            ErrorKind::Status(code) => write!(f, "http_{code}"),
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Constant, valid bounds: 1 µs .. 1 h at 3 significant figures. Nothing a user or a
    // peer does can make this fail.
    Histogram::new_with_bounds(1, MAX_TRACKED_US, 3).expect("constant histogram bounds are valid")
}

/// Measurements of one worker (or, after [`Recorder::merge`], of all of them).
#[derive(Debug, Clone)]
pub struct Recorder {
    put: Histogram<u64>,
    get: Histogram<u64>,
    errors: BTreeMap<ErrorKind, u64>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            put: new_histogram(),
            get: new_histogram(),
            errors: BTreeMap::new(),
        }
    }
}

impl Recorder {
    /// Records a successful operation of kind `put` (else `get`) that took `latency`.
    pub fn record_ok(&mut self, is_put: bool, latency: Duration) {
        let us = u64::try_from(latency.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let h = if is_put { &mut self.put } else { &mut self.get };
        h.saturating_record(us);
    }

    /// Records a failed operation.
    pub fn record_error(&mut self, kind: ErrorKind) {
        *self.errors.entry(kind).or_insert(0) += 1;
    }

    /// Adds another recorder's measurements to this one.
    pub fn merge(&mut self, other: &Recorder) {
        // Both histograms come from `new_histogram`, so adding cannot run out of range;
        // if it ever did, saturate value by value instead of losing the samples.
        for (mine, theirs) in [(&mut self.put, &other.put), (&mut self.get, &other.get)] {
            if mine.add(theirs).is_err() {
                for v in theirs.iter_recorded() {
                    mine.saturating_record_n(v.value_iterated_to(), v.count_at_value());
                }
            }
        }
        for (k, n) in &other.errors {
            *self.errors.entry(*k).or_insert(0) += n;
        }
    }

    /// Successful operations recorded.
    pub fn ok_count(&self) -> u64 {
        self.put.len() + self.get.len()
    }

    /// Failed operations recorded.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Error counts by kind, keyed by the kind's report name.
    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors
            .iter()
            .map(|(k, n)| (k.to_string(), *n))
            .collect()
    }

    /// Summary over all successful operations.
    pub fn summary_all(&self) -> LatencySummary {
        let mut all = self.put.clone();
        if all.add(&self.get).is_err() {
            for v in self.get.iter_recorded() {
                all.saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
        LatencySummary::of(&all)
    }

    /// Summary over successful puts only.
    pub fn summary_put(&self) -> LatencySummary {
        LatencySummary::of(&self.put)
    }

    /// Summary over successful gets only.
    pub fn summary_get(&self) -> LatencySummary {
        LatencySummary::of(&self.get)
    }
}

/// Latency percentiles of successful operations, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of operations summarised.
    pub count: u64,
    /// Arithmetic mean.
    pub mean_us: f64,
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest value seen.
    pub max_us: u64,
}

impl LatencySummary {
    /// Summarises a histogram of microsecond values (all zeros when empty).
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return LatencySummary {
                count: 0,
                mean_us: 0.0,
                p50_us: 0,
                p90_us: 0,
                p99_us: 0,
                p999_us: 0,
                max_us: 0,
            };
        }
        LatencySummary {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: u64, expected: u64) -> bool {
        // 3 significant figures: within 0.1 % (plus one unit of rounding).
        actual.abs_diff(expected) <= expected / 1000 + 1
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let mut r = Recorder::default();
        for us in 1..=10_000u64 {
            r.record_ok(us % 2 == 0, Duration::from_micros(us));
        }
        let s = r.summary_all();
        assert_eq!(s.count, 10_000);
        assert!(close(s.p50_us, 5_000), "p50 {}", s.p50_us);
        assert!(close(s.p90_us, 9_000), "p90 {}", s.p90_us);
        assert!(close(s.p99_us, 9_900), "p99 {}", s.p99_us);
        assert!(close(s.p999_us, 9_990), "p99.9 {}", s.p999_us);
        assert!(close(s.max_us, 10_000), "max {}", s.max_us);
        assert!((s.mean_us - 5_000.5).abs() < 10.0, "mean {}", s.mean_us);
        assert_eq!(r.summary_put().count, 5_000);
        assert_eq!(r.summary_get().count, 5_000);
    }

    #[test]
    fn a_single_outlier_shows_in_p999_and_max_only() {
        let mut r = Recorder::default();
        for _ in 0..9_999 {
            r.record_ok(false, Duration::from_micros(100));
        }
        r.record_ok(false, Duration::from_secs(2));
        let s = r.summary_get();
        assert!(close(s.p99_us, 100));
        assert!(close(s.p999_us, 100));
        assert!(close(s.max_us, 2_000_000));
    }

    #[test]
    fn empty_summary_is_zero() {
        let s = Recorder::default().summary_all();
        assert_eq!(s.count, 0);
        assert_eq!(s.p99_us, 0);
        assert_eq!(s.max_us, 0);
    }

    #[test]
    fn sub_microsecond_and_huge_latencies_are_kept() {
        let mut r = Recorder::default();
        r.record_ok(true, Duration::from_nanos(10));
        r.record_ok(true, Duration::from_secs(10_000));
        let s = r.summary_put();
        assert_eq!(s.count, 2);
        assert_eq!(s.p50_us, 1);
        assert!(s.max_us >= MAX_TRACKED_US / 2);
    }

    #[test]
    fn merge_adds_samples_and_errors() {
        let mut a = Recorder::default();
        let mut b = Recorder::default();
        a.record_ok(true, Duration::from_micros(10));
        b.record_ok(false, Duration::from_micros(20));
        a.record_error(ErrorKind::Timeout);
        b.record_error(ErrorKind::Timeout);
        b.record_error(ErrorKind::Status(503));
        b.record_error(ErrorKind::NotFound);
        a.merge(&b);
        assert_eq!(a.ok_count(), 2);
        assert_eq!(a.error_count(), 4);
        let e = a.errors();
        assert_eq!(e["timeout"], 2);
        assert_eq!(e["http_503"], 1);
        assert_eq!(e["not_found"], 1);
        assert_eq!(ErrorKind::Connect.to_string(), "connect");
        assert_eq!(ErrorKind::Io.to_string(), "io");
    }
}

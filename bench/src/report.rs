//! The run report, as plain text or JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::cli::{Config, EndpointPolicy, Length, Workload};
use crate::runner::RunResult;
use crate::stats::LatencySummary;
use crate::target::{RaftkvRoute, System};

/// Resource use of one server process.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessReport {
    /// Process id.
    pub pid: u32,
    /// CPU seconds (user + system) used during the measured part.
    pub cpu_seconds: Option<f64>,
    /// Peak resident set since the process started (`VmHWM`), KiB, at the end.
    pub peak_rss_kib: Option<u64>,
    /// Resident set at the end, KiB.
    pub rss_kib: Option<u64>,
    /// Why a sample failed (e.g. the process died).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Everything a run reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// System under test.
    pub target: System,
    /// Workload.
    pub workload: Workload,
    /// raftkv route family (raftkv only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub raftkv_route: Option<RaftkvRoute>,
    /// `closed` or `open`.
    pub mode: &'static str,
    /// Open-loop target rate.
    pub rate: Option<f64>,
    /// Connections.
    pub connections: usize,
    /// Endpoint policy.
    pub endpoint_policy: EndpointPolicy,
    /// Connections per endpoint.
    pub connections_per_endpoint: BTreeMap<String, usize>,
    /// Key size in bytes.
    pub key_size: usize,
    /// Distinct keys.
    pub keys: u64,
    /// Value size in bytes.
    pub value_size: usize,
    /// Requested length of the measured part.
    pub length: Length,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Actual length of the measured part, seconds.
    pub elapsed_s: f64,
    /// Successful operations.
    pub ok: u64,
    /// Failed operations.
    pub error_total: u64,
    /// Failed operations by kind.
    pub errors: BTreeMap<String, u64>,
    /// Successful operations per second.
    pub throughput: f64,
    /// Open loop: requests sent more than 2 ms late (the client could not keep up).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sent_late: Option<u64>,
    /// Latency of all successful operations.
    pub latency: LatencySummary,
    /// Latency of successful puts.
    pub latency_put: LatencySummary,
    /// Latency of successful gets.
    pub latency_get: LatencySummary,
    /// Server processes (`--pids`).
    pub processes: Vec<ProcessReport>,
    /// Sum of the servers' peak RSS, KiB (only when every sample succeeded).
    pub server_peak_rss_kib_sum: Option<u64>,
    /// Sum of the servers' CPU seconds during the measurement.
    pub server_cpu_seconds_sum: Option<f64>,
    /// CPU seconds the bench itself used during the measurement.
    pub client_cpu_seconds: Option<f64>,
    /// The machine's busy and stolen CPU shares during the measurement (`/proc/stat`):
    /// a run with much stolen time measured the host's other tenants too.
    pub host: Option<crate::procfs::HostShares>,
}

impl Report {
    /// Builds the report of a finished run.
    pub fn new(cfg: &Config, result: &RunResult) -> Report {
        let rec = &result.recorder;
        let elapsed_s = result.elapsed.as_secs_f64();
        let ok = rec.ok_count();
        let mut per_endpoint = BTreeMap::new();
        for ep in &result.endpoints_used {
            *per_endpoint.entry(ep.to_string()).or_insert(0) += 1;
        }
        let processes: Vec<ProcessReport> = result
            .processes
            .iter()
            .map(|p| {
                let error = match (&p.before, &p.after) {
                    (Err(e), _) | (_, Err(e)) => Some(e.clone()),
                    _ => None,
                };
                ProcessReport {
                    pid: p.pid,
                    cpu_seconds: match (&p.before, &p.after) {
                        (Ok(b), Ok(a)) => Some(a.cpu_seconds - b.cpu_seconds),
                        _ => None,
                    },
                    peak_rss_kib: p.after.as_ref().ok().map(|a| a.peak_rss_kib),
                    rss_kib: p.after.as_ref().ok().map(|a| a.rss_kib),
                    error,
                }
            })
            .collect();
        let all_ok = !processes.is_empty() && processes.iter().all(|p| p.error.is_none());
        Report {
            target: cfg.target,
            workload: cfg.workload,
            raftkv_route: (cfg.target == System::Raftkv).then_some(cfg.route),
            mode: if cfg.rate.is_some() { "open" } else { "closed" },
            rate: cfg.rate,
            connections: cfg.connections,
            endpoint_policy: cfg.policy,
            connections_per_endpoint: per_endpoint,
            key_size: cfg.keys.key_size(),
            keys: cfg.keys.len(),
            value_size: cfg.value_size,
            length: cfg.length,
            warmup_s: cfg.warmup.as_secs_f64(),
            elapsed_s,
            ok,
            error_total: rec.error_count(),
            errors: rec.errors(),
            throughput: if elapsed_s > 0.0 {
                ok as f64 / elapsed_s
            } else {
                0.0
            },
            sent_late: result.sent_late,
            latency: rec.summary_all(),
            latency_put: rec.summary_put(),
            latency_get: rec.summary_get(),
            server_peak_rss_kib_sum: all_ok
                .then(|| processes.iter().filter_map(|p| p.peak_rss_kib).sum()),
            server_cpu_seconds_sum: all_ok
                .then(|| processes.iter().filter_map(|p| p.cpu_seconds).sum()),
            processes,
            client_cpu_seconds: result.client_cpu_seconds,
            host: result.host,
        }
    }

    /// The report as pretty JSON.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers and strings cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }

    /// The report as human-readable text.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let ms = |us: u64| us as f64 / 1000.0;
        let _ = writeln!(
            s,
            "target {:?}  workload {:?}  {} loop{}  {} connections ({:?})",
            self.target,
            self.workload,
            self.mode,
            self.rate
                .map(|r| format!(" at {r} req/s"))
                .unwrap_or_default(),
            self.connections,
            self.endpoint_policy,
        );
        let _ = writeln!(
            s,
            "keys {} x {} B, values {} B, measured {:.2} s after {:.2} s warm-up",
            self.keys, self.key_size, self.value_size, self.elapsed_s, self.warmup_s
        );
        let _ = writeln!(
            s,
            "throughput {:.0} ops/s  ({} ok, {} errors)",
            self.throughput, self.ok, self.error_total
        );
        for (kind, n) in &self.errors {
            let _ = writeln!(s, "  error {kind}: {n}");
        }
        if let Some(late) = self.sent_late {
            let _ = writeln!(s, "  sent more than 2 ms late: {late}");
        }
        let _ = writeln!(
            s,
            "latency ms     {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "p50", "p90", "p99", "p99.9", "max", "mean"
        );
        for (name, l) in [
            ("all", &self.latency),
            ("put", &self.latency_put),
            ("get", &self.latency_get),
        ] {
            if l.count == 0 {
                continue;
            }
            let _ = writeln!(
                s,
                "  {name:<12} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                ms(l.p50_us),
                ms(l.p90_us),
                ms(l.p99_us),
                ms(l.p999_us),
                ms(l.max_us),
                l.mean_us / 1000.0
            );
        }
        for p in &self.processes {
            match &p.error {
                Some(e) => {
                    let _ = writeln!(s, "pid {}: {e}", p.pid);
                }
                None => {
                    let _ = writeln!(
                        s,
                        "pid {}: cpu {:.2} s, peak rss {:.1} MiB, rss {:.1} MiB",
                        p.pid,
                        p.cpu_seconds.unwrap_or(0.0),
                        p.peak_rss_kib.unwrap_or(0) as f64 / 1024.0,
                        p.rss_kib.unwrap_or(0) as f64 / 1024.0
                    );
                }
            }
        }
        if let (Some(rss), Some(cpu)) = (self.server_peak_rss_kib_sum, self.server_cpu_seconds_sum)
        {
            let _ = writeln!(
                s,
                "servers: peak rss sum {:.1} MiB, cpu {:.2} s",
                rss as f64 / 1024.0,
                cpu
            );
        }
        if let Some(c) = self.client_cpu_seconds {
            let _ = writeln!(s, "bench itself: cpu {c:.2} s");
        }
        if let Some(h) = self.host {
            let _ = writeln!(s, "machine: {:.0} % busy, {:.1} % stolen by the hypervisor", h.busy_percent, h.steal_percent);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Args;
    use crate::procfs::Sample;
    use crate::runner::ProcDelta;
    use crate::stats::{ErrorKind, Recorder};
    use clap::Parser;
    use std::time::Duration;

    fn config() -> Config {
        Args::try_parse_from([
            "raftkv-bench",
            "--target=raftkv",
            "--endpoints=http://127.0.0.1:1,http://127.0.0.1:2",
            "--workload=mix",
            "--connections=3",
            "--pids=7,8",
        ])
        .unwrap()
        .validate()
        .unwrap()
    }

    fn sample(pid: u32, cpu: f64, peak: u64) -> Sample {
        Sample {
            pid,
            cpu_seconds: cpu,
            peak_rss_kib: peak,
            rss_kib: peak / 2,
        }
    }

    #[test]
    fn report_sums_and_rates() {
        let cfg = config();
        let mut rec = Recorder::default();
        for _ in 0..900 {
            rec.record_ok(false, Duration::from_millis(1));
        }
        for _ in 0..100 {
            rec.record_ok(true, Duration::from_millis(4));
        }
        rec.record_error(ErrorKind::Status(503));
        let result = RunResult {
            recorder: rec,
            elapsed: Duration::from_secs(2),
            sent_late: None,
            endpoints_used: vec![
                cfg.endpoints[0].clone(),
                cfg.endpoints[1].clone(),
                cfg.endpoints[0].clone(),
            ],
            processes: vec![
                ProcDelta {
                    pid: 7,
                    before: Ok(sample(7, 1.0, 100)),
                    after: Ok(sample(7, 3.5, 2048)),
                },
                ProcDelta {
                    pid: 8,
                    before: Ok(sample(8, 0.0, 100)),
                    after: Ok(sample(8, 1.0, 1024)),
                },
            ],
            client_cpu_seconds: Some(0.5),
            host: Some(crate::procfs::HostShares { busy_percent: 80.0, steal_percent: 12.5 }),
        };
        let r = Report::new(&cfg, &result);
        assert_eq!(r.ok, 1000);
        assert_eq!(r.error_total, 1);
        assert_eq!(r.errors["http_503"], 1);
        assert!((r.throughput - 500.0).abs() < 1e-9);
        assert_eq!(r.latency_put.count, 100);
        assert_eq!(r.latency_get.count, 900);
        assert_eq!(r.server_peak_rss_kib_sum, Some(3072));
        assert!((r.server_cpu_seconds_sum.unwrap() - 3.5).abs() < 1e-9);
        assert_eq!(r.connections_per_endpoint["http://127.0.0.1:1"], 2);
        assert_eq!(r.mode, "closed");

        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["target"], "raftkv");
        assert_eq!(json["workload"], "mix");
        assert_eq!(json["raftkv_route"], "v1");
        assert_eq!(json["length"]["duration"], 10.0);
        assert_eq!(json["ok"], 1000);
        assert_eq!(json["server_peak_rss_kib_sum"], 3072);
        assert!(json["latency"]["p99_us"].as_u64().unwrap() >= 3990);

        let text = r.to_text();
        assert!(text.contains("throughput 500 ops/s"), "{text}");
        assert!(text.contains("error http_503: 1"), "{text}");
        assert!(text.contains("peak rss sum 3.0 MiB"), "{text}");
        assert!(text.contains("machine: 80 % busy, 12.5 % stolen"), "{text}");
        assert_eq!(json["host"]["steal_percent"], 12.5);
    }

    #[test]
    fn a_dead_process_is_reported_not_summed() {
        let cfg = config();
        let result = RunResult {
            recorder: Recorder::default(),
            elapsed: Duration::ZERO,
            sent_late: Some(0),
            endpoints_used: vec![],
            processes: vec![ProcDelta {
                pid: 7,
                before: Ok(sample(7, 1.0, 100)),
                after: Err("reading /proc/7/status: gone".into()),
            }],
            client_cpu_seconds: None,
            host: None,
        };
        let r = Report::new(&cfg, &result);
        assert_eq!(r.throughput, 0.0);
        assert_eq!(r.server_peak_rss_kib_sum, None);
        assert_eq!(
            r.processes[0].error.as_deref(),
            Some("reading /proc/7/status: gone")
        );
        assert!(r.to_text().contains("pid 7: reading /proc/7/status: gone"));
    }
}

//! Resource use of the measured processes, read from `/proc/<pid>/status` (peak and
//! current resident set: `VmHWM`, `VmRSS`) and `/proc/<pid>/stat` (CPU time:
//! `utime + stime`), and of the whole machine from `/proc/stat` (busy and stolen time:
//! a run during which the hypervisor gave the vCPUs to someone else says so).

use std::fs;
use std::path::PathBuf;

use serde::Serialize;

/// Why a process could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// The `/proc` file could not be read (usually: the process is gone).
    #[error("reading {path}: {source}")]
    Read {
        /// File that failed.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The file did not have the expected shape.
    #[error("parsing {path}: {what}")]
    Parse {
        /// File that failed.
        path: PathBuf,
        /// What was missing or malformed.
        what: &'static str,
    },
}

/// Memory figures from `/proc/<pid>/status`, in KiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// Peak resident set size (`VmHWM`).
    pub peak_rss_kib: u64,
    /// Current resident set size (`VmRSS`).
    pub rss_kib: u64,
}

/// Parses `VmHWM` and `VmRSS` out of the text of `/proc/<pid>/status`.
pub fn parse_status(text: &str) -> Result<Memory, &'static str> {
    let field = |name: &str| -> Result<u64, &'static str> {
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .ok_or("VmHWM/VmRSS line missing (kernel thread or zombie?)")?;
        let mut parts = line.split_whitespace();
        let n = parts
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or("memory value is not a number")?;
        match parts.next() {
            Some("kB") => Ok(n),
            _ => Err("memory value without kB unit"),
        }
    };
    Ok(Memory {
        peak_rss_kib: field("VmHWM:")?,
        rss_kib: field("VmRSS:")?,
    })
}

/// Parses `utime + stime` (in clock ticks) out of the text of `/proc/<pid>/stat`.
/// The command name (field 2) may contain spaces and parentheses, so fields are
/// counted from the last `)`.
pub fn parse_stat_ticks(text: &str) -> Result<u64, &'static str> {
    let after = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or("no ')' after the command name")?;
    // After ')' come field 3 (state), 4 (ppid), ...; utime is field 14, stime field 15.
    let mut fields = after.split_whitespace().skip(14 - 3);
    let mut next = || {
        fields
            .next()
            .and_then(|f| f.parse::<u64>().ok())
            .ok_or("utime/stime missing or not a number")
    };
    let utime = next()?;
    let stime = next()?;
    Ok(utime + stime)
}

/// The machine's CPU time from the `cpu` line of `/proc/stat`, in clock ticks summed
/// over all CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCpu {
    /// user + nice + system + irq + softirq.
    pub busy: u64,
    /// idle + iowait.
    pub idle: u64,
    /// Time the hypervisor ran something else while a vCPU wanted to run (`steal`).
    pub steal: u64,
}

/// Shares of the machine's CPU time between two [`HostCpu`] samples, in percent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostShares {
    /// Busy (user, system, interrupts) share of all CPU time.
    pub busy_percent: f64,
    /// Stolen share of all CPU time.
    pub steal_percent: f64,
}

impl HostCpu {
    /// The shares of the time from `before` to `self`; None when no time passed.
    pub fn shares_since(&self, before: &HostCpu) -> Option<HostShares> {
        let busy = self.busy.checked_sub(before.busy)?;
        let idle = self.idle.checked_sub(before.idle)?;
        let steal = self.steal.checked_sub(before.steal)?;
        let total = busy + idle + steal;
        (total > 0).then(|| HostShares {
            busy_percent: busy as f64 * 100.0 / total as f64,
            steal_percent: steal as f64 * 100.0 / total as f64,
        })
    }
}

/// Parses the first (`cpu `) line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (guest time is already counted in user).
pub fn parse_host_cpu(text: &str) -> Result<HostCpu, &'static str> {
    let line = text.lines().find(|l| l.starts_with("cpu ")).ok_or("no cpu line")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse::<u64>().map_err(|_| "cpu time is not a number"))
        .collect::<Result<_, _>>()?;
    if v.len() < 8 {
        return Err("cpu line has fewer than 8 fields");
    }
    Ok(HostCpu { busy: v[0] + v[1] + v[2] + v[5] + v[6], idle: v[3] + v[4], steal: v[7] })
}

/// Samples the machine's CPU time.
pub fn sample_host() -> Result<HostCpu, ProcError> {
    let (path, text) = read(PathBuf::from("/proc/stat"))?;
    parse_host_cpu(&text).map_err(|what| ProcError::Parse { path, what })
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), 100 if unavailable.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// One sample of a process's resource use.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Sample {
    /// Process id.
    pub pid: u32,
    /// User + system CPU time consumed since the process started, in seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size since the process started, in KiB.
    pub peak_rss_kib: u64,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
}

fn read(path: PathBuf) -> Result<(PathBuf, String), ProcError> {
    match fs::read_to_string(&path) {
        Ok(text) => Ok((path, text)),
        Err(source) => Err(ProcError::Read { path, source }),
    }
}

/// Samples process `pid`.
pub fn sample(pid: u32) -> Result<Sample, ProcError> {
    sample_at(&format!("/proc/{pid}"), pid)
}

/// Samples this process.
pub fn sample_self() -> Result<Sample, ProcError> {
    sample_at("/proc/self", std::process::id())
}

fn sample_at(dir: &str, pid: u32) -> Result<Sample, ProcError> {
    let (path, status) = read(PathBuf::from(format!("{dir}/status")))?;
    let mem = parse_status(&status).map_err(|what| ProcError::Parse { path, what })?;
    let (path, stat) = read(PathBuf::from(format!("{dir}/stat")))?;
    let ticks = parse_stat_ticks(&stat).map_err(|what| ProcError::Parse { path, what })?;
    Ok(Sample {
        pid,
        cpu_seconds: ticks as f64 / clock_ticks_per_second() as f64,
        peak_rss_kib: mem.peak_rss_kib,
        rss_kib: mem.rss_kib,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tetcd\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t11418212 kB\n\
VmSize:\t11418212 kB\nVmHWM:\t   84412 kB\nVmRSS:\t   61236 kB\nThreads:\t14\n";

    #[test]
    fn parses_status_memory() {
        let m = parse_status(STATUS).unwrap();
        assert_eq!(m.peak_rss_kib, 84_412);
        assert_eq!(m.rss_kib, 61_236);
    }

    #[test]
    fn status_without_memory_lines_is_an_error() {
        assert!(parse_status("Name:\tkthreadd\nState:\tS\n").is_err());
        assert!(parse_status("VmHWM:\tlots kB\nVmRSS:\t1 kB\n").is_err());
        assert!(parse_status("VmHWM:\t5 MB\nVmRSS:\t1 kB\n").is_err());
    }

    #[test]
    fn parses_stat_cpu_ticks_even_with_odd_command_names() {
        // Fields: pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime ...
        let stat =
            "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 14 0";
        assert_eq!(parse_stat_ticks(stat).unwrap(), 325);
        assert!(parse_stat_ticks("4242 (x) S 1 2").is_err());
        assert!(parse_stat_ticks("garbage").is_err());
    }

    #[test]
    fn host_cpu_shares_count_stolen_time() {
        let before = parse_host_cpu("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n").unwrap();
        assert_eq!(before, HostCpu { busy: 150, idle: 850, steal: 0 });
        // 100 ticks later: 40 busy, 20 idle, 40 stolen.
        let after = parse_host_cpu("cpu  130 0 60 815 55 0 0 40 7 0\n").unwrap();
        let s = after.shares_since(&before).unwrap();
        assert!((s.busy_percent - 40.0).abs() < 1e-9 && (s.steal_percent - 40.0).abs() < 1e-9, "{s:?}");
        assert_eq!(before.shares_since(&before), None, "no time passed");
        assert_eq!(before.shares_since(&after), None, "counters went backwards");
        assert!(parse_host_cpu("cpu  1 2 3\n").is_err());
        assert!(parse_host_cpu("intr 5\n").is_err());
        assert!(sample_host().is_ok());
    }

    #[test]
    fn samples_this_process() {
        let s = sample_self().unwrap();
        assert_eq!(s.pid, std::process::id());
        assert!(s.peak_rss_kib >= s.rss_kib);
        assert!(s.rss_kib > 0);
        // By pid too, and an impossible pid is an error rather than a panic.
        assert!(sample(std::process::id()).is_ok());
        assert!(matches!(sample(u32::MAX), Err(ProcError::Read { .. })));
        assert!(clock_ticks_per_second() > 0);
    }
}

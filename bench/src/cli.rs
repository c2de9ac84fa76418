//! Command-line flags and their validation into a run [`Config`].

use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;

use crate::endpoint::{self, Endpoint, EndpointError};
use crate::keys::{KeySpace, KeySpaceError, MAX_VALUE_SIZE};
use crate::target::{check_supported, Op, RaftkvRoute, System, TargetError};

/// What operations a run issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Writes to uniformly random keys.
    Put,
    /// Linearizable reads of uniformly random keys.
    Get,
    /// Serializable (local) reads of uniformly random keys.
    GetSerializable,
    /// `--mix-get-percent` linearizable reads (default 90 %), the rest writes.
    Mix,
    /// Writes every key of the key space exactly once (to fill the store before reads).
    Load,
}

/// How connections are spread over the endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EndpointPolicy {
    /// Connection i goes to endpoint i mod n (like a round-robin client balancer).
    Spread,
    /// Every connection goes to the current leader (raftkv and etcd only).
    Leader,
}

/// Load generator for raftkv, etcd (v3 JSON gateway) and raftexample.
///
/// Closed loop by default (each connection sends its next request when the previous
/// one is answered); with --rate, open loop at a fixed total rate, latency measured from
/// each request's intended send time so that stalls are not hidden (no coordinated
/// omission). Only loopback (127.0.0.0/8) endpoints are accepted.
#[derive(Debug, Clone, Parser)]
#[command(name = "raftkv-bench", version)]
pub struct Args {
    /// System under test.
    #[arg(long, value_enum)]
    pub target: System,
    /// Client URLs, comma-separated (http://127.x.x.x:port).
    #[arg(long, required = true)]
    pub endpoints: String,
    /// How connections are spread over the endpoints.
    #[arg(long, value_enum, default_value = "spread")]
    pub endpoint_policy: EndpointPolicy,
    /// Operations to issue.
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Share of reads in the `mix` workload, in percent.
    #[arg(long, default_value_t = 90)]
    pub mix_get_percent: u8,
    /// Number of keep-alive connections (one worker each).
    #[arg(long, default_value_t = 32)]
    pub connections: usize,
    /// Open loop: total requests per second over all connections.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Measured run length (e.g. 10s, 500ms, 2m); default 10s unless --requests is given.
    #[arg(long, value_parser = parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Measured run length as a number of requests (successful or not).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Unmeasured run time before the measurement starts.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// Size of every key in bytes (keys are zero-padded decimal numbers).
    #[arg(long, default_value_t = 8)]
    pub key_size: usize,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 100_000)]
    pub keys: u64,
    /// Size of every written value in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Which raftkv routes to use: /v1/kv/<key> or raftexample-style /<key>.
    #[arg(long, value_enum, default_value = "v1")]
    pub raftkv_route: RaftkvRoute,
    /// Per-request timeout; a timed-out connection is replaced.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub timeout: Duration,
    /// Process ids of the servers whose CPU time and peak RSS to report, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Tokio worker threads of the bench itself (it competes with the servers for CPU).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Seed of the key choice (worker i uses seed + i).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Parses `10s`, `500ms`, `2m`, `1.5s` or a plain number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (examples: 10s, 500ms, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?} (use ms, s, m or h)"
            ))
        }
    };
    if !secs.is_finite() || !(0.0..=86_400.0 * 7.0).contains(&secs) {
        return Err(format!("duration {s:?} out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Why the flags do not make a runnable configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A bad endpoint.
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    /// A bad key space.
    #[error(transparent)]
    Keys(#[from] KeySpaceError),
    /// The workload cannot run against this target.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// Any other invalid flag value.
    #[error("{0}")]
    Invalid(String),
}

/// How long the measured part of a run lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Length {
    /// A fixed time.
    Duration(#[serde(serialize_with = "ser_secs")] Duration),
    /// A fixed number of requests.
    Requests(u64),
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// A validated run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// System under test.
    pub target: System,
    /// Endpoints, in the order given.
    pub endpoints: Vec<Endpoint>,
    /// How connections are spread.
    pub policy: EndpointPolicy,
    /// Workload.
    pub workload: Workload,
    /// Reads in percent for `mix`.
    pub mix_get_percent: u8,
    /// Connections (= workers).
    pub connections: usize,
    /// Open-loop rate, if any.
    pub rate: Option<f64>,
    /// Measured length.
    pub length: Length,
    /// Warm-up before measuring.
    pub warmup: Duration,
    /// Key space.
    pub keys: KeySpace,
    /// Value size.
    pub value_size: usize,
    /// raftkv route family.
    pub route: RaftkvRoute,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Server pids to sample.
    pub pids: Vec<u32>,
    /// JSON output.
    pub json: bool,
    /// Runtime threads.
    pub threads: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Workload {
    /// The operations this workload issues (for support checks).
    pub fn ops(self) -> &'static [Op] {
        match self {
            Workload::Put | Workload::Load => &[Op::Put],
            Workload::Get => &[Op::Get {
                serializable: false,
            }],
            Workload::GetSerializable => &[Op::Get { serializable: true }],
            Workload::Mix => &[
                Op::Put,
                Op::Get {
                    serializable: false,
                },
            ],
        }
    }
}

impl Args {
    /// Checks the flags and builds the run configuration.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let endpoints = endpoint::parse_list(&self.endpoints)?;
        let keys = KeySpace::new(self.key_size, self.keys)?;
        for op in self.workload.ops() {
            check_supported(self.target, self.raftkv_route, *op)?;
        }
        if self.connections == 0 || self.connections > 10_000 {
            return Err(ConfigError::Invalid(
                "--connections must be between 1 and 10000".into(),
            ));
        }
        if self.value_size > MAX_VALUE_SIZE {
            return Err(ConfigError::Invalid(format!(
                "--value-size must be at most {MAX_VALUE_SIZE}"
            )));
        }
        if self.mix_get_percent > 100 {
            return Err(ConfigError::Invalid(
                "--mix-get-percent must be between 0 and 100".into(),
            ));
        }
        if let Some(r) = self.rate {
            if !r.is_finite() || r <= 0.0 || r > 10_000_000.0 {
                return Err(ConfigError::Invalid(
                    "--rate must be a positive number of requests per second (at most 1e7)".into(),
                ));
            }
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(ConfigError::Invalid(
                "--threads must be between 1 and 256".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(ConfigError::Invalid("--timeout must be positive".into()));
        }
        let (length, warmup) =
            match (self.workload, self.duration, self.requests) {
                (Workload::Load, None, None) => (Length::Requests(self.keys), Duration::ZERO),
                (Workload::Load, _, _) => return Err(ConfigError::Invalid(
                    "--workload load writes every key once; it takes no --duration or --requests"
                        .into(),
                )),
                (_, Some(d), None) if d.is_zero() => {
                    return Err(ConfigError::Invalid("--duration must be positive".into()))
                }
                (_, Some(d), None) => (Length::Duration(d), self.warmup),
                (_, None, Some(0)) => {
                    return Err(ConfigError::Invalid("--requests must be positive".into()))
                }
                (_, None, Some(n)) => (Length::Requests(n), self.warmup),
                (_, None, None) => (Length::Duration(Duration::from_secs(10)), self.warmup),
                // clap refuses --duration together with --requests.
                (_, Some(_), Some(_)) => {
                    return Err(ConfigError::Invalid(
                        "--duration and --requests are exclusive".into(),
                    ))
                }
            };
        Ok(Config {
            target: self.target,
            endpoints,
            policy: self.endpoint_policy,
            workload: self.workload,
            mix_get_percent: self.mix_get_percent,
            connections: self.connections,
            rate: self.rate,
            length,
            warmup,
            keys,
            value_size: self.value_size,
            route: self.raftkv_route,
            timeout: self.timeout,
            pids: self.pids,
            json: self.json,
            threads: self.threads,
            seed: self.seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["raftkv-bench"];
        v.extend_from_slice(args);
        Args::try_parse_from(v)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    const EP: &str = "--endpoints=http://127.0.0.1:2379,http://127.0.0.1:22379";

    #[test]
    fn defaults() {
        let c = parse(&["--target", "etcd", EP]).unwrap();
        assert_eq!(c.target, System::Etcd);
        assert_eq!(c.endpoints.len(), 2);
        assert_eq!(c.policy, EndpointPolicy::Spread);
        assert_eq!(c.workload, Workload::Put);
        assert_eq!(c.connections, 32);
        assert_eq!(c.rate, None);
        assert_eq!(c.length, Length::Duration(Duration::from_secs(10)));
        assert_eq!(c.warmup, Duration::from_secs(2));
        assert_eq!(c.keys.key_size(), 8);
        assert_eq!(c.keys.len(), 100_000);
        assert_eq!(c.value_size, 256);
        assert_eq!(c.route, RaftkvRoute::V1);
        assert_eq!(c.mix_get_percent, 90);
        assert!(c.pids.is_empty());
        assert!(!c.json);
    }

    #[test]
    fn full_flag_set() {
        let c = parse(&[
            "--target=raftkv",
            EP,
            "--endpoint-policy=leader",
            "--workload=get-serializable",
            "--connections=4",
            "--rate=1500",
            "--duration=1.5s",
            "--warmup=250ms",
            "--key-size=16",
            "--keys=10",
            "--value-size=1024",
            "--timeout=2s",
            "--pids=10,20,30",
            "--json",
            "--threads=2",
            "--seed=7",
        ])
        .unwrap();
        assert_eq!(c.workload, Workload::GetSerializable);
        assert_eq!(c.policy, EndpointPolicy::Leader);
        assert_eq!(c.rate, Some(1500.0));
        assert_eq!(c.length, Length::Duration(Duration::from_millis(1500)));
        assert_eq!(c.warmup, Duration::from_millis(250));
        assert_eq!(c.pids, vec![10, 20, 30]);
        assert_eq!(c.threads, 2);
        assert!(c.json);
    }

    #[test]
    fn load_writes_each_key_once_without_warmup() {
        let c = parse(&["--target=etcd", EP, "--workload=load", "--keys=500"]).unwrap();
        assert_eq!(c.length, Length::Requests(500));
        assert_eq!(c.warmup, Duration::ZERO);
        assert!(parse(&["--target=etcd", EP, "--workload=load", "--requests=5"]).is_err());
    }

    #[test]
    fn rejects_bad_input_with_clear_messages() {
        let err = parse(&["--target=etcd", "--endpoints=http://192.168.1.1:2379"]).unwrap_err();
        assert!(err.contains("127.0.0.0/8"), "{err}");
        assert!(parse(&["--target=etcd", EP, "--duration=1s", "--requests=5"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--connections=0"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--rate=0"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--rate=-5"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--duration=0s"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--requests=0"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--mix-get-percent=101"]).is_err());
        assert!(parse(&["--target=etcd", EP, "--keys=1000", "--key-size=2"]).is_err());
        assert!(parse(&["--target=mongodb", EP]).is_err());
        assert!(parse(&["--target=etcd"]).is_err());
        let err = parse(&[
            "--target=raftkv",
            EP,
            "--raftkv-route=raftexample",
            "--workload=get-serializable",
        ])
        .unwrap_err();
        assert!(err.contains("serializable"), "{err}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250us"), Ok(Duration::from_micros(250)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("1e400s").is_err());
        assert!(parse_duration("9999h").is_err());
    }
}

//! The drivers: one task per connection, closed loop (send the next request when the
//! previous one is answered) or open loop (request i is due at `start + i / rate`; its
//! latency is measured from that due time, so a stalled server cannot hide its queue
//! behind a slowed-down client: no coordinated omission).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::time::{sleep_until, timeout, Instant};

use crate::cli::{Config, EndpointPolicy, Length, Workload};
use crate::client::Conn;
use crate::endpoint::Endpoint;
use crate::keys::{make_value, KeySpace};
use crate::leader::find_leader;
use crate::procfs;
use crate::stats::{ErrorKind, Recorder};
use crate::target::{classify, Encoder, Op, Outcome, RaftkvRoute, System};

/// Requests sent later than this after their due time count as "late" (open loop). Tokio's
/// timer has a 1 ms granularity, so lateness below 2 ms is timer slack, not a backlog.
const LATE_THRESHOLD: Duration = Duration::from_millis(2);
/// Pause after a failed connection attempt before the next one.
const RECONNECT_BACKOFF: Duration = Duration::from_millis(50);

/// What a run measured.
#[derive(Debug)]
pub struct RunResult {
    /// Latencies and errors of the measured part.
    pub recorder: Recorder,
    /// Length of the measured part (from the end of the warm-up until the last worker
    /// finished).
    pub elapsed: Duration,
    /// Open loop: requests sent more than 2 ms after their due time.
    pub sent_late: Option<u64>,
    /// Endpoint each connection used.
    pub endpoints_used: Vec<Endpoint>,
    /// Server processes: sample at the start of the measurement and at the end.
    pub processes: Vec<ProcDelta>,
    /// CPU seconds the bench itself used during the measurement.
    pub client_cpu_seconds: Option<f64>,
    /// The machine's busy and stolen CPU shares during the measurement.
    pub host: Option<procfs::HostShares>,
}

/// Resource use of one server process over the measured part.
#[derive(Debug, Clone)]
pub struct ProcDelta {
    /// Process id.
    pub pid: u32,
    /// Sample at the start, or why it failed.
    pub before: Result<procfs::Sample, String>,
    /// Sample at the end, or why it failed.
    pub after: Result<procfs::Sample, String>,
}

/// State shared by all workers.
struct Shared {
    start: Instant,
    measure_start: Instant,
    end: Option<Instant>,
    remaining: Option<AtomicI64>,
    next_slot: AtomicU64,
    next_key: AtomicU64,
    rate: Option<f64>,
    late: AtomicU64,
    warned: AtomicBool,
}

/// Per-worker settings.
struct WorkerSpec {
    id: u64,
    endpoint: Endpoint,
    system: System,
    route: RaftkvRoute,
    workload: Workload,
    mix_get_percent: u8,
    keys: KeySpace,
    value: bytes::Bytes,
    timeout: Duration,
    seed: u64,
}

impl Shared {
    fn warn_once(&self, what: &str, err: &dyn std::fmt::Display) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %err, "first failed request ({what}); further ones are only counted");
        }
    }

    /// Consumes one request of a `--requests` budget; false when it is exhausted.
    fn take_request(&self) -> bool {
        match &self.remaining {
            Some(r) => r.fetch_sub(1, Ordering::Relaxed) > 0,
            None => true,
        }
    }
}

fn sample_all(pids: &[u32]) -> Vec<Result<procfs::Sample, String>> {
    pids.iter()
        .map(|p| procfs::sample(*p).map_err(|e| e.to_string()))
        .collect()
}

/// Runs the configured workload and returns what was measured.
pub async fn run(cfg: &Config) -> anyhow::Result<RunResult> {
    let endpoints_used: Vec<Endpoint> = match cfg.policy {
        EndpointPolicy::Spread => (0..cfg.connections)
            .map(|i| cfg.endpoints[i % cfg.endpoints.len()].clone())
            .collect(),
        EndpointPolicy::Leader => {
            let leader = find_leader(cfg.target, &cfg.endpoints).await?;
            vec![cfg.endpoints[leader].clone(); cfg.connections]
        }
    };
    let value = make_value(cfg.value_size, cfg.seed);
    let start = Instant::now();
    let measure_start = start + cfg.warmup;
    let (end, remaining) = match cfg.length {
        Length::Duration(d) => (Some(measure_start + d), None),
        Length::Requests(n) => (
            None,
            Some(AtomicI64::new(i64::try_from(n).unwrap_or(i64::MAX))),
        ),
    };
    let shared = Arc::new(Shared {
        start,
        measure_start,
        end,
        remaining,
        next_slot: AtomicU64::new(0),
        next_key: AtomicU64::new(0),
        rate: cfg.rate,
        late: AtomicU64::new(0),
        warned: AtomicBool::new(false),
    });

    // Resource samples at the start of the measurement (after the warm-up).
    let pids = cfg.pids.clone();
    let before_task = tokio::spawn(async move {
        sleep_until(measure_start).await;
        let servers = sample_all(&pids);
        let client = procfs::sample_self().ok();
        let host = procfs::sample_host().ok();
        (servers, client, host)
    });

    let mut workers = Vec::with_capacity(cfg.connections);
    for (i, endpoint) in endpoints_used.iter().enumerate() {
        let spec = WorkerSpec {
            id: i as u64,
            endpoint: endpoint.clone(),
            system: cfg.target,
            route: cfg.route,
            workload: cfg.workload,
            mix_get_percent: cfg.mix_get_percent,
            keys: cfg.keys,
            value: value.clone(),
            timeout: cfg.timeout,
            seed: cfg.seed,
        };
        workers.push(tokio::spawn(worker(spec, Arc::clone(&shared))));
    }
    let mut recorder = Recorder::default();
    for w in workers {
        recorder.merge(&w.await?);
    }
    let finished = Instant::now();
    let after = sample_all(&cfg.pids);
    let client_after = procfs::sample_self().ok();
    let host_after = procfs::sample_host().ok();
    // The measurement may have ended before the warm-up did (e.g. every request failed
    // fast in a --requests run); the start sample still comes, just late.
    let (before, client_before, host_before) = before_task.await?;
    let processes = cfg
        .pids
        .iter()
        .zip(before)
        .zip(after)
        .map(|((pid, before), after)| ProcDelta {
            pid: *pid,
            before,
            after,
        })
        .collect();
    let client_cpu_seconds = match (client_before, client_after) {
        (Some(b), Some(a)) => Some(a.cpu_seconds - b.cpu_seconds),
        _ => None,
    };
    Ok(RunResult {
        recorder,
        elapsed: finished.saturating_duration_since(measure_start),
        sent_late: cfg.rate.map(|_| shared.late.load(Ordering::Relaxed)),
        endpoints_used,
        processes,
        client_cpu_seconds,
        host: host_after.zip(host_before).and_then(|(a, b)| a.shares_since(&b)),
    })
}

/// One connection's loop. Stops at the end time, when the request budget is spent, or
/// (load) when every key has been handed out.
async fn worker(spec: WorkerSpec, shared: Arc<Shared>) -> Recorder {
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_add(spec.id));
    let mut encoder = Encoder::new(spec.system, spec.route, spec.value.clone());
    let mut key = String::with_capacity(spec.keys.key_size());
    let mut conn: Option<Conn> = None;
    let mut rec = Recorder::default();
    loop {
        // When is this request due?
        let due = match shared.rate {
            Some(rate) => {
                let slot = shared.next_slot.fetch_add(1, Ordering::Relaxed);
                let due = shared.start + Duration::from_secs_f64(slot as f64 / rate);
                if shared.end.is_some_and(|e| due >= e) {
                    break;
                }
                sleep_until(due).await;
                if Instant::now().saturating_duration_since(due) > LATE_THRESHOLD
                    && due >= shared.measure_start
                {
                    shared.late.fetch_add(1, Ordering::Relaxed);
                }
                due
            }
            None => Instant::now(),
        };
        if shared.end.is_some_and(|e| due >= e) {
            break;
        }
        let measured = due >= shared.measure_start;
        if measured && !shared.take_request() {
            break;
        }

        // What to do, on which key?
        let op = match spec.workload {
            Workload::Put | Workload::Load => Op::Put,
            Workload::Get => Op::Get {
                serializable: false,
            },
            Workload::GetSerializable => Op::Get { serializable: true },
            Workload::Mix => {
                if rng.gen_range(0..100u8) < spec.mix_get_percent {
                    Op::Get {
                        serializable: false,
                    }
                } else {
                    Op::Put
                }
            }
        };
        let index = if spec.workload == Workload::Load {
            let i = shared.next_key.fetch_add(1, Ordering::Relaxed);
            if i >= spec.keys.len() {
                break;
            }
            i
        } else {
            spec.keys.pick(&mut rng)
        };
        spec.keys.write_key(index, &mut key);

        // A connection, new if the last one failed.
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match timeout(spec.timeout, Conn::connect(&spec.endpoint)).await {
                Ok(Ok(c)) => conn.insert(c),
                Ok(Err(e)) => {
                    shared.warn_once("connect", &e);
                    if measured {
                        rec.record_error(ErrorKind::Connect);
                    }
                    backoff(&shared).await;
                    continue;
                }
                Err(_) => {
                    shared.warn_once("connect", &"connect timed out");
                    if measured {
                        rec.record_error(ErrorKind::Timeout);
                    }
                    continue;
                }
            },
        };

        let req = encoder.encode(op, &key);
        let answer = timeout(
            spec.timeout,
            c.send(req.method, req.path, req.body, req.content_type),
        )
        .await;
        let done = Instant::now();
        let outcome = match answer {
            Ok(Ok(a)) => match classify(spec.system, op, a.status, &a.body) {
                Outcome::Ok => None,
                Outcome::NotFound => Some(ErrorKind::NotFound),
                Outcome::Status(code) => {
                    shared.warn_once(
                        "status",
                        &format_args!("HTTP {code}: {}", String::from_utf8_lossy(&a.body)),
                    );
                    Some(ErrorKind::Status(code))
                }
            },
            Ok(Err(e)) => {
                shared.warn_once("io", &e);
                conn = None;
                Some(ErrorKind::Io)
            }
            Err(_) => {
                shared.warn_once("timeout", &"request timed out");
                conn = None;
                Some(ErrorKind::Timeout)
            }
        };
        if measured {
            match outcome {
                None => rec.record_ok(op == Op::Put, done.saturating_duration_since(due)),
                Some(kind) => rec.record_error(kind),
            }
        }
    }
    rec
}

/// Waits before reconnecting, but never past the end of the run.
async fn backoff(shared: &Shared) {
    let until = Instant::now() + RECONNECT_BACKOFF;
    let until = shared.end.map_or(until, |e| until.min(e));
    sleep_until(until).await;
}

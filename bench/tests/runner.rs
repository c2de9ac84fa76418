//! The drivers against an in-process fake server that speaks raftexample's API
//! (`PUT /<key>` → 204, `GET /<key>` → 200 or 404) on 127.0.0.1.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use raftkv_bench::cli::Args;
use raftkv_bench::report::Report;
use raftkv_bench::runner::run;
use tokio::net::TcpListener;

/// How the fake misbehaves.
#[derive(Default, Clone, Copy)]
struct Behaviour {
    /// Stall this request (0-based, counted over all connections) for this long.
    stall: Option<(u64, Duration)>,
    /// Answer every PUT with 503.
    fail_puts: bool,
    /// Never answer.
    hang: bool,
}

#[derive(Default)]
struct Fake {
    store: Mutex<HashMap<String, Bytes>>,
    requests: AtomicU64,
    connections: AtomicU64,
}

async fn handle(
    fake: Arc<Fake>,
    behaviour: Behaviour,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let n = fake.requests.fetch_add(1, Ordering::SeqCst);
    if behaviour.hang {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some((at, d)) = behaviour.stall {
        if n == at {
            tokio::time::sleep(d).await;
        }
    }
    let key = req.uri().path().to_string();
    let status_only = |s: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = s;
        Ok(r)
    };
    match *req.method() {
        hyper::Method::PUT => {
            if behaviour.fail_puts {
                return status_only(StatusCode::SERVICE_UNAVAILABLE);
            }
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return status_only(StatusCode::BAD_REQUEST),
            };
            fake.store.lock().unwrap().insert(key, body);
            status_only(StatusCode::NO_CONTENT)
        }
        hyper::Method::GET => match fake.store.lock().unwrap().get(&key) {
            Some(v) => Ok(Response::new(Full::new(v.clone()))),
            None => status_only(StatusCode::NOT_FOUND),
        },
        _ => status_only(StatusCode::METHOD_NOT_ALLOWED),
    }
}

/// Starts the fake on an ephemeral loopback port; it stops with the test's runtime.
async fn start_fake(behaviour: Behaviour) -> (Arc<Fake>, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let fake = Arc::new(Fake::default());
    let f = Arc::clone(&fake);
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            f.connections.fetch_add(1, Ordering::SeqCst);
            let f = Arc::clone(&f);
            tokio::spawn(async move {
                let svc = service_fn(move |req| handle(Arc::clone(&f), behaviour, req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), svc)
                    .await;
            });
        }
    });
    (fake, url)
}

async fn bench(url: &str, extra: &[&str]) -> Report {
    let mut argv = vec![
        "raftkv-bench".to_string(),
        "--target=raftexample".into(),
        format!("--endpoints={url},{url}"),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let cfg = Args::try_parse_from(argv).unwrap().validate().unwrap();
    let result = run(&cfg).await.unwrap();
    Report::new(&cfg, &result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_fills_every_key_then_reads_find_them() {
    let (fake, url) = start_fake(Behaviour::default()).await;
    let load = bench(
        &url,
        &[
            "--workload=load",
            "--keys=500",
            "--key-size=4",
            "--connections=8",
        ],
    )
    .await;
    assert_eq!(load.ok, 500);
    assert_eq!(load.error_total, 0);
    {
        let store = fake.store.lock().unwrap();
        assert_eq!(store.len(), 500);
        assert!(store.contains_key("/0000") && store.contains_key("/0499"));
        assert!(store.values().all(|v| v.len() == 256));
    }
    // One connection per worker, kept alive for the whole run.
    assert_eq!(fake.connections.load(Ordering::SeqCst), 8);

    let reads = bench(
        &url,
        &[
            "--workload=get",
            "--keys=500",
            "--key-size=4",
            "--connections=4",
            "--requests=2000",
            "--warmup=0s",
        ],
    )
    .await;
    assert_eq!(reads.ok, 2000);
    assert_eq!(reads.error_total, 0);
    assert_eq!(reads.latency_get.count, 2000);
    assert_eq!(reads.latency_put.count, 0);

    // Keys beyond the loaded ones are reported as not_found, not as successes.
    let misses = bench(
        &url,
        &[
            "--workload=get",
            "--keys=1000",
            "--key-size=4",
            "--connections=2",
            "--requests=400",
            "--warmup=0s",
        ],
    )
    .await;
    assert_eq!(misses.ok + misses.error_total, 400);
    assert!(
        misses.errors.get("not_found").copied().unwrap_or(0) > 100,
        "{:?}",
        misses.errors
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_budget_and_mix_are_respected() {
    let (fake, url) = start_fake(Behaviour::default()).await;
    let r = bench(
        &url,
        &[
            "--workload=mix",
            "--mix-get-percent=50",
            "--requests=1000",
            "--warmup=0s",
            "--connections=5",
            "--keys=10",
        ],
    )
    .await;
    assert_eq!(r.ok + r.error_total, 1000);
    assert_eq!(fake.requests.load(Ordering::SeqCst), 1000);
    // Roughly half writes (binomial, n=1000: ±5 sigma is ±80).
    let puts = r.latency_put.count as i64;
    assert!((puts - 500).abs() < 80, "puts {puts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_counted_by_status() {
    let (_fake, url) = start_fake(Behaviour {
        fail_puts: true,
        ..Behaviour::default()
    })
    .await;
    let r = bench(
        &url,
        &[
            "--workload=put",
            "--requests=300",
            "--warmup=0s",
            "--connections=3",
        ],
    )
    .await;
    assert_eq!(r.ok, 0);
    assert_eq!(r.errors.get("http_503"), Some(&300));
    assert_eq!(r.throughput, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_times_out_and_the_run_still_ends() {
    let (_fake, url) = start_fake(Behaviour {
        hang: true,
        ..Behaviour::default()
    })
    .await;
    let r = bench(
        &url,
        &[
            "--workload=get",
            "--duration=600ms",
            "--warmup=0s",
            "--timeout=200ms",
            "--connections=2",
        ],
    )
    .await;
    assert_eq!(r.ok, 0);
    let timeouts = r.errors.get("timeout").copied().unwrap_or(0);
    // Each of the 2 connections times out about every 200 ms for 600 ms.
    assert!((2..=8).contains(&timeouts), "{:?}", r.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_charges_a_stall_to_every_request_due_during_it() {
    // One connection at 100 req/s for 1 s; request 20 stalls for 300 ms. About 30
    // requests fall due during the stall and wait for it, so their latencies, measured
    // from their due times, spread from 300 ms down to 0: the 90th percentile must be
    // far above the fake's sub-millisecond service time. A closed-loop (coordinated
    // omission) measurement would show a single slow request instead.
    // Errors carry no latency, so first load the single key the reads will hit; the
    // load is request 0, the stalled read is read number 20.
    let (_fake, url) = start_fake(Behaviour {
        stall: Some((21, Duration::from_millis(300))),
        ..Behaviour::default()
    })
    .await;
    let load = bench(
        &url,
        &[
            "--workload=load",
            "--keys=1",
            "--key-size=1",
            "--connections=1",
        ],
    )
    .await;
    assert_eq!(load.ok, 1);
    let r = bench(
        &url,
        &[
            "--workload=get-serializable",
            "--keys=1",
            "--key-size=1",
            "--rate=100",
            "--duration=1s",
            "--warmup=0s",
            "--connections=1",
        ],
    )
    .await;
    assert_eq!(r.mode, "open");
    assert!(r.ok >= 90, "{r:?}");
    assert!(
        r.latency.p90_us >= 100_000,
        "p90 {} us: the stall was not charged to the queued requests",
        r.latency.p90_us
    );
    assert!(r.latency.max_us >= 290_000, "max {}", r.latency.max_us);
    assert!(
        r.sent_late.unwrap_or(0) >= 10,
        "sent_late {:?}",
        r.sent_late
    );
}

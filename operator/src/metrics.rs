//! The operator's own Prometheus metrics and the `/metrics` + `/healthz` HTTP endpoint.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

/// Metrics of the reconcile loop.
#[derive(Clone)]
pub struct Metrics {
    /// The registry all metrics below live in.
    pub registry: Registry,
    /// Reconciles started.
    pub reconciles: IntCounter,
    /// Reconciles that returned an error, by kind.
    pub errors: IntCounterVec,
    /// Reconcile durations.
    pub duration: Histogram,
    /// Membership operations executed, by action and result.
    pub membership_ops: IntCounterVec,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounter::new("raftkv_operator_reconciles_total", "Reconciles started")?;
        let errors = IntCounterVec::new(
            Opts::new("raftkv_operator_reconcile_errors_total", "Reconciles that failed, by error kind"),
            &["kind"],
        )?;
        let duration = Histogram::with_opts(
            HistogramOpts::new("raftkv_operator_reconcile_duration_seconds", "Reconcile duration")
                .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let membership_ops = IntCounterVec::new(
            Opts::new("raftkv_operator_membership_operations_total", "Membership steps executed"),
            &["action", "result"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(membership_ops.clone()))?;
        Ok(Metrics { registry, reconciles, errors, duration, membership_ops })
    }

    /// Prometheus text exposition of all metrics.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

fn respond(metrics: &Metrics, path: &str) -> Response<Full<Bytes>> {
    let (status, body) = match path {
        "/metrics" => (StatusCode::OK, metrics.render()),
        "/healthz" => (StatusCode::OK, "ok\n".to_string()),
        _ => (StatusCode::NOT_FOUND, "not found\n".to_string()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics and health endpoint listening");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&metrics, req.uri().path());
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_names_every_metric() {
        let m = Metrics::new().expect("metrics");
        m.reconciles.inc();
        m.errors.with_label_values(&["kube"]).inc();
        m.membership_ops.with_label_values(&["AddLearner", "applied"]).inc();
        m.duration.observe(0.2);
        let text = m.render();
        for name in [
            "raftkv_operator_reconciles_total 1",
            "raftkv_operator_reconcile_errors_total{kind=\"kube\"} 1",
            "raftkv_operator_membership_operations_total{action=\"AddLearner\",result=\"applied\"} 1",
            "raftkv_operator_reconcile_duration_seconds_count 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[tokio::test]
    async fn endpoint_serves_metrics_and_health() {
        let m = Arc::new(Metrics::new().expect("metrics"));
        m.reconciles.inc();
        // Bind an ephemeral loopback port first to learn a free one.
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let server = tokio::spawn(serve(addr, m));
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let body = loop {
            match client.get(format!("http://{addr}/metrics")).send().await {
                Ok(r) => break r.text().await.expect("body"),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "not up yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("metrics endpoint never came up: {e}"),
            }
        };
        assert!(body.contains("raftkv_operator_reconciles_total 1"), "{body}");
        let health = client.get(format!("http://{addr}/healthz")).send().await.expect("healthz");
        assert_eq!(health.status().as_u16(), 200);
        let missing = client.get(format!("http://{addr}/nope")).send().await.expect("404");
        assert_eq!(missing.status().as_u16(), 404);
        server.abort();
    }
}

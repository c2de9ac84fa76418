//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas
//! never act at once. Optimistic concurrency (resourceVersion on replace) decides races.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

/// Whether this replica may still act. Losing the lease stops the controller, but a
/// step already under way would finish; every mutating step checks the fence first, so
/// none starts once the lease may have passed to another replica. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Fence {
    /// `None`: not enforced (no leader election). Otherwise the instant until which the
    /// lease is surely ours, if any.
    until: Option<Arc<Mutex<Option<Instant>>>>,
}

/// The lease may no longer be held: act no more.
#[derive(Debug, thiserror::Error)]
#[error("the leader-election lease may have passed to another replica; not acting")]
pub struct LeaseLost;

impl Fence {
    /// A fence that always lets through (tests, a single replica without election).
    pub fn open() -> Self {
        Fence { until: None }
    }

    /// A fence that lets nothing through until [`Fence::extend_to`].
    pub fn closed() -> Self {
        Fence { until: Some(Arc::new(Mutex::new(None))) }
    }

    fn slot(&self) -> Option<std::sync::MutexGuard<'_, Option<Instant>>> {
        self.until.as_ref().map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The lease is ours until `until` (never moves the deadline back).
    pub fn extend_to(&self, until: Instant) {
        if let Some(mut slot) = self.slot() {
            if slot.is_none_or(|u| u < until) {
                *slot = Some(until);
            }
        }
    }

    /// The lease is lost: nothing passes from now on.
    pub fn revoke(&self) {
        if let Some(mut slot) = self.slot() {
            *slot = None;
        }
    }

    /// How long the lease is surely ours from now (zero once not); `None` when the fence
    /// is not enforced.
    pub fn remaining(&self) -> Option<Duration> {
        self.slot().map(|slot| slot.map_or(Duration::ZERO, |u| u.saturating_duration_since(Instant::now())))
    }

    /// Resolves when the fence closes (never when it is not enforced). Renewals that
    /// extend it while this waits are followed.
    pub async fn until_closed(&self) {
        loop {
            match self.remaining() {
                None => std::future::pending::<()>().await,
                Some(left) if left.is_zero() => return,
                Some(left) => tokio::time::sleep(left).await,
            }
        }
    }

    /// Ok while the lease is surely ours.
    pub fn check(&self) -> Result<(), LeaseLost> {
        match self.slot() {
            None => Ok(()),
            Some(slot) => match *slot {
                Some(until) if Instant::now() < until => Ok(()),
                _ => Err(LeaseLost),
            },
        }
    }
}

/// A Lease-based lock held by `identity`.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// Extended at every successful acquisition or renewal, revoked when the lease is lost.
    fence: Fence,
}

/// Is a lease with this spec free for `identity` at `now`.
pub fn lease_free_for(spec: &LeaseSpec, identity: &str, now: Timestamp) -> bool {
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() || holder == identity {
        return true;
    }
    let secs = i64::from(spec.lease_duration_seconds.unwrap_or(15));
    match &spec.renew_time {
        Some(MicroTime(t)) => now.duration_since(*t) > SignedDuration::from_secs(secs),
        None => true,
    }
}

impl LeaseLock {
    /// A lock on Lease `name` in `namespace`, keeping `fence` up to date.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration, fence: Fence) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
            fence,
        }
    }

    /// After a successful acquisition or renewal sent at `sent`: others cannot take the
    /// lease before `sent + duration` (by their clocks); a third of it is kept as margin
    /// for clock rate and for the step that checked the fence just before.
    fn held_since(&self, sent: Instant) {
        self.fence.extend_to(sent + self.duration - self.duration / 3);
    }

    fn spec(&self, transitions: i32, acquire: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(15)),
            acquire_time: Some(acquire.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Acquires or renews the lease once. Ok(true) when we hold it afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(0, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if !lease_free_for(&spec, &self.identity, Timestamp::now()) {
            return Ok(false);
        }
        let ours = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquire = if ours { spec.acquire_time.clone() } else { None };
        lease.spec = Some(self.spec(transitions, acquire));
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until the lease is ours, retrying every `retry`.
    pub async fn acquire(&self, retry: Duration) {
        loop {
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    self.held_since(sent);
                    tracing::info!(lease = %self.name, identity = %self.identity, "became leader");
                    return;
                }
                Ok(false) => tracing::debug!(lease = %self.name, "lease held by another replica"),
                Err(e) => tracing::warn!(error = %e, "lease acquisition failed"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every `period` and returns when the lease is lost or could not be renewed
    /// for a whole lease duration; the caller must then stop acting.
    pub async fn hold(&self, period: Duration) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            let sent = Instant::now();
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    last_ok = tokio::time::Instant::now();
                    self.held_since(sent);
                }
                Ok(false) => {
                    tracing::error!(lease = %self.name, "lease taken by another replica");
                    self.fence.revoke();
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Stop a safety margin before the lease could expire for others.
                    if last_ok.elapsed() + period >= self.duration {
                        tracing::error!(lease = %self.name, "lease could not be renewed in time");
                        self.fence.revoke();
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_secs_ago: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.to_string()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::{json, Value};

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases/raftkv-operator";
    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ops/leases";

    /// Answers each expected (method, path) in order with (status, body); returns the
    /// request bodies.
    async fn scripted(
        mut handle: tower_test::mock::Handle<Request<Body>, Response<Body>>,
        script: Vec<(&'static str, &'static str, u16, Value)>,
    ) -> Vec<Value> {
        let mut bodies = Vec::new();
        for (method, path, status, body) in script {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!((req.method().as_str(), req.uri().path()), (method, path));
            let bytes = req.into_body().collect_bytes().await.expect("body");
            bodies.push(if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).expect("json") });
            let resp = Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&body).expect("json")))
                .expect("response");
            send.send_response(resp);
        }
        bodies
    }

    fn lease_json(holder: &str, renewed_secs_ago: i64, transitions: i32) -> Value {
        let renew = Timestamp::now() - SignedDuration::from_secs(renewed_secs_ago);
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "raftkv-operator", "namespace": "ops", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                "renewTime": MicroTime(renew), "leaseTransitions": transitions}})
    }

    fn not_found() -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "nf"})
    }

    async fn attempt(script: Vec<(&'static str, &'static str, u16, Value)>) -> (Result<bool, kube::Error>, Vec<Value>) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let lock = LeaseLock::new(Client::new(svc, "ops"), "ops", "raftkv-operator", "me", Duration::from_secs(15), Fence::open());
        let server = tokio::spawn(scripted(handle, script));
        let res = lock.try_acquire_or_renew().await;
        (res, server.await.expect("server"))
    }

    #[tokio::test]
    async fn acquiring_opens_the_fence_and_losing_the_lease_closes_it() {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fence = Fence::closed();
        let lock = LeaseLock::new(Client::new(svc, "ops"), "ops", "raftkv-operator", "me", Duration::from_secs(15), fence.clone());
        let server = tokio::spawn(scripted(
            handle,
            vec![
                ("GET", LEASE, 404, not_found()),
                ("POST", LEASES, 201, lease_json("me", 0, 0)),
                // At the first renewal another replica holds it (a partition healed).
                ("GET", LEASE, 200, lease_json("other", 1, 1)),
            ],
        ));
        assert!(fence.check().is_err());
        lock.acquire(Duration::from_millis(10)).await;
        assert!(fence.check().is_ok(), "held: steps may run");
        lock.hold(Duration::from_millis(10)).await;
        assert!(fence.check().is_err(), "lost: no step may start");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn creates_a_missing_lease() {
        let (res, bodies) =
            attempt(vec![("GET", LEASE, 404, not_found()), ("POST", LEASES, 201, lease_json("me", 0, 0))]).await;
        assert!(res.expect("ok"));
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "me");
        assert_eq!(bodies[1]["spec"]["leaseDurationSeconds"], 15);
    }

    #[tokio::test]
    async fn leaves_a_live_lease_of_another_replica_alone() {
        let (res, bodies) = attempt(vec![("GET", LEASE, 200, lease_json("other", 1, 3))]).await;
        assert!(!res.expect("ok"));
        assert_eq!(bodies.len(), 1, "no write");
    }

    #[tokio::test]
    async fn takes_over_an_expired_lease_counting_the_transition() {
        let (res, bodies) =
            attempt(vec![("GET", LEASE, 200, lease_json("other", 60, 3)), ("PUT", LEASE, 200, lease_json("me", 0, 4))])
                .await;
        assert!(res.expect("ok"));
        assert_eq!(bodies[1]["spec"]["holderIdentity"], "me");
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 4);
        assert_eq!(bodies[1]["metadata"]["resourceVersion"], "7", "optimistic concurrency");
    }

    #[tokio::test]
    async fn a_lost_race_is_not_leadership() {
        let conflict = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "c"});
        let (res, _) =
            attempt(vec![("GET", LEASE, 200, lease_json("other", 60, 3)), ("PUT", LEASE, 409, conflict)]).await;
        assert!(!res.expect("ok"));
    }

    #[tokio::test]
    async fn renews_its_own_lease_keeping_the_acquire_time() {
        let mut own = lease_json("me", 5, 2);
        own["spec"]["acquireTime"] = json!("2026-01-01T00:00:00.000000Z");
        let (res, bodies) = attempt(vec![("GET", LEASE, 200, own), ("PUT", LEASE, 200, lease_json("me", 0, 2))]).await;
        assert!(res.expect("ok"));
        assert_eq!(bodies[1]["spec"]["leaseTransitions"], 2);
        assert_eq!(bodies[1]["spec"]["acquireTime"], "2026-01-01T00:00:00.000000Z");
    }

    #[test]
    fn lease_freedom() {
        let now = Timestamp::now();
        assert!(lease_free_for(&spec("", 0), "a", now));
        assert!(lease_free_for(&spec("a", 0), "a", now));
        assert!(!lease_free_for(&spec("b", 1), "a", now));
        assert!(lease_free_for(&spec("b", 60), "a", now));
        assert!(lease_free_for(&LeaseSpec { holder_identity: Some("b".into()), ..LeaseSpec::default() }, "a", now));
    }

    #[test]
    fn the_fence_lets_through_only_while_the_lease_is_surely_held() {
        assert!(Fence::open().check().is_ok());
        let f = Fence::closed();
        assert!(f.check().is_err(), "nothing passes before the lease is held");
        f.extend_to(Instant::now() + Duration::from_secs(60));
        assert!(f.check().is_ok());
        assert!(f.remaining().is_some_and(|d| d > Duration::from_secs(50)));
        assert_eq!(Fence::open().remaining(), None);
        let shared = f.clone();
        f.extend_to(Instant::now());
        assert!(shared.check().is_ok(), "a later renewal never moves the deadline back");
        shared.revoke();
        assert!(f.check().is_err(), "revoked for every clone");
        assert_eq!(f.remaining(), Some(Duration::ZERO));
        f.extend_to(Instant::now() - Duration::from_millis(1));
        assert!(f.check().is_err(), "a deadline in the past passes nothing");
    }

    #[tokio::test]
    async fn closed_follows_renewals_and_resolves_when_the_fence_closes() {
        // Wide margins: the renewal (at 50 ms) must land well before the first deadline
        // (1 s) even on a loaded machine.
        let f = Fence::closed();
        f.extend_to(Instant::now() + Duration::from_millis(1000));
        let renewer = {
            let f = f.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                f.extend_to(Instant::now() + Duration::from_millis(1500));
            })
        };
        let started = Instant::now();
        f.until_closed().await;
        assert!(started.elapsed() >= Duration::from_millis(1500), "followed the renewal: {:?}", started.elapsed());
        assert!(f.check().is_err());
        renewer.await.expect("renewer");
        assert!(tokio::time::timeout(Duration::from_millis(50), Fence::open().until_closed()).await.is_err(), "an open fence never closes");
    }
}

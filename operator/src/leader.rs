//! Leader election through a `coordination.k8s.io/v1` Lease, so two operator replicas
//! never act at once. Optimistic concurrency (resourceVersion on replace) decides races.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::Client;

/// A Lease-based lock held by `identity`.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
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
    /// A lock on Lease `name` in `namespace`.
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str, duration: Duration) -> Self {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
            duration,
        }
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
            match self.try_acquire_or_renew().await {
                Ok(true) => {
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
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "lease taken by another replica");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    // Stop a safety margin before the lease could expire for others.
                    if last_ok.elapsed() + period >= self.duration {
                        tracing::error!(lease = %self.name, "lease could not be renewed in time");
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

    #[test]
    fn lease_freedom() {
        let now = Timestamp::now();
        assert!(lease_free_for(&spec("", 0), "a", now));
        assert!(lease_free_for(&spec("a", 0), "a", now));
        assert!(!lease_free_for(&spec("b", 1), "a", now));
        assert!(lease_free_for(&spec("b", 60), "a", now));
        assert!(lease_free_for(&LeaseSpec { holder_identity: Some("b".into()), ..LeaseSpec::default() }, "a", now));
    }
}

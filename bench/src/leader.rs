//! Finding which endpoint is the leader, for `--endpoint-policy leader`.
//!
//! raftkv: `GET /v1/status` answers `"role":"leader"` on the leader. etcd:
//! `POST /v3/maintenance/status` answers `header.member_id == leader` on the leader.
//! raftexample exposes no leader, so the policy is refused for it.

use bytes::Bytes;
use http::Method;
use serde_json::Value;

use crate::client::{request_once, ClientError};
use crate::endpoint::Endpoint;
use crate::target::System;

/// Why the leader could not be found.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The system has no way to tell who leads.
    #[error("{0:?} does not expose its leader; use --endpoint-policy spread")]
    Unsupported(System),
    /// No endpoint claimed to be the leader.
    #[error("no endpoint reports itself as leader (errors: {0})")]
    NotFound(String),
    /// An answer could not be understood.
    #[error("unexpected status answer: {0}")]
    BadAnswer(String),
}

/// Whether a raftkv `/v1/status` body says this node leads.
pub fn raftkv_is_leader(body: &[u8]) -> Result<bool, LeaderError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| LeaderError::BadAnswer(e.to_string()))?;
    match v.get("role").and_then(Value::as_str) {
        Some(role) => Ok(role == "leader"),
        None => Err(LeaderError::BadAnswer("no \"role\" field".into())),
    }
}

/// Reads a uint64 that grpc-gateway may render as a JSON string or number.
fn as_u64(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// Whether an etcd `/v3/maintenance/status` body says this member leads.
pub fn etcd_is_leader(body: &[u8]) -> Result<bool, LeaderError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| LeaderError::BadAnswer(e.to_string()))?;
    let member = as_u64(v.get("header").and_then(|h| h.get("member_id")))
        .ok_or_else(|| LeaderError::BadAnswer("no header.member_id".into()))?;
    let leader =
        as_u64(v.get("leader")).ok_or_else(|| LeaderError::BadAnswer("no leader field".into()))?;
    Ok(leader != 0 && member == leader)
}

fn describe(e: &ClientError) -> String {
    e.to_string()
}

/// Returns the index in `endpoints` of the leader.
pub async fn find_leader(system: System, endpoints: &[Endpoint]) -> Result<usize, LeaderError> {
    let mut problems = Vec::new();
    for (i, ep) in endpoints.iter().enumerate() {
        let answer = match system {
            System::Raftexample => return Err(LeaderError::Unsupported(system)),
            System::Raftkv => request_once(ep, Method::GET, "/v1/status", Bytes::new(), None).await,
            System::Etcd => {
                request_once(
                    ep,
                    Method::POST,
                    "/v3/maintenance/status",
                    Bytes::from_static(b"{}"),
                    Some("application/json"),
                )
                .await
            }
        };
        let answer = match answer {
            Ok(a) if a.status == 200 => a,
            Ok(a) => {
                problems.push(format!("{ep}: status {}", a.status));
                continue;
            }
            Err(e) => {
                problems.push(format!("{ep}: {}", describe(&e)));
                continue;
            }
        };
        let leads = match system {
            System::Raftkv => raftkv_is_leader(&answer.body),
            _ => etcd_is_leader(&answer.body),
        };
        match leads {
            Ok(true) => return Ok(i),
            Ok(false) => {}
            Err(e) => problems.push(format!("{ep}: {e}")),
        }
    }
    Err(LeaderError::NotFound(if problems.is_empty() {
        "none".into()
    } else {
        problems.join("; ")
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raftkv_status() {
        let leader = br#"{"id":1,"leader":1,"term":3,"role":"leader","commit_index":9}"#;
        let follower = br#"{"id":2,"leader":1,"term":3,"role":"follower"}"#;
        assert!(raftkv_is_leader(leader).unwrap());
        assert!(!raftkv_is_leader(follower).unwrap());
        assert!(raftkv_is_leader(b"{}").is_err());
        assert!(raftkv_is_leader(b"not json").is_err());
    }

    #[test]
    fn etcd_status() {
        let leader = br#"{"header":{"cluster_id":"1","member_id":"10501334649042878790","revision":"1"},"version":"3.4.23","leader":"10501334649042878790"}"#;
        let follower = br#"{"header":{"member_id":"42"},"leader":"10501334649042878790"}"#;
        let no_leader = br#"{"header":{"member_id":"42"},"leader":"0"}"#;
        assert!(etcd_is_leader(leader).unwrap());
        assert!(!etcd_is_leader(follower).unwrap());
        assert!(!etcd_is_leader(no_leader).unwrap());
        assert!(etcd_is_leader(br#"{"header":{"member_id":7},"leader":7}"#).unwrap());
        assert!(etcd_is_leader(br#"{"leader":"7"}"#).is_err());
    }

    #[tokio::test]
    async fn raftexample_is_unsupported() {
        let eps = vec!["http://127.0.0.1:1".parse().unwrap()];
        assert!(matches!(
            find_leader(System::Raftexample, &eps).await,
            Err(LeaderError::Unsupported(_))
        ));
    }
}

//! What each system's requests look like and how its answers are classified.
//!
//! - raftkv: `PUT /v1/kv/<key>` with the raw value as body, `GET /v1/kv/<key>`
//!   (linearizable) and `GET /v1/kv/<key>?consistency=serializable`; or, with
//!   `--raftkv-route raftexample`, the raftexample-compatible `PUT /<key>` / `GET /<key>`
//!   (linearizable; no serializable variant).
//! - etcd: the v3 JSON gateway, `POST /v3/kv/put {"key":b64,"value":b64}` and
//!   `POST /v3/kv/range {"key":b64}` (plus `"serializable":true`).
//! - raftexample: `PUT /<key>` and `GET /<key>`. Its GET is always a local read and its PUT
//!   answers before the entry is committed; both read kinds map to the same request.

use base64::Engine as _;
use bytes::{BufMut, Bytes, BytesMut};
use http::Method;

/// The system under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum System {
    /// raftkv-node's client API.
    Raftkv,
    /// etcd's v3 JSON (grpc-gateway) API.
    Etcd,
    /// etcd's contrib/raftexample.
    Raftexample,
}

/// Which of raftkv's two route families to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RaftkvRoute {
    /// `/v1/kv/<key>` (the native API; supports serializable reads).
    V1,
    /// `/<key>` (raftexample-compatible; reads are linearizable).
    Raftexample,
}

/// One operation of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Write the run's value under a key.
    Put,
    /// Read a key; `serializable` asks for a local (possibly stale) read.
    Get {
        /// Whether a serializable (local) read is asked for.
        serializable: bool,
    },
}

impl Op {
    /// Short name used in reports (`put` or `get`).
    pub fn kind(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get { .. } => "get",
        }
    }
}

/// How an answer with a given status and body counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The operation succeeded.
    Ok,
    /// A read found no value (the key space was not loaded).
    NotFound,
    /// Any other status: an error of kind `http_<code>`.
    Status(u16),
}

/// Why a system/route/operation combination cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    /// raftkv's raftexample-compatible routes have no serializable read.
    #[error("raftkv's raftexample-compatible routes (/<key>) have no serializable read; use --raftkv-route v1")]
    NoSerializableOnRaftexampleRoute,
}

/// Checks that `system` (with `route`) can run operation `op`.
pub fn check_supported(system: System, route: RaftkvRoute, op: Op) -> Result<(), TargetError> {
    match (system, route, op) {
        (System::Raftkv, RaftkvRoute::Raftexample, Op::Get { serializable: true }) => {
            Err(TargetError::NoSerializableOnRaftexampleRoute)
        }
        _ => Ok(()),
    }
}

/// One encoded request: method, origin-form path and body. `path` borrows the encoder's
/// buffer; `body` is a cheap reference-counted handle.
#[derive(Debug)]
pub struct Encoded<'a> {
    /// HTTP method.
    pub method: Method,
    /// Origin-form request target, e.g. `/v1/kv/00000042`.
    pub path: &'a str,
    /// Request body (empty for reads on raftkv and raftexample).
    pub body: Bytes,
    /// Content type to send, if the system needs one.
    pub content_type: Option<&'static str>,
}

/// Turns (operation, key) into requests for one system, reusing its buffers so that the
/// steady state allocates nothing beyond what hyper itself needs.
#[derive(Debug)]
pub struct Encoder {
    system: System,
    route: RaftkvRoute,
    value: Bytes,
    value_b64: String,
    path: String,
    key_b64: String,
    body: BytesMut,
}

/// Standard base64 with padding, as etcd's gateway expects for `bytes` fields.
fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

impl Encoder {
    /// An encoder for `system` writing `value` on every PUT.
    pub fn new(system: System, route: RaftkvRoute, value: Bytes) -> Self {
        let value_b64 = if system == System::Etcd {
            b64().encode(&value)
        } else {
            String::new()
        };
        Encoder {
            system,
            route,
            value,
            value_b64,
            path: String::with_capacity(64),
            key_b64: String::with_capacity(64),
            body: BytesMut::new(),
        }
    }

    /// Encodes `op` on `key` (a URL-safe key as produced by [`crate::keys::KeySpace`]).
    pub fn encode(&mut self, op: Op, key: &str) -> Encoded<'_> {
        self.path.clear();
        let key_str = key;
        match self.system {
            System::Raftkv | System::Raftexample => {
                let v1 = self.system == System::Raftkv && self.route == RaftkvRoute::V1;
                self.path.push_str(if v1 { "/v1/kv/" } else { "/" });
                self.path.push_str(key_str);
                match op {
                    Op::Put => Encoded {
                        method: Method::PUT,
                        path: &self.path,
                        body: self.value.clone(),
                        content_type: None,
                    },
                    Op::Get { serializable } => {
                        if v1 && serializable {
                            self.path.push_str("?consistency=serializable");
                        }
                        Encoded {
                            method: Method::GET,
                            path: &self.path,
                            body: Bytes::new(),
                            content_type: None,
                        }
                    }
                }
            }
            System::Etcd => {
                self.key_b64.clear();
                b64().encode_string(key.as_bytes(), &mut self.key_b64);
                let body = &mut self.body;
                body.clear();
                body.put_slice(b"{\"key\":\"");
                body.put_slice(self.key_b64.as_bytes());
                match op {
                    Op::Put => {
                        self.path.push_str("/v3/kv/put");
                        body.put_slice(b"\",\"value\":\"");
                        body.put_slice(self.value_b64.as_bytes());
                        body.put_slice(b"\"}");
                    }
                    Op::Get { serializable } => {
                        self.path.push_str("/v3/kv/range");
                        body.put_slice(if serializable {
                            b"\",\"serializable\":true}".as_slice()
                        } else {
                            b"\"}".as_slice()
                        });
                    }
                }
                Encoded {
                    method: Method::POST,
                    path: &self.path,
                    body: body.split().freeze(),
                    content_type: Some("application/json"),
                }
            }
        }
    }
}

/// Classifies an answer of `system` to `op`.
pub fn classify(system: System, op: Op, status: u16, body: &[u8]) -> Outcome {
    match (system, op) {
        (_, Op::Put) if (200..300).contains(&status) => Outcome::Ok,
        (System::Etcd, Op::Get { .. }) if status == 200 => {
            // An empty range answers 200 without a "kvs" field.
            if contains(body, b"\"kvs\"") {
                Outcome::Ok
            } else {
                Outcome::NotFound
            }
        }
        (_, Op::Get { .. }) if status == 200 => Outcome::Ok,
        (System::Raftkv | System::Raftexample, Op::Get { .. }) if status == 404 => {
            Outcome::NotFound
        }
        _ => Outcome::Status(status),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body_str(e: &Encoded<'_>) -> String {
        String::from_utf8(e.body.to_vec()).unwrap()
    }

    #[test]
    fn etcd_put_and_range_are_base64_json() {
        let mut enc = Encoder::new(System::Etcd, RaftkvRoute::V1, Bytes::from_static(b"hello"));
        let e = enc.encode(Op::Put, "00000042");
        assert_eq!(e.method, Method::POST);
        assert_eq!(e.path, "/v3/kv/put");
        assert_eq!(e.content_type, Some("application/json"));
        let v: serde_json::Value = serde_json::from_str(&body_str(&e)).unwrap();
        assert_eq!(v["key"], "MDAwMDAwNDI=");
        assert_eq!(v["value"], "aGVsbG8=");
        assert_eq!(v.as_object().unwrap().len(), 2);

        let e = enc.encode(
            Op::Get {
                serializable: false,
            },
            "00000001",
        );
        assert_eq!(e.path, "/v3/kv/range");
        let v: serde_json::Value = serde_json::from_str(&body_str(&e)).unwrap();
        assert_eq!(v, serde_json::json!({"key": "MDAwMDAwMDE="}));

        let e = enc.encode(Op::Get { serializable: true }, "00000001");
        let v: serde_json::Value = serde_json::from_str(&body_str(&e)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"key": "MDAwMDAwMDE=", "serializable": true})
        );
    }

    #[test]
    fn etcd_encoding_matches_a_reference_base64_for_all_remainders() {
        // Keys of length 1..=6 cover every padding case of base64.
        let mut enc = Encoder::new(System::Etcd, RaftkvRoute::V1, Bytes::from_static(b"v"));
        for (key, want) in [
            ("1", "MQ=="),
            ("12", "MTI="),
            ("123", "MTIz"),
            ("1234", "MTIzNA=="),
            ("12345", "MTIzNDU="),
            ("123456", "MTIzNDU2"),
        ] {
            let e = enc.encode(
                Op::Get {
                    serializable: false,
                },
                key,
            );
            let v: serde_json::Value = serde_json::from_str(&body_str(&e)).unwrap();
            assert_eq!(v["key"], want, "key {key}");
        }
    }

    #[test]
    fn raftkv_v1_routes() {
        let value = Bytes::from_static(b"abc");
        let mut enc = Encoder::new(System::Raftkv, RaftkvRoute::V1, value.clone());
        let e = enc.encode(Op::Put, "0007");
        assert_eq!((e.method.clone(), e.path), (Method::PUT, "/v1/kv/0007"));
        assert_eq!(e.body, value);
        assert_eq!(e.content_type, None);
        let e = enc.encode(
            Op::Get {
                serializable: false,
            },
            "0007",
        );
        assert_eq!((e.method.clone(), e.path), (Method::GET, "/v1/kv/0007"));
        assert!(e.body.is_empty());
        let e = enc.encode(Op::Get { serializable: true }, "0007");
        assert_eq!(e.path, "/v1/kv/0007?consistency=serializable");
    }

    #[test]
    fn raftexample_style_routes() {
        let value = Bytes::from_static(b"abc");
        for system in [System::Raftexample, System::Raftkv] {
            let mut enc = Encoder::new(system, RaftkvRoute::Raftexample, value.clone());
            let e = enc.encode(Op::Put, "0007");
            assert_eq!((e.method.clone(), e.path), (Method::PUT, "/0007"));
            assert_eq!(e.body, value);
            let e = enc.encode(
                Op::Get {
                    serializable: false,
                },
                "0007",
            );
            assert_eq!((e.method.clone(), e.path), (Method::GET, "/0007"));
        }
        // raftexample has only one kind of read.
        let mut enc = Encoder::new(System::Raftexample, RaftkvRoute::V1, value);
        let e = enc.encode(Op::Get { serializable: true }, "0007");
        assert_eq!(e.path, "/0007");
    }

    #[test]
    fn serializable_reads_need_the_v1_route_on_raftkv() {
        let ser = Op::Get { serializable: true };
        assert_eq!(
            check_supported(System::Raftkv, RaftkvRoute::Raftexample, ser),
            Err(TargetError::NoSerializableOnRaftexampleRoute)
        );
        assert!(check_supported(System::Raftkv, RaftkvRoute::V1, ser).is_ok());
        assert!(check_supported(System::Raftexample, RaftkvRoute::Raftexample, ser).is_ok());
        assert!(check_supported(System::Raftkv, RaftkvRoute::Raftexample, Op::Put).is_ok());
    }

    #[test]
    fn classification() {
        let get = Op::Get {
            serializable: false,
        };
        assert_eq!(classify(System::Raftkv, Op::Put, 204, b""), Outcome::Ok);
        assert_eq!(classify(System::Raftkv, Op::Put, 200, b"{}"), Outcome::Ok);
        assert_eq!(
            classify(System::Raftkv, Op::Put, 503, b""),
            Outcome::Status(503)
        );
        assert_eq!(classify(System::Raftkv, get, 200, b"x"), Outcome::Ok);
        assert_eq!(classify(System::Raftkv, get, 404, b""), Outcome::NotFound);
        assert_eq!(
            classify(System::Raftexample, get, 404, b""),
            Outcome::NotFound
        );
        assert_eq!(
            classify(System::Raftexample, get, 500, b""),
            Outcome::Status(500)
        );
        let found = br#"{"header":{"revision":"5"},"kvs":[{"key":"YQ=="}],"count":"1"}"#;
        let empty = br#"{"header":{"revision":"5"}}"#;
        assert_eq!(classify(System::Etcd, get, 200, found), Outcome::Ok);
        assert_eq!(classify(System::Etcd, get, 200, empty), Outcome::NotFound);
        assert_eq!(classify(System::Etcd, get, 404, b""), Outcome::Status(404));
        assert_eq!(
            classify(System::Etcd, Op::Put, 400, b""),
            Outcome::Status(400)
        );
    }
}

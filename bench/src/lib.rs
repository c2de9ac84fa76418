//! raftkv-bench: a load generator that drives raftkv, etcd (through its v3 JSON gateway)
//! and etcd's contrib/raftexample through the same HTTP/1.1 client, so their throughput,
//! latency and resource use can be compared side by side on one machine.
//!
//! The pieces, one concern each:
//! - [`cli`]: command-line flags and their validation (loopback-only endpoints).
//! - [`endpoint`]: parsing and checking `http://127.x.x.x:port` endpoints.
//! - [`keys`]: fixed-size key generation and the value payload.
//! - [`target`]: how each system encodes a PUT or GET and how its answers are classified.
//! - [`client`]: one keep-alive hyper connection per worker.
//! - [`leader`]: finding the leader's endpoint when every connection should go to it.
//! - [`stats`]: latency histograms and error counters, and their summaries.
//! - [`procfs`]: peak RSS and CPU time of the measured processes from `/proc`.
//! - [`runner`]: the closed-loop and open-loop (fixed-rate) drivers.
//! - [`report`]: the plain-text and JSON reports.

pub mod cli;
pub mod client;
pub mod endpoint;
pub mod keys;
pub mod leader;
pub mod procfs;
pub mod report;
pub mod runner;
pub mod stats;
pub mod target;

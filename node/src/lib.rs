//! raftkv-node: a replicated key-value store node — etcd's raftexample done right, on
//! tikv's raft-rs.
//!
//! # Layout
//!
//! A node is a handful of tasks around one thread that owns raft:
//!
//! * [`config`] — flags and `RAFTKV_*` environment variables, validated into a `Config`
//!   (raftexample's `--id --cluster --port --join` work unchanged).
//! * [`raft_loop`] — the only owner of raft-rs's `RawNode`: ticks, steps peer messages
//!   (vetted against its state first), proposes, handles each `Ready` (send, apply,
//!   append) and wakes waiters; a persist thread does the WAL fsyncs and a snapshot
//!   thread writes snapshots beside it.
//! * [`storage`] — the write-ahead log and snapshot files on the data directory; it is
//!   also raft-rs's `Storage`.
//! * [`kv`] — the key-value state machine, decoupled from raft; its image (whole, or the
//!   changes since the last one) is the snapshot.
//! * [`transport`] — raft messages between peers over HTTP (hyper), batched per peer.
//! * [`api`] — the client HTTP API: raftexample's routes, `/v1`, probes, `/metrics`.
//! * [`watch`] — the recent changes to keys, and the streams of `GET /v1/watch` that
//!   follow them.
//! * [`backup`] — the backup file: the state machine taken whole from a member
//!   (`GET /v1/backup`) and the seed of a new cluster (`--restore-from`).
//! * [`backup_client`] — `raftkv-node backup`: fetches a backup from the first member
//!   that delivers a whole one, into a folder of timestamped files pruned to `--keep`.
//! * [`metrics`] — Prometheus metrics in etcd's naming style.
//! * [`shutdown`] — one signal for SIGTERM, removal and fatal errors.
//! * [`http`] — the accept loop (plaintext or TLS) and response helpers both listeners share.
//! * [`tls`] — certificates and keys for the listeners and the peer client (mutual TLS).
//! * [`auth`] — the admin bearer token of the membership and leadership routes.
//! * [`logger`] — raft-rs's slog output routed into `tracing`.
//!
//! [`run`] wires them together: bind both listeners, open storage and start the raft
//! loop, serve until shutdown, hand leadership over, flush, return.

pub mod api;
pub mod auth;
pub mod backup;
pub mod backup_client;
pub mod config;
pub mod http;
pub mod kv;
pub mod logger;
pub mod metrics;
pub mod raft_loop;
pub mod shutdown;
pub mod storage;
pub mod tls;
pub mod transport;
pub mod watch;

use std::sync::Arc;

use tokio::net::TcpListener;
use tracing::info;

use crate::config::Config;
use crate::raft_loop::Request;
use crate::shutdown::{Reason, Shutdown};
use crate::transport::Transport;

/// Why [`run`] could not start the node.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// Storage or raft refused to start.
    #[error(transparent)]
    Start(#[from] raft_loop::StartError),
}

/// Runs a node until `shutdown` fires (or the node is removed or fails). Returns why it stopped.
pub async fn run(cfg: Config, shutdown: Shutdown) -> Result<Reason, RunError> {
    let peer_listener = TcpListener::bind(cfg.listen_peer_addr)
        .await
        .map_err(|source| RunError::Bind { addr: cfg.listen_peer_addr, source })?;
    let client_listener = TcpListener::bind(cfg.listen_client_addr)
        .await
        .map_err(|source| RunError::Bind { addr: cfg.listen_client_addr, source })?;
    let (tx, rx) = std::sync::mpsc::channel();
    let transport = Transport::new(cfg.id, cfg.peer_url.clone(), cfg.peer_tls.as_ref(), tx.clone(), tokio::runtime::Handle::current());
    let started = {
        let (c, transport, shutdown, tx) = (cfg.clone(), transport.clone(), shutdown.clone(), tx.clone());
        tokio::task::spawn_blocking(move || raft_loop::start(c, transport, shutdown, tx, rx))
            .await
            .map_err(|e| raft_loop::StartError::Storage(storage::StorageError::Io {
                path: cfg.data_dir.clone(),
                source: std::io::Error::other(e.to_string()),
            }))??
    };
    info!(
        id = cfg.id,
        peer = %cfg.listen_peer_addr,
        client = %cfg.listen_client_addr,
        data_dir = %cfg.data_dir.display(),
        "raftkv node serving"
    );

    // The peer listener outlives the client listener: a stopping leader still needs its
    // followers' answers to hand leadership over.
    let peer_stop = Shutdown::new();
    let peer_server = {
        let listener = transport::PeerListener {
            my_id: cfg.id,
            raft: tx.clone(),
            transport: transport.clone(),
            kv: started.kv.clone(),
            status: started.status.clone(),
            stop: peer_stop.clone(),
        };
        tokio::spawn(http::serve_tls(peer_listener, cfg.peer_tls.as_ref().map(|t| t.server.clone()), peer_stop.clone(), move |req| {
            listener.clone().handle(req)
        }))
    };
    let api = api::Api {
        cfg: Arc::new(cfg.clone()),
        raft: started.handle.clone(),
        status: started.status.clone(),
        kv: started.kv.clone(),
        watch: started.watch.clone(),
        transport: Some(transport.clone()),
    };
    let client_server = tokio::spawn(http::serve_tls(client_listener, cfg.client_tls.clone(), shutdown.clone(), move |req| api.clone().handle(req)));

    shutdown.wait().await;
    let reason = shutdown.reason();
    info!(?reason, "stopping");
    // Watch streams never finish by themselves: end them rather than wait them out.
    started.watch.close();
    let _ = tx.send(Request::Stop);
    let thread = started.thread;
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    peer_stop.trigger(Reason::Signal);
    let _ = client_server.await;
    let _ = peer_server.await;
    info!("stopped");
    Ok(reason)
}

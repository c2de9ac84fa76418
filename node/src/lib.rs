//! raftkv-node: a replicated key-value store node.
pub mod storage;

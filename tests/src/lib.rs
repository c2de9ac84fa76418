//! Test support for raftkv: start real `raftkv-node` clusters on 127.0.0.1.

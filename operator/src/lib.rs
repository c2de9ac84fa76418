//! raftkv-operator: a Kubernetes controller for `RaftKV` resources.
//!
//! The membership logic is a pure function ([`membership::decide`]) of observed state;
//! [`orchestrate`] gathers that state and executes the chosen step through two traits (the
//! node API and the platform), which the controller implements against Kubernetes and the
//! tests implement against fakes or local processes.

pub mod controller;
pub mod crd;
pub mod leader;
pub mod membership;
pub mod metrics;
pub mod node_client;
pub mod orchestrate;
pub mod resources;

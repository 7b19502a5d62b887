//! brokerd, the credential broker daemon. Its modules are private: brokerd's binary reaches
//! only [`config`] and [`daemon`], and nothing else links this crate (brokerctl speaks the
//! control protocol; shared pure logic lives in `agent-broker-core`).
//!
//! A request's path, in module order: `capture` (the kernel path, the only user of aya)
//! redirects an agent's connection and tells who made it; `proxy` accepts it, terminates TLS
//! and HTTP, and asks `broker` (the policy decision, handle swaps, credential injection,
//! limits) about each request; `proxy` forwards it over verified TLS and streams back the
//! scrubbed response; `audit` records it. Beside the path: `dns` answers agents' queries,
//! `vault` keeps secrets (`audit` and `vault` are redb files whose lock, creation, check and
//! open `store` writes once), `policy_store` keeps the live policy, `control` serves the
//! operator's socket, `metrics` counts what they all do (Prometheus), `harden` hardens
//! brokerd itself. [`config`] layers flags over a file over defaults; [`daemon`] wires them
//! together.
//!
//! Never: let a tagged cgroup's connection through unrecorded, send a secret anywhere but the
//! hosts its rule binds it to over verified TLS, show a secret value to an agent or in any log or
//! reply, or answer control requests from inside a tagged cgroup.

mod agent_api;
mod approvals;
mod audit;
mod broker;
mod capture;
pub mod config;
mod control;
mod credentials;
pub mod daemon;
mod dns;
mod harden;
mod metrics;
mod pods;
mod policy_store;
mod proxy;
mod sandbox;
mod shares;
mod store;
mod vault;
mod workloads;

/// The audit log, for the audit-cost microbenchmark (`daemon/benches/audit.rs`) only.
#[cfg(feature = "bench")]
pub use audit::AuditLog;

/// Narrow entry points into the private modules, for the fuzz targets (`fuzz/targets`) only.
#[cfg(feature = "fuzzing")]
pub mod fuzzing;

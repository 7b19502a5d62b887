//! agent-broker's pure logic, shared by brokerd, brokerctl and the console.
//!
//! [`policy`] decides what each agent cgroup may call and what is written into its requests;
//! [`inject`] renders the credential templates a rule names; [`handle`] mints and recognizes the
//! tokens an agent may hold in place of a key (`brk_...`, or shaped like the key); [`secret`] holds secret names and values;
//! [`sigv4`] verifies AWS SigV4 signatures made with a placeholder key and signs requests again
//! with the real one;
//! [`cgroup`] names and finds cgroups; [`agent_name`] maps a tagged cgroup to the stable name its
//! policies are written for. [`fmt`], [`fs`], [`percent`] and [`time`] hold the few
//! helpers every side needs, written once.
//!
//! This crate never links the eBPF loader, TLS, storage or an async runtime, so it builds and
//! tests on stable Rust with no root. Never: log or display a secret value, or decide "allow"
//! when in doubt.

pub mod agent_name;
pub mod cgroup;
pub mod credential;
pub mod fmt;
pub mod fs;
pub mod handle;
pub mod inject;
pub mod net;
pub mod percent;
pub mod policy;
pub mod secret;
pub mod sigv4;
pub mod time;

#[cfg(test)]
mod test_rng;

//! agent-broker's daemon library: everything `brokerd` and `brokerctl` are made of.
//!
//! Module map (see ARCHITECTURE.md): [`capture`] is the kernel path and the only user of aya;
//! [`cgroup`] names and inspects cgroups; [`relay`] accepts redirected connections; [`control`]
//! serves the Unix control socket and [`client`] speaks to it; [`config`] layers flags over a
//! file over defaults; [`daemon`] wires them together.
//!
//! Never: let a tagged cgroup's connection through unrecorded, relay to a non-loopback
//! destination, or answer control requests from inside a tagged cgroup.

pub mod capture;
pub mod cgroup;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod relay;
pub mod tls;
pub mod upstream;

/// An error and its sources, `outer: inner: innermost`, for messages that cross a process
/// boundary (control replies) where `{:#}` formatting of anyhow is not available.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

//! `brokerctl metrics`: brokerd's metrics once, in the OpenMetrics text a Prometheus scrape of
//! `brokerd --metrics-addr` gets, read through the control socket (no listener needed).

use std::path::Path;

use agent_broker_protocol::{Request, Response};

use crate::control::{call, unexpected};

/// Print brokerd's metrics now (OpenMetrics text): requests, denials and latency per agent,
/// connections, TLS handshakes, DNS answers, the eBPF programs' counters.
///
/// The same text brokerd serves at `GET /metrics` when started with `--metrics-addr`; filter
/// it with grep, e.g. `brokerctl metrics | grep '^agent_broker_requests_total'`.
#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(run_dir: &Path, _args: Args) -> anyhow::Result<()> {
    match call(run_dir, &Request::Metrics)? {
        Response::Metrics { text } => {
            out!("{text}");
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

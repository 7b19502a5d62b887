//! Accepts redirected connections, resolves each to its origin, and hands it to the proxy.
//!
//! A connection whose origin cannot be resolved (no redirect record: a process dialing the
//! broker port directly, or a record evicted under a flood; or a record made by another socket
//! than the one at the far end of the connection: a process that took over an agent socket's
//! address) is refused, logged and audited (a denial naming no agent, with the reason), so
//! brokerd is never a credential oracle for processes outside the tagged cgroups. A resolved
//! connection is admitted within its agent's shares ([`crate::shares`]) or closed, before
//! anything costlier than the redirect record and the far end's identity is looked up: a
//! connection storm past the agent's share costs brokerd no /proc lookup.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_broker_core::time::now_unix_ms;
use agent_broker_protocol::{
    AuditEvent, ConnectionRecord, Decision, EventKind, OriginRecord, Outcome, Side,
};
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    capture::{
        ConnectionOrigin, OriginResolver,
        netns::{self, NetnsCtx},
    },
    proxy::Proxy,
};

/// How many recent connections `brokerctl connections` can show.
const RECENT_CAPACITY: usize = 1024;

/// A bounded history of accepted connections, newest last.
#[derive(Default)]
pub struct RecentConnections {
    records: Mutex<VecDeque<ConnectionRecord>>,
}

impl RecentConnections {
    fn push(&self, record: ConnectionRecord) {
        if let Ok(mut r) = self.records.lock() {
            if r.len() == RECENT_CAPACITY {
                r.pop_front();
            }
            r.push_back(record);
        }
    }

    /// The newest `limit` records, oldest first.
    pub fn latest(&self, limit: usize) -> Vec<ConnectionRecord> {
        self.records
            .lock()
            .map(|r| {
                r.iter()
                    .skip(r.len().saturating_sub(limit))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Whether an agent dialed brokerd's own listener (which would make brokerd connect to itself).
pub fn is_broker_itself(original_dst: SocketAddr, listeners: &[SocketAddr]) -> bool {
    listeners.iter().any(|l| {
        l.port() == original_dst.port()
            && (l.ip() == original_dst.ip() || original_dst.ip().is_unspecified())
    })
}

/// What every accept loop shares.
pub struct Shared {
    pub proxy: Arc<Proxy>,
    pub resolver: Arc<OriginResolver>,
    pub recent: Arc<RecentConnections>,
    /// brokerd's own listen addresses.
    pub listeners: Arc<Vec<SocketAddr>>,
    /// Answers DNS over TCP (connections to port 53).
    pub dns: Arc<crate::dns::DnsServer>,
}

/// An accepted connection on its way to a proxy thread, with the network namespace whose
/// listener accepted it.
pub type Accepted = (std::net::TcpStream, SocketAddr, Arc<NetnsCtx>);

/// Hands accepted connections to the proxy threads in turn. A connection and everything it
/// causes (its requests, its upstream connections) then stay on that thread's single-threaded
/// runtime: requests never hop between cores, and the threads share the load evenly.
pub struct Dispatch {
    workers: Vec<mpsc::UnboundedSender<Accepted>>,
    next: AtomicUsize,
}

impl Dispatch {
    /// A dispatcher over `n` proxy threads, and the receiving end for each.
    pub fn new(n: usize) -> (Self, Vec<mpsc::UnboundedReceiver<Accepted>>) {
        let (workers, receivers) = (0..n.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Self {
                workers,
                next: AtomicUsize::new(0),
            },
            receivers,
        )
    }

    fn send(&self, accepted: Accepted) {
        let n = self.workers.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let mut accepted = accepted;
        // A stopped thread (it only stops at shutdown) passes its turn to the next.
        for i in 0..n {
            match self.workers[(first + i) % n].send(accepted) {
                Ok(()) => return,
                Err(mpsc::error::SendError(back)) => accepted = back,
            }
        }
    }
}

/// Accepts on `listener`, a listener in the network namespace `ns`, until `cancel` fires and
/// hands each connection to a proxy thread.
pub async fn serve(
    listener: TcpListener,
    dispatch: Arc<Dispatch>,
    ns: Arc<NetnsCtx>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        match stream.into_std() {
            Ok(stream) => dispatch.send((stream, peer, ns.clone())),
            Err(e) => {
                warn!(%peer, error = %e, "cannot hand an accepted connection to a proxy thread")
            }
        }
    }
}

/// A proxy thread's loop: serves each connection handed to it on a task of its own runtime,
/// until the dispatcher is gone.
pub async fn run_worker(mut rx: mpsc::UnboundedReceiver<Accepted>, shared: Arc<Shared>) {
    while let Some((stream, peer, ns)) = rx.recv().await {
        super::spin::kick();
        let stream = match TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                warn!(%peer, error = %e, "proxy thread cannot take an accepted connection");
                continue;
            }
        };
        let shared = shared.clone();
        let open = crate::metrics::global().connection_opened();
        tokio::spawn(async move {
            serve_connection(stream, peer, &ns, &shared).await;
            drop(open);
        });
    }
}

async fn serve_connection(agent: TcpStream, peer: SocketAddr, ns: &NetnsCtx, shared: &Shared) {
    let (resolver, recent, listeners) = (&shared.resolver, &shared.recent, &shared.listeners);
    let time_ms = now_unix_ms();
    let resolved = match (ns.sandbox_agent(), agent.local_addr()) {
        // An unprivileged sandbox's: the agent is the sandbox's, the destination the one its
        // namespace's redirect rule recorded.
        (Some(sandbox), _) => sandbox.origin_of(&agent),
        (None, Ok(local)) => resolver.resolve(ns, peer, local),
        (None, Err(e)) => Err(crate::capture::ResolveError::Diag {
            peer,
            message: format!("the accepted socket has no local address: {e}"),
        }),
    };
    let origin = match resolved {
        Ok(o) => o,
        Err(e) => {
            let reason = e.to_string();
            // A flood of them is audited as its first and a count a second, and logged as
            // its first.
            let first = shared
                .proxy
                .shares
                .refusals()
                .refused_unresolved(unresolved_event(time_ms, &reason));
            if first {
                warn!(%peer, %reason, outcome = "refused", "connection with unresolved origin refused (more within a second are audited as a count)");
            } else {
                tracing::debug!(%peer, %reason, "connection with unresolved origin refused");
            }
            recent.push(ConnectionRecord {
                time_ms,
                peer,
                origin: None,
                outcome: Outcome::Refused { reason },
            });
            return; // dropping `agent` closes it
        }
    };
    let own_listeners = ns
        .sandbox_agent()
        .map_or(&listeners[..], |s| &s.listeners[..]);
    if is_broker_itself(origin.original_dst, own_listeners) {
        let reason = "the agent dialed brokerd's own listener";
        log_connection(&origin, ns, peer, "refused", Some(reason));
        recent.push(record(
            time_ms,
            peer,
            &origin,
            Outcome::Refused {
                reason: reason.into(),
            },
        ));
        return;
    }
    if ns.is_workload()
        && netns::loopback_in_workload(origin.original_dst)
        && origin.original_dst.port() != agent_broker_common::DNS_PORT
    {
        // From a workload's namespace, loopback is its own: brokerd would dial its own
        // (the host's) instead, another service. Refused, and audited. DNS over TCP to a
        // loopback resolver (127.0.0.53 in many resolv.conf files) is answered by brokerd
        // itself below, never dialled, so it is not refused.
        let origin = origin.with_exe();
        let reason = netns::LOOPBACK_REFUSED;
        log_connection(&origin, ns, peer, "refused", Some(reason));
        shared.proxy.events.record(AuditEvent {
            time_ms,
            kind: Some(EventKind::Denial),
            decision: Some(Decision::Deny),
            cgroup: Some(origin.cgroup.to_string()),
            pid: Some(origin.pid),
            comm: Some(origin.comm.clone()),
            exe: origin.exe.clone(),
            original_dst: Some(origin.original_dst),
            reason: Some(format!("{reason} (network namespace {})", ns.cookie)),
            side: Some(Side::Agent),
            ..AuditEvent::default()
        });
        recent.push(record(
            time_ms,
            peer,
            &origin,
            Outcome::Refused {
                reason: reason.into(),
            },
        ));
        return;
    }
    // The agent's share of connections (audited, in aggregate, when refused), before any
    // lookup the record does not answer: the /proc one below is for admitted connections only.
    let admitted = match shared.proxy.shares.admit(&origin) {
        Ok(held) => held,
        Err(refused) => {
            // Not logged one by one: a flood would flood the log (the audit sums it up).
            tracing::debug!(cgroup = %origin.cgroup, %peer, reason = %refused.reason, "connection refused");
            recent.push(record(
                time_ms,
                peer,
                &origin,
                Outcome::Refused {
                    reason: refused.reason,
                },
            ));
            return;
        }
    };
    let origin = origin.with_exe();
    log_connection(&origin, ns, peer, "brokered", None);
    recent.push(record(time_ms, peer, &origin, Outcome::Brokered));
    if origin.original_dst.port() == agent_broker_common::DNS_PORT {
        // DNS over TCP: answered by brokerd like the UDP queries, never passed on.
        shared.dns.serve_tcp(agent, origin).await;
        drop(admitted);
        return;
    }
    shared.proxy.clone().serve(agent, origin, admitted).await;
}

/// The audit record of a connection refused because nothing shows it came from an agent: a
/// denial of the connecting side that names no agent (none is proven), with why.
fn unresolved_event(time_ms: u64, reason: &str) -> AuditEvent {
    AuditEvent {
        time_ms,
        kind: Some(EventKind::Denial),
        decision: Some(Decision::Deny),
        reason: Some(format!("connection refused: {reason}")),
        side: Some(Side::Agent),
        ..AuditEvent::default()
    }
}

fn log_connection(
    origin: &ConnectionOrigin,
    ns: &NetnsCtx,
    peer: SocketAddr,
    outcome: &str,
    reason: Option<&str>,
) {
    info!(
        cgroup = %origin.cgroup,
        netns = ns.cookie,
        pid = origin.pid,
        tid = origin.tid,
        comm = %origin.comm,
        original_dst = %origin.original_dst,
        %peer,
        outcome,
        reason = reason.unwrap_or(""),
        "connection"
    );
}

fn record(
    time_ms: u64,
    peer: SocketAddr,
    origin: &ConnectionOrigin,
    outcome: Outcome,
) -> ConnectionRecord {
    ConnectionRecord {
        time_ms,
        peer,
        origin: Some(OriginRecord {
            cgroup: origin.cgroup.to_string(),
            cgroup_id: origin.cgroup_id.0,
            pid: origin.pid,
            tid: origin.tid,
            comm: origin.comm.clone(),
            original_dst: origin.original_dst,
        }),
        outcome,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn recognises_the_broker_itself() {
        let l = [a("127.0.0.1:15001"), a("[::1]:15001")];
        for dst in ["127.0.0.1:15001", "[::1]:15001", "0.0.0.0:15001"] {
            assert!(is_broker_itself(a(dst), &l), "{dst}");
        }
        for dst in ["127.0.0.1:8080", "127.0.0.2:15001", "10.0.0.1:443"] {
            assert!(!is_broker_itself(a(dst), &l), "{dst}");
        }
    }

    #[test]
    fn recent_is_bounded_and_ordered() {
        let r = RecentConnections::default();
        for i in 0..(RECENT_CAPACITY + 10) {
            r.push(ConnectionRecord {
                time_ms: i as u64,
                peer: a("127.0.0.1:1"),
                origin: None,
                outcome: Outcome::Brokered,
            });
        }
        let latest = r.latest(3);
        assert_eq!(
            latest.iter().map(|c| c.time_ms).collect::<Vec<_>>(),
            [1031, 1032, 1033]
        );
        assert_eq!(r.latest(usize::MAX).len(), RECENT_CAPACITY);
    }
}

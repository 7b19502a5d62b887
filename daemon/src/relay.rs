//! Accepts redirected connections and, until TLS interception lands, relays each one byte for
//! byte to its original destination when (and only when) that destination is a loopback
//! address, so nothing leaves the machine.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_broker_protocol::{ConnectionRecord, OriginRecord, Outcome};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::capture::{ConnectionOrigin, OriginResolver};

/// How many recent connections `brokerctl connections` can show.
const RECENT_CAPACITY: usize = 1024;
/// Deadline for connecting to the original destination.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What to do with a resolved connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Relay,
    Refuse(&'static str),
}

/// Decides whether a resolved connection may be relayed. `listeners` are brokerd's own
/// addresses: an agent that dials the broker directly must not make it connect to itself.
pub fn decide(original_dst: SocketAddr, listeners: &[SocketAddr]) -> Decision {
    if listeners.iter().any(|l| {
        l.port() == original_dst.port()
            && (l.ip() == original_dst.ip() || original_dst.ip().is_unspecified())
    }) {
        Decision::Refuse("the agent dialed brokerd's own listener")
    } else if !original_dst.ip().is_loopback() {
        Decision::Refuse(
            "non-loopback destinations are not relayed (TLS interception is not enabled)",
        )
    } else {
        Decision::Relay
    }
}

/// Accepts on `listener` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<OriginResolver>,
    recent: Arc<RecentConnections>,
    listeners: Arc<Vec<SocketAddr>>,
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
        let resolver = resolver.clone();
        let recent = recent.clone();
        let listeners = listeners.clone();
        tokio::spawn(async move {
            handle(stream, peer, &resolver, &recent, &listeners).await;
        });
    }
}

async fn handle(
    agent: TcpStream,
    peer: SocketAddr,
    resolver: &OriginResolver,
    recent: &RecentConnections,
    listeners: &[SocketAddr],
) {
    let time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let origin = match resolver.resolve(peer) {
        Ok(o) => o,
        Err(e) => {
            warn!(%peer, reason = %e, outcome = "refused", "connection with unresolved origin refused");
            recent.push(ConnectionRecord {
                time_ms,
                peer,
                origin: None,
                outcome: Outcome::Refused {
                    reason: e.to_string(),
                },
            });
            return; // dropping `agent` closes it
        }
    };
    let outcome = match decide(origin.original_dst, listeners) {
        Decision::Refuse(reason) => Outcome::Refused {
            reason: reason.into(),
        },
        Decision::Relay => match connect(origin.original_dst).await {
            Ok(upstream) => {
                log_connection(&origin, peer, "relayed", None);
                recent.push(record(time_ms, peer, &origin, Outcome::Relayed));
                relay(agent, upstream).await;
                return;
            }
            Err(e) => Outcome::Refused {
                reason: format!("cannot connect to the original destination: {e}"),
            },
        },
    };
    if let Outcome::Refused { reason } = &outcome {
        log_connection(&origin, peer, "refused", Some(reason));
    }
    recent.push(record(time_ms, peer, &origin, outcome));
}

fn log_connection(
    origin: &ConnectionOrigin,
    peer: SocketAddr,
    outcome: &str,
    reason: Option<&str>,
) {
    info!(
        cgroup = %origin.cgroup,
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

async fn connect(dst: SocketAddr) -> std::io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}

async fn relay(mut agent: TcpStream, mut upstream: TcpStream) {
    let _ = agent.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Either side closing or failing ends the relay; errors here are ordinary disconnects.
    let _ = tokio::io::copy_bidirectional(&mut agent, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn relays_only_loopback_destinations() {
        let l = [a("127.0.0.1:15001"), a("[::1]:15001")];
        assert_eq!(decide(a("127.0.0.1:8080"), &l), Decision::Relay);
        assert_eq!(decide(a("127.0.0.2:443"), &l), Decision::Relay);
        assert_eq!(decide(a("[::1]:8080"), &l), Decision::Relay);
        assert!(matches!(decide(a("10.0.0.1:80"), &l), Decision::Refuse(_)));
        assert!(matches!(
            decide(a("[2001:db8::1]:443"), &l),
            Decision::Refuse(_)
        ));
        assert!(matches!(decide(a("0.0.0.0:8080"), &l), Decision::Refuse(_)));
    }

    #[test]
    fn refuses_the_broker_itself() {
        let l = [a("127.0.0.1:15001"), a("[::1]:15001")];
        for dst in ["127.0.0.1:15001", "[::1]:15001", "0.0.0.0:15001"] {
            assert_eq!(
                decide(a(dst), &l),
                Decision::Refuse("the agent dialed brokerd's own listener"),
                "{dst}"
            );
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
                outcome: Outcome::Relayed,
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

//! Byte splicing: a connection a tcp rule passes through unread (an upgraded WebSocket
//! connection is relayed by [`super::tunnel`]).

use std::time::Instant;

use agent_broker_protocol::{AuditEvent, Decision, EventKind, Side};
use tokio::net::TcpStream;
use tracing::{info, warn};

use super::{HANDSHAKE_TIMEOUT, Proxy, record::connection_event};
use crate::capture::ConnectionOrigin;

impl Proxy {
    /// Splices a connection a tcp rule allows to its original destination, unread.
    pub(super) async fn splice(
        &self,
        mut agent: TcpStream,
        origin: ConnectionOrigin,
        sni: Option<String>,
        rule: String,
        on_done: Option<Box<dyn FnOnce(u64) + Send>>,
    ) {
        let started = Instant::now();
        let mut event = connection_event(&origin, sni.as_deref());
        event.kind = Some(EventKind::Request);
        event.rule = Some(rule);
        let connected =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(origin.original_dst)).await;
        let mut upstream = match connected {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return self.splice_failed(
                    event,
                    format!("cannot connect to {}: {e}", origin.original_dst),
                );
            }
            Err(_) => {
                return self.splice_failed(
                    event,
                    format!("connecting to {} timed out", origin.original_dst),
                );
            }
        };
        let _ = upstream.set_nodelay(true);
        info!(cgroup = %origin.cgroup, pid = origin.pid, original_dst = %origin.original_dst, "tcp passthrough");
        let (to_upstream, to_agent) = tokio::io::copy_bidirectional(&mut agent, &mut upstream)
            .await
            .unwrap_or((0, 0));
        event.decision = Some(Decision::Allow);
        event.bytes_in = to_upstream;
        event.bytes_out = to_agent;
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        if let Some(done) = on_done {
            done(to_upstream + to_agent);
        }
        self.events.record(event);
    }

    fn splice_failed(&self, mut event: AuditEvent, reason: String) {
        warn!(cgroup = event.cgroup.as_deref().unwrap_or(""), %reason, "tcp passthrough failed");
        event.decision = Some(Decision::Allow);
        event.reason = Some(reason);
        event.side = Some(Side::Upstream);
        self.events.record(event);
    }
}

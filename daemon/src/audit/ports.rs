//! The audit log's two ports: the write port every recorder reports into ([`EventSink`]: the
//! proxy, DNS, the control socket and the policy store), and the read port the control socket
//! serves history, verification and live events from ([`AuditAccess`]).

use agent_broker_protocol::{AuditEvent, LogFilter, VerifyReport};

use super::AuditError;
use tokio::sync::broadcast;

/// Where each exchange, denial, failed handshake, DNS answer and operator action is reported.
pub trait EventSink: Send + Sync + 'static {
    fn record(&self, event: AuditEvent);

    /// `Err` (why) when a request must be refused because its record cannot be kept (the
    /// audit log's disk is full or read-only, and brokerd is set to refuse then).
    fn writable(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The audit log as the control socket sees it. `query` and `verify` are synchronous (the
/// store is redb): call them off the async threads.
pub trait AuditAccess: Send + Sync + 'static {
    /// Live events, after they are stored.
    fn subscribe(&self) -> broadcast::Receiver<AuditEvent>;
    /// Stored records matching `filter`, oldest first.
    fn query(&self, filter: &LogFilter) -> Result<Vec<AuditEvent>, AuditError>;
    /// Checks the hash chain.
    fn verify(&self) -> Result<VerifyReport, AuditError>;
    /// Why the log cannot be written now, if so.
    fn failing(&self) -> Option<String> {
        None
    }
    /// Records dropped since start.
    fn dropped(&self) -> u64 {
        0
    }
}

/// Whether an event passes a filter (subtree of the agent or of the real cgroup path, denials
/// only, since). `limit` is the store's business.
pub fn matches(filter: &LogFilter, event: &AuditEvent) -> bool {
    if let Some(cgroup) = filter.cgroup.as_deref() {
        let cgroup = cgroup.trim_matches('/');
        let below = |c: &str| {
            c == cgroup
                || c.strip_prefix(cgroup)
                    .is_some_and(|rest| rest.starts_with('/'))
        };
        let in_subtree = event.cgroup.as_deref().is_some_and(below)
            || event.cgroup_path.as_deref().is_some_and(below);
        if !in_subtree {
            return false;
        }
    }
    if filter.denied_only && !event.is_denial() {
        return false;
    }
    if filter.since_ms.is_some_and(|since| event.time_ms < since) {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_broker_protocol::Decision;

    fn event(cgroup: &str, decision: Decision) -> AuditEvent {
        AuditEvent {
            time_ms: 1_000,
            cgroup: Some(cgroup.into()),
            decision: Some(decision),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn filters_by_subtree_denial_and_time() {
        let f = LogFilter {
            cgroup: Some("agents/a".into()),
            ..LogFilter::default()
        };
        assert!(matches(&f, &event("agents/a", Decision::Allow)));
        assert!(matches(&f, &event("agents/a/sub", Decision::Allow)));
        assert!(!matches(&f, &event("agents/ab", Decision::Allow)));
        // A named agent's records match its name and its real cgroup path.
        let named = AuditEvent {
            cgroup_path: Some("pods/p-1/tool".into()),
            ..event("agents/named/tool", Decision::Allow)
        };
        for subtree in ["agents/named", "pods/p-1", "pods/p-1/tool"] {
            let f = LogFilter {
                cgroup: Some(subtree.into()),
                ..LogFilter::default()
            };
            assert!(matches(&f, &named), "{subtree}");
        }
        assert!(!matches(&f, &named));
        let d = LogFilter {
            denied_only: true,
            ..LogFilter::default()
        };
        assert!(matches(&d, &event("x", Decision::Deny)));
        assert!(!matches(&d, &event("x", Decision::Allow)));
        let s = LogFilter {
            since_ms: Some(2_000),
            ..LogFilter::default()
        };
        assert!(!matches(&s, &event("x", Decision::Allow)));
    }
}

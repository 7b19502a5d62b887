//! Names brokerd's DNS answered, by agent cgroup and address.
//!
//! A connection without TLS (ssh, a database) carries no server name, only the address the agent
//! dialed. When brokerd's own DNS gave that agent that address for an allowed name, the name is
//! what the agent meant, so a `host` tcp rule can match it (policies/README.md, "tcp"). Only
//! answers brokerd itself gave count; an address the agent learned elsewhere has no name here.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use agent_broker_core::cgroup::CgroupPath;

/// How long an answer is remembered at least (clients cache beyond short TTLs) and at most.
const MIN_KEEP: Duration = Duration::from_secs(60);
const MAX_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Bound on remembered (cgroup, address) pairs.
const CAPACITY: usize = 65_536;
/// How often expired answers are dropped (when an answer is recorded). Without it the answers
/// of agents that have left would stay until the table is full (a soak's short-lived agents
/// grow it by one entry each).
const PRUNE_EVERY: Duration = MIN_KEEP;

/// See the module documentation.
#[derive(Default)]
pub struct AnsweredNames {
    entries: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    map: HashMap<(CgroupPath, IpAddr), (String, Instant)>,
    /// When expired answers were last dropped.
    pruned: Option<Instant>,
}

impl AnsweredNames {
    /// Remembers that `cgroup` was told `name` is at each of `addrs`, for about `ttl`.
    pub fn record(
        &self,
        cgroup: &CgroupPath,
        name: &str,
        addrs: impl IntoIterator<Item = IpAddr>,
        ttl: Duration,
    ) {
        self.record_at(cgroup, name, addrs, ttl, Instant::now());
    }

    fn record_at(
        &self,
        cgroup: &CgroupPath,
        name: &str,
        addrs: impl IntoIterator<Item = IpAddr>,
        ttl: Duration,
        now: Instant,
    ) {
        let until = now + ttl.clamp(MIN_KEEP, MAX_KEEP);
        let Ok(mut table) = self.entries.lock() else {
            return;
        };
        if table
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY)
        {
            table.map.retain(|_, (_, t)| *t > now);
            table.pruned = Some(now);
        }
        let entries = &mut table.map;
        for addr in addrs {
            if entries.len() >= CAPACITY {
                entries.retain(|_, (_, t)| *t > now);
                if entries.len() >= CAPACITY {
                    // Still full of live answers: forget them all rather than grow. A forgotten
                    // name only makes a later connection fall back to address rules.
                    entries.clear();
                }
            }
            entries.insert(
                (cgroup.clone(), addr.to_canonical()),
                (name.to_ascii_lowercase(), until),
            );
        }
        crate::metrics::global().answered_names_size(entries.len());
    }

    /// The name brokerd's DNS last gave `cgroup` for `addr`, if that answer is still current.
    pub fn lookup(&self, cgroup: &CgroupPath, addr: IpAddr) -> Option<String> {
        self.lookup_at(cgroup, addr, Instant::now())
    }

    fn lookup_at(&self, cgroup: &CgroupPath, addr: IpAddr, now: Instant) -> Option<String> {
        let table = self.entries.lock().ok()?;
        let (name, until) = table.map.get(&(cgroup.clone(), addr.to_canonical()))?;
        (*until > now).then(|| name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cg(s: &str) -> CgroupPath {
        CgroupPath::parse(s).expect("cgroup")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_name_is_found_for_its_cgroup_and_address_only() {
        let names = AnsweredNames::default();
        let now = Instant::now();
        names.record_at(
            &cg("agents/a"),
            "Git.Example.Test",
            [ip("192.0.2.7"), ip("2001:db8::7")],
            Duration::from_secs(300),
            now,
        );
        assert_eq!(
            names.lookup_at(&cg("agents/a"), ip("192.0.2.7"), now),
            Some("git.example.test".into())
        );
        assert_eq!(
            names.lookup_at(&cg("agents/a"), ip("::ffff:192.0.2.7"), now),
            Some("git.example.test".into()),
            "a v4-mapped address is the same address"
        );
        assert!(
            names
                .lookup_at(&cg("agents/b"), ip("192.0.2.7"), now)
                .is_none()
        );
        assert!(
            names
                .lookup_at(&cg("agents/a"), ip("192.0.2.8"), now)
                .is_none()
        );
    }

    #[test]
    fn answers_expire_after_their_ttl_within_bounds() {
        let names = AnsweredNames::default();
        let now = Instant::now();
        names.record_at(&cg("a"), "x.test", [ip("192.0.2.1")], Duration::ZERO, now);
        assert!(
            names
                .lookup_at(&cg("a"), ip("192.0.2.1"), now + Duration::from_secs(59))
                .is_some(),
            "kept at least a minute"
        );
        assert!(
            names
                .lookup_at(&cg("a"), ip("192.0.2.1"), now + Duration::from_secs(61))
                .is_none()
        );
    }

    #[test]
    fn expired_answers_are_dropped_as_new_ones_come() {
        let names = AnsweredNames::default();
        let len = || names.entries.lock().expect("lock").map.len();
        let now = Instant::now();
        let minute = Duration::from_secs(60);
        // One short-lived agent after another, each told one address, a minute's TTL.
        for i in 0..10u32 {
            let at = now + i * minute;
            names.record_at(
                &cg(&format!("a/{i}")),
                "x.test",
                [ip("192.0.2.1")],
                minute,
                at,
            );
            assert!(len() <= 2, "{} answers kept after {i} minutes", len());
        }
        // A live answer is never dropped.
        names.record_at(&cg("b"), "y.test", [ip("192.0.2.2")], minute * 5, now);
        names.record_at(
            &cg("c"),
            "z.test",
            [ip("192.0.2.3")],
            minute,
            now + minute * 2,
        );
        assert!(
            names
                .lookup_at(&cg("b"), ip("192.0.2.2"), now + minute * 2)
                .is_some()
        );
    }

    #[test]
    fn the_latest_answer_for_an_address_wins() {
        let names = AnsweredNames::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(300);
        names.record_at(&cg("a"), "one.test", [ip("192.0.2.1")], ttl, now);
        names.record_at(&cg("a"), "two.test", [ip("192.0.2.1")], ttl, now);
        assert_eq!(
            names.lookup_at(&cg("a"), ip("192.0.2.1"), now),
            Some("two.test".into())
        );
    }
}

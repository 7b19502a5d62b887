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
/// Bound on one agent's remembered addresses, so an agent resolving names made up to fill the
/// table (an allowed `*.suffix` answers any of them) only ever forgets its own answers.
const PER_AGENT: usize = 4_096;
/// How often expired answers are dropped (when an answer is recorded). Without it the answers
/// of agents that have left would stay until the table is full (a soak's short-lived agents
/// grow it by one entry each).
const PRUNE_EVERY: Duration = MIN_KEEP;

/// Each agent's answers: address -> (name, remembered until).
type Answers = HashMap<IpAddr, (String, Instant)>;

/// See the module documentation.
#[derive(Default)]
pub struct AnsweredNames {
    entries: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_agent: HashMap<CgroupPath, Answers>,
    /// Entries of all agents.
    len: usize,
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
        let name = name.to_ascii_lowercase();
        if table
            .pruned
            .is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_EVERY)
        {
            table.expire(now);
            table.pruned = Some(now);
        }
        for addr in addrs {
            let addr = addr.to_canonical();
            if table.len >= CAPACITY {
                table.expire(now);
                if table.len >= CAPACITY {
                    // Still full of live answers (many agents at their bound): forget them all
                    // rather than grow. A forgotten name only makes a later connection fall
                    // back to address rules.
                    table.by_agent.clear();
                    table.len = 0;
                }
            }
            let answers = table.by_agent.entry(cgroup.clone()).or_default();
            let before = answers.len();
            if before >= PER_AGENT && !answers.contains_key(&addr) {
                answers.retain(|_, (_, t)| *t > now);
                if answers.len() >= PER_AGENT {
                    // Full of live answers: this agent forgets the one that expires first.
                    let soonest = answers.iter().min_by_key(|(_, (_, t))| *t).map(|(a, _)| *a);
                    if let Some(soonest) = soonest {
                        answers.remove(&soonest);
                    }
                }
            }
            answers.insert(addr, (name.clone(), until));
            let after = answers.len();
            table.len = table.len + after - before;
        }
        crate::metrics::global().answered_names_size(table.len);
    }

    /// The name brokerd's DNS last gave `cgroup` for `addr`, if that answer is still current.
    pub fn lookup(&self, cgroup: &CgroupPath, addr: IpAddr) -> Option<String> {
        self.lookup_at(cgroup, addr, Instant::now())
    }

    fn lookup_at(&self, cgroup: &CgroupPath, addr: IpAddr, now: Instant) -> Option<String> {
        let table = self.entries.lock().ok()?;
        let (name, until) = table.by_agent.get(cgroup)?.get(&addr.to_canonical())?;
        (*until > now).then(|| name.clone())
    }

    /// How many addresses `cgroup`'s answers hold now.
    #[cfg(test)]
    fn len_of(&self, cgroup: &CgroupPath) -> usize {
        self.entries
            .lock()
            .map(|t| t.by_agent.get(cgroup).map_or(0, HashMap::len))
            .unwrap_or(0)
    }
}

impl Table {
    /// Drops every expired answer, and agents left with none.
    fn expire(&mut self, now: Instant) {
        self.by_agent.retain(|_, answers| {
            answers.retain(|_, (_, t)| *t > now);
            !answers.is_empty()
        });
        self.len = self.by_agent.values().map(HashMap::len).sum();
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
        let len = || names.entries.lock().expect("lock").len;
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

    #[test]
    fn one_agent_filling_the_table_forgets_only_its_own_answers() {
        let names = AnsweredNames::default();
        let now = Instant::now();
        let ttl = Duration::from_secs(300);
        let victim = cg("agents/victim");
        let attacker = cg("agents/attacker");
        names.record_at(&victim, "git.example.test", [ip("192.0.2.1")], ttl, now);
        for i in 0..(PER_AGENT as u32 * 3) {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let later = now + Duration::from_millis(u64::from(i));
            names.record_at(&attacker, &format!("n{i}.flood.test"), [addr], ttl, later);
        }
        assert_eq!(names.len_of(&attacker), PER_AGENT, "bounded per agent");
        assert_eq!(
            names.lookup_at(&victim, ip("192.0.2.1"), now),
            Some("git.example.test".into()),
            "the other agent's answer stays"
        );
        // The attacker keeps its newest answers, and lost its oldest.
        let last = IpAddr::from(std::net::Ipv4Addr::from(
            0x0a00_0000 + PER_AGENT as u32 * 3 - 1,
        ));
        assert!(names.lookup_at(&attacker, last, now).is_some());
        assert!(names.lookup_at(&attacker, ip("10.0.0.0"), now).is_none());
        let total = names.entries.lock().map(|t| t.len).unwrap_or(0);
        assert_eq!(total, PER_AGENT + 1, "the count follows the entries");
    }

    #[test]
    fn an_agent_at_its_bound_drops_expired_answers_first() {
        let names = AnsweredNames::default();
        let now = Instant::now();
        let a = cg("agents/a");
        for i in 0..PER_AGENT as u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            names.record_at(&a, "x.test", [addr], Duration::ZERO, now);
        }
        let later = now + Duration::from_secs(61);
        names.record_at(
            &a,
            "y.test",
            [ip("192.0.2.9")],
            Duration::from_secs(300),
            later,
        );
        assert_eq!(
            names.len_of(&a),
            1,
            "the expired ones went, not the new one"
        );
    }
}

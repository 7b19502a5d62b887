//! The delegation property, over random parent and child policies drawn from a small universe
//! of hosts, addresses, ports, methods, paths, headers, expiries, limits and secrets: whatever
//! a child's effective policy allows, its parent allows. A hand-rolled generator (seeded, so a
//! failure reproduces) makes children mostly by narrowing a parent rule, sometimes by widening
//! one, sometimes at random, so both loads and refusals are exercised.

use std::net::SocketAddr;

use super::*;
use crate::test_rng::Rng;

/// Picking from the small universe, on the shared generator.
trait Pick {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
    fn subset<'a, T>(&mut self, items: &'a [T]) -> Vec<&'a T>;
}

impl Pick for Rng {
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    /// A non-empty random subset, in list order.
    fn subset<'a, T>(&mut self, items: &'a [T]) -> Vec<&'a T> {
        loop {
            let s: Vec<&T> = items.iter().filter(|_| self.chance(50)).collect();
            if !s.is_empty() {
                return s;
            }
        }
    }
}

const HOSTS: &[&str] = &[
    "api.example.test",
    "x.b.example.test",
    "other.test",
    "127.0.0.2",
    "*.example.test",
    "*.b.example.test",
];
const NETS: &[&str] = &[
    "127.0.0.0/8",
    "127.0.0.2",
    "10.0.0.0/8",
    "10.1.0.0/16",
    "::1",
];
const PORTS: &[u16] = &[443, 80];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PATHS: &[&str] = &[
    "/v1/**",
    "/v1/chat/*",
    "/v1/models",
    "/v*/a/*",
    "/**",
    "/v2/x",
];
const EXPIRIES: &[&str] = &[
    "2020-01-01T00:00:00Z",
    "2030-01-01T00:00:00Z",
    "2040-01-01T00:00:00Z",
];
const SECRETS: &[&str] = &["K1", "K2"];

/// One generated rule, as fields to print.
#[derive(Clone, Debug)]
struct GenRule {
    dest: (bool, String),
    port: u16,
    tcp: bool,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
    header: bool,
    plain_http: bool,
    not_after: Option<usize>,
    rate: Option<(u32, u32)>,
    secrets: Vec<String>,
}

impl GenRule {
    fn random(rng: &mut Rng) -> Self {
        let tcp = rng.chance(10);
        let dest = if rng.chance(70) {
            (true, rng.pick(HOSTS).to_string())
        } else {
            (false, rng.pick(NETS).to_string())
        };
        let mut r = Self {
            dest,
            port: *rng.pick(PORTS),
            tcp,
            methods: rng.chance(50).then(|| {
                rng.subset(METHODS)
                    .into_iter()
                    .map(|m| m.to_string())
                    .collect()
            }),
            paths: rng.chance(50).then(|| {
                rng.subset(PATHS)
                    .into_iter()
                    .map(|p| p.to_string())
                    .collect()
            }),
            header: rng.chance(20),
            plain_http: rng.chance(20),
            not_after: rng.chance(40).then(|| rng.below(EXPIRIES.len())),
            rate: rng
                .chance(30)
                .then(|| *rng.pick(&[(5, 5), (10, 20), (1, 1)])),
            secrets: SECRETS
                .iter()
                .filter(|_| rng.chance(30))
                .map(|s| s.to_string())
                .collect(),
        };
        if tcp {
            r.methods = None;
            r.paths = None;
            r.header = false;
            r.plain_http = false;
            r.secrets.clear();
        }
        r
    }

    /// A rule within `self`: each field kept or narrowed.
    fn narrowed(&self, rng: &mut Rng) -> Self {
        let mut c = self.clone();
        if c.dest.0 && c.dest.1.starts_with("*.") && rng.chance(50) {
            let candidates: Vec<&&str> = HOSTS
                .iter()
                .filter(|h| h.ends_with(&c.dest.1[1..]) && **h != c.dest.1)
                .collect();
            if !candidates.is_empty() {
                c.dest.1 = rng.pick(&candidates).to_string();
            }
        }
        if !c.dest.0 && rng.chance(50) {
            let candidates: Vec<&&str> = NETS
                .iter()
                .filter(|n| {
                    let (p, cn) = (IpNet::parse(&c.dest.1), IpNet::parse(n));
                    matches!((p, cn), (Ok(p), Ok(cn)) if p.covers(&cn))
                })
                .collect();
            c.dest.1 = rng.pick(&candidates).to_string();
        }
        if c.tcp {
            return c;
        }
        if rng.chance(50) {
            let from: Vec<&str> = match &c.methods {
                Some(m) => m.iter().map(String::as_str).collect(),
                None => METHODS.to_vec(),
            };
            c.methods = Some(
                rng.subset(&from)
                    .into_iter()
                    .map(|m| m.to_string())
                    .collect(),
            );
        }
        if rng.chance(50) {
            let from: Vec<&str> = match &c.paths {
                Some(p) => p.iter().map(String::as_str).collect(),
                None => PATHS.to_vec(),
            };
            c.paths = Some(
                rng.subset(&from)
                    .into_iter()
                    .map(|p| p.to_string())
                    .collect(),
            );
        }
        c.header |= rng.chance(20);
        c.plain_http &= rng.chance(50);
        if rng.chance(50) {
            c.not_after = match c.not_after {
                Some(i) => Some(rng.below(i + 1)),
                None => Some(rng.below(EXPIRIES.len())),
            };
        } else if rng.chance(30) {
            c.not_after = None;
        }
        if rng.chance(30) {
            c.rate = Some((1, 1));
        } else if rng.chance(30) {
            c.rate = None;
        }
        c.secrets.retain(|_| rng.chance(70));
        c
    }

    /// A rule that widens `self` in one random way (it may still end up covered by another
    /// parent rule).
    fn widened(&self, rng: &mut Rng) -> Self {
        let mut c = self.narrowed(rng);
        match rng.below(8) {
            0 => c.dest = (true, rng.pick(HOSTS).to_string()),
            1 => c.port = if c.port == 443 { 80 } else { 443 },
            2 => c.methods = None,
            3 => c.paths = Some(vec![rng.pick(PATHS).to_string()]),
            4 => c.plain_http = true,
            5 => c.not_after = Some(EXPIRIES.len() - 1),
            6 => c.rate = Some((50, 50)),
            _ => c.secrets = SECRETS.iter().map(|s| s.to_string()).collect(),
        }
        if c.tcp {
            c.plain_http = false;
            c.methods = None;
            c.paths = None;
            c.secrets.clear();
        }
        c
    }

    fn toml(&self) -> String {
        let quote = |v: &[String]| {
            let q: Vec<String> = v.iter().map(|s| format!("{s:?}")).collect();
            format!("[{}]", q.join(", "))
        };
        let mut t = format!(
            "[[allow]]\n{} = {:?}\nport = {}\n",
            if self.dest.0 { "host" } else { "ip" },
            self.dest.1,
            self.port
        );
        if self.tcp {
            t.push_str("tcp = true\n");
        }
        if let Some(m) = &self.methods {
            t.push_str(&format!("methods = {}\n", quote(m)));
        }
        if let Some(p) = &self.paths {
            t.push_str(&format!("paths = {}\n", quote(p)));
        }
        if self.header {
            t.push_str("headers = { x-tenant = \"acme\" }\n");
        }
        if self.plain_http {
            t.push_str("plain_http = true\n");
        }
        if let Some(i) = self.not_after {
            t.push_str(&format!("not_after = {:?}\n", EXPIRIES[i]));
        }
        if let Some((rate, burst)) = self.rate {
            t.push_str(&format!(
                "rate = {{ per_second = {rate}, burst = {burst} }}\n"
            ));
        }
        if !self.secrets.is_empty() {
            let parts: Vec<String> = self
                .secrets
                .iter()
                .map(|s| format!("x-{} = \"{{secret:{s}}}\"", s.to_ascii_lowercase()))
                .collect();
            t.push_str(&format!("inject.headers = {{ {} }}\n", parts.join(", ")));
        }
        t
    }
}

fn file(cgroup: &str, rules: &[GenRule]) -> String {
    let mut t = format!("cgroup = {cgroup:?}\n");
    for r in rules {
        t.push_str(&r.toml());
    }
    t
}

fn random_request(rng: &mut Rng, now: SystemTime) -> OwnedRequest {
    let host = *rng.pick(&[
        "api.example.test",
        "x.b.example.test",
        "y.example.test",
        "other.test",
        "127.0.0.2",
        "example.test",
    ]);
    let method = *rng.pick(METHODS);
    let mut r = req(
        method,
        &format!(
            "{host}:{}{}",
            rng.pick(PORTS),
            rng.pick(&[
                "/v1/models",
                "/v1/chat/x",
                "/v1/chat/x/y",
                "/v2/a/b",
                "/v2/x",
                "/"
            ])
        ),
    );
    r.dst_ip = rng
        .pick(&["127.0.0.2", "10.1.2.3", "10.2.0.1", "::1", "192.0.2.1"])
        .parse()
        .expect("ip");
    match rng.below(3) {
        0 => {}
        1 => r = with_header(r, "x-tenant", "acme"),
        _ => r = with_header(r, "x-tenant", "evil"),
    }
    r.now = now;
    r
}

#[test]
fn whatever_a_child_allows_its_parent_allows() {
    let mut rng = Rng(0x005E_ED0F_A6E7);
    let times = [
        parse_rfc3339("2019-01-01T00:00:00Z").expect("t"),
        parse_rfc3339("2026-01-01T00:00:00Z").expect("t"),
        parse_rfc3339("2035-01-01T00:00:00Z").expect("t"),
    ];
    let before_every_expiry = times[0];
    let (mut pairs, mut loaded, mut refused, mut child_allows, mut conn_checks) = (0, 0, 0, 0, 0);
    let parent_cg = cg("agents");
    let child_cg = cg("agents/c/x");
    for _ in 0..600 {
        pairs += 1;
        let parent_rules: Vec<GenRule> = (0..1 + rng.below(4))
            .map(|_| GenRule::random(&mut rng))
            .collect();
        let child_rules: Vec<GenRule> = (0..1 + rng.below(3))
            .map(|_| match rng.below(10) {
                0..=6 => rng.pick(&parent_rules).clone().narrowed(&mut rng),
                7 | 8 => rng.pick(&parent_rules).clone().widened(&mut rng),
                _ => GenRule::random(&mut rng),
            })
            .collect();
        let parent_text = file("agents", &parent_rules);
        let child_text = file("agents/c", &child_rules);
        let both = try_policy(&[("agents.toml", &parent_text), ("c.toml", &child_text)]);
        let (Ok(parent_alone), Ok(child_alone)) = (
            try_policy(&[("agents.toml", &parent_text)]),
            try_policy(&[("c.toml", &child_text)]),
        ) else {
            // The generator made a file invalid on its own (two rules alike, say).
            continue;
        };
        let both = match both {
            Ok(p) => p,
            Err(e) => {
                refused += 1;
                assert!(
                    e.to_string()
                        .contains("a child policy can only narrow its parent's")
                        || e.to_string().contains("already covered"),
                    "{e}"
                );
                continue;
            }
        };
        loaded += 1;
        let context = || format!("parent:\n{parent_text}\nchild:\n{child_text}");
        for _ in 0..150 {
            let now = *rng.pick(&times);
            let r = random_request(&mut rng, now);
            // At run time, with every level consulted.
            if both.decide_request(&child_cg, &r.info()).is_allow() {
                child_allows += 1;
                assert!(
                    both.decide_request(&parent_cg, &r.info()).is_allow(),
                    "{r:?}\n{}",
                    context()
                );
            }
            // The load check alone: the child file by itself allows no more than the parent
            // file by itself (before any expiry, since a child may leave not_after to its
            // parent).
            let mut early = r.clone();
            early.now = before_every_expiry;
            if child_alone
                .decide_request(&cg("agents/c"), &early.info())
                .is_allow()
            {
                assert!(
                    parent_alone
                        .decide_request(&parent_cg, &early.info())
                        .is_allow(),
                    "the load check let a widening child through: {early:?}\n{}",
                    context()
                );
            }
            // Connections: by the request's host, and sometimes without a name.
            let dst = SocketAddr::new(r.dst_ip, r.port);
            let admitted = |p: &Policy, c: &CgroupPath| {
                !matches!(
                    p.decide_connection(c, dst, Some(&r.host), now),
                    ConnectionDecision::Deny { .. }
                )
            };
            if admitted(&both, &child_cg) {
                assert!(
                    admitted(&both, &parent_cg),
                    "{dst} {}\n{}",
                    r.host,
                    context()
                );
            }
            let name = rng.chance(70).then_some(r.host.as_str());
            let kind = |p: &Policy, c: &CgroupPath| match p.decide_connection(c, dst, name, now) {
                ConnectionDecision::Http => 1,
                ConnectionDecision::Tcp { .. } => 2,
                ConnectionDecision::Deny { .. } => 0,
            };
            let child_kind = kind(&both, &child_cg);
            if child_kind != 0 {
                conn_checks += 1;
                assert_eq!(
                    child_kind,
                    kind(&both, &parent_cg),
                    "{dst} {name:?}\n{}",
                    context()
                );
            }
            if both.dns_allowed(&child_cg, &r.host).is_ok() {
                assert!(
                    both.dns_allowed(&parent_cg, &r.host).is_ok(),
                    "{}",
                    context()
                );
            }
        }
    }
    // Not vacuous: many pairs loaded, many refused, many requests allowed.
    assert!(loaded * 4 > pairs, "{loaded} of {pairs} pairs loaded");
    assert!(refused * 10 > pairs, "{refused} of {pairs} pairs refused");
    assert!(
        child_allows > 2_000,
        "{child_allows} allowed requests checked"
    );
    assert!(conn_checks > 2_000, "{conn_checks} connections checked");
}

//! Delegation narrowing at load: every rule of a child file must be covered by one rule of the
//! file of its nearest ancestor cgroup, and every explicit `[dns]` name by the parent's names.
//! Since that parent was checked against its own parent the same way, a loaded child never
//! allows more than any ancestor (at run time every level is consulted anyway).
//!
//! A parent rule P covers a child rule C when:
//! - C's destination is within P's (same exact host; a host or narrower wildcard below P's
//!   wildcard; an address range inside P's), on the same port, and of the same kind (HTTP or
//!   tcp passthrough);
//! - C's methods are a subset of P's, and every path pattern of C is covered by one of P's
//!   (C without `methods` or `paths` means "all", so only a P without them covers it);
//! - C requires every header P requires (with the same value);
//! - C sets `plain_http` only where P does;
//! - C's `not_after`, `rate` and `budget` are no later or higher than P's (left out, P's apply
//!   at run time, so leaving them out is no widening);
//! - every secret C injects, P injects too (C may drop injection, or write the same secrets
//!   elsewhere, but never adds a secret P does not hand to that destination).

use std::fmt;

use super::{
    PolicyFile,
    file::{PolicyFileError, dns_error, rule_error},
    limits::Rate,
    rule::Rule,
};
use crate::{secret::SecretName, time::format_rfc3339};

/// The first way a parent rule fails to cover a child rule, in checking order (later means the
/// parent rule came closer).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Gap {
    Destination,
    Port,
    Kind,
    Methods,
    Paths(Option<String>),
    Headers(String, String),
    PlainHttp,
    AnyAddress,
    NotAfter,
    Rate(Rate, Rate),
    Budget(&'static str, u64, u64),
    Secrets(Vec<SecretName>),
}

impl Gap {
    fn rank(&self) -> u8 {
        match self {
            Self::Destination => 0,
            Self::Port => 1,
            Self::Kind => 2,
            Self::Methods => 3,
            Self::Paths(_) => 4,
            Self::Headers(..) => 5,
            Self::PlainHttp | Self::AnyAddress => 6,
            Self::NotAfter => 7,
            Self::Rate(..) => 8,
            Self::Budget(..) => 9,
            Self::Secrets(_) => 10,
        }
    }
}

/// How parent rule `p` fails to cover child rule `c`, or `None` when it covers it.
fn gap(p: &Rule, c: &Rule) -> Option<Gap> {
    if !p.dest.covers(&c.dest) {
        return Some(Gap::Destination);
    }
    if p.port != c.port {
        return Some(Gap::Port);
    }
    if p.tcp != c.tcp {
        return Some(Gap::Kind);
    }
    if !c.methods.is_subset_of(&p.methods) {
        return Some(Gap::Methods);
    }
    match (&p.paths, &c.paths) {
        (None, _) => {}
        (Some(_), None) => return Some(Gap::Paths(None)),
        (Some(pp), Some(cp)) => {
            if let Some(uncovered) = cp.iter().find(|c| !pp.iter().any(|p| c.is_covered_by(p))) {
                return Some(Gap::Paths(Some(uncovered.as_str().to_string())));
            }
        }
    }
    if let Some((n, v)) = p.headers.iter().find(|ph| !c.headers.contains(ph)) {
        return Some(Gap::Headers(n.as_str().to_string(), v.clone()));
    }
    if c.plain_http && !p.plain_http {
        return Some(Gap::PlainHttp);
    }
    if c.any_address && !p.any_address {
        return Some(Gap::AnyAddress);
    }
    if let (Some(pn), Some(cn)) = (p.not_after, c.not_after)
        && cn > pn
    {
        return Some(Gap::NotAfter);
    }
    if let (Some(pr), Some(cr)) = (p.rate, c.rate)
        && !cr.within(&pr)
    {
        return Some(Gap::Rate(cr, pr));
    }
    if let (Some(pb), Some(cb)) = (p.budget, c.budget)
        && let Some(dim) = cb.within(&pb)
    {
        let get = |b: &super::Budget| match dim {
            "requests_per_day" => b.requests_per_day,
            "bytes_per_day" => b.bytes_per_day,
            _ => b.tokens_per_day,
        };
        return Some(Gap::Budget(
            dim,
            get(&cb).unwrap_or(0),
            get(&pb).unwrap_or(0),
        ));
    }
    let missing: Vec<SecretName> = c
        .secrets
        .iter()
        .filter(|s| p.secrets.binary_search(s).is_err())
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Some(Gap::Secrets(missing));
    }
    None
}

/// `agents.toml:12 allow[0] (cgroup agents)`.
struct ParentRule<'a>(&'a Rule, &'a PolicyFile);

impl fmt::Display for ParentRule<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (cgroup {})", self.0.rule_ref, self.1.cgroup)
    }
}

const ONLY_NARROW: &str = "a child policy can only narrow its parent's";

/// Checks `child` against `parent` (the file of its nearest ancestor cgroup). On success,
/// returns for each child rule the index of the parent rule that covers it.
pub(super) fn check(
    child: &PolicyFile,
    parent: &PolicyFile,
) -> Result<Vec<Option<usize>>, Vec<PolicyFileError>> {
    let mut covering = Vec::with_capacity(child.rules.len());
    let mut errors = Vec::new();
    for c in &child.rules {
        let mut best: Option<(usize, Gap)> = None;
        let mut found = None;
        for (pi, p) in parent.rules.iter().enumerate() {
            match gap(p, c) {
                None => {
                    found = Some(pi);
                    break;
                }
                Some(g) => {
                    if best.as_ref().is_none_or(|(_, b)| g.rank() > b.rank()) {
                        best = Some((pi, g));
                    }
                }
            }
        }
        covering.push(found);
        if found.is_none() {
            errors.push(widening(c, parent, best));
        }
    }
    for (j, (pattern, _)) in child.dns_entries.iter().enumerate() {
        if !parent.dns.covers(pattern) {
            errors.push(dns_error(
                child,
                j,
                format!(
                    "{pattern} is not a name the policy for {} ({}) lets its agents resolve \
                     (it allows {}); {ONLY_NARROW}",
                    parent.cgroup,
                    parent.path.display(),
                    if parent.dns.patterns().is_empty() {
                        "none".to_string()
                    } else {
                        parent.dns.to_string()
                    }
                ),
            ));
        }
    }
    if errors.is_empty() {
        Ok(covering)
    } else {
        Err(errors)
    }
}

/// The error for a child rule no parent rule covers, about the parent rule that came closest.
fn widening(c: &Rule, parent: &PolicyFile, best: Option<(usize, Gap)>) -> PolicyFileError {
    let dest = format!("{}:{}", c.dest, c.port);
    let Some((pi, gap)) = best.filter(|(_, g)| *g != Gap::Destination) else {
        return rule_error(
            c,
            c.dest.field(),
            format!(
                "{dest} is not covered by any rule of the policy for {} ({}); {ONLY_NARROW}",
                parent.cgroup,
                parent.path.display()
            ),
        );
    };
    let p = &parent.rules[pi];
    let pr = ParentRule(p, parent);
    let (field, message) = match gap {
        Gap::Destination => unreachable_destination(c),
        Gap::Port => {
            let ports: Vec<String> = parent
                .rules
                .iter()
                .filter(|p| p.dest.covers(&c.dest))
                .map(|p| p.port)
                .collect::<std::collections::BTreeSet<u16>>()
                .into_iter()
                .map(|p| p.to_string())
                .collect();
            (
                "port",
                format!(
                    "port {} goes beyond the policy for {} ({}), which allows {} only on port{} {}",
                    c.port,
                    parent.cgroup,
                    parent.path.display(),
                    c.dest,
                    if ports.len() == 1 { "" } else { "s" },
                    ports.join(", ")
                ),
            )
        }
        Gap::Kind if c.tcp => (
            "tcp",
            format!(
                "tcp passthrough to {dest} goes beyond {pr}, which only allows HTTP requests there"
            ),
        ),
        Gap::Kind => (
            c.dest.field(),
            format!(
                "HTTP requests to {dest} go beyond {pr}, which only allows tcp passthrough there"
            ),
        ),
        Gap::Methods => (
            "methods",
            format!(
                "{} goes beyond {pr}, which allows {}",
                if c.methods.is_any() {
                    "every method".to_string()
                } else {
                    format!("methods {}", c.methods)
                },
                p.methods
            ),
        ),
        Gap::Paths(uncovered) => {
            let allowed: Vec<&str> = p.paths.iter().flatten().map(|p| p.as_str()).collect();
            let what = match uncovered {
                None => "every path".to_string(),
                Some(path) => format!("path {path:?}"),
            };
            (
                "paths",
                format!(
                    "{what} goes beyond {pr}, which allows paths {}",
                    allowed.join(", ")
                ),
            )
        }
        Gap::Headers(name, value) => (
            "headers",
            format!("{pr} requires the request header {name} = {value:?}; require it here too"),
        ),
        Gap::PlainHttp => (
            "plain_http",
            format!(
                "plain_http = true goes beyond {pr}, which does not allow credentials over plain \
                 HTTP"
            ),
        ),
        Gap::AnyAddress => (
            "any_address",
            format!(
                "any_address = true goes beyond {pr}, which sends credentials only to the \
                 addresses its names resolve to"
            ),
        ),
        Gap::NotAfter => (
            "not_after",
            format!(
                "not_after {} is later than {}, when {pr} expires",
                c.not_after.map(format_rfc3339).unwrap_or_default(),
                p.not_after.map(format_rfc3339).unwrap_or_default()
            ),
        ),
        Gap::Rate(cr, prate) => ("rate", format!("rate {cr} is higher than {prate} of {pr}")),
        Gap::Budget(dim, cv, pv) => (
            "budget",
            format!("budget {dim} = {cv} is higher than {pv} of {pr}"),
        ),
        Gap::Secrets(missing) => (
            "inject",
            format!(
                "injects {}, which {pr} does not inject for {dest}; a child may drop or narrow \
                 its parent's injection but not add secrets",
                missing
                    .iter()
                    .map(SecretName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
    };
    rule_error(c, field, format!("{message}; {ONLY_NARROW}"))
}

fn unreachable_destination(c: &Rule) -> (&'static str, String) {
    // Filtered out by the caller; kept total so no panic is possible.
    (c.dest.field(), format!("{} is not covered", c.dest))
}

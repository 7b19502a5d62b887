//! One compiled `[[allow]]` rule, and the lookup tables that find a file's rules by
//! destination without scanning them.

use std::{
    borrow::Cow,
    collections::HashMap,
    fmt,
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, HeaderName};

use super::{
    cidr::IpNet,
    glob::PathPattern,
    host::{HostPattern, is_strictly_below},
    limits::{Budget, LimitKey, Rate},
    method::MethodSet,
};
use crate::{
    inject::{InjectSpec, Injection},
    secret::SecretName,
};

/// Where a rule is written: for audit records, denials and `policy explain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// The policy file.
    pub file: Arc<Path>,
    /// Position in the file's `[[allow]]` list, from 0.
    pub index: usize,
    /// Line of the rule's destination (`host` or `ip`), from 1.
    pub line: usize,
    /// The rule's `name`, if it has one.
    pub name: Option<Arc<str>>,
}

impl fmt::Display for RuleRef {
    /// `policies/demo.toml:4 allow[0]`, with ` (name)` when the rule has a name.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} allow[{}]",
            self.file.display(),
            self.line,
            self.index
        )?;
        if let Some(name) = &self.name {
            write!(f, " ({name})")?;
        }
        Ok(())
    }
}

/// What a rule lets an agent reach: a host name pattern, or an address range.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    /// `host = "..."`: matched against the SNI / `Host` (an exact IP literal matches a request
    /// whose host is that literal).
    Host(HostPattern),
    /// `ip = "..."`: matched against the connection's original destination address.
    Ip(IpNet),
}

impl Destination {
    /// Whether every destination `other` matches, `self` matches too.
    pub fn covers(&self, other: &Destination) -> bool {
        match (self, other) {
            (Self::Host(p), Self::Host(c)) => match (p, c) {
                (HostPattern::Exact(p), HostPattern::Exact(c)) => p == c,
                (HostPattern::Wildcard(p), HostPattern::Exact(c)) => is_strictly_below(c, p),
                (HostPattern::Wildcard(p), HostPattern::Wildcard(c)) => {
                    c == p || is_strictly_below(c, p)
                }
                (HostPattern::Exact(_), HostPattern::Wildcard(_)) => false,
            },
            (Self::Ip(p), Self::Ip(c)) => p.covers(c),
            _ => false,
        }
    }

    /// The field that holds it in a policy file.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Host(_) => "host",
            Self::Ip(_) => "ip",
        }
    }

    /// The host pattern, for a `host` rule.
    pub fn host(&self) -> Option<&HostPattern> {
        match self {
            Self::Host(h) => Some(h),
            Self::Ip(_) => None,
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host(h) => h.fmt(f),
            Self::Ip(n) => n.fmt(f),
        }
    }
}

/// Positions of a rule's fields in its file, for errors found after compiling (narrowing).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Spans {
    /// (field, line, column), 1-based.
    fields: Vec<(&'static str, usize, usize)>,
    /// Where the rule's destination is (fallback for fields it does not set).
    start: (usize, usize),
}

impl Spans {
    pub(super) fn new(start: (usize, usize)) -> Self {
        Self {
            fields: Vec::new(),
            start,
        }
    }
    pub(super) fn set(&mut self, field: &'static str, at: (usize, usize)) {
        self.fields.push((field, at.0, at.1));
    }
    /// Line and column of `field`, or of the rule when it does not set the field.
    pub(super) fn at(&self, field: &str) -> (usize, usize) {
        self.fields
            .iter()
            .find(|(f, ..)| *f == field)
            .map_or(self.start, |&(_, l, c)| (l, c))
    }
}

/// One compiled allow rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub(super) name: Option<Arc<str>>,
    pub(super) dest: Destination,
    pub(super) port: u16,
    pub(super) tcp: bool,
    pub(super) methods: MethodSet,
    pub(super) paths: Option<Vec<PathPattern>>,
    /// Required request headers: lowercase name and exact value, sorted by name.
    pub(super) headers: Vec<(HeaderName, String)>,
    pub(super) plain_http: bool,
    /// Credentials may go to any address whose certificate proves the name, not only to the
    /// addresses the name resolves to.
    pub(super) any_address: bool,
    pub(super) not_after: Option<SystemTime>,
    /// How long a response may pause between frames; `None`: brokerd's default.
    pub(super) idle_timeout: Option<Duration>,
    pub(super) rate: Option<Rate>,
    pub(super) budget: Option<Budget>,
    pub(super) inject: Injection,
    /// Every secret `inject` names, sorted, each once.
    pub(super) secrets: Vec<SecretName>,
    /// `approve = "ask"`: each matching request waits for an operator's decision.
    pub(super) ask: bool,
    pub(super) rule_ref: RuleRef,
    /// Set once the file's cgroup is known, for rules with a rate or budget.
    pub(super) limit: Option<LimitKey>,
    pub(super) spans: Spans,
}

impl Rule {
    /// Same as [`Rule::destination`] (the minimal policy form only had hosts).
    pub fn host(&self) -> &Destination {
        &self.dest
    }
    pub fn destination(&self) -> &Destination {
        &self.dest
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Whether this is a `tcp = true` passthrough rule.
    pub fn is_tcp(&self) -> bool {
        self.tcp
    }
    pub fn methods(&self) -> &MethodSet {
        &self.methods
    }
    /// Path patterns; `None` allows every path.
    pub fn paths(&self) -> Option<&[PathPattern]> {
        self.paths.as_deref()
    }
    /// Required request headers (lowercase name, exact value).
    pub fn required_headers(&self) -> &[(HeaderName, String)] {
        &self.headers
    }
    /// Whether injection (and handle swaps) may happen over plain HTTP for this rule.
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }
    /// Whether credentials may go to any address that proves the name by its certificate (not
    /// only to the addresses the name resolves to).
    pub fn any_address(&self) -> bool {
        self.any_address
    }
    pub fn not_after(&self) -> Option<SystemTime> {
        self.not_after
    }
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.idle_timeout
    }
    pub fn rate(&self) -> Option<&Rate> {
        self.rate.as_ref()
    }
    pub fn budget(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }
    /// The headers this rule injects (`inject.headers`); see [`Rule::injection`] for all of it.
    pub fn inject(&self) -> &InjectSpec {
        &self.inject.headers
    }
    /// Everything this rule injects: headers, basic auth, query parameters.
    pub fn injection(&self) -> &Injection {
        &self.inject
    }
    pub fn rule_ref(&self) -> &RuleRef {
        &self.rule_ref
    }
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }
    /// The counter key of this rule's limits, if it has any.
    pub fn limit_key(&self) -> Option<&LimitKey> {
        self.limit.as_ref()
    }

    /// Whether the rule no longer matches at `now`.
    /// Whether matching requests wait for an operator's approval (`approve = "ask"`).
    pub fn asks(&self) -> bool {
        self.ask
    }
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.not_after.is_some_and(|t| now > t)
    }

    /// Whether the rule's request conditions hold (port, method, path, headers), ignoring the
    /// destination (the lookup tables matched it) and expiry.
    pub(super) fn first_miss(&self, req: &Req<'_>, need: &[SecretName]) -> Option<Miss> {
        if self.port != req.port {
            return Some(Miss::Port);
        }
        if !self.methods.allows_str(req.method) {
            return Some(Miss::Method);
        }
        if let Some(paths) = &self.paths {
            if !req.canonical_path {
                return Some(Miss::PathNotCanonical);
            }
            if !paths.iter().any(|p| p.matches(req.path)) {
                return Some(Miss::Path);
            }
        }
        if !self.headers.is_empty() {
            let Some(headers) = req.headers else {
                return Some(Miss::Header);
            };
            if !self
                .headers
                .iter()
                .all(|(n, v)| header_matches(headers, n, v))
            {
                return Some(Miss::Header);
            }
        }
        if !need.iter().all(|s| self.secrets.binary_search(s).is_ok()) {
            return Some(Miss::Secrets);
        }
        if self.is_expired(req.now) {
            return Some(Miss::Expired);
        }
        None
    }

    /// An identity for limit counters that survives reloads: the name, or what the rule
    /// matches (two rules of a file never match the same).
    pub(super) fn limit_identity(&self) -> String {
        if let Some(name) = &self.name {
            return format!("name:{name}");
        }
        let mut id = format!(
            "{}{}={}:{}",
            if self.tcp { "tcp " } else { "" },
            self.dest.field(),
            self.dest,
            self.port
        );
        if !self.methods.is_any() {
            id.push_str(&format!(" methods={}", self.methods.names().join(",")));
        }
        if let Some(paths) = &self.paths {
            let p: Vec<&str> = paths.iter().map(PathPattern::as_str).collect();
            id.push_str(&format!(" paths={}", p.join(",")));
        }
        for (n, v) in &self.headers {
            id.push_str(&format!(" {n}={v:?}"));
        }
        id
    }
}

/// Every value of header `name` equals `value`, and there is at least one (an agent sending a
/// second, different value cannot slip past the match).
fn header_matches(headers: &HeaderMap, name: &HeaderName, value: &str) -> bool {
    let mut any = false;
    for v in headers.get_all(name) {
        if v.as_bytes() != value.as_bytes() {
            return false;
        }
        any = true;
    }
    any
}

/// The first condition a rule failed for a request, in checking order (later is nearer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Miss {
    Port,
    Method,
    PathNotCanonical,
    Path,
    Header,
    Secrets,
    Expired,
}

/// A request as the rules see it.
#[derive(Clone, Debug)]
pub(super) struct Req<'a> {
    pub(super) method: &'a str,
    pub(super) path: &'a str,
    pub(super) canonical_path: bool,
    /// `None` when the caller has no headers (`policy explain`): header conditions fail.
    pub(super) headers: Option<&'a HeaderMap>,
    /// Normalized; `None` when the request's host is not a valid name.
    pub(super) host: Option<Cow<'a, str>>,
    /// As the caller gave it, for messages.
    pub(super) raw_host: &'a str,
    /// Canonical; `None` when unknown (`policy explain` of a name).
    pub(super) ip: Option<IpAddr>,
    pub(super) port: u16,
    pub(super) now: SystemTime,
}

/// How specific a destination match is: smaller is more specific. Exact hosts first, then
/// wildcards by suffix length, then address ranges by prefix length.
pub(super) type Tier = (u8, usize);

/// Rule indices by destination, for one kind (HTTP or tcp) of one file.
#[derive(Clone, Debug, Default)]
pub(super) struct Matcher {
    exact: HashMap<Box<str>, Vec<usize>>,
    wildcard: HashMap<Box<str>, Vec<usize>>,
    /// Longest prefix first, then file order.
    ips: Vec<(IpNet, usize)>,
    /// Every rule index with a host destination, by port (for connections without a name).
    host_rules_by_port: HashMap<u16, Vec<usize>>,
}

impl Matcher {
    pub(super) fn insert(&mut self, index: usize, rule: &Rule) {
        match &rule.dest {
            Destination::Host(HostPattern::Exact(h)) => {
                self.exact.entry(h.as_str().into()).or_default().push(index);
            }
            Destination::Host(HostPattern::Wildcard(s)) => {
                self.wildcard
                    .entry(s.as_str().into())
                    .or_default()
                    .push(index);
            }
            Destination::Ip(net) => self.ips.push((*net, index)),
        }
        if matches!(rule.dest, Destination::Host(_)) {
            self.host_rules_by_port
                .entry(rule.port)
                .or_default()
                .push(index);
        }
    }

    pub(super) fn finish(&mut self) {
        // Stable: rules with the same prefix keep file order.
        self.ips
            .sort_by_key(|(net, _)| std::cmp::Reverse(net.prefix()));
    }

    /// Calls `pick` on each rule whose destination matches `host` (normalized) or `ip`, most
    /// specific first, and returns the first index it accepts with its tier.
    pub(super) fn find(
        &self,
        host: Option<&str>,
        ip: Option<IpAddr>,
        mut pick: impl FnMut(usize) -> bool,
    ) -> Option<(usize, Tier)> {
        if let Some(host) = host {
            if let Some(list) = self.exact.get(host)
                && let Some(&i) = list.iter().find(|&&i| pick(i))
            {
                return Some((i, (0, 0)));
            }
            if !self.wildcard.is_empty() {
                // Longest suffix first: walk the dots left to right.
                let mut rest = host;
                while let Some((_, suffix)) = rest.split_once('.') {
                    if let Some(list) = self.wildcard.get(suffix)
                        && let Some(&i) = list.iter().find(|&&i| pick(i))
                    {
                        return Some((i, (1, usize::MAX - suffix.len())));
                    }
                    rest = suffix;
                }
            }
        }
        if let Some(ip) = ip {
            for (net, i) in &self.ips {
                if net.contains(ip) && pick(*i) {
                    return Some((*i, (2, 128 - usize::from(net.prefix()))));
                }
            }
        }
        None
    }

    /// Rules with a host destination on `port`, in file order.
    pub(super) fn host_rules_on(&self, port: u16) -> &[usize] {
        self.host_rules_by_port
            .get(&port)
            .map_or(&[], Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(s: &str) -> Destination {
        Destination::Host(HostPattern::parse(s).expect(s))
    }

    fn ip(s: &str) -> Destination {
        Destination::Ip(IpNet::parse(s).expect(s))
    }

    #[test]
    fn destination_coverage() {
        assert!(host("api.example.test").covers(&host("api.example.test")));
        assert!(!host("api.example.test").covers(&host("x.example.test")));
        assert!(host("*.example.test").covers(&host("api.example.test")));
        assert!(host("*.example.test").covers(&host("a.b.example.test")));
        assert!(host("*.example.test").covers(&host("*.example.test")));
        assert!(host("*.example.test").covers(&host("*.b.example.test")));
        assert!(!host("*.example.test").covers(&host("example.test")));
        assert!(!host("*.b.example.test").covers(&host("*.example.test")));
        assert!(!host("api.example.test").covers(&host("*.example.test")));
        assert!(!host("*.example.test").covers(&host("*.other.test")));
        assert!(ip("10.0.0.0/8").covers(&ip("10.1.0.0/16")));
        assert!(!ip("10.0.0.0/8").covers(&host("10.1.2.3")));
        assert!(!host("10.1.2.3").covers(&ip("10.1.2.3")));
    }

    #[test]
    fn rule_refs_show_file_line_index_and_name() {
        let mut r = RuleRef {
            file: Arc::from(Path::new("p.toml")),
            index: 2,
            line: 9,
            name: None,
        };
        assert_eq!(r.to_string(), "p.toml:9 allow[2]");
        r.name = Some("chat".into());
        assert_eq!(r.to_string(), "p.toml:9 allow[2] (chat)");
    }
}

//! The decisions: per request, per connection and per DNS name. Every one walks the chain of
//! files that govern the cgroup, closest first; the fast path allocates nothing unless a rule has
//! limits, and reasons are only worked out for a denial.

use std::{
    borrow::Cow,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, SystemTime},
};

use http::{HeaderMap, Method};

use super::{
    Policy, PolicyFile,
    glob::is_canonical,
    host::{HostPattern, normalize_host},
    limits::LimitKey,
    rule::{Miss, Req, Rule, RuleRef, Tier},
};
use crate::{cgroup::CgroupPath, inject::Injection, secret::SecretName, time::format_rfc3339};

/// One HTTP request, as the proxy sees it after SNI, `Host` and `:authority` agreed.
#[derive(Clone, Copy, Debug)]
pub struct RequestInfo<'a> {
    pub method: &'a Method,
    /// The path, without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The request's host (any case, no port).
    pub host: &'a str,
    /// The original destination port.
    pub port: u16,
    /// The original destination address (what `ip` rules match).
    pub dst_ip: IpAddr,
    /// Whether the agent spoke TLS. Not used by the decision: the caller enforces the
    /// returned `plain_http` for requests without TLS.
    pub tls: bool,
    /// The time `not_after` is compared with.
    pub now: SystemTime,
}

/// An owned [`RequestInfo`], for benchmarks and tests.
#[derive(Clone, Debug)]
pub struct OwnedRequest {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub host: String,
    pub port: u16,
    pub dst_ip: IpAddr,
    pub tls: bool,
    pub now: SystemTime,
}

impl OwnedRequest {
    pub fn info(&self) -> RequestInfo<'_> {
        RequestInfo {
            method: &self.method,
            path: &self.path,
            headers: &self.headers,
            host: &self.host,
            port: self.port,
            dst_ip: self.dst_ip,
            tls: self.tls,
            now: self.now,
        }
    }
}

/// The answer for one HTTP request.
#[derive(Debug)]
pub enum RequestDecision<'a> {
    Allow {
        /// The closest file's rule that allowed it (it decides the injection).
        rule: &'a RuleRef,
        /// What to write into the request (may be empty).
        inject: &'a Injection,
        /// Whether credentials may be written over plain HTTP: every level's rule must say so
        /// (ARCHITECTURE invariant 2: off unless a rule says so).
        plain_http: bool,
        /// Whether credentials may go to any address whose certificate proves the name: every
        /// level's rule must say so. Otherwise the address dialed must be one of the name's.
        any_address: bool,
        /// How long the response may pause between frames, when the closest rule says.
        idle_timeout: Option<Duration>,
        /// Limits to check with a [`super::Limiter`] before forwarding, one per level whose
        /// rule has any; record the exchange's bytes and tokens against them afterwards.
        limit_keys: Vec<LimitKey>,
        /// Set when the request may go only once an operator approves it: the first rule (closest
        /// level first) that says `approve = "ask"` and that no standing approval covers.
        ask: Option<&'a RuleRef>,
    },
    Deny {
        /// Plain enough for an LLM agent to act on; never names a secret value.
        reason: String,
        /// The rule nearest to allowing it, if one came close (for the operator).
        rule: Option<&'a RuleRef>,
        /// The file that refused, when one covers the cgroup.
        file: Option<&'a Path>,
        /// An operator may still allow it: every level either allows the request with a rule
        /// or says `on_unknown = "ask"`. Approved, it goes with nothing injected.
        askable: bool,
    },
}

impl RequestDecision<'_> {
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// The answer for one accepted connection, before any request is read.
#[derive(Debug)]
pub enum ConnectionDecision<'a> {
    /// Terminate TLS (or read plain HTTP) and decide per request.
    Http,
    /// Splice the bytes to the original destination unread.
    Tcp {
        rule: &'a RuleRef,
        /// Limits to check once for the connection (rate and request budget count
        /// connections; a bytes budget counts spliced bytes).
        limit_keys: Vec<LimitKey>,
    },
    /// Close the connection.
    Deny {
        reason: String,
        file: Option<&'a Path>,
    },
}

/// Why a cgroup may not resolve a name ([`Policy::dns_allowed`]). Plain enough for the agent
/// to act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsDenial {
    #[error("no policy covers cgroup {cgroup}, so no name may be resolved")]
    NoPolicy { cgroup: CgroupPath },
    #[error("{name:?} is not a valid host name")]
    InvalidName { name: String },
    /// The cgroup's own file lists no name. `level`: the ancestor cgroup whose file refused,
    /// `None` when the cgroup's own file did.
    #[error("{cgroup} may not resolve any name{}", by_ancestor(.level.as_ref(), .cgroup))]
    NoNames {
        cgroup: CgroupPath,
        level: Option<CgroupPath>,
    },
    /// `name` is not among the names the cgroup's own file lists (`allowed`), or an ancestor's
    /// file (`level`) does not allow it.
    #[error(
        "{cgroup} may not resolve {name}{}; names it may resolve: {}",
        by_ancestor(.level.as_ref(), .cgroup),
        show_names(.allowed)
    )]
    NotListed {
        cgroup: CgroupPath,
        name: String,
        level: Option<CgroupPath>,
        allowed: Vec<HostPattern>,
    },
}

/// The first eight names, then `...` when there are more.
fn show_names(names: &[HostPattern]) -> String {
    let mut shown: Vec<String> = names.iter().take(8).map(ToString::to_string).collect();
    if names.len() > 8 {
        shown.push("...".into());
    }
    shown.join(", ")
}

/// A level's refusal.
#[derive(Debug)]
pub(super) struct Refusal<'p> {
    /// The file that refused; `None` when no file covers the cgroup.
    pub(super) level: Option<&'p PolicyFile>,
    /// The rule nearest to allowing it.
    pub(super) rule: Option<&'p Rule>,
    pub(super) reason: String,
}

/// A request every level allowed.
#[derive(Debug)]
pub(super) struct Granted<'p> {
    pub(super) rule: &'p Rule,
    pub(super) plain_http: bool,
    pub(super) any_address: bool,
    /// The first level's rule that asks for approval (see [`RequestDecision::Allow::ask`]).
    pub(super) ask: Option<&'p Rule>,
}

/// How a level would handle a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Http,
    Tcp(usize),
}

impl<'a> Req<'a> {
    pub(super) fn new(
        method: &'a str,
        path: &'a str,
        headers: Option<&'a HeaderMap>,
        host: &'a str,
        port: u16,
        ip: Option<IpAddr>,
        now: SystemTime,
    ) -> Self {
        Self {
            method,
            path,
            canonical_path: is_canonical(path),
            headers,
            host: normalize_host(host),
            raw_host: host,
            ip: ip.map(|ip| ip.to_canonical()),
            port,
            now,
        }
    }

    fn host_or_raw(&self) -> &str {
        self.host.as_deref().unwrap_or(self.raw_host)
    }

    /// `api.example.test/v1/files` (the port shown unless 443 or 80).
    fn target(&self) -> String {
        let host = self.host_or_raw();
        let host: Cow<'_, str> = if host.contains(':') {
            Cow::Owned(format!("[{host}]"))
        } else {
            Cow::Borrowed(host)
        };
        if matches!(self.port, 443 | 80) {
            format!("{host}{}", self.path)
        } else {
            format!("{host}:{}{}", self.port, self.path)
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
pub(super) fn show_dest(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn no_file(cgroup: &CgroupPath) -> String {
    format!(
        "no policy covers cgroup {cgroup}, so every destination is denied; ask the operator to \
         add a policy file for it"
    )
}

/// ` (by the policy for agents, which also applies to agents/coder)` for a level above the
/// closest, empty for the closest.
fn by_level(level: &PolicyFile, closest: bool, cgroup: &CgroupPath) -> String {
    by_ancestor((!closest).then_some(&level.cgroup), cgroup)
}

/// [`by_level`] from the refusing level's cgroup (`None` for the closest file).
fn by_ancestor(level: Option<&CgroupPath>, cgroup: &CgroupPath) -> String {
    match level {
        None => String::new(),
        Some(level) => format!(" (by the policy for {level}, which also applies to {cgroup})"),
    }
}

fn list<'s>(items: impl IntoIterator<Item = &'s str>) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(&i) {
            seen.push(i);
        }
    }
    seen.join(", ")
}

impl PolicyFile {
    /// The rule this file picks for a request: the most specific destination, then file order.
    /// `need`: secrets the rule must inject too (for levels above the closest).
    pub(super) fn select(&self, req: &Req<'_>, need: &[SecretName]) -> Option<usize> {
        if req.host.is_none() && req.ip.is_none() {
            return None;
        }
        self.http
            .find(req.host.as_deref(), req.ip, |i| {
                self.rules[i].first_miss(req, need).is_none()
            })
            .map(|(i, _)| i)
    }

    /// Why no rule of this file allows the request (the slow path of a denial).
    pub(super) fn refusal<'p>(
        &'p self,
        cgroup: &CgroupPath,
        req: &Req<'_>,
        need: &[SecretName],
        closest: bool,
    ) -> Refusal<'p> {
        let by = by_level(self, closest, cgroup);
        let refuse = |rule: Option<&'p Rule>, reason: String| Refusal {
            level: Some(self),
            rule,
            reason,
        };
        let mut candidates = Vec::new();
        if req.host.is_some() || req.ip.is_some() {
            self.http.find(req.host.as_deref(), req.ip, |i| {
                candidates.push(i);
                false
            });
        }
        let on_port: Vec<usize> = candidates
            .iter()
            .copied()
            .filter(|&i| self.rules[i].port == req.port)
            .collect();
        if on_port.is_empty() {
            return refuse(
                None,
                self.destination_refusal(cgroup, req.host_or_raw(), req.ip, req.port, &candidates)
                    + &by,
            );
        }
        let mut best: Option<(usize, Miss)> = None;
        for &i in &on_port {
            if let Some(miss) = self.rules[i].first_miss(req, need)
                && best.is_none_or(|(_, m)| miss > m)
            {
                best = Some((i, miss));
            }
        }
        let Some((bi, miss)) = best else {
            // Unreachable in practice: `select` found nothing, so every candidate missed.
            return refuse(
                None,
                format!("no rule allows {} for {cgroup}{by}", req.target()),
            );
        };
        let rule = &self.rules[bi];
        let method = req.method;
        let target = req.target();
        let reason = match miss {
            Miss::Port => format!("no rule allows {target} for {cgroup}"),
            Miss::Method => format!(
                "{method} is not allowed to {target} for {cgroup}{by}; allowed methods: {}",
                list(on_port.iter().flat_map(|&i| self.rules[i].methods.names()))
            ),
            Miss::PathNotCanonical => format!(
                "{method} {target} is not allowed for {cgroup}{by}: the path has `.` or `..` \
                 segments (also with path parameters, `..;`), empty segments, a backslash, or an \
                 encoded `/`, `\\` or `.`, and the rules for {} only match normalized paths",
                req.host_or_raw()
            ),
            Miss::Path => format!(
                "{method} {target} is not allowed for {cgroup}{by}; allowed paths for \
                 {method}: {}",
                list(
                    on_port
                        .iter()
                        .map(|&i| &self.rules[i])
                        .filter(|r| r.methods.allows_str(method))
                        .filter_map(|r| r.paths.as_deref())
                        .flatten()
                        .map(|p| p.as_str())
                )
            ),
            Miss::Header => format!(
                "{method} {target} is not allowed for {cgroup}{by}: the rule for it needs the \
                 request header{} {} with the value the policy requires",
                if rule.headers.len() == 1 { "" } else { "s" },
                list(rule.headers.iter().map(|(n, _)| n.as_str()))
            ),
            Miss::Secrets => format!(
                "{method} {target} is not allowed for {cgroup}{by}: that policy does not let \
                 the credentials injected for it be used there ({})",
                list(need.iter().map(SecretName::as_str))
            ),
            Miss::Expired => format!(
                "the rule allowing {target} for {cgroup}{by} expired at {}; ask the operator \
                 to renew it",
                rule.not_after.map(format_rfc3339).unwrap_or_default()
            ),
        };
        refuse(Some(rule), reason)
    }

    /// The reason when no rule of this file matches the destination now: an expired rule for it
    /// (so the agent knows to ask for a renewal), or else [`Self::destination_refusal`].
    /// `shown` is how the destination appears in the message.
    fn unmatched_destination(
        &self,
        cgroup: &CgroupPath,
        host: &str,
        ip: Option<IpAddr>,
        port: u16,
        now: SystemTime,
        shown: &str,
    ) -> String {
        let mut candidates = Vec::new();
        self.http.find(Some(host), ip, |i| {
            candidates.push(i);
            false
        });
        let expired = candidates
            .iter()
            .map(|&i| &self.rules[i])
            .find(|r| r.port == port && r.is_expired(now));
        match expired {
            Some(r) => format!(
                "the rule allowing {shown} for {cgroup} expired at {}; ask the operator to renew it",
                r.not_after.map(format_rfc3339).unwrap_or_default()
            ),
            None => self.destination_refusal(cgroup, host, ip, port, &candidates),
        }
    }

    /// The reason when no rule of this file names the destination on this port.
    fn destination_refusal(
        &self,
        cgroup: &CgroupPath,
        host: &str,
        ip: Option<IpAddr>,
        port: u16,
        candidates: &[usize],
    ) -> String {
        if normalize_host(host).is_none() {
            return format!("the destination host {host:?} is not a valid host name or address");
        }
        let dest = show_dest(host, port);
        let tcp_only = self
            .tcp
            .find(normalize_host(host).as_deref(), ip, |i| {
                self.rules[i].port == port
            })
            .is_some();
        if tcp_only {
            return format!(
                "{dest} is only allowed for cgroup {cgroup} as a passed-through TCP \
                 connection, not for HTTP requests"
            );
        }
        let mut ports: Vec<u16> = candidates.iter().map(|&i| self.rules[i].port).collect();
        ports.sort_unstable();
        ports.dedup();
        match ports.as_slice() {
            [] => format!("no rule allows {dest} for cgroup {cgroup}"),
            ports => format!(
                "no rule allows {dest} for cgroup {cgroup} (allowed port{} for this host: {})",
                if ports.len() == 1 { "" } else { "s" },
                ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// How this file would handle a connection: the most specific rule among HTTP and tcp
    /// rules. Without a name (no SNI), any HTTP host rule on the port could still match the
    /// request's `Host`, but a tcp rule that matches the address is more specific.
    fn connection_kind(
        &self,
        name: Option<&str>,
        ip: IpAddr,
        port: u16,
        now: SystemTime,
    ) -> Option<Kind> {
        let ok = |i: usize| {
            let r = &self.rules[i];
            r.port == port && !r.is_expired(now)
        };
        let ip_text;
        let host = match name {
            Some(n) => n,
            None => {
                ip_text = ip.to_string();
                &ip_text
            }
        };
        let http: Option<(Kind, Tier)> = self
            .http
            .find(Some(host), Some(ip), ok)
            .map(|(_, t)| (Kind::Http, t))
            .or_else(|| {
                let maybe = name.is_none()
                    && self
                        .http
                        .host_rules_on(port)
                        .iter()
                        .any(|&i| !self.rules[i].is_expired(now));
                maybe.then_some((Kind::Http, (3, 0)))
            });
        let tcp = self
            .tcp
            .find(Some(host), Some(ip), ok)
            .map(|(i, t)| (Kind::Tcp(i), t));
        match (http, tcp) {
            (Some(h), Some(t)) => Some(if t.1 < h.1 { t.0 } else { h.0 }),
            (h, t) => h.or(t).map(|(k, _)| k),
        }
    }
}

impl Policy {
    /// Evaluates a request against every level. `each_level` sees each level's rule, closest
    /// first (to collect limit keys).
    pub(super) fn evaluate<'p>(
        &'p self,
        cgroup: &CgroupPath,
        req: &Req<'_>,
        mut each_level: impl FnMut(&'p PolicyFile, &'p Rule),
    ) -> Result<Granted<'p>, Refusal<'p>> {
        let Some(fi) = self.governing(cgroup.as_str()) else {
            return Err(Refusal {
                level: None,
                rule: None,
                reason: no_file(cgroup),
            });
        };
        let file = &self.files[fi];
        let Some(ri) = file.select(req, &[]) else {
            return Err(file.refusal(cgroup, req, &[], true));
        };
        let rule = &file.rules[ri];
        each_level(file, rule);
        let mut plain_http = rule.plain_http;
        let mut any_address = rule.any_address;
        let asks = |level: &PolicyFile, r: &'p Rule| {
            (r.ask && !level.approves(req.host.as_deref(), req.port, req.method)).then_some(r)
        };
        let mut ask = asks(file, rule);
        for &ai in &file.ancestors {
            let level = &self.files[ai];
            let Some(i) = level.select(req, &rule.secrets) else {
                return Err(level.refusal(cgroup, req, &rule.secrets, false));
            };
            let r = &level.rules[i];
            plain_http &= r.plain_http;
            any_address &= r.any_address;
            ask = ask.or_else(|| asks(level, r));
            each_level(level, r);
        }
        Ok(Granted {
            rule,
            plain_http,
            any_address,
            ask,
        })
    }

    /// Whether an operator may allow a request the policy refused: every level governing
    /// `cgroup` allows it with some rule (secrets aside: an approved request carries none) or
    /// says `on_unknown = "ask"`, and at least one says so.
    pub(super) fn askable(&self, cgroup: &CgroupPath, req: &Req<'_>) -> bool {
        let Some(fi) = self.governing(cgroup.as_str()) else {
            return false;
        };
        let levels = std::iter::once(fi).chain(self.files[fi].ancestors.iter().copied());
        let mut asked = false;
        for level in levels.map(|i| &self.files[i]) {
            if level.select(req, &[]).is_some() {
                continue;
            }
            if !level.on_unknown_ask {
                return false;
            }
            asked = true;
        }
        asked
    }

    /// Decides one HTTP request from `cgroup`: every file governing it must allow it; the
    /// closest file's rule says what to inject; every level's rule adds its limits.
    pub fn decide_request(
        &self,
        cgroup: &CgroupPath,
        req: &RequestInfo<'_>,
    ) -> RequestDecision<'_> {
        let r = Req::new(
            req.method.as_str(),
            req.path,
            Some(req.headers),
            req.host,
            req.port,
            Some(req.dst_ip),
            req.now,
        );
        let mut limit_keys = Vec::new();
        let decided = self.evaluate(cgroup, &r, |_, rule| {
            if let Some(k) = &rule.limit {
                limit_keys.push(k.clone());
            }
        });
        match decided {
            Ok(g) => RequestDecision::Allow {
                rule: &g.rule.rule_ref,
                inject: &g.rule.inject,
                plain_http: g.plain_http,
                any_address: g.any_address,
                idle_timeout: g.rule.idle_timeout,
                limit_keys,
                ask: g.ask.map(|r| &r.rule_ref),
            },
            Err(refusal) => RequestDecision::Deny {
                askable: refusal.level.is_some() && self.askable(cgroup, &r),
                reason: refusal.reason,
                rule: refusal.rule.map(|r| &r.rule_ref),
                file: refusal.level.map(|f| &*f.path),
            },
        }
    }

    /// Decides a connection from `cgroup` to `dst` before reading any request. `name` is the
    /// TLS server name, or for a connection without TLS a name brokerd's DNS answered with
    /// `dst`'s address (if it keeps track); `None` otherwise. Without a name, `ip` rules and
    /// exact-address `host` rules match the address, and any HTTP `host` rule on the port lets
    /// the connection through to be decided per request by its `Host`.
    pub fn decide_connection(
        &self,
        cgroup: &CgroupPath,
        dst: SocketAddr,
        name: Option<&str>,
        now: SystemTime,
    ) -> ConnectionDecision<'_> {
        let Some(fi) = self.governing(cgroup.as_str()) else {
            return ConnectionDecision::Deny {
                reason: no_file(cgroup),
                file: None,
            };
        };
        let file = &self.files[fi];
        fn deny(level: &PolicyFile, reason: String) -> ConnectionDecision<'_> {
            ConnectionDecision::Deny {
                reason,
                file: Some(&level.path),
            }
        }
        let name = match name {
            None => None,
            Some(n) => match HostPattern::parse(n) {
                Ok(HostPattern::Exact(h)) => Some(Cow::<str>::Owned(h)),
                _ => {
                    return deny(
                        file,
                        format!("the server name {n:?} is not a valid host name"),
                    );
                }
            },
        };
        let ip = dst.ip().to_canonical();
        let port = dst.port();
        let shown = name
            .as_deref()
            .map_or_else(|| show_dest(&ip.to_string(), port), |n| show_dest(n, port));
        let Some(kind) = file.connection_kind(name.as_deref(), ip, port, now) else {
            let host = name
                .as_deref()
                .map_or_else(|| ip.to_string(), str::to_string);
            let reason = file.unmatched_destination(cgroup, &host, Some(ip), port, now, &shown);
            return deny(file, reason);
        };
        let mut limit_keys = Vec::new();
        if let Kind::Tcp(i) = kind {
            limit_keys.extend(file.rules[i].limit.clone());
        }
        for &ai in &file.ancestors {
            let level = &self.files[ai];
            let by = by_level(level, false, cgroup);
            match (kind, level.connection_kind(name.as_deref(), ip, port, now)) {
                (Kind::Http, Some(Kind::Http)) => {}
                (Kind::Tcp(_), Some(Kind::Tcp(j))) => {
                    limit_keys.extend(level.rules[j].limit.clone());
                }
                (Kind::Http, Some(Kind::Tcp(_))) => {
                    return deny(
                        level,
                        format!("{shown} may only be passed through unread for {cgroup}{by}"),
                    );
                }
                (Kind::Tcp(_), Some(Kind::Http)) => {
                    return deny(
                        level,
                        format!("{shown} may not be passed through unread for {cgroup}{by}"),
                    );
                }
                (_, None) => {
                    return deny(level, format!("no rule allows {shown} for {cgroup}{by}"));
                }
            }
        }
        match kind {
            Kind::Http => ConnectionDecision::Http,
            Kind::Tcp(i) => ConnectionDecision::Tcp {
                rule: &file.rules[i].rule_ref,
                limit_keys,
            },
        }
    }

    /// Whether `cgroup` may resolve `name` (any case, trailing dot allowed): every governing
    /// file must allow it, by its `[dns] allow` list or, without one, by its `host` rules.
    pub fn dns_allowed(&self, cgroup: &CgroupPath, name: &str) -> Result<(), DnsDenial> {
        let Some(fi) = self.governing(cgroup.as_str()) else {
            return Err(DnsDenial::NoPolicy {
                cgroup: cgroup.clone(),
            });
        };
        let valid = matches!(HostPattern::parse(name), Ok(HostPattern::Exact(ref h)) if h.parse::<IpAddr>().is_err());
        let normalized = normalize_host(name).filter(|_| valid);
        let Some(name) = normalized else {
            return Err(DnsDenial::InvalidName {
                name: name.to_string(),
            });
        };
        let file = &self.files[fi];
        for (n, level) in std::iter::once(fi)
            .chain(file.ancestors.iter().copied())
            .map(|i| &self.files[i])
            .enumerate()
        {
            // A file that asks about unknown destinations lets its agents resolve any name,
            // unless it lists the names in `[dns]`.
            let asks = level.on_unknown_ask && !level.dns.is_explicit();
            if !asks && !level.dns.allows(&name) {
                let cgroup = cgroup.clone();
                let level = (n > 0).then(|| level.cgroup.clone());
                // What the agent may resolve is what its own (closest) file lists.
                let allowed = file.dns.patterns();
                return Err(if allowed.is_empty() {
                    DnsDenial::NoNames { cgroup, level }
                } else {
                    DnsDenial::NotListed {
                        cgroup,
                        name: name.into_owned(),
                        level,
                        allowed: allowed.to_vec(),
                    }
                });
            }
        }
        Ok(())
    }
}

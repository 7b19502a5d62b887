//! Answers for operators: why a request would be allowed or denied ([`Policy::explain`]), and
//! what a cgroup may do after narrowing ([`Policy::effective`], for `brokerctl policy show`).

use std::{fmt, net::IpAddr, path::PathBuf, time::SystemTime};

use http::Method;

use super::{
    Policy, PolicyFile,
    dns::DnsNames,
    limits::{Budget, Rate},
    rule::{Req, Rule, RuleRef},
};
use crate::{cgroup::CgroupPath, time::format_rfc3339};

/// A question `policy explain` cannot ask.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("invalid URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("invalid method {0:?}: a method is a word such as GET or POST")]
    Method(String),
}

/// Why `METHOD URL` from a cgroup would be allowed or denied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub allowed: bool,
    pub cgroup: CgroupPath,
    pub method: String,
    pub url: String,
    /// For a denial, the reason the agent would get.
    pub reason: Option<String>,
    /// For an allow, the closest file's rule (it decides the injection); for a denial, the
    /// refusing file's rule that came nearest, if any.
    pub rule: Option<RuleRef>,
    /// For an allow, the closest file; for a denial, the file that refused.
    pub file: Option<PathBuf>,
    /// For a denial, the cgroup whose file refused (the closest governing file, or an
    /// ancestor's); `None` when no file covers the cgroup.
    pub refused_by: Option<CgroupPath>,
    /// For an allow, the rule of each level, closest first, with its file's cgroup.
    pub levels: Vec<(RuleRef, CgroupPath)>,
    /// For an allow, where credentials are written (`header authorization`, `basic auth`,
    /// `query api_key`); never values.
    pub injects: Vec<String>,
    /// For an allow, the limits counted, one line per level.
    pub limits: Vec<String>,
    /// For an allow, whether credentials may be written over plain HTTP.
    pub plain_http: bool,
    /// For an allow, whether credentials may go to any address whose certificate is valid for
    /// the host (every level's rule says `any_address = true`), not only to the host's own.
    pub any_address: bool,
    /// What the question could not show (headers, addresses).
    pub notes: Vec<String>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allow" } else { "deny" };
        write!(
            f,
            "{verdict} {} {} for {}",
            self.method, self.url, self.cgroup
        )?;
        if let Some(reason) = &self.reason {
            write!(f, ": {reason}")?;
        }
        writeln!(f)?;
        if self.allowed {
            for (i, (rule, cgroup)) in self.levels.iter().enumerate() {
                let role = if i == 0 { "rule" } else { "within" };
                writeln!(f, "  {role}: {rule} (cgroup {cgroup})")?;
            }
            if self.injects.is_empty() {
                writeln!(f, "  injects: nothing")?;
            } else {
                writeln!(f, "  injects: {}", self.injects.join(", "))?;
            }
            if self.plain_http {
                writeln!(
                    f,
                    "  plain_http: credentials may be written over plain HTTP"
                )?;
            }
            if self.any_address {
                writeln!(
                    f,
                    "  any_address: credentials may go to any address whose certificate is \
                     valid for the host, not only to those the host resolves to"
                )?;
            }
            for limit in &self.limits {
                writeln!(f, "  limit: {limit}")?;
            }
        } else {
            match (&self.refused_by, &self.file) {
                (Some(cgroup), Some(file)) => {
                    writeln!(f, "  refused by: {} (cgroup {cgroup})", file.display())?;
                }
                _ => writeln!(f, "  refused by: no policy file governs {}", self.cgroup)?,
            }
            if let Some(rule) = &self.rule {
                writeln!(f, "  nearest rule: {rule}")?;
            }
        }
        for note in &self.notes {
            writeln!(f, "  note: {note}")?;
        }
        Ok(())
    }
}

/// A URL taken apart for a policy question.
struct Target {
    host: String,
    port: u16,
    path: String,
    tls: bool,
}

fn parse_url(url: &str) -> Result<Target, ExplainError> {
    let fail = |reason: &str| ExplainError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: http::Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| fail(&e.to_string()))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(fail("give an http:// or https:// URL")),
    };
    let host = uri
        .host()
        .ok_or_else(|| fail("no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let path = match uri.path() {
        "" => "/".to_string(),
        p => p.to_string(),
    };
    Ok(Target {
        host,
        port,
        path,
        tls,
    })
}

fn limit_line(rule: &Rule, level: &PolicyFile) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(r) = &rule.rate {
        parts.push(format!("rate = {r}"));
    }
    if let Some(b) = &rule.budget {
        parts.push(format!("budget = {b}"));
    }
    (!parts.is_empty()).then(|| {
        format!(
            "{} (counted for all of {}, {})",
            parts.join(", "),
            level.cgroup,
            rule.rule_ref
        )
    })
}

impl Policy {
    /// Whether `method url` from `cgroup` would be allowed at `now`, which rule and file decided,
    /// and for a denial which level refused. Request headers are unknown here, so rules with
    /// `headers` conditions do not match; for a URL naming a host, `ip` rules are not consulted
    /// (the address is only known for a real connection).
    pub fn explain(
        &self,
        cgroup: &CgroupPath,
        method: &str,
        url: &str,
        now: SystemTime,
    ) -> Result<Explanation, ExplainError> {
        let method_upper = method.to_ascii_uppercase();
        let parsed = Method::from_bytes(method_upper.as_bytes())
            .map_err(|_| ExplainError::Method(method.to_string()))?;
        let target = parse_url(url)?;
        let ip = target.host.parse::<IpAddr>().ok();
        let req = Req::new(
            parsed.as_str(),
            &target.path,
            None,
            &target.host,
            target.port,
            ip,
            now,
        );
        let mut notes = Vec::new();
        if ip.is_none() {
            notes.push(
                "the URL names a host, so `ip` rules were not consulted (they match the \
                 address a real connection goes to)"
                    .to_string(),
            );
        }
        let chain = self.chain(cgroup);
        if chain
            .iter()
            .flat_map(|f| &f.rules)
            .any(|r| !r.headers.is_empty())
        {
            notes.push(
                "no request headers are known here, so rules with `headers` conditions did not \
                 match"
                    .to_string(),
            );
        }
        let mut levels = Vec::new();
        let mut limits = Vec::new();
        let decided = self.evaluate(cgroup, &req, |level, rule| {
            levels.push((rule.rule_ref.clone(), level.cgroup.clone()));
            limits.extend(limit_line(rule, level));
        });
        let base = Explanation {
            allowed: false,
            cgroup: cgroup.clone(),
            method: method_upper,
            url: url.to_string(),
            reason: None,
            rule: None,
            file: None,
            refused_by: None,
            levels: Vec::new(),
            injects: Vec::new(),
            limits: Vec::new(),
            plain_http: false,
            any_address: false,
            notes,
        };
        Ok(match decided {
            Ok(g) => {
                let mut e = Explanation {
                    allowed: true,
                    rule: Some(g.rule.rule_ref.clone()),
                    file: Some(g.rule.rule_ref.file.to_path_buf()),
                    levels,
                    injects: g.rule.inject.slots(),
                    limits,
                    plain_http: g.plain_http,
                    any_address: g.any_address,
                    ..base
                };
                if let Some(asking) = g.ask.map(|r| &r.rule_ref) {
                    e.notes.push(format!(
                        "each such request waits for an operator's approval ({asking} says \
                         approve = \"ask\")"
                    ));
                }
                if !target.tls && !g.plain_http && !g.rule.inject.is_empty() {
                    e.notes.push(
                        "over plain HTTP the broker refuses to write these credentials (no \
                         plain_http on every level's rule)"
                            .to_string(),
                    );
                }
                if ip.is_none() && !g.rule.inject.is_empty() && (!target.tls || !g.any_address) {
                    let host = &target.host;
                    let lifted = if target.tls {
                        "; any_address = true on every level's rule would let any address \
                         whose certificate is valid for it have them"
                    } else {
                        ""
                    };
                    e.notes.push(format!(
                        "the credentials go only to an address {host} resolves to (brokerd's \
                         DNS answer to the agent, or brokerd's own lookup); a call to another \
                         address is refused{lifted}"
                    ));
                }
                e
            }
            Err(refusal) => {
                let mut notes = base.notes.clone();
                if refusal.level.is_some() && self.askable(cgroup, &req) {
                    notes.push(
                        "on_unknown = \"ask\": the request would be held for an operator's \
                         approval, and if approved it goes with no credentials written into it"
                            .to_string(),
                    );
                }
                Explanation {
                    reason: Some(refusal.reason),
                    rule: refusal.rule.map(|r| r.rule_ref.clone()),
                    file: refusal.level.map(|l| l.path.to_path_buf()),
                    refused_by: refusal.level.map(|l| l.cgroup.clone()),
                    notes,
                    ..base
                }
            }
        })
    }

    /// The rules `cgroup` has after narrowing: the closest file's rules, each with the parent
    /// rules that cover it, the earliest expiry and every level's limits.
    pub fn effective(&self, cgroup: &CgroupPath) -> EffectivePolicy {
        let chain = self.chain(cgroup);
        let mut rules = Vec::new();
        if let Some(closest) = chain.first() {
            for (ri, rule) in closest.rules.iter().enumerate() {
                let mut within = Vec::new();
                let mut not_after = rule.not_after;
                let mut plain_http = rule.plain_http;
                let mut any_address = rule.any_address;
                let mut limits = Vec::new();
                limits.extend(limit_of(rule, closest));
                // Follow the covering rule up the chain.
                let mut current = (*closest, ri);
                for level in chain.iter().skip(1) {
                    let Some(pi) = current.0.covering.get(current.1).copied().flatten() else {
                        break;
                    };
                    let p = &level.rules[pi];
                    within.push((p.rule_ref.clone(), level.cgroup.clone()));
                    not_after = match (not_after, p.not_after) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    plain_http &= p.plain_http;
                    any_address &= p.any_address;
                    limits.extend(limit_of(p, level));
                    current = (*level, pi);
                }
                rules.push(EffectiveRule {
                    rule: rule.clone(),
                    within,
                    not_after,
                    plain_http,
                    any_address,
                    limits,
                });
            }
        }
        EffectivePolicy {
            cgroup: cgroup.clone(),
            files: chain
                .iter()
                .map(|f| (f.path.to_path_buf(), f.cgroup.clone()))
                .collect(),
            dns: chain
                .iter()
                .map(|f| (f.cgroup.clone(), f.dns.clone()))
                .collect(),
            shares: self.shares(cgroup),
            rules,
        }
    }
}

fn limit_of(rule: &Rule, level: &PolicyFile) -> Option<EffectiveLimit> {
    (rule.rate.is_some() || rule.budget.is_some()).then(|| EffectiveLimit {
        cgroup: level.cgroup.clone(),
        rule: rule.rule_ref.clone(),
        rate: rule.rate,
        budget: rule.budget,
        key: rule.limit.clone(),
    })
}

/// The narrowed policy of one cgroup. Displays as TOML-like text (comments say where each
/// part comes from).
#[derive(Clone, Debug)]
pub struct EffectivePolicy {
    pub cgroup: CgroupPath,
    /// Every governing file with its cgroup, closest first; empty: everything is denied.
    pub files: Vec<(PathBuf, CgroupPath)>,
    /// Each level's DNS names, closest first; a name must be allowed by all.
    pub dns: Vec<(CgroupPath, DnsNames)>,
    /// Each agent's share of brokerd (`[shares]`, narrowed across the levels).
    pub shares: super::Shares,
    pub rules: Vec<EffectiveRule>,
}

/// One rule of the closest file, with what the levels above add.
#[derive(Clone, Debug)]
pub struct EffectiveRule {
    pub rule: Rule,
    /// The covering rule at each level above, nearest first.
    pub within: Vec<(RuleRef, CgroupPath)>,
    /// The earliest `not_after` along the chain.
    pub not_after: Option<SystemTime>,
    /// Whether every level's rule allows credentials over plain HTTP.
    pub plain_http: bool,
    /// Whether every level's rule lets credentials go to any address whose certificate is valid
    /// for the host.
    pub any_address: bool,
    /// Every level's limits, closest first.
    pub limits: Vec<EffectiveLimit>,
}

/// The limits of one level's rule.
#[derive(Clone, Debug)]
pub struct EffectiveLimit {
    /// Counted for everything this cgroup's file governs.
    pub cgroup: CgroupPath,
    pub rule: RuleRef,
    pub rate: Option<Rate>,
    pub budget: Option<Budget>,
    /// The counters' key, to read what is left ([`super::Limiter::remaining`]).
    pub key: Option<super::LimitKey>,
}

fn quoted(items: impl IntoIterator<Item = String>) -> String {
    let items: Vec<String> = items.into_iter().map(|s| format!("{s:?}")).collect();
    format!("[{}]", items.join(", "))
}

impl fmt::Display for EffectivePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((closest, _)) = self.files.first() else {
            return writeln!(
                f,
                "# no policy file governs {}: every request is denied",
                self.cgroup
            );
        };
        writeln!(f, "# effective policy for {}", self.cgroup)?;
        writeln!(
            f,
            "# governed by, closest first (a request must be allowed by each; credentials come \
             from {}):",
            closest.display()
        )?;
        for (path, cgroup) in &self.files {
            writeln!(f, "#   {} (cgroup {cgroup})", path.display())?;
        }
        if let Some((_, dns)) = self.dns.first() {
            writeln!(f, "\n[dns]")?;
            let source = if dns.is_explicit() {
                "its [dns] table"
            } else {
                "its host rules"
            };
            writeln!(
                f,
                "allow = [{dns}]  # from {}",
                if dns.patterns().is_empty() {
                    "nothing".to_string()
                } else {
                    source.to_string()
                }
            )?;
            for (cgroup, dns) in self.dns.iter().skip(1) {
                writeln!(
                    f,
                    "# and each name must also be allowed for {cgroup}: [{dns}]"
                )?;
            }
        }
        writeln!(
            f,
            "\n[shares]  # each agent's own; the smallest value of the levels, else the default"
        )?;
        for kind in super::ShareKind::ALL {
            writeln!(f, "{} = {}", kind.field(), self.shares.get(kind))?;
        }
        if self.rules.is_empty() {
            writeln!(f, "\n# no rules: every request is denied")?;
        }
        for e in &self.rules {
            let r = &e.rule;
            write!(f, "\n[[allow]]  # {}", r.rule_ref)?;
            if !e.within.is_empty() {
                let within: Vec<String> = e.within.iter().map(|(r, _)| r.to_string()).collect();
                write!(f, "; within {}", within.join(", "))?;
            }
            writeln!(f)?;
            if let Some(name) = &r.name {
                writeln!(f, "name = {name:?}")?;
            }
            writeln!(f, "{} = \"{}\"", r.dest.field(), r.dest)?;
            writeln!(f, "port = {}", r.port)?;
            if r.tcp {
                writeln!(f, "tcp = true")?;
            }
            if !r.methods.is_any() {
                writeln!(
                    f,
                    "methods = {}",
                    quoted(r.methods.names().into_iter().map(str::to_string))
                )?;
            }
            if let Some(paths) = &r.paths {
                writeln!(
                    f,
                    "paths = {}",
                    quoted(paths.iter().map(|p| p.as_str().to_string()))
                )?;
            }
            if !r.headers.is_empty() {
                let h: Vec<String> = r
                    .headers
                    .iter()
                    .map(|(n, v)| format!("{n:?} = {v:?}"))
                    .collect();
                writeln!(f, "headers = {{ {} }}", h.join(", "))?;
            }
            if e.plain_http {
                writeln!(f, "plain_http = true")?;
            } else if r.plain_http {
                writeln!(f, "# plain_http = true here, but not on every level above")?;
            }
            if e.any_address {
                writeln!(f, "any_address = true")?;
            } else if r.any_address {
                writeln!(f, "# any_address = true here, but not on every level above")?;
            }
            if let Some(t) = e.not_after {
                let note = if e.not_after == r.not_after {
                    ""
                } else {
                    "  # set by a level above"
                };
                writeln!(f, "not_after = \"{}\"{note}", format_rfc3339(t))?;
            }
            for (name, t) in r.inject.headers.headers() {
                writeln!(f, "inject.headers.{name} = {:?}", t.as_str())?;
            }
            if let Some(b) = &r.inject.basic_auth {
                writeln!(
                    f,
                    "inject.basic_auth = {{ username = {:?}, password = {:?} }}",
                    b.username.as_str(),
                    b.password.as_str()
                )?;
            }
            for (name, t) in &r.inject.query {
                if name.contains(['[', ']']) {
                    writeln!(f, "inject.query.{name:?} = {:?}", t.as_str())?;
                } else {
                    writeln!(f, "inject.query.{name} = {:?}", t.as_str())?;
                }
            }
            if !e.limits.is_empty() {
                writeln!(
                    f,
                    "# limits (each counted for everything its level's file governs):"
                )?;
                for l in &e.limits {
                    if let Some(rate) = &l.rate {
                        writeln!(f, "#   rate = {rate}  # {}, {}", l.cgroup, l.rule)?;
                    }
                    if let Some(budget) = &l.budget {
                        writeln!(f, "#   budget = {budget}  # {}, {}", l.cgroup, l.rule)?;
                    }
                }
            }
        }
        Ok(())
    }
}

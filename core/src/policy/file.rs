//! One policy file: its TOML shape, and errors located by file, line and field.
//!
//! Parsing happens in two steps. serde reads the text into the `Raw*` types (spans kept with
//! [`Spanned`]), then [`compile`] validates every value and builds the [`PolicyFile`]. Errors of
//! either step become a [`PolicyFileError`] with a line number from the span and a field path
//! (`allow[1].inject.headers.authorization`) found by walking the document.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use http::HeaderName;
use serde::Deserialize;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{
    HostPattern, PolicyFile,
    cidr::IpNet,
    clock,
    dns::DnsNames,
    glob::PathPattern,
    limits::{Budget, Rate, RatePeriod},
    method::MethodSet,
    rule::{Destination, Rule, RuleRef, Spans},
    shares::{ShareKind, SharesSpec},
};
use crate::{
    cgroup::CgroupPath,
    inject::{
        AwsSigV4, BasicAuth, CaptureTokens, InjectSpec, Injection, Template, parse_header_name,
        parse_query_name,
    },
    secret::SecretName,
};

/// The port a rule applies to when it names none.
pub const DEFAULT_PORT: u16 = 443;

/// A policy file as written. Every struct refuses unknown fields, so a typo is an error rather
/// than a silently ignored rule. policies/README.md documents each field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// The cgroup subtree the file governs, relative to the cgroup2 mount.
    cgroup: Spanned<String>,
    /// Names the agents may resolve; absent: the names of the file's `host` rules.
    dns: Option<Spanned<RawDns>>,
    /// Allow rules; none means everything is denied.
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
    /// Each agent's share of brokerd (see [`super::shares`]).
    shares: Option<Spanned<RawShares>>,
    /// What happens to a request no rule allows: `deny` (the default) or `ask` (held for an
    /// operator's approval).
    on_unknown: Option<Spanned<String>>,
    /// This file holds decisions brokerd wrote ("allow always"): its rules and `approved`
    /// entries join those of the policy file for the same cgroup, which must exist.
    approvals: Option<Spanned<bool>>,
    /// Requests that a rule with `approve = "ask"` lets through without asking.
    #[serde(default)]
    approved: Vec<Spanned<RawApproved>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApproved {
    /// The exact host name or address.
    host: Spanned<String>,
    /// The destination port, default 443.
    port: Option<u16>,
    /// The methods; absent: all.
    methods: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShares {
    /// Connections open at once.
    connections: Option<Spanned<i64>>,
    /// New connections per second.
    new_connections_per_second: Option<Spanned<i64>>,
    /// Connections not yet at HTTP (first bytes, TLS handshake).
    pending_handshakes: Option<Spanned<i64>>,
    /// HTTP requests in flight.
    requests_in_flight: Option<Spanned<i64>>,
    /// DNS queries per second.
    dns_queries_per_second: Option<Spanned<i64>>,
    /// HTTP requests started per second.
    requests_per_second: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDns {
    /// Exact names and `*.suffix` patterns.
    allow: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    /// A label for audit records and limit counters; unique in the file.
    name: Option<Spanned<String>>,
    /// Destination by name: exact or `*.suffix`.
    host: Option<Spanned<String>>,
    /// Destination by address: one address or a CIDR range.
    ip: Option<Spanned<String>>,
    /// Destination port, default 443.
    port: Option<Spanned<u16>>,
    /// Pass the connection through without interception.
    tcp: Option<Spanned<bool>>,
    /// Allowed request methods; absent: all.
    methods: Option<Spanned<Vec<Spanned<String>>>>,
    /// Allowed request paths (exact or globs); absent: all.
    paths: Option<Spanned<Vec<Spanned<String>>>>,
    /// Request headers that must have exactly these values.
    headers: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    /// Allow writing credentials over plain HTTP.
    plain_http: Option<Spanned<bool>>,
    /// Let credentials go to any address that proves the name, not only the name's own.
    any_address: Option<Spanned<bool>>,
    /// The rule stops matching after this instant.
    not_after: Option<Spanned<toml::Value>>,
    /// How long a response may pause between two frames (streams have no total deadline).
    idle_timeout: Option<Spanned<String>>,
    /// Requests per second or minute, with a burst.
    rate: Option<Spanned<RawRate>>,
    /// Daily request, byte and token budgets.
    budget: Option<Spanned<RawBudget>>,
    /// Credentials written into matching requests.
    inject: Option<Spanned<RawInject>>,
    /// `auto` (the default) or `ask`: hold each matching request until an operator approves it.
    approve: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    per_second: Option<Spanned<u32>>,
    per_minute: Option<Spanned<u32>>,
    burst: Option<Spanned<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    requests_per_day: Option<Spanned<u64>>,
    bytes_per_day: Option<Spanned<u64>>,
    tokens_per_day: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, Spanned<String>>,
    basic_auth: Option<Spanned<RawBasicAuth>>,
    #[serde(default)]
    query: BTreeMap<Spanned<String>, Spanned<String>>,
    aws_sigv4: Option<Spanned<RawSigV4>>,
    capture_tokens: Option<Spanned<RawCapture>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    use_at: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSigV4 {
    secret: Spanned<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    regions: Vec<String>,
    #[serde(default)]
    actions: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBasicAuth {
    username: Spanned<String>,
    password: Spanned<String>,
}

/// A problem in one policy file, located for the operator: `policies/demo.toml:4:8: allow[0].host:
/// ...`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {}{message}", path.display(), field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct PolicyFileError {
    pub path: PathBuf,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    /// Dotted path of the field at fault, when there is one (`allow[0].port`).
    pub field: Option<String>,
    pub message: String,
}

/// Turns spans into lines and field paths for one file.
struct Locator<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Locator<'_> {
    /// 1-based line and column (in characters) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..floor_char_boundary(self.text, offset.min(self.text.len()))];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    fn error(
        &self,
        span: Option<Range<usize>>,
        field: Option<String>,
        message: impl fmt::Display,
    ) -> PolicyFileError {
        let (line, column) = self.position(span.map_or(0, |s| s.start));
        PolicyFileError {
            path: self.path.to_path_buf(),
            line,
            column,
            field,
            message: message.to_string(),
        }
    }

    /// A serde/TOML error: the field path comes from the document tree at the error's offset.
    fn toml_error(&self, e: &toml::de::Error) -> PolicyFileError {
        let span = e.span();
        let mut field = span.as_ref().and_then(|s| field_at(self.text, s.start));
        // serde points a missing field at its table; name the field itself.
        let missing = e
            .message()
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name);
        if let Some(name) = missing {
            field = Some(match field {
                Some(table) => format!("{table}.{}", key_segment(name)),
                None => key_segment(name),
            });
        }
        self.error(span, field, e.message().trim_end())
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The dotted path of the innermost key or value containing `offset`, if the text parses.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let doc = DeTable::parse(text).ok()?;
    let mut path = Vec::new();
    find_in_table(doc.get_ref(), offset, &mut path).then(|| path.concat())
}

/// Pushes the path segments leading to `offset` and says whether it was found. Container spans
/// are not trusted to enclose their children (an array of tables spans only its first
/// `[[header]]`), so every child is searched before the container itself is considered.
fn find_in_table(table: &DeTable<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    for (key, value) in table.iter() {
        let segment = if path.is_empty() {
            key_segment(key.get_ref())
        } else {
            format!(".{}", key_segment(key.get_ref()))
        };
        path.push(segment);
        if key.span().contains(&offset)
            || find_in_value(value.get_ref(), offset, path)
            || value.span().contains(&offset)
        {
            return true;
        }
        path.pop();
    }
    false
}

fn find_in_value(value: &DeValue<'_>, offset: usize, path: &mut Vec<String>) -> bool {
    match value {
        DeValue::Table(t) => find_in_table(t, offset, path),
        DeValue::Array(items) => items.iter().enumerate().any(|(i, item)| {
            path.push(format!("[{i}]"));
            let found =
                find_in_value(item.get_ref(), offset, path) || item.span().contains(&offset);
            if !found {
                path.pop();
            }
            found
        }),
        _ => false,
    }
}

/// A key as it appears in a dotted path: bare when TOML allows it bare, quoted otherwise.
fn key_segment(key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Collects the errors of one rule, each located and named `allow[N].field`.
struct RuleErrors<'a, 'l> {
    loc: &'a Locator<'l>,
    index: usize,
    list: &'a mut Vec<PolicyFileError>,
}

impl RuleErrors<'_, '_> {
    fn at(&mut self, span: Range<usize>, field: &str, message: impl fmt::Display) {
        let field = if field.is_empty() {
            format!("allow[{}]", self.index)
        } else {
            format!("allow[{}].{field}", self.index)
        };
        self.list
            .push(self.loc.error(Some(span), Some(field), message));
    }
}

/// What makes two rules of a file the same rule.
#[derive(PartialEq, Eq, Hash)]
struct MatchKey {
    dest: Destination,
    port: u16,
    tcp: bool,
    methods: MethodSet,
    paths: Option<Vec<String>>,
    headers: Vec<(String, String)>,
}

/// Parses and validates one file. Returns every problem found (serde stops at its first).
pub(super) fn compile(path: &Path, text: &str) -> Result<PolicyFile, Vec<PolicyFileError>> {
    let loc = Locator { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| vec![loc.toml_error(&e)])?;
    let mut errors = Vec::new();

    let cgroup = CgroupPath::parse(raw.cgroup.get_ref())
        .map_err(|e| errors.push(loc.error(Some(raw.cgroup.span()), Some("cgroup".into()), e)))
        .ok();

    let file: Arc<Path> = Arc::from(path);
    let mut rules: Vec<Rule> = Vec::with_capacity(raw.allow.len());
    let mut seen: HashMap<MatchKey, usize> = HashMap::new();
    // (destination, port) -> (tcp?, index of the first rule with it).
    let mut kinds: HashMap<(Destination, u16), (bool, usize)> = HashMap::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (index, spanned) in raw.allow.into_iter().enumerate() {
        let rule_span = spanned.span();
        let raw_rule = spanned.into_inner();
        let name_span = raw_rule.name.as_ref().map(Spanned::span);
        let dest_span = raw_rule
            .host
            .as_ref()
            .or(raw_rule.ip.as_ref())
            .map_or(rule_span.clone(), Spanned::span);
        let mut errs = RuleErrors {
            loc: &loc,
            index,
            list: &mut errors,
        };
        let Some(rule) = compile_rule(&mut errs, &file, rule_span, raw_rule) else {
            continue;
        };
        let dest_field = rule.dest.field();
        if let (Some(name), Some(span)) = (&rule.name, name_span)
            && let Some(first) = names.insert(name.to_string(), index)
        {
            errs.at(
                span,
                "name",
                format!("the name {name:?} is already used by allow[{first}]"),
            );
            continue;
        }
        let key = MatchKey {
            dest: rule.dest.clone(),
            port: rule.port,
            tcp: rule.tcp,
            methods: rule.methods.clone(),
            paths: rule
                .paths
                .as_ref()
                .map(|p| p.iter().map(|p| p.as_str().to_string()).collect()),
            headers: rule
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), v.clone()))
                .collect(),
        };
        if let Some(first) = seen.get(&key) {
            errs.at(
                dest_span,
                dest_field,
                format!(
                    "{} port {} is already covered by allow[{first}]; merge the two rules",
                    rule.dest, rule.port
                ),
            );
            continue;
        }
        match kinds.get(&(rule.dest.clone(), rule.port)) {
            Some(&(tcp, first)) if tcp != rule.tcp => {
                errs.at(
                    dest_span,
                    dest_field,
                    format!(
                        "{} port {} has a tcp passthrough rule and an HTTP rule (allow[{first}]); \
                         a destination is either passed through or inspected, not both",
                        rule.dest, rule.port
                    ),
                );
                continue;
            }
            Some(_) => {}
            None => {
                kinds.insert((rule.dest.clone(), rule.port), (rule.tcp, index));
            }
        }
        seen.insert(key, index);
        rules.push(rule);
    }

    // Explicit `[dns]` entries with their positions, for narrowing errors.
    let mut dns_entries: Vec<(HostPattern, (usize, usize))> = Vec::new();
    let dns = match raw.dns {
        Some(dns) => {
            let mut patterns = Vec::new();
            for (j, entry) in dns.into_inner().allow.into_iter().enumerate() {
                let field = Some(format!("dns.allow[{j}]"));
                let name = entry.get_ref();
                let bare = name.trim_start_matches('[').trim_end_matches(']');
                if bare.parse::<IpAddr>().is_ok() {
                    errors.push(loc.error(
                        Some(entry.span()),
                        field,
                        format!("{name:?} is an address; DNS entries are names"),
                    ));
                    continue;
                }
                match HostPattern::parse(name) {
                    Ok(p) => {
                        dns_entries.push((p.clone(), loc.position(entry.span().start)));
                        patterns.push(p);
                    }
                    Err(e) => {
                        errors.push(loc.error(Some(entry.span()), field, format!("{name:?}: {e}")))
                    }
                }
            }
            DnsNames::new(true, patterns)
        }
        None => DnsNames::new(false, rule_names(&rules)),
    };

    let mut shares = SharesSpec::default();
    if let Some(raw) = raw.shares {
        let raw = raw.into_inner();
        let fields = [
            (ShareKind::Connections, raw.connections),
            (
                ShareKind::NewConnectionsPerSecond,
                raw.new_connections_per_second,
            ),
            (ShareKind::PendingHandshakes, raw.pending_handshakes),
            (ShareKind::RequestsInFlight, raw.requests_in_flight),
            (ShareKind::DnsQueriesPerSecond, raw.dns_queries_per_second),
            (ShareKind::RequestsPerSecond, raw.requests_per_second),
        ];
        for (kind, value) in fields {
            let Some(value) = value else { continue };
            match u32::try_from(*value.get_ref()) {
                Ok(v) if v >= 1 => shares.set(kind, v),
                _ => errors.push(loc.error(
                    Some(value.span()),
                    Some(format!("shares.{}", kind.field())),
                    format!(
                        "{} must be a whole number from 1 to {} (0 would lock the agent out)",
                        value.get_ref(),
                        u32::MAX
                    ),
                )),
            }
        }
    }

    let on_unknown_ask = match raw
        .on_unknown
        .as_ref()
        .map(|o| (o.span(), o.get_ref().as_str()))
    {
        None | Some((_, "deny")) => false,
        Some((_, "ask")) => true,
        Some((span, other)) => {
            errors.push(loc.error(
                Some(span),
                Some("on_unknown".into()),
                format!("on_unknown must be \"deny\" or \"ask\", got {other:?}"),
            ));
            false
        }
    };
    let is_approvals = raw.approvals.as_ref().is_some_and(|a| *a.get_ref());
    let mut approved = Vec::new();
    for (j, entry) in raw.approved.into_iter().enumerate() {
        let span = entry.span();
        let entry = entry.into_inner();
        let field = |f: &str| Some(format!("approved[{j}].{f}"));
        let host = match HostPattern::parse(entry.host.get_ref()) {
            Ok(HostPattern::Exact(h)) => h,
            _ => {
                errors.push(loc.error(
                    Some(entry.host.span()),
                    field("host"),
                    format!(
                        "{:?} is not an exact host name or address",
                        entry.host.get_ref()
                    ),
                ));
                continue;
            }
        };
        let methods = match entry.methods {
            None => MethodSet::Any,
            Some(m) => match MethodSet::parse(m.iter().map(String::as_str)) {
                Ok(m) => m,
                Err((i, e)) => {
                    errors.push(loc.error(
                        Some(span),
                        field(&format!("methods[{i}]")),
                        e.to_string(),
                    ));
                    continue;
                }
            },
        };
        approved.push(super::ApprovedEntry {
            host,
            port: entry.port.unwrap_or(DEFAULT_PORT),
            methods,
        });
    }

    match cgroup {
        Some(cgroup) if errors.is_empty() => {
            let mut file = PolicyFile::new(file, cgroup, rules, dns, dns_entries, shares);
            file.on_unknown_ask = on_unknown_ask;
            file.is_approvals = is_approvals;
            file.approved = approved;
            Ok(file)
        }
        _ => Err(errors),
    }
}

/// Validates one rule. `None` when it has errors (all of them are in `errs`).
fn compile_rule(
    errs: &mut RuleErrors<'_, '_>,
    file: &Arc<Path>,
    rule_span: Range<usize>,
    raw: RawRule,
) -> Option<Rule> {
    let before = errs.list.len();
    let loc = errs.loc;
    let pos = |span: &Range<usize>| loc.position(span.start);

    let dest_span = raw
        .host
        .as_ref()
        .or(raw.ip.as_ref())
        .map_or(rule_span.clone(), Spanned::span);
    let mut spans = Spans::new(pos(&dest_span));
    let dest = match (&raw.host, &raw.ip) {
        (Some(h), None) => match HostPattern::parse(h.get_ref()) {
            Ok(p) => Some(Destination::Host(p)),
            Err(e) => {
                errs.at(h.span(), "host", format!("{:?}: {e}", h.get_ref()));
                None
            }
        },
        (None, Some(ip)) => match IpNet::parse(ip.get_ref()) {
            Ok(n) => Some(Destination::Ip(n)),
            Err(e) => {
                errs.at(ip.span(), "ip", format!("{:?}: {e}", ip.get_ref()));
                None
            }
        },
        (Some(_), Some(ip)) => {
            errs.at(
                ip.span(),
                "ip",
                "give `host` or `ip`, not both; write two rules to allow both",
            );
            None
        }
        (None, None) => {
            errs.at(
                rule_span.clone(),
                "host",
                "a rule needs a destination: `host` (a name such as \"api.example.test\") or \
                 `ip` (an address or range such as \"192.0.2.0/24\")",
            );
            None
        }
    };
    spans.set(
        dest.as_ref().map_or("host", Destination::field),
        pos(&dest_span),
    );

    let name = raw.name.as_ref().and_then(|n| {
        spans.set("name", pos(&n.span()));
        let valid = !n.get_ref().is_empty()
            && n.get_ref().len() <= 64
            && n.get_ref()
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if valid {
            Some(Arc::<str>::from(n.get_ref().as_str()))
        } else {
            errs.at(
                n.span(),
                "name",
                format!(
                    "{:?}: a name is 1 to 64 letters, digits, `-`, `_` or `.`",
                    n.get_ref()
                ),
            );
            None
        }
    });

    let port = match &raw.port {
        None => DEFAULT_PORT,
        Some(p) => {
            spans.set("port", pos(&p.span()));
            if *p.get_ref() == 0 {
                errs.at(p.span(), "port", "port 0 is not a destination port");
            }
            *p.get_ref()
        }
    };

    let tcp = raw.tcp.as_ref().is_some_and(|t| {
        spans.set("tcp", pos(&t.span()));
        *t.get_ref()
    });
    if tcp {
        // Passthrough is spliced unread: nothing about requests can apply.
        let not_for_tcp: [(&str, Option<Range<usize>>); 6] = [
            ("methods", raw.methods.as_ref().map(Spanned::span)),
            ("paths", raw.paths.as_ref().map(Spanned::span)),
            ("headers", raw.headers.as_ref().map(Spanned::span)),
            ("inject", raw.inject.as_ref().map(Spanned::span)),
            (
                "plain_http",
                raw.plain_http
                    .as_ref()
                    .filter(|p| *p.get_ref())
                    .map(Spanned::span),
            ),
            (
                "any_address",
                raw.any_address
                    .as_ref()
                    .filter(|p| *p.get_ref())
                    .map(Spanned::span),
            ),
        ];
        for (field, span) in not_for_tcp {
            if let Some(span) = span {
                errs.at(
                    span,
                    field,
                    format!(
                        "a tcp rule passes the connection through without reading it, so \
                         `{field}` cannot apply; remove it, or drop `tcp = true` to have \
                         requests inspected"
                    ),
                );
            }
        }
    }

    let methods = match &raw.methods {
        None => MethodSet::Any,
        Some(list) => {
            spans.set("methods", pos(&list.span()));
            match MethodSet::parse(list.get_ref().iter().map(|m| m.get_ref().as_str())) {
                Ok(m) => m,
                Err((i, e)) => {
                    match list.get_ref().get(i) {
                        Some(m) => errs.at(m.span(), &format!("methods[{i}]"), e),
                        None => errs.at(list.span(), "methods", e),
                    }
                    MethodSet::Any
                }
            }
        }
    };

    let paths = raw.paths.as_ref().map(|list| {
        spans.set("paths", pos(&list.span()));
        if list.get_ref().is_empty() {
            errs.at(
                list.span(),
                "paths",
                "an empty list would allow nothing; omit `paths` to allow every path",
            );
        }
        let mut out: Vec<PathPattern> = Vec::new();
        for (i, p) in list.get_ref().iter().enumerate() {
            match PathPattern::parse(p.get_ref()) {
                Ok(pat) if out.contains(&pat) => errs.at(
                    p.span(),
                    &format!("paths[{i}]"),
                    format!("{:?} is listed twice", p.get_ref()),
                ),
                Ok(pat) => out.push(pat),
                Err(e) => errs.at(
                    p.span(),
                    &format!("paths[{i}]"),
                    format!("{:?}: {e}", p.get_ref()),
                ),
            }
        }
        out
    });

    let mut headers: Vec<(HeaderName, String)> = Vec::new();
    if let Some(map) = &raw.headers {
        spans.set("headers", pos(&map.span()));
        for (name, value) in map.get_ref() {
            let field = format!("headers.{}", key_segment(name.get_ref()));
            let parsed = parse_header_name(name.get_ref())
                .map_err(|e| e.to_string())
                .and_then(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string()));
            let hn = match parsed {
                Ok(n) => n,
                Err(e) => {
                    errs.at(name.span(), &field, e);
                    continue;
                }
            };
            if headers.iter().any(|(n, _)| *n == hn) {
                errs.at(
                    name.span(),
                    &field,
                    format!(
                        "header {hn} is listed more than once (header names are case-insensitive)"
                    ),
                );
                continue;
            }
            if let Some(c) = value
                .get_ref()
                .chars()
                .find(|&c| !(c == '\t' || c == ' ' || c.is_ascii_graphic()))
            {
                errs.at(
                    value.span(),
                    &field,
                    format!(
                        "character U+{:04X} cannot appear in a header value to match",
                        u32::from(c)
                    ),
                );
                continue;
            }
            headers.push((hn, value.get_ref().clone()));
        }
        headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    }

    let plain_http = raw.plain_http.as_ref().is_some_and(|p| {
        spans.set("plain_http", pos(&p.span()));
        *p.get_ref()
    });
    let any_address = raw.any_address.as_ref().is_some_and(|p| {
        spans.set("any_address", pos(&p.span()));
        *p.get_ref()
    });

    let not_after = raw.not_after.as_ref().and_then(|t| {
        spans.set("not_after", pos(&t.span()));
        clock::not_after(t.get_ref())
            .map_err(|e| errs.at(t.span(), "not_after", e))
            .ok()
    });

    let idle_timeout = raw.idle_timeout.as_ref().and_then(|t| {
        spans.set("idle_timeout", pos(&t.span()));
        parse_idle_timeout(t.get_ref())
            .map_err(|e| errs.at(t.span(), "idle_timeout", e))
            .ok()
    });

    let ask = match raw
        .approve
        .as_ref()
        .map(|a| (a.span(), a.get_ref().as_str()))
    {
        None | Some((_, "auto")) => false,
        Some((_, "ask")) => true,
        Some((span, other)) => {
            errs.at(
                span,
                "approve",
                format!("approve must be \"auto\" or \"ask\", got {other:?}"),
            );
            false
        }
    };
    if ask && tcp {
        errs.at(
            rule_span.clone(),
            "approve",
            "a tcp passthrough rule cannot ask for approval: its bytes are never read as \
             requests",
        );
    }

    let rate = raw.rate.as_ref().and_then(|r| {
        spans.set("rate", pos(&r.span()));
        compile_rate(errs, r)
    });

    let budget = raw.budget.as_ref().and_then(|b| {
        spans.set("budget", pos(&b.span()));
        let raw_b = b.get_ref();
        let mut ok = true;
        let mut take = |v: &Option<Spanned<u64>>, field: &str| -> Option<u64> {
            let v = v.as_ref()?;
            if *v.get_ref() == 0 {
                errs.at(
                    v.span(),
                    &format!("budget.{field}"),
                    "a budget of 0 would refuse every request; remove the rule instead",
                );
                ok = false;
            }
            Some(*v.get_ref())
        };
        let budget = Budget {
            requests_per_day: take(&raw_b.requests_per_day, "requests_per_day"),
            bytes_per_day: take(&raw_b.bytes_per_day, "bytes_per_day"),
            tokens_per_day: take(&raw_b.tokens_per_day, "tokens_per_day"),
        };
        if !budget.is_set() {
            errs.at(
                b.span(),
                "budget",
                "give at least one of requests_per_day, bytes_per_day, tokens_per_day",
            );
            ok = false;
        }
        if tcp && let Some(t) = &raw_b.tokens_per_day {
            errs.at(
                t.span(),
                "budget.tokens_per_day",
                "a tcp rule does not read responses, so it cannot count LLM tokens",
            );
            ok = false;
        }
        ok.then_some(budget)
    });

    let inject = match raw.inject {
        Some(i) => {
            spans.set("inject", pos(&i.span()));
            compile_inject(errs, i.into_inner())
        }
        None => Some(Injection::default()),
    };

    if errs.list.len() > before {
        return None;
    }
    let dest = dest?;
    let inject = inject?;
    let mut secrets: Vec<SecretName> = inject.secret_names().into_iter().cloned().collect();
    secrets.sort();
    let (line, _) = pos(&dest_span);
    Some(Rule {
        rule_ref: RuleRef {
            file: Arc::clone(file),
            index: errs.index,
            line,
            name: name.clone(),
        },
        name,
        dest,
        port,
        tcp,
        methods,
        paths,
        headers,
        plain_http,
        any_address,
        not_after,
        idle_timeout,
        rate,
        budget,
        inject,
        secrets,
        ask,
        limit: None,
        spans,
    })
}

fn compile_rate(errs: &mut RuleErrors<'_, '_>, raw: &Spanned<RawRate>) -> Option<Rate> {
    let r = raw.get_ref();
    let zero = |errs: &mut RuleErrors<'_, '_>, v: &Spanned<u32>, field: &str| {
        let is_zero = *v.get_ref() == 0;
        if is_zero {
            errs.at(
                v.span(),
                &format!("rate.{field}"),
                format!(
                    "a {} of 0 would refuse every request; remove the rule instead",
                    if field == "burst" { "burst" } else { "rate" }
                ),
            );
        }
        is_zero
    };
    let (count, period) = match (&r.per_second, &r.per_minute) {
        (Some(s), None) => (s, RatePeriod::Second),
        (None, Some(m)) => (m, RatePeriod::Minute),
        (Some(_), Some(m)) => {
            errs.at(
                m.span(),
                "rate.per_minute",
                "give per_second or per_minute, not both",
            );
            return None;
        }
        (None, None) => {
            errs.at(
                raw.span(),
                "rate",
                "give per_second or per_minute, as in `rate = { per_second = 5, burst = 10 }`",
            );
            return None;
        }
    };
    let bad_count = zero(
        errs,
        count,
        if period == RatePeriod::Second {
            "per_second"
        } else {
            "per_minute"
        },
    );
    let bad_burst = r.burst.as_ref().is_some_and(|b| zero(errs, b, "burst"));
    if bad_count || bad_burst {
        return None;
    }
    Some(Rate {
        count: *count.get_ref(),
        period,
        burst: r.burst.as_ref().map_or(*count.get_ref(), |b| *b.get_ref()),
    })
}

fn compile_inject(errs: &mut RuleErrors<'_, '_>, raw: RawInject) -> Option<Injection> {
    let before = errs.list.len();
    let mut headers = Vec::with_capacity(raw.headers.len());
    let mut first_span: HashMap<String, Range<usize>> = HashMap::new();
    for (name, template) in raw.headers {
        let field = format!("inject.headers.{}", key_segment(name.get_ref()));
        let lower = match parse_header_name(name.get_ref()) {
            Ok(n) => n,
            Err(e) => {
                errs.at(name.span(), &field, e);
                continue;
            }
        };
        if first_span.insert(lower.clone(), name.span()).is_some() {
            errs.at(
                name.span(),
                &field,
                format!("header {lower} is set more than once (header names are case-insensitive)"),
            );
            continue;
        }
        match Template::parse(template.get_ref()) {
            Ok(t) => headers.push((lower, t)),
            Err(e) => errs.at(template.span(), &field, e),
        }
    }

    let basic_auth = raw.basic_auth.and_then(|b| {
        let span = b.span();
        let b = b.into_inner();
        if first_span.contains_key("authorization") {
            errs.at(
                span,
                "inject.basic_auth",
                "basic_auth sets the authorization header, which inject.headers sets too; keep one",
            );
        }
        let username = match Template::parse(b.username.get_ref()) {
            Ok(t) => {
                // A literal `:` would end the username early; secrets are checked when rendered.
                let rendered = t.render(|_| Some(&b"x"[..]));
                if rendered.is_ok_and(|r| r.contains(&b':')) {
                    errs.at(
                        b.username.span(),
                        "inject.basic_auth.username",
                        "a basic-auth username cannot contain `:`",
                    );
                    None
                } else {
                    Some(t)
                }
            }
            Err(e) => {
                errs.at(b.username.span(), "inject.basic_auth.username", e);
                None
            }
        };
        let password = match Template::parse(b.password.get_ref()) {
            Ok(t) => Some(t),
            Err(e) => {
                errs.at(b.password.span(), "inject.basic_auth.password", e);
                None
            }
        };
        Some(BasicAuth {
            username: username?,
            password: password?,
        })
    });

    let mut query = Vec::with_capacity(raw.query.len());
    for (name, template) in raw.query {
        let field = format!("inject.query.{}", key_segment(name.get_ref()));
        let parsed = match parse_query_name(name.get_ref()) {
            Ok(n) => n,
            Err(e) => {
                errs.at(name.span(), &field, format!("{:?}: {e}", name.get_ref()));
                continue;
            }
        };
        match Template::parse(template.get_ref()) {
            Ok(t) => query.push((parsed, t)),
            Err(e) => errs.at(template.span(), &field, e),
        }
    }

    let aws_sigv4 = raw.aws_sigv4.and_then(|a| {
        let span = a.span();
        let a = a.into_inner();
        if first_span.contains_key("authorization") || basic_auth.is_some() {
            errs.at(
                span.clone(),
                "inject.aws_sigv4",
                "aws_sigv4 signs the authorization header, which inject.headers or basic_auth \
                 sets too; keep one",
            );
        }
        for (what, list) in [
            ("services", &a.services),
            ("regions", &a.regions),
            ("actions", &a.actions),
        ] {
            if let Some(bad) = list.iter().find(|v| {
                v.is_empty()
                    || !v.bytes().all(|b| {
                        b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
                    })
            }) {
                errs.at(
                    span.clone(),
                    &format!("inject.aws_sigv4.{what}"),
                    format!("{bad:?} is not a service, region or action name"),
                );
            }
        }
        match SecretName::new(a.secret.get_ref().as_str()) {
            Ok(secret) => Some(AwsSigV4 {
                secret,
                services: a.services,
                regions: a.regions,
                actions: a.actions,
            }),
            Err(e) => {
                errs.at(a.secret.span(), "inject.aws_sigv4.secret", e);
                None
            }
        }
    });

    let capture_tokens = raw.capture_tokens.and_then(|c| {
        let c = c.into_inner();
        match HostPattern::parse(c.use_at.get_ref()) {
            Ok(_) => Some(CaptureTokens {
                use_at: c.use_at.get_ref().clone(),
            }),
            Err(e) => {
                errs.at(c.use_at.span(), "inject.capture_tokens.use_at", e);
                None
            }
        }
    });

    if errs.list.len() > before {
        return None;
    }
    let headers = match InjectSpec::from_parsed(headers) {
        Ok(spec) => spec,
        Err(e) => {
            let span = first_span.values().next().cloned().unwrap_or_default();
            errs.at(span, "inject.headers", e);
            return None;
        }
    };
    Some(Injection {
        headers,
        basic_auth,
        query,
        aws_sigv4,
        capture_tokens,
    })
}

/// The names a file's `host` rules let its agents resolve (when it has no `[dns]` table).
pub(super) fn rule_names(rules: &[Rule]) -> impl Iterator<Item = HostPattern> + '_ {
    rules
        .iter()
        .filter_map(|r| r.dest.host())
        .filter(|h| match h {
            HostPattern::Exact(h) => h.parse::<IpAddr>().is_err(),
            HostPattern::Wildcard(_) => true,
        })
        .cloned()
}

/// An approvals file (`approvals = true`) for a cgroup no policy file names.
pub(super) fn approvals_without_file(
    path: &Path,
    text: &str,
    cgroup: &CgroupPath,
) -> PolicyFileError {
    let loc = Locator { path, text };
    let span = toml::from_str::<RawFile>(text)
        .ok()
        .map(|raw| raw.cgroup.span());
    loc.error(
        span,
        Some("cgroup".into()),
        format!(
            "this file holds approvals for cgroup {cgroup}, but no policy file governs {cgroup}; \
             add one, or remove this file"
        ),
    )
}

/// The error for a file whose `cgroup` another file already claims.
pub(super) fn duplicate_cgroup(
    path: &Path,
    text: &str,
    cgroup: &CgroupPath,
    other: &Path,
) -> PolicyFileError {
    let loc = Locator { path, text };
    // The file compiled, so it parses; the span is only for the line number.
    let span = toml::from_str::<RawFile>(text)
        .ok()
        .map(|raw| raw.cgroup.span());
    loc.error(
        span,
        Some("cgroup".into()),
        format!(
            "cgroup {cgroup} is already governed by {}; one file per cgroup subtree",
            other.display()
        ),
    )
}

/// An error located at a rule's field, for checks made after compiling (narrowing).
pub(super) fn rule_error(rule: &Rule, field: &str, message: String) -> PolicyFileError {
    let (line, column) = rule.spans.at(field);
    let field = format!("allow[{}].{field}", rule.rule_ref.index);
    PolicyFileError {
        path: rule.rule_ref.file.to_path_buf(),
        line,
        column,
        field: Some(field),
        message,
    }
}

/// An error located at entry `index` of a file's `[dns] allow`, found after compiling.
pub(super) fn dns_error(file: &PolicyFile, index: usize, message: String) -> PolicyFileError {
    let (line, column) = file.dns_entries.get(index).map_or((1, 1), |(_, at)| *at);
    PolicyFileError {
        path: file.path.to_path_buf(),
        line,
        column,
        field: Some(format!("dns.allow[{index}]")),
        message,
    }
}

/// The longest `idle_timeout` a rule may set.
pub const MAX_IDLE_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// `idle_timeout`: a duration such as `90s`, `10m` or `1h`, from 1s to 24h.
fn parse_idle_timeout(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|e| format!("{raw:?} is not a duration ({e}); write e.g. 90s, 10m or 1h"))?;
    if d < Duration::from_secs(1) || d > MAX_IDLE_TIMEOUT {
        return Err(format!("{raw:?} is out of range: from 1s to 24h"));
    }
    Ok(d)
}

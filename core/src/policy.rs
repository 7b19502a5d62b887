//! Policy: which destinations and requests each agent cgroup may make, what is injected on the
//! way, how often, and until when.
//!
//! Policies are TOML files in one directory, one file per cgroup subtree (see
//! `policies/README.md` for every field). [`Policy::load_dir`] parses and validates all of them,
//! checks that every file only narrows the files of its ancestor cgroups, and compiles each into
//! lookup tables (hash maps by exact host and wildcard suffix, address ranges by prefix length,
//! method bitsets, precompiled path globs), so a decision is a few hash lookups. Pure: the only
//! I/O is reading the directory in `load_dir`; times are passed in.
//!
//! Semantics:
//! - default deny: a cgroup no file covers, and a request no rule allows, are denied;
//! - delegation narrows: the files that govern a cgroup are its own closest file and every
//!   ancestor's; a request is allowed only if each of them allows it with one of its rules. The
//!   closest file's rule decides what is injected, each level's rule adds its limits. A child
//!   file that tries to allow more than its parent is refused at load ([`narrow`]);
//! - within a file the most specific destination wins (exact host, then the longest wildcard
//!   suffix, then the longest address prefix), and among rules for that destination the first
//!   in file order whose method, path, header and expiry conditions hold.
//!
//! Questions answered: [`Policy::decide_request`] (per HTTP request), [`Policy::decide_connection`]
//! (per accepted connection: intercept, pass through, or refuse), [`Policy::dns_allowed`], and
//! [`Policy::explain`] and [`Policy::effective`] for operators. Limits are counted by a
//! [`Limiter`].
//!
//! Never: allow when in doubt, or put a secret value in a decision or error.

mod bench;
mod cidr;
mod clock;
mod decide;
mod dns;
mod explain;
mod file;
mod glob;
mod host;
mod limits;
mod method;
mod narrow;
mod rule;
mod shares;
mod usage;

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use bench::{BenchRequest, bench_policy};
pub use cidr::{CidrError, IpNet};
pub use decide::{ConnectionDecision, DnsDenial, OwnedRequest, RequestDecision, RequestInfo};
pub use dns::DnsNames;
pub use explain::{EffectiveLimit, EffectivePolicy, EffectiveRule, ExplainError, Explanation};
pub use file::{DEFAULT_PORT, PolicyFileError};
pub use glob::{GlobError, PathPattern};
pub use host::{HostError, HostPattern, normalize_host};
pub use limits::{Budget, LimitDenial, LimitKey, LimitLeft, Limiter, Rate, RatePeriod};
pub use method::{MethodError, MethodSet};
pub use rule::{Destination, Rule, RuleRef};
pub use shares::{ShareKind, Shares, SharesSpec};
pub use usage::{MAX_USAGE_OBJECT, UsageMeter, UsageReading};

use crate::{cgroup::CgroupPath, secret::SecretName};
use limits::{LimitId, LimitSpec};
use rule::Matcher;

/// Errors loading a policy directory.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory {}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read policy file {}", path.display())]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// One or more files are invalid; each error names its file, line and field.
    #[error("{}", display_errors(.0))]
    Invalid(Vec<PolicyFileError>),
}

fn display_errors(errors: &[PolicyFileError]) -> String {
    match errors {
        [one] => one.to_string(),
        many => {
            let mut out = format!("{} problems in policy files:", many.len());
            for e in many {
                out.push_str("\n  ");
                out.push_str(&e.to_string());
            }
            out
        }
    }
}

/// One compiled policy file: the rules for one cgroup subtree and their lookup tables.
#[derive(Clone, Debug)]
pub struct PolicyFile {
    path: Arc<Path>,
    cgroup: CgroupPath,
    rules: Vec<Rule>,
    /// HTTP rules by destination.
    http: Matcher,
    /// tcp passthrough rules by destination.
    tcp: Matcher,
    dns: DnsNames,
    /// Explicit `[dns] allow` entries with their (line, column), for narrowing errors.
    dns_entries: Vec<(HostPattern, (usize, usize))>,
    /// Files of ancestor cgroups, nearest first (indices into `Policy::files`).
    ancestors: Vec<usize>,
    /// For each rule, the rule of the nearest ancestor file that covers it.
    covering: Vec<Option<usize>>,
    /// What the file's `[shares]` sets.
    shares: SharesSpec,
    /// `on_unknown = "ask"`: a request no rule of this file allows waits for an operator's
    /// approval instead of being denied.
    on_unknown_ask: bool,
    /// Whether this is a file of decisions brokerd wrote (`approvals = true`), merged into the
    /// policy file for the same cgroup.
    is_approvals: bool,
    /// Requests a rule with `approve = "ask"` lets through without asking (written by "allow
    /// always").
    approved: Vec<ApprovedEntry>,
}

/// A standing approval: requests to this host, port and method do not ask again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApprovedEntry {
    /// Normalized exact host (a name or an address).
    pub host: String,
    pub port: u16,
    pub methods: MethodSet,
}

impl ApprovedEntry {
    fn matches(&self, host: Option<&str>, port: u16, method: &str) -> bool {
        host == Some(self.host.as_str()) && port == self.port && self.methods.allows_str(method)
    }
}

impl PolicyFile {
    fn new(
        path: Arc<Path>,
        cgroup: CgroupPath,
        mut rules: Vec<Rule>,
        dns: DnsNames,
        dns_entries: Vec<(HostPattern, (usize, usize))>,
        shares: SharesSpec,
    ) -> Self {
        let mut http = Matcher::default();
        let mut tcp = Matcher::default();
        let cgroup_key: Arc<str> = Arc::from(cgroup.as_str());
        for (i, rule) in rules.iter_mut().enumerate() {
            if rule.rate.is_some() || rule.budget.is_some() {
                rule.limit = Some(LimitKey::new(LimitSpec {
                    id: LimitId {
                        cgroup: Arc::clone(&cgroup_key),
                        rule: rule.limit_identity().into(),
                    },
                    rate: rule.rate,
                    budget: rule.budget,
                    label: format!("{}:{} ({})", rule.dest, rule.port, rule.rule_ref),
                }));
            }
            if rule.tcp {
                tcp.insert(i, rule);
            } else {
                http.insert(i, rule);
            }
        }
        http.finish();
        tcp.finish();
        let count = rules.len();
        Self {
            path,
            cgroup,
            rules,
            http,
            tcp,
            dns,
            dns_entries,
            ancestors: Vec::new(),
            covering: vec![None; count],
            shares,
            on_unknown_ask: false,
            is_approvals: false,
            approved: Vec::new(),
        }
    }

    /// This file with the rules and standing approvals of `extra` (a file of decisions brokerd
    /// wrote for the same cgroup) added, its rules first.
    fn with_approvals(self, extra: PolicyFile) -> Self {
        let mut rules = extra.rules;
        rules.extend(self.rules);
        let dns = if self.dns.is_explicit() {
            let added = rules.iter().filter_map(|r| r.dest.host()).cloned();
            DnsNames::new(true, self.dns.patterns().iter().cloned().chain(added))
        } else {
            DnsNames::new(false, file::rule_names(&rules))
        };
        let mut out = Self::new(
            self.path,
            self.cgroup,
            rules,
            dns,
            self.dns_entries,
            self.shares,
        );
        out.on_unknown_ask = self.on_unknown_ask;
        out.approved = self.approved;
        out.approved.extend(extra.approved);
        out
    }

    /// Whether a request no rule of this file allows waits for an operator's approval.
    pub fn on_unknown_asks(&self) -> bool {
        self.on_unknown_ask
    }

    /// Standing approvals of requests to rules that ask.
    pub fn approved(&self) -> &[ApprovedEntry] {
        &self.approved
    }

    /// Whether a standing approval covers a request to `host:port` with `method`.
    pub(crate) fn approves(&self, host: Option<&str>, port: u16, method: &str) -> bool {
        self.approved.iter().any(|a| a.matches(host, port, method))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn cgroup(&self) -> &CgroupPath {
        &self.cgroup
    }
    /// Rules in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }
    /// The names this file lets its agents resolve.
    pub fn dns(&self) -> &DnsNames {
        &self.dns
    }
}

/// All loaded policy files. Immutable once built: reloading builds a new one.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Sorted by path.
    files: Vec<PolicyFile>,
    /// cgroup path -> index in `files`.
    by_cgroup: HashMap<String, usize>,
    /// Every limited rule's counter identity (for [`Limiter::retain_for`]).
    limit_ids: HashSet<LimitId>,
    /// Whether any file can ask an operator ([`Policy::may_ask`]), worked out once at load.
    asks: bool,
}

impl Policy {
    /// No files: everything is denied.
    pub fn empty() -> Self {
        Self::default()
    }

    /// Loads every `*.toml` file directly in `dir` (not below it; names starting with `.` are
    /// skipped, as editors use them for temporary files). Any invalid file fails the whole load,
    /// so a caller can keep the last good policy.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        Self::from_files(Self::read_dir_files(dir)?)
    }

    /// The `(path, text)` of each policy file in `dir` (`*.toml`, not hidden), as
    /// [`Policy::load_dir`] reads them: for checking what a changed file would load to before
    /// writing it.
    pub fn read_dir_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
        let read_dir = |source| PolicyError::ReadDir {
            path: dir.to_path_buf(),
            source,
        };
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).map_err(read_dir)? {
            let path = entry.map_err(read_dir)?.path();
            let is_policy = path.extension().is_some_and(|e| e == "toml")
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| !n.starts_with('.'));
            // Follows symlinks, so a linked-in file counts and a linked directory does not.
            if !is_policy || !path.is_file() {
                continue;
            }
            let bytes = fs::read(&path).map_err(|source| PolicyError::ReadFile {
                path: path.clone(),
                source,
            })?;
            match String::from_utf8(bytes) {
                Ok(text) => files.push((path, text)),
                Err(e) => {
                    let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                    return Err(PolicyError::Invalid(vec![PolicyFileError {
                        line: valid.iter().filter(|&&b| b == b'\n').count() + 1,
                        column: 1,
                        path,
                        field: None,
                        message: "the file is not valid UTF-8".into(),
                    }]));
                }
            }
        }
        Ok(files)
    }

    /// Builds a policy from `(path, text)` pairs (the path is only used in messages and rule
    /// references). Two files naming the same cgroup are an error, and so is a file that
    /// allows more than the file of its nearest ancestor cgroup.
    pub fn from_files(mut files: Vec<(PathBuf, String)>) -> Result<Self, PolicyError> {
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut errors = Vec::new();
        let mut policy = Self::empty();
        let mut approvals = Vec::new();
        for (path, text) in &files {
            let compiled = match file::compile(path, text) {
                Ok(f) => f,
                Err(mut e) => {
                    errors.append(&mut e);
                    continue;
                }
            };
            if compiled.is_approvals {
                approvals.push((compiled, path, text));
                continue;
            }
            let key = compiled.cgroup.as_str().to_string();
            if let Some(&other) = policy.by_cgroup.get(&key) {
                errors.push(file::duplicate_cgroup(
                    path,
                    text,
                    &compiled.cgroup,
                    &policy.files[other].path,
                ));
                continue;
            }
            policy.by_cgroup.insert(key, policy.files.len());
            policy.files.push(compiled);
        }

        // Decisions brokerd wrote join the rules of the file for their cgroup, first, so a
        // rule written by "allow always" is picked before the rule that asked.
        let mut merged: HashSet<String> = HashSet::new();
        for (extra, path, text) in approvals {
            let key = extra.cgroup.as_str().to_string();
            let Some(&i) = policy.by_cgroup.get(&key) else {
                errors.push(file::approvals_without_file(path, text, &extra.cgroup));
                continue;
            };
            if !merged.insert(key) {
                errors.push(file::duplicate_cgroup(
                    path,
                    text,
                    &extra.cgroup,
                    &policy.files[i].path,
                ));
                continue;
            }
            policy.files[i] = policy.files[i].clone().with_approvals(extra);
        }

        for i in 0..policy.files.len() {
            let ancestors = policy.ancestors_of(policy.files[i].cgroup.as_str());
            policy.files[i].ancestors = ancestors;
        }
        // Each file against its nearest ancestor's; by induction, against every ancestor's.
        for i in 0..policy.files.len() {
            let Some(&parent) = policy.files[i].ancestors.first() else {
                continue;
            };
            match narrow::check(&policy.files[i], &policy.files[parent]) {
                Ok(covering) => policy.files[i].covering = covering,
                Err(mut e) => errors.append(&mut e),
            }
        }

        if !errors.is_empty() {
            errors.sort_by(|a, b| (&a.path, a.line, a.column).cmp(&(&b.path, b.line, b.column)));
            return Err(PolicyError::Invalid(errors));
        }
        policy.limit_ids = policy
            .files
            .iter()
            .flat_map(|f| &f.rules)
            .filter_map(|r| r.limit.as_ref())
            .map(|k| k.id().clone())
            .collect();
        // Asked on every request: a scan of every rule would cost a large policy per request.
        policy.asks = policy
            .files
            .iter()
            .any(|f| f.on_unknown_ask || f.rules.iter().any(|r| r.ask));
        Ok(policy)
    }

    /// Indices of the files of `cgroup`'s strict ancestors, nearest first.
    fn ancestors_of(&self, cgroup: &str) -> Vec<usize> {
        let mut out = Vec::new();
        let mut path = cgroup;
        while let Some((parent, _)) = path.rsplit_once('/') {
            if let Some(&i) = self.by_cgroup.get(parent) {
                out.push(i);
            }
            path = parent;
        }
        out
    }

    /// Files in path order.
    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    /// Whether any request could wait for an operator: some file says `on_unknown = "ask"` or
    /// has a rule with `approve = "ask"`. When none does, no request needs to be asked about.
    pub fn may_ask(&self) -> bool {
        self.asks
    }

    /// Index of the file that governs `cgroup`: the closest ancestor-or-self with a file.
    fn governing(&self, cgroup: &str) -> Option<usize> {
        let mut path = cgroup;
        while !path.is_empty() {
            if let Some(&i) = self.by_cgroup.get(path) {
                return Some(i);
            }
            path = path.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
        None
    }

    /// The closest file that governs `cgroup` (its own rules; see [`Policy::chain`] for every
    /// file that applies).
    pub fn file_for(&self, cgroup: &CgroupPath) -> Option<&PolicyFile> {
        self.governing(cgroup.as_str()).map(|i| &self.files[i])
    }

    /// Every file that governs `cgroup`, closest first: a request must be allowed by each.
    pub fn chain(&self, cgroup: &CgroupPath) -> Vec<&PolicyFile> {
        let Some(i) = self.governing(cgroup.as_str()) else {
            return Vec::new();
        };
        std::iter::once(i)
            .chain(self.files[i].ancestors.iter().copied())
            .map(|i| &self.files[i])
            .collect()
    }

    /// The shares of brokerd each agent in `cgroup` gets: field by field the smallest value a
    /// governing file's `[shares]` sets, the default where none sets one (no file governs:
    /// the defaults, though such an agent is denied everything else).
    pub fn shares(&self, cgroup: &CgroupPath) -> Shares {
        let Some(i) = self.governing(cgroup.as_str()) else {
            return Shares::DEFAULT;
        };
        SharesSpec::combine(
            std::iter::once(i)
                .chain(self.files[i].ancestors.iter().copied())
                .map(|i| &self.files[i].shares),
        )
    }

    /// Every secret any rule injects (to warn about names missing from the vault at load).
    pub fn secret_names(&self) -> BTreeSet<&SecretName> {
        self.files
            .iter()
            .flat_map(|f| &f.rules)
            .flat_map(|r| r.inject.secret_names())
            .collect()
    }
}

#[cfg(test)]
mod tests;

//! Policy: which destinations each agent cgroup may reach, and what is injected on the way.
//!
//! Policies are TOML files in one directory, one file per cgroup subtree (see
//! `policies/README.md` for every field). [`Policy::load_dir`] parses and validates all of them
//! and compiles them into per-file lookup tables, so [`Policy::decide`] does a few hash lookups
//! and no pattern matching per request. Pure: the only I/O is reading the directory in
//! `load_dir`; everything else works on strings, so it is unit-tested without files.
//!
//! Semantics (issue 3's minimal form; the policy engine issue extends it):
//! - default deny: a cgroup no file covers, and a destination no rule names, are denied;
//! - the file that applies to a cgroup is the one whose `cgroup` is its closest
//!   ancestor-or-self (intersection with further ancestors comes with delegation narrowing);
//! - within a file an exact host rule wins over a wildcard, and a longer wildcard suffix over a
//!   shorter one; the port must match too.
//!
//! Never: allow when in doubt, or put a secret value in a decision or error.

mod file;
mod host;

use std::{
    collections::{BTreeSet, HashMap},
    fmt, fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

pub use file::{DEFAULT_PORT, PolicyFileError};
pub use host::{HostError, HostPattern, normalize_host};

use crate::{cgroup::CgroupPath, inject::InjectSpec, secret::SecretName};

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

/// Where a rule is written: for audit records, denials and `policy explain`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    /// The policy file.
    pub file: Arc<Path>,
    /// Position in the file's `[[allow]]` list, from 0.
    pub index: usize,
    /// Line of the rule's `host`, from 1.
    pub line: usize,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} allow[{}]",
            self.file.display(),
            self.line,
            self.index
        )
    }
}

/// One compiled allow rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    host: HostPattern,
    port: u16,
    plain_http: bool,
    inject: InjectSpec,
    rule_ref: RuleRef,
}

impl Rule {
    pub fn host(&self) -> &HostPattern {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    /// Whether injection (and handle swaps) may happen over plain HTTP for this rule.
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }
    pub fn inject(&self) -> &InjectSpec {
        &self.inject
    }
    pub fn rule_ref(&self) -> &RuleRef {
        &self.rule_ref
    }
}

/// One compiled policy file: the rules for one cgroup subtree and their lookup tables.
#[derive(Clone, Debug)]
pub struct PolicyFile {
    path: Arc<Path>,
    cgroup: CgroupPath,
    rules: Vec<Rule>,
    /// Exact host -> rule indices (one per port).
    exact: HashMap<String, Vec<usize>>,
    /// Wildcard suffix (without `*.`) -> rule indices (one per port).
    wildcard: HashMap<String, Vec<usize>>,
}

impl PolicyFile {
    fn new(path: Arc<Path>, cgroup: CgroupPath, rules: Vec<Rule>) -> Self {
        let mut exact: HashMap<String, Vec<usize>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let (table, key) = match &rule.host {
                HostPattern::Exact(h) => (&mut exact, h),
                HostPattern::Wildcard(s) => (&mut wildcard, s),
            };
            table.entry(key.clone()).or_default().push(i);
        }
        Self {
            path,
            cgroup,
            rules,
            exact,
            wildcard,
        }
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

    /// The rule for a normalized host and port: exact first, then the longest wildcard suffix.
    /// The second value is the ports of every rule naming the host, for a helpful denial.
    fn lookup(&self, host: &str, port: u16) -> Result<&Rule, Vec<u16>> {
        let mut other_ports = Vec::new();
        let mut pick = |indices: Option<&Vec<usize>>| -> Option<&Rule> {
            for &i in indices.into_iter().flatten() {
                let rule = &self.rules[i];
                if rule.port == port {
                    return Some(rule);
                }
                other_ports.push(rule.port);
            }
            None
        };
        if let Some(rule) = pick(self.exact.get(host)) {
            return Ok(rule);
        }
        // Longest suffix first: walk the dots left to right.
        let mut rest = host;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(rule) = pick(self.wildcard.get(suffix)) {
                return Ok(rule);
            }
            rest = suffix;
        }
        other_ports.sort_unstable();
        other_ports.dedup();
        Err(other_ports)
    }
}

/// The answer for one destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision<'a> {
    Allow {
        /// The rule that allowed it.
        rule: &'a RuleRef,
        /// Headers to set (empty: forward without injection).
        inject: &'a InjectSpec,
        /// Whether injection and handle swaps may happen over plain HTTP (ARCHITECTURE
        /// invariant 2: off unless the rule says so).
        plain_http: bool,
    },
    Deny {
        /// Plain enough for an LLM agent to act on; never names a secret value.
        reason: String,
        /// The file that was consulted, when one covers the cgroup (for `policy explain`).
        policy_file: Option<&'a Path>,
    },
}

impl Decision<'_> {
    pub fn is_allow(&self) -> bool {
        matches!(self, Self::Allow { .. })
    }
}

/// All loaded policy files. Immutable once built: reloading builds a new one.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Sorted by path.
    files: Vec<PolicyFile>,
    /// cgroup path -> index in `files`.
    by_cgroup: HashMap<String, usize>,
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
        Self::from_files(files)
    }

    /// Builds a policy from `(path, text)` pairs (the path is only used in messages and rule
    /// references). Two files naming the same cgroup are an error.
    pub fn from_files(mut files: Vec<(PathBuf, String)>) -> Result<Self, PolicyError> {
        files.sort_by(|a, b| a.0.cmp(&b.0));
        let mut errors = Vec::new();
        let mut policy = Self::empty();
        for (path, text) in &files {
            let compiled = match file::compile(path, text) {
                Ok(f) => f,
                Err(mut e) => {
                    errors.append(&mut e);
                    continue;
                }
            };
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
        if errors.is_empty() {
            Ok(policy)
        } else {
            Err(PolicyError::Invalid(errors))
        }
    }

    /// Files in path order.
    pub fn files(&self) -> &[PolicyFile] {
        &self.files
    }

    /// The file that governs `cgroup`: the closest ancestor-or-self with a file.
    pub fn file_for(&self, cgroup: &CgroupPath) -> Option<&PolicyFile> {
        let mut path = cgroup.as_str();
        while !path.is_empty() {
            if let Some(&i) = self.by_cgroup.get(path) {
                return self.files.get(i);
            }
            path = path.rsplit_once('/').map_or("", |(parent, _)| parent);
        }
        None
    }

    /// Every secret any rule injects (to warn about names missing from the vault at load).
    pub fn secret_names(&self) -> BTreeSet<&SecretName> {
        self.files
            .iter()
            .flat_map(|f| &f.rules)
            .flat_map(|r| r.inject.secret_names())
            .collect()
    }

    /// Decides whether `cgroup` may reach `host:port`. `host` is the SNI, the request's host
    /// (without port), or the original destination IP when there is no name; any case, with or
    /// without a trailing dot, IPv6 with or without brackets.
    pub fn decide(&self, cgroup: &CgroupPath, host: &str, port: u16) -> Decision<'_> {
        let Some(file) = self.file_for(cgroup) else {
            return Decision::Deny {
                reason: format!(
                    "no policy covers cgroup {cgroup}, so every destination is denied; \
                     ask the operator to add a policy file for it"
                ),
                policy_file: None,
            };
        };
        let deny = |reason: String| Decision::Deny {
            reason,
            policy_file: Some(&file.path),
        };
        let Some(normalized) = normalize_host(host) else {
            return deny(format!(
                "the destination host {host:?} is not a valid host name or address"
            ));
        };
        match file.lookup(&normalized, port) {
            Ok(rule) => Decision::Allow {
                rule: &rule.rule_ref,
                inject: &rule.inject,
                plain_http: rule.plain_http,
            },
            Err(ports) if ports.is_empty() => deny(format!(
                "no rule allows {} for cgroup {cgroup}",
                show_dest(&normalized, port)
            )),
            Err(ports) => {
                let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
                deny(format!(
                    "no rule allows {} for cgroup {cgroup} (allowed port{} for this host: {})",
                    show_dest(&normalized, port),
                    if ports.len() == 1 { "" } else { "s" },
                    ports.join(", ")
                ))
            }
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn show_dest(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

#[cfg(test)]
mod tests;

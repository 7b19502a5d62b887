//! `[dns] allow`: the names an agent may resolve through brokerd.

use std::{collections::HashSet, fmt};

use super::host::{HostPattern, is_strictly_below};

/// The names one file lets its agents resolve.
#[derive(Clone, Debug, Default)]
pub struct DnsNames {
    /// Whether the file has a `[dns]` table (else the names come from its `host` rules).
    explicit: bool,
    patterns: Vec<HostPattern>,
    exact: HashSet<String>,
    /// Wildcard suffixes (without `*.`).
    wildcard: HashSet<String>,
}

impl DnsNames {
    pub(super) fn new(explicit: bool, patterns: impl IntoIterator<Item = HostPattern>) -> Self {
        let mut out = Self {
            explicit,
            ..Self::default()
        };
        for p in patterns {
            if out.patterns.contains(&p) {
                continue;
            }
            match &p {
                HostPattern::Exact(h) => out.exact.insert(h.clone()),
                HostPattern::Wildcard(s) => out.wildcard.insert(s.clone()),
            };
            out.patterns.push(p);
        }
        out
    }

    /// Whether the names were written in `[dns]` (else they are the file's hosts).
    pub fn is_explicit(&self) -> bool {
        self.explicit
    }

    /// The patterns, in file order.
    pub fn patterns(&self) -> &[HostPattern] {
        &self.patterns
    }

    /// Whether `name` (normalized) may be resolved.
    pub fn allows(&self, name: &str) -> bool {
        if self.exact.contains(name) {
            return true;
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if self.wildcard.contains(suffix) {
                return true;
            }
            rest = suffix;
        }
        false
    }

    /// Whether every name `pattern` matches may be resolved.
    pub fn covers(&self, pattern: &HostPattern) -> bool {
        match pattern {
            HostPattern::Exact(h) => self.allows(h),
            HostPattern::Wildcard(s) => {
                self.wildcard.contains(s) || self.wildcard.iter().any(|w| is_strictly_below(s, w))
            }
        }
    }
}

impl fmt::Display for DnsNames {
    /// `"a.test", "*.b.test"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.patterns.iter().map(|p| format!("\"{p}\"")).collect();
        f.write_str(&shown.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> DnsNames {
        DnsNames::new(true, list.iter().map(|s| HostPattern::parse(s).expect(s)))
    }

    #[test]
    fn exact_and_wildcard_names() {
        let d = names(&["api.example.test", "*.pypi.org", "api.example.test"]);
        assert_eq!(d.patterns().len(), 2);
        assert!(d.allows("api.example.test"));
        assert!(!d.allows("example.test"));
        assert!(d.allows("files.pypi.org"));
        assert!(d.allows("a.b.pypi.org"));
        assert!(!d.allows("pypi.org"));
        assert!(d.covers(&HostPattern::parse("*.x.pypi.org").expect("p")));
        assert!(d.covers(&HostPattern::parse("*.pypi.org").expect("p")));
        assert!(!d.covers(&HostPattern::parse("*.example.test").expect("p")));
        assert_eq!(d.to_string(), "\"api.example.test\", \"*.pypi.org\"");
    }
}

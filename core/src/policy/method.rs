//! HTTP methods of `methods = [...]`: a bit per standard method, a short list for the rest.

use std::fmt;

use http::Method;

/// Methods with a bit, in display order.
const STANDARD: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];

/// Why a method was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MethodError {
    #[error("the method is empty")]
    Empty,
    #[error("methods are case-sensitive and written in upper case: {0}")]
    Lowercase(String),
    #[error("{0:?} is not a method name (upper-case letters, digits, `-` and `_`, at most 32)")]
    Invalid(String),
    #[error("{0} is never forwarded by the broker, so a rule cannot allow it")]
    NeverForwarded(String),
    #[error("{0} is listed twice")]
    Duplicate(String),
    #[error("an empty list would allow nothing; omit `methods` to allow every method")]
    EmptyList,
}

/// A set of methods; `Any` when the rule names none.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub enum MethodSet {
    #[default]
    Any,
    Only {
        /// Bit `i` is `STANDARD[i]`.
        bits: u8,
        /// Other methods, sorted.
        other: Vec<String>,
    },
}

fn bit(method: &str) -> Option<u8> {
    STANDARD
        .iter()
        .position(|m| *m == method)
        .and_then(|i| u8::try_from(i).ok())
        .map(|i| 1 << i)
}

impl MethodSet {
    /// Validates a list as written in a policy.
    pub fn parse<'a>(
        list: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, (usize, MethodError)> {
        let mut bits = 0u8;
        let mut other: Vec<String> = Vec::new();
        let mut count = 0;
        for (i, raw) in list.into_iter().enumerate() {
            count += 1;
            let fail = |e| Err((i, e));
            if raw.is_empty() {
                return fail(MethodError::Empty);
            }
            let valid = raw.len() <= 32
                && raw
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid {
                return fail(MethodError::Invalid(raw.to_string()));
            }
            if raw.chars().any(|c| c.is_ascii_lowercase()) {
                return fail(MethodError::Lowercase(raw.to_ascii_uppercase()));
            }
            if matches!(raw, "CONNECT" | "TRACE") {
                return fail(MethodError::NeverForwarded(raw.to_string()));
            }
            match bit(raw) {
                Some(b) if bits & b != 0 => return fail(MethodError::Duplicate(raw.to_string())),
                Some(b) => bits |= b,
                None if other.iter().any(|o| o == raw) => {
                    return fail(MethodError::Duplicate(raw.to_string()));
                }
                None => other.push(raw.to_string()),
            }
        }
        if count == 0 {
            return Err((0, MethodError::EmptyList));
        }
        other.sort();
        Ok(Self::Only { bits, other })
    }

    /// Whether `method` is in the set.
    pub fn allows(&self, method: &Method) -> bool {
        self.allows_str(method.as_str())
    }

    /// Whether the method named `method` is in the set.
    pub fn allows_str(&self, method: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Only { bits, other } => match bit(method) {
                Some(b) => bits & b != 0,
                None => other.iter().any(|o| o == method),
            },
        }
    }

    /// Whether every method of `self` is in `parent`.
    pub fn is_subset_of(&self, parent: &MethodSet) -> bool {
        match (self, parent) {
            (_, Self::Any) => true,
            (Self::Any, Self::Only { .. }) => false,
            (
                Self::Only { bits, other },
                Self::Only {
                    bits: pbits,
                    other: pother,
                },
            ) => bits & !pbits == 0 && other.iter().all(|o| pother.contains(o)),
        }
    }

    /// Whether the rule names no methods (all are allowed).
    pub fn is_any(&self) -> bool {
        matches!(self, Self::Any)
    }

    /// The methods, standard ones first (empty for `Any`).
    pub fn names(&self) -> Vec<&str> {
        match self {
            Self::Any => Vec::new(),
            Self::Only { bits, other } => STANDARD
                .iter()
                .enumerate()
                .filter(|(i, _)| bits & (1 << i) != 0)
                .map(|(_, m)| *m)
                .chain(other.iter().map(String::as_str))
                .collect(),
        }
    }
}

impl fmt::Display for MethodSet {
    /// `GET, POST`, or `any method`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any method"),
            Self::Only { .. } => f.write_str(&self.names().join(", ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(list: &[&str]) -> MethodSet {
        MethodSet::parse(list.iter().copied()).unwrap_or_else(|e| panic!("{list:?}: {e:?}"))
    }

    #[test]
    fn sets_and_membership() {
        let s = set(&["POST", "GET", "PROPFIND"]);
        assert!(s.allows(&Method::GET));
        assert!(s.allows(&Method::POST));
        assert!(!s.allows(&Method::HEAD));
        assert!(!s.allows(&Method::DELETE));
        assert!(s.allows(&Method::from_bytes(b"PROPFIND").expect("m")));
        assert!(!s.allows(&Method::from_bytes(b"MKCOL").expect("m")));
        assert_eq!(s.to_string(), "GET, POST, PROPFIND");
        assert!(MethodSet::Any.allows(&Method::DELETE));
        assert_eq!(MethodSet::Any.to_string(), "any method");
    }

    #[test]
    fn bad_lists_say_why() {
        for (list, want) in [
            (&["get"][..], MethodError::Lowercase("GET".into())),
            (&["GET", "G ET"], MethodError::Invalid("G ET".into())),
            (&[""], MethodError::Empty),
            (&["CONNECT"], MethodError::NeverForwarded("CONNECT".into())),
            (&["TRACE"], MethodError::NeverForwarded("TRACE".into())),
            (&["GET", "GET"], MethodError::Duplicate("GET".into())),
            (&["X", "X"], MethodError::Duplicate("X".into())),
            (&[], MethodError::EmptyList),
        ] {
            let got = MethodSet::parse(list.iter().copied()).map_err(|(_, e)| e);
            assert_eq!(got, Err(want), "{list:?}");
        }
        assert_eq!(
            MethodSet::parse(["GET", "post"]).map_err(|(i, _)| i),
            Err(1)
        );
    }

    #[test]
    fn subsets() {
        assert!(set(&["GET"]).is_subset_of(&set(&["GET", "POST"])));
        assert!(set(&["GET"]).is_subset_of(&MethodSet::Any));
        assert!(!MethodSet::Any.is_subset_of(&set(&["GET"])));
        assert!(!set(&["GET", "PUT"]).is_subset_of(&set(&["GET", "POST"])));
        assert!(set(&["X"]).is_subset_of(&set(&["X", "GET"])));
        assert!(!set(&["X"]).is_subset_of(&set(&["GET"])));
    }
}

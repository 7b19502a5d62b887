//! Secret names and values.
//!
//! A [`SecretValue`] is the one type that holds a real credential in plaintext. It never shows its
//! bytes through `Debug` or `Display`, is not `Serialize`, and zeroizes its buffer on drop; the
//! bytes are reachable only through [`SecretValue::expose`], so every use is greppable.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Longest accepted secret name, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// Why a secret name or value was refused. Never carries the value itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    /// The name breaks the naming rule; `reason` says which part, without echoing the whole name
    /// (an operator who pasted a key where the name goes must not see it in an error).
    #[error(
        "invalid secret name: {reason} (a name is 1-{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . - and starts with a letter)"
    )]
    InvalidName { reason: String },
    /// The value is empty (after trimming one trailing newline).
    #[error("secret value is empty")]
    EmptyValue,
    /// The value holds a byte that cannot go into an HTTP header.
    #[error(
        "secret value contains a {what}; values are written into HTTP headers, so they must be one line without CR, LF or NUL"
    )]
    ForbiddenByte { what: &'static str },
}

/// The name of a secret in the vault, e.g. `OPENAI_KEY`.
///
/// 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_.-]`, starting with a letter. Names are not
/// secret: they appear in policies, audit records and `secret list`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SecretName(String);

impl SecretName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self, SecretError> {
        let name = name.into();
        validate_name(&name)?;
        Ok(Self(name))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn validate_name(name: &str) -> Result<(), SecretError> {
    let invalid = |reason: String| Err(SecretError::InvalidName { reason });
    let Some(first) = name.chars().next() else {
        return invalid("the name is empty".into());
    };
    if name.len() > MAX_NAME_LEN {
        return invalid(format!("the name is {} bytes long", name.len()));
    }
    if !first.is_ascii_alphabetic() {
        return invalid(format!("it starts with {}", describe_char(first)));
    }
    if let Some((at, c)) = name
        .char_indices()
        .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return invalid(format!("{} at byte {at} is not allowed", describe_char(c)));
    }
    Ok(())
}

/// A character for an error message: printable ASCII quoted, anything else as a code point.
fn describe_char(c: char) -> String {
    if c.is_ascii_graphic() {
        format!("'{c}'")
    } else {
        format!("character U+{:04X}", u32::from(c))
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for SecretName {
    type Err = SecretError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for SecretName {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl TryFrom<&str> for SecretName {
    type Error = SecretError;
    fn try_from(s: &str) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<SecretName> for String {
    fn from(name: SecretName) -> String {
        name.0
    }
}

/// A credential in plaintext. Redacted in `Debug`/`Display`, not `Serialize`, zeroized on drop.
///
/// Values built with [`SecretValue::new`] (and everything the vault stores as a named secret) are
/// one line: non-empty, no CR, LF or NUL, since they are written into HTTP headers. Internal
/// blobs such as the CA private key use [`SecretValue::binary`], which takes any bytes.
#[derive(Clone)]
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// A header-safe value. Trims one trailing newline (`\n` or `\r\n`, as read from stdin or a
    /// prompt), then refuses an empty value or one containing CR, LF or NUL.
    pub fn new(bytes: Vec<u8>) -> Result<Self, SecretError> {
        // Wrapped before anything else, so the buffer is zeroized on the error paths too.
        let mut bytes = Zeroizing::new(bytes);
        let trailing = if bytes.ends_with(b"\r\n") {
            2
        } else {
            usize::from(bytes.ends_with(b"\n"))
        };
        let len = bytes.len() - trailing;
        bytes.truncate(len);
        let value = Self(bytes);
        value.check_header_safe()?;
        Ok(value)
    }

    /// [`SecretValue::new`] from a string.
    pub fn from_string(s: String) -> Result<Self, SecretError> {
        Self::new(s.into_bytes())
    }

    /// Any bytes, unchanged and unchecked: for internal blobs (the broker CA private key), never
    /// for values that are injected into requests.
    pub fn binary(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }

    /// Plaintext that the vault just decrypted; it was validated when it was stored.
    pub fn from_zeroizing(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    /// The plaintext bytes. Every caller is a place where the secret is in the clear: keep the
    /// borrow short and never log it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether the value may be written into an HTTP header: non-empty, no CR, LF or NUL.
    pub fn check_header_safe(&self) -> Result<(), SecretError> {
        if self.0.is_empty() {
            return Err(SecretError::EmptyValue);
        }
        for &b in self.0.iter() {
            let what = match b {
                b'\r' => "carriage return",
                b'\n' => "line feed",
                0 => "NUL byte",
                _ => continue,
            };
            return Err(SecretError::ForbiddenByte { what });
        }
        Ok(())
    }
}

impl TryFrom<Vec<u8>> for SecretValue {
    type Error = SecretError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, Self::Error> {
        Self::new(bytes)
    }
}

impl TryFrom<String> for SecretValue {
    type Error = SecretError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::from_string(s)
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<redacted, {} bytes>)", self.0.len())
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALUE: &str = "sk-test-0123456789abcdef";

    #[test]
    fn debug_and_display_never_show_the_value() {
        let v = SecretValue::from_string(VALUE.to_string()).expect("valid");
        for shown in [
            format!("{v:?}"),
            format!("{v:#?}"),
            format!("{v}"),
            format!("{:?}", Some(&v)),
            format!("{:?}", vec![v.clone()]),
        ] {
            assert!(!shown.contains(VALUE), "value leaked into formatting");
            assert!(!shown.contains("0123456789"), "part of the value leaked");
        }
        assert_eq!(format!("{v:?}"), "SecretValue(<redacted, 24 bytes>)");
        assert_eq!(format!("{v}"), "SecretValue(<redacted, 24 bytes>)");
    }

    #[test]
    fn errors_never_show_the_value() {
        let e = SecretValue::new(b"abc\ndef".to_vec()).expect_err("embedded newline");
        assert!(!e.to_string().contains("abc"));
        let e = SecretName::new("sk-proj/AAAABBBBCCCCDDDD").expect_err("slash");
        assert!(!e.to_string().contains("AAAABBBB"));
        let long = "a".repeat(200);
        let e = SecretName::new(long.clone()).expect_err("too long");
        assert!(!e.to_string().contains(&long));
    }

    #[test]
    fn value_trims_one_trailing_newline() {
        let v = SecretValue::new(b"abc\n".to_vec()).expect("valid");
        assert!(v.expose() == b"abc");
        let v = SecretValue::new(b"abc\r\n".to_vec()).expect("valid");
        assert!(v.expose() == b"abc");
        assert_eq!(
            SecretValue::new(b"abc\n\n".to_vec()).map(|_| ()),
            Err(SecretError::ForbiddenByte { what: "line feed" })
        );
    }

    #[test]
    fn value_refuses_empty_and_header_breaking_bytes() {
        for (input, expected) in [
            (&b""[..], SecretError::EmptyValue),
            (b"\n", SecretError::EmptyValue),
            (
                b"a\rb",
                SecretError::ForbiddenByte {
                    what: "carriage return",
                },
            ),
            (b"a\nb", SecretError::ForbiddenByte { what: "line feed" }),
            (b"a\0b", SecretError::ForbiddenByte { what: "NUL byte" }),
        ] {
            assert_eq!(
                SecretValue::new(input.to_vec()).map(|_| ()),
                Err(expected),
                "input of {} bytes",
                input.len()
            );
        }
        let bin = SecretValue::binary(b"-----BEGIN\nKEY\n".to_vec());
        assert_eq!(bin.len(), 15);
        assert!(bin.check_header_safe().is_err());
    }

    #[test]
    fn names_follow_the_rule() {
        for ok in [
            "A",
            "OPENAI_KEY",
            "github.token-2",
            &"x".repeat(MAX_NAME_LEN),
        ] {
            assert_eq!(SecretName::new(ok).expect("valid").as_str(), ok);
        }
        for bad in [
            "",
            "1KEY",
            "_KEY",
            "-KEY",
            "KEY NAME",
            "KEY/1",
            "KEY\0",
            "KÉY",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            let e = SecretName::new(bad).expect_err(bad);
            assert!(e.to_string().starts_with("invalid secret name: "), "{e}");
        }
        assert_eq!(
            SecretName::new("KEY/1").expect_err("slash").to_string(),
            "invalid secret name: '/' at byte 3 is not allowed (a name is 1-64 characters of A-Z a-z 0-9 _ . - and starts with a letter)"
        );
    }

    #[test]
    fn name_serde_validates() {
        let n: SecretName = serde_json::from_str("\"OPENAI_KEY\"").expect("valid");
        assert_eq!(n.as_str(), "OPENAI_KEY");
        assert_eq!(serde_json::to_string(&n).expect("ser"), "\"OPENAI_KEY\"");
        assert!(serde_json::from_str::<SecretName>("\"1bad\"").is_err());
    }
}

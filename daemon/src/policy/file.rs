//! One policy file: its TOML shape, and errors located by file, line and field.
//!
//! Parsing happens in two steps. serde reads the text into the `Raw*` types (spans kept with
//! [`Spanned`]), then [`compile`] validates every value and builds the [`PolicyFile`]. Errors of
//! either step become a [`PolicyFileError`] with a line number from the span and a field path
//! (`allow[1].inject.headers.authorization`) found by walking the document.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::Deserialize;
use toml::{
    Spanned,
    de::{DeTable, DeValue},
};

use super::{HostPattern, PolicyFile, Rule, RuleRef};
use crate::{
    cgroup::CgroupPath,
    inject::{InjectSpec, Template, parse_header_name},
};

/// The port a rule applies to when it names none.
pub const DEFAULT_PORT: u16 = 443;

/// A policy file as written. Every struct refuses unknown fields, so a typo is an error rather
/// than a silently ignored rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    /// The cgroup subtree the file governs, relative to the cgroup2 mount.
    cgroup: Spanned<String>,
    /// Allow rules; none means everything is denied.
    #[serde(default)]
    allow: Vec<Spanned<RawRule>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    host: Spanned<String>,
    port: Option<Spanned<u16>>,
    #[serde(default)]
    plain_http: bool,
    inject: Option<RawInject>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInject {
    #[serde(default)]
    headers: BTreeMap<Spanned<String>, Spanned<String>>,
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

/// Parses and validates one file. Returns every problem found (serde stops at its first).
pub(super) fn compile(path: &Path, text: &str) -> Result<PolicyFile, Vec<PolicyFileError>> {
    let loc = Locator { path, text };
    let raw: RawFile = toml::from_str(text).map_err(|e| vec![loc.toml_error(&e)])?;
    let mut errors = Vec::new();

    let cgroup = CgroupPath::parse(raw.cgroup.get_ref())
        .map_err(|e| errors.push(loc.error(Some(raw.cgroup.span()), Some("cgroup".into()), e)))
        .ok();

    let file: Arc<Path> = Arc::from(path);
    let mut rules = Vec::with_capacity(raw.allow.len());
    // (host pattern, port) -> index of the first rule with it.
    let mut seen: HashMap<(HostPattern, u16), usize> = HashMap::new();
    for (index, rule) in raw.allow.into_iter().enumerate() {
        let rule = rule.into_inner();
        let field = |name: &str| Some(format!("allow[{index}].{name}"));

        let host = match HostPattern::parse(rule.host.get_ref()) {
            Ok(h) => Some(h),
            Err(e) => {
                errors.push(loc.error(
                    Some(rule.host.span()),
                    field("host"),
                    format!("{:?}: {e}", rule.host.get_ref()),
                ));
                None
            }
        };
        let port = match &rule.port {
            None => DEFAULT_PORT,
            Some(p) if *p.get_ref() == 0 => {
                errors.push(loc.error(
                    Some(p.span()),
                    field("port"),
                    "port 0 is not a destination port",
                ));
                DEFAULT_PORT
            }
            Some(p) => *p.get_ref(),
        };
        let inject = compile_inject(&loc, index, rule.inject, &mut errors);

        let (line, _) = loc.position(rule.host.span().start);
        let Some(host) = host else { continue };
        if let Some(first) = seen.insert((host.clone(), port), index) {
            errors.push(loc.error(
                Some(rule.host.span()),
                field("host"),
                format!(
                    "{host} port {port} is already covered by allow[{first}]; merge the two rules"
                ),
            ));
            continue;
        }
        rules.push(Rule {
            host,
            port,
            plain_http: rule.plain_http,
            inject: inject.unwrap_or_default(),
            rule_ref: RuleRef {
                file: Arc::clone(&file),
                index,
                line,
            },
        });
    }

    match cgroup {
        Some(cgroup) if errors.is_empty() => Ok(PolicyFile::new(file, cgroup, rules)),
        _ => Err(errors),
    }
}

fn compile_inject(
    loc: &Locator<'_>,
    index: usize,
    raw: Option<RawInject>,
    errors: &mut Vec<PolicyFileError>,
) -> Option<InjectSpec> {
    let raw = raw?;
    let mut headers = Vec::with_capacity(raw.headers.len());
    let mut first_span: HashMap<String, Range<usize>> = HashMap::new();
    let before = errors.len();
    for (name, template) in raw.headers {
        let field = Some(format!(
            "allow[{index}].inject.headers.{}",
            key_segment(name.get_ref())
        ));
        let lower = match parse_header_name(name.get_ref()) {
            Ok(n) => n,
            Err(e) => {
                errors.push(loc.error(Some(name.span()), field, e));
                continue;
            }
        };
        if first_span.insert(lower.clone(), name.span()).is_some() {
            errors.push(loc.error(
                Some(name.span()),
                field,
                format!("header {lower} is set more than once (header names are case-insensitive)"),
            ));
            continue;
        }
        match Template::parse(template.get_ref()) {
            Ok(t) => headers.push((lower, t)),
            Err(e) => errors.push(loc.error(Some(template.span()), field, e)),
        }
    }
    if errors.len() > before {
        return None;
    }
    match InjectSpec::from_parsed(headers) {
        Ok(spec) => Some(spec),
        Err(e) => {
            errors.push(loc.error(None, Some(format!("allow[{index}].inject.headers")), e));
            None
        }
    }
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

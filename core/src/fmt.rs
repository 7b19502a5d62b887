//! Formatting helpers shared by every binary.

/// An error and its sources, `outer: inner: innermost`, for messages that cross a process
/// boundary (control replies) where `{:#}` formatting of anyhow is not available.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

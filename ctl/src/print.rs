//! Formatting shared by the subcommands' output: dates in tables, pretty JSON. Each table's
//! layout lives with its subcommand.

use std::time::{Duration, UNIX_EPOCH};

/// A Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn date(unix_secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix_secs))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

/// Prints `value` as indented JSON on stdout (the `--json` of the list and status subcommands).
pub fn json_pretty(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

//! Formatting shared by the subcommands' output: dates in tables, pretty JSON. Each table's
//! layout lives with its subcommand.

/// A Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn date(unix_secs: u64) -> String {
    agent_broker_core::time::utc_date_time(unix_secs)
}

/// Prints `value` as indented JSON on stdout (the `--json` of the list and status subcommands).
pub fn json_pretty(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

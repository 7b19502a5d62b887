//! Formatting shared by the subcommands' output: dates in tables, pretty JSON, and the
//! [`outln!`] and [`out!`] every subcommand prints with. Each table's layout lives with its
//! subcommand.

use std::io::{self, Write as _};

/// `println!` for brokerctl's standard output: when the reader has gone away (`brokerctl logs
/// | head`), brokerctl ends quietly with status 0 instead of panicking; any other write error
/// ends it with the error, status 1.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::print::line(format_args!($($arg)*))
    };
}

/// `print!` for brokerctl's standard output, as [`outln!`].
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::print::text(format_args!($($arg)*))
    };
}

/// Writes `args` and a newline to standard output (see [`outln!`]).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"));
    if let Err(e) = written {
        output_failed(&e);
    }
}

/// Writes `args` to standard output (see [`outln!`]).
pub fn text(args: std::fmt::Arguments<'_>) {
    if let Err(e) = io::stdout().lock().write_fmt(args) {
        output_failed(&e);
    }
}

/// Ends brokerctl after a failed write to standard output: quietly when nobody reads it any
/// more (EPIPE), with the error otherwise.
fn output_failed(e: &io::Error) -> ! {
    if e.kind() == io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("brokerctl: cannot write to standard output: {e}");
    std::process::exit(1);
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
pub fn date(unix_secs: u64) -> String {
    agent_broker_core::time::utc_date_time(unix_secs)
}

/// Prints `value` as indented JSON on stdout (the `--json` of the list and status subcommands).
pub fn json_pretty(value: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

//! Runs the console against a brokerd run directory, without brokerctl:
//! `cargo run -p agent-broker-console --example console -- /run/agent-broker`.

use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let run_dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("/run/agent-broker"), PathBuf::from);
    match agent_broker_console::run(&run_dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                message.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            eprintln!("console: {message}");
            ExitCode::FAILURE
        }
    }
}

//! agent-broker's live console (ratatui): brokered calls and denials as they happen.
//!
//! It talks to brokerd only through `agent-broker-protocol`, over `<run-dir>/control.sock`, and
//! must never link aya, redb or rustls (nor the daemon crate); from `agent-broker-core`, which
//! links none of them, it takes the time formats. It shows audit events, which carry secret names
//! but never secret values.
//!
//! The parts follow the usual ratatui split: [`app::App`] is the model (no I/O, no clock),
//! [`ui::render`] draws it without changing it, [`event_loop::run_loop`] joins them and is
//! generic over the backend, and [`feed`] is the reader thread that reconnects to brokerd.
//! [`run`] puts the real terminal and the real socket together.

pub mod app;
pub mod event_loop;
pub mod feed;
pub mod ui;

use std::{io, path::Path};

pub use app::App;
pub use feed::{Feed, FeedMsg, StreamDecoder};

/// Why the console stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot set up the terminal (the console needs an interactive terminal)")]
    Setup(#[source] io::Error),
    #[error("cannot draw to the terminal")]
    Terminal(#[source] io::Error),
    #[error("cannot read keyboard input")]
    Input(#[source] io::Error),
    #[error("cannot restore the terminal")]
    Restore(#[source] io::Error),
    #[error("cannot start the event reader thread")]
    Reader(#[source] io::Error),
}

impl From<io::Error> for ConsoleError {
    fn from(e: io::Error) -> Self {
        Self::Terminal(e)
    }
}

impl From<std::convert::Infallible> for ConsoleError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// Runs the console on this terminal against the brokerd serving `run_dir`, until the user
/// quits. The terminal is restored on return and on panic.
pub fn run(run_dir: &Path) -> Result<(), ConsoleError> {
    let (feed, events) = Feed::spawn(run_dir).map_err(ConsoleError::Reader)?;
    let mut terminal = match ratatui::try_init() {
        Ok(t) => t,
        Err(e) => {
            // Raw mode may be on even though the alternate screen failed.
            let _ = ratatui::try_restore();
            return Err(ConsoleError::Setup(e));
        }
    };
    let mut app = App::new(run_dir.display().to_string());
    let result = event_loop::run_loop(
        &mut terminal,
        &mut app,
        &events,
        &mut event_loop::TerminalInput,
        agent_broker_core::time::now_unix_ms,
        &mut |id, decision| feed.decide(id, decision),
    );
    let restored = ratatui::try_restore().map_err(ConsoleError::Restore);
    // The reader stops when its channel is gone; then joining it is quick.
    drop(events);
    drop(feed);
    result.and(restored)
}

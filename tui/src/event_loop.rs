//! The event loop: drain the reader's messages, draw, wait for a key. Generic over the backend
//! and the input source, so tests run it with `TestBackend` and scripted keys.

use std::{
    io,
    sync::mpsc::{Receiver, TryRecvError},
    time::Duration,
};

use ratatui::{
    Terminal,
    backend::Backend,
    crossterm::event::{self, Event, KeyEventKind},
    layout::Rect,
};

use agent_broker_protocol::ApprovalDecision;

use crate::{ConsoleError, app::App, feed::FeedMsg, ui};

/// How long the loop waits for a key before looking for new events again.
pub const FRAME_EVERY: Duration = Duration::from_millis(100);

/// Messages taken from the reader per frame, so a flood cannot keep the screen from redrawing.
const MAX_MESSAGES_PER_FRAME: usize = 20_000;

/// Where key presses and resizes come from.
pub trait Input {
    /// The next terminal event, or None when nothing came within `timeout`.
    fn next_event(&mut self, timeout: Duration) -> io::Result<Option<Event>>;
}

/// The real terminal (crossterm).
#[derive(Clone, Copy, Debug, Default)]
pub struct TerminalInput;

impl Input for TerminalInput {
    fn next_event(&mut self, timeout: Duration) -> io::Result<Option<Event>> {
        if event::poll(timeout)? {
            event::read().map(Some)
        } else {
            Ok(None)
        }
    }
}

/// Takes what the reader has sent so far (bounded per call).
pub fn drain(app: &mut App, feed: &Receiver<FeedMsg>) {
    for _ in 0..MAX_MESSAGES_PER_FRAME {
        match feed.try_recv() {
            Ok(msg) => app.apply(msg),
            Err(TryRecvError::Empty) => return,
            Err(TryRecvError::Disconnected) => {
                if !matches!(
                    app.connection(),
                    crate::app::Connection::Disconnected { .. }
                ) {
                    app.apply(FeedMsg::Disconnected("the event reader stopped".into()));
                }
                return;
            }
        }
    }
}

/// Lays out for the terminal's current size (the table height sets paging) and draws one frame.
pub fn draw<B: Backend>(terminal: &mut Terminal<B>, app: &mut App) -> Result<(), ConsoleError>
where
    ConsoleError: From<B::Error>,
{
    let size = terminal.size()?;
    app.set_viewport(ui::table_rows(Rect::new(0, 0, size.width, size.height)));
    terminal.draw(|frame| ui::render(frame, app))?;
    Ok(())
}

/// Runs until the user quits: messages from `feed` update `app`, keys from `input` drive it,
/// `now` gives the time for the per-minute rates, and `decide` sends the decisions about
/// waiting requests the keys made.
pub fn run_loop<B, I, C>(
    terminal: &mut Terminal<B>,
    app: &mut App,
    feed: &Receiver<FeedMsg>,
    input: &mut I,
    mut now: C,
    decide: &mut dyn FnMut(u64, ApprovalDecision),
) -> Result<(), ConsoleError>
where
    B: Backend,
    ConsoleError: From<B::Error>,
    I: Input,
    C: FnMut() -> u64,
{
    loop {
        drain(app, feed);
        app.tick(now());
        draw(terminal, app)?;
        if app.should_quit() {
            return Ok(());
        }
        match input.next_event(FRAME_EVERY).map_err(ConsoleError::Input)? {
            Some(Event::Key(key)) if key.kind != KeyEventKind::Release => {
                app.handle_key(key);
                for (id, decision) in app.take_decisions() {
                    decide(id, decision);
                }
            }
            // A resize needs nothing but the redraw at the top of the loop, which lays out anew.
            Some(_) | None => {}
        }
        if app.should_quit() {
            return Ok(());
        }
    }
}

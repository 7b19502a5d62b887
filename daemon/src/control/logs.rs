//! The audit log: `logs` (history, then live events with `follow`), `subscribe` and
//! `logs verify`.

use std::io;

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::{ErrorKind, LogFilter, Response};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tracing::warn;

use super::{
    ControlState,
    reply::{encode, error},
};

/// Sends stored records matching `filter` (none for a bare subscription, which passes a
/// default filter with `follow`), then `EndOfLog`, then, with `follow`, live events until the
/// client goes away. A subscriber that falls behind skips events rather than slowing brokerd.
pub async fn stream_logs(
    mut reader: tokio::io::Take<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    state: &ControlState,
    filter: LogFilter,
    follow: bool,
) -> io::Result<()> {
    // Subscribe before reading history so nothing committed in between is missed; events
    // already sent as history are skipped by sequence number.
    let mut live = follow.then(|| state.audit.subscribe());
    let audit = state.audit.clone();
    let query = filter.clone();
    let history = tokio::task::spawn_blocking(move || audit.query(&query)).await;
    let mut last_seq = 0;
    match history {
        Ok(Ok(events)) => {
            for event in events {
                last_seq = last_seq.max(event.seq);
                write.write_all(&encode(&Response::Event { event })).await?;
            }
        }
        Ok(Err(e)) => {
            write
                .write_all(&encode(&error(ErrorKind::Internal, error_chain(&e))))
                .await?;
            return Ok(());
        }
        Err(e) => {
            let r = error(ErrorKind::Internal, format!("audit query failed: {e}"));
            write.write_all(&encode(&r)).await?;
            return Ok(());
        }
    }
    write.write_all(&encode(&Response::EndOfLog)).await?;
    let Some(live) = live.as_mut() else {
        return Ok(());
    };
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            // The client closing its end (or sending anything) ends the stream.
            r = reader.read_until(b'\n', &mut scratch) => {
                if r.unwrap_or(0) == 0 {
                    return Ok(());
                }
                scratch.clear();
            }
            event = live.recv() => match event {
                Ok(event) => {
                    if event.seq != 0 && event.seq <= last_seq {
                        continue;
                    }
                    if crate::audit::matches(&filter, &event) {
                        write.write_all(&encode(&Response::Event { event })).await?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "a log follower fell behind; events skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

/// Checks the audit log's hash chain.
pub async fn verify(state: &ControlState) -> Response {
    let audit = state.audit.clone();
    match tokio::task::spawn_blocking(move || audit.verify()).await {
        Ok(Ok(report)) => Response::Verified { report },
        Ok(Err(e)) => error(ErrorKind::Internal, error_chain(&e)),
        Err(e) => error(ErrorKind::Internal, format!("verify task failed: {e}")),
    }
}

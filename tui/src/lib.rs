//! agent-broker's live console (ratatui): brokered calls and denials as they happen.
//!
//! Not built yet (issue 5). It will talk to brokerd only through `agent-broker-protocol`, and
//! must never link aya, redb or rustls.

//! Shares: how much of brokerd one agent may hold at once, so that one agent cannot make brokerd
//! unavailable to the others (THREAT-MODEL: denial of service between agents).
//!
//! Every agent cgroup gets its own share; agents never share one (that is what a rule's `rate`
//! is for). A policy file's `[shares]` table sets them for every cgroup it governs. Each field
//! is the smallest value any governing file sets, or the default when none sets it.

use std::fmt;

/// How many kinds of share there are.
const KINDS: usize = 6;

/// One kind of share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ShareKind {
    /// Connections to brokerd open at once (TCP to the proxy, TLS or not).
    Connections,
    /// New connections accepted per second.
    NewConnectionsPerSecond,
    /// Connections accepted but not yet at HTTP (first bytes, TLS handshake).
    PendingHandshakes,
    /// HTTP requests in flight (from the request head to the response's end).
    RequestsInFlight,
    /// DNS queries per second.
    DnsQueriesPerSecond,
    /// HTTP requests started per second (an HTTP/2 stream is a request).
    RequestsPerSecond,
}

impl ShareKind {
    pub const ALL: [ShareKind; KINDS] = [
        Self::Connections,
        Self::NewConnectionsPerSecond,
        Self::PendingHandshakes,
        Self::RequestsInFlight,
        Self::DnsQueriesPerSecond,
        Self::RequestsPerSecond,
    ];

    /// The field's name in `[shares]`.
    pub fn field(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::NewConnectionsPerSecond => "new_connections_per_second",
            Self::PendingHandshakes => "pending_handshakes",
            Self::RequestsInFlight => "requests_in_flight",
            Self::DnsQueriesPerSecond => "dns_queries_per_second",
            Self::RequestsPerSecond => "requests_per_second",
        }
    }

    /// Whether the share is a rate (per second) rather than a count held at once.
    pub fn is_rate(self) -> bool {
        matches!(
            self,
            Self::NewConnectionsPerSecond | Self::DnsQueriesPerSecond | Self::RequestsPerSecond
        )
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ShareKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connections => "open connections",
            Self::NewConnectionsPerSecond => "new connections per second",
            Self::PendingHandshakes => "pending handshakes",
            Self::RequestsInFlight => "requests in flight",
            Self::DnsQueriesPerSecond => "DNS queries per second",
            Self::RequestsPerSecond => "requests per second",
        })
    }
}

/// An agent's shares: one value per [`ShareKind`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shares([u32; KINDS]);

impl Shares {
    /// What an agent gets when no governing file says otherwise. Generous for one agent (a
    /// build fetching dependencies, an SDK with a connection pool), small beside brokerd's file
    /// descriptor limit, which brokerd raises at start.
    pub const DEFAULT: Shares = Shares([
        1024, // connections
        256,  // new connections per second
        128,  // pending handshakes
        512,  // requests in flight
        256,  // DNS queries per second
        1000, // requests per second
    ]);

    pub fn get(&self, kind: ShareKind) -> u32 {
        self.0[kind.index()]
    }

    /// `self` with `kind` set to `value`.
    pub fn with(mut self, kind: ShareKind, value: u32) -> Self {
        self.0[kind.index()] = value;
        self
    }
}

impl Default for Shares {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Shares {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, kind) in ShareKind::ALL.into_iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} = {}", kind.field(), self.get(kind))?;
        }
        Ok(())
    }
}

/// What one file's `[shares]` sets: each field optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SharesSpec([Option<u32>; KINDS]);

impl SharesSpec {
    pub fn get(&self, kind: ShareKind) -> Option<u32> {
        self.0[kind.index()]
    }

    pub(super) fn set(&mut self, kind: ShareKind, value: u32) {
        self.0[kind.index()] = Some(value);
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(Option::is_none)
    }

    /// The shares when `specs` are every governing file's: the smallest value set, else the
    /// default.
    pub fn combine<'a>(specs: impl IntoIterator<Item = &'a SharesSpec>) -> Shares {
        let mut set: [Option<u32>; KINDS] = [None; KINDS];
        for spec in specs {
            for (acc, v) in set.iter_mut().zip(spec.0) {
                *acc = match (*acc, v) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let mut shares = Shares::DEFAULT;
        for kind in ShareKind::ALL {
            if let Some(v) = set[kind.index()] {
                shares = shares.with(kind, v);
            }
        }
        shares
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pairs: &[(ShareKind, u32)]) -> SharesSpec {
        let mut s = SharesSpec::default();
        for &(k, v) in pairs {
            s.set(k, v);
        }
        s
    }

    #[test]
    fn nothing_set_is_the_default() {
        assert_eq!(SharesSpec::combine([]), Shares::DEFAULT);
        assert_eq!(
            SharesSpec::combine([&SharesSpec::default()]),
            Shares::DEFAULT
        );
    }

    #[test]
    fn the_smallest_value_of_the_levels_wins_field_by_field() {
        use ShareKind::*;
        let child = spec(&[(Connections, 50), (RequestsInFlight, 9000)]);
        let parent = spec(&[
            (Connections, 80),
            (RequestsInFlight, 10),
            (DnsQueriesPerSecond, 5),
        ]);
        let s = SharesSpec::combine([&child, &parent]);
        assert_eq!(s.get(Connections), 50);
        assert_eq!(s.get(RequestsInFlight), 10);
        assert_eq!(s.get(DnsQueriesPerSecond), 5);
        assert_eq!(
            s.get(PendingHandshakes),
            Shares::DEFAULT.get(PendingHandshakes)
        );
        // A value above the default still counts when no level sets a smaller one.
        let s = SharesSpec::combine([&child]);
        assert_eq!(s.get(RequestsInFlight), 9000);
    }

    #[test]
    fn display_names_every_field() {
        let text = Shares::DEFAULT.to_string();
        for kind in ShareKind::ALL {
            assert!(text.contains(kind.field()), "{text}");
        }
    }
}

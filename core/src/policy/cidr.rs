//! IP address ranges as `ip = "..."` rules name them: one address or a CIDR block, v4 or v6.
//!
//! Addresses are compared in canonical form: an IPv4-mapped IPv6 address (`::ffff:10.0.0.1`,
//! what a dual-stack socket reports for an IPv4 peer) is the IPv4 address, in rules and in
//! requests alike, so a rule cannot be dodged by the other spelling.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

/// Why an `ip` value was refused. Each message says how to write it instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("the address is empty")]
    Empty,
    #[error("{0:?} is not an IPv4 or IPv6 address")]
    BadAddress(String),
    #[error("prefix length {0:?} is not a number")]
    BadPrefix(String),
    #[error("prefix length /{prefix} is too long for an {family} address (at most /{max})")]
    PrefixTooLong {
        prefix: u32,
        family: &'static str,
        max: u8,
    },
    #[error("an IPv4-mapped range (`::ffff:a.b.c.d/N`) needs a prefix of at least /96")]
    MappedPrefix,
    #[error("/0 would allow every address; name a smaller range")]
    Everything,
    #[error("the address has bits set beyond the /{prefix} prefix; write {network}/{prefix}")]
    HostBits { network: IpAddr, prefix: u8 },
    #[error("an address range is an address and a prefix, not a host name, URL or port")]
    NotAnAddress,
}

/// A validated address range: the network address (host bits zero) and its prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNet {
    network: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `192.0.2.7` (a /32), `2001:db8::/32`, `::1` (a /128), or `[::1]`.
    pub fn parse(raw: &str) -> Result<Self, CidrError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(CidrError::Empty);
        }
        if raw.contains("://") {
            return Err(CidrError::NotAnAddress);
        }
        let (addr, prefix) = match raw.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (raw, None),
        };
        let addr = addr
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            .unwrap_or(addr);
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::BadAddress(addr.to_string()))?;
        let (ip, shift) = canonical_with_shift(ip);
        let max = max_prefix(ip);
        let prefix = match prefix {
            None => max,
            Some(p) => {
                let n: u32 = p.parse().map_err(|_| CidrError::BadPrefix(p.to_string()))?;
                let total = max + shift;
                if n > u32::from(total) {
                    return Err(CidrError::PrefixTooLong {
                        prefix: n,
                        family: if total == 32 { "IPv4" } else { "IPv6" },
                        max: total,
                    });
                }
                // A v4-mapped v6 range counts its prefix over 128 bits.
                let n = n
                    .checked_sub(u32::from(shift))
                    .ok_or(CidrError::MappedPrefix)?;
                u8::try_from(n).map_err(|_| CidrError::BadPrefix(p.to_string()))?
            }
        };
        if prefix == 0 {
            return Err(CidrError::Everything);
        }
        let network = mask(ip, prefix);
        if network != ip {
            return Err(CidrError::HostBits { network, prefix });
        }
        Ok(Self { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> IpAddr {
        self.network
    }

    /// The prefix length (32 or 128 for a single address).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (any spelling) is in the range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        ip.is_ipv4() == self.network.is_ipv4() && mask(ip, self.prefix) == self.network
    }

    /// Whether every address of `other` is in this range.
    pub fn covers(&self, other: &IpNet) -> bool {
        self.prefix <= other.prefix && self.contains(other.network)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.prefix == max_prefix(self.network) {
            write!(f, "{}", self.network)
        } else {
            write!(f, "{}/{}", self.network, self.prefix)
        }
    }
}

/// The canonical form of an address: IPv4-mapped IPv6 becomes IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn canonical_with_shift(ip: IpAddr) -> (IpAddr, u8) {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (IpAddr::V4(v4), 96),
            None => (ip, 0),
        },
        IpAddr::V4(_) => (ip, 0),
    }
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn mask(ip: IpAddr, prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        IpNet::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect(s)
    }

    #[test]
    fn forms() {
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("192.0.2.7").to_string(), "192.0.2.7");
        assert_eq!(net("192.0.2.7/32").to_string(), "192.0.2.7");
        assert_eq!(net("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(net("[::1]").to_string(), "::1");
        assert_eq!(net("::1/128").prefix(), 128);
        // v4-mapped v6 is the v4 range.
        assert_eq!(net("::ffff:10.0.0.0/104"), net("10.0.0.0/8"));
        assert_eq!(net("::ffff:192.0.2.7"), net("192.0.2.7"));
    }

    #[test]
    fn bad_forms_say_why() {
        for (raw, want) in [
            ("", "empty"),
            (
                "10.0.0.0/33",
                "/33 is too long for an IPv4 address (at most /32)",
            ),
            ("::/129", "too long for an IPv6"),
            ("::ffff:10.0.0.0/129", "too long"),
            ("::ffff:10.0.0.0/90", "at least /96"),
            ("10.0.0.0/x", "not a number"),
            ("10.0.0.0/0", "every address"),
            ("::/0", "every address"),
            ("10.1.0.0/8", "write 10.0.0.0/8"),
            ("example.test", "not an IPv4 or IPv6"),
            ("10.0.0.1:22", "not an IPv4 or IPv6"),
            ("https://10.0.0.1", "not a host name"),
            ("10.0.0", "not an IPv4"),
        ] {
            let e = IpNet::parse(raw).expect_err(raw).to_string();
            assert!(e.contains(want), "{raw:?}: {e}");
        }
    }

    #[test]
    fn containment() {
        let n = net("10.0.0.0/8");
        assert!(n.contains(ip("10.1.2.3")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        assert!(!n.contains(ip("11.0.0.0")));
        assert!(!n.contains(ip("::a01:203")));
        let v6 = net("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:1::5")));
        assert!(!v6.contains(ip("2001:db9::")));
        assert!(!v6.contains(ip("10.0.0.1")));
        assert!(net("127.0.0.2").contains(ip("127.0.0.2")));
        assert!(!net("127.0.0.2").contains(ip("127.0.0.3")));
    }

    #[test]
    fn coverage() {
        assert!(net("10.0.0.0/8").covers(&net("10.1.0.0/16")));
        assert!(net("10.0.0.0/8").covers(&net("10.0.0.0/8")));
        assert!(!net("10.1.0.0/16").covers(&net("10.0.0.0/8")));
        assert!(!net("10.0.0.0/8").covers(&net("11.0.0.0/16")));
        assert!(!net("10.0.0.0/8").covers(&net("::1")));
        assert!(net("::/1").covers(&net("::1")));
    }
}

//! A DNS resolver on loopback for the tests: answers A and AAAA questions for the names it was
//! given and NXDOMAIN for any other, so no test ever sends a query to the host's resolver.
//! brokerd is pointed at it with `--dns-upstream` (every [`crate::Broker`] the harness starts
//! is, unless the test names a resolver of its own), so brokerd's lookups prove exactly the
//! names the test gave the addresses of its servers.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// The names a resolver answers, lowercase, without the final dot, and the TTL of each
/// name's answer (60 s unless [`TestResolver::set`] gave another).
type Names = Arc<Mutex<HashMap<String, (Vec<IpAddr>, u32)>>>;

/// The TTL of an answer unless the test set another.
const DEFAULT_TTL: u32 = 60;

/// A running test resolver; stops when dropped.
pub struct TestResolver {
    addr: SocketAddr,
    names: Names,
    stop: Arc<AtomicBool>,
}

impl TestResolver {
    /// Answers each name (any case, without the final dot) with its address.
    pub fn start(names: &[(&str, impl Into<IpAddr> + Copy)]) -> Self {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the test resolver");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let resolver = Self {
            addr,
            names: Names::default(),
            stop: stop.clone(),
        };
        for (name, ip) in names {
            resolver.add(name, (*ip).into());
        }
        let names = resolver.names.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let reply = {
                    let names = names.lock().unwrap_or_else(|e| e.into_inner());
                    answer(&buf[..n], &names)
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        resolver
    }

    /// Answers `name` with `ip` as well, from now on (a name may have several addresses).
    /// `*.suffix` answers the names one label under `suffix` that have no entry of their own;
    /// with 0.0.0.0 as its address, each such name gets an address of its own in
    /// 198.18.0.0/15 (a test filling brokerd's table of answered names). brokerd remembers what it looked up for a few seconds at least, so add a name before
    /// brokerd is asked about it.
    pub fn add(&self, name: &str, ip: IpAddr) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        let (addrs, _) = names
            .entry(name.trim_end_matches('.').to_ascii_lowercase())
            .or_insert_with(|| (Vec::new(), DEFAULT_TTL));
        if !addrs.contains(&ip) {
            addrs.push(ip);
        }
    }

    /// Answers `name` with `ips` only, with this TTL (seconds), from now on: a name whose
    /// address changes.
    pub fn set(&self, name: &str, ips: &[IpAddr], ttl: u32) {
        let mut names = self.names.lock().unwrap_or_else(|e| e.into_inner());
        names.insert(
            name.trim_end_matches('.').to_ascii_lowercase(),
            (ips.to_vec(), ttl),
        );
    }

    /// Where brokerd should send its queries.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TestResolver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The answer to one query, or `None` for one that is not worth an answer.
/// An address in 198.18.0.0/15 (for benchmarks, never routed here) for a name under a
/// wildcard (see [`TestResolver::add`]): distinct names get distinct addresses, mostly.
fn derived_address(name: &str) -> IpAddr {
    // FNV-1a.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let low = u32::try_from(hash % (1 << 17)).unwrap_or(0);
    IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + low))
}

fn answer(query: &[u8], names: &HashMap<String, (Vec<IpAddr>, u32)>) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
    // The question: labels, then type and class.
    let mut at = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let question_end = at + 4;
    let question = query.get(12..question_end)?;
    let name = labels.join(".");
    let derived;
    let found = match names.get(&name) {
        Some((ips, _)) => Some(ips),
        None => {
            // `*.suffix` given as 0.0.0.0: every name under it answers an address of its own.
            let wild = labels.get(1..).map(|rest| format!("*.{}", rest.join(".")));
            match wild.as_ref().and_then(|w| names.get(w)) {
                Some((ips, _)) if ips == &[IpAddr::from([0, 0, 0, 0])] => {
                    derived = vec![derived_address(&name)];
                    Some(&derived)
                }
                Some((ips, _)) => Some(ips),
                None => None,
            }
        }
    };
    let ttl = names.get(&name).map_or(DEFAULT_TTL, |(_, ttl)| *ttl);
    // A (1) gets the IPv4 addresses, AAAA (28) the IPv6 ones; other types none.
    let records: Vec<Vec<u8>> = found
        .into_iter()
        .flatten()
        .filter_map(|ip| match (ip, qtype) {
            (IpAddr::V4(v4), 1) => Some(v4.octets().to_vec()),
            (IpAddr::V6(v6), 28) => Some(v6.octets().to_vec()),
            _ => None,
        })
        .collect();
    let mut reply = Vec::with_capacity(question_end + 28 * records.len());
    reply.extend_from_slice(&query[..2]); // id
    let rcode: u8 = if found.is_some() { 0 } else { 3 }; // NXDOMAIN
    reply.extend_from_slice(&[0x81, 0x80 | rcode]); // response, RD, RA
    reply.extend_from_slice(&[0, 1]); // one question
    let answers = u16::try_from(records.len()).ok()?;
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for data in records {
        // A pointer to the question's name, the type, class IN, the TTL, the address.
        reply.extend_from_slice(&[0xc0, 0x0c]);
        reply.extend_from_slice(&qtype.to_be_bytes());
        reply.extend_from_slice(&[0, 1]);
        reply.extend_from_slice(&ttl.to_be_bytes());
        reply.extend_from_slice(&u16::try_from(data.len()).ok()?.to_be_bytes());
        reply.extend_from_slice(&data);
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(labels: &[&str], qtype: u16) -> Vec<u8> {
        // id 0x1234, RD, one question.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in labels {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    #[test]
    fn answers_known_names_and_nxdomain_for_others() {
        let names = HashMap::from([(
            "api.example.test".to_string(),
            (
                vec![
                    "127.0.0.2".parse().expect("ip"),
                    "127.0.0.4".parse().expect("ip"),
                    "::1".parse().expect("ip"),
                ],
                7,
            ),
        )]);
        let q = query(&["api", "example", "test"], 1);
        let r = answer(&q, &names).expect("answer");
        assert_eq!(&r[..2], [0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 2, "two A answers");
        assert_eq!(&r[r.len() - 4..], [127, 0, 0, 4]);
        // Each answer's TTL is the name's (the 4 bytes before the data length).
        assert_eq!(&r[r.len() - 10..r.len() - 6], 7u32.to_be_bytes());
        let r = answer(&query(&["API", "example", "test"], 28), &names).expect("answer");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one AAAA answer");
        let mut one = [0u8; 16];
        one[15] = 1;
        assert_eq!(&r[r.len() - 16..], one);
        let r = answer(&query(&["xyz", "example", "test"], 1), &names).expect("answer");
        assert_eq!(r[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
    }

    #[test]
    fn a_wildcard_of_0_0_0_0_gives_each_name_an_address_of_its_own() {
        let names = HashMap::from([(
            "*.flood.test".to_string(),
            (vec!["0.0.0.0".parse().expect("ip")], 60),
        )]);
        let address = |label: &str| {
            let r = answer(&query(&[label, "flood", "test"], 1), &names).expect("answer");
            assert_eq!(r[3] & 0x0f, 0, "NOERROR for {label}");
            assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one A answer");
            let ip = [
                r[r.len() - 4],
                r[r.len() - 3],
                r[r.len() - 2],
                r[r.len() - 1],
            ];
            assert_eq!(ip[..2], [198, 18 | (ip[1] & 1)], "in 198.18.0.0/15: {ip:?}");
            ip
        };
        assert_eq!(
            address("n1"),
            address("n1"),
            "the same name, the same address"
        );
        let distinct: std::collections::HashSet<_> =
            (0..1000).map(|i| address(&format!("n{i}"))).collect();
        assert!(distinct.len() > 990, "{} distinct of 1000", distinct.len());
        // Two labels under it, or the suffix itself: not covered.
        let r = answer(&query(&["a", "b", "flood", "test"], 1), &names).expect("answer");
        assert_eq!(r[3] & 0x0f, 3, "NXDOMAIN");
    }
}

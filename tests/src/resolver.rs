//! A DNS resolver on loopback for the tests: answers A questions for the names it was given and
//! NXDOMAIN for any other, so no test ever sends a query to the host's resolver. brokerd is
//! pointed at it with `--dns-upstream`.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

/// A running test resolver; stops when dropped.
pub struct TestResolver {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl TestResolver {
    /// Answers each name (lowercase, without the final dot) with its address.
    pub fn start(names: &[(&str, Ipv4Addr)]) -> Self {
        let names: HashMap<String, Ipv4Addr> = names
            .iter()
            .map(|(n, a)| (n.to_ascii_lowercase(), *a))
            .collect();
        let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the test resolver");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let addr = socket.local_addr().expect("its address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopped.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&buf[..n], &names) {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        });
        Self { addr, stop }
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
fn answer(query: &[u8], names: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
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
    let found = names.get(&labels.join("."));
    let mut reply = Vec::with_capacity(question_end + 16);
    reply.extend_from_slice(&query[..2]); // id
    let rcode: u8 = if found.is_some() { 0 } else { 3 }; // NXDOMAIN
    reply.extend_from_slice(&[0x81, 0x80 | rcode]); // response, RD, RA
    reply.extend_from_slice(&[0, 1]); // one question
    let answers: u16 = u16::from(found.is_some() && qtype == 1);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if let (Some(addr), 1) = (found, answers) {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_known_names_and_nxdomain_for_others() {
        let names = HashMap::from([("api.example.test".to_string(), Ipv4Addr::new(127, 0, 0, 2))]);
        // id 0x1234, RD, one question: api.example.test A IN.
        let mut q = vec![0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["api", "example", "test"] {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let r = answer(&q, &names).expect("answer");
        assert_eq!(&r[..2], [0x12, 0x34]);
        assert_eq!(r[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1, "one answer");
        assert_eq!(&r[r.len() - 4..], [127, 0, 0, 2]);
        let mut other = q.clone();
        other[13..16].copy_from_slice(b"xyz");
        let r = answer(&other, &names).expect("answer");
        assert_eq!(r[3] & 0x0f, 3, "NXDOMAIN");
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 0);
    }
}

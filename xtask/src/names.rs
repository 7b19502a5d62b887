//! A DNS responder on loopback for the demo: answers A questions for the names it was given
//! with one address, and NXDOMAIN for any other, so the demo's brokerd (`--dns-upstream`) proves
//! the names its agent calls without asking the host's resolver. A credential goes only to an
//! address the name resolves to (issue 13.18), and the demo's names exist nowhere else.

use std::{
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    thread,
};

use anyhow::{Context as _, Result};

/// Starts answering on 127.0.0.1 (a port the kernel picks) for the rest of the process;
/// returns where.
pub fn serve(names: &[&str], addr: Ipv4Addr) -> Result<SocketAddr> {
    let socket = UdpSocket::bind("127.0.0.1:0").context("binding the demo's DNS responder")?;
    let local = socket.local_addr()?;
    let names: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
    thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            if let Some(reply) = answer(&buf[..n], &names, addr) {
                let _ = socket.send_to(&reply, peer);
            }
        }
    });
    Ok(local)
}

/// The answer to one query, or `None` for one that is not worth an answer.
fn answer(query: &[u8], names: &[String], addr: Ipv4Addr) -> Option<Vec<u8>> {
    if query.len() < 12 || u16::from_be_bytes([query[4], query[5]]) != 1 {
        return None;
    }
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
    let question = query.get(12..at + 4)?;
    let known = names.contains(&labels.join("."));
    let answers = u16::from(known && qtype == 1);
    let mut reply = query[..2].to_vec(); // id
    reply.extend_from_slice(&[0x81, if known { 0x80 } else { 0x83 }]); // response; NXDOMAIN
    reply.extend_from_slice(&[0, 1]);
    reply.extend_from_slice(&answers.to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    if answers == 1 {
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u8) -> Vec<u8> {
        let mut q = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, qtype, 0, 1]);
        q
    }

    #[test]
    fn answers_its_names_with_the_address_and_nothing_else() {
        let names = vec!["api.example.test".to_string()];
        let ip = Ipv4Addr::new(127, 0, 0, 2);
        let r = answer(&query("API.example.test", 1), &names, ip).expect("answer");
        assert_eq!((&r[..2], r[3] & 0x0f), (&[0xab, 0xcd][..], 0));
        assert_eq!(u16::from_be_bytes([r[6], r[7]]), 1);
        assert_eq!(&r[r.len() - 4..], [127, 0, 0, 2]);
        let r = answer(&query("api.example.test", 28), &names, ip).expect("answer");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (0, 0));
        let r = answer(&query("evil.example.test", 1), &names, ip).expect("answer");
        assert_eq!((r[3] & 0x0f, u16::from_be_bytes([r[6], r[7]])), (3, 0));
    }
}

//! What a connection starts with: TLS, plain HTTP or something else, and the SNI of a
//! ClientHello still waiting in the socket.

use std::time::Duration;

use tokio::net::TcpStream;

/// What kind of traffic a connection starts with.
#[derive(Debug, PartialEq, Eq)]
pub enum Sniffed {
    Tls,
    Http,
    Other,
}

/// Classifies the first bytes of a connection.
pub fn sniff(first: &[u8]) -> Sniffed {
    match first {
        // TLS record: handshake (22), version major 3.
        [0x16, 0x03, ..] | [0x16] => Sniffed::Tls,
        _ => {
            let token_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
            if token_len > 0 && (token_len == first.len() || first[token_len] == b' ') {
                Sniffed::Http
            } else {
                Sniffed::Other
            }
        }
    }
}

/// The SNI of a TLS ClientHello still in the socket's receive queue (peeked, not consumed),
/// when it arrives whole within a short wait.
pub(super) async fn peek_sni(stream: &TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 16 * 1024];
    for _ in 0..20 {
        let n = stream.peek(&mut buf).await.ok()?;
        match client_hello_sni(&buf[..n]) {
            Peeked::Hello(sni) => return sni,
            // Not all of it has arrived yet.
            Peeked::Incomplete if n < buf.len() => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            _ => return None,
        }
    }
    None
}

/// What the first bytes of a connection hold, read as a TLS ClientHello.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A whole ClientHello, with its SNI (ASCII-lowercased) if it has one.
    Hello(Option<String>),
    /// The start of one; more bytes are needed.
    Incomplete,
    /// Not a ClientHello.
    Invalid,
}

/// Reads the bytes at the start of a connection as a TLS ClientHello (rustls's `Acceptor`).
pub fn client_hello_sni(mut bytes: &[u8]) -> Peeked {
    let mut acceptor = rustls::server::Acceptor::default();
    if acceptor.read_tls(&mut bytes).is_err() {
        return Peeked::Invalid;
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Peeked::Hello(
            accepted
                .client_hello()
                .server_name()
                .map(|s| s.to_ascii_lowercase()),
        ),
        Ok(None) => Peeked::Incomplete,
        Err(_) => Peeked::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_tls_http_and_other() {
        assert_eq!(sniff(&[0x16, 0x03, 0x01, 0, 0]), Sniffed::Tls);
        assert_eq!(sniff(b"GET / HT"), Sniffed::Http);
        assert_eq!(sniff(b"POST /x "), Sniffed::Http);
        assert_eq!(sniff(b"SSH-2.0-"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01"), Sniffed::Other);
        assert_eq!(sniff(b"get / "), Sniffed::Other);
    }
}

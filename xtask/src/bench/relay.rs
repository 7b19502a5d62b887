//! A TCP relay that makes a loopback upstream look like one across a wide-area network: each
//! direction delivers every byte `one_way` after it arrived, and the path to the upstream opens one
//! round trip after the client connects, as a real TCP handshake would cost. Plain std threads (a
//! handful per connection): it carries tens of connections per second, which is all the wide-area
//! workload makes.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

/// A running relay; stopped (no new connections) when dropped.
pub struct DelayRelay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<thread::JoinHandle<()>>,
}

impl DelayRelay {
    /// Listens on a free port of `listen_ip` and relays each connection to `upstream`.
    pub fn start(listen_ip: IpAddr, upstream: SocketAddr, one_way: Duration) -> Result<Self> {
        let listener = TcpListener::bind((listen_ip, 0))
            .with_context(|| format!("binding the delay relay on {listen_ip}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accept = thread::Builder::new()
            .name("bench-relay".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    for client in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        if let Ok(client) = client {
                            thread::spawn(move || relay(client, upstream, one_way));
                        }
                    }
                }
            })
            .context("starting the delay relay")?;
        Ok(Self {
            addr,
            stop,
            accept: Some(accept),
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // accept() blocks; a connection of our own wakes it to see the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

/// Relays one client connection until both directions have ended.
fn relay(client: TcpStream, upstream: SocketAddr, one_way: Duration) {
    thread::sleep(2 * one_way);
    let Ok(server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(client_read), Ok(server_read)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let upward = thread::spawn(move || delayed_copy(client_read, server, one_way));
    delayed_copy(server_read, client, one_way);
    let _ = upward.join();
}

/// Copies `from` to `to`, writing each chunk `delay` after it was read; the end of `from` becomes
/// a shutdown of `to`'s write side, just as late. A failed write tears both sockets down, so the
/// reading side cannot wait forever.
fn delayed_copy(mut from: TcpStream, to: TcpStream, delay: Duration) {
    let (chunks, due_chunks) = mpsc::channel::<(Instant, Option<Vec<u8>>)>();
    let from_for_teardown = from.try_clone().ok();
    let writer = thread::spawn(move || {
        let mut to = to;
        for (due, chunk) in due_chunks {
            thread::sleep(due.saturating_duration_since(Instant::now()));
            let Some(bytes) = chunk else {
                let _ = to.shutdown(Shutdown::Write);
                return;
            };
            if to.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        if let Some(from) = from_for_teardown {
            let _ = from.shutdown(Shutdown::Both);
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let chunk = match from.read(&mut buf) {
            Ok(0) | Err(_) => None,
            Ok(n) => buf.get(..n).map(<[u8]>::to_vec),
        };
        let end = chunk.is_none();
        if chunks.send((Instant::now() + delay, chunk)).is_err() || end {
            break;
        }
    }
    drop(chunks);
    let _ = writer.join();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_the_handshake_and_each_direction() -> Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0")?;
        let echo_addr = echo.local_addr()?;
        thread::spawn(move || {
            if let Ok((mut conn, _)) = echo.accept() {
                let mut buf = [0u8; 16];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(buf.get(..n).unwrap_or_default()).is_err() {
                        break;
                    }
                }
            }
        });
        let one_way = Duration::from_millis(20);
        let relay = DelayRelay::start("127.0.0.1".parse()?, echo_addr, one_way)?;
        let started = Instant::now();
        let mut conn = TcpStream::connect(relay.addr())?;
        conn.write_all(b"ping")?;
        let mut back = [0u8; 4];
        conn.read_exact(&mut back)?;
        assert_eq!(&back, b"ping");
        // One round trip for the handshake, one for the echo.
        assert!(started.elapsed() >= 4 * one_way, "{:?}", started.elapsed());
        conn.shutdown(Shutdown::Write)?;
        assert_eq!(conn.read(&mut back)?, 0, "the relay passes the end on");
        Ok(())
    }
}

//! Fewer, larger reads on the bulk path, with nothing held while a connection is idle.
//!
//! rustls reads TLS records from its socket 4 KiB at a time, so a 16 KiB record costs four
//! `recv` calls, and tokio-rustls hands its reader at most one record per read, so every body
//! frame hyper makes is one record at most. [`ReadAhead`] sits under rustls: it reads the socket
//! [`READ_AHEAD`] bytes at a time and serves rustls's small reads from memory. [`Greedy`] sits
//! over rustls: it keeps reading records into hyper's buffer while they are already there (up to
//! [`GREEDY_LIMIT`]), so a frame carries what arrived, not one record of it.
//!
//! Neither waits for more than is there: a read returns as soon as the socket has nothing more,
//! so a server-sent event goes out the moment it arrives. [`ReadAhead`]'s buffer is freed
//! whenever the socket is drained and the read has to wait, so an idle connection holds none.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How much [`ReadAhead`] asks the socket for at a time.
pub const READ_AHEAD: usize = 64 * 1024;

/// How much [`Greedy`] puts in one read at most.
pub const GREEDY_LIMIT: usize = 64 * 1024;

/// A socket read [`READ_AHEAD`] bytes at a time; writes pass through.
pub struct ReadAhead<T> {
    inner: T,
    /// Allocated while data flows; `buf[pos..end]` is read and not yet handed out.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            pos: 0,
            end: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos == this.end {
            if out.remaining() >= READ_AHEAD {
                // As large as ours: no point copying through it.
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            if this.buf.capacity() < READ_AHEAD {
                this.buf = Vec::with_capacity(READ_AHEAD);
            }
            let mut read = ReadBuf::uninit(&mut this.buf.spare_capacity_mut()[..READ_AHEAD]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Pending => {
                    // Drained: an idle connection keeps no buffer.
                    this.buf = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = read.filled().len();
            // SAFETY: `ReadBuf::filled` says the first `n` bytes of the spare capacity were
            // initialised by the read.
            unsafe { this.buf.set_len(n) };
            this.pos = 0;
            this.end = n;
            if n == 0 {
                // End of stream.
                return Poll::Ready(Ok(()));
            }
        }
        let n = out.remaining().min(this.end - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        if this.pos == this.end {
            this.pos = 0;
            this.end = 0;
            // Kept for the next read, which may well find more; freed when that one waits.
            this.buf.clear();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream read in as few calls as what is already there allows: each read of the caller's
/// reads the inner stream until it would wait, the caller's buffer is full, or
/// [`GREEDY_LIMIT`] bytes came. Writes pass through.
pub struct Greedy<T> {
    inner: T,
    /// An error met after some bytes were read: the caller gets the bytes first.
    error: Option<io::Error>,
}

impl<T> Greedy<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, error: None }
    }

    #[cfg(test)]
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Greedy<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let start = out.filled().len();
        loop {
            let before = out.filled().len();
            match Pin::new(&mut this.inner).poll_read(cx, out) {
                Poll::Ready(Ok(())) => {
                    let got = out.filled().len() - before;
                    // End of stream (the caller sees it on its next read), a full buffer, or
                    // enough for one read.
                    if got == 0
                        || out.remaining() == 0
                        || out.filled().len() - start >= GREEDY_LIMIT
                    {
                        return Poll::Ready(Ok(()));
                    }
                }
                Poll::Ready(Err(e)) if out.filled().len() == start => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    this.error = Some(e);
                    return Poll::Ready(Ok(()));
                }
                // The inner stream registered the waker; what came so far goes now.
                Poll::Pending if out.filled().len() > start => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Greedy<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn small_reads_are_served_from_one_large_read_and_end_of_stream_shows() {
        runtime().block_on(async {
            let (mut far, near) = tokio::io::duplex(1 << 20);
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
            far.write_all(&data).await.expect("write");
            drop(far);
            let mut reader = ReadAhead::new(near);
            let mut got = Vec::new();
            let mut small = [0u8; 4096];
            loop {
                let n = reader.read(&mut small).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&small[..n]);
            }
            assert_eq!(got, data);
        });
    }

    #[test]
    fn an_idle_stream_holds_no_buffer_and_a_read_returns_what_is_there() {
        runtime().block_on(async {
            let (mut far, near) = tokio::io::duplex(1 << 16);
            let mut reader = Greedy::new(ReadAhead::new(near));
            far.write_all(b"data: 1\n\n").await.expect("write");
            let mut buf = [0u8; 1 << 16];
            let n = reader.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"data: 1\n\n");
            // Nothing more there: the next read waits, and the buffer is gone meanwhile.
            let waiting =
                tokio::time::timeout(std::time::Duration::from_millis(20), reader.read(&mut buf))
                    .await;
            assert!(waiting.is_err(), "a read returned with nothing to read");
            assert_eq!(reader.get_ref().buf.capacity(), 0);
            far.write_all(b"data: 2\n\n").await.expect("write");
            let n = reader.read(&mut buf).await.expect("read");
            assert_eq!(&buf[..n], b"data: 2\n\n");
            drop(far);
            assert_eq!(reader.read(&mut buf).await.expect("read"), 0);
        });
    }

    #[test]
    fn greedy_reads_gather_what_arrived_in_pieces() {
        runtime().block_on(async {
            let (mut far, near) = tokio::io::duplex(1 << 20);
            for _ in 0..8 {
                far.write_all(&[7u8; 4096]).await.expect("write");
            }
            // An inner stream that hands out 1 KiB per read at most.
            let (mut far2, near2) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                let mut near = near;
                let mut piece = [0u8; 1024];
                loop {
                    let n = near.read(&mut piece).await.expect("read");
                    if n == 0 {
                        break;
                    }
                    far2.write_all(&piece[..n]).await.expect("write");
                }
            });
            drop(far);
            let mut reader = Greedy::new(near2);
            let mut buf = vec![0u8; 1 << 16];
            let mut total = 0;
            loop {
                let n = reader.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                total += n;
            }
            assert_eq!(total, 8 * 4096);
        });
    }
}

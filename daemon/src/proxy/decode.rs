//! Compressed upstream responses, decoded as they stream so the scrubber can read them.
//!
//! When a response must be scrubbed (the agent's policy has secrets) brokerd asks upstream for
//! `identity`, but CDNs compress anyway, as a content coding or as a transfer coding other than
//! `chunked`. Such a response is decoded here (gzip, deflate, br, zstd), scrubbed, and forwarded as
//! identity: the caller drops `Content-Encoding` and `Content-Length` and never re-advertises
//! the coding it removed. Decoding is bounded: a body that decodes to more than
//! [`Limits::max_decoded`] bytes, or expands more than [`Limits::max_ratio`] times past the first
//! mebibyte (a zip or brotli bomb), is cut with an error, like a stream the upstream cut. A
//! coding this module does not know, or more than one, is refused before anything is sent.

use std::{
    io::{self, Write as _},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, header};
use hyper::body::Frame;

use super::body::{BodyError, Watched};

/// A content coding brokerd can decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

/// Why a response's coding cannot be decoded; the response is withheld.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum CodingRefusal {
    #[error("its content coding {0:?} is not one brokerd can decode (gzip, deflate, br, zstd)")]
    Unknown(String),
    #[error("it stacks content codings ({0}); brokerd decodes one")]
    Stacked(String),
}

impl Coding {
    /// The one content coding of a response, `None` for identity. A transfer coding other
    /// than `chunked` (`Transfer-Encoding: gzip, chunked`) leaves the body as compressed as a
    /// content coding does once `chunked` is undone, so it counts as one: read this before the
    /// hop-by-hop headers are removed.
    pub fn of(headers: &HeaderMap) -> Result<Option<Self>, CodingRefusal> {
        let listed = |name: header::HeaderName| {
            headers
                .get_all(name)
                .iter()
                .flat_map(|v| {
                    String::from_utf8_lossy(v.as_bytes())
                        .split(',')
                        .map(|c| c.trim().to_ascii_lowercase())
                        .collect::<Vec<_>>()
                })
                .filter(|c| !c.is_empty() && c != "identity")
                .collect::<Vec<_>>()
        };
        let mut codings = listed(header::CONTENT_ENCODING);
        codings.extend(
            listed(header::TRANSFER_ENCODING)
                .into_iter()
                .filter(|c| c != "chunked"),
        );
        match codings.as_slice() {
            [] => Ok(None),
            [one] => match one.as_str() {
                "gzip" | "x-gzip" => Ok(Some(Self::Gzip)),
                "deflate" => Ok(Some(Self::Deflate)),
                "br" => Ok(Some(Self::Brotli)),
                "zstd" => Ok(Some(Self::Zstd)),
                other => Err(CodingRefusal::Unknown(other.to_string())),
            },
            many => Err(CodingRefusal::Stacked(many.join(", "))),
        }
    }
}

/// How far a decoded body may grow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Decoded bytes at most.
    pub max_decoded: u64,
    /// Decoded bytes per encoded byte at most, once a mebibyte is decoded.
    pub max_ratio: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_decoded: 4 << 30,
            max_ratio: 200,
        }
    }
}

/// Below this many decoded bytes the ratio is not checked (small bodies compress very well).
const RATIO_FLOOR: u64 = 1 << 20;

/// Compressed input is fed to the decoder this many bytes at a time, and the limits checked
/// after each step, so a bomb is caught after a bounded amount of output, not after a chunk's.
const STEP: usize = 512;

/// A push decoder: compressed bytes in, decoded bytes out into a buffer it owns.
enum Decoder {
    Gzip(flate2::write::MultiGzDecoder<Vec<u8>>),
    Deflate(flate2::write::ZlibDecoder<Vec<u8>>),
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
    Zstd(zstd::stream::write::Decoder<'static, Vec<u8>>),
}

impl Decoder {
    fn new(coding: Coding) -> io::Result<Self> {
        Ok(match coding {
            Coding::Gzip => Self::Gzip(flate2::write::MultiGzDecoder::new(Vec::new())),
            Coding::Deflate => Self::Deflate(flate2::write::ZlibDecoder::new(Vec::new())),
            Coding::Brotli => Self::Brotli(Box::new(brotli::DecompressorWriter::new(
                Vec::new(),
                16 * 1024,
            ))),
            Coding::Zstd => Self::Zstd(zstd::stream::write::Decoder::new(Vec::new())?),
        })
    }

    /// Decodes `input`; returns what it decoded so far.
    fn push(&mut self, input: &[u8]) -> io::Result<Vec<u8>> {
        let out = match self {
            Self::Gzip(d) => {
                d.write_all(input)?;
                d.get_mut()
            }
            Self::Deflate(d) => {
                d.write_all(input)?;
                d.get_mut()
            }
            Self::Brotli(d) => {
                d.write_all(input)?;
                d.get_mut()
            }
            Self::Zstd(d) => {
                d.write_all(input)?;
                d.flush()?;
                d.get_mut()
            }
        };
        Ok(std::mem::take(out))
    }

    /// The end of the input: returns the rest; a truncated stream is an error.
    fn finish(&mut self) -> io::Result<Vec<u8>> {
        let out = match self {
            Self::Gzip(d) => {
                d.try_finish()?;
                d.get_mut()
            }
            Self::Deflate(d) => {
                d.try_finish()?;
                d.get_mut()
            }
            Self::Brotli(d) => {
                d.close()?;
                d.get_mut()
            }
            Self::Zstd(d) => {
                d.flush()?;
                d.get_mut()
            }
        };
        Ok(std::mem::take(out))
    }
}

/// A decoder with its limits: compressed bytes in, decoded bytes out, an error past a limit.
pub struct Capped {
    decoder: Decoder,
    limits: Limits,
    encoded: u64,
    decoded: u64,
}

impl Capped {
    pub fn new(coding: Coding, limits: Limits) -> io::Result<Self> {
        Ok(Self {
            decoder: Decoder::new(coding)?,
            limits,
            encoded: 0,
            decoded: 0,
        })
    }

    /// Decodes `data` in steps, checking the limits after each.
    pub fn decode(&mut self, data: &[u8]) -> Result<Vec<u8>, BodyError> {
        let mut out = Vec::new();
        for step in data.chunks(STEP) {
            self.encoded += step.len() as u64;
            let decoded = self.decoder.push(step).map_err(BodyError::Decode)?;
            out.extend(self.account(decoded)?);
        }
        Ok(out)
    }

    /// The end of the input: the rest of the decoded bytes, counted against the limits; a
    /// truncated stream is an error.
    pub fn finish(&mut self) -> Result<Vec<u8>, BodyError> {
        let rest = self.decoder.finish().map_err(BodyError::Decode)?;
        self.account(rest)
    }

    /// Counts `out` against the limits.
    fn account(&mut self, out: Vec<u8>) -> Result<Vec<u8>, BodyError> {
        self.decoded += out.len() as u64;
        if self.decoded > self.limits.max_decoded {
            return Err(BodyError::TooLarge(self.limits.max_decoded));
        }
        if self.decoded > RATIO_FLOOR
            && self.decoded > self.encoded.saturating_mul(self.limits.max_ratio)
        {
            return Err(BodyError::Bomb(self.limits.max_ratio));
        }
        Ok(out)
    }
}

/// A compressed upstream body, decoded as it streams.
pub(super) struct Decoded {
    inner: Watched,
    capped: Capped,
    /// Trailers waiting for the decoder's last bytes to go first.
    pending: Option<Frame<Bytes>>,
    /// The first frame, read before the response head is sent (see [`Decoded::prime`]).
    primed: Option<Frame<Bytes>>,
    ended: bool,
}

impl Decoded {
    pub(super) fn new(inner: Watched, coding: Coding, limits: Limits) -> io::Result<Self> {
        Ok(Self {
            inner,
            capped: Capped::new(coding, limits)?,
            pending: None,
            primed: None,
            ended: false,
        })
    }

    /// Reads the first frame before the response head goes out, so a body that does not
    /// decode, or a bomb caught in its first bytes, gets the agent a 502 rather than a cut.
    pub(super) async fn prime(&mut self) -> Result<(), BodyError> {
        use http_body_util::BodyExt as _;
        match self.frame().await {
            Some(Ok(frame)) => {
                self.primed = Some(frame);
                Ok(())
            }
            Some(Err(e)) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.ended = true;
        tracing::warn!(error = %e, "a compressed response could not be decoded; the agent's stream is cut");
        Poll::Ready(Some(Err(e)))
    }
}

impl hyper::body::Body for Decoded {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if let Some(frame) = this.primed.take().or_else(|| this.pending.take()) {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            let (rest, trailers) = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => match this.capped.decode(&data) {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => return Poll::Ready(Some(Ok(Frame::data(out.into())))),
                        Err(e) => return this.fail(e),
                    },
                    Err(trailers) => (this.capped.finish(), Some(trailers)),
                },
                Some(Err(e)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => (this.capped.finish(), None),
            };
            this.ended = true;
            let rest = match rest {
                Ok(rest) => rest,
                Err(e) => return this.fail(e),
            };
            this.pending = trailers;
            if !rest.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(rest.into()))));
            }
            return Poll::Ready(this.pending.take().map(Ok));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.pending.is_none() && self.primed.is_none()
    }
}

/// Test helpers: compress like an upstream would.
#[cfg(test)]
pub(super) mod testing {
    use std::io::Write as _;

    use super::Coding;

    /// `plain` in `coding`.
    pub(crate) fn encode(coding: Coding, plain: &[u8]) -> Vec<u8> {
        match coding {
            Coding::Gzip => {
                let mut e =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(plain).expect("gzip");
                e.finish().expect("gzip")
            }
            Coding::Deflate => {
                let mut e =
                    flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
                e.write_all(plain).expect("deflate");
                e.finish().expect("deflate")
            }
            Coding::Brotli => {
                let mut out = Vec::new();
                {
                    let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                    e.write_all(plain).expect("br");
                }
                out
            }
            Coding::Zstd => zstd::stream::encode_all(plain, 3).expect("zstd"),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::{testing::encode, *};

    fn headers(codings: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in codings {
            h.append(
                header::CONTENT_ENCODING,
                HeaderValue::from_str(c).expect("value"),
            );
        }
        h
    }

    #[test]
    fn a_transfer_coding_other_than_chunked_counts_as_a_coding() {
        let mut h = HeaderMap::new();
        h.insert(
            header::TRANSFER_ENCODING,
            "gzip, chunked".parse().expect("v"),
        );
        assert_eq!(Coding::of(&h), Ok(Some(Coding::Gzip)));
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().expect("v"));
        assert_eq!(Coding::of(&h), Ok(None));
        h.insert(
            header::TRANSFER_ENCODING,
            "compress, chunked".parse().expect("v"),
        );
        assert!(matches!(Coding::of(&h), Err(CodingRefusal::Unknown(_))));
        h.insert(
            header::TRANSFER_ENCODING,
            "gzip, chunked".parse().expect("v"),
        );
        h.insert(header::CONTENT_ENCODING, "br".parse().expect("v"));
        assert!(matches!(Coding::of(&h), Err(CodingRefusal::Stacked(_))));
    }

    #[test]
    fn one_known_coding_is_decoded_others_are_refused() {
        assert_eq!(Coding::of(&headers(&[])), Ok(None));
        assert_eq!(Coding::of(&headers(&["identity"])), Ok(None));
        assert_eq!(Coding::of(&headers(&["GZIP"])), Ok(Some(Coding::Gzip)));
        assert_eq!(Coding::of(&headers(&["br"])), Ok(Some(Coding::Brotli)));
        assert_eq!(Coding::of(&headers(&["zstd"])), Ok(Some(Coding::Zstd)));
        assert_eq!(
            Coding::of(&headers(&["deflate"])),
            Ok(Some(Coding::Deflate))
        );
        assert!(matches!(
            Coding::of(&headers(&["compress"])),
            Err(CodingRefusal::Unknown(_))
        ));
        assert!(matches!(
            Coding::of(&headers(&["gzip, br"])),
            Err(CodingRefusal::Stacked(_))
        ));
        assert!(matches!(
            Coding::of(&headers(&["gzip", "gzip"])),
            Err(CodingRefusal::Stacked(_))
        ));
    }

    #[test]
    fn every_coding_round_trips_in_any_chunking() {
        let plain: Vec<u8> = (0..50_000u32).flat_map(|i| i.to_le_bytes()).collect();
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli, Coding::Zstd] {
            let encoded = encode(coding, &plain);
            for chunk in [1, 7, 4096, encoded.len()] {
                let mut d = Decoder::new(coding).expect("decoder");
                let mut out = Vec::new();
                for piece in encoded.chunks(chunk) {
                    out.extend(d.push(piece).expect("push"));
                }
                out.extend(d.finish().expect("finish"));
                assert!(out == plain, "{coding:?} in chunks of {chunk}");
            }
        }
    }

    #[test]
    fn a_truncated_stream_is_an_error() {
        let plain = vec![b'x'; 10_000];
        for coding in [Coding::Gzip, Coding::Deflate, Coding::Brotli] {
            let encoded = encode(coding, &plain);
            let mut d = Decoder::new(coding).expect("decoder");
            let _ = d.push(&encoded[..encoded.len() / 2]);
            assert!(d.finish().is_err(), "{coding:?} cut in half");
        }
    }
}

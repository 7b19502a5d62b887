//! The bodies that stream through the proxy: the agent's request body (counted), and the
//! response body the agent gets (counted, optionally metered for the LLM usage it reports,
//! scrubbed of the secrets of the agent's policy, and reported once when it ends), watched for an upstream that stalls or
//! dies mid-stream. None is ever buffered whole.
//!
//! A response the upstream cut is never presented as complete: the body ends with an error,
//! so hyper closes an HTTP/1.1 connection without the terminal chunk and resets an HTTP/2
//! stream, and the agent's client reports the error.

use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use agent_broker_core::policy::{UsageMeter, UsageReading};
use bytes::Bytes;

use super::BodyTransform;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Frame, Incoming};

use std::future::Future as _;

use super::{
    scrub::{Needles, Scrubber},
    upstream::PooledBody,
};

/// The body of every response brokerd sends an agent: upstream's answer (scrubbed when a
/// secret was injected) or brokerd's own JSON reply.
pub type AgentBody = UnsyncBoxBody<Bytes, BodyError>;

/// Why a response body ended before its end. The agent's stream is cut too.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the upstream's response stream was cut")]
    Upstream(#[source] hyper::Error),
    #[error(
        "the upstream sent nothing for {}; the response stream was cut",
        humantime::format_duration(*.0)
    )]
    Idle(Duration),
    #[error("the upstream's compressed response does not decode; the response stream was cut")]
    Decode(#[source] std::io::Error),
    #[error("the upstream's response decodes to more than {0} bytes; the response stream was cut")]
    TooLarge(u64),
    #[error(
        "the upstream's response expands more than {0} times when decoded (a compression bomb); \
         the response stream was cut"
    )]
    Bomb(u64),
}

/// An upstream's response body, watched: each frame must come within `idle` of the previous
/// one (a stream has no total deadline), and a stream that is cut or stalls is logged with the
/// upstream's name and ends with an error.
pub(super) struct Watched {
    inner: PooledBody,
    idle: Duration,
    /// Armed for `idle` after the last frame at most; when it fires early (frames came since),
    /// it is re-armed then, so a frame costs a clock read, not a timer update.
    timer: Pin<Box<tokio::time::Sleep>>,
    last_frame: tokio::time::Instant,
    host: String,
    ended: bool,
}

impl Watched {
    pub(super) fn new(inner: PooledBody, idle: Duration, host: String) -> Self {
        Self {
            inner,
            idle,
            timer: Box::pin(tokio::time::sleep(idle)),
            last_frame: tokio::time::Instant::now(),
            host,
            ended: false,
        }
    }
}

impl hyper::body::Body for Watched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = tokio::time::Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended = true;
                tracing::warn!(host = %this.host, error = %e, "the upstream cut its response stream; the agent's stream is cut too");
                Poll::Ready(Some(Err(BodyError::Upstream(e))))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => loop {
                match this.timer.as_mut().poll(cx) {
                    Poll::Ready(()) if this.last_frame + this.idle > this.timer.deadline() => {
                        // Frames came since it was armed: the stream is not idle yet.
                        let next = this.last_frame + this.idle;
                        this.timer.as_mut().reset(next);
                    }
                    Poll::Ready(()) => {
                        this.ended = true;
                        tracing::warn!(host = %this.host, idle_secs = this.idle.as_secs(), "the upstream's response stream stalled; the agent's stream is cut");
                        return Poll::Ready(Some(Err(BodyError::Idle(this.idle))));
                    }
                    Poll::Pending => return Poll::Pending,
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why an agent's request body ended before its end on its way upstream. The upstream
/// request is cut, and the failure is the agent's ([`AgentFault`]).
#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error(
        "the agent's request body failed (it reset its stream, or its connection closed \
         before the body ended)"
    )]
    Agent(#[source] hyper::Error),
    #[error(
        "the agent sent nothing of its request body for {}",
        humantime::format_duration(*.0)
    )]
    Idle(Duration),
}

/// Set when the agent's request body fails on its way upstream: what then fails (the
/// upstream request, the response stream) is recorded as the agent's doing, not the
/// upstream's.
#[derive(Debug, Default)]
pub(super) struct AgentFault(std::sync::OnceLock<String>);

impl AgentFault {
    fn set(&self, why: &RequestBodyError) {
        let _ = self.0.set(agent_broker_core::fmt::error_chain(why));
    }

    /// Why the agent's body failed, if it did.
    pub(super) fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// A request body on its way upstream, counted. Each piece must come within `idle` of the
/// previous one (as an upstream's response body must), so an agent that stops sending its
/// body holds no upstream request open past it; a body that fails or stalls sets `fault`.
pub(super) struct Counted {
    inner: Incoming,
    bytes: Arc<AtomicU64>,
    idle: Duration,
    /// Made when a poll first finds nothing ready, for `idle` after the last frame at most;
    /// when it fires early (frames came since), it is re-armed then, so a frame costs a clock
    /// read, not a timer update.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    last_frame: tokio::time::Instant,
    fault: Arc<AgentFault>,
}

impl Counted {
    pub(super) fn new(
        inner: Incoming,
        bytes: Arc<AtomicU64>,
        idle: Duration,
        fault: Arc<AgentFault>,
    ) -> Self {
        Self {
            inner,
            bytes,
            idle,
            timer: None,
            last_frame: tokio::time::Instant::now(),
            fault,
        }
    }

    fn failed(
        &mut self,
        why: RequestBodyError,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        tracing::info!(error = %why, "the agent's request body failed; the upstream request is cut");
        self.fault.set(&why);
        Poll::Ready(Some(Err(why)))
    }
}

impl hyper::body::Body for Counted {
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_frame = tokio::time::Instant::now();
                if let Some(data) = frame.data_ref() {
                    this.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => this.failed(RequestBodyError::Agent(e)),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                let due = this.last_frame + this.idle;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
                let stalled = loop {
                    match timer.as_mut().poll(cx) {
                        Poll::Ready(()) if due > timer.deadline() => timer.as_mut().reset(due),
                        Poll::Ready(()) => break true,
                        Poll::Pending => break false,
                    }
                };
                if stalled {
                    let idle = this.idle;
                    return this.failed(RequestBodyError::Idle(idle));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A request body on its way upstream, rewritten by a [`BodyTransform`] as it streams. When
/// the transform refuses the body (a chunk signature that does not verify), the body ends
/// there: shorter than its length, the upstream request fails, and nothing after the refused
/// part is sent.
pub(super) struct Transformed<B> {
    inner: B,
    transform: Box<dyn BodyTransform>,
    done: bool,
}

impl<B> Transformed<B> {
    pub(super) fn new(inner: B, transform: Box<dyn BodyTransform>) -> Self {
        Self {
            inner,
            transform,
            done: false,
        }
    }
}

impl<B> hyper::body::Body for Transformed<B>
where
    B: hyper::body::Body<Data = Bytes, Error = RequestBodyError> + Unpin,
{
    type Data = Bytes;
    type Error = RequestBodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, RequestBodyError>>> {
        use std::task::Poll;
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(data) => {
                            let mut out = Vec::new();
                            if let Err(why) = self.transform.feed(&data, &mut out) {
                                tracing::warn!(reason = %why, "request body refused while streaming upstream; the upstream request is cut");
                                self.done = true;
                                return Poll::Ready(None);
                            }
                            if out.is_empty() {
                                continue;
                            }
                            Frame::data(Bytes::from(out))
                        }
                        Err(other) => other,
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    self.done = true;
                    if let Err(why) = self.transform.finish() {
                        tracing::warn!(reason = %why, "request body ended badly; the upstream request is cut");
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        // Same length out as in (chunk signatures have a fixed size).
        self.inner.size_hint()
    }
}

/// How a response body on its way to the agent ended.
#[derive(Debug)]
pub(super) enum End {
    /// Passed on to its end.
    Completed,
    /// The upstream cut or stalled it: why. The agent got what came before, and a stream it
    /// can tell was cut.
    Cut(String),
    /// Dropped before its end: the agent went away (closed its connection, reset its stream).
    Dropped,
}

/// What is known when a response body is over.
#[derive(Debug)]
pub(super) struct Ended {
    pub(super) end: End,
    /// Body bytes sent to the agent.
    pub(super) bytes_out: u64,
    /// What the body reported of its LLM usage, when it was metered.
    pub(super) usage: Option<UsageReading>,
}

/// Called once when a response body is over.
pub(super) type Done = Box<dyn FnOnce(Ended) + Send>;

/// A response body on its way to the agent: counted, optionally metered for the LLM usage it
/// reports, and reported once when it ends, is cut, or is dropped (the agent went away).
pub(super) struct Observed {
    inner: AgentBody,
    bytes_out: u64,
    meter: Option<UsageMeter>,
    /// A response that has no body (to HEAD, or 1xx, 204, 304): complete whenever it is
    /// dropped.
    bodyless: bool,
    done: Option<Done>,
}

impl Observed {
    /// Observes `inner`, reading the LLM usage it reports when `meter` is set.
    pub(super) fn new(inner: AgentBody, meter: bool, bodyless: bool, done: Done) -> Self {
        Self {
            inner,
            bytes_out: 0,
            meter: meter.then(UsageMeter::new),
            bodyless,
            done: Some(done),
        }
    }

    fn finish(&mut self, end: End) {
        if let Some(done) = self.done.take() {
            let whole = matches!(end, End::Completed);
            done(Ended {
                end,
                bytes_out: self.bytes_out,
                usage: self.meter.take().map(|m| m.finish(whole)),
            });
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // hyper stops polling a body that says it is at its end; only a body dropped before
        // then was cut short by the agent.
        let end = if self.bodyless || hyper::body::Body::is_end_stream(&self.inner) {
            End::Completed
        } else {
            End::Dropped
        };
        self.finish(end);
    }
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let this = &mut *self;
                    this.bytes_out += data.len() as u64;
                    if let Some(meter) = &mut this.meter {
                        meter.feed(data);
                    }
                }
            }
            std::task::Poll::Ready(None) => self.finish(End::Completed),
            std::task::Poll::Ready(Some(Err(e))) => {
                let cut = agent_broker_core::fmt::error_chain(e);
                self.finish(End::Cut(cut));
            }
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Scrubs a response head's or trailers' headers: every needle in a value is replaced, and a
/// header whose name holds a needle (in any case: names arrive lowercased) is dropped with its
/// value. Returns how many needles it replaced or dropped.
pub(super) fn scrub_headers(headers: &mut HeaderMap, needles: &Needles) -> u64 {
    if needles.is_empty() {
        return 0;
    }
    let mut redactions = 0;
    let named: Vec<HeaderName> = headers
        .keys()
        .filter(|name| needles.in_header_name(name.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in named {
        headers.remove(&name);
        redactions += 1;
    }
    for value in headers.values_mut() {
        if let Some(clean) = needles.scrub_header_value(value.as_bytes()) {
            redactions += 1;
            match HeaderValue::from_bytes(&clean) {
                Ok(v) => *value = v,
                // Never let a header that held a secret through unscrubbed.
                Err(_) => *value = HeaderValue::from_static("[redacted by agent-broker]"),
            }
        }
    }
    redactions
}

/// `body`, scrubbed by `scrubber` (trailers too), each replacement counted into `redactions`.
pub(super) fn scrubbed_body<B>(body: B, scrubber: Scrubber, redactions: Arc<AtomicU64>) -> AgentBody
where
    B: hyper::body::Body<Data = Bytes, Error = BodyError> + Unpin + Send + 'static,
{
    UnsyncBoxBody::new(Scrubbed {
        inner: body,
        scrubber: Some(scrubber.counting(redactions.clone())),
        pending: VecDeque::new(),
        redactions,
    })
}

/// A response body with every secret value replaced as it streams (see [`super::scrub`]).
pub(super) struct Scrubbed<B> {
    inner: B,
    /// While data may still come; taken when the data ends (trailers, end or error), after
    /// which anything left passes through.
    scrubber: Option<Scrubber>,
    /// Frames ready to go before the next is read: the second piece of a chunk the scrubber
    /// passed in two, trailers waiting for the held-back tail to go first.
    pending: VecDeque<Frame<Bytes>>,
    /// Replacements made, body and trailers.
    redactions: Arc<AtomicU64>,
}

impl<B> Scrubbed<B> {
    /// Ends scrubbing (the data is over) and returns the held-back tail, scrubbed.
    fn finish_scrubbing(&mut self) -> Vec<u8> {
        self.scrubber
            .take()
            .map(Scrubber::finish)
            .unwrap_or_default()
    }
}

impl<B> hyper::body::Body for Scrubbed<B>
where
    B: hyper::body::Body<Data = Bytes, Error = BodyError> + Unpin,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        use std::task::Poll;
        let this = &mut *self;
        if let Some(frame) = this.pending.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        loop {
            let Some(active) = this.scrubber.as_mut() else {
                return std::pin::Pin::new(&mut this.inner).poll_frame(cx);
            };
            let frame = match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(frame) => frame,
            };
            match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let [first, second] = active.push_bytes(data);
                        match (first.is_empty(), second.is_empty()) {
                            // All of it held back (it may be the start of a secret): read on.
                            (true, true) => {}
                            (false, true) => return Poll::Ready(Some(Ok(Frame::data(first)))),
                            (true, false) => return Poll::Ready(Some(Ok(Frame::data(second)))),
                            (false, false) => {
                                this.pending.push_back(Frame::data(second));
                                return Poll::Ready(Some(Ok(Frame::data(first))));
                            }
                        }
                    }
                    Err(frame) => {
                        // Trailers are headers too: an upstream may echo a secret in them.
                        let trailers = match frame.into_trailers() {
                            Ok(mut trailers) => {
                                let replaced = scrub_headers(&mut trailers, active.needles());
                                this.redactions.fetch_add(replaced, Ordering::Relaxed);
                                Frame::trailers(trailers)
                            }
                            Err(other) => other,
                        };
                        // Flush what is held back before the trailers.
                        let rest = this.finish_scrubbing();
                        if rest.is_empty() {
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                        this.pending.push_back(trailers);
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                    }
                },
                Some(Err(e)) => {
                    this.scrubber = None;
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let rest = this.finish_scrubbing();
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.scrubber.is_none() && self.inner.is_end_stream()
    }
}

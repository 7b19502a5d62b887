//! brokerd's DNS for agents (THREAT-MODEL.md 3.3).
//!
//! The eBPF programs send every UDP datagram an agent addresses to port 53 to brokerd's DNS
//! listener (and TCP connections to port 53 arrive on the proxy listener like any other). A
//! resolver that forwarded everything would be a tunnel out of the sandbox (data encoded in
//! query names), so brokerd answers only names the agent's policy allows (`[dns]`, or the names
//! of its `host` rules), forwarding those to the host's resolvers, and answers REFUSED for the
//! rest without sending anything anywhere. Each agent gets a number of queries per second (its
//! `[shares]`); more are answered REFUSED unread. Every allowed query is audited; refused ones
//! are too, but a flood of them as its first query and then one record a second with their
//! number, so it cannot grow the log by megabytes a second.
//!
//! HTTPS and SVCB queries get an empty answer: their records advertise HTTP/3 and ECH, which
//! would only make clients try QUIC (refused in the kernel) or encrypted ClientHellos (which
//! brokerd cannot read). Addresses in answers are remembered per agent cgroup
//! ([`AnsweredNames`]) so a connection without a server name can be matched by name.
//!
//! One name is answered for every tagged agent, whatever its policy, and never forwarded:
//! [`agent_api::NAME`], brokerd's own (its A record is [`agent_api::ADDRESS`]).

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use agent_broker_core::time::now_unix_ms;
use agent_broker_protocol::{AuditEvent, Decision, EventKind};
use hickory_proto::{
    op::{Message, MessageType, OpCode, ResponseCode},
    rr::{DNSClass, RData, RecordType},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

mod answered;
mod resolve;

pub use answered::AnsweredNames;
pub use resolve::Resolver;
#[cfg(test)]
pub(crate) use resolve::fake_resolver;

use crate::{agent_api, audit::EventSink, capture::ConnectionOrigin, shares::ShareBook};
use agent_broker_core::policy::Policy;

/// Why one upstream resolver gave no usable answer.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("query too long")]
    QueryTooLong,
    #[error("answer with another id")]
    OtherId,
    #[error("unreadable answer: {0}")]
    Unreadable(hickory_proto::serialize::binary::DecodeError),
    #[error("the answer is not for the question asked")]
    OtherQuestion,
}

/// Why a query could not be forwarded; the reason goes into the DNS audit record.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no upstream resolver configured")]
    NoUpstream,
    #[error("more than {MAX_IN_FLIGHT} queries in flight")]
    Busy,
    #[error("{}", .0.iter().map(|(upstream, e)| format!("{upstream}: {e}")).collect::<Vec<_>>().join("; "))]
    Failed(Vec<(SocketAddr, ExchangeError)>),
}

/// How long one upstream resolver gets to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on queries being forwarded at once; more get SERVFAIL.
const MAX_IN_FLIGHT: usize = 256;
/// Largest DNS message brokerd reads (UDP with EDNS, or TCP).
const MAX_MESSAGE: usize = 4096;
/// The receive buffer asked for on each UDP listener (the kernel's default is about 200 KiB,
/// a few hundred queries): room for a burst of queries while the loop catches up, so another
/// agent's query is not dropped by the kernel behind a flood before its share is looked at.
const UDP_RECEIVE_BUFFER: usize = 8 << 20;
/// How long an idle DNS-over-TCP connection is kept.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// Errors reading the resolver configuration.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} names no nameserver; give brokerd --dns-upstream ADDR for the resolvers to \
         forward allowed names to"
    )]
    NoNameserver { path: String },
}

/// The `nameserver` addresses of a resolv.conf text, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            let ip: IpAddr = words.next()?.split('%').next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The nameservers of `path` (normally /etc/resolv.conf).
pub fn upstreams_from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let found = nameservers(&text);
    if found.is_empty() {
        return Err(DnsError::NoNameserver {
            path: path.display().to_string(),
        });
    }
    Ok(found)
}

/// How a query arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Answers agents' DNS queries; shared by the UDP listeners and the TCP path.
pub struct DnsServer {
    upstreams: Vec<SocketAddr>,
    policy: watch::Receiver<Arc<Policy>>,
    events: Arc<dyn EventSink>,
    answered: Arc<AnsweredNames>,
    /// Each agent's DNS queries per second, and the aggregated audit of refusals.
    shares: Arc<ShareBook>,
    in_flight: AtomicUsize,
}

/// A checked query: what the answer needs and the audit record shows.
struct Question {
    id: u16,
    name: String,
    qtype: RecordType,
}

impl DnsServer {
    pub fn new(
        upstreams: Vec<SocketAddr>,
        policy: watch::Receiver<Arc<Policy>>,
        events: Arc<dyn EventSink>,
        answered: Arc<AnsweredNames>,
        shares: Arc<ShareBook>,
    ) -> Self {
        Self {
            upstreams,
            policy,
            events,
            answered,
            shares,
            in_flight: AtomicUsize::new(0),
        }
    }

    /// One DNS message in (wire format), the answer out; `None` when the input is not worth an
    /// answer (not even a readable header). Never panics on malformed input.
    pub async fn answer(
        &self,
        origin: &ConnectionOrigin,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        if !self.within_share(origin) {
            return refused_unread(query);
        }
        self.answer_admitted(origin, query, transport).await
    }

    /// Takes one of the agent's DNS queries this second. Over its share: audited in aggregate
    /// (the record names no query: none was read) and false, and the caller answers with
    /// [`refused_unread`].
    fn within_share(&self, origin: &ConnectionOrigin) -> bool {
        let Err(refused) = self.shares.dns_query(origin) else {
            return true;
        };
        let event = AuditEvent {
            status: Some(u16::from(ResponseCode::Refused)),
            ..origin_event(origin)
        };
        self.shares
            .refusals()
            .refused_dns_rate(origin, &refused, event);
        false
    }

    /// [`Self::answer`] for a query within the agent's share.
    async fn answer_admitted(
        &self,
        origin: &ConnectionOrigin,
        query: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let question = match check_query(query) {
            Ok(q) => q,
            Err(Some(reply)) => return Some(reply),
            Err(None) => return None,
        };
        if question.name == agent_api::NAME {
            return Some(self.answer_reserved(origin, &question, started));
        }
        let policy = self.policy.borrow().clone();
        let mut event = dns_event(origin, &question);
        if let Err(reason) = policy.dns_allowed(&origin.cgroup, &question.name) {
            event.decision = Some(Decision::Deny);
            event.reason = Some(reason.to_string());
            event.status = Some(u16::from(ResponseCode::Refused));
            event.latency_us = Some(started.elapsed().as_micros() as u64);
            // A flood of refused names is recorded (and logged) as its first query and a count
            // a second.
            if self.shares.refusals().refused_dns_name(origin, event) {
                info!(
                    cgroup = %origin.cgroup,
                    pid = origin.pid,
                    comm = %origin.comm,
                    name = %question.name,
                    qtype = %question.qtype,
                    %reason,
                    "DNS query refused (more within a second are audited as a count)"
                );
            }
            return Some(reply_with(&question, ResponseCode::Refused));
        }
        event.decision = Some(Decision::Allow);
        let reply = if matches!(question.qtype, RecordType::HTTPS | RecordType::SVCB) {
            // Allowed name, but no HTTP/3 or ECH hints: see the module documentation.
            event.reason = Some("HTTPS/SVCB records are not passed on (no HTTP/3, no ECH)".into());
            reply_with(&question, ResponseCode::NoError)
        } else {
            match self.forward(query, &question, transport).await {
                Ok(reply) => {
                    self.remember(origin, &question, &reply);
                    reply
                }
                Err(e) => {
                    let reason = e.to_string();
                    warn!(name = %question.name, %reason, "DNS query failed upstream");
                    event.reason = Some(reason);
                    reply_with(&question, ResponseCode::ServFail)
                }
            }
        };
        event.status = reply
            .get(3)
            .map(|b| u16::from(b & 0x0f))
            .or(Some(u16::from(ResponseCode::ServFail)));
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        debug!(cgroup = %origin.cgroup, name = %question.name, qtype = %question.qtype, "DNS query answered");
        self.events.record(event);
        Some(reply)
    }

    /// The answer for [`agent_api::NAME`], brokerd's own name: its address for an A query, no
    /// record for any other type. Every tagged agent gets it, whatever its policy; nothing is
    /// sent anywhere.
    fn answer_reserved(
        &self,
        origin: &ConnectionOrigin,
        question: &Question,
        started: Instant,
    ) -> Vec<u8> {
        let mut reply = reply_with(question, ResponseCode::NoError);
        if question.qtype == RecordType::A
            && let Ok(mut message) = Message::from_vec(&reply)
            && let Ok(name) = hickory_proto::rr::Name::from_ascii(&question.name)
        {
            message.metadata.authoritative = true;
            message.answers.push(hickory_proto::rr::Record::from_rdata(
                name,
                agent_api::TTL_SECS,
                RData::A(hickory_proto::rr::rdata::A(agent_api::ADDRESS)),
            ));
            if let Ok(bytes) = message.to_vec() {
                reply = bytes;
            }
        }
        let mut event = dns_event(origin, question);
        event.decision = Some(Decision::Allow);
        event.rule = Some(agent_api::NAME.to_string());
        event.reason = Some(format!("{} is served by brokerd itself", agent_api::NAME));
        event.status = Some(u16::from(ResponseCode::NoError));
        event.latency_us = Some(started.elapsed().as_micros() as u64);
        self.events.record(event);
        reply
    }

    /// Sends the agent's query (with a fresh id) to the upstream resolvers in turn, over UDP
    /// (TCP when the agent used TCP or the UDP answer was truncated). The answer goes back with
    /// the agent's id.
    async fn forward(
        &self,
        query: &[u8],
        question: &Question,
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        if self.upstreams.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        if self.in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            return Err(ForwardError::Busy);
        }
        let result = self.forward_inner(query, question, transport).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn forward_inner(
        &self,
        query: &[u8],
        question: &Question,
        transport: Transport,
    ) -> Result<Vec<u8>, ForwardError> {
        let mut errors = Vec::new();
        for upstream in &self.upstreams {
            let id: u16 = rand_id();
            let mut outgoing = query.to_vec();
            outgoing[..2].copy_from_slice(&id.to_be_bytes());
            let attempt = match transport {
                Transport::Udp => match udp_exchange(*upstream, &outgoing, id).await {
                    Ok(reply) if is_truncated(&reply) => {
                        tcp_exchange(*upstream, &outgoing, id).await
                    }
                    other => other,
                },
                Transport::Tcp => tcp_exchange(*upstream, &outgoing, id).await,
            };
            match attempt.and_then(|reply| same_question(reply, question)) {
                Ok(mut reply) => {
                    reply[..2].copy_from_slice(&question.id.to_be_bytes());
                    return Ok(reply);
                }
                Err(e) => errors.push((*upstream, e)),
            }
        }
        Err(ForwardError::Failed(errors))
    }

    fn remember(&self, origin: &ConnectionOrigin, question: &Question, reply: &[u8]) {
        let Ok(message) = Message::from_vec(reply) else {
            return;
        };
        let mut ttl = u32::MAX;
        let addrs: Vec<IpAddr> = message
            .answers
            .iter()
            .filter_map(|r| {
                let ip = match &r.data {
                    RData::A(a) => IpAddr::V4(a.0),
                    RData::AAAA(a) => IpAddr::V6(a.0),
                    _ => return None,
                };
                ttl = ttl.min(r.ttl);
                Some(ip)
            })
            .collect();
        if !addrs.is_empty() {
            self.answered.record(
                &origin.cgroup,
                &question.name,
                addrs,
                Duration::from_secs(u64::from(ttl)),
            );
        }
    }

    /// Serves one UDP listener until `cancel` fires. `origin_of` maps a datagram's source to
    /// the agent that sent it; a datagram without one (a process that is not a redirected
    /// agent) gets no answer, so brokerd is no open resolver for the host.
    pub async fn serve_udp(
        self: Arc<Self>,
        socket: UdpSocket,
        origin_of: Arc<dyn Fn(SocketAddr) -> Option<ConnectionOrigin> + Send + Sync>,
        cancel: CancellationToken,
    ) {
        set_receive_buffer(&socket, UDP_RECEIVE_BUFFER);
        let socket = Arc::new(socket);
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (len, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = socket.recv_from(&mut buf) => match r {
                    Ok(r) => r,
                    Err(e) => {
                        warn!(error = %e, "DNS listener receive failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let Some(origin) = origin_of(peer) else {
                debug!(%peer, "DNS datagram without a redirect record dropped");
                continue;
            };
            // The agent's share first, in this loop: a query past it costs one receive, one
            // map lookup and one send, nothing is parsed or spawned, and the loop gets back to
            // the socket at once, so a flood does not fill the socket's buffer with queries
            // waiting behind a slow loop and push the other agents' out.
            if !self.within_share(&origin) {
                if let Some(reply) = refused_unread(&buf[..len]) {
                    // Never waits: a full send buffer drops the answer, not the loop's turn.
                    let _ = socket.try_send_to(&reply, peer);
                }
                continue;
            }
            let query = buf[..len].to_vec();
            let server = self.clone();
            let socket = socket.clone();
            tokio::spawn(async move {
                let origin = origin.with_exe();
                if let Some(reply) = server
                    .answer_admitted(&origin, &query, Transport::Udp)
                    .await
                {
                    let reply = truncate_for_udp(reply, &query);
                    if let Err(e) = socket.send_to(&reply, peer).await {
                        debug!(%peer, error = %e, "DNS reply not sent");
                    }
                }
            });
        }
    }

    /// Serves DNS over TCP (2-byte length prefix; several queries per connection) for one
    /// redirected connection to port 53.
    pub async fn serve_tcp<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
        origin: ConnectionOrigin,
    ) {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let len = usize::from(u16::from_be_bytes(len));
            if len == 0 || len > MAX_MESSAGE {
                return;
            }
            let mut query = vec![0u8; len];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query)).await {
                Ok(Ok(_)) => {}
                _ => return,
            }
            let Some(reply) = self.answer(&origin, &query, Transport::Tcp).await else {
                return;
            };
            let Ok(reply_len) = u16::try_from(reply.len()) else {
                return;
            };
            let mut framed = Vec::with_capacity(reply.len() + 2);
            framed.extend_from_slice(&reply_len.to_be_bytes());
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }
}

/// Sets the receive buffer of `socket` to `bytes`, past `net.core.rmem_max` where brokerd may
/// (`SO_RCVBUFFORCE`, CAP_NET_ADMIN), else as far as that limit allows. A failure is logged:
/// the listener works with a smaller buffer.
fn set_receive_buffer(socket: &UdpSocket, bytes: usize) {
    use std::os::fd::AsRawFd as _;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |option| {
        // SAFETY: a valid socket descriptor, and a c_int option value of the size given.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                std::ptr::from_ref(&value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) != 0 && set(libc::SO_RCVBUF) != 0 {
        warn!(error = %std::io::Error::last_os_error(), "cannot enlarge the DNS listener's receive buffer");
    }
}

/// REFUSED for `query` without decoding it: its header with QR, RA and RCODE 5 set, and its
/// question copied as it came (its end found by walking the labels), or no question when that
/// walk fails. `None` for what gets no answer at all: less than a header, or a response (no
/// reflection loops). Costs a copy of a few dozen bytes, so a flood past the agent's share is
/// answered at the rate it arrives.
fn refused_unread(query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let one_question = u16::from_be_bytes([query[4], query[5]]) == 1;
    let question_end = one_question.then(|| question_end(query)).flatten();
    let mut reply = query[..question_end.unwrap_or(12)].to_vec();
    // QR set; opcode and RD kept; AA and TC clear.
    reply[2] = 0x80 | (query[2] & 0x79);
    // RA set; RCODE REFUSED.
    reply[3] = 0x80 | ResponseCode::Refused.low();
    reply[4..6].copy_from_slice(&u16::from(question_end.is_some()).to_be_bytes());
    reply[6..12].fill(0);
    Some(reply)
}

/// Where the first question of `query` ends (after its type and class), if its name is a plain
/// sequence of labels within 255 bytes.
fn question_end(query: &[u8]) -> Option<usize> {
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        match len {
            0 => break,
            // A compression pointer (or a reserved label type) has no place in a query's
            // first name.
            l if l & 0xc0 != 0 => return None,
            l => at += l,
        }
        if at - 12 > 255 {
            return None;
        }
    }
    let end = at + 4;
    (end <= query.len()).then_some(end)
}

/// Checks that `query` is one standard query for one IN name. `Err(Some(reply))`: answer with
/// this error; `Err(None)`: not even a header, drop it.
fn check_query(query: &[u8]) -> Result<Question, Option<Vec<u8>>> {
    if query.len() < 12 {
        return Err(None);
    }
    let id = u16::from_be_bytes([query[0], query[1]]);
    if query[2] & 0x80 != 0 {
        // A response sent to us: never answer it (no reflection loops).
        return Err(None);
    }
    let error = |code| Err(Some(error_reply(id, code)));
    if (query[2] >> 3) & 0x0f != 0 {
        return error(ResponseCode::NotImp);
    }
    let Ok(message) = Message::from_vec(query) else {
        return error(ResponseCode::FormErr);
    };
    if message.metadata.message_type != MessageType::Query
        || message.queries.len() != 1
        || !message.answers.is_empty()
        || !message.authorities.is_empty()
    {
        return error(ResponseCode::FormErr);
    }
    let q = &message.queries[0];
    if q.query_class() != DNSClass::IN {
        return error(ResponseCode::Refused);
    }
    let name = q.name().to_ascii();
    let name = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return error(ResponseCode::FormErr);
    }
    Ok(Question {
        id,
        name,
        qtype: q.query_type(),
    })
}

fn error_reply(id: u16, code: ResponseCode) -> Vec<u8> {
    Message::error_msg(id, OpCode::Query, code)
        .to_vec()
        .unwrap_or_default()
}

/// A reply to `question` with `code` and no records (the question echoed).
fn reply_with(question: &Question, code: ResponseCode) -> Vec<u8> {
    let mut message = Message::error_msg(question.id, OpCode::Query, code);
    message.metadata.recursion_desired = true;
    message.metadata.recursion_available = true;
    if let Ok(name) = hickory_proto::rr::Name::from_ascii(&question.name) {
        let mut query = hickory_proto::op::Query::query(name, question.qtype);
        query.set_query_class(DNSClass::IN);
        message.add_query(query);
    }
    message
        .to_vec()
        .unwrap_or_else(|_| error_reply(question.id, code))
}

fn is_truncated(reply: &[u8]) -> bool {
    reply.len() > 2 && reply[2] & 0x02 != 0
}

/// The upstream's reply if it answers `question` (same name and type); otherwise an error.
fn same_question(reply: Vec<u8>, question: &Question) -> Result<Vec<u8>, ExchangeError> {
    let message = Message::from_vec(&reply).map_err(ExchangeError::Unreadable)?;
    let matches = message.queries.len() == 1 && {
        let q = &message.queries[0];
        let name = q.name().to_ascii();
        let name = name.strip_suffix('.').unwrap_or(&name).to_ascii_lowercase();
        name == question.name && q.query_type() == question.qtype
    };
    if message.metadata.message_type != MessageType::Response || !matches {
        return Err(ExchangeError::OtherQuestion);
    }
    Ok(reply)
}

/// A UDP reply that does not fit the client's buffer (512 bytes without EDNS) is cut to its
/// header and question with TC set, so the client retries over TCP.
fn truncate_for_udp(reply: Vec<u8>, query: &[u8]) -> Vec<u8> {
    let limit = Message::from_vec(query)
        .ok()
        .and_then(|m| m.edns.map(|e| usize::from(e.max_payload())))
        .unwrap_or(512)
        .max(512);
    if reply.len() <= limit {
        return reply;
    }
    match Message::from_vec(&reply) {
        Ok(mut m) => {
            m.answers.clear();
            m.authorities.clear();
            m.additionals.clear();
            m.metadata.truncation = true;
            m.to_vec().unwrap_or_default()
        }
        Err(_) => Vec::new(),
    }
}

async fn udp_exchange(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
) -> Result<Vec<u8>, ExchangeError> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let len = tokio::time::timeout_at(deadline, socket.recv(&mut buf))
            .await
            .map_err(|_| ExchangeError::TimedOut)??;
        // Ignore anything that is not the answer to this query (spoofing, stale replies).
        if len >= 12 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

async fn tcp_exchange(
    upstream: SocketAddr,
    query: &[u8],
    id: u16,
) -> Result<Vec<u8>, ExchangeError> {
    let exchange = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let len = u16::try_from(query.len()).map_err(|_| ExchangeError::QueryTooLong)?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(query);
        stream.write_all(&framed).await?;
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut reply).await?;
        if reply.len() < 12 || u16::from_be_bytes([reply[0], reply[1]]) != id {
            return Err(ExchangeError::OtherId);
        }
        Ok(reply)
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| ExchangeError::TimedOut)?
}

fn rand_id() -> u16 {
    let mut b = [0u8; 2];
    if getrandom::fill(&mut b).is_err() {
        // Fall back on the clock; the id only needs to be hard to guess for a remote spoofer.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return nanos as u16;
    }
    u16::from_ne_bytes(b)
}

fn dns_event(origin: &ConnectionOrigin, question: &Question) -> AuditEvent {
    AuditEvent {
        method: Some(question.qtype.to_string()),
        host: Some(question.name.clone()),
        ..origin_event(origin)
    }
}

/// A DNS record of `origin`'s that names no query.
fn origin_event(origin: &ConnectionOrigin) -> AuditEvent {
    AuditEvent {
        time_ms: now_unix_ms(),
        kind: Some(EventKind::Dns),
        cgroup: Some(origin.cgroup.to_string()),
        cgroup_path: origin.cgroup_path.as_ref().map(ToString::to_string),
        pod: origin.pod.clone(),
        pid: Some(origin.pid),
        comm: Some(origin.comm.clone()),
        exe: origin.exe.clone(),
        original_dst: Some(origin.original_dst),
        ..AuditEvent::default()
    }
}

#[cfg(test)]
mod tests;

/// The pure steps of [`DnsServer::answer`], for the fuzz targets (`crate::fuzzing`) only.
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    use super::*;

    /// A checked query's id, name and type.
    pub type Checked = (u16, String, RecordType);

    /// [`check_query`]: `Ok` with the question, `Err(Some(reply))` for an error answer,
    /// `Err(None)` when dropped.
    pub fn check(query: &[u8]) -> Result<Checked, Option<Vec<u8>>> {
        check_query(query).map(|q| (q.id, q.name, q.qtype))
    }

    /// [`reply_with`] for a checked question.
    pub fn reply(checked: &Checked, code: ResponseCode) -> Vec<u8> {
        reply_with(&question(checked), code)
    }

    /// [`same_question`]: the upstream's reply if it answers the question.
    pub fn upstream_reply(reply: Vec<u8>, checked: &Checked) -> Option<Vec<u8>> {
        same_question(reply, &question(checked)).ok()
    }

    /// [`truncate_for_udp`] and [`is_truncated`].
    pub fn for_udp(reply: Vec<u8>, query: &[u8]) -> (Vec<u8>, bool) {
        let cut = truncate_for_udp(reply, query);
        let truncated = is_truncated(&cut);
        (cut, truncated)
    }

    fn question(checked: &Checked) -> Question {
        Question {
            id: checked.0,
            name: checked.1.clone(),
            qtype: checked.2,
        }
    }
}

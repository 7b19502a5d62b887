//! brokerd's own name lookups: the addresses a name resolves to, from the hosts file and then
//! the same resolvers brokerd forwards agents' queries to (`--dns-upstream`). Used to prove that
//! an address an agent dialed belongs to the name a rule matched it by, where no certificate
//! proves it (tcp passthrough by SNI, plain HTTP by `Host`).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Mutex,
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Message, MessageType, OpCode, Query},
    rr::{Name, RData, RecordType},
};

use super::{ExchangeError, is_truncated, rand_id, tcp_exchange, udp_exchange};

/// How long a lookup is kept at least and at most (whatever the records' TTL says).
const MIN_KEEP: Duration = Duration::from_secs(5);
const MAX_KEEP: Duration = Duration::from_secs(300);
/// Bound on cached names.
const CAPACITY: usize = 4096;

/// Why a name could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0:?} is not a valid DNS name")]
    BadName(String),
    #[error("no resolver configured")]
    NoUpstream,
    #[error("{}", .0.iter().map(|(upstream, e)| format!("{upstream}: {e}")).collect::<Vec<_>>().join("; "))]
    Failed(Vec<(SocketAddr, ExchangeError)>),
}

/// See the module documentation.
pub struct Resolver {
    upstreams: Vec<SocketAddr>,
    hosts_file: PathBuf,
    cache: Mutex<HashMap<String, (Vec<IpAddr>, Instant)>>,
}

impl Resolver {
    pub fn new(upstreams: Vec<SocketAddr>, hosts_file: PathBuf) -> Self {
        Self {
            upstreams,
            hosts_file,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses `name` resolves to (A and AAAA); the hosts file first, as the host's own
    /// lookups would.
    pub async fn resolve(&self, name: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(addrs) = self.cached(&name) {
            return Ok(addrs);
        }
        let hosts = std::fs::read_to_string(&self.hosts_file).unwrap_or_default();
        let from_hosts = hosts_lookup(&hosts, &name);
        if !from_hosts.is_empty() {
            return Ok(from_hosts);
        }
        let (addrs, ttl) = self.query(&name).await?;
        self.remember(&name, &addrs, ttl);
        Ok(addrs)
    }

    fn cached(&self, name: &str) -> Option<Vec<IpAddr>> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(name)
            .filter(|(_, until)| *until > Instant::now())
            .map(|(addrs, _)| addrs.clone())
    }

    fn remember(&self, name: &str, addrs: &[IpAddr], ttl: Duration) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        let now = Instant::now();
        if cache.len() >= CAPACITY {
            cache.retain(|_, (_, until)| *until > now);
            if cache.len() >= CAPACITY {
                cache.clear();
            }
        }
        let until = now + ttl.clamp(MIN_KEEP, MAX_KEEP);
        cache.insert(name.to_string(), (addrs.to_vec(), until));
    }

    /// A and AAAA from the first resolver that answers both.
    async fn query(&self, name: &str) -> Result<(Vec<IpAddr>, Duration), ResolveError> {
        if self.upstreams.is_empty() {
            return Err(ResolveError::NoUpstream);
        }
        let parsed = Name::from_ascii(name).map_err(|_| ResolveError::BadName(name.into()))?;
        let mut errors = Vec::new();
        'upstreams: for upstream in &self.upstreams {
            let mut addrs = Vec::new();
            let mut ttl = u32::MAX;
            for qtype in [RecordType::A, RecordType::AAAA] {
                match ask(*upstream, &parsed, qtype).await {
                    Ok(message) => {
                        for record in &message.answers {
                            let addr = match &record.data {
                                RData::A(a) => IpAddr::V4(a.0),
                                RData::AAAA(a) => IpAddr::V6(a.0),
                                _ => continue,
                            };
                            ttl = ttl.min(record.ttl);
                            addrs.push(addr);
                        }
                    }
                    Err(e) => {
                        errors.push((*upstream, e));
                        continue 'upstreams;
                    }
                }
            }
            return Ok((addrs, Duration::from_secs(u64::from(ttl))));
        }
        Err(ResolveError::Failed(errors))
    }
}

/// One question to one resolver (over TCP when the UDP answer was truncated).
async fn ask(
    upstream: SocketAddr,
    name: &Name,
    qtype: RecordType,
) -> Result<Message, ExchangeError> {
    let id = rand_id();
    let mut message = Message::query();
    message.metadata.id = id;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(name.clone(), qtype));
    let query = message.to_vec().map_err(|_| ExchangeError::QueryTooLong)?;
    let reply = match udp_exchange(upstream, &query, id).await? {
        reply if is_truncated(&reply) => tcp_exchange(upstream, &query, id).await?,
        reply => reply,
    };
    let answer = Message::from_vec(&reply).map_err(ExchangeError::Unreadable)?;
    if answer.metadata.message_type != MessageType::Response
        || answer.metadata.op_code != OpCode::Query
    {
        return Err(ExchangeError::OtherQuestion);
    }
    Ok(answer)
}

/// The addresses the hosts file (`/etc/hosts` format) gives `name`.
fn hosts_lookup(text: &str, name: &str) -> Vec<IpAddr> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or(""))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let addr: IpAddr = words.next()?.parse().ok()?;
            words
                .any(|w| w.trim_end_matches('.').eq_ignore_ascii_case(name))
                .then_some(addr)
        })
        .collect()
}

/// A resolver on loopback that answers every A question with `addr` (and AAAA with nothing),
/// for tests; never the host's resolver.
#[cfg(test)]
pub(crate) async fn fake_resolver(addr: std::net::Ipv4Addr) -> SocketAddr {
    use hickory_proto::rr::{Record, rdata::A};
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind the fake resolver");
    let local = socket.local_addr().expect("its address");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            let mut reply = Message::response(query.metadata.id, OpCode::Query);
            let question = query.queries[0].clone();
            if question.query_type() == RecordType::A {
                reply.answers.push(Record::from_rdata(
                    question.name().clone(),
                    60,
                    RData::A(A(addr)),
                ));
            }
            reply.add_query(question);
            if let Ok(bytes) = reply.to_vec() {
                let _ = socket.send_to(&bytes, peer).await;
            }
        }
    });
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names_resolve_through_the_configured_resolver_after_the_hosts_file() {
        let upstream = fake_resolver("192.0.2.7".parse().expect("ip")).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "10.1.2.3 pinned.example\n").expect("hosts");
        let resolver = Resolver::new(vec![upstream], hosts);
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(
            resolver.resolve("pinned.example").await.expect("hosts"),
            [ip("10.1.2.3")]
        );
        assert_eq!(
            resolver.resolve("API.Example.test.").await.expect("dns"),
            [ip("192.0.2.7")]
        );
        let none = Resolver::new(Vec::new(), dir.path().join("absent"));
        assert!(matches!(
            none.resolve("api.example.test").await,
            Err(ResolveError::NoUpstream)
        ));
    }

    #[test]
    fn the_hosts_file_is_read_like_the_host_reads_it() {
        let text = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n\
                    10.1.2.3 pinned.example other # a comment\n# 10.9.9.9 pinned.example\n";
        let got = hosts_lookup(text, "pinned.example");
        assert_eq!(got, ["10.1.2.3".parse::<IpAddr>().expect("ip")]);
        assert_eq!(hosts_lookup(text, "localhost").len(), 2);
        assert!(hosts_lookup(text, "absent.example").is_empty());
    }
}

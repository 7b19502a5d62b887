//! A name reaches only its own addresses: where a rule matched a connection or request by a
//! name that no certificate proves (tcp passthrough by SNI, plain HTTP by `Host`), the address
//! the agent dialed must be one the name resolves to. Two sources count: the answer brokerd's
//! DNS gave this agent for that name (while it is remembered), or brokerd's own lookup of the
//! name (the hosts file, then the resolvers brokerd forwards to).

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc};

use agent_broker_core::fmt::error_chain;

use crate::{
    capture::ConnectionOrigin,
    dns::{AnsweredNames, Resolver},
    proxy::NameCheck,
};

/// See the module documentation.
pub struct NameProof {
    answered: Arc<AnsweredNames>,
    resolver: Arc<Resolver>,
}

impl NameProof {
    pub fn new(answered: Arc<AnsweredNames>, resolver: Arc<Resolver>) -> Self {
        Self { answered, resolver }
    }

    async fn prove(&self, origin: &ConnectionOrigin, name: &str) -> Result<(), String> {
        let addr = origin.original_dst.ip().to_canonical();
        let name = name.trim_end_matches('.');
        if self
            .answered
            .lookup(&origin.cgroup, addr)
            .is_some_and(|answered| answered.eq_ignore_ascii_case(name))
        {
            return Ok(());
        }
        let refused = |what: String| {
            format!(
                "{name} is matched by name, and nothing proves that {addr} is {name}: {what}; a \
                 name-matched rule reaches only the name's own addresses (resolve it through \
                 brokerd's DNS, or allow the address itself)"
            )
        };
        match self.resolver.resolve(name).await {
            Ok(addrs) if addrs.iter().any(|a| a.to_canonical() == addr) => Ok(()),
            Ok(addrs) if addrs.is_empty() => Err(refused(format!("{name} resolves to nothing"))),
            Ok(addrs) => Err(refused(format!(
                "{name} resolves to {}",
                addrs
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
            Err(e) => Err(refused(format!(
                "looking it up failed: {}",
                error_chain(&e)
            ))),
        }
    }
}

impl NameCheck for NameProof {
    fn check<'a>(
        &'a self,
        origin: &'a ConnectionOrigin,
        name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.prove(origin, name))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use agent_broker_core::cgroup::{CgroupId, CgroupPath};

    use super::*;
    use crate::dns::fake_resolver;

    fn origin(dst: &str) -> ConnectionOrigin {
        ConnectionOrigin {
            cgroup: CgroupPath::parse("agents/a").expect("cgroup"),
            cgroup_id: CgroupId(1),
            pid: 1,
            tid: 1,
            comm: "test".into(),
            exe: None,
            original_dst: dst.parse().expect("addr"),
        }
    }

    #[tokio::test]
    async fn an_address_is_proven_by_our_dns_answer_or_our_own_lookup_and_nothing_else() {
        // The resolver says pinned.example is 192.0.2.7; it never says 127.0.0.9.
        let upstream = fake_resolver("192.0.2.7".parse().expect("ip")).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = Arc::new(Resolver::new(vec![upstream], dir.path().join("hosts")));
        let answered = Arc::new(AnsweredNames::default());
        let proof = NameProof::new(answered.clone(), resolver);

        assert_eq!(
            proof
                .check(&origin("192.0.2.7:443"), "pinned.example")
                .await,
            Ok(())
        );
        let refused = proof
            .check(&origin("127.0.0.9:443"), "pinned.example")
            .await
            .expect_err("an address the name does not have");
        assert!(
            refused.contains("pinned.example") && refused.contains("127.0.0.9"),
            "{refused}"
        );
        // brokerd's DNS told this agent the name is there: that proves it too.
        let cgroup = CgroupPath::parse("agents/a").expect("cgroup");
        answered.record(
            &cgroup,
            "pinned.example",
            ["127.0.0.9".parse().expect("ip")],
            Duration::from_secs(60),
        );
        assert_eq!(
            proof
                .check(&origin("127.0.0.9:443"), "Pinned.Example")
                .await,
            Ok(())
        );
    }
}

//! A name reaches only its own addresses: where a rule matched a connection or request by a
//! name that no certificate proves (tcp passthrough by SNI, plain HTTP by `Host`), or where
//! brokerd writes a credential into an intercepted request (a certificate valid for the name, a
//! wildcard or a shared one, may be served at other addresses too), the address the agent dialed
//! must be one the name resolves to. Two sources count: the answer brokerd's DNS gave this agent
//! for that name (while it is remembered), or brokerd's own lookup of the name (the hosts file,
//! then the resolvers brokerd forwards to). An address literal is only itself.

use std::{future::Future, net::IpAddr, pin::Pin, sync::Arc};

use agent_broker_core::fmt::error_chain;

use crate::{
    capture::ConnectionOrigin,
    dns::{AnsweredNames, Resolver},
    proxy::{BindReason, NameCheck},
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

    async fn prove(
        &self,
        origin: &ConnectionOrigin,
        name: &str,
        why: BindReason,
    ) -> Result<(), String> {
        let addr = origin.original_dst.ip().to_canonical();
        let name = name.trim_end_matches('.');
        let refused = |what: String| match why {
            BindReason::MatchedByName => format!(
                "{name} is matched by name, and nothing proves that {addr} is {name}: {what}; a \
                 name-matched rule reaches only the name's own addresses (resolve it through \
                 brokerd's DNS, or allow the address itself)"
            ),
            BindReason::Credential => format!(
                "a credential for {name} goes only to {name}'s own addresses, and nothing \
                 proves that {addr} is {name}: {what}; a certificate valid for {name} (a \
                 wildcard, a shared one) may be served elsewhere too (resolve {name} through \
                 brokerd's DNS, or set any_address = true on every level's rule to let the \
                 certificate alone decide)"
            ),
        };
        if let Ok(literal) = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return if literal.to_canonical() == addr {
                Ok(())
            } else {
                Err(refused(format!("{name} is an address, and only itself")))
            };
        }
        if self
            .answered
            .lookup(&origin.cgroup, addr)
            .is_some_and(|answered| answered.eq_ignore_ascii_case(name))
        {
            return Ok(());
        }
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
        why: BindReason,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>> {
        Box::pin(self.prove(origin, name, why))
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
            cgroup_path: None,
            pod: None,
            original_dst: dst.parse().expect("addr"),
            sandboxed: false,
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
                .check(
                    &origin("192.0.2.7:443"),
                    "pinned.example",
                    BindReason::MatchedByName
                )
                .await,
            Ok(())
        );
        let refused = proof
            .check(
                &origin("127.0.0.9:443"),
                "pinned.example",
                BindReason::MatchedByName,
            )
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
                .check(
                    &origin("127.0.0.9:443"),
                    "Pinned.Example",
                    BindReason::MatchedByName
                )
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_credential_refusal_names_the_name_the_address_and_the_way_out() {
        let upstream = fake_resolver("192.0.2.7".parse().expect("ip")).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = Arc::new(Resolver::new(vec![upstream], dir.path().join("hosts")));
        let proof = NameProof::new(Arc::new(AnsweredNames::default()), resolver);
        let refused = proof
            .check(
                &origin("127.0.0.9:443"),
                "api.example.test",
                BindReason::Credential,
            )
            .await
            .expect_err("an address the name does not have");
        for part in [
            "a credential for api.example.test",
            "nothing proves that 127.0.0.9 is api.example.test",
            "api.example.test resolves to 192.0.2.7",
            "any_address = true",
        ] {
            assert!(refused.contains(part), "{part:?} missing: {refused}");
        }
        assert_eq!(
            proof
                .check(
                    &origin("192.0.2.7:443"),
                    "api.example.test",
                    BindReason::Credential
                )
                .await,
            Ok(())
        );
    }

    #[tokio::test]
    async fn an_address_literal_proves_only_itself_and_is_never_looked_up() {
        // No resolver at all: a lookup would fail with "no resolver configured".
        let dir = tempfile::tempdir().expect("tempdir");
        let resolver = Arc::new(Resolver::new(Vec::new(), dir.path().join("hosts")));
        let proof = NameProof::new(Arc::new(AnsweredNames::default()), resolver);
        let why = BindReason::Credential;
        assert_eq!(
            proof
                .check(&origin("127.0.0.9:443"), "127.0.0.9", why)
                .await,
            Ok(())
        );
        assert_eq!(
            proof.check(&origin("[::1]:443"), "[::1]", why).await,
            Ok(())
        );
        let refused = proof
            .check(&origin("127.0.0.9:443"), "127.0.0.2", why)
            .await
            .expect_err("another address");
        assert!(
            refused.contains("127.0.0.2 is an address, and only itself"),
            "{refused}"
        );
    }
}

//! `inject.aws_sigv4`: a request the agent signed with the placeholder credentials of a SigV4
//! credential is checked against that signature and signed again with the real ones
//! (`agent_broker_core::sigv4`). A request that is not signed, or whose signature does not
//! verify (tampered after signing, another key), is refused: brokerd never signs what the agent
//! did not sign. The rule's services, regions and actions are checked against the signed scope
//! and the request's `Action`. An S3 streaming upload's chunk signatures are signed again as
//! the body streams, one chunk held at a time.

use agent_broker_core::{
    credential::CredentialSpec,
    inject::AwsSigV4,
    secret::{SecretName, SecretValue},
    sigv4::{self, ChunkResigner, Credentials, PayloadHash},
    time::now_unix_secs,
};
use http::{HeaderValue, header, request::Parts};
use zeroize::Zeroizing;

use super::{PolicyAuthorizer, request::Allowed};
use crate::proxy::{BodyTransform, Denial, Grant, ReadBody, RequestFacts};

/// The real and placeholder credentials of a stored SigV4 credential.
struct Pair {
    real: Credentials,
    placeholder: Credentials,
}

fn pair(broker: &PolicyAuthorizer, name: &SecretName) -> Result<Pair, String> {
    let stored = broker
        .vault
        .get(name)
        .map_err(|e| format!("cannot read secret {}: {e}", name.as_str()))?
        .ok_or_else(|| format!("secret {} is not in the vault", name.as_str()))?;
    let spec = CredentialSpec::from_value(&stored);
    let Some(Ok(CredentialSpec::Sigv4 {
        access_key_id,
        secret_access_key,
        session_token,
        placeholder_access_key_id,
        placeholder_secret_access_key,
    })) = &spec
    else {
        return Err(format!(
            "secret {} is not a SigV4 credential (store it with `brokerctl secret set {} --kind \
             sigv4`)",
            name.as_str(),
            name.as_str()
        ));
    };
    let value = |s: &str| SecretValue::from_string(s.to_string()).map_err(|e| e.to_string());
    Ok(Pair {
        real: Credentials {
            access_key_id: access_key_id.clone(),
            secret_access_key: value(secret_access_key)?,
            session_token: session_token.as_deref().map(value).transpose()?,
        },
        placeholder: Credentials {
            access_key_id: placeholder_access_key_id.clone(),
            secret_access_key: value(placeholder_secret_access_key)?,
            session_token: None,
        },
    })
}

/// The request's `Action`: the query's, or a form body's (AWS's query APIs: STS, IAM, EC2).
fn action(parts: &Parts) -> Option<String> {
    let from = |text: &[u8]| {
        text.split(|b| *b == b'&').find_map(|pair| {
            let value = pair.strip_prefix(b"Action=")?;
            Some(
                String::from_utf8_lossy(&agent_broker_core::percent::decode(
                    value,
                    agent_broker_core::percent::Plus::Space,
                ))
                .into_owned(),
            )
        })
    };
    if let Some(query) = parts.uri.query()
        && let Some(a) = from(query.as_bytes())
    {
        return Some(a);
    }
    let body = parts.extensions.get::<ReadBody>()?;
    let form = parts.headers.get(header::CONTENT_TYPE).is_some_and(|c| {
        c.as_bytes()
            .starts_with(b"application/x-www-form-urlencoded")
    });
    if form { from(&body.0) } else { None }
}

/// Checks the agent's signature and signs the request again with the real credentials.
pub(super) fn apply(
    broker: &PolicyAuthorizer,
    facts: &RequestFacts<'_>,
    parts: &mut Parts,
    allowed: &Allowed<'_>,
    rule: &AwsSigV4,
    grant: &mut Grant,
) -> Result<(), Denial> {
    let deny = |reason: String| allowed.cannot(reason);
    let name = rule.secret();
    let pair = pair(broker, name).map_err(&deny)?;
    let signed = sigv4::parse_request(&parts.headers).map_err(|e| {
        deny(format!(
            "the rule signs with AWS SigV4 ({}), and the request is not signed with its \
             placeholder credentials: {e}",
            name.as_str()
        ))
    })?;
    // HTTP/2 carries the host in :authority; SigV4 signs it as `host`.
    let mut headers = parts.headers.clone();
    if !headers.contains_key(header::HOST) {
        let authority = parts
            .uri
            .authority()
            .map_or(facts.host.to_string(), |a| a.as_str().to_string());
        let host = HeaderValue::from_str(&authority)
            .map_err(|_| deny(format!("unusable host {authority:?}")))?;
        headers.insert(header::HOST, host);
    }
    let computed;
    let payload_hash = match signed.declared_payload_hash() {
        Some(declared) => declared,
        None => {
            let body = parts.extensions.get::<ReadBody>().ok_or_else(|| {
                deny("the signed request declares no payload hash and its body was not read".into())
            })?;
            computed = sigv4::hex_sha256(&body.0);
            computed.as_str()
        }
    };
    let request = sigv4::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &headers,
    };
    let agent_chain =
        sigv4::verify(&request, &signed, &pair.placeholder, payload_hash).map_err(|e| {
            deny(format!(
                "the request's SigV4 signature does not verify: {e}"
            ))
        })?;
    sigv4::check_clock_skew(&signed, now_unix_secs(), sigv4::MAX_CLOCK_SKEW_SECS)
        .map_err(|e| deny(format!("the request's SigV4 signature is stale: {e}")))?;
    let scope = &signed.authorization.scope;
    if !rule.allows_service(&scope.service) {
        return Err(deny(format!(
            "the rule does not sign for AWS service {:?}",
            scope.service
        )));
    }
    if !rule.allows_region(&scope.region) {
        return Err(deny(format!(
            "the rule does not sign for AWS region {:?}",
            scope.region
        )));
    }
    let action = action(parts);
    if !rule.allows_action(action.as_deref()) {
        return Err(deny(match action {
            Some(a) => format!(
                "the rule does not sign AWS action {a:?} (it allows {})",
                rule.actions().join(", ")
            ),
            None => format!(
                "the rule signs only the AWS actions {}, and the request names none",
                rule.actions().join(", ")
            ),
        }));
    }
    let resigned = sigv4::sign(&request, &signed, &pair.real, payload_hash, None).map_err(|e| {
        deny(format!(
            "cannot sign the request with {}: {e}",
            name.as_str()
        ))
    })?;
    resigned.apply(&mut parts.headers);
    if signed.content_sha256 == Some(PayloadHash::StreamingSigned)
        || signed.content_sha256 == Some(PayloadHash::StreamingSignedTrailer)
    {
        let mode = signed
            .content_sha256
            .clone()
            .unwrap_or(PayloadHash::StreamingSigned);
        let resigner = ChunkResigner::new(
            &mode,
            agent_chain,
            resigned.chunks,
            sigv4::DEFAULT_MAX_CHUNK,
        )
        .map_err(|e| deny(format!("cannot sign the streamed body again: {e}")))?;
        grant.body_transform = Some(Box::new(Chunks(resigner)));
    }
    grant.secrets.push(name.as_str().to_string());
    // Scrubbed from responses: the real secret key and session token (neither should ever
    // come back, and neither may reach the agent).
    grant.needles.push(Zeroizing::new(
        pair.real.secret_access_key.expose().to_vec(),
    ));
    if let Some(token) = &pair.real.session_token {
        grant.needles.push(Zeroizing::new(token.expose().to_vec()));
    }
    Ok(())
}

/// The chunk re-signer as the proxy's body transform.
struct Chunks(ChunkResigner);

impl BodyTransform for Chunks {
    fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.0.feed(input, out).map_err(|e| e.to_string())
    }

    fn finish(&mut self) -> Result<(), String> {
        self.0.finish().map_err(|e| e.to_string())
    }
}

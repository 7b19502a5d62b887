//! HTTP hygiene: which host a request is for (SNI, Host and :authority must agree), which
//! request forms are refused, which headers never cross a hop, and how the agent's request
//! becomes the upstream one.

use http::{HeaderMap, HeaderName, HeaderValue, Uri, header, request::Parts};

use super::{Denial, serve::Conn};

/// Why a request is refused for its form, before anyone decides about it. The message is for
/// the agent.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the Host header is not valid text")]
    HostNotText,
    #[error("the request names two hosts: :authority {authority} and Host {host}")]
    TwoHosts { authority: String, host: String },
    #[error("the request names no host (no Host header)")]
    NoHost,
    #[error("the request names an empty host")]
    EmptyHost,
    #[error("the request is for host {host} but {what} is {expected}; they must agree")]
    HostMismatch {
        host: String,
        what: &'static str,
        expected: String,
    },
    #[error("CONNECT tunnels are not brokered; make the request directly")]
    Connect,
    #[error("TRACE is not allowed through the broker")]
    Trace,
    #[error("only WebSocket upgrades are brokered")]
    Upgrade,
    #[error("cannot build the upstream URI: {0}")]
    UpstreamUri(http::Error),
    #[error("the request body was already consumed")]
    BodyConsumed,
}

impl From<Refusal> for Denial {
    fn from(refusal: Refusal) -> Self {
        Denial::forbidden(refusal.into())
    }
}

/// The host a request is for, after checking that SNI, Host and :authority agree.
pub(super) fn request_host(parts: &Parts, conn: &Conn) -> Result<String, Refusal> {
    let authority = parts.uri.authority().map(|a| a.host().to_ascii_lowercase());
    let host_header = match parts.headers.get(header::HOST) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Refusal::HostNotText)?
                .to_ascii_lowercase(),
        ),
        None => None,
    };
    let host_header = host_header.map(|h| strip_port(&h).to_string());
    let host = match (&authority, &host_header) {
        (Some(a), Some(h)) if a != h => {
            return Err(Refusal::TwoHosts {
                authority: a.clone(),
                host: h.clone(),
            });
        }
        (Some(a), _) => a.clone(),
        (None, Some(h)) => h.clone(),
        (None, None) => return Err(Refusal::NoHost),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(Refusal::EmptyHost);
    }
    if conn.tls {
        let expected = match &conn.sni {
            Some(sni) => sni.clone(),
            None => conn.origin.original_dst.ip().to_string(),
        };
        if host != expected {
            let what = if conn.sni.is_some() {
                "the TLS server name (SNI)"
            } else {
                "the IP address the agent connected to (no SNI was sent)"
            };
            return Err(Refusal::HostMismatch {
                host,
                what,
                expected,
            });
        }
    }
    Ok(host)
}

/// Refuses request forms that would tunnel past per-request decisions or reflect headers: a
/// CONNECT tunnel, TRACE (echoes the request, credentials included), and upgrades to anything
/// but WebSocket (`h2c` would switch protocols under the proxy).
pub(super) fn check_request_shape(parts: &Parts) -> Result<(), Refusal> {
    if parts.method == http::Method::CONNECT {
        return Err(Refusal::Connect);
    }
    if parts.method == http::Method::TRACE {
        return Err(Refusal::Trace);
    }
    if let Some(upgrade) = parts.headers.get(header::UPGRADE) {
        let websocket = upgrade
            .to_str()
            .is_ok_and(|u| u.trim().eq_ignore_ascii_case("websocket"));
        if !websocket {
            return Err(Refusal::Upgrade);
        }
    }
    Ok(())
}

pub(super) fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    }
}

pub(super) fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Headers that belong to one hop and are never forwarded.
pub(super) const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names decides, without a lookup
    // (and a name parse) per hop-by-hop header.
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    let any = headers.keys().any(|name| {
        // Standard names compare as enum tags; only the two custom ones compare bytes.
        *name == header::CONNECTION
            || *name == header::UPGRADE
            || *name == header::TE
            || *name == header::TRAILER
            || *name == header::TRANSFER_ENCODING
            || *name == header::PROXY_AUTHENTICATE
            || *name == header::PROXY_AUTHORIZATION
            || *name == KEEP_ALIVE
            || *name == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| {
            s.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter(|t| !(keep_upgrade && t == "upgrade"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        if keep_upgrade && name == "connection" {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// What the agent's hop-by-hop headers said, once they are removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Hop {
    /// A WebSocket upgrade: `Upgrade` and `Connection` stay.
    pub(super) upgrade: bool,
    /// `TE: trailers`, which HTTP/2 allows and gRPC servers need: forwarded.
    pub(super) te_trailers: bool,
}

/// Removes the agent's hop-by-hop headers, those its `Connection` header names included, before
/// the policy sees the request: a rule's required headers are checked on what goes upstream,
/// and what injection writes later is never removed (a header named in `Connection` is the
/// agent's, not the rule's).
pub(super) fn strip_request_hop_by_hop(parts: &mut Parts) -> Hop {
    let upgrade = is_upgrade(&parts.headers);
    // HTTP/2 allows exactly one value of TE, `trailers` (RFC 9113 8.2.2), and gRPC servers
    // reset streams without it: that value is forwarded.
    let te_trailers = parts
        .headers
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"trailers"));
    strip_hop_by_hop(&mut parts.headers, upgrade);
    Hop {
        upgrade,
        te_trailers,
    }
}

/// Turns the agent's request into the upstream request: absolute URI for the pool, Host set;
/// the hop-by-hop headers are gone already ([`strip_request_hop_by_hop`]), and nothing the
/// authorizer wrote is removed.
pub(super) fn prepare_upstream(
    parts: &mut Parts,
    (host, port): (&str, u16),
    tls: bool,
    scrubbed: bool,
    hop: Hop,
) -> Result<(), Refusal> {
    let scheme = if tls { "https" } else { "http" };
    let default_port = if tls { 443 } else { 80 };
    let host_for_uri = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    };
    let authority = if port == default_port {
        host_for_uri
    } else {
        format!("{host_for_uri}:{port}")
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme(scheme)
        .authority(authority.as_str())
        .path_and_query(path_and_query)
        .build()
        .map_err(Refusal::UpstreamUri)?;
    if hop.te_trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if hop.upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if scrubbed {
            // A compressed (permessage-deflate) or otherwise transformed frame could carry a
            // secret past the frame scrubber: no extension is offered upstream.
            parts.headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
        }
    }
    // The host travels in the URI's authority: the pooled client writes it as `Host` on an
    // HTTP/1.1 connection and as `:authority` on HTTP/2, where a `Host` header as well would be
    // a duplicate that servers such as nginx refuse.
    parts.headers.remove(header::HOST);
    if scrubbed {
        // A compressed echo of a secret could not be scrubbed.
        parts.headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
    }
    // The upstream protocol is negotiated by ALPN; the pool converts as needed.
    parts.version = http::Version::HTTP_11;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn connect_trace_and_h2c_are_refused() {
        let parts = |method: &str, upgrade: Option<&str>| {
            let mut b = Request::builder().method(method).uri("/");
            if let Some(u) = upgrade {
                b = b
                    .header(header::UPGRADE, u)
                    .header(header::CONNECTION, "upgrade");
            }
            b.body(()).expect("request").into_parts().0
        };
        assert!(check_request_shape(&parts("CONNECT", None)).is_err());
        assert!(check_request_shape(&parts("TRACE", None)).is_err());
        assert!(check_request_shape(&parts("GET", Some("h2c"))).is_err());
        assert!(check_request_shape(&parts("GET", Some("websocket"))).is_ok());
        assert!(check_request_shape(&parts("POST", None)).is_ok());
    }

    #[test]
    fn every_hop_by_hop_header_is_stripped_alone() {
        for name in HOP_BY_HOP.iter().chain(&["upgrade"]) {
            let mut h = HeaderMap::new();
            h.insert(HeaderName::from_static(name), HeaderValue::from_static("x"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            strip_hop_by_hop(&mut h, false);
            assert!(!h.contains_key(*name), "{name} was forwarded");
            assert!(h.contains_key(header::CONTENT_TYPE));
        }
        // Names listed in Connection go too; an upgrade keeps its Upgrade and Connection.
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-hop, upgrade"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert!(!h.contains_key("x-hop"));
        assert!(h.contains_key(header::UPGRADE) && h.contains_key(header::CONNECTION));
    }

    #[test]
    fn the_request_loses_its_hop_by_hop_headers_before_anyone_decides() {
        let mut parts = Request::get("/")
            .header(header::CONNECTION, "x-required, x-api-key, upgrade")
            .header(header::UPGRADE, "websocket")
            .header("x-required", "yes")
            .header("x-api-key", "agent's")
            .header(header::TE, "trailers")
            .body(())
            .expect("request")
            .into_parts()
            .0;
        let hop = strip_request_hop_by_hop(&mut parts);
        assert_eq!(
            hop,
            Hop {
                upgrade: true,
                te_trailers: true
            }
        );
        assert!(!parts.headers.contains_key("x-required"));
        assert!(!parts.headers.contains_key("x-api-key"));
        assert!(!parts.headers.contains_key(header::TE));
        // Written after the decision (injection): kept.
        parts
            .headers
            .insert("x-api-key", HeaderValue::from_static("injected"));
        prepare_upstream(&mut parts, ("h.test", 443), true, true, hop).expect("prepared");
        assert_eq!(parts.headers["x-api-key"], "injected");
        assert_eq!(parts.headers[header::CONNECTION], "upgrade");
        assert_eq!(parts.headers[header::TE], "trailers");
    }

    #[test]
    fn ports_are_stripped_from_host_headers() {
        assert_eq!(strip_port("api.example.test:8443"), "api.example.test");
        assert_eq!(strip_port("api.example.test"), "api.example.test");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("127.0.0.2:80"), "127.0.0.2");
    }
}

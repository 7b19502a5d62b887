//! `brokerctl policy show` and `policy explain`: the policy's answers in words, for operators.

use agent_broker_protocol::{ErrorKind, Response};

use crate::{
    cgroup::CgroupPath,
    control::error,
    policy::{Decision, Policy},
};

/// A URL taken apart for a policy question.
struct Target {
    host: String,
    port: u16,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("invalid URL {url:?}: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "invalid URL {url:?}: give an http:// or https:// URL"
            ));
        }
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("invalid URL {url:?}: no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    Ok(Target { host, port })
}

/// The rules that apply to `cgroup`.
pub fn show(policy: &Policy, cgroup: &str) -> Response {
    let cgroup = match CgroupPath::parse(cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let text = match policy.file_for(&cgroup) {
        None => format!("# no policy file governs {cgroup}: every request is denied\n"),
        Some(file) => {
            let mut text = format!(
                "# {cgroup} is governed by {} (cgroup {})\n",
                file.path().display(),
                file.cgroup()
            );
            for rule in file.rules() {
                text.push_str(&format!(
                    "\n[[allow]]  # {}\nhost = \"{}\"\nport = {}\n",
                    rule.rule_ref(),
                    rule.host(),
                    rule.port()
                ));
                if rule.plain_http() {
                    text.push_str("plain_http = true\n");
                }
                for (name, template) in rule.inject().headers() {
                    text.push_str(&format!(
                        "inject.headers.{name} = {:?}\n",
                        template.as_str()
                    ));
                }
            }
            text
        }
    };
    Response::PolicyText { text }
}

/// Whether `METHOD url` from `cgroup` would be allowed, and why.
pub fn explain(policy: &Policy, cgroup: &str, method: &str, url: &str) -> Response {
    let cgroup = match CgroupPath::parse(cgroup) {
        Ok(c) => c,
        Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
    };
    let target = match parse_url(url) {
        Ok(t) => t,
        Err(e) => return error(ErrorKind::BadRequest, e),
    };
    match policy.decide(&cgroup, &target.host, target.port) {
        Decision::Allow { rule, inject, .. } => {
            let names: Vec<&str> = inject.header_names().collect();
            let injects = if names.is_empty() {
                "no credentials injected".to_string()
            } else {
                format!("injects {}", names.join(", "))
            };
            Response::PolicyExplained {
                allowed: true,
                text: format!("allow {method} {url} for {cgroup}: rule {rule}; {injects}"),
            }
        }
        Decision::Deny {
            reason,
            policy_file,
        } => {
            let file = policy_file
                .map(|f| format!(" (policy file {})", f.display()))
                .unwrap_or_default();
            Response::PolicyExplained {
                allowed: false,
                text: format!("deny {method} {url} for {cgroup}: {reason}{file}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_default_ports() {
        let t = parse_url("https://API.example.test/v1").expect("url");
        assert_eq!((t.host.as_str(), t.port), ("api.example.test", 443));
        let t = parse_url("http://127.0.0.2:8080/").expect("url");
        assert_eq!((t.host.as_str(), t.port), ("127.0.0.2", 8080));
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("not a url").is_err());
    }
}

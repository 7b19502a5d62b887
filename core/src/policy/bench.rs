//! A synthetic policy at scale, for `cargo xtask bench` (timing) and a test (correctness).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::{Duration, UNIX_EPOCH},
};

use http::{HeaderMap, Method};

use super::{OwnedRequest, Policy, PolicyError};
use crate::cgroup::CgroupPath;

/// One request of the synthetic workload and the answer it must get.
#[derive(Clone, Debug)]
pub struct BenchRequest {
    pub cgroup: CgroupPath,
    pub request: OwnedRequest,
    pub expect_allow: bool,
}

/// Services the parent file allows (`*.svcN.test` and `10.N.0.0/16`).
const SERVICES: usize = 10;

/// A policy with about `rules` rules spread over `agents` agent files (`agents/agent-N`), all
/// below one parent file for `agents` that each must narrow, and for every agent rule one
/// request it allows and one it denies (wrong method or path). Rules mix exact hosts, wildcards,
/// address ranges, methods, path globs, limits and expiry.
pub fn bench_policy(
    rules: usize,
    agents: usize,
) -> Result<(Policy, Vec<BenchRequest>), PolicyError> {
    let agents = agents.max(1);
    let per_agent = (rules / agents).max(1);
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);

    let mut parent = String::from("cgroup = \"agents\"\n");
    for s in 0..SERVICES {
        parent.push_str(&format!(
            "[[allow]]\nhost = \"*.svc{s}.test\"\n\
             inject.headers = {{ authorization = \"Bearer {{secret:KEY_{s}}}\" }}\n\n\
             [[allow]]\nip = \"10.{s}.0.0/16\"\n\
             rate = {{ per_second = 100000, burst = 100000 }}\n\n"
        ));
    }
    let mut files = vec![(PathBuf::from("agents.toml"), parent)];
    let mut requests = Vec::new();
    let empty = HeaderMap::new();
    let request = |host: String, ip: IpAddr, method: Method, path: &str| OwnedRequest {
        method,
        path: path.to_string(),
        headers: empty.clone(),
        host,
        port: 443,
        dst_ip: ip,
        tls: true,
        now,
    };
    let outside = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    for a in 0..agents {
        let cgroup_name = format!("agents/agent-{a}");
        let Ok(cgroup) = CgroupPath::parse(&cgroup_name) else {
            continue;
        };
        let mut text = format!("cgroup = \"{cgroup_name}\"\n");
        for j in 0..per_agent {
            let s = j % SERVICES;
            let mut push = |req: OwnedRequest, expect_allow: bool| {
                requests.push(BenchRequest {
                    cgroup: cgroup.clone(),
                    request: req,
                    expect_allow,
                });
            };
            match j % 4 {
                0 => {
                    let host = format!("api{j}.svc{s}.test");
                    text.push_str(&format!(
                        "[[allow]]\nhost = \"{host}\"\nmethods = [\"GET\", \"POST\"]\n\
                         paths = [\"/v1/items/*\", \"/v1/models\"]\n\
                         inject.headers = {{ authorization = \"Bearer {{secret:KEY_{s}}}\" }}\n\n"
                    ));
                    push(
                        request(host.clone(), outside, Method::POST, "/v1/items/42"),
                        true,
                    );
                    push(
                        request(host, outside, Method::DELETE, "/v1/items/42"),
                        false,
                    );
                }
                1 => {
                    let suffix = format!("team{j}.svc{s}.test");
                    text.push_str(&format!(
                        "[[allow]]\nhost = \"*.{suffix}\"\npaths = [\"/v2/**\"]\n\
                         not_after = \"2100-01-01T00:00:00Z\"\n\n"
                    ));
                    push(
                        request(format!("x.{suffix}"), outside, Method::GET, "/v2/a/b/c"),
                        true,
                    );
                    push(
                        request(format!("x.{suffix}"), outside, Method::GET, "/v3/a"),
                        false,
                    );
                }
                2 => {
                    let host = format!("svc-{j}.svc{s}.test");
                    text.push_str(&format!(
                        "[[allow]]\nhost = \"{host}\"\nmethods = [\"GET\"]\n\
                         rate = {{ per_second = 50 }}\n\n"
                    ));
                    push(
                        request(host.clone(), outside, Method::GET, "/anything"),
                        true,
                    );
                    push(request(host, outside, Method::PUT, "/anything"), false);
                }
                _ => {
                    let ip = Ipv4Addr::new(10, s as u8, (a % 256) as u8, (j % 256) as u8);
                    text.push_str(&format!(
                        "[[allow]]\nip = \"{ip}\"\nmethods = [\"GET\"]\n\
                         budget = {{ requests_per_day = 1000000 }}\n\n"
                    ));
                    push(
                        request(ip.to_string(), IpAddr::V4(ip), Method::GET, "/status"),
                        true,
                    );
                    push(
                        request(ip.to_string(), IpAddr::V4(ip), Method::POST, "/status"),
                        false,
                    );
                }
            }
        }
        files.push((PathBuf::from(format!("agent-{a}.toml")), text));
    }
    Ok((Policy::from_files(files)?, requests))
}

//! nginx in two roles: the origin API every column calls in the end, and the peer brokerd is
//! compared with, a TLS-terminating reverse proxy that sets the Authorization header and keeps its
//! upstream connections alive.
//!
//! The origin answers `GET /v1/whoami` with a small fixed JSON body: 200 only when the request
//! carries `Authorization: Bearer <the bench key>`, 401 otherwise. It has two listeners: h2 and
//! http/1.1 for the direct client, http/1.1 only for the proxies. nginx 1.22 answers 400 to an h2
//! request that has a Host header besides `:authority` ("client sent duplicate host header"),
//! which brokerd's h2 upstream requests have; over http/1.1 upstream, as nginx's own, the proxies
//! do the same work. It is nginx rather than the
//! bundled test-api because test-api looks up the owner of every accepted connection by scanning
//! `/proc` and keeps a record of every request; that makes new connections to it cost milliseconds
//! and its memory grow with each request, which would turn the direct column into a measurement of
//! test-api.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::pki::CertFiles;

/// The settings both nginx instances share.
pub struct Common<'a> {
    /// Where the config, pid file, logs and temp dirs go.
    pub dir: &'a Path,
    /// The instance's name, which prefixes its files.
    pub name: &'a str,
    pub cert: &'a CertFiles,
}

/// The origin API's config: TLS listeners on `h2_and_http1` (offering h2, then http/1.1) and on
/// `http1_only`.
pub fn origin_config(
    common: &Common,
    h2_and_http1: SocketAddr,
    http1_only: SocketAddr,
    authorization: &str,
) -> String {
    let mut conf = head(common, "access_log off;");
    let _ = write!(
        conf,
        r#"    server {{
        listen {h2_and_http1} ssl http2 backlog={LISTEN_BACKLOG};
        listen {http1_only} ssl backlog={LISTEN_BACKLOG};
{tls}
        location = /v1/whoami {{
            default_type application/json;
            if ($http_authorization != "{authorization}") {{
                return 401 '{{"authorized":false}}';
            }}
            return 200 '{{"authorized":true}}';
        }}
        location / {{
            return 404;
        }}
    }}
}}
"#,
        tls = tls_lines(common.cert),
    );
    conf
}

/// The accept queue of every nginx listener: the kernel's most (`net.core.somaxconn` is 4096
/// on current kernels), not nginx's default of 511, which 1,000 connections opened at once
/// overflow (the fleet row's first version, with wrk), so that some wait a second or more for
/// the kernel to retry them and a row measures the queue rather than the proxy. brokerd's
/// queue is tokio's, 1,024.
const LISTEN_BACKLOG: u32 = 4096;

/// Idle upstream connections each nginx peer worker keeps (`keepalive`): one per client
/// connection of the fleet row (1,000), even were they all on one worker. Past it nginx closes
/// a connection after its request and opens a new one, a TLS handshake to the origin per
/// request, which is not what an nginx sized for its load does. The other rows but
/// `manyidle` (100) run at most 32 connections at once and never reached the 64 this was.
const UPSTREAM_KEEPALIVE: u32 = 1024;

/// How long both nginx instances keep an idle connection open (`keepalive_timeout`); the bench
/// gives brokerd the same (`--agent-header-timeout`).
pub const KEEPALIVE_SECONDS: u64 = 300;

/// One listener of the nginx peer and the upstream it forwards to.
pub struct Route {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// Pass bodies through as they stream, both ways, instead of buffering them: for the SSE and
    /// bulk rows (issue 12), which compare brokerd with nginx set up for streaming.
    pub streaming: bool,
    /// Set the header only for requests to these hosts (exact names or `*.` wildcards), looked
    /// up by the request's host in a `map`, and refuse (403) any other: the fleet row's
    /// counterpart of brokerd's 1,000 rules. None: every request gets the header.
    pub hosts: Option<Vec<String>>,
}

/// What a streaming route adds to its location: no response buffering (`proxy_buffering off`,
/// as an SSE endpoint behind nginx needs), no request buffering (an upload is forwarded as it
/// arrives, not spooled to a temp file first), no limit on the request body (the default is
/// 1 MiB), and 64 KiB reads each way rather than one memory page (`proxy_buffers` only so that
/// nginx accepts the larger `proxy_buffer_size`; unbuffered, it reads into the latter).
const STREAMING: &str = "
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_buffer_size 64k;
            proxy_buffers 8 64k;
            client_max_body_size 0;
            client_body_buffer_size 64k;";

/// The nginx peer's config: for each route a TLS listener that forwards to its upstream over
/// verified TLS, writes `authorization` into every request (or, for a route with `hosts`, the
/// value its map gives the request's host), and keeps up to [`UPSTREAM_KEEPALIVE`] idle
/// upstream connections per worker; a streaming route also passes bodies through unbuffered
/// ([`STREAMING`]). Its access log is on (buffered), as brokerd's audit log is.
pub fn proxy_config(
    common: &Common,
    routes: &[Route],
    upstream_ca: &Path,
    authorization: &str,
) -> String {
    let access_log = format!(
        "access_log {} combined buffer=64k flush=1s;",
        common
            .dir
            .join(format!("{}-access.log", common.name))
            .display()
    );
    let mut conf = head(common, &access_log);
    if routes.iter().any(|route| route.hosts.is_some()) {
        // nginx sizes the map's hash within these bounds, and refuses to start when 1,000
        // names do not fit the defaults (2048 entries of 32 or 64 bytes).
        conf.push_str("    map_hash_max_size 8192;\n    map_hash_bucket_size 128;\n");
    }
    for (index, route) in routes.iter().enumerate() {
        let authorization = match &route.hosts {
            None => format!("\"{authorization}\""),
            Some(hosts) => {
                let _ = writeln!(
                    conf,
                    "    map $host $authorization_{index} {{\n        hostnames;\n        default \"\";"
                );
                for host in hosts {
                    let _ = writeln!(conf, "        \"{host}\" \"{authorization}\";");
                }
                conf.push_str("    }\n");
                format!("$authorization_{index}")
            }
        };
        let refuse_others = if route.hosts.is_some() {
            format!(
                "\n            if ($authorization_{index} = \"\") {{\n                return 403;\n            }}"
            )
        } else {
            String::new()
        };
        let _ = write!(
            conf,
            r#"    upstream origin_{index} {{
        server {upstream};
        keepalive {UPSTREAM_KEEPALIVE};
    }}
    server {{
        listen {listen} ssl http2 backlog={LISTEN_BACKLOG};
{tls}
        location / {{{refuse_others}
            proxy_pass https://origin_{index};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host api.example.test;
            proxy_set_header Authorization {authorization};
            proxy_ssl_server_name on;
            proxy_ssl_name api.example.test;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_session_reuse on;{streaming}
        }}
    }}
"#,
            upstream = route.upstream,
            listen = route.listen,
            tls = tls_lines(common.cert),
            ca = upstream_ca.display(),
            streaming = if route.streaming { STREAMING } else { "" },
        );
    }
    conf.push_str("}\n");
    conf
}

/// Everything before the servers: one worker per core (nginx's `auto`, as brokerd's runtime has
/// one thread per core), enough connections for the idle-memory workload (the workers inherit the
/// bench's raised open-files limit), files under `dir`, and
/// TLS 1.3 offered both ways, as brokerd does (Debian's nginx 1.22 stops at TLS 1.2 by default).
fn head(common: &Common, access_log: &str) -> String {
    let file = |suffix: &str| {
        common
            .dir
            .join(format!("{}-{suffix}", common.name))
            .display()
            .to_string()
    };
    let temp = file("temp");
    format!(
        r#"daemon off;
master_process on;
worker_processes auto;
pid {pid};
error_log {error_log} warn;
events {{
    worker_connections 16384;
}}
http {{
    {access_log}
    keepalive_requests 10000000;
    keepalive_timeout {KEEPALIVE_SECONDS}s;
    ssl_protocols TLSv1.2 TLSv1.3;
    proxy_ssl_protocols TLSv1.2 TLSv1.3;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
"#,
        pid = file("nginx.pid"),
        error_log = file("error.log"),
    )
}

fn tls_lines(cert: &CertFiles) -> String {
    format!(
        "        ssl_certificate {};\n        ssl_certificate_key {};",
        cert.cert.display(),
        cert.key.display()
    )
}

/// Writes `config` as `<dir>/<name>.conf` and returns the command that runs nginx with it in the
/// foreground (`-e` keeps even its start-up errors out of /var/log/nginx).
pub fn command(nginx: &Path, common: &Common, config: &str) -> Result<Command> {
    let conf: PathBuf = common.dir.join(format!("{}.conf", common.name));
    fs::write(&conf, config).with_context(|| format!("writing {}", conf.display()))?;
    fs::create_dir_all(common.dir.join(format!("{}-temp", common.name)))?;
    let mut nginx = Command::new(nginx);
    nginx
        .arg("-p")
        .arg(common.dir)
        .arg("-e")
        .arg(common.dir.join(format!("{}-error.log", common.name)))
        .arg("-c")
        .arg(&conf);
    Ok(nginx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common<'a>(cert: &'a CertFiles) -> Common<'a> {
        Common {
            dir: Path::new("/b"),
            name: "peer",
            cert,
        }
    }

    fn cert() -> CertFiles {
        CertFiles {
            cert: PathBuf::from("/b/c.pem"),
            key: PathBuf::from("/b/c.key"),
        }
    }

    #[test]
    fn the_origin_answers_200_only_for_the_key() {
        let cert = cert();
        let conf = origin_config(
            &common(&cert),
            "127.0.0.2:9443".parse().expect("addr"),
            "127.0.0.2:9444".parse().expect("addr"),
            "Bearer k1",
        );
        assert!(conf.contains("listen 127.0.0.2:9443 ssl http2 backlog=4096;"));
        assert!(conf.contains("listen 127.0.0.2:9444 ssl backlog=4096;"));
        assert!(conf.contains(r#"if ($http_authorization != "Bearer k1")"#));
        assert!(conf.contains("access_log off;"));
        assert!(conf.contains("ssl_certificate_key /b/c.key;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }

    #[test]
    fn the_peer_sets_the_header_and_keeps_upstreams_alive() {
        let cert = cert();
        let routes = [
            Route {
                listen: "127.0.0.1:1".parse().expect("addr"),
                upstream: "127.0.0.2:2".parse().expect("addr"),
                streaming: false,
                hosts: None,
            },
            Route {
                listen: "127.0.0.1:3".parse().expect("addr"),
                upstream: "127.0.0.2:4".parse().expect("addr"),
                streaming: true,
                hosts: None,
            },
        ];
        let conf = proxy_config(&common(&cert), &routes, Path::new("/b/ca.pem"), "Bearer k1");
        assert!(conf.contains("upstream origin_1 {\n        server 127.0.0.2:4;"));
        assert!(conf.contains("proxy_pass https://origin_1;"));
        assert!(conf.contains(r#"proxy_set_header Authorization "Bearer k1";"#));
        assert!(conf.contains("proxy_ssl_trusted_certificate /b/ca.pem;"));
        assert!(conf.contains("access_log /b/peer-access.log combined"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
        // Only the streaming route passes bodies through unbuffered.
        assert_eq!(conf.matches("proxy_buffering off;").count(), 1);
        assert_eq!(conf.matches("proxy_request_buffering off;").count(), 1);
        let streaming_server = conf.split("server {").nth(2).unwrap_or_default();
        assert!(streaming_server.contains("listen 127.0.0.1:3 ssl http2 backlog=4096;"));
        assert!(streaming_server.contains("proxy_buffering off;"));
        assert!(streaming_server.contains("client_max_body_size 0;"));
        assert!(!conf.contains("map "));
    }

    #[test]
    fn a_route_with_hosts_sets_the_header_only_for_them() {
        let cert = cert();
        let routes = [Route {
            listen: "127.0.0.1:1".parse().expect("addr"),
            upstream: "127.0.0.2:2".parse().expect("addr"),
            streaming: false,
            hosts: Some(vec!["api1.fleet.test".into(), "*.svc0.fleet.test".into()]),
        }];
        let conf = proxy_config(&common(&cert), &routes, Path::new("/b/ca.pem"), "Bearer k1");
        assert!(
            conf.contains(
                "map $host $authorization_0 {\n        hostnames;\n        default \"\";"
            )
        );
        assert!(conf.contains("        \"api1.fleet.test\" \"Bearer k1\";\n"));
        assert!(conf.contains("        \"*.svc0.fleet.test\" \"Bearer k1\";\n"));
        assert!(conf.contains("if ($authorization_0 = \"\") {\n                return 403;"));
        assert!(conf.contains("proxy_set_header Authorization $authorization_0;"));
        assert!(conf.contains("map_hash_bucket_size 128;"));
        assert_eq!(conf.matches('{').count(), conf.matches('}').count());
    }
}

//! An HTTPS git server for `git clone` / `git push` agents: Debian's `git http-backend`
//! ([`HTTP_BACKEND`]) run as CGI behind HTTP basic auth, on a loopback address, with a
//! certificate from a [`TestCa`] (brokerd trusts it through `--upstream-ca`).
//!
//! Every request must carry the one `Authorization` value whose sha256 the test gave; a request
//! without it, or with another, gets `401` with `WWW-Authenticate: Basic`, as a git host answers.
//! An authorized request runs `git http-backend` with the CGI environment a web server gives it
//! (`GIT_PROJECT_ROOT`, `GIT_HTTP_EXPORT_ALL`, `REMOTE_USER` = the basic-auth user name,
//! `PATH_INFO`, `QUERY_STRING`, the request headers as `HTTP_*` but Authorization).
//!
//! The repository is [`REPO`]: a bare repository with one commit on `main` whose `README.md`
//! says [`GitServer::readme`], with `http.receivepack` on, so pushes land. Like
//! [`crate::TestUpstream`], the server records what it received as hashes, never values
//! ([`GitRequest`]).

use std::{
    convert::Infallible,
    io::Write as _,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use rustls::ServerConfig;
use tokio::sync::watch;

use crate::{TestCa, canary::sha256_hex, tcp_socket_owner};

/// The git the server side uses: Debian's `git` package (whose `git-http-backend` is
/// [`HTTP_BACKEND`]).
pub const GIT: &str = "/usr/bin/git";
/// Debian's `git http-backend`.
pub const HTTP_BACKEND: &str = "/usr/lib/git-core/git-http-backend";
/// The repository's path under the server's root (the URL path is `/repo.git`).
pub const REPO: &str = "repo.git";
/// How long one `git http-backend` run may take.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);

/// One request the server received. Values never appear: the credential only as a hash.
#[derive(Clone, Debug)]
pub struct GitRequest {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    /// The query (`service=git-upload-pack`, ...), if any.
    pub query: Option<String>,
    /// sha256 hex of the Authorization header, if there was one.
    pub authorization_sha256: Option<String>,
    /// The status the server answered.
    pub status: u16,
    /// The pid owning the peer socket (brokerd's, when relayed).
    pub peer_owner: Option<u32>,
    pub sni: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub version: String,
}

struct State {
    requests: Mutex<Vec<GitRequest>>,
    /// sha256 hex of the one Authorization value accepted.
    expect_authorization_sha256: String,
    /// `GIT_PROJECT_ROOT`.
    root: PathBuf,
}

/// The HTTPS git server; stopped (and its repository removed) on Drop.
pub struct GitServer {
    addr: SocketAddr,
    readme: String,
    state: Arc<State>,
    shutdown: Option<watch::Sender<bool>>,
    thread: Option<thread::JoinHandle<()>>,
    /// Holds [`State::root`]; dropped after the server stopped.
    dir: tempfile::TempDir,
}

impl GitServer {
    /// Creates the repository and serves it on `ip` (a port the kernel chooses) with a
    /// certificate from `ca` for `names`, accepting only the Authorization value whose sha256
    /// is `expect_authorization_sha256`.
    pub fn start(
        ca: &TestCa,
        ip: IpAddr,
        names: &[&str],
        expect_authorization_sha256: &str,
    ) -> Self {
        for tool in [GIT, HTTP_BACKEND] {
            assert!(
                Path::new(tool).is_file(),
                "{tool} is missing: the git tests need Debian's `git` package (run `cargo xtask \
                 setup`, or `apt-get install git`)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("abtest-git-")
            .tempdir()
            .unwrap_or_else(|e| panic!("temp dir for the git server: {e}"));
        let root = dir.path().join("root");
        std::fs::create_dir(&root)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
        let readme = format!("abtest repository {}\n", crate::unique_name());
        seed_repository(dir.path(), &root, &readme);

        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (chain, key) = ca.leaf(&names);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|e| panic!("rustls protocol versions: {e}"))
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap_or_else(|e| panic!("git server TLS config: {e}"));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));

        let listener = std::net::TcpListener::bind(SocketAddr::new(ip, 0))
            .unwrap_or_else(|e| panic!("cannot bind the git server on {ip}: {e}"));
        listener
            .set_nonblocking(true)
            .unwrap_or_else(|e| panic!("set_nonblocking: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("local_addr: {e}"));
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            expect_authorization_sha256: expect_authorization_sha256.to_string(),
            root,
        });
        let (tx, rx) = watch::channel(false);
        let thread = {
            let state = state.clone();
            thread::Builder::new()
                .name("abtest-git-server".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap_or_else(|e| panic!("git server runtime: {e}"));
                    rt.block_on(async move {
                        let listener = tokio::net::TcpListener::from_std(listener)
                            .unwrap_or_else(|e| panic!("tokio listener: {e}"));
                        accept_loop(listener, acceptor, state, rx).await;
                    });
                    rt.shutdown_timeout(Duration::from_secs(1));
                })
                .unwrap_or_else(|e| panic!("cannot start the git server thread: {e}"))
        };
        Self {
            addr,
            readme,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
            dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// What the first commit's `README.md` says.
    pub fn readme(&self) -> &str {
        &self.readme
    }

    /// The bare repository on disk.
    pub fn repo_dir(&self) -> PathBuf {
        self.state.root.join(REPO)
    }

    /// Every request received so far, oldest first.
    pub fn requests(&self) -> Vec<GitRequest> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Runs `git --git-dir=<repository> ARGS` on the server side; its stdout (panics, with
    /// stderr, when it fails).
    pub fn git(&self, args: &[&str]) -> String {
        let mut cmd = git_command(self.dir.path());
        cmd.arg("--git-dir").arg(self.repo_dir()).args(args);
        run_git(&mut cmd)
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `git` with an environment of its own: no system or global configuration, a fixed identity.
fn git_command(home: &Path) -> Command {
    let mut cmd = Command::new(GIT);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", home)
        .env("LANG", "C")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "abtest server")
        .env("GIT_AUTHOR_EMAIL", "server@example.test")
        .env("GIT_COMMITTER_NAME", "abtest server")
        .env("GIT_COMMITTER_EMAIL", "server@example.test");
    cmd
}

fn run_git(cmd: &mut Command) -> String {
    let out = crate::run_with_timeout(cmd, crate::SHORT);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `<root>/repo.git`: a bare clone of a one-commit repository made in `<dir>/seed`.
fn seed_repository(dir: &Path, root: &Path, readme: &str) {
    let seed = dir.join("seed");
    run_git(
        git_command(dir)
            .args(["init", "-q", "-b", "main"])
            .arg(&seed),
    );
    std::fs::write(seed.join("README.md"), readme)
        .unwrap_or_else(|e| panic!("cannot write the seed README: {e}"));
    run_git(
        git_command(dir)
            .arg("-C")
            .arg(&seed)
            .args(["add", "README.md"]),
    );
    run_git(
        git_command(dir)
            .arg("-C")
            .arg(&seed)
            .args(["commit", "-q", "-m", "seed"]),
    );
    let repo = root.join(REPO);
    run_git(
        git_command(dir)
            .args(["clone", "-q", "--bare"])
            .arg(&seed)
            .arg(&repo),
    );
    run_git(git_command(dir).arg("--git-dir").arg(&repo).args([
        "config",
        "http.receivepack",
        "true",
    ]));
    let _ = std::fs::remove_dir_all(&seed);
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        // Look the owner up now, while the peer socket certainly exists.
        let peer_owner = tokio::task::spawn_blocking(move || tcp_socket_owner(peer))
            .await
            .ok()
            .flatten();
        let state = state.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            else {
                return;
            };
            let sni = stream.get_ref().1.server_name().map(str::to_string);
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let sni = sni.clone();
                async move { Ok::<_, Infallible>(respond(req, &state, peer_owner, sni).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

async fn respond(
    req: Request<Incoming>,
    state: &Arc<State>,
    peer_owner: Option<u32>,
    sni: Option<String>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let authorization = parts.headers.get(header::AUTHORIZATION);
    let authorization_sha256 = authorization.map(|v| sha256_hex(v.as_bytes()));
    let user = (authorization_sha256.as_deref() == Some(&state.expect_authorization_sha256))
        .then(|| authorization.and_then(|v| basic_auth_user(v.as_bytes())))
        .flatten();
    let response = match user {
        None => {
            let mut r = text(StatusCode::UNAUTHORIZED, "authentication required\n");
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"abtest git\""),
            );
            r
        }
        Some(user) => {
            let root = state.root.clone();
            let request = parts.clone();
            match tokio::task::spawn_blocking(move || cgi(&root, &request, &body, &user)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    eprintln!("git server: {e}");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "git http-backend failed\n",
                    )
                }
                Err(e) => {
                    eprintln!("git server: git http-backend panicked: {e}");
                    text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "git http-backend failed\n",
                    )
                }
            }
        }
    };
    let record = GitRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_string(),
        query: parts.uri.query().map(str::to_string),
        authorization_sha256,
        status: response.status().as_u16(),
        peer_owner,
        sni,
        version: format!("{:?}", parts.version),
    };
    if let Ok(mut r) = state.requests.lock() {
        r.push(record);
    }
    response
}

/// The user name of a `Basic` Authorization value.
fn basic_auth_user(value: &[u8]) -> Option<String> {
    let encoded = value.strip_prefix(b"Basic ")?;
    let decoded = data_encoding::BASE64.decode(encoded).ok()?;
    let colon = decoded.iter().position(|&b| b == b':')?;
    String::from_utf8(decoded[..colon].to_vec()).ok()
}

/// Runs `git http-backend` for one request (RFC 3875 CGI) and turns its output into a response.
fn cgi(
    root: &Path,
    parts: &http::request::Parts,
    body: &[u8],
    user: &str,
) -> Result<Response<Full<Bytes>>, String> {
    let mut cmd = Command::new(HTTP_BACKEND);
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("HOME", root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REMOTE_USER", user)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("CONTENT_LENGTH", body.len().to_string());
    for (name, value) in &parts.headers {
        if name == header::AUTHORIZATION {
            continue;
        }
        let Ok(value) = value.to_str() else { continue };
        let var = name.as_str().to_ascii_uppercase().replace('-', "_");
        if name == header::CONTENT_TYPE {
            cmd.env("CONTENT_TYPE", value);
        } else if name != header::CONTENT_LENGTH {
            cmd.env(format!("HTTP_{var}"), value);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {HTTP_BACKEND}: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("no stdin for git http-backend")?;
    let body = body.to_vec();
    // A thread, so a backend that answers before reading everything cannot block us.
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = crate::wait_with_timeout(child, BACKEND_TIMEOUT, HTTP_BACKEND);
    let _ = writer.join();
    if !out.status.success() {
        return Err(format!(
            "{HTTP_BACKEND} {} {} failed ({}): {}",
            parts.method,
            parts.uri,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_cgi(&out.stdout)
}

/// CGI output: header lines, an empty line, the body. `Status:` sets the status (200 without).
fn parse_cgi(output: &[u8]) -> Result<Response<Full<Bytes>>, String> {
    let (head, body) = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .filter_map(|sep| crate::canary::find(output, sep).map(|at| (at, sep.len())))
        .min()
        .map(|(at, len)| (&output[..at], &output[at + len..]))
        .ok_or_else(|| "git http-backend wrote no CGI header block".to_string())?;
    let mut response = Response::new(Full::new(Bytes::copy_from_slice(body)));
    for line in String::from_utf8_lossy(head).lines() {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("bad CGI header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split_whitespace().next().unwrap_or_default();
            *response.status_mut() = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .ok_or_else(|| format!("bad CGI status {value:?}"))?;
        } else {
            let name = header::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|e| format!("bad CGI header name {name:?}: {e}"))?;
            let value = header::HeaderValue::from_str(value)
                .map_err(|e| format!("bad CGI header value for {name}: {e}"))?;
            response.headers_mut().append(name, value);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cgi_output() {
        let r = parse_cgi(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope")
            .expect("parse");
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/plain");
        let r = parse_cgi(b"Content-Type: application/x-git-upload-pack-advertisement\n\n0000")
            .expect("parse");
        assert_eq!(r.status(), StatusCode::OK);
        assert!(parse_cgi(b"no header block").is_err());
    }

    #[test]
    fn reads_the_basic_auth_user() {
        let value = format!("Basic {}", data_encoding::BASE64.encode(b"ci:pass:word"));
        assert_eq!(basic_auth_user(value.as_bytes()).as_deref(), Some("ci"));
        assert_eq!(basic_auth_user(b"Bearer x"), None);
    }
}

//! The control socket: `<run-dir>/control.sock`, mode 0600 in a 0700 directory, root only.
//!
//! Every connection's peer credentials are checked: the peer must be root (or brokerd's own uid),
//! and a peer process that runs inside a tagged cgroup is refused, so an agent cannot detach
//! itself even if it could reach the socket.

use agent_broker_core::fmt::error_chain;
use agent_broker_protocol::Decision;
use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_broker_protocol::{
    self as protocol, ErrorKind, LogFilter, MAX_REQUEST_LINE, Request, Response, SecretInfo,
    StatusReport,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    accept::RecentConnections,
    capture::{CaptureError, CaptureHandle, OriginResolver},
    policy_store::PolicyStore,
    vault::{SecretMeta, Vault, VaultError},
};
use agent_broker_core::{
    cgroup::{CgroupError, CgroupPath, CgroupRoot},
    secret::{SecretName, SecretValue},
};

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("cannot create run directory {path}")]
    RunDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another brokerd is already serving {0}; stop it or use another --run-dir")]
    InUse(PathBuf),
    #[error("cannot bind control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the control server needs from the rest of brokerd.
pub struct ControlState {
    pub capture: CaptureHandle,
    pub resolver: Arc<OriginResolver>,
    pub recent: Arc<RecentConnections>,
    pub root: CgroupRoot,
    pub listeners: Vec<std::net::SocketAddr>,
    /// The UDP DNS listeners.
    pub dns_listeners: Vec<std::net::SocketAddr>,
    /// The optional BPF LSM layer's state, as `brokerctl status` shows it.
    pub lsm: String,
    /// brokerd's own hardening (see [`crate::harden`]).
    pub hardening: String,
    pub pin_dir: PathBuf,
    pub vault: Arc<Vault>,
    /// The broker CA certificate (public).
    pub ca_pem: String,
    pub policy: Arc<PolicyStore>,
    pub audit: Arc<dyn crate::audit_access::AuditAccess>,
    /// Where attach, detach and policy reloads are recorded.
    pub events: Arc<dyn crate::proxy::EventSink>,
}

/// An operator action, as an audit event.
fn operator_event(
    kind: agent_broker_protocol::EventKind,
    cgroup: Option<String>,
    outcome: Result<(), String>,
) -> agent_broker_protocol::AuditEvent {
    let (decision, reason) = match outcome {
        Ok(()) => (Decision::Allow, None),
        Err(reason) => (Decision::Deny, Some(reason)),
    };
    agent_broker_protocol::AuditEvent {
        time_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        kind: Some(kind),
        cgroup,
        decision: Some(decision),
        reason,
        side: Some(agent_broker_protocol::Side::Broker),
        ..Default::default()
    }
}

/// Binds the control socket, refusing to steal it from a running brokerd.
pub fn bind(run_dir: &Path) -> Result<(UnixListener, PathBuf), ControlError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .and_then(|()| fs::set_permissions(run_dir, fs::Permissions::from_mode(0o700)))
        .map_err(|source| ControlError::RunDir {
            path: run_dir.into(),
            source,
        })?;
    let path = run_dir.join(protocol::SOCKET_NAME);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(ControlError::InUse(path));
        }
        // A stale socket of a brokerd that died.
        let _ = fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| ControlError::Bind {
        path: path.clone(),
        source,
    })?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    Ok((listener, path))
}

/// Serves control connections until `cancel` fires.
pub async fn serve(listener: UnixListener, state: Arc<ControlState>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let state = state.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, &state).await {
                        warn!(error = %e, "control connection failed");
                    }
                });
            }
            Err(e) => {
                warn!(error = %e, "control accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_one(stream: UnixStream, state: &ControlState) -> io::Result<()> {
    let refusal = check_peer(&stream, state);
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(MAX_REQUEST_LINE as u64 + 1);
    let mut line = Vec::new();
    if let Some(response) = refusal {
        // Read the request first, so the client is not writing into a closed socket when the
        // refusal arrives.
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            reader.read_until(b'\n', &mut line),
        )
        .await;
        write.write_all(&encode(&response)).await?;
        return Ok(());
    }
    loop {
        line.clear();
        reader.set_limit(MAX_REQUEST_LINE as u64 + 1);
        if reader.read_until(b'\n', &mut line).await? == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST_LINE {
            let r = error(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_REQUEST_LINE} bytes"),
            );
            write.write_all(&encode(&r)).await?;
            return Ok(());
        } else {
            match protocol::decode_line::<Request>(&line) {
                // Streams: the rest of the connection belongs to them.
                Ok(Request::Logs { filter, follow }) => {
                    return stream_logs(reader, write, state, filter, follow).await;
                }
                Ok(Request::Subscribe) => {
                    return stream_logs(reader, write, state, LogFilter::default(), true).await;
                }
                Ok(request) => handle(request, state).await,
                Err(e) => error(ErrorKind::BadRequest, format!("malformed request: {e}")),
            }
        };
        write.write_all(&encode(&response)).await?;
    }
}

/// Sends stored records matching `filter` (none for a bare subscription, which passes a
/// default filter with `follow`), then `EndOfLog`, then, with `follow`, live events until the
/// client goes away. A subscriber that falls behind skips events rather than slowing brokerd.
async fn stream_logs(
    mut reader: tokio::io::Take<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    state: &ControlState,
    filter: LogFilter,
    follow: bool,
) -> io::Result<()> {
    // Subscribe before reading history so nothing committed in between is missed; events
    // already sent as history are skipped by sequence number.
    let mut live = follow.then(|| state.audit.subscribe());
    let audit = state.audit.clone();
    let query = filter.clone();
    let history = tokio::task::spawn_blocking(move || audit.query(&query)).await;
    let mut last_seq = 0;
    match history {
        Ok(Ok(events)) => {
            for event in events {
                last_seq = last_seq.max(event.seq);
                write.write_all(&encode(&Response::Event { event })).await?;
            }
        }
        Ok(Err(message)) => {
            write
                .write_all(&encode(&error(ErrorKind::Internal, message)))
                .await?;
            return Ok(());
        }
        Err(e) => {
            let r = error(ErrorKind::Internal, format!("audit query failed: {e}"));
            write.write_all(&encode(&r)).await?;
            return Ok(());
        }
    }
    write.write_all(&encode(&Response::EndOfLog)).await?;
    let Some(live) = live.as_mut() else {
        return Ok(());
    };
    let mut scratch = Vec::new();
    loop {
        tokio::select! {
            // The client closing its end (or sending anything) ends the stream.
            r = reader.read_until(b'\n', &mut scratch) => {
                if r.unwrap_or(0) == 0 {
                    return Ok(());
                }
                scratch.clear();
            }
            event = live.recv() => match event {
                Ok(event) => {
                    if event.seq != 0 && event.seq <= last_seq {
                        continue;
                    }
                    if crate::audit_access::matches(&filter, &event) {
                        write.write_all(&encode(&Response::Event { event })).await?;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "a log follower fell behind; events skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
            },
        }
    }
}

/// Refuses peers that are not root, and peers inside a tagged cgroup.
fn check_peer(stream: &UnixStream, state: &ControlState) -> Option<Response> {
    let cred = match stream.peer_cred() {
        Ok(c) => c,
        Err(e) => {
            return Some(error(
                ErrorKind::Forbidden,
                format!("cannot read peer credentials: {e}"),
            ));
        }
    };
    let own_uid = nix::unistd::geteuid().as_raw();
    if cred.uid() != 0 && cred.uid() != own_uid {
        return Some(error(
            ErrorKind::Forbidden,
            format!("uid {} may not control brokerd", cred.uid()),
        ));
    }
    let Some(pid) = cred.pid().and_then(|p| u32::try_from(p).ok()) else {
        return Some(error(
            ErrorKind::Forbidden,
            "peer process id unknown".into(),
        ));
    };
    let caller = match state.root.cgroup_of(pid) {
        Ok(Some(cg)) => cg,
        // Outside what our cgroup2 mount shows: not below any tag either.
        Ok(None) => return None,
        Err(e) => {
            return Some(error(
                ErrorKind::Forbidden,
                format!("cannot check caller's cgroup: {e}"),
            ));
        }
    };
    let tags = state.resolver.tags();
    if let Some(tag) = tags.iter().find(|t| t.path.is_ancestor_or_self_of(&caller)) {
        warn!(pid, cgroup = %caller, tagged = %tag.path, "control request from a tagged cgroup refused");
        return Some(error(
            ErrorKind::Forbidden,
            format!(
                "caller (pid {pid}) runs in cgroup {caller}, inside tagged cgroup {}; agents may not control brokerd",
                tag.path
            ),
        ));
    }
    None
}

async fn handle(request: Request, state: &ControlState) -> Response {
    match request {
        Request::Status => match state.capture.status().await {
            Ok((cgroups, counters)) => Response::Status(StatusReport {
                unprotected: cgroups
                    .iter()
                    .flat_map(|c| {
                        let dir = state.root.mount().join(&c.path);
                        crate::protections::unprotected_in(&dir, &c.path, 64)
                    })
                    .take(64)
                    .collect(),
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                listeners: state.listeners.clone(),
                cgroup_root: state.root.mount().display().to_string(),
                pin_dir: state.pin_dir.display().to_string(),
                cgroups,
                counters,
                policy: policy_status(&state.policy),
                dns_listeners: state.dns_listeners.clone(),
                hooks: crate::capture::hook_names(),
                lsm: state.lsm.clone(),
                hardening: state.hardening.clone(),
            }),
            Err(e) => capture_error(e),
        },
        Request::Attach { cgroup, create } => {
            let cgroup = match CgroupPath::parse(&cgroup) {
                Ok(c) => c,
                Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
            };
            let name = cgroup.to_string();
            match state.capture.attach(cgroup, create).await {
                Ok((cgroup, already)) => {
                    if !already {
                        let kind = agent_broker_protocol::EventKind::Attach;
                        state
                            .events
                            .record(operator_event(kind, Some(name), Ok(())));
                    }
                    Response::Attached { cgroup, already }
                }
                Err(e) => capture_error(e),
            }
        }
        Request::Detach { cgroup } => {
            let cgroup = match CgroupPath::parse(&cgroup) {
                Ok(c) => c,
                Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
            };
            match state.capture.detach(cgroup.clone()).await {
                Ok(()) => {
                    let kind = agent_broker_protocol::EventKind::Detach;
                    state
                        .events
                        .record(operator_event(kind, Some(cgroup.to_string()), Ok(())));
                    Response::Detached {
                        cgroup: cgroup.to_string(),
                    }
                }
                Err(e) => capture_error(e),
            }
        }
        Request::Connections { limit } => Response::Connections {
            connections: state.recent.latest(limit),
        },
        Request::SecretSet {
            name,
            value,
            rotate,
        } => {
            let name = match SecretName::new(name) {
                Ok(n) => n,
                Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
            };
            let value = match SecretValue::from_string(value.expose().to_string()) {
                Ok(v) => v,
                Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
            };
            let vault = state.vault.clone();
            let stored = blocking(move || {
                if rotate {
                    vault.rotate(&name, value)
                } else {
                    vault.set(&name, value)
                }
            })
            .await;
            match stored {
                Ok(meta) => {
                    info!(secret = %meta.name.as_str(), version = meta.version, "secret stored");
                    Response::SecretStored {
                        secret: secret_info(meta),
                    }
                }
                Err(response) => response,
            }
        }
        Request::SecretList => {
            let vault = state.vault.clone();
            match blocking(move || vault.list()).await {
                Ok(list) => Response::Secrets {
                    secrets: list.into_iter().map(secret_info).collect(),
                },
                Err(response) => response,
            }
        }
        Request::SecretRemove { name } => {
            let name = match SecretName::new(name) {
                Ok(n) => n,
                Err(e) => return error(ErrorKind::BadRequest, e.to_string()),
            };
            let vault = state.vault.clone();
            let shown = name.as_str().to_string();
            match blocking(move || vault.remove(&name)).await {
                Ok(true) => {
                    info!(secret = %shown, "secret removed");
                    Response::SecretRemoved { name: shown }
                }
                Ok(false) => error(ErrorKind::NotFound, format!("no secret named {shown}")),
                Err(response) => response,
            }
        }
        Request::CaCert => Response::CaCert {
            pem: state.ca_pem.clone(),
        },
        Request::HandleMint {
            cgroup,
            secret,
            host,
            ttl_secs,
        } => crate::handle_store::mint(&state.vault, &cgroup, &secret, &host, ttl_secs).await,
        Request::HandleList => crate::handle_store::list(&state.vault).await,
        Request::HandleRevoke { id } => crate::handle_store::revoke(&state.vault, id).await,
        Request::PolicyReload => {
            let store = state.policy.clone();
            match tokio::task::spawn_blocking(move || store.reload()).await {
                Ok(Ok(files)) => Response::PolicyReloaded { files },
                Ok(Err(message)) => error(ErrorKind::BadRequest, message),
                Err(e) => error(ErrorKind::Internal, format!("reload task failed: {e}")),
            }
        }
        Request::LogsVerify => {
            let audit = state.audit.clone();
            match tokio::task::spawn_blocking(move || audit.verify()).await {
                Ok(Ok(report)) => Response::Verified { report },
                Ok(Err(message)) => error(ErrorKind::Internal, message),
                Err(e) => error(ErrorKind::Internal, format!("verify task failed: {e}")),
            }
        }
        // Streams are served by `stream_logs`, before `handle` is reached.
        Request::Logs { .. } | Request::Subscribe => error(
            ErrorKind::BadRequest,
            "streams are served before this point".into(),
        ),
        Request::PolicyShow { cgroup } => crate::explain::show(&state.policy.current(), &cgroup),
        Request::PolicyExplain {
            cgroup,
            method,
            url,
        } => crate::explain::explain(&state.policy.current(), &cgroup, &method, &url),
    }
}

fn policy_status(store: &PolicyStore) -> agent_broker_protocol::PolicyStatus {
    let s = store.state();
    agent_broker_protocol::PolicyStatus {
        dir: store.dir().display().to_string(),
        files: s.files,
        loaded_unix: s
            .loaded
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0),
        error: s.error,
    }
}

/// Runs vault work (redb is synchronous) off the async threads; a failure is the error reply.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VaultError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(vault_error(e)),
        Err(e) => Err(error(
            ErrorKind::Internal,
            format!("vault task failed: {e}"),
        )),
    }
}

fn secret_info(meta: SecretMeta) -> SecretInfo {
    SecretInfo {
        name: meta.name.as_str().to_string(),
        version: meta.version,
        created_unix: meta.created_unix,
        updated_unix: meta.updated_unix,
    }
}

fn vault_error(e: VaultError) -> Response {
    let kind = match &e {
        VaultError::NotFound { .. } => ErrorKind::NotFound,
        _ => ErrorKind::Internal,
    };
    let message = error_chain(&e);
    warn!(error = %message, "vault request failed");
    error(kind, message)
}

fn capture_error(e: CaptureError) -> Response {
    let kind = match &e {
        CaptureError::Forbidden { .. } => ErrorKind::Forbidden,
        CaptureError::NotTagged(_) | CaptureError::Cgroup(CgroupError::Missing(_)) => {
            ErrorKind::NotFound
        }
        CaptureError::Cgroup(CgroupError::InvalidPath { .. }) => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    };
    let message = error_chain(&e);
    info!(error = %message, "control request failed");
    error(kind, message)
}

pub(crate) fn error(kind: ErrorKind, message: String) -> Response {
    Response::Error { kind, message }
}

fn encode(response: &Response) -> Vec<u8> {
    protocol::encode_line(response).unwrap_or_else(|_| {
        b"{\"response\":\"error\",\"kind\":\"internal\",\"message\":\"unencodable response\"}\n"
            .to_vec()
    })
}

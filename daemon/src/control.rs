//! The control socket: `<run-dir>/control.sock`, mode 0600 in a 0700 directory, root only.
//!
//! Every connection's peer credentials are checked: the peer must be root (or brokerd's own uid),
//! and a peer process that runs inside a tagged cgroup is refused, so an agent cannot detach
//! itself even if it could reach the socket. Requests are served by family, one module each:
//! [`cgroups`] (status, attach, detach, connections), [`secrets`], [`handles`], [`policy`] and
//! [`logs`]; [`reply`] holds what they share.

mod approvals;
mod cgroups;
mod handles;
mod logs;
mod outside_sockets;
mod pods;
pub use pods::ControlTagger;
mod policy;
mod protections;
pub use protections::remember_host_namespaces;
mod reply;
mod secrets;

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};
use agent_broker_protocol::{
    self as protocol, ErrorKind, LogFilter, MAX_REQUEST_LINE, Request, Response,
};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    audit::{AuditAccess, EventSink},
    capture::{CaptureHandle, OriginResolver},
    policy_store::PolicyStore,
    proxy::accept::RecentConnections,
    vault::Vault,
};
use reply::{encode, error};

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
    pub audit: Arc<dyn AuditAccess>,
    /// Where attach, detach and policy reloads are recorded.
    pub events: Arc<dyn EventSink>,
    /// Each agent's shares of brokerd, as counted.
    pub shares: Arc<crate::shares::ShareBook>,
    /// Workload network namespaces served (containers).
    pub workloads: Arc<crate::workloads::Workloads>,
    /// Unprivileged sandboxes (`brokerctl run --unprivileged`).
    pub sandboxes: Arc<crate::sandbox::Sandboxes>,
    /// brokerd runs `--unprivileged`: control clients must be in its own user namespace too.
    pub unprivileged: bool,
    /// Credentials that are not static values (OAuth, exec, file).
    pub credentials: Arc<crate::credentials::Credentials>,
    /// Requests waiting for an operator's approval.
    pub approvals: Arc<crate::approvals::Approvals>,
    /// brokerd's metrics, for `brokerctl metrics`.
    pub metrics: Arc<crate::metrics::Exporter>,
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
    let uid = stream.peer_cred().map_or(u32::MAX, |c| c.uid());
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
                    return logs::stream_logs(reader, write, state, filter, follow).await;
                }
                Ok(Request::Subscribe) => {
                    return logs::stream_logs(reader, write, state, LogFilter::default(), true)
                        .await;
                }
                Ok(request) => dispatch(request, state, uid).await,
                Err(e) => error(ErrorKind::BadRequest, format!("malformed request: {e}")),
            }
        };
        write.write_all(&encode(&response)).await?;
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
    // Unprivileged, brokerd's agents run as its own uid: a sandbox's process (in a nested user
    // namespace) that reached this socket despite the mount namespace masking it is refused.
    // (A sandbox's processes are brokerd's uid, never root: brokerctl runs root's sandboxes as
    // 65534, whom the check above refuses.)
    if state.unprivileged
        && cred.uid() == own_uid
        && !agent_broker_protocol::peer::same_namespaces(pid)
    {
        return Some(error(
            ErrorKind::Forbidden,
            format!("process {pid} runs in another user namespace than brokerd (a sandbox's?)"),
        ));
    }
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

/// Routes one request to its family; `uid` is the caller's (for the records of decisions).
async fn dispatch(request: Request, state: &ControlState, uid: u32) -> Response {
    match request {
        Request::ApprovalList => approvals::list(state),
        Request::ApprovalDecide { id, decision, via } => {
            approvals::decide(state, id, decision, via, uid).await
        }
        Request::Status => cgroups::status(state).await,
        Request::Attach {
            cgroup,
            create,
            name,
        } => cgroups::attach(state, cgroup, create, name).await,
        Request::AttachPid { pid, name, within } => {
            let within = match within.as_deref().map(CgroupPath::parse).transpose() {
                Ok(w) => w,
                Err(e) => return error(ErrorKind::BadRequest, format!("within: {e}")),
            };
            cgroups::attach_pid_within(state, pid, name, within.as_ref()).await
        }
        Request::AttachOci { pid, pod } => pods::attach_oci(state, pid, pod).await,
        Request::Detach { cgroup } => cgroups::detach(state, cgroup).await,
        Request::Connections { limit } => Response::Connections {
            connections: state.recent.latest(limit),
        },
        Request::SecretSet {
            name,
            value,
            rotate,
            spec,
        } => secrets::set(state, name, value, rotate, spec).await,
        Request::SecretList => secrets::list(state).await,
        Request::SecretRemove { name } => secrets::remove(state, name).await,
        Request::SecretPlaceholder { name } => secrets::placeholder(state, name).await,
        Request::CaCert => Response::CaCert {
            pem: state.ca_pem.clone(),
        },
        Request::HandleMint {
            cgroup,
            secret,
            host,
            ttl_secs,
            shaped,
        } => {
            let cgroup = cgroups::agent_of(state, cgroup);
            let request = handles::MintRequest {
                cgroup: &cgroup,
                secret: &secret,
                host: &host,
                ttl_secs,
                shaped,
            };
            handles::mint(&state.vault, request).await
        }
        Request::HandleList => handles::list(&state.vault).await,
        Request::HandleRevoke { id } => handles::revoke(&state.vault, id).await,
        Request::PolicyReload => policy::reload(state).await,
        Request::PolicyShow { cgroup } => {
            let cgroup = cgroups::agent_of(state, cgroup);
            policy::show(&state.policy.current(), &cgroup)
        }
        Request::PolicyExplain {
            cgroup,
            method,
            url,
        } => {
            let cgroup = cgroups::agent_of(state, cgroup);
            policy::explain(&state.policy.current(), &cgroup, &method, &url)
        }
        Request::LogsVerify => logs::verify(state).await,
        Request::Metrics => Response::Metrics {
            text: state.metrics.render().await,
        },
        // Streams are served by `logs::stream_logs`, before dispatch.
        Request::Logs { .. } | Request::Subscribe => error(
            ErrorKind::BadRequest,
            "streams are served before this point".into(),
        ),
    }
}

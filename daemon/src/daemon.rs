//! brokerd's top level: validate config, load the kernel path, bind, serve, shut down.

use std::{
    net::{SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::info;

use crate::{
    agent_api::AgentApi,
    audit::AuditLog,
    broker::{NameProof, PolicyAuthorizer},
    capture::{self, CaptureConfig},
    config::{Config, PodSourceConfig},
    control::{self, ControlState},
    credentials::{Credentials, oauth::UpstreamTokenClient},
    dns::{self, AnsweredNames, DnsServer, Resolver},
    pods,
    policy_store::PolicyStore,
    proxy::{
        Deadlines, Proxy,
        accept::{self, RecentConnections},
        spin,
        tls::{BrokerCa, LeafMinter},
        upstream::Upstream,
    },
    shares::{self, RefusalAudit, ShareBook},
    vault::{KeySource, Vault},
    workloads::{Workloads, WorkloadsConfig},
};
use agent_broker_core::{cgroup::CgroupRoot, fmt::error_chain, secret::SecretValue};

/// Vault blob names of the broker CA.
const CA_KEY_BLOB: &str = "broker-ca-key";
const CA_CERT_BLOB: &str = "broker-ca-cert";
/// The CA certificate, also written here for operators (public).
const CA_CERT_FILE: &str = "ca.pem";

/// Runs brokerd until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    if !config.unprivileged && !nix::unistd::geteuid().is_root() {
        bail!(
            "brokerd must run as root: it loads eBPF programs and manages cgroups (or start it \
             with --unprivileged, and its agents with `brokerctl run --unprivileged`)"
        );
    }
    crate::control::remember_host_namespaces();
    crate::metrics::runtime::register(tokio::runtime::Handle::current());
    let hardening = crate::harden::harden();
    if hardening.failures.is_empty() {
        info!(%hardening, "brokerd hardened");
    } else {
        tracing::warn!(%hardening, "brokerd hardening incomplete");
    }
    let root = match CgroupRoot::discover() {
        Ok(root) => root,
        // The unprivileged mode tags no cgroup: a host without cgroup2 only loses the check
        // that control clients are not inside a tagged one (there are none).
        Err(e) if config.unprivileged => {
            tracing::warn!(error = %e, "no cgroup2 hierarchy; serving sandboxes only");
            CgroupRoot::at("/sys/fs/cgroup")
        }
        Err(e) => return Err(e.into()),
    };
    info!(mount = %root.mount().display(), "cgroup2 hierarchy");

    // Everything that can be refused for bad input (key, vault, policy, CA files) is checked
    // before anything binds or touches the kernel.
    let key = if config.master_key_credential {
        KeySource::SystemdCredential { dir: None }
    } else {
        KeySource::default_file(&config.state_dir)
    };
    let vault = Arc::new(Vault::open(&config.state_dir, key)?);
    let policy = PolicyStore::open(&config.policy_dir)?;
    info!(dir = %config.policy_dir.display(), files = policy.current().files().len(), "policy loaded");
    let ca = load_or_create_ca(&vault, &config.state_dir)?;
    let minter = LeafMinter::new(ca)?;
    let upstream = Upstream::new(&config.upstream_ca)?;
    let (audit, audit_writer) =
        AuditLog::open(&config.state_dir, config.audit_retention)?.writer()?;
    audit.refuse_when_failing(config.audit_refuse_unwritable);
    let event_log = Arc::new(audit.clone());
    // Every recorder reports through the metered sink: the metrics count what the log records.
    let metrics = crate::metrics::global().clone();
    let events: Arc<dyn crate::audit::EventSink> = Arc::new(crate::metrics::MeteredSink::new(
        event_log.clone(),
        metrics.clone(),
    ));
    let nofile = shares::raise_fd_limit();
    let max_open = shares::max_connections(nofile);
    info!(
        nofile,
        max_connections = max_open,
        "file descriptor limit; brokerd serves at most this many connections at once"
    );
    let refusals = Arc::new(RefusalAudit::new(events.clone()));
    let share_book = Arc::new(ShareBook::new(policy.subscribe(), refusals, max_open));
    let answered = Arc::new(AnsweredNames::default());
    let dns_upstreams = if config.dns_upstream.is_empty() {
        match dns::upstreams_from_resolv_conf(std::path::Path::new("/etc/resolv.conf")) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!(error = %e, "agents' allowed DNS names will get SERVFAIL");
                Vec::new()
            }
        }
    } else {
        config.dns_upstream.clone()
    };
    // brokerd's own lookups (proving name-matched destinations) use the same resolvers.
    let resolver = Arc::new(Resolver::new(dns_upstreams.clone(), "/etc/hosts".into()));
    // Credentials that are not static: their token requests go out through a connector of
    // their own, with the same trust roots, to the addresses the same resolver gives.
    let credentials = Arc::new(Credentials::new(
        vault.clone(),
        Arc::new(UpstreamTokenClient::new(
            Upstream::new(&config.upstream_ca)?,
            resolver.clone(),
        )),
        events.clone(),
    ));
    {
        let credentials = credentials.clone();
        tokio::task::spawn_blocking(move || credentials.reload())
            .await
            .context("loading the credentials")?;
    }
    let approvals =
        crate::approvals::Approvals::new(config.approvals.clone(), policy.clone(), events.clone());
    let approval_callback = match config.approvals.callback {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the approval callback address {addr}"))?,
        ),
        None => None,
    };
    let names = Arc::new(NameProof::new(answered.clone(), resolver));
    info!(upstreams = ?dns_upstreams, "DNS for agents: allowed names are forwarded there");
    let dns = Arc::new(DnsServer::new(
        dns_upstreams,
        policy.subscribe(),
        events.clone(),
        answered.clone(),
        share_book.clone(),
    ));

    // Bind first: the kernel side needs the final port, and a bind failure must not leave
    // programs redirecting to a port we do not own.
    let listeners = bind_listeners(&config.listen).await?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let (listen_v4, listen_v6) = split_families(&addrs)?;
    let dns_sockets = bind_dns(&addrs, config.dns_port).await?;
    let dns_port = dns_sockets
        .first()
        .map(|s| s.local_addr().map(|a| a.port()))
        .transpose()?
        .unwrap_or(0);

    // Take the control socket before touching the kernel, so a second brokerd on the same run
    // dir fails without disturbing the first one's programs.
    let (control_listener, control_path) = control::bind(&config.run_dir)?;
    let metrics_listener = match config.metrics_addr {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };

    let capture = if config.unprivileged {
        capture::start_unprivileged(root.clone()).context("starting the unprivileged mode")?
    } else {
        capture::start(CaptureConfig {
            root: root.clone(),
            pin_dir: config.pin_dir.clone(),
            listen_v4,
            listen_v6,
            dns_port,
            require_lsm: config.require_lsm,
        })
        .context("starting the kernel capture path")?
    };
    let (sandbox_listener, sandbox_path) = crate::sandbox::bind(&config.run_dir)?;
    let authorizer = PolicyAuthorizer::new(policy.subscribe(), vault.clone())
        .with_answered_names(answered)
        .with_credentials(credentials.clone())
        .with_approvals(approvals.clone());
    // agent-broker.internal: what an agent may do, asked by the agent (issue 16.3); what it
    // asks for is filed with the approvals.
    let agent_api =
        AgentApi::new(policy.subscribe(), authorizer.limiter()).with_access_requests(Arc::new(
            crate::approvals::Filed::new(approvals.clone(), policy.clone()),
        ));
    // Credentials go over plain HTTP only to listeners that are not an agent's, which the
    // capture layer tells (see proxy::upstream).
    let proxy = Arc::new(Proxy {
        minter,
        upstream: upstream.with_listener_check(capture.resolver.clone()),
        authorizer: Arc::new(authorizer),
        events: events.clone(),
        names,
        deadlines: Deadlines {
            response_head: config.upstream_header_timeout,
            request_head: config.agent_header_timeout,
            ..Deadlines::default()
        },
        shares: share_book.clone(),
        local: Some(Arc::new(agent_api)),
    });

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    tracker.spawn(share_book.clone().run(cancel.clone()));
    tracker.spawn(credentials.clone().run(cancel.clone()));
    if let Some(logger) = capture.logger {
        tracker.spawn(capture::drive_logger_until(logger, cancel.clone()));
    }
    let recent = Arc::new(RecentConnections::default());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let (dispatch, receivers) = accept::Dispatch::new(threads);
    let workers = spawn_proxy_workers(
        receivers,
        &Arc::new(accept::Shared {
            proxy: proxy.clone(),
            resolver: capture.resolver.clone(),
            recent: recent.clone(),
            listeners: Arc::new(addrs.clone()),
            dns: dns.clone(),
        }),
        config.spin,
    )?;
    let dispatch = Arc::new(dispatch);
    let host_netns = Arc::new(capture::netns::NetnsCtx::host(
        capture.netns_map.host_cookie(),
    ));
    for listener in listeners {
        tracker.spawn(accept::serve(
            listener,
            dispatch.clone(),
            host_netns.clone(),
            cancel.clone(),
        ));
    }
    // Workload namespaces' listeners are served by accept loops that share the dispatcher.
    let workloads = Workloads::new(WorkloadsConfig {
        netns_map: capture.netns_map.clone(),
        resolver: capture.resolver.clone(),
        dispatch: Arc::downgrade(&dispatch),
        dns: dns.clone(),
        events: events.clone(),
        root: root.clone(),
        listen: addrs.clone(),
        dns_port,
        state_dir: config.state_dir.clone(),
        cancel: cancel.clone(),
    });
    workloads.restore(capture.resolver.tags()).await;
    // Unprivileged sandboxes' listeners too (`brokerctl run --unprivileged`).
    let sandboxes = crate::sandbox::Sandboxes::new(
        Arc::downgrade(&dispatch),
        dns.clone(),
        events.clone(),
        capture.netns_map.host_cookie(),
        proxy.minter.ca().cert_pem().to_string(),
        sandbox_hidden_dirs(&config),
    );
    tracker.spawn(sandboxes.clone().serve(sandbox_listener, cancel.clone()));
    // The accept loops hold the only strong handles now: when they stop, the proxy threads do
    // too.
    drop(dispatch);
    let dns_listeners: Vec<SocketAddr> = dns_sockets
        .iter()
        .map(|s| s.local_addr())
        .collect::<Result<_, _>>()?;
    let host_cookie = capture.netns_map.host_cookie();
    for socket in dns_sockets {
        let resolver = capture.resolver.clone();
        tracker.spawn(dns.clone().serve_udp(
            socket,
            Arc::new(move |peer| resolver.resolve_dns(host_cookie, peer).ok()),
            cancel.clone(),
        ));
    }
    let exporter = Arc::new(crate::metrics::Exporter {
        metrics: metrics.clone(),
        capture: capture.handle.clone(),
        audit: audit.clone(),
    });
    tracker.spawn(crate::metrics::follow_policy(
        metrics,
        policy.subscribe(),
        cancel.clone(),
    ));
    if let Some(listener) = metrics_listener {
        info!(addr = %listener.local_addr()?, "serving metrics at GET /metrics");
        tracker.spawn(crate::metrics::serve(
            listener,
            exporter.clone() as Arc<dyn crate::metrics::Scrape>,
            cancel.clone(),
        ));
    }
    let state = Arc::new(ControlState {
        capture: capture.handle.clone(),
        resolver: capture.resolver.clone(),
        recent,
        root,
        listeners: addrs.clone(),
        dns_listeners,
        lsm: capture.lsm.clone(),
        hardening: hardening.to_string(),
        pin_dir: config.pin_dir.clone(),
        vault,
        ca_pem: proxy.minter.ca().cert_pem().to_string(),
        policy: policy.clone(),
        audit: event_log.clone(),
        events: events.clone(),
        shares: share_book,
        workloads,
        sandboxes,
        unprivileged: config.unprivileged,
        credentials,
        approvals: approvals.clone(),
        metrics: exporter,
    });
    if let Some(listener) = approval_callback {
        tracker.spawn(crate::approvals::webhook::serve(
            listener,
            approvals,
            cancel.clone(),
        ));
    }
    policy.report_to(events.clone());
    tracker.spawn(policy.watch(cancel.clone()));
    if let Some(source) = &config.pod_source {
        let tagger = control::ControlTagger::new(state.clone());
        match source {
            PodSourceConfig::Podman(socket) => {
                info!(socket = %socket.display(), "pod source: podman");
                tracker.spawn(pods::run(
                    pods::podman::Podman::new(socket),
                    tagger,
                    pods::Memory::new(&config.state_dir, "podman"),
                    cancel.clone(),
                ));
            }
            PodSourceConfig::Kube => {
                let node = std::env::var(pods::kube::NODE_NAME_ENV).ok();
                info!(
                    node = node.as_deref().unwrap_or("(all nodes)"),
                    "pod source: kube"
                );
                let kube = pods::kube::Kube::start(state.root.mount().to_path_buf(), node).await?;
                tracker.spawn(pods::run(
                    kube,
                    tagger,
                    pods::Memory::new(&config.state_dir, "kube"),
                    cancel.clone(),
                ));
            }
        }
    }
    tracker.spawn(control::serve(control_listener, state, cancel.clone()));
    tracker.close();
    info!(
        log = %audit.path().display(),
        "audit log open; a crash loses at most the last group commit (see `brokerctl logs verify`)"
    );
    info!(
        listen = ?addrs,
        control = %control_path.display(),
        sandboxes = %sandbox_path.display(),
        pin_dir = %config.pin_dir.display(),
        unprivileged = config.unprivileged,
        "brokerd ready"
    );

    shutdown_signal().await?;
    info!(
        "shutting down; pinned links stay attached, so tagged cgroups fail closed until brokerd returns"
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    let _ = tokio::task::spawn_blocking(move || {
        for w in workers {
            let _ = w.join();
        }
    })
    .await;
    // Every record accepted so far is committed durably before brokerd exits.
    let flushed = tokio::task::spawn_blocking(move || {
        let last = audit.flush_and_stop();
        let _ = audit_writer.join();
        last
    })
    .await;
    match flushed {
        Ok(Ok(seq)) => info!(last_seq = seq, "audit log flushed"),
        Ok(Err(e)) => tracing::warn!(error = %error_chain(&e), "audit log flush failed"),
        Err(e) => tracing::warn!(error = %e, "audit log flush task failed"),
    }
    let _ = std::fs::remove_file(&control_path);
    let _ = std::fs::remove_file(&sandbox_path);
    Ok(())
}

/// Starts one proxy thread per receiver (one per core), each with a single-threaded runtime
/// serving the connections [`accept::Dispatch`] hands it, beside its spinner ([`crate::proxy::spin`]).
fn spawn_proxy_workers(
    receivers: Vec<tokio::sync::mpsc::UnboundedReceiver<accept::Accepted>>,
    shared: &Arc<accept::Shared>,
    spin_window: std::time::Duration,
) -> anyhow::Result<Vec<std::thread::JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(receivers.len());
    for (i, rx) in receivers.into_iter().enumerate() {
        let shared = shared.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a proxy thread's runtime")?;
        crate::metrics::runtime::register(runtime.handle().clone());
        let handle = std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    tokio::select! {
                        () = accept::run_worker(rx, shared) => {}
                        () = spin::run(spin_window) => {}
                    }
                })
            })
            .context("starting a proxy thread")?;
        handles.push(handle);
    }
    Ok(handles)
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// Binds the UDP DNS listener on every listen address's IP, all on one port (`port`, or a free
/// one picked for the first address when it is 0; retried if another address has it taken).
async fn bind_dns(listen: &[SocketAddr], port: u16) -> anyhow::Result<Vec<tokio::net::UdpSocket>> {
    let attempts = if port == 0 { 20 } else { 1 };
    let mut last_err = None;
    'attempt: for _ in 0..attempts {
        let mut chosen = port;
        let mut out = Vec::with_capacity(listen.len());
        for addr in listen {
            let addr = SocketAddr::new(addr.ip(), chosen);
            match tokio::net::UdpSocket::bind(addr).await {
                Ok(s) => {
                    chosen = s.local_addr()?.port();
                    out.push(s);
                }
                Err(e) => {
                    last_err = Some(anyhow::Error::new(e).context(format!(
                        "binding the DNS listener {addr} (choose another with --dns-port)"
                    )));
                    continue 'attempt;
                }
            }
        }
        return Ok(out);
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no listen addresses for DNS")))
}

/// Binds every listen address. Port 0 picks a free port for the first address, and the others
/// bind that same port (the kernel side redirects to one port); retried if it is taken.
async fn bind_listeners(listen: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let wants_pick = listen.iter().any(|a| a.port() == 0);
    let attempts = if wants_pick { 20 } else { 1 };
    let mut last_err = None;
    for _ in 0..attempts {
        match bind_once(listen).await {
            Ok(l) => return Ok(l),
            Err(e) => last_err = Some(e),
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no listen addresses")))
}

async fn bind_once(listen: &[SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut port = listen
        .iter()
        .map(|a| a.port())
        .find(|p| *p != 0)
        .unwrap_or(0);
    let mut out = Vec::with_capacity(listen.len());
    for addr in listen {
        let mut addr = *addr;
        addr.set_port(port);
        let l = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding listener {addr}"))?;
        port = l.local_addr()?.port();
        out.push(l);
    }
    Ok(out)
}

fn split_families(addrs: &[SocketAddr]) -> anyhow::Result<(SocketAddrV4, Option<SocketAddrV6>)> {
    let v4 = addrs.iter().find_map(|a| match a {
        SocketAddr::V4(a) => Some(*a),
        SocketAddr::V6(_) => None,
    });
    let v6 = addrs.iter().find_map(|a| match a {
        SocketAddr::V6(a) => Some(*a),
        SocketAddr::V4(_) => None,
    });
    Ok((v4.context("an IPv4 listener is required")?, v6))
}

/// The broker CA from the vault, or a new one on first start. Its key never leaves the vault
/// unsealed except in memory; the certificate is also written to `<state_dir>/ca.pem`.
fn load_or_create_ca(vault: &Vault, state_dir: &std::path::Path) -> anyhow::Result<BrokerCa> {
    let key = vault.get_blob(CA_KEY_BLOB)?;
    let cert = vault.get_blob(CA_CERT_BLOB)?;
    let ca = match (key, cert) {
        (Some(key), Some(cert)) => {
            let key =
                std::str::from_utf8(key.expose()).context("the stored broker CA key is not PEM")?;
            let cert = std::str::from_utf8(cert.expose())
                .context("the stored broker CA certificate is not PEM")?;
            BrokerCa::load(cert, key)?
        }
        (None, None) => {
            let (ca, key_pem) = BrokerCa::generate()?;
            vault.put_blob(
                CA_CERT_BLOB,
                &SecretValue::binary(ca.cert_pem().as_bytes().to_vec()),
            )?;
            vault.put_blob(
                CA_KEY_BLOB,
                &SecretValue::binary(key_pem.as_bytes().to_vec()),
            )?;
            info!("created the broker CA (ECDSA P-256); install it with `brokerctl ca install`");
            ca
        }
        _ => bail!(
            "the vault holds only half of the broker CA (key or certificate missing); remove both blobs to start a new CA"
        ),
    };
    write_public_file(&state_dir.join(CA_CERT_FILE), ca.cert_pem().as_bytes())?;
    Ok(ca)
}

/// Writes a public file (the CA certificate) unless it already holds `bytes`.
fn write_public_file(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    if std::fs::read(path).is_ok_and(|b| b == bytes) {
        return Ok(());
    }
    agent_broker_core::fs::write_file_atomically(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// brokerd's directories a sandbox hides from its agent (issue 19): the agent runs as brokerd's
/// uid, so without this it could read the master key and the vault in the state directory, and
/// the policies. Absolute and canonical where they exist.
fn sandbox_hidden_dirs(config: &Config) -> Vec<std::path::PathBuf> {
    let mut dirs = vec![config.state_dir.clone(), config.policy_dir.clone()];
    if config.master_key_credential
        && let Some(creds) = std::env::var_os("CREDENTIALS_DIRECTORY")
    {
        dirs.push(creds.into());
    }
    dirs.into_iter()
        .map(|d| std::fs::canonicalize(&d).unwrap_or(d))
        .filter(|d| d.is_absolute())
        .collect()
}

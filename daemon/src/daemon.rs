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
    capture::{self, CaptureConfig},
    cgroup::CgroupRoot,
    config::Config,
    control::{self, ControlState},
    relay::{self, RecentConnections},
};

/// Runs brokerd until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("brokerd must run as root: it loads eBPF programs and manages cgroups");
    }
    let root = CgroupRoot::discover()?;
    info!(mount = %root.mount().display(), "cgroup2 hierarchy");

    // Bind first: the kernel side needs the final port, and a bind failure must not leave
    // programs redirecting to a port we do not own.
    let listeners = bind_listeners(&config.listen).await?;
    let addrs: Vec<SocketAddr> = listeners
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<_, _>>()?;
    let (listen_v4, listen_v6) = split_families(&addrs)?;

    // Take the control socket before touching the kernel, so a second brokerd on the same run
    // dir fails without disturbing the first one's programs.
    let (control_listener, control_path) = control::bind(&config.run_dir)?;

    let capture = capture::start(CaptureConfig {
        root: root.clone(),
        pin_dir: config.pin_dir.clone(),
        listen_v4,
        listen_v6,
    })
    .context("starting the kernel capture path")?;

    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some(logger) = capture.logger {
        tracker.spawn(capture::drive_logger_until(logger, cancel.clone()));
    }
    let recent = Arc::new(RecentConnections::default());
    let shared_addrs = Arc::new(addrs.clone());
    for listener in listeners {
        tracker.spawn(relay::serve(
            listener,
            capture.resolver.clone(),
            recent.clone(),
            shared_addrs.clone(),
            cancel.clone(),
        ));
    }
    let state = Arc::new(ControlState {
        capture: capture.handle.clone(),
        resolver: capture.resolver.clone(),
        recent,
        root,
        listeners: addrs.clone(),
        pin_dir: config.pin_dir.clone(),
    });
    tracker.spawn(control::serve(control_listener, state, cancel.clone()));
    tracker.close();
    info!(
        listen = ?addrs,
        control = %control_path.display(),
        pin_dir = %config.pin_dir.display(),
        "brokerd ready"
    );

    shutdown_signal().await?;
    info!(
        "shutting down; pinned links stay attached, so tagged cgroups fail closed until brokerd returns"
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    let _ = std::fs::remove_file(&control_path);
    Ok(())
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

//! Workloads with a network namespace of their own (containers): brokerd's listeners opened
//! inside it ([`crate::capture::netns`]), served like its own, released when the workload goes,
//! and re-opened when brokerd starts again (issue 14; `docs/design/netns.md` decisions 4-8).
//!
//! Order, each way (fail closed):
//! - open: sockets in the namespace, then serving them (accept and DNS tasks), then the
//!   namespace's `NETNS_LISTENERS` entry, then the state record. Until the entry exists, the
//!   programs refuse the namespace's connects (EPERM).
//! - release (the workload's cgroup is unpopulated or removed, or its tag is detached): the
//!   entry first (connects are refused from then on), then the serving tasks and sockets, then
//!   the namespace's redirect and DNS records, then the state record; audited.
//!
//! The state records (`<state-dir>/workloads.json`, written atomically) survive brokerd:
//! while it is down, a served namespace's entry stays pinned and redirects to a port nobody
//! listens on there (ECONNREFUSED, never direct). At start brokerd re-opens the listeners of
//! each recorded namespace that still has a live member process in the recorded cgroup, and
//! deletes the entries no record claims.
//!
//! A cgroup whose processes all exit is released; one that gets processes again (a restarted
//! container, with a new namespace) is refused until it is attached again (no entry for the
//! new namespace: EPERM).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use agent_broker_core::{
    cgroup::{CgroupId, CgroupPath, CgroupRoot},
    time::now_unix_ms,
};
use agent_broker_protocol::{AuditEvent, Decision, EventKind, Side, WorkloadStatus};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    audit::EventSink,
    capture::{
        NetnsMap, OriginResolver, TagSet,
        netns::{self, NetnsCtx, Opened},
    },
    dns::DnsServer,
    proxy::accept::{self, Dispatch},
};

/// The state file's name in the state dir.
const STATE_FILE: &str = "workloads.json";
/// How often a workload's cgroup is checked even without an inotify event.
const RECHECK: Duration = Duration::from_secs(2);

/// One served workload, as recorded in the state dir.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRecord {
    pub netns_cookie: u64,
    /// The cgroup of the process attached (relative to the cgroup2 mount), and its id.
    pub cgroup: String,
    pub cgroup_id: u64,
    /// The tagged cgroup covering it, and its id.
    pub tag: String,
    pub tag_id: u64,
    /// The process the namespace was entered through.
    pub pid: u32,
    pub opened_ms: u64,
}

/// The state file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    workloads: Vec<WorkloadRecord>,
}

struct Served {
    record: WorkloadRecord,
    /// Whom its audit records name, resolved when it was served: the release may come after
    /// its tag (and so the tag's `--as` name) is gone.
    agent: AgentOf,
    ctx: Arc<NetnsCtx>,
    status: WorkloadStatus,
    cancel: CancellationToken,
}

/// Whom a workload's audit records name: the agent its tag runs under (`attach --as`,
/// rebased to the workload's cgroup), and the real cgroup path when that differs, as in the
/// records of its connections.
#[derive(Clone, Debug)]
struct AgentOf {
    agent: String,
    cgroup_path: Option<String>,
}

/// The served workload namespaces.
pub struct Workloads {
    netns_map: Arc<NetnsMap>,
    resolver: Arc<OriginResolver>,
    dispatch: Weak<Dispatch>,
    dns: Arc<DnsServer>,
    events: Arc<dyn EventSink>,
    root: CgroupRoot,
    /// brokerd's own listen addresses (their ports are mirrored in each namespace).
    listen: Vec<SocketAddr>,
    dns_port: u16,
    state_file: PathBuf,
    cancel: CancellationToken,
    served: Mutex<BTreeMap<u64, Served>>,
}

/// What [`Workloads::new`] needs.
pub struct WorkloadsConfig {
    pub netns_map: Arc<NetnsMap>,
    pub resolver: Arc<OriginResolver>,
    pub dispatch: Weak<Dispatch>,
    pub dns: Arc<DnsServer>,
    pub events: Arc<dyn EventSink>,
    pub root: CgroupRoot,
    pub listen: Vec<SocketAddr>,
    pub dns_port: u16,
    pub state_dir: PathBuf,
    pub cancel: CancellationToken,
}

impl Workloads {
    pub fn new(c: WorkloadsConfig) -> Arc<Self> {
        Arc::new(Self {
            netns_map: c.netns_map,
            resolver: c.resolver,
            dispatch: c.dispatch,
            dns: c.dns,
            events: c.events,
            root: c.root,
            listen: c.listen,
            dns_port: c.dns_port,
            state_file: c.state_dir.join(STATE_FILE),
            cancel: c.cancel,
            served: Mutex::new(BTreeMap::new()),
        })
    }

    /// The served workloads, for `status`.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        self.served
            .lock()
            .map(|s| s.values().map(|w| w.status.clone()).collect())
            .unwrap_or_default()
    }

    /// Opens and serves listeners in the network namespace of the process `pidfd` refers to
    /// (`pid`, in `cgroup`, covered by the tagged cgroup `tag`). `Ok(None)`: it is brokerd's
    /// own namespace. A namespace served already is answered with its state.
    pub async fn open(
        self: &Arc<Self>,
        pidfd: OwnedFd,
        pid: u32,
        cgroup: CgroupPath,
        tag: (CgroupPath, CgroupId),
    ) -> Result<Option<WorkloadStatus>, String> {
        let cgroup_id = self
            .root
            .id(&cgroup)
            .map_err(|e| format!("cgroup {cgroup}: {e}"))?;
        // A namespace served already (the same workload attached again) is answered with its
        // state: its ports are taken there by brokerd's own listeners.
        if let Ok(cookie) = netns::netns_id(Path::new(&format!("/proc/{pid}/ns/net")))
            && netns::pidfd_alive(&pidfd)
            && let Some(w) = self
                .served
                .lock()
                .map_err(|_| "workloads lock poisoned")?
                .get(&cookie)
        {
            return Ok(Some(w.status.clone()));
        }
        let opened = self.open_sockets(pidfd).await?;
        let Some(opened) = opened else {
            return Ok(None);
        };
        if let Some(w) = self
            .served
            .lock()
            .map_err(|_| "workloads lock poisoned")?
            .get(&opened.cookie)
        {
            return Ok(Some(w.status.clone()));
        }
        let record = WorkloadRecord {
            netns_cookie: opened.cookie,
            cgroup: cgroup.to_string(),
            cgroup_id: cgroup_id.0,
            tag: tag.0.to_string(),
            tag_id: tag.1.0,
            pid,
            opened_ms: now_unix_ms(),
        };
        let status = self.serve(opened, record)?;
        self.persist();
        self.record_event(
            EventKind::Attach,
            &self.agent_of(&status.cgroup),
            format!(
                "listeners opened in network namespace {} (process {pid})",
                status.netns_cookie
            ),
        );
        Ok(Some(status))
    }

    /// Opens listeners in every network namespace other than brokerd's that a process of
    /// `cgroup` (or below) is in, one process per namespace (`attach --cgroup` of a cgroup whose
    /// processes already run in a namespace of their own). Each one's outcome, by pid.
    pub async fn open_members(
        self: &Arc<Self>,
        cgroup: &CgroupPath,
        tag: (CgroupPath, CgroupId),
    ) -> Vec<(u32, Result<WorkloadStatus, String>)> {
        let host = self.netns_map.host_cookie();
        let mut seen = std::collections::BTreeSet::new();
        let mut out = Vec::new();
        for pid in netns::member_pids(&self.root, cgroup) {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            let Ok(cookie) = netns::netns_id(&ns) else {
                continue;
            };
            if cookie == host || !seen.insert(cookie) {
                continue;
            }
            let Ok(pidfd) = netns::pidfd_open(pid) else {
                seen.remove(&cookie);
                continue;
            };
            // Its cgroup and namespace read after the pidfd pins it, then checked live.
            let own = self.root.cgroup_of(pid).ok().flatten();
            let same = netns::netns_id(&ns).ok() == Some(cookie) && netns::pidfd_alive(&pidfd);
            let Some(own) = own.filter(|c| same && !c.is_root()) else {
                seen.remove(&cookie);
                continue;
            };
            let opened = self.open(pidfd, pid, own, tag.clone()).await;
            out.push((
                pid,
                opened.and_then(|w| w.ok_or_else(|| "in brokerd's namespace".into())),
            ));
        }
        out
    }

    async fn open_sockets(&self, pidfd: OwnedFd) -> Result<Option<Opened>, String> {
        let host = self.netns_map.host_cookie();
        let (listen, dns_port) = (self.listen.clone(), self.dns_port);
        tokio::task::spawn_blocking(move || netns::open_in(pidfd, host, listen, dns_port))
            .await
            .map_err(|e| format!("the netns task failed: {e}"))?
            .map_err(|e| agent_broker_core::fmt::error_chain(&e))
    }

    /// Serves `opened`'s sockets, then inserts the namespace's entry, then watches the
    /// workload's cgroup. Runs in the runtime (tokio's `from_std`).
    fn serve(
        self: &Arc<Self>,
        opened: Opened,
        record: WorkloadRecord,
    ) -> Result<WorkloadStatus, String> {
        let dispatch = self.dispatch.upgrade().ok_or("brokerd is shutting down")?;
        let dir = CgroupPath::parse(&record.cgroup)
            .map(|c| self.root.dir(&c))
            .map_err(|e| e.to_string())?;
        let has_v6 = opened.has_v6();
        let cookie = opened.cookie;
        let ctx = Arc::new(NetnsCtx::workload(cookie, opened.diag));
        let cancel = self.cancel.child_token();
        let mut listeners = Vec::new();
        let mut tcp = Vec::new();
        for l in opened.tcp {
            listeners.push(l.local_addr().map_err(|e| e.to_string())?);
            tcp.push(tokio::net::TcpListener::from_std(l).map_err(|e| e.to_string())?);
        }
        let mut dns_listeners = Vec::new();
        let mut udp = Vec::new();
        for s in opened.udp {
            dns_listeners.push(s.local_addr().map_err(|e| e.to_string())?);
            udp.push(tokio::net::UdpSocket::from_std(s).map_err(|e| e.to_string())?);
        }
        for l in tcp {
            tokio::spawn(accept::serve(
                l,
                dispatch.clone(),
                ctx.clone(),
                cancel.clone(),
            ));
        }
        for s in udp {
            let resolver = self.resolver.clone();
            tokio::spawn(self.dns.clone().serve_udp(
                s,
                Arc::new(move |peer| resolver.resolve_dns(cookie, peer).ok()),
                cancel.clone(),
            ));
        }
        if let Err(e) = self
            .netns_map
            .insert(cookie, has_v6, CgroupId(record.tag_id))
        {
            cancel.cancel();
            return Err(format!(
                "cannot serve network namespace {cookie}: NETNS_LISTENERS: {e}"
            ));
        }
        let status = WorkloadStatus {
            netns_cookie: cookie,
            cgroup: record.cgroup.clone(),
            tag: record.tag.clone(),
            pid: record.pid,
            listeners,
            dns_listeners,
            state: "serving".into(),
            opened_ms: now_unix_ms(),
        };
        info!(netns = cookie, cgroup = %record.cgroup, pid = record.pid, listeners = ?status.listeners, "serving a workload's network namespace");
        if let Ok(mut served) = self.served.lock() {
            served.insert(
                cookie,
                Served {
                    agent: self.agent_of(&record.cgroup),
                    record,
                    ctx: ctx.clone(),
                    status: status.clone(),
                    cancel: cancel.clone(),
                },
            );
        }
        tokio::spawn(self.clone().watch(cookie, dir, cancel));
        Ok(status)
    }

    /// Releases the namespace `cookie` (see the module docs for the order).
    pub fn release(&self, cookie: u64, why: &str) {
        let Some(served) = self.served.lock().ok().and_then(|mut s| s.remove(&cookie)) else {
            return;
        };
        if let Err(e) = self.netns_map.remove(cookie) {
            warn!(netns = cookie, error = %e, "cannot delete a released namespace's NETNS_LISTENERS entry");
        }
        served.cancel.cancel();
        let records = self.resolver.forget_netns(cookie);
        self.persist();
        info!(netns = cookie, cgroup = %served.record.cgroup, records, why, "released a workload's network namespace");
        self.record_event(
            EventKind::Detach,
            &served.agent,
            format!("listeners in network namespace {cookie} released: {why}"),
        );
    }

    /// Releases every workload whose cgroup is `tag` or below it (the tag was detached).
    pub fn release_under(&self, tag: &CgroupPath, why: &str) {
        let cookies: Vec<u64> = self
            .served
            .lock()
            .map(|s| {
                s.values()
                    .filter(|w| {
                        CgroupPath::parse(&w.record.cgroup)
                            .is_ok_and(|c| tag.is_ancestor_or_self_of(&c))
                    })
                    .map(|w| w.record.netns_cookie)
                    .collect()
            })
            .unwrap_or_default();
        for cookie in cookies {
            self.release(cookie, why);
        }
    }

    /// Releases the workload when its cgroup has no process left or is removed, unless another
    /// process of its tag still runs in the namespace (a pod whose other containers live on):
    /// then the watch moves to that process's cgroup ([`Self::hand_over`]). Watched with
    /// inotify on `cgroup.events`, and checked every [`RECHECK`] in case an event is missed.
    async fn watch(self: Arc<Self>, cookie: u64, mut dir: PathBuf, cancel: CancellationToken) {
        loop {
            let events = dir.join("cgroup.events");
            let inotify = Inotify::watch(&events)
                .map_err(|e| warn!(path = %events.display(), error = %e, "no inotify watch on a workload's cgroup; checking it every 2 s"))
                .ok();
            let why = loop {
                // By id, not only by path: a runtime may re-create a cgroup of the same name
                // (a restarted container) between two checks.
                if !self.same_cgroup(cookie) {
                    break "its cgroup was removed";
                }
                match std::fs::read_to_string(&events) {
                    Err(_) => break "its cgroup was removed",
                    Ok(text) if netns::populated(&text) == Some(false) => {
                        break "no process is left in its cgroup";
                    }
                    Ok(_) => {}
                }
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RECHECK) => {}
                    () = async {
                        match &inotify {
                            Some(i) => i.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            };
            match self.hand_over(cookie) {
                Some(next) => dir = next,
                None => {
                    self.release(cookie, why);
                    return;
                }
            }
        }
    }

    /// Whether the cgroup the workload `cookie` is recorded through still has the recorded id
    /// (true when the workload is no longer served: nothing to watch).
    fn same_cgroup(&self, cookie: u64) -> bool {
        let Some((cgroup, id)) = self.served.lock().ok().and_then(|s| {
            s.get(&cookie)
                .map(|w| (w.record.cgroup.clone(), w.record.cgroup_id))
        }) else {
            return true;
        };
        CgroupPath::parse(&cgroup)
            .ok()
            .and_then(|path| self.root.id(&path).ok())
            .is_some_and(|now| now.0 == id)
    }

    /// When the process a namespace was served through is gone: another live process of the
    /// same tag in the same namespace, which the workload is then recorded (and watched)
    /// through. Returns its cgroup's directory; `None` when there is none.
    fn hand_over(&self, cookie: u64) -> Option<PathBuf> {
        let tag = {
            let served = self.served.lock().ok()?;
            CgroupPath::parse(&served.get(&cookie)?.record.tag).ok()?
        };
        let (pid, _pidfd) = self.member_in(&tag, cookie)?;
        let cgroup = self.root.cgroup_of(pid).ok()??;
        let id = self.root.id(&cgroup).ok()?;
        {
            let mut served = self.served.lock().ok()?;
            let workload = served.get_mut(&cookie)?;
            workload.record.pid = pid;
            workload.record.cgroup = cgroup.to_string();
            workload.record.cgroup_id = id.0;
            workload.status.pid = pid;
            workload.status.cgroup = cgroup.to_string();
        }
        self.persist();
        info!(netns = cookie, pid, cgroup = %cgroup, "the process a workload namespace was served through is gone; another process of its tag still runs there, so it stays served through that one");
        Some(self.root.dir(&cgroup))
    }

    /// At start: re-opens the listeners of every recorded namespace that still has a live
    /// member process in the recorded cgroup (still tagged), deletes the `NETNS_LISTENERS`
    /// entries no record claims (brokerd's own excepted), and prunes each namespace's stale
    /// redirect records.
    pub async fn restore(self: &Arc<Self>, tags: TagSet) {
        let records = match read_state(&self.state_file) {
            Ok(r) => r,
            Err(e) => {
                warn!(file = %self.state_file.display(), error = %e, "cannot read the workload records; no workload namespace is re-opened");
                Vec::new()
            }
        };
        for record in records {
            let cookie = record.netns_cookie;
            match self.reopen(&record, &tags).await {
                Ok(status) => {
                    info!(netns = cookie, cgroup = %record.cgroup, pid = status.pid, "re-opened a workload's network namespace");
                    self.record_event(
                        EventKind::Attach,
                        &self.agent_of(&record.cgroup),
                        format!(
                            "listeners re-opened in network namespace {cookie} at start (process {})",
                            status.pid
                        ),
                    );
                }
                Err(why) => {
                    info!(netns = cookie, cgroup = %record.cgroup, %why, "not re-opening a workload's network namespace");
                    self.record_event(
                        EventKind::Detach,
                        &self.agent_of(&record.cgroup),
                        format!(
                            "listeners in network namespace {cookie} not re-opened at start: {why}"
                        ),
                    );
                }
            }
        }
        let served: Vec<u64> = self
            .served
            .lock()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default();
        let host = self.netns_map.host_cookie();
        for cookie in self.netns_map.cookies() {
            if cookie != host && !served.contains(&cookie) {
                match self.netns_map.remove(cookie) {
                    Ok(()) => {
                        let records = self.resolver.forget_netns(cookie);
                        info!(
                            netns = cookie,
                            records, "deleted a NETNS_LISTENERS entry no workload claims"
                        );
                    }
                    Err(e) => {
                        warn!(netns = cookie, error = %e, "cannot delete a stale NETNS_LISTENERS entry")
                    }
                }
            }
        }
        self.persist();
        self.prune();
    }

    async fn reopen(
        self: &Arc<Self>,
        record: &WorkloadRecord,
        tags: &TagSet,
    ) -> Result<WorkloadStatus, String> {
        let cgroup = CgroupPath::parse(&record.cgroup).map_err(|e| e.to_string())?;
        if self.root.id(&cgroup).ok() != Some(CgroupId(record.cgroup_id)) {
            return Err("its cgroup is gone".into());
        }
        let tagged = tags
            .iter()
            .any(|t| t.id.0 == record.tag_id && t.path.to_string() == record.tag);
        if !tagged {
            return Err(format!("{} is no longer tagged", record.tag));
        }
        let (pid, pidfd) = self
            .member_in(&cgroup, record.netns_cookie)
            .ok_or("no live process of its cgroup is in that network namespace")?;
        let opened = self
            .open_sockets(pidfd)
            .await?
            .ok_or("the process is in brokerd's own network namespace now")?;
        if opened.cookie != record.netns_cookie {
            return Err(format!(
                "process {pid} moved to network namespace {}",
                opened.cookie
            ));
        }
        let mut record = record.clone();
        record.pid = pid;
        let status = self.serve(opened, record)?;
        Ok(status)
    }

    /// A process of `cgroup` (or below) in the network namespace `cookie`, with a pidfd taken
    /// before its namespace was checked a second time (so the pid was not reused in between).
    fn member_in(&self, cgroup: &CgroupPath, cookie: u64) -> Option<(u32, OwnedFd)> {
        netns::member_pids(&self.root, cgroup)
            .into_iter()
            .find_map(|pid| {
                let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
                if netns::netns_id(&ns).ok()? != cookie {
                    return None;
                }
                let pidfd = netns::pidfd_open(pid).ok()?;
                (netns::netns_id(&ns).ok()? == cookie && netns::pidfd_alive(&pidfd))
                    .then_some((pid, pidfd))
            })
    }

    /// Prunes the stale redirect records of every served namespace (after a restart).
    pub fn prune(&self) {
        let contexts: Vec<Arc<NetnsCtx>> = self
            .served
            .lock()
            .map(|s| s.values().map(|w| w.ctx.clone()).collect())
            .unwrap_or_default();
        for ctx in contexts {
            match self.resolver.prune_netns(&ctx) {
                Ok(0) => {}
                Ok(n) => info!(
                    netns = ctx.cookie,
                    records = n,
                    "deleted redirect records whose socket is gone"
                ),
                Err(e) => {
                    warn!(netns = ctx.cookie, error = %e, "cannot check a workload namespace's redirect records for stale ones")
                }
            }
        }
    }

    fn persist(&self) {
        // The snapshot and its write under one lock: releases on several threads at once must
        // neither interleave their writes of the shared temporary file nor let an older
        // snapshot land last.
        let served = self
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = StateFile {
            workloads: served.values().map(|w| w.record.clone()).collect(),
        };
        let written = serde_json::to_vec_pretty(&state)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                agent_broker_core::fs::write_file_atomically(&self.state_file, &bytes)
                    .map_err(|e| e.to_string())
            });
        drop(served);
        if let Err(e) = written {
            warn!(file = %self.state_file.display(), error = %e, "cannot write the workload records; a restarted brokerd will not re-open these namespaces");
        }
    }

    /// The agent the workload in `cgroup` is attributed to now (see [`AgentOf`]).
    fn agent_of(&self, cgroup: &str) -> AgentOf {
        match CgroupPath::parse(cgroup) {
            Ok(path) => {
                let (agent, cgroup_path) = self.resolver.agent_of(path);
                AgentOf {
                    agent: agent.to_string(),
                    cgroup_path: cgroup_path.map(|p| p.to_string()),
                }
            }
            Err(_) => AgentOf {
                agent: cgroup.to_string(),
                cgroup_path: None,
            },
        }
    }

    fn record_event(&self, kind: EventKind, agent: &AgentOf, reason: String) {
        self.events.record(AuditEvent {
            time_ms: now_unix_ms(),
            kind: Some(kind),
            cgroup: Some(agent.agent.clone()),
            cgroup_path: agent.cgroup_path.clone(),
            decision: Some(Decision::Allow),
            side: Some(Side::Broker),
            reason: Some(reason),
            ..AuditEvent::default()
        });
    }
}

fn read_state(path: &Path) -> Result<Vec<WorkloadRecord>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<StateFile>(&bytes)
            .map(|s| s.workloads)
            .map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

/// An inotify watch on one file (`IN_MODIFY`, and its deletion), polled by tokio.
struct Inotify {
    fd: tokio::io::unix::AsyncFd<OwnedFd>,
}

impl Inotify {
    fn watch(path: &Path) -> std::io::Result<Self> {
        // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
        let raw = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        let wd = unsafe {
            libc::inotify_add_watch(
                fd.as_raw_fd(),
                c_path.as_ptr(),
                libc::IN_MODIFY | libc::IN_DELETE_SELF,
            )
        };
        if wd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns the inotify fd for its whole life, so the registered fd
        // stays open and the same until the registration is dropped with it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits for an event and drains what is queued.
    async fn changed(&self) {
        let Ok(mut guard) = self.fd.readable().await else {
            return std::future::pending().await;
        };
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe {
                libc::read(
                    self.fd.get_ref().as_raw_fd(),
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                )
            };
            if n <= 0 {
                break;
            }
        }
        guard.clear_ready();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_round_trips_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(STATE_FILE);
        assert_eq!(read_state(&path), Ok(Vec::new()));
        let record = WorkloadRecord {
            netns_cookie: 4798,
            cgroup: "agents/ct".into(),
            cgroup_id: 77,
            tag: "agents/ct".into(),
            tag_id: 77,
            pid: 4242,
            opened_ms: 1,
        };
        let bytes = serde_json::to_vec(&StateFile {
            workloads: vec![record.clone()],
        })
        .expect("encode");
        std::fs::write(&path, bytes).expect("write");
        assert_eq!(read_state(&path), Ok(vec![record]));
        std::fs::write(&path, br#"{"workloads":[],"extra":1}"#).expect("write");
        assert!(read_state(&path).is_err());
    }
}

//! Everything a bench run starts, on loopback only: the origin API (nginx on 127.0.0.2), the
//! wide-area relay in front of it, the streaming origin of the SSE and bulk rows (also on
//! 127.0.0.2, see [`super::stream_origin`]), brokerd with its policy, key and tagged agent cgroup, the
//! nginx peer and mitmproxy (both on 127.0.0.1). Files live in the run directory (`target/bench/run`),
//! brokerd's pins in their own bpffs directory, brokerd listens on a port of its own choosing, so
//! a brokerd started with the defaults (or by `cargo xtask demo`) is not disturbed.
//! [`Lab::stop`] undoes all of it: it untags the cgroup, stops every process by pid, removes the
//! pins and the cgroup.

use std::{
    fs,
    io::Read as _,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    clients, fleet,
    load::{Endpoint, Launch},
    mitm, nginx, pki,
    process::Services,
    relay::DelayRelay,
    report::Column,
    tools::Tools,
};
use crate::cmd;

/// The tagged agent cgroup the brokerd column's clients run in.
const CGROUP: &str = "agents/bench";
/// brokerd's bpffs pin directory, apart from the default one.
const PIN_DIR: &str = "/sys/fs/bpf/agent-broker-bench";
/// The origin API's address: a loopback address of its own, so a rule can name it.
const ORIGIN_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
/// Where the nginx peer and mitmproxy listen.
const PROXY_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The wide-area relay's delay in each direction.
pub const WIDE_AREA_ONE_WAY: Duration = Duration::from_millis(20);
/// What a client holds wherever a proxy writes the real key.
const PLACEHOLDER: &str = "Bearer placeholder";
/// The name the key has in brokerd's vault.
const SECRET_NAME: &str = "BENCH_KEY";
/// The container agent's cgroup (issue 14): its processes run in [`CONTAINER_NETNS`], a network
/// namespace with only `lo`, as `podman run --network none` makes, tagged with `attach --pid`.
const CONTAINER_CGROUP: &str = "agents/bench-ct";
/// The agent that floods brokerd in the fairness rows, with the default shares (its policy
/// sets none), while the bench agent measures its calls.
pub const FLOOD_CGROUP: &str = "agents/bench-flood";
const CONTAINER_NETNS: &str = "abbench-ct";
/// The user the unprivileged row's brokerd and its agent run as (issue 19).
const UNPRIVILEGED_UID: u32 = 65534;
/// The root end of a veth pair in brokerd's namespace holding [`CONTAINER_ORIGIN_IP`] (the other
/// end is in [`CONTAINER_PEER_NETNS`], with no address): from a container a loopback address is
/// the container's own, so both agents of the container row call the origin through a relay on
/// this address. Nothing leaves the machine. (A dummy interface would do, but this kernel has
/// no dummy driver.)
const CONTAINER_LINK: &str = "abbench0";
const CONTAINER_PEER_LINK: &str = "abbench1";
const CONTAINER_PEER_NETNS: &str = "abbench-peer";
pub const CONTAINER_ORIGIN_IP: Ipv4Addr = Ipv4Addr::new(10, 253, 0, 1);

/// Which way a request reaches the origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Straight over loopback.
    Local,
    /// Through the relay that adds [`WIDE_AREA_ONE_WAY`] each way.
    WideArea,
    /// To the streaming origin ([`super::stream_origin`]) instead of the nginx origin; mitmproxy
    /// has no route there.
    Streaming,
    /// Straight over loopback, through nginx's listener with the fleet row's 1,000-entry map
    /// (see [`fleet`]); brokerd's agents for it are below [`fleet::FLEET_PARENT`], mitmproxy has
    /// none.
    Fleet,
}

/// A peer proxy: its pid (the root of its process tree) and its listener for each route.
struct Peer {
    pid: u32,
    local: SocketAddr,
    wide_area: SocketAddr,
    streaming: Option<SocketAddr>,
    fleet: Option<SocketAddr>,
}

/// The running lab; see the module documentation.
pub struct Lab {
    dir: PathBuf,
    bin: PathBuf,
    services: Services,
    relay: Option<DelayRelay>,
    /// The real key (hex), which only the direct client, brokerd's vault, nginx's config and
    /// mitmproxy's addon see.
    key: String,
    /// The origin's listener for the direct client (h2 and http/1.1).
    origin: SocketAddr,
    /// The origin's http/1.1 listener for the proxies and the relay (see [`nginx`] for why).
    origin_http1: SocketAddr,
    wide_area: Option<SocketAddr>,
    /// The streaming origin's listener, once it listens.
    streaming: Option<SocketAddr>,
    /// The streaming origin's process.
    streaming_pid: Option<u32>,
    brokerd_pid: Option<u32>,
    nginx: Option<Peer>,
    mitmproxy: Result<Peer, String>,
    /// The zero-delay relay on [`CONTAINER_ORIGIN_IP`] to the origin, or why it is missing.
    container_relay: Result<DelayRelay, String>,
    /// Whether the container agent's namespace is tagged and served, or why not.
    container: Result<(), String>,
    /// The unprivileged brokerd of the unprivileged row (issue 19), or why it is missing.
    unprivileged: Result<UnprivilegedBrokerd, String>,
}

/// A second brokerd, `--unprivileged` as [`UNPRIVILEGED_UID`], with the bench policy and key, in
/// a directory of its own that uid can reach (the lab's directory is root's alone).
struct UnprivilegedBrokerd {
    dir: PathBuf,
}

impl UnprivilegedBrokerd {
    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
}

impl Lab {
    /// A lab that will keep its files in `dir` (which must exist, empty and private) and run
    /// brokerd and brokerctl from `bin`.
    pub fn new(dir: &Path, bin: &Path) -> Result<Self> {
        let mut random = [0u8; 16];
        fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
        let [origin, origin_http1] = free_ports(ORIGIN_IP)?;
        let key: String = random.iter().map(|b| format!("{b:02x}")).collect();
        // The direct column's clients get the key itself: never echo it.
        crate::cmd::hide(&key);
        Ok(Self {
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            services: Services::new(dir),
            relay: None,
            key,
            origin: SocketAddr::new(ORIGIN_IP, origin),
            origin_http1: SocketAddr::new(ORIGIN_IP, origin_http1),
            wide_area: None,
            streaming: None,
            streaming_pid: None,
            brokerd_pid: None,
            nginx: None,
            mitmproxy: Err("not started".into()),
            container_relay: Err("not started".into()),
            container: Err("not started".into()),
            unprivileged: Err("not started".into()),
        })
    }

    /// Starts everything, then checks that each path answers 200 and that the origin refuses a
    /// request without the real key. mitmproxy failing to start or answer only marks its column.
    pub fn start(&mut self, tools: &Tools) -> Result<()> {
        clients::write_scripts(&self.dir)?;
        let authorization = format!("Bearer {}", self.key);
        let key_file = self.private_file("bench.key", &self.key)?;
        let authorization_file = self.private_file("authorization", &authorization)?;
        let pki = pki::create(&tools.openssl, &self.dir)?;

        step(&format!(
            "origin API (nginx) on {} and {} (http/1.1 only)",
            self.origin, self.origin_http1
        ));
        let origin = nginx::Common {
            dir: &self.dir,
            name: "origin",
            cert: &pki.origin,
        };
        let config = nginx::origin_config(&origin, self.origin, self.origin_http1, &authorization);
        self.services
            .start("origin", nginx::command(&tools.nginx, &origin, &config)?)?;
        self.services
            .wait_listening("the origin API", self.origin)?;
        self.services
            .wait_listening("the origin API", self.origin_http1)?;

        let relay = DelayRelay::start(ORIGIN_IP, self.origin_http1, WIDE_AREA_ONE_WAY)?;
        let wide_area = relay.addr();
        step(&format!(
            "wide-area relay on {wide_area} ({WIDE_AREA_ONE_WAY:?} each way)"
        ));
        self.relay = Some(relay);
        self.wide_area = Some(wide_area);

        let [port] = free_ports(ORIGIN_IP)?;
        let streaming = SocketAddr::new(ORIGIN_IP, port);
        step(&format!(
            "streaming origin on {streaming} (http/1.1: events, downloads, uploads)"
        ));
        let mut origin = Command::new(self.bin.join("xtask"));
        origin
            .arg("bench-origin")
            .arg("--listen")
            .arg(streaming.to_string())
            .arg("--cert")
            .arg(&pki.origin.cert)
            .arg("--key")
            .arg(&pki.origin.key)
            .arg("--authorization-file")
            .arg(&authorization_file);
        self.streaming_pid = Some(self.services.start("stream-origin", origin)?);
        self.services
            .wait_listening("the streaming origin", streaming)?;
        self.streaming = Some(streaming);

        self.container_relay = self.start_container_relay();
        self.start_brokerd(&pki.ca, &key_file, wide_area, streaming)?;
        self.container = self.start_container_agent();
        if let Err(why) = &self.container {
            eprintln!("bench: container agent unavailable: {why}");
        }
        self.unprivileged =
            self.start_unprivileged_brokerd(&pki.ca, &key_file, wide_area, streaming);
        if let Err(why) = &self.unprivileged {
            eprintln!("bench: unprivileged brokerd unavailable: {why}");
        }
        self.start_nginx_peer(tools, &pki, &authorization, wide_area, streaming)?;
        self.mitmproxy = self.start_mitmproxy(tools, &authorization_file, wide_area);
        if let Err(why) = &self.mitmproxy {
            eprintln!("bench: mitmproxy column unavailable: {why}");
        }
        self.check_paths(tools)
    }

    fn start_brokerd(
        &mut self,
        upstream_ca: &Path,
        key_file: &Path,
        wide_area: SocketAddr,
        streaming: SocketAddr,
    ) -> Result<()> {
        let policies = self.dir.join("policies");
        fs::create_dir_all(&policies)?;
        let container_port = self.container_relay.as_ref().ok().map(|r| r.addr().port());
        fs::write(
            policies.join("bench-flood.toml"),
            flood_policy(FLOOD_CGROUP, self.origin_http1.port()),
        )?;
        fs::write(
            policies.join("bench-fleet.toml"),
            fleet::policy(
                fleet::FLEET_PARENT,
                &ORIGIN_IP.to_string(),
                self.origin_http1.port(),
            ),
        )?;
        for (file, cgroup) in [("bench.toml", CGROUP), ("bench-ct.toml", CONTAINER_CGROUP)] {
            fs::write(
                policies.join(file),
                policy(
                    cgroup,
                    self.origin_http1.port(),
                    wide_area.port(),
                    streaming.port(),
                    container_port,
                ),
            )?;
        }
        step(&format!(
            "brokerd (pins in {PIN_DIR}, log in {})",
            cmd::relative(&self.dir.join("brokerd.log"))
        ));
        let mut brokerd = Command::new(self.bin.join("brokerd"));
        brokerd
            .arg("--state-dir")
            .arg(self.dir.join("brokerd-state"))
            .arg("--run-dir")
            .arg(self.brokerd_run_dir())
            .arg("--policy-dir")
            .arg(&policies)
            .args(["--pin-dir", PIN_DIR])
            .args(["--listen", "127.0.0.1:0", "--listen", "[::1]:0"])
            // nginx's keepalive_timeout (see `nginx`), not brokerd's 30 s: the many-connections
            // row keeps 9,900 connections idle longer than that while it measures.
            .args([
                "--agent-header-timeout",
                &nginx::KEEPALIVE_SECONDS.to_string(),
            ])
            .arg("--upstream-ca")
            .arg(upstream_ca);
        self.brokerd_pid = Some(self.services.start("brokerd", brokerd)?);
        let mut status = self.brokerctl();
        status
            .arg("status")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.services
            .wait_until("brokerd to answer on its control socket", || {
                status.status().is_ok_and(|s| s.success())
            })?;
        let mut set = self.brokerctl();
        set.args(["secret", "set", SECRET_NAME])
            .stdin(fs::File::open(key_file)?)
            .stdout(Stdio::null());
        cmd::run(&mut set).context("storing the bench key in brokerd's vault")
    }

    /// The unprivileged row's brokerd: `brokerd --unprivileged` as [`UNPRIVILEGED_UID`], with
    /// the bench agent's policy (its agent name is [`CGROUP`]) and the key in a vault of its own.
    /// Its resolver is a loopback port nobody answers on: the bench names need no lookup, and
    /// nothing may ask the host's resolver.
    fn start_unprivileged_brokerd(
        &mut self,
        upstream_ca: &Path,
        key_file: &Path,
        wide_area: SocketAddr,
        streaming: SocketAddr,
    ) -> Result<UnprivilegedBrokerd, String> {
        let fail = |e: anyhow::Error| format!("{e:#}");
        let dir = std::env::temp_dir().join(format!(
            "agent-broker-bench-unprivileged-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        let made = (|| -> Result<()> {
            for sub in ["", "state", "run", "policies"] {
                fs::create_dir_all(dir.join(sub))?;
            }
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))?;
            for sub in ["state", "run"] {
                let path = dir.join(sub);
                fs::set_permissions(&path, fs::Permissions::from_mode(0o700))?;
                std::os::unix::fs::chown(&path, Some(UNPRIVILEGED_UID), Some(UNPRIVILEGED_UID))?;
            }
            fs::copy(upstream_ca, dir.join("ca.pem"))?;
            fs::set_permissions(dir.join("ca.pem"), fs::Permissions::from_mode(0o644))?;
            fs::write(
                dir.join("policies/bench.toml"),
                policy(
                    CGROUP,
                    self.origin_http1.port(),
                    wide_area.port(),
                    streaming.port(),
                    None,
                ),
            )?;
            Ok(())
        })();
        made.map_err(fail)?;
        let brokerd = UnprivilegedBrokerd { dir };
        step(&format!(
            "brokerd --unprivileged as uid {UNPRIVILEGED_UID} (files in {})",
            brokerd.dir.display()
        ));
        let id = UNPRIVILEGED_UID.to_string();
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid", &id, "--regid", &id, "--clear-groups", "--"])
            .arg(self.bin.join("brokerd"))
            .arg("--unprivileged")
            .arg("--state-dir")
            .arg(brokerd.dir.join("state"))
            .arg("--run-dir")
            .arg(brokerd.run_dir())
            .arg("--policy-dir")
            .arg(brokerd.dir.join("policies"))
            .args(["--dns-upstream", "127.0.0.1:9"])
            .args([
                "--agent-header-timeout",
                &nginx::KEEPALIVE_SECONDS.to_string(),
            ])
            .arg("--upstream-ca")
            .arg(brokerd.dir.join("ca.pem"));
        self.services
            .start("brokerd-unprivileged", command)
            .map_err(fail)?;
        let brokerctl = |args: &[&str]| {
            let mut c = Command::new(self.bin.join("brokerctl"));
            c.arg("--run-dir").arg(brokerd.run_dir()).args(args);
            c
        };
        let mut status = brokerctl(&["status"]);
        status.stdout(Stdio::null()).stderr(Stdio::null());
        self.services
            .wait_until("the unprivileged brokerd to answer", || {
                status.status().is_ok_and(|s| s.success())
            })
            .map_err(fail)?;
        let mut set = brokerctl(&["secret", "set", SECRET_NAME]);
        set.stdin(fs::File::open(key_file).map_err(|e| e.to_string())?)
            .stdout(Stdio::null());
        cmd::run(&mut set)
            .context("storing the bench key in the unprivileged brokerd's vault")
            .map_err(fail)?;
        Ok(brokerd)
    }

    /// The unprivileged row's agents: the bench agent in its tagged cgroup (root mode), and the
    /// same agent in a sandbox of `brokerctl run --unprivileged` served by the unprivileged
    /// brokerd, both calling the origin directly by address.
    pub fn unprivileged_endpoints(&self) -> Result<[Endpoint; 2]> {
        let brokerd = self
            .unprivileged
            .as_ref()
            .map_err(|why| anyhow::anyhow!("{why}"))?;
        let endpoint = |launch| Endpoint {
            addr: self.origin_http1,
            authorization: PLACEHOLDER.to_owned(),
            launch,
        };
        Ok([
            endpoint(Launch::InAgentCgroup {
                brokerctl: self.bin.join("brokerctl"),
                run_dir: self.brokerd_run_dir(),
                cgroup: CGROUP.to_owned(),
            }),
            endpoint(Launch::Unprivileged {
                uid: UNPRIVILEGED_UID,
                brokerctl: self.bin.join("brokerctl"),
                run_dir: brokerd.run_dir(),
                name: CGROUP.to_owned(),
            }),
        ])
    }

    fn start_nginx_peer(
        &mut self,
        tools: &Tools,
        pki: &pki::Pki,
        authorization: &str,
        wide_area: SocketAddr,
        streaming: SocketAddr,
    ) -> Result<()> {
        let [local, far, to_streaming, for_fleet] =
            free_ports(PROXY_IP)?.map(|port| SocketAddr::new(PROXY_IP, port));
        step(&format!(
            "nginx peer on {local}, {far}, {to_streaming} (unbuffered, to the streaming origin) \
             and {for_fleet} (the fleet row's 1,000-host map)"
        ));
        let common = nginx::Common {
            dir: &self.dir,
            name: "nginx-peer",
            cert: &pki.proxy,
        };
        let routes = [
            nginx::Route {
                listen: local,
                upstream: self.origin_http1,
                streaming: false,
                hosts: None,
            },
            nginx::Route {
                listen: far,
                upstream: wide_area,
                streaming: false,
                hosts: None,
            },
            nginx::Route {
                listen: to_streaming,
                upstream: streaming,
                streaming: true,
                hosts: None,
            },
            nginx::Route {
                listen: for_fleet,
                upstream: self.origin_http1,
                streaming: false,
                // The clients name nginx's address, so that is the origin's entry.
                hosts: Some(fleet::fleet_hosts(&PROXY_IP.to_string())),
            },
        ];
        let config = nginx::proxy_config(&common, &routes, &pki.ca, authorization);
        let pid = self.services.start(
            "nginx-peer",
            nginx::command(&tools.nginx, &common, &config)?,
        )?;
        self.services.wait_listening("the nginx peer", local)?;
        self.services.wait_listening("the nginx peer", far)?;
        self.services
            .wait_listening("the nginx peer", to_streaming)?;
        self.services.wait_listening("the nginx peer", for_fleet)?;
        self.nginx = Some(Peer {
            pid,
            local,
            wide_area: far,
            streaming: Some(to_streaming),
            fleet: Some(for_fleet),
        });
        Ok(())
    }

    fn start_mitmproxy(
        &mut self,
        tools: &Tools,
        authorization_file: &Path,
        wide_area: SocketAddr,
    ) -> Result<Peer, String> {
        let mitmdump = tools.mitmdump.as_ref().map_err(Clone::clone)?;
        let started = || -> Result<Peer> {
            let [local, far] = free_ports(PROXY_IP)?;
            step(&format!("mitmproxy on 127.0.0.1:{local} and :{far}"));
            let routes = [
                mitm::Route {
                    listen_port: local,
                    upstream: self.origin_http1,
                },
                mitm::Route {
                    listen_port: far,
                    upstream: wide_area,
                },
            ];
            let command = mitm::command(mitmdump, &self.dir, &routes, authorization_file)?;
            let pid = self.services.start("mitmproxy", command)?;
            let peer = Peer {
                pid,
                local: SocketAddr::new(PROXY_IP, local),
                wide_area: SocketAddr::new(PROXY_IP, far),
                streaming: None,
                fleet: None,
            };
            self.services.wait_listening("mitmproxy", peer.local)?;
            self.services.wait_listening("mitmproxy", peer.wide_area)?;
            Ok(peer)
        }();
        started.map_err(|e| {
            // It is the newest service; nothing else depends on it.
            self.services.stop_newest();
            format!("{e:#}")
        })
    }

    /// One request per path (a small download and upload to the streaming origin) before
    /// anything is measured, so a broken path fails here with a clear message rather than as a
    /// fast column of errors.
    fn check_paths(&mut self, tools: &Tools) -> Result<()> {
        let python = &tools.python3;
        let mut without_key = self.endpoint(Column::Direct, Route::Local)?;
        without_key.authorization = PLACEHOLDER.into();
        let refused = clients::connect_times(python, &self.dir, &without_key, clients::NO_SNI, 1)?;
        if refused.failures != 1 {
            bail!("the origin API answered 200 to a request without the real key");
        }
        for (column, route) in [
            (Column::Direct, Route::Local),
            (Column::Direct, Route::WideArea),
            (Column::Brokerd, Route::Local),
            (Column::Brokerd, Route::WideArea),
            (Column::Nginx, Route::Local),
            (Column::Nginx, Route::WideArea),
            (Column::Nginx, Route::Fleet),
        ] {
            let endpoint = self.endpoint(column, route)?;
            let answer = clients::connect_times(python, &self.dir, &endpoint, clients::NO_SNI, 1)?;
            if answer.failures > 0 {
                bail!(
                    "the {} path ({route:?}) did not answer 200; see the logs in {}",
                    column.name(),
                    cmd::relative(&self.dir)
                );
            }
        }
        // The streaming origin: refused without the key, one small transfer each way through
        // every path that has a route to it.
        let mut without_key = self.endpoint(Column::Direct, Route::Streaming)?;
        without_key.authorization = PLACEHOLDER.into();
        let down = clients::Direction::Down;
        if clients::transfer(python, &self.dir, &without_key, 1_000, down)?.failures == 0 {
            bail!("the streaming origin answered 200 to a request without the real key");
        }
        for column in [Column::Direct, Column::Brokerd, Column::Nginx] {
            let endpoint = self.endpoint(column, Route::Streaming)?;
            let mut failures = 0;
            for direction in [clients::Direction::Down, clients::Direction::Up] {
                failures +=
                    clients::transfer(python, &self.dir, &endpoint, 1_000, direction)?.failures;
            }
            if failures > 0 {
                bail!(
                    "the {} path to the streaming origin did not carry a download and an upload \
                     whole; see the logs in {}",
                    column.name(),
                    cmd::relative(&self.dir)
                );
            }
        }
        if self.mitmproxy.is_ok() {
            let endpoint = self.endpoint(Column::Mitmproxy, Route::Local)?;
            let answered = clients::connect_times(python, &self.dir, &endpoint, clients::NO_SNI, 1);
            match answered {
                Ok(answer) if answer.failures == 0 => {}
                Ok(_) => self.mitmproxy_failed("it did not answer 200".into()),
                Err(e) => self.mitmproxy_failed(format!("{e:#}")),
            }
        }
        Ok(())
    }

    fn mitmproxy_failed(&mut self, why: String) {
        eprintln!("bench: mitmproxy column unavailable: {why}");
        self.services.stop_newest();
        self.mitmproxy = Err(why);
    }

    /// How `column`'s client reaches the origin by `route`; an error for a column that is not
    /// running (mitmproxy, when it could not be installed or started).
    pub fn endpoint(&self, column: Column, route: Route) -> Result<Endpoint> {
        let origin = |listener: SocketAddr| match route {
            Route::Local | Route::Fleet => Some(listener),
            Route::WideArea => self.wide_area,
            Route::Streaming => self.streaming,
        };
        let peer = |peer: Option<&Peer>| {
            peer.and_then(|p| match route {
                Route::Local => Some(p.local),
                Route::WideArea => Some(p.wide_area),
                Route::Streaming => p.streaming,
                Route::Fleet => p.fleet,
            })
        };
        let (addr, authorization, launch) = match column {
            Column::Direct => (
                origin(self.origin),
                format!("Bearer {}", self.key),
                Launch::Outside,
            ),
            Column::Brokerd => (
                origin(self.origin_http1),
                PLACEHOLDER.to_owned(),
                Launch::InAgentCgroup {
                    brokerctl: self.bin.join("brokerctl"),
                    run_dir: self.brokerd_run_dir(),
                    cgroup: CGROUP.to_owned(),
                },
            ),
            Column::Nginx => (
                peer(self.nginx.as_ref()),
                PLACEHOLDER.to_owned(),
                Launch::Outside,
            ),
            Column::Mitmproxy => (
                peer(self.mitmproxy.as_ref().ok()),
                PLACEHOLDER.to_owned(),
                Launch::Outside,
            ),
        };
        let addr = addr.with_context(|| format!("the {} path is not running", column.name()))?;
        Ok(Endpoint {
            addr,
            authorization,
            launch,
        })
    }

    /// How a program is started in the agent cgroup `cgroup` (tagged on the way, through
    /// `brokerctl run --create`).
    pub fn agent_launch(&self, cgroup: &str) -> Launch {
        Launch::InAgentCgroup {
            brokerctl: self.bin.join("brokerctl"),
            run_dir: self.brokerd_run_dir(),
            cgroup: cgroup.to_owned(),
        }
    }

    /// Detaches and removes the fleet row's agent cgroups (below [`fleet::FLEET_PARENT`]),
    /// whichever of them exist, and their parent. Every agent's process has exited by then.
    pub fn remove_fleet_agents(&self) {
        let Some(mount) = cgroup2_mount() else {
            return;
        };
        let parent = mount.join(fleet::FLEET_PARENT);
        let Ok(entries) = fs::read_dir(&parent) else {
            return;
        };
        let mut agents: Vec<String> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        agents.sort();
        step(&format!(
            "untagging and removing the fleet's {} agent cgroups below {}",
            agents.len(),
            fleet::FLEET_PARENT
        ));
        for agent in agents {
            let cgroup = format!("{}/{agent}", fleet::FLEET_PARENT);
            if self.brokerd_pid.is_some() {
                let _ = self
                    .brokerctl()
                    .args(["detach", "--cgroup", &cgroup])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = fs::remove_dir(mount.join(&cgroup));
        }
        let _ = fs::remove_dir(&parent);
    }

    /// A program of the release build (`fairness-load`).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bin.join(name)
    }

    /// brokerd's CA certificate, exported to a file in the lab, for clients that verify.
    pub fn export_broker_ca(&self) -> Result<PathBuf> {
        let path = self.dir.join("broker-ca.pem");
        let mut export = self.brokerctl();
        export
            .args(["ca", "export", "--out"])
            .arg(&path)
            .stdout(Stdio::null());
        cmd::run(&mut export).context("exporting brokerd's CA")?;
        Ok(path)
    }

    /// The pid at the root of `column`'s proxy process tree (none for the direct path).
    pub fn proxy_pid(&self, column: Column) -> Option<u32> {
        match column {
            Column::Direct => None,
            Column::Brokerd => self.brokerd_pid,
            Column::Nginx => self.nginx.as_ref().map(|p| p.pid),
            Column::Mitmproxy => self.mitmproxy.as_ref().ok().map(|p| p.pid),
        }
    }

    /// The streaming origin's process, once started.
    pub fn streaming_origin_pid(&self) -> Option<u32> {
        self.streaming_pid
    }

    /// Why the mitmproxy column is empty, if it is.
    pub fn mitmproxy_missing(&self) -> Option<&str> {
        self.mitmproxy.as_ref().err().map(String::as_str)
    }

    /// Where the clients' scripts are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Untags the cgroup, stops every process by pid, and removes the pins and the cgroup.
    pub fn stop(&mut self) {
        step(&format!(
            "cleaning up: untag {CGROUP}, stop what the bench started, remove {PIN_DIR}"
        ));
        // Before brokerd stops, so it can untag them.
        self.remove_fleet_agents();
        if self.brokerd_pid.is_some() {
            // Not bounded by the interrupt flag: cleanup runs after Ctrl-C too.
            for cgroup in [CGROUP, CONTAINER_CGROUP, FLOOD_CGROUP] {
                let _ = self
                    .brokerctl()
                    .args(["detach", "--cgroup", cgroup])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        self.services.stop_all();
        if let Ok(brokerd) = &self.unprivileged {
            let _ = fs::remove_dir_all(&brokerd.dir);
        }
        self.unprivileged = Err("stopped".into());
        self.relay = None;
        self.container_relay = Err("stopped".into());
        for args in [
            &["netns", "del", CONTAINER_NETNS][..],
            &["link", "del", CONTAINER_LINK][..],
            &["netns", "del", CONTAINER_PEER_NETNS][..],
        ] {
            let _ = Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        if Path::new(PIN_DIR).exists() {
            let _ = fs::remove_dir_all(PIN_DIR);
        }
        if let Some(mount) = cgroup2_mount() {
            // Only empty cgroups can be removed, and every client has exited by now. `agents`
            // stays when something else uses it.
            let _ = fs::remove_dir(mount.join(CGROUP));
            let _ = fs::remove_dir(mount.join(CONTAINER_CGROUP));
            let _ = fs::remove_dir(mount.join(FLOOD_CGROUP));
            let _ = fs::remove_dir(mount.join("agents"));
        }
    }

    /// The veth end with [`CONTAINER_ORIGIN_IP`] and a zero-delay relay there to the origin.
    fn start_container_relay(&mut self) -> Result<DelayRelay, String> {
        let ip = |args: &[&str]| -> Result<(), String> {
            cmd::run(Command::new("ip").args(args).stdout(Stdio::null()))
                .map_err(|e| format!("{e:#}"))
        };
        for args in [
            &["link", "del", CONTAINER_LINK][..],
            &["netns", "del", CONTAINER_PEER_NETNS][..],
        ] {
            let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
        }
        ip(&["netns", "add", CONTAINER_PEER_NETNS])?;
        ip(&[
            "link",
            "add",
            CONTAINER_LINK,
            "type",
            "veth",
            "peer",
            "name",
            CONTAINER_PEER_LINK,
        ])?;
        ip(&[
            "link",
            "set",
            CONTAINER_PEER_LINK,
            "netns",
            CONTAINER_PEER_NETNS,
        ])?;
        ip(&[
            "-n",
            CONTAINER_PEER_NETNS,
            "link",
            "set",
            CONTAINER_PEER_LINK,
            "up",
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{CONTAINER_ORIGIN_IP}/30"),
            "dev",
            CONTAINER_LINK,
        ])?;
        ip(&["link", "set", CONTAINER_LINK, "up"])?;
        let relay = DelayRelay::start(
            IpAddr::V4(CONTAINER_ORIGIN_IP),
            self.origin_http1,
            Duration::ZERO,
        )
        .map_err(|e| format!("{e:#}"))?;
        step(&format!(
            "container row: relay on {} to the origin",
            relay.addr()
        ));
        Ok(relay)
    }

    /// The container agent: a namespace with only `lo`, a process of the agent cgroup in it,
    /// and `brokerctl attach --pid` of that process, so brokerd serves the namespace.
    fn start_container_agent(&mut self) -> Result<(), String> {
        self.container_relay.as_ref().map_err(Clone::clone)?;
        let run = |command: &mut Command| cmd::run(command).map_err(|e| format!("{e:#}"));
        let _ = Command::new("ip")
            .args(["netns", "del", CONTAINER_NETNS])
            .stderr(Stdio::null())
            .status();
        run(Command::new("ip").args(["netns", "add", CONTAINER_NETNS]))?;
        run(Command::new("ip").args(["-n", CONTAINER_NETNS, "link", "set", "lo", "up"]))?;
        let mut holder = Launch::InNetns {
            netns: CONTAINER_NETNS.into(),
            brokerctl: self.bin.join("brokerctl"),
            run_dir: self.brokerd_run_dir(),
            cgroup: CONTAINER_CGROUP.into(),
        }
        .command(Path::new("/bin/sleep"));
        holder.arg("86400");
        self.services
            .start("container-agent", holder)
            .map_err(|e| format!("{e:#}"))?;
        // The launcher may fork (its sandbox), so take whichever process of the agent's cgroup
        // appears first: every one of them runs in the namespace.
        let dir = cgroup2_mount()
            .ok_or("no cgroup2 mount")?
            .join(CONTAINER_CGROUP);
        let mut pid = 0;
        self.services
            .wait_until("a process of the container agent in its cgroup", || {
                pid = first_pid_below(&dir).unwrap_or(0);
                pid != 0
            })
            .map_err(|e| format!("{e:#}"))?;
        run(self
            .brokerctl()
            .args(["attach", "--pid", &pid.to_string()])
            .stdout(Stdio::null()))?;
        step(&format!(
            "container row: agent pid {pid} in netns {CONTAINER_NETNS}, cgroup {CONTAINER_CGROUP}"
        ));
        Ok(())
    }

    /// The container row's two agents, the same agent on the host and in a container, each
    /// calling the origin through the relay on [`CONTAINER_ORIGIN_IP`]; an error says why the
    /// row cannot run.
    pub fn container_endpoints(&self) -> Result<[Endpoint; 2]> {
        self.container
            .as_ref()
            .map_err(|why| anyhow::anyhow!("{why}"))?;
        let relay = self
            .container_relay
            .as_ref()
            .map_err(|why| anyhow::anyhow!("{why}"))?;
        let endpoint = |launch| Endpoint {
            addr: relay.addr(),
            authorization: PLACEHOLDER.to_owned(),
            launch,
        };
        Ok([
            endpoint(Launch::InAgentCgroup {
                brokerctl: self.bin.join("brokerctl"),
                run_dir: self.brokerd_run_dir(),
                cgroup: CGROUP.to_owned(),
            }),
            endpoint(Launch::InNetns {
                netns: CONTAINER_NETNS.into(),
                brokerctl: self.bin.join("brokerctl"),
                run_dir: self.brokerd_run_dir(),
                cgroup: CONTAINER_CGROUP.to_owned(),
            }),
        ])
    }

    fn brokerd_run_dir(&self) -> PathBuf {
        self.dir.join("brokerd-run")
    }

    fn brokerctl(&self) -> Command {
        let mut brokerctl = Command::new(self.bin.join("brokerctl"));
        brokerctl.arg("--run-dir").arg(self.brokerd_run_dir());
        brokerctl
    }

    fn private_file(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(path)
    }
}

/// Removes pins a previous, killed run may have left (they would keep its links attached).
pub fn remove_stale_pins() {
    if Path::new(PIN_DIR).exists() {
        let _ = fs::remove_dir_all(PIN_DIR);
    }
}

/// brokerd's policy for the bench cgroup: the origin by address (clients that dial an address
/// send no SNI) on both routes, the streaming origin by address, and any `*.bench.test` name on
/// the origin's port for the first-seen host workload, each with the key injected (so brokerd
/// also scrubs the key from every answer). The bench names resolve nowhere (the clients dial
/// the origin's address and send the name): their rule says `any_address = true`, so the
/// origin's certificate alone proves them, and brokerd looks nothing up (it would ask the
/// host's resolver, and the row measures leaf minting, not DNS).
fn policy(
    cgroup: &str,
    origin_port: u16,
    wide_area_port: u16,
    streaming_port: u16,
    container_port: Option<u16>,
) -> String {
    let rule = injecting_rule;
    format!(
        "# Written by cargo xtask bench.\ncgroup = \"{cgroup}\"\n{AGENT_SHARES}{}{}{}{}{}any_address = true\n",
        rule("127.0.0.2", origin_port),
        rule("127.0.0.2", wide_area_port),
        rule("127.0.0.2", streaming_port),
        container_port.map_or(String::new(), |port| rule(
            &CONTAINER_ORIGIN_IP.to_string(),
            port
        )),
        rule("*.bench.test", origin_port),
    )
}

/// The bench agents' shares of brokerd. The bench measures speed, not fairness: they are far
/// above what any workload uses (the new-connection workloads open hundreds a second).
pub const AGENT_SHARES: &str = "\n[shares]\nconnections = 100000\nnew_connections_per_second = 100000\n\
                  pending_handshakes = 100000\nrequests_in_flight = 100000\n\
                  requests_per_second = 10000000\ndns_queries_per_second = 100000\n";

/// A rule that allows `host` on `port` and injects the bench key as the Authorization header.
pub fn injecting_rule(host: &str, port: u16) -> String {
    format!(
        "\n[[allow]]\nhost = \"{host}\"\nport = {port}\n\
         inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n"
    )
}

/// `N` distinct ports nothing listens on at `ip` right now, for programs that must be told their
/// ports. Another process could take one before the program binds it; on a bench machine that
/// does not happen.
fn free_ports<const N: usize>(ip: IpAddr) -> Result<[u16; N]> {
    // All bound at once, so the kernel cannot hand out the same port twice.
    let listeners = (0..N)
        .map(|_| TcpListener::bind((ip, 0)).with_context(|| format!("binding {ip}:0")))
        .collect::<Result<Vec<_>>>()?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

/// The first process in the cgroup `dir` or a cgroup below it.
fn first_pid_below(dir: &Path) -> Option<u32> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
        return Some(pid);
    }
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| first_pid_below(&e.path()))
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// The flooding agent's policy: the origin with the key injected, as the bench agent has it,
/// and no `[shares]`, so the defaults apply (what an operator gets without tuning).
fn flood_policy(cgroup: &str, origin_port: u16) -> String {
    format!(
        "# Written by cargo xtask bench.\ncgroup = \"{cgroup}\"\n\n[[allow]]\nhost = \"127.0.0.2\"\n\
         port = {origin_port}\n\
         inject.headers = {{ authorization = \"Bearer {{secret:{SECRET_NAME}}}\" }}\n"
    )
}

fn step(text: &str) {
    eprintln!("bench: {text}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_the_origins_on_every_route_and_any_bench_name() {
        let policy = policy(CGROUP, 9443, 9444, 9445, Some(9446));
        assert!(policy.contains("cgroup = \"agents/bench\""));
        assert!(policy.contains("host = \"10.253.0.1\"\nport = 9446\n"));
        assert!(policy.contains("host = \"127.0.0.2\"\nport = 9443\n"));
        assert!(policy.contains("host = \"127.0.0.2\"\nport = 9444\n"));
        assert!(policy.contains("host = \"127.0.0.2\"\nport = 9445\n"));
        assert!(policy.contains("host = \"*.bench.test\"\nport = 9443\n"));
        // Only the names' rule lets the key go to an address no resolver proves.
        assert_eq!(policy.matches("any_address = true").count(), 1);
        assert!(policy.ends_with("}\nany_address = true\n"), "{policy}");
        assert_eq!(
            policy
                .matches("authorization = \"Bearer {secret:BENCH_KEY}\"")
                .count(),
            5
        );
        let container = super::policy(CONTAINER_CGROUP, 9443, 9444, 9445, None);
        assert!(container.contains("cgroup = \"agents/bench-ct\""));
        assert!(!container.contains("10.253.0.1"));
    }
}

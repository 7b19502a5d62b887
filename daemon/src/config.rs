//! brokerd's configuration: command-line flags over a TOML file over embedded defaults, validated
//! into a [`Config`] before anything binds or attaches.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Default bpffs directory for pinned maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/agent-broker";
/// Default listeners for redirected connections.
pub const DEFAULT_LISTEN: [&str; 2] = ["127.0.0.1:15001", "[::1]:15001"];
/// Default UDP port of the DNS listener (on the listen addresses).
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// Errors of configuration loading and validation.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid listen address {addr}: {reason}")]
    Listen {
        addr: SocketAddr,
        reason: &'static str,
    },
    #[error("invalid audit retention: {0}")]
    Audit(&'static str),
    #[error("{0} must be an absolute path, got {1}")]
    RelativeDir(&'static str, PathBuf),
    #[error("invalid pod source {0:?}: expected `kube`, `podman` or `podman:/path/to/podman.sock`")]
    PodSource(String),
    #[error("spin_us must be at most {max} (microseconds), got {got}")]
    Spin { got: u64, max: u64 },
    #[error("invalid approval setting: {0}")]
    Approvals(String),
    #[error("upstream_header_timeout must be 1 to 86400 seconds, got {0}")]
    UpstreamHeaderTimeout(u64),
    #[error("agent_header_timeout must be 1 to 3600 seconds, got {0}")]
    AgentHeaderTimeout(u64),
    #[error("audit_unwritable must be \"refuse\" or \"continue\", got {0:?}")]
    AuditUnwritable(String),
    #[error(
        "invalid metrics address {0}: brokerd serves metrics on loopback addresses only (e.g. 127.0.0.1:9464)"
    )]
    Metrics(SocketAddr),
}

/// The approval settings, flags over the file over defaults.
fn approval_config(
    cli: &Settings,
    file: &Settings,
) -> Result<crate::approvals::ApprovalConfig, ConfigError> {
    use crate::approvals::{ApprovalConfig, DEFAULT_PER_AGENT, DEFAULT_TIMEOUT, webhook::Target};
    let timeout = match cli.approval_timeout.or(file.approval_timeout) {
        None => DEFAULT_TIMEOUT,
        Some(s @ 1..=3600) => std::time::Duration::from_secs(s),
        Some(s) => {
            return Err(ConfigError::Approvals(format!(
                "approval_timeout must be 1 to 3600 seconds, got {s}"
            )));
        }
    };
    let per_agent = match cli.approvals_per_agent.or(file.approvals_per_agent) {
        None => DEFAULT_PER_AGENT,
        Some(n @ 1..=1024) => n,
        Some(n) => {
            return Err(ConfigError::Approvals(format!(
                "approvals_per_agent must be 1 to 1024, got {n}"
            )));
        }
    };
    let webhook = cli
        .approval_webhook
        .as_deref()
        .or(file.approval_webhook.as_deref())
        .map(Target::parse)
        .transpose()
        .map_err(ConfigError::Approvals)?;
    Ok(ApprovalConfig {
        timeout,
        per_agent,
        webhook,
        callback: cli.approval_callback.or(file.approval_callback),
    })
}

/// The longest spin window accepted: beyond a millisecond spinning only burns CPU.
pub const MAX_SPIN_US: u64 = 1_000;

/// brokerd's settings, declared once: each is a command-line flag (`--spin-us`) and a key of
/// the TOML config file (`spin_us = 0`), with the same meaning; the doc comment is the flag's
/// help. Every field is optional; [`Config::layer`] puts flags over the file over defaults.
#[derive(Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// State directory (vault, CA, audit log) [default: /var/lib/agent-broker].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Run directory holding the control socket control.sock [default: /run/agent-broker].
    #[arg(long, value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
    /// Policy directory [default: /etc/agent-broker/policies].
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links; bpffs is mounted at /sys/fs/bpf when needed
    /// [default: /sys/fs/bpf/agent-broker].
    #[arg(long, value_name = "DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Loopback address for redirected connections; repeat for IPv4 and IPv6. All share one
    /// port; port 0 picks a free one [default: 127.0.0.1:15001 and \[::1\]:15001].
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// PEM file of a CA to trust for upstream servers, beside the system roots (repeatable).
    #[arg(long, value_name = "FILE")]
    #[serde(default)]
    pub upstream_ca: Vec<PathBuf>,
    /// Read the vault master key from the systemd credential `agent-broker-master-key`
    /// ($CREDENTIALS_DIRECTORY) instead of <state-dir>/master.key.
    #[arg(long)]
    #[serde(default)]
    pub master_key_credential: bool,
    /// Remove audit records older than DAYS [default: keep all].
    #[arg(long, value_name = "DAYS")]
    pub audit_max_age_days: Option<u64>,
    /// Keep at most N audit records, removing the oldest [default: keep all].
    #[arg(long, value_name = "N")]
    pub audit_max_records: Option<u64>,
    /// UDP port of the DNS listener, on the listen addresses: agents' DNS (to any resolver on
    /// port 53) is redirected there and answered only for names their policy allows; port 0
    /// picks a free one [default: 15053].
    #[arg(long, value_name = "PORT")]
    pub dns_port: Option<u16>,
    /// Resolver to forward allowed DNS queries to (repeatable) [default: the nameservers of
    /// /etc/resolv.conf].
    #[arg(long, value_name = "ADDR")]
    #[serde(default)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Refuse to start unless the optional BPF LSM programs load (they add a socket-family and
    /// ptrace check in the kernel; many kernels do not allow them, and every protection brokerd
    /// promises holds without them).
    #[arg(long)]
    #[serde(default)]
    pub require_lsm: bool,
    /// Run without root and without eBPF (issue 19): tag no cgroups, and serve only the agents
    /// `brokerctl run --unprivileged --as NAME` starts in sandboxes of their own, whose
    /// listeners it hands over on <run-dir>/sandbox.sock. The directories then default to the
    /// user's: state $XDG_STATE_HOME/agent-broker (~/.local/state/agent-broker), run
    /// $XDG_RUNTIME_DIR/agent-broker (/tmp/agent-broker-UID), policy
    /// $XDG_CONFIG_HOME/agent-broker/policies (~/.config/agent-broker/policies); the host
    /// listeners and DNS port default to free ports, as no redirect needs fixed ones.
    #[arg(long)]
    #[serde(default)]
    pub unprivileged: bool,
    /// After each request a proxy thread keeps polling its sockets for this long (µs) before
    /// it sleeps, so the upstream's answer and the agent's next request do not wait for a
    /// wake-up; 0 turns it off, at most 1000 [default: 100].
    #[arg(long, value_name = "MICROSECONDS")]
    pub spin_us: Option<u64>,
    /// Tag the pods a container engine runs with the label `agent-broker.io/agent=<name>`, as
    /// sub-agents `<pod name>` of the agent `agents/<namespace>/<name>` (`agents/<name>` for
    /// podman pods), and untag them when they go. `kube` watches this node's
    /// pods through the Kubernetes API (in-cluster config or KUBECONFIG; the node from
    /// $NODE_NAME); `podman` uses podman's system service socket (/run/podman/podman.sock),
    /// `podman:PATH` another socket [default: none].
    #[arg(long, value_name = "SOURCE")]
    pub pod_source: Option<String>,
    /// How long a request that asks for an operator's approval (`approve = "ask"`,
    /// `on_unknown = "ask"`) waits before it is denied, in seconds (1 to 3600) [default: 60].
    #[arg(long, value_name = "SECONDS")]
    pub approval_timeout: Option<u64>,
    /// How many requests of one agent may wait for approval at once; more are denied at once
    /// [default: 8].
    #[arg(long, value_name = "N")]
    pub approvals_per_agent: Option<usize>,
    /// POST each request that starts waiting for approval (JSON, no secret values) to this
    /// `http://` URL, with a callback URL and a token of its own [default: none].
    #[arg(long, value_name = "URL")]
    pub approval_webhook: Option<String>,
    /// Accept webhook decisions (`POST /approvals/ID`, `Authorization: Bearer TOKEN`) on this
    /// address [default: none].
    #[arg(long, value_name = "ADDR")]
    pub approval_callback: Option<SocketAddr>,
    /// Serve Prometheus metrics (OpenMetrics text, `GET /metrics`) on this loopback address;
    /// port 0 picks a free one [default: off].
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// How long brokerd waits for an upstream's response head (status and headers) after
    /// sending a request, in seconds (1 to 86400), before it answers the agent 504; streamed
    /// bodies are bound by the rules' `idle_timeout` instead [default: 600].
    #[arg(long, value_name = "SECONDS")]
    pub upstream_header_timeout: Option<u64>,
    /// How long an agent may take to send a request head, in seconds (1 to 3600): a
    /// connection's first request must arrive this long after it reached HTTP, and each
    /// HTTP/1.1 request head (a keep-alive connection waits this long for its next one) within
    /// this long of the connection becoming ready for it; past it the connection is closed
    /// [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub agent_header_timeout: Option<u64>,
    /// What brokerd does while the audit log cannot be written (its disk full or read-only):
    /// `refuse` answers every request 503 until a commit succeeds again, `continue` lets
    /// calls go on and drops (and counts) the records that do not fit its queue
    /// [default: refuse].
    #[arg(long, value_name = "refuse|continue")]
    pub audit_unwritable: Option<String>,
}

impl Settings {
    /// Reads and parses a TOML config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })
    }
}

/// Validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub policy_dir: PathBuf,
    pub pin_dir: PathBuf,
    /// At least one IPv4 and at most one address per family, all loopback; a zero port means
    /// "pick one", shared by all listeners.
    pub listen: Vec<SocketAddr>,
    /// Extra upstream trust roots (PEM files); the CLI list adds to the file's.
    pub upstream_ca: Vec<PathBuf>,
    /// Master key from the systemd credential rather than the key file.
    pub master_key_credential: bool,
    /// How long audit records are kept.
    pub audit_retention: crate::audit::Retention,
    /// UDP port of the DNS listener; 0 picks a free one.
    pub dns_port: u16,
    /// Resolvers for allowed names; empty means "read /etc/resolv.conf at start".
    pub dns_upstream: Vec<SocketAddr>,
    /// Refuse to start unless the BPF LSM programs load.
    pub require_lsm: bool,
    /// The unprivileged capture mode: no eBPF, sandboxes only (see [`Settings::unprivileged`]).
    pub unprivileged: bool,
    /// How long a proxy thread busy-polls after a request before sleeping (see `proxy::spin`).
    pub spin: std::time::Duration,
    /// Where labelled pods are listed from, if anywhere.
    pub pod_source: Option<PodSourceConfig>,
    /// Run-time approval: how long requests wait, how many, and the webhook.
    pub approvals: crate::approvals::ApprovalConfig,
    /// The loopback address of the metrics listener, when metrics are served.
    pub metrics_addr: Option<SocketAddr>,
    /// How long an upstream may take to send its response head.
    pub upstream_header_timeout: std::time::Duration,
    /// How long an agent may take to send a request head.
    pub agent_header_timeout: std::time::Duration,
    /// Refuse requests while the audit log cannot be written.
    pub audit_refuse_unwritable: bool,
}

/// A container engine brokerd lists labelled pods from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PodSourceConfig {
    /// The Kubernetes API (in-cluster config or KUBECONFIG).
    Kube,
    /// podman's REST API on this unix socket.
    Podman(PathBuf),
}

impl PodSourceConfig {
    fn parse(raw: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::PodSource(raw.to_owned());
        match raw.split_once(':') {
            None if raw == "kube" => Ok(Self::Kube),
            None if raw == "podman" => Ok(Self::Podman(crate::pods::podman::DEFAULT_SOCKET.into())),
            Some(("podman", path)) if Path::new(path).is_absolute() => {
                Ok(Self::Podman(path.into()))
            }
            _ => Err(bad()),
        }
    }
}

use agent_broker_protocol::sandbox::Dirs as Defaults;

impl Config {
    /// Layers CLI over file over defaults and validates the result.
    /// A list given on the command line replaces the file's, except `upstream_ca`, which adds
    /// to it; a flag switched on on either side is on.
    pub fn layer(cli: Settings, file: Settings) -> Result<Self, ConfigError> {
        let approvals = approval_config(&cli, &file)?;
        let unprivileged = cli.unprivileged || file.unprivileged;
        let defaults = if unprivileged {
            Defaults::of_this_user(nix::unistd::geteuid().as_raw())
        } else {
            Defaults::system()
        };
        let dir = |name, cli: Option<PathBuf>, file: Option<PathBuf>, default: &Path| {
            let p = cli.or(file).unwrap_or_else(|| default.to_path_buf());
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(ConfigError::RelativeDir(name, p))
            }
        };
        let listen = if !cli.listen.is_empty() {
            cli.listen
        } else if !file.listen.is_empty() {
            file.listen
        } else if unprivileged {
            vec![SocketAddr::from(([127, 0, 0, 1], 0))]
        } else {
            DEFAULT_LISTEN
                .iter()
                .filter_map(|s| s.parse().ok())
                .collect()
        };
        let config = Self {
            state_dir: dir(
                "--state-dir",
                cli.state_dir,
                file.state_dir,
                &defaults.state,
            )?,
            run_dir: dir("--run-dir", cli.run_dir, file.run_dir, &defaults.run)?,
            policy_dir: dir(
                "--policy-dir",
                cli.policy_dir,
                file.policy_dir,
                &defaults.policy,
            )?,
            pin_dir: dir(
                "--pin-dir",
                cli.pin_dir,
                file.pin_dir,
                Path::new(DEFAULT_PIN_DIR),
            )?,
            listen,
            upstream_ca: file
                .upstream_ca
                .into_iter()
                .chain(cli.upstream_ca)
                .collect(),
            master_key_credential: cli.master_key_credential || file.master_key_credential,
            audit_retention: crate::audit::Retention {
                max_age: cli
                    .audit_max_age_days
                    .or(file.audit_max_age_days)
                    .map(|days| {
                        std::time::Duration::from_secs(
                            days.saturating_mul(agent_broker_core::time::DAY_SECS),
                        )
                    }),
                max_records: cli.audit_max_records.or(file.audit_max_records),
            },
            dns_port: cli.dns_port.or(file.dns_port).unwrap_or(if unprivileged {
                0
            } else {
                DEFAULT_DNS_PORT
            }),
            dns_upstream: if cli.dns_upstream.is_empty() {
                file.dns_upstream
            } else {
                cli.dns_upstream
            },
            require_lsm: cli.require_lsm || file.require_lsm,
            unprivileged,
            spin: match cli.spin_us.or(file.spin_us) {
                None => crate::proxy::spin::DEFAULT_WINDOW,
                Some(got) if got > MAX_SPIN_US => {
                    return Err(ConfigError::Spin {
                        got,
                        max: MAX_SPIN_US,
                    });
                }
                Some(us) => std::time::Duration::from_micros(us),
            },
            pod_source: cli
                .pod_source
                .or(file.pod_source)
                .map(|raw| PodSourceConfig::parse(&raw))
                .transpose()?,
            approvals,
            audit_refuse_unwritable: match cli
                .audit_unwritable
                .as_deref()
                .or(file.audit_unwritable.as_deref())
            {
                None | Some("refuse") => true,
                Some("continue") => false,
                Some(other) => {
                    return Err(ConfigError::AuditUnwritable(other.to_string()));
                }
            },
            upstream_header_timeout: match cli
                .upstream_header_timeout
                .or(file.upstream_header_timeout)
            {
                None => crate::proxy::Deadlines::default().response_head,
                Some(s @ 1..=86_400) => std::time::Duration::from_secs(s),
                Some(s) => {
                    return Err(ConfigError::UpstreamHeaderTimeout(s));
                }
            },
            agent_header_timeout: match cli.agent_header_timeout.or(file.agent_header_timeout) {
                None => crate::proxy::Deadlines::default().request_head,
                Some(s @ 1..=3600) => std::time::Duration::from_secs(s),
                Some(s) => return Err(ConfigError::AgentHeaderTimeout(s)),
            },
            metrics_addr: match cli.metrics_addr.or(file.metrics_addr) {
                // Metrics name agents and hosts: they are for this machine's monitoring only.
                Some(addr) if !addr.ip().is_loopback() => {
                    return Err(ConfigError::Metrics(addr));
                }
                addr => addr,
            },
        };
        if config.audit_retention.max_records == Some(0) {
            return Err(ConfigError::Audit("audit_max_records must be at least 1"));
        }
        if config.audit_retention.max_age == Some(std::time::Duration::ZERO) {
            return Err(ConfigError::Audit("audit_max_age_days must be at least 1"));
        }
        config.validate_listen()?;
        Ok(config)
    }

    fn validate_listen(&self) -> Result<(), ConfigError> {
        let mut v4 = 0;
        let mut v6 = 0;
        let mut port = None;
        for addr in &self.listen {
            let err = |reason| ConfigError::Listen {
                addr: *addr,
                reason,
            };
            if !addr.ip().is_loopback() {
                // A broker reachable from the network would be a credential oracle for it.
                return Err(err("brokerd listens on loopback addresses only"));
            }
            match addr {
                SocketAddr::V4(_) => v4 += 1,
                SocketAddr::V6(_) => v6 += 1,
            }
            if v4 > 1 || v6 > 1 {
                return Err(err("give at most one IPv4 and one IPv6 listen address"));
            }
            if addr.port() != 0 && *port.get_or_insert(addr.port()) != addr.port() {
                return Err(err("all listen addresses must share one port"));
            }
        }
        if v4 == 0 {
            return Err(ConfigError::Listen {
                addr: self
                    .listen
                    .first()
                    .copied()
                    .unwrap_or_else(|| ([0u16; 8], 0).into()),
                reason: "an IPv4 loopback listen address is required (IPv4 and v4-mapped \
                         connections are redirected to it)",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_broker_protocol::DEFAULT_RUN_DIR;

    /// `--unprivileged` without directories: the user's own, from the XDG base directories
    /// (absolute values only) and HOME; root keeps the system's.
    #[test]
    fn an_unprivileged_brokerd_defaults_to_the_users_directories() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(name, _)| *name == k)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let user = Defaults::user(
            1000,
            &env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1000")]),
        );
        assert_eq!(
            user,
            Defaults {
                state: "/home/u/.local/state/agent-broker".into(),
                run: "/run/user/1000/agent-broker".into(),
                policy: "/home/u/.config/agent-broker/policies".into(),
            }
        );
        let xdg = Defaults::user(
            1000,
            &env(&[
                ("HOME", "/home/u"),
                ("XDG_STATE_HOME", "/s"),
                ("XDG_CONFIG_HOME", "relative/ignored"),
            ]),
        );
        assert_eq!(xdg.state, PathBuf::from("/s/agent-broker"));
        assert_eq!(xdg.run, PathBuf::from("/tmp/agent-broker-1000"));
        assert_eq!(
            xdg.policy,
            PathBuf::from("/home/u/.config/agent-broker/policies")
        );
        assert_eq!(
            Defaults::user(0, &env(&[])).run,
            PathBuf::from(DEFAULT_RUN_DIR)
        );
        // The mode itself: the user's listeners default to free ports.
        let c = Config::layer(
            Settings {
                unprivileged: true,
                ..Settings::default()
            },
            Settings::default(),
        )
        .expect("config");
        assert!(c.unprivileged);
        assert_eq!(c.listen, vec![SocketAddr::from(([127, 0, 0, 1], 0))]);
        assert_eq!(c.dns_port, 0);
    }

    #[test]
    fn defaults_are_embedded() {
        let c = Config::layer(Settings::default(), Settings::default()).expect("defaults");
        assert_eq!(c.run_dir, PathBuf::from(DEFAULT_RUN_DIR));
        assert_eq!(c.listen.len(), 2);
        assert!(
            c.listen
                .iter()
                .all(|a| a.port() == 15001 && a.ip().is_loopback())
        );
    }

    #[test]
    fn cli_overrides_file_overrides_defaults() {
        let file: Settings =
            toml::from_str("run_dir = \"/from/file\"\nstate_dir = \"/state\"").expect("toml");
        let cli = Settings {
            run_dir: Some("/from/cli".into()),
            ..Default::default()
        };
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(c.run_dir, PathBuf::from("/from/cli"));
        assert_eq!(c.state_dir, PathBuf::from("/state"));
        assert_eq!(c.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
    }

    #[test]
    fn unknown_file_fields_are_refused() {
        assert!(toml::from_str::<Settings>("listne = []").is_err());
    }

    #[test]
    fn non_loopback_and_mixed_ports_are_refused() {
        for listen in [
            vec!["0.0.0.0:15001"],
            vec!["10.0.0.1:15001"],
            vec!["127.0.0.1:1", "[::1]:2"],
            vec!["[::1]:15001"],
            vec!["127.0.0.1:1", "127.0.0.2:1"],
        ] {
            let cli = Settings {
                listen: listen.iter().map(|s| s.parse().expect("addr")).collect(),
                ..Default::default()
            };
            let err = Config::layer(cli, Settings::default()).expect_err("refused");
            assert!(err.to_string().contains("invalid listen address"), "{err}");
        }
    }

    #[test]
    fn zero_audit_retention_is_refused_before_anything_opens() {
        for toml_text in ["audit_max_age_days = 0", "audit_max_records = 0"] {
            let file: Settings = toml::from_str(toml_text).expect("toml");
            let err = Config::layer(Settings::default(), file).expect_err("refused");
            assert!(err.to_string().contains("at least 1"), "{toml_text}: {err}");
        }
    }

    #[test]
    fn flags_and_file_keys_are_one_declaration() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        let cli = Cli::try_parse_from(["brokerd", "--spin-us", "7", "--listen", "127.0.0.1:0"])
            .expect("flags")
            .settings;
        let file: Settings =
            toml::from_str("spin_us = 9\nlisten = [\"127.0.0.1:0\"]\nrequire_lsm = true")
                .expect("toml");
        assert_eq!((cli.spin_us, file.spin_us), (Some(7), Some(9)));
        assert_eq!(cli.listen, file.listen);
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(c.spin, std::time::Duration::from_micros(7));
        assert!(c.require_lsm, "a switch on either side is on");
    }

    #[test]
    fn relative_dirs_are_refused() {
        let cli = Settings {
            run_dir: Some("run".into()),
            ..Default::default()
        };
        let err = Config::layer(cli, Settings::default()).expect_err("refused");
        assert!(err.to_string().contains("--run-dir"), "{err}");
    }

    #[test]
    fn the_spin_window_is_layered_and_bounded() {
        let default = Config::layer(Settings::default(), Settings::default()).expect("layer");
        assert_eq!(default.spin, crate::proxy::spin::DEFAULT_WINDOW);
        let file: Settings = toml::from_str("spin_us = 0").expect("toml");
        let off = Config::layer(Settings::default(), file).expect("layer");
        assert!(off.spin.is_zero());
        let cli = Settings {
            spin_us: Some(250),
            ..Default::default()
        };
        let file: Settings = toml::from_str("spin_us = 0").expect("toml");
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(c.spin, std::time::Duration::from_micros(250));
        let cli = Settings {
            spin_us: Some(MAX_SPIN_US + 1),
            ..Default::default()
        };
        let err = Config::layer(cli, Settings::default()).expect_err("refused");
        assert!(
            err.to_string().contains("spin_us must be at most 1000"),
            "{err}"
        );
    }

    #[test]
    fn the_agent_header_timeout_is_layered_and_bounded() {
        let default = Config::layer(Settings::default(), Settings::default()).expect("layer");
        assert_eq!(
            default.agent_header_timeout,
            crate::proxy::Deadlines::default().request_head
        );
        let file: Settings = toml::from_str("agent_header_timeout = 5").expect("toml");
        let cli = Settings {
            agent_header_timeout: Some(2),
            ..Default::default()
        };
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(c.agent_header_timeout, std::time::Duration::from_secs(2));
        for bad in [0, 3601] {
            let cli = Settings {
                agent_header_timeout: Some(bad),
                ..Default::default()
            };
            let err = Config::layer(cli, Settings::default()).expect_err("refused");
            assert!(
                err.to_string().contains(&format!(
                    "agent_header_timeout must be 1 to 3600 seconds, got {bad}"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn metrics_are_off_unless_set_and_only_on_loopback() {
        let off = Config::layer(Settings::default(), Settings::default()).expect("defaults");
        assert_eq!(off.metrics_addr, None);
        let file: Settings = toml::from_str("metrics_addr = \"127.0.0.1:9464\"").expect("toml");
        let on = Config::layer(Settings::default(), file).expect("layer");
        assert_eq!(
            on.metrics_addr,
            Some("127.0.0.1:9464".parse().expect("addr"))
        );
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            settings: Settings,
        }
        let cli = Cli::try_parse_from(["brokerd", "--metrics-addr", "[::1]:0"])
            .expect("flags")
            .settings;
        let file: Settings = toml::from_str("metrics_addr = \"127.0.0.1:9464\"").expect("toml");
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(
            c.metrics_addr,
            Some("[::1]:0".parse().expect("addr")),
            "flag over file"
        );
        for bad in ["0.0.0.0:9464", "192.0.2.1:9464", "[::]:9464"] {
            let cli = Settings {
                metrics_addr: Some(bad.parse().expect("addr")),
                ..Default::default()
            };
            let err = Config::layer(cli, Settings::default()).expect_err("refused");
            assert!(
                err.to_string().contains("loopback") && err.to_string().contains(bad),
                "{err}"
            );
        }
    }

    #[test]
    fn pod_sources_parse_or_name_what_is_wrong() {
        let parse = |raw: &str| {
            let cli = Settings {
                pod_source: Some(raw.into()),
                ..Default::default()
            };
            Config::layer(cli, Settings::default()).map(|c| c.pod_source)
        };
        assert_eq!(
            parse("podman").expect("a valid pod source"),
            Some(PodSourceConfig::Podman("/run/podman/podman.sock".into()))
        );
        assert_eq!(
            parse("kube").expect("a valid pod source"),
            Some(PodSourceConfig::Kube)
        );
        assert_eq!(
            parse("podman:/tmp/p.sock").expect("a valid pod source"),
            Some(PodSourceConfig::Podman("/tmp/p.sock".into()))
        );
        for bad in ["docker", "podman:relative.sock", "podman:", "kube:x"] {
            let e = parse(bad).expect_err("refused").to_string();
            assert!(e.contains(bad) && e.contains("podman"), "{e}");
        }
        let none = Config::layer(Settings::default(), Settings::default())
            .expect("the defaults are valid");
        assert_eq!(none.pod_source, None);
    }
}

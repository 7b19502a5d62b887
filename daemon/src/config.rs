//! brokerd's configuration: command-line flags over a TOML file over embedded defaults, validated
//! into a [`Config`] before anything binds or attaches.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use agent_broker_protocol::{DEFAULT_POLICY_DIR, DEFAULT_RUN_DIR, DEFAULT_STATE_DIR};

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
    #[error("spin_us must be at most {max} (microseconds), got {got}")]
    Spin { got: u64, max: u64 },
}

/// The longest spin window accepted: beyond a millisecond spinning only burns CPU.
pub const MAX_SPIN_US: u64 = 1_000;

/// The settings a config file may hold; every field optional, unknown fields refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory for the vault, the CA and the audit log.
    pub state_dir: Option<PathBuf>,
    /// Directory for the control socket.
    pub run_dir: Option<PathBuf>,
    /// Directory of policy files.
    pub policy_dir: Option<PathBuf>,
    /// bpffs directory for pinned maps and links.
    pub pin_dir: Option<PathBuf>,
    /// Loopback addresses to accept redirected connections on.
    pub listen: Option<Vec<SocketAddr>>,
    /// Extra PEM files of CAs trusted for upstream servers, beside the system roots.
    pub upstream_ca: Option<Vec<PathBuf>>,
    /// Read the vault master key from the systemd credential `agent-broker-master-key`
    /// instead of `<state_dir>/master.key`.
    pub master_key_credential: Option<bool>,
    /// Remove audit records older than this many days.
    pub audit_max_age_days: Option<u64>,
    /// Keep at most this many audit records.
    pub audit_max_records: Option<u64>,
    /// UDP port of the DNS listener agents' DNS is redirected to (0 picks one).
    pub dns_port: Option<u16>,
    /// Resolvers brokerd forwards allowed DNS queries to (default: /etc/resolv.conf).
    pub dns_upstream: Option<Vec<SocketAddr>>,
    /// Refuse to start unless the optional BPF LSM programs load.
    pub require_lsm: Option<bool>,
    /// How long a proxy thread keeps polling after a request before it sleeps, in µs (0: never).
    pub spin_us: Option<u64>,
}

impl FileConfig {
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

/// Settings given on the command line; each overrides the file.
#[derive(Debug, Default)]
pub struct CliConfig {
    pub state_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub policy_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
    pub listen: Vec<SocketAddr>,
    pub upstream_ca: Vec<PathBuf>,
    pub master_key_credential: bool,
    pub audit_max_age_days: Option<u64>,
    pub audit_max_records: Option<u64>,
    pub dns_port: Option<u16>,
    pub dns_upstream: Vec<SocketAddr>,
    pub require_lsm: bool,
    pub spin_us: Option<u64>,
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
    /// How long a proxy thread busy-polls after a request before sleeping (see [`crate::spin`]).
    pub spin: std::time::Duration,
}

impl Config {
    /// Layers CLI over file over defaults and validates the result.
    pub fn layer(cli: CliConfig, file: FileConfig) -> Result<Self, ConfigError> {
        let dir = |name, cli: Option<PathBuf>, file: Option<PathBuf>, default: &str| {
            let p = cli.or(file).unwrap_or_else(|| PathBuf::from(default));
            if p.is_absolute() {
                Ok(p)
            } else {
                Err(ConfigError::RelativeDir(name, p))
            }
        };
        let listen = if !cli.listen.is_empty() {
            cli.listen
        } else if let Some(l) = file.listen {
            l
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
                DEFAULT_STATE_DIR,
            )?,
            run_dir: dir("--run-dir", cli.run_dir, file.run_dir, DEFAULT_RUN_DIR)?,
            policy_dir: dir(
                "--policy-dir",
                cli.policy_dir,
                file.policy_dir,
                DEFAULT_POLICY_DIR,
            )?,
            pin_dir: dir("--pin-dir", cli.pin_dir, file.pin_dir, DEFAULT_PIN_DIR)?,
            listen,
            upstream_ca: file
                .upstream_ca
                .unwrap_or_default()
                .into_iter()
                .chain(cli.upstream_ca)
                .collect(),
            master_key_credential: cli.master_key_credential
                || file.master_key_credential.unwrap_or(false),
            audit_retention: crate::audit::Retention {
                max_age: cli
                    .audit_max_age_days
                    .or(file.audit_max_age_days)
                    .map(|d| std::time::Duration::from_secs(d.saturating_mul(86_400))),
                max_records: cli.audit_max_records.or(file.audit_max_records),
            },
            dns_port: cli.dns_port.or(file.dns_port).unwrap_or(DEFAULT_DNS_PORT),
            dns_upstream: if cli.dns_upstream.is_empty() {
                file.dns_upstream.unwrap_or_default()
            } else {
                cli.dns_upstream
            },
            require_lsm: cli.require_lsm || file.require_lsm.unwrap_or(false),
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
        };
        if config.audit_retention.max_records == Some(0) {
            return Err(ConfigError::Audit("audit_max_records must be at least 1"));
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

    #[test]
    fn defaults_are_embedded() {
        let c = Config::layer(CliConfig::default(), FileConfig::default()).expect("defaults");
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
        let file: FileConfig =
            toml::from_str("run_dir = \"/from/file\"\nstate_dir = \"/state\"").expect("toml");
        let cli = CliConfig {
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
        assert!(toml::from_str::<FileConfig>("listne = []").is_err());
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
            let cli = CliConfig {
                listen: listen.iter().map(|s| s.parse().expect("addr")).collect(),
                ..Default::default()
            };
            let err = Config::layer(cli, FileConfig::default()).expect_err("refused");
            assert!(err.to_string().contains("invalid listen address"), "{err}");
        }
    }

    #[test]
    fn relative_dirs_are_refused() {
        let cli = CliConfig {
            run_dir: Some("run".into()),
            ..Default::default()
        };
        let err = Config::layer(cli, FileConfig::default()).expect_err("refused");
        assert!(err.to_string().contains("--run-dir"), "{err}");
    }

    #[test]
    fn the_spin_window_is_layered_and_bounded() {
        let default = Config::layer(CliConfig::default(), FileConfig::default()).expect("layer");
        assert_eq!(default.spin, crate::proxy::spin::DEFAULT_WINDOW);
        let file: FileConfig = toml::from_str("spin_us = 0").expect("toml");
        let off = Config::layer(CliConfig::default(), file).expect("layer");
        assert!(off.spin.is_zero());
        let cli = CliConfig {
            spin_us: Some(250),
            ..Default::default()
        };
        let file: FileConfig = toml::from_str("spin_us = 0").expect("toml");
        let c = Config::layer(cli, file).expect("layer");
        assert_eq!(c.spin, std::time::Duration::from_micros(250));
        let cli = CliConfig {
            spin_us: Some(MAX_SPIN_US + 1),
            ..Default::default()
        };
        let err = Config::layer(cli, FileConfig::default()).expect_err("refused");
        assert!(
            err.to_string().contains("spin_us must be at most 1000"),
            "{err}"
        );
    }
}

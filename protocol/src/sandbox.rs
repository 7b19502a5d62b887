//! The sandbox handoff of the unprivileged capture mode (issue 19): how `brokerctl run
//! --unprivileged` gives brokerd the listeners it opened inside an agent's network namespace.
//!
//! brokerd, started with `--unprivileged` as a normal user, loads no eBPF. Instead each
//! `brokerctl run --unprivileged --as NAME` makes a user and network namespace for its agent,
//! in which an nft rule redirects every TCP connect to a listener and every DNS datagram to a UDP
//! socket, both opened there by brokerctl. brokerctl connects to `<run-dir>/sandbox.sock` and
//! sends, in one `sendmsg`, a [`SandboxHello`] as one JSON line with the sockets attached as
//! `SCM_RIGHTS` (in the order of [`SandboxHello::sockets`]). brokerd answers one
//! [`SandboxReply`] line. From then on brokerd accepts on those sockets, reads each connection's
//! destination with `SO_ORIGINAL_DST`, and attributes it to the agent `name`. The connection
//! to `sandbox.sock` is the sandbox's lifetime: when brokerctl closes it (the agent exited, or
//! brokerctl died), brokerd stops serving the sockets and closes its copies, and the agent's
//! connects are refused from then on.

use serde::{Deserialize, Serialize};

/// File name of the sandbox socket inside the run directory.
pub const SANDBOX_SOCKET: &str = "sandbox.sock";

/// The most sockets one hello may carry.
pub const MAX_SANDBOX_SOCKETS: usize = 8;

/// The longest hello line, in bytes.
pub const MAX_HELLO: usize = 16 * 1024;

/// What an attached socket is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxSocket {
    /// A listening TCP socket (IPv4 or IPv6) every redirected connect arrives at.
    Tcp,
    /// A bound UDP socket the agent's DNS datagrams arrive at.
    Dns,
}

/// brokerctl's one message on `sandbox.sock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxHello {
    /// The agent name the sandbox runs as (`--as agents/foo`): policy files, handles, shares,
    /// audit records and the console know it by this, as a tagged cgroup's name in root mode.
    pub name: String,
    /// The sandbox's first process, as a pid of brokerd's pid namespace: audit records name
    /// it (and its command) as the connecting process.
    pub pid: u32,
    /// The attached sockets, in order.
    pub sockets: Vec<SandboxSocket>,
}

/// brokerd's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum SandboxReply {
    /// The sockets are served for `agent` from now on.
    Serving {
        agent: String,
        /// The broker CA certificate (PEM), for the sandbox's trust stores.
        ca_pem: String,
        /// brokerd's own directories (its state, with the master key and the vault, and its
        /// policies), absolute: brokerd runs as the same uid as the agent, so the sandbox must
        /// hide them (brokerctl mounts an empty read-only tmpfs over each that exists).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        hide: Vec<std::path::PathBuf>,
    },
    /// Nothing is served; `message` says why.
    Refused { message: String },
}

/// The run directory a user's brokerd and brokerctl use when none is given: root's is
/// [`crate::DEFAULT_RUN_DIR`]; any other user's is `$XDG_RUNTIME_DIR/agent-broker`, or
/// `/tmp/agent-broker-<uid>` without it.
pub fn default_run_dir(euid: u32, xdg_runtime_dir: Option<&std::ffi::OsStr>) -> std::path::PathBuf {
    if euid == 0 {
        return crate::DEFAULT_RUN_DIR.into();
    }
    match xdg_runtime_dir.filter(|d| !d.is_empty()) {
        Some(dir) => std::path::Path::new(dir).join("agent-broker"),
        None => format!("/tmp/agent-broker-{euid}").into(),
    }
}

/// The directories brokerd and brokerctl use when none is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dirs {
    /// Vault, CA, audit log.
    pub state: std::path::PathBuf,
    /// The control and sandbox sockets.
    pub run: std::path::PathBuf,
    /// Policy files.
    pub policy: std::path::PathBuf,
}

impl Dirs {
    /// Root's (root mode): /var/lib, /run, /etc.
    pub fn system() -> Self {
        Self {
            state: crate::DEFAULT_STATE_DIR.into(),
            run: crate::DEFAULT_RUN_DIR.into(),
            policy: crate::DEFAULT_POLICY_DIR.into(),
        }
    }

    /// A user's (the unprivileged mode), from the XDG base directories and `HOME` as `env`
    /// gives them (relative or empty values are ignored, as the XDG specification says):
    /// `$XDG_STATE_HOME/agent-broker` (`~/.local/state/agent-broker`), [`default_run_dir`], and
    /// `$XDG_CONFIG_HOME/agent-broker/policies` (`~/.config/agent-broker/policies`).
    pub fn user(euid: u32, env: &dyn Fn(&str) -> Option<std::ffi::OsString>) -> Self {
        use std::path::{Path, PathBuf};
        let absolute = |k: &str| env(k).map(PathBuf::from).filter(|p| p.is_absolute());
        let home = absolute("HOME").unwrap_or_else(|| PathBuf::from("/"));
        let base = |k: &str, fallback: &str| absolute(k).unwrap_or_else(|| home.join(fallback));
        Self {
            state: base("XDG_STATE_HOME", ".local/state").join("agent-broker"),
            run: default_run_dir(
                euid,
                absolute("XDG_RUNTIME_DIR").as_deref().map(Path::as_os_str),
            ),
            policy: base("XDG_CONFIG_HOME", ".config").join("agent-broker/policies"),
        }
    }

    /// This process's user's, from its environment.
    pub fn of_this_user(euid: u32) -> Self {
        Self::user(euid, &|k| std::env::var_os(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hello_and_reply_round_trip_as_json_lines() {
        let hello = SandboxHello {
            name: "agents/foo".into(),
            pid: 42,
            sockets: vec![SandboxSocket::Tcp, SandboxSocket::Tcp, SandboxSocket::Dns],
        };
        let line = serde_json::to_string(&hello).expect("json");
        assert_eq!(
            line,
            r#"{"name":"agents/foo","pid":42,"sockets":["tcp","tcp","dns"]}"#
        );
        assert_eq!(
            serde_json::from_str::<SandboxHello>(&line).expect("json"),
            hello
        );
        let refused: SandboxReply =
            serde_json::from_str(r#"{"reply":"refused","message":"no"}"#).expect("json");
        assert_eq!(
            refused,
            SandboxReply::Refused {
                message: "no".into()
            }
        );
        // brokerd's directories to hide: optional on the wire, kept when given.
        let serving: SandboxReply =
            serde_json::from_str(r#"{"reply":"serving","agent":"a","ca_pem":"PEM"}"#)
                .expect("json");
        assert_eq!(
            serving,
            SandboxReply::Serving {
                agent: "a".into(),
                ca_pem: "PEM".into(),
                hide: vec![],
            }
        );
        let serving = SandboxReply::Serving {
            agent: "a".into(),
            ca_pem: "PEM".into(),
            hide: vec!["/home/u/.local/state/agent-broker".into()],
        };
        let line = serde_json::to_string(&serving).expect("json");
        assert_eq!(
            line,
            r#"{"reply":"serving","agent":"a","ca_pem":"PEM","hide":["/home/u/.local/state/agent-broker"]}"#
        );
        assert_eq!(
            serde_json::from_str::<SandboxReply>(&line).expect("json"),
            serving
        );
    }

    #[test]
    fn the_default_run_dir_is_roots_or_the_users_own() {
        use std::ffi::OsStr;
        assert_eq!(
            default_run_dir(0, Some(OsStr::new("/run/user/0"))),
            std::path::PathBuf::from(crate::DEFAULT_RUN_DIR)
        );
        assert_eq!(
            default_run_dir(1000, Some(OsStr::new("/run/user/1000"))),
            std::path::PathBuf::from("/run/user/1000/agent-broker")
        );
        assert_eq!(
            default_run_dir(1000, None),
            std::path::PathBuf::from("/tmp/agent-broker-1000")
        );
        assert_eq!(
            default_run_dir(1000, Some(OsStr::new(""))),
            std::path::PathBuf::from("/tmp/agent-broker-1000")
        );
    }
}

//! The agent network namespace of the unprivileged sandbox: `lo` up with default routes over
//! it, and the redirect rules, set up by the sandbox's first process (root of the first user
//! namespace, which owns the network namespace) with the `ip` and `nft` commands.
//!
//! The rules (one `inet` table, or the same with `iptables-nft-restore` and
//! `ip6tables-nft-restore` where `nft` is missing):
//!
//! - nat output: every TCP connect, loopback destinations included, goes to [`TCP_PORT`]; every
//!   UDP datagram to port 53 goes to [`DNS_PORT`]. Only a connection's first packet passes the
//!   nat hook; conntrack rewrites the rest and the replies.
//! - filter output, policy drop: packets of known connections (`established,related`: the
//!   listeners' SYN-ACKs and DNS answers, which are reply packets, and the agent's packets of a
//!   redirected connection), the redirected first packets (to 127.0.0.1 or ::1 at the two
//!   ports), and nothing else: TCP gets a reset (the connect fails with ECONNREFUSED at once),
//!   anything else ICMP administratively prohibited (EPERM / EHOSTUNREACH).
//!
//! The namespace has only `lo`, so even a packet these rules let through cannot leave it.
//! Only binaries are invoked (nftables and iproute2 are GPL; nothing of them is linked).

use std::{
    ffi::OsStr,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use super::super::LaunchError;

/// The port every TCP connect of the agent is redirected to (its listener is handed to brokerd).
pub const TCP_PORT: u16 = 15001;
/// The port every DNS datagram (UDP port 53) of the agent is redirected to.
pub const DNS_PORT: u16 = 15053;

/// Where the tools are looked for besides `PATH` (an ordinary user's `PATH` often lacks sbin).
const SBIN_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/bin"];

/// An IP version, for the iptables rule sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IpFamily {
    V4,
    V6,
}

/// The nftables rule set loaded in the agent's network namespace (`nft -f`).
pub fn nft_ruleset() -> String {
    format!(
        "table inet agent_broker {{
\tchain nat_output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta l4proto tcp redirect to :{TCP_PORT}
\t\tudp dport 53 redirect to :{DNS_PORT}
\t}}
\tchain filter_output {{
\t\ttype filter hook output priority 0; policy drop;
\t\tct state established,related accept
\t\tip daddr 127.0.0.1 tcp dport {TCP_PORT} accept
\t\tip6 daddr ::1 tcp dport {TCP_PORT} accept
\t\tip daddr 127.0.0.1 udp dport {DNS_PORT} accept
\t\tip6 daddr ::1 udp dport {DNS_PORT} accept
\t\tmeta l4proto tcp reject with tcp reset
\t\treject with icmpx admin-prohibited
\t}}
}}
"
    )
}

/// The same rules for `iptables-nft-restore` (V4) or `ip6tables-nft-restore` (V6).
pub fn iptables_ruleset(family: IpFamily) -> String {
    let (lo, prohibited) = match family {
        IpFamily::V4 => ("127.0.0.1/32", "icmp-admin-prohibited"),
        IpFamily::V6 => ("::1/128", "icmp6-adm-prohibited"),
    };
    format!(
        "*nat
:OUTPUT ACCEPT [0:0]
-A OUTPUT -p tcp -j REDIRECT --to-ports {TCP_PORT}
-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports {DNS_PORT}
COMMIT
*filter
:OUTPUT DROP [0:0]
-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A OUTPUT -d {lo} -p tcp --dport {TCP_PORT} -j ACCEPT
-A OUTPUT -d {lo} -p udp --dport {DNS_PORT} -j ACCEPT
-A OUTPUT -p tcp -j REJECT --reject-with tcp-reset
-A OUTPUT -j REJECT --reject-with {prohibited}
COMMIT
"
    )
}

/// How the rules are loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Firewall {
    Nft(PathBuf),
    IptablesNft { v4: PathBuf, v6: PathBuf },
}

/// The commands the namespace is set up with, found before anything starts.
#[derive(Clone, Debug)]
pub struct NetTools {
    pub ip: PathBuf,
    pub firewall: Firewall,
}

/// `name` in `PATH`, then in the sbin directories.
pub fn find_tool(name: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = path
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.extend(SBIN_DIRS.iter().map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

impl NetTools {
    /// Finds `ip` and `nft` (else `iptables-nft-restore` and `ip6tables-nft-restore`); the
    /// error says what is missing and which package brings it.
    pub fn find(path: Option<&OsStr>) -> Result<Self, LaunchError> {
        let ip = find_tool("ip", path).ok_or_else(|| {
            LaunchError::Invalid(
                "the unprivileged sandbox needs the `ip` command (iproute2) to set up the \
                 agent's network namespace, and it is not in PATH nor in /usr/sbin or /sbin; \
                 install iproute2 (apt-get install iproute2, dnf install iproute)"
                    .into(),
            )
        })?;
        let firewall = Self::find_firewall(path)?;
        Ok(Self { ip, firewall })
    }

    /// The rule loader alone (`brokerctl doctor` reports it).
    pub fn find_firewall(path: Option<&OsStr>) -> Result<Firewall, LaunchError> {
        if let Some(nft) = find_tool("nft", path) {
            return Ok(Firewall::Nft(nft));
        }
        match (
            find_tool("iptables-nft-restore", path),
            find_tool("ip6tables-nft-restore", path),
        ) {
            (Some(v4), Some(v6)) => Ok(Firewall::IptablesNft { v4, v6 }),
            _ => Err(LaunchError::Invalid(
                "the unprivileged sandbox redirects the agent's connections with nftables, and \
                 neither `nft` nor both `iptables-nft-restore` and `ip6tables-nft-restore` are \
                 in PATH or /usr/sbin, /sbin; install nftables (apt-get install nftables, dnf \
                 install nftables)"
                    .into(),
            )),
        }
    }

    /// Brings `lo` up, adds the default routes over it and loads the rules. Run as root of the
    /// user namespace that owns the network namespace. Returns whether IPv6 is there (a kernel
    /// without it gets IPv4 only; the rules refuse IPv6 either way).
    pub fn configure(&self) -> Result<bool, LaunchError> {
        run(&self.ip, &["link", "set", "lo", "up"], None)?;
        // Without a route a connect fails with ENETUNREACH before the nat hook runs; without
        // `src` IPv4 would pick 0.0.0.0 as the source.
        run(
            &self.ip,
            &["route", "add", "default", "dev", "lo", "src", "127.0.0.1"],
            None,
        )?;
        let ipv6 = Path::new("/proc/sys/net/ipv6").is_dir()
            && run(
                &self.ip,
                &["-6", "route", "add", "default", "dev", "lo"],
                None,
            )
            .is_ok();
        match &self.firewall {
            Firewall::Nft(nft) => run(nft, &["-f", "/dev/stdin"], Some(&nft_ruleset()))?,
            Firewall::IptablesNft { v4, v6 } => {
                run(v4, &[], Some(&iptables_ruleset(IpFamily::V4)))?;
                run(v6, &[], Some(&iptables_ruleset(IpFamily::V6)))?;
            }
        }
        Ok(ipv6)
    }
}

/// Runs `program args` with `input` on its standard input; a failure names the command and
/// carries what it printed.
fn run(program: &Path, args: &[&str], input: Option<&str>) -> Result<(), LaunchError> {
    let shown = format!("{} {}", program.display(), args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| LaunchError::Io {
            what: format!("running {shown}"),
            source: e,
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| LaunchError::Io {
                what: format!("writing the rules to {shown}"),
                source: e,
            })?;
    }
    let out = child.wait_with_output().map_err(|e| LaunchError::Io {
        what: format!("waiting for {shown}"),
        source: e,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LaunchError::Invalid(format!(
            "{shown} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tcp_connect_and_dns_datagram_is_redirected_and_the_rest_refused() {
        let rules = nft_ruleset();
        // No exception for loopback: every TCP connect goes to brokerd, as in root mode.
        assert!(!rules.contains("return"), "{rules}");
        assert!(
            rules.contains("meta l4proto tcp redirect to :15001"),
            "{rules}"
        );
        assert!(rules.contains("udp dport 53 redirect to :15053"), "{rules}");
        assert!(rules.contains("policy drop;"), "{rules}");
        let accept_known = rules.find("ct state established,related accept");
        let reset = rules.find("reject with tcp reset");
        assert!(accept_known.is_some() && accept_known < reset, "{rules}");
        assert!(
            rules.contains("reject with icmpx admin-prohibited"),
            "{rules}"
        );
    }

    #[test]
    fn the_iptables_rules_say_the_same_for_each_family() {
        let v4 = iptables_ruleset(IpFamily::V4);
        let v6 = iptables_ruleset(IpFamily::V6);
        for (rules, lo) in [(&v4, "127.0.0.1/32"), (&v6, "::1/128")] {
            assert!(rules.contains("-A OUTPUT -p tcp -j REDIRECT --to-ports 15001"));
            assert!(rules.contains("-A OUTPUT -p udp --dport 53 -j REDIRECT --to-ports 15053"));
            assert!(rules.contains(":OUTPUT DROP"));
            assert!(rules.contains(&format!("-d {lo} -p tcp --dport 15001 -j ACCEPT")));
            assert!(rules.contains(&format!("-d {lo} -p udp --dport 15053 -j ACCEPT")));
            assert_eq!(rules.matches("COMMIT").count(), 2);
        }
        assert!(v4.contains("icmp-admin-prohibited") && v6.contains("icmp6-adm-prohibited"));
    }

    /// Both rule sets load into a throwaway network namespace (util-linux `unshare --net`,
    /// as root; the namespace goes with the command) with the tools this host has.
    #[test]
    fn both_rule_sets_load_in_a_fresh_network_namespace() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test loads the rules in a throwaway network namespace and must run as root"
        );
        let path = std::env::var_os("PATH");
        let load = |tool: &Path, args: &[&str], rules: &str| {
            let mut child = Command::new("unshare")
                .arg("--net")
                .arg(tool)
                .args(args)
                .stdin(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("unshare");
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(rules.as_bytes())
                .expect("rules");
            let out = child.wait_with_output().expect("wait");
            assert!(
                out.status.success(),
                "{} {args:?}: {}",
                tool.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let nft = find_tool("nft", path.as_deref()).expect("nft (apt-get install nftables)");
        load(&nft, &["-f", "/dev/stdin"], &nft_ruleset());
        for (tool, family) in [
            ("iptables-nft-restore", IpFamily::V4),
            ("ip6tables-nft-restore", IpFamily::V6),
        ] {
            let tool =
                find_tool(tool, path.as_deref()).expect("iptables-nft (apt-get install iptables)");
            load(&tool, &[], &iptables_ruleset(family));
        }
    }

    #[test]
    fn tools_are_found_in_path_then_in_sbin() {
        let dir = tempfile::tempdir().expect("tempdir");
        let name = "agent-broker-test-tool";
        let tool = dir.path().join(name);
        std::fs::write(&tool, "#!/bin/sh\n").expect("write");
        assert_eq!(find_tool(name, Some(dir.path().as_os_str())), None);
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        assert_eq!(find_tool(name, Some(dir.path().as_os_str())), Some(tool));
        assert_eq!(
            find_tool("no-such-tool-agent-broker", Some(dir.path().as_os_str())),
            None
        );
    }
}

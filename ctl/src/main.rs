//! brokerctl: the operator's command line for brokerd. See `brokerctl --help`.

use agent_broker_core::fmt::error_chain;
use std::{ffi::OsString, path::PathBuf, process::ExitCode};

mod doctor;
mod launcher;

use agent_broker_core::cgroup::{CgroupPath, CgroupRoot};
use agent_broker_protocol::{ConnectionRecord, Outcome, Request, Response, StatusReport};
use agent_broker_protocol::{DEFAULT_RUN_DIR, client::Client};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// Operator CLI for brokerd: tag cgroups so their connections go through the broker, start
/// agents inside them, and see what brokerd is doing.
///
/// Cgroup PATHs are relative to the cgroup2 mount (found from /proc/self/mountinfo), e.g.
/// agents/demo. The root, paths with `..`, and brokerd's own cgroup or its ancestors are refused.
#[derive(Debug, Parser)]
#[command(name = "brokerctl", version)]
struct Args {
    /// Run directory of the brokerd to talk to (where control.sock lives).
    #[arg(long, value_name = "DIR", env = "AGENT_BROKER_RUN_DIR", default_value = DEFAULT_RUN_DIR, global = true)]
    run_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tag a cgroup: every TCP connection made inside it (and below it) goes to brokerd.
    Attach {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// Create the cgroup if it does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Untag a cgroup: its connections are no longer redirected.
    Detach {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
    },
    /// Start a command inside a tagged cgroup (tagging it first if needed), sandboxed.
    ///
    /// brokerctl asks brokerd to tag the cgroup (CMD is not started if brokerd cannot be
    /// reached), then starts CMD directly inside the cgroup (clone3 CLONE_INTO_CGROUP) with only
    /// stdin, stdout and stderr open, and before executing it: a private mount namespace without
    /// cgroupfs and bpffs, with the system CA bundle plus the broker CA mounted read-only over the
    /// standard bundle paths (and SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, REQUESTS_CA_BUNDLE,
    /// CURL_CA_BUNDLE, GIT_SSL_CAINFO pointing at it); an unprivileged identity (--user, or root
    /// inside a user namespace: --userns, the default); no capabilities and no_new_privs; a
    /// Landlock domain (read-only file system except the work directory, --allow-write
    /// directories and /tmp, /var/tmp, /dev/shm; no signals or abstract UNIX sockets outside it);
    /// a seccomp filter refusing AF_PACKET, AF_VSOCK, AF_XDP, AF_SMC, AF_KEY and AF_ALG sockets,
    /// bpf, ptrace, process_vm_readv/writev, perf_event_open, keyrings, modules, kexec,
    /// userfaultfd and io_uring. brokerctl waits for CMD, forwards SIGINT, SIGTERM, SIGHUP and
    /// SIGQUIT to it, and exits with its status (128 + signal if it was killed; 126 if it could
    /// not be started). Needs root.
    Run {
        /// cgroup path relative to the cgroup2 mount.
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// Create the cgroup if it does not exist.
        #[arg(long)]
        create: bool,
        /// Run as this unprivileged uid (and gid; default: the same number). 0 is refused.
        #[arg(long, value_name = "UID[:GID]", value_parser = parse_identity, conflicts_with = "userns")]
        user: Option<launcher::Identity>,
        /// Run as root inside a new user namespace whose root maps to --userns-uid on the host
        /// (the default when --user is not given).
        #[arg(long)]
        userns: bool,
        /// The host uid (and gid) the user namespace's root maps to.
        #[arg(long, value_name = "UID", default_value_t = 65534, value_parser = clap::value_parser!(u32).range(1..))]
        userns_uid: u32,
        /// Working directory of CMD, writable under Landlock [default: the current directory, or
        /// /tmp when the agent's identity cannot enter it].
        #[arg(long, value_name = "DIR")]
        workdir: Option<PathBuf>,
        /// A directory CMD may write besides the work directory and the scratch places
        /// (repeatable).
        #[arg(long, value_name = "DIR")]
        allow_write: Vec<PathBuf>,
        /// The command and its arguments.
        #[arg(required = true, last = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Whether brokerd is up, its listeners, and the tagged cgroups with their process counts.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Store, list, rotate and remove secrets in brokerd's encrypted vault.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// The broker CA that signs the certificates agents see.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Handles: opaque `brk_...` tokens an agent may use in place of a secret.
    #[command(subcommand)]
    Handle(HandleCommand),
    /// Check, reload, show and explain the policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Live console: brokered calls and denials as they happen (q to quit, ? for keys).
    Console,
    /// Check this host for what agent-broker needs: kernel and hooks, BTF, cgroup v2, bpffs,
    /// Landlock, brokerd's tagged cgroups and pinned links, processes in them that lack the
    /// launcher's protections (real root, capabilities...), the BPF LSM layer, brokerd's
    /// hardening, the broker CA in the system store, master key and state dir permissions, and
    /// relevant sysctls. Prints what is missing and how to fix it; exits 1 if anything failed.
    Doctor {
        /// One JSON object per check.
        #[arg(long)]
        json: bool,
        /// brokerd's state directory (for the key file and directory checks).
        #[arg(long, value_name = "DIR", default_value = agent_broker_protocol::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// The audit log: every brokered call, denial, TLS failure, handle misuse, attach, detach
    /// and policy reload. Secrets appear by name only.
    Logs(LogsArgs),
    /// The most recent connections brokerd accepted, oldest first.
    Connections {
        /// How many to show.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print them as a JSON array.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct LogsArgs {
    #[command(subcommand)]
    command: Option<LogsCommand>,
    /// Keep printing new records as they are written.
    #[arg(long, short)]
    follow: bool,
    /// Only records of this cgroup and the cgroups below it.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<String>,
    /// Only denials and failures.
    #[arg(long)]
    denied: bool,
    /// Only records since TIME: RFC 3339 (2026-11-23T10:00:00Z) or an age (15m, 2h, 1d).
    #[arg(long, value_name = "TIME", value_parser = parse_since)]
    since: Option<u64>,
    /// At most the newest N stored records (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// One JSON object per line, for shipping to other systems.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum LogsCommand {
    /// Check the hash chain; names the first record that was edited, removed or reordered.
    Verify,
}

/// `--since`: an RFC 3339 time or an age, as Unix milliseconds.
fn parse_identity(s: &str) -> Result<launcher::Identity, String> {
    launcher::Identity::parse_user(s)
}

fn parse_since(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now();
    let at = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => t,
        Err(_) => {
            let age = humantime::parse_duration(s)
                .map_err(|_| format!("invalid time {s:?}: give RFC 3339 or an age like 15m"))?;
            now.checked_sub(age).ok_or("that age reaches before 1970")?
        }
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| "times before 1970 are not supported".into())
}

#[derive(Debug, Subcommand)]
enum SecretCommand {
    /// Store a secret (a new version if NAME exists). The value is read from stdin when it is
    /// not a terminal, else from a prompt that does not echo; never from the command line.
    Set {
        /// Secret name: letters, digits, `_`, `-`, `.`; starts with a letter.
        name: String,
    },
    /// Replace the value of an existing secret (its version goes up). Value as for `set`.
    Rotate { name: String },
    /// Names, versions and dates of the stored secrets. Values are never shown.
    List {
        /// Print as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret.
    Rm { name: String },
}

#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Write the broker CA certificate (PEM) to FILE, or to stdout.
    Export {
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Add the broker CA to the system trust store (Debian: update-ca-certificates).
    ///
    /// curl, Python's ssl module and most OpenSSL-based tools then trust it. Others keep their
    /// own stores: Node.js needs NODE_EXTRA_CA_CERTS=/usr/local/share/ca-certificates/agent-broker.crt
    /// (or --use-openssl-ca); Python requests/httpx use certifi unless REQUESTS_CA_BUNDLE or
    /// SSL_CERT_FILE points at /etc/ssl/certs/ca-certificates.crt; Go, Rust rustls-native-certs
    /// and Java read the system store (Java after its own cacerts update).
    Install,
}

#[derive(Debug, Subcommand)]
enum HandleCommand {
    /// Mint a handle for SECRET, usable only from the cgroup subtree PATH towards HOST until it
    /// expires. Prints the token once; brokerd keeps only its hash.
    Mint {
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        #[arg(long, value_name = "NAME")]
        secret: String,
        #[arg(long, value_name = "HOST")]
        host: String,
        /// Lifetime, e.g. 30s, 15m, 2h, 1d; at least 1s, at most 365d.
        #[arg(long, default_value = "15m", value_parser = agent_broker_core::handle::parse_ttl)]
        ttl: std::time::Duration,
    },
    /// The handles (never their tokens).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a handle by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate policy files offline (no brokerd needed): the files of DIR, with FILES added or
    /// replacing the ones of the same name, are loaded together as brokerd would load them.
    Check {
        /// The policy directory the files belong to.
        #[arg(long, value_name = "DIR", default_value = agent_broker_protocol::DEFAULT_POLICY_DIR)]
        policy_dir: PathBuf,
        /// Files to check; none: the directory as it is.
        files: Vec<PathBuf>,
    },
    /// Make brokerd load its policy directory now (it also does so within a second of a change).
    Reload,
    /// The effective policy of a cgroup.
    Show {
        #[arg(long, value_name = "PATH")]
        cgroup: String,
    },
    /// Would METHOD URL from the cgroup be allowed? Prints the rule and file that decide.
    Explain {
        #[arg(long, value_name = "PATH")]
        cgroup: String,
        /// HTTP method, e.g. GET.
        method: String,
        /// Full URL, e.g. https://api.example.test/v1/models.
        url: String,
    },
}

/// Where `brokerctl ca install` puts the CA for update-ca-certificates.
const SYSTEM_CA_PATH: &str = "/usr/local/share/ca-certificates/agent-broker.crt";

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("brokerctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        Command::Attach { cgroup, create } => {
            let path = CgroupPath::parse(&cgroup)?;
            let (tagged, already) = attach(&args.run_dir, &path, create)?;
            if already && tagged.path == path.to_string() {
                println!("{} is already tagged", tagged.path);
            } else if already {
                println!("{path} is covered by tagged cgroup {}", tagged.path);
            } else {
                println!("tagged {} (cgroup id {})", tagged.path, tagged.id);
            }
        }
        Command::Detach { cgroup } => {
            let path = CgroupPath::parse(&cgroup)?;
            match call(
                &args.run_dir,
                &Request::Detach {
                    cgroup: path.to_string(),
                },
            )? {
                Response::Detached { cgroup } => println!("untagged {cgroup}"),
                other => return Err(unexpected(other)),
            }
        }
        Command::Run {
            cgroup,
            create,
            user,
            userns: _,
            userns_uid,
            workdir,
            allow_write,
            command,
        } => {
            if !nix::unistd::geteuid().is_root() {
                bail!(
                    "brokerctl run needs root: it starts the agent inside its cgroup with a \
                     private mount namespace and an identity of its own"
                );
            }
            let path = CgroupPath::parse(&cgroup)?;
            attach(&args.run_dir, &path, create)?;
            let pem = match call(&args.run_dir, &Request::CaCert)? {
                Response::CaCert { pem } => pem,
                other => return Err(unexpected(other)),
            };
            let root = CgroupRoot::discover()?;
            let (program, rest) = command.split_first().context("no command given")?;
            let workdir_given = workdir.is_some();
            let workdir = match workdir {
                Some(w) => w,
                None => std::env::current_dir().context("reading the current directory")?,
            };
            let spec = launcher::LaunchSpec {
                cgroup_dir: root.dir(&path),
                identity: user.unwrap_or(launcher::Identity::UserNs {
                    host_uid: userns_uid,
                    host_gid: userns_uid,
                }),
                workdir,
                workdir_given,
                allow_write,
                ca_bundle: launcher::merged_ca_bundle(&pem),
                program: program.clone(),
                args: rest.to_vec(),
            };
            let code = launcher::launch(&spec)?;
            std::process::exit(code);
        }
        Command::Status { json } => match call(&args.run_dir, &Request::Status)? {
            Response::Status(status) if json => {
                println!("{}", serde_json::to_string_pretty(&status)?)
            }
            Response::Status(status) => print_status(&status),
            other => return Err(unexpected(other)),
        },
        Command::Secret(cmd) => secret(&args.run_dir, cmd)?,
        Command::Ca(cmd) => ca(&args.run_dir, cmd)?,
        Command::Handle(cmd) => handle(&args.run_dir, cmd)?,
        Command::Policy(cmd) => policy(&args.run_dir, cmd)?,
        Command::Console => agent_broker_console::run(&args.run_dir)?,
        Command::Doctor { json, state_dir } => {
            let checks = doctor::run_checks(&doctor::DoctorOptions {
                run_dir: &args.run_dir,
                state_dir: &state_dir,
            });
            if !doctor::print(&checks, json) {
                std::process::exit(1);
            }
        }
        Command::Logs(logs_args) => logs(&args.run_dir, logs_args)?,
        Command::Connections { limit, json } => {
            match call(&args.run_dir, &Request::Connections { limit })? {
                Response::Connections { connections } if json => {
                    println!("{}", serde_json::to_string_pretty(&connections)?)
                }
                Response::Connections { connections } => print_connections(&connections),
                other => return Err(unexpected(other)),
            }
        }
    }
    Ok(())
}

fn logs(run_dir: &std::path::Path, args: LogsArgs) -> anyhow::Result<()> {
    if let Some(LogsCommand::Verify) = args.command {
        return match call(run_dir, &Request::LogsVerify)? {
            Response::Verified { report } => match report.first_bad {
                None => {
                    println!("audit log intact: {} record(s) verified", report.records);
                    Ok(())
                }
                Some(bad) => bail!(
                    "audit log tampered: record {} {} ({} record(s) checked)",
                    bad.seq,
                    bad.problem,
                    report.records
                ),
            },
            other => Err(unexpected(other)),
        };
    }
    let cgroup = match &args.cgroup {
        Some(c) => Some(CgroupPath::parse(c)?.to_string()),
        None => None,
    };
    let request = Request::Logs {
        filter: agent_broker_protocol::LogFilter {
            cgroup,
            denied_only: args.denied,
            since_ms: args.since,
            limit: args.limit,
        },
        follow: args.follow,
    };
    let mut client = Client::connect(run_dir)?;
    let mut response = client.call(&request)?;
    if !args.json {
        println!(
            "{:<8} {:<12} {:<22} {:>7} {:<12} {:<6} {:<24} {:<24} {:>6} {:<12} DETAIL",
            "SEQ", "TIME", "AGENT", "PID", "COMM", "METHOD", "HOST", "PATH", "STATUS", "SECRETS"
        );
    }
    loop {
        match response {
            Response::Event { event } if args.json => {
                println!("{}", serde_json::to_string(&event)?)
            }
            Response::Event { event } => print_event(&event),
            Response::EndOfLog if !args.follow => return Ok(()),
            Response::EndOfLog => {}
            Response::Error { kind, message } => bail!("brokerd refused ({kind}): {message}"),
            other => return Err(unexpected(other)),
        }
        response = client.next_streamed()?;
    }
}

fn print_event(e: &agent_broker_protocol::AuditEvent) {
    let time = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.time_ms),
    )
    .to_string();
    let time = time.get(11..23).unwrap_or(&time).to_string();
    let kind = e.kind.map(|k| k.to_string()).unwrap_or_default();
    let detail = match (&e.decision, &e.reason) {
        (Some(d), Some(r)) => format!("{kind} {d}: {r}"),
        (Some(d), None) => format!("{kind} {d} {}", e.rule.as_deref().unwrap_or("")),
        (None, Some(r)) => format!("{kind}: {r}"),
        (None, None) => kind,
    };
    println!(
        "{:<8} {:<12} {:<22} {:>7} {:<12} {:<6} {:<24} {:<24} {:>6} {:<12} {}",
        e.seq,
        time,
        e.cgroup.as_deref().unwrap_or("-"),
        e.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        e.comm.as_deref().unwrap_or("-"),
        e.method.as_deref().unwrap_or("-"),
        e.host.as_deref().unwrap_or("-"),
        e.path.as_deref().unwrap_or("-"),
        e.status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        if e.secrets.is_empty() {
            "-".to_string()
        } else {
            e.secrets.join(",")
        },
        detail
    );
}

fn policy(run_dir: &std::path::Path, cmd: PolicyCommand) -> anyhow::Result<()> {
    match cmd {
        PolicyCommand::Check { policy_dir, files } => {
            let mut set: std::collections::BTreeMap<std::ffi::OsString, (PathBuf, String)> =
                std::collections::BTreeMap::new();
            if policy_dir.is_dir() {
                for entry in std::fs::read_dir(&policy_dir)
                    .with_context(|| format!("reading {}", policy_dir.display()))?
                {
                    let path = entry?.path();
                    let name = path
                        .file_name()
                        .map(|n| n.to_os_string())
                        .unwrap_or_default();
                    let is_policy = path.extension().is_some_and(|e| e == "toml")
                        && !name.to_string_lossy().starts_with('.')
                        && path.is_file();
                    if is_policy {
                        let text = std::fs::read_to_string(&path)
                            .with_context(|| format!("reading {}", path.display()))?;
                        set.insert(name, (path, text));
                    }
                }
            } else if files.is_empty() {
                bail!(
                    "{} is not a directory; give files to check or --policy-dir",
                    policy_dir.display()
                );
            }
            for path in &files {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                let name = path
                    .file_name()
                    .map(|n| n.to_os_string())
                    .unwrap_or_default();
                set.insert(name, (path.clone(), text));
            }
            let count = set.len();
            agent_broker_core::policy::Policy::from_files(set.into_values().collect())
                .map_err(|e| anyhow::anyhow!("{}", error_chain(&e)))?;
            println!("policy ok: {count} file(s)");
            Ok(())
        }
        PolicyCommand::Reload => match call(run_dir, &Request::PolicyReload)? {
            Response::PolicyReloaded { files } => {
                println!("policy reloaded: {files} file(s)");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        PolicyCommand::Show { cgroup } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            match call(run_dir, &Request::PolicyShow { cgroup })? {
                Response::PolicyText { text } => {
                    print!("{text}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        PolicyCommand::Explain {
            cgroup,
            method,
            url,
        } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            match call(
                run_dir,
                &Request::PolicyExplain {
                    cgroup,
                    method,
                    url,
                },
            )? {
                Response::PolicyExplained { text, .. } => {
                    println!("{text}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
    }
}

fn secret(run_dir: &std::path::Path, cmd: SecretCommand) -> anyhow::Result<()> {
    match cmd {
        SecretCommand::Set { name } => store_secret(run_dir, name, false),
        SecretCommand::Rotate { name } => store_secret(run_dir, name, true),
        SecretCommand::List { json } => match call(run_dir, &Request::SecretList)? {
            Response::Secrets { secrets } if json => {
                println!("{}", serde_json::to_string_pretty(&secrets)?);
                Ok(())
            }
            Response::Secrets { secrets } => {
                println!(
                    "{:<32} {:>8} {:<20} {:<20}",
                    "NAME", "VERSION", "CREATED", "UPDATED"
                );
                for s in secrets {
                    println!(
                        "{:<32} {:>8} {:<20} {:<20}",
                        s.name,
                        s.version,
                        date(s.created_unix),
                        date(s.updated_unix)
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        SecretCommand::Rm { name } => match call(run_dir, &Request::SecretRemove { name })? {
            Response::SecretRemoved { name } => {
                println!("removed secret {name}");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

fn store_secret(run_dir: &std::path::Path, name: String, rotate: bool) -> anyhow::Result<()> {
    use std::io::{IsTerminal as _, Read as _};
    let value = if std::io::stdin().is_terminal() {
        rpassword::prompt_password(format!("value for {name} (not echoed): "))
            .context("reading the value")?
    } else {
        let mut v = String::new();
        std::io::stdin()
            .read_to_string(&mut v)
            .context("reading the value from stdin")?;
        v
    };
    let value = agent_broker_protocol::SecretInput::new(value);
    match call(
        run_dir,
        &Request::SecretSet {
            name,
            value,
            rotate,
        },
    )? {
        Response::SecretStored { secret } => {
            println!("stored secret {} version {}", secret.name, secret.version);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

fn ca(run_dir: &std::path::Path, cmd: CaCommand) -> anyhow::Result<()> {
    let pem = match call(run_dir, &Request::CaCert)? {
        Response::CaCert { pem } => pem,
        other => return Err(unexpected(other)),
    };
    match cmd {
        CaCommand::Export { out: None } => print!("{pem}"),
        CaCommand::Export { out: Some(path) } => {
            write_atomically(&path, pem.as_bytes())?;
            println!("wrote the broker CA to {}", path.display());
        }
        CaCommand::Install => {
            let path = std::path::Path::new(SYSTEM_CA_PATH);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            write_atomically(path, pem.as_bytes())?;
            let status = std::process::Command::new("update-ca-certificates")
                .status()
                .context("running update-ca-certificates (Debian package ca-certificates)")?;
            if !status.success() {
                bail!("update-ca-certificates failed ({status})");
            }
            println!(
                "installed the broker CA as {SYSTEM_CA_PATH} and updated the system trust store"
            );
            println!(
                "Node.js: set NODE_EXTRA_CA_CERTS={SYSTEM_CA_PATH}; Python requests/httpx: set REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt"
            );
        }
    }
    Ok(())
}

fn handle(run_dir: &std::path::Path, cmd: HandleCommand) -> anyhow::Result<()> {
    match cmd {
        HandleCommand::Mint {
            cgroup,
            secret,
            host,
            ttl,
        } => {
            let cgroup = CgroupPath::parse(&cgroup)?.to_string();
            let request = Request::HandleMint {
                cgroup,
                secret,
                host,
                ttl_secs: ttl.as_secs(),
            };
            match call(run_dir, &request)? {
                Response::HandleMinted { token, handle } => {
                    eprintln!(
                        "handle {} for {} towards {} from {}, expires {}",
                        handle.id,
                        handle.secret,
                        handle.host,
                        handle.cgroup,
                        date(handle.expires_unix)
                    );
                    println!("{token}");
                    Ok(())
                }
                other => Err(unexpected(other)),
            }
        }
        HandleCommand::List { json } => match call(run_dir, &Request::HandleList)? {
            Response::Handles { handles } if json => {
                println!("{}", serde_json::to_string_pretty(&handles)?);
                Ok(())
            }
            Response::Handles { handles } => {
                println!(
                    "{:<12} {:<24} {:<20} {:<28} {:<20} STATE",
                    "ID", "CGROUP", "SECRET", "HOST", "EXPIRES"
                );
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                for h in handles {
                    let state = if h.revoked {
                        "revoked"
                    } else if h.expires_unix <= now {
                        "expired"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<12} {:<24} {:<20} {:<28} {:<20} {state}",
                        h.id,
                        h.cgroup,
                        h.secret,
                        h.host,
                        date(h.expires_unix)
                    );
                }
                Ok(())
            }
            other => Err(unexpected(other)),
        },
        HandleCommand::Revoke { id } => match call(run_dir, &Request::HandleRevoke { id })? {
            Response::HandleRevoked { id } => {
                println!("revoked handle {id}");
                Ok(())
            }
            other => Err(unexpected(other)),
        },
    }
}

/// Writes a file atomically, naming it in the error.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    agent_broker_core::fs::write_file_atomically(path, bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS` UTC.
fn date(unix: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

fn attach(
    run_dir: &std::path::Path,
    path: &CgroupPath,
    create: bool,
) -> anyhow::Result<(agent_broker_protocol::TaggedCgroup, bool)> {
    let request = Request::Attach {
        cgroup: path.to_string(),
        create,
    };
    match call(run_dir, &request)? {
        Response::Attached { cgroup, already } => Ok((cgroup, already)),
        other => Err(unexpected(other)),
    }
}

/// One request, one answer; an error answer becomes an error.
fn call(run_dir: &std::path::Path, request: &Request) -> anyhow::Result<Response> {
    let mut client = Client::connect(run_dir)?;
    match client.call(request)? {
        Response::Error { kind, message } => bail!("brokerd refused ({kind}): {message}"),
        other => Ok(other),
    }
}

fn unexpected(response: Response) -> anyhow::Error {
    anyhow::anyhow!("unexpected answer from brokerd: {response:?}")
}

fn print_status(s: &StatusReport) {
    println!("brokerd {} is up (pid {})", s.version, s.pid);
    let listeners: Vec<String> = s.listeners.iter().map(ToString::to_string).collect();
    println!("listening on   {}", listeners.join(", "));
    println!("cgroup2 mount  {}", s.cgroup_root);
    println!("pin dir        {}", s.pin_dir);
    if !s.dns_listeners.is_empty() {
        let dns: Vec<String> = s.dns_listeners.iter().map(ToString::to_string).collect();
        println!("dns (udp)      {}", dns.join(", "));
    }
    if !s.hooks.is_empty() {
        println!("hooks          {}", s.hooks.join(" "));
    }
    if !s.lsm.is_empty() {
        println!("bpf lsm        {}", s.lsm);
    }
    if !s.hardening.is_empty() {
        println!("brokerd        {}", s.hardening);
    }
    for p in &s.unprotected {
        println!(
            "unprotected    pid {} ({}) in {}: {}",
            p.pid,
            p.comm,
            p.cgroup,
            p.missing.join("; ")
        );
    }
    println!(
        "kernel         {} redirected, {} refused, {} not re-keyed",
        s.counters.redirected, s.counters.refused, s.counters.rekey_failed
    );
    let c = &s.counters;
    println!(
        "               {} DNS redirected, {} UDP refused, {} sockets refused, {} binds refused",
        c.dns_redirected, c.udp_refused, c.socket_refused, c.bind_refused
    );
    println!(
        "               {} egress and {} ingress packets dropped, {} from other netns refused",
        c.egress_dropped, c.ingress_dropped, c.netns_refused
    );
    println!(
        "policy         {} ({} file(s), loaded {})",
        s.policy.dir,
        s.policy.files,
        date(s.policy.loaded_unix)
    );
    if let Some(e) = &s.policy.error {
        println!(
            "policy error   the newest files did not load, the previous policy is active: {e}"
        );
    }
    if s.cgroups.is_empty() {
        println!("no tagged cgroups");
        return;
    }
    println!(
        "{:<40} {:>10} {:>10} {:>6}",
        "TAGGED CGROUP", "ID", "PROCESSES", "LINKS"
    );
    for c in &s.cgroups {
        println!(
            "{:<40} {:>10} {:>10} {:>6}",
            c.path, c.id, c.processes, c.links
        );
    }
}

fn print_connections(records: &[ConnectionRecord]) {
    println!(
        "{:<14} {:<24} {:>8} {:<16} {:<28} OUTCOME",
        "TIME(ms)", "CGROUP", "PID", "COMM", "ORIGINAL DST"
    );
    for r in records {
        let outcome = match &r.outcome {
            Outcome::Brokered => "brokered".to_string(),
            Outcome::Refused { reason } => format!("refused: {reason}"),
        };
        match &r.origin {
            Some(o) => println!(
                "{:<14} {:<24} {:>8} {:<16} {:<28} {}",
                r.time_ms,
                o.cgroup,
                o.pid,
                o.comm,
                o.original_dst.to_string(),
                outcome
            ),
            None => println!(
                "{:<14} {:<24} {:>8} {:<16} {:<28} {}",
                r.time_ms,
                "?",
                "?",
                "?",
                r.peer.to_string(),
                outcome
            ),
        }
    }
}

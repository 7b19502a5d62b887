//! `brokerctl attach --container`: find a running container's init process through its
//! runtime's own CLI (`podman inspect`, `docker inspect`, containerd's `ctr task ls`), so the
//! container can be tagged by name or ID instead of by a cgroup path the runtime chose.
//!
//! It only asks the runtime; it never changes a container, and never guesses a runtime's cgroup
//! layout (paths such as `libpod_parent/libpod-<id>` or `system.slice/docker-<id>.scope` come
//! from the kernel's `/proc/PID/cgroup` of the process the runtime names).

use std::{
    ffi::OsStr,
    fmt, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use agent_broker_core::cgroup::CgroupPath;

/// A container runtime whose CLI can name a container's init process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Runtime {
    Podman,
    Docker,
    /// containerd, through its own CLI `ctr` (never picked unless named).
    Containerd,
}

impl Runtime {
    /// The order in which runtimes are tried when none is named (containerd's `ctr` needs a
    /// namespace and a socket, so it is only asked when named).
    const PREFERENCE: [Runtime; 2] = [Runtime::Podman, Runtime::Docker];

    /// The runtime's CLI program, looked up on PATH.
    fn program(self) -> &'static str {
        match self {
            Runtime::Podman => "podman",
            Runtime::Docker => "docker",
            Runtime::Containerd => "ctr",
        }
    }

    /// What to look for on PATH when the runtime's name is not its CLI's.
    fn cli_hint(self) -> &'static str {
        match self {
            Runtime::Containerd => " (its CLI is `ctr`)",
            Runtime::Podman | Runtime::Docker => "",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Runtime::Podman => "podman",
            Runtime::Docker => "docker",
            Runtime::Containerd => "containerd",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// containerd's namespace when neither `--namespace` nor `CONTAINERD_NAMESPACE` names one
/// (Kubernetes pods run in `k8s.io`).
pub const CONTAINERD_DEFAULT_NAMESPACE: &str = "default";
/// containerd's socket when neither `--address` nor `CONTAINERD_ADDRESS` names one.
pub const CONTAINERD_DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// How long `ctr` may try to connect to containerd before it gives up.
const CTR_CONNECT_TIMEOUT: &str = "5s";

/// Where containerd keeps a container: its socket and namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Containerd {
    pub address: String,
    pub namespace: String,
}

impl Containerd {
    /// The given values, else `CONTAINERD_ADDRESS` / `CONTAINERD_NAMESPACE` (as `ctr` reads
    /// them), else containerd's defaults.
    pub fn resolve(address: Option<String>, namespace: Option<String>) -> Self {
        Self::resolve_with(address, namespace, |var| std::env::var(var).ok())
    }

    /// [`Containerd::resolve`] with the environment `env` (an empty value counts as unset).
    fn resolve_with(
        address: Option<String>,
        namespace: Option<String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let env = |var: &str| env(var).filter(|v| !v.is_empty());
        Containerd {
            address: address
                .or_else(|| env("CONTAINERD_ADDRESS"))
                .unwrap_or_else(|| CONTAINERD_DEFAULT_ADDRESS.to_owned()),
            namespace: namespace
                .or_else(|| env("CONTAINERD_NAMESPACE"))
                .unwrap_or_else(|| CONTAINERD_DEFAULT_NAMESPACE.to_owned()),
        }
    }
}

/// Why a container could not be resolved to a process.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("no container runtime found: neither podman nor docker is on PATH")]
    NoRuntime,
    #[error("container runtime {0} is not on PATH{hint}", hint = .0.cli_hint())]
    RuntimeMissing(Runtime),
    #[error("{runtime} has no container named {name:?}")]
    NotFound { runtime: Runtime, name: String },
    #[error("container {name:?} is not running ({runtime} reports no process for it)")]
    NotRunning { runtime: Runtime, name: String },
    #[error(
        "containerd has no task for container {name:?} in namespace {namespace:?} (no such \
         container, or it was never started; Kubernetes pods are in namespace \"k8s.io\")"
    )]
    NoTask { name: String, namespace: String },
    #[error("containerd task {name:?} (namespace {namespace:?}) is {status}, not running")]
    TaskNotRunning {
        name: String,
        namespace: String,
        status: String,
    },
    #[error("cannot run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`ctr --address {address} --namespace {namespace} task ls` failed: {stderr}")]
    TaskList {
        address: String,
        namespace: String,
        stderr: String,
    },
    #[error("`ctr task ls` printed {line:?}, not `TASK PID STATUS` columns")]
    TaskListUnparsable { line: String },
    #[error("`{runtime} inspect {name}` failed: {stderr}")]
    Inspect {
        runtime: Runtime,
        name: String,
        stderr: String,
    },
    #[error("`{runtime} inspect` printed {output:?}, not `<running> <pid>`")]
    Unparsable { runtime: Runtime, output: String },
    #[error("cannot read the cgroup of process {pid} (container {name:?})")]
    ProcCgroup {
        pid: u32,
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} has no cgroup v2 entry (`0::`) in /proc/{pid}/cgroup")]
    NoCgroup2 { pid: u32 },
    #[error("process {pid} is in an unusable cgroup")]
    BadCgroup {
        pid: u32,
        #[source]
        source: agent_broker_core::cgroup::CgroupError,
    },
}

/// The template both runtimes understand: whether the container runs, and its init pid.
const INSPECT_FORMAT: &str = "{{.State.Running}} {{.State.Pid}}";

/// The host pid of a running container's init process, asked from `runtime` (or, when `None`,
/// from podman if it is on PATH, else docker); containerd is asked at `containerd`'s socket and
/// namespace.
pub fn container_pid(
    runtime: Option<Runtime>,
    name: &str,
    containerd: &Containerd,
) -> Result<u32, ContainerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let (runtime, program) = pick_runtime(runtime, &path)?;
    match runtime {
        Runtime::Containerd => task_pid(&program, containerd, name),
        Runtime::Podman | Runtime::Docker => inspect_pid(runtime, &program, name),
    }
}

/// The cgroup (relative to the cgroup2 mount) of process `pid`, from its `/proc/PID/cgroup`.
pub fn pid_cgroup(pid: u32, name: &str) -> Result<CgroupPath, ContainerError> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|source| {
        ContainerError::ProcCgroup {
            pid,
            name: name.to_owned(),
            source,
        }
    })?;
    cgroup2_of(pid, &text)
}

/// The `0::` (cgroup v2) line of a `/proc/PID/cgroup` text, as a path.
fn cgroup2_of(pid: u32, proc_cgroup: &str) -> Result<CgroupPath, ContainerError> {
    let raw = proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or(ContainerError::NoCgroup2 { pid })?;
    CgroupPath::parse(raw.trim()).map_err(|source| ContainerError::BadCgroup { pid, source })
}

/// The runtime to ask, and its program on `path` (a PATH value).
fn pick_runtime(
    wanted: Option<Runtime>,
    path: &OsStr,
) -> Result<(Runtime, PathBuf), ContainerError> {
    match wanted {
        Some(runtime) => find_on_path(runtime.program(), path)
            .map(|p| (runtime, p))
            .ok_or(ContainerError::RuntimeMissing(runtime)),
        None => Runtime::PREFERENCE
            .into_iter()
            .find_map(|r| find_on_path(r.program(), path).map(|p| (r, p)))
            .ok_or(ContainerError::NoRuntime),
    }
}

/// The first executable file named `program` in the directories of `path`.
fn find_on_path(program: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt as _;
    std::env::split_paths(path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Runs `<program> inspect --type container` for `name` and reads its answer.
fn inspect_pid(runtime: Runtime, program: &Path, name: &str) -> Result<u32, ContainerError> {
    let output = Command::new(program)
        .args(["inspect", "--type", "container", "--format", INSPECT_FORMAT])
        // `--` so a name starting with `-` is a name, not an option.
        .arg("--")
        .arg(name)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ContainerError::Spawn {
            command: format!("{runtime} inspect"),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(inspect_failure(runtime, name, &stderr));
    }
    parse_inspect(runtime, name, &stdout)
}

/// The error for a failed inspect: both runtimes say "no such container" (podman: `Error: no
/// such container X`, docker: `Error: No such container: X`).
fn inspect_failure(runtime: Runtime, name: &str, stderr: &str) -> ContainerError {
    let name = name.to_owned();
    if stderr.to_ascii_lowercase().contains("no such container") {
        ContainerError::NotFound { runtime, name }
    } else {
        ContainerError::Inspect {
            runtime,
            name,
            stderr: stderr.trim().to_owned(),
        }
    }
}

/// Reads `<running> <pid>` as printed with [`INSPECT_FORMAT`].
fn parse_inspect(runtime: Runtime, name: &str, stdout: &str) -> Result<u32, ContainerError> {
    let unparsable = || ContainerError::Unparsable {
        runtime,
        output: stdout.trim().to_owned(),
    };
    let mut fields = stdout.split_whitespace();
    let (Some(running), Some(pid), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(unparsable());
    };
    let running: bool = running.parse().map_err(|_| unparsable())?;
    let pid: u32 = pid.parse().map_err(|_| unparsable())?;
    if !running || pid == 0 {
        return Err(ContainerError::NotRunning {
            runtime,
            name: name.to_owned(),
        });
    }
    Ok(pid)
}

/// Runs `ctr task ls` at `containerd`'s socket and namespace and finds the task of container
/// `id` in it (containerd has no names: a container's ID is its name).
fn task_pid(program: &Path, containerd: &Containerd, id: &str) -> Result<u32, ContainerError> {
    let output = Command::new(program)
        .arg("--address")
        .arg(&containerd.address)
        .arg("--namespace")
        .arg(&containerd.namespace)
        .args(["--connect-timeout", CTR_CONNECT_TIMEOUT, "task", "ls"])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ContainerError::Spawn {
            command: format!("{} task ls", program.display()),
            source,
        })?;
    if !output.status.success() {
        return Err(ContainerError::TaskList {
            address: containerd.address.clone(),
            namespace: containerd.namespace.clone(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    parse_task_ls(
        &containerd.namespace,
        id,
        &String::from_utf8_lossy(&output.stdout),
    )
}

/// Reads the task of `id` from `ctr task ls` (a `TASK PID STATUS` header, then one line per
/// task). A task that is running or paused has a live process; any other status (`STOPPED`,
/// `CREATED`, ...) is an error.
fn parse_task_ls(namespace: &str, id: &str, stdout: &str) -> Result<u32, ContainerError> {
    let unparsable = |line: &str| ContainerError::TaskListUnparsable {
        line: line.trim().to_owned(),
    };
    let mut lines = stdout.lines();
    let header = lines.next().unwrap_or_default();
    if header.split_whitespace().collect::<Vec<_>>() != ["TASK", "PID", "STATUS"] {
        return Err(unparsable(header));
    }
    for line in lines.filter(|l| !l.trim().is_empty()) {
        let mut fields = line.split_whitespace();
        let (Some(task), Some(pid), Some(status), None) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(unparsable(line));
        };
        if task != id {
            continue;
        }
        if !matches!(status, "RUNNING" | "PAUSED") {
            return Err(ContainerError::TaskNotRunning {
                name: id.to_owned(),
                namespace: namespace.to_owned(),
                status: status.to_owned(),
            });
        }
        return match pid.parse::<u32>() {
            Ok(0) | Err(_) => Err(unparsable(line)),
            Ok(pid) => Ok(pid),
        };
    }
    Err(ContainerError::NoTask {
        name: id.to_owned(),
        namespace: namespace.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn fake_runtime(dir: &Path, program: &str, script: &str) -> PathBuf {
        let path = dir.join(program);
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).expect("write fake runtime");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn a_running_container_gives_its_pid() {
        assert_eq!(
            parse_inspect(Runtime::Podman, "c", "true 4242\n").expect("pid"),
            4242
        );
    }

    #[test]
    fn a_stopped_container_is_not_running() {
        for out in ["false 0\n", "false 17\n", "true 0\n"] {
            let err = parse_inspect(Runtime::Docker, "web", out).expect_err(out);
            assert!(
                matches!(err, ContainerError::NotRunning { .. }),
                "{out}: {err}"
            );
            assert_eq!(
                err.to_string(),
                "container \"web\" is not running (docker reports no process for it)"
            );
        }
    }

    #[test]
    fn garbage_from_the_runtime_is_an_error() {
        for out in ["", "true", "true 1 2", "yes 12", "true -3", "true twelve"] {
            let err = parse_inspect(Runtime::Podman, "c", out).expect_err(out);
            assert!(
                matches!(err, ContainerError::Unparsable { .. }),
                "{out:?}: {err}"
            );
        }
    }

    #[test]
    fn no_such_container_is_not_found_for_both_runtimes() {
        for (runtime, stderr) in [
            (Runtime::Podman, "Error: no such container nope\n"),
            (Runtime::Docker, "Error: No such container: nope\n"),
        ] {
            let err = inspect_failure(runtime, "nope", stderr);
            assert!(matches!(err, ContainerError::NotFound { .. }), "{err}");
            assert_eq!(
                err.to_string(),
                format!("{runtime} has no container named \"nope\"")
            );
        }
        let other = inspect_failure(
            Runtime::Docker,
            "c",
            "Cannot connect to the Docker daemon\n",
        );
        assert!(
            other
                .to_string()
                .contains("Cannot connect to the Docker daemon"),
            "{other}"
        );
    }

    #[test]
    fn podman_is_preferred_and_a_named_runtime_must_exist() {
        let both = tempfile::tempdir().expect("tempdir");
        fake_runtime(both.path(), "podman", "exit 0");
        fake_runtime(both.path(), "docker", "exit 0");
        let only_docker = tempfile::tempdir().expect("tempdir");
        fake_runtime(only_docker.path(), "docker", "exit 0");
        let none = tempfile::tempdir().expect("tempdir");
        // A file that is not executable is not a runtime.
        fs::write(none.path().join("podman"), "").expect("write");

        let (r, p) = pick_runtime(None, both.path().as_os_str()).expect("podman");
        assert_eq!((r, p), (Runtime::Podman, both.path().join("podman")));
        let (r, _) = pick_runtime(Some(Runtime::Docker), both.path().as_os_str()).expect("docker");
        assert_eq!(r, Runtime::Docker);
        let (r, _) = pick_runtime(None, only_docker.path().as_os_str()).expect("docker");
        assert_eq!(r, Runtime::Docker);
        let err = pick_runtime(Some(Runtime::Podman), only_docker.path().as_os_str())
            .expect_err("no podman");
        assert_eq!(err.to_string(), "container runtime podman is not on PATH");
        let err = pick_runtime(None, none.path().as_os_str()).expect_err("none");
        assert_eq!(
            err.to_string(),
            "no container runtime found: neither podman nor docker is on PATH"
        );
    }

    #[test]
    fn inspect_asks_the_runtime_for_exactly_that_container() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Echo the arguments back on stderr when they are not the expected ones.
        let program = fake_runtime(
            dir.path(),
            "podman",
            r#"[ "$*" = "inspect --type container --format {{.State.Running}} {{.State.Pid}} -- my-agent" ] && { echo "true 31337"; exit 0; }
case "$*" in *stopped) echo "false 0"; exit 0;; *missing) echo "Error: no such container missing" >&2; exit 125;; esac
echo "unexpected arguments: $*" >&2; exit 2"#,
        );
        assert_eq!(
            inspect_pid(Runtime::Podman, &program, "my-agent").expect("pid"),
            31337
        );
        let err = inspect_pid(Runtime::Podman, &program, "stopped").expect_err("stopped");
        assert!(matches!(err, ContainerError::NotRunning { .. }), "{err}");
        let err = inspect_pid(Runtime::Podman, &program, "missing").expect_err("missing");
        assert!(matches!(err, ContainerError::NotFound { .. }), "{err}");
    }

    const TASKS: &str = "TASK      PID     STATUS    \nweb       4086    RUNNING\nidle      4100    PAUSED\ndone      4090    STOPPED\nnew       0       CREATED\n";

    #[test]
    fn a_running_or_paused_containerd_task_gives_its_pid() {
        assert_eq!(parse_task_ls("default", "web", TASKS).expect("pid"), 4086);
        assert_eq!(parse_task_ls("default", "idle", TASKS).expect("pid"), 4100);
    }

    #[test]
    fn a_stopped_or_created_containerd_task_is_not_running() {
        for (id, status) in [("done", "STOPPED"), ("new", "CREATED")] {
            let err = parse_task_ls("k8s.io", id, TASKS).expect_err(id);
            assert!(
                matches!(err, ContainerError::TaskNotRunning { .. }),
                "{id}: {err}"
            );
            assert_eq!(
                err.to_string(),
                format!("containerd task \"{id}\" (namespace \"k8s.io\") is {status}, not running")
            );
        }
    }

    #[test]
    fn a_container_without_a_task_is_named_with_its_namespace() {
        for out in [TASKS, "TASK    PID    STATUS    \n"] {
            let err = parse_task_ls("agents", "nope", out).expect_err("no task");
            assert!(matches!(err, ContainerError::NoTask { .. }), "{err}");
            assert!(
                err.to_string().starts_with(
                    "containerd has no task for container \"nope\" in namespace \"agents\""
                ),
                "{err}"
            );
        }
    }

    #[test]
    fn garbage_from_ctr_is_an_error() {
        for out in [
            "",
            "CONTAINER IMAGE RUNTIME\n",
            "TASK PID STATUS\nweb 4086\n",
            "TASK PID STATUS\nweb 4086 RUNNING extra\n",
            "TASK PID STATUS\nweb -1 RUNNING\n",
            "TASK PID STATUS\nweb 0 RUNNING\n",
        ] {
            let err = parse_task_ls("default", "web", out).expect_err(out);
            assert!(
                matches!(err, ContainerError::TaskListUnparsable { .. }),
                "{out:?}: {err}"
            );
        }
    }

    #[test]
    fn ctr_is_asked_at_the_given_socket_and_namespace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let program = fake_runtime(
            dir.path(),
            "ctr",
            r#"case "$*" in
"--address /run/c.sock --namespace k8s.io --connect-timeout 5s task ls") printf 'TASK PID STATUS\nabc123 777 RUNNING\nold 778 STOPPED\n'; exit 0;;
"--address /nowhere --namespace"*) echo 'ctr: failed to dial "/nowhere": context deadline exceeded' >&2; exit 1;;
esac
echo "unexpected arguments: $*" >&2; exit 2"#,
        );
        let at = |address: &str| Containerd {
            address: address.to_owned(),
            namespace: "k8s.io".to_owned(),
        };
        assert_eq!(
            task_pid(&program, &at("/run/c.sock"), "abc123").expect("pid"),
            777
        );
        let err = task_pid(&program, &at("/run/c.sock"), "old").expect_err("stopped");
        assert!(
            matches!(err, ContainerError::TaskNotRunning { .. }),
            "{err}"
        );
        let err = task_pid(&program, &at("/nowhere"), "abc123").expect_err("no daemon");
        assert!(matches!(err, ContainerError::TaskList { .. }), "{err}");
        assert!(err.to_string().contains("failed to dial"), "{err}");
    }

    #[test]
    fn containerd_is_used_only_when_named_and_found_as_ctr() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_runtime(dir.path(), "ctr", "exit 0");
        let (r, p) = pick_runtime(Some(Runtime::Containerd), dir.path().as_os_str()).expect("ctr");
        assert_eq!((r, p), (Runtime::Containerd, dir.path().join("ctr")));
        let err = pick_runtime(None, dir.path().as_os_str()).expect_err("not picked");
        assert!(matches!(err, ContainerError::NoRuntime), "{err}");
        let empty = tempfile::tempdir().expect("tempdir");
        let err =
            pick_runtime(Some(Runtime::Containerd), empty.path().as_os_str()).expect_err("no ctr");
        assert_eq!(
            err.to_string(),
            "container runtime containerd is not on PATH (its CLI is `ctr`)"
        );
    }

    #[test]
    fn containerd_defaults_are_containerds_own() {
        let at = |address: &str, namespace: &str| Containerd {
            address: address.to_owned(),
            namespace: namespace.to_owned(),
        };
        let no_env = |_: &str| None;
        let env = |var: &str| match var {
            "CONTAINERD_ADDRESS" => Some("/env.sock".to_owned()),
            "CONTAINERD_NAMESPACE" => Some("k8s.io".to_owned()),
            _ => None,
        };
        let empty_env = |_: &str| Some(String::new());
        assert_eq!(
            Containerd::resolve_with(None, None, no_env),
            at("/run/containerd/containerd.sock", "default")
        );
        assert_eq!(
            Containerd::resolve_with(None, None, empty_env),
            at("/run/containerd/containerd.sock", "default")
        );
        assert_eq!(
            Containerd::resolve_with(None, None, env),
            at("/env.sock", "k8s.io")
        );
        assert_eq!(
            Containerd::resolve_with(Some("/s.sock".to_owned()), Some("ns".to_owned()), env),
            at("/s.sock", "ns")
        );
    }

    #[test]
    fn the_cgroup_is_the_cgroup2_line_relative_to_the_mount() {
        let hybrid = "12:pids:/libpod_parent/libpod-abc\n1:name=systemd:/libpod_parent/libpod-abc\n0::/libpod_parent/libpod-abc\n";
        assert_eq!(
            cgroup2_of(7, hybrid).expect("path").to_string(),
            "libpod_parent/libpod-abc"
        );
        let err = cgroup2_of(7, "1:name=systemd:/x\n").expect_err("no v2");
        assert!(matches!(err, ContainerError::NoCgroup2 { pid: 7 }), "{err}");
        let err = cgroup2_of(7, "0::/a/../b\n").expect_err("dotdot");
        assert!(matches!(err, ContainerError::BadCgroup { .. }), "{err}");
    }

    #[test]
    fn a_process_that_is_gone_has_no_cgroup() {
        let err = pid_cgroup(u32::MAX, "gone").expect_err("no such process");
        assert!(matches!(err, ContainerError::ProcCgroup { .. }), "{err}");
    }
}

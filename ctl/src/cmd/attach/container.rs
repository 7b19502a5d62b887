//! `brokerctl attach --container`: find a running container's init process through its
//! runtime's own CLI (`podman inspect`, `docker inspect`), so the container can be tagged by
//! name or ID instead of by a cgroup path the runtime chose.
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
}

impl Runtime {
    /// The order in which runtimes are tried when none is named.
    const PREFERENCE: [Runtime; 2] = [Runtime::Podman, Runtime::Docker];

    /// The runtime's CLI program, looked up on PATH.
    fn program(self) -> &'static str {
        match self {
            Runtime::Podman => "podman",
            Runtime::Docker => "docker",
        }
    }
}

impl fmt::Display for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.program())
    }
}

/// Why a container could not be resolved to a process.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("no container runtime found: neither podman nor docker is on PATH")]
    NoRuntime,
    #[error("container runtime {0} is not on PATH")]
    RuntimeMissing(Runtime),
    #[error("{runtime} has no container named {name:?}")]
    NotFound { runtime: Runtime, name: String },
    #[error("container {name:?} is not running ({runtime} reports no process for it)")]
    NotRunning { runtime: Runtime, name: String },
    #[error("cannot run `{runtime} inspect`")]
    Spawn {
        runtime: Runtime,
        #[source]
        source: std::io::Error,
    },
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
/// from podman if it is on PATH, else docker).
pub fn container_pid(runtime: Option<Runtime>, name: &str) -> Result<u32, ContainerError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let (runtime, program) = pick_runtime(runtime, &path)?;
    inspect_pid(runtime, &program, name)
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
        .map_err(|source| ContainerError::Spawn { runtime, source })?;
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

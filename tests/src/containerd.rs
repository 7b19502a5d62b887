//! A containerd of the test's own (Debian 12's 1.6, with the `io.containerd.runc.v2` shim and
//! runc), offline, no registry, and containers it runs through its CLI `ctr`.
//!
//! - [`Containerd::start`] runs `containerd --config <dir>/config.toml`: root, state, the opt
//!   plugin's dir and the gRPC, ttrpc and debug sockets all in a temporary dir, and the CRI plugin
//!   disabled, so it shares nothing with a system containerd (there need not be one). Every `ctr`
//!   command names its socket and a namespace of the test's own (`abtest-<pid>-<n>`).
//! - [`Containerd::run`]: `ctr run -d --read-only --rootfs <non-recursive bind of />`, like the
//!   podman harness's run mode (`container.rs`): the container sees the host's files read-only,
//!   a private tmpfs `/tmp` and [`Containerd::share_dir`] read-write at `/ct`. Without
//!   `--net-host`, ctr gives it a network namespace of its own with only `lo`. The runc shim puts
//!   it in the cgroup `/<namespace>/<container id>` of every hierarchy (hybrid mode too).
//!
//! Cleanup is by ID and pid: Drop of a [`Task`] kills it (SIGKILL), deletes the task and the
//! container, and removes its empty cgroup dirs. Drop of the [`Containerd`] deletes any task or
//! container left in its namespace, stops containerd by its pid (SIGTERM, then SIGKILL), stops any
//! shim of its own still running (by pid, found by its socket path in `/proc/PID/cmdline`),
//! removes the `/<namespace>` cgroup dirs where they are empty, unmounts the rootfs bind and
//! removes its dir.

use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::{
    cgroup_of, cgroup2_mount,
    container::{is_mount_point, netns_of, remove_empty_tree},
    run_with_timeout, unique_name,
};

/// Deadline of one ctr command, and of containerd's start and stop.
const CTR_TIMEOUT: Duration = Duration::from_secs(60);
/// PATH inside the containers (a rootfs has no image config to give one).
const CONTAINER_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A running containerd of the test's own, stopped by pid on Drop.
pub struct Containerd {
    /// Removed on Drop only once the rootfs bind below it is unmounted.
    dir: PathBuf,
    /// containerd's gRPC socket (`ctr --address`).
    pub address: PathBuf,
    /// The containerd namespace every container of this harness lives in.
    pub namespace: String,
    child: Option<Child>,
    /// The non-recursive bind of `/` used as the containers' rootfs, once mounted (at start).
    rootfs: Option<PathBuf>,
}

impl Containerd {
    /// Starts containerd; panics, saying what to install, unless containerd, ctr, the runc shim
    /// and runc are there.
    pub fn start() -> Self {
        for (program, arg) in [
            ("containerd", "--version"),
            ("ctr", "--version"),
            ("containerd-shim-runc-v2", "-v"),
            ("runc", "--version"),
        ] {
            let found = Command::new(program)
                .arg(arg)
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{program} is not installed: the containerd tests need containerd, ctr, \
                 containerd-shim-runc-v2 and runc (`cargo xtask setup`, or `apt-get install \
                 containerd runc`)"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("abtest-containerd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make containerd's dir: {e}"))
            .keep();
        fs::create_dir(dir.join("share")).unwrap_or_else(|e| panic!("mkdir share: {e}"));
        let address = dir.join("containerd.sock");
        let config = format!(
            r#"# agent-broker tests: see tests/src/containerd.rs
version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  address = "{dir}/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"
"#,
            dir = dir.display()
        );
        let config_path = dir.join("config.toml");
        fs::write(&config_path, config).unwrap_or_else(|e| panic!("write config.toml: {e}"));
        let log = fs::File::create(dir.join("containerd.log"))
            .unwrap_or_else(|e| panic!("create containerd.log: {e}"));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("containerd.log: {e}"));
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start containerd: {e}"));
        let mut containerd = Containerd {
            dir,
            address,
            namespace: unique_name(),
            child: Some(child),
            rootfs: None,
        };
        containerd.mount_rootfs();
        let deadline = Instant::now() + CTR_TIMEOUT;
        while !containerd.ctr_output(&["version"]).status.success() {
            let exited = containerd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                panic!("containerd exited ({status}): {}", containerd.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not answer on {} within {CTR_TIMEOUT:?}: {}",
                containerd.address.display(),
                containerd.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        containerd
    }

    /// containerd's pid (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// containerd's log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    /// A host dir mounted read-write at `/ct` in every container this runs.
    pub fn share_dir(&self) -> PathBuf {
        self.dir.join("share")
    }

    /// `ctr --address <socket> --namespace <namespace>`.
    pub fn ctr(&self) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(&self.address)
            .arg("--namespace")
            .arg(&self.namespace);
        cmd
    }

    fn ctr_output(&self, args: &[&str]) -> Output {
        run_with_timeout(self.ctr().args(args), CTR_TIMEOUT)
    }

    /// Runs ctr with `args`; panics with its stderr when it fails. Returns its stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr_output(args);
        assert!(
            out.status.success(),
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `ctr run -d --read-only --rootfs` of `cmd`, in a network namespace with only `lo`.
    pub fn run(&self, cmd: &[&str]) -> Task<'_> {
        let rootfs = self.dir.join("rootfs").display().to_string();
        let id = unique_name();
        let share = format!(
            "type=bind,src={},dst=/ct,options=rbind:rw",
            self.share_dir().display()
        );
        let mut args = vec![
            "run",
            "-d",
            "--read-only",
            "--env",
            CONTAINER_PATH,
            "--mount",
            "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777",
            "--mount",
            &share,
            "--rootfs",
            &rootfs,
            &id,
        ];
        args.extend_from_slice(cmd);
        let out = self.ctr_output(&args);
        // Built before the checks, so Drop removes whatever ctr managed to create.
        let mut task = Task {
            containerd: self,
            id: id.clone(),
            pid: 0,
            cgroup: String::new(),
            netns: String::new(),
        };
        assert!(
            out.status.success(),
            "ctr run failed: {}\ncontainerd's log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            task.containerd.log()
        );
        task.pid = task_pid(task.containerd, &id)
            .unwrap_or_else(|| panic!("ctr task ls lists no running task {id}"));
        task.cgroup = cgroup_of(task.pid);
        task.netns = netns_of(task.pid);
        task
    }

    /// The non-recursive, private bind of `/` the containers use as rootfs (no /proc, /sys, /dev
    /// or /tmp submounts, which runc would otherwise mount over).
    fn mount_rootfs(&mut self) {
        let dir = self.dir.join("rootfs");
        {
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            nix::mount::mount(
                Some("/"),
                &dir,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("bind-mounting / at {}: {e}", dir.display()));
            self.rootfs = Some(dir.clone());
            nix::mount::mount(
                None::<&str>,
                &dir,
                None::<&str>,
                nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("making {} private: {e}", dir.display()));
        }
    }

    /// The `TASK PID STATUS` rows of `ctr task ls`; panics when ctr fails.
    pub fn tasks(&self) -> Vec<(String, u32, String)> {
        parse_tasks(&self.ctr_ok(&["task", "ls"]))
    }

    /// [`Containerd::tasks`], or none when ctr fails (for Drop, which must not panic).
    fn tasks_or_none(&self) -> Vec<(String, u32, String)> {
        let out = self.ctr_output(&["task", "ls"]);
        if out.status.success() {
            parse_tasks(&String::from_utf8_lossy(&out.stdout))
        } else {
            Vec::new()
        }
    }

    /// Kills the task of `id` (if any) and deletes it and the container. Returns what failed.
    fn remove(&self, id: &str) -> Vec<String> {
        let mut failed = Vec::new();
        if self.tasks_or_none().iter().any(|(t, _, _)| t == id) {
            let _ = self.ctr_output(&["task", "kill", "-s", "SIGKILL", id]);
            let out = self.ctr_output(&["task", "rm", "-f", id]);
            if !out.status.success() {
                failed.push(format!(
                    "ctr task rm {id}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        let listed = self.ctr_output(&["containers", "ls", "-q"]);
        if String::from_utf8_lossy(&listed.stdout)
            .lines()
            .any(|c| c.trim() == id)
        {
            let out = self.ctr_output(&["containers", "rm", id]);
            if !out.status.success() {
                failed.push(format!(
                    "ctr containers rm {id}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        failed
    }

    /// The pids of processes (the shims) whose command line names this harness's dir.
    fn own_processes(&self) -> Vec<i32> {
        let needle = self.dir.display().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    String::from_utf8_lossy(&c)
                        .split('\0')
                        .any(|a| a.contains(&needle))
                })
            })
            .collect()
    }

    /// Every dir of cgroup `/<namespace>`: in each v1 hierarchy under /sys/fs/cgroup and in the
    /// cgroup2 mount.
    fn namespace_cgroups(&self) -> Vec<PathBuf> {
        let mut roots = vec![cgroup2_mount().to_path_buf()];
        if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
            roots.extend(entries.flatten().map(|e| e.path()));
        }
        roots
            .into_iter()
            .map(|r| r.join(&self.namespace))
            .filter(|d| d.is_dir())
            .collect()
    }

    /// Stops containerd by its pid: SIGTERM, then SIGKILL after [`CTR_TIMEOUT`].
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + CTR_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("containerd harness: containerd ignored SIGTERM; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    return;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// The `TASK PID STATUS` rows of `ctr task ls` output.
fn parse_tasks(stdout: &str) -> Vec<(String, u32, String)> {
    stdout
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            Some((
                f.next()?.to_owned(),
                f.next()?.parse().ok()?,
                f.next()?.to_owned(),
            ))
        })
        .collect()
}

/// The pid of the running task of container `id`, if any.
fn task_pid(containerd: &Containerd, id: &str) -> Option<u32> {
    containerd
        .tasks()
        .into_iter()
        .find(|(t, _, status)| t == id && status == "RUNNING")
        .map(|(_, pid, _)| pid)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            for (id, _, _) in self.tasks_or_none() {
                for failure in self.remove(&id) {
                    eprintln!("containerd harness: {failure}");
                }
            }
            let listed = self.ctr_output(&["containers", "ls", "-q"]);
            for id in String::from_utf8_lossy(&listed.stdout).lines() {
                for failure in self.remove(id.trim()) {
                    eprintln!("containerd harness: {failure}");
                }
            }
            let _ = self.ctr_output(&["namespaces", "rm", &self.namespace]);
        }
        self.stop();
        for pid in self.own_processes() {
            eprintln!("containerd harness: stopping leftover process {pid}");
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for dir in self.namespace_cgroups() {
            remove_empty_tree(&dir);
        }
        let mut still_mounted = false;
        if let Some(rootfs) = self.rootfs.take() {
            if let Err(e) = nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!(
                    "containerd harness: cannot unmount {}: {e}",
                    rootfs.display()
                );
            }
            still_mounted = is_mount_point(&rootfs);
        }
        if still_mounted {
            eprintln!(
                "containerd harness: the rootfs is still mounted; leaving {} in place",
                self.dir.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!(
                "containerd harness: cannot remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// A container started by [`Containerd::run`] with its running task; killed and deleted on
/// Drop.
pub struct Task<'a> {
    containerd: &'a Containerd,
    /// The container's ID (containerd's only name for it).
    pub id: String,
    /// Host pid of its init process.
    pub pid: u32,
    /// Its cgroup, relative to the cgroup2 mount (`<namespace>/<id>`).
    pub cgroup: String,
    /// `net:[<inode>]`.
    pub netns: String,
}

impl Task<'_> {
    /// `ctr task exec --exec-id <unique> <id> <args...>`: the process joins the container's
    /// cgroup and network namespace. Start it with [`run_with_timeout`] or `spawn`.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = self.containerd.ctr();
        cmd.args(["task", "exec", "--exec-id", &unique_name(), &self.id])
            .args(args);
        cmd
    }

    /// Kills the init process and waits until containerd reports the task `STOPPED`.
    pub fn stop(&self) {
        self.containerd
            .ctr_ok(&["task", "kill", "-s", "SIGKILL", &self.id]);
        let deadline = Instant::now() + CTR_TIMEOUT;
        while !self
            .containerd
            .tasks()
            .iter()
            .any(|(t, _, s)| t == &self.id && s == "STOPPED")
        {
            assert!(
                Instant::now() < deadline,
                "task {} did not stop within {CTR_TIMEOUT:?}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether containerd still lists the container.
    pub fn exists(&self) -> bool {
        self.containerd
            .ctr_ok(&["containers", "ls", "-q"])
            .lines()
            .any(|c| c.trim() == self.id)
    }

    /// The containerd this task runs under.
    pub fn containerd(&self) -> &Containerd {
        self.containerd
    }
}

impl Drop for Task<'_> {
    fn drop(&mut self) {
        for failure in self.containerd.remove(&self.id) {
            eprintln!("containerd harness: {failure}");
        }
        let rel = self.cgroup.trim_start_matches('/');
        if !rel.is_empty() {
            let mut roots = vec![cgroup2_mount().to_path_buf()];
            if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
                roots.extend(entries.flatten().map(|e| e.path()));
            }
            for root in roots {
                let dir = root.join(rel);
                if dir.is_dir() {
                    remove_empty_tree(&dir);
                }
            }
        }
    }
}

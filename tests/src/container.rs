//! Real containers and pods for the tests: Podman (Debian 12's 4.3, with runc), offline, no
//! registry, each in a network namespace of its own with only `lo` (`--network none`; the
//! harness never makes a bridge or a network).
//!
//! The recipe is the one verified on this kind of machine (`shared/tools/containers.md`):
//!
//! - a `CONTAINERS_CONF` of the harness's own, in a temporary state dir: `default_ulimits = []`
//!   (podman otherwise asks for RLIMIT_NOFILE 1048576, above root's hard limit here), `runtime =
//!   "runc"` (crun 1.8 refuses hybrid cgroup hierarchies) and `netns = "none"`;
//! - [`Podman::run`]: `podman run --network none --read-only --rootfs <non-recursive bind of />`,
//!   so the container sees the host's files read-only (python3, curl, this workspace's
//!   binaries) and a private tmpfs `/tmp`; `--rootfs /` itself would make runc mount over the
//!   host's cgroup hierarchy;
//! - [`Podman::kube_play`]: `podman kube play --network none` of a Kubernetes Pod manifest with
//!   labels, whose image is an 11 kB image imported from a tar (there is no registry) plus the
//!   host's `/usr` as a read-only hostPath volume.
//!
//! Both mount [`Podman::share_dir`] read-write at `/ct`, for files a test hands the container
//! (the broker CA, a script).
//!
//! Cleanup is by name: Drop of a [`Container`] or [`Pod`] removes it (`podman rm -f`, `podman
//! kube down` and `podman pod rm -f`), then the empty cgroup dirs podman leaves behind in hybrid
//! mode. Drop of the [`Podman`] unmounts the rootfs bind, removes the state dir and the
//! `libpod_parent` cgroup dirs it created, where they are empty. The imported image stays, so
//! later tests reuse it; it is named `localhost/abtest-hostusr`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    time::Duration,
};

use crate::{cgroup_of, cgroup2_mount, run_with_timeout, unique_name};

/// Deadline of one podman command (a first `kube play` builds the pause image).
const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);
/// The image of kube mode: directories, `/bin` etc. as links into `/usr`, and no files of
/// its own but `/etc/passwd` and `/etc/group`; the host's `/usr` is mounted over it.
const IMAGE: &str = "localhost/abtest-hostusr:latest";
/// The v1 hierarchy podman's name=systemd controller lives in on a hybrid host.
const SYSTEMD_V1: &str = "/sys/fs/cgroup/systemd";
/// The label brokerd's pod source looks for (issue 14).
pub const AGENT_LABEL: &str = "agent-broker.io/agent";

const CONTAINERS_CONF: &str = r#"# agent-broker tests: see tests/src/container.rs
[containers]
default_ulimits = []
netns = "none"

[engine]
runtime = "runc"
"#;

/// State shared by a [`Podman`] and the containers it started, so the rootfs bind and the
/// config stay until the last of them is gone.
struct Env {
    /// Removed on Drop only once nothing is mounted below it: with `/` bound inside, a plain
    /// recursive removal would delete the host's files.
    state: PathBuf,
    /// The non-recursive bind of `/` used as run mode's rootfs, once mounted.
    rootfs: Mutex<Option<PathBuf>>,
    /// `libpod_parent` dirs that existed before this harness ran podman (never removed).
    preexisting: Vec<PathBuf>,
}

impl Env {
    fn conf(&self) -> PathBuf {
        self.state.as_path().join("containers.conf")
    }

    fn podman(&self) -> Command {
        let mut cmd = Command::new("podman");
        cmd.env("CONTAINERS_CONF", self.conf());
        cmd
    }

    /// Runs podman with `args`; panics with its stderr when it fails.
    fn podman_ok(&self, args: &[&str]) -> String {
        let out = self.podman_output(args);
        assert!(
            out.status.success(),
            "podman {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn podman_output(&self, args: &[&str]) -> Output {
        run_with_timeout(self.podman().args(args), PODMAN_TIMEOUT)
    }

    fn share_dir(&self) -> PathBuf {
        self.state.as_path().join("share")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let rootfs = self.rootfs.get_mut().map(|r| r.take()).unwrap_or_default();
        let mut still_mounted = false;
        if let Some(rootfs) = &rootfs {
            // MNT_DETACH: a container that somehow survived its removal keeps its view, and
            // ours goes away now.
            if let Err(e) = nix::mount::umount2(rootfs, nix::mount::MntFlags::MNT_DETACH) {
                eprintln!(
                    "container harness: cannot unmount {}: {e}",
                    rootfs.display()
                );
            }
            still_mounted = is_mount_point(rootfs);
        }
        if still_mounted {
            eprintln!(
                "container harness: {} is still mounted; leaving {} in place",
                rootfs.unwrap_or_default().display(),
                self.state.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&self.state) {
            eprintln!(
                "container harness: cannot remove {}: {e}",
                self.state.display()
            );
        }
        for dir in libpod_parents() {
            if !self.preexisting.contains(&dir) {
                remove_empty_tree(&dir);
            }
        }
    }
}

/// Whether `dir` is the root of a mount (its device differs from its parent's, or it is the
/// same inode as `/`, as a bind of `/` is). When in doubt, says yes.
pub(crate) fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let (Ok(here), Some(Ok(parent)), Ok(root)) = (
        fs::metadata(dir),
        dir.parent().map(fs::metadata),
        fs::metadata("/"),
    ) else {
        return dir.exists();
    };
    here.dev() != parent.dev() || (here.dev(), here.ino()) == (root.dev(), root.ino())
}

/// Every `libpod_parent` dir podman may have made: in the cgroup2 mount and in each v1
/// hierarchy under /sys/fs/cgroup (hybrid mode).
fn libpod_parents() -> Vec<PathBuf> {
    let mut dirs = vec![cgroup2_mount().join("libpod_parent")];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        for e in entries.flatten() {
            let dir = e.path().join("libpod_parent");
            if dir.is_dir() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs.into_iter().filter(|d| d.is_dir()).collect()
}

/// Removes the cgroup dir `dir` and every dir below it, deepest first. A dir that still holds
/// a process (or is not a cgroup) stays: rmdir refuses it, which is what we want.
pub(crate) fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes the dirs podman left for cgroup `rel` (relative to the cgroup2 mount) in the cgroup2
/// mount and in the name=systemd hierarchy.
fn remove_leftover_cgroup(rel: &str) {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    for root in [cgroup2_mount(), Path::new(SYSTEMD_V1)] {
        let dir = root.join(rel);
        if dir.is_dir() {
            remove_empty_tree(&dir);
        }
    }
}

/// Podman configured by the recipe, with a state dir of its own.
pub struct Podman {
    env: Arc<Env>,
}

impl Podman {
    /// Panics, saying what to install, unless podman and runc are there.
    pub fn new() -> Self {
        Self::with_conf(CONTAINERS_CONF)
    }

    /// A harness whose podman runs the OCI hook `brokerctl oci-hook` (from `brokerctl`, asking
    /// the brokerd of `run_dir`) as the shipped `deploy/oci-hooks/agent-broker.json` says:
    /// its `when` and `stages` as they are, only the binary's path and the run dir changed.
    pub fn with_oci_hook(brokerctl: &Path, run_dir: &Path) -> Self {
        let shipped =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/oci-hooks/agent-broker.json");
        let text = fs::read_to_string(&shipped)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", shipped.display()));
        let mut hook: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", shipped.display()));
        hook["hook"]["path"] = brokerctl.display().to_string().into();
        hook["hook"]["args"] = serde_json::json!([
            "brokerctl",
            "--run-dir",
            run_dir.display().to_string(),
            "oci-hook"
        ]);
        let podman = Self::with_conf(CONTAINERS_CONF);
        let dir = podman.env.state.as_path().join("hooks.d");
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("cannot make {}: {e}", dir.display()));
        fs::write(dir.join("agent-broker.json"), hook.to_string())
            .unwrap_or_else(|e| panic!("cannot write the hook: {e}"));
        let conf = CONTAINERS_CONF.replace(
            "[engine]\n",
            &format!(
                "[engine]\nhooks_dir = [{}]\n",
                serde_json::to_string(&dir.display().to_string()).unwrap_or_default()
            ),
        );
        fs::write(podman.env.conf(), conf)
            .unwrap_or_else(|e| panic!("cannot write containers.conf: {e}"));
        podman
    }

    fn with_conf(conf: &str) -> Self {
        for program in ["podman", "runc"] {
            let found = Command::new(program)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(
                found,
                "{program} is not installed: the container tests need podman and runc \
                 (`cargo xtask setup`, or `apt-get install podman runc`)"
            );
        }
        let state = tempfile::Builder::new()
            .prefix("abtest-podman-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make the podman state dir: {e}"))
            .keep();
        fs::write(state.join("containers.conf"), conf)
            .unwrap_or_else(|e| panic!("cannot write containers.conf: {e}"));
        fs::create_dir(state.join("share"))
            .unwrap_or_else(|e| panic!("cannot make the share dir: {e}"));
        let env = Env {
            state,
            rootfs: Mutex::new(None),
            preexisting: libpod_parents(),
        };
        Self { env: Arc::new(env) }
    }

    /// A host dir mounted read-write at `/ct` in every container and pod this starts.
    pub fn share_dir(&self) -> PathBuf {
        self.env.share_dir()
    }

    /// A podman command with this harness's config.
    pub fn command(&self) -> Command {
        self.env.podman()
    }

    /// Runs podman with `args`; panics with its stderr when it fails. Returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        self.env.podman_ok(args)
    }

    /// podman's REST API (`podman system service`) on a unix socket in the state dir, for
    /// brokerd's pod source; stopped by pid on Drop.
    pub fn api_service(&self) -> ApiService {
        let socket = self.env.state.as_path().join("podman.sock");
        let child = self
            .env
            .podman()
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}", socket.display()))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start podman system service: {e}"));
        let service = ApiService { socket, child };
        let deadline = std::time::Instant::now() + PODMAN_TIMEOUT;
        while std::os::unix::net::UnixStream::connect(&service.socket).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "podman system service did not listen on {} within {PODMAN_TIMEOUT:?}",
                service.socket.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        service
    }

    /// `podman run -d --network none` of `cmd` with the host's rootfs read-only.
    pub fn run(&self, cmd: &[&str]) -> Container {
        self.run_annotated(&[], cmd)
    }

    /// [`Podman::run`] with OCI annotations (`--annotation KEY=VALUE`).
    pub fn run_annotated(&self, annotations: &[(&str, &str)], cmd: &[&str]) -> Container {
        let rootfs = self.rootfs();
        let name = unique_name();
        let share = format!("{}:/ct:rw", self.share_dir().display());
        let mut args = vec![
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "none",
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/tmp:rw,notmpcopyup",
            "-v",
            &share,
        ];
        let annotations: Vec<String> = annotations
            .iter()
            .map(|(k, v)| format!("--annotation={k}={v}"))
            .collect();
        args.extend(annotations.iter().map(String::as_str));
        args.extend_from_slice(&["--rootfs", &rootfs]);
        args.extend_from_slice(cmd);
        // Built before podman runs, so Drop removes whatever podman managed to create.
        let mut container = Container {
            env: Arc::clone(&self.env),
            name: name.clone(),
            id: String::new(),
            pid: 0,
            cgroup: String::new(),
            netns: String::new(),
        };
        self.ok(&args);
        container.id = self.ok(&["inspect", "--type", "container", "-f", "{{.Id}}", &name]);
        container.pid = inspect_pid(&self.env, &name);
        container.cgroup = cgroup_of(container.pid);
        container.netns = netns_of(container.pid);
        container
    }

    /// `podman kube play --network none` of a Pod named like the test, labelled `labels`, whose
    /// one container (`<pod>-agent`) runs `cmd`.
    pub fn kube_play(&self, labels: &[(&str, &str)], cmd: &[&str]) -> Pod {
        let spec = PodSpec {
            labels,
            cmd,
            ..PodSpec::default()
        };
        match self.try_kube_play(&spec) {
            (pod, Ok(())) => pod,
            (_, Err(e)) => panic!("{e}"),
        }
    }

    /// `podman kube play --network none` of `spec`: the pod (removed on Drop, whatever
    /// happened) and whether it started; on failure, podman's error, and the pod's fields are
    /// what could be read.
    pub fn try_kube_play(&self, spec: &PodSpec) -> (Pod, Result<(), String>) {
        self.import_image();
        let name = unique_name();
        let manifest = self.env.state.as_path().join(format!("{name}.yaml"));
        fs::write(&manifest, pod_manifest(&name, spec, &self.share_dir()))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", manifest.display()));
        let mut pod = Pod {
            env: Arc::clone(&self.env),
            name: name.clone(),
            manifest: manifest.clone(),
            id: String::new(),
            cgroup: String::new(),
            infra_pid: 0,
            agent: None,
        };
        let played = self.env.podman_output(&[
            "kube",
            "play",
            "--network",
            "none",
            &manifest.display().to_string(),
        ]);
        // podman reports a container that failed to start on stderr, and may still exit 0.
        let stderr = String::from_utf8_lossy(&played.stderr).to_string();
        if !played.status.success() || stderr.contains("Error") {
            if let Ok(id) = self.inspect(&["pod", "inspect", "-f", "{{.ID}}", &name]) {
                pod.id = id;
            }
            if let Ok(cgroup) = self.inspect(&["pod", "inspect", "-f", "{{.CgroupPath}}", &name]) {
                pod.cgroup = cgroup.trim_start_matches('/').to_string();
            }
            return (
                pod,
                Err(format!("podman kube play {name} failed: {stderr}")),
            );
        }
        pod.id = self.ok(&["pod", "inspect", "-f", "{{.ID}}", &name]);
        pod.cgroup = self
            .ok(&["pod", "inspect", "-f", "{{.CgroupPath}}", &name])
            .trim_start_matches('/')
            .to_string();
        let infra = self.ok(&["pod", "inspect", "-f", "{{.InfraContainerID}}", &name]);
        pod.infra_pid = inspect_pid(&self.env, &infra);
        let agent = format!("{name}-agent");
        let pid = inspect_pid(&self.env, &agent);
        pod.agent = Some(Member {
            id: self.ok(&["inspect", "--type", "container", "-f", "{{.Id}}", &agent]),
            name: agent,
            pid,
            cgroup: cgroup_of(pid),
            netns: netns_of(pid),
        });
        (pod, Ok(()))
    }

    /// podman's stdout for `args`, or its stderr when it fails.
    fn inspect(&self, args: &[&str]) -> Result<String, String> {
        let out = self.env.podman_output(args);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).to_string())
        }
    }

    /// The non-recursive, private bind of `/` that run mode uses as rootfs (no /proc, /sys,
    /// /dev or /tmp submounts, which runc would otherwise mount over).
    fn rootfs(&self) -> String {
        let dir = self.env.state.as_path().join("rootfs");
        let mut mounted = self
            .env
            .rootfs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if mounted.is_none() {
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            nix::mount::mount(
                Some("/"),
                &dir,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("bind-mounting / at {}: {e}", dir.display()));
            nix::mount::mount(
                None::<&str>,
                &dir,
                None::<&str>,
                nix::mount::MsFlags::MS_PRIVATE,
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("making {} private: {e}", dir.display()));
            *mounted = Some(dir.clone());
        }
        dir.display().to_string()
    }

    /// Imports the kube-mode image unless it is there.
    fn import_image(&self) {
        let exists = self
            .env
            .podman_output(&["image", "exists", IMAGE])
            .status
            .success();
        if exists {
            return;
        }
        let root = self.env.state.as_path().join("image");
        for d in [
            "usr", "etc", "tmp", "proc", "sys", "dev", "run", "root", "ct",
        ] {
            fs::create_dir_all(root.join(d)).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
        }
        for (link, target) in [
            ("bin", "usr/bin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
            ("sbin", "usr/sbin"),
        ] {
            std::os::unix::fs::symlink(target, root.join(link))
                .unwrap_or_else(|e| panic!("symlink {link}: {e}"));
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")
            .unwrap_or_else(|e| panic!("write passwd: {e}"));
        fs::write(root.join("etc/group"), "root:x:0:\n")
            .unwrap_or_else(|e| panic!("write group: {e}"));
        let tar = self.env.state.as_path().join("image.tar");
        let out = run_with_timeout(
            Command::new("tar")
                .arg("-C")
                .arg(&root)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            PODMAN_TIMEOUT,
        );
        assert!(
            out.status.success(),
            "tar of the image failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.ok(&[
            "import",
            "-q",
            "--change",
            r#"CMD ["/bin/sh"]"#,
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            &tar.display().to_string(),
            IMAGE,
        ]);
    }
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Podman::try_kube_play`] runs: one container (`agent`) with `cmd`.
#[derive(Clone, Copy, Debug, Default)]
pub struct PodSpec<'a> {
    pub labels: &'a [(&'a str, &'a str)],
    /// The pod's annotations, which podman passes to its containers' OCI annotations (where
    /// the OCI hook reads them).
    pub annotations: &'a [(&'a str, &'a str)],
    /// `spec.hostname`; podman's default is the pod's name.
    pub hostname: Option<&'a str>,
    pub cmd: &'a [&'a str],
}

/// A Pod manifest as `podman kube play` reads it: the spec's command in one container named
/// `agent`, the host's `/usr` read-only and `share` read-write at `/ct`.
fn pod_manifest(name: &str, spec: &PodSpec<'_>, share: &Path) -> String {
    // JSON strings are YAML strings: quoting through serde_json escapes whatever a test passes.
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut labels_yaml = format!("    app: {}\n", q(name));
    for (k, v) in spec.labels {
        labels_yaml.push_str(&format!("    {}: {}\n", q(k), q(v)));
    }
    let mut annotations_yaml = String::new();
    if !spec.annotations.is_empty() {
        annotations_yaml.push_str("  annotations:\n");
        for (k, v) in spec.annotations {
            annotations_yaml.push_str(&format!("    {}: {}\n", q(k), q(v)));
        }
    }
    let hostname = spec
        .hostname
        .map(|h| format!("  hostname: {}\n", q(h)))
        .unwrap_or_default();
    let command = serde_json::to_string(spec.cmd).unwrap_or_default();
    format!(
        "apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels:
{labels_yaml}{annotations_yaml}spec:
{hostname}  restartPolicy: Never
  containers:
  - name: agent
    image: {IMAGE}
    command: {command}
    volumeMounts:
    - name: usr
      mountPath: /usr
      readOnly: true
    - name: share
      mountPath: /ct
  volumes:
  - name: usr
    hostPath:
      path: /usr
      type: Directory
  - name: share
    hostPath:
      path: {share}
      type: Directory
",
        share = q(&share.display().to_string()),
    )
}

/// The host pid of a container's init process; panics unless it runs.
fn inspect_pid(env: &Env, container: &str) -> u32 {
    let out = env.podman_ok(&[
        "inspect",
        "--type",
        "container",
        "-f",
        "{{.State.Pid}}",
        container,
    ]);
    match out.parse() {
        Ok(pid) if pid != 0 => pid,
        _ => panic!("podman inspect gave no pid for running container {container}: {out:?}"),
    }
}

/// `net:[<inode>]`, the network namespace of `pid`.
pub fn netns_of(pid: u32) -> String {
    fs::read_link(format!("/proc/{pid}/ns/net"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/ns/net: {e}"))
}

/// A container started by [`Podman::run`], removed (by name) on Drop.
pub struct Container {
    env: Arc<Env>,
    pub name: String,
    pub id: String,
    /// Host pid of its init process.
    pub pid: u32,
    /// Its cgroup, relative to the cgroup2 mount (`libpod_parent/libpod-<id>`).
    pub cgroup: String,
    /// `net:[<inode>]`.
    pub netns: String,
}

impl Container {
    /// `podman exec <name> <args...>`: the process joins the container's cgroup and network
    /// namespace. Start it with [`run_with_timeout`] or `spawn`.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.podman();
        cmd.args(["exec", &self.name]).args(args);
        cmd
    }

    /// Whether podman still lists the container.
    pub fn exists(&self) -> bool {
        container_exists(&self.env, &self.name)
    }
}

fn container_exists(env: &Env, name: &str) -> bool {
    env.podman_output(&["container", "exists", name])
        .status
        .success()
}

impl Drop for Container {
    fn drop(&mut self) {
        let out = self.env.podman_output(&["rm", "-f", "-t", "0", &self.name]);
        if !out.status.success() && container_exists(&self.env, &self.name) {
            eprintln!(
                "container harness: podman rm {} failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        remove_leftover_cgroup(&self.cgroup);
    }
}

/// One container of a [`Pod`].
pub struct Member {
    pub name: String,
    pub id: String,
    pub pid: u32,
    /// `libpod_parent/<pod id>/libpod-<id>`.
    pub cgroup: String,
    pub netns: String,
}

/// A pod started by [`Podman::kube_play`], removed (by name) on Drop.
pub struct Pod {
    env: Arc<Env>,
    pub name: String,
    manifest: PathBuf,
    pub id: String,
    /// The pod's cgroup, relative to the cgroup2 mount (`libpod_parent/<pod id>`): its
    /// containers, the infra container included, are below it; conmon is not.
    pub cgroup: String,
    /// Host pid of the infra container, which holds the pod's network namespace.
    pub infra_pid: u32,
    agent: Option<Member>,
}

impl Pod {
    /// The container running the manifest's command.
    pub fn agent(&self) -> &Member {
        self.agent
            .as_ref()
            .unwrap_or_else(|| panic!("pod {} has no agent container", self.name))
    }

    /// The pod's labels, as `podman pod inspect` reports them.
    pub fn labels(&self) -> serde_json::Map<String, serde_json::Value> {
        let out = self
            .env
            .podman_ok(&["pod", "inspect", "-f", "{{json .Labels}}", &self.name]);
        match serde_json::from_str(&out) {
            Ok(serde_json::Value::Object(map)) => map,
            _ => panic!("podman pod inspect printed labels {out:?}"),
        }
    }

    /// The names of the pods podman lists with label `key=value`.
    pub fn listed_with_label(&self, key: &str, value: &str) -> Vec<String> {
        let filter = format!("label={key}={value}");
        self.env
            .podman_ok(&["pod", "ps", "--filter", &filter, "--format", "{{.Name}}"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// `podman exec` in the pod's agent container.
    pub fn exec(&self, args: &[&str]) -> Command {
        let mut cmd = self.env.podman();
        cmd.args(["exec", &self.agent().name]).args(args);
        cmd
    }

    /// Whether podman still lists the pod.
    pub fn exists(&self) -> bool {
        pod_exists(&self.env, &self.name)
    }
}

fn pod_exists(env: &Env, name: &str) -> bool {
    env.podman_output(&["pod", "exists", name]).status.success()
}

impl Drop for Pod {
    fn drop(&mut self) {
        let manifest = self.manifest.display().to_string();
        let _ = self.env.podman_output(&["kube", "down", &manifest]);
        if pod_exists(&self.env, &self.name) {
            let out = self
                .env
                .podman_output(&["pod", "rm", "-f", "-t", "0", &self.name]);
            if !out.status.success() {
                eprintln!(
                    "container harness: podman pod rm {} failed: {}",
                    self.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        let _ = fs::remove_file(&self.manifest);
        if !self.id.is_empty() {
            remove_leftover_cgroup(&format!("libpod_parent/{}", self.id));
        }
        if let Some(agent) = &self.agent {
            remove_leftover_cgroup(&agent.cgroup);
        }
        remove_leftover_cgroup(&self.cgroup);
    }
}

/// A running `podman system service`, from [`Podman::api_service`].
pub struct ApiService {
    pub socket: PathBuf,
    child: std::process::Child,
}

impl Drop for ApiService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_file(&self.socket);
    }
}

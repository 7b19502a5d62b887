//! Where the kubelet puts a pod's cgroup, found from the pod's UID.
//!
//! The path depends on the kubelet's cgroup driver and the pod's QoS class, and on where the
//! node itself runs (a kind or k3s node nests it below its own cgroup):
//!
//! | driver | QoS | pod cgroup |
//! |---|---|---|
//! | systemd | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice` |
//! | systemd | Burstable, BestEffort | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>` |
//! | cgroupfs | Burstable, BestEffort | `kubepods/<qos>/pod<uid>` |
//!
//! (`<uid_>` is the UID with `-` written as `_`.) Rather than guess the driver, the search walks
//! the cgroup2 tree below every directory named like `*kubepods*` within a few levels of the
//! root, as Tetragon and Cilium do, and matches the pod directory by its UID. The tag covers the
//! pod's container cgroups below it (`cri-containerd-<id>.scope`, `crio-<id>.scope`,
//! `docker-<id>.scope`, or `<id>` with cgroupfs) whatever their names.

use std::path::Path;

/// How deep below the cgroup2 root a `kubepods` directory may be (a node inside a container
/// nests it).
const KUBEPODS_DEPTH: usize = 4;
/// How deep below `kubepods` a pod may be (QoS level, then the pod).
const POD_DEPTH: usize = 3;

/// The pod's cgroup, relative to the cgroup2 mount, if the kubelet made one on this node.
pub fn find_pod_cgroup(mount: &Path, uid: &str) -> Option<String> {
    if uid.is_empty() || uid.contains('/') {
        return None;
    }
    let mut roots = Vec::new();
    find_dirs(mount, "", KUBEPODS_DEPTH, &mut |rel, name| {
        if name.contains("kubepods") {
            roots.push(rel.to_owned());
            true // found: don't look for kubepods below kubepods
        } else {
            false
        }
    });
    for root in roots {
        let mut found = None;
        find_dirs(&mount.join(&root), &root, POD_DEPTH, &mut |rel, name| {
            if found.is_none() && is_pod_dir(name, uid) {
                found = Some(rel.to_owned());
            }
            found.is_some()
        });
        if found.is_some() {
            return found;
        }
    }
    None
}

/// Whether a directory name is the pod cgroup of `uid`, for either driver (the OCI hook checks
/// that a container's parent cgroup is its pod's).
pub fn names_pod(name: &str, uid: &str) -> bool {
    !uid.is_empty() && !uid.contains('/') && is_pod_dir(name, uid)
}

/// Whether a directory name is the pod cgroup of `uid`, for either driver.
fn is_pod_dir(name: &str, uid: &str) -> bool {
    let cgroupfs = format!("pod{uid}");
    let systemd = format!("-pod{}.slice", uid.replace('-', "_"));
    name == cgroupfs || name.ends_with(&systemd)
}

/// Calls `found(relative path, dir name)` for each directory below `dir` up to `depth` levels,
/// breadth first; `found` returning true stops the descent into that directory.
fn find_dirs(dir: &Path, rel: &str, depth: usize, found: &mut dyn FnMut(&str, &str) -> bool) {
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let child_rel = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        if !found(&child_rel, &name) {
            children.push((entry.path(), child_rel));
        }
    }
    for (path, child_rel) in children {
        find_dirs(&path, &child_rel, depth - 1, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "3f2c1a9e-8b7d-4c6e-9a1b-2d3e4f5a6b7c";

    fn tree(dirs: &[&str]) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("a temp dir");
        for d in dirs {
            std::fs::create_dir_all(root.path().join(d)).expect("a test cgroup tree");
        }
        root
    }

    #[test]
    fn finds_pods_of_both_drivers_and_every_qos_class() {
        let us = UID.replace('-', "_");
        for layout in [
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{us}.slice"),
            format!("kubepods.slice/kubepods-pod{us}.slice"),
            format!("kubepods/besteffort/pod{UID}"),
            format!("kubepods/pod{UID}"),
            // A kind node: the kubelet's tree below the node container's cgroup.
            format!(
                "system.slice/docker-abc.scope/kubelet.slice/kubelet-kubepods.slice/\
                 kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{us}.slice"
            ),
        ] {
            let root = tree(&[&layout, "kubepods/burstable/podother", "user.slice"]);
            let got = find_pod_cgroup(root.path(), UID);
            assert_eq!(got.as_deref(), Some(layout.as_str()), "{layout}");
        }
    }

    #[test]
    fn another_pods_uid_or_a_bad_uid_is_not_found() {
        let root = tree(&[&format!("kubepods/burstable/pod{UID}")]);
        assert_eq!(find_pod_cgroup(root.path(), "0000"), None);
        assert_eq!(find_pod_cgroup(root.path(), ""), None);
        assert_eq!(find_pod_cgroup(root.path(), "../x"), None);
        // The UID must be the whole name, not a prefix of it.
        let short = &UID[..8];
        assert_eq!(find_pod_cgroup(root.path(), short), None);
    }
}

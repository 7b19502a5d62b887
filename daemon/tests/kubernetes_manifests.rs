//! The Kubernetes manifests in `deploy/kubernetes/`, validated offline (no cluster): every YAML
//! document parses, has the kind and apiVersion it should, and the fields brokerd depends on
//! are there: hostPID, the host's cgroup2 and bpffs, the capabilities (each justified by a
//! comment), the selector, brokerd's arguments (parsed by brokerd's own flag parser), and every
//! ConfigMap, Secret and ServiceAccount a reference names is defined. The policies in the
//! ConfigMap load with brokerd's policy loader.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use agent_broker::config::Settings;
use agent_broker_core::policy::Policy;
use clap::Parser;
use serde_yaml::Value;

const NAMESPACE: &str = "agent-broker";
/// The systemd credential name brokerd reads the master key from (`vault.rs`).
const MASTER_KEY_FILE: &str = "agent-broker-master-key";

/// The capabilities the DaemonSet grants, no more (see the comments in daemonset.yaml).
const CAPABILITIES: [&str; 6] = [
    "BPF",
    "NET_ADMIN",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
    "IPC_LOCK",
];

fn manifest_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

/// One parsed document, with the file it came from.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        str_at(&self.value, &["kind"]).unwrap_or("")
    }
    fn name(&self) -> &str {
        str_at(&self.value, &["metadata", "name"]).unwrap_or("")
    }
    fn namespace(&self) -> Option<&str> {
        str_at(&self.value, &["metadata", "namespace"])
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).and_then(Value::as_str)
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn strings(values: &[Value]) -> Vec<&str> {
    values.iter().filter_map(Value::as_str).collect()
}

/// Every document of every `*.yaml` file, in file order.
fn load() -> (Vec<Doc>, Vec<(String, String)>) {
    let dir = manifest_dir();
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    let mut texts = Vec::new();
    for path in files {
        let file = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        for (i, de) in serde_yaml::Deserializer::from_str(&text).enumerate() {
            let value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not valid YAML: {e}"));
            if value == Value::Null {
                continue;
            }
            let doc = Doc {
                file: file.clone(),
                value,
            };
            assert!(
                !doc.kind().is_empty() && !doc.name().is_empty(),
                "{file}: document {i} has no kind or metadata.name"
            );
            docs.push(doc);
        }
        texts.push((file, text));
    }
    (docs, texts)
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("no {kind} named {name} in deploy/kubernetes"))
}

fn has(docs: &[Doc], kind: &str, name: &str, namespace: Option<&str>) -> bool {
    docs.iter()
        .any(|d| d.kind() == kind && d.name() == name && d.namespace() == namespace)
}

#[test]
fn every_document_has_the_api_version_of_its_kind_and_a_defined_namespace() {
    let (docs, _) = load();
    let mut seen = BTreeSet::new();
    for doc in &docs {
        let (api, namespaced) = match doc.kind() {
            "Namespace" => ("v1", false),
            "ServiceAccount" | "ConfigMap" | "Secret" => ("v1", true),
            "ClusterRole" | "ClusterRoleBinding" => ("rbac.authorization.k8s.io/v1", false),
            "DaemonSet" => ("apps/v1", true),
            other => panic!("{}: unexpected kind {other}", doc.file),
        };
        assert_eq!(
            str_at(&doc.value, &["apiVersion"]),
            Some(api),
            "{}: {} {}",
            doc.file,
            doc.kind(),
            doc.name()
        );
        if namespaced {
            let ns = doc.namespace().unwrap_or_else(|| {
                panic!(
                    "{}: {} {} has no namespace",
                    doc.file,
                    doc.kind(),
                    doc.name()
                )
            });
            assert!(
                has(&docs, "Namespace", ns, None),
                "{}: namespace {ns} is not defined",
                doc.file
            );
        } else {
            assert_eq!(doc.namespace(), None, "{}: cluster-scoped", doc.file);
        }
        assert!(
            seen.insert((doc.kind().to_string(), doc.name().to_string())),
            "{}: {} {} is defined twice",
            doc.file,
            doc.kind(),
            doc.name()
        );
    }
    for (kind, name) in [
        ("Namespace", NAMESPACE),
        ("ServiceAccount", "agent-broker"),
        ("ClusterRole", "agent-broker"),
        ("ClusterRoleBinding", "agent-broker"),
        ("ConfigMap", "agent-broker-policies"),
        ("ConfigMap", "agent-broker-ca"),
        ("Secret", "agent-broker-master-key"),
        ("DaemonSet", "agent-broker"),
    ] {
        find(&docs, kind, name);
    }
}

#[test]
fn the_daemonset_runs_brokerd_with_host_pids_cgroup2_bpffs_and_least_capabilities() {
    let (docs, texts) = load();
    let ds = find(&docs, "DaemonSet", "agent-broker");
    let ns = ds.namespace().unwrap_or_default();
    let spec = &ds.value["spec"];
    let pod = &spec["template"]["spec"];

    // The selector selects the template's pods, and only by labels the template has.
    let selector = at(spec, &["selector", "matchLabels"])
        .and_then(Value::as_mapping)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("the DaemonSet has no selector.matchLabels"));
    let labels = at(spec, &["template", "metadata", "labels"])
        .and_then(Value::as_mapping)
        .unwrap_or_else(|| panic!("the pod template has no labels"));
    for (k, v) in selector {
        assert_eq!(
            labels.get(k),
            Some(v),
            "selector label {k:?} not on the template"
        );
    }

    assert_eq!(pod["hostPID"].as_bool(), Some(true), "hostPID");
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true), "hostNetwork");
    let sa = str_at(pod, &["serviceAccountName"]).unwrap_or("");
    assert!(
        has(&docs, "ServiceAccount", sa, Some(ns)),
        "serviceAccountName {sa:?} is not defined in {ns}"
    );

    let containers = seq_at(pod, &["containers"]);
    assert_eq!(containers.len(), 1, "one container, brokerd");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_ne!(sc["privileged"].as_bool(), Some(true), "not privileged");
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(strings(seq_at(sc, &["capabilities", "drop"])), vec!["ALL"]);
    let added: BTreeSet<&str> = strings(seq_at(sc, &["capabilities", "add"]))
        .into_iter()
        .collect();
    assert_eq!(
        added,
        CAPABILITIES.into_iter().collect(),
        "capabilities added"
    );
    // Each capability is justified: a comment right above its line.
    let (_, text) = texts
        .iter()
        .find(|(f, _)| *f == ds.file)
        .unwrap_or_else(|| panic!("no text of {}", ds.file));
    let lines: Vec<&str> = text.lines().collect();
    for cap in CAPABILITIES {
        let i = lines
            .iter()
            .position(|l| l.trim() == format!("- {cap}"))
            .unwrap_or_else(|| panic!("{}: no `- {cap}` line", ds.file));
        assert!(
            i > 0 && lines[i - 1].trim_start().starts_with('#'),
            "{}: capability {cap} has no comment saying why",
            ds.file
        );
    }

    // Volumes: every mount names a volume; the host's cgroup2 and bpffs are mounted.
    let volumes = seq_at(pod, &["volumes"]);
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| str_at(v, &["name"]) == Some(name))
            .unwrap_or_else(|| panic!("no volume named {name}"))
    };
    let mounts = seq_at(c, &["volumeMounts"]);
    let mount_of = |host_path: &str| -> String {
        let v = volumes
            .iter()
            .find(|v| str_at(v, &["hostPath", "path"]) == Some(host_path))
            .unwrap_or_else(|| panic!("no hostPath volume of {host_path}"));
        let name = str_at(v, &["name"]).unwrap_or("");
        let m = mounts
            .iter()
            .find(|m| str_at(m, &["name"]) == Some(name))
            .unwrap_or_else(|| panic!("volume {name} ({host_path}) is not mounted"));
        assert_ne!(
            m["readOnly"].as_bool(),
            Some(true),
            "{host_path} must be writable"
        );
        str_at(m, &["mountPath"]).unwrap_or("").to_string()
    };
    for m in mounts {
        volume(str_at(m, &["name"]).unwrap_or(""));
    }
    assert_eq!(mount_of("/sys/fs/cgroup"), "/sys/fs/cgroup");
    let bpffs = mount_of("/sys/fs/bpf");
    assert_eq!(bpffs, "/sys/fs/bpf");

    // ConfigMap and Secret volumes name objects of the manifests, in the pod's namespace.
    let mounted_at = |kind: &str, field: &str, name_key: &str| -> (String, &Value) {
        let v = volumes
            .iter()
            .find(|v| v.get(field).is_some())
            .unwrap_or_else(|| panic!("no {field} volume"));
        let object = str_at(v, &[field, name_key]).unwrap_or("");
        assert!(
            has(&docs, kind, object, Some(ns)),
            "{field} volume names {kind} {object:?}, which is not defined in {ns}"
        );
        let vname = str_at(v, &["name"]).unwrap_or("");
        let path = mounts
            .iter()
            .find(|m| str_at(m, &["name"]) == Some(vname))
            .and_then(|m| str_at(m, &["mountPath"]))
            .unwrap_or_else(|| panic!("volume {vname} is not mounted"));
        (path.to_string(), v)
    };
    let (policy_dir, _) = mounted_at("ConfigMap", "configMap", "name");
    let (key_dir, key_volume) = mounted_at("Secret", "secret", "secretName");
    let items = seq_at(key_volume, &["secret", "items"]);
    assert!(
        items
            .iter()
            .any(|i| str_at(i, &["key"]) == Some(MASTER_KEY_FILE)
                && str_at(i, &["path"]) == Some(MASTER_KEY_FILE)),
        "the master key Secret must be mounted as the file {MASTER_KEY_FILE}"
    );
    assert_eq!(
        at(key_volume, &["secret", "defaultMode"]).and_then(Value::as_u64),
        Some(0o400),
        "brokerd refuses a key file others can read"
    );
    let vault_rs = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/vault.rs"))
        .unwrap_or_else(|e| panic!("cannot read src/vault.rs: {e}"));
    assert!(
        vault_rs.contains(&format!(
            "SYSTEMD_CREDENTIAL_NAME: &str = \"{MASTER_KEY_FILE}\""
        )),
        "brokerd's credential name is no longer {MASTER_KEY_FILE}"
    );
    let env = seq_at(c, &["env"]);
    let credentials = env
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("CREDENTIALS_DIRECTORY"))
        .and_then(|e| str_at(e, &["value"]));
    assert_eq!(
        credentials,
        Some(key_dir.as_str()),
        "CREDENTIALS_DIRECTORY must be the Secret's mount"
    );

    // brokerd's own flag parser accepts the arguments, and they point at the mounts.
    #[derive(Parser)]
    struct Brokerd {
        #[command(flatten)]
        settings: Settings,
    }
    assert_eq!(strings(seq_at(c, &["command"])), vec!["brokerd"]);
    let args = strings(seq_at(c, &["args"]));
    let parsed = Brokerd::try_parse_from(std::iter::once("brokerd").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("brokerd refuses the DaemonSet's arguments {args:?}: {e}"));
    let s = parsed.settings;
    assert!(s.master_key_credential, "--master-key-credential");
    // The pod source watches this node's labelled pods: kube, with the node from the downward
    // API.
    assert_eq!(s.pod_source.as_deref(), Some("kube"), "--pod-source=kube");
    let node_name = seq_at(c, &["env"])
        .iter()
        .find(|e| str_at(e, &["name"]) == Some("NODE_NAME"))
        .unwrap_or_else(|| panic!("the brokerd container sets NODE_NAME for the pod source"));
    assert_eq!(
        str_at(node_name, &["valueFrom", "fieldRef", "fieldPath"]),
        Some("spec.nodeName")
    );
    assert_eq!(s.policy_dir.as_deref(), Some(Path::new(&policy_dir)));
    let pin_dir = s.pin_dir.unwrap_or_default();
    assert!(
        pin_dir.starts_with(&bpffs) && pin_dir != Path::new(&bpffs),
        "the pin dir {} must be below the bpffs mount {bpffs}",
        pin_dir.display()
    );
    for dir in [s.state_dir, s.run_dir] {
        let dir = dir.unwrap_or_else(|| panic!("--state-dir and --run-dir are given"));
        assert!(
            mounts
                .iter()
                .any(|m| str_at(m, &["mountPath"]) == Some(&dir.display().to_string())),
            "{} must be a mounted volume (the root filesystem is read-only)",
            dir.display()
        );
    }
}

#[test]
fn rbac_grants_only_reading_pods_to_brokerds_service_account() {
    let (docs, _) = load();
    let role = find(&docs, "ClusterRole", "agent-broker");
    let rules = seq_at(&role.value, &["rules"]);
    assert_eq!(rules.len(), 1, "one rule: {rules:?}");
    assert_eq!(strings(seq_at(&rules[0], &["apiGroups"])), vec![""]);
    assert_eq!(strings(seq_at(&rules[0], &["resources"])), vec!["pods"]);
    let verbs: BTreeSet<&str> = strings(seq_at(&rules[0], &["verbs"])).into_iter().collect();
    assert_eq!(verbs, BTreeSet::from(["get", "list", "watch"]));

    let binding = find(&docs, "ClusterRoleBinding", "agent-broker");
    assert_eq!(
        str_at(&binding.value, &["roleRef", "kind"]),
        Some("ClusterRole")
    );
    let role_name = str_at(&binding.value, &["roleRef", "name"]).unwrap_or("");
    assert!(
        has(&docs, "ClusterRole", role_name, None),
        "roleRef {role_name}"
    );
    let subjects = seq_at(&binding.value, &["subjects"]);
    assert!(!subjects.is_empty(), "the binding has no subjects");
    for s in subjects {
        assert_eq!(str_at(s, &["kind"]), Some("ServiceAccount"));
        let (name, ns) = (
            str_at(s, &["name"]).unwrap_or(""),
            str_at(s, &["namespace"]),
        );
        assert!(
            has(&docs, "ServiceAccount", name, ns),
            "subject {name} in {ns:?} is not defined"
        );
    }
}

#[test]
fn the_policy_configmap_loads_with_brokerds_policy_loader() {
    let (docs, _) = load();
    let cm = find(&docs, "ConfigMap", "agent-broker-policies");
    let data = at(&cm.value, &["data"])
        .and_then(Value::as_mapping)
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| panic!("the policy ConfigMap has no data"));
    let dir = tempfile::tempdir().expect("tempdir");
    for (k, v) in data {
        let (Some(name), Some(text)) = (k.as_str(), v.as_str()) else {
            panic!("policy ConfigMap entry {k:?} is not a file name and text");
        };
        assert!(name.ends_with(".toml"), "{name}: brokerd loads only *.toml");
        fs::write(dir.path().join(name), text).expect("write policy");
    }
    let policy = Policy::load_dir(dir.path())
        .unwrap_or_else(|e| panic!("the policy ConfigMap does not load: {e}"));
    assert_eq!(policy.files().len(), data.len());
    // The secrets and CA objects carry no data in the repository: the key and the CA bundle
    // are put in by the operator (`kubectl replace`), never committed.
    for (kind, name) in [
        ("Secret", "agent-broker-master-key"),
        ("ConfigMap", "agent-broker-ca"),
    ] {
        let doc = find(&docs, kind, name);
        for field in ["data", "stringData", "binaryData"] {
            assert!(
                doc.value.get(field).is_none(),
                "{kind} {name} must be a placeholder without {field}"
            );
        }
    }
}

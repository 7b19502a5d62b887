//! A stand-in for the Kubernetes API server, for brokerd's kube pod source: there is no API
//! server on this machine (no cluster, no registry to pull one from), so this mocks the one
//! endpoint the source uses, `GET /api/v1/pods`, list and watch, with the label and field
//! selectors it sends. It is a python process on 127.0.0.1 serving plain HTTP; the test sets the
//! pods with [`FakeKubeApi::set_pods`], and a watch reports the difference as ADDED, MODIFIED and
//! DELETED events. A watch from an older resource version gets 410 Gone, so the client lists
//! again, as a real API server makes it. Drop stops it by pid.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use serde_json::{Value, json};

use crate::agent::python;

const SERVER_PY: &str = r#"
import http.server, json, os, socketserver, sys, time, urllib.parse
state_path = sys.argv[1]
def load():
    try:
        with open(state_path) as f:
            return json.load(f)
    except Exception:
        return {"rv": 1, "pods": []}
def selected(pod, q):
    labels = pod.get("metadata", {}).get("labels") or {}
    for term in filter(None, q.get("labelSelector", [""])[0].split(",")):
        if "=" in term:
            k, v = term.split("=", 1)
            if labels.get(k) != v:
                return False
        elif term not in labels:
            return False
    for term in filter(None, q.get("fieldSelector", [""])[0].split(",")):
        k, v = term.split("=", 1)
        if k == "spec.nodeName" and pod.get("spec", {}).get("nodeName") != v:
            return False
    return True
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def log_message(self, *args):
        pass
    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(url.query)
        print("GET " + self.path, flush=True)
        if url.path != "/api/v1/pods":
            self.send_response(404)
            self.end_headers()
            return
        state = load()
        pods = [p for p in state["pods"] if selected(p, q)]
        if q.get("watch", ["false"])[0] not in ("true", "1"):
            body = json.dumps({"kind": "PodList", "apiVersion": "v1",
                               "metadata": {"resourceVersion": str(state["rv"])},
                               "items": pods}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        def send(kind, obj):
            self.wfile.write((json.dumps({"type": kind, "object": obj}) + "\n").encode())
            self.wfile.flush()
        if q.get("resourceVersion", [""])[0] != str(state["rv"]):
            send("ERROR", {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                           "reason": "Expired", "code": 410, "message": "too old"})
            return
        known = {p["metadata"]["uid"]: p for p in pods}
        rv = state["rv"]
        deadline = time.time() + min(int(q.get("timeoutSeconds", ["60"])[0]), 60)
        while time.time() < deadline:
            time.sleep(0.1)
            state = load()
            if state["rv"] == rv:
                continue
            rv = state["rv"]
            now = {p["metadata"]["uid"]: p for p in state["pods"] if selected(p, q)}
            for uid, pod in now.items():
                pod["metadata"]["resourceVersion"] = str(rv)
                if uid not in known:
                    send("ADDED", pod)
                elif known[uid] != pod:
                    send("MODIFIED", pod)
            for uid, pod in known.items():
                if uid not in now:
                    pod["metadata"]["resourceVersion"] = str(rv)
                    send("DELETED", pod)
            known = now
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
server = Server(("127.0.0.1", 0), Handler)
print("port %d" % server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The mock API server; see the module docs.
pub struct FakeKubeApi {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
    rv: u64,
}

impl FakeKubeApi {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("abtest-kube-")
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot make a dir for the fake API server: {e}"));
        let state = dir.path().join("pods.json");
        std::fs::write(&state, r#"{"rv": 1, "pods": []}"#)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", state.display()));
        let mut child = Command::new(python())
            .args(["-c", SERVER_PY])
            .arg(&state)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the fake Kubernetes API server: {e}"));
        let mut first = String::new();
        if let Some(out) = child.stdout.take() {
            let mut out = BufReader::new(out);
            let _ = out.read_line(&mut first);
            // Keep draining its request log so it never blocks on a full pipe.
            std::thread::spawn(move || for _ in out.lines() {});
        }
        let port = first
            .trim()
            .strip_prefix("port ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("the fake API server printed {first:?}"));
        let api = Self {
            dir,
            child,
            port,
            rv: 1,
        };
        std::fs::write(api.kubeconfig(), api.kubeconfig_yaml())
            .unwrap_or_else(|e| panic!("cannot write the kubeconfig: {e}"));
        api
    }

    /// A kubeconfig naming this server (for `KUBECONFIG`).
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: abtest\n  cluster:\n    server: \
             http://127.0.0.1:{}\nusers:\n- name: abtest\n  user: {{}}\ncontexts:\n- name: \
             abtest\n  context:\n    cluster: abtest\n    user: abtest\ncurrent-context: abtest\n",
            self.port
        )
    }

    /// Replaces the cluster's pods (each a Pod object); watches see the difference.
    pub fn set_pods(&mut self, pods: &[Value]) {
        self.rv += 1;
        let state = json!({ "rv": self.rv, "pods": pods });
        let path = self.dir.path().join("pods.json");
        let tmp = self.dir.path().join("pods.json.tmp");
        std::fs::write(&tmp, state.to_string())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

/// A running pod object, as the API server returns it.
pub fn pod(namespace: &str, name: &str, uid: &str, node: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid,
            "labels": labels, "resourceVersion": "1",
        },
        "spec": { "nodeName": node, "containers": [{ "name": "agent", "image": "abtest" }] },
        "status": { "phase": "Running" },
    })
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

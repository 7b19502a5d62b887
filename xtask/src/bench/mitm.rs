//! mitmproxy in reverse mode, the tool many would reach for: `mitmdump` terminates TLS with its own
//! CA, a small addon writes the Authorization header, and each listener forwards to one upstream.
//! It skips upstream certificate checks (`--ssl-insecure`), which only spares it work.

use std::{fs, net::SocketAddr, path::Path, process::Command};

use anyhow::{Context as _, Result};

/// The addon: sets the header from the key file named by `BENCH_AUTHORIZATION_FILE`.
const ADDON: &str = r#""""agent-broker bench: writes the Authorization header into every request."""
import os

with open(os.environ["BENCH_AUTHORIZATION_FILE"]) as f:
    AUTHORIZATION = f.read().strip()


def request(flow):
    flow.request.headers["authorization"] = AUTHORIZATION
"#;

/// One reverse-mode listener and the upstream it forwards to.
pub struct Route {
    pub listen_port: u16,
    pub upstream: SocketAddr,
}

/// The `mitmdump` command serving `routes` on 127.0.0.1, with its addon, CA and state in `dir`.
/// `authorization_file` holds the whole header value.
pub fn command(
    mitmdump: &Path,
    dir: &Path,
    routes: &[Route],
    authorization_file: &Path,
) -> Result<Command> {
    let addon = dir.join("mitm-addon.py");
    fs::write(&addon, ADDON).with_context(|| format!("writing {}", addon.display()))?;
    let confdir = dir.join("mitmproxy");
    fs::create_dir_all(&confdir)?;
    let mut command = Command::new(mitmdump);
    command
        .env("BENCH_AUTHORIZATION_FILE", authorization_file)
        .arg("--quiet")
        .args(["--listen-host", "127.0.0.1"])
        .arg("--set")
        .arg(format!("confdir={}", confdir.display()))
        .arg("--ssl-insecure")
        .arg("-s")
        .arg(&addon);
    for route in routes {
        command.arg("--mode").arg(format!(
            "reverse:https://{}@{}",
            route.upstream, route.listen_port
        ));
    }
    Ok(command)
}

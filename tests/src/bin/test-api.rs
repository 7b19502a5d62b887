//! test-api: the bundled local HTTPS API of the demo and the README walk-through.
//!
//! An HTTPS server (h2 and http/1.1) on a loopback address with a certificate from a test CA of
//! its own, generated at start and written to `--ca-out` for brokerd's `--upstream-ca`. It
//! answers `GET /v1/whoami` with 200 only when the Authorization header is `Bearer <the key in
//! --expect-bearer-file>`, and reports the sha256 of what it received (never the value). Other
//! endpoints: `/hash`, `/echo` (echoes request headers, to show scrubbing), `/stream`, `/ws`.
//! For tests and demos only: it holds no real key and must never listen beyond loopback.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use agent_broker_tests::{
    canary::sha256_hex,
    upstream::{TestCa, TestUpstream, UpstreamOptions},
};

const USAGE: &str = "usage: test-api --listen LOOPBACK_IP:PORT --ca-out FILE \
                     [--expect-bearer-file FILE] [--name DNS_NAME]...";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("test-api: {e}\n{USAGE}");
            ExitCode::from(64)
        }
    }
}

fn run() -> Result<(), String> {
    let mut listen: Option<SocketAddr> = None;
    let mut ca_out: Option<PathBuf> = None;
    let mut expect: Option<PathBuf> = None;
    let mut names = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(
                    v.parse()
                        .map_err(|e| format!("invalid --listen {v}: {e}"))?,
                );
            }
            "--ca-out" => ca_out = Some(PathBuf::from(value()?)),
            "--expect-bearer-file" => expect = Some(PathBuf::from(value()?)),
            "--name" => names.push(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let listen = listen.ok_or("--listen is required")?;
    if !listen.ip().is_loopback() {
        return Err(format!(
            "--listen {listen}: only loopback addresses are allowed"
        ));
    }
    let ca_out = ca_out.ok_or("--ca-out is required")?;
    let expect_authorization_sha256 = match expect {
        Some(path) => {
            let key = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            // Stored secrets lose one trailing newline; so does the expected value.
            let key = key.strip_suffix('\n').unwrap_or(&key);
            Some(sha256_hex(format!("Bearer {key}").as_bytes()))
        }
        None => None,
    };
    if names.is_empty() {
        names = vec!["api.example.test".into(), "other.example.test".into()];
    }
    let ca = TestCa::new("agent-broker test-api CA");
    std::fs::copy(ca.pem_path(), &ca_out)
        .map_err(|e| format!("cannot write {}: {e}", ca_out.display()))?;
    let upstream = TestUpstream::start(
        &ca,
        UpstreamOptions {
            ip: listen.ip(),
            names: names.clone(),
            plain: false,
            port: listen.port(),
            expect_authorization_sha256,
            ..UpstreamOptions::api()
        },
    );
    eprintln!(
        "test-api: https://{} on {} (CA in {}); Ctrl-C to stop",
        names.join(", https://"),
        upstream.addr(),
        ca_out.display()
    );
    wait_for_signal()
}

fn wait_for_signal() -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
        let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok(())
    })
}

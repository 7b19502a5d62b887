//! Go's `net/http` as an agent: a small Go program (standard library only), built by the test
//! with Debian's Go, run under `brokerctl run` holding only a placeholder, calling the test API
//! once over HTTP/1.1 (HTTP/2 turned off in its Transport) and once over HTTP/2 (asked for with
//! `ForceAttemptHTTP2`, negotiated by ALPN with brokerd).
//!
//! The name reaches 127.0.0.2 without /etc/hosts: the program's `DialContext` dials the address
//! it is given whatever the URL names, and TLS still verifies (and sends as SNI) the URL's name.
//! Go reads the CA bundle `SSL_CERT_FILE` names; the launcher points it at the merged bundle.
//!
//! Oracles: the protocol of each response as Go saw it (`resp.ProtoMajor`), the API's record of
//! `Bearer <secret>` (by hash) arriving over brokerd's socket from the agent's cgroup, and the
//! secret absent from the program's output and environment, brokerd's log and brokerctl's output.
//!
//! Needs root, cgroup v2, BPF and Debian's `golang-go` package (`cargo xtask setup`). Run alone:
//! `cargo test -p agent-broker-tests --test compat_go -- --test-threads=1`.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agent_broker_tests::{
    clients::{self, ClientRun, HttpReport},
    run_with_timeout,
    world::{TEST_API_IP, World},
};

/// The Go toolchain of Debian's `golang-go`.
const GO: &str = "/usr/bin/go";

/// The agent: one GET with the placeholder as bearer token; prints an `HttpReport` as JSON.
/// Arguments: the URL, the address to dial, `h1` or `h2`, the placeholder.
const CLIENT_GO: &str = r#"package main

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"time"
)

type report struct {
	Status     int               `json:"status"`
	Version    string            `json:"version"`
	ProtoMajor int               `json:"proto_major"`
	Headers    map[string]string `json:"headers"`
	Body       string            `json:"body"`
	Error      string            `json:"error,omitempty"`
}

func main() {
	url, connect, proto, placeholder := os.Args[1], os.Args[2], os.Args[3], os.Args[4]
	out := report{Headers: map[string]string{}}
	defer func() {
		b, _ := json.Marshal(out)
		fmt.Println(string(b))
	}()
	dialer := &net.Dialer{Timeout: 10 * time.Second}
	transport := &http.Transport{
		// Every connection goes to the test address; TLS verifies the URL's name.
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return dialer.DialContext(ctx, network, connect)
		},
		TLSClientConfig: &tls.Config{},
	}
	if proto == "h2" {
		transport.ForceAttemptHTTP2 = true
	} else {
		// A non-nil empty map turns HTTP/2 off.
		transport.TLSNextProto = map[string]func(string, *tls.Conn) http.RoundTripper{}
	}
	client := &http.Client{Transport: transport, Timeout: 20 * time.Second}
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		out.Error = err.Error()
		return
	}
	req.Header.Set("Authorization", "Bearer "+placeholder)
	resp, err := client.Do(req)
	if err != nil {
		out.Error = err.Error()
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		out.Error = err.Error()
	}
	out.Status = resp.StatusCode
	out.Version = resp.Proto
	out.ProtoMajor = resp.ProtoMajor
	for k := range resp.Header {
		out.Headers[k] = resp.Header.Get(k)
	}
	out.Body = string(body)
}
"#;

/// Builds the client (`go build`, standard library only, offline) into `dir`. Go's default
/// settings, so the build links Debian's precompiled standard library (`CGO_ENABLED=0` would
/// compile net/http and its dependencies afresh, close to a minute on a busy machine).
fn build_client(dir: &Path) -> PathBuf {
    assert!(
        Path::new(GO).is_file(),
        "{GO} is missing: the Go test needs Debian's `golang-go` package (run `cargo xtask \
         setup`, or `apt-get install golang-go`)"
    );
    let src = dir.join("src");
    std::fs::create_dir_all(&src)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", src.display()));
    std::fs::write(src.join("main.go"), CLIENT_GO)
        .unwrap_or_else(|e| panic!("cannot write main.go: {e}"));
    std::fs::write(src.join("go.mod"), "module abtest/goclient\n\ngo 1.19\n")
        .unwrap_or_else(|e| panic!("cannot write go.mod: {e}"));
    let bin = dir.join("go-client");
    let out = run_with_timeout(
        Command::new(GO)
            .current_dir(&src)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", dir)
            .env("GOCACHE", dir.join("cache"))
            .env("GOPATH", dir.join("gopath"))
            .env("GOTOOLCHAIN", "local")
            .env("GOPROXY", "off")
            .env("GOFLAGS", "")
            .args(["build", "-o"])
            .arg(&bin)
            .arg("."),
        // A cold build compiles net/http and crypto/tls: minutes on a busy 2-core machine.
        Duration::from_secs(300),
    );
    assert!(
        out.status.success(),
        "go build failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    bin
}

/// Runs the client for `proto` (`h1` or `h2`) against the API's `/hash`.
fn call(w: &World, client: &Path, proto: &str) -> (ClientRun, HttpReport) {
    let argv = vec![
        clients::agent_copy(&w.broker, client)
            .to_string_lossy()
            .into_owned(),
        format!(
            "https://{}:{}/hash",
            agent_broker_tests::world::API,
            w.api.port()
        ),
        format!("{TEST_API_IP}:{}", w.api.port()),
        proto.into(),
        w.placeholder.expose().into(),
    ];
    let what = format!("go net/http ({proto})");
    let run = clients::run_in_cgroup(&w.broker, &w.agent, &what, &w.trust().var("go"), &argv);
    let report = run.report();
    (run, report)
}

/// `resp.ProtoMajor` as the client printed it.
fn proto_major(run: &ClientRun) -> i64 {
    let stdout = String::from_utf8_lossy(&run.output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_default();
    let report: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
    report["proto_major"]
        .as_i64()
        .unwrap_or_else(|| panic!("{}: no proto_major: {}", run.what, run.show()))
}

#[test]
fn go_net_http_gets_its_key_injected_over_http1_and_h2() {
    let w = World::new();
    let dir = tempfile::Builder::new()
        .prefix("abtest-go-")
        .tempdir()
        .unwrap_or_else(|e| panic!("temp dir for the Go build: {e}"));
    let client = build_client(dir.path());

    for (proto, major) in [("h1", 1), ("h2", 2)] {
        let (run, report) = call(&w, &client, proto);
        let what = format!("go net/http ({proto})");
        let record = w.assert_injected(&what, &run, &report);
        assert_eq!(
            proto_major(&run),
            major,
            "{what}: the protocol Go used with brokerd: {}",
            report.show()
        );
        assert!(
            if major == 2 {
                report.is_h2()
            } else {
                report.is_h1()
            },
            "{what}: resp.Proto: {}",
            report.show()
        );
        eprintln!(
            "{what}: {} between Go and brokerd, {} between brokerd and the API",
            report.version.as_deref().unwrap_or("?"),
            record.version
        );
    }
    w.assert_no_secret_in_logs();
}

//! A JVM agent: `java.net.http.HttpClient` from the distribution's JDK, under `brokerctl run`
//! holding only a placeholder, calls the test API once over HTTP/1.1 and once over HTTP/2. The
//! JVM trusts the broker only through the trust store `brokerctl run` mounts over its `cacerts`
//! (no option, no variable): the credential is checked by hash upstream, the protocol by what
//! the client reports, and the secret is absent from everything the agent sees.
//!
//! Needs root, cgroup v2 and BPF, and a JDK (`cargo xtask setup` installs Debian's
//! default-jre-headless; its `java` runs a single source file without a compile step). Run
//! alone: `cargo test -p agent-broker-tests --test compat_jvm -- --test-threads=1`.

use std::{fs, os::unix::fs::PermissionsExt as _, path::Path};

use agent_broker_tests::{
    clients::{self, ClientRun},
    redact, unique_name,
    world::{API, TEST_API_IP, World},
};

/// The agent: one call per HTTP version, each reported on a line of its own as
/// `ABTEST asked=<version> got=<version> status=<code> body=<body on one line>`.
const CLIENT_JAVA: &str = r#"
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class Client {
    public static void main(String[] args) throws Exception {
        String url = args[0];
        String placeholder = args[1];
        HttpClient.Version[] versions = { HttpClient.Version.HTTP_1_1, HttpClient.Version.HTTP_2 };
        for (HttpClient.Version asked : versions) {
            HttpClient client = HttpClient.newBuilder()
                .version(asked)
                .connectTimeout(Duration.ofSeconds(10))
                .build();
            HttpRequest request = HttpRequest.newBuilder(URI.create(url))
                .header("Authorization", "Bearer " + placeholder)
                .timeout(Duration.ofSeconds(20))
                .build();
            try {
                HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
                System.out.println("ABTEST asked=" + asked + " got=" + response.version()
                    + " status=" + response.statusCode()
                    + " body=" + response.body().replace('\n', ' '));
            } catch (Exception e) {
                System.out.println("ABTEST asked=" + asked + " error=" + e);
            }
        }
    }
}
"#;

/// One reported call: the version the client got, the status and the body.
#[derive(Debug)]
struct JavaCall {
    got: String,
    status: u16,
    body: serde_json::Value,
}

/// The line the client printed for `asked`; panics (redacted) when it is missing or an error.
fn reported(run: &ClientRun, asked: &str) -> JavaCall {
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let prefix = format!("ABTEST asked={asked} ");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("java reported nothing for {asked}: {}", run.show()));
    let field = |name: &str| {
        line.split(' ')
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("java, {asked}: no {name} in {}", redact(line)))
            .to_string()
    };
    let (_, body) = line
        .split_once(" body=")
        .unwrap_or_else(|| panic!("java, {asked}: no response: {}", run.show()));
    JavaCall {
        got: field("got"),
        status: field("status")
            .parse()
            .unwrap_or_else(|e| panic!("java, {asked}: status ({e}): {}", redact(line))),
        body: serde_json::from_str(body).unwrap_or_else(|e| {
            panic!("java, {asked}: the body is not JSON ({e}): {}", run.show())
        }),
    }
}

/// Writes `text` world-readable (the agent is another user).
fn write_readable(path: &Path, text: &str) {
    fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .unwrap_or_else(|e| panic!("cannot open up {}: {e}", path.display()));
}

#[test]
fn java_net_http_gets_its_key_injected_over_http1_and_http2() {
    let w = World::new();
    let dir = w
        .broker
        .scratch_dir()
        .join(format!("jvm-{}", unique_name()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot open up {}: {e}", dir.display()));
    let source = dir.join("Client.java");
    write_readable(&source, CLIENT_JAVA);
    // java.net.http resolves names itself; the JDK's hosts file option names the test API's
    // address without touching /etc/hosts or any resolver.
    let hosts = dir.join("hosts");
    write_readable(&hosts, &format!("{TEST_API_IP} {API}\n"));
    let argv = vec![
        "java".to_string(),
        format!("-Djdk.net.hosts.file={}", hosts.display()),
        source.to_string_lossy().into_owned(),
        format!("https://{API}:{}/hash", w.api.port()),
        w.placeholder.expose().to_string(),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "java.net.http", &[], &argv);
    let want = w.injected_hash();
    for (asked, version) in [("HTTP_1_1", "HTTP_1_1"), ("HTTP_2", "HTTP_2")] {
        let call = reported(&run, asked);
        assert_eq!(
            call.status,
            200,
            "java, {asked}: {call:?}\n{}\nbrokerd's log:\n{}",
            run.show(),
            w.broker.log()
        );
        assert_eq!(
            call.got, version,
            "java asked for {asked} and got {}",
            call.got
        );
        assert_eq!(
            call.body["authorization_sha256"].as_str(),
            Some(want.as_str()),
            "java, {asked}: the API did not receive `Bearer <secret>`: {}",
            run.show()
        );
    }
    let delivered = w
        .api
        .requests()
        .into_iter()
        .filter(|r| r.path == "/hash" && r.header_hash("authorization") == Some(want.as_str()))
        .count();
    assert_eq!(delivered, 2, "the API's record of the two calls");
    run.assert_no_secret(&w.secret);
    w.assert_no_secret_in_logs();
}

//! `git clone` and `git push` over HTTPS as an agent: Debian's git under `brokerctl run`, holding
//! no credential at all, against a real `git http-backend` that requires HTTP basic auth
//! (`agent_broker_tests::git_server`). brokerd writes the credential from the policy rule
//! `inject.basic_auth`, so even git's first request, which a git client sends without
//! credentials, carries it: git never sees a 401 and never asks for a password.
//!
//! Oracles: the clone has the server's content, the pushed commit is on the server's `main`, the
//! server received `Basic base64(user:secret)` (by hash) on every request over brokerd's socket,
//! git itself sent no Authorization (its curl trace, `GIT_TRACE_CURL` unredacted, lists every
//! header it sent and received), and the secret is absent from git's output, its environment,
//! every file of the clone, brokerd's log and brokerctl's output.
//!
//! Needs root, cgroup v2, BPF and Debian's `git` package (`cargo xtask setup`). Run alone:
//! `cargo test -p agent-broker-tests --test compat_git -- --test-threads=1`.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use agent_broker_tests::{
    Canary, SHORT, TestCa,
    clients::{self, ClientRun},
    git_server::{GIT, GitServer, REPO},
    redact, run_with_timeout, sha256_hex,
    world::{TEST_API_IP, World},
};

/// The git server's name (its certificate names it; the agent's git resolves it to
/// [`TEST_API_IP`] through `http.curloptResolve`, brokerd connects where the agent dialled).
const GIT_HOST: &str = "git.example.test";
/// The vault secret holding the git password.
const GIT_SECRET: &str = "ABTEST_GIT_PASSWORD";
/// The basic-auth user name the rule injects.
const GIT_USER: &str = "abtest-ci";

/// The agent: clone, show the README, commit a file, push it to `main`, show the commit.
/// Arguments: git, work directory, clone URL, the pushed file's content.
const AGENT_SH: &str = r#"
set -e
git="$1"; work="$2"; url="$3"; change="$4"
mkdir "$work"
cd "$work"
"$git" clone "$url" clone
printf 'ABTEST readme=%s\n' "$(cat clone/README.md)"
cd clone
printf '%s\n' "$change" > pushed.txt
"$git" add pushed.txt
"$git" commit -q -m "pushed by the agent"
"$git" push origin HEAD:main
printf 'ABTEST head=%s\n' "$("$git" rev-parse HEAD)"
"#;

/// The value of an `ABTEST name=value` line of the agent's stdout.
fn field(run: &ClientRun, name: &str) -> String {
    let prefix = format!("ABTEST {name}=");
    String::from_utf8_lossy(&run.output.stdout)
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("git printed no {name}: {}", run.show()))
}

/// Panics unless `secret` is absent from every file under `dir` (the agent's clone).
fn assert_no_secret_in_files(secret: &Canary, dir: &Path) -> usize {
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_file() {
                let bytes = fs::read(&path)
                    .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
                secret.assert_absent(&bytes, &format!("the agent's file {}", path.display()));
                files += 1;
            }
        }
    }
    files
}

#[test]
fn git_clone_and_push_get_basic_auth_injected_and_never_see_it() {
    let ca = TestCa::new("abtest upstream CA");
    // The git password, stored in brokerd's vault as GIT_SECRET once brokerd runs.
    let secret = Canary::new();
    let expected = sha256_hex(
        format!(
            "Basic {}",
            data_encoding::BASE64.encode(format!("{GIT_USER}:{}", secret.expose()).as_bytes())
        )
        .as_bytes(),
    );
    let server = GitServer::start(&ca, IpAddr::V4(TEST_API_IP), &[GIT_HOST], &expected);

    // The control: without brokerd, git gets the server's 401 and, with no one to ask, fails.
    let direct = run_with_timeout(
        Command::new(GIT)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/nonexistent")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_SSL_CAINFO", ca.pem_path())
            .args([
                "-c",
                &format!(
                    "http.curloptResolve={GIT_HOST}:{}:{TEST_API_IP}",
                    server.port()
                ),
                "ls-remote",
                &format!("https://{GIT_HOST}:{}/{REPO}", server.port()),
            ]),
        SHORT,
    );
    assert!(
        !direct.status.success(),
        "git without a credential must be refused by the server: {}",
        String::from_utf8_lossy(&direct.stderr)
    );
    let refused = server.requests();
    assert!(
        !refused.is_empty() && refused.iter().all(|r| r.status == 401),
        "the server must answer 401 to a request without credentials: {refused:?}"
    );

    let git_port = server.port();
    let w = World::with_ca(ca, |cg, _api| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n[[allow]]\nhost = \"{GIT_HOST}\"\nport = {git_port}\n\
                 inject.basic_auth = {{ username = \"{GIT_USER}\", password = \"{{secret:{GIT_SECRET}}}\" }}\n",
                cg.child("agent"),
            ),
        )]
    });
    // The git server shares the API's address; brokerd's resolver says so.
    w.broker.add_name(GIT_HOST, TEST_API_IP);
    w.broker.secret_set(GIT_SECRET, secret.expose().as_bytes());
    let before = server.requests().len();

    let work = w
        .broker
        .scratch_dir()
        .join(format!("git-{}", agent_broker_tests::unique_name()));
    let change = format!("pushed {}", agent_broker_tests::unique_name());
    let url = format!("https://{GIT_HOST}:{git_port}/{REPO}");
    let argv: Vec<String> = vec![
        "/bin/sh".into(),
        "-c".into(),
        AGENT_SH.into(),
        "agent".into(),
        GIT.into(),
        work.to_string_lossy().into_owned(),
        url,
        change.clone(),
    ];
    // No CA variable: the launcher points GIT_SSL_CAINFO (and the system bundle) at the
    // merged bundle with the broker CA.
    let env: Vec<(&str, String)> = vec![
        ("GIT_TERMINAL_PROMPT", "0".into()),
        ("GIT_CONFIG_NOSYSTEM", "1".into()),
        ("GIT_CONFIG_COUNT", "1".into()),
        ("GIT_CONFIG_KEY_0", "http.curloptResolve".into()),
        (
            "GIT_CONFIG_VALUE_0",
            format!("{GIT_HOST}:{git_port}:{TEST_API_IP}"),
        ),
        ("GIT_AUTHOR_NAME", "abtest agent".into()),
        ("GIT_AUTHOR_EMAIL", "agent@example.test".into()),
        ("GIT_COMMITTER_NAME", "abtest agent".into()),
        ("GIT_COMMITTER_EMAIL", "agent@example.test".into()),
        // Every header git sends and receives, unredacted, onto stderr (which is scanned).
        ("GIT_TRACE_CURL", "1".into()),
        ("GIT_TRACE_CURL_NO_DATA", "1".into()),
        ("GIT_TRACE_REDACT", "0".into()),
    ];
    let run = clients::run_in_cgroup(&w.broker, &w.agent, "git", &env, &argv);
    let server_requests = server.requests().split_off(before);
    assert!(
        run.output.status.success(),
        "{}\nthe git server saw: {server_requests:#?}\nbrokerd's log:\n{}",
        run.show(),
        w.broker.log()
    );

    // The clone has the server's content; the push landed on the server's main.
    assert_eq!(
        format!("{}\n", field(&run, "readme")),
        server.readme(),
        "the clone's README.md"
    );
    let head = field(&run, "head");
    assert_eq!(
        server.git(&["rev-parse", "main"]).trim(),
        head,
        "the server's main is not the agent's commit: {}",
        run.show()
    );
    assert_eq!(
        server.git(&["show", "main:pushed.txt"]).trim_end(),
        change,
        "the pushed file on the server"
    );
    assert_eq!(
        server
            .git(&["log", "--format=%s", "main"])
            .lines()
            .collect::<Vec<_>>(),
        ["pushed by the agent", "seed"],
        "the server's history"
    );

    // Every request carried the credential, from brokerd, and none was refused.
    let calls = |method: &str, path: &str, query: Option<&str>| {
        server_requests
            .iter()
            .filter(|r| r.method == method && r.path == path && r.query.as_deref() == query)
            .count()
    };
    let repo = format!("/{REPO}");
    for (method, path, query) in [
        ("GET", "info/refs", Some("service=git-upload-pack")),
        ("POST", "git-upload-pack", None),
        ("GET", "info/refs", Some("service=git-receive-pack")),
        ("POST", "git-receive-pack", None),
    ] {
        assert!(
            calls(method, &format!("{repo}/{path}"), query) >= 1,
            "the server never saw {method} {repo}/{path} {query:?}: {server_requests:#?}"
        );
    }
    for r in &server_requests {
        assert_eq!(
            r.authorization_sha256.as_deref(),
            Some(expected.as_str()),
            "the server did not receive `Basic base64({GIT_USER}:<secret>)`: {r:?}"
        );
        assert!(
            (200..300).contains(&r.status),
            "git's request was refused: {r:?}"
        );
        assert_eq!(
            r.peer_owner,
            Some(w.broker.pid()),
            "the server's peer socket should be brokerd's: {r:?}"
        );
        assert_eq!(r.sni.as_deref(), Some(GIT_HOST), "SNI: {r:?}");
    }
    // The kernel path: brokerd attributes the connections to the agent's cgroup, with the
    // address git dialled.
    let dialled = SocketAddr::new(IpAddr::V4(TEST_API_IP), git_port);
    w.broker.wait_connection("git", |c| {
        c.origin
            .as_ref()
            .is_some_and(|o| o.cgroup == w.agent && o.original_dst == dialled)
    });

    // git sent no credential of its own: its trace lists what it sent, and no Authorization.
    let stderr = String::from_utf8_lossy(&run.output.stderr);
    let sent: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("=> Send header: "))
        .collect();
    assert!(
        !sent.is_empty(),
        "git's curl trace is missing from its stderr (GIT_TRACE_CURL): {}",
        run.show()
    );
    assert!(
        !sent
            .iter()
            .any(|l| l.to_ascii_lowercase().contains("authorization:")),
        "git sent an Authorization header itself: {}",
        redact(&sent.join("\n"))
    );
    assert!(
        !stderr.contains("HTTP/1.1 401") && !stderr.contains("HTTP/2 401"),
        "git saw a 401: {}",
        run.show()
    );

    // Nothing the agent saw holds the secret: its output and environment, its clone, the logs.
    run.assert_no_secret(&w.secret);
    run.assert_no_secret(&secret);
    let files = assert_no_secret_in_files(&secret, &work);
    assert!(
        files > 3,
        "the clone has only {files} files: {}",
        run.show()
    );
    w.assert_no_secret_in_logs();
    secret.assert_absent(&w.broker.log_bytes(), "brokerd's log");
    secret.assert_absent(&w.broker.transcript(), "brokerctl's output");
    let _ = fs::remove_dir_all(&work);
}

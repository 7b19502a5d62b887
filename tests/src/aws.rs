//! A real AWS API for the tests: moto in server mode (PyPI), with its request authentication
//! turned on, so it checks every SigV4 signature with the keys it issued, over TLS with a
//! certificate from a [`TestCa`]. The AWS SDK for Python (boto3) and the AWS CLI come from the
//! same pinned virtualenv ([`crate::venv`]).
//!
//! moto authenticates requests once its first [`SETUP_ACTIONS`] actions are done (its
//! `INITIAL_NO_AUTH_ACTION_COUNT`): [`Moto::start`] spends them creating an IAM user with an
//! access key and an administrator policy, and hands out that key as the real credentials.

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use crate::{Canary, TestCa};

/// Pinned packages: moto's server, the SDK and the CLI.
const PACKAGES: [&str; 3] = ["moto[server]==5.2.5", "boto3==1.44.8", "awscli==1.46.3"];
/// The unauthenticated actions setup spends: CreateUser, CreateAccessKey, PutUserPolicy.
pub const SETUP_ACTIONS: u32 = 3;
/// The name moto's certificate is for.
pub const AWS_NAME: &str = "aws.example.test";

/// The virtualenv's bin dir (python, moto_server, aws).
pub fn aws_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let python = crate::venv::venv("aws", &PACKAGES);
        python
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| panic!("{} has no parent", python.display()))
    })
}

/// Creates the IAM user and its key while moto still accepts unauthenticated actions (any
/// key is taken then: this one looks like none); prints
/// the key as JSON on stdout (for the test to store in brokerd's vault, never printed).
const SETUP_PY: &str = r#"
import json, sys, boto3, botocore.config
url, ca = sys.argv[1:3]
iam = boto3.client("iam", endpoint_url=url, verify=ca, region_name="us-east-1",
                   aws_access_key_id="abtest-setup", aws_secret_access_key="abtest-setup",
                   config=botocore.config.Config(retries={"max_attempts": 1}))
iam.create_user(UserName="abtest-agent")
key = iam.create_access_key(UserName="abtest-agent")["AccessKey"]
iam.put_user_policy(UserName="abtest-agent", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
print(json.dumps({"access_key_id": key["AccessKeyId"], "secret_access_key": key["SecretAccessKey"]}))
"#;

/// A running moto server; stopped by pid on Drop.
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
    /// The IAM user's real key, as `{"access_key_id": ..., "secret_access_key": ...}`.
    pub real_key: Canary,
    pub access_key_id: String,
    /// The real secret access key.
    pub secret: Canary,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// moto on `ip` (a free port), TLS for [`AWS_NAME`] and `ip` from `ca`, authentication on
    /// after setup. Panics with moto's output when it does not come up.
    pub fn start(ca: &TestCa, ip: IpAddr) -> Self {
        let bin = aws_bin();
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("moto dir: {e}"));
        let (cert, key) = ca.leaf_pem(&[AWS_NAME.to_string(), ip.to_string()]);
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, cert).unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(&key_path, key).unwrap_or_else(|e| panic!("{e}"));
        let port = std::net::TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("a free port on {ip}: {e}"));
        let log = std::fs::File::create(dir.path().join("moto.log"))
            .unwrap_or_else(|e| panic!("moto log: {e}"));
        let child = Command::new(bin.join("moto_server"))
            .args(["-H", &ip.to_string(), "-p", &port.to_string()])
            .arg("-c")
            .arg(&cert_path)
            .arg("-k")
            .arg(&key_path)
            .env("INITIAL_NO_AUTH_ACTION_COUNT", SETUP_ACTIONS.to_string())
            .env("MOTO_CALL_RESET_API", "false")
            // Path-style buckets on a custom endpoint: the host names no bucket.
            .env("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap_or_else(|e| panic!("{e}")))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server: {e}"));
        let addr = SocketAddr::new(ip, port);
        let mut moto = Self {
            child,
            addr,
            real_key: Canary::with_prefix("unset"),
            access_key_id: String::new(),
            secret: Canary::with_prefix("unset"),
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not listen on {addr} within 60 s: {}",
                moto.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = Command::new(bin.join("python"))
            .args(["-c", SETUP_PY])
            .arg(format!("https://{ip}:{port}"))
            .arg(ca.pem_path())
            .output()
            .unwrap_or_else(|e| panic!("moto setup: {e}"));
        assert!(
            out.status.success(),
            "moto setup failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            moto.log()
        );
        let key: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("moto setup printed no key: {e}"));
        moto.access_key_id = key["access_key_id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        moto.real_key = Canary::adopt(&key.to_string());
        // The secret key alone is what must never show: every output the tests scan is
        // checked for it.
        moto.secret = Canary::adopt(key["secret_access_key"].as_str().unwrap_or_default());
        moto
    }

    /// moto's own output (requests and errors), redacted.
    pub fn log(&self) -> String {
        crate::redact(
            &std::fs::read_to_string(self._dir.path().join("moto.log")).unwrap_or_default(),
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

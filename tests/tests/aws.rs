//! Issue 15: AWS Signature Version 4. The agent (boto3, the AWS CLI) holds only the placeholder
//! keys brokerd made; brokerd checks its signature with them and signs again with the real key.
//! The upstream is moto in server mode with authentication on, so it verifies every signature
//! with the key it issued: a request reaches it signed right only if brokerd re-signed it with
//! the real key. S3 (a 20 MB upload, get, list) and STS through the SDK, S3 and STS through the
//! CLI; a service outside the rule, a tampered request and a wrong real key fail with a reason.

use std::net::{IpAddr, Ipv4Addr};

use agent_broker_tests::{
    Canary, TestCa,
    aws::{AWS_NAME, Moto, aws_bin},
    clients::{self, ClientRun},
    world::World,
};

const AWS_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const CRED: &str = "ABTEST_AWS";

/// The agent: boto3 with the placeholder keys against `https://aws.example.test:PORT`. Prints
/// one JSON report; each step's failure is reported, not raised.
const AGENT_PY: &str = r#"
import hashlib, json, os, sys
import boto3, botocore.config, botocore.exceptions
cfg = json.loads(sys.argv[1])
out = {}
session = boto3.session.Session(aws_access_key_id=cfg["akid"],
                                aws_secret_access_key=cfg["secret"], region_name="us-east-1")
conf = botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1})
ep = "https://%s:%d" % (cfg["host"], cfg["port"])
def step(name, f):
    try:
        out[name] = f()
    except botocore.exceptions.ClientError as e:
        out[name] = {"error": e.response["Error"]["Code"], "status": e.response["ResponseMetadata"]["HTTPStatusCode"],
                     "message": e.response["Error"].get("Message", "")}
    except Exception as e:
        out[name] = {"error": type(e).__name__, "message": str(e)[:300]}
s3 = session.client("s3", endpoint_url=ep, config=conf)
step("create", lambda: s3.create_bucket(Bucket="abtest-bucket")["ResponseMetadata"]["HTTPStatusCode"])
data = hashlib.sha256(b"abtest").digest() * (20 * 1024 * 1024 // 32)
step("put", lambda: s3.put_object(Bucket="abtest-bucket", Key="big.bin", Body=data)["ResponseMetadata"]["HTTPStatusCode"])
step("get", lambda: hashlib.sha256(s3.get_object(Bucket="abtest-bucket", Key="big.bin")["Body"].read()).hexdigest())
out["sent"] = hashlib.sha256(data).hexdigest()
step("list", lambda: [o["Key"] for o in s3.list_objects_v2(Bucket="abtest-bucket").get("Contents", [])])
sts = session.client("sts", endpoint_url=ep, config=conf)
step("identity", lambda: sts.get_caller_identity()["Arn"])
iam = session.client("iam", endpoint_url=ep, config=conf)
step("iam", lambda: iam.list_users()["Users"])
print(json.dumps(out))
"#;

struct Setup {
    w: World,
    moto: Moto,
    /// The placeholder pair (environment lines) `secret placeholder` printed.
    akid: String,
    secret: Canary,
}

fn setup(real_key_json: Option<&str>) -> Setup {
    setup_with(|moto| real_key_json.unwrap_or(moto.real_key.expose()).to_string())
}

/// [`setup`], storing the key `key` makes from the running moto.
fn setup_with(key: impl FnOnce(&Moto) -> String) -> Setup {
    let ca = TestCa::new("abtest aws CA");
    let moto = Moto::start(&ca, IpAddr::V4(AWS_IP));
    let port = moto.addr.port();
    let w = World::with_ca(ca, |cg, _| {
        vec![(
            "agent".into(),
            format!(
                "cgroup = \"{}\"\n\
                 [[allow]]\nhost = \"{AWS_NAME}\"\nport = {port}\n\
                 inject.aws_sigv4 = {{ secret = \"{CRED}\", services = [\"s3\", \"sts\"], \
                 regions = [\"us-east-1\"] }}\n",
                cg.child("agent")
            ),
        )]
    });
    w.broker.add_name(AWS_NAME, AWS_IP);
    let key = key(&moto);
    let out = w
        .broker
        .ctl_output_with_stdin(&["secret", "set", CRED, "--kind", "sigv4"], key.as_bytes());
    assert!(
        out.status.success(),
        "secret set --kind sigv4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let placeholder = w.broker.ctl_ok(&["secret", "placeholder", CRED]);
    let mut akid = String::new();
    let mut secret = String::new();
    for line in placeholder.lines() {
        if let Some(v) = line.strip_prefix("AWS_ACCESS_KEY_ID=") {
            akid = v.to_string();
        }
        if let Some(v) = line.strip_prefix("AWS_SECRET_ACCESS_KEY=") {
            secret = v.to_string();
        }
    }
    assert!(
        (akid.starts_with("AKIA") || akid.starts_with("ASIA"))
            && akid.len() == 20
            && secret.len() == 40,
        "placeholders shaped like AWS keys"
    );
    assert_ne!(akid, moto.access_key_id);
    Setup {
        w,
        moto,
        akid,
        secret: Canary::adopt(&secret),
    }
}

fn run_agent(s: &Setup) -> (ClientRun, serde_json::Value) {
    let cfg = serde_json::json!({
        "akid": s.akid,
        "secret": s.secret.expose(),
        "host": AWS_NAME,
        "port": s.moto.addr.port(),
    });
    let python = aws_bin().join("python").to_string_lossy().into_owned();
    let argv = vec![python, "-c".into(), AGENT_PY.into(), cfg.to_string()];
    let mut env = s.w.trust().var("python");
    env.push(("AWS_CA_BUNDLE", s.w.broker_ca.display().to_string()));
    let run = clients::run_in_cgroup(&s.w.broker, &s.w.agent, "boto3", &env, &argv);
    let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "boto3: no report ({e}): {}\nbrokerd's log:\n{}\nmoto:\n{}",
            run.show(),
            s.w.broker.log(),
            s.moto.log()
        )
    });
    run.assert_no_secret(&s.moto.secret);
    (run, report)
}

#[test]
fn boto3_and_the_aws_cli_are_signed_again_with_the_real_key_that_moto_verifies() {
    let s = setup(None);
    let (run, r) = run_agent(&s);
    let show = || {
        format!(
            "{r:#}\n{}\nbrokerd's log:\n{}\nmoto:\n{}",
            run.show(),
            s.w.broker.log(),
            s.moto.log()
        )
    };
    assert_eq!(r["create"], 200, "{}", show());
    assert_eq!(r["put"], 200, "a 20 MB upload: {}", show());
    assert_eq!(
        r["get"],
        r["sent"],
        "what came back is what was sent: {}",
        show()
    );
    assert_eq!(r["list"], serde_json::json!(["big.bin"]), "{}", show());
    assert!(
        r["identity"]
            .as_str()
            .is_some_and(|arn| arn.ends_with("user/abtest-agent")),
        "STS answers as the real key's user: {}",
        show()
    );
    // IAM is outside the rule's services: brokerd refuses it before it leaves (its JSON 403
    // is no XML the SDK can parse, so the SDK reports the body).
    assert!(
        r["iam"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("denied by agent-broker")),
        "{}",
        show()
    );
    assert!(
        s.w.broker.audit_records().iter().any(|e| e
            .reason
            .as_deref()
            .is_some_and(|why| why.contains("does not sign for AWS service \"iam\""))),
        "the refusal names the service: {}",
        show()
    );

    // The AWS CLI, configured only with the placeholders.
    let aws = aws_bin().join("aws").to_string_lossy().into_owned();
    let endpoint = format!("https://{AWS_NAME}:{}", s.moto.addr.port());
    let mut env = s.w.trust().var("python");
    env.extend([
        ("AWS_ACCESS_KEY_ID", s.akid.clone()),
        ("AWS_SECRET_ACCESS_KEY", s.secret.expose().to_string()),
        ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
        ("AWS_CA_BUNDLE", s.w.broker_ca.display().to_string()),
    ]);
    for args in [
        vec!["s3", "ls", "s3://abtest-bucket"],
        vec!["sts", "get-caller-identity", "--output", "text"],
    ] {
        let mut argv = vec![aws.clone()];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv.extend(["--endpoint-url".to_string(), endpoint.clone()]);
        let run = clients::run_in_cgroup(&s.w.broker, &s.w.agent, "aws", &env, &argv);
        let stdout = String::from_utf8_lossy(&run.output.stdout).to_string();
        assert!(
            run.output.status.success(),
            "aws {}: {}\nbrokerd's log:\n{}",
            args.join(" "),
            run.show(),
            s.w.broker.log()
        );
        let want = if args[0] == "s3" {
            "big.bin"
        } else {
            "abtest-agent"
        };
        assert!(stdout.contains(want), "aws {}: {stdout}", args.join(" "));
        run.assert_no_secret(&s.moto.secret);
    }
    s.moto
        .secret
        .assert_absent(s.w.broker.log().as_bytes(), "brokerd's log");
}

#[test]
fn a_wrong_real_key_fails_at_aws_and_a_wrong_placeholder_fails_at_brokerd() {
    // The real key stored is wrong: brokerd signs, and moto refuses the signature.
    let wrong = serde_json::json!({
        "access_key_id": Canary::shaped("AKIA", b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16).expose(),
        "secret_access_key": Canary::new().expose(),
    })
    .to_string();
    let mut s = setup(Some(&wrong));
    let (run, r) = run_agent(&s);
    assert_eq!(r["create"]["status"], 403, "{r:#}\n{}", run.show());

    // The agent signs with a key brokerd did not give it: refused by brokerd, never sent.
    s.secret = Canary::new();
    let (_, r) = run_agent(&s);
    assert_eq!(r["create"]["status"], 403, "{r:#}");
    assert!(
        s.w.broker.audit_records().iter().any(|e| e
            .reason
            .as_deref()
            .is_some_and(|why| why.contains("signature does not verify"))),
        "the refusal says why"
    );
}

/// An S3 upload with signed chunks (`STREAMING-AWS4-HMAC-SHA256-PAYLOAD`, as the Java and Go
/// SDKs send), made by hand as AWS's documentation describes it: every chunk signed with the
/// placeholder key, chained from the seed signature. Prints the status, then (after a GET
/// through boto3) whether the stored object is what was sent. With `tamper`, the second chunk's
/// signature is wrong.
const CHUNKED_PY: &str = r#"
import datetime, hashlib, hmac, http.client, json, ssl, sys
import boto3, botocore.config
cfg = json.loads(sys.argv[1])
host, port, akid, secret, tamper = cfg["host"], cfg["port"], cfg["akid"], cfg["secret"], cfg["tamper"]
key_name = "tampered.bin" if tamper else "streamed.bin"
path = "/abtest-bucket/" + key_name
data = bytes(range(256)) * 1000  # 256000 bytes: three 64 KiB chunks and a short one
amz_date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
day = amz_date[:8]
scope = day + "/us-east-1/s3/aws4_request"
def hm(k, m): return hmac.new(k, m.encode(), hashlib.sha256).digest()
k = hm(("AWS4" + secret).encode(), day); k = hm(k, "us-east-1"); k = hm(k, "s3"); k = hm(k, "aws4_request")
size = 65536
chunks = [data[i:i + size] for i in range(0, len(data), size)] + [b""]
enc_len = sum(len("%x" % len(c)) + 17 + 64 + 2 + len(c) + 2 for c in chunks)
headers = {"host": "%s:%d" % (host, port), "x-amz-date": amz_date,
           "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
           "content-encoding": "aws-chunked", "x-amz-decoded-content-length": str(len(data)),
           "content-length": str(enc_len)}
signed = sorted(headers)
canonical = "\n".join(["PUT", path, ""] + ["%s:%s" % (h, headers[h]) for h in signed]
                      + ["", ";".join(signed), "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"])
sts = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
seed = hmac.new(k, sts.encode(), hashlib.sha256).hexdigest()
auth = "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s" % (akid, scope, ";".join(signed), seed)
prev, body = seed, b""
empty = hashlib.sha256(b"").hexdigest()
for i, c in enumerate(chunks):
    s2s = "\n".join(["AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, prev, empty, hashlib.sha256(c).hexdigest()])
    sig = hmac.new(k, s2s.encode(), hashlib.sha256).hexdigest()
    prev = sig
    if tamper and i == 1:
        sig = "0" * 64
    body += b"%x;chunk-signature=%s\r\n" % (len(c), sig.encode()) + c + b"\r\n"
out = {}
try:
    conn = http.client.HTTPSConnection(host, port, timeout=30,
                                       context=ssl.create_default_context(cafile=cfg["ca"]))
    conn.request("PUT", path, body=body, headers=dict(headers, authorization=auth))
    resp = conn.getresponse()
    out["put"] = resp.status
    out["put_body"] = resp.read().decode("latin-1")[:300]
except Exception as e:
    out["put"] = "error: %s" % e
session = boto3.session.Session(aws_access_key_id=akid, aws_secret_access_key=secret, region_name="us-east-1")
s3 = session.client("s3", endpoint_url="https://%s:%d" % (host, port),
                    config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
try:
    got = s3.get_object(Bucket="abtest-bucket", Key=key_name)["Body"].read()
    out["same"] = got == data
except Exception as e:
    out["same"] = "error: %s" % type(e).__name__
print(json.dumps(out))
"#;

#[test]
fn an_s3_upload_with_signed_chunks_is_signed_again_chunk_by_chunk() {
    let s = setup(None);
    let (run, r) = run_agent(&s);
    assert_eq!(r["create"], 200, "{r:#}\n{}", run.show());
    for tamper in [false, true] {
        let cfg = serde_json::json!({
            "akid": s.akid,
            "secret": s.secret.expose(),
            "host": AWS_NAME,
            "port": s.moto.addr.port(),
            "ca": s.w.broker_ca.display().to_string(),
            "tamper": tamper,
        });
        let python = aws_bin().join("python").to_string_lossy().into_owned();
        let argv = vec![python, "-c".into(), CHUNKED_PY.into(), cfg.to_string()];
        let mut env = s.w.trust().var("python");
        env.push(("AWS_CA_BUNDLE", s.w.broker_ca.display().to_string()));
        let run = clients::run_in_cgroup(&s.w.broker, &s.w.agent, "chunked", &env, &argv);
        let stdout = String::from_utf8_lossy(&run.output.stdout).into_owned();
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "no report ({e}): {}\nbrokerd:\n{}\nmoto:\n{}",
                run.show(),
                s.w.broker.log(),
                s.moto.log()
            )
        });
        run.assert_no_secret(&s.moto.secret);
        if tamper {
            assert_ne!(
                r["put"], 200,
                "a chunk the agent did not sign right is never signed: {r:#}"
            );
            assert_ne!(r["same"], true, "{r:#}");
            assert!(
                s.w.broker.log().contains("request body refused"),
                "brokerd says why it cut the upload:\n{}",
                s.w.broker.log()
            );
        } else {
            assert_eq!(
                r["put"],
                200,
                "{r:#}\nbrokerd:\n{}\nmoto:\n{}",
                s.w.broker.log(),
                s.moto.log()
            );
            assert_eq!(
                r["same"], true,
                "the object moto stored is what the agent sent: {r:#}"
            );
        }
    }
}

/// Temporary credentials (an `ASIA...` key with a session token, from STS): the agent's
/// placeholder is an `ASIA` key without a token; brokerd adds the real session token to the
/// request it signs, and moto verifies the request as the temporary credentials' user.
#[test]
fn temporary_credentials_are_signed_with_their_session_token() {
    // A role with every permission, assumed with the real key: moto's STS issues an ASIA key
    // and session token that its authentication knows.
    const SESSION_PY: &str = r#"
import json, sys, boto3
key = json.loads(sys.argv[2])
kw = dict(endpoint_url=sys.argv[1], verify=False, region_name="us-east-1",
          aws_access_key_id=key["access_key_id"], aws_secret_access_key=key["secret_access_key"])
iam, sts = boto3.client("iam", **kw), boto3.client("sts", **kw)
trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}
arn = iam.create_role(RoleName="abtest-role", AssumeRolePolicyDocument=json.dumps(trust))["Role"]["Arn"]
iam.put_role_policy(RoleName="abtest-role", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
c = sts.assume_role(RoleArn=arn, RoleSessionName="abtest-agent", DurationSeconds=900)["Credentials"]
print(json.dumps({"access_key_id": c["AccessKeyId"], "secret_access_key": c["SecretAccessKey"],
                  "session_token": c["SessionToken"]}))
"#;
    let mut token = None;
    let s = setup_with(|moto| {
        let out = std::process::Command::new(aws_bin().join("python"))
            .args(["-W", "ignore", "-c", SESSION_PY])
            .arg(format!("https://{}", moto.addr))
            .arg(moto.real_key.expose())
            .output()
            .unwrap_or_else(|e| panic!("get-session-token: {e}"));
        assert!(
            out.status.success(),
            "get-session-token: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            moto.log()
        );
        let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let parsed: serde_json::Value = serde_json::from_str(&key).unwrap_or_default();
        assert!(
            parsed["access_key_id"]
                .as_str()
                .is_some_and(|k| k.starts_with("ASIA")),
            "STS issues an ASIA key"
        );
        token = Some(Canary::adopt(
            parsed["session_token"].as_str().unwrap_or_default(),
        ));
        let _ = Canary::adopt(parsed["secret_access_key"].as_str().unwrap_or_default());
        key
    });
    assert!(
        s.akid.starts_with("ASIA"),
        "a temporary key's placeholder is an ASIA key"
    );
    let (run, r) = run_agent(&s);
    let show = || {
        format!(
            "{r:#}\n{}\nbrokerd's log:\n{}\nmoto:\n{}",
            run.show(),
            s.w.broker.log(),
            s.moto.log()
        )
    };
    assert_eq!(r["create"], 200, "{}", show());
    assert!(
        r["identity"]
            .as_str()
            .is_some_and(|arn| arn.contains("abtest-agent")),
        "STS answers as the assumed role's session: {}",
        show()
    );
    let token = token.unwrap_or_else(|| panic!("no session token"));
    run.assert_no_secret(&token);
    token.assert_absent(s.w.broker.log().as_bytes(), "brokerd's log");
}

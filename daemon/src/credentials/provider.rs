//! External secret sources: a command's output (`exec`) and a file's content (`file`).
//!
//! Neither value is ever logged: errors name the command or the file, the exit status and the
//! first line of the command's standard error, never what it printed on standard output.

use std::{io::Read as _, os::unix::fs::MetadataExt as _, process::Stdio, time::Duration};

use agent_broker_core::{credential::MAX_PROVIDED_VALUE, secret::SecretValue};
use tokio::io::AsyncReadExt as _;
use zeroize::Zeroizing;

/// A file as read: inode, size and modification time (nanoseconds).
pub type Stamp = (u64, u64, i64, i64);

/// The file's stamp now; `None` when it cannot be read.
pub fn stamp(path: &str) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// One value from bytes a provider gave: one trailing newline (`\n` or `\r\n`) dropped; it must
/// be non-empty and fit in a header.
fn value(mut bytes: Zeroizing<Vec<u8>>, what: &str) -> Result<SecretValue, String> {
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    let value = SecretValue::from_zeroizing(bytes);
    if value.is_empty() {
        return Err(format!("{what} gave an empty value"));
    }
    value
        .check_header_safe()
        .map_err(|e| format!("{what} gave a value brokerd cannot inject: {e}"))?;
    Ok(value)
}

/// Reads the file's value and its stamp (blocking).
pub fn read(path: &str) -> Result<(SecretValue, Option<Stamp>), String> {
    let before = stamp(path);
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"))?;
    let mut bytes = Zeroizing::new(Vec::new());
    file.take(MAX_PROVIDED_VALUE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {path}: {e}"))?;
    if bytes.len() > MAX_PROVIDED_VALUE {
        return Err(format!(
            "{path} is larger than {MAX_PROVIDED_VALUE} bytes; not a credential"
        ));
    }
    Ok((value(bytes, path)?, before))
}

/// Runs `command` (no shell, no PATH search, stdin closed, a clean environment but PATH) and
/// returns its standard output as the value; killed after `timeout`.
pub async fn run(command: &[String], timeout: Duration) -> Result<SecretValue, String> {
    let Some((program, args)) = command.split_first() else {
        return Err("the command is empty".into());
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        let mut out = Zeroizing::new(Vec::new());
        let mut err = Vec::new();
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s
                    .take(MAX_PROVIDED_VALUE as u64 + 1)
                    .read_to_end(&mut out)
                    .await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.take(4096).read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        (status, out, err)
    };
    let (status, out, err) = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done,
        Err(_) => {
            return Err(format!(
                "{program} did not finish within {}s (killed)",
                timeout.as_secs()
            ));
        }
    };
    let status = status.map_err(|e| format!("waiting for {program}: {e}"))?;
    if !status.success() {
        let first = String::from_utf8_lossy(&err)
            .lines()
            .find(|l| !l.trim().is_empty())
            .map(|l| l.chars().take(200).collect::<String>())
            .unwrap_or_default();
        let how = match status.code() {
            Some(code) => format!("exit status {code}"),
            None => "a signal".to_string(),
        };
        return Err(if first.is_empty() {
            format!("{program} failed with {how}")
        } else {
            format!("{program} failed with {how}: {first}")
        });
    }
    if out.len() > MAX_PROVIDED_VALUE {
        return Err(format!(
            "{program} printed more than {MAX_PROVIDED_VALUE} bytes; not a credential"
        ));
    }
    value(out, program)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn a_commands_output_is_the_value_without_its_newline() {
        let v = run(&cmd(&["/bin/echo", "tok-123"]), Duration::from_secs(5))
            .await
            .expect("value");
        assert_eq!(v.expose(), b"tok-123");
    }

    #[tokio::test]
    async fn a_failing_command_names_its_status_and_first_stderr_line() {
        let e = run(
            &cmd(&[
                "/bin/sh",
                "-c",
                "echo printed-value; echo 'no session' >&2; exit 3",
            ]),
            Duration::from_secs(5),
        )
        .await
        .expect_err("fails");
        assert!(
            e.contains("exit status 3") && e.contains("no session"),
            "{e}"
        );
        assert!(!e.contains("printed-value"), "stdout is never shown: {e}");
        let e = run(&cmd(&["/bin/sleep", "5"]), Duration::from_millis(200))
            .await
            .expect_err("times out");
        assert!(e.contains("did not finish"), "{e}");
        let e = run(&cmd(&["/bin/true"]), Duration::from_secs(5))
            .await
            .expect_err("empty");
        assert!(e.contains("empty"), "{e}");
    }

    #[test]
    fn a_files_value_and_stamp() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key");
        std::fs::write(&path, b"file-tok\r\n").expect("write");
        let p = path.to_str().expect("utf-8");
        let (v, s) = read(p).expect("value");
        assert_eq!(v.expose(), b"file-tok");
        assert_eq!(s, stamp(p));
        std::fs::write(&path, b"two\nlines\n").expect("write");
        assert!(
            read(p).is_err(),
            "a value with a newline inside cannot be injected"
        );
        assert!(read("/nonexistent/key").is_err());
    }
}

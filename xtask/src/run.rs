//! `cargo xtask run`: builds, then becomes brokerd in the foreground, so signals (Ctrl-C, a
//! service manager's SIGTERM) reach brokerd itself.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;

use anyhow::{Result, bail};

use crate::build::{self, Profile};
use crate::{cmd, paths, running_as_root};

pub fn run(brokerd_args: Vec<OsString>) -> Result<()> {
    if !running_as_root() {
        bail!(
            "brokerd must run as root: it loads eBPF programs and attaches them to cgroups \
             (run `cargo xtask run` as root)"
        );
    }
    let profile = Profile::Debug;
    build::build(profile)?;

    let brokerd = paths::target_dir().join(profile.dir_name()).join("brokerd");
    // Run from the caller's directory, so relative paths in the arguments mean what they say.
    let mut brokerd = cmd::without_cargo_run_env(brokerd);
    brokerd.args(brokerd_args);
    let shown = cmd::echo(&brokerd);
    // exec returns only if it failed.
    let err = brokerd.exec();
    Err(anyhow::Error::new(err).context(format!("starting `{shown}`")))
}

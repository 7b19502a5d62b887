//! Man pages and shell completions of brokerd and brokerctl, generated from their clap
//! definitions by the binaries themselves (`brokerd --generate-docs DIR`,
//! `brokerctl generate-docs DIR`, both hidden) so the Debian package (`cargo xtask package`)
//! documents exactly the binaries it holds. It lives here because this is the one crate both
//! binaries share; nothing else uses it.

use std::{
    fs,
    io::{self, Write as _},
    path::Path,
};

use clap_complete::Shell;

/// The shells completions are written for.
pub const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

/// Writes `DIR/man/<name>.<section>` (and one page per visible subcommand, `<name>-<sub>`, as
/// `git` does) and `DIR/completions/` (`<name>.bash`, `_<name>`, `<name>.fish`).
pub fn write(cmd: clap::Command, man_section: &'static str, dir: &Path) -> io::Result<()> {
    // The pages leave out clap's `help` subcommand: each page is that help already.
    let mut man_cmd = without_help_subcommand(cmd.clone());
    man_cmd.build();
    let man_dir = dir.join("man");
    fs::create_dir_all(&man_dir)?;
    write_man_pages(&man_cmd, man_section, &man_dir)?;
    let completions = dir.join("completions");
    fs::create_dir_all(&completions)?;
    let mut cmd = cmd;
    let name = cmd.get_name().to_owned();
    for shell in SHELLS {
        clap_complete::generate_to(shell, &mut cmd, &name, &completions)?;
    }
    Ok(())
}

fn without_help_subcommand(cmd: clap::Command) -> clap::Command {
    let subcommands: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    let mut cmd = cmd.disable_help_subcommand(true);
    for name in subcommands {
        cmd = cmd.mut_subcommand(name, without_help_subcommand);
    }
    cmd
}

fn write_man_pages(cmd: &clap::Command, section: &'static str, dir: &Path) -> io::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_man_pages(sub, section, dir)?;
    }
    let man = clap_mangen::Man::new(cmd.clone()).section(section);
    let title = man.get_filename();
    let mut file = fs::File::create(dir.join(title))?;
    man.render(&mut file)?;
    file.flush()
}

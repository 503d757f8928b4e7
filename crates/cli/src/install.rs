//! What installing `tether` on a machine needs from the binary itself: shell completions and man pages,
//! both generated from the one command-line definition so that they never drift from it.
//!
//! Man pages come from `tether man DIR` rather than a build script: the definition lives in this crate
//! and depends on the client and server crates, which a build script would have to compile a second
//! time. Packagers run `tether man` once after the build (README, "Running in production").

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Writes the completion script; a closed pipe (`| head`) is not an error worth a panic.
pub fn completions(
    shell: Shell,
    mut cmd: clap::Command,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    use clap_complete::Shell as S;
    let shell = match shell {
        Shell::Bash => S::Bash,
        Shell::Zsh => S::Zsh,
        Shell::Fish => S::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "tether", &mut script);
    out.write_all(&script)?;
    out.flush()
}

/// Writes `tether.1` and `tether-<sub>[-<subsub>].1` for every subcommand; returns how many pages.
pub fn man_pages(cmd: clap::Command, dir: &Path) -> Result<usize> {
    // create_dir_all calls a file in the way "File exists", which does not say what is wrong.
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut cmd = cmd;
    cmd.build();
    write_pages(&cmd, "tether", dir)
}

fn write_pages(cmd: &clap::Command, name: &str, dir: &Path) -> Result<usize> {
    let page = cmd
        .clone()
        .display_name(name.to_owned())
        .bin_name(name.replace('-', " "));
    let path = dir.join(format!("{name}.1"));
    let mut buffer = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut buffer)
        .with_context(|| format!("cannot render {}", path.display()))?;
    std::fs::write(&path, buffer).with_context(|| format!("cannot write {}", path.display()))?;
    let mut written = 1;
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        written += write_pages(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(written)
}

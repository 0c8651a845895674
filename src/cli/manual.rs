//! `qnbd man` and `qnbd completions`: manual pages (`clap_mangen`) and shell completions
//! (`clap_complete`) generated from the command line's own definitions, so that they cannot
//! drift from what `qnbd` accepts.

use crate::error::{Error, ErrorKind, Result};
use clap::{Args, CommandFactory};
use clap_complete::Shell;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Print the page of this subcommand (e.g. serve) instead of qnbd(1).
    pub command: Option<String>,
    /// Write every page (qnbd.1 and qnbd-COMMAND.1) into DIR instead of printing one.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["command", "install"])]
    pub dir: Option<PathBuf>,
    /// Install every page into PREFIX/share/man/man1 (e.g. /usr/local).
    #[arg(long, value_name = "PREFIX", conflicts_with = "command")]
    pub install: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell: bash, zsh, fish (also elvish, powershell).
    pub shell: Shell,
    /// Install the script where the shell looks for it under PREFIX (bash:
    /// share/bash-completion/completions/qnbd, zsh: share/zsh/site-functions/_qnbd, fish:
    /// share/fish/vendor_completions.d/qnbd.fish) instead of printing it.
    #[arg(long, value_name = "PREFIX")]
    pub install: Option<PathBuf>,
}

/// The command line as `qnbd` parses it, built (subcommands know their `qnbd-NAME` names).
fn command() -> clap::Command {
    let mut cmd = super::Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// Sections every page ends with, after the ones generated from the definitions.
fn common_sections(top: bool) -> String {
    let mut s = String::new();
    if top {
        s.push_str(
            ".SH \"INVOKED AS QEMU\\-IMG OR QEMU\\-NBD\"\n\
             When started through a link named \\fBqemu\\-img\\fR or \\fBqemu\\-nbd\\fR, qnbd \
             takes that tool's command line and answers as it does (output, JSON, exit codes). \
             See the README's section \"Beside QEMU, and by QEMU's names\" for the links.\n",
        );
    }
    s.push_str(
        ".SH ENVIRONMENT\n\
         .TP\n\\fBQNBD_IO_ENGINE\\fR=\\fBsync\\fR|\\fBio_uring\\fR\n\
         Force the I/O engine (default: io_uring when the kernel allows it, positioned I/O \
         otherwise).\n\
         .TP\n\\fBLISTEN_FDS\\fR, \\fBLISTEN_PID\\fR\n\
         systemd socket activation: \\fBserve\\fR takes its listening socket from fd 3.\n\
         .TP\n\\fBNOTIFY_SOCKET\\fR\n\
         \\fBserve\\fR reports readiness (READY=1) and stopping there (systemd Type=notify).\n\
         .SH \"EXIT STATUS\"\n\
         0 on success, 1 on an error. \\fBcheck\\fR answers as qemu-img check: 2 when it \
         found corruption, 3 when it found only leaked clusters.\n\
         .SH \"SEE ALSO\"\n\
         \\fBqemu\\-img\\fR(1), \\fBqemu\\-nbd\\fR(8), \\fBnbdinfo\\fR(1), \\fBnbdcopy\\fR(1)\n",
    );
    s
}

/// Render the page of `cmd` (`top`: qnbd(1) itself).
fn render(cmd: clap::Command, top: bool, out: &mut dyn Write) -> std::io::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let man = clap_mangen::Man::new(cmd.clone())
        .source(format!("qnbd {version}"))
        .manual("qnbd manual");
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)?;
    man.render_description_section(out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(out)?;
    }
    out.write_all(common_sections(top).as_bytes())?;
    writeln!(out, ".SH VERSION\nqnbd {version}")
}

/// The page file name of `cmd` (`qnbd.1`, `qnbd-serve.1`).
fn file_name(cmd: &clap::Command) -> String {
    format!(
        "{}.1",
        cmd.get_display_name().unwrap_or_else(|| cmd.get_name())
    )
}

/// Every page: qnbd(1), then one per subcommand.
fn pages() -> Vec<(clap::Command, bool)> {
    let top = command();
    let mut v = vec![(top.clone(), true)];
    v.extend(
        top.get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| (s.clone(), false)),
    );
    v
}

fn write_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::io(format!("Could not create '{}'", dir.display()), e))?;
    let mut written = Vec::new();
    for (cmd, top) in pages() {
        let path = dir.join(file_name(&cmd));
        let mut buf = Vec::new();
        render(cmd, top, &mut buf).map_err(|e| Error::io("Could not render a page", e))?;
        std::fs::write(&path, buf)
            .map_err(|e| Error::io(format!("Could not write '{}'", path.display()), e))?;
        written.push(path);
    }
    Ok(written)
}

pub fn run_man(a: &ManArgs) -> Result<i32> {
    if let Some(dir) = a.dir.as_deref() {
        write_pages(dir)?;
        return Ok(0);
    }
    if let Some(prefix) = a.install.as_deref() {
        let dir = prefix.join("share/man/man1");
        for p in write_pages(&dir)? {
            println!("{}", p.display());
        }
        return Ok(0);
    }
    let top = command();
    let (cmd, is_top) = match a.command.as_deref() {
        None => (top, true),
        Some(name) => match top.find_subcommand(name) {
            Some(c) => (c.clone(), false),
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("No subcommand '{name}' (see qnbd --help)"),
                ))
            }
        },
    };
    let mut buf = Vec::new();
    render(cmd, is_top, &mut buf).map_err(|e| Error::io("Could not render the page", e))?;
    std::io::stdout()
        .write_all(&buf)
        .map_err(|e| Error::io("Could not write the page", e))?;
    Ok(0)
}

/// Where `shell` looks for qnbd's completions under an installation prefix.
fn completion_path(shell: Shell) -> Option<&'static str> {
    match shell {
        Shell::Bash => Some("share/bash-completion/completions/qnbd"),
        Shell::Zsh => Some("share/zsh/site-functions/_qnbd"),
        Shell::Fish => Some("share/fish/vendor_completions.d/qnbd.fish"),
        _ => None,
    }
}

pub fn run_completions(a: &CompletionsArgs) -> Result<i32> {
    let mut cmd = command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "qnbd", &mut buf);
    let Some(prefix) = a.install.as_deref() else {
        std::io::stdout()
            .write_all(&buf)
            .map_err(|e| Error::io("Could not write the completions", e))?;
        return Ok(0);
    };
    let Some(rel) = completion_path(a.shell) else {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!(
                "{} has no conventional completion directory: run without --install and \
                 put the printed script where your shell reads it",
                a.shell
            ),
        ));
    };
    let path = prefix.join(rel);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("Could not create '{}'", parent.display()), e))?;
    }
    std::fs::write(&path, buf)
        .map_err(|e| Error::io(format!("Could not write '{}'", path.display()), e))?;
    println!("{}", path.display());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand has a page, and every page names each of its visible options.
    #[test]
    fn every_page_names_every_option() {
        let all = pages();
        let top = command();
        assert_eq!(all.len(), 1 + top.get_subcommands().count());
        for (cmd, is_top) in all {
            let mut buf = Vec::new();
            render(cmd.clone(), is_top, &mut buf).unwrap();
            let page = String::from_utf8(buf).unwrap();
            assert!(page.starts_with(".ie"), "{}", file_name(&cmd));
            assert!(page.contains(".TH"), "{}", file_name(&cmd));
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                if let Some(long) = arg.get_long() {
                    let roff = format!("\\-\\-{}", long.replace('-', "\\-"));
                    assert!(page.contains(&roff), "{}: --{long}", file_name(&cmd));
                }
                if let Some(short) = arg.get_short() {
                    assert!(
                        page.contains(&format!("\\-{short}")),
                        "{}: -{short}",
                        file_name(&cmd)
                    );
                }
            }
        }
    }
}

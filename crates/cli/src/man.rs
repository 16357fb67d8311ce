//! `leasehold man`: the manual pages, generated from the same clap
//! definitions as `--help` (clap_mangen), so they never drift from the
//! binary. The Debian package ships the pages `leasehold man --dir` writes.

use crate::{Global, OutputFormat};
use anyhow::{Context, Result};
use clap::Args;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Manual pages are documentation: readable by everyone, unlike the
/// private files this process makes by default (umask 077).
const MAN_PAGE_MODE: u32 = 0o644;
const MAN_DIR_MODE: u32 = 0o755;

#[derive(Args)]
pub struct ManArgs {
    /// Write one page per command into DIR (leasehold.1, leasehold-lease.1,
    /// leasehold-images-build.1, ...) instead of printing the page of
    /// `leasehold` itself.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Prints the roff page of the whole command, or writes every page to
/// `--dir` and names them.
pub fn man(global: &Global, args: ManArgs, command: clap::Command) -> Result<i32> {
    let command = prepared(command);
    let Some(dir) = args.dir else {
        let mut page = Vec::new();
        page_of(command)
            .render(&mut page)
            .context("failed to render the manual page")?;
        // `leasehold man | head` closing the pipe early is not a failure.
        match std::io::Write::write_all(&mut std::io::stdout().lock(), &page) {
            Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(error).context("failed to print the manual page")
            }
            _ => return Ok(0),
        }
    };
    let pages = write_pages(command, &dir)?;
    if global.output == OutputFormat::Json {
        println!("{}", serde_json::json!({ "pages": pages }));
    } else {
        for page in &pages {
            println!("wrote {}", page.display());
        }
    }
    Ok(0)
}

/// The command as the pages describe it: built, so that every subcommand
/// knows its full name (`leasehold-images-build`), and without clap's
/// `help` subcommand, which needs no page of its own.
fn prepared(command: clap::Command) -> clap::Command {
    let mut command = command.disable_help_subcommand(true);
    command.build();
    command
}

/// The page of one command; every page names the release it documents
/// (clap knows the version of the top command only).
fn page_of(command: clap::Command) -> clap_mangen::Man {
    clap_mangen::Man::new(command).source(format!("leasehold {}", env!("CARGO_PKG_VERSION")))
}

/// One page per visible command under `dir` (created if missing), world
/// readable; the paths written, the top command's first.
fn write_pages(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(MAN_DIR_MODE))
        .with_context(|| format!("failed to make {} readable", dir.display()))?;
    let mut written = Vec::new();
    let mut pending = vec![command];
    while let Some(command) = pending.pop() {
        pending.extend(
            command
                .get_subcommands()
                .filter(|sub| !sub.is_hide_set())
                .cloned(),
        );
        let path = page_of(command)
            .generate_to(dir)
            .with_context(|| format!("failed to write a manual page into {}", dir.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(MAN_PAGE_MODE))
            .with_context(|| format!("failed to make {} readable", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn top_page(command: clap::Command) -> String {
        let mut roff = Vec::new();
        page_of(prepared(command)).render(&mut roff).unwrap();
        String::from_utf8(roff).unwrap()
    }

    #[test]
    fn the_page_is_roff_and_names_the_verbs() {
        let page = top_page(<crate::Cli as clap::CommandFactory>::command());
        assert!(page.starts_with(".ie") || page.contains("\n.TH "), "{page}");
        assert!(page.contains(".TH leasehold 1"), "{page}");
        for verb in [
            "broker",
            "agent",
            "lease",
            "release",
            "images",
            "completions",
            "man",
        ] {
            assert!(
                page.contains(&format!("leasehold\\-{verb}(1)")),
                "the page lists no {verb}: {page}"
            );
        }
    }

    #[test]
    fn every_visible_command_gets_a_readable_page() {
        let dir = tempfile::tempdir().unwrap();
        let pages_dir = dir.path().join("man1");
        let written = write_pages(
            prepared(<crate::Cli as clap::CommandFactory>::command()),
            &pages_dir,
        )
        .unwrap();
        assert_eq!(written[0], pages_dir.join("leasehold.1"));
        for name in [
            "leasehold-lease.1",
            "leasehold-images-build.1",
            "leasehold-broker-rotate-key.1",
        ] {
            let path = pages_dir.join(name);
            assert!(written.contains(&path), "{name} not in {written:?}");
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, MAN_PAGE_MODE, "{name}");
            let page = std::fs::read_to_string(&path).unwrap();
            let title = format!(
                ".TH {} 1  \"leasehold {}\"",
                name.trim_end_matches(".1"),
                env!("CARGO_PKG_VERSION")
            );
            assert!(page.contains(&title), "{name}: {page}");
        }
        let hidden = pages_dir.join("leasehold-help.1");
        assert!(!hidden.exists(), "clap's help subcommand got a page");
    }
}

//! A throw-away PostgreSQL cluster for `--database postgres`, made the way
//! `.ci/run` makes CI's: initdb into a temporary directory as the postgres
//! user, trust authentication, listening on 127.0.0.1 only at a free port;
//! stopped and deleted when dropped.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct ThrowawayPostgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    pub url: String,
}

/// The newest installed server's bin directory (`/usr/lib/postgresql/N/bin`).
fn postgres_bin() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (no /usr/lib/postgresql); apt-get install postgresql, or pass --database-url-file")?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let version = path.file_name()?.to_str()?.parse().ok()?;
            Some((version, path.join("bin")))
        })
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no PostgreSQL server under /usr/lib/postgresql/*/bin"),
    }
}

fn postgres_ids() -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, "postgres"]).output()?;
        if !out.status.success() {
            bail!("there is no postgres user to run the cluster as");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

/// Runs a PostgreSQL tool as the postgres user; its output goes to `log`.
fn run_as_postgres(bin: &Path, tool: &str, args: &[&str], log: &Path) -> Result<()> {
    let log_file = std::fs::File::create(log)?;
    let status = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join(tool))
        .args(args)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .status()
        .with_context(|| format!("cannot run {tool} as postgres (runuser)"))?;
    if !status.success() {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{tool} failed: {text}");
    }
    Ok(())
}

/// A port nothing listens on right now (the kernel's pick for port 0).
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl ThrowawayPostgres {
    pub fn start(parent: Option<&Path>) -> Result<ThrowawayPostgres> {
        let bin = postgres_bin()?;
        let (uid, gid) = postgres_ids()?;
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("leasehold-bench-postgres-");
            b
        };
        let dir = match parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }?;
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        let data = dir.path().join("data");
        let data_text = data.to_str().context("temporary path is not UTF-8")?;
        run_as_postgres(
            &bin,
            "initdb",
            &[
                "-D",
                data_text,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ],
            &dir.path().join("initdb.log"),
        )?;
        let port = free_port()?;
        let options = format!("-k {} -h 127.0.0.1 -p {port}", dir.path().display());
        let server_log = dir.path().join("server.log");
        let server_log_text = server_log.to_str().context("temporary path is not UTF-8")?;
        run_as_postgres(
            &bin,
            "pg_ctl",
            &[
                "-D",
                data_text,
                "-l",
                server_log_text,
                "-w",
                "-t",
                "60",
                "-o",
                &options,
                "start",
            ],
            &dir.path().join("pg_ctl.log"),
        )?;
        Ok(ThrowawayPostgres {
            bin,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            dir,
        })
    }
}

impl ThrowawayPostgres {
    /// The postmaster's pid (the first line of `postmaster.pid`); its
    /// children are the backends, the checkpointer and the WAL writer.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = run_as_postgres(
            &self.bin,
            "pg_ctl",
            &["-D", &data.to_string_lossy(), "-m", "immediate", "stop"],
            &self.dir.path().join("pg_stop.log"),
        );
    }
}

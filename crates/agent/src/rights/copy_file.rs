//! The manager's copy of the group's table on disk (0600): read only at a
//! start when the store cannot be reached, so that the manager serves its
//! host from it (never activating more than it holds).
//!
//! A write that lowers this host's rights is made before the manager
//! answers: a copy that still showed the rights given away could, after a
//! crash and a start without the store, switch on modules another host now
//! holds. Every other write (a loan inside the host, rights received) goes
//! to a writer thread, latest version wins, off the answer's path: a copy
//! that lags by those shows this host at most the rights it holds. This
//! keeps the file's write and rename (hundreds of microseconds here) out
//! of a local loan.

use leasehold_api::rights::ShareGroupDocument;
use leasehold_core::rights::ShareGroup;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

/// What the file holds and what waits to be written.
#[derive(Default)]
struct CopyState {
    written_version: u64,
    /// This host's rights in the written copy, at the time it was written.
    written_host_rights: u64,
    /// The newest table not yet written: (table, version, this host's rights).
    pending: Option<(ShareGroup, u64, u64)>,
}

pub(crate) struct CopyFile {
    path: PathBuf,
    host_id: String,
    state: Arc<Mutex<CopyState>>,
    wake: Mutex<Option<mpsc::Sender<()>>>,
}

impl CopyFile {
    /// The copy at `path` for `host_id`'s manager, and what it holds now.
    pub(crate) fn open(
        path: PathBuf,
        host_id: &str,
        now_ms: u64,
    ) -> (Self, Option<(ShareGroup, u64)>) {
        let copy = read_copy(&path);
        let state = CopyState {
            written_version: copy.as_ref().map_or(0, |(_, v)| *v),
            written_host_rights: copy
                .as_ref()
                .map_or(0, |(g, _)| host_rights(g, host_id, now_ms)),
            pending: None,
        };
        let file = CopyFile {
            path,
            host_id: host_id.to_string(),
            state: Arc::new(Mutex::new(state)),
            wake: Mutex::new(None),
        };
        (file, copy)
    }

    /// Keeps `group` at `version` on disk: now when it lowers this host's
    /// rights below the written copy's, else soon, by the writer thread.
    pub(crate) fn keep(&self, group: &ShareGroup, version: u64, now_ms: u64) {
        let rights = host_rights(group, &self.host_id, now_ms);
        let mut state = lock(&self.state);
        if version <= state.written_version {
            return;
        }
        let lowers = rights < state.written_host_rights;
        // Two changes may arrive out of order (the manager remembers them
        // outside this lock): the newest known table is the one kept, and
        // the newest is always safe to show.
        let newest = match state.pending.take() {
            Some(waiting) if waiting.1 > version => waiting,
            _ => (group.clone(), version, rights),
        };
        if lowers {
            let (group, version, rights) = newest;
            write_locked(&self.path, &mut state, &group, version, rights);
            return;
        }
        state.pending = Some(newest);
        drop(state);
        self.wake_writer();
    }

    fn wake_writer(&self) {
        let mut wake = self.wake.lock().unwrap_or_else(|p| p.into_inner());
        if wake.as_ref().is_some_and(|sender| sender.send(()).is_ok()) {
            return;
        }
        let (sender, receiver) = mpsc::channel();
        let (state, path) = (self.state.clone(), self.path.clone());
        let spawned = std::thread::Builder::new()
            .name("rights-copy".into())
            .spawn(move || write_pending_until_closed(&receiver, &state, &path));
        match spawned {
            Ok(_) => {
                let _ = sender.send(());
                *wake = Some(sender);
            }
            Err(error) => {
                tracing::warn!(%error, "no thread for the share group's copy; writing it now");
                write_pending(&self.state, &self.path);
            }
        }
    }
}

impl Drop for CopyFile {
    /// Writes what still waits, so a clean stop leaves the newest copy.
    fn drop(&mut self) {
        self.wake.lock().unwrap_or_else(|p| p.into_inner()).take();
        write_pending(&self.state, &self.path);
    }
}

fn lock(state: &Mutex<CopyState>) -> std::sync::MutexGuard<'_, CopyState> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn host_rights(group: &ShareGroup, host_id: &str, now_ms: u64) -> u64 {
    group
        .hosts
        .get(host_id)
        .map_or(0, |host| u64::from(host.rights(now_ms)))
}

/// The writer thread: each wake writes the newest pending table; it ends
/// when the manager drops its sender.
fn write_pending_until_closed(wake: &mpsc::Receiver<()>, state: &Mutex<CopyState>, path: &Path) {
    while wake.recv().is_ok() {
        while wake.try_recv().is_ok() {}
        write_pending(state, path);
    }
}

fn write_pending(state: &Mutex<CopyState>, path: &Path) {
    let mut state = lock(state);
    if let Some((group, version, rights)) = state.pending.take() {
        write_locked(path, &mut state, &group, version, rights);
    }
}

/// Writes under the state's lock, so an older table never replaces a newer.
fn write_locked(path: &Path, state: &mut CopyState, group: &ShareGroup, version: u64, rights: u64) {
    if version <= state.written_version {
        return;
    }
    match write_copy(path, group, version) {
        Ok(()) => {
            state.written_version = version;
            state.written_host_rights = rights;
        }
        Err(error) => tracing::warn!(%error, "cannot keep the share group's copy on disk"),
    }
}

fn read_copy(path: &Path) -> Option<(ShareGroup, u64)> {
    let text = std::fs::read(path).ok()?;
    let document: ShareGroupDocument = serde_json::from_slice(&text).ok()?;
    Some((document.group, document.version))
}

/// The copy, written whole to a temporary file and renamed (0600). Not
/// synced: it is a cache of the store, read only when the store cannot be
/// reached at a start, and a rename never leaves half a file.
fn write_copy(path: &Path, group: &ShareGroup, version: u64) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let document = ShareGroupDocument {
        group: group.clone(),
        version,
        stale: false,
    };
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(&serde_json::to_vec(&document).map_err(std::io::Error::other)?)?;
    std::fs::rename(&temporary, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::rights::{GroupMode, PartitionRights};

    /// A group where `host` holds `rights` permanent rights.
    fn group_with(host: &str, rights: u32) -> ShareGroup {
        let mut group = ShareGroup::new("g", GroupMode::Centralized);
        let partition = PartitionRights {
            modules: 8,
            permanent: rights,
            ..PartitionRights::default()
        };
        group
            .hosts
            .entry(host.to_string())
            .or_default()
            .partitions
            .insert(0, partition);
        group
    }

    fn on_disk(path: &Path) -> Option<(u32, u64)> {
        read_copy(path).map(|(g, v)| (g.hosts["a"].rights(0), v))
    }

    #[test]
    fn a_copy_that_lowers_the_hosts_rights_is_on_disk_before_keep_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("copy.json");
        let (file, before) = CopyFile::open(path.clone(), "a", 0);
        assert!(before.is_none());
        file.keep(&group_with("a", 5), 1, 0);
        drop(file); // a clean stop writes what waits
        assert_eq!(on_disk(&path), Some((5, 1)));

        let (file, before) = CopyFile::open(path.clone(), "a", 0);
        assert_eq!(before.map(|(_, v)| v), Some(1));
        file.keep(&group_with("a", 3), 2, 0);
        // No drop, no wait: the file already shows the rights given away.
        assert_eq!(on_disk(&path), Some((3, 2)));
        // An older table never replaces a newer one.
        file.keep(&group_with("a", 7), 1, 0);
        assert_eq!(on_disk(&path), Some((3, 2)));
        // Rights received go through the writer; the newest one lands,
        // even when an older change arrives after it.
        file.keep(&group_with("a", 4), 3, 0);
        file.keep(&group_with("a", 6), 5, 0);
        file.keep(&group_with("a", 5), 4, 0);
        drop(file);
        assert_eq!(on_disk(&path), Some((6, 5)));

        // A lowering change that arrives after a newer one is waiting
        // writes the newer one at once (a newer table never shows more
        // than is held).
        let (file, _) = CopyFile::open(path.clone(), "a", 0);
        file.keep(&group_with("a", 7), 7, 0);
        file.keep(&group_with("a", 1), 6, 0);
        assert_eq!(on_disk(&path).map(|(_, v)| v), Some(7));
    }
}

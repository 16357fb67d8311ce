//! The `vm` image's initramfs: an uncompressed newc cpio (the kernel reads
//! it without decompressing, which saves boot time under TCG) holding a
//! static busybox, the kernel modules the guest needs for its disk, and an
//! `/init` that runs one job and powers off.
//!
//! The guest's serial ports are its only channels to the host (there is no
//! network): ttyS0 the kernel console (discarded), ttyS1 the job's stdout,
//! ttyS2 its stderr, ttyS3 the exit code trailer `leasehold-vm-exit N`.
//! The command comes through QEMU's fw_cfg as the file `opt/leasehold/argv`
//! holding `B64,B64,...` (each argument base64, standard alphabet, padded
//! with spaces): not on the kernel or QEMU command line, which every local
//! user can read, and not bound by the kernel command line's 2 KiB.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::ImageError;

/// The modules the guest loads, with what they need: fw_cfg (the job's
/// command), the virtio PCI bus and disk, and ext4 for the partition's disk
/// (crc32c is asked for through the crypto API at mount time, so it is not
/// a symbol dependency).
pub const GUEST_MODULES: [&str; 5] = [
    "qemu_fw_cfg",
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
];
/// The fw_cfg files the guest reads: `go` ("0" in the snapshot, "1" for a
/// job), `argv` (the command), `seed` (randomness), `time` (Unix seconds).
/// Their sizes are fixed: the guest learnt them before its snapshot.
pub const FW_CFG_DIR: &str = "opt/leasehold";
/// The size of the `argv` file, padded with spaces: room for the largest
/// command the agent accepts (64 KiB), base64-encoded, with separators.
pub const ARGV_FILE_BYTES: usize = 96 * 1024;
pub const SEED_FILE_BYTES: usize = 64;
pub const TIME_FILE_BYTES: usize = 20;

/// The trailer the guest's init writes on ttyS3 after the job.
pub const EXIT_TRAILER_PREFIX: &str = "leasehold-vm-exit ";
/// The trailer when the guest could not run the job at all.
pub const ERROR_TRAILER_PREFIX: &str = "leasehold-vm-error ";
/// The line the guest writes on ttyS3 when it waits for a job: the moment
/// the host snapshots it.
pub const READY_TRAILER: &str = "leasehold-vm-ready";

/// The guest's `/init`. `@MODULES@` becomes the modules in load order.
///
/// It boots to a point where the host takes a snapshot of the VM (modules
/// loaded, the disk not read), says so on ttyS3, and waits there for the
/// fw_cfg file `go` to read 1, which it does only in a copy restored from
/// that snapshot for a job: every job starts from the same booted state in
/// well under a second. The restored copy then takes its own randomness and
/// the time of day from fw_cfg, forgets the disk blocks the snapshot may
/// have cached (the partition's disk is not the snapshot's), mounts the
/// disk and runs the job.
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
# leasehold vm guest init: waits (in a snapshot) for a job, runs the job
# given through fw_cfg, reports its exit code on ttyS3 and powers off (QEMU
# runs with -no-reboot).
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox --install -s /bin
export PATH=/bin:/sbin HOME=/work TERM=dumb
for port in /dev/ttyS1 /dev/ttyS2 /dev/ttyS3; do stty -F "$port" raw -echo 2>/dev/null; done
fail() {
    echo "leasehold-vm-error $1" >/dev/ttyS3
    reboot -f
}
for module in @MODULES@; do
    insmod "/lib/modules/$module.ko" 2>/dev/ttyS2 || fail "cannot load kernel module $module"
done
fw=/sys/firmware/qemu_fw_cfg/by_name/opt/leasehold
[ -r "$fw/go/raw" ] || fail "no leasehold files in fw_cfg"
echo "leasehold-vm-ready" >/dev/ttyS3
until [ "$(cat "$fw/go/raw")" = 1 ]; do sleep 0.005; done
cat "$fw/seed/raw" >/dev/urandom
date -s "@$(tr -d ' ' <"$fw/time/raw")" >/dev/null 2>&1
blockdev --flushbufs /dev/vda 2>/dev/null
mkdir -p /work
mount -t ext4 -o nosuid,nodev /dev/vda /work 2>/dev/ttyS2 || fail "cannot mount the partition's disk"
cd /work
set --
for encoded in $(tr , ' ' <"$fw/argv/raw"); do
    # The x keeps trailing newlines of an argument from $(...).
    value=$(echo "$encoded" | base64 -d; echo x)
    set -- "$@" "${value%x}"
done
[ "$#" -gt 0 ] || fail "an empty command in fw_cfg"
"$@" </dev/null >/dev/ttyS1 2>/dev/ttyS2
status=$?
cd /
sync
umount /work 2>/dev/null
echo "leasehold-vm-exit $status" >/dev/ttyS3
reboot -f
"#;

fn fail(reason: impl Into<String>) -> ImageError {
    ImageError::VmRecipe {
        reason: reason.into(),
    }
}

/// A module's file name as the kernel names the module (`-` is `_`).
fn module_name(file_name: &str) -> Option<String> {
    Some(file_name.strip_suffix(".ko")?.replace('-', "_"))
}

/// Every `.ko` under `dir`, by module name.
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ImageError> {
    let mut found = BTreeMap::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(next) = pending.pop() {
        let entries = std::fs::read_dir(&next).map_err(|e| ImageError::io(&next, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pending.push(path);
            } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                found.insert(name, path);
            }
        }
    }
    Ok(found)
}

/// The `depends=` list in a module's `.modinfo` section.
fn module_dependencies(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = module.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let value = &module[at + key.len()..];
    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
    String::from_utf8_lossy(&value[..end])
        .split(',')
        .filter(|d| !d.is_empty())
        .map(|d| d.replace('-', "_"))
        .collect()
}

/// `wanted` and everything they depend on, each after its dependencies,
/// with its contents. `modules_dir` is `lib/modules/<release>` of the
/// kernel package. Compressed modules (`.ko.xz`) are not read.
pub fn module_closure(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let index = index_modules(modules_dir)?;
    let mut ordered: Vec<(String, Vec<u8>)> = Vec::new();
    let mut placed = BTreeSet::new();
    // Depth-first: (name, whether its dependencies are placed already).
    let mut stack: Vec<(String, bool)> = wanted
        .iter()
        .rev()
        .map(|w| (w.to_string(), false))
        .collect();
    let mut visiting = BTreeSet::new();
    while let Some((name, ready)) = stack.pop() {
        if placed.contains(&name) {
            continue;
        }
        let path = index.get(&name).ok_or_else(|| {
            fail(format!(
                "the kernel package has no module {name} under {} (is it built in, or compressed?)",
                modules_dir.display()
            ))
        })?;
        let bytes = std::fs::read(path).map_err(|e| ImageError::io(path, e))?;
        if ready {
            placed.insert(name.clone());
            ordered.push((name, bytes));
            continue;
        }
        if !visiting.insert(name.clone()) {
            return Err(fail(format!("module {name} depends on itself")));
        }
        stack.push((name, true));
        for dependency in module_dependencies(&bytes).into_iter().rev() {
            if !placed.contains(&dependency) {
                stack.push((dependency, false));
            }
        }
    }
    Ok(ordered)
}

/// The guest's `/init` for modules loaded in this order.
pub fn init_script(modules_in_order: &[String]) -> String {
    INIT_SCRIPT.replace("@MODULES@", &modules_in_order.join(" "))
}

/// Writes a newc ("070701") cpio archive, the format the kernel unpacks
/// into its initial root filesystem.
pub struct CpioWriter<W: Write> {
    out: W,
    next_inode: u32,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter { out, next_inode: 1 }
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        device: (u32, u32),
        data: &[u8],
    ) -> std::io::Result<()> {
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime: fixed, so the same inputs give the same bytes
            data.len() as u32,
            0, // dev major
            0, // dev minor
            device.0,
            device.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.next_inode += 1;
        let mut header = String::from("070701");
        for field in fields {
            header.push_str(&format!("{field:08X}"));
        }
        let mut bytes = header.into_bytes();
        bytes.extend_from_slice(name.as_bytes());
        bytes.push(0);
        pad4(&mut bytes);
        bytes.extend_from_slice(data);
        pad4(&mut bytes);
        self.out.write_all(&bytes)
    }

    pub fn directory(&mut self, name: &str) -> std::io::Result<()> {
        self.entry(name, 0o040755, (0, 0), &[])
    }

    pub fn file(&mut self, name: &str, permissions: u32, data: &[u8]) -> std::io::Result<()> {
        self.entry(name, 0o100000 | (permissions & 0o7777), (0, 0), data)
    }

    pub fn char_device(&mut self, name: &str, major: u32, minor: u32) -> std::io::Result<()> {
        self.entry(name, 0o020600, (major, minor), &[])
    }

    /// Writes the trailer and answers the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        Ok(self.out)
    }
}

fn pad4(bytes: &mut Vec<u8>) {
    bytes.resize(bytes.len().next_multiple_of(4), 0);
}

/// The whole initramfs: busybox, the modules (in load order) and `/init`.
pub fn build_initramfs(
    busybox: &[u8],
    modules: &[(String, Vec<u8>)],
) -> Result<Vec<u8>, ImageError> {
    let mut cpio = CpioWriter::new(Vec::new());
    let names: Vec<String> = modules.iter().map(|(name, _)| name.clone()).collect();
    let write = |cpio: &mut CpioWriter<Vec<u8>>| -> std::io::Result<()> {
        for dir in [
            "bin",
            "sbin",
            "dev",
            "proc",
            "sys",
            "tmp",
            "work",
            "lib",
            "lib/modules",
        ] {
            cpio.directory(dir)?;
        }
        // The kernel opens /dev/console for init before devtmpfs is mounted.
        cpio.char_device("dev/console", 5, 1)?;
        cpio.file("bin/busybox", 0o755, busybox)?;
        for (name, bytes) in modules {
            cpio.file(&format!("lib/modules/{name}.ko"), 0o644, bytes)?;
        }
        cpio.file("init", 0o755, init_script(&names).as_bytes())
    };
    write(&mut cpio).map_err(|e| fail(format!("cannot write the initramfs: {e}")))?;
    cpio.finish()
        .map_err(|e| fail(format!("cannot write the initramfs: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_come_after_what_they_depend_on_and_a_missing_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let module = |path: &str, depends: &str| {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let modinfo = format!("junk\0license=GPL\0depends={depends}\0vermagic=6.1\0");
            std::fs::write(path, modinfo).unwrap();
        };
        module("kernel/fs/ext4/ext4.ko", "jbd2,mbcache");
        module("kernel/fs/jbd2/jbd2.ko", "");
        module("kernel/fs/mbcache.ko", "");
        module("kernel/drivers/virtio/virtio_blk.ko", "virtio,virtio_ring");
        module("kernel/drivers/virtio/virtio.ko", "virtio_ring");
        module("kernel/drivers/virtio/virtio_ring.ko", "");
        let names = |wanted: &[&str]| -> Vec<String> {
            module_closure(dir.path(), wanted)
                .unwrap()
                .into_iter()
                .map(|(name, _)| name)
                .collect()
        };
        assert_eq!(
            names(&["virtio_blk", "ext4"]),
            [
                "virtio_ring",
                "virtio",
                "virtio_blk",
                "jbd2",
                "mbcache",
                "ext4"
            ]
        );
        module("kernel/fs/ext4/ext4.ko", "jbd2,crc16");
        let missing = module_closure(dir.path(), &["ext4"])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("no module crc16"), "{missing}");
    }

    #[test]
    fn the_cpio_is_newc_with_padded_entries_and_a_trailer() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.directory("bin").unwrap();
        cpio.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        cpio.char_device("dev/console", 5, 1).unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        // The file's header: mode 0100755, size 10, name "init" (5 with NUL).
        let at = bytes.windows(4).position(|w| w == b"init").unwrap() - 110;
        let header = std::str::from_utf8(&bytes[at..at + 110]).unwrap();
        assert_eq!(&header[14..22], "000081ED");
        assert_eq!(&header[54..62], "0000000A");
        assert_eq!(&header[94..102], "00000005");
        assert!(bytes.windows(10).any(|w| w == b"TRAILER!!!"));
        // The console device is 5:1 (rdevmajor, rdevminor).
        let at = bytes.windows(11).position(|w| w == b"dev/console").unwrap() - 110;
        let header = std::str::from_utf8(&bytes[at..at + 110]).unwrap();
        assert_eq!((&header[78..86], &header[86..94]), ("00000005", "00000001"));
    }

    #[test]
    fn the_init_script_loads_the_modules_in_the_given_order() {
        let script = init_script(&["virtio_ring".into(), "virtio".into()]);
        assert!(script.contains("for module in virtio_ring virtio; do"));
        assert!(script.contains(EXIT_TRAILER_PREFIX.trim()));
        assert!(script.contains(ERROR_TRAILER_PREFIX.trim()));
        assert!(script.contains(&format!("by_name/{FW_CFG_DIR}\n")));
        assert!(script.contains(READY_TRAILER));
    }
}

//! The `debian-vm` recipe: an OS image for the `vm` partition driver (seed
//! 000 FIG. 5 S30-S32: the borrower's OS starts in the partition; FIG. 16:
//! it is fetched from the file server by digest). The image is a directory
//! stored like any other (a tar, addressed by sha256):
//!
//! ```text
//! vm.json          {"kind":"vm","kernel":"vmlinux","initramfs":"initramfs.cpio",...}
//! vmlinux          the kernel, uncompressed ELF with a PVH entry (or a bzImage)
//! initramfs.cpio   busybox, the disk modules and /init (see vm_initramfs)
//! ```
//!
//! The kernel comes from Debian's `linux-image-amd64` (the package it
//! depends on), fetched with `apt-get download` and unpacked with
//! `dpkg-deb -x`, never installed on this machine.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::vm_initramfs::{build_initramfs, module_closure, GUEST_MODULES};
use crate::vm_kernel::{extract_vmlinux, has_pvh_entry};
use crate::{fsutil, validate_name, ImageEntry, ImageError, ImageStore};

/// The file naming a vm image's parts; its presence makes an image a vm image.
pub const VM_MANIFEST_FILE: &str = "vm.json";
/// The Debian package whose dependency is the current kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
/// Largest kernel package read.
const MAX_KERNEL_FILE_BYTES: u64 = 64 << 20;

/// What `vm.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmManifest {
    /// Always "vm".
    pub kind: String,
    /// The kernel file, relative to the image root.
    pub kernel: String,
    pub initramfs: String,
    /// `uname -r` of the guest.
    pub kernel_release: String,
    /// "pvh": an uncompressed ELF QEMU boots directly; "bzimage" otherwise.
    pub boot: String,
}

impl VmManifest {
    /// Reads an unpacked image's manifest, checking that its files are
    /// plain names inside the image.
    pub fn read(image_root: &Path) -> Result<VmManifest, ImageError> {
        let path = image_root.join(VM_MANIFEST_FILE);
        let bytes = fsutil::read_bounded(&path, 64 << 10)?;
        let manifest: VmManifest =
            serde_json::from_slice(&bytes).map_err(|e| ImageError::Corrupt {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let plain =
            |name: &str| !name.is_empty() && !name.contains('/') && name != "." && name != "..";
        if manifest.kind != "vm" || !plain(&manifest.kernel) || !plain(&manifest.initramfs) {
            return Err(ImageError::Corrupt {
                path: path.display().to_string(),
                reason: "kind must be \"vm\" and kernel and initramfs plain file names".into(),
            });
        }
        Ok(manifest)
    }
}

fn fail(reason: impl Into<String>) -> ImageError {
    ImageError::VmRecipe {
        reason: reason.into(),
    }
}

fn run(program: &str, args: &[&str], dir: &Path) -> Result<String, ImageError> {
    let output = Command::new(program)
        .args(args)
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| fail(format!("cannot run {program}: {e}")))?;
    if !output.status.success() {
        return Err(fail(format!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Downloads the kernel package `linux-image-amd64` depends on into `dir`.
fn download_kernel_package(dir: &Path) -> Result<PathBuf, ImageError> {
    let depends = run(
        "apt-cache",
        &["depends", "--important", KERNEL_META_PACKAGE],
        dir,
    )?;
    let package = depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .ok_or_else(|| {
            fail(format!(
                "apt-cache names no kernel package for {KERNEL_META_PACKAGE}; run apt-get update"
            ))
        })?
        .to_string();
    run("apt-get", &["download", "-q", &package], dir)?;
    let found = std::fs::read_dir(dir)
        .map_err(|e| ImageError::io(dir, e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        });
    found.ok_or_else(|| fail(format!("apt-get download left no {package} .deb")))
}

/// The kernel image and its release in an unpacked kernel package.
fn find_kernel(unpacked: &Path) -> Result<(PathBuf, String), ImageError> {
    let boot = unpacked.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(|e| ImageError::io(&boot, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok((entry.path(), release.to_string()));
        }
    }
    Err(fail(format!(
        "the kernel package has no {}/vmlinuz-*",
        boot.display()
    )))
}

/// Makes the image's files in `root` from an unpacked kernel package.
fn write_vm_image(unpacked: &Path, root: &Path, busybox: &Path) -> Result<VmManifest, ImageError> {
    let (bzimage_path, release) = find_kernel(unpacked)?;
    let bzimage = fsutil::read_bounded(&bzimage_path, MAX_KERNEL_FILE_BYTES)?;
    // PVH boots the ELF directly; a kernel without a PVH note boots as a
    // bzImage (slower, but it boots).
    let (kernel, boot) = match extract_vmlinux(&bzimage) {
        Ok(elf) if has_pvh_entry(&elf) => (elf, "pvh"),
        Ok(_) => (bzimage, "bzimage"),
        Err(error) => {
            tracing::warn!(%error, "booting the compressed kernel");
            (bzimage, "bzimage")
        }
    };
    let modules_dir = unpacked.join("lib/modules").join(&release);
    let modules = module_closure(&modules_dir, &GUEST_MODULES)?;
    let busybox_bytes = fsutil::read_bounded(busybox, 64 << 20)?;
    let initramfs = build_initramfs(&busybox_bytes, &modules)?;
    let manifest = VmManifest {
        kind: "vm".into(),
        kernel: "vmlinux".into(),
        initramfs: "initramfs.cpio".into(),
        kernel_release: release,
        boot: boot.into(),
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest).expect("manifests serialize");
    for (file, bytes) in [
        (manifest.kernel.as_str(), kernel.as_slice()),
        (manifest.initramfs.as_str(), initramfs.as_slice()),
        (VM_MANIFEST_FILE, manifest_json.as_slice()),
    ] {
        let path = root.join(file);
        std::fs::write(&path, bytes).map_err(|e| ImageError::io(&path, e))?;
        fsutil::set_mode(&path, 0o644)?;
    }
    Ok(manifest)
}

impl ImageStore {
    /// Builds the `debian-vm` image under `name`: Debian's current kernel
    /// (from `kernel_deb` if given, else downloaded with apt-get) and an
    /// initramfs made around this machine's static busybox.
    pub fn build_vm_debian(
        &self,
        name: &str,
        kernel_deb: Option<&Path>,
    ) -> Result<ImageEntry, ImageError> {
        validate_name(name)?;
        let busybox = crate::store::static_busybox()?;
        let work = tempfile::Builder::new()
            .prefix("vm-")
            .tempdir_in(self.tmp_dir())
            .map_err(|e| ImageError::io(self.tmp_dir(), e))?;
        let deb = match kernel_deb {
            Some(path) => path.to_path_buf(),
            None => download_kernel_package(work.path())?,
        };
        let unpacked = work.path().join("package");
        let deb_text = deb.display().to_string();
        let unpacked_text = unpacked.display().to_string();
        run("dpkg-deb", &["-x", &deb_text, &unpacked_text], work.path())?;
        let root = work.path().join("image");
        std::fs::create_dir(&root).map_err(|e| ImageError::io(&root, e))?;
        fsutil::set_mode(&root, 0o755)?;
        let manifest = write_vm_image(&unpacked, &root, &busybox)?;
        tracing::info!(release = %manifest.kernel_release, boot = %manifest.boot, "vm image made");
        self.add_dir(name, &root)
    }
}

//! Writes the seed corpora of the fuzz targets into `fuzz/corpus/<target>/`:
//! real lease keys and notices signed with the fuzz targets' fixed key, a
//! small busybox-like image made by the image store's deterministic tar
//! writer plus hand-made hostile tars, and valid request bodies.
//!
//! Run from the workspace root: `cargo run --manifest-path fuzz/seedgen/Cargo.toml`.
//! Seeds are deterministic: running it again rewrites the same files.

use leasehold_api::{
    AddPartitionRequest, CreatePrincipalRequest, FindRequest, LeaseRequest, NoticeRequest,
    RegisterHostRequest, RegisterPartitionRequest, Role, SubmitJobRequest,
};
use leasehold_core::key::{self, LeaseKeyClaims, NoticeClaims, NoticeKind};
use leasehold_core::{HostCapacity, Requirements, Terms};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Must match `SIGNER_SEED` in fuzz_targets/lease_key.rs and request_bodies.rs.
const SIGNER_SEED: [u8; 32] = [7; 32];
/// Must match `SANDBOX` in fuzz_targets/image_unpack.rs.
const UNPACK_SANDBOX: &str = "/tmp/leasehold-fuzz-unpack";

fn main() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus");
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        fs::write(dir.join(name), bytes).expect("write a seed");
    };
    for (name, bytes) in lease_key_seeds() {
        write("lease_key", &name, &bytes);
    }
    for (name, bytes) in request_body_seeds() {
        write("request_bodies", &name, &bytes);
    }
    for (name, bytes) in image_tar_seeds() {
        write("image_unpack", &name, &bytes);
    }
    println!("seeds written under {}", corpus.display());
}

fn sample_terms() -> Terms {
    Terms {
        vcpus: 2,
        cpu_cap_percent: 50,
        memory_mib: 1024,
        disk_gib: 10,
        images: vec![format!("busybox@sha256:{}", "ab".repeat(32))],
        price_per_hour_micros: 100_000,
        isolation: None,
    }
}

fn lease_key_seeds() -> Vec<(String, Vec<u8>)> {
    let signer = key::signing_key_from_seed(SIGNER_SEED);
    let untrusted = key::signing_key_from_seed([9; 32]);
    let claims = LeaseKeyClaims {
        lease_id: 42,
        host_id: "alpha".into(),
        partition_index: 1,
        epoch: 3,
        borrower: "bob".into(),
        issued_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_003_600_000,
        key_id: key::key_id(&signer.verifying_key()),
        terms: Some(sample_terms()),
    };
    let old_style = LeaseKeyClaims {
        key_id: String::new(),
        terms: None,
        ..claims.clone()
    };
    let notice = NoticeClaims {
        kind: NoticeKind::LeaseReleased,
        host_id: "alpha".into(),
        partition_index: 1,
        lease_id: 42,
        epoch: 3,
        key_expires_at_ms: 1_700_003_600_000,
        key_id: key::key_id(&signer.verifying_key()),
    };
    vec![
        (
            "key-with-terms".into(),
            key::sign(&claims, &signer).into_bytes(),
        ),
        (
            "key-without-key-id".into(),
            key::sign(&old_style, &signer).into_bytes(),
        ),
        (
            "key-untrusted-signer".into(),
            key::sign(&claims, &untrusted).into_bytes(),
        ),
        (
            "notice-released".into(),
            key::sign_notice(&notice, &signer).into_bytes(),
        ),
        ("not-a-key".into(), b"lk1..".to_vec()),
    ]
}

fn request_body_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = broker_body_seeds();
    seeds.extend(agent_body_seeds());
    seeds.push(("empty-object".into(), b"{}".to_vec()));
    seeds.push((
        "unknown-field".into(),
        br#"{"terms":{"vcpus":1},"extra":true}"#.to_vec(),
    ));
    seeds
}

fn json(value: &dyn erased::Json) -> Vec<u8> {
    value.to_json()
}

/// Bodies the broker reads.
fn broker_body_seeds() -> Vec<(String, Vec<u8>)> {
    let requirements = Requirements {
        min_vcpus: Some(2),
        min_memory_mib: Some(512),
        image: Some("busybox".into()),
        max_price_per_hour_micros: Some(200_000),
        ..Requirements::default()
    };
    vec![
        (
            "lease-named".into(),
            json(&LeaseRequest {
                partition: Some("alpha/1".into()),
                best: None,
                allow_unisolated: false,
            }),
        ),
        (
            "lease-best".into(),
            json(&LeaseRequest {
                partition: None,
                best: Some(requirements.clone()),
                allow_unisolated: false,
            }),
        ),
        (
            "find".into(),
            json(&FindRequest {
                requirements,
                limit: Some(5),
            }),
        ),
        (
            "register-partition".into(),
            json(&RegisterPartitionRequest {
                terms: sample_terms(),
            }),
        ),
        (
            "register-host".into(),
            json(&RegisterHostRequest {
                agent_url: Some("http://127.0.0.1:7070".into()),
                capacity: HostCapacity {
                    cpu_centicores: 800,
                    memory_mib: 16384,
                    disk_gib: 200,
                    owner_share_cpu_centicores: 100,
                    owner_share_memory_mib: 1024,
                    owner_share_disk_gib: 10,
                },
            }),
        ),
        (
            "create-principal".into(),
            json(&CreatePrincipalRequest {
                name: "bob".into(),
                role: Role::Borrower,
            }),
        ),
    ]
}

/// Bodies the agent reads.
fn agent_body_seeds() -> Vec<(String, Vec<u8>)> {
    let key_token = lease_key_seeds().remove(0).1;
    vec![
        (
            "add-partition".into(),
            json(&AddPartitionRequest {
                terms: sample_terms(),
            }),
        ),
        (
            "submit-job".into(),
            json(&SubmitJobRequest {
                lease_key: String::from_utf8(key_token).expect("keys are text"),
                command: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
                timeout_ms: Some(5000),
                image: Some("busybox".into()),
                stream: true,
            }),
        ),
        (
            "notice".into(),
            json(&NoticeRequest {
                notice: String::from_utf8(lease_key_seeds().remove(3).1).expect("notices are text"),
            }),
        ),
    ]
}

/// `&dyn Serialize` is not object-safe; this is the smallest way to hold
/// differently typed request bodies in one list.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("request bodies serialize")
        }
    }
}

fn image_tar_seeds() -> Vec<(String, Vec<u8>)> {
    let mut seeds = vec![("busybox-like".to_string(), busybox_like_tar())];
    seeds.extend(hostile_tars());
    seeds
}

/// A small root filesystem shaped like the busybox recipe's (a binary, its
/// applet symlinks, /etc files, a sticky /tmp and a setuid binary that the
/// unpacker must defang), written by `ImageStore::add_dir`.
fn busybox_like_tar() -> Vec<u8> {
    let scratch = tempfile::tempdir().expect("scratch dir");
    let tree = scratch.path().join("rootfs");
    for dir in ["bin", "etc", "tmp", "usr/bin"] {
        fs::create_dir_all(tree.join(dir)).expect("mkdir");
    }
    fs::write(tree.join("bin/busybox"), b"\x7fELF not really busybox\n").expect("write");
    set_mode(&tree.join("bin/busybox"), 0o755);
    for applet in ["sh", "ls", "cat"] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).expect("symlink");
    }
    std::os::unix::fs::symlink("../../bin/busybox", tree.join("usr/bin/env")).expect("symlink");
    fs::write(tree.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").expect("write");
    fs::write(tree.join("bin/su"), b"setuid\n").expect("write");
    set_mode(&tree.join("bin/su"), 0o4755);
    set_mode(&tree.join("tmp"), 0o1777);
    let store = leasehold_images::ImageStore::open(&scratch.path().join("store")).expect("store");
    let entry = store.add_dir("busybox", &tree).expect("archive the tree");
    fs::read(store.blob_path(&entry.digest).expect("blob path")).expect("read the blob")
}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// One tar entry with its name and link name written raw, so that paths the
/// `tar` crate's setters refuse (`..`, absolute) can be made.
struct RawEntry<'a> {
    name: &'a str,
    kind: tar::EntryType,
    mode: u32,
    link: &'a str,
    data: &'a [u8],
}

fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for entry in entries {
        let mut header = tar::Header::new_gnu();
        let old = header.as_old_mut();
        old.name[..entry.name.len()].copy_from_slice(entry.name.as_bytes());
        old.linkname[..entry.link.len()].copy_from_slice(entry.link.as_bytes());
        header.set_entry_type(entry.kind);
        header.set_mode(entry.mode);
        header.set_size(entry.data.len() as u64);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if matches!(entry.kind, tar::EntryType::Char | tar::EntryType::Block) {
            header.set_device_major(1).expect("device major");
            header.set_device_minor(3).expect("device minor");
        }
        header.set_cksum();
        builder.append(&header, entry.data).expect("append");
    }
    builder.into_inner().expect("finish the tar")
}

fn entry<'a>(name: &'a str, kind: tar::EntryType, mode: u32, link: &'a str) -> RawEntry<'a> {
    RawEntry {
        name,
        kind,
        mode,
        link,
        data: b"",
    }
}

fn file<'a>(name: &'a str, mode: u32, data: &'a [u8]) -> RawEntry<'a> {
    RawEntry {
        name,
        kind: tar::EntryType::Regular,
        mode,
        link: "",
        data,
    }
}

fn hostile_tars() -> Vec<(String, Vec<u8>)> {
    let mut seeds = escaping_tars();
    seeds.extend(mode_and_type_tars());
    seeds.push(("long-name-and-pax".into(), long_name_tar()));
    seeds
}

/// Tars that try to write, link or chmod outside the image directory.
fn escaping_tars() -> Vec<(String, Vec<u8>)> {
    use tar::EntryType::{Directory, Link, Symlink};
    let canary = format!("{UNPACK_SANDBOX}/canary");
    let pwned: &[u8] = b"pwned\n";
    let up = entry("up", Symlink, 0o777, "..");
    let tars: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
        ("dotdot-file", vec![file("../canary", 0o644, pwned)]),
        ("absolute-file", vec![file(&canary, 0o644, pwned)]),
        (
            "symlink-up-then-write",
            vec![
                entry("up", Symlink, 0o777, ".."),
                file("up/canary", 0o644, pwned),
            ],
        ),
        (
            "symlink-absolute-then-write",
            vec![
                entry("abs", Symlink, 0o777, UNPACK_SANDBOX),
                file("abs/canary", 0o644, pwned),
            ],
        ),
        (
            "hardlink-through-symlink-then-overwrite",
            vec![
                entry("up", Symlink, 0o777, ".."),
                entry("h", Link, 0o644, "up/canary"),
                file("h", 0o644, pwned),
            ],
        ),
        ("hardlink-absolute", vec![entry("h", Link, 0o644, &canary)]),
        (
            "symlink-then-chmod-through-dir",
            vec![up, entry("up", Directory, 0o777, "")],
        ),
    ];
    tars.into_iter()
        .map(|(name, entries)| (name.to_string(), raw_tar(&entries)))
        .collect()
}

/// Tars with modes and entry types the unpacker must defang or skip.
fn mode_and_type_tars() -> Vec<(String, Vec<u8>)> {
    use tar::EntryType::{Block, Char, Directory, Fifo};
    let tars: Vec<(&str, Vec<RawEntry<'_>>)> = vec![
        (
            "setid-and-world-writable",
            vec![
                file("su", 0o6777, b"x"),
                entry("tmp/", Directory, 0o1777, ""),
                file("deep/implicit/dir/file", 0o644, b"x"),
            ],
        ),
        (
            "devices-and-fifo",
            vec![
                entry("dev/null", Char, 0o666, ""),
                entry("dev/sda", Block, 0o660, ""),
                entry("run/fifo", Fifo, 0o666, ""),
            ],
        ),
    ];
    tars.into_iter()
        .map(|(name, entries)| (name.to_string(), raw_tar(&entries)))
        .collect()
}

/// GNU long names and a pax path header, which the tar crate reads as the
/// next entry's path.
fn long_name_tar() -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let long: PathBuf = ["a".repeat(90), "b".repeat(90), "file".into()]
        .iter()
        .collect();
    let mut header = tar::Header::new_gnu();
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    builder
        .append_data(&mut header, &long, &b"abc"[..])
        .expect("long name");
    builder
        .append_pax_extensions([("path", &b"pax/../../canary"[..])])
        .expect("pax header");
    let mut header = tar::Header::new_ustar();
    header.set_path("innocent").expect("path");
    header.set_size(3);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_cksum();
    builder.append(&header, &b"abc"[..]).expect("pax entry");
    builder.into_inner().expect("finish the tar")
}

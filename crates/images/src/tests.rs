use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::fsutil::{self, IndexFile};
use crate::{ImageCache, ImageEntry, ImageError, ImageStore};

fn no_progress(_: u64, _: u64) {}

/// The reference a partition's terms carry for `entry`: `name@sha256:<hex>`.
fn pinned(entry: &ImageEntry) -> String {
    format!("{}@{}", entry.name, entry.digest)
}

/// A small root filesystem: a script, a read-only file, a subdirectory, a
/// symlink and an empty directory.
fn make_tree(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    fs::create_dir_all(dir.join("etc/deep/er")).unwrap();
    fs::create_dir_all(dir.join("empty")).unwrap();
    fs::write(dir.join("bin/hello"), "#!/bin/sh\necho hello\n").unwrap();
    fs::set_permissions(dir.join("bin/hello"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(dir.join("etc/motd"), "welcome\n").unwrap();
    fs::set_permissions(dir.join("etc/motd"), fs::Permissions::from_mode(0o444)).unwrap();
    fs::write(dir.join("etc/deep/er/file"), vec![7u8; 5000]).unwrap();
    symlink("hello", dir.join("bin/hi")).unwrap();
    symlink("/etc/motd", dir.join("motd")).unwrap();
}

fn entries_of(tar_path: &Path) -> Vec<(String, tar::EntryType, Option<String>, u32, u64, u64)> {
    let mut archive = tar::Archive::new(fs::File::open(tar_path).unwrap());
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            (
                String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                h.entry_type(),
                e.link_name()
                    .unwrap()
                    .map(|l| l.to_string_lossy().into_owned()),
                h.mode().unwrap(),
                h.mtime().unwrap(),
                h.uid().unwrap(),
            )
        })
        .collect()
}

fn busybox_is_static() -> bool {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .any(|p| Path::new(p).is_file() && super::store::elf_is_dynamic(Path::new(p)) == Ok(false))
}

fn dir_is_empty(dir: &Path) -> bool {
    fs::read_dir(dir).unwrap().next().is_none()
}

struct Server {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

async fn serve(store: Arc<ImageStore>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, store.router())
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    Server { url, stop, task }
}

impl Server {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server did not stop")
            .unwrap();
    }
}

/// A tar written header by header, so that it can hold what tar::Builder refuses.
fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], &str)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        header.set_cksum();
        builder.append(&header, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// Puts a blob in the store by hand, skipping add_tarball's checks, as a
/// hostile or broken store could serve it.
fn inject(store: &ImageStore, root: &Path, name: &str, bytes: &[u8]) -> ImageEntry {
    use sha2::Digest;
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)));
    fs::write(store.blob_path(&digest).unwrap(), bytes).unwrap();
    let mut index = fsutil::read_index(&root.join("index.json")).unwrap();
    let entry = ImageEntry {
        name: name.to_string(),
        digest,
        size_bytes: bytes.len() as u64,
    };
    index.images.insert(name.to_string(), entry.clone());
    fsutil::write_index(&root.join("index.json"), &index, 0o644).unwrap();
    entry
}

#[test]
fn add_dir_is_deterministic_and_content_addressed() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();
    let a = tmp.path().join("a");
    make_tree(&a);

    let first = store.add_dir("tree", &a).unwrap();
    let second = store.add_dir("tree-again", &a).unwrap();
    assert_eq!(first.digest, second.digest);
    assert_eq!(first.size_bytes, second.size_bytes);
    assert!(first.digest.starts_with("sha256:") && first.digest.len() == 71);

    // The same tree made later (other mtimes, other inode order) archives the same.
    let b = tmp.path().join("b");
    make_tree(&b);
    filetime_touch(&b.join("etc/motd"));
    assert_eq!(store.add_dir("tree-b", &b).unwrap().digest, first.digest);

    // What is inside: sorted, mtime 0, owner 0, modes and symlinks kept.
    let entries = entries_of(&store.blob_path(&first.digest).unwrap());
    let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        names,
        [
            "bin",
            "bin/hello",
            "bin/hi",
            "empty",
            "etc",
            "etc/deep",
            "etc/deep/er",
            "etc/deep/er/file",
            "etc/motd",
            "motd"
        ]
    );
    for (name, kind, link, mode, mtime, uid) in &entries {
        assert_eq!((*mtime, *uid), (0, 0), "{name}");
        match name.as_str() {
            "bin/hello" => assert_eq!(*mode, 0o755),
            "etc/motd" => assert_eq!(*mode, 0o444),
            "bin/hi" => {
                assert_eq!(*kind, tar::EntryType::Symlink);
                assert_eq!(link.as_deref(), Some("hello"));
            }
            "motd" => assert_eq!(link.as_deref(), Some("/etc/motd")),
            _ => {}
        }
    }

    // A changed file is another image; the old blob stays.
    fs::write(a.join("etc/deep/er/file"), vec![8u8; 5000]).unwrap();
    let changed = store.add_dir("tree", &a).unwrap();
    assert_ne!(changed.digest, first.digest);
    assert_eq!(store.get("tree").unwrap(), changed);
    assert!(store.blob_path(&first.digest).unwrap().is_file());
    // A changed mode too.
    fs::set_permissions(a.join("etc/motd"), fs::Permissions::from_mode(0o644)).unwrap();
    assert_ne!(store.add_dir("tree", &a).unwrap().digest, changed.digest);

    let listed: Vec<String> = store.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(listed, ["tree", "tree-again", "tree-b"]);
    assert!(dir_is_empty(&tmp.path().join("store/tmp")));
}

/// Sets a file's mtime to the past without extra dependencies.
fn filetime_touch(path: &Path) {
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_modified(std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000))
        .unwrap();
}

#[test]
fn names_and_digests_are_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let tree = tmp.path().join("tree");
    make_tree(&tree);
    let long = "x".repeat(65);
    for bad in ["", "a/b", "..", ".", "sp ace", long.as_str()] {
        let err = store.add_dir(bad, &tree).unwrap_err();
        assert!(
            matches!(err, ImageError::InvalidName { .. }),
            "{bad:?}: {err}"
        );
        assert!(err.to_string().contains("not an image name"), "{err}");
    }
    assert!(store.add_dir("debian:12.5_x-y", &tree).is_ok());
    for bad in [
        "",
        "sha256:",
        "md5:00",
        &format!("sha256:{}", "A".repeat(64)),
        &format!("sha256:{}/x", "a".repeat(62)),
    ] {
        assert!(
            matches!(store.blob_path(bad), Err(ImageError::InvalidDigest { .. })),
            "{bad}"
        );
    }
    let ok = format!("sha256:{}", "0a".repeat(32));
    assert_eq!(
        store.blob_path(&ok).unwrap(),
        tmp.path()
            .join(format!("blobs/sha256/{}.tar", "0a".repeat(32)))
    );
    let err = store.get("absent").unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }));
    assert!(err.to_string().contains("'absent'"), "{err}");
    let err = store.add_dir("file", &tree.join("etc/motd")).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
    let err = store.add_dir("itself", tmp.path()).unwrap_err();
    assert!(err.to_string().contains("holds the image store"), "{err}");
}

#[test]
fn build_busybox_makes_a_bootable_tree() {
    if !busybox_is_static() {
        println!("skipped: no static busybox (apt-get install busybox-static)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    let entry = store.build_busybox("busybox").unwrap();
    assert_eq!(store.get("busybox").unwrap(), entry);
    let entries = entries_of(&store.blob_path(&entry.digest).unwrap());
    let find = |name: &str| entries.iter().find(|e| e.0 == name).cloned();
    let busybox = find("bin/busybox").expect("bin/busybox");
    assert_eq!(busybox.1, tar::EntryType::Regular);
    assert_eq!(busybox.3, 0o755);
    let sh = find("bin/sh").expect("bin/sh");
    assert_eq!(sh.1, tar::EntryType::Symlink);
    assert_eq!(sh.2.as_deref(), Some("busybox"));
    assert!(find("bin/ls").is_some());
    for dir in ["proc", "dev", "sys", "tmp", "work", "etc"] {
        assert_eq!(find(dir).expect(dir).1, tar::EntryType::Directory, "{dir}");
    }
    assert_eq!(find("tmp").unwrap().3, 0o1777);
    assert!(find("etc/passwd").is_some() && find("etc/group").is_some());
    // Deterministic: built again, same digest.
    assert_eq!(
        store.build_busybox("busybox-2").unwrap().digest,
        entry.digest
    );
    let mut archive =
        tar::Archive::new(fs::File::open(store.blob_path(&entry.digest).unwrap()).unwrap());
    let passwd = archive
        .entries()
        .unwrap()
        .map(Result::unwrap)
        .find(|e| &*e.path_bytes() == b"etc/passwd")
        .map(|mut e| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut e, &mut s).unwrap();
            s
        })
        .unwrap();
    assert!(passwd.contains("root:x:0:0:") && passwd.contains("nobody:x:65534:65534:"));
    assert!(dir_is_empty(&tmp.path().join("tmp")));
}

#[test]
fn elf_check_tells_static_from_dynamic() {
    // /bin/true (coreutils) is always dynamically linked on Debian.
    assert_eq!(
        super::store::elf_is_dynamic(Path::new("/bin/true")),
        Ok(true)
    );
    let tmp = tempfile::tempdir().unwrap();
    fs::write(tmp.path().join("x"), "#!/bin/sh\n").unwrap();
    assert!(super::store::elf_is_dynamic(&tmp.path().join("x")).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_fetches_unpacks_and_then_hits_without_the_store() {
    if !busybox_is_static() {
        println!("skipped: no static busybox (apt-get install busybox-static)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&tmp.path().join("store")).unwrap());
    let entry = store.build_busybox("busybox").unwrap();
    let server = serve(store.clone()).await;
    let cache_dir = tmp.path().join("cache");
    let cache = ImageCache::new(&cache_dir, Some(format!("{}/", server.url))).unwrap();

    let calls = AtomicU64::new(0);
    let last = AtomicU64::new(0);
    let progress = |done: u64, total: u64| {
        assert_eq!(total, entry.size_bytes);
        assert!(done >= last.load(Ordering::SeqCst) && done <= total);
        last.store(done, Ordering::SeqCst);
        calls.fetch_add(1, Ordering::SeqCst);
    };
    let first = cache.rootfs(&pinned(&entry), &progress).await.unwrap();
    assert!(!first.cache_hit);
    assert_eq!(first.entry, entry);
    assert_eq!(last.load(Ordering::SeqCst), entry.size_bytes);
    // About one call per MiB, plus start and end.
    let calls = calls.load(Ordering::SeqCst);
    assert!(
        calls >= 2 && calls <= entry.size_bytes / (1 << 20) + 3,
        "{calls} progress calls"
    );

    let rootfs = &first.rootfs;
    assert_eq!(
        *rootfs,
        cache_dir
            .join("rootfs")
            .join(&entry.digest["sha256:".len()..])
    );
    let busybox = rootfs.join("bin/busybox");
    let mode = fs::metadata(&busybox).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "bin/busybox is executable");
    assert_eq!(
        fs::read_link(rootfs.join("bin/sh")).unwrap(),
        PathBuf::from("busybox")
    );
    // The image's 1777 /tmp loses its sticky and write bits: the root is
    // read-only anyway, and jobs get a /tmp of their own.
    assert_eq!(
        fs::metadata(rootfs.join("tmp"))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o755
    );
    let mode_of = |path: &Path| fs::metadata(path).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode_of(&cache_dir), 0o700, "the cache is root's alone");
    assert_eq!(mode_of(&cache_dir.join("rootfs")), 0o700);
    assert_eq!(mode_of(&cache_dir.join("tmp")), 0o700);
    assert_eq!(mode_of(&cache_dir.join("index.json")), 0o600);
    assert_eq!(
        fs::metadata(rootfs).unwrap().permissions().mode() & 0o777,
        0o755
    );
    // A file just written may briefly be "busy" (ETXTBSY) while another
    // test thread forks with its descriptor; that passes once the child execs.
    let out = (0..100)
        .find_map(|_| {
            match std::process::Command::new(&busybox)
                .args(["echo", "booted"])
                .output()
            {
                Err(e) if e.raw_os_error() == Some(26) => {
                    std::thread::yield_now();
                    None
                }
                other => Some(other),
            }
        })
        .expect("busybox stayed busy")
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "booted\n");

    let second = cache.rootfs("busybox", &no_progress).await.unwrap();
    assert!(second.cache_hit);
    assert_eq!(second.rootfs, first.rootfs);
    assert_eq!(cache.cached().unwrap(), vec![entry.clone()]);

    let dead_url = server.url.clone();
    server.stop().await;
    let third = cache.rootfs("busybox", &no_progress).await.unwrap();
    assert!(third.cache_hit);
    // A new cache over the same directory (an agent restart) hits too.
    let restarted = ImageCache::new(&cache_dir, Some(dead_url.clone())).unwrap();
    assert!(
        restarted
            .rootfs("busybox", &no_progress)
            .await
            .unwrap()
            .cache_hit
    );
    // And without any store configured.
    let offline = ImageCache::new(&cache_dir, None).unwrap();
    assert!(
        offline
            .rootfs("busybox", &no_progress)
            .await
            .unwrap()
            .cache_hit
    );
    // A bare name not cached is never resolved here, store or not.
    let err = offline.rootfs("other", &no_progress).await.unwrap_err();
    assert!(matches!(err, ImageError::NotPinned { .. }), "{err}");
    let other = format!("other@sha256:{}", "0".repeat(64));
    let err = offline.rootfs(&other, &no_progress).await.unwrap_err();
    assert!(matches!(err, ImageError::NoStore { .. }), "{err}");

    // An empty cache with the store down says so.
    let cold = ImageCache::new(&tmp.path().join("cold"), Some(dead_url.clone())).unwrap();
    let err = cold.rootfs("busybox", &no_progress).await.unwrap_err();
    assert!(matches!(err, ImageError::NotPinned { .. }), "{err}");
    let err = cold
        .rootfs(&pinned(&entry), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::Unreachable { .. }), "{err}");
    assert!(
        err.to_string().contains("cannot reach the image store"),
        "{err}"
    );
    assert!(dir_is_empty(&cache_dir.join("tmp")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_fetches_of_one_image_agree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&tmp.path().join("store")).unwrap());
    make_tree(&tmp.path().join("tree"));
    let tree = pinned(&store.add_dir("tree", &tmp.path().join("tree")).unwrap());
    let alias = pinned(
        &store
            .add_dir("tree-alias", &tmp.path().join("tree"))
            .unwrap(),
    );
    let server = serve(store.clone()).await;
    let cache_dir = tmp.path().join("cache");

    // Tasks of one process share a per-digest lock: exactly one downloads.
    let cache = ImageCache::new(&cache_dir, Some(server.url.clone())).unwrap();
    let (a, b, c) = tokio::join!(
        cache.rootfs(&tree, &no_progress),
        cache.rootfs(&tree, &no_progress),
        cache.rootfs(&alias, &no_progress),
    );
    let (a, b, c) = (a.unwrap(), b.unwrap(), c.unwrap());
    assert_eq!(a.rootfs, b.rootfs);
    assert_eq!(a.rootfs, c.rootfs);
    assert_eq!(
        [a.cache_hit, b.cache_hit, c.cache_hit]
            .iter()
            .filter(|h| !**h)
            .count(),
        1
    );

    // Two caches over one directory (two processes): the first rename wins
    // and the other copy is dropped.
    let other_dir = tmp.path().join("cache2");
    let one = ImageCache::new(&other_dir, Some(server.url.clone())).unwrap();
    let two = ImageCache::new(&other_dir, Some(server.url.clone())).unwrap();
    let (x, y) = tokio::join!(
        one.rootfs(&tree, &no_progress),
        two.rootfs(&tree, &no_progress)
    );
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.rootfs, y.rootfs);
    assert_eq!(
        fs::read_to_string(x.rootfs.join("etc/motd")).unwrap(),
        "welcome\n"
    );
    assert_eq!(fs::read_dir(other_dir.join("rootfs")).unwrap().count(), 1);
    assert!(dir_is_empty(&other_dir.join("tmp")));
    assert!(dir_is_empty(&cache_dir.join("tmp")));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_blob_is_refused_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&tmp.path().join("store")).unwrap());
    make_tree(&tmp.path().join("tree"));
    let entry = store.add_dir("tree", &tmp.path().join("tree")).unwrap();
    let blob = store.blob_path(&entry.digest).unwrap();
    let mut bytes = fs::read(&blob).unwrap();
    let good = bytes.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&blob, &bytes).unwrap();

    let server = serve(store.clone()).await;
    let cache_dir = tmp.path().join("cache");
    let cache = ImageCache::new(&cache_dir, Some(server.url.clone())).unwrap();
    let err = cache
        .rootfs(&pinned(&entry), &no_progress)
        .await
        .unwrap_err();
    match &err {
        ImageError::DigestMismatch { expected, actual } => {
            assert_eq!(*expected, entry.digest);
            assert_ne!(*actual, entry.digest);
            assert!(actual.starts_with("sha256:"));
        }
        other => panic!("expected a digest mismatch, got {other}"),
    }
    assert!(
        err.to_string().contains("add the image to the store again"),
        "{err}"
    );
    assert!(dir_is_empty(&cache_dir.join("rootfs")));
    assert!(dir_is_empty(&cache_dir.join("tmp")));
    assert!(cache.cached().unwrap().is_empty());

    // A blob of another size is refused as well.
    bytes.extend_from_slice(&[0u8; 512]);
    fs::write(&blob, &bytes).unwrap();
    let err = cache
        .rootfs(&pinned(&entry), &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::DigestMismatch { .. }), "{err}");
    assert!(dir_is_empty(&cache_dir.join("rootfs")));
    assert!(dir_is_empty(&cache_dir.join("tmp")));

    // Repaired on the store, the same cache fetches it.
    fs::write(&blob, &good).unwrap();
    let ok = cache.rootfs(&pinned(&entry), &no_progress).await.unwrap();
    assert!(!ok.cache_hit);
    assert!(ok.rootfs.join("bin/hello").is_file());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_images_and_the_http_surface() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Arc::new(ImageStore::open(&tmp.path().join("store")).unwrap());
    make_tree(&tmp.path().join("tree"));
    let entry = store.add_dir("tree", &tmp.path().join("tree")).unwrap();
    let server = serve(store.clone()).await;
    let cache = ImageCache::new(&tmp.path().join("cache"), Some(server.url.clone())).unwrap();

    let err = cache.resolve("no-such-image").await.unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    let message = err.to_string();
    assert!(message.contains("'no-such-image'"), "{message}");
    assert!(message.contains(&server.url), "{message}");
    let unknown_digest = format!("tree@sha256:{}", "0".repeat(64));
    let err = cache
        .rootfs(&unknown_digest, &no_progress)
        .await
        .unwrap_err();
    assert!(matches!(err, ImageError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(&unknown_digest), "{err}");
    assert_eq!(cache.resolve("tree").await.unwrap(), entry);
    let err = cache.rootfs("bad/name", &no_progress).await.unwrap_err();
    assert!(matches!(err, ImageError::InvalidName { .. }), "{err}");

    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", server.url)).send();

    let list: serde_json::Value = get("/v1/images").await.unwrap().json().await.unwrap();
    assert_eq!(list["images"][0]["name"], "tree");
    assert_eq!(list["images"][0]["digest"], entry.digest.as_str());

    let one = get("/v1/images/tree").await.unwrap();
    assert_eq!(one.status(), 200);
    assert_eq!(one.json::<ImageEntry>().await.unwrap(), entry);

    let missing = get("/v1/images/nope").await.unwrap();
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(body["error"]["code"], "image_not_found");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("'nope'"));

    let blob = get(&format!("/v1/blobs/{}", entry.digest)).await.unwrap();
    assert_eq!(blob.status(), 200);
    assert_eq!(blob.content_length(), Some(entry.size_bytes));
    assert_eq!(blob.headers()["content-type"], "application/x-tar");
    let bytes = blob.bytes().await.unwrap();
    assert_eq!(
        bytes.as_ref(),
        fs::read(store.blob_path(&entry.digest).unwrap()).unwrap()
    );

    let absent = get(&format!("/v1/blobs/sha256:{}", "0".repeat(64)))
        .await
        .unwrap();
    assert_eq!(absent.status(), 404);
    let body: serde_json::Value = absent.json().await.unwrap();
    assert_eq!(body["error"]["code"], "blob_not_found");

    let malformed = get("/v1/blobs/sha256:nothex").await.unwrap();
    assert_eq!(malformed.status(), 400);
    let body: serde_json::Value = malformed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_digest");
    server.stop().await;
}

#[test]
fn add_tarball_stores_a_tar_as_given_and_refuses_escapes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(&tmp.path().join("store")).unwrap();

    // A good tar is stored byte for byte.
    let good = raw_tar(&[
        ("bin/", tar::EntryType::Directory, b"", ""),
        ("bin/tool", tar::EntryType::Regular, b"data", ""),
        ("bin/link", tar::EntryType::Link, b"", "bin/tool"),
    ]);
    let good_path = tmp.path().join("good.tar");
    fs::write(&good_path, &good).unwrap();
    let entry = store.add_tarball("good", &good_path).unwrap();
    assert_eq!(entry.size_bytes, good.len() as u64);
    assert_eq!(
        fs::read(store.blob_path(&entry.digest).unwrap()).unwrap(),
        good
    );

    let cases: [(&str, Vec<u8>); 4] = [
        (
            "dotdot",
            raw_tar(&[("../escape", tar::EntryType::Regular, b"x", "")]),
        ),
        (
            "inner-dotdot",
            raw_tar(&[("a/../../escape", tar::EntryType::Regular, b"x", "")]),
        ),
        (
            "absolute",
            raw_tar(&[("/etc/evil", tar::EntryType::Regular, b"x", "")]),
        ),
        (
            "hardlink-out",
            raw_tar(&[("h", tar::EntryType::Link, b"", "../../etc/shadow")]),
        ),
    ];
    for (name, bytes) in cases {
        let path = tmp.path().join(format!("{name}.tar"));
        fs::write(&path, bytes).unwrap();
        let err = store.add_tarball(name, &path).unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafeEntry { .. }),
            "{name}: {err}"
        );
        assert!(err.to_string().starts_with("refusing "), "{err}");
    }

    // Not a tar at all, compressed, or empty.
    let junk = tmp.path().join("junk.tar");
    fs::write(&junk, vec![b'j'; 2048]).unwrap();
    let err = store.add_tarball("junk", &junk).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    let gz = tmp.path().join("x.tar.gz");
    fs::write(&gz, [0x1f, 0x8b, 8, 0, 0, 0, 0, 0]).unwrap();
    let err = store.add_tarball("gz", &gz).unwrap_err();
    assert!(err.to_string().contains("gzip"), "{err}");
    let empty = tmp.path().join("empty.tar");
    fs::write(&empty, vec![0u8; 1024]).unwrap();
    assert!(matches!(
        store.add_tarball("empty", &empty),
        Err(ImageError::Corrupt { .. })
    ));

    let names: Vec<String> = store.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["good"]);
    assert!(dir_is_empty(&tmp.path().join("store/tmp")));
    assert_eq!(
        fs::read_dir(tmp.path().join("store/blobs/sha256"))
            .unwrap()
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpacking_refuses_what_a_hostile_store_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Arc::new(ImageStore::open(&root).unwrap());
    let outside = tmp.path().join("outside");
    fs::create_dir(&outside).unwrap();

    let dotdot = raw_tar(&[
        ("ok", tar::EntryType::Regular, b"fine", ""),
        ("../escape", tar::EntryType::Regular, b"x", ""),
    ]);
    let mut references = vec![pinned(&inject(&store, &root, "dotdot", &dotdot))];
    let through_symlink = raw_tar(&[
        (
            "link",
            tar::EntryType::Symlink,
            b"",
            outside.to_str().unwrap(),
        ),
        ("link/planted", tar::EntryType::Regular, b"x", ""),
    ]);
    references.push(pinned(&inject(&store, &root, "symlink", &through_symlink)));
    let absolute = raw_tar(&[("/abs", tar::EntryType::Regular, b"x", "")]);
    references.push(pinned(&inject(&store, &root, "absolute", &absolute)));
    let device = raw_tar(&[
        ("dev/sda", tar::EntryType::Block, b"", ""),
        ("file", tar::EntryType::Regular, b"kept", ""),
    ]);
    let device = pinned(&inject(&store, &root, "device", &device));

    let server = serve(store.clone()).await;
    let cache_dir = tmp.path().join("cache");
    let cache = ImageCache::new(&cache_dir, Some(server.url.clone())).unwrap();
    for name in &references {
        let err = cache.rootfs(name, &no_progress).await.unwrap_err();
        assert!(
            matches!(err, ImageError::UnsafeEntry { .. }),
            "{name}: {err}"
        );
        assert!(dir_is_empty(&cache_dir.join("rootfs")), "{name}");
        assert!(dir_is_empty(&cache_dir.join("tmp")), "{name}");
    }
    assert!(!cache_dir.join("escape").exists());
    assert!(!tmp.path().join("escape").exists());
    assert!(
        dir_is_empty(&outside),
        "nothing was planted through the symlink"
    );
    assert!(cache.cached().unwrap().is_empty());

    // Device nodes are skipped, the rest unpacks.
    let image = cache.rootfs(&device, &no_progress).await.unwrap();
    assert!(!image.rootfs.join("dev/sda").exists());
    assert_eq!(
        fs::read_to_string(image.rootfs.join("file")).unwrap(),
        "kept"
    );
    server.stop().await;
}

#[test]
fn index_reads_are_bounded_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let store = ImageStore::open(tmp.path()).unwrap();
    fs::write(tmp.path().join("index.json"), "{not json").unwrap();
    let err = store.list().unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    let big = fs::File::create(tmp.path().join("index.json")).unwrap();
    big.set_len(crate::MAX_INDEX_BYTES + 1).unwrap();
    assert!(matches!(store.list(), Err(ImageError::TooLarge { .. })));
    let future = IndexFile {
        version: 99,
        ..IndexFile::default()
    };
    fsutil::write_index(&tmp.path().join("index.json"), &future, 0o644).unwrap();
    let err = store.list().unwrap_err();
    assert!(err.to_string().contains("version 99"), "{err}");
}

/// A tar of entries with the given modes, written header by header so that
/// it can hold set-id bits, device nodes and fifos.
fn tar_with_modes(entries: &[(&str, tar::EntryType, u32, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, mode, data) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(*mode);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mtime(0);
        if kind.is_character_special() || kind.is_block_special() {
            header.set_device_major(1).unwrap();
            header.set_device_minor(3).unwrap();
        }
        builder.append_data(&mut header, name, *data).unwrap();
    }
    builder.into_inner().unwrap()
}

/// The tree an attacker's image would leave in the cache.
fn hostile_modes_tar() -> Vec<u8> {
    tar_with_modes(&[
        ("bin/", tar::EntryType::Directory, 0o755, b""),
        (
            "bin/rootshell",
            tar::EntryType::Regular,
            0o4755,
            b"#!/bin/sh\n",
        ),
        (
            "bin/groupshell",
            tar::EntryType::Regular,
            0o2755,
            b"#!/bin/sh\n",
        ),
        ("bin/scribble", tar::EntryType::Regular, 0o666, b"data"),
        ("drop/", tar::EntryType::Directory, 0o1777, b""),
        ("open/", tar::EntryType::Directory, 0o777, b""),
        ("secret", tar::EntryType::Regular, 0o600, b"kept private"),
        ("dev/", tar::EntryType::Directory, 0o755, b""),
        ("dev/mem", tar::EntryType::Char, 0o666, b""),
        ("dev/sda", tar::EntryType::Block, 0o660, b""),
        ("dev/pipe", tar::EntryType::Fifo, 0o666, b""),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpacking_strips_set_id_bits_world_write_and_device_nodes() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Arc::new(ImageStore::open(&root).unwrap());
    let entry = inject(&store, &root, "hostile", &hostile_modes_tar());
    let server = serve(store.clone()).await;
    let cache = ImageCache::new(&tmp.path().join("cache"), Some(server.url.clone())).unwrap();
    let image = cache.rootfs(&pinned(&entry), &no_progress).await.unwrap();
    let mode_of = |rel: &str| {
        fs::symlink_metadata(image.rootfs.join(rel))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode_of("bin/rootshell"), 0o755, "setuid stripped");
    assert_eq!(mode_of("bin/groupshell"), 0o755, "setgid stripped");
    assert_eq!(mode_of("bin/scribble"), 0o644, "group/other write stripped");
    assert_eq!(mode_of("drop"), 0o755, "sticky and world write stripped");
    assert_eq!(mode_of("open"), 0o755, "world write stripped");
    assert_eq!(mode_of("secret"), 0o600, "read bits are the image's own");
    for node in ["dev/mem", "dev/sda", "dev/pipe"] {
        assert!(
            fs::symlink_metadata(image.rootfs.join(node)).is_err(),
            "{node} was not skipped"
        );
    }
    // Nothing anywhere in the tree keeps a set-id bit or world write.
    let mut pending = vec![image.rootfs.clone()];
    while let Some(dir) = pending.pop() {
        for child in fs::read_dir(&dir).unwrap() {
            let path = child.unwrap().path();
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode();
            assert_eq!(mode & 0o7022, 0, "{} has mode {mode:o}", path.display());
            if meta.is_dir() {
                pending.push(path);
            }
        }
    }
    server.stop().await;
}

/// Runs `program args` as `nobody` (uid and gid 65534, no supplementary groups).
fn run_as_nobody(program: &str, args: &[&Path]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new(program)
        .args(args)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nobody_cannot_traverse_the_cache_to_reach_an_image() {
    if !fsutil::is_root() {
        println!("skipped: needs root to run a command as nobody");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // The temp dir is 0700 itself: open it so that the cache is the only barrier.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let root = tmp.path().join("store");
    let store = Arc::new(ImageStore::open(&root).unwrap());
    let entry = inject(&store, &root, "hostile", &hostile_modes_tar());
    let server = serve(store.clone()).await;
    let cache_dir = tmp.path().join("cache");
    // A cache made 0755 by an older build is closed when the agent opens it.
    fs::create_dir(&cache_dir).unwrap();
    fs::set_permissions(&cache_dir, fs::Permissions::from_mode(0o755)).unwrap();
    let cache = ImageCache::new(&cache_dir, Some(server.url.clone())).unwrap();
    let image = cache.rootfs(&pinned(&entry), &no_progress).await.unwrap();

    // Control: nobody can list the directory holding the cache.
    let control = run_as_nobody("ls", &[tmp.path()]);
    assert!(control.status.success(), "{control:?}");
    // The attack: reach the image's binary through the cache, or list it.
    let rootshell = image.rootfs.join("bin/rootshell");
    for (program, path) in [
        ("ls", cache_dir.as_path()),
        ("ls", image.rootfs.as_path()),
        ("cat", rootshell.as_path()),
        ("stat", rootshell.as_path()),
    ] {
        let out = run_as_nobody(program, &[path]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{program} {}: {out:?}",
            path.display()
        );
        assert!(
            stderr.contains("Permission denied"),
            "{program} {}: {stderr}",
            path.display()
        );
    }
    server.stop().await;
}

/// The fuzz target's hostile seeds, as a test: a hard link made through a
/// symlink that leaves the image, then a write to it, must not reach the
/// file outside; nor may a directory entry over such a symlink chmod (or,
/// as root, chown) the directory outside.
#[test]
fn unpack_tar_into_never_reaches_outside_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside.txt");
    fs::write(&outside, "original").unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let hard_link = raw_tar(&[
        ("up", tar::EntryType::Symlink, b"", ".."),
        ("h", tar::EntryType::Link, b"", "up/outside.txt"),
    ]);
    let hard_link_then_write = raw_tar(&[
        ("up", tar::EntryType::Symlink, b"", ".."),
        ("h", tar::EntryType::Link, b"", "up/outside.txt"),
        ("h", tar::EntryType::Regular, b"pwned", ""),
    ]);
    let directory_over_symlink = raw_tar(&[
        ("up", tar::EntryType::Symlink, b"", ".."),
        ("up", tar::EntryType::Directory, b"", ""),
    ]);
    for (name, tar) in [
        ("hard link", hard_link),
        ("hard link then write", hard_link_then_write),
        ("directory over symlink", directory_over_symlink),
    ] {
        let image = tmp.path().join("image");
        fs::create_dir(&image).unwrap();
        let result = crate::unpack_tar_into(&tar[..], &image);
        assert!(result.is_err(), "{name}: unpacked");
        // Checked before the image is removed: a hard link from inside
        // raises the link count only while it exists.
        let meta = fs::metadata(&outside).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::nlink(&meta), 1, "{name}");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "original", "{name}");
        fs::remove_dir_all(&image).unwrap();
        let mode = fs::metadata(tmp.path()).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{name}: the directory outside was chmodded");
    }
}

const UMASK_CHILD_ENV: &str = "LEASEHOLD_IMAGES_TEST_UMASK_ZERO_CHILD";

/// Found by the `image_unpack` fuzz target run with umask 0: directories a
/// tar names only as parents of its entries were made by the unpacker with
/// the process's umask, so a permissive umask left them world-writable. The
/// umask is process-wide, so the unpacking runs in a child process (this
/// same test, re-run with `UMASK_CHILD_ENV` set).
#[test]
#[allow(unsafe_code)]
fn implicit_parent_directories_are_not_writable_by_others_whatever_the_umask() {
    if let Some(umask) = std::env::var_os(UMASK_CHILD_ENV) {
        let umask = u32::from_str_radix(&umask.to_string_lossy(), 8).unwrap();
        // SAFETY: umask only sets this (child) process's file mode mask.
        unsafe { libc::umask(umask as libc::mode_t) };
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join("image");
        fs::create_dir(&image).unwrap();
        let tar = raw_tar(&[("deep/implicit/file", tar::EntryType::Regular, b"x", "")]);
        crate::unpack_tar_into(&tar[..], &image).unwrap();
        // Neither world-writable (umask 0) nor shut to the job's user
        // (the agent's umask 077): 0755, as OCI image tools make them.
        for dir in ["deep", "deep/implicit"] {
            let mode = fs::metadata(image.join(dir)).unwrap().permissions().mode() & 0o7777;
            assert_eq!(mode, 0o755, "{dir} has mode {mode:o} under umask {umask:o}");
        }
        return;
    }
    for umask in ["0", "077"] {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::implicit_parent_directories_are_not_writable_by_others_whatever_the_umask",
                "--test-threads=1",
            ])
            .env(UMASK_CHILD_ENV, umask)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "the child (umask {umask}) failed:\n{text}"
        );
        assert!(text.contains("1 passed"), "the child ran no test:\n{text}");
    }
}

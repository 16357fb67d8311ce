//! End-to-end tests of `leasehold images pull` (a separate `leasehold images
//! serve` process, downloads into an agent's image cache) and of `leasehold
//! man`: their output for scripts stays clean, with no progress drawn into
//! it. No root needed: nothing boots.

mod common;

use common::{cli, spawn_ready};

/// `leasehold` with no broker needed.
fn local(args: &[&str]) -> common::CliOutput {
    cli("http://127.0.0.1:1", None, args)
}

/// Adds a one-file image `tiny` to a store in `dir` and serves it: the
/// serving process and the store's URL.
fn serve_tiny_store(dir: &std::path::Path) -> (common::Proc, String) {
    let rootfs = dir.join("tiny-rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/motd"), "tiny\n").unwrap();
    let store = dir.join("store").display().to_string();
    let rootfs_text = rootfs.display().to_string();
    let added = local(&["images", "add", "tiny", &rootfs_text, "--store", &store]);
    assert_eq!(added.code, 0, "{}", added.stderr);
    let serve = spawn_ready(
        &[
            "images",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
            "--output",
            "json",
        ],
        &dir.join("store.log"),
    );
    let url = serve.ready["image_store_url"].as_str().unwrap().to_string();
    (serve, url)
}

#[test]
fn pull_downloads_an_image_into_the_cache_and_prints_clean_json() {
    let scratch = tempfile::tempdir().unwrap();
    let (_store, url) = serve_tiny_store(scratch.path());
    let cache = scratch.path().join("agent-cache").display().to_string();
    let pull = [
        "images",
        "pull",
        "tiny",
        "--image-store",
        &url,
        "--cache",
        &cache,
    ];
    let first = local(&[&pull[..], &["--output", "json"]].concat());
    assert_eq!(first.code, 0, "{}", first.stderr);
    // The whole of stdout is one JSON document: no bar leaked into it.
    let pulled = first.json();
    assert_eq!(pulled["name"], "tiny");
    assert_eq!(pulled["cache_hit"], false);
    assert!(!first.stderr.contains('\u{1b}'), "{:?}", first.stderr);
    let rootfs = std::path::PathBuf::from(pulled["rootfs"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(rootfs.join("etc/motd")).unwrap(),
        "tiny\n"
    );
    let digest = pulled["digest"].as_str().unwrap();
    assert!(rootfs.ends_with(digest.trim_start_matches("sha256:")));

    // A second pull, pinned by digest, finds it unpacked and downloads nothing.
    let pinned = format!("tiny@{digest}");
    let again = local(&[
        "images",
        "pull",
        &pinned,
        "--image-store",
        &url,
        "--cache",
        &cache,
    ]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stdout.starts_with("already cached tiny"),
        "{}",
        again.stdout
    );
    assert!(!again.stderr.contains('\u{1b}'), "{:?}", again.stderr);
}

#[test]
fn pull_names_an_image_the_store_lacks_and_a_bad_store_url() {
    let scratch = tempfile::tempdir().unwrap();
    let (_store, url) = serve_tiny_store(scratch.path());
    let cache = scratch.path().join("cache").display().to_string();
    let missing = local(&[
        "images",
        "pull",
        "nope",
        "--image-store",
        &url,
        "--cache",
        &cache,
    ]);
    assert_eq!(missing.code, 1);
    assert!(
        missing
            .stderr
            .contains("image 'nope' is not in the image store"),
        "{}",
        missing.stderr
    );
    let bad_url = local(&[
        "images",
        "pull",
        "tiny",
        "--image-store",
        "ftp://x",
        "--cache",
        &cache,
    ]);
    assert_ne!(bad_url.code, 0);
    assert!(
        bad_url.stderr.contains("--image-store"),
        "{}",
        bad_url.stderr
    );
}

#[test]
fn man_prints_the_page_and_writes_one_per_command() {
    let page = local(&["man"]);
    assert_eq!(page.code, 0, "{}", page.stderr);
    assert!(page.stdout.contains(".TH leasehold 1"), "{}", page.stdout);
    assert!(page.stdout.contains("leasehold\\-lease(1)"));

    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("man1");
    let dir_text = dir.display().to_string();
    let written = local(&["man", "--dir", &dir_text, "--output", "json"]);
    assert_eq!(written.code, 0, "{}", written.stderr);
    let pages = written.json()["pages"].as_array().unwrap().len();
    assert!(pages > 20, "only {pages} pages");
    let lease_page = std::fs::read_to_string(dir.join("leasehold-lease.1")).unwrap();
    assert!(lease_page.contains(".TH leasehold-lease 1"), "{lease_page}");
}

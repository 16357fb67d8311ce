//! End-to-end tests of image pinning at the broker: separate processes for
//! the image store (`leasehold images serve`) and the broker (`leasehold
//! broker --image-store`). No root needed: nothing boots.

mod common;

use common::{cli, spawn_ready, terms, Cluster};
use leasehold_api::types::RegisterHostRequest;
use leasehold_api::{ApiError, Client};
use leasehold_core::HostCapacity;

/// Builds a one-file image `tiny` in a store under the cluster's directory
/// and serves it; the serving process, the store's URL and tiny's digest.
fn serve_tiny_store(dir: &std::path::Path) -> (common::Proc, String, String) {
    let rootfs = dir.join("tiny-rootfs");
    std::fs::create_dir_all(rootfs.join("etc")).unwrap();
    std::fs::write(rootfs.join("etc/motd"), "tiny\n").unwrap();
    let store = dir.join("store").display().to_string();
    let rootfs_text = rootfs.display().to_string();
    let added = cli(
        "http://127.0.0.1:1",
        None,
        &[
            "images",
            "add",
            "tiny",
            &rootfs_text,
            "--store",
            &store,
            "--output",
            "json",
        ],
    );
    assert_eq!(added.code, 0, "{}", added.stderr);
    let digest = added.json()["digest"].as_str().unwrap().to_string();
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
    (serve, url, digest)
}

async fn register_host(lender: &Client, host_id: &str) {
    let capacity = HostCapacity {
        cpu_centicores: 800,
        memory_mib: 8192,
        disk_gib: 100,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    };
    let request = RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity,
    };
    lender.register_host(host_id, &request).await.unwrap();
}

fn refused_field(error: &ApiError) -> (Option<u16>, Option<&str>, &str) {
    let detail = error.detail();
    (
        error.status(),
        detail.and_then(|d| d.field.as_deref()),
        detail.map_or("", |d| d.message.as_str()),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_broker_pins_images_to_the_stores_digests_and_refuses_unknown_ones() {
    let scratch = tempfile::tempdir().unwrap();
    let (_serve, store_url, digest) = serve_tiny_store(scratch.path());
    let cluster = Cluster::start(&["--image-store", &store_url]).await;
    let lender = cluster.lender();
    register_host(&lender, "h1").await;
    let put = |index: u32, image: &str| {
        let lender = lender.clone();
        let mut terms = terms(1, 128, image, 1000);
        // As an oci agent would state it, so borrowers find it unasked.
        terms.isolation = Some(leasehold_core::Isolation::Container);
        let request = leasehold_api::types::RegisterPartitionRequest { terms };
        async move { lender.register_partition("h1", index, &request).await }
    };

    // The attack of the issue: terms naming an image the store does not
    // have used to be sold, leased, and fail only when the job booted.
    let error = put(1, "no-such-image").await.unwrap_err();
    let (status, field, message) = refused_field(&error);
    assert_eq!(status, Some(400), "{error}");
    assert_eq!(field, Some("terms.images[0]"));
    assert!(message.contains("no-such-image"), "{message}");
    // A digest the store does not hold is refused too, even under a known name.
    let forged = format!("tiny@sha256:{}", "0".repeat(64));
    let error = put(1, &forged).await.unwrap_err();
    let (status, field, message) = refused_field(&error);
    assert_eq!(
        (status, field),
        (Some(400), Some("terms.images[0]")),
        "{error}"
    );
    assert!(message.contains("no blob"), "{message}");
    let error = put(1, "tiny@md5:abc").await.unwrap_err();
    assert_eq!(refused_field(&error).1, Some("terms.images[0]"), "{error}");
    assert!(lender.list_partitions().await.unwrap().is_empty());

    // A bare known name is stored pinned; a pinned known digest as given.
    let pinned = format!("tiny@{digest}");
    let view = put(1, "tiny").await.unwrap();
    assert_eq!(view.terms.images, vec![pinned.clone()]);
    let view = put(2, &pinned).await.unwrap();
    assert_eq!(view.terms.images, vec![pinned.clone()]);

    // Borrowers see the digest, and may ask by name or by digest.
    let (token, _) = cluster.borrower("bob").await;
    for wanted in ["tiny", pinned.as_str()] {
        let found = cli(
            &cluster.broker_url,
            Some(&token),
            &["find", "--image", wanted, "--output", "json"],
        );
        assert_eq!(found.code, 0, "{}", found.stderr);
        let text = found.stdout.clone();
        assert!(text.contains(&pinned), "find --image {wanted}: {text}");
        assert_eq!(
            found.json()["offers"].as_array().map(Vec::len),
            Some(2),
            "{text}"
        );
    }
    let other_digest = format!("tiny@sha256:{}", "1".repeat(64));
    let found = cli(
        &cluster.broker_url,
        Some(&token),
        &["find", "--image", &other_digest],
    );
    assert_ne!(found.code, 0, "another digest of tiny is offered by nobody");
    assert!(found.stderr.contains("unknown image"), "{}", found.stderr);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_whose_store_is_down_refuses_with_a_gateway_error_and_stores_nothing() {
    let scratch = tempfile::tempdir().unwrap();
    let (serve, store_url, _) = serve_tiny_store(scratch.path());
    let cluster = Cluster::start(&["--image-store", &store_url]).await;
    drop(serve); // the store process is killed
    let lender = cluster.lender();
    register_host(&lender, "h1").await;
    let request = leasehold_api::types::RegisterPartitionRequest {
        terms: terms(1, 128, "tiny", 1000),
    };
    let error = lender
        .register_partition("h1", 1, &request)
        .await
        .unwrap_err();
    assert_eq!(error.status(), Some(502), "{error}");
    assert!(lender.list_partitions().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_without_an_image_store_keeps_images_as_given() {
    let cluster = Cluster::start(&[]).await;
    let lender = cluster.lender();
    register_host(&lender, "h1").await;
    let request = leasehold_api::types::RegisterPartitionRequest {
        terms: terms(1, 128, "debian-12", 1000),
    };
    let view = lender.register_partition("h1", 1, &request).await.unwrap();
    assert_eq!(view.terms.images, vec!["debian-12".to_string()]);
}

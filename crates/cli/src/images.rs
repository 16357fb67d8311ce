//! `leasehold images`: the content-addressed image store (seed 000,
//! FIG. 16), on this machine or served to agents over HTTP.

use crate::{parse_listen, progress, Global, OutputFormat};
use anyhow::{Context, Result};
use clap::Subcommand;
use leasehold_images::ImageStore;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn default_store_dir() -> PathBuf {
    crate::default_data_dir().join("images")
}

#[derive(Subcommand)]
pub enum ImagesCommand {
    /// Build a known image: `busybox` makes a tiny root filesystem from
    /// Debian's busybox-static (`oci` driver); `debian-vm` an OS image for
    /// the `vm` driver: Debian's kernel (apt-get download + dpkg-deb -x, not
    /// installed) and an initramfs with busybox-static.
    Build {
        /// The image to build.
        #[arg(value_parser = ["busybox", "debian-vm"])]
        recipe: String,
        /// The name to store it under (default: the recipe's name).
        #[arg(long)]
        name: Option<String>,
        /// With `debian-vm`: the kernel package (.deb) to use instead of
        /// downloading the one `linux-image-amd64` depends on.
        #[arg(long)]
        kernel_deb: Option<PathBuf>,
        #[arg(long, default_value_os_t = default_store_dir())]
        store: PathBuf,
    },
    /// Add a root filesystem from a directory or an uncompressed tarball.
    Add {
        name: String,
        path: PathBuf,
        #[arg(long, default_value_os_t = default_store_dir())]
        store: PathBuf,
    },
    /// List images: names, digests and sizes.
    List {
        #[arg(long, default_value_os_t = default_store_dir())]
        store: PathBuf,
    },
    /// Download an image from an image store into an agent's image cache
    /// and unpack it there (by digest, checked), so that the agent's first
    /// lease does not wait for it. A bare name is pinned to the store's
    /// current digest first.
    Pull {
        /// `name` or `name@sha256:<hex>`.
        reference: String,
        /// The image store to download from (`leasehold images serve`).
        #[arg(long, env = "LEASEHOLD_IMAGE_STORE")]
        image_store: String,
        /// The agent's image cache (`DATA_DIR/image-cache` of `leasehold agent`).
        #[arg(long, default_value_os_t = crate::default_data_dir().join("agent").join("image-cache"))]
        cache: PathBuf,
    },
    /// Serve the store over HTTP to agents (`--image-store URL`).
    Serve {
        #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7072")]
        listen: SocketAddr,
        #[arg(long, default_value_os_t = default_store_dir())]
        store: PathBuf,
        #[command(flatten)]
        tls: crate::serve::TlsArgs,
    },
}

fn open(store: &Path) -> Result<ImageStore> {
    ImageStore::open(store)
        .with_context(|| format!("failed to open the image store at {}", store.display()))
}

fn print_entry(global: &Global, verb: &str, entry: &leasehold_images::ImageEntry) {
    if global.output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::to_string(entry).expect("entries serialize")
        );
    } else {
        println!(
            "{verb} {}  {}  {} bytes",
            entry.name, entry.digest, entry.size_bytes
        );
    }
}

pub async fn images(global: &Global, command: ImagesCommand) -> Result<i32> {
    match command {
        ImagesCommand::Build {
            recipe,
            name,
            kernel_deb,
            store,
        } => {
            let name = name.unwrap_or_else(|| recipe.clone());
            let spinner = progress::spinner(global, format!("building image '{name}'"));
            let store = open(&store)?;
            let built = match recipe.as_str() {
                "debian-vm" => store.build_vm_debian(&name, kernel_deb.as_deref()),
                _ => store.build_busybox(&name),
            };
            spinner.finish_and_clear();
            let entry = built.with_context(|| format!("failed to build image '{name}'"))?;
            print_entry(global, "built", &entry);
        }
        ImagesCommand::Add { name, path, store } => {
            let store = open(&store)?;
            let spinner = progress::spinner(global, format!("adding image '{name}'"));
            let added = if path.is_dir() {
                store.add_dir(&name, &path)
            } else {
                store.add_tarball(&name, &path)
            };
            spinner.finish_and_clear();
            let entry = added
                .with_context(|| format!("failed to add image '{name}' from {}", path.display()))?;
            print_entry(global, "added", &entry);
        }
        ImagesCommand::List { store } => {
            let entries = open(&store)?.list().context("failed to list images")?;
            if global.output == OutputFormat::Json {
                println!("{}", serde_json::json!({ "images": entries }));
            } else if entries.is_empty() {
                println!("no images; build one with `leasehold images build busybox`");
            } else {
                for entry in &entries {
                    println!(
                        "{:<24} {}  {:>12} bytes",
                        entry.name, entry.digest, entry.size_bytes
                    );
                }
            }
        }
        ImagesCommand::Pull {
            reference,
            image_store,
            cache,
        } => pull(global, &reference, image_store, &cache).await?,
        ImagesCommand::Serve { listen, store, tls } => serve(global, listen, &store, tls).await?,
    }
    Ok(0)
}

/// `images pull`: pins a bare name through the store, then downloads the
/// blob into the cache with a byte-counting bar (its total is the entry's
/// size) and unpacks it; an image already unpacked there is not downloaded.
async fn pull(
    global: &Global,
    reference: &str,
    image_store: String,
    cache_dir: &Path,
) -> Result<()> {
    let image_store = crate::parse_url(&image_store)
        .map_err(|problem| anyhow::anyhow!("--image-store: {problem}"))?;
    let cache = leasehold_images::ImageCache::with_trust(
        cache_dir,
        Some(image_store.clone()),
        &global.server_trust,
    )
    .with_context(|| format!("failed to open the image cache at {}", cache_dir.display()))?;
    let pinned = if reference.contains('@') {
        reference.to_string()
    } else {
        let entry = cache
            .resolve(reference)
            .await
            .with_context(|| format!("failed to look up image '{reference}' at {image_store}"))?;
        format!("{}@{}", entry.name, entry.digest)
    };
    let bar = progress::byte_bar(global, None, format!("downloading {reference}"));
    let report_bytes = |done_bytes: u64, total_bytes: u64| {
        if total_bytes > 0 && bar.length() != Some(total_bytes) {
            bar.set_length(total_bytes);
            bar.set_style(progress::byte_bar_style(Some(total_bytes)));
        }
        bar.set_position(done_bytes);
    };
    let pulled = cache.rootfs(&pinned, &report_bytes).await;
    bar.finish_and_clear();
    let image = pulled.with_context(|| format!("failed to pull image '{reference}'"))?;
    if global.output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::json!({
                "name": image.entry.name,
                "digest": image.entry.digest,
                "size_bytes": image.entry.size_bytes,
                "rootfs": image.rootfs,
                "cache_hit": image.cache_hit,
            })
        );
    } else {
        let verb = if image.cache_hit {
            "already cached"
        } else {
            "pulled"
        };
        println!(
            "{verb} {}  {}  {} bytes  into {}",
            image.entry.name,
            image.entry.digest,
            image.entry.size_bytes,
            image.rootfs.display()
        );
    }
    Ok(())
}

/// `images serve`: the store over HTTP (TLS with a certificate) until a signal.
async fn serve(
    global: &Global,
    listen: SocketAddr,
    store: &Path,
    tls: crate::serve::TlsArgs,
) -> Result<()> {
    let tls = tls.identity_for("image store", listen)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let store = Arc::new(open(store)?);
    let count = store.list().map(|l| l.len()).unwrap_or(0);
    let root = store.root().to_path_buf();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    let url = format!("{scheme}://{}", listener.local_addr()?);
    if global.output == OutputFormat::Json {
        println!(
            "{}",
            serde_json::json!({"image_store_url": url, "store": root, "images": count})
        );
    } else {
        println!(
            "image store serving {count} image(s) from {} on {url}",
            root.display()
        );
    }
    let limits = leasehold_service::ServeLimits::default();
    leasehold_service::ServerHandle::spawn_with_tls(listener, store.router(), limits, tls)
        .wait()
        .await
        .context("the image store stopped with an error")?;
    Ok(())
}

//! `leasehold images`: the content-addressed image store (seed 000,
//! FIG. 16), on this machine or served to agents over HTTP.

use crate::{parse_listen, Global, OutputFormat};
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
            let store = open(&store)?;
            let built = match recipe.as_str() {
                "debian-vm" => store.build_vm_debian(&name, kernel_deb.as_deref()),
                _ => store.build_busybox(&name),
            };
            let entry = built.with_context(|| format!("failed to build image '{name}'"))?;
            print_entry(global, "built", &entry);
        }
        ImagesCommand::Add { name, path, store } => {
            let store = open(&store)?;
            let entry = if path.is_dir() {
                store.add_dir(&name, &path)
            } else {
                store.add_tarball(&name, &path)
            }
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
        ImagesCommand::Serve { listen, store, tls } => {
            let tls = tls.identity_for("image store", listen)?;
            let scheme = if tls.is_some() { "https" } else { "http" };
            let store = Arc::new(open(&store)?);
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
        }
    }
    Ok(0)
}

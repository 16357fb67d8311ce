//! The `oci` driver's images: the agent's cache of the image store
//! (seed 000, FIG. 16: the OS image is fetched from the file server and
//! booted in the partition).
//!
//! The images a host offers are pinned to digests once, when the agent
//! starts (`CachedImages::pinned`), so the terms it registers name
//! `name@sha256:<hex>`; a job boots the digest its partition's terms name,
//! fetched and checked by digest, and never asks the store what a name means.

use crate::driver::oci::ImageSource;
use crate::driver::{BoxFuture, DriverError};
use leasehold_core::image_ref::{image_name, ImageReference};
use leasehold_core::Terms;
use leasehold_images::{ImageCache, ImageError};
use std::path::PathBuf;

pub struct CachedImages {
    cache: ImageCache,
    offered: Vec<String>,
}

impl CachedImages {
    /// `offered` are the images this host lends partitions with, bare names
    /// or pinned; each bare name is pinned to the digest this host has
    /// cached, or else to the one the store lists now. Fails when an
    /// offered image is neither cached nor in the store: a host must not
    /// offer an image it cannot boot.
    pub async fn pinned(cache: ImageCache, offered: Vec<String>) -> Result<Self, ImageError> {
        let mut pinned = Vec::with_capacity(offered.len());
        for reference in offered {
            if reference.contains('@') {
                pinned.push(reference);
                continue;
            }
            let entry = cache.resolve(&reference).await?;
            tracing::info!(image = %reference, digest = %entry.digest, "offered image pinned");
            pinned.push(ImageReference::pinned(&entry.name, &entry.digest));
        }
        Ok(CachedImages {
            cache,
            offered: pinned,
        })
    }
}

/// Replaces each bare name in `terms.images` by the one reference in
/// `offered` with that name, so that `host add --image busybox` registers
/// the digest this host boots. Names that match nothing stay as given (and
/// validation refuses them, naming the field).
pub fn pin_to_offered(mut terms: Terms, offered: &[String]) -> Terms {
    for image in terms.images.iter_mut() {
        if image.contains('@') {
            continue;
        }
        let mut same_name = offered
            .iter()
            .filter(|o| o.contains('@') && image_name(o) == image.as_str());
        if let (Some(only), None) = (same_name.next(), same_name.next()) {
            *image = only.clone();
        }
    }
    terms
}

impl ImageSource for CachedImages {
    fn names(&self) -> Vec<String> {
        self.offered.clone()
    }

    fn rootfs<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<PathBuf, DriverError>> {
        Box::pin(async move {
            let progress = |done: u64, total: u64| {
                // Large downloads say how far they are, every 64 MiB.
                if total > 0 && done % (64 << 20) < (1 << 20) {
                    tracing::info!(
                        image = name,
                        done_mib = done >> 20,
                        total_mib = total >> 20,
                        "fetching image"
                    );
                }
            };
            match self.cache.rootfs(name, &progress).await {
                Ok(cached) => {
                    if !cached.cache_hit {
                        tracing::info!(image = name, digest = %cached.entry.digest, "fetched and verified image");
                    }
                    Ok(cached.rootfs)
                }
                Err(
                    error @ (ImageError::NotFound { .. }
                    | ImageError::InvalidName { .. }
                    | ImageError::NotPinned { .. }
                    | ImageError::NoStore { .. }),
                ) => Err(DriverError::UnknownImage(error.to_string())),
                Err(error) => Err(DriverError::Image(error.to_string())),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_names_in_terms_are_pinned_to_what_the_host_offers() {
        let busybox = format!("busybox@sha256:{}", "a".repeat(64));
        let debian = format!("debian@sha256:{}", "b".repeat(64));
        let terms = Terms {
            vcpus: 1,
            cpu_cap_percent: 100,
            memory_mib: 64,
            disk_gib: 1,
            images: vec!["busybox".into(), debian.clone(), "windows".into()],
            price_per_hour_micros: 0,
            isolation: None,
        };
        let pinned = pin_to_offered(terms, &[busybox.clone(), debian.clone()]);
        assert_eq!(pinned.images, vec![busybox, debian, "windows".to_string()]);
    }
}

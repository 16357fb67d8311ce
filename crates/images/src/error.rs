use std::path::PathBuf;

/// Everything that can go wrong with images. Messages are lowercase, name the
/// image, file or store at fault, and say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image '{name}' is not in the image store at {store}; list the store's images, or add this one to the store first")]
    NotFound { name: String, store: String },

    #[error("{reason}")]
    InvalidName { name: String, reason: String },

    #[error("'{digest}' is not an image digest (expected 'sha256:' followed by 64 lowercase hex digits)")]
    InvalidDigest { digest: String },

    #[error("the downloaded image has digest {actual} but the store listed {expected}; the blob on the store is damaged or was replaced: add the image to the store again")]
    DigestMismatch { expected: String, actual: String },

    #[error("the store announced {digest} as {expected} bytes but its download came to {actual} bytes (or more); the blob on the store is damaged or was replaced: add the image to the store again")]
    SizeMismatch {
        digest: String,
        expected: u64,
        actual: u64,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("the image store at {url} failed: {message}")]
    Http { url: String, message: String },

    #[error("cannot reach the image store at {url}: {reason}; check that it is running and that the URL is right")]
    Unreachable { url: String, reason: String },

    /// The store's TLS certificate is not signed by a trusted CA, or the CA
    /// to pin is not usable.
    #[error("the image store at {url}: {source}")]
    Tls {
        url: String,
        #[source]
        source: leasehold_api::ApiError,
    },

    #[error("{path} is not a usable image: {reason}")]
    Corrupt { path: String, reason: String },

    #[error("refusing {archive}: entry '{entry}' {reason}")]
    UnsafeEntry {
        archive: String,
        entry: String,
        reason: String,
    },

    #[error("{what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },

    #[error("cannot add {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },

    #[error("cannot build the busybox image: {reason}; install a static busybox with 'apt-get install busybox-static'")]
    BusyboxMissing { reason: String },

    #[error("cannot build the vm image: {reason}")]
    VmRecipe { reason: String },

    #[error("image '{name}' is not cached here and no image store is configured; give the agent an image store URL")]
    NoStore { name: String },

    #[error("image '{name}' is not pinned to a digest and is not cached here; a partition's terms name their images as name@sha256:<digest>: register the partition again through a broker with an image store, or list the image pinned")]
    NotPinned { name: String },

    #[error("internal error: {0}")]
    Internal(String),
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }
}

/// An error and all its sources, joined by ": ".
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        next = e.source();
    }
    out
}

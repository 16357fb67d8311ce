//! Asking an image store over HTTP what a name means and whether it holds a
//! blob: the cache resolves names this way when a partition is registered,
//! and a broker with an image store checks the images in terms.

use leasehold_api::ServerTrust;
use std::time::Duration;

use crate::error::chain;
use crate::{
    digest_hex, validate_name, ImageEntry, ImageError, MAX_BLOB_BYTES, MAX_ENTRY_RESPONSE_BYTES,
};

/// How long to wait to connect to a store.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an entry lookup may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest error body read from a store.
const MAX_ERROR_BODY_BYTES: u64 = 64 * 1024;

/// A client of one image store (`leasehold images serve`).
#[derive(Debug, Clone)]
pub struct StoreClient {
    base: String,
    client: reqwest::Client,
}

/// An HTTP client for the store at `base` that accepts the certificates
/// `trust` allows on `https://` (a pinned CA only, or public CAs).
pub(crate) fn http_client(
    base: &str,
    trust: &ServerTrust,
    builder: reqwest::ClientBuilder,
) -> Result<reqwest::Client, ImageError> {
    trust
        .build(builder.connect_timeout(CONNECT_TIMEOUT))
        .map_err(|source| ImageError::Tls {
            url: base.to_string(),
            source,
        })
}

impl StoreClient {
    /// `base` is the store's URL, e.g. `http://127.0.0.1:7072`; `https://`
    /// URLs are checked against public CAs.
    pub fn new(base: &str) -> Result<Self, ImageError> {
        Self::with_trust(base, &ServerTrust::PublicRoots)
    }

    /// A client of the store at `base` that accepts only the server
    /// certificates `trust` allows.
    pub fn with_trust(base: &str, trust: &ServerTrust) -> Result<Self, ImageError> {
        let base = base.trim_end_matches('/').to_string();
        let client = http_client(
            &base,
            trust,
            reqwest::Client::builder().timeout(LOOKUP_TIMEOUT),
        )?;
        Ok(StoreClient { base, client })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// The store's entry for `name` (`NotFound` if it has none).
    pub async fn entry(&self, name: &str) -> Result<ImageEntry, ImageError> {
        fetch_entry(&self.client, &self.base, name).await
    }

    /// Whether the store holds the blob of `digest` (a `HEAD` of it): a name
    /// pinned to an older digest stays valid as long as its blob is kept.
    pub async fn has_blob(&self, digest: &str) -> Result<bool, ImageError> {
        digest_hex(digest)?;
        let url = format!("{}/v1/blobs/{digest}", self.base);
        let response = self
            .client
            .head(&url)
            .send()
            .await
            .map_err(|e| transport(&self.base, &url, e))?;
        match response.status() {
            status if status.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            status => Err(ImageError::Http {
                url,
                message: format!("it answered {status}"),
            }),
        }
    }
}

/// `GET /v1/images/{name}`, checked: the answer names `name`, its digest is
/// well formed and its size within `MAX_BLOB_BYTES`.
pub(crate) async fn fetch_entry(
    client: &reqwest::Client,
    base: &str,
    name: &str,
) -> Result<ImageEntry, ImageError> {
    validate_name(name)?;
    let url = format!("{base}/v1/images/{name}");
    let mut response = client
        .get(&url)
        .timeout(LOOKUP_TIMEOUT)
        .send()
        .await
        .map_err(|e| transport(base, &url, e))?;
    let status = response.status();
    if !status.is_success() {
        let (code, message) = read_error(&mut response, base, &url).await;
        if status == reqwest::StatusCode::NOT_FOUND && code == "image_not_found" {
            return Err(ImageError::NotFound {
                name: name.to_string(),
                store: base.to_string(),
            });
        }
        return Err(ImageError::Http {
            url,
            message: format!("it answered {status}: {message}"),
        });
    }
    let body = read_body(&mut response, MAX_ENTRY_RESPONSE_BYTES, base, &url).await?;
    let entry: ImageEntry = serde_json::from_slice(&body).map_err(|e| ImageError::Http {
        url: url.clone(),
        message: format!("its answer is not an image entry ({e}); is this an image store?"),
    })?;
    if entry.name != name {
        return Err(ImageError::Http {
            url,
            message: format!("it answered with image '{}' for '{name}'", entry.name),
        });
    }
    digest_hex(&entry.digest)?;
    if entry.size_bytes > MAX_BLOB_BYTES {
        return Err(ImageError::TooLarge {
            what: format!("image '{name}'"),
            size: entry.size_bytes,
            limit: MAX_BLOB_BYTES,
        });
    }
    Ok(entry)
}

pub(crate) fn transport(base: &str, url: &str, error: reqwest::Error) -> ImageError {
    if let Some(reason) = leasehold_api::client::untrusted_certificate(&error) {
        return ImageError::Tls {
            url: base.to_string(),
            source: leasehold_api::ApiError::UntrustedCertificate {
                url: url.to_string(),
                reason,
            },
        };
    }
    if error.is_connect() || error.is_timeout() {
        ImageError::Unreachable {
            url: base.to_string(),
            reason: chain(&error),
        }
    } else {
        ImageError::Http {
            url: url.to_string(),
            message: chain(&error),
        }
    }
}

async fn read_body(
    response: &mut reqwest::Response,
    limit: u64,
    base: &str,
    url: &str,
) -> Result<Vec<u8>, ImageError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport(base, url, e))?
    {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(ImageError::TooLarge {
                what: format!("the answer of {url}"),
                size: (body.len() + chunk.len()) as u64,
                limit,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The code and message of a store's error answer, or a snippet of the body.
pub(crate) async fn read_error(
    response: &mut reqwest::Response,
    base: &str,
    url: &str,
) -> (String, String) {
    #[derive(serde::Deserialize)]
    struct Body {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: String,
        message: String,
    }
    match read_body(response, MAX_ERROR_BODY_BYTES, base, url).await {
        Ok(bytes) => match serde_json::from_slice::<Body>(&bytes) {
            Ok(body) => (body.error.code, body.error.message),
            Err(_) => {
                let text = String::from_utf8_lossy(&bytes);
                let text: String = text.trim().chars().take(200).collect();
                if text.is_empty() {
                    (
                        String::new(),
                        "no error body; is this an image store?".to_string(),
                    )
                } else {
                    (String::new(), text)
                }
            }
        },
        Err(e) => (String::new(), e.to_string()),
    }
}

//! Pinning the images of a partition's terms to digests through the image
//! store, before the terms are sold: a bare name becomes `name@sha256:<hex>`
//! (what the store lists for it now), a pinned reference must name a blob the
//! store holds, and anything else is refused naming `terms.images[N]`.
//! Without an image store (simulations, whose images are fictitious), terms
//! are kept as given.

use leasehold_core::image_ref::{parse_image_reference, ImageReference};
use leasehold_core::{FieldError, Terms};
use leasehold_images::{ImageError, StoreClient};

use crate::error::BrokerError;

pub(crate) struct ImageResolver {
    store: StoreClient,
}

impl ImageResolver {
    pub(crate) fn new(
        store_url: &str,
        trust: &leasehold_api::ServerTrust,
    ) -> Result<Self, BrokerError> {
        let store = StoreClient::with_trust(store_url, trust)
            .map_err(|e| BrokerError::Internal(format!("cannot use the image store: {e}")))?;
        Ok(ImageResolver { store })
    }

    /// The terms with every image pinned to a digest the store holds.
    pub(crate) async fn pin_terms(&self, mut terms: Terms) -> Result<Terms, BrokerError> {
        // The other fields and the image count first, so that a huge list
        // never turns into as many lookups.
        terms
            .validate(None)
            .map_err(|e| FieldError::new(format!("terms.{}", e.field), e.problem))?;
        for (position, image) in terms.images.iter_mut().enumerate() {
            let field = format!("terms.images[{position}]");
            *image = self.pin_one(&field, image).await?;
        }
        Ok(terms)
    }

    async fn pin_one(&self, field: &str, image: &str) -> Result<String, BrokerError> {
        let reference = parse_image_reference(field, image)?;
        let Some(digest) = reference.digest else {
            return match self.store.entry(reference.name).await {
                Ok(entry) => Ok(ImageReference::pinned(&entry.name, &entry.digest)),
                Err(error @ (ImageError::NotFound { .. } | ImageError::InvalidName { .. })) => {
                    Err(FieldError::new(field, error.to_string()).into())
                }
                Err(error) => Err(self.failed(error)),
            };
        };
        match self.store.has_blob(digest).await {
            Ok(true) => Ok(image.to_string()),
            Ok(false) => Err(FieldError::new(
                field,
                format!(
                    "image '{image}' is not in the image store at {}: no blob {digest}; register the name alone to pin what the store lists now",
                    self.store.url()
                ),
            )
            .into()),
            Err(error) => Err(self.failed(error)),
        }
    }

    fn failed(&self, error: ImageError) -> BrokerError {
        BrokerError::ImageStore(format!(
            "cannot check the images of the terms: {error}; try again when the image store at {} answers",
            self.store.url()
        ))
    }
}

/// The terms to store for a `PUT` of a partition: pinned when the broker has
/// an image store, as given otherwise.
pub(crate) async fn pin_terms(
    resolver: Option<&ImageResolver>,
    terms: Terms,
) -> Result<Terms, BrokerError> {
    match resolver {
        Some(resolver) => resolver.pin_terms(terms).await,
        None => Ok(terms),
    }
}

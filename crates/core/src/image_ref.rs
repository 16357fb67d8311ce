//! Image references in terms: a bare name (`busybox`), or a name pinned to
//! the sha256 of its tar (`busybox@sha256:<64 lowercase hex>`).
//!
//! Terms a broker with an image store sells are always pinned: the digest is
//! what the lender registered and the borrower leased, and the agent fetches
//! that digest, never whatever a name points to at job time. Bare names stay
//! valid for brokers without a store (simulations, whose images are
//! fictitious) and as what a borrower asks for (`find --image busybox`).

use crate::error::FieldError;
use crate::terms::{validate_image_name, MAX_IMAGE_NAME_LEN};

const DIGEST_PREFIX: &str = "sha256:";
const DIGEST_HEX_LEN: usize = 64;
/// Longest reference: a name, '@', 'sha256:' and 64 hex digits.
pub const MAX_IMAGE_REFERENCE_LEN: usize =
    MAX_IMAGE_NAME_LEN + 1 + DIGEST_PREFIX.len() + DIGEST_HEX_LEN;

/// A parsed reference; `digest` is `sha256:<hex>` when pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageReference<'a> {
    pub name: &'a str,
    pub digest: Option<&'a str>,
}

impl ImageReference<'_> {
    /// `name@digest`: the pinned form of a name and the digest it resolved to.
    pub fn pinned(name: &str, digest: &str) -> String {
        format!("{name}@{digest}")
    }
}

/// Parses `name` or `name@sha256:<64 lowercase hex>`, naming `field` on error.
pub fn parse_image_reference<'a>(
    field: &str,
    reference: &'a str,
) -> Result<ImageReference<'a>, FieldError> {
    let Some((name, digest)) = reference.split_once('@') else {
        validate_image_name(field, reference)?;
        return Ok(ImageReference {
            name: reference,
            digest: None,
        });
    };
    validate_image_name(field, name)?;
    if !is_sha256_digest(digest) {
        return Err(FieldError::new(
            field,
            format!(
                "'{}' is not a pinned image (expected name@sha256: followed by 64 lowercase hex digits)",
                reference.chars().take(MAX_IMAGE_REFERENCE_LEN).collect::<String>()
            ),
        ));
    }
    Ok(ImageReference {
        name,
        digest: Some(digest),
    })
}

/// Whether `digest` is `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256_digest(digest: &str) -> bool {
    digest.strip_prefix(DIGEST_PREFIX).is_some_and(|hex| {
        hex.len() == DIGEST_HEX_LEN && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// The name part of a reference (all of it when it is not pinned).
pub fn image_name(reference: &str) -> &str {
    reference
        .split_once('@')
        .map_or(reference, |(name, _)| name)
}

/// Whether a partition offering `offered` satisfies a request for `wanted`:
/// the same reference, or a bare name asking for any digest of that name.
pub fn offers_image(offered: &str, wanted: &str) -> bool {
    offered == wanted || (!wanted.contains('@') && image_name(offered) == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references_parse_or_name_the_field() {
        let pinned = format!("busybox@sha256:{HEX}");
        let parsed = parse_image_reference("images[0]", &pinned).unwrap();
        assert_eq!(parsed.name, "busybox");
        assert_eq!(parsed.digest, Some(&pinned["busybox@".len()..]));
        assert_eq!(
            parse_image_reference("images[0]", "busybox")
                .unwrap()
                .digest,
            None
        );
        for bad in [
            format!("busybox@sha256:{}", &HEX[1..]),
            format!("busybox@sha256:{}", HEX.to_uppercase()),
            format!("busybox@md5:{HEX}"),
            format!("@sha256:{HEX}"),
            format!("bad name@sha256:{HEX}"),
            "busybox@".to_string(),
        ] {
            let error = parse_image_reference("images[3]", &bad).unwrap_err();
            assert_eq!(error.field, "images[3]", "{bad}");
        }
        assert_eq!(pinned.len(), "busybox".len() + 72);
        assert!(MAX_IMAGE_REFERENCE_LEN >= format!("{}@sha256:{HEX}", "a".repeat(64)).len());
    }

    #[test]
    fn a_bare_name_matches_any_digest_of_it_and_a_digest_only_itself() {
        let pinned = format!("busybox@sha256:{HEX}");
        let other = format!("busybox@sha256:{}", HEX.replace('0', "1"));
        assert!(offers_image(&pinned, "busybox"));
        assert!(offers_image(&pinned, &pinned));
        assert!(!offers_image(&pinned, &other));
        assert!(!offers_image(&pinned, "busybox2"));
        assert!(!offers_image("busybox", &pinned));
        assert!(offers_image("busybox", "busybox"));
        assert_eq!(image_name(&pinned), "busybox");
    }
}

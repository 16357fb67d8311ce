//! Request bodies: every body the broker and the agent accept goes through
//! `leasehold_service::decode_json` and then the public checks. Arbitrary
//! bytes are decoded into each request type of `leasehold_api`; the
//! property is no panic, and a refusal is always a 4xx naming a field.
//! Decoded values go on through what the services run next: terms and
//! requirements validation, the partition name parser, the image reference
//! parser, the capacity check, the lease key decoder, and a find over a
//! small index held to account by the naive reference filter.
#![no_main]

use leasehold_api::{
    AddPartitionRequest, CreatePrincipalRequest, FindRequest, LeaseRequest, NoticeRequest,
    RegisterHostRequest, RegisterPartitionRequest, SubmitJobRequest, MAX_FIND_LIMIT,
};
use leasehold_core::image_ref::{image_name, parse_image_reference};
use leasehold_core::key::{self, TrustedKeys};
use leasehold_core::matching::{explain_no_match, naive_find, FreeIndex};
use leasehold_core::{HostCapacity, PartitionRef, Requirements, Terms};
use leasehold_service::{decode_json, ErrorResponse};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fuzz_target!(|data: &[u8]| {
    if let Some(request) = decode::<LeaseRequest>(data) {
        if let Some(partition) = &request.partition {
            let _ = partition.parse::<PartitionRef>();
        }
        if let Some(best) = &request.best {
            check_requirements(best, 1);
        }
    }
    if let Some(request) = decode::<FindRequest>(data) {
        let limit = request.limit.unwrap_or(10);
        if (1..=MAX_FIND_LIMIT).contains(&limit) {
            check_requirements(&request.requirements, limit as usize);
        }
    }
    if let Some(request) = decode::<RegisterPartitionRequest>(data) {
        check_terms(&request.terms);
    }
    if let Some(request) = decode::<AddPartitionRequest>(data) {
        check_terms(&request.terms);
    }
    if let Some(request) = decode::<RegisterHostRequest>(data) {
        let _ = request
            .capacity
            .admits(sample_terms().iter(), &sample_terms()[0]);
    }
    if let Some(request) = decode::<SubmitJobRequest>(data) {
        let _ = key::decode_and_verify_trusted(&request.lease_key, trusted_keys());
        if let Some(image) = &request.image {
            let _ = parse_image_reference("image", image);
        }
    }
    if let Some(request) = decode::<NoticeRequest>(data) {
        let _ = key::decode_notice_trusted(&request.notice, trusted_keys());
    }
    let _ = decode::<CreatePrincipalRequest>(data);
});

/// Decodes like the services do; a refusal must be a 4xx naming a field.
fn decode<T: DeserializeOwned>(data: &[u8]) -> Option<T> {
    match decode_json::<T>(data) {
        Ok(value) => Some(value),
        Err(ErrorResponse { status, detail }) => {
            assert!(
                status.is_client_error(),
                "decode_json answered {status}: {detail:?}"
            );
            assert!(
                detail.field.as_deref().is_some_and(|f| !f.is_empty()),
                "a refused body names no field: {detail:?}"
            );
            None
        }
    }
}

fn check_terms(terms: &Terms) {
    if terms.validate(None).is_err() {
        return;
    }
    for image in &terms.images {
        assert!(parse_image_reference("images", image).is_ok());
        let _ = image_name(image);
    }
    // Valid terms reach the capacity check with the host's other partitions.
    let host = HostCapacity {
        cpu_centicores: 102_400,
        memory_mib: leasehold_core::terms::MAX_MEMORY_MIB,
        disk_gib: leasehold_core::terms::MAX_DISK_GIB,
        owner_share_cpu_centicores: 100,
        owner_share_memory_mib: 1024,
        owner_share_disk_gib: 10,
    };
    let others = sample_terms();
    let _ = host.admits(others.iter(), terms);
}

/// Valid requirements go through a find; the free index must give what the
/// naive filter gives, and an empty answer must be explainable.
fn check_requirements(requirements: &Requirements, limit: usize) {
    if requirements.validate().is_err() {
        return;
    }
    let free: Vec<(PartitionRef, Terms)> = sample_terms()
        .into_iter()
        .enumerate()
        .map(|(n, t)| (PartitionRef::new("alpha", n as u32), t))
        .collect();
    let mut index = FreeIndex::default();
    for (partition, terms) in &free {
        index.insert(partition.clone(), terms.clone());
    }
    let found = index.find(requirements, limit);
    let reference = naive_find(free.iter().map(|(p, t)| (p, t)), requirements, limit);
    assert_eq!(
        found, reference,
        "the free index and the naive filter disagree"
    );
    if found.is_empty() {
        let _ = explain_no_match(free.iter().map(|(p, t)| (p, t, false)), requirements);
    }
}

fn sample_terms() -> Vec<Terms> {
    let terms = |vcpus, memory_mib, image: &str, price| Terms {
        vcpus,
        cpu_cap_percent: 100,
        memory_mib,
        disk_gib: 10,
        images: vec![image.to_string()],
        price_per_hour_micros: price,
        isolation: None,
    };
    vec![
        terms(1, 512, "busybox", 10_000),
        terms(
            2,
            2048,
            "busybox@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            10_000,
        ),
        terms(4, 8192, "debian:12", 90_000),
    ]
}

fn trusted_keys() -> &'static TrustedKeys {
    static KEYS: std::sync::OnceLock<TrustedKeys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| TrustedKeys::single(key::signing_key_from_seed([7; 32]).verifying_key()))
}

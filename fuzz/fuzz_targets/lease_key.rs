//! Lease keys and notices: the agent decodes tokens sent by anyone.
//!
//! 1. Arbitrary bytes as a token: the key and notice decoders never panic,
//!    and nothing unsigned by a trusted key verifies.
//! 2. Structured claims (built with `arbitrary`; the borrower may be padded
//!    past `MAX_KEY_LEN`): sign then decode gives the same claims back (or
//!    `Malformed` past the length bound, or `BadSignature` when the claims
//!    name a key that did not sign them); one changed byte never verifies to
//!    different claims; a key is never read as a notice nor a notice as a
//!    key; the partition's fence never panics deciding a presented key.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use leasehold_core::fence::{self, FenceEvent, FencePhase, PartitionFence};
use leasehold_core::key::{
    self, decode_and_verify_trusted, decode_notice_trusted, KeyRejection, LeaseKeyClaims,
    NoticeClaims, NoticeKind, TrustedKeys,
};
use leasehold_core::terms::Terms;
use libfuzzer_sys::fuzz_target;

/// Fixed seeds: the corpus holds keys signed with the first one.
const SIGNER_SEED: [u8; 32] = [7; 32];
const OTHER_TRUSTED_SEED: [u8; 32] = [8; 32];

#[derive(Arbitrary, Debug)]
struct TermsInput {
    vcpus: u32,
    cpu_cap_percent: u32,
    memory_mib: u64,
    disk_gib: u64,
    images: Vec<String>,
    price_per_hour_micros: u64,
}

#[derive(Arbitrary, Debug)]
enum KeyIdChoice {
    Empty,
    Signer,
    OtherTrusted,
    Made(String),
}

#[derive(Arbitrary, Debug)]
struct ClaimsInput {
    lease_id: u64,
    host_id: String,
    partition_index: u32,
    epoch: u64,
    borrower: String,
    issued_at_ms: u64,
    expires_at_ms: u64,
    key_id: KeyIdChoice,
    terms: Option<TermsInput>,
    changed_byte_position: usize,
    changed_byte_xor: u8,
    state_epoch: u64,
    state_lease_id: Option<u64>,
    state_released_through_epoch: u64,
    now_ms: u64,
    notice_released: bool,
    /// 240 and above pad the borrower with 1 to 16 KiB, so that short
    /// inputs also reach keys near and past `MAX_KEY_LEN`.
    borrower_padding: u8,
}

struct Keys {
    signer: ed25519_dalek::SigningKey,
    trusted: TrustedKeys,
    signer_id: String,
    other_id: String,
}

fn keys() -> &'static Keys {
    static KEYS: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = key::signing_key_from_seed(SIGNER_SEED);
        let other = key::signing_key_from_seed(OTHER_TRUSTED_SEED);
        let mut trusted = TrustedKeys::single(signer.verifying_key());
        trusted.insert(other.verifying_key());
        Keys {
            signer_id: key::key_id(&signer.verifying_key()),
            other_id: key::key_id(&other.verifying_key()),
            signer,
            trusted,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    let token = String::from_utf8_lossy(data);
    // Arbitrary tokens: no panic is the property; a verified one must carry
    // a trusted signature, which the fuzzer cannot forge, so only the seeds'
    // real keys may verify.
    let _ = decode_and_verify_trusted(&token, &keys.trusted);
    let _ = decode_notice_trusted(&token, &keys.trusted);

    if let Ok(input) = ClaimsInput::arbitrary(&mut Unstructured::new(data)) {
        check_structured(keys, input);
    }
});

fn claims_of(keys: &Keys, input: &ClaimsInput) -> (LeaseKeyClaims, bool) {
    let (key_id, signed_by_named_key) = match &input.key_id {
        KeyIdChoice::Empty => (String::new(), true),
        KeyIdChoice::Signer => (keys.signer_id.clone(), true),
        KeyIdChoice::OtherTrusted => (keys.other_id.clone(), false),
        KeyIdChoice::Made(text) => (text.clone(), text.is_empty() || *text == keys.signer_id),
    };
    let terms = input.terms.as_ref().map(|t| Terms {
        vcpus: t.vcpus,
        cpu_cap_percent: t.cpu_cap_percent,
        memory_mib: t.memory_mib,
        disk_gib: t.disk_gib,
        images: t.images.clone(),
        price_per_hour_micros: t.price_per_hour_micros,
        isolation: None,
    });
    let claims = LeaseKeyClaims {
        lease_id: input.lease_id,
        host_id: input.host_id.clone(),
        partition_index: input.partition_index,
        epoch: input.epoch,
        borrower: padded_borrower(input),
        issued_at_ms: input.issued_at_ms,
        expires_at_ms: input.expires_at_ms,
        key_id,
        terms,
    };
    (claims, signed_by_named_key)
}

fn padded_borrower(input: &ClaimsInput) -> String {
    let padding_kib = input.borrower_padding.saturating_sub(239) as usize;
    format!("{}{}", input.borrower, "b".repeat(padding_kib * 1024))
}

fn check_structured(keys: &Keys, input: ClaimsInput) {
    let (claims, signed_by_named_key) = claims_of(keys, &input);
    let token = key::sign(&claims, &keys.signer);
    let decoded = decode_and_verify_trusted(&token, &keys.trusted);
    if token.len() > key::MAX_KEY_LEN {
        assert_eq!(
            decoded,
            Err(KeyRejection::Malformed),
            "an over-long key was read"
        );
    } else if signed_by_named_key {
        assert_eq!(
            decoded.as_ref(),
            Ok(&claims),
            "sign then decode changed the claims"
        );
    } else {
        assert_eq!(
            decoded,
            Err(KeyRejection::BadSignature),
            "a key verified with a key that did not sign it"
        );
    }
    assert!(
        decode_notice_trusted(&token, &keys.trusted).is_err(),
        "a lease key was read as a notice"
    );
    check_one_changed_byte(keys, &token, &claims, &input);

    let fence_state = PartitionFence {
        epoch: input.state_epoch,
        released_through_epoch: input.state_released_through_epoch,
        phase: match input.state_lease_id {
            Some(lease_id) => FencePhase::Leased {
                lease_id,
                key_expires_at_ms: None,
                built: false,
            },
            None => FencePhase::Free,
        },
    };
    let _ = fence::on_event(
        fence_state,
        FenceEvent::KeyPresented {
            lease_id: claims.lease_id,
            epoch: claims.epoch,
            key_expires_at_ms: claims.expires_at_ms,
        },
        input.now_ms,
    );
    check_notice(keys, &claims, input.notice_released, signed_by_named_key);
}

/// A notice with the same fields round-trips, and is never read as a key.
fn check_notice(keys: &Keys, claims: &LeaseKeyClaims, released: bool, signed_by_named_key: bool) {
    let notice = NoticeClaims {
        kind: if released {
            NoticeKind::LeaseReleased
        } else {
            NoticeKind::LeaseStarted
        },
        host_id: claims.host_id.clone(),
        partition_index: claims.partition_index,
        lease_id: claims.lease_id,
        epoch: claims.epoch,
        key_expires_at_ms: claims.expires_at_ms,
        key_id: claims.key_id.clone(),
    };
    let notice_token = key::sign_notice(&notice, &keys.signer);
    if notice_token.len() <= key::MAX_KEY_LEN && signed_by_named_key {
        assert_eq!(
            decode_notice_trusted(&notice_token, &keys.trusted),
            Ok(notice),
            "notice round trip"
        );
    }
    assert!(
        decode_and_verify_trusted(&notice_token, &keys.trusted).is_err(),
        "a notice was read as a lease key"
    );
}

/// Changing one byte of a signed key must never verify to other claims.
fn check_one_changed_byte(keys: &Keys, token: &str, claims: &LeaseKeyClaims, input: &ClaimsInput) {
    let xor = input.changed_byte_xor.max(1);
    let mut bytes = token.as_bytes().to_vec();
    let position = input.changed_byte_position % bytes.len();
    bytes[position] ^= xor;
    // The agent only ever sees text; a byte change that breaks UTF-8 cannot arrive.
    let Ok(changed) = String::from_utf8(bytes) else {
        return;
    };
    if let Ok(verified) = decode_and_verify_trusted(&changed, &keys.trusted) {
        assert_eq!(
            &verified, claims,
            "a changed key verified to different claims: {changed}"
        );
    }
}

//! Costs of single steps a lease and a release pay in the broker, timed in
//! this process with the broker's own code: signing a lease key and a
//! release notice (ed25519 over the claims' JSON), so the report can say
//! what share of a lease's CPU they are.

use crate::stats::round1;
use leasehold_core::key::{self, LeaseKeyClaims, NoticeClaims, NoticeKind};
use serde::Serialize;
use std::time::Instant;

const ROUNDS: u32 = 2000;

#[derive(Debug, Serialize)]
pub struct StepCosts {
    /// Microseconds to sign one lease key (claims with terms).
    pub sign_lease_key_us: f64,
    /// Microseconds to sign one release notice.
    pub sign_notice_us: f64,
    /// Microseconds to verify one lease key (what an agent pays per job).
    pub verify_lease_key_us: f64,
}

pub fn measure_step_costs() -> StepCosts {
    measure_step_costs_over(ROUNDS)
}

/// Each step timed over `rounds` repetitions.
fn measure_step_costs_over(rounds: u32) -> StepCosts {
    let signing = key::signing_key_from_seed([7; 32]);
    let mut rng = crate::workload::SplitMix64::stream(1, 99);
    let claims = LeaseKeyClaims {
        not_before_ms: None,
        lease_id: 123_456,
        host_id: crate::workload::host_id(4242),
        partition_index: 3,
        epoch: 17,
        borrower: "bench-borrower-7".into(),
        issued_at_ms: 1_700_000_000_000,
        expires_at_ms: 1_700_604_800_000,
        key_id: key::key_id(&signing.verifying_key()),
        terms: Some(crate::workload::random_terms(&mut rng)),
    };
    let notice = NoticeClaims {
        kind: NoticeKind::LeaseReleased,
        host_id: claims.host_id.clone(),
        partition_index: 3,
        lease_id: 123_456,
        epoch: 17,
        key_expires_at_ms: claims.expires_at_ms,
        key_id: claims.key_id.clone(),
    };
    let started = Instant::now();
    let mut signed = String::new();
    for _ in 0..rounds {
        signed = key::sign(&claims, &signing);
    }
    let sign_lease_key_us = micros_each(started, rounds);
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(key::sign_notice(&notice, &signing));
    }
    let sign_notice_us = micros_each(started, rounds);
    let verifying = signing.verifying_key();
    let started = Instant::now();
    for _ in 0..rounds {
        let checked = key::decode_and_verify(&signed, &verifying);
        assert!(checked.is_ok(), "the benchmark's own key must verify");
    }
    StepCosts {
        sign_lease_key_us,
        sign_notice_us,
        verify_lease_key_us: micros_each(started, rounds),
    }
}

fn micros_each(started: Instant, rounds: u32) -> f64 {
    round1(started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_costs_are_positive_and_finite() {
        // Few rounds: an unoptimised build signs slowly.
        let costs = measure_step_costs_over(20);
        for value in [
            costs.sign_lease_key_us,
            costs.sign_notice_us,
            costs.verify_lease_key_us,
        ] {
            assert!(value.is_finite() && value > 0.0, "{costs:?}");
        }
    }
}

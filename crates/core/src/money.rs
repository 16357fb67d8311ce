//! Integer money. Amounts are micro-units (1 unit = 1,000,000 micros) in u64;
//! no floating point anywhere. Rates are per hour, charges are per started
//! second, rounded up to the next micro so a lender is never under-paid by
//! rounding.

use crate::error::{CoreError, FieldError};

pub const MICROS_PER_UNIT: u64 = 1_000_000;
/// The highest rate a partition may ask: one million units per hour. Bounded
/// so that a year of billing fits comfortably in u64 micros.
pub const MAX_PRICE_PER_HOUR_MICROS: u64 = 1_000_000 * MICROS_PER_UNIT;

/// Parses a decimal amount such as `0.25` or `12` into micros, exactly.
pub fn parse_units_to_micros(field: &str, text: &str) -> Result<u64, FieldError> {
    let text = text.trim();
    let bad = || {
        FieldError::new(
            field,
            format!("'{text}' is not an amount (use digits with at most 6 decimals, e.g. 0.25)"),
        )
    };
    let (whole, fraction) = match text.split_once('.') {
        Some((w, f)) => (w, f),
        None => (text, ""),
    };
    if whole.is_empty() && fraction.is_empty() {
        return Err(bad());
    }
    if !whole.chars().all(|c| c.is_ascii_digit()) || !fraction.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    if fraction.len() > 6 {
        return Err(FieldError::new(
            field,
            format!("'{text}' has more than 6 decimals; the smallest unit is 0.000001"),
        ));
    }
    let whole_value: u64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| FieldError::new(field, format!("'{text}' is too large")))?
    };
    let mut fraction_padded = fraction.to_string();
    while fraction_padded.len() < 6 {
        fraction_padded.push('0');
    }
    let fraction_value: u64 = fraction_padded.parse().map_err(|_| bad())?;
    whole_value
        .checked_mul(MICROS_PER_UNIT)
        .and_then(|w| w.checked_add(fraction_value))
        .ok_or_else(|| FieldError::new(field, format!("'{text}' is too large")))
}

/// Formats micros as a decimal amount with six decimals, e.g. `0.250000`.
pub fn format_micros(amount_micros: i128) -> String {
    let sign = if amount_micros < 0 { "-" } else { "" };
    let magnitude = amount_micros.unsigned_abs();
    format!(
        "{sign}{}.{:06}",
        magnitude / MICROS_PER_UNIT as u128,
        magnitude % MICROS_PER_UNIT as u128
    )
}

/// The billable seconds of a lease from its start to its release request:
/// every started second counts, and a lease always bills at least one second.
pub fn billable_seconds(started_at_ms: u64, release_requested_at_ms: u64) -> u64 {
    let elapsed_ms = release_requested_at_ms.saturating_sub(started_at_ms);
    elapsed_ms.div_ceil(1000).max(1)
}

/// The charge for `seconds` at `price_per_hour_micros`, rounded up to a micro.
pub fn charge_micros(price_per_hour_micros: u64, seconds: u64) -> Result<u64, CoreError> {
    let product = (price_per_hour_micros as u128) * (seconds as u128);
    let charge = product.div_ceil(3600);
    u64::try_from(charge).map_err(|_| CoreError::Overflow("lease charge"))
}

/// Splits a charge into the lender's part and the broker's commission, given
/// the commission in basis points (1/100 of a percent). The commission rounds
/// down, so the lender keeps any fraction.
pub fn split_commission(charge_micros: u64, commission_basis_points: u32) -> (u64, u64) {
    let commission =
        ((charge_micros as u128) * (commission_basis_points.min(10_000) as u128) / 10_000) as u64;
    (charge_micros - commission, commission)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_and_format_amounts() {
        let check = |text: &str, expect: Option<u64>| {
            assert_eq!(parse_units_to_micros("price", text).ok(), expect, "{text}");
        };
        check("0.25", Some(250_000));
        check("12", Some(12_000_000));
        check(".5", Some(500_000));
        check("1.000001", Some(1_000_001));
        check("1.0000001", None);
        check("-1", None);
        check("abc", None);
        check("", None);
        check(".", None);
        check("99999999999999999999", None);
        assert_eq!(format_micros(250_000), "0.250000");
        assert_eq!(format_micros(-1_500_000), "-1.500000");
    }

    #[test]
    fn billing_counts_started_seconds() {
        assert_eq!(billable_seconds(1000, 1000), 1);
        assert_eq!(billable_seconds(1000, 2001), 2);
        assert_eq!(billable_seconds(5000, 1000), 1);
        // One unit per hour for one second is 278 micros rounded up.
        assert_eq!(charge_micros(MICROS_PER_UNIT, 1).unwrap(), 278);
        assert_eq!(charge_micros(3600, 10).unwrap(), 10);
        assert!(charge_micros(u64::MAX, u64::MAX).is_err());
    }

    proptest! {
        #[test]
        fn commission_split_conserves_money(charge in 0u64..u64::MAX / 2, bp in 0u32..20_000) {
            let (lender, broker) = split_commission(charge, bp);
            prop_assert_eq!(lender + broker, charge);
        }

        #[test]
        fn format_then_parse_round_trips(micros in 0u64..1_000_000_000_000_000) {
            let text = format_micros(micros as i128);
            prop_assert_eq!(parse_units_to_micros("x", &text).unwrap(), micros);
        }
    }
}

//! The ledger (billing information database 13) as balanced double-entry
//! transfers: each transfer debits one account and credits another by the
//! same amount, so the sum of all balances is always zero.

use crate::ids::LeaseId;
use crate::lease::Bill;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The account that collects the broker's commission.
pub const BROKER_COMMISSION_ACCOUNT: &str = "broker:commission";

pub fn borrower_account(principal: &str) -> String {
    format!("borrower:{principal}")
}

pub fn lender_account(principal: &str) -> String {
    format!("lender:{principal}")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Transfer {
    pub debit_account: String,
    pub credit_account: String,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub amount_micros: u64,
    pub lease_id: LeaseId,
    pub at_ms: u64,
}

/// The transfers that settle a lease's bill: the borrower pays the lender,
/// and the broker's commission when there is one. Zero-amount legs are left
/// out so the ledger has no noise rows.
pub fn settle(
    bill: &Bill,
    lease_id: LeaseId,
    borrower: &str,
    lender: &str,
    at_ms: u64,
) -> Vec<Transfer> {
    let mut transfers = Vec::with_capacity(2);
    if bill.lender_credit_micros > 0 {
        transfers.push(Transfer {
            debit_account: borrower_account(borrower),
            credit_account: lender_account(lender),
            amount_micros: bill.lender_credit_micros,
            lease_id,
            at_ms,
        });
    }
    if bill.commission_micros > 0 {
        transfers.push(Transfer {
            debit_account: borrower_account(borrower),
            credit_account: BROKER_COMMISSION_ACCOUNT.to_string(),
            amount_micros: bill.commission_micros,
            lease_id,
            at_ms,
        });
    }
    transfers
}

/// Balances (credits minus debits) of every account touched by `transfers`.
pub fn balances<'a>(transfers: impl Iterator<Item = &'a Transfer>) -> BTreeMap<String, i128> {
    let mut balances = BTreeMap::new();
    for transfer in transfers {
        *balances.entry(transfer.debit_account.clone()).or_insert(0) -=
            transfer.amount_micros as i128;
        *balances.entry(transfer.credit_account.clone()).or_insert(0) +=
            transfer.amount_micros as i128;
    }
    balances
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::split_commission;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn settled_bills_sum_to_zero(charges in proptest::collection::vec((0u64..1_000_000_000, 0u32..5000, 0usize..4, 0usize..4), 0..50)) {
            let mut all = Vec::new();
            let names = ["ann", "bob", "cy", "dee"];
            for (n, (charge, bp, b, l)) in charges.iter().enumerate() {
                let (lender_credit, commission) = split_commission(*charge, *bp);
                let bill = Bill { billable_seconds: 1, charge_micros: *charge, lender_credit_micros: lender_credit, commission_micros: commission };
                let transfers = settle(&bill, n as u64, names[*b], names[*l], 0);
                let paid: u64 = transfers.iter().map(|t| t.amount_micros).sum();
                prop_assert_eq!(paid, *charge);
                all.extend(transfers);
            }
            let total: i128 = balances(all.iter()).values().sum();
            prop_assert_eq!(total, 0);
        }
    }
}

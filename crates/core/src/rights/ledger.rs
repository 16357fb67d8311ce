//! Usage rights in the ledger (seed 004): every write of a group's table
//! becomes double-entry transfers of the asset `rights`, so each movement
//! is auditable beside money. Accounts: each host of the group, the rights
//! in flight in pending transfers, those the group holds unassigned, and
//! `issued`, the other side of grants, revocations, expiries and hosts
//! leaving with their rights (its balance is minus the rights in the
//! group). The transfers of one write balance by construction.

use super::ShareGroup;
use crate::ledger::Transfer;
use std::collections::BTreeMap;

/// The ledger's name for the asset.
pub const RIGHTS_ASSET: &str = "rights";

pub fn host_account(group: &str, host_id: &str) -> String {
    format!("rights:{group}:host:{host_id}")
}

fn account(group: &str, name: &str) -> String {
    format!("rights:{group}:{name}")
}

/// Rights per account at `now_ms`, issued left out.
fn holdings(group: &ShareGroup, now_ms: u64) -> BTreeMap<String, i64> {
    let mut held = BTreeMap::new();
    for (host_id, host) in &group.hosts {
        held.insert(
            host_account(&group.name, host_id),
            i64::from(host.rights(now_ms)),
        );
    }
    let in_flight: u32 = group.transfers.values().map(|t| t.in_flight()).sum();
    held.insert(account(&group.name, "in-flight"), i64::from(in_flight));
    held.insert(
        account(&group.name, "unassigned"),
        i64::from(group.unassigned),
    );
    held
}

/// The transfers that take the ledger from `before` to `after` (at
/// `now_ms`): who lost rights pays who gained them, and `issued` covers
/// rights that appeared or went. Empty when nothing moved between hosts.
pub fn movements(before: Option<&ShareGroup>, after: &ShareGroup, now_ms: u64) -> Vec<Transfer> {
    let old = before.map(|g| holdings(g, now_ms)).unwrap_or_default();
    let new = holdings(after, now_ms);
    let mut deltas: BTreeMap<String, i64> = BTreeMap::new();
    for name in old.keys().chain(new.keys()) {
        let delta = new.get(name).copied().unwrap_or(0) - old.get(name).copied().unwrap_or(0);
        if delta != 0 {
            deltas.insert(name.clone(), delta);
        }
    }
    let issued: i64 = -deltas.values().sum::<i64>();
    if issued != 0 {
        deltas.insert(account(&after.name, "issued"), issued);
    }
    let mut payers: Vec<(String, i64)> = deltas
        .iter()
        .filter(|d| *d.1 < 0)
        .map(|(a, d)| (a.clone(), -d))
        .collect();
    let mut payees: Vec<(String, i64)> = deltas.into_iter().filter(|d| d.1 > 0).collect();
    let mut transfers = Vec::new();
    while let (Some(payer), Some(payee)) = (payers.last_mut(), payees.last_mut()) {
        let amount = payer.1.min(payee.1);
        transfers.push(Transfer {
            debit_account: payer.0.clone(),
            credit_account: payee.0.clone(),
            amount_micros: amount as u64,
            lease_id: 0,
            at_ms: now_ms,
        });
        payer.1 -= amount;
        payee.1 -= amount;
        if payer.1 == 0 {
            payers.pop();
        }
        if payee.1 == 0 {
            payees.pop();
        }
    }
    transfers
}

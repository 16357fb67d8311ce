//! One host in several markets (seed 000, FIG. 10 to 15). Each `--broker`
//! is a market: it manages either the agent's fixed partitions (at most one
//! market does) or a share of the host, out of which it carves partitions
//! at lease time. The partition table's external reference (FIG. 10) is
//! the index itself: every share market carves in a range of indexes the
//! agent gave it (kept in the agent's database, so it survives a reorder
//! of the flags), and every other index is a fixed partition of the fixed
//! market. A key or notice counts only when it is signed by the market
//! that manages its partition.

use crate::{trust, Agent, AgentError};
use leasehold_core::fence::FencePhase;
use leasehold_core::key::{self, KeyRejection, TrustedKeys};
use leasehold_core::share::ShareOffer;
use leasehold_core::{FieldError, HostCapacity, Terms};
use leasehold_store::agent::{AgentDb, AgentPartitionRow};
use std::collections::BTreeMap;
use std::sync::{Mutex, RwLock};

/// Where the carving ranges of the share markets are kept.
const RANGES_META_KEY: &str = "market_ranges";
/// The indexes each share market carves in: fixed partitions count from 1,
/// so the ranges start at one million.
pub const SHARE_RANGE_SPAN: u32 = 1_000_000;

/// Per-unit prices when the share does not say (micro-units an hour).
pub const DEFAULT_PRICE_PER_VCPU_HOUR_MICROS: u64 = 10_000;
pub const DEFAULT_PRICE_PER_MEMORY_GIB_HOUR_MICROS: u64 = 2_000;
pub const DEFAULT_PRICE_PER_DISK_GIB_HOUR_MICROS: u64 = 100;

/// What `--broker URL=SHARE` gives a broker: the terms' own field names,
/// `vcpus=N,memory_mib=M,disk_gib=D`, and optionally the per-unit prices
/// and the images (`images=a+b`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub price_per_vcpu_hour_micros: u64,
    pub price_per_memory_gib_hour_micros: u64,
    pub price_per_disk_gib_hour_micros: u64,
    /// `None`: every image the driver offers.
    pub images: Option<Vec<String>>,
}

impl std::str::FromStr for ShareSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut spec = ShareSpec {
            vcpus: 0,
            memory_mib: 0,
            disk_gib: 0,
            price_per_vcpu_hour_micros: DEFAULT_PRICE_PER_VCPU_HOUR_MICROS,
            price_per_memory_gib_hour_micros: DEFAULT_PRICE_PER_MEMORY_GIB_HOUR_MICROS,
            price_per_disk_gib_hour_micros: DEFAULT_PRICE_PER_DISK_GIB_HOUR_MICROS,
            images: None,
        };
        for pair in text.split(',') {
            let (name, value) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not name=value"))?;
            let number = || {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{name}: '{value}' is not a whole number"))
            };
            match name {
                "vcpus" => spec.vcpus = u32::try_from(number()?).map_err(|e| e.to_string())?,
                "memory_mib" => spec.memory_mib = number()?,
                "disk_gib" => spec.disk_gib = number()?,
                "price_per_vcpu_hour_micros" => spec.price_per_vcpu_hour_micros = number()?,
                "price_per_memory_gib_hour_micros" => {
                    spec.price_per_memory_gib_hour_micros = number()?
                }
                "price_per_disk_gib_hour_micros" => spec.price_per_disk_gib_hour_micros = number()?,
                "images" => spec.images = Some(value.split('+').map(str::to_string).collect()),
                other => return Err(format!(
                    "unknown field '{other}'; a share is vcpus=N,memory_mib=M,disk_gib=D[,price_per_vcpu_hour_micros=P][,price_per_memory_gib_hour_micros=P][,price_per_disk_gib_hour_micros=P][,images=a+b]"
                )),
            }
        }
        for (name, value) in [
            ("vcpus", spec.vcpus as u64),
            ("memory_mib", spec.memory_mib),
            ("disk_gib", spec.disk_gib),
        ] {
            if value == 0 {
                return Err(format!(
                    "{name} is missing or 0; a share needs vcpus, memory_mib and disk_gib"
                ));
            }
        }
        Ok(spec)
    }
}

impl ShareSpec {
    /// The share as a pseudo-partition, for the host's capacity check.
    pub(crate) fn as_terms(&self) -> Terms {
        Terms {
            vcpus: self.vcpus,
            cpu_cap_percent: 100,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            images: Vec::new(),
            price_per_hour_micros: 0,
            isolation: None,
        }
    }

    /// The share's size: the host's capacity at its broker.
    pub(crate) fn capacity(&self) -> HostCapacity {
        HostCapacity {
            cpu_centicores: self.vcpus as u64 * 100,
            memory_mib: self.memory_mib,
            disk_gib: self.disk_gib,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        }
    }
}

/// A broker this host lends through, as configured.
#[derive(Debug, Clone)]
pub struct MarketConfig {
    pub url: String,
    /// The lender's credential at this broker.
    pub token: String,
    pub share: Option<ShareSpec>,
}

/// A broker this host lends through, running: its client, what it manages
/// and the keys of its that this agent trusts.
pub(crate) struct Market {
    pub url: String,
    pub client: leasehold_api::Client,
    pub share: Option<ShareSpec>,
    /// The indexes it carves in (share markets).
    pub range: Option<(u32, u32)>,
    pub keys: RwLock<TrustedKeys>,
    pub last_key_refresh_ms: Mutex<u64>,
    /// Where its trusted keys are pinned in the partition table.
    pub trust_meta_key: String,
    /// The owner's own key (direct lending): no broker behind it.
    pub owner: bool,
}

impl Market {
    /// Direct lending's one market: the owner's key manages the fixed
    /// partitions; its client is never called.
    pub fn of_owner(owner: &ed25519_dalek::SigningKey, unused: &leasehold_api::Client) -> Market {
        Market {
            url: "owner".into(),
            client: unused.clone(),
            share: None,
            range: None,
            keys: RwLock::new(TrustedKeys::single(owner.verifying_key())),
            last_key_refresh_ms: Mutex::new(0),
            trust_meta_key: String::new(),
            owner: true,
        }
    }

    pub fn manages(&self, index: u32) -> bool {
        match self.range {
            Some((first, last)) => (first..=last).contains(&index),
            None => false,
        }
    }

    pub fn trusted(&self) -> TrustedKeys {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The share as the broker is told it: images, per-unit prices, the
    /// carving range, the driver's isolation.
    pub fn share_offer(
        &self,
        driver_images: &[String],
        isolation: leasehold_core::Isolation,
    ) -> Option<ShareOffer> {
        let (share, (first_index, last_index)) = (self.share.as_ref()?, self.range?);
        Some(ShareOffer {
            images: share
                .images
                .clone()
                .unwrap_or_else(|| driver_images.to_vec()),
            price_per_vcpu_hour_micros: share.price_per_vcpu_hour_micros,
            price_per_memory_gib_hour_micros: share.price_per_memory_gib_hour_micros,
            price_per_disk_gib_hour_micros: share.price_per_disk_gib_hour_micros,
            first_index,
            last_index,
            isolation: Some(isolation),
        })
    }
}

/// Every market's carving range, read from the database; a share market
/// seen for the first time gets the next free range.
pub(crate) fn carving_ranges(
    db: &AgentDb,
    markets: &[MarketConfig],
) -> Result<Vec<Option<(u32, u32)>>, AgentError> {
    let mut ranges: BTreeMap<String, (u32, u32)> = match db.meta(RANGES_META_KEY)? {
        Some(json) => serde_json::from_str(&json)
            .map_err(|e| AgentError::Internal(format!("corrupt market ranges: {e}")))?,
        None => BTreeMap::new(),
    };
    let mut changed = false;
    let mut answer = Vec::new();
    for market in markets {
        if market.share.is_none() {
            answer.push(None);
            continue;
        }
        if !ranges.contains_key(&market.url) {
            let taken = ranges.values().map(|(first, _)| *first).max().unwrap_or(0);
            let first = taken / SHARE_RANGE_SPAN * SHARE_RANGE_SPAN + SHARE_RANGE_SPAN;
            if first > u32::MAX - SHARE_RANGE_SPAN {
                return Err(AgentError::Internal("no carving range left".into()));
            }
            ranges.insert(market.url.clone(), (first, first + SHARE_RANGE_SPAN - 1));
            changed = true;
        }
        answer.push(ranges.get(&market.url).copied());
    }
    if changed {
        let json =
            serde_json::to_string(&ranges).map_err(|e| AgentError::Internal(e.to_string()))?;
        db.put_meta(RANGES_META_KEY, &json)?;
    }
    Ok(answer)
}

/// No double sale: the fixed partitions and every share fit the host
/// beside each other and the owner share; checked at start, before any
/// broker hears of a share. At most one market manages fixed partitions.
pub(crate) fn check_disjoint(
    capacity: &HostCapacity,
    markets: &[MarketConfig],
    fixed_rows: &[&AgentPartitionRow],
) -> Result<(), AgentError> {
    let fixed_markets = markets.iter().filter(|m| m.share.is_none()).count();
    if fixed_markets > 1 {
        return Err(AgentError::Invalid(FieldError::new(
            "broker",
            "at most one --broker may manage the fixed partitions; give the others a share (URL=vcpus=N,memory_mib=M,disk_gib=D)",
        )));
    }
    let mut taken: Vec<Terms> = fixed_rows.iter().map(|row| row.terms.clone()).collect();
    for market in markets {
        let Some(share) = &market.share else { continue };
        capacity.admits(taken.iter(), &share.as_terms()).map_err(|e| {
            AgentError::Invalid(FieldError::new(
                "broker",
                format!(
                    "the share for {} does not fit beside the fixed partitions and the other shares: {}: {}",
                    market.url, e.field, e.problem
                ),
            ))
        })?;
        taken.push(share.as_terms());
    }
    Ok(())
}

impl Agent {
    /// The market that manages partition `index`: the share market whose
    /// range holds it, else the fixed market.
    pub(crate) fn market_of_index(&self, index: u32) -> Option<usize> {
        self.markets
            .iter()
            .position(|m| m.manages(index))
            .or_else(|| self.fixed_market())
    }

    /// The one market of the fixed partitions, if any.
    pub(crate) fn fixed_market(&self) -> Option<usize> {
        self.markets.iter().position(|m| m.share.is_none())
    }

    /// The client of the fixed partitions' broker, or a clear refusal.
    pub(crate) fn fixed_broker(&self) -> Result<&leasehold_api::Client, AgentError> {
        match self.fixed_market() {
            Some(index) => Ok(&self.markets[index].client),
            None => Err(AgentError::Invalid(FieldError::new(
                "broker",
                "every broker of this agent manages a share; fixed partitions need a --broker without =SHARE",
            ))),
        }
    }

    pub(crate) fn is_carved(&self, index: u32) -> bool {
        self.markets.iter().any(|m| m.manages(index))
    }

    /// A lease key verified offline with the keys of the market that
    /// manages its partition; signed by another market: `WrongBroker`.
    pub(crate) fn verify_lease_key_offline(
        &self,
        token: &str,
    ) -> Result<key::LeaseKeyClaims, KeyRejection> {
        self.verified_by_manager(
            |keys| key::decode_and_verify_trusted(token, keys),
            |claims| claims.partition_index,
        )
    }

    /// A notice verified like a lease key: by its partition's market only.
    pub(crate) fn verify_notice(&self, notice: &str) -> Result<key::NoticeClaims, KeyRejection> {
        self.verified_by_manager(
            |keys| key::decode_notice_trusted(notice, keys),
            |claims| claims.partition_index,
        )
    }

    /// The claims of the first market whose keys verify them, if that
    /// market manages their partition. A signature no market's keys verify
    /// is `BadSignature`; any other rejection (malformed, expired) is kept.
    fn verified_by_manager<C>(
        &self,
        decode: impl Fn(&TrustedKeys) -> Result<C, KeyRejection>,
        partition_of: impl Fn(&C) -> u32,
    ) -> Result<C, KeyRejection> {
        let mut last = Err(KeyRejection::BadSignature);
        for (position, market) in self.markets.iter().enumerate() {
            match decode(&market.trusted()) {
                Ok(claims) => {
                    return match self.market_of_index(partition_of(&claims)) {
                        Some(manager) if manager == position => Ok(claims),
                        _ => Err(KeyRejection::WrongBroker),
                    }
                }
                Err(KeyRejection::BadSignature) => {}
                Err(other) => last = Err(other),
            }
        }
        last
    }

    /// Asks every market whose refresh is due for its keys, and trusts
    /// those a pinned key endorsed.
    pub(crate) async fn refresh_market_keys(&self) {
        for market in self.markets.iter().filter(|m| !m.owner) {
            if !self.refresh_due(market) {
                continue;
            }
            let Ok(info) = market.client.broker_info().await else {
                continue;
            };
            let pinned = market.trusted();
            match trust::extend_trust(&pinned, &info) {
                Ok(trusted) if trusted.len() > pinned.len() => {
                    if trust::store_pinned_as(&self.db(), &market.trust_meta_key, &trusted).is_ok()
                    {
                        tracing::info!(broker = %market.url, keys = trusted.len(), "trusting a new broker key");
                        *market.keys.write().unwrap_or_else(|p| p.into_inner()) = trusted;
                    }
                }
                Ok(_) => {}
                Err(problem) => {
                    tracing::warn!(broker = %market.url, %problem, "not trusting the broker's new keys")
                }
            }
        }
    }

    fn refresh_due(&self, market: &Market) -> bool {
        let now_ms = self.config.clock.now_ms();
        let mut last = market
            .last_key_refresh_ms
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if now_ms.saturating_sub(*last) < crate::KEY_REFRESH_INTERVAL_MS {
            return false;
        }
        *last = now_ms;
        true
    }

    /// Whether `terms` fit the share of the market carving `index`, beside
    /// the partitions carved there that are not given back (not free).
    pub(crate) fn check_fits_share(&self, index: u32, terms: &Terms) -> Result<(), AgentError> {
        let Some(market) = self.markets.iter().find(|m| m.manages(index)) else {
            return Err(AgentError::Internal(format!(
                "partition {index} is in no share"
            )));
        };
        let share = market.share.as_ref().expect("a carving market has a share");
        let rows = self.db().partitions()?;
        let in_use = rows
            .iter()
            .filter(|row| row.index != index && market.manages(row.index))
            .filter(|row| row.fence.phase != FencePhase::Free)
            .map(|row| &row.terms);
        share.capacity().admits(in_use, terms).map_err(|e| {
            AgentError::Invalid(FieldError::new(
                format!("lease_key.terms.{}", e.field),
                format!(
                    "does not fit the share this host gave {}: {}",
                    market.url, e.problem
                ),
            ))
        })?;
        let given = self.config.driver.isolation();
        if terms.isolation.is_some_and(|sold| sold != given) {
            return Err(AgentError::Invalid(FieldError::new(
                "lease_key.terms.isolation",
                format!("this host's driver gives isolation '{}'", given.as_str()),
            )));
        }
        let offered = self.driver.images();
        if let Some(image) = terms.images.iter().find(|i| !offered.contains(i)) {
            return Err(AgentError::Invalid(FieldError::new(
                "lease_key.terms.images",
                format!("image '{image}' is not one this host offers"),
            )));
        }
        Ok(())
    }

    /// A key for a partition a broker carved out of this host's share that
    /// this agent has no row for yet: the row is made from the terms the
    /// key carries, once they fit the share (the agent builds exactly what
    /// the broker sold, and nothing the share cannot hold).
    pub(crate) fn ensure_carved_row(&self, claims: &key::LeaseKeyClaims) -> Result<(), AgentError> {
        let index = claims.partition_index;
        if !self.is_carved(index) || self.db().partition(index)?.is_some() {
            return Ok(());
        }
        let terms = claims.terms.clone().ok_or_else(|| {
            AgentError::Invalid(FieldError::new(
                "lease_key.terms",
                "a key for a carved partition must carry its terms",
            ))
        })?;
        self.check_fits_share(index, &terms)?;
        self.db().insert_carved_partition(index, &terms)?;
        tracing::info!(
            partition = index,
            "a broker carved a partition out of this host's share"
        );
        Ok(())
    }
}

/// How the agent confirms a key with its partition's managing broker at
/// job submission (seed 000, FIG. 15, S154-S158).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum KeyConfirmation {
    /// Ask the broker; when it cannot be reached, verify offline only and
    /// say so in the log (the default: jobs run through a broker outage).
    #[default]
    Preferred,
    /// Ask the broker; when it cannot be reached, refuse the job.
    Required,
    /// Never ask: the signature, the fence and the expiry decide.
    Offline,
}

/// How long a job waits for the broker's confirmation before the policy
/// decides.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Agent {
    /// FIG. 15: the managing broker confirms the key's lease is still the
    /// one in force (active, this partition, this epoch), so a released or
    /// superseded lease is refused at once even if its notice was lost.
    pub(crate) async fn confirm_key_with_broker(
        &self,
        claims: &key::LeaseKeyClaims,
    ) -> Result<(), AgentError> {
        if self.config.key_confirmation == KeyConfirmation::Offline {
            return Ok(());
        }
        let Some(market) = self
            .market_of_index(claims.partition_index)
            .map(|position| &self.markets[position])
            .filter(|market| !market.owner)
        else {
            return Ok(()); // direct lending: this agent is the record
        };
        let asked = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            market.client.host_lease(self.host_id(), claims.lease_id),
        )
        .await;
        let unreachable = match asked {
            Ok(Ok(lease)) => return confirm_lease_view(claims, &lease),
            Ok(Err(error)) if error.status() == Some(404) => {
                // The broker has no such lease on this host of this lender.
                tracing::warn!(lease_id = claims.lease_id, %error, "the broker does not confirm the key");
                return Err(AgentError::KeyRejected(KeyRejection::Released));
            }
            // Refused for this agent's own credential, or the broker is
            // down: the key itself is not known to be bad.
            Ok(Err(error)) => error.to_string(),
            Err(_) => format!("no answer within {} s", CONFIRM_TIMEOUT.as_secs()),
        };
        if self.config.key_confirmation == KeyConfirmation::Required {
            return Err(AgentError::Internal(format!(
                "cannot confirm the key with the broker at {} ({unreachable}); this agent requires it (--confirm-keys required)",
                market.url
            )));
        }
        tracing::warn!(
            lease_id = claims.lease_id,
            broker = %market.url,
            problem = %unreachable,
            "the broker cannot confirm the key; verified offline only (--confirm-keys preferred)"
        );
        Ok(())
    }
}

/// The broker's record against the key: the same partition and epoch, and
/// still active.
fn confirm_lease_view(
    claims: &key::LeaseKeyClaims,
    lease: &leasehold_api::LeaseView,
) -> Result<(), AgentError> {
    let same = lease.partition.host_id == claims.host_id
        && lease.partition.index == claims.partition_index;
    if !same {
        return Err(AgentError::KeyRejected(KeyRejection::WrongPartition));
    }
    if lease.state != leasehold_core::lease::LeaseState::Active {
        return Err(AgentError::KeyRejected(KeyRejection::Released));
    }
    if lease.epoch != claims.epoch {
        return Err(AgentError::KeyRejected(KeyRejection::Stale));
    }
    Ok(())
}

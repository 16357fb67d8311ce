use leasehold_core::key::KeyRejection;
use leasehold_core::lease::{Bill, LeaseState};
use leasehold_core::matching::NoMatchExplanation;
use leasehold_core::{HostCapacity, LeaseId, PartitionRef, Requirements, Terms};
use serde::{Deserialize, Serialize};

/// The header that carries an idempotency key on mutating requests.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";
/// Longest idempotency key accepted.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;
/// Largest request body either service reads.
pub const MAX_REQUEST_BODY_BYTES: usize = 1024 * 1024;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable machine-readable code, e.g. `partition_locked`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_rejection: Option<KeyRejection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<NoMatchExplanation>,
}

/// Roles are defined (and parsed) once, in core.
pub use leasehold_core::Role;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokerInfo {
    pub version: String,
    /// The key the broker signs new lease keys with.
    pub public_key_hex: String,
    pub commission_basis_points: u32,
    /// Every key whose lease keys may still be valid, oldest first; each
    /// after the first is endorsed by the one before it.
    #[serde(default)]
    pub keys: Vec<BrokerPublicKey>,
}

/// A broker signing key as agents see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BrokerPublicKey {
    pub key_id: String,
    pub public_key_hex: String,
    /// The key id of the key that endorsed this one (none for the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsed_by: Option<String>,
    /// The endorser's signature over this public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endorsement: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePrincipalRequest {
    #[schema(pattern = "^[a-z0-9][a-z0-9._-]{0,63}$")]
    pub name: String,
    pub role: Role,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PrincipalCreated {
    pub name: String,
    pub role: Role,
    /// Shown once; the broker keeps only its hash.
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: Role,
    /// For a host credential: the one host it acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_scope: Option<String>,
}

/// A host credential, shown once; the broker keeps only its hash.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostCredentialCreated {
    pub host_id: String,
    pub lender: String,
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterHostRequest {
    /// Where the agent listens, so borrowers and the broker can reach it.
    #[serde(default)]
    pub agent_url: Option<String>,
    /// With a share: this is its size, and the broker carves partitions
    /// of it at lease time; without, the host's whole capacity.
    pub capacity: HostCapacity,
    /// A share to carve from (seed 000, FIG. 12-15) instead of fixed
    /// partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<leasehold_core::share::ShareOffer>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HostView {
    pub host_id: String,
    pub lender: String,
    pub agent_url: Option<String>,
    pub capacity: HostCapacity,
    pub partitions: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterPartitionRequest {
    pub terms: Terms,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PartitionView {
    pub partition: PartitionRef,
    pub terms: Terms,
    pub lease_id: Option<LeaseId>,
    pub withdrawn: bool,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FindRequest {
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub limit: Option<u32>,
}

pub const DEFAULT_FIND_LIMIT: u32 = 10;
pub const MAX_FIND_LIMIT: u32 = 1000;

impl FindRequest {
    /// The requirements checked and the `limit` defaulted, or the refusal
    /// naming the field: what the broker's and a direct agent's find need.
    pub fn checked_limit(&self) -> Result<u32, leasehold_core::FieldError> {
        self.requirements.validate().map_err(|e| {
            leasehold_core::FieldError::new(format!("requirements.{}", e.field), e.problem)
        })?;
        let limit = self.limit.unwrap_or(DEFAULT_FIND_LIMIT);
        if limit == 0 || limit > MAX_FIND_LIMIT {
            return Err(leasehold_core::FieldError::new(
                "limit",
                format!("{limit} is out of range; must be between 1 and {MAX_FIND_LIMIT}"),
            ));
        }
        Ok(limit)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Offer {
    pub partition: PartitionRef,
    pub terms: Terms,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FindResponse {
    pub offers: Vec<Offer>,
    /// Shares that would carve a partition of exactly the asked size
    /// (seed 000, FIG. 12-15), with their per-unit prices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<leasehold_core::share::ShareQuote>,
    /// Present when nothing matched: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub explanation: Option<NoMatchExplanation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    /// A named partition (`host/index`); or leave it out and give `best`.
    #[serde(default)]
    pub partition: Option<String>,
    /// Requirements: lease the best match.
    #[serde(default)]
    pub best: Option<Requirements>,
    /// With `partition`: the borrower accepts it even if it is unisolated
    /// (with `best`, `best.allow_unisolated` says so).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_unisolated: bool,
    /// Book the lease ahead for `[start, end)` (RFC 3339, both or neither):
    /// billed from the start, its key valid only inside the window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LeaseView {
    pub lease_id: LeaseId,
    pub partition: PartitionRef,
    pub borrower: String,
    pub lender: String,
    pub terms: Terms,
    pub epoch: u64,
    pub state: LeaseState,
    pub started_at_ms: u64,
    pub key_expires_at_ms: u64,
    pub release_requested_at_ms: Option<u64>,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub charge_micros: Option<u64>,
    /// Where to submit jobs (the host's agent).
    pub agent_url: Option<String>,
    /// The lease key; shown to the borrower (and admins) while active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_key: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReleaseReceipt {
    pub lease: LeaseView,
    /// The bill written to the ledger when this lease ended.
    pub bill: Bill,
    /// True when the lease had ended before this request: nothing more was billed.
    pub already_released: bool,
    /// True when the host's agent confirmed it fenced the lease's key (or
    /// the lease was released before). False: the broker keeps retrying,
    /// and the key stays refused by its expiry in any case.
    pub agent_notified: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BillView {
    pub principal: String,
    pub role: Role,
    pub leases: Vec<LeaseView>,
    /// Credits minus debits over this principal's accounts, in micros.
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub balance_micros: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerEntry {
    pub transfer_id: u64,
    pub lease_id: LeaseId,
    pub debit_account: String,
    pub credit_account: String,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub amount_micros: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LedgerView {
    pub transfers: Vec<LedgerEntry>,
    pub balances: Vec<AccountBalance>,
    /// Sum of the balances shown; zero over the whole ledger (admins).
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub sum_micros: i64,
    /// Usage rights (seed 004) moved between the hosts of share groups,
    /// newest first (admins only).
    #[serde(default)]
    pub rights_movements: Vec<AssetMovementEntry>,
    /// Rights per account (admins only); they sum to zero.
    #[serde(default)]
    pub rights_balances: Vec<AccountBalance>,
}

/// One double-entry movement of an asset other than money (whole units).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AssetMovementEntry {
    pub movement_id: u64,
    pub asset: String,
    pub debit_account: String,
    pub credit_account: String,
    pub amount: u64,
    pub at_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountBalance {
    pub account: String,
    /// Money, in integer micro-units (1,000,000 micro-units = 1 unit of currency).
    pub balance_micros: i64,
}

/// A notice the broker sends an agent, signed like a lease key.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NoticeRequest {
    pub notice: String,
}

/// One released lease of a host: its signed release notice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Revocation {
    /// The release's place in the broker's order of releases.
    pub seq: u64,
    pub lease_id: u64,
    /// The same token the broker pushes to `POST /v1/notices`.
    pub notice: String,
}

/// A page of a host's revocations (`GET /v1/hosts/{id}/revocations`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct RevocationPage {
    pub revocations: Vec<Revocation>,
    /// Ask again with `after_seq` set to this to read on.
    pub next_after_seq: u64,
    /// Whether more revocations follow this page.
    pub more: bool,
}

/// Most revocations in one page.
pub const MAX_REVOCATION_PAGE: u32 = 1000;

// ---- agent ----

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentInfo {
    pub host_id: String,
    pub driver: String,
    pub images: Vec<String>,
    pub capacity: HostCapacity,
    pub broker_url: String,
    /// What the owner's own work uses now (its trace on a `sim` host, else
    /// its share), kept out of what is lent and guaranteed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_used: Option<leasehold_core::reservation::Capacity>,
    /// What pools and started instances hold on this host, as the broker
    /// answered the last sample; absent until it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guaranteed: Option<leasehold_core::reservation::Capacity>,
    /// When (agent's clock, ms) the broker last answered a sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampled_at_ms: Option<u64>,
    /// Every broker this host lends through and what each manages (seed
    /// 000, FIG. 10); the first is `broker_url`.
    #[serde(default)]
    pub markets: Vec<AgentMarketView>,
}

/// A broker a host lends through: its fixed partitions, or a share.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentMarketView {
    pub broker_url: String,
    /// The share this broker carves from; absent: it manages the host's
    /// fixed partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<ShareSize>,
    /// The partition indexes it carves in (share markets), both included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_index: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_index: Option<u32>,
}

/// The size of a share, in the terms' own field names.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShareSize {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub price_per_vcpu_hour_micros: u64,
    pub price_per_memory_gib_hour_micros: u64,
    pub price_per_disk_gib_hour_micros: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LendingFlag {
    /// In the partition table, not (yet) registered with the broker.
    Unregistered,
    /// Registered with the broker: lendable.
    Registered,
}

/// A row of the agent's partition table (FIG. 2).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AgentPartitionView {
    pub partition: PartitionRef,
    pub terms: Terms,
    /// The broker that manages it (FIG. 10's external reference): its
    /// terms are that broker's record, its keys that broker's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    pub lending_flag: LendingFlag,
    pub epoch: u64,
    pub lease_id: Option<LeaseId>,
    pub released_through_epoch: u64,
    pub built: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPartitionRequest {
    pub terms: Terms,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJobRequest {
    pub lease_key: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// The image to boot; the partition's first image when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Answer with a stream of newline-delimited JSON events (live output,
    /// then the result) instead of one JSON document at the end.
    #[serde(default)]
    pub stream: bool,
}

/// One line of a streamed job answer.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    /// The agent accepted the job; its id, to cancel it.
    Started {
        job_id: u64,
    },
    Stdout {
        data: String,
    },
    Stderr {
        data: String,
    },
    Result {
        result: JobResult,
    },
    Error {
        error: ErrorDetail,
    },
}

pub const MAX_COMMAND_ARGS: usize = 256;
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The job states live in core, named once (`as_str`, `FromStr`).
pub use leasehold_core::job::JobState;

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    pub job_id: u64,
    pub lease_id: LeaseId,
    pub partition: PartitionRef,
    pub state: JobState,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// True when output beyond the capture limit was dropped.
    pub output_truncated: bool,
    pub wall_ms: u64,
    /// CPU time used, from cgroup accounting (oci driver).
    #[serde(default)]
    pub cpu_ms: Option<u64>,
    /// Peak memory of the partition while the job ran (oci driver).
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    /// True when the kernel killed the job for exceeding its memory.
    #[serde(default)]
    pub oom_killed: bool,
}

// ---- direct lending (an agent without a broker) ----

/// The owner grants a borrower the right to lease at this agent.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectGrantRequest {
    /// The borrower's name (letters, digits, '-', '_', '.').
    #[schema(min_length = 1, max_length = 64)]
    pub name: String,
}

/// A grant made or taken back.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DirectGrant {
    pub name: String,
    /// The borrower's credential, shown once when granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Leases of the borrower that a revocation ended.
    pub leases_released: u64,
}

/// A direct lease: a partition by index, or the best for requirements.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DirectLeaseRequest {
    #[serde(default)]
    pub partition: Option<u32>,
    #[serde(default)]
    pub best: Option<Requirements>,
    /// How long the key lasts, in seconds (default a day, at most 30 days).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub key_ttl_secs: Option<u64>,
}

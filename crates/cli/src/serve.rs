//! The long-running commands: `up` (broker + local agent), `broker`, `agent`.

use crate::{default_data_dir, parse_listen, DriverChoice, Global, OutputFormat};
use anyhow::{anyhow, Context, Result};
use clap::Args;
use leasehold_agent::driver::DriverKind;
use leasehold_agent::AgentConfig;
use leasehold_api::Role;
use leasehold_broker::BrokerConfig;
use leasehold_core::{HostCapacity, Terms};
use leasehold_service::{FileClock, SharedClock, SystemClock};
use leasehold_store::{private_fs, Durability};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a server is reached: over TLS with a given certificate, or plain
/// HTTP, which is allowed beyond loopback only when asked for.
#[derive(Args, Clone)]
pub struct TlsArgs {
    /// Serve TLS with this certificate chain (PEM, the server's certificate
    /// first); needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM); refused when group or others
    /// can read it.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP on an address that is not loopback anyway: tokens
    /// and lease keys then cross the network in clear. Without TLS, only
    /// loopback addresses (127.0.0.0/8, ::1) are served otherwise.
    #[arg(long)]
    pub insecure_http: bool,
}

impl TlsArgs {
    /// The identity given with --tls-cert/--tls-key, if any.
    fn given_identity(&self) -> Result<Option<leasehold_service::ServerTls>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        leasehold_service::ServerTls::from_pem_files(cert, key)
            .map(Some)
            .context("failed to load --tls-cert/--tls-key")
    }

    /// The given identity, after checking that `listen` may be served
    /// without one.
    pub(crate) fn identity_for(
        &self,
        what: &str,
        listen: SocketAddr,
    ) -> Result<Option<leasehold_service::ServerTls>> {
        let identity = self.given_identity()?;
        check_listen_address(what, listen, identity.is_some(), self.insecure_http)?;
        Ok(identity)
    }
}

/// Plain HTTP only on loopback, which no other machine reaches: elsewhere
/// tokens and lease keys would cross the network in clear, so it takes TLS
/// or an explicit --insecure-http (and a warning).
pub fn check_listen_address(
    what: &str,
    listen: SocketAddr,
    tls: bool,
    insecure_http: bool,
) -> Result<()> {
    if tls || leasehold_service::tls::is_loopback(&listen) {
        return Ok(());
    }
    if insecure_http {
        tracing::warn!(
            "the {what} serves plain HTTP on {listen} (--insecure-http): tokens and lease keys cross the network in clear"
        );
        return Ok(());
    }
    Err(anyhow!(
        "refusing to serve the {what} in plain HTTP on {listen}, which is not a loopback address: tokens and lease keys would cross the network in clear; give it a certificate with --tls-cert FILE --tls-key FILE, or pass --insecure-http to serve plain HTTP anyway"
    ))
}

/// The clock a service reads: the system's, or (tests only, hidden from
/// `--help`) a file the test writes the time into.
#[derive(Args, Clone, Default)]
pub struct ClockArgs {
    /// Test only: read the time (milliseconds since 1970) from FILE, which
    /// must be yours and 0600, instead of the system clock; end-to-end tests
    /// move it to expire keys and bill exact durations without waiting.
    #[arg(long, hide = true, value_name = "FILE")]
    pub simulated_clock_file: Option<PathBuf>,
}

impl ClockArgs {
    /// The one place the processes of this binary pick their clock.
    pub fn clock(&self) -> Result<SharedClock> {
        let Some(path) = &self.simulated_clock_file else {
            return Ok(Arc::new(SystemClock));
        };
        let clock = FileClock::open(path).context("failed to use --simulated-clock-file")?;
        tracing::warn!(file = %path.display(), "the time is read from a simulated clock file (tests only)");
        Ok(Arc::new(clock))
    }
}

/// How the broker's planner of seed 003 gathers capacity for workloads.
#[derive(Args, Clone)]
pub struct PlanArgs {
    /// Seconds between planning rounds: each round a ramping pool raises
    /// its guarantee by at most one step; also the unit of the forecast.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub plan_interval_secs: u64,
    /// Hosts that ramp for one instance at once; the first to hold the
    /// whole target is kept and the others released (seed 003, S903-S904).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=16))]
    pub plan_candidates: u64,
    /// Rounds in a row without gain before an instance is warned about.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub plan_fruitless_rounds: u32,
    /// At an instance's start, hand its pool's capacity over a step per
    /// interval (the pool's guarantee falling as the instance's rises,
    /// seed 003 FIG. 22) instead of in one change.
    #[arg(long)]
    pub plan_gradual_handover: bool,
}

impl PlanArgs {
    pub fn policy(&self) -> leasehold_core::reservation::planner::PlanPolicy {
        leasehold_core::reservation::planner::PlanPolicy {
            interval_ms: self.plan_interval_secs.saturating_mul(1000),
            threshold: None,
            step: None,
            candidates: self.plan_candidates as usize,
            fruitless_limit: self.plan_fruitless_rounds,
            gradual_handover: self.plan_gradual_handover,
        }
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BrokerArgs {
    #[command(subcommand)]
    pub action: Option<BrokerAction>,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Where the broker keeps its SQLite database.
    #[arg(long, default_value_os_t = default_data_dir().join("broker"))]
    pub data_dir: PathBuf,
    /// The broker's commission on every charge, in basis points (100 = 1%).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10000))]
    pub commission_basis_points: u32,
    /// How long a lease key stays valid, in seconds (0 makes keys that are
    /// expired at once).
    #[arg(long, default_value_t = leasehold_broker::DEFAULT_KEY_TTL_MS / 1000)]
    pub key_ttl_secs: u64,
    /// `full` fsyncs every commit (an acknowledged lease survives a power
    /// cut); `normal` survives only a process crash (tests, simulations).
    #[arg(long, default_value = "full", value_parser = ["full", "normal"])]
    pub durability: String,
    /// The image store (`leasehold images serve`) whose digests partitions'
    /// images are pinned to: registering an image it does not have is
    /// refused. Without it images are kept as given (simulations).
    #[arg(long)]
    pub image_store: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Keep the broker's state in PostgreSQL instead of SQLite in
    /// --data-dir: a `postgres://user@host:port/database` URL without a
    /// password (trust or peer authentication, or ~/.pgpass). A URL with a
    /// password is a secret and is refused here, where every local user can
    /// read it: use --database-url-file or LEASEHOLD_DATABASE_URL.
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// A file only you can read (mode 0600) holding the PostgreSQL URL.
    #[arg(long, value_name = "FILE", conflicts_with = "database")]
    pub database_url_file: Option<PathBuf>,
    /// On the first start, write the admin token to this file (created
    /// 0600) instead of printing it: under a supervisor, stdout goes to a
    /// log that others may read.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Another broker of the same database (repeat for each): the brokers
    /// of one PostgreSQL database elect one active broker through it, the
    /// others stand by and take over within --leadership-ttl-ms when it
    /// dies. Shown by `leasehold broker status`; give clients and agents
    /// every address as --broker URL,URL.
    #[arg(long = "peer", value_name = "URL", value_parser = crate::parse_url)]
    pub peers: Vec<String>,
    /// How long the active broker's leadership lasts without renewal (it
    /// renews every third of it): a standby takes over this long after the
    /// active broker dies.
    #[arg(long, default_value_t = leasehold_broker::leadership::DEFAULT_LEADERSHIP_TTL_MS,
          value_parser = clap::value_parser!(u64).range(leasehold_broker::leadership::MIN_LEADERSHIP_TTL_MS..=600_000))]
    pub leadership_ttl_ms: u64,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub clock: ClockArgs,
    #[command(flatten)]
    pub operator: crate::logging::OperatorArgs,
}

#[derive(clap::Subcommand)]
pub enum BrokerAction {
    /// Whether each broker at --broker (URL or URL,URL,...) is the active
    /// one of its database or a standby, with its leadership epoch and since
    /// when.
    Status,
    /// Add a new signing key, endorsed by the current one. Restart the
    /// broker to sign new lease keys with it; keys signed by older keys stay
    /// valid until they expire, and agents learn the new key by its
    /// endorsement.
    RotateKey(RotateKeyArgs),
}

#[derive(Args)]
pub struct RotateKeyArgs {
    /// The broker's data directory (where `keys/` is).
    #[arg(long, default_value_os_t = default_data_dir().join("broker"))]
    pub data_dir: PathBuf,
}

#[derive(Args)]
pub struct HostShape {
    /// CPUs this host has (default: what the OS reports).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory this host has, MiB (default: from /proc/meminfo).
    #[arg(long)]
    pub memory_mib: Option<u64>,
    /// Disk this host can lend, GiB.
    #[arg(long, default_value_t = 20)]
    pub disk_gib: u64,
    /// CPU the owner keeps and never lends, in hundredths of a core.
    #[arg(long, default_value_t = 50)]
    pub owner_share_centicores: u64,
    /// Memory the owner keeps, MiB (default: a quarter of the host's).
    #[arg(long)]
    pub owner_share_memory_mib: Option<u64>,
    /// Disk the owner keeps, GiB.
    #[arg(long, default_value_t = 1)]
    pub owner_share_disk_gib: u64,
}

impl HostShape {
    fn capacity(&self) -> HostCapacity {
        let cpus = self.cpus.map(|c| c as u64).unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get() as u64)
                .unwrap_or(1)
        });
        let memory_mib = self.memory_mib.unwrap_or_else(host_memory_mib);
        HostCapacity {
            cpu_centicores: cpus * 100,
            memory_mib,
            disk_gib: self.disk_gib,
            owner_share_cpu_centicores: self.owner_share_centicores.min(cpus * 100),
            owner_share_memory_mib: self
                .owner_share_memory_mib
                .unwrap_or(memory_mib / 4)
                .min(memory_mib),
            owner_share_disk_gib: self.owner_share_disk_gib.min(self.disk_gib),
        }
    }
}

fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(1024)
}

/// The share group whose usage rights this agent manages (seed 004).
#[derive(Args, Clone)]
pub struct GroupArgs {
    /// Manage this host's usage rights in the share group NAME (seed
    /// 004), with the group's other managers: by default its table is kept
    /// by the broker; see --group-store.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
    /// Keep the group's table in a store the managers share directly
    /// instead of the broker's: an SQLite file (the hosts of one machine)
    /// or a `postgres://` URL without a password (a group spread over
    /// machines).
    #[arg(long, value_name = "FILE|URL", requires = "group")]
    pub group_store: Option<String>,
    /// `centralized`: one primary manager coordinates transfers between
    /// hosts; `federated`: the requesting host's manager does.
    #[arg(long, default_value = "centralized", value_parser = ["centralized", "federated"])]
    pub group_mode: String,
    /// Usage rights this host owns when it first joins a group kept in
    /// --group-store (default: none; its cores stay inactive until rights
    /// are granted or borrowed). Where the broker keeps the table, only an
    /// admin adds rights: `leasehold rights grant`.
    #[arg(long, value_name = "N", requires = "group_store")]
    pub rights: Option<u32>,
    /// Start as the back-up manager of this host (seed 004, FIG. 6): wait
    /// while the host's manager lives, then take over its data directory
    /// and its place in the group.
    #[arg(long, requires = "group")]
    pub standby: bool,
    /// Seize the rights of a group member whose manager has been silent
    /// this long, in seconds (FIG. 8).
    #[arg(long, value_name = "SECS", default_value_t = leasehold_agent::rights::DEFAULT_SEIZE_AFTER_MS / 1000, requires = "group")]
    pub group_grace_secs: u64,
    /// Request one more module for a partition (the owner share too)
    /// whose active modules stay at least this busy, in percent, for
    /// --rights-auto-after-secs (seed 004, FIG. 5, 510).
    #[arg(long, value_name = "PERCENT", value_parser = clap::value_parser!(u32).range(1..=100), requires = "group")]
    pub rights_auto_above: Option<u32>,
    /// How long a partition stays busy before a module is requested.
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        requires = "rights_auto_above"
    )]
    pub rights_auto_after_secs: u64,
}

impl GroupArgs {
    fn config(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<Option<leasehold_agent::rights::RightsConfig>> {
        let Some(group) = &self.group else {
            return Ok(None);
        };
        leasehold_core::reservation::workload::check_name("group", group)
            .map_err(|e| anyhow!("--group: {}", e.problem))?;
        let store = self
            .group_store
            .as_ref()
            .map(|store| self.direct_store(store))
            .transpose()?;
        let mode = match self.group_mode.as_str() {
            "federated" => leasehold_core::rights::GroupMode::Federated,
            _ => leasehold_core::rights::GroupMode::Centralized,
        };
        Ok(Some(leasehold_agent::rights::RightsConfig {
            group: group.clone(),
            mode,
            store,
            owned_rights: self.rights,
            copy_path: data_dir.join("share-group-copy.json"),
            loans_path: data_dir.join("share-group-loans.sqlite"),
            standby: self.standby,
            seize_after_ms: self.group_grace_secs.saturating_mul(1000),
            auto_request: self.rights_auto_above.map(|above_percent| {
                leasehold_agent::rights::workload::AutoRequest {
                    above_percent,
                    after_ms: self.rights_auto_after_secs.saturating_mul(1000),
                }
            }),
        }))
    }

    fn direct_store(&self, store: &String) -> Result<leasehold_store::BrokerDatabase> {
        Ok(if leasehold_store::is_postgres_url(store) {
            // A password here would be visible to every local user.
            let userinfo = store
                .split("://")
                .nth(1)
                .and_then(|rest| rest.split_once('@'))
                .map(|(user, _)| user);
            if userinfo.is_some_and(|user| user.contains(':')) {
                return Err(anyhow!("--group-store: a URL with a password is a secret and is refused on the command line; use trust, peer or ~/.pgpass authentication"));
            }
            leasehold_store::BrokerDatabase::Postgres(store.clone())
        } else {
            leasehold_store::BrokerDatabase::Sqlite(PathBuf::from(store))
        })
    }
}

/// How an agent samples its host for the broker's reservations (seed 003).
#[derive(Args, Clone)]
pub struct SamplingArgs {
    /// How often the agent tells the broker what the owner's own work uses
    /// on this host, in seconds (sooner when the broker asks, as a
    /// reservation's start nears).
    #[arg(long, default_value_t = leasehold_agent::DEFAULT_SAMPLE_INTERVAL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub sample_interval_secs: u64,
    /// With --driver sim: the owner's own work, as CSV lines
    /// `offset_seconds,vcpus,memory_mib` (vcpus may be fractional; `#`
    /// comments and blank lines allowed): from each offset after the agent
    /// starts it uses that much, until the next line. It never takes what
    /// is lent or what the broker guarantees to reservations. Without it the
    /// owner uses its share.
    #[arg(long, value_name = "FILE", conflicts_with = "owner_cgroup")]
    pub owner_load: Option<PathBuf>,
    /// With --driver oci: the cgroup the owner's own work runs in (e.g.
    /// `owner`, made in each hierarchy if missing). The agent reports its
    /// usage and lowers its limits, memory one step per sample and never
    /// below the owner share, to keep it out of what is guaranteed to
    /// reservations.
    #[arg(long, value_name = "PATH")]
    pub owner_cgroup: Option<String>,
}

impl SamplingArgs {
    fn config(&self) -> leasehold_agent::SamplingConfig {
        leasehold_agent::SamplingConfig {
            interval_ms: self.sample_interval_secs.saturating_mul(1000),
            owner_load_file: self.owner_load.clone(),
            owner_cgroup: self.owner_cgroup.clone(),
        }
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AgentArgs {
    #[command(subcommand)]
    pub action: Option<AgentAction>,
    /// Lend without any broker (direct lending inside one organisation):
    /// the owner grants borrowers with `leasehold agent grant NAME`, they
    /// find and lease here with `--agent URL`, and this agent signs their
    /// keys with the owner's own key (DATA_DIR/owner-signing-key). Nothing
    /// is billed. The owner's token is --token-file / LEASEHOLD_TOKEN, or
    /// DATA_DIR/owner.token, made on first start.
    #[arg(long)]
    pub direct: bool,
    /// Before a job runs, ask the partition's managing broker whether the
    /// key's lease is still in force (seed 000, FIG. 15): `preferred` asks
    /// and, when the broker cannot be reached within 2 s, verifies offline
    /// only and logs it; `required` refuses the job then; `offline` never
    /// asks (signature, fence and expiry decide).
    #[arg(long, value_enum, default_value = "preferred")]
    pub confirm_keys: ConfirmKeys,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7071")]
    pub listen: SocketAddr,
    /// Where the agent keeps its partition table and partitions.
    #[arg(long, default_value_os_t = default_data_dir().join("agent"))]
    pub data_dir: PathBuf,
    /// This host's id at the broker (default: a name derived from the hostname).
    #[arg(long)]
    pub host_id: Option<String>,
    /// How partitions are built.
    #[arg(long, value_enum, default_value = "auto")]
    pub driver: DriverChoice,
    /// Images the `sim` driver pretends to boot (repeat).
    #[arg(long = "sim-image", default_values_t = vec!["busybox".to_string(), "debian-12".to_string()])]
    pub sim_images: Vec<String>,
    /// Images the `oci` or `vm` driver offers (repeat); fetched from
    /// --image-store. Default: `busybox` (oci), `debian-vm` (vm).
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// The image store agents fetch images from (`leasehold images serve`).
    #[arg(long, env = "LEASEHOLD_IMAGE_STORE")]
    pub image_store: Option<String>,
    /// The URL others use to reach this agent (default: http://LISTEN, or
    /// https://LISTEN with --tls-cert).
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// How often to ask the broker for this host's released leases, in case
    /// a release notice did not arrive: an old key stays usable at most this
    /// long after a lost notice.
    #[arg(long, default_value_t = leasehold_agent::DEFAULT_REVOCATION_POLL_SECS,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub revocation_poll_secs: u64,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub group: GroupArgs,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[command(flatten)]
    pub shape: HostShape,
    #[command(flatten)]
    pub clock: ClockArgs,
    #[command(flatten)]
    pub operator: crate::logging::OperatorArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ConfirmKeys {
    Preferred,
    Required,
    Offline,
}

impl ConfirmKeys {
    fn policy(self) -> leasehold_agent::markets::KeyConfirmation {
        use leasehold_agent::markets::KeyConfirmation;
        match self {
            ConfirmKeys::Preferred => KeyConfirmation::Preferred,
            ConfirmKeys::Required => KeyConfirmation::Required,
            ConfirmKeys::Offline => KeyConfirmation::Offline,
        }
    }
}

#[derive(clap::Subcommand)]
pub enum AgentAction {
    /// Direct lending: let borrower NAME lease at the agent (one started
    /// with --direct); prints its token once. Uses the owner's token.
    Grant {
        name: String,
        #[command(flatten)]
        agent: crate::verbs::AgentArg,
    },
    /// Direct lending: take NAME's grant back; its leases end at once.
    Revoke {
        name: String,
        #[command(flatten)]
        agent: crate::verbs::AgentArg,
    },
}

#[derive(Args)]
pub struct UpArgs {
    /// Address of the broker (port 0 picks a free port).
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address of the local agent.
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7071")]
    pub agent_listen: SocketAddr,
    /// Where everything is kept; starting again on it resumes.
    #[arg(long, default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Partitions to lend on first start (each 1 vCPU at 50%, 256 MiB, 1 GiB).
    #[arg(long, default_value_t = 3)]
    pub partitions: u32,
    /// How partitions are built.
    #[arg(long, value_enum, default_value = "auto")]
    pub driver: DriverChoice,
    /// Where the built-in image store listens (for the `oci` and `vm` drivers).
    #[arg(long, value_parser = parse_listen, default_value = "127.0.0.1:7072")]
    pub image_store_listen: SocketAddr,
    /// The broker's commission, in basis points.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=10000))]
    pub commission_basis_points: u32,
    /// Serve TLS even on loopback, with a certificate from a local CA kept
    /// in DATA_DIR/tls (made on first use; its certificate, `ca_cert` in the
    /// ready line, is what clients give as --ca-cert). A listen address that
    /// is not loopback does this by itself, unless --tls-cert or
    /// --insecure-http is given.
    #[arg(long)]
    pub tls: bool,
    #[command(flatten)]
    pub tls_args: TlsArgs,
    #[command(flatten)]
    pub shape: HostShape,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[command(flatten)]
    pub clock: ClockArgs,
    #[command(flatten)]
    pub operator: crate::logging::OperatorArgs,
}

fn durability(text: &str) -> Durability {
    if text == "normal" {
        Durability::Normal
    } else {
        Durability::Full
    }
}

fn default_host_id() -> String {
    let raw = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if cleaned.is_empty()
        || !cleaned
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        "local".to_string()
    } else {
        cleaned
    }
}

/// What the agent will build partitions with, and why.
struct DriverPlan {
    kind: DriverKind,
    reason: String,
}

/// Where the agent fetches images, and the certificates it accepts there.
struct ImageStoreAccess {
    url: Option<String>,
    trust: leasehold_api::ServerTrust,
}

/// The images an agent offers when none are given: what its driver boots.
pub fn default_images(choice: DriverChoice) -> Vec<String> {
    match choice {
        DriverChoice::Vm => vec![DEFAULT_VM_IMAGE.to_string()],
        _ => vec!["busybox".to_string()],
    }
}

/// The OS image `up --driver vm` builds and offers.
const DEFAULT_VM_IMAGE: &str = "debian-vm";

/// The agent's cache of the image store, with the offered images pinned to
/// digests now, so that the terms registered name digests and no job asks
/// the store about a name.
async fn cached_images(
    data_dir: &Path,
    offered: Vec<String>,
    image_store: &ImageStoreAccess,
) -> Result<Arc<leasehold_agent::images::CachedImages>> {
    let cache = leasehold_images::ImageCache::with_trust(
        &data_dir.join("image-cache"),
        image_store.url.clone(),
        &image_store.trust,
    )
    .context("failed to open the image cache")?;
    let images = leasehold_agent::images::CachedImages::pinned(cache, offered)
        .await
        .context("failed to pin the offered images to digests")?;
    Ok(Arc::new(images))
}

/// The `vm` driver, when this host can run it; its ready line says
/// whether VMs run on KVM or TCG, and why.
async fn plan_vm_driver(
    data_dir: &Path,
    host_id: &str,
    offered: Vec<String>,
    image_store: &ImageStoreAccess,
    precondition: Result<(), String>,
) -> Result<DriverPlan> {
    leasehold_agent::driver::vm::probe()
        .and(precondition)
        .map_err(|reason| anyhow!("failed to use the vm driver: {reason}"))?;
    let (acceleration, why) = leasehold_agent::driver::vm::detect_acceleration();
    Ok(DriverPlan {
        kind: DriverKind::Vm {
            root_dir: data_dir.join("vm"),
            instance: leasehold_agent::instance_name(host_id, data_dir),
            images: cached_images(data_dir, offered, image_store).await?,
            acceleration,
        },
        reason: format!("chosen with --driver vm; VMs run on {why}"),
    })
}

/// Picks the driver: `auto` takes `oci` where this host can run it (and,
/// for `up`, where the busybox image can be made), and otherwise refuses.
async fn plan_driver(
    choice: DriverChoice,
    data_dir: &Path,
    host_id: &str,
    sim_images: Vec<String>,
    oci_images: Vec<String>,
    image_store: ImageStoreAccess,
    oci_precondition: Result<(), String>,
) -> Result<DriverPlan> {
    let process = |reason: String| DriverPlan {
        kind: DriverKind::Process {
            root_dir: data_dir.join("partitions"),
        },
        reason,
    };
    let oci = |reason: String| async {
        Ok(DriverPlan {
            kind: DriverKind::Oci {
                root_dir: data_dir.join("oci"),
                instance: leasehold_agent::instance_name(host_id, data_dir),
                images: cached_images(data_dir, oci_images.clone(), &image_store).await?,
            },
            reason,
        })
    };
    let usable = || leasehold_agent::driver::oci::probe().and(oci_precondition.clone());
    match choice {
        DriverChoice::Sim => Ok(DriverPlan {
            kind: DriverKind::Sim { images: sim_images },
            reason: "chosen with --driver sim".into(),
        }),
        DriverChoice::Process => Ok(process("chosen with --driver process".into())),
        DriverChoice::Vm => {
            let precondition = oci_precondition.clone();
            plan_vm_driver(data_dir, host_id, oci_images, &image_store, precondition).await
        }
        DriverChoice::Oci => match usable() {
            Ok(()) => oci("chosen with --driver oci".into()).await,
            Err(reason) => Err(anyhow!("failed to use the oci driver: {reason}")),
        },
        // Never a silent fallback to the unisolated `process` driver: a
        // borrower who was promised a container must get one.
        DriverChoice::Auto => match usable() {
            Ok(()) => oci("auto: runc, cgroups and loop devices are usable here".into()).await,
            Err(reason) => Err(anyhow!(
                "failed to pick a driver: the isolating oci driver cannot run here ({reason}); fix that, or choose `--driver process` to lend UNISOLATED partitions (jobs run as plain processes that can read this host's files), or `--driver sim` to simulate"
            )),
        },
    }
}

/// Prints a service's ready line. A service outlives whoever read its
/// first line (a standby broker prints another when it becomes active), so
/// a closed stdout is no reason to stop.
fn print_ready(global: &Global, value: serde_json::Value, text: String) {
    use std::io::Write;
    let line = if global.output == OutputFormat::Json {
        value.to_string()
    } else {
        text
    };
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

pub async fn broker(global: &Global, args: BrokerArgs) -> Result<i32> {
    match &args.action {
        Some(BrokerAction::RotateKey(rotate)) => return rotate_key(global, rotate),
        Some(BrokerAction::Status) => return broker_status(global).await,
        None => {}
    }
    let tls = args.tls.identity_for("broker", args.listen)?;
    let clock = args.clock.clock()?;
    let database_url = match database_url(&args) {
        Ok(url) => url,
        Err(problem) => {
            eprintln!("leasehold: {problem}");
            return Ok(2);
        }
    };
    // Which engine, never the URL itself (it may carry a password).
    let database = if database_url.is_some() {
        "postgresql"
    } else {
        "sqlite"
    };
    if let Err(problem) = check_admin_token_file(&args) {
        eprintln!("leasehold: {problem}");
        return Ok(2);
    }
    let leadership = leasehold_broker::leadership::LeadershipConfig {
        ttl_ms: args.leadership_ttl_ms,
        peers: args.peers.clone(),
    };
    let mut on_standby = |status: &leasehold_api::broker_status::BrokerStatus| {
        print_standing_by(global, status, database)
    };
    let running = leasehold_broker::start_with_leadership(
        BrokerConfig {
            data_dir: args.data_dir.clone(),
            listen: args.listen,
            durability: durability(&args.durability),
            commission_basis_points: args.commission_basis_points,
            key_ttl_ms: args.key_ttl_secs.saturating_mul(1000),
            clock,
            image_store_url: args.image_store.clone(),
            tls,
            client_trust: global.server_trust.clone(),
            database_url,
            store_layer: None,
            plan_policy: args.plan.policy(),
            run_planner: true,
            metrics_public: args.operator.metrics_public,
        },
        leadership,
        &mut on_standby,
    )
    .await
    .context("failed to start the broker")?;
    print_active(global, &running, &args, database)?;
    running
        .wait()
        .await
        .context("the broker stopped with an error")?;
    Ok(0)
}

/// Checked before the first admin is made: a token that cannot be written
/// after would be lost with the admin already in place.
fn check_admin_token_file(args: &BrokerArgs) -> Result<(), String> {
    let Some(path) = &args.admin_token_file else {
        return Ok(());
    };
    let parent_exists = path
        .parent()
        .is_none_or(|p| p.as_os_str().is_empty() || p.is_dir());
    if !parent_exists {
        return Err(format!(
            "--admin-token-file {}: its directory does not exist",
            path.display()
        ));
    }
    private_fs::check_private_file(path).map_err(|e| format!("--admin-token-file: {e}"))
}

/// The ready line of the active broker; on its first start, the admin
/// token shown once or written to --admin-token-file.
fn print_active(
    global: &Global,
    running: &leasehold_broker::RunningBroker,
    args: &BrokerArgs,
    database: &str,
) -> Result<()> {
    let url = running.url();
    let epoch = running.status().epoch;
    let mut text = format!(
        "broker listening on {url} ({database}; data in {}; active, epoch {epoch})",
        args.data_dir.display()
    );
    let shown_token = match (&running.bootstrap_admin_token, &args.admin_token_file) {
        (Some(token), Some(path)) => {
            private_fs::write_private_file(path, format!("{token}\n").as_bytes()).with_context(
                || format!("failed to write --admin-token-file {}", path.display()),
            )?;
            text.push_str(&format!(
                "\nfirst start: admin token written to {} (0600)",
                path.display()
            ));
            None
        }
        (Some(token), None) => {
            text.push_str(&format!("\nfirst start: admin token (shown once): {token}"));
            Some(token.clone())
        }
        (None, _) => None,
    };
    print_ready(
        global,
        serde_json::json!({"broker_url": url, "data_dir": args.data_dir, "database": database, "admin_token": shown_token, "admin_token_file": args.admin_token_file, "role": "active", "epoch": epoch}),
        text,
    );
    Ok(())
}

/// The ready line of a broker that stands by (it prints another when it
/// becomes active).
fn print_standing_by(
    global: &Global,
    status: &leasehold_api::broker_status::BrokerStatus,
    database: &str,
) {
    let active = status.active_url.as_deref().unwrap_or("unknown");
    print_ready(
        global,
        serde_json::json!({"broker_url": status.url, "role": "standby", "active_url": status.active_url, "database": database}),
        format!("broker standing by on {} (the active broker is {active}); it takes over when that one stops", status.url),
    );
}

/// `leasehold broker status`: asks each URL of --broker; exit 1 when none
/// is active.
async fn broker_status(global: &Global) -> Result<i32> {
    let mut rows = Vec::new();
    for url in global.broker.split(',') {
        let client = leasehold_api::Client::with_trust(url, None, &global.server_trust)?;
        rows.push(match client.broker_status().await {
            Ok(status) => serde_json::to_value(status)?,
            Err(error) => {
                serde_json::json!({"url": url, "role": "unreachable", "error": error.to_string()})
            }
        });
    }
    let any_active = rows.iter().any(|row| row["role"] == "active");
    if global.output == OutputFormat::Json {
        let document = if rows.len() == 1 {
            rows[0].clone()
        } else {
            serde_json::json!({"brokers": rows})
        };
        println!("{document}");
    } else {
        let now_ms = leasehold_service::Clock::now_ms(&leasehold_service::SystemClock);
        println!(
            "{:<32} {:<12} {:>6}  {:<24} ACTIVE",
            "BROKER", "ROLE", "EPOCH", "SINCE"
        );
        for row in &rows {
            let since = row["since_ms"]
                .as_u64()
                .map(|since_ms| format!("{} s ago", now_ms.saturating_sub(since_ms) / 1000))
                .unwrap_or_default();
            println!(
                "{:<32} {:<12} {:>6}  {:<24} {}",
                row["url"].as_str().unwrap_or(""),
                row["role"].as_str().unwrap_or(""),
                row["epoch"]
                    .as_u64()
                    .map(|e| e.to_string())
                    .unwrap_or_default(),
                since,
                row["active_url"].as_str().unwrap_or("")
            );
        }
    }
    Ok(if any_active { 0 } else { 1 })
}

/// The broker's PostgreSQL URL, from --database (only without a password),
/// --database-url-file (0600) or LEASEHOLD_DATABASE_URL; `None` for SQLite.
fn database_url(args: &BrokerArgs) -> Result<Option<String>, String> {
    let (url, from) = if let Some(url) = &args.database {
        let has_password = leasehold_store::postgres::database_url_has_password(url)
            .map_err(|e| format!("refusing --database: {e}"))?;
        if has_password {
            return Err("refusing --database with a password: a command line can be read by every local user (in /proc/PID/cmdline); put the URL in a file only you can read and pass --database-url-file FILE, or set LEASEHOLD_DATABASE_URL".into());
        }
        (url.clone(), "--database")
    } else if let Some(path) = &args.database_url_file {
        let url = private_fs::read_private_file(path)
            .map_err(|e| format!("failed to read the database URL: {e}"))?;
        (url.trim().to_string(), "--database-url-file")
    } else {
        match std::env::var("LEASEHOLD_DATABASE_URL") {
            Ok(url) if !url.trim().is_empty() => (url.trim().to_string(), "LEASEHOLD_DATABASE_URL"),
            _ => return Ok(None),
        }
    };
    if !leasehold_store::is_postgres_url(&url) {
        return Err(format!(
            "{from} takes a postgres:// URL; without one the broker keeps SQLite in --data-dir"
        ));
    }
    Ok(Some(url))
}

/// The markets of `--broker URL[=SHARE]` (each occurrence), each with its
/// lender token: `--token-file URL=FILE`, or for the first broker the plain
/// --token-file / LEASEHOLD_TOKEN.
fn agent_markets(global: &Global) -> Result<Vec<leasehold_agent::markets::MarketConfig>> {
    let mut markets = Vec::new();
    for (position, (url, share)) in global.broker_args.iter().enumerate() {
        let share = match share {
            Some(text) => Some(
                text.parse::<leasehold_agent::markets::ShareSpec>()
                    .map_err(|problem| anyhow!("--broker {url}={text}: {problem}"))?,
            ),
            None => None,
        };
        let file = global.market_token_files.iter().find(|(u, _)| u == url);
        let token = match (file, position) {
            (Some((_, path)), _) => leasehold_store::private_fs::read_private_file(path)
                .map_err(|e| anyhow!("--token-file {url}={}: {e}", path.display()))?,
            (None, 0) => global.token.clone().ok_or_else(|| {
                anyhow!("failed to start the agent: give the lender's token with --token-file FILE (mode 0600) or LEASEHOLD_TOKEN")
            })?,
            (None, _) => anyhow::bail!("failed to start the agent: no lender token for the broker at {url}; give --token-file {url}=FILE (mode 0600)"),
        };
        markets.push(leasehold_agent::markets::MarketConfig {
            url: url.clone(),
            token,
            share,
        });
    }
    if let Some((url, _)) =
        (global.market_token_files.iter()).find(|(url, _)| !markets.iter().any(|m| &m.url == url))
    {
        anyhow::bail!("--token-file {url}=FILE names no --broker of this agent");
    }
    Ok(markets)
}

/// `agent --direct`: no broker; the owner's token from --token-file /
/// LEASEHOLD_TOKEN, or DATA_DIR/owner.token (made on first start).
fn direct_owner_token(
    global: &Global,
    args: &AgentArgs,
) -> Result<(
    Vec<leasehold_agent::markets::MarketConfig>,
    String,
    Option<PathBuf>,
)> {
    let several =
        global.broker_args.len() > 1 || global.broker_args.iter().any(|(_, s)| s.is_some());
    if several || !global.market_token_files.is_empty() {
        anyhow::bail!("--direct lends without a broker: leave out --broker URL=SHARE and --token-file URL=FILE");
    }
    match &global.token {
        Some(token) => Ok((Vec::new(), token.clone(), None)),
        None => {
            let (token, file) = leasehold_agent::direct::load_or_create_owner_token(&args.data_dir)
                .map_err(|e| anyhow!("failed to make the owner's token: {e}"))?;
            Ok((Vec::new(), token, Some(file)))
        }
    }
}

/// The agent's brokers and its first broker's lender token; with
/// `--direct` no broker, the owner's token and the file it was made in.
fn agent_credentials(
    global: &Global,
    args: &AgentArgs,
) -> Result<(
    Vec<leasehold_agent::markets::MarketConfig>,
    String,
    Option<PathBuf>,
)> {
    if args.direct {
        return direct_owner_token(global, args);
    }
    let markets = agent_markets(global)?;
    let token = markets[0].token.clone();
    Ok((markets, token, None))
}

/// `agent grant|revoke`: the owner's verbs of direct lending.
async fn agent_action(global: &Global, action: &AgentAction) -> Result<i32> {
    match action {
        AgentAction::Grant { name, agent } => {
            crate::direct::grant(global, &agent.agent, name).await
        }
        AgentAction::Revoke { name, agent } => {
            crate::direct::revoke(global, &agent.agent, name).await
        }
    }
}

pub async fn agent(global: &Global, args: AgentArgs) -> Result<i32> {
    if let Some(action) = &args.action {
        return agent_action(global, action).await;
    }
    let (markets, token, owner_token_file) = agent_credentials(global, &args)?;
    let host_id = args.host_id.clone().unwrap_or_else(default_host_id);
    let tls = args.tls.identity_for("agent", args.listen)?;
    let clock = args.clock.clock()?;
    let image_store = ImageStoreAccess {
        url: args.image_store.clone(),
        trust: global.server_trust.clone(),
    };
    let plan = plan_driver(
        args.driver,
        &args.data_dir,
        &host_id,
        args.sim_images.clone(),
        if args.images.is_empty() {
            default_images(args.driver)
        } else {
            args.images.clone()
        },
        image_store,
        Ok(()),
    )
    .await?;
    eprintln!("agent: driver {}", plan.reason);
    let brokers = (markets.iter().map(|m| m.url.as_str()))
        .collect::<Vec<_>>()
        .join(" and ");
    let running = leasehold_agent::start(AgentConfig {
        markets,
        direct: args.direct,
        key_confirmation: args.confirm_keys.policy(),
        host_id: host_id.clone(),
        data_dir: args.data_dir.clone(),
        listen: args.listen,
        broker_url: global.broker.clone(),
        lender_token: token,
        driver: plan.kind,
        capacity: args.shape.capacity(),
        advertise_url: args.advertise_url.clone(),
        clock,
        revocation_poll_interval_ms: args.revocation_poll_secs * 1000,
        tls,
        client_trust: global.server_trust.clone(),
        sampling: args.sampling.config(),
        rights: args.group.config(&args.data_dir)?,
        metrics_public: args.operator.metrics_public,
    })
    .await
    .context("failed to start the agent")?;
    for note in &running.reconciled {
        eprintln!("agent: {note}");
    }
    let url = running.url();
    print_ready(
        global,
        serde_json::json!({"agent_url": url, "host_id": host_id, "driver": running.driver_name, "driver_reason": plan.reason, "reconciled": running.reconciled, "owner_token_file": owner_token_file}),
        format!(
            "agent for host '{host_id}' listening on {url} (driver {}, broker {brokers})",
            running.driver_name
        ),
    );
    running
        .wait()
        .await
        .context("the agent stopped with an error")?;
    Ok(0)
}

/// The default partitions `up` lends on first start: as many as fit (up to
/// `count`), with slightly different prices so `find` has an order to show.
fn default_partition_terms(count: u32, images: &[String], capacity: &HostCapacity) -> Vec<Terms> {
    let mut chosen: Vec<Terms> = Vec::new();
    for n in 0..count {
        let terms = Terms {
            vcpus: 1,
            cpu_cap_percent: 50,
            memory_mib: 256,
            disk_gib: 1,
            images: images.to_vec(),
            price_per_hour_micros: 100_000 + 20_000 * n as u64,
            // The agent states it from its driver.
            isolation: None,
        };
        if capacity.admits(chosen.iter(), &terms).is_err() {
            break;
        }
        chosen.push(terms);
    }
    chosen
}

/// How `up` serves its three listeners, and what its own clients (its
/// agent, the broker's notices, the hints it prints) trust.
struct UpTls {
    identity: Option<leasehold_service::ServerTls>,
    /// The local CA's certificate, when `up` issued the identity.
    ca_cert: Option<PathBuf>,
    client_trust: leasehold_api::ServerTrust,
}

impl UpTls {
    fn scheme(&self) -> &'static str {
        if self.identity.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// `--tls-cert/--tls-key` if given; else a certificate from the local CA
/// with `--tls` or when a listener is not on loopback (unless
/// `--insecure-http`); else plain HTTP on loopback.
fn up_tls(global: &Global, args: &UpArgs) -> Result<UpTls> {
    let listens = [
        ("broker", args.listen),
        ("agent", args.agent_listen),
        ("image store", args.image_store_listen),
    ];
    if let Some(identity) = args.tls_args.given_identity()? {
        return Ok(UpTls {
            identity: Some(identity),
            ca_cert: None,
            client_trust: global.server_trust.clone(),
        });
    }
    let beyond_loopback = listens
        .iter()
        .any(|(_, listen)| !leasehold_service::tls::is_loopback(listen));
    if !args.tls && (!beyond_loopback || args.tls_args.insecure_http) {
        for (what, listen) in listens {
            check_listen_address(what, listen, false, args.tls_args.insecure_http)?;
        }
        return Ok(UpTls {
            identity: None,
            ca_cert: None,
            client_trust: global.server_trust.clone(),
        });
    }
    let ca = leasehold_service::tls::LocalCa::load_or_create(&args.data_dir.join("tls"))
        .context("failed to open the local CA")?;
    let mut addresses: Vec<std::net::IpAddr> = listens.iter().map(|(_, a)| a.ip()).collect();
    addresses.push(std::net::Ipv4Addr::LOCALHOST.into());
    addresses.push(std::net::Ipv6Addr::LOCALHOST.into());
    let identity = ca
        .issue_server_tls(&addresses, &host_dns_name().into_iter().collect::<Vec<_>>())
        .context("failed to issue the server certificate")?;
    // Absolute, so the printed hint works from any directory.
    let ca_cert = std::fs::canonicalize(ca.certificate_path())
        .unwrap_or_else(|_| ca.certificate_path().to_path_buf());
    let client_trust = leasehold_api::ServerTrust::pinned_ca_file(&ca_cert)?;
    Ok(UpTls {
        identity: Some(identity),
        ca_cert: Some(ca_cert),
        client_trust,
    })
}

/// This machine's name, for the certificate `up` issues, when it is a
/// plain DNS name.
fn host_dns_name() -> Option<String> {
    let name = std::fs::read_to_string("/etc/hostname").ok()?;
    let name = name.trim().to_ascii_lowercase();
    let plain = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    plain.then_some(name)
}

pub async fn up(global: &Global, args: UpArgs) -> Result<i32> {
    private_fs::ensure_private_dir(&args.data_dir)?;
    let clock = args.clock.clock()?;
    let tls = up_tls(global, &args)?;
    let agent_dir = args.data_dir.join("agent");
    let images = start_up_image_store(&args, &tls).await?;
    let running_broker = start_up_broker(&args, &tls, &images, clock.clone()).await?;
    let broker_url = running_broker.url();
    let tokens = bootstrap_up_principals(&running_broker, &agent_dir).await?;
    let lender_token = read_up_agent_credential(&agent_dir)?;
    let capacity = args.shape.capacity();
    let agent = UpAgent {
        data_dir: agent_dir,
        broker_url: broker_url.clone(),
        lender_token: lender_token.clone(),
        capacity: capacity.clone(),
        clock,
    };
    let (running_agent, plan) = start_up_agent(&args, &tls, &images, agent).await?;
    let agent_url = running_agent.url();
    let agent_client =
        leasehold_api::Client::with_trust(&agent_url, Some(lender_token), &tls.client_trust)?;
    let first_start = !tokens.is_empty();
    let partitions =
        lend_default_partitions(&agent_client, args.partitions, &capacity, first_start).await?;
    let ready = UpReady {
        broker_url,
        agent_url,
        driver: running_agent.driver_name,
        driver_reason: plan.reason,
        image_store_url: images.url,
        store_dir: images.store_dir,
        ca_cert: tls.ca_cert,
        partitions,
        reconciled: running_agent.reconciled.clone(),
        tokens,
    };
    print_ready(
        global,
        ready.json(&args.data_dir),
        ready.text(&args.data_dir),
    );
    // Both stop on Ctrl-C / SIGTERM; wait for both to finish cleanly.
    let (broker_result, agent_result) = tokio::join!(running_broker.wait(), running_agent.wait());
    broker_result.context("the broker stopped with an error")?;
    agent_result.context("the agent stopped with an error")?;
    Ok(0)
}

/// What `up`'s local agent is started with, beside `up`'s arguments.
struct UpAgent {
    data_dir: PathBuf,
    broker_url: String,
    lender_token: String,
    capacity: HostCapacity,
    clock: SharedClock,
}

/// Picks the local agent's driver and starts it as host 'local'.
async fn start_up_agent(
    args: &UpArgs,
    tls: &UpTls,
    images: &UpImages,
    agent: UpAgent,
) -> Result<(leasehold_agent::RunningAgent, DriverPlan)> {
    let plan = plan_driver(
        args.driver,
        &agent.data_dir,
        "local",
        vec!["busybox".into(), "debian-12".into()],
        default_images(args.driver),
        ImageStoreAccess {
            url: images.url.clone(),
            trust: tls.client_trust.clone(),
        },
        images.image_ready.clone(),
    )
    .await?;
    let running = leasehold_agent::start(AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: Default::default(),
        host_id: "local".into(),
        data_dir: agent.data_dir,
        listen: args.agent_listen,
        broker_url: agent.broker_url,
        lender_token: agent.lender_token,
        driver: plan.kind.clone(),
        capacity: agent.capacity,
        advertise_url: None,
        clock: agent.clock,
        revocation_poll_interval_ms: leasehold_agent::DEFAULT_REVOCATION_POLL_SECS * 1000,
        tls: tls.identity.clone(),
        client_trust: tls.client_trust.clone(),
        sampling: args.sampling.config(),
        rights: None,
        metrics_public: args.operator.metrics_public,
    })
    .await
    .context("failed to start the local agent")?;
    Ok((running, plan))
}

/// The image store `up` keeps beside its data for the oci and vm drivers.
struct UpImages {
    store_dir: PathBuf,
    /// Where it serves, when it does (the oci or vm driver can run here).
    url: Option<String>,
    /// Whether the driver's image is in the store (busybox for oci,
    /// debian-vm for vm).
    image_ready: Result<(), String>,
}

/// The oci and vm drivers boot images: `up` keeps a store beside its data,
/// makes the driver's image in it once, and serves it to its agent and to
/// its broker (which pins partitions' images to the store's digests), so
/// the store starts first.
async fn start_up_image_store(args: &UpArgs, tls: &UpTls) -> Result<UpImages> {
    let store_dir = args.data_dir.join("images");
    let (image_ready, usable) = match args.driver {
        DriverChoice::Oci | DriverChoice::Auto => (
            ensure_busybox(&store_dir),
            leasehold_agent::driver::oci::probe(),
        ),
        DriverChoice::Vm => {
            let usable = leasehold_agent::driver::vm::probe();
            let ready = match &usable {
                // Built only where it can boot: it takes a kernel download.
                Ok(()) => ensure_vm_image(&store_dir),
                Err(_) => Ok(()),
            };
            (ready, usable)
        }
        DriverChoice::Process | DriverChoice::Sim => (Ok(()), Err(String::new())),
    };
    if image_ready.is_err() || usable.is_err() {
        return Ok(UpImages {
            store_dir,
            url: None,
            image_ready,
        });
    }
    let store = Arc::new(
        leasehold_images::ImageStore::open(&store_dir).context("failed to open the image store")?,
    );
    let listener = tokio::net::TcpListener::bind(args.image_store_listen)
        .await
        .with_context(|| {
            format!(
                "failed to listen on {} for the image store",
                args.image_store_listen
            )
        })?;
    let url = format!("{}://{}", tls.scheme(), listener.local_addr()?);
    let server = leasehold_service::ServerHandle::spawn_with_tls(
        listener,
        store.router(),
        leasehold_service::ServeLimits::default(),
        tls.identity.clone(),
    );
    tokio::spawn(server.wait());
    Ok(UpImages {
        store_dir,
        url: Some(url),
        image_ready,
    })
}

async fn start_up_broker(
    args: &UpArgs,
    tls: &UpTls,
    images: &UpImages,
    clock: SharedClock,
) -> Result<leasehold_broker::RunningBroker> {
    leasehold_broker::start(BrokerConfig {
        data_dir: args.data_dir.join("broker"),
        listen: args.listen,
        durability: Durability::Full,
        commission_basis_points: args.commission_basis_points,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock,
        image_store_url: images.url.clone(),
        tls: tls.identity.clone(),
        client_trust: tls.client_trust.clone(),
        database_url: None,
        store_layer: None,
        plan_policy: args.plan.policy(),
        run_planner: true,
        metrics_public: args.operator.metrics_public,
    })
    .await
    .context("failed to start the broker")
}

/// On the first start (the broker made an admin): the lender, the borrower
/// and the local host's credential (0600 in the agent's directory, so the
/// agent never holds the lender's own token). The tokens to print, by
/// name; none on later starts.
async fn bootstrap_up_principals(
    broker: &leasehold_broker::RunningBroker,
    agent_dir: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>> {
    let mut tokens = serde_json::Map::new();
    let Some(admin) = &broker.bootstrap_admin_token else {
        return Ok(tokens);
    };
    tokens.insert("admin".into(), admin.clone().into());
    let lender = broker
        .create_principal("lender", Role::Lender)
        .await
        .context("failed to create the lender")?;
    let borrower = broker
        .create_principal("borrower", Role::Borrower)
        .await
        .context("failed to create the borrower")?;
    let host_credential = broker
        .create_host_credential("lender", "local")
        .await
        .context("failed to make the local host's credential")?;
    private_fs::ensure_private_dir(agent_dir)?;
    private_fs::write_private_file(&agent_dir.join("host.token"), host_credential.as_bytes())?;
    tokens.insert("lender".into(), lender.into());
    tokens.insert("borrower".into(), borrower.into());
    Ok(tokens)
}

/// The local agent's credential: `host.token`, or the `lender.token` that
/// data directories of older versions kept.
fn read_up_agent_credential(agent_dir: &Path) -> Result<String> {
    let host_token_path = agent_dir.join("host.token");
    let old_lender_token_path = agent_dir.join("lender.token");
    let path = if host_token_path.exists() || !old_lender_token_path.exists() {
        host_token_path
    } else {
        old_lender_token_path
    };
    private_fs::read_private_file(&path).with_context(|| {
        format!(
            "failed to read the local agent's credential from {}",
            path.display()
        )
    })
}

/// The agent's partitions; on the first start, an empty table is filled
/// with up to `count` default partitions first.
async fn lend_default_partitions(
    agent: &leasehold_api::Client,
    count: u32,
    capacity: &HostCapacity,
    first_start: bool,
) -> Result<usize> {
    let partitions = agent
        .agent_list_partitions()
        .await
        .context("failed to read the partition table")?;
    if !partitions.is_empty() || !first_start {
        return Ok(partitions.len());
    }
    let info = agent
        .agent_info()
        .await
        .context("failed to ask the agent")?;
    for terms in default_partition_terms(count, &info.images, capacity) {
        agent
            .agent_add_partition(&terms)
            .await
            .context("failed to add a default partition")?;
    }
    let partitions = agent
        .agent_list_partitions()
        .await
        .context("failed to read the partition table")?;
    Ok(partitions.len())
}

/// What `up` prints once everything serves.
struct UpReady {
    broker_url: String,
    agent_url: String,
    driver: &'static str,
    driver_reason: String,
    image_store_url: Option<String>,
    store_dir: PathBuf,
    ca_cert: Option<PathBuf>,
    partitions: usize,
    reconciled: Vec<String>,
    tokens: serde_json::Map<String, serde_json::Value>,
}

impl UpReady {
    fn json(&self, data_dir: &Path) -> serde_json::Value {
        serde_json::json!({
            "broker_url": self.broker_url,
            "agent_url": self.agent_url,
            "data_dir": data_dir,
            "driver": self.driver,
            "driver_reason": self.driver_reason,
            "image_store_url": self.image_store_url,
            "ca_cert": self.ca_cert,
            "partitions": self.partitions,
            "tokens": if self.tokens.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::Value::Object(self.tokens.clone())
            },
        })
    }

    fn text(&self, data_dir: &Path) -> String {
        let mut text = format!(
            "leasehold is up.\n  broker  {}   (data in {})\n  agent   {}   host 'local', driver {}, {} partition(s)\n  driver  {}\n",
            self.broker_url,
            data_dir.display(),
            self.agent_url,
            self.driver,
            self.partitions,
            self.driver_reason
        );
        text.push_str(&format!(
            "  web     {}/ui   (the dashboard; log in with a token)\n",
            self.broker_url
        ));
        if let Some(url) = &self.image_store_url {
            text.push_str(&format!(
                "  images  {url}   (store in {})\n",
                self.store_dir.display()
            ));
        }
        if let Some(path) = &self.ca_cert {
            text.push_str(&format!(
                "  ca cert {}   (clients pin it: --ca-cert FILE or LEASEHOLD_CA_CERT)\n",
                path.display()
            ));
        }
        for note in &self.reconciled {
            text.push_str(&format!("  agent: {note}\n"));
        }
        text.push_str(&self.tokens_text());
        text.push_str("Ctrl-C stops; `leasehold up` on the same --data-dir resumes.");
        text
    }

    /// The tokens and the next steps on a first start; a note otherwise.
    fn tokens_text(&self) -> String {
        if self.tokens.is_empty() {
            return "Resumed from the data directory; tokens were printed on the first start.\n"
                .into();
        }
        let mut text = String::from("Tokens (shown once; keep them):\n");
        for (name, token) in &self.tokens {
            text.push_str(&format!("  {name:<9} {}\n", token.as_str().unwrap_or("")));
        }
        let borrower = self
            .tokens
            .get("borrower")
            .and_then(|t| t.as_str())
            .unwrap_or("");
        let ca_cert = match &self.ca_cert {
            Some(path) => format!(" LEASEHOLD_CA_CERT={}", path.display()),
            None => String::new(),
        };
        let exe = std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "leasehold".into());
        let broker_url = &self.broker_url;
        text.push_str(&format!(
            "Next, in another terminal:\n  export LEASEHOLD_BROKER={broker_url}{ca_cert} LEASEHOLD_TOKEN={borrower}\n  {exe} find\n  {exe} lease --best\n  {exe} run --lease 1 -- sh -c 'echo hello from $(pwd)'\n  {exe} release 1\n  {exe} bill\n"
        ));
        text
    }
}

/// Makes the busybox image in `store_dir` unless it is there already.
fn ensure_busybox(store_dir: &Path) -> Result<(), String> {
    let store = leasehold_images::ImageStore::open(store_dir).map_err(|e| e.to_string())?;
    if store.get("busybox").is_ok() {
        return Ok(());
    }
    store
        .build_busybox("busybox")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Makes the `debian-vm` OS image in `store_dir` unless it is there
/// already (the first `up --driver vm` downloads Debian's kernel package).
fn ensure_vm_image(store_dir: &Path) -> Result<(), String> {
    let store = leasehold_images::ImageStore::open(store_dir).map_err(|e| e.to_string())?;
    if store.get(DEFAULT_VM_IMAGE).is_ok() {
        return Ok(());
    }
    eprintln!(
        "up: building the {DEFAULT_VM_IMAGE} OS image (Debian's kernel and busybox-static; once)"
    );
    store
        .build_vm_debian(DEFAULT_VM_IMAGE, None)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn rotate_key(global: &Global, args: &RotateKeyArgs) -> Result<i32> {
    private_fs::ensure_private_dir(&args.data_dir)?;
    let now_ms = ClockArgs::default().clock()?.now_ms();
    let keys = leasehold_broker::signing_keys::rotate(&args.data_dir, rand_seed(), now_ms)
        .context("failed to rotate the signing key")?;
    let ids: Vec<&str> = keys.published().iter().map(|k| k.key_id.as_str()).collect();
    print_ready(
        global,
        serde_json::json!({"key_id": keys.current_id(), "keys": keys.published()}),
        format!(
            "added signing key {} (keys now: {}); restart the broker to sign new lease keys with it",
            keys.current_id(),
            ids.join(", ")
        ),
    );
    Ok(0)
}

fn rand_seed() -> [u8; 32] {
    rand::random()
}

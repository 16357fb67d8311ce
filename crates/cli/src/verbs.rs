//! The user verbs: thin wrappers over the typed client that print for people
//! (text) or for scripts (one JSON document).

use crate::{Global, OutputFormat};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use leasehold_api::{ApiError, Client, LeaseRequest, Role, SubmitJobRequest};
use leasehold_core::matching::{NoMatchExplanation, Requirement};
use leasehold_core::money::{format_micros, parse_units_to_micros};
use leasehold_core::{Requirements, Terms};
use serde::Serialize;

pub const EXIT_FAILURE: i32 = 1;
pub const EXIT_NO_MATCH: i32 = 3;
pub const EXIT_CONFLICT: i32 = 4;
pub const EXIT_JOB_TIMED_OUT: i32 = 124;
pub const EXIT_JOB_CANCELLED: i32 = 130;

fn broker(global: &Global) -> Result<Client> {
    client_of(global, &global.broker, global.token.clone())
}

/// A client of `url` that accepts the server certificates `--ca-cert`
/// allows: only those of that CA when it is given, else public CAs.
pub fn client_of(global: &Global, url: &str, token: Option<String>) -> Result<Client> {
    Client::with_trust(url, token, &global.server_trust)
        .with_context(|| format!("failed to make a client of {url}"))
}

pub fn print_json<T: Serialize>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("output serializes")
    );
}

/// Prints an error and picks the exit code. Lowercase "failed to ..." chains.
pub fn report_error(global: &Global, error: &anyhow::Error) -> i32 {
    let api = error.chain().find_map(|e| e.downcast_ref::<ApiError>());
    let code = match api.and_then(ApiError::code) {
        Some("no_match") => EXIT_NO_MATCH,
        Some("partition_taken") | Some("partition_locked") => EXIT_CONFLICT,
        _ => EXIT_FAILURE,
    };
    if global.output == OutputFormat::Json {
        let detail = api.and_then(ApiError::detail);
        print_json(&serde_json::json!({
            "error": {
                "message": format!("{error:#}"),
                "status": api.and_then(ApiError::status),
                "code": api.and_then(ApiError::code),
                "field": detail.and_then(|d| d.field.clone()),
                "key_rejection": detail.and_then(|d| d.key_rejection.clone()),
                "explanation": detail.and_then(|d| d.explanation.clone()),
            }
        }));
    }
    eprintln!("error: {error:#}");
    if let Some(explanation) = api
        .and_then(ApiError::detail)
        .and_then(|d| d.explanation.as_ref())
    {
        eprint!("{}", explain_text(explanation, None));
    }
    code
}

/// The isolation column: what the host's driver gives, or `unknown`.
pub fn isolation_text(terms: &Terms) -> &'static str {
    terms.isolation.map(|i| i.as_str()).unwrap_or("unknown")
}

pub fn terms_text(terms: &Terms) -> String {
    format!(
        "{} vCPU @{}%  {} MiB  {} GiB  [{}]  {}/h",
        terms.vcpus,
        terms.cpu_cap_percent,
        terms.memory_mib,
        terms.disk_gib,
        terms.images.join(","),
        format_micros(terms.price_per_hour_micros as i128)
    )
}

fn requirement_text(requirement: Requirement, requirements: &Requirements) -> String {
    match requirement {
        Requirement::MinVcpus => format!("vcpus >= {}", requirements.min_vcpus.unwrap_or(0)),
        Requirement::MinCpuCapPercent => format!(
            "cpu cap >= {}%",
            requirements.min_cpu_cap_percent.unwrap_or(0)
        ),
        Requirement::MinMemoryMib => {
            format!("memory >= {} MiB", requirements.min_memory_mib.unwrap_or(0))
        }
        Requirement::MinDiskGib => {
            format!("disk >= {} GiB", requirements.min_disk_gib.unwrap_or(0))
        }
        Requirement::Image => format!("image = {}", requirements.image.as_deref().unwrap_or("")),
        Requirement::MaxPricePerHourMicros => format!(
            "price <= {}/h",
            format_micros(requirements.max_price_per_hour_micros.unwrap_or(0) as i128)
        ),
        Requirement::AllowUnisolated => "isolated".to_string(),
    }
}

/// The `-better-analyze` style explanation of an empty answer.
pub fn explain_text(
    explanation: &NoMatchExplanation,
    requirements: Option<&Requirements>,
) -> String {
    let mut text = format!(
        "No free partition meets the requirements ({} partitions registered, {} of them leased).\n",
        explanation.partitions_considered, explanation.leased
    );
    if !explanation.ruled_out_by.is_empty() {
        text.push_str("Partitions each requirement rules out:\n");
        for ruled in &explanation.ruled_out_by {
            let name = match requirements {
                Some(requirements) => requirement_text(ruled.requirement, requirements),
                None => ruled.requirement.field_name().to_string(),
            };
            text.push_str(&format!("  {:<28} {}\n", name, ruled.partitions));
        }
    }
    if let Some(unisolated) = explanation
        .ruled_out_by
        .iter()
        .find(|r| r.requirement == Requirement::AllowUnisolated)
    {
        text.push_str(&format!(
            "{} partitions are unisolated; add --allow-unisolated to accept them (their jobs run as plain processes of the host)\n",
            unisolated.partitions
        ));
    }
    if !explanation.nearest_misses.is_empty() {
        text.push_str("Nearest misses:\n");
        for miss in &explanation.nearest_misses {
            let mut reasons: Vec<String> = miss
                .failed
                .iter()
                .map(|r| format!("fails {}", r.field_name()))
                .collect();
            if miss.leased {
                reasons.push("leased".into());
            }
            text.push_str(&format!(
                "  {:<16} {}  ({})\n",
                miss.partition.to_string(),
                terms_text(&miss.terms),
                reasons.join(", ")
            ));
        }
    }
    if !explanation.shares.is_empty() {
        text.push_str(
            "Shares that could not carve a partition of that size:
",
        );
        for miss in &explanation.shares {
            text.push_str(&format!(
                "  {:<16} {}
",
                miss.host_id, miss.reason
            ));
        }
    }
    text
}

/// The shares a find found, with their per-unit prices.
fn print_share_quotes(quotes: &[leasehold_core::share::ShareQuote]) {
    println!(
        "{:<16} {:<34} {:<44} FREE",
        "SHARE OF HOST", "CARVED FOR YOU", "PER UNIT AND HOUR (vCPU, GiB mem, GiB disk)"
    );
    for quote in quotes {
        println!(
            "{:<16} {:<34} {:<44} {} vCPUs, {} MiB, {} GiB",
            quote.host_id,
            terms_text(&quote.terms),
            format!(
                "{} / {} / {}",
                format_micros(quote.price_per_vcpu_hour_micros as i128),
                format_micros(quote.price_per_memory_gib_hour_micros as i128),
                format_micros(quote.price_per_disk_gib_hour_micros as i128)
            ),
            quote.free_cpu_centicores as f64 / 100.0,
            quote.free_memory_mib,
            quote.free_disk_gib
        );
    }
}

// ---- principals ----

#[derive(Subcommand)]
pub enum PrincipalCommand {
    /// Create a principal and print its token (shown once).
    Add {
        name: String,
        #[arg(long, value_parser = parse_role)]
        role: Role,
    },
}

fn parse_role(text: &str) -> Result<Role, String> {
    text.parse::<Role>().map_err(|e| e.to_string())
}

pub async fn principal(global: &Global, command: PrincipalCommand) -> Result<i32> {
    match command {
        PrincipalCommand::Add { name, role } => {
            let created = broker(global)?
                .create_principal(&name, role)
                .await
                .with_context(|| format!("failed to create principal '{name}'"))?;
            if global.output == OutputFormat::Json {
                print_json(&created);
            } else {
                println!(
                    "created {} '{}'; its token (shown once):",
                    created.role.as_str(),
                    created.name
                );
                println!("{}", created.token);
            }
            Ok(0)
        }
    }
}

pub async fn whoami(global: &Global) -> Result<i32> {
    let me = broker(global)?
        .whoami()
        .await
        .context("failed to ask the broker who you are")?;
    if global.output == OutputFormat::Json {
        print_json(&me);
    } else {
        println!("{} ({})", me.name, me.role.as_str());
    }
    Ok(0)
}

// ---- lender: host partitions ----

#[derive(Args, Clone, Default)]
pub struct TermsArgs {
    /// Number of virtual CPUs.
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Share of each vCPU the partition may use, in percent (1-100).
    #[arg(long = "cpu-cap")]
    pub cpu_cap_percent: Option<u32>,
    #[arg(long)]
    pub memory_mib: Option<u64>,
    #[arg(long)]
    pub disk_gib: Option<u64>,
    /// An image (OS) the partition can boot; repeat for several.
    #[arg(long = "image")]
    pub images: Vec<String>,
    /// Price per hour, in units with up to 6 decimals (e.g. 0.25).
    #[arg(long)]
    pub price_per_hour: Option<String>,
}

impl TermsArgs {
    /// Terms from the flags, with `base` filling what was not given.
    fn apply(&self, base: Option<&Terms>, default_images: &[String]) -> Result<Terms> {
        let missing = |name: &str| anyhow!("--{name} is required");
        let price = match &self.price_per_hour {
            Some(text) => {
                parse_units_to_micros("price_per_hour", text).map_err(|e| anyhow!("{e}"))?
            }
            None => base
                .map(|b| b.price_per_hour_micros)
                .ok_or_else(|| missing("price-per-hour"))?,
        };
        Ok(Terms {
            vcpus: self
                .vcpus
                .or(base.map(|b| b.vcpus))
                .ok_or_else(|| missing("vcpus"))?,
            cpu_cap_percent: self
                .cpu_cap_percent
                .or(base.map(|b| b.cpu_cap_percent))
                .unwrap_or(100),
            memory_mib: self
                .memory_mib
                .or(base.map(|b| b.memory_mib))
                .ok_or_else(|| missing("memory-mib"))?,
            disk_gib: self
                .disk_gib
                .or(base.map(|b| b.disk_gib))
                .ok_or_else(|| missing("disk-gib"))?,
            images: if !self.images.is_empty() {
                self.images.clone()
            } else if let Some(base) = base {
                base.images.clone()
            } else {
                default_images.to_vec()
            },
            price_per_hour_micros: price,
            // The agent states it from its driver; a lender cannot claim it.
            isolation: None,
        })
    }
}

#[derive(Args, Clone)]
pub struct AgentArg {
    /// The agent's URL (the host you lend from).
    #[arg(long, env = "LEASEHOLD_AGENT", default_value = "http://127.0.0.1:7071", value_parser = crate::parse_url)]
    pub agent: String,
}

#[derive(Subcommand)]
pub enum HostCommand {
    /// Add a lendable partition with its terms and register it with the broker.
    Add {
        #[command(flatten)]
        agent: AgentArg,
        #[command(flatten)]
        terms: TermsArgs,
    },
    /// List this host's partition table.
    List {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// The brokers this host lends through, what each manages (its fixed
    /// partitions or a share), and each partition with its managing broker.
    Show {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Alter a partition's terms (refused while it is leased).
    Alter {
        /// The partition's index on this host.
        index: u32,
        #[command(flatten)]
        agent: AgentArg,
        #[command(flatten)]
        terms: TermsArgs,
    },
    /// Withdraw a partition from lending (refused while it is leased).
    Withdraw {
        index: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Make a credential that acts for you on this one host only (asks the
    /// broker; shown once). Give it to that host's agent with --token-file,
    /// so a token leaked from one host cannot act for your other hosts.
    Credential {
        /// The host id the credential acts for.
        host_id: String,
    },
    /// Each host's capacity for reservations: total, owner share, lent,
    /// available, held by pools, not yet acquired (asks the broker).
    Capacity,
}

fn print_agent_partitions(global: &Global, rows: &[leasehold_api::AgentPartitionView]) {
    if global.output == OutputFormat::Json {
        print_json(&rows);
        return;
    }
    if rows.is_empty() {
        println!("no partitions on this host yet; add one with `leasehold host add`");
    }
    for row in rows {
        let status = match row.lease_id {
            Some(lease) => format!("leased (lease {lease}, locked)"),
            None => match row.lending_flag {
                leasehold_api::LendingFlag::Registered => "free".to_string(),
                leasehold_api::LendingFlag::Unregistered => "unregistered".to_string(),
            },
        };
        println!(
            "{:<16} {}  {}",
            row.partition.to_string(),
            terms_text(&row.terms),
            status
        );
    }
}

pub async fn host(global: &Global, command: HostCommand) -> Result<i32> {
    match command {
        HostCommand::Capacity => return crate::reservations::host_capacity(global).await,
        HostCommand::Credential { host_id } => host_credential(global, &host_id).await?,
        HostCommand::Add { agent, terms } => host_add(global, &agent.agent, &terms).await?,
        HostCommand::Show { agent } => host_show(global, &agent.agent).await?,
        HostCommand::List { agent } => {
            let client = client_of(global, &agent.agent, global.token.clone())?;
            let rows = client
                .agent_list_partitions()
                .await
                .context("failed to list partitions")?;
            print_agent_partitions(global, &rows);
        }
        HostCommand::Alter {
            index,
            agent,
            terms,
        } => host_alter(global, &agent.agent, index, &terms).await?,
        HostCommand::Withdraw { index, agent } => {
            let client = client_of(global, &agent.agent, global.token.clone())?;
            let row = client
                .agent_withdraw_partition(index)
                .await
                .with_context(|| format!("failed to withdraw partition {index}"))?;
            if global.output == OutputFormat::Json {
                print_json(&row);
            } else {
                println!("withdrew partition {}", row.partition);
            }
        }
    }
    Ok(0)
}

/// `host show`: the markets from the agent's info, the partitions (for the
/// lender) with the broker that manages each.
async fn host_show(global: &Global, agent_url: &str) -> Result<()> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let info = client
        .agent_info()
        .await
        .context("failed to ask the agent")?;
    let rows = client
        .agent_list_partitions()
        .await
        .context("failed to list partitions (the host's lender token is needed)")?;
    if global.output == OutputFormat::Json {
        print_json(
            &serde_json::json!({"host_id": info.host_id, "driver": info.driver,
            "capacity": info.capacity, "markets": info.markets, "partitions": rows}),
        );
        return Ok(());
    }
    println!("host {} (driver {})", info.host_id, info.driver);
    println!("{:<32} MANAGES", "BROKER");
    for market in &info.markets {
        let manages = match (&market.share, market.first_index, market.last_index) {
            (Some(share), Some(first), Some(last)) => format!(
                "a share of {} vCPUs, {} MiB, {} GiB (carves partitions {first}-{last})",
                share.vcpus, share.memory_mib, share.disk_gib
            ),
            _ => "the fixed partitions".to_string(),
        };
        println!("{:<32} {manages}", market.broker_url);
    }
    println!(
        "{:<16} {:<32} {:<8} TERMS",
        "PARTITION", "MANAGED BY", "STATUS"
    );
    for row in &rows {
        let status = match row.lease_id {
            Some(_) => "leased",
            None if row.built => "wiping",
            None => "free",
        };
        println!(
            "{:<16} {:<32} {:<8} {}",
            row.partition.to_string(),
            row.managed_by.as_deref().unwrap_or("-"),
            status,
            terms_text(&row.terms)
        );
    }
    Ok(())
}

async fn host_credential(global: &Global, host_id: &str) -> Result<()> {
    let created = broker(global)?
        .create_host_credential(host_id)
        .await
        .with_context(|| format!("failed to make a credential for host '{host_id}'"))?;
    if global.output == OutputFormat::Json {
        print_json(&created);
    } else {
        println!(
            "credential for host '{}' (acts only for it; shown once):\n{}",
            created.host_id, created.token
        );
    }
    Ok(())
}

async fn host_add(global: &Global, agent_url: &str, terms: &TermsArgs) -> Result<()> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let info = client
        .agent_info()
        .await
        .context("failed to reach the agent")?;
    let terms = terms.apply(None, &info.images)?;
    let row = client
        .agent_add_partition(&terms)
        .await
        .context("failed to add the partition")?;
    if global.output == OutputFormat::Json {
        print_json(&row);
    } else {
        println!(
            "added and registered partition {}: {}",
            row.partition,
            terms_text(&row.terms)
        );
    }
    Ok(())
}

async fn host_alter(global: &Global, agent_url: &str, index: u32, terms: &TermsArgs) -> Result<()> {
    let client = client_of(global, agent_url, global.token.clone())?;
    let rows = client
        .agent_list_partitions()
        .await
        .context("failed to read the partition table")?;
    let current = rows
        .iter()
        .find(|r| r.partition.index == index)
        .ok_or_else(|| {
            anyhow!("failed to alter partition {index}: no such partition on this host")
        })?;
    let terms = terms.apply(Some(&current.terms), &[])?;
    let row = client
        .agent_alter_partition(index, &terms)
        .await
        .with_context(|| format!("failed to alter partition {}", current.partition))?;
    if global.output == OutputFormat::Json {
        print_json(&row);
    } else {
        println!(
            "altered partition {}: {}",
            row.partition,
            terms_text(&row.terms)
        );
    }
    Ok(())
}

// ---- borrower ----

#[derive(Args, Clone, Default)]
pub struct RequirementArgs {
    /// Exactly this many vCPUs: a broker that carves partitions out of
    /// shares carves this size; a fixed partition needs at least it.
    #[arg(long, conflicts_with = "min_vcpus")]
    pub vcpus: Option<u32>,
    /// Exactly this much memory, in MiB (as --vcpus).
    #[arg(long, conflicts_with = "min_memory_mib")]
    pub memory_mib: Option<u64>,
    /// Exactly this much disk, in GiB (as --vcpus).
    #[arg(long, conflicts_with = "min_disk_gib")]
    pub disk_gib: Option<u64>,
    #[arg(long)]
    pub min_vcpus: Option<u32>,
    /// Minimum CPU cap in percent.
    #[arg(long = "min-cpu-cap")]
    pub min_cpu_cap_percent: Option<u32>,
    #[arg(long)]
    pub min_memory_mib: Option<u64>,
    #[arg(long)]
    pub min_disk_gib: Option<u64>,
    /// The image (OS) the partition must be able to boot.
    #[arg(long)]
    pub image: Option<String>,
    /// Highest price per hour you accept, in units (e.g. 0.50).
    #[arg(long)]
    pub max_price_per_hour: Option<String>,
    /// Also accept unisolated partitions (the `process` driver: jobs run as
    /// plain processes of the host and can see its files). Off by default.
    #[arg(long)]
    pub allow_unisolated: bool,
}

impl RequirementArgs {
    fn to_requirements(&self) -> Result<Requirements> {
        Ok(Requirements {
            min_vcpus: self.vcpus.or(self.min_vcpus),
            min_cpu_cap_percent: self.min_cpu_cap_percent,
            min_memory_mib: self.memory_mib.or(self.min_memory_mib),
            min_disk_gib: self.disk_gib.or(self.min_disk_gib),
            image: self.image.clone(),
            max_price_per_hour_micros: self
                .max_price_per_hour
                .as_deref()
                .map(|t| parse_units_to_micros("max_price_per_hour", t))
                .transpose()
                .map_err(|e| anyhow!("{e}"))?,
            allow_unisolated: self.allow_unisolated,
        })
    }
}

#[derive(Args)]
pub struct FindArgs {
    #[command(flatten)]
    pub requirements: RequirementArgs,
    /// Find at this agent itself (one started with `agent --direct`, which
    /// lends without a broker) instead of at the broker.
    #[arg(long, value_parser = crate::parse_url)]
    pub agent: Option<String>,
    /// Most offers to show.
    #[arg(long, default_value_t = 10)]
    pub limit: u32,
}

pub async fn find(global: &Global, args: FindArgs) -> Result<i32> {
    let requirements = args.requirements.to_requirements()?;
    if let Some(agent_url) = &args.agent {
        return crate::direct::find(global, agent_url, &requirements, args.limit).await;
    }
    let answer = broker(global)?
        .find(&requirements, Some(args.limit))
        .await
        .context("failed to find partitions")?;
    let nothing = answer.offers.is_empty() && answer.shares.is_empty();
    if global.output == OutputFormat::Json {
        print_json(&answer);
    } else if nothing {
        if let Some(explanation) = &answer.explanation {
            print!("{}", explain_text(explanation, Some(&requirements)));
        }
    } else {
        if !answer.offers.is_empty() {
            println!("{:<16} {:<10} TERMS", "PARTITION", "ISOLATION");
        }
        for offer in &answer.offers {
            println!(
                "{:<16} {:<10} {}",
                offer.partition.to_string(),
                isolation_text(&offer.terms),
                terms_text(&offer.terms)
            );
        }
        if !answer.shares.is_empty() {
            print_share_quotes(&answer.shares);
        }
    }
    Ok(if nothing { EXIT_NO_MATCH } else { 0 })
}

#[derive(Args)]
pub struct LeaseArgs {
    /// The partition to lease, as HOST/INDEX (from `leasehold find`).
    #[arg(required_unless_present_any = ["best", "vcpus", "memory_mib", "disk_gib"],
          conflicts_with_all = ["best", "vcpus", "memory_mib", "disk_gib"])]
    pub partition: Option<String>,
    /// Lease the best (cheapest, then best fitting) partition that meets
    /// the requirements; implied by --vcpus, --memory-mib or --disk-gib,
    /// which ask for a partition of exactly that size.
    #[arg(long)]
    pub best: bool,
    #[command(flatten)]
    pub requirements: RequirementArgs,
    /// Book the lease ahead from this time (RFC 3339, e.g.
    /// 2026-12-01T09:00:00Z): billed from it, its key valid from it.
    #[arg(long, requires = "end", value_name = "TIME")]
    pub start: Option<String>,
    /// With --start: the lease ends here; its key expires, billing stops
    /// and the broker releases it.
    #[arg(long, requires = "start", value_name = "TIME")]
    pub end: Option<String>,
    /// Lease at this agent itself (one started with `agent --direct`):
    /// its owner signs the key; nothing is billed.
    #[arg(long, value_parser = crate::parse_url, conflicts_with_all = ["start", "end"])]
    pub agent: Option<String>,
}

fn lease_text(lease: &leasehold_api::LeaseView) -> String {
    let mut text = format!(
        "lease {} on {} ({}), {:?}, started at {} ms",
        lease.lease_id,
        lease.partition,
        terms_text(&lease.terms),
        lease.state,
        lease.started_at_ms
    );
    if let Some(url) = &lease.agent_url {
        text.push_str(&format!("\n  host agent: {url}"));
    }
    if let Some(charge) = lease.charge_micros {
        text.push_str(&format!("\n  charged: {}", format_micros(charge as i128)));
    }
    text
}

pub async fn lease(global: &Global, args: LeaseArgs) -> Result<i32> {
    let sized = args.requirements.vcpus.is_some()
        || args.requirements.memory_mib.is_some()
        || args.requirements.disk_gib.is_some();
    if let Some(agent_url) = &args.agent {
        let best = (args.best || sized)
            .then(|| args.requirements.to_requirements())
            .transpose()?;
        return crate::direct::lease(global, agent_url, args.partition.as_deref(), best).await;
    }
    let request = if args.best || sized {
        LeaseRequest {
            partition: None,
            best: Some(args.requirements.to_requirements()?),
            allow_unisolated: false,
            start: args.start.clone(),
            end: args.end.clone(),
        }
    } else {
        LeaseRequest {
            partition: args.partition.clone(),
            best: None,
            allow_unisolated: args.requirements.allow_unisolated,
            start: args.start.clone(),
            end: args.end.clone(),
        }
    };
    let what = args
        .partition
        .clone()
        .unwrap_or_else(|| "the best match".to_string());
    let lease = broker(global)?
        .lease(&request)
        .await
        .with_context(|| format!("failed to lease {what}"))?;
    if global.output == OutputFormat::Json {
        print_json(&lease);
    } else {
        println!("{}", lease_text(&lease));
        println!(
            "  lease key: {}",
            lease.lease_key.as_deref().unwrap_or("(not shown)")
        );
        println!(
            "next: leasehold run --lease {} -- echo hello",
            lease.lease_id
        );
    }
    Ok(0)
}

#[derive(Args)]
pub struct RunArgs {
    /// The lease to run on.
    #[arg(long)]
    pub lease: u64,
    /// Refused: a lease key is a bearer capability, and the command line is
    /// readable by every local user. Use --key-file or LEASEHOLD_LEASE_KEY.
    #[arg(long = "key", hide = true, value_name = "VALUE")]
    pub key_on_command_line: Option<String>,
    /// A file holding the lease key (refused when group or others can read
    /// it), or set LEASEHOLD_LEASE_KEY; by default the key is fetched from
    /// the broker with your token.
    #[arg(long)]
    pub key_file: Option<std::path::PathBuf>,
    /// The agent's URL; fetched from the broker when not given. An agent
    /// that lends directly (`agent --direct`) is asked for the lease itself.
    #[arg(long)]
    pub agent: Option<String>,
    /// Stop the job after this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// The image to boot (one the partition's terms offer; default: its first).
    #[arg(long)]
    pub image: Option<String>,
    /// The command to run, after `--`.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// The lease key given by file or environment, never by the command line.
fn given_lease_key(args: &RunArgs) -> Result<Option<String>> {
    if args.key_on_command_line.is_some() {
        bail!("refusing --key VALUE: a lease key on the command line can be read by every local user (in /proc/PID/cmdline); pass --key-file FILE (mode 0600) or set LEASEHOLD_LEASE_KEY");
    }
    if let Some(path) = &args.key_file {
        let key = leasehold_store::private_fs::read_private_file(path)
            .context("failed to read the lease key")?;
        return Ok(Some(key));
    }
    Ok(std::env::var("LEASEHOLD_LEASE_KEY")
        .ok()
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty()))
}

pub async fn run(global: &Global, args: RunArgs) -> Result<i32> {
    let given_key = given_lease_key(&args)?;
    let direct = match &args.agent {
        Some(url) => crate::direct::direct_lease_for_run(global, url, args.lease).await?,
        None => None,
    };
    let lease = match direct {
        Some(lease) => lease,
        None => broker(global)?
            .get_lease(args.lease)
            .await
            .with_context(|| format!("failed to look up lease {}", args.lease))?,
    };
    let key = match given_key.or(lease.lease_key.clone()) {
        Some(key) => key,
        None => bail!(
            "failed to run on lease {}: the broker shows no key for it (is it released, or not yours?)",
            args.lease
        ),
    };
    let agent_url = match args.agent.clone().or(lease.agent_url.clone()) {
        Some(url) => url,
        None => bail!(
            "failed to run on lease {}: its host has no agent address; pass --agent URL",
            args.lease
        ),
    };
    let request = SubmitJobRequest {
        lease_key: key.clone(),
        command: args.command.clone(),
        timeout_ms: args.timeout_secs.map(|s| s.saturating_mul(1000)),
        image: args.image.clone(),
        stream: false,
    };
    let result = submit_cancelling_on_interrupt(global, &agent_url, &key, &lease, &request)
        .await
        .with_context(|| {
            format!(
                "failed to run the job on lease {} ({})",
                args.lease, lease.partition
            )
        })?;
    report_job_end(global, &result);
    Ok(match result.state {
        leasehold_api::JobState::TimedOut => EXIT_JOB_TIMED_OUT,
        leasehold_api::JobState::Cancelled => EXIT_JOB_CANCELLED,
        _ => result.exit_code.unwrap_or(EXIT_FAILURE),
    })
}

/// Runs the job on the agent, printing its output live (text output);
/// Ctrl-C meanwhile cancels the job, whose id arrives with the first event.
async fn submit_cancelling_on_interrupt(
    global: &Global,
    agent_url: &str,
    key: &str,
    lease: &leasehold_api::LeaseView,
    request: &SubmitJobRequest,
) -> Result<leasehold_api::JobResult> {
    let agent = client_of(global, agent_url, None)?;
    let text = global.output == OutputFormat::Text;
    let (job_id_sender, job_id_receiver) = tokio::sync::watch::channel(None::<u64>);
    let canceller = client_of(global, agent_url, Some(key.to_string()))?;
    let cancel_on_interrupt = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let job_id = *job_id_receiver.borrow();
            if let Some(job_id) = job_id {
                eprintln!("leasehold: cancelling job {job_id}");
                let _ = canceller.cancel_job(job_id).await;
            }
        }
    });
    // Until the first byte of output (the partition may be building, its
    // image downloading); cleared before that byte is printed.
    let waiting = crate::progress::spinner(global, "waiting for the job's first output");
    let result = agent
        .submit_job_streaming(lease.partition.index, request, |event| {
            use std::io::Write;
            match event {
                leasehold_api::JobEvent::Started { job_id } => {
                    let _ = job_id_sender.send(Some(*job_id));
                    waiting.set_message(format!(
                        "job {job_id} started; waiting for its first output"
                    ));
                }
                leasehold_api::JobEvent::Stdout { data } if text => {
                    waiting.finish_and_clear();
                    print!("{data}");
                    let _ = std::io::stdout().flush();
                }
                leasehold_api::JobEvent::Stderr { data } if text => {
                    waiting.finish_and_clear();
                    eprint!("{data}");
                }
                _ => {}
            }
        })
        .await;
    waiting.finish_and_clear();
    cancel_on_interrupt.abort();
    Ok(result?)
}

/// The job's record for scripts, or what people should know about its end.
fn report_job_end(global: &Global, result: &leasehold_api::JobResult) {
    if global.output == OutputFormat::Json {
        print_json(result);
        return;
    }
    if result.output_truncated {
        eprintln!("leasehold: the job's output was cut at 1 MiB per stream in its record");
    }
    if result.oom_killed {
        eprintln!("leasehold: the job was killed: it ran out of the partition's memory");
    }
    match result.state {
        leasehold_api::JobState::TimedOut => eprintln!("leasehold: the job timed out"),
        leasehold_api::JobState::Cancelled => eprintln!("leasehold: the job was cancelled"),
        _ => {}
    }
}

#[derive(Args)]
pub struct ReleaseArgs {
    pub lease: u64,
    /// Release a direct lease at this agent (one started with `agent --direct`).
    #[arg(long, value_parser = crate::parse_url)]
    pub agent: Option<String>,
}

pub async fn release(global: &Global, args: ReleaseArgs) -> Result<i32> {
    if let Some(agent_url) = &args.agent {
        return crate::direct::release(global, agent_url, args.lease).await;
    }
    let receipt = broker(global)?
        .release(args.lease)
        .await
        .with_context(|| format!("failed to release lease {}", args.lease))?;
    if global.output == OutputFormat::Json {
        print_json(&receipt);
    } else {
        let prefix = if receipt.already_released {
            "was already released"
        } else {
            "released"
        };
        println!(
            "lease {} {}: {} s billed, charge {} (lender {}, commission {})",
            receipt.lease.lease_id,
            prefix,
            receipt.bill.billable_seconds,
            format_micros(receipt.bill.charge_micros as i128),
            format_micros(receipt.bill.lender_credit_micros as i128),
            format_micros(receipt.bill.commission_micros as i128)
        );
    }
    Ok(0)
}

pub async fn leases(global: &Global) -> Result<i32> {
    let leases = broker(global)?
        .list_leases()
        .await
        .context("failed to list leases")?;
    if global.output == OutputFormat::Json {
        print_json(&leases);
    } else {
        if leases.is_empty() {
            println!("no leases");
        }
        for lease in &leases {
            println!("{}", lease_text(lease));
        }
    }
    Ok(0)
}

pub async fn bill(global: &Global) -> Result<i32> {
    let bill = broker(global)?
        .bill()
        .await
        .context("failed to fetch your bill")?;
    if global.output == OutputFormat::Json {
        print_json(&bill);
    } else {
        println!(
            "{} ({}): balance {}",
            bill.principal,
            bill.role.as_str(),
            format_micros(bill.balance_micros as i128)
        );
        for lease in &bill.leases {
            let charge = lease
                .charge_micros
                .map(|c| format_micros(c as i128))
                .unwrap_or_else(|| "running".into());
            println!(
                "  lease {:<6} {:<16} {:?}  {}",
                lease.lease_id,
                lease.partition.to_string(),
                lease.state,
                charge
            );
        }
    }
    Ok(0)
}

pub async fn ledger(global: &Global) -> Result<i32> {
    let ledger = broker(global)?
        .ledger()
        .await
        .context("failed to fetch the ledger")?;
    if global.output == OutputFormat::Json {
        print_json(&ledger);
    } else {
        for t in &ledger.transfers {
            println!(
                "#{:<6} lease {:<6} {} -> {}  {}",
                t.transfer_id,
                t.lease_id,
                t.debit_account,
                t.credit_account,
                format_micros(t.amount_micros as i128)
            );
        }
        println!("balances:");
        for b in &ledger.balances {
            println!(
                "  {:<32} {}",
                b.account,
                format_micros(b.balance_micros as i128)
            );
        }
        println!("sum: {}", format_micros(ledger.sum_micros as i128));
        print_rights_ledger(&ledger);
    }
    Ok(0)
}

/// Usage rights (seed 004) moved between hosts, in whole rights.
fn print_rights_ledger(ledger: &leasehold_api::LedgerView) {
    if ledger.rights_movements.is_empty() && ledger.rights_balances.is_empty() {
        return;
    }
    println!("usage rights:");
    for m in &ledger.rights_movements {
        println!(
            "  #{:<6} {} -> {}  {} rights",
            m.movement_id, m.debit_account, m.credit_account, m.amount
        );
    }
    for b in &ledger.rights_balances {
        println!("  {:<40} {}", b.account, b.balance_micros);
    }
}

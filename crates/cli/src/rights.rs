//! `leasehold rights ...` and `leasehold group ...` (seed 004): the share
//! group's usage-rights table and the orders its managers (the agents)
//! take. Orders for a host go to that host's manager, found in the table
//! that the agent named by `--agent` serves.

use crate::verbs::{client_of, print_json, AgentArg};
use crate::{Global, OutputFormat};
use anyhow::{anyhow, Context, Result};
use clap::Subcommand;
use leasehold_api::rights::*;
use leasehold_api::Client;

#[derive(Subcommand)]
pub enum RightsCommand {
    /// The share group's table (seed 004, FIG. 4A): per host and
    /// partition (0 is the owner share), rights owned, modules active and
    /// inactive, workload, and the manager's address.
    Show {
        /// Only this host's rows.
        #[arg(long)]
        host: Option<String>,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// More rights for a partition (FIG. 5): from inside its host when
    /// the host has spare ones, else from the hosts of the group with the
    /// lowest workload.
    Request {
        #[arg(long)]
        host: String,
        /// The partition's index (0: the owner share).
        #[arg(long)]
        partition: u32,
        #[arg(long)]
        modules: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// A partition gives rights back to its host's owner share.
    Release {
        #[arg(long)]
        host: String,
        #[arg(long)]
        partition: u32,
        #[arg(long)]
        modules: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Moves permanent rights from one host's partition to another's
    /// (HOST or HOST/PARTITION; the owner share when no partition).
    Transfer {
        #[arg(long, value_name = "HOST[/PARTITION]")]
        from: String,
        #[arg(long, value_name = "HOST[/PARTITION]")]
        to: String,
        #[arg(long)]
        modules: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Admin: rights bought for a host (its owner share, or --partition),
    /// permanent or until --expires.
    Grant {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[arg(long)]
        modules: u32,
        /// When temporary rights expire: RFC 3339, or a duration from now
        /// such as 90s, 30m, 2h or 7d.
        #[arg(long, value_name = "TIME")]
        expires: Option<String>,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Admin: takes permanent rights away (idle ones first, then modules
    /// deactivate).
    Revoke {
        #[arg(long)]
        host: String,
        #[arg(long, default_value_t = 0)]
        partition: u32,
        #[arg(long)]
        modules: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
}

#[derive(Subcommand)]
pub enum GroupCommand {
    /// The group: its mode, primary manager and epoch, and every host's
    /// rows (FIG. 4A), with the transfers it keeps.
    Show {
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Adds a host to the group's table before its manager starts (the
    /// manager fills in its rows when it joins with --group).
    Add {
        host: String,
        /// The host's cores (0: its manager says when it joins).
        #[arg(long, default_value_t = 0)]
        modules: u32,
        #[command(flatten)]
        agent: AgentArg,
    },
    /// Removes a host; its pending transfers abort, and its rights leave
    /// with it unless --hand-over gives them to the other hosts first.
    Remove {
        host: String,
        #[arg(long)]
        hand_over: bool,
        #[command(flatten)]
        agent: AgentArg,
    },
}

fn agent_client(global: &Global, agent: &AgentArg) -> Result<Client> {
    client_of(global, &agent.agent, global.token.clone())
}

async fn document(client: &Client) -> Result<ShareGroupDocument> {
    client
        .agent_rights()
        .await
        .context("failed to read the share group's rights")
}

/// The client of `host`'s manager, found in the table.
async fn manager_of(global: &Global, agent: &AgentArg, host: &str) -> Result<Client> {
    let client = agent_client(global, agent)?;
    let document = document(&client).await?;
    let url = document
        .group
        .hosts
        .get(host)
        .map(|h| h.manager_url.clone())
        .ok_or_else(|| {
            anyhow!(
                "--host: '{host}' is not in the share group '{}'",
                document.group.name
            )
        })?;
    if url.is_empty() {
        return Err(anyhow!(
            "--host: '{host}' has no manager yet (start its agent with --group)"
        ));
    }
    client_of(global, &url, global.token.clone())
}

fn parse_slot(field: &str, text: &str) -> Result<(String, u32)> {
    match text.split_once('/') {
        None => Ok((text.to_string(), 0)),
        Some((host, partition)) => partition
            .parse()
            .map(|p| (host.to_string(), p))
            .map_err(|_| anyhow!("{field}: '{partition}' is not a partition index")),
    }
}

/// `--expires`: RFC 3339, or a duration from now (90s, 30m, 2h, 7d).
fn parse_expires(text: &str, now_ms: u64) -> Result<u64> {
    if let Ok(at_ms) = leasehold_api::ms_from_rfc3339(text) {
        return Ok(at_ms);
    }
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let scale_ms: u64 = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(anyhow!(
                "--expires: '{text}' is neither RFC 3339 nor a duration like 30m"
            ))
        }
    };
    let count: u64 = number
        .parse()
        .map_err(|_| anyhow!("--expires: '{text}' is neither RFC 3339 nor a duration like 30m"))?;
    Ok(now_ms + count.saturating_mul(scale_ms))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub async fn rights(global: &Global, command: RightsCommand) -> Result<i32> {
    let answer = match command {
        RightsCommand::Show { host, agent } => return show(global, &agent, host.as_deref()).await,
        RightsCommand::Request {
            host,
            partition,
            modules,
            agent,
        } => {
            let body = RightsRequestBody {
                host_id: host.clone(),
                partition,
                modules,
            };
            manager_of(global, &agent, &host)
                .await?
                .agent_rights_request(&body)
                .await
        }
        RightsCommand::Release {
            host,
            partition,
            modules,
            agent,
        } => {
            let body = RightsSlotBody {
                host_id: host.clone(),
                partition,
                modules,
            };
            manager_of(global, &agent, &host)
                .await?
                .agent_rights_release(&body)
                .await
        }
        other => group_order(global, other).await?,
    };
    print_order(global, answer.context("the rights order failed")?);
    Ok(0)
}

/// Orders any manager of the group carries out: transfers, grants and
/// revocations.
async fn group_order(
    global: &Global,
    command: RightsCommand,
) -> Result<Result<RightsOrderAnswer, leasehold_api::ApiError>> {
    Ok(match command {
        RightsCommand::Transfer {
            from,
            to,
            modules,
            agent,
        } => {
            let (from_host, from_partition) = parse_slot("--from", &from)?;
            let (to_host, to_partition) = parse_slot("--to", &to)?;
            let body = RightsTransferBody {
                from_host,
                from_partition,
                to_host,
                to_partition,
                modules,
            };
            agent_client(global, &agent)?
                .agent_rights_transfer(&body)
                .await
        }
        RightsCommand::Grant {
            host,
            partition,
            modules,
            expires,
            agent,
        } => {
            let expires_at_ms = expires.map(|t| parse_expires(&t, now_ms())).transpose()?;
            let body = RightsGrantBody {
                host_id: host,
                partition,
                modules,
                expires_at_ms,
            };
            agent_client(global, &agent)?
                .agent_rights_grant(&body)
                .await
        }
        RightsCommand::Revoke {
            host,
            partition,
            modules,
            agent,
        } => {
            let body = RightsSlotBody {
                host_id: host,
                partition,
                modules,
            };
            agent_client(global, &agent)?
                .agent_rights_revoke(&body)
                .await
        }
        // Answered by `rights` itself.
        RightsCommand::Show { .. }
        | RightsCommand::Request { .. }
        | RightsCommand::Release { .. } => {
            return Err(anyhow!(
                "this order is not one for any manager of the group"
            ))
        }
    })
}

/// `rights show`: FIG. 4A's rows (of one host with `--host`).
async fn show(global: &Global, agent: &AgentArg, host: Option<&str>) -> Result<i32> {
    let document = document(&agent_client(global, agent)?).await?;
    let view = RightsTableView::of(&document, host, now_ms());
    if global.output == OutputFormat::Json {
        print_json(&view);
    } else {
        print!("{}", table_text(&view));
    }
    Ok(0)
}

pub async fn group(global: &Global, command: GroupCommand) -> Result<i32> {
    let answer = match command {
        GroupCommand::Show { agent } => {
            let document = document(&agent_client(global, &agent)?).await?;
            if global.output == OutputFormat::Json {
                print_json(&document);
            } else {
                let view = RightsTableView::of(&document, None, now_ms());
                print!("{}", table_text(&view));
                print!("{}", transfers_text(&document));
            }
            return Ok(0);
        }
        GroupCommand::Add {
            host,
            modules,
            agent,
        } => {
            let body = GroupAddBody {
                host_id: host,
                modules,
            };
            agent_client(global, &agent)?.agent_group_add(&body).await
        }
        GroupCommand::Remove {
            host,
            hand_over,
            agent,
        } => {
            agent_client(global, &agent)?
                .agent_group_remove(&host, hand_over)
                .await
        }
    };
    print_order(global, answer.context("the group order failed")?);
    Ok(0)
}

fn print_order(global: &Global, answer: RightsOrderAnswer) {
    if global.output == OutputFormat::Json {
        print_json(&answer);
    } else if !answer.lent_inside_host.is_empty() {
        // FIG. 4B: committed by the host's manager, published after.
        println!(
            "done inside the host: loans {:?} committed and the modules switched; the group's table (version {}) receives them within moments",
            answer.lent_inside_host, answer.version
        );
    } else {
        println!(
            "done at table version {}; transfers committed {:?}, aborted {:?}",
            answer.version, answer.committed, answer.aborted
        );
    }
}

/// FIG. 4A as text.
pub fn table_text(view: &RightsTableView) -> String {
    let mut text = format!(
        "share group {} ({}, primary {} at epoch {}, version {}{})\n",
        view.group,
        view.mode,
        view.primary.as_deref().unwrap_or("none"),
        view.primary_epoch,
        view.version,
        if view.stale {
            ", from the manager's copy: the store is unreachable"
        } else {
            ""
        }
    );
    text.push_str(&format!(
        "{:<16} {:>9} {:>6} {:>6} {:>8} {:>8}  {}\n",
        "HOST", "PARTITION", "RIGHTS", "ACTIVE", "INACTIVE", "WORKLOAD", "MANAGER"
    ));
    for row in &view.rows {
        let name = if row.partition == 0 {
            "owner".to_string()
        } else {
            row.partition.to_string()
        };
        text.push_str(&format!(
            "{:<16} {:>9} {:>6} {:>6} {:>8} {:>7}%  {}\n",
            row.host_id,
            name,
            row.rights_owned,
            row.modules_active,
            row.modules_inactive,
            row.workload_percent,
            row.manager_url
        ));
    }
    if view.unassigned > 0 {
        text.push_str(&format!(
            "unassigned rights (seized, no module free for them): {}\n",
            view.unassigned
        ));
    }
    text
}

fn transfers_text(document: &ShareGroupDocument) -> String {
    let mut text = String::new();
    for transfer in document.group.transfers.values().rev().take(20) {
        text.push_str(&format!(
            "transfer {:>6}  {} -> {}  {} modules  {:?}\n",
            transfer.transfer_id, transfer.from, transfer.to, transfer.modules, transfer.phase
        ));
    }
    text
}

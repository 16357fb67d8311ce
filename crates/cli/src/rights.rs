//! `leasehold rights ...` (seed 004): the share group's usage-rights table,
//! asked of the agent that manages this host's rights.

use crate::verbs::{client_of, print_json, AgentArg};
use crate::{Global, OutputFormat};
use anyhow::{Context, Result};
use clap::Subcommand;
use leasehold_core::rights::ShareGroup;

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
}

pub async fn rights(global: &Global, command: RightsCommand) -> Result<i32> {
    match command {
        RightsCommand::Show { host, agent } => {
            let client = client_of(global, &agent.agent, global.token.clone())?;
            let mut group = client
                .agent_rights()
                .await
                .context("failed to read the share group's rights")?;
            if let Some(host) = &host {
                group.hosts.retain(|id, _| id == host);
            }
            if global.output == OutputFormat::Json {
                print_json(&group);
            } else {
                print!("{}", table_text(&group));
            }
            Ok(0)
        }
    }
}

/// FIG. 4A as text.
pub fn table_text(group: &ShareGroup) -> String {
    let mut text = format!(
        "share group {} ({:?}, primary {} at epoch {})\n",
        group.name,
        group.mode,
        group.primary_host.as_deref().unwrap_or("none"),
        group.primary_epoch
    );
    text.push_str(&format!(
        "{:<16} {:>9} {:>6} {:>6} {:>8} {:>8}  {}\n",
        "HOST", "PARTITION", "RIGHTS", "ACTIVE", "INACTIVE", "WORKLOAD", "MANAGER"
    ));
    for (host_id, host) in &group.hosts {
        for (index, partition) in &host.partitions {
            let name = if *index == 0 {
                "owner".to_string()
            } else {
                index.to_string()
            };
            text.push_str(&format!(
                "{:<16} {:>9} {:>6} {:>6} {:>8} {:>7}%  {}\n",
                host_id,
                name,
                partition.permanent + partition.temporary.iter().map(|t| t.count).sum::<u32>(),
                partition.active,
                partition.inactive(),
                partition.workload_percent,
                host.manager_url
            ));
        }
    }
    if group.unassigned > 0 {
        text.push_str(&format!(
            "unassigned rights (seized, no module free for them): {}\n",
            group.unassigned
        ));
    }
    text
}

//! The verbs of seed 003's reservations: declare workloads from a file,
//! watch their acquisition, and read the pools (FIG. 3, 6), the hosts'
//! capacity (FIG. 5) and the warnings (FIG. 14). `--output json` prints the
//! API's document; text prints tables.

mod progress;
mod tables;
mod workload_file;

use crate::verbs::{client_of, EXIT_FAILURE};
use crate::{Global, OutputFormat};
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use leasehold_api::{ApiError, Client, WorkloadView};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;
use workload_file::{FileProblem, WorkloadSource};

/// `workload show --watch` stopped by Ctrl-C, as a shell reports SIGINT.
const EXIT_INTERRUPTED: i32 = 130;

fn broker(global: &Global) -> Result<Client> {
    client_of(global, &global.broker, global.token.clone())
}

fn print_json<T: Serialize + ?Sized>(value: &T) {
    println!(
        "{}",
        serde_json::to_string(value).expect("output serializes")
    );
}

#[derive(Subcommand)]
pub enum WorkloadCommand {
    /// Declare (or replace) a workload from a TOML or JSON file.
    ///
    /// The file names the workload, its priority (higher first), its start
    /// and end (RFC 3339), its `[[instance]]` entries (name, vcpus,
    /// memory_mib, disk_gib, optional image) and its `[[rule]]` entries
    /// (kind = "spread" or "pack", instances = [...]). A bad file is refused
    /// with FILE:LINE: field: problem, before it is sent when it can be.
    Apply {
        /// The workload file (JSON when it ends in .json or starts with `{`).
        file: PathBuf,
    },
    /// List the workloads you may see, with their instances' status.
    List,
    /// Show a workload's instances and how far each has acquired.
    Show(ShowArgs),
    /// Delete a workload; its pools give their capacity back.
    Delete {
        /// The workload's name.
        name: String,
    },
}

#[derive(Args)]
pub struct ShowArgs {
    /// The workload's name.
    pub name: String,
    /// Redraw each instance's acquisition as a progress bar every second
    /// until all are guaranteed or running (Ctrl-C stops, exit 130). Piped:
    /// one line per change; with --output json, one document per change.
    #[arg(long)]
    pub watch: bool,
    /// How often --watch asks the broker (tests make it short).
    #[arg(long, hide = true, default_value_t = 1000)]
    pub poll_interval_ms: u64,
}

#[derive(Subcommand)]
pub enum PoolCommand {
    /// The acquisition pools (FIG. 3) and the instance → pool links (FIG. 6).
    List,
}

#[derive(Subcommand)]
pub enum PlanCommand {
    /// Admin: run a planning round now instead of waiting for the timer.
    Run,
}

pub async fn workload(global: &Global, command: WorkloadCommand) -> Result<i32> {
    match command {
        WorkloadCommand::Apply { file } => workload_apply(global, &file).await,
        WorkloadCommand::List => {
            let workloads = broker(global)?
                .list_workloads()
                .await
                .context("failed to list workloads")?;
            print_document(global, workloads.as_slice(), tables::workload_list_text);
            Ok(0)
        }
        WorkloadCommand::Show(args) if args.watch => workload_watch(global, &args).await,
        WorkloadCommand::Show(args) => {
            let workload = fetch_workload(&broker(global)?, &args.name).await?;
            print_document(global, &workload, tables::workload_text);
            Ok(0)
        }
        WorkloadCommand::Delete { name } => {
            let answer = broker(global)?
                .delete_workload(&name)
                .await
                .with_context(|| format!("failed to delete workload '{name}'"))?;
            if global.output == OutputFormat::Json {
                print_json(&answer);
            } else {
                println!("deleted workload '{name}'; its pools gave their capacity back");
            }
            Ok(0)
        }
    }
}

/// JSON as the API sent it, or the table `text` renders.
fn print_document<T: Serialize + ?Sized>(global: &Global, document: &T, text: fn(&T) -> String) {
    if global.output == OutputFormat::Json {
        print_json(document);
    } else {
        print!("{}", text(document));
    }
}

async fn fetch_workload(client: &Client, name: &str) -> Result<WorkloadView> {
    client
        .get_workload(name)
        .await
        .with_context(|| format!("failed to read workload '{name}'"))
}

/// Reads and checks the file locally (syntax, types, times, core's rules),
/// then sends it; a refusal naming a field is pointed at its line.
async fn workload_apply(global: &Global, path: &std::path::Path) -> Result<i32> {
    let source = match WorkloadSource::read(path) {
        Ok(source) => source,
        Err(problem) => return Ok(report_file_problem(global, &problem, None)),
    };
    let file = match source.parse() {
        Ok(file) => file,
        Err(problem) => return Ok(report_file_problem(global, &problem, None)),
    };
    let applied = match broker(global)?.apply_workload(&file).await {
        Ok(applied) => applied,
        Err(error) => {
            let Some(field) = error.detail().and_then(|d| d.field.clone()) else {
                let context = format!("failed to apply workload '{}'", file.name);
                return Err(anyhow::Error::new(error).context(context));
            };
            let problem = source.problem_at(&field, &error.to_string());
            return Ok(report_file_problem(global, &problem, Some(&error)));
        }
    };
    if global.output == OutputFormat::Json {
        print_json(&applied);
    } else {
        println!(
            "applied workload '{}': {} instance(s) from {} to {}; watch it with `leasehold workload show {} --watch`",
            applied.name,
            applied.instances.len(),
            applied.start,
            applied.end,
            applied.name
        );
    }
    Ok(0)
}

/// `FILE:LINE: field: problem` on stderr (and as JSON on stdout for
/// scripts, with the broker's status and code when it refused).
fn report_file_problem(global: &Global, problem: &FileProblem, refusal: Option<&ApiError>) -> i32 {
    if global.output == OutputFormat::Json {
        print_json(&serde_json::json!({
            "error": {
                "message": problem.to_string(),
                "file": problem.file_name,
                "line": problem.line,
                "field": problem.field,
                "problem": problem.problem,
                "status": refusal.and_then(ApiError::status),
                "code": refusal.and_then(ApiError::code),
            }
        }));
    }
    eprintln!("error: {problem}");
    EXIT_FAILURE
}

/// Polls the workload every interval and shows each instance's
/// acquisition until all are settled; Ctrl-C stops early (exit 130).
async fn workload_watch(global: &Global, args: &ShowArgs) -> Result<i32> {
    let client = broker(global)?;
    let interval = Duration::from_millis(args.poll_interval_ms.max(10));
    let mut display = WatchDisplay::new(global.output);
    let watching = async {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let workload = fetch_workload(&client, &args.name).await?;
            display.show(&workload);
            if progress::workload_settled(&workload) {
                return Ok::<(), anyhow::Error>(());
            }
        }
    };
    let outcome = tokio::select! {
        outcome = watching => Some(outcome),
        _ = tokio::signal::ctrl_c() => None,
    };
    display.finish();
    match outcome {
        Some(outcome) => outcome.map(|()| 0),
        None => Ok(EXIT_INTERRUPTED),
    }
}

/// Progress bars on a terminal; otherwise one line (or, with
/// `--output json`, one document) per change.
enum WatchDisplay {
    Bars {
        bars: indicatif::MultiProgress,
        by_instance: std::collections::BTreeMap<String, indicatif::ProgressBar>,
    },
    Lines {
        last_lines: std::collections::BTreeMap<String, String>,
    },
    Json {
        last: Option<WorkloadView>,
    },
}

impl WatchDisplay {
    fn new(output: OutputFormat) -> WatchDisplay {
        if output == OutputFormat::Json {
            WatchDisplay::Json { last: None }
        } else if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            WatchDisplay::Bars {
                bars: indicatif::MultiProgress::new(),
                by_instance: Default::default(),
            }
        } else {
            WatchDisplay::Lines {
                last_lines: Default::default(),
            }
        }
    }

    fn show(&mut self, workload: &WorkloadView) {
        match self {
            WatchDisplay::Json { last } => {
                if last.as_ref() != Some(workload) {
                    print_json(workload);
                    *last = Some(workload.clone());
                }
            }
            WatchDisplay::Lines { last_lines } => {
                for line in changed_lines(last_lines, workload) {
                    println!("{line}");
                }
            }
            WatchDisplay::Bars { bars, by_instance } => {
                for instance in &workload.instances {
                    let bar = by_instance
                        .entry(instance.name.clone())
                        .or_insert_with(|| bars.add(new_bar(&instance.name)));
                    let progress = progress::least_complete(instance);
                    bar.set_length(progress.target.max(1));
                    bar.set_position(progress.acquired);
                    bar.set_message(progress::instance_detail(instance));
                }
            }
        }
    }

    fn finish(&self) {
        if let WatchDisplay::Bars { by_instance, .. } = self {
            for bar in by_instance.values() {
                bar.abandon();
            }
        }
    }
}

fn new_bar(instance: &str) -> indicatif::ProgressBar {
    let style = indicatif::ProgressStyle::with_template("{prefix:<16} [{bar:30}] {msg}")
        .expect("the template is valid")
        .progress_chars("=> ");
    indicatif::ProgressBar::new(1)
        .with_style(style)
        .with_prefix(instance.to_string())
}

/// The lines of the instances whose line changed since the last poll.
fn changed_lines(
    last_lines: &mut std::collections::BTreeMap<String, String>,
    workload: &WorkloadView,
) -> Vec<String> {
    let mut changed = Vec::new();
    for instance in &workload.instances {
        let line = progress::instance_line(instance);
        if last_lines.get(&instance.name) != Some(&line) {
            last_lines.insert(instance.name.clone(), line.clone());
            changed.push(line);
        }
    }
    changed
}

pub async fn pool(global: &Global, command: PoolCommand) -> Result<i32> {
    match command {
        PoolCommand::List => {
            let pools = broker(global)?
                .list_pools()
                .await
                .context("failed to list acquisition pools")?;
            print_document(global, &pools, tables::pool_list_text);
            Ok(0)
        }
    }
}

/// `leasehold host capacity`: each host's capacity for pools (FIG. 5).
pub async fn host_capacity(global: &Global) -> Result<i32> {
    let hosts = broker(global)?
        .host_capacity()
        .await
        .context("failed to read the hosts' capacity")?;
    print_document(global, hosts.as_slice(), tables::host_capacity_text);
    Ok(0)
}

pub async fn warnings(global: &Global) -> Result<i32> {
    let warnings = broker(global)?
        .warnings()
        .await
        .context("failed to read the warnings")?;
    print_document(global, warnings.as_slice(), tables::warnings_text);
    Ok(0)
}

pub async fn plan(global: &Global, command: PlanCommand) -> Result<i32> {
    match command {
        PlanCommand::Run => {
            let round = broker(global)?
                .plan_now()
                .await
                .context("failed to run a planning round")?;
            if global.output == OutputFormat::Json {
                print_json(&round);
            } else {
                println!("planning round done: {} change(s)", round.changes);
            }
            Ok(0)
        }
    }
}

/// `leasehold instance ...`: one instance of a workload.
#[derive(Subcommand)]
pub enum InstanceCommand {
    /// Move a guaranteed or running instance to another host (seed 003,
    /// FIG. 15): a pool gathers its capacity there while the old one keeps
    /// the guarantee, and takes over once it holds all of it.
    Migrate {
        /// The instance's name.
        name: String,
        /// The host to move it to.
        #[arg(long, value_name = "HOST")]
        to: String,
    },
    /// Delete one instance (FIG. 16); its pool gives its capacity back.
    Delete {
        /// The instance's name.
        name: String,
    },
}

/// `leasehold power ...`: power saving (FIG. 17, admin).
#[derive(Subcommand)]
pub enum PowerCommand {
    /// Drain the least-used host that may go: its instances move to other
    /// hosts (their guarantees kept), and it takes no new pools. A host a
    /// reservation starting within --horizon-secs needs stays up.
    Save {
        #[arg(long, default_value_t = 3600)]
        horizon_secs: u64,
    },
    /// Power a drained host up again.
    Up {
        /// The host's id.
        host: String,
    },
}

pub async fn instance(global: &Global, command: InstanceCommand) -> Result<i32> {
    let client = broker(global)?;
    let answer = match command {
        InstanceCommand::Migrate { name, to } => client
            .migrate_instance(&name, &to)
            .await
            .with_context(|| format!("failed to migrate instance {name} to {to}"))?,
        InstanceCommand::Delete { name } => client
            .delete_instance(&name)
            .await
            .with_context(|| format!("failed to delete instance {name}"))?,
    };
    if global.output == OutputFormat::Json {
        print_json(&answer);
    } else if let Some(to) = answer.get("moving_to").and_then(|v| v.as_str()) {
        println!("moving to {to}: a pool gathers its capacity there; the old one holds the guarantee until then");
    } else {
        println!("deleted; its capacity goes back to its host");
    }
    Ok(0)
}

pub async fn power(global: &Global, command: PowerCommand) -> Result<i32> {
    let client = broker(global)?;
    match command {
        PowerCommand::Save { horizon_secs } => {
            let request = leasehold_api::PowerSaveRequest {
                horizon_secs: Some(horizon_secs),
            };
            let saved = client
                .power_save(&request)
                .await
                .context("failed to save power")?;
            if global.output == OutputFormat::Json {
                print_json(&saved);
            } else {
                match &saved.host_id {
                    Some(host) => println!("powering down {host}: {} instance(s) moving off it", saved.instances_moving),
                    None => println!("no host may be powered down now (each is leased, needed soon, or down already)"),
                }
            }
        }
        PowerCommand::Up { host } => {
            let answer = client
                .power_up(&host)
                .await
                .with_context(|| format!("failed to power up {host}"))?;
            if global.output == OutputFormat::Json {
                print_json(&answer);
            } else {
                println!("{host} is up: it takes pools again");
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests;

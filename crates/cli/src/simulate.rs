//! `leasehold simulate FILE`: a reservation scenario (hosts with owner-load
//! traces, workloads, a policy) run purely through core's planner on a
//! simulated clock (`leasehold_core::reservation::simulation`), printing at
//! each step the pools (FIG. 3, with the links of FIG. 6), the hosts'
//! capacity (FIG. 5) and the warnings (FIG. 14). No broker, no wall clock:
//! the same file prints the same output every time.

use crate::{Global, OutputFormat};
use anyhow::{bail, Context, Result};
use clap::Args;
use leasehold_api::reservations::{
    ms_from_rfc3339, rfc3339_from_ms, HostCapacityView, InstancePoolLink, PoolList, PoolView,
    WarningView,
};
use leasehold_core::reservation::planner::PlanPolicy;
use leasehold_core::reservation::simulation::{HostCapacityRow, SimulatedHost, Simulation};
use leasehold_core::reservation::warnings::{Warning, WarningReason};
use leasehold_core::reservation::{
    Capacity, InstanceSpec, PlacementRule, Pool, PoolPhase, ReservationChange, Workload,
};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Args)]
pub struct SimulateArgs {
    /// The scenario (TOML): `[policy]`, `[[host]]` with an `owner_load`
    /// trace of [offset_seconds, vcpus, memory_mib], `[[workload]]` shaped
    /// like a workload file with `start`/`end` as seconds from the epoch
    /// of the scenario (or RFC 3339), `[[delete]]`; see
    /// examples/temporary-shortage.toml.
    pub file: PathBuf,
}

/// The scenario's clock starts here unless the file says `epoch`, so the
/// output never depends on when it runs.
const DEFAULT_EPOCH: &str = "2026-01-01T00:00:00Z";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    epoch: Option<String>,
    /// Steps to run; or `duration_seconds`; or, with neither, until one
    /// interval after the last start.
    steps: Option<u64>,
    duration_seconds: Option<u64>,
    #[serde(default)]
    policy: PolicyFile,
    #[serde(rename = "host", default)]
    hosts: Vec<HostFile>,
    #[serde(rename = "workload", default)]
    workloads: Vec<ScenarioWorkload>,
    #[serde(rename = "delete", default)]
    deletions: Vec<DeletionFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default = "default_interval_seconds")]
    interval_seconds: u64,
    threshold: Option<CapacityFile>,
    step: Option<CapacityFile>,
    #[serde(default = "default_candidates")]
    candidates: usize,
    #[serde(default = "default_fruitless_limit")]
    fruitless_limit: u32,
    /// FIG. 22: hand over a step per interval from the start.
    #[serde(default)]
    gradual_handover: bool,
}

fn default_interval_seconds() -> u64 {
    PlanPolicy::default().interval_ms / 1000
}

fn default_candidates() -> usize {
    PlanPolicy::default().candidates
}

fn default_fruitless_limit() -> u32 {
    PlanPolicy::default().fruitless_limit
}

impl Default for PolicyFile {
    fn default() -> Self {
        PolicyFile {
            interval_seconds: default_interval_seconds(),
            threshold: None,
            step: None,
            candidates: default_candidates(),
            fruitless_limit: default_fruitless_limit(),
            gradual_handover: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
struct CapacityFile {
    #[serde(default)]
    cpu_centicores: u64,
    #[serde(default)]
    memory_mib: u64,
    #[serde(default)]
    disk_gib: u64,
}

impl CapacityFile {
    fn capacity(self) -> Capacity {
        Capacity::new(self.cpu_centicores, self.memory_mib, self.disk_gib)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    id: String,
    cpus: u64,
    memory_mib: u64,
    disk_gib: u64,
    #[serde(default)]
    owner_share_centicores: u64,
    #[serde(default)]
    owner_share_memory_mib: u64,
    #[serde(default)]
    owner_share_disk_gib: u64,
    /// What its partitions in the market take.
    #[serde(default)]
    lent: Option<CapacityFile>,
    /// [offset_seconds, vcpus, memory_mib]: the owner's use from then on.
    #[serde(default)]
    owner_load: Vec<(u64, u64, u64)>,
}

/// A time in the file: seconds from the scenario's epoch, or RFC 3339.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum TimeFile {
    Offset(u64),
    Text(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioWorkload {
    name: String,
    #[serde(default)]
    priority: i64,
    /// When it is applied (default: at the epoch).
    #[serde(default)]
    applied: Option<TimeFile>,
    start: TimeFile,
    end: TimeFile,
    #[serde(rename = "instance", default)]
    instances: Vec<InstanceSpec>,
    #[serde(rename = "rule", default)]
    rules: Vec<PlacementRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeletionFile {
    workload: String,
    at: TimeFile,
}

/// One step's tables, as `--output json` prints them (one line each).
#[derive(Debug, Serialize)]
struct StepView {
    step: u64,
    at: String,
    at_ms: u64,
    pools: PoolList,
    hosts: Vec<HostCapacityView>,
    warnings: Vec<WarningView>,
}

pub fn simulate(global: &Global, args: SimulateArgs) -> Result<i32> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("failed to read {}", args.file.display()))?;
    let file: ScenarioFile = toml::from_str(&text)
        .with_context(|| format!("failed to read the scenario {}", args.file.display()))?;
    let (mut sim, steps) = build(&file)?;
    let mut out = std::io::stdout().lock();
    for index in 0..steps {
        let step = sim.step();
        let view = step_view(&sim, index, step.at_ms);
        match global.output {
            OutputFormat::Json => {
                let line = serde_json::to_string(&view).context("failed to write a step")?;
                writeln_or_stop(&mut out, &line)?;
            }
            OutputFormat::Text => writeln_or_stop(&mut out, &step_text(&view))?,
        }
    }
    Ok(0)
}

fn writeln_or_stop(out: &mut impl std::io::Write, text: &str) -> Result<()> {
    writeln!(out, "{text}").context("failed to write to stdout")
}

/// The simulation the file describes and how many steps to run.
fn build(file: &ScenarioFile) -> Result<(Simulation, u64)> {
    let epoch_ms = ms_from_rfc3339(file.epoch.as_deref().unwrap_or(DEFAULT_EPOCH))
        .map_err(|problem| anyhow::anyhow!("epoch: {problem}"))?;
    let policy = policy_of(&file.policy)?;
    if file.hosts.is_empty() {
        bail!("host: a scenario needs at least one [[host]]");
    }
    let hosts = file
        .hosts
        .iter()
        .enumerate()
        .map(|(index, host)| host_of(index, host, epoch_ms))
        .collect::<Result<Vec<_>>>()?;
    let mut sim = Simulation::new(hosts, policy, epoch_ms);
    let mut last_start_ms = epoch_ms;
    for (index, scenario) in file.workloads.iter().enumerate() {
        let (applied_ms, workload) = workload_of(index, scenario, epoch_ms)?;
        last_start_ms = last_start_ms.max(workload.start_ms);
        sim.schedule(applied_ms, ReservationChange::PutWorkload(workload));
    }
    for (index, deletion) in file.deletions.iter().enumerate() {
        let at_ms = time_of(&format!("delete[{index}].at"), &deletion.at, epoch_ms)?;
        let name = deletion.workload.clone();
        sim.schedule(at_ms, ReservationChange::RemoveWorkload { name });
    }
    let steps = match (file.steps, file.duration_seconds) {
        (Some(_), Some(_)) => bail!("steps: give steps or duration_seconds, not both"),
        (Some(steps), None) => steps,
        (None, Some(seconds)) => seconds.saturating_mul(1000) / policy.interval_ms + 1,
        (None, None) => (last_start_ms - epoch_ms) / policy.interval_ms + 2,
    };
    if steps > 1_000_000 {
        bail!("steps: at most 1000000 steps ({steps} asked for)");
    }
    Ok((sim, steps))
}

fn policy_of(file: &PolicyFile) -> Result<PlanPolicy> {
    if file.interval_seconds == 0 {
        bail!("policy.interval_seconds: must be at least 1");
    }
    if file.candidates == 0 {
        bail!("policy.candidates: must be at least 1");
    }
    Ok(PlanPolicy {
        interval_ms: file.interval_seconds.saturating_mul(1000),
        threshold: file.threshold.map(CapacityFile::capacity),
        step: file.step.map(CapacityFile::capacity),
        candidates: file.candidates,
        fruitless_limit: file.fruitless_limit,
        gradual_handover: file.gradual_handover,
    })
}

fn host_of(index: usize, file: &HostFile, epoch_ms: u64) -> Result<SimulatedHost> {
    leasehold_core::reservation::workload::check_name(&format!("host[{index}].id"), &file.id)
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    let total = Capacity::new(
        file.cpus.saturating_mul(100),
        file.memory_mib,
        file.disk_gib,
    );
    let share = Capacity::new(
        file.owner_share_centicores,
        file.owner_share_memory_mib,
        file.owner_share_disk_gib,
    );
    if let Some((name, share, total)) = share.first_excess(total) {
        bail!("host[{index}].owner_share: {name} {share} is more than the host's {total}");
    }
    let mut host = SimulatedHost::new(file.id.clone(), total, share);
    host.lent = file.lent.map(CapacityFile::capacity).unwrap_or_default();
    let mut previous_s = None;
    for (line, &(offset_s, vcpus, memory_mib)) in file.owner_load.iter().enumerate() {
        if previous_s.is_some_and(|previous| offset_s <= previous) {
            bail!(
                "host[{index}].owner_load[{line}]: offsets must rise ({offset_s} s after {} s)",
                previous_s.unwrap_or(0)
            );
        }
        previous_s = Some(offset_s);
        let wanted = Capacity::new(vcpus.saturating_mul(100), memory_mib, 0);
        let at_ms = epoch_ms.saturating_add(offset_s.saturating_mul(1000));
        host.owner_load.push((at_ms, wanted));
    }
    Ok(host)
}

fn time_of(field: &str, time: &TimeFile, epoch_ms: u64) -> Result<u64> {
    match time {
        TimeFile::Offset(seconds) => Ok(epoch_ms.saturating_add(seconds.saturating_mul(1000))),
        TimeFile::Text(text) => {
            ms_from_rfc3339(text).map_err(|problem| anyhow::anyhow!("{field}: {problem}"))
        }
    }
}

/// The workload as the broker would keep it, and when it is applied.
fn workload_of(index: usize, file: &ScenarioWorkload, epoch_ms: u64) -> Result<(u64, Workload)> {
    let field = |name: &str| format!("workload[{index}].{name}");
    let applied_ms = match &file.applied {
        Some(time) => time_of(&field("applied"), time, epoch_ms)?,
        None => epoch_ms,
    };
    let workload = Workload {
        name: file.name.clone(),
        owner: "simulate".into(),
        priority: file.priority,
        start_ms: time_of(&field("start"), &file.start, epoch_ms)?,
        end_ms: time_of(&field("end"), &file.end, epoch_ms)?,
        instances: file.instances.clone(),
        rules: file.rules.clone(),
        seq: index as u64 + 1,
    };
    workload
        .validate()
        .map_err(|error| anyhow::anyhow!("workload[{index}].{error}"))?;
    Ok((applied_ms, workload))
}

fn step_view(sim: &Simulation, index: u64, at_ms: u64) -> StepView {
    let pools: Vec<PoolView> = sim.book.pools.values().map(pool_view).collect();
    let links = sim
        .book
        .pools
        .values()
        .flat_map(|pool| {
            pool.instances.iter().map(|instance| InstancePoolLink {
                instance: instance.clone(),
                workload: pool.workload.clone(),
                pool_id: pool.pool_id,
                host_id: pool.host_id.clone(),
            })
        })
        .collect();
    StepView {
        step: index,
        at: rfc3339_from_ms(at_ms),
        at_ms,
        pools: PoolList { pools, links },
        hosts: sim.host_table().iter().map(host_view).collect(),
        warnings: sim.warnings_at(at_ms).iter().map(warning_view).collect(),
    }
}

fn pool_view(pool: &Pool) -> PoolView {
    PoolView {
        pool_id: pool.pool_id,
        host_id: pool.host_id.clone(),
        workload: pool.workload.clone(),
        instances: pool.instances.clone(),
        phase: pool.phase,
        acquiring: pool.phase == PoolPhase::Acquiring,
        allocated: pool.allocated,
        requested: pool.requested,
        acquired: pool.acquired,
        target: pool.target,
        sampled_at: pool.sampled_at_ms.map(rfc3339_from_ms),
        sampled_at_ms: pool.sampled_at_ms,
        expected_completion: None,
        expected_completion_ms: None,
    }
}

fn host_view(row: &HostCapacityRow) -> HostCapacityView {
    HostCapacityView {
        host_id: row.host_id.to_string(),
        total: row.total,
        owner_share: row.owner_share,
        lent: row.lent,
        available: row.latest.map(|sample| sample.available),
        held: row.held,
        not_yet_acquired: row.not_yet_acquired,
        owner_used: row.latest.map(|sample| sample.owner_used),
        sampled_at: row.latest.map(|sample| rfc3339_from_ms(sample.at_ms)),
        sampled_at_ms: row.latest.map(|sample| sample.at_ms),
        powered_down: false,
    }
}

fn warning_view(warning: &Warning) -> WarningView {
    WarningView {
        workload: warning.workload.clone(),
        instances: warning.instances.clone(),
        reason: warning.reason,
        message: warning_message(warning),
        target: warning.target,
        start: rfc3339_from_ms(warning.start_ms),
        start_ms: warning.start_ms,
        earliest_start: warning.earliest_start_ms.map(rfc3339_from_ms),
        earliest_start_ms: warning.earliest_start_ms,
        largest_guarantee: warning.largest_guarantee,
        largest_guarantee_host: warning.largest_guarantee_host.clone(),
    }
}

fn warning_message(warning: &Warning) -> String {
    let why = match warning.reason {
        WarningReason::LargerThanAnyHost => "no host could ever hold the target",
        WarningReason::NotByStart => {
            "the target will not be held by the start on the current trend"
        }
        WarningReason::Fruitless => "the ramp has gained nothing for several rounds",
    };
    let earliest = match warning.earliest_start_ms {
        Some(ms) => format!("earliest start {}", rfc3339_from_ms(ms)),
        None => "no start on the current trend".to_string(),
    };
    format!(
        "{why}; {earliest}; largest guarantee by the start {}",
        capacity_text(warning.largest_guarantee)
    )
}

/// `1.50cpu/6144MiB/1GiB`.
fn capacity_text(capacity: Capacity) -> String {
    format!(
        "{}.{:02}cpu/{}MiB/{}GiB",
        capacity.cpu_centicores / 100,
        capacity.cpu_centicores % 100,
        capacity.memory_mib,
        capacity.disk_gib
    )
}

fn optional_capacity_text(capacity: Option<Capacity>) -> String {
    capacity.map(capacity_text).unwrap_or_else(|| "-".into())
}

/// One step for people: the pools, the hosts and the warnings.
fn step_text(view: &StepView) -> String {
    let mut text = format!("== step {} at {}\n", view.step, view.at);
    let mut pools = vec![[
        "POOL",
        "HOST",
        "INSTANCES",
        "PHASE",
        "ACQUIRING",
        "ALLOCATED",
        "REQUESTED",
        "ACQUIRED",
        "TARGET",
        "SAMPLED",
    ]
    .map(String::from)
    .to_vec()];
    for pool in &view.pools.pools {
        pools.push(vec![
            pool.pool_id.to_string(),
            pool.host_id.clone(),
            format!("{}/{}", pool.workload, pool.instances.join(",")),
            serde_json::to_value(pool.phase)
                .map(|v| v.as_str().unwrap_or("").to_string())
                .unwrap_or_default(),
            pool.acquiring.to_string(),
            capacity_text(pool.allocated),
            capacity_text(pool.requested),
            capacity_text(pool.acquired),
            capacity_text(pool.target),
            pool.sampled_at.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    text.push_str(&columns(&pools));
    let mut hosts = vec![[
        "HOST",
        "TOTAL",
        "AVAILABLE",
        "HELD",
        "NOT-YET-ACQUIRED",
        "OWNER-USED",
    ]
    .map(String::from)
    .to_vec()];
    for host in &view.hosts {
        hosts.push(vec![
            host.host_id.clone(),
            capacity_text(host.total),
            optional_capacity_text(host.available),
            capacity_text(host.held),
            optional_capacity_text(host.not_yet_acquired),
            optional_capacity_text(host.owner_used),
        ]);
    }
    text.push_str(&columns(&hosts));
    for warning in &view.warnings {
        text.push_str(&format!(
            "warning: {}/{}: {}\n",
            warning.workload,
            warning.instances.join(","),
            warning.message
        ));
    }
    text
}

/// Rows as left-aligned columns two spaces apart.
fn columns(rows: &[Vec<String>]) -> String {
    let count = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..count)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Result<(Simulation, u64)> {
        let file: ScenarioFile = toml::from_str(text)?;
        build(&file)
    }

    #[test]
    fn bad_fields_are_named() {
        let host = "[[host]]\nid = \"h1\"\ncpus = 4\nmemory_mib = 8192\ndisk_gib = 10\n";
        let error = scenario(&format!(
            "{host}[[workload]]\nname = \"w\"\nstart = 60\nend = 120\n[[workload.instance]]\nname = \"a\"\nvcpus = 0\nmemory_mib = 1\ndisk_gib = 1\n"
        ))
        .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("workload[0].instance[0].vcpus"),
            "{error}"
        );
        let error =
            scenario(&format!("{host}owner_load = [[60, 1, 1], [60, 1, 2]]\n")).unwrap_err();
        assert!(
            error.to_string().contains("host[0].owner_load[1]"),
            "{error}"
        );
        let error = scenario("steps = 3\n").unwrap_err();
        assert!(error.to_string().starts_with("host:"), "{error}");
        let error = toml::from_str::<ScenarioFile>("stepz = 3\n").unwrap_err();
        assert!(error.to_string().contains("stepz"), "{error}");
    }

    #[test]
    fn times_are_offsets_from_the_epoch_or_rfc3339() {
        let (sim, steps) = scenario(
            "epoch = \"2026-12-01T00:00:00Z\"\n[policy]\ninterval_seconds = 60\n[[host]]\nid = \"h1\"\ncpus = 4\nmemory_mib = 8192\ndisk_gib = 10\n[[workload]]\nname = \"w\"\nstart = \"2026-12-01T00:10:00Z\"\nend = 1200\n[[workload.instance]]\nname = \"a\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 1\n",
        )
        .unwrap();
        // Until one interval past the start at minute 10.
        assert_eq!(steps, 12);
        assert_eq!(sim.now_ms, ms_from_rfc3339("2026-12-01T00:00:00Z").unwrap());
    }

    #[test]
    fn columns_line_up() {
        let rows = vec![
            vec!["A".to_string(), "BB".to_string()],
            vec!["ccc".to_string(), "d".to_string()],
        ];
        assert_eq!(columns(&rows), "A    BB\nccc  d\n");
    }
}

//! The owner's own work on a `sim` host (`--owner-load FILE`): a trace of
//! CSV lines `offset_seconds,vcpus,memory_mib`, each the usage the owner
//! wants from that offset after the agent's start until the next line, so
//! that the capacity free for pools rises and falls as on a real host
//! (seed 003: capacity frees up over time). The owner never gets what the
//! broker guarantees to pools and instances, nor what is lent: the `sim`
//! driver's stand-in for lowering the owner's limits is to clamp its usage.
//!
//! Parsed once at start; a bad line stops the agent with `FILE:LINE: field:
//! problem`. Figures are integers: vCPUs in hundredths (centicores, as the
//! host capacity counts them), offsets in milliseconds.

use leasehold_core::reservation::Capacity;
use leasehold_core::HostCapacity;
use std::path::Path;

/// The header a trace may start with (skipped).
const HEADER: [&str; 3] = ["offset_seconds", "vcpus", "memory_mib"];

/// One line of the trace: from `offset_ms` after the agent's start the owner
/// wants this much CPU and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerLoadStep {
    pub offset_ms: u64,
    pub cpu_centicores: u64,
    pub memory_mib: u64,
}

/// A parsed trace: its steps, offsets strictly increasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerLoadTrace {
    steps: Vec<OwnerLoadStep>,
}

#[derive(Debug, thiserror::Error)]
pub enum OwnerLoadError {
    #[error("{file}: cannot read the owner-load trace: {source}")]
    Unreadable {
        file: String,
        source: std::io::Error,
    },
    #[error("{file}:{line}: {field}: {problem}")]
    Line {
        file: String,
        line: usize,
        field: &'static str,
        problem: String,
    },
    #[error("{file}: the owner-load trace has no lines; write `offset_seconds,vcpus,memory_mib` lines such as `0,1.5,2048`")]
    Empty { file: String },
    #[error("an owner-load trace (--owner-load) simulates the owner's work and needs --driver sim, not '{driver}' (with --driver oci the owner's real work runs in --owner-cgroup PATH)")]
    NeedsSimDriver { driver: &'static str },
    #[error("--owner-cgroup runs the owner's real work in a cgroup and needs --driver oci, not '{driver}' (with --driver sim give its load as --owner-load FILE)")]
    CgroupNeedsOciDriver { driver: &'static str },
    #[error("--owner-load and --owner-cgroup both say what the owner uses; give one")]
    BothOwnerSources,
    #[error("--owner-cgroup: {0}")]
    Cgroup(String),
}

impl OwnerLoadTrace {
    /// Reads and checks the trace at `path` against the host's capacity.
    pub fn read(path: &Path, host: &HostCapacity) -> Result<Self, OwnerLoadError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| OwnerLoadError::Unreadable {
            file: file.clone(),
            source,
        })?;
        Self::parse(&text, &file, host)
    }

    /// Parses a trace's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str, host: &HostCapacity) -> Result<Self, OwnerLoadError> {
        let mut steps: Vec<OwnerLoadStep> = Vec::new();
        for (number, raw) in text.lines().enumerate() {
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split(',').map(str::trim).collect();
            if steps.is_empty() && fields == HEADER {
                continue;
            }
            let step = parse_line(&fields, steps.last(), host).map_err(|(field, problem)| {
                OwnerLoadError::Line {
                    file: file.to_string(),
                    line: number + 1,
                    field,
                    problem,
                }
            })?;
            steps.push(step);
        }
        if steps.is_empty() {
            return Err(OwnerLoadError::Empty {
                file: file.to_string(),
            });
        }
        Ok(OwnerLoadTrace { steps })
    }

    pub fn steps(&self) -> &[OwnerLoadStep] {
        &self.steps
    }

    /// The step in force `offset_ms` after the agent's start: the last one
    /// at or before it; none before the first line.
    pub fn step_at(&self, offset_ms: u64) -> Option<&OwnerLoadStep> {
        let after = self
            .steps
            .partition_point(|step| step.offset_ms <= offset_ms);
        after.checked_sub(1).map(|index| &self.steps[index])
    }

    /// What the owner wants `offset_ms` after the start: the step in force,
    /// with the owner share's disk (the trace has no disk column); before
    /// the first line, the owner share, as without a trace.
    pub fn wanted_at(&self, offset_ms: u64, host: &HostCapacity) -> Capacity {
        match self.step_at(offset_ms) {
            Some(step) => Capacity::new(
                step.cpu_centicores,
                step.memory_mib,
                host.owner_share_disk_gib,
            ),
            None => owner_share(host),
        }
    }
}

/// One line's three fields, checked against the previous step and the host.
fn parse_line(
    fields: &[&str],
    previous: Option<&OwnerLoadStep>,
    host: &HostCapacity,
) -> Result<OwnerLoadStep, (&'static str, String)> {
    if fields.len() != 3 {
        return Err((
            "line",
            format!(
                "expected 3 comma-separated fields `offset_seconds,vcpus,memory_mib`, found {}",
                fields.len()
            ),
        ));
    }
    let offset_ms = parse_scaled(fields[0], 3).map_err(|p| ("offset_seconds", p))?;
    let cpu_centicores = parse_scaled(fields[1], 2).map_err(|p| ("vcpus", p))?;
    let memory_mib = parse_scaled(fields[2], 0).map_err(|p| ("memory_mib", p))?;
    if let Some(previous) = previous {
        if offset_ms <= previous.offset_ms {
            return Err((
                "offset_seconds",
                format!(
                    "{} is not after the previous line's {}; offsets must increase strictly",
                    fields[0],
                    format_scaled(previous.offset_ms, 3)
                ),
            ));
        }
    }
    if cpu_centicores > host.cpu_centicores {
        return Err((
            "vcpus",
            format!(
                "{} is more than the host's {} vCPUs",
                fields[1],
                format_scaled(host.cpu_centicores, 2)
            ),
        ));
    }
    if memory_mib > host.memory_mib {
        return Err((
            "memory_mib",
            format!(
                "{memory_mib} is more than the host's {} MiB",
                host.memory_mib
            ),
        ));
    }
    Ok(OwnerLoadStep {
        offset_ms,
        cpu_centicores,
        memory_mib,
    })
}

/// A non-negative decimal with at most `decimals` digits after the point,
/// as an integer in units of 10^-decimals (`1.5` with 2 decimals is 150).
fn parse_scaled(text: &str, decimals: u32) -> Result<u64, String> {
    if text.is_empty() {
        return Err("is empty; expected a number".into());
    }
    if text.starts_with('-') {
        return Err(format!("`{text}` is negative"));
    }
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits_only = |part: &str| part.bytes().all(|b| b.is_ascii_digit());
    if !digits_only(whole) || !digits_only(fraction) || (whole.is_empty() && fraction.is_empty()) {
        return Err(format!("`{text}` is not a number"));
    }
    if fraction.len() > decimals as usize {
        return Err(match decimals {
            0 => format!("`{text}` is not a whole number"),
            _ => format!("`{text}` has more than {decimals} decimals"),
        });
    }
    let too_large = || format!("`{text}` is too large");
    let scale = 10u64.pow(decimals);
    let whole_units = match whole {
        "" => 0,
        _ => whole.parse::<u64>().map_err(|_| too_large())?,
    };
    let padded = format!("{fraction:0<width$}", width = decimals as usize);
    let fraction_units = match padded.as_str() {
        "" => 0,
        _ => padded.parse::<u64>().map_err(|_| too_large())?,
    };
    whole_units
        .checked_mul(scale)
        .and_then(|units| units.checked_add(fraction_units))
        .ok_or_else(too_large)
}

/// `units` in 10^-decimals as a decimal without trailing zeros (150 → "1.5").
fn format_scaled(units: u64, decimals: u32) -> String {
    let scale = 10u64.pow(decimals);
    let (whole, fraction) = (units / scale, units % scale);
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:0>width$}", width = decimals as usize);
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// The owner share as a capacity vector.
pub fn owner_share(host: &HostCapacity) -> Capacity {
    Capacity::new(
        host.owner_share_cpu_centicores,
        host.owner_share_memory_mib,
        host.owner_share_disk_gib,
    )
}

/// What the owner's work gets, per resource: what it wants, but never what
/// the broker guarantees to pools and instances or what partitions lend,
/// i.e. `min(wanted, total − lent − guaranteed)`. The owner share is the
/// owner's whatever the broker says (a guarantee reaching into it is the
/// broker's mistake), so the room never falls below the share.
pub fn owner_usage(
    wanted: Capacity,
    host: &HostCapacity,
    lent: Capacity,
    guaranteed: Capacity,
) -> Capacity {
    let total = Capacity::new(host.cpu_centicores, host.memory_mib, host.disk_gib);
    let room = total
        .saturating_sub(lent)
        .saturating_sub(guaranteed)
        .max(owner_share(host));
    wanted.min(room)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 4 vCPUs, 8192 MiB, 20 GiB; the owner keeps 0.5 vCPU, 512 MiB, 1 GiB.
    fn host() -> HostCapacity {
        HostCapacity {
            cpu_centicores: 400,
            memory_mib: 8192,
            disk_gib: 20,
            owner_share_cpu_centicores: 50,
            owner_share_memory_mib: 512,
            owner_share_disk_gib: 1,
        }
    }

    fn parse(text: &str) -> Result<OwnerLoadTrace, OwnerLoadError> {
        OwnerLoadTrace::parse(text, "load.csv", &host())
    }

    fn step(offset_ms: u64, cpu_centicores: u64, memory_mib: u64) -> OwnerLoadStep {
        OwnerLoadStep {
            offset_ms,
            cpu_centicores,
            memory_mib,
        }
    }

    #[test]
    fn a_good_trace_reads_fractions_comments_blank_lines_and_a_header() {
        let text = "# the owner's day\noffset_seconds,vcpus,memory_mib\n\n0,1.5,7168\n10, 2 ,6144 # lunch\n\n  20.25,.25,1024\n";
        let trace = parse(text).unwrap();
        assert_eq!(
            trace.steps(),
            &[
                step(0, 150, 7168),
                step(10_000, 200, 6144),
                step(20_250, 25, 1024)
            ]
        );
    }

    /// The message of a bad trace, which must name the file, line and field.
    fn problem(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn each_kind_of_bad_line_names_the_file_the_line_and_the_field() {
        let cases = [
            ("0,1\n", "load.csv:1: line: expected 3"),
            ("0,1,512,9\n", "load.csv:1: line: expected 3"),
            (
                "# c\nsoon,1,512\n",
                "load.csv:2: offset_seconds: `soon` is not a number",
            ),
            ("-1,1,512\n", "load.csv:1: offset_seconds: `-1` is negative"),
            (
                "0,1,512\n\n5,1,512\n5,1,512\n",
                "load.csv:4: offset_seconds: 5 is not after the previous line's 5",
            ),
            (
                "10,1,512\n2,1,512\n",
                "load.csv:2: offset_seconds: 2 is not after",
            ),
            (
                "0,1.255,512\n",
                "load.csv:1: vcpus: `1.255` has more than 2 decimals",
            ),
            ("0,,512\n", "load.csv:1: vcpus: is empty"),
            (
                "0,4.01,512\n",
                "load.csv:1: vcpus: 4.01 is more than the host's 4 vCPUs",
            ),
            (
                "0,1,512.5\n",
                "load.csv:1: memory_mib: `512.5` is not a whole number",
            ),
            (
                "0,1,8193\n",
                "load.csv:1: memory_mib: 8193 is more than the host's 8192 MiB",
            ),
            (
                "0,1,99999999999999999999999\n",
                "load.csv:1: memory_mib: `99999999999999999999999` is too large",
            ),
            ("0,1,1e3\n", "load.csv:1: memory_mib: `1e3` is not a number"),
        ];
        for (text, expected) in cases {
            let message = problem(text);
            assert!(
                message.starts_with(expected),
                "{text:?}: got {message:?}, wanted {expected:?}"
            );
        }
    }

    #[test]
    fn a_trace_without_lines_is_refused_and_says_what_to_write() {
        let message = problem("# nothing yet\n\noffset_seconds,vcpus,memory_mib\n");
        assert!(message.starts_with("load.csv: the owner-load trace has no lines"));
        assert!(message.contains("offset_seconds,vcpus,memory_mib"));
    }

    #[test]
    fn a_missing_file_is_named() {
        let error = OwnerLoadTrace::read(Path::new("/nonexistent/load.csv"), &host()).unwrap_err();
        assert!(error
            .to_string()
            .starts_with("/nonexistent/load.csv: cannot read"));
    }

    #[test]
    fn the_usage_is_the_line_in_force_held_until_the_next_and_the_share_before_the_first() {
        let trace = parse("5,1,7168\n10,2,6144\n30,0.5,1024\n").unwrap();
        let wanted = |offset_ms| trace.wanted_at(offset_ms, &host());
        // Before the first line: the owner share, as without a trace.
        assert_eq!(wanted(0), Capacity::new(50, 512, 1));
        assert_eq!(wanted(4_999), Capacity::new(50, 512, 1));
        // At a line, until just before the next; the disk is the share's.
        assert_eq!(wanted(5_000), Capacity::new(100, 7168, 1));
        assert_eq!(wanted(9_999), Capacity::new(100, 7168, 1));
        assert_eq!(wanted(10_000), Capacity::new(200, 6144, 1));
        // The last line holds for ever.
        assert_eq!(wanted(30_000), Capacity::new(50, 1024, 1));
        assert_eq!(wanted(86_400_000), Capacity::new(50, 1024, 1));
    }

    #[test]
    fn the_owner_never_takes_what_is_guaranteed_or_lent_but_keeps_its_share() {
        let wanted = Capacity::new(300, 7168, 1);
        // Nothing lent or guaranteed: all it wants.
        assert_eq!(
            owner_usage(wanted, &host(), Capacity::ZERO, Capacity::ZERO),
            wanted
        );
        // 2048 MiB guaranteed and 1 vCPU + 1024 MiB lent leave 5120 MiB
        // and 3 vCPUs: memory is clamped, CPU fits.
        let lent = Capacity::new(100, 1024, 2);
        let guaranteed = Capacity::new(0, 2048, 0);
        assert_eq!(
            owner_usage(wanted, &host(), lent, guaranteed),
            Capacity::new(300, 5120, 1)
        );
        // CPU is clamped too once guarantees reach it.
        assert_eq!(
            owner_usage(wanted, &host(), lent, Capacity::new(200, 2048, 0)),
            Capacity::new(100, 5120, 1)
        );
        // A guarantee reaching into the owner share does not take it.
        assert_eq!(
            owner_usage(wanted, &host(), lent, Capacity::new(400, 8192, 20)),
            Capacity::new(50, 512, 1)
        );
    }
}

use super::progress::{instance_line, least_complete, Resource};
use super::tables;
use super::workload_file::{parse_field_path, FileFormat, PathSegment, WorkloadSource};
use leasehold_api::{
    HostCapacityView, InstancePoolLink, InstanceStatus, InstanceView, PoolList, PoolView,
    WarningView, WorkloadView,
};
use leasehold_core::reservation::warnings::WarningReason;
use leasehold_core::reservation::{Capacity, PlacementRule, PoolPhase, RuleKind};

/// A good workload file, one line per entry so tests can name lines.
const TOML_LINES: [&str; 21] = [
    r#"name = "ramp""#,                  // 1
    r#"priority = 10"#,                  // 2
    r#"start = "2026-12-01T09:00:00Z""#, // 3
    r#"end = "2026-12-01T10:00:00Z""#,   // 4
    "",                                  // 5
    "[[instance]]",                      // 6
    r#"name = "web-1""#,                 // 7
    "vcpus = 2",                         // 8
    "memory_mib = 4096",                 // 9
    "disk_gib = 10",                     // 10
    "",                                  // 11
    "[[instance]]",                      // 12
    r#"name = "web-2""#,                 // 13
    "vcpus = 2",                         // 14
    "memory_mib = 4096",                 // 15
    "disk_gib = 10",                     // 16
    r#"image = "busybox""#,              // 17
    "",                                  // 18
    "[[rule]]",                          // 19
    r#"kind = "spread""#,                // 20
    r#"instances = ["web-1", "web-2"]"#, // 21
];

const JSON_TEXT: &str = r#"{
  "name": "ramp",
  "priority": 10,
  "start": "2026-12-01T09:00:00Z",
  "end": "2026-12-01T10:00:00Z",
  "instance": [
    {
      "name": "web-1",
      "vcpus": 2,
      "memory_mib": 4096,
      "disk_gib": 10
    },
    {
      "name": "web-2",
      "vcpus": 2,
      "memory_mib": 4096,
      "disk_gib": 10,
      "image": "busybox"
    }
  ],
  "rule": [
    {
      "kind": "spread",
      "instances": ["web-1", "web-2"]
    }
  ]
}
"#;

/// The TOML file with line `line` (1-based) replaced by `replacement`.
fn toml_with_line(line: usize, replacement: &str) -> WorkloadSource {
    let mut lines: Vec<&str> = TOML_LINES.to_vec();
    lines[line - 1] = replacement;
    WorkloadSource::from_text("ramp.toml", lines.join("\n"))
}

fn good_toml() -> WorkloadSource {
    WorkloadSource::from_text("ramp.toml", TOML_LINES.join("\n"))
}

#[test]
fn field_paths_split_into_keys_and_indices() {
    use PathSegment::{Index, Key};
    assert_eq!(
        parse_field_path("instance[1].vcpus"),
        Some(vec![Key("instance".into()), Index(1), Key("vcpus".into())])
    );
    assert_eq!(parse_field_path("end"), Some(vec![Key("end".into())]));
    assert_eq!(parse_field_path("."), None);
    assert_eq!(parse_field_path("instance[x]"), None);
}

#[test]
fn a_toml_file_and_its_json_twin_read_alike() {
    let toml = good_toml().parse().expect("the TOML file is good");
    assert_eq!(toml.name, "ramp");
    assert_eq!(toml.priority, 10);
    assert_eq!(toml.instances.len(), 2);
    assert_eq!(toml.instances[1].image.as_deref(), Some("busybox"));
    assert_eq!(toml.rules[0].kind, RuleKind::Spread);
    // JSON by its name, and by its first character whatever the name.
    let json = WorkloadSource::from_text("ramp.json", JSON_TEXT.into());
    assert_eq!(json.format, FileFormat::Json);
    assert_eq!(json.parse().expect("the JSON file is good"), toml);
    let unnamed = WorkloadSource::from_text("ramp.workload", JSON_TEXT.into());
    assert_eq!(unnamed.format, FileFormat::Json);
    assert_eq!(good_toml().format, FileFormat::Toml);
}

#[test]
fn a_field_the_broker_names_is_found_on_its_toml_line() {
    let source = good_toml();
    for (field, line) in [
        ("name", 1),
        ("end", 4),
        ("instance[0].name", 7),
        ("instance[1].vcpus", 14),
        ("instance[1].image", 17),
        ("rule[0].instances", 21),
        ("rule[0].kind", 20),
        // A table entry itself: its header.
        ("instance[1]", 12),
        // Missing in the file: the nearest enclosing table that is there.
        ("instance[0].image", 6),
    ] {
        assert_eq!(source.line_of_field(field), Some(line), "{field}");
    }
    // An entry the file lacks: the array's first header.
    assert_eq!(source.line_of_field("instance[5].vcpus"), Some(6));
    let problem = source.problem_at("instance[1].vcpus", "instance[1].vcpus: must be 1 to 1024");
    assert_eq!(
        problem.to_string(),
        "ramp.toml:14: instance[1].vcpus: must be 1 to 1024"
    );
}

#[test]
fn a_field_the_broker_names_is_found_on_its_json_line() {
    let source = WorkloadSource::from_text("ramp.json", JSON_TEXT.into());
    for (field, line) in [
        ("name", 2),
        ("end", 5),
        ("instance[0].name", 8),
        ("instance[1].vcpus", 15),
        ("instance[1].image", 18),
        ("rule[0].instances", 24),
        ("instance[1]", 13),
        ("instance[0].image", 7),
    ] {
        assert_eq!(source.line_of_field(field), Some(line), "{field}");
    }
}

#[test]
fn the_plural_spelling_of_the_arrays_is_found_too() {
    let text = JSON_TEXT
        .replace("\"instance\":", "\"instances\":")
        .replace("\"rule\":", "\"rules\":");
    let source = WorkloadSource::from_text("ramp.json", text);
    assert!(source.parse().is_ok());
    assert_eq!(source.line_of_field("instance[1].vcpus"), Some(15));
    assert_eq!(source.line_of_field("rule[0].instances"), Some(24));
    assert_eq!(source.line_of_field("rules[0].kind"), Some(23));
    assert_eq!(good_toml().line_of_field("instances[1].vcpus"), Some(14));
}

#[test]
fn a_toml_syntax_error_names_its_line() {
    let problem = toml_with_line(9, "memory_mib = = 4096")
        .parse()
        .expect_err("not TOML");
    assert_eq!(problem.line, Some(9), "{problem}");
    assert!(
        problem.to_string().starts_with("ramp.toml:9: "),
        "{problem}"
    );
}

#[test]
fn a_toml_type_error_names_its_field_and_line() {
    let problem = toml_with_line(14, r#"vcpus = "two""#)
        .parse()
        .expect_err("vcpus is a number");
    assert_eq!(problem.line, Some(14), "{problem}");
    assert_eq!(problem.field.as_deref(), Some("instance[1].vcpus"));
    let unknown = toml_with_line(17, r#"imgae = "busybox""#)
        .parse()
        .expect_err("no such field");
    assert_eq!(unknown.line, Some(17), "{unknown}");
    assert_eq!(unknown.field.as_deref(), Some("instance[1].imgae"));
    assert!(unknown.problem.contains("unknown field"), "{unknown}");
    // At the top level the file itself refuses unknown keys.
    let unknown = toml_with_line(2, "priorty = 10")
        .parse()
        .expect_err("no such field");
    assert_eq!(unknown.line, Some(2), "{unknown}");
    let missing = toml_with_line(15, "")
        .parse()
        .expect_err("memory_mib is required");
    assert_eq!(missing.line, Some(12), "{missing}");
    assert_eq!(missing.field.as_deref(), Some("instance[1]"));
    assert!(missing.problem.contains("memory_mib"), "{missing}");
}

#[test]
fn a_json_syntax_or_type_error_names_its_line() {
    let broken = JSON_TEXT.replace(
        "\"vcpus\": 2,\n      \"memory_mib\": 4096,\n      \"disk_gib\": 10,",
        "\"vcpus\": 2,\n      \"memory_mib\": 4096\n      \"disk_gib\": 10,",
    );
    let problem = WorkloadSource::from_text("ramp.json", broken)
        .parse()
        .expect_err("a comma is missing");
    assert_eq!(problem.line, Some(17), "{problem}");
    let typed = JSON_TEXT.replacen("\"vcpus\": 2", "\"vcpus\": -2", 1);
    let problem = WorkloadSource::from_text("ramp.json", typed)
        .parse()
        .expect_err("vcpus is unsigned");
    assert_eq!(problem.line, Some(9), "{problem}");
    assert_eq!(problem.field.as_deref(), Some("instance[0].vcpus"));
    assert!(!problem.problem.contains("at line"), "{problem}");
    let misspelt = JSON_TEXT.replacen("\"image\"", "\"imgae\"", 1);
    let problem = WorkloadSource::from_text("ramp.json", misspelt)
        .parse()
        .expect_err("no such field");
    assert_eq!(problem.line, Some(18), "{problem}");
    assert_eq!(problem.field.as_deref(), Some("instance[1].imgae"));
}

#[test]
fn start_and_end_are_checked_locally_with_their_line() {
    let problem = toml_with_line(3, r#"start = "tomorrow morning""#)
        .parse()
        .expect_err("not a time");
    assert_eq!(problem.line, Some(3));
    assert_eq!(problem.field.as_deref(), Some("start"));
    assert!(problem.problem.contains("RFC 3339"), "{problem}");
    let problem = toml_with_line(4, r#"end = "2026-12-01T08:00:00Z""#)
        .parse()
        .expect_err("end before start");
    assert_eq!(problem.to_string(), "ramp.toml:4: end: must be after start");
}

#[test]
fn core_rules_are_checked_locally_with_their_line() {
    let problem = toml_with_line(14, "vcpus = 0")
        .parse()
        .expect_err("no vCPUs");
    assert_eq!(problem.line, Some(14));
    assert_eq!(problem.field.as_deref(), Some("instance[1].vcpus"));
    let problem = toml_with_line(21, r#"instances = ["web-1", "web-3"]"#)
        .parse()
        .expect_err("no such instance");
    assert_eq!(problem.line, Some(21));
    assert!(problem.problem.contains("web-3"), "{problem}");
}

fn capacity(cpu_centicores: u64, memory_mib: u64, disk_gib: u64) -> Capacity {
    Capacity::new(cpu_centicores, memory_mib, disk_gib)
}

fn pool_list() -> PoolList {
    PoolList {
        pools: vec![PoolView {
            pool_id: 7,
            host_id: "ramp-h1".into(),
            workload: "ramp".into(),
            instances: vec!["big".into()],
            phase: PoolPhase::Acquiring,
            acquiring: true,
            allocated: Capacity::ZERO,
            requested: capacity(100, 4096, 1),
            acquired: capacity(100, 3072, 1),
            target: capacity(100, 6144, 1),
            sampled_at: Some("2026-12-01T08:59:00Z".into()),
            sampled_at_ms: Some(1_796_115_540_000),
            expected_completion: None,
            expected_completion_ms: None,
        }],
        links: vec![InstancePoolLink {
            instance: "big".into(),
            workload: "ramp".into(),
            pool_id: 7,
            host_id: "ramp-h1".into(),
        }],
    }
}

#[test]
fn the_pool_table_shows_fig_3_then_fig_6() {
    let expected = "\
POOL  HOST     WORKLOAD  INSTANCES  PHASE      ACQUIRING  ALLOCATED  REQUESTED    ACQUIRED     TARGET       SAMPLED
7     ramp-h1  ramp      big        acquiring  on         0.00/0/0   1.00/4096/1  1.00/3072/1  1.00/6144/1  2026-12-01T08:59:00Z
(capacities as vCPU/MiB/GiB)

INSTANCE  WORKLOAD  POOL  HOST
big       ramp      7     ramp-h1
";
    assert_eq!(tables::pool_list_text(&pool_list()), expected);
    let empty = PoolList {
        pools: vec![],
        links: vec![],
    };
    assert_eq!(tables::pool_list_text(&empty), "no acquisition pools\n");
}

#[test]
fn the_host_capacity_table_shows_fig_5() {
    let hosts = vec![
        HostCapacityView {
            host_id: "ramp-h1".into(),
            total: capacity(400, 8192, 20),
            owner_share: capacity(0, 512, 0),
            lent: Capacity::ZERO,
            available: Some(capacity(300, 2048, 20)),
            held: capacity(100, 2048, 1),
            not_yet_acquired: Some(capacity(200, 0, 19)),
            owner_used: Some(capacity(100, 6144, 0)),
            sampled_at: Some("2026-12-01T08:59:00Z".into()),
            sampled_at_ms: Some(1_796_115_540_000),
            powered_down: false,
        },
        HostCapacityView {
            host_id: "new".into(),
            total: capacity(250, 1024, 5),
            owner_share: Capacity::ZERO,
            lent: capacity(100, 512, 1),
            available: None,
            held: Capacity::ZERO,
            not_yet_acquired: None,
            owner_used: None,
            sampled_at: None,
            sampled_at_ms: None,
            powered_down: false,
        },
    ];
    let expected = "\
HOST     TOTAL         OWNER_SHARE  OWNER_USED   LENT        AVAILABLE     HELD         NOT_YET_ACQUIRED  SAMPLED
ramp-h1  4.00/8192/20  0.00/512/0   1.00/6144/0  0.00/0/0    3.00/2048/20  1.00/2048/1  2.00/0/19         2026-12-01T08:59:00Z
new      2.50/1024/5   0.00/0/0     -            1.00/512/1  -             0.00/0/0     -                 -
(capacities as vCPU/MiB/GiB)
";
    assert_eq!(tables::host_capacity_text(&hosts), expected);
}

#[test]
fn the_warnings_say_what_would_fix_them() {
    let warnings = vec![WarningView {
        workload: "warn".into(),
        instances: vec!["huge".into()],
        reason: WarningReason::LargerThanAnyHost,
        message: "no host has 64 vCPUs".into(),
        target: capacity(6400, 256, 1),
        start: "2026-12-01T09:00:00Z".into(),
        start_ms: 1_796_115_600_000,
        earliest_start: None,
        earliest_start_ms: None,
        largest_guarantee: capacity(400, 256, 1),
        largest_guarantee_host: Some("ramp-h1".into()),
    }];
    let expected = "\
warn [huge] larger_than_any_host: no host has 64 vCPUs
  target 64.00/256/1 by 2026-12-01T09:00:00Z
  earliest start reaching it: none on the current trend
  largest guarantee by 2026-12-01T09:00:00Z: 4.00/256/1 on ramp-h1
(capacities as vCPU/MiB/GiB)
";
    assert_eq!(tables::warnings_text(&warnings), expected);
    assert!(tables::warnings_text(&[]).starts_with("no warnings"));
}

fn instance(name: &str, status: InstanceStatus, acquired: Capacity) -> InstanceView {
    InstanceView {
        name: name.into(),
        vcpus: 1,
        memory_mib: 6144,
        disk_gib: 1,
        image: None,
        status,
        host_id: Some("ramp-h1".into()),
        pool_id: Some(7),
        acquired,
        target: capacity(100, 6144, 1),
        expected_completion: Some("2026-12-01T08:59:30Z".into()),
        expected_completion_ms: Some(1_796_115_570_000),
    }
}

fn workload_view() -> WorkloadView {
    WorkloadView {
        name: "ramp".into(),
        owner: "ops".into(),
        priority: 10,
        start: "2026-12-01T09:00:00Z".into(),
        end: "2026-12-01T10:00:00Z".into(),
        start_ms: 1_796_115_600_000,
        end_ms: 1_796_119_200_000,
        instances: vec![
            instance("big", InstanceStatus::Acquiring, capacity(100, 3072, 1)),
            instance("small", InstanceStatus::Guaranteed, capacity(100, 6144, 1)),
        ],
        rules: vec![PlacementRule {
            kind: RuleKind::Spread,
            instances: vec!["big".into(), "small".into()],
        }],
    }
}

#[test]
fn the_workload_tables_show_status_and_progress() {
    let expected = "\
workload ramp (owner ops, priority 10) from 2026-12-01T09:00:00Z to 2026-12-01T10:00:00Z

INSTANCE  STATUS      HOST     POOL  ACQUIRED     TARGET       PROGRESS  EXPECTED
big       acquiring   ramp-h1  7     1.00/3072/1  1.00/6144/1  50%       2026-12-01T08:59:30Z
small     guaranteed  ramp-h1  7     1.00/6144/1  1.00/6144/1  100%      2026-12-01T08:59:30Z
(capacities as vCPU/MiB/GiB)
rule: spread (each on a different host): big, small
";
    assert_eq!(tables::workload_text(&workload_view()), expected);
    let list = tables::workload_list_text(&[workload_view()]);
    assert_eq!(
        list,
        "\
NAME  OWNER  PRIORITY  START                 END                   INSTANCES  STATUS
ramp  ops    10        2026-12-01T09:00:00Z  2026-12-01T10:00:00Z  2          1 acquiring, 1 guaranteed
"
    );
}

#[test]
fn progress_follows_the_least_complete_resource() {
    // Memory half done, CPU a quarter: CPU is shown.
    let mut behind_on_cpu = instance("big", InstanceStatus::Acquiring, capacity(100, 3072, 1));
    behind_on_cpu.target = capacity(400, 6144, 1);
    let progress = least_complete(&behind_on_cpu);
    assert_eq!(progress.resource, Resource::Cpu);
    assert_eq!((progress.acquired, progress.target), (100, 400));
    assert_eq!(progress.percent_complete(), 25);
    // Level: memory is shown.
    let level = instance("big", InstanceStatus::Acquiring, capacity(50, 3072, 1));
    let progress = least_complete(&level);
    assert_eq!(progress.resource, Resource::Memory);
    assert_eq!(
        instance_line(&level),
        "big: acquiring, memory 3072/6144 MiB (50%) on ramp-h1, expected 2026-12-01T08:59:30Z"
    );
    // A guaranteed instance is complete, whatever the figures say.
    let done = instance("big", InstanceStatus::Guaranteed, Capacity::ZERO);
    assert_eq!(least_complete(&done).percent_complete(), 100);
    assert_eq!(
        instance_line(&done),
        "big: guaranteed, memory 6144/6144 MiB (100%) on ramp-h1"
    );
}

#[test]
fn piped_watch_prints_a_line_only_when_it_changes() {
    let mut last_lines = Default::default();
    let workload = workload_view();
    assert_eq!(super::changed_lines(&mut last_lines, &workload).len(), 2);
    assert!(super::changed_lines(&mut last_lines, &workload).is_empty());
    let mut later = workload.clone();
    later.instances[0].acquired = capacity(100, 4096, 1);
    let changed = super::changed_lines(&mut last_lines, &later);
    assert_eq!(changed.len(), 1);
    assert!(
        changed[0].starts_with("big: acquiring, memory 4096/6144"),
        "{changed:?}"
    );
    assert!(!super::progress::workload_settled(&later));
    later.instances[0].status = InstanceStatus::Running;
    assert!(super::progress::workload_settled(&later));
}

#[test]
fn the_readme_example_workload_is_a_good_file() {
    let readme = include_str!("../../../../README.md");
    let section = &readme[readme
        .find("## Guaranteed capacity ahead of time")
        .expect("the README has the section")..];
    let start = section.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let end = start + section[start..].find("```").expect("the example ends");
    let source = WorkloadSource::from_text("README.md", section[start..end].to_string());
    let file = source.parse().expect("the README's example parses");
    assert_eq!(file.instances.len(), 2);
    assert_eq!(file.rules.len(), 1);
}

#[test]
fn a_file_that_cannot_be_read_is_named_and_a_long_one_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("missing.toml");
    let problem = WorkloadSource::read(&missing).expect_err("no such file");
    assert_eq!(problem.line, None);
    assert!(
        problem
            .to_string()
            .starts_with(&format!("{}: failed to read", missing.display())),
        "{problem}"
    );
    let long = dir.path().join("long.toml");
    std::fs::write(&long, "#".repeat(4 * 1024 * 1024 + 1)).expect("write the file");
    let problem = WorkloadSource::read(&long).expect_err("too long");
    assert!(problem.problem.contains("longer than"), "{problem}");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, TOML_LINES.join("\n")).expect("write the file");
    assert!(WorkloadSource::read(&good)
        .expect("readable")
        .parse()
        .is_ok());
}

//! `leasehold-bench-planner` scaled down: it places every instance, the
//! fleet day hands capacity over after ramps, and two runs decide the same.

use std::process::Command;

fn run_small() -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_leasehold-bench-planner"))
        .args(["--instances", "500", "--hosts", "60", "--fleet-hosts", "40"])
        .args(["--rounds", "300", "--digest"])
        .output()
        .expect("run leasehold-bench-planner");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    serde_json::from_str(&stdout).expect("JSON")
}

#[test]
fn the_planner_bench_runs_small_and_replays() {
    let first = run_small();
    let placement = &first["placement"];
    assert_eq!(placement["placed"], 500);
    assert!(placement["rounds"].as_u64().unwrap() >= 1);
    assert!(placement["peak_rss_mib"].as_u64().unwrap() > 0);
    let day = &first["fleet_day"];
    assert_eq!(day["rounds"], 300);
    assert!(day["handed_over"].as_u64().unwrap() > 0, "{day}");
    assert!(day["ramped_pools"].as_u64().unwrap() > 0, "{day}");
    let second = run_small();
    for run in ["placement", "fleet_day"] {
        assert_eq!(first[run]["changes_digest"], second[run]["changes_digest"]);
        assert!(first[run]["changes_digest"].is_string());
    }
}

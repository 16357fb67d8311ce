//! `leasehold simulate`: the shipped scenario replays exactly, and its last
//! step shows the instance guaranteed (its pool handed over, whole).

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

fn simulate(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .arg("simulate")
        .args(args)
        .env_remove("LEASEHOLD_TOKEN")
        .output()
        .expect("run leasehold simulate");
    assert!(
        output.status.success(),
        "simulate failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn the_temporary_shortage_replays_exactly_and_ends_guaranteed() {
    let file = example("temporary-shortage.toml");
    let file = file.to_str().unwrap();
    let first = simulate(&[file, "--output", "json"]);
    let second = simulate(&[file, "--output", "json"]);
    assert_eq!(first, second, "two runs of one scenario differ");
    let steps: Vec<serde_json::Value> = first
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON document per line"))
        .collect();
    // Every 5 minutes from 00:00 to the start at 03:00.
    assert_eq!(steps.len(), 37);
    let last = steps.last().unwrap();
    assert_eq!(last["at"], "2026-12-01T03:00:00Z");
    let pools = last["pools"]["pools"].as_array().unwrap();
    assert_eq!(pools.len(), 1, "{pools:?}");
    let pool = &pools[0];
    assert_eq!(pool["host_id"], "h1-falls");
    assert_eq!(pool["phase"], "handed_over");
    assert_eq!(pool["allocated"], pool["target"]);
    assert_eq!(pool["target"]["memory_mib"], 6144);
    assert_eq!(last["pools"]["links"][0]["instance"], "big");
    // A ramp: the pool on h1-falls held several amounts on the way.
    let mut held_on_the_way: Vec<u64> = steps
        .iter()
        .flat_map(|step| step["pools"]["pools"].as_array().unwrap().clone())
        .filter(|pool| pool["host_id"] == "h1-falls" && pool["phase"] == "acquiring")
        .map(|pool| pool["acquired"]["memory_mib"].as_u64().unwrap())
        .collect();
    held_on_the_way.dedup();
    assert!(held_on_the_way.len() >= 4, "{held_on_the_way:?}");
    let text = simulate(&[file]);
    assert_eq!(text, simulate(&[file]));
    assert!(
        text.contains("== step 36 at 2026-12-01T03:00:00Z"),
        "{text}"
    );
}

#[test]
fn a_bad_scenario_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[host]]\nid = \"h1\"\ncpus = 4\nmemory_mib = 8192\ndisk_gib = 10\n\n[[workload]]\nname = \"w\"\nstart = 60\nend = 30\n[[workload.instance]]\nname = \"a\"\nvcpus = 1\nmemory_mib = 512\ndisk_gib = 1\n",
    )
    .unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(["simulate", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("workload[0].end: must be after start"),
        "{stderr}"
    );
}

/// examples/fig-3-5.toml ends with the tables its comment (and core's
/// fig_3_5_and_6_tables) gives.
#[test]
fn the_fig_3_5_example_ends_with_its_tables() {
    let file = example("fig-3-5.toml");
    let out = simulate(&[file.to_str().unwrap(), "--output", "json"]);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let gib = |v: &serde_json::Value| v["memory_mib"].as_u64().unwrap() / 1024;
    let hosts: Vec<(String, u64, u64, u64)> = last["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            let id = h["host_id"].as_str().unwrap().to_string();
            (
                id,
                gib(&h["total"]),
                gib(&h["available"]),
                gib(&h["not_yet_acquired"]),
            )
        })
        .collect();
    let expected = [
        ("host-1", 80, 0),
        ("host-2", 60, 60),
        ("host-3", 60, 0),
        ("host-4", 0, 0),
    ];
    let expected: Vec<(String, u64, u64, u64)> = expected
        .iter()
        .map(|&(id, available, not_yet)| (id.to_string(), 120, available, not_yet))
        .collect();
    assert_eq!(hosts, expected);
    let links: Vec<(&str, u64)> = last["pools"]["links"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["instance"].as_str().unwrap(),
                l["pool_id"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(links, vec![("VS1", 1), ("VS2", 1), ("VS3", 1), ("VS11", 2)]);
    let pool_2 = &last["pools"]["pools"][1];
    assert_eq!(
        (
            gib(&pool_2["requested"]),
            gib(&pool_2["acquired"]),
            gib(&pool_2["target"])
        ),
        (80, 60, 100)
    );
    assert_eq!(pool_2["acquiring"], true);
}

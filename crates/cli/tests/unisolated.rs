//! The `process` driver end to end, each part its own process: its
//! partitions say they are unisolated and nobody gets one without asking,
//! and a crash of the agent leaves no job of it running once it serves again.

mod common;

use common::{cli, terms, Cluster};
use leasehold_api::{Client, LeaseRequest};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// (pid, start time) of the processes whose command line contains
/// `marker`, leaving out zombies (dead, only not yet reaped).
fn live_processes_with(marker: &str) -> Vec<(i32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        if let Some((state, start)) = state_and_start(pid) {
            if state != "Z" {
                found.push((pid, start));
            }
        }
    }
    found
}

/// Fields 3 and 22 of `/proc/PID/stat`.
fn state_and_start(pid: i32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    Some((fields.first()?.to_string(), fields.get(19)?.to_string()))
}

fn offers(found: &common::CliOutput) -> Vec<serde_json::Value> {
    found.json()["offers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn process_partitions_are_unisolated_and_need_the_opt_in() {
    let mut cluster = Cluster::start(&[]).await;
    let agent = cluster.start_agent("plain", "process");
    let lender = Client::new(&agent, Some(cluster.lender_token.clone()));
    // A lender cannot claim more isolation than the driver gives.
    let mut boast = terms(1, 64, "host", 1000);
    boast.isolation = Some(leasehold_core::Isolation::Container);
    let refused = lender.agent_add_partition(&boast).await.unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    assert_eq!(
        refused.detail().and_then(|d| d.field.as_deref()),
        Some("terms.isolation")
    );
    let added = lender
        .agent_add_partition(&terms(1, 64, "host", 1000))
        .await
        .unwrap();
    assert_eq!(added.terms.isolation, Some(leasehold_core::Isolation::None));
    let (token, bob) = cluster.borrower("bob").await;
    let url = cluster.broker_url.clone();

    // Not found without the opt-in, and the explanation says why.
    let hidden = cli(&url, Some(&token), &["find", "--output", "json"]);
    assert_eq!(hidden.code, 3, "{}", hidden.stdout);
    assert!(offers(&hidden).is_empty());
    let ruled = &hidden.json()["explanation"]["ruled_out_by"];
    assert_eq!(ruled[0]["requirement"], "allow_unisolated", "{ruled}");
    assert_eq!(ruled[0]["partitions"], 1);
    let text = cli(&url, Some(&token), &["find"]);
    assert!(
        text.stdout
            .contains("1 partitions are unisolated; add --allow-unisolated"),
        "{}",
        text.stdout
    );
    let best = cli(&url, Some(&token), &["lease", "--best"]);
    assert_eq!(best.code, 3, "{}", best.stderr);

    // Found with it: the JSON carries the field, the text an isolation column.
    let shown = cli(
        &url,
        Some(&token),
        &["find", "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(offers(&shown).len(), 1, "{}", shown.stdout);
    assert_eq!(offers(&shown)[0]["terms"]["isolation"], "none");
    let table = cli(&url, Some(&token), &["find", "--allow-unisolated"]);
    assert!(table.stdout.contains("ISOLATION"), "{}", table.stdout);
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("plain/1") && l.contains(" none ")),
        "{}",
        table.stdout
    );

    // Named without the opt-in: refused with how to opt in, nothing leased.
    let named = LeaseRequest {
        partition: Some("plain/1".into()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    };
    let refused = bob.lease(&named).await.unwrap_err();
    assert_eq!(refused.status(), Some(400), "{refused}");
    let detail = refused.detail().unwrap();
    assert_eq!(detail.field.as_deref(), Some("allow_unisolated"));
    assert!(
        detail.message.contains("--allow-unisolated"),
        "{}",
        detail.message
    );
    let by_cli = cli(&url, Some(&token), &["lease", "plain/1"]);
    assert_ne!(by_cli.code, 0);
    assert!(
        by_cli.stderr.contains("--allow-unisolated"),
        "{}",
        by_cli.stderr
    );

    // With it: leased, and its terms say what the borrower accepted.
    let leased = cli(
        &url,
        Some(&token),
        &["lease", "plain/1", "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    assert_eq!(leased.json()["terms"]["isolation"], "none");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_job_of_a_crashed_agent_survives_its_restart() {
    let mut cluster = Cluster::start(&[]).await;
    let agent = cluster.start_agent("plain", "process");
    Client::new(&agent, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 64, "host", 1000))
        .await
        .unwrap();
    let (token, _) = cluster.borrower("bob").await;
    let url = cluster.broker_url.clone();
    let leased = cli(
        &url,
        Some(&token),
        &["lease", "plain/1", "--allow-unisolated", "--output", "json"],
    );
    assert_eq!(leased.code, 0, "{}", leased.stderr);
    let lease_id = leased.json()["lease_id"].to_string();
    // A sleep no other process on this machine runs.
    let unique = format!("300.{}{:04}", std::process::id(), rand::random::<u16>());
    let script = format!("echo up; sleep {unique}; echo marker");
    let mut runner = Command::new(common::leasehold_binary())
        .env("LEASEHOLD_BROKER", &url)
        .env("LEASEHOLD_TOKEN", &token)
        .args(["run", "--lease", &lease_id, "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The job's first output line is the event that says it runs.
    let mut first = String::new();
    BufReader::new(runner.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "up\n");
    // The `run` client carries the script in its arguments too.
    let job: Vec<_> = live_processes_with(&unique)
        .into_iter()
        .filter(|(pid, _)| *pid != runner.id() as i32)
        .collect();
    assert_eq!(job.len(), 2, "the job's shell and its sleep: {job:?}");

    // The agent dies without a chance to clean up, then starts again.
    cluster.stop_agent("plain"); // SIGKILL
    let _ = runner.kill();
    let _ = runner.wait();
    cluster.start_agent("plain", "process"); // returns on its ready line
    let left: Vec<_> = live_processes_with(&unique)
        .into_iter()
        .filter(|p| job.contains(p))
        .collect();
    assert_eq!(left, Vec::new(), "job processes left after the restart");
    let notes = cluster.agents.last().unwrap().1.ready["reconciled"].to_string();
    assert!(notes.contains("1 job(s) were running"), "{notes}");
}

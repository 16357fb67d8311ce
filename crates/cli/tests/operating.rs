//! What an operator runs around the market, through the real binary:
//! `/metrics` on the broker and agent of `leasehold up` (who may read it,
//! and a lease and a job moving the counters), `--log-format json` lines
//! carrying the lease's and job's ids, and `leasehold completions`.

mod common;

use common::{leasehold_binary, Proc};
use leasehold_api::{Client, LeaseRequest, SubmitJobRequest};
use leasehold_core::Requirements;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// Starts `leasehold ARGS` with LEASEHOLD_LOG set, its stderr in `log`,
/// and waits for its ready line.
fn spawn_logging(args: &[&str], log: &Path) -> Proc {
    let log_file = std::fs::File::create(log).unwrap();
    let mut child = Command::new(leasehold_binary())
        .args(args)
        .env_remove("LEASEHOLD_TOKEN")
        .env_remove("LEASEHOLD_BROKER")
        .env("LEASEHOLD_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let ready = serde_json::from_str(&line).unwrap_or_else(|_| {
        let _ = child.kill();
        panic!(
            "no ready line: {line:?}; log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        )
    });
    Proc { child, ready }
}

/// `GET URL/metrics` with an optional bearer: status and body.
async fn scrape(base_url: &str, token: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(format!("{base_url}/metrics"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

/// The JSON log lines of `log` (services also print a few plain notes).
fn json_lines(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter(|line| line.starts_with('{'))
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

fn start_up(dir: &Path) -> Proc {
    let data = dir.join("data").display().to_string();
    spawn_logging(
        &[
            "up",
            "--data-dir",
            &data,
            "--listen",
            "127.0.0.1:0",
            "--agent-listen",
            "127.0.0.1:0",
            "--image-store-listen",
            "127.0.0.1:0",
            "--driver",
            "sim",
            "--output",
            "json",
            "--log-format",
            "json",
        ],
        &dir.join("up.log"),
    )
}

#[tokio::test]
async fn up_counts_a_lease_and_a_job_and_logs_json_lines_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let up = start_up(dir.path());
    let broker = up.ready["broker_url"].as_str().unwrap().to_string();
    let agent = up.ready["agent_url"].as_str().unwrap().to_string();
    let token = |role: &str| up.ready["tokens"][role].as_str().unwrap().to_string();
    let (admin, lender, borrower_token) = (token("admin"), token("lender"), token("borrower"));
    assert_eq!(scrape(&broker, None).await.0, 401);
    assert_eq!(scrape(&agent, None).await.0, 401);
    let (status, before) = scrape(&broker, Some(&admin)).await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(scrape(&agent, Some(&lender)).await.0, 200);

    let borrower = Client::new(&broker, Some(borrower_token));
    let lease = borrower
        .lease(&LeaseRequest {
            partition: None,
            best: Some(Requirements::default()),
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    let job = SubmitJobRequest {
        lease_key: lease.lease_key.clone().unwrap(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let ran = Client::new(&agent, None)
        .submit_job(lease.partition.index, &job)
        .await
        .unwrap();
    borrower.release(lease.lease_id).await.unwrap();

    let (_, after) = scrape(&broker, Some(&admin)).await;
    for series in [
        "leasehold_broker_leases_started_total",
        "leasehold_broker_leases_released_total",
    ] {
        assert_eq!(
            value(&after, series) - value(&before, series),
            1.0,
            "{series}: {after}"
        );
    }
    let (_, agent_metrics) = scrape(&agent, Some(&lender)).await;
    let succeeded = r#"leasehold_agent_jobs_total{outcome="succeeded"}"#;
    assert_eq!(value(&agent_metrics, succeeded), 1.0, "{agent_metrics}");

    let lines = json_lines(&dir.path().join("up.log"));
    let started = lines
        .iter()
        .find(|line| line["message"] == "lease started")
        .unwrap_or_else(|| panic!("no 'lease started' line in {lines:?}"));
    assert_eq!(started["lease_id"], lease.lease_id);
    let ended = lines
        .iter()
        .find(|line| line["message"] == "job ended")
        .unwrap_or_else(|| panic!("no 'job ended' line in {lines:?}"));
    assert_eq!(ended["span"]["lease_id"], lease.lease_id);
    assert_eq!(ended["span"]["job_id"], ran.job_id);
    let released = lines
        .iter()
        .find(|line| line["message"] == "lease released");
    assert_eq!(released.unwrap()["lease_id"], lease.lease_id);
    drop(up);
}

#[test]
fn completions_print_a_script_for_each_shell_and_refuse_an_unknown_one() {
    for (shell, marker) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef leasehold"),
        ("fish", "complete -c leasehold"),
    ] {
        let output = Command::new(leasehold_binary())
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(output.status.success(), "{shell}: {output:?}");
        let script = String::from_utf8(output.stdout).unwrap();
        assert!(script.contains(marker), "{shell}: {script:.200}");
        // The verbs and the operator's flags complete too.
        assert!(
            script.contains("completions") && script.contains("log-format"),
            "{shell}"
        );
    }
    let refused = Command::new(leasehold_binary())
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
}

#[test]
fn the_services_offer_the_log_format_and_public_metrics_flags() {
    for service in ["broker", "agent", "up"] {
        let output = Command::new(leasehold_binary())
            .args([service, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8(output.stdout).unwrap();
        assert!(help.contains("--log-format"), "{service}: {help}");
        assert!(help.contains("--metrics-public"), "{service}: {help}");
    }
}

/// Output piped into a reader that has gone (`| head -1`): the verb ends
/// killed by SIGPIPE, as `cat` would, not with a panic and a backtrace.
#[test]
fn a_verb_whose_reader_has_gone_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    // Closed before the verb starts, so its first write meets no reader.
    drop(reader);
    let output = Command::new(leasehold_binary())
        .args(["completions", "bash"])
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{output:?}");
}

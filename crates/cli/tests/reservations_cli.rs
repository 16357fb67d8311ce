//! The reservation verbs, run as the real binary against a small stub broker
//! on 127.0.0.1:0 that serves fixed documents: `--output json` prints the
//! API's document, text prints the tables, a refusal naming a field is
//! printed at the field's line, and `workload show --watch` prints a line per
//! change until every instance is guaranteed. (The end-to-end test against
//! the real broker's endpoints is the lead's.)

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use leasehold_api::{
    HostCapacityView, InstancePoolLink, InstanceStatus, InstanceView, PoolList, PoolView,
    WarningView, WorkloadView,
};
use leasehold_core::reservation::warnings::WarningReason;
use leasehold_core::reservation::{Capacity, PoolPhase};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct StubCounters {
    workload_posts: AtomicUsize,
    workload_gets: AtomicUsize,
}

fn pools() -> PoolList {
    PoolList {
        pools: vec![PoolView {
            pool_id: 3,
            host_id: "ramp-h1".into(),
            workload: "ramp".into(),
            instances: vec!["big".into()],
            phase: PoolPhase::Acquiring,
            acquiring: true,
            allocated: Capacity::ZERO,
            requested: Capacity::new(100, 4096, 1),
            acquired: Capacity::new(100, 3072, 1),
            target: Capacity::new(100, 6144, 1),
            sampled_at: Some("2026-12-01T08:59:00Z".into()),
            sampled_at_ms: Some(1_796_115_540_000),
            expected_completion: Some("2026-12-01T08:59:40Z".into()),
            expected_completion_ms: Some(1_796_115_580_000),
        }],
        links: vec![InstancePoolLink {
            instance: "big".into(),
            workload: "ramp".into(),
            pool_id: 3,
            host_id: "ramp-h1".into(),
        }],
    }
}

fn hosts() -> Vec<HostCapacityView> {
    vec![HostCapacityView {
        host_id: "ramp-h1".into(),
        total: Capacity::new(400, 8192, 20),
        owner_share: Capacity::new(0, 512, 0),
        lent: Capacity::ZERO,
        available: Some(Capacity::new(300, 3072, 20)),
        held: Capacity::new(100, 3072, 1),
        not_yet_acquired: Some(Capacity::new(200, 0, 19)),
        owner_used: Some(Capacity::new(100, 5120, 0)),
        sampled_at: Some("2026-12-01T08:59:00Z".into()),
        sampled_at_ms: Some(1_796_115_540_000),
        powered_down: false,
    }]
}

fn warnings() -> Vec<WarningView> {
    vec![WarningView {
        workload: "warn".into(),
        instances: vec!["huge".into()],
        reason: WarningReason::LargerThanAnyHost,
        message: "no host could ever hold 64 vCPUs".into(),
        target: Capacity::new(6400, 256, 1),
        start: "2026-12-01T09:00:00Z".into(),
        start_ms: 1_796_115_600_000,
        earliest_start: None,
        earliest_start_ms: None,
        largest_guarantee: Capacity::new(400, 256, 1),
        largest_guarantee_host: Some("ramp-h1".into()),
    }]
}

/// The workload as the stub shows it: acquiring on the first two reads,
/// guaranteed from the third on, so a watch sees it change and end.
fn workload(reads_before: usize) -> WorkloadView {
    let guaranteed = reads_before >= 2;
    let acquired_mib = [3072, 4096, 6144][reads_before.min(2)];
    WorkloadView {
        name: "ramp".into(),
        owner: "ops".into(),
        priority: 10,
        start: "2026-12-01T09:00:00Z".into(),
        end: "2026-12-01T10:00:00Z".into(),
        start_ms: 1_796_115_600_000,
        end_ms: 1_796_119_200_000,
        instances: vec![InstanceView {
            name: "big".into(),
            vcpus: 1,
            memory_mib: 6144,
            disk_gib: 1,
            image: None,
            status: if guaranteed {
                InstanceStatus::Guaranteed
            } else {
                InstanceStatus::Acquiring
            },
            host_id: Some("ramp-h1".into()),
            pool_id: Some(3),
            acquired: Capacity::new(100, acquired_mib, 1),
            target: Capacity::new(100, 6144, 1),
            expected_completion: Some("2026-12-01T08:59:40Z".into()),
            expected_completion_ms: Some(1_796_115_580_000),
        }],
        rules: vec![],
    }
}

/// Refuses every workload the way the broker refuses one instance's vCPUs.
async fn refuse_workload(State(counters): State<Arc<StubCounters>>) -> (StatusCode, Json<Value>) {
    counters.workload_posts.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"error": {
            "code": "invalid_field",
            "message": "instance[1].vcpus: more vCPUs than any host has",
            "field": "instance[1].vcpus"
        }})),
    )
}

async fn get_workload(
    State(counters): State<Arc<StubCounters>>,
    Path(name): Path<String>,
) -> Result<Json<WorkloadView>, StatusCode> {
    if name != "ramp" {
        return Err(StatusCode::NOT_FOUND);
    }
    let reads_before = counters.workload_gets.fetch_add(1, Ordering::SeqCst);
    Ok(Json(workload(reads_before)))
}

struct Stub {
    url: String,
    counters: Arc<StubCounters>,
}

async fn start_stub_broker() -> Stub {
    let counters = Arc::new(StubCounters::default());
    let app = Router::new()
        .route("/v1/pools", get(|| async { Json(pools()) }))
        .route("/v1/host-capacity", get(|| async { Json(hosts()) }))
        .route("/v1/warnings", get(|| async { Json(warnings()) }))
        .route(
            "/v1/workloads",
            get(|| async { Json(vec![workload(0)]) }).post(refuse_workload),
        )
        .route("/v1/workloads/{name}", get(get_workload))
        .with_state(counters.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the stub broker");
    let url = format!("http://{}", listener.local_addr().expect("its address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Stub { url, counters }
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn leasehold(stub: &Stub, args: &[&str]) -> Ran {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_leasehold"))
        .args(args)
        .arg("--broker")
        .arg(&stub.url)
        .env("LEASEHOLD_TOKEN", "stub-token")
        .env_remove("LEASEHOLD_BROKER")
        .env_remove("LEASEHOLD_TOKEN_FILE")
        .output()
        .await
        .expect("run leasehold");
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Runs a verb with `--output json` and checks it printed `expected` as is.
async fn assert_prints_document(stub: &Stub, verb: &[&str], expected: Value) {
    let mut args = verb.to_vec();
    args.extend(["--output", "json"]);
    let ran = leasehold(stub, &args).await;
    assert_eq!(ran.code, Some(0), "{verb:?}: {}", ran.stderr);
    let printed: Value = serde_json::from_str(ran.stdout.trim()).expect("one JSON document");
    assert_eq!(printed, expected, "{verb:?}");
}

#[tokio::test]
async fn the_tables_print_as_json_documents_and_as_text() {
    let stub = start_stub_broker().await;
    assert_prints_document(&stub, &["pool", "list"], json!(pools())).await;
    assert_prints_document(&stub, &["host", "capacity"], json!(hosts())).await;
    assert_prints_document(&stub, &["warnings"], json!(warnings())).await;
    assert_prints_document(&stub, &["workload", "list"], json!(vec![workload(0)])).await;

    let pools_text = leasehold(&stub, &["pool", "list"]).await;
    assert_eq!(pools_text.code, Some(0), "{}", pools_text.stderr);
    assert!(
        pools_text.stdout.starts_with("POOL  HOST"),
        "{}",
        pools_text.stdout
    );
    assert!(
        pools_text
            .stdout
            .contains("1.00/3072/1  1.00/6144/1  2026-12-01T08:59:00Z"),
        "{}",
        pools_text.stdout
    );
    assert!(
        pools_text
            .stdout
            .contains("big       ramp      3     ramp-h1"),
        "{}",
        pools_text.stdout
    );
    let hosts_text = leasehold(&stub, &["host", "capacity"]).await;
    assert!(
        hosts_text.stdout.contains("ramp-h1  4.00/8192/20"),
        "{}",
        hosts_text.stdout
    );
    let warnings_text = leasehold(&stub, &["warnings"]).await;
    assert!(
        warnings_text
            .stdout
            .contains("largest guarantee by 2026-12-01T09:00:00Z: 4.00/256/1 on ramp-h1"),
        "{}",
        warnings_text.stdout
    );
}

const REFUSED_TOML: &str = r#"name = "ramp"
priority = 10
start = "2026-12-01T09:00:00Z"
end = "2026-12-01T10:00:00Z"

[[instance]]
name = "small"
vcpus = 1
memory_mib = 512
disk_gib = 1

[[instance]]
name = "huge"
vcpus = 64
memory_mib = 256
disk_gib = 1
"#;

#[tokio::test]
async fn a_refused_field_is_printed_at_its_line() {
    let stub = start_stub_broker().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let toml_path = dir.path().join("ramp.toml");
    std::fs::write(&toml_path, REFUSED_TOML).expect("write the file");
    let toml_name = toml_path.to_str().expect("a UTF-8 path");
    let ran = leasehold(&stub, &["workload", "apply", toml_name]).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    let expected = format!("{toml_name}:14: instance[1].vcpus: more vCPUs than any host has");
    assert!(ran.stderr.contains(&expected), "{}", ran.stderr);

    // The same as JSON, and as a document for scripts.
    let json_path = dir.path().join("ramp.json");
    let json_text = "{\n  \"name\": \"ramp\",\n  \"start\": \"2026-12-01T09:00:00Z\",\n  \"end\": \"2026-12-01T10:00:00Z\",\n  \"instance\": [\n    {\"name\": \"small\", \"vcpus\": 1, \"memory_mib\": 512, \"disk_gib\": 1},\n    {\"name\": \"huge\", \"vcpus\": 64, \"memory_mib\": 256, \"disk_gib\": 1}\n  ]\n}\n";
    std::fs::write(&json_path, json_text).expect("write the file");
    let json_name = json_path.to_str().expect("a UTF-8 path");
    let ran = leasehold(&stub, &["workload", "apply", json_name, "--output", "json"]).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    let printed: Value = serde_json::from_str(ran.stdout.trim()).expect("one JSON document");
    assert_eq!(printed["error"]["line"], json!(7), "{printed}");
    assert_eq!(printed["error"]["field"], json!("instance[1].vcpus"));
    assert_eq!(printed["error"]["status"], json!(422));
    assert_eq!(stub.counters.workload_posts.load(Ordering::SeqCst), 2);

    // A file bad on its face never reaches the broker.
    std::fs::write(
        &toml_path,
        REFUSED_TOML.replace("vcpus = 64", "vcpus = \"many\""),
    )
    .expect("write the file");
    let ran = leasehold(&stub, &["workload", "apply", toml_name]).await;
    assert_eq!(ran.code, Some(1), "{}", ran.stderr);
    assert!(
        ran.stderr
            .contains(&format!("{toml_name}:14: instance[1].vcpus: ")),
        "{}",
        ran.stderr
    );
    assert_eq!(stub.counters.workload_posts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_piped_watch_prints_each_change_until_guaranteed() {
    let stub = start_stub_broker().await;
    let ran = leasehold(
        &stub,
        &[
            "workload",
            "show",
            "ramp",
            "--watch",
            "--poll-interval-ms",
            "10",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let lines: Vec<&str> = ran.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "big: acquiring, memory 3072/6144 MiB (50%) on ramp-h1, expected 2026-12-01T08:59:40Z",
            "big: acquiring, memory 4096/6144 MiB (66%) on ramp-h1, expected 2026-12-01T08:59:40Z",
            "big: guaranteed, memory 6144/6144 MiB (100%) on ramp-h1",
        ]
    );
    assert_eq!(stub.counters.workload_gets.load(Ordering::SeqCst), 3);

    // For scripts: one document per change, the last one guaranteed.
    stub.counters.workload_gets.store(0, Ordering::SeqCst);
    let ran = leasehold(
        &stub,
        &[
            "workload",
            "show",
            "ramp",
            "--watch",
            "--poll-interval-ms",
            "10",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.stderr);
    let documents: Vec<Value> = ran
        .stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON document per line"))
        .collect();
    assert_eq!(
        documents,
        [json!(workload(0)), json!(workload(1)), json!(workload(2))]
    );

    let missing = leasehold(&stub, &["workload", "show", "nope"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("failed to read workload 'nope'"),
        "{}",
        missing.stderr
    );
}

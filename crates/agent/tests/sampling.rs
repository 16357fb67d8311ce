//! The agent's samples of its host (seed 003, units 109/110), against a
//! small stub broker on 127.0.0.1:0 that holds each sample until the test
//! answers it: the test moves the agent's simulated clock between a sample
//! and its answer, so the next sample is taken at a time the test chose and
//! nothing waits on a timer. The stub answers the few calls an agent makes
//! at start (its keys, the host, partitions, revocations) like the broker.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use leasehold_agent::driver::DriverKind;
use leasehold_agent::{AgentConfig, RunningAgent, SamplingConfig};
use leasehold_api::{
    BrokerInfo, Client, HostSampleAnswer, HostSampleRequest, HostView, PartitionView,
    RegisterHostRequest, RegisterPartitionRequest, RevocationPage,
};
use leasehold_core::reservation::Capacity;
use leasehold_core::{HostCapacity, Isolation, PartitionRef, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::agent::AgentDb;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

const START_MS: u64 = 1_700_000_000_000;
const LENDER_TOKEN: &str = "the-host-credential";

/// A sample as the stub received it, and the way to answer it.
struct HeldSample {
    host_id: String,
    bearer: Option<String>,
    request: HostSampleRequest,
    answer: oneshot::Sender<Result<HostSampleAnswer, StatusCode>>,
}

type Samples = Arc<Mutex<mpsc::UnboundedSender<HeldSample>>>;

async fn broker_info() -> Json<BrokerInfo> {
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    Json(BrokerInfo {
        version: "stub".into(),
        public_key_hex: hex::encode(key.verifying_key().to_bytes()),
        commission_basis_points: 0,
        keys: Vec::new(),
    })
}

async fn register_host(
    Path(host_id): Path<String>,
    Json(request): Json<RegisterHostRequest>,
) -> Json<HostView> {
    Json(HostView {
        host_id,
        lender: "lender".into(),
        agent_url: request.agent_url,
        capacity: request.capacity,
        partitions: 0,
    })
}

async fn register_partition(
    Path((host_id, index)): Path<(String, u32)>,
    Json(request): Json<RegisterPartitionRequest>,
) -> Json<PartitionView> {
    Json(PartitionView {
        partition: PartitionRef::new(&host_id, index),
        terms: request.terms,
        lease_id: None,
        withdrawn: false,
        epoch: 0,
    })
}

async fn no_revocations() -> Json<RevocationPage> {
    Json(RevocationPage {
        revocations: Vec::new(),
        next_after_seq: 0,
        more: false,
    })
}

/// Hands the sample to the test and answers what the test says.
async fn hold_sample(
    State(samples): State<Samples>,
    Path(host_id): Path<String>,
    headers: HeaderMap,
    Json(request): Json<HostSampleRequest>,
) -> Result<Json<HostSampleAnswer>, StatusCode> {
    let (answer, answered) = oneshot::channel();
    let bearer = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::to_string);
    let held = HeldSample {
        host_id,
        bearer,
        request,
        answer,
    };
    samples
        .lock()
        .await
        .send(held)
        .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
    match answered.await {
        Ok(Ok(answer)) => Ok(Json(answer)),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(StatusCode::SERVICE_UNAVAILABLE),
    }
}

/// The stub broker's URL and the samples it receives.
async fn start_stub_broker() -> (String, mpsc::UnboundedReceiver<HeldSample>) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let router = Router::new()
        .route("/v1/broker", get(broker_info))
        .route("/v1/hosts/{host_id}", put(register_host))
        .route(
            "/v1/hosts/{host_id}/partitions/{index}",
            put(register_partition),
        )
        .route(
            "/v1/partitions",
            get(|| async { Json(Vec::<PartitionView>::new()) }),
        )
        .route("/v1/hosts/{host_id}/revocations", get(no_revocations))
        .route("/v1/hosts/{host_id}/samples", post(hold_sample))
        .with_state(Arc::new(Mutex::new(sender)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, receiver)
}

/// 4 vCPUs, 8192 MiB, 20 GiB; the owner keeps 0.5 vCPU, 512 MiB, 1 GiB.
fn host_capacity() -> HostCapacity {
    HostCapacity {
        cpu_centicores: 400,
        memory_mib: 8192,
        disk_gib: 20,
        owner_share_cpu_centicores: 50,
        owner_share_memory_mib: 512,
        owner_share_disk_gib: 1,
    }
}

/// The partition the host lends: 1 vCPU, 1024 MiB, 2 GiB.
fn lent_terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 1024,
        disk_gib: 2,
        images: vec!["busybox".into()],
        price_per_hour_micros: 1_000,
        isolation: Some(Isolation::Simulated),
    }
}

fn agent_config(dir: &std::path::Path, broker_url: String, clock: &SimulatedClock) -> AgentConfig {
    AgentConfig {
        markets: Vec::new(),
        direct: false,
        key_confirmation: Default::default(),
        host_id: "ramp-h1".into(),
        data_dir: dir.join("agent"),
        listen: "127.0.0.1:0".parse().unwrap(),
        broker_url,
        lender_token: LENDER_TOKEN.into(),
        driver: DriverKind::Sim {
            images: vec!["busybox".into()],
        },
        capacity: host_capacity(),
        advertise_url: None,
        clock: clock.shared(),
        revocation_poll_interval_ms: 3_600_000,
        tls: None,
        client_trust: Default::default(),
        sampling: SamplingConfig {
            // The smallest gap: the stub holds each sample until the test
            // answers, so the pace is the test's, not this interval's.
            interval_ms: 100,
            ..SamplingConfig::default()
        },
        rights: None,
        metrics_public: false,
    }
}

/// Writes `trace` beside the agent and sets it as the owner's load.
fn with_trace(mut config: AgentConfig, dir: &std::path::Path, trace: &str) -> AgentConfig {
    let path = dir.join("owner-load.csv");
    std::fs::write(&path, trace).unwrap();
    config.sampling.owner_load_file = Some(path);
    config
}

/// The agent's partition table with one partition in it, before it starts.
fn lend_one_partition(config: &AgentConfig) {
    leasehold_store::private_fs::ensure_private_dir(&config.data_dir).unwrap();
    let path = config.data_dir.join("agent.db");
    let mut db = AgentDb::open(&path).unwrap();
    db.insert_partition(&lent_terms()).unwrap();
    // The agent refuses a table others can read, whatever this test's umask.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

async fn next_sample(samples: &mut mpsc::UnboundedReceiver<HeldSample>) -> HeldSample {
    samples.recv().await.expect("the agent keeps sampling")
}

fn answer(held: HeldSample, guaranteed: Capacity) {
    let answer = HostSampleAnswer {
        guaranteed,
        next_sample_after_ms: 0,
    };
    held.answer.send(Ok(answer)).expect("the agent waits");
}

async fn start_agent(config: AgentConfig) -> RunningAgent {
    leasehold_agent::start(config).await.unwrap()
}

#[tokio::test]
async fn the_agent_reports_its_owners_trace_as_the_clock_moves_and_keeps_out_of_the_guarantee() {
    let dir = tempfile::tempdir().unwrap();
    let (broker_url, mut samples) = start_stub_broker().await;
    let clock = SimulatedClock::starting_at(START_MS);
    let config = agent_config(dir.path(), broker_url, &clock);
    let config = with_trace(config, dir.path(), "0,1,7168\n10,2.5,6144\n14,3,5120\n");
    lend_one_partition(&config);
    let agent = start_agent(config).await;

    // At the start: the first line, as the host credential of this host.
    let first = next_sample(&mut samples).await;
    assert_eq!(first.host_id, "ramp-h1");
    assert_eq!(first.bearer.as_deref(), Some(LENDER_TOKEN));
    assert_eq!(first.request.owner_used, Capacity::new(100, 7168, 1));
    clock.advance_ms(10_000);
    answer(first, Capacity::ZERO);

    // 10 s on: the second line (2.5 vCPUs), still within the room.
    let second = next_sample(&mut samples).await;
    assert_eq!(second.request.owner_used, Capacity::new(250, 6144, 1));
    clock.advance_ms(4_000);
    answer(second, Capacity::new(100, 3072, 0));

    // 14 s on, with 1 vCPU and 3072 MiB guaranteed and 1 vCPU, 1024 MiB
    // lent: the owner wants 3 vCPUs and 5120 MiB but gets 2 and 4096.
    let third = next_sample(&mut samples).await;
    assert_eq!(third.request.owner_used, Capacity::new(200, 4096, 1));
    answer(third, Capacity::new(100, 3072, 0));

    // Once that answer is in (the next sample came), the agent shows it.
    let fourth = next_sample(&mut samples).await;
    assert_eq!(fourth.request.owner_used, Capacity::new(200, 4096, 1));
    let info = Client::new(&agent.url(), None).agent_info().await.unwrap();
    assert_eq!(info.guaranteed, Some(Capacity::new(100, 3072, 0)));
    assert_eq!(info.owner_used, Some(Capacity::new(200, 4096, 1)));
    assert_eq!(info.sampled_at_ms, Some(START_MS + 14_000));
    drop(fourth);
    agent.shutdown().await;
}

#[tokio::test]
async fn without_a_trace_the_owner_uses_its_share_and_a_failed_sample_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let (broker_url, mut samples) = start_stub_broker().await;
    let clock = SimulatedClock::starting_at(START_MS);
    let agent = start_agent(agent_config(dir.path(), broker_url, &clock)).await;

    let first = next_sample(&mut samples).await;
    assert_eq!(first.request.owner_used, Capacity::new(50, 512, 1));
    // The broker fails: the agent keeps serving and samples again.
    first
        .answer
        .send(Err(StatusCode::INTERNAL_SERVER_ERROR))
        .expect("the agent waits");
    let second = next_sample(&mut samples).await;
    assert_eq!(second.request.owner_used, Capacity::new(50, 512, 1));
    let info = Client::new(&agent.url(), None).agent_info().await.unwrap();
    assert_eq!(info.guaranteed, None, "no answer yet, so no guarantee");
    answer(second, Capacity::new(0, 1024, 0));
    let third = next_sample(&mut samples).await;
    let info = Client::new(&agent.url(), None).agent_info().await.unwrap();
    assert_eq!(info.guaranteed, Some(Capacity::new(0, 1024, 0)));
    drop(third);
    agent.shutdown().await;
}

#[tokio::test]
async fn a_bad_trace_stops_the_agent_naming_the_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    // No broker is asked: the trace is read before anything else.
    let config = agent_config(dir.path(), "http://127.0.0.1:9".into(), &clock);
    let config = with_trace(config, dir.path(), "0,1,1024\n# more\n5,2,9000\n");
    let path = config.sampling.owner_load_file.clone().unwrap();
    let error = match leasehold_agent::start(config).await {
        Ok(_) => panic!("an agent started with a trace above the host's memory"),
        Err(error) => error.to_string(),
    };
    assert_eq!(
        error,
        format!(
            "{}:3: memory_mib: 9000 is more than the host's 8192 MiB",
            path.display()
        )
    );
}

#[tokio::test]
async fn a_trace_on_a_driver_other_than_sim_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let mut config = agent_config(dir.path(), "http://127.0.0.1:9".into(), &clock);
    config.driver = DriverKind::Process {
        root_dir: dir.path().join("partitions"),
    };
    let config = with_trace(config, dir.path(), "0,1,1024\n");
    let error = match leasehold_agent::start(config).await {
        Ok(_) => panic!("a process agent took an owner-load trace"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("needs --driver sim") && error.contains("'process'"),
        "{error}"
    );
}

#[tokio::test]
async fn an_owner_cgroup_needs_the_oci_driver_and_excludes_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(START_MS);
    let mut config = agent_config(dir.path(), "http://127.0.0.1:9".into(), &clock);
    config.sampling.owner_cgroup = Some("owner".into());
    let refusal = |config: AgentConfig| async move {
        match leasehold_agent::start(config).await {
            Ok(_) => panic!("the agent started"),
            Err(error) => error.to_string(),
        }
    };
    let on_sim = refusal(config.clone()).await;
    assert!(
        on_sim.contains("--owner-cgroup") && on_sim.contains("needs --driver oci"),
        "{on_sim}"
    );
    let both = refusal(with_trace(config, dir.path(), "0,1,1024\n")).await;
    assert!(both.contains("--owner-load and --owner-cgroup"), "{both}");
}

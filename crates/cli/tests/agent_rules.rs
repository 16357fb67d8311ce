//! The agent's start and key checks at scale and under contention.

mod common;

use common::{terms, Cluster};
use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest};
use std::time::Duration;

/// A deadline that only guards against a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

fn big_host() -> RegisterHostRequest {
    RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity: leasehold_core::HostCapacity {
            cpu_centicores: 1024 * 100,
            memory_mib: 1024 * 1024,
            disk_gib: 4096,
            owner_share_cpu_centicores: 0,
            owner_share_memory_mib: 0,
            owner_share_disk_gib: 0,
        },
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agent_sees_all_of_its_partitions_at_start_even_beyond_one_page() {
    const PARTITIONS: u32 = 1005;
    let mut cluster = Cluster::start(&["--durability", "normal"]).await;
    let lender = cluster.lender();
    lender.register_host("alpha", &big_host()).await.unwrap();
    // Partitions the broker offers for alpha, which alpha's (empty) table
    // does not have: the agent must withdraw every one of them at start.
    for chunk in (1..=PARTITIONS).collect::<Vec<_>>().chunks(64) {
        let puts = chunk.iter().map(|&index| {
            let lender = lender.clone();
            async move {
                let mut terms = terms(1, 16, "busybox", 1000 + u64::from(index));
                terms.cpu_cap_percent = 1;
                lender
                    .register_partition("alpha", index, &RegisterPartitionRequest { terms })
                    .await
            }
        });
        for put in futures_util::future::join_all(puts).await {
            put.unwrap();
        }
    }
    cluster.start_agent("alpha", "sim");
    let mut offered = 0;
    let mut after = None;
    loop {
        let page = lender
            .list_host_partitions("alpha", after, 1000)
            .await
            .unwrap();
        offered += page.iter().filter(|p| !p.withdrawn).count();
        after = page.last().map(|p| p.partition.index);
        if page.len() < 1000 {
            break;
        }
    }
    assert_eq!(
        offered, 0,
        "partitions the agent lacks are withdrawn, all of them"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_for_another_partition_is_refused_without_waiting_for_a_running_job() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "process");
    let agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    for price in [1000, 2000] {
        agent
            .agent_add_partition(&terms(1, 256, "host", price))
            .await
            .unwrap();
    }
    let (_, bob) = cluster.borrower("bob").await;
    let lease = |name: &str| LeaseRequest {
        partition: Some(name.to_string()),
        best: None,
        allow_unisolated: true,
        start: None,
        end: None,
    };
    let first = bob.lease(&lease("alpha/1")).await.unwrap();
    let second = bob.lease(&lease("alpha/2")).await.unwrap();
    // A long job holds partition 1's lock.
    let runner = Client::new(&alpha, None);
    let first_key = first.lease_key.clone().unwrap();
    let (event_sender, mut events) = tokio::sync::mpsc::unbounded_channel();
    let streaming = runner.clone();
    let running = tokio::spawn(async move {
        let request = leasehold_api::SubmitJobRequest {
            lease_key: first_key,
            command: vec!["sh".into(), "-c".into(), "echo up; sleep 300.4242".into()],
            ..Default::default()
        };
        streaming
            .submit_job_streaming(1, &request, move |_| {
                let _ = event_sender.send(());
            })
            .await
    });
    let started = tokio::time::timeout(HANG_GUARD, events.recv())
        .await
        .expect("the job starts");
    assert!(started.is_some());
    // Partition 2's key sent to partition 1: refused at once, not after the
    // running job (it would wait 300 s for the lock before).
    let refused = tokio::time::timeout(
        HANG_GUARD,
        runner.submit_job(
            1,
            &leasehold_api::SubmitJobRequest {
                lease_key: second.lease_key.clone().unwrap(),
                command: vec!["true".into()],
                ..Default::default()
            },
        ),
    )
    .await
    .expect("refused without waiting for the partition's lock")
    .unwrap_err();
    assert_eq!(refused.status(), Some(403), "{refused}");
    // The release stops the running job.
    bob.release(first.lease_id).await.unwrap();
    let ended = tokio::time::timeout(HANG_GUARD, running).await;
    assert!(ended.is_ok(), "the job ended with its lease");
}

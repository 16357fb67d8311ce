//! One source of truth for a partition's terms: what the broker sold and
//! bills is what the agent builds, whichever side the lender altered.

mod common;

use common::{terms, Cluster};
use leasehold_api::{Client, LeaseRequest, RegisterPartitionRequest, SubmitJobRequest};

fn named(partition: &str) -> LeaseRequest {
    LeaseRequest {
        partition: Some(partition.to_string()),
        best: None,
        allow_unisolated: false,
        start: None,
        end: None,
    }
}

/// Terms as the lender states them at the broker: the same isolation the
/// agent's sim driver stamps (a lender copies it from the broker's record).
fn simulated(mut terms: leasehold_core::Terms) -> leasehold_core::Terms {
    terms.isolation = Some(leasehold_core::Isolation::Simulated);
    terms
}

/// What the partition was built with, as its job sees it.
async fn built_terms(agent_url: &str, key: &str) -> leasehold_core::Terms {
    let job = Client::new(agent_url, None)
        .submit_job(
            1,
            &SubmitJobRequest {
                lease_key: key.to_string(),
                command: vec!["terms".into()],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    serde_json::from_str(job.stdout.trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_job_sees_the_terms_that_were_billed_whichever_side_altered_them() {
    let mut cluster = Cluster::start(&[]).await;
    let alpha = cluster.start_agent("alpha", "sim");
    let agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    agent
        .agent_add_partition(&terms(1, 256, "busybox", 1000))
        .await
        .unwrap();
    let (_, bob) = cluster.borrower("bob").await;

    // Altered at the broker, where the agent's copy does not follow.
    let at_broker = simulated(terms(2, 512, "busybox", 3000));
    cluster
        .lender()
        .register_partition(
            "alpha",
            1,
            &RegisterPartitionRequest {
                terms: at_broker.clone(),
            },
        )
        .await
        .unwrap();
    let lease = bob.lease(&named("alpha/1")).await.unwrap();
    assert_eq!(lease.terms, at_broker, "the broker sells its record");
    let key = lease.lease_key.clone().unwrap();
    assert_eq!(
        built_terms(&alpha, &key).await,
        at_broker,
        "and the job gets it"
    );
    let rows = agent.agent_list_partitions().await.unwrap();
    assert_eq!(rows[0].terms, at_broker, "the agent's table follows");
    bob.release(lease.lease_id).await.unwrap();

    // Altered at the agent, which registers the change with the broker.
    let at_agent = simulated(terms(1, 384, "busybox", 2000));
    agent.agent_alter_partition(1, &at_agent).await.unwrap();
    let lease = bob.lease(&named("alpha/1")).await.unwrap();
    assert_eq!(lease.terms, at_agent);
    let key = lease.lease_key.clone().unwrap();
    assert_eq!(built_terms(&alpha, &key).await, at_agent);
    bob.release(lease.lease_id).await.unwrap();

    // Altered at the broker while the agent is away: the agent takes the
    // broker's record when it comes back.
    cluster.stop_agent("alpha");
    let while_away = simulated(terms(1, 640, "busybox", 2500));
    cluster
        .lender()
        .register_partition(
            "alpha",
            1,
            &RegisterPartitionRequest {
                terms: while_away.clone(),
            },
        )
        .await
        .unwrap();
    let alpha = cluster.start_agent("alpha", "sim");
    let agent = Client::new(&alpha, Some(cluster.lender_token.clone()));
    let rows = agent.agent_list_partitions().await.unwrap();
    assert_eq!(rows[0].terms, while_away);
    let lease = bob.lease(&named("alpha/1")).await.unwrap();
    assert_eq!(lease.terms, while_away);
    let key = lease.lease_key.clone().unwrap();
    assert_eq!(built_terms(&alpha, &key).await, while_away);
}

//! Seed 000, FIG. 15 (S154-S158): before a job runs, the agent asks the
//! partition's managing broker to confirm the key. A released lease is
//! refused at once even when its release notice never reached the agent;
//! with the broker away, `--confirm-keys preferred` verifies offline only
//! and `required` refuses.

mod common;

use common::{terms, Cluster};
use leasehold_api::{Client, LeaseRequest, SubmitJobRequest};

/// Notices can neither be pushed (the advertised URL leads nowhere) nor
/// pulled (once a day): only the confirmation can tell the agent.
fn deaf_agent(cluster: &mut Cluster, host_id: &str, policy: &str) -> String {
    cluster.start_agent_with(
        host_id,
        "sim",
        &[
            "--advertise-url",
            "http://127.0.0.1:9",
            "--revocation-poll-secs",
            "86400",
            "--confirm-keys",
            policy,
        ],
    )
}

async fn lease_of(
    cluster: &Cluster,
    borrower: &Client,
    agent_url: &str,
    host: &str,
) -> (u64, String) {
    Client::new(agent_url, Some(cluster.lender_token.clone()))
        .agent_add_partition(&terms(1, 512, "busybox", 100))
        .await
        .unwrap();
    let lease = borrower
        .lease(&LeaseRequest {
            partition: Some(format!("{host}/1")),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    (lease.lease_id, lease.lease_key.unwrap())
}

async fn job(agent_url: &str, key: &str) -> Result<(), leasehold_api::ApiError> {
    let request = SubmitJobRequest {
        lease_key: key.to_string(),
        command: vec!["true".into()],
        ..Default::default()
    };
    Client::new(agent_url, None)
        .submit_job(1, &request)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn a_released_lease_is_refused_at_once_though_its_notice_was_lost() {
    let mut cluster = Cluster::start(&[]).await;
    let (_, borrower) = cluster.borrower("bob").await;
    // This agent holds a host credential (as `up`'s does), which may ask
    // only about its own host's leases.
    let credential = cluster
        .lender()
        .create_host_credential("pref")
        .await
        .unwrap()
        .token;
    let lender = std::mem::replace(&mut cluster.lender_token, credential);
    let preferred = deaf_agent(&mut cluster, "pref", "preferred");
    cluster.lender_token = lender;
    let required = deaf_agent(&mut cluster, "req", "required");
    let (released_id, released_key) = lease_of(&cluster, &borrower, &preferred, "pref").await;
    job(&preferred, &released_key)
        .await
        .expect("an active lease runs");
    let receipt = borrower.release(released_id).await.unwrap();
    assert!(!receipt.agent_notified, "the notice was meant to be lost");
    let refused = job(&preferred, &released_key)
        .await
        .expect_err("a released key ran");
    assert_eq!(refused.code(), Some("key_rejected"), "{refused}");
    assert!(refused.to_string().contains("released"), "{refused}");

    // A new lease on the same partition, and one on the `required` host;
    // then the broker goes away.
    let (_, fresh_key) = lease_of_existing(&borrower, "pref").await;
    let (_, required_key) = lease_of(&cluster, &borrower, &required, "req").await;
    cluster.broker = None;
    job(&preferred, &fresh_key)
        .await
        .expect("preferred: verified offline while the broker is away");
    let stopped = job(&required, &required_key)
        .await
        .expect_err("required: ran without the broker's confirmation");
    assert!(stopped.to_string().contains("cannot confirm"), "{stopped}");
}

async fn lease_of_existing(borrower: &Client, host: &str) -> (u64, String) {
    let lease = borrower
        .lease(&LeaseRequest {
            partition: Some(format!("{host}/1")),
            best: None,
            allow_unisolated: false,
            start: None,
            end: None,
        })
        .await
        .unwrap();
    (lease.lease_id, lease.lease_key.unwrap())
}

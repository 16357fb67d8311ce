//! A small market for the dashboard's tests: a broker on 127.0.0.1:0 with a
//! simulated clock, a lender (ann) with host h1 and three partitions, two
//! borrowers (bob, carol) and the admin, each with its token.

#![allow(dead_code)] // each test file uses part of it

use leasehold_api::{Client, LeaseRequest, RegisterHostRequest, RegisterPartitionRequest, Role};
use leasehold_broker::BrokerConfig;
use leasehold_core::{HostCapacity, Isolation, Terms};
use leasehold_service::SimulatedClock;

pub struct Market {
    pub broker: leasehold_broker::RunningBroker,
    pub clock: SimulatedClock,
    pub url: String,
    pub admin_token: String,
    pub lender_token: String,
    pub bob_token: String,
    pub carol_token: String,
    pub host_credential: String,
    _data_dir: tempfile::TempDir,
}

fn terms() -> Terms {
    Terms {
        vcpus: 1,
        cpu_cap_percent: 100,
        memory_mib: 512,
        disk_gib: 1,
        images: vec!["busybox".into()],
        price_per_hour_micros: 3_600_000,
        isolation: Some(Isolation::Simulated),
    }
}

pub async fn market() -> Market {
    let data_dir = tempfile::tempdir().unwrap();
    let clock = SimulatedClock::starting_at(1_800_000_000_000);
    let broker = leasehold_broker::start(BrokerConfig {
        data_dir: data_dir.path().join("broker"),
        listen: "127.0.0.1:0".parse().unwrap(),
        durability: leasehold_store::Durability::Normal,
        commission_basis_points: 1_000,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock: clock.shared(),
        image_store_url: None,
        tls: None,
        client_trust: Default::default(),
        database_url: None,
        store_layer: None,
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
    })
    .await
    .unwrap();
    let url = broker.url();
    let admin_token = broker.bootstrap_admin_token.clone().unwrap();
    let admin = Client::new(&url, Some(admin_token.clone()));
    let token_of = |name: &'static str, role| {
        let admin = admin.clone();
        async move { admin.create_principal(name, role).await.unwrap().token }
    };
    let lender_token = token_of("ann", Role::Lender).await;
    let bob_token = token_of("bob", Role::Borrower).await;
    let carol_token = token_of("carol", Role::Borrower).await;
    let lender = Client::new(&url, Some(lender_token.clone()));
    let capacity = HostCapacity {
        cpu_centicores: 400,
        memory_mib: 4096,
        disk_gib: 10,
        owner_share_cpu_centicores: 0,
        owner_share_memory_mib: 0,
        owner_share_disk_gib: 0,
    };
    let host = RegisterHostRequest {
        share: None,
        agent_url: None,
        capacity,
    };
    lender.register_host("h1", &host).await.unwrap();
    for index in 1..=3 {
        let partition = RegisterPartitionRequest { terms: terms() };
        lender
            .register_partition("h1", index, &partition)
            .await
            .unwrap();
    }
    let host_credential = lender.create_host_credential("h1").await.unwrap().token;
    Market {
        broker,
        clock,
        url,
        admin_token,
        lender_token,
        bob_token,
        carol_token,
        host_credential,
        _data_dir: data_dir,
    }
}

impl Market {
    pub fn client(&self, token: &str) -> Client {
        Client::new(&self.url, Some(token.to_string()))
    }

    /// `borrower_token` leases partition h1/`index`; answers the lease id.
    pub async fn lease(&self, borrower_token: &str, index: u32) -> u64 {
        let request = LeaseRequest {
            partition: Some(format!("h1/{index}")),
            best: None,
            allow_unisolated: true,
            start: None,
            end: None,
        };
        self.client(borrower_token)
            .lease(&request)
            .await
            .unwrap()
            .lease_id
    }
}

//! Every call the simulation makes into the broker, in one place: start,
//! stop and restart (`leasehold_broker::start`), the HTTP API through the
//! typed client, and the store read directly. Moving the simulation onto
//! `Broker::execute(command)` later changes this module only.

use super::faults::FaultControl;
use leasehold_api::{
    ApiError, BillView, Client, FindResponse, HostView, LeaseRequest, LeaseView, LedgerView,
    PartitionView, RegisterHostRequest, RegisterPartitionRequest, ReleaseReceipt, RevocationPage,
    Role,
};
use leasehold_broker::{BrokerConfig, RunningBroker};
use leasehold_core::{HostCapacity, PartitionRef, Requirements, Terms};
use leasehold_service::SimulatedClock;
use leasehold_store::{BrokerDatabase, BrokerStore, Durability};
use std::path::PathBuf;

/// How an operation that did not succeed was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The HTTP status, or `None` when no answer came.
    pub status: Option<u16>,
    /// The error code (`partition_taken`, `internal`, ...), or `unreachable`.
    pub code: String,
    /// The field the error names, if any.
    pub field: Option<String>,
}

impl Refusal {
    /// An answer that does not say whether the change happened: a server
    /// error or no answer at all.
    pub fn is_unknown_outcome(&self) -> bool {
        self.status.is_none_or(|status| status >= 500)
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.status {
            Some(status) => write!(f, "{status} {}", self.code)?,
            None => write!(f, "no answer ({})", self.code)?,
        }
        if let Some(field) = &self.field {
            write!(f, " field={field}")?;
        }
        Ok(())
    }
}

impl From<ApiError> for Refusal {
    fn from(error: ApiError) -> Self {
        match &error {
            ApiError::Status {
                status,
                code,
                field,
                ..
            } => Refusal {
                status: Some(*status),
                code: code.clone(),
                field: field.clone(),
            },
            ApiError::Unreachable { .. } => Refusal {
                status: None,
                code: "unreachable".into(),
                field: None,
            },
            other => Refusal {
                status: None,
                code: format!("client: {other}"),
                field: None,
            },
        }
    }
}

pub type Answer<T> = Result<T, Refusal>;

/// The broker under simulation and a client per simulated principal.
pub struct SimBroker {
    running: Option<RunningBroker>,
    data_dir: PathBuf,
    /// PostgreSQL's URL, or `None` for SQLite in `data_dir`.
    database_url: Option<String>,
    clock: SimulatedClock,
    faults: FaultControl,
    commission_basis_points: u32,
    admin: Client,
    lenders: Vec<Client>,
    borrowers: Vec<Client>,
    /// A connection of the simulation's own to the broker's database.
    store: Box<dyn BrokerStore>,
}

/// The lender principal `index` is called this.
pub fn lender_name(index: usize) -> String {
    format!("lender{index}")
}

/// The borrower principal `index` is called this.
pub fn borrower_name(index: usize) -> String {
    format!("borrower{index}")
}

impl SimBroker {
    /// Starts a broker on a new data directory and creates the principals
    /// (with no fault armed).
    pub async fn start(
        data_dir: PathBuf,
        database_url: Option<String>,
        clock: SimulatedClock,
        faults: FaultControl,
        commission_basis_points: u32,
        lenders: usize,
        borrowers: usize,
    ) -> Result<SimBroker, String> {
        let running = start_broker(
            &data_dir,
            database_url.clone(),
            &clock,
            &faults,
            commission_basis_points,
        )
        .await?;
        let admin_token = running
            .bootstrap_admin_token
            .clone()
            .ok_or("a new broker made no admin token")?;
        let admin = Client::new(&running.url(), Some(admin_token));
        let make = |role: Role, name: String| {
            let admin = admin.clone();
            async move {
                let created = admin
                    .create_principal(&name, role)
                    .await
                    .map_err(|e| format!("cannot create {name}: {e}"))?;
                Ok::<Client, String>(admin.with_token(Some(created.token)))
            }
        };
        let mut lender_clients = Vec::new();
        for index in 0..lenders {
            lender_clients.push(make(Role::Lender, lender_name(index)).await?);
        }
        let mut borrower_clients = Vec::new();
        for index in 0..borrowers {
            borrower_clients.push(make(Role::Borrower, borrower_name(index)).await?);
        }
        let store = open_store(&data_dir, database_url.as_deref())?;
        Ok(SimBroker {
            running: Some(running),
            data_dir,
            database_url,
            clock,
            faults,
            commission_basis_points,
            admin,
            lenders: lender_clients,
            borrowers: borrower_clients,
            store,
        })
    }

    /// Stops the broker (its process dies) and starts it again from its
    /// store, on a new port.
    pub async fn restart(&mut self) -> Result<(), String> {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
        make_database_files_private(&self.data_dir)?;
        let running = start_broker(
            &self.data_dir,
            self.database_url.clone(),
            &self.clock,
            &self.faults,
            self.commission_basis_points,
        )
        .await?;
        let url = running.url();
        self.admin = self.admin.with_base_url(&url);
        for client in self.lenders.iter_mut().chain(self.borrowers.iter_mut()) {
            *client = client.with_base_url(&url);
        }
        self.running = Some(running);
        Ok(())
    }

    /// Stops the broker for good.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }

    pub async fn register_host(
        &self,
        lender: usize,
        host_id: &str,
        capacity: &HostCapacity,
    ) -> Answer<HostView> {
        let request = RegisterHostRequest {
            share: None,
            agent_url: None,
            capacity: capacity.clone(),
        };
        Ok(self.lenders[lender]
            .register_host(host_id, &request)
            .await?)
    }

    pub async fn put_partition(
        &self,
        lender: usize,
        partition: &PartitionRef,
        terms: &Terms,
    ) -> Answer<PartitionView> {
        let request = RegisterPartitionRequest {
            terms: terms.clone(),
        };
        Ok(self.lenders[lender]
            .register_partition(&partition.host_id, partition.index, &request)
            .await?)
    }

    pub async fn withdraw_partition(
        &self,
        lender: usize,
        partition: &PartitionRef,
    ) -> Answer<PartitionView> {
        Ok(self.lenders[lender]
            .withdraw_partition(&partition.host_id, partition.index)
            .await?)
    }

    pub async fn find(
        &self,
        borrower: usize,
        requirements: &Requirements,
        limit: u32,
    ) -> Answer<FindResponse> {
        Ok(self.borrowers[borrower]
            .find(requirements, Some(limit))
            .await?)
    }

    pub async fn lease(
        &self,
        borrower: usize,
        request: &LeaseRequest,
        idempotency_key: &str,
    ) -> Answer<LeaseView> {
        Ok(self.borrowers[borrower]
            .lease_with_idempotency_key(request, idempotency_key)
            .await?)
    }

    pub async fn release(&self, borrower: usize, lease_id: u64) -> Answer<ReleaseReceipt> {
        Ok(self.borrowers[borrower].release(lease_id).await?)
    }

    /// The borrower's bill: its leases and its balance.
    pub async fn borrower_bill(&self, borrower: usize) -> Answer<BillView> {
        Ok(self.borrowers[borrower].bill().await?)
    }

    /// The borrower's own leases, newest first.
    pub async fn borrower_leases(&self, borrower: usize) -> Answer<Vec<LeaseView>> {
        Ok(self.borrowers[borrower].list_leases().await?)
    }

    pub async fn get_lease(&self, borrower: usize, lease_id: u64) -> Answer<LeaseView> {
        Ok(self.borrowers[borrower].get_lease(lease_id).await?)
    }

    /// Every partition, as the admin sees them.
    pub async fn all_partitions(&self) -> Answer<Vec<PartitionView>> {
        Ok(self.admin.list_partitions().await?)
    }

    /// A page of a host's release notices after `after_seq`, as the admin
    /// (and the host's agent, which pulls them) sees them.
    pub async fn host_revocations(&self, host_id: &str, after_seq: u64) -> Answer<RevocationPage> {
        Ok(self.admin.host_revocations(host_id, after_seq).await?)
    }

    /// The keys the broker publishes for agents to verify with.
    pub async fn broker_keys(&self) -> Answer<Vec<leasehold_api::BrokerPublicKey>> {
        Ok(self.admin.broker_info().await?.keys)
    }

    /// Every host, as the admin sees them.
    pub async fn all_hosts(&self) -> Answer<Vec<HostView>> {
        Ok(self.admin.list_hosts().await?)
    }

    /// The whole ledger's balances, as the admin sees them.
    pub async fn ledger(&self) -> Answer<LedgerView> {
        Ok(self.admin.ledger().await?)
    }

    /// The store, read directly (committed state only).
    pub fn store(&mut self) -> &mut dyn BrokerStore {
        self.store.as_mut()
    }
}

/// The `leasehold` binary runs with umask 077, so SQLite makes the database
/// files 0600 and a restart accepts them; this library runs inside other
/// processes (tests, `leasehold-sim`) whose umask it does not set, so it
/// gives the files the mode that umask would have.
fn make_database_files_private(data_dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let entries =
        std::fs::read_dir(data_dir).map_err(|e| format!("cannot read the data directory: {e}"))?;
    for entry in entries.flatten() {
        let is_database_file = entry.file_name().to_string_lossy().starts_with("broker.db");
        if is_database_file && entry.path().is_file() {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot make {} private: {e}", entry.path().display()))?;
        }
    }
    Ok(())
}

fn open_store(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
) -> Result<Box<dyn BrokerStore>, String> {
    let database = match database_url {
        Some(url) => BrokerDatabase::Postgres(url.to_string()),
        None => BrokerDatabase::Sqlite(data_dir.join("broker.db")),
    };
    leasehold_store::open_broker_store(&database, Durability::Full)
        .map_err(|e| format!("cannot open the broker's store: {e}"))
}

/// One broker incarnation over `data_dir`: durable commits, the simulated
/// clock, and the fault injector around its writer's store.
async fn start_broker(
    data_dir: &std::path::Path,
    database_url: Option<String>,
    clock: &SimulatedClock,
    faults: &FaultControl,
    commission_basis_points: u32,
) -> Result<RunningBroker, String> {
    let incarnation = faults.next_incarnation();
    leasehold_broker::start(BrokerConfig {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().expect("a valid socket address"),
        durability: Durability::Full,
        commission_basis_points,
        key_ttl_ms: leasehold_broker::DEFAULT_KEY_TTL_MS,
        clock: clock.shared(),
        image_store_url: None,
        tls: None,
        client_trust: Default::default(),
        database_url,
        store_layer: Some(faults.layer(incarnation)),
        plan_policy: Default::default(),
        run_planner: false,
        metrics_public: false,
    })
    .await
    .map_err(|e| format!("cannot start the broker: {e}"))
}

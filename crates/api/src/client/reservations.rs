//! The client's calls for seed 003's reservations (see `crate::reservations`).

use super::{ApiError, Client};
use crate::reservations::{
    HostCapacityView, HostSampleAnswer, HostSampleRequest, MigrateRequest, PlanRoundView, PoolList,
    PowerSaveRequest, PowerSaveView, WarningView, WorkloadFile, WorkloadView,
};
use reqwest::Method;

impl Client {
    /// Creates or replaces a workload (`leasehold workload apply`).
    pub async fn apply_workload(&self, file: &WorkloadFile) -> Result<WorkloadView, ApiError> {
        self.send(Method::POST, "/v1/workloads", Some(file), None)
            .await
    }

    pub async fn list_workloads(&self) -> Result<Vec<WorkloadView>, ApiError> {
        self.get("/v1/workloads").await
    }

    pub async fn get_workload(&self, name: &str) -> Result<WorkloadView, ApiError> {
        self.get(&format!("/v1/workloads/{name}")).await
    }

    /// Deletes a workload; its pools give their capacity back (FIG. 16).
    pub async fn delete_workload(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.send::<(), _>(Method::DELETE, &format!("/v1/workloads/{name}"), None, None)
            .await
    }

    /// Deletes one instance of a workload; its pool gives its capacity back.
    pub async fn delete_instance(&self, name: &str) -> Result<serde_json::Value, ApiError> {
        self.send::<(), _>(Method::DELETE, &format!("/v1/instances/{name}"), None, None)
            .await
    }

    /// Moves a placed instance to `to_host` (FIG. 15); the guarantee holds
    /// throughout.
    pub async fn migrate_instance(
        &self,
        name: &str,
        to_host: &str,
    ) -> Result<serde_json::Value, ApiError> {
        let body = MigrateRequest {
            to: to_host.to_string(),
        };
        self.send(
            Method::POST,
            &format!("/v1/instances/{name}/migrate"),
            Some(&body),
            None,
        )
        .await
    }

    /// Drains the least-used host that may go (FIG. 17; admin).
    pub async fn power_save(&self, request: &PowerSaveRequest) -> Result<PowerSaveView, ApiError> {
        self.send(Method::POST, "/v1/power/save", Some(request), None)
            .await
    }

    /// Powers a drained host up again (admin).
    pub async fn power_up(&self, host_id: &str) -> Result<serde_json::Value, ApiError> {
        self.send(
            Method::POST,
            &format!("/v1/power/up/{host_id}"),
            Some(&serde_json::json!({})),
            None,
        )
        .await
    }

    /// The pools (FIG. 3) and the instance → pool links (FIG. 6).
    pub async fn list_pools(&self) -> Result<PoolList, ApiError> {
        self.get("/v1/pools").await
    }

    /// Each host's capacity for pools (FIG. 5).
    pub async fn host_capacity(&self) -> Result<Vec<HostCapacityView>, ApiError> {
        self.get("/v1/host-capacity").await
    }

    /// The early warnings (FIG. 14).
    pub async fn warnings(&self) -> Result<Vec<WarningView>, ApiError> {
        self.get("/v1/warnings").await
    }

    /// Runs a planning round now (admin).
    pub async fn plan_now(&self) -> Result<PlanRoundView, ApiError> {
        self.send(Method::POST, "/v1/plan", Some(&serde_json::json!({})), None)
            .await
    }

    /// An agent's sample of its host's owner usage.
    pub async fn post_host_sample(
        &self,
        host_id: &str,
        sample: &HostSampleRequest,
    ) -> Result<HostSampleAnswer, ApiError> {
        self.send(
            Method::POST,
            &format!("/v1/hosts/{host_id}/samples"),
            Some(sample),
            None,
        )
        .await
    }
}

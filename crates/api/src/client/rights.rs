//! The client's calls for seed 004's usage rights (see `crate::rights`):
//! the broker as the group's store, and an agent as its host's manager.

use super::{ApiError, Client};
use crate::rights::*;
use leasehold_core::rights::ShareGroup;
use reqwest::Method;

impl Client {
    // ---- the broker, as the share group's store ----

    /// The group's table and version; `None` when no such group is stored.
    pub async fn share_group(&self, name: &str) -> Result<Option<ShareGroupDocument>, ApiError> {
        match self.get(&format!("/v1/groups/{name}")).await {
            Ok(document) => Ok(Some(document)),
            Err(error) if error.status() == Some(404) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Compare-and-swap of the group's table: the new version, or `None`
    /// when another writer got there first.
    pub async fn put_share_group(
        &self,
        group: &ShareGroup,
        expected_version: u64,
    ) -> Result<Option<u64>, ApiError> {
        let body = PutShareGroupRequest {
            group: group.clone(),
            expected_version,
        };
        let answer: Result<PutShareGroupAnswer, ApiError> = self
            .send(
                Method::PUT,
                &format!("/v1/groups/{}", group.name),
                Some(&body),
                None,
            )
            .await;
        match answer {
            Ok(answer) => Ok(Some(answer.version)),
            Err(error) if error.code() == Some("version_conflict") => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes or renews one of the group's fenced leases.
    pub async fn acquire_group_lease(
        &self,
        group: &str,
        lease: &str,
        holder: &str,
        ttl_ms: u64,
    ) -> Result<Option<u64>, ApiError> {
        let body = GroupLeaseRequest {
            holder: holder.to_string(),
            ttl_ms,
        };
        let answer: GroupLeaseAnswer = self
            .send(
                Method::POST,
                &format!("/v1/groups/{group}/leases/{lease}"),
                Some(&body),
                None,
            )
            .await?;
        Ok(answer.epoch)
    }

    /// Who held one of the group's fenced leases last, until when; `None`
    /// when it was never taken.
    pub async fn group_lease_holder(
        &self,
        group: &str,
        lease: &str,
    ) -> Result<Option<GroupLeaseHolder>, ApiError> {
        match self
            .get(&format!("/v1/groups/{group}/leases/{lease}"))
            .await
        {
            Ok(holder) => Ok(Some(holder)),
            Err(error) if error.status() == Some(404) => Ok(None),
            Err(error) => Err(error),
        }
    }

    // ---- an agent, as its host's rights manager ----

    /// The share group's usage-rights table (seed 004) from a managing agent.
    pub async fn agent_rights(&self) -> Result<ShareGroupDocument, ApiError> {
        self.get("/v1/rights").await
    }

    pub async fn agent_rights_request(
        &self,
        body: &RightsRequestBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/rights/request", Some(body), None)
            .await
    }

    pub async fn agent_rights_release(
        &self,
        body: &RightsSlotBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/rights/release", Some(body), None)
            .await
    }

    pub async fn agent_rights_transfer(
        &self,
        body: &RightsTransferBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/rights/transfer", Some(body), None)
            .await
    }

    pub async fn agent_rights_grant(
        &self,
        body: &RightsGrantBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/rights/grant", Some(body), None)
            .await
    }

    pub async fn agent_rights_revoke(
        &self,
        body: &RightsSlotBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/rights/revoke", Some(body), None)
            .await
    }

    /// Asks a manager to apply the table at `min_version` or later to its
    /// host (a donor confirming its modules are off, a requester switching
    /// its new ones on).
    pub async fn agent_rights_sync(&self, min_version: u64) -> Result<RightsSyncAnswer, ApiError> {
        self.send::<(), _>(
            Method::POST,
            &format!("/v1/rights/sync?min_version={min_version}"),
            None,
            None,
        )
        .await
    }

    pub async fn agent_group_add(
        &self,
        body: &GroupAddBody,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send(Method::POST, "/v1/group/hosts", Some(body), None)
            .await
    }

    pub async fn agent_group_remove(
        &self,
        host_id: &str,
        hand_over: bool,
    ) -> Result<RightsOrderAnswer, ApiError> {
        self.send::<(), _>(
            Method::DELETE,
            &format!("/v1/group/hosts/{host_id}?hand_over={hand_over}"),
            None,
            None,
        )
        .await
    }
}

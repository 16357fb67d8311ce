//! The agent's error enum and its one mapping to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use leasehold_core::key::KeyRejection;
use leasehold_core::FieldError;
use leasehold_service::ErrorResponse;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("missing or wrong token: the lender interface needs this host's lender token")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("partition {index} is locked while leased (lease {lease_id}); alter or withdraw it after the lease is released")]
    Locked { index: u32, lease_id: u64 },
    #[error("{0}")]
    KeyRejected(KeyRejection),
    #[error("the broker refused: {0}")]
    BrokerRefused(leasehold_api::ApiError),
    #[error("the broker is unreachable: {0}")]
    BrokerUnreachable(leasehold_api::ApiError),
    #[error("{0}")]
    Driver(#[from] crate::driver::DriverError),
    #[error("storage failed: {0}")]
    Store(#[from] leasehold_store::StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("{0}")]
    Forbidden(String),
    /// Not enough rights, a transfer that ended the other way, or an order
    /// from a primary whose epoch has passed.
    #[error("{0}")]
    RightsConflict(String),
    /// The share group's store or another manager cannot be reached.
    #[error("the share group cannot be reached: {0}")]
    GroupUnreachable(String),
    /// Direct lending: the partition named is leased already.
    #[error("{0}")]
    Conflict(String),
    /// Direct lending: no free partition meets the requirements.
    #[error("{0}")]
    NoMatch(String),
    /// A bad `--owner-load` trace, or one on a driver that cannot use it:
    /// the agent does not start.
    #[error(transparent)]
    OwnerLoad(#[from] crate::owner_load::OwnerLoadError),
}

impl From<FieldError> for AgentError {
    fn from(value: FieldError) -> Self {
        AgentError::Invalid(value)
    }
}

impl From<leasehold_core::rights::RightsRefusal> for AgentError {
    /// A rights decision of core, in the agent's words.
    fn from(refusal: leasehold_core::rights::RightsRefusal) -> Self {
        use leasehold_core::rights::RightsRefusal;
        match refusal {
            RightsRefusal::Invalid(field) => AgentError::Invalid(field),
            RightsRefusal::NoSuchSlot(slot) => AgentError::NotFound(format!(
                "no partition {slot} in the share group (0 is a host's owner share)"
            )),
            RightsRefusal::NotEnough { wanted, available } => AgentError::RightsConflict(format!(
                "the group has {available} spare rights, {wanted} were asked for"
            )),
            RightsRefusal::NoSuchTransfer(id) => {
                AgentError::NotFound(format!("no transfer {id} in the share group"))
            }
            RightsRefusal::StaleEpoch { epoch, current } => AgentError::RightsConflict(format!(
                "an order of the primary's epoch {epoch} is refused: the group's primary is at epoch {current}"
            )),
            RightsRefusal::TransferEnded { transfer_id, phase } => AgentError::RightsConflict(
                format!("transfer {transfer_id} ended already ({phase:?})"),
            ),
            RightsRefusal::Forbidden(message) => AgentError::Forbidden(message),
        }
    }
}

impl From<leasehold_api::ApiError> for AgentError {
    fn from(error: leasehold_api::ApiError) -> Self {
        match error {
            leasehold_api::ApiError::Status { .. } => AgentError::BrokerRefused(error),
            other => AgentError::BrokerUnreachable(other),
        }
    }
}

impl AgentError {
    /// The one place where agent errors become HTTP statuses and codes.
    pub fn to_error_response(&self) -> ErrorResponse {
        let message = self.to_string();
        match self {
            AgentError::Unauthorized => {
                ErrorResponse::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
            AgentError::NotFound(_) => {
                ErrorResponse::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            AgentError::Invalid(field) => ErrorResponse::invalid_field(field),
            AgentError::Locked { .. } => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_locked", message)
            }
            AgentError::KeyRejected(rejection) => {
                let mut response =
                    ErrorResponse::new(StatusCode::FORBIDDEN, "key_rejected", message);
                response.detail.key_rejection = Some(rejection.clone());
                response
            }
            AgentError::BrokerRefused(inner) => {
                // Pass the broker's status and code through: the caller gets
                // the same answer as if it had asked the broker itself.
                let status = inner
                    .status()
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                let mut response =
                    ErrorResponse::new(status, inner.code().unwrap_or("broker_refused"), message);
                response.detail.field = inner.detail().and_then(|d| d.field.clone());
                response
            }
            AgentError::Forbidden(_) => {
                ErrorResponse::new(StatusCode::FORBIDDEN, "forbidden", message)
            }
            AgentError::Conflict(_) => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_leased", message)
            }
            AgentError::NoMatch(_) => ErrorResponse::new(StatusCode::CONFLICT, "no_match", message),
            AgentError::RightsConflict(_) => {
                ErrorResponse::new(StatusCode::CONFLICT, "rights_conflict", message)
            }
            AgentError::GroupUnreachable(_) => ErrorResponse::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "group_unreachable",
                message,
            ),
            AgentError::BrokerUnreachable(_) => {
                ErrorResponse::new(StatusCode::BAD_GATEWAY, "broker_unreachable", message)
            }
            AgentError::Driver(crate::driver::DriverError::UnknownImage(_)) => {
                ErrorResponse::new(StatusCode::BAD_REQUEST, "unknown_image", message)
                    .with_field("image")
            }
            AgentError::Driver(crate::driver::DriverError::Image(_)) => {
                ErrorResponse::new(StatusCode::BAD_GATEWAY, "image_unavailable", message)
            }
            AgentError::Driver(_)
            | AgentError::Store(_)
            | AgentError::Internal(_)
            | AgentError::OwnerLoad(_) => {
                ErrorResponse::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        self.to_error_response().into_response()
    }
}

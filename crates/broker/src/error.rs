//! The broker's error enum and its one mapping to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use leasehold_core::command::Refusal;
use leasehold_core::matching::NoMatchExplanation;
use leasehold_core::{FieldError, LeaseId, PartitionRef};
use leasehold_service::ErrorResponse;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("missing or unknown token: send 'Authorization: Bearer TOKEN'")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(FieldError),
    #[error("partition {partition} is leased (lease {lease_id}); try another partition")]
    Conflict {
        partition: PartitionRef,
        lease_id: LeaseId,
    },
    #[error("partition {partition} is locked while leased (lease {lease_id}); alter or withdraw it after the lease is released")]
    Locked {
        partition: PartitionRef,
        lease_id: LeaseId,
    },
    #[error(
        "partition {partition} is booked from {from_ms} ms (a reservation); try another partition"
    )]
    Booked {
        partition: PartitionRef,
        from_ms: u64,
    },
    #[error("partition {0} was withdrawn by its lender")]
    Withdrawn(PartitionRef),
    #[error("no free partition meets the requirements{}", share_reasons(.0))]
    NoMatch(Box<NoMatchExplanation>),
    #[error("{0}")]
    AlreadyExists(String),
    /// A compare-and-swap named a version that is not the stored one.
    #[error("{0}")]
    VersionConflict(String),
    #[error("host '{host_id}' is registered by another lender; choose another host id")]
    HostOwnedByAnotherLender { host_id: String },
    #[error("the broker is shutting down or its writer stopped")]
    Unavailable,
    /// Another broker of this database is the active one (issue 11).
    #[error("this broker is a standby, not the active broker of its database{}", match .0 { Some(url) => format!("; the active broker is at {url}"), None => "; try another broker address".to_string() })]
    NotActive(Option<String>),
    #[error("{0}")]
    ImageStore(String),
    #[error("storage failed: {0}")]
    Store(#[from] leasehold_store::StoreError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<FieldError> for BrokerError {
    fn from(value: FieldError) -> Self {
        BrokerError::Invalid(value)
    }
}

impl BrokerError {
    /// The one place where broker errors become HTTP statuses and codes.
    pub fn to_error_response(&self) -> ErrorResponse {
        let message = self.to_string();
        match self {
            BrokerError::Unauthorized => {
                ErrorResponse::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
            BrokerError::Forbidden(_) => {
                ErrorResponse::new(StatusCode::FORBIDDEN, "forbidden", message)
            }
            BrokerError::NotFound(_) => {
                ErrorResponse::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            BrokerError::Invalid(field) => ErrorResponse::invalid_field(field),
            BrokerError::Conflict { .. } => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_taken", message)
            }
            BrokerError::Locked { .. } => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_locked", message)
            }
            BrokerError::Booked { .. } => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_booked", message)
            }
            BrokerError::Withdrawn(_) => {
                ErrorResponse::new(StatusCode::CONFLICT, "partition_withdrawn", message)
            }
            BrokerError::NoMatch(explanation) => {
                let mut response = ErrorResponse::new(StatusCode::CONFLICT, "no_match", message);
                response.detail.explanation = Some((**explanation).clone());
                response
            }
            BrokerError::VersionConflict(_) => {
                ErrorResponse::new(StatusCode::CONFLICT, "version_conflict", message)
            }
            BrokerError::AlreadyExists(_) => {
                ErrorResponse::new(StatusCode::CONFLICT, "already_exists", message)
            }
            BrokerError::HostOwnedByAnotherLender { .. } => ErrorResponse::new(
                StatusCode::CONFLICT,
                "host_owned_by_another_lender",
                message,
            ),
            BrokerError::Unavailable => {
                ErrorResponse::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
            }
            BrokerError::NotActive(_) => {
                ErrorResponse::new(StatusCode::SERVICE_UNAVAILABLE, "standby", message)
            }
            BrokerError::ImageStore(_) => {
                ErrorResponse::new(StatusCode::BAD_GATEWAY, "image_store_failed", message)
            }
            BrokerError::Store(_) | BrokerError::Internal(_) => {
                ErrorResponse::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
            }
        }
    }
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        self.to_error_response().into_response()
    }
}

impl From<leasehold_core::rights::RightsRefusal> for BrokerError {
    fn from(refusal: leasehold_core::rights::RightsRefusal) -> Self {
        use leasehold_core::rights::RightsRefusal;
        match refusal {
            RightsRefusal::Invalid(field) => BrokerError::Invalid(field),
            RightsRefusal::Forbidden(message) => BrokerError::Forbidden(message),
            other => BrokerError::Invalid(FieldError::new("group", format!("{other:?}"))),
        }
    }
}

impl From<Refusal> for BrokerError {
    /// A refusal decided in core, in the broker's words (and so, through
    /// [`BrokerError::to_error_response`], its status).
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Invalid(field) => BrokerError::Invalid(field),
            Refusal::PrincipalExists { name } => {
                BrokerError::AlreadyExists(format!("a principal named '{name}' exists already"))
            }
            Refusal::NoSuchHost => BrokerError::NotFound("no such host is registered".into()),
            Refusal::NoSuchPartition(partition) => {
                BrokerError::NotFound(format!("no partition {partition} is registered"))
            }
            Refusal::HostOwnedByAnotherLender { host_id } => {
                BrokerError::HostOwnedByAnotherLender { host_id }
            }
            Refusal::Locked {
                partition,
                lease_id,
            } => BrokerError::Locked {
                partition,
                lease_id,
            },
            Refusal::Conflict {
                partition,
                lease_id,
            } => BrokerError::Conflict {
                partition,
                lease_id,
            },
            Refusal::Withdrawn(partition) => BrokerError::Withdrawn(partition),
            Refusal::Booked {
                partition,
                existing,
            } => BrokerError::Booked {
                partition,
                from_ms: existing.from_ms,
            },
            Refusal::Unisolated(partition) => unisolated_refusal(&partition),
            Refusal::NoMatch(explanation) => BrokerError::NoMatch(explanation),
            // The one answer for a lease id the caller cannot see, whether it
            // exists or not: the same body, which names no id.
            Refusal::NoSuchLease | Refusal::LeaseNotActive { .. } => {
                BrokerError::NotFound("no such lease".to_string())
            }
            Refusal::NotTheBorrower { lease_id } => BrokerError::Forbidden(format!(
                "only the borrower of lease {lease_id} may release it"
            )),
            Refusal::NoSuchWorkload { name } => {
                BrokerError::NotFound(format!("no workload named '{name}' (of yours)"))
            }
            Refusal::NoSuchInstance { name } => {
                BrokerError::NotFound(format!("no instance named '{name}' (of yours)"))
            }
            Refusal::WorkloadOwnedByAnother { name } => BrokerError::AlreadyExists(format!(
                "a workload named '{name}' belongs to another principal; choose another name"
            )),
            Refusal::Internal(message) => BrokerError::Internal(message),
        }
    }
}

/// The refusal of an unisolated partition to a borrower who did not opt
/// in: it names the field and how to opt in.
fn unisolated_refusal(partition: &PartitionRef) -> BrokerError {
    BrokerError::Invalid(FieldError::new(
        "allow_unisolated",
        format!(
            "partition {partition} is unisolated (its jobs run as plain processes of the host, which see its files); \
             lease it only if you trust the host: send allow_unisolated: true (leasehold lease --allow-unisolated)"
        ),
    ))
}

/// The shares' reasons, for the message: what a borrower asking a share
/// market for a size needs to read first.
fn share_reasons(explanation: &NoMatchExplanation) -> String {
    explanation
        .shares
        .iter()
        .map(|miss| {
            format!(
                "; the share of host '{}' cannot carve it: {}",
                miss.host_id, miss.reason
            )
        })
        .collect()
}

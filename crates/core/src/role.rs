//! Who a principal is to the broker. Parsed here and nowhere else: the
//! wire (serde), the database rows and the command line all go through
//! [`Role::from_str`] or serde's identical names.

use serde::{Deserialize, Serialize};
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Lends its own hosts' partitions.
    Lender,
    /// Finds, leases, runs jobs on and releases its own leases.
    Borrower,
    /// Makes principals and sees everything, never a lease key.
    Admin,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Lender, Role::Borrower, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lender => "lender",
            Role::Borrower => "borrower",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The refusal of a text that names no role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{0}' is not a role: use lender, borrower or admin")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| UnknownRole(text.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_parses_back_from_its_name_and_its_json() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
        }
        assert_eq!(
            "root".parse::<Role>().unwrap_err().to_string(),
            "'root' is not a role: use lender, borrower or admin"
        );
    }
}

use std::fmt;

/// A problem with one field of a request: which field, and what is wrong.
///
/// Every validation in core returns this so that the HTTP layer can answer
/// with a 4xx naming the field, and nothing is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub problem: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// The error enum of the core crate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CoreError {
    #[error("invalid {0}")]
    Invalid(FieldError),
    #[error("lease key rejected: {0}")]
    KeyRejected(crate::key::KeyRejection),
    #[error("arithmetic overflow while computing {0}")]
    Overflow(&'static str),
}

impl From<FieldError> for CoreError {
    fn from(value: FieldError) -> Self {
        CoreError::Invalid(value)
    }
}

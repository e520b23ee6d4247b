//! Errors as data (FHIR R4 http.html, operationoutcome.html): one kind table maps every
//! failure to its HTTP status and OperationOutcome `issue.code`.

use serde_json::{Value, json};

/// What went wrong, in the words a client needs. The HTTP status and the OperationOutcome
/// issue code come from [`ErrorKind::status`] and [`ErrorKind::issue_code`], nowhere else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Malformed request: bad JSON, bad parameter, bad id.
    Invalid,
    /// Unknown resource type, or unknown id.
    NotFound,
    /// The resource existed and was deleted.
    Gone,
    /// The method is not allowed on this URL.
    MethodNotAllowed,
    /// Version conflict detected without a precondition (e.g. concurrent write race).
    Conflict,
    /// A precondition (If-Match, conditional match count) failed.
    PreconditionFailed,
    /// Body larger than the configured limit.
    TooLarge,
    /// Content-Type the server does not read.
    UnsupportedMediaType,
    /// Accept / _format the server cannot produce.
    NotAcceptable,
    /// The resource parsed but failed validation.
    Unprocessable,
    /// Interaction or feature the server does not offer.
    NotSupported,
    /// Database unavailable or overloaded.
    Unavailable,
    /// No valid access token (`--auth smart`): 401 with `WWW-Authenticate: Bearer`.
    Unauthorized,
    /// A valid token whose scopes do not allow the interaction.
    Forbidden,
    /// A bug. Details are logged, never sent.
    Internal,
}

impl ErrorKind {
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::Invalid => 400,
            ErrorKind::NotFound => 404,
            ErrorKind::Gone => 410,
            ErrorKind::MethodNotAllowed => 405,
            ErrorKind::Conflict => 409,
            ErrorKind::PreconditionFailed => 412,
            ErrorKind::TooLarge => 413,
            ErrorKind::UnsupportedMediaType => 415,
            ErrorKind::NotAcceptable => 406,
            ErrorKind::Unprocessable => 422,
            ErrorKind::NotSupported => 400,
            ErrorKind::Unavailable => 503,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::Internal => 500,
        }
    }

    /// FHIR `IssueType` code (http://hl7.org/fhir/issue-type).
    pub fn issue_code(self) -> &'static str {
        match self {
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotFound => "not-found",
            ErrorKind::Gone => "deleted",
            ErrorKind::MethodNotAllowed => "not-supported",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PreconditionFailed => "conflict",
            ErrorKind::TooLarge => "too-costly",
            ErrorKind::UnsupportedMediaType => "not-supported",
            ErrorKind::NotAcceptable => "not-supported",
            ErrorKind::Unprocessable => "processing",
            ErrorKind::NotSupported => "not-supported",
            ErrorKind::Unavailable => "transient",
            ErrorKind::Unauthorized => "login",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Internal => "exception",
        }
    }
}

/// One OperationOutcome issue.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: &'static str,
    pub code: &'static str,
    pub diagnostics: String,
    /// FHIRPath locations (`Patient.gender`), empty when the issue is not about an element.
    pub expression: Vec<String>,
}

/// The error type of the request layers above the store.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{kind:?}: {}", .issues.first().map(|i| i.diagnostics.as_str()).unwrap_or(""))]
pub struct FhirError {
    pub kind: ErrorKind,
    pub issues: Vec<Issue>,
}

pub type Result<T, E = FhirError> = std::result::Result<T, E>;

impl FhirError {
    pub fn new(kind: ErrorKind, diagnostics: impl Into<String>) -> Self {
        FhirError {
            kind,
            issues: vec![Issue {
                severity: "error",
                code: kind.issue_code(),
                diagnostics: diagnostics.into(),
                expression: Vec::new(),
            }],
        }
    }

    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(issue) = self.issues.first_mut() {
            issue.expression.push(expression.into());
        }
        self
    }

    pub fn invalid(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, d)
    }
    pub fn precondition(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::PreconditionFailed, d)
    }
    pub fn not_supported(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSupported, d)
    }
    pub fn conflict(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::Conflict, d)
    }
    pub fn internal(d: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, d)
    }

    pub fn status(&self) -> u16 {
        self.kind.status()
    }

    /// Every issue's diagnostics, joined with `; ` (for logs, ACKs and dead letters).
    pub fn diagnostics(&self) -> String {
        self.issues
            .iter()
            .map(|i| i.diagnostics.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The OperationOutcome sent to the client. For `Internal` the diagnostics were logged
    /// where the error arose; the client sees a generic text without internals.
    pub fn to_operation_outcome(&self) -> Value {
        if self.kind == ErrorKind::Internal {
            return operation_outcome(&[Issue {
                severity: "fatal",
                code: "exception",
                diagnostics: "internal server error; details are in the server log".into(),
                expression: Vec::new(),
            }]);
        }
        operation_outcome(&self.issues)
    }
}

pub fn operation_outcome(issues: &[Issue]) -> Value {
    let issues: Vec<Value> = issues
        .iter()
        .map(|i| {
            let mut v = json!({ "severity": i.severity, "code": i.code });
            if !i.diagnostics.is_empty() {
                v["diagnostics"] = Value::String(i.diagnostics.clone());
            }
            if !i.expression.is_empty() {
                v["expression"] = json!(i.expression);
            }
            v
        })
        .collect();
    json!({ "resourceType": "OperationOutcome", "issue": issues })
}

/// An informational OperationOutcome (e.g. for `Prefer: return=OperationOutcome`).
pub fn information(diagnostics: impl Into<String>) -> Value {
    operation_outcome(&[Issue {
        severity: "information",
        code: "informational",
        diagnostics: diagnostics.into(),
        expression: Vec::new(),
    }])
}

impl From<sqlx::Error> for FhirError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                tracing::warn!(error = %e, "database unavailable");
                FhirError::new(ErrorKind::Unavailable, "database unavailable, retry later")
            }
            // PostgreSQL `deadlock_detected` / `serialization_failure`: this transaction was
            // chosen to give way to another; retrying it succeeds.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("40P01" | "40001")) =>
            {
                tracing::warn!(error = %e, "transaction aborted to resolve a conflict");
                FhirError::new(
                    ErrorKind::Unavailable,
                    "the database aborted this transaction to resolve a conflict with another; retry",
                )
            }
            // PostgreSQL `out_of_memory`, in practice its shared lock table full (advisory
            // locks of concurrent large jobs; see `store::resource::Gate`): transient.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("53200") => {
                tracing::warn!(error = %e, "PostgreSQL out of shared memory");
                FhirError::new(
                    ErrorKind::Unavailable,
                    "the database ran out of lock space (PostgreSQL max_locks_per_transaction); retry later",
                )
            }
            // PostgreSQL `unique_violation`: two transactions created the same row at once
            // (a race the losing request can retry), not a fault of the server.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                tracing::warn!(error = %e, "concurrent write conflict");
                FhirError::new(
                    ErrorKind::Conflict,
                    "another request wrote the same resource at the same time; retry",
                )
            }
            // PostgreSQL `program_limit_exceeded`: in practice a search-index value larger
            // than a B-tree entry may be (about 2,700 bytes after compression). The input's
            // fault, so a 422 that says so rather than a 500.
            sqlx::Error::Database(db) if db.code().as_deref() == Some("54000") => {
                tracing::warn!(error = %e, "value too large for a PostgreSQL index");
                FhirError::new(
                    ErrorKind::Unprocessable,
                    "a value in this resource is too long to be indexed for search: PostgreSQL \
                     indexes at most about 2,700 bytes per value (identifiers, codes, strings)",
                )
            }
            _ => {
                tracing::error!(error = %e, "database error");
                FhirError::internal(e.to_string())
            }
        }
    }
}

#[cfg(test)]
mod database_error_tests {
    use super::*;

    /// A database error with only a SQLSTATE, as a driver would report it.
    #[derive(Debug)]
    struct Sqlstate(&'static str);

    impl std::fmt::Display for Sqlstate {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "SQLSTATE {}", self.0)
        }
    }

    impl std::error::Error for Sqlstate {}

    impl sqlx::error::DatabaseError for Sqlstate {
        fn message(&self) -> &str {
            "test"
        }
        fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
            Some(self.0.into())
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn status(code: &'static str) -> u16 {
        FhirError::from(sqlx::Error::Database(Box::new(Sqlstate(code)))).status()
    }

    #[test]
    fn database_errors_caused_by_input_or_races_are_not_500() {
        assert_eq!(status("54000"), 422); // value too large for a B-tree entry
        assert_eq!(status("23505"), 409); // unique violation: a concurrent create won
        assert_eq!(status("40P01"), 503); // deadlock victim: retry
        assert_eq!(status("40001"), 503); // serialization failure: retry
        assert_eq!(status("53200"), 503); // lock table full: retry
        assert_eq!(status("42601"), 500); // a syntax error is our bug
        assert_eq!(FhirError::from(sqlx::Error::PoolTimedOut).status(), 503);
    }
}

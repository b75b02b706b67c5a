//! One HTTP error type. Every failure becomes a status and a JSON body that says what was
//! wrong; internal failures are logged and answered with a generic message, never with
//! the details of the machine. The body has the OpenAI shape (`{"error": {"message",
//! "type", "param", "code"}}`), which both APIs use so that one client handles both.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use lathe_jobs::{ErrorKind, JobError};
use lathe_store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid API token: send `Authorization: Bearer lathe_…`")]
    Unauthorized,
    /// Authenticated, but the token's role does not allow it.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("internal error")]
    Internal(String),
    /// A service the server depends on (the object store) does not answer; the request
    /// may succeed later.
    #[error("{0}")]
    Unavailable(String),
    /// A request field at fault, named in the body's `param` (and `code`), as the OpenAI
    /// API names them.
    #[error("{message}")]
    Field { status: StatusCode, message: String, param: &'static str, code: Option<&'static str> },
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        Self::BadRequest(message.into())
    }

    pub fn field(status: StatusCode, message: String, param: &'static str, code: Option<&'static str>) -> Self {
        Self::Field { status, message, param, code }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::NotFound(format!("no {what} `{id}`"))
    }

    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Field { status, .. } => *status,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::Forbidden(_) => "permission_error",
            Self::NotFound(_) => "not_found_error",
            Self::Conflict(_) => "conflict_error",
            Self::TooLarge(_) => "invalid_request_error",
            Self::Internal(_) | Self::Unavailable(_) => "server_error",
            Self::Field { .. } => "invalid_request_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!("internal error: {detail}");
            eprintln!("lathe serve: internal error: {detail}");
        }
        let (param, code) = match &self {
            Self::Field { param, code, .. } => (Some(*param), *code),
            _ => (None, None),
        };
        let body = serde_json::json!({
            "error": {"message": self.to_string(), "type": self.kind(), "param": param, "code": code}
        });
        (self.status(), Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound { .. } => Self::NotFound(e.to_string()),
            StoreError::Conflict(m) => Self::Conflict(m),
            StoreError::Invalid(_) => Self::BadRequest(e.to_string()),
            StoreError::ObjectStore { .. } => Self::Unavailable(format!("the artifact store is unavailable, try again later: {e}")),
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e.kind() {
            ErrorKind::Invalid => Self::BadRequest(e.to_string()),
            ErrorKind::NotFound => Self::NotFound(e.to_string()),
            ErrorKind::Cancelled => Self::Conflict(e.to_string()),
            ErrorKind::Internal => Self::Internal(e.to_string()),
        }
    }
}

impl From<std::io::Error> for ApiError {
    fn from(e: std::io::Error) -> Self {
        Self::Internal(e.to_string())
    }
}

//! The API's error convention: every failure is an HTTP status plus the JSON
//! body `{"error": "<message naming what is wrong>"}` (COMPAT.md).

use warp::http::StatusCode;
use warp::reply::Response;

/// An API failure: the status to answer with and a message that names the
/// field, id or state that is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (400, 404, 405, 409, 413, 415, 503, ...).
    pub status: StatusCode,
    /// Human-readable message, sent as `{"error": message}`.
    pub message: String,
}

impl ApiError {
    /// An error with an explicit status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400: the request itself is invalid (bad JSON, wrong type, unknown field).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: an unknown DUT, PDU, port or route.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    /// 409: a valid request that clashes with the current state.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    /// 413: the body is over the size limit.
    pub fn payload_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body is larger than the limit of {limit} bytes"),
        )
    }

    /// 415: the body has a content type the endpoint does not take.
    pub fn unsupported_media_type(got: &str, expected: &str) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("Unsupported content type '{got}': expected {expected}"),
        )
    }

    /// 405: the path exists but not with this method.
    pub fn method_not_allowed(method: &str, path: &str, allowed: &[&str]) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "Method {method} is not allowed on {path}; allowed: {}",
                allowed.join(", ")
            ),
        )
    }

    /// The JSON response for this error.
    pub fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.message });
        let mut resp = Response::new(body.to_string().into());
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            warp::http::header::CONTENT_TYPE,
            warp::http::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl warp::reject::Reject for ApiError {}

//! The API's one error type and its one mapping to HTTP: every failure, including the
//! framework's own 404/405/413/415 and JSON rejections, leaves as
//! `{"error": {"code", "message", "field"?, "requestId"}}`.
//!
//! 5xx bodies are generic; the cause is logged once here, with the request id.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware for the whole request.
    pub static REQUEST_ID: String;
}

/// The current request's id (`req_unknown` outside a request, which only tests see).
pub fn current_request_id() -> String {
    REQUEST_ID
        .try_with(Clone::clone)
        .unwrap_or_else(|_| "req_unknown".to_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The body is not JSON at all.
    #[error("{0}")]
    MalformedJson(String),
    /// The body has a field the call does not know.
    #[error("unknown field {0:?}")]
    UnknownField(String),
    #[error("missing or invalid API key")]
    Unauthorized(&'static str),
    #[error("{0}")]
    NotFound(&'static str),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body (or an event's `data`) is over its cap; the text says which.
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// Well-formed but unacceptable input: 422 with a stable code and, where one field
    /// is at fault, its name.
    #[error("{message}")]
    Validation {
        code: &'static str,
        message: String,
        field: Option<String>,
    },
    /// The request is valid but the resource's state forbids it now.
    #[error("{message}")]
    Conflict {
        code: &'static str,
        message: &'static str,
    },
    #[error("rate limit exceeded")]
    RateLimited { retry_after_s: u64 },
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// Anything we did not expect. The text is logged, never sent.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn validation(code: &'static str, message: impl Into<String>, field: &str) -> Self {
        ApiError::Validation {
            code,
            message: message.into(),
            field: Some(field.to_owned()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::MalformedJson(_) | ApiError::UnknownField(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Validation { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn body(&self) -> ErrorDetail {
        let (code, message, field) = match self {
            ApiError::MalformedJson(detail) => (
                "malformed_json",
                format!("request body is not valid JSON: {detail}"),
                None,
            ),
            ApiError::UnknownField(name) => (
                "unknown_field",
                format!("unknown field {name:?}"),
                Some(name.clone()),
            ),
            ApiError::Unauthorized(why) => ("unauthorized", (*why).to_owned(), None),
            ApiError::NotFound(what) => ("not_found", (*what).to_owned(), None),
            ApiError::MethodNotAllowed => (
                "method_not_allowed",
                "this method is not allowed on this path".to_owned(),
                None,
            ),
            ApiError::PayloadTooLarge(what) => ("payload_too_large", what.clone(), None),
            ApiError::UnsupportedMediaType => (
                "unsupported_media_type",
                "request body must be JSON (Content-Type: application/json)".to_owned(),
                None,
            ),
            ApiError::Validation {
                code,
                message,
                field,
            } => (*code, message.clone(), field.clone()),
            ApiError::Conflict { code, message } => (*code, (*message).to_owned(), None),
            ApiError::RateLimited { retry_after_s } => (
                "rate_limited",
                format!("too many requests; retry after {retry_after_s} s"),
                None,
            ),
            ApiError::Unavailable(_) => (
                "unavailable",
                "the service is not ready; try again shortly".to_owned(),
                None,
            ),
            ApiError::Internal(_) => (
                "internal_error",
                "an internal error occurred; quote the requestId when reporting it".to_owned(),
                None,
            ),
        };
        ErrorDetail {
            code: code.to_owned(),
            message,
            field,
            request_id: current_request_id(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::LimitReached => ApiError::Validation {
                code: "webhook_limit_reached",
                message:
                    "this organization already has the maximum of 10 webhooks in this environment"
                        .to_owned(),
                field: None,
            },
            StoreError::NotFound => ApiError::NotFound("not found"),
            other => ApiError::Internal(error_chain(&other)),
        }
    }
}

/// `error: cause: cause` for logs.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The JSON error envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    /// Stable, machine-readable: `invalid_url`, `unsafe_url`, `unknown_event_type`,
    /// `webhook_limit_reached`, `unknown_field`, `not_found`, ...
    pub code: String,
    pub message: String,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub request_id: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(request_id = %current_request_id(), error = %self, "request failed");
        }
        let mut response = (status, axum::Json(ErrorBody { error: self.body() })).into_response();
        if let ApiError::RateLimited { retry_after_s } = self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        }
        response
    }
}

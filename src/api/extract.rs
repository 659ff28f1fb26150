//! Extractors that turn requests into typed, checked values, with every rejection
//! expressed as an [`ApiError`].

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, header};
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::ApiError;
use crate::domain::apikey::constant_time_eq;
use crate::store::Tenant;

/// A JSON body: `Content-Type: application/json` (else 415), within the body cap (else
/// 413), well-formed (else 400 `malformed_json`), no unknown fields (else 400
/// `unknown_field` naming it), fields of the right type (else 422 naming the field).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if !is_json(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(
                    "the request body is larger than this call accepts (1 MiB for management calls)"
                        .to_owned(),
                )
            } else {
                ApiError::MalformedJson("the body could not be read".to_owned())
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// Deserialises `bytes`, mapping serde's errors onto the API's error codes. The syntax
/// is checked first, so a body that is not JSON at all is a 400 even when it starts like
/// a valid object; bodies must be objects (serde would otherwise accept an array for a
/// struct, field by position).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::Validation {
            code: "invalid_field",
            message: "the request body must be a JSON object".to_owned(),
            field: None,
        });
    }
    // From the bytes, not from a parsed value, so fields can keep their exact text
    // (`RawValue`: an event's `data` is delivered byte for byte).
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        json_error(&path, &inner)
    })
}

fn json_error(path: &str, err: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof | Category::Io => ApiError::MalformedJson(err.to_string()),
        Category::Data => {
            let text = err.to_string();
            // serde's messages: "unknown field `x`, expected ..." / "missing field `x`".
            let quoted = text.split('`').nth(1).map(str::to_owned);
            // The path names the field at fault; for an unknown field it already ends
            // with that field's name, for a missing one it names the enclosing object.
            let at = |name: Option<String>| -> Option<String> {
                match (path, name) {
                    (".", Some(n)) | ("", Some(n)) => Some(n),
                    (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => Some(p.to_owned()),
                    (p, Some(n)) => Some(format!("{p}.{n}")),
                    (".", None) | ("", None) => None,
                    (p, None) => Some(p.to_owned()),
                }
            };
            if text.starts_with("unknown field") {
                ApiError::UnknownField(at(quoted).unwrap_or_default())
            } else if text.starts_with("missing field") {
                let field = at(quoted);
                ApiError::Validation {
                    code: "missing_field",
                    message: format!("{} is required", field.as_deref().unwrap_or("a field")),
                    field,
                }
            } else {
                let field = at(None);
                let message = strip_position(&text);
                ApiError::Validation {
                    code: "invalid_field",
                    message: match &field {
                        Some(f) => format!("{f}: {message}"),
                        None => format!("request body: {message}"),
                    },
                    field,
                }
            }
        }
    }
}

/// serde_json appends " at line 1 column 23"; the field name says more.
fn strip_position(text: &str) -> &str {
    text.rfind(" at line ").map_or(text, |i| &text[..i])
}

/// The bearer token of a request, if it has a well-formed `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    /// Set by the authentication middleware on customer routes; its absence means the
    /// route was mounted without it, which must fail closed.
    async fn from_request_parts(parts: &mut Parts, _: &AppState) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Tenant>()
            .copied()
            .ok_or(ApiError::Unauthorized("missing or invalid API key"))
    }
}

/// Proof that the request carried the platform's admin token.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(expected) = state.settings.admin_token.as_ref().map(|t| t.expose()) else {
            return Err(ApiError::Unauthorized(
                "the admin API is disabled: no admin token is configured (VIGNETIM_ADMIN_TOKEN)",
            ));
        };
        match bearer(&parts.headers) {
            Some(given) if constant_time_eq(given, expected) => Ok(Admin),
            _ => Err(ApiError::Unauthorized("missing or invalid admin token")),
        }
    }
}

/// Parses a path id; a malformed id is answered exactly like a missing resource.
pub fn path_id<T: std::str::FromStr>(raw: &str, what: &'static str) -> Result<T, ApiError> {
    raw.parse().map_err(|_| ApiError::NotFound(what))
}

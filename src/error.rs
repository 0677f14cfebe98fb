//! The one place where failures become responses, all in HubSpot's error shape.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::json;

use crate::auth::AuthError;
use crate::budget::{Throttle, ThrottleSource};
use crate::route::RouteError;
use crate::token::TokenError;
use crate::upstream::{MAX_BODY, Policy, UpstreamError};

/// Everything that can stop a request from getting HubSpot's answer.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("caller not authenticated: {0}")]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// A coalesced caller's own deadline passed before the shared fetch finished.
    #[error("the shared upstream call did not finish within the deadline")]
    WaitTimeout,
    /// The fetch ended without an answer (a bug: it panicked, and the panic was printed).
    #[error("internal error")]
    Internal,
}

/// Who is at fault; decides 4xx against 5xx and gives logs a bounded field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Client,
    Credential,
    Upstream,
    Internal,
}

impl GatewayError {
    /// Who caused it.
    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::Route(_) | GatewayError::Auth(_) => Fault::Client,
            GatewayError::Token(_) => Fault::Credential,
            GatewayError::Upstream(
                UpstreamError::Unavailable(_)
                | UpstreamError::Timeout
                | UpstreamError::Throttled(_)
                | UpstreamError::TooLarge { .. },
            )
            | GatewayError::WaitTimeout => Fault::Upstream,
            GatewayError::Upstream(UpstreamError::Request(_)) | GatewayError::Internal => {
                Fault::Internal
            }
        }
    }

    /// The response a caller sees. `correlation_id` goes into the body, as HubSpot does.
    pub fn to_response(&self, correlation_id: &str) -> Response<Full<Bytes>> {
        let mut extra: Vec<(header::HeaderName, HeaderValue)> = Vec::new();
        let (status, category, message, context) = match self {
            GatewayError::Route(RouteError::NotFound) => (StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND", "No route for this path. The gateway serves GET /files/{v3|2026-03|2026-09}/files/import-from-url/async/tasks/{taskId}/status.".to_owned(), None),
            GatewayError::Route(RouteError::MethodNotAllowed) => {
                extra.push((header::ALLOW, HeaderValue::from_static("GET, HEAD")));
                (StatusCode::METHOD_NOT_ALLOWED, "VALIDATION_ERROR", "Only GET and HEAD are allowed on this route.".to_owned(), None)
            }
            GatewayError::Route(RouteError::InvalidTaskId) => (StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "Invalid taskId: it must be 1-128 characters of A-Z a-z 0-9 - _ . ~ (and not . or ..).".to_owned(), None),
            GatewayError::Auth(AuthError::Duplicate) => (StatusCode::BAD_REQUEST, "VALIDATION_ERROR", "More than one Authorization header: send exactly one.".to_owned(), None),
            GatewayError::Auth(_) => {
                extra.push((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"hubspot-files-gateway\"")));
                (StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION", "Authentication credentials not found or not valid. Send Authorization: Bearer <your gateway API key>.".to_owned(), None)
            }
            GatewayError::Token(TokenError::MissingScopes(scopes)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "MISSING_SCOPES",
                "The gateway's HubSpot token does not have the scopes this route requires; nothing was sent to HubSpot.".to_owned(),
                Some(json!({ "missingScopes": scopes })),
            ),
            GatewayError::Token(e) => (StatusCode::SERVICE_UNAVAILABLE, "TOKEN_UNAVAILABLE", format!("The gateway has no valid HubSpot token: {e}."), None),
            GatewayError::Upstream(UpstreamError::Throttled(throttle)) => {
                return rate_limited(throttle, correlation_id);
            }
            GatewayError::Upstream(UpstreamError::TooLarge { limit }) => (StatusCode::BAD_GATEWAY, "UPSTREAM_ANSWER_TOO_LARGE", format!("HubSpot's answer was larger than the {} the gateway relays ({limit} bytes); it was not passed on.", if *limit == MAX_BODY { "1 MiB".to_owned() } else { format!("{limit} bytes") }), None),
            GatewayError::Upstream(UpstreamError::Unavailable(_)) => (StatusCode::BAD_GATEWAY, "UPSTREAM_UNAVAILABLE", "HubSpot could not be reached.".to_owned(), None),
            GatewayError::Upstream(UpstreamError::Timeout) | GatewayError::WaitTimeout => (StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT", "HubSpot did not answer in time.".to_owned(), None),
            // The gateway's own fault, nothing was sent: neither the caller's nor HubSpot's.
            GatewayError::Upstream(UpstreamError::Request(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "The gateway could not build its request to HubSpot; nothing was sent.".to_owned(), None),
            GatewayError::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR", "Internal gateway error.".to_owned(), None),
        };
        let mut body = json!({
            "status": "error",
            "message": message,
            "correlationId": correlation_id,
            "category": category,
        });
        if let Some(context) = context {
            body["context"] = context;
        }
        json_response(status, &body, extra)
    }
}

/// HubSpot's own 429 shape (`policyName` lets HubSpot's clients tell a ten-secondly limit,
/// worth retrying soon, from a daily one), plus `category` so it is a valid `Error`;
/// `Retry-After` in whole seconds and the `RateLimit-*` headers of the budget that refused.
fn rate_limited(throttle: &Throttle, correlation_id: &str) -> Response<Full<Bytes>> {
    let policy = throttle.policy;
    let message = match (throttle.by, policy) {
        (ThrottleSource::LocalBudget, _) => "You have reached your ten_secondly_rolling limit.",
        (ThrottleSource::ClientShare, _) => {
            "You have reached your share of the gateway's ten_secondly_rolling limit; other callers are not held."
        }
        (ThrottleSource::DailyLimit, _) => {
            "The gateway's daily limit of HubSpot calls is reached; calls resume after midnight UTC."
        }
        (ThrottleSource::HubSpot429, Policy::Daily) => {
            "HubSpot's daily limit is reached; the gateway holds all calls until it resets."
        }
        (
            ThrottleSource::HubSpot429,
            Policy::TenSecondlyRolling | Policy::Secondly | Policy::Unknown,
        ) => "HubSpot rate limit reached; the gateway holds all calls until it resets.",
    };
    let body = json!({
        "status": "error",
        "message": message,
        "errorType": "RATE_LIMIT",
        "correlationId": correlation_id,
        "policyName": policy.label(),
        "category": "RATE_LIMITS",
    });
    json_response(
        StatusCode::TOO_MANY_REQUESTS,
        &body,
        throttle.headers().into(),
    )
}

fn json_response(
    status: StatusCode,
    body: &serde_json::Value,
    extra: Vec<(header::HeaderName, HeaderValue)>,
) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=utf-8"),
    );
    for (name, value) in extra {
        headers.insert(name, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::RequestError;

    /// A request the gateway could not build is its own fault: a 500 in HubSpot's error
    /// shape, not a 4xx the caller would blame itself for, nor a 502 blaming HubSpot.
    #[tokio::test]
    async fn an_unbuildable_request_is_an_internal_error() {
        let cause = hyper::header::HeaderValue::from_str("a\nb").expect_err("invalid");
        let e = GatewayError::from(UpstreamError::from(RequestError::Bearer(cause)));
        assert_eq!(e.fault(), Fault::Internal);
        let response = e.to_response("corr-1");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        let bytes = body.expect("a full body cannot fail").to_bytes();
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["status"], "error");
        assert_eq!(json["category"], "INTERNAL_ERROR");
        assert_eq!(json["correlationId"], "corr-1");
    }
}

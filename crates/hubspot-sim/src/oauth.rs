//! The OAuth side of HubSpot: refresh-token grant (v1, v3, 2026-03, 2026-09), introspection
//! (v3, 2026-03, 2026-09), v1 token info and private-app token info.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use super::body::{HubSpotError, SimResponse, json, raw};
use super::state::{APP_ID, IssuedToken, Sim, USER_ID};

/// Applies the OAuth faults (latency, down, fixed status, garbage) shared by every OAuth
/// endpoint; `None` means answer normally.
async fn oauth_fault(sim: &Sim, correlation: Uuid) -> Option<SimResponse> {
    let faults = sim.lock().faults.clone();
    if faults.token_latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.token_latency_ms)).await;
    }
    if faults.token_down {
        return Some(
            HubSpotError::for_status(StatusCode::SERVICE_UNAVAILABLE).into_response(correlation),
        );
    }
    if let Some(status) = faults
        .token_status
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        return Some(HubSpotError::for_status(status).into_response(correlation));
    }
    if faults.token_garbage {
        // Labelled JSON on purpose: a client must not trust the content type alone.
        return Some(raw(
            StatusCode::OK,
            "<html><body>502 Bad Gateway</body></html>",
        ));
    }
    None
}

fn form(body: &[u8]) -> HashMap<String, String> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn field<'a>(form: &'a HashMap<String, String>, name: &str) -> &'a str {
    form.get(name).map_or("", String::as_str)
}

/// Client id and secret: any non-empty pair, unless the config names the only valid ones.
fn check_client(sim: &Sim, form: &HashMap<String, String>) -> Result<String, HubSpotError> {
    let id = field(form, "client_id");
    if id.is_empty()
        || sim
            .config
            .client_id
            .as_deref()
            .is_some_and(|want| want != id)
    {
        return Err(HubSpotError::oauth(
            "BAD_CLIENT_ID",
            "missing or unknown client id",
        ));
    }
    let secret = field(form, "client_secret");
    if secret.is_empty()
        || sim
            .config
            .client_secret
            .as_deref()
            .is_some_and(|want| want != secret)
    {
        return Err(HubSpotError::oauth(
            "BAD_CLIENT_SECRET",
            "missing or invalid client secret",
        ));
    }
    Ok(id.to_owned())
}

/// `POST /oauth/{v1|v3|2026-03|2026-09}/token`: the refresh-token grant, the same on every
/// version.
pub(crate) async fn token(sim: &Sim, body: &[u8], correlation: Uuid) -> SimResponse {
    sim.lock().stats.token_requests += 1;
    if let Some(response) = oauth_fault(sim, correlation).await {
        return response;
    }
    match refresh(sim, &form(body)) {
        Ok(value) => json(StatusCode::OK, &value),
        Err(error) => error.into_response(correlation),
    }
}

fn refresh(sim: &Sim, form: &HashMap<String, String>) -> Result<Value, HubSpotError> {
    if field(form, "grant_type") != "refresh_token" {
        return Err(HubSpotError::oauth(
            "BAD_GRANT_TYPE",
            "grant_type must be refresh_token",
        ));
    }
    let client_id = check_client(sim, form)?;
    let presented = field(form, "refresh_token");
    let mut state = sim.lock();
    if !state.refresh_token_valid(presented) {
        return Err(HubSpotError::oauth(
            "BAD_REFRESH_TOKEN",
            "missing or unknown refresh token",
        ));
    }
    let refresh_token = state.next_refresh_token(presented);
    let (access_token, issued) =
        state.issue_token(&client_id, sim.config.token_ttl, Instant::now());
    Ok(json!({
        "access_token": access_token,
        "refresh_token": refresh_token,
        "expires_in": sim.config.token_ttl.as_secs(),
        "token_type": "bearer",
        "token_use": "access_token",
        "hub_id": issued.hub_id,
        "scopes": issued.scopes,
    }))
}

/// `POST /oauth/{v3|2026-03|2026-09}/token/introspect`.
///
/// HubSpot does not document the inactive answer, and the spec's schema requires every field
/// whether active or not, so an inactive answer carries the same fields with
/// `active: false`. For a token the simulator issued the scopes and hub stay the real ones:
/// only `active` tells, so a client that ignores it is caught.
pub(crate) async fn introspect(sim: &Sim, body: &[u8], correlation: Uuid) -> SimResponse {
    sim.lock().stats.introspect_requests += 1;
    if let Some(response) = oauth_fault(sim, correlation).await {
        return response;
    }
    let form = form(body);
    let client_id = match check_client(sim, &form) {
        Ok(id) => id,
        Err(error) => return error.into_response(correlation),
    };
    let token = field(&form, "token");
    if token.is_empty() {
        return HubSpotError::validation("token is required").into_response(correlation);
    }
    let now = Instant::now();
    let state = sim.lock();
    let known = state.issued(token).cloned();
    let inactive = state.faults.introspect_inactive;
    let fallback = IssuedToken {
        scopes: Vec::new(),
        hub_id: state.faults.hub_id,
        client_id,
        expires_at: now,
    };
    drop(state);
    let remaining = known.as_ref().map_or(Duration::ZERO, |t| {
        t.expires_at.saturating_duration_since(now)
    });
    let active = !inactive && !remaining.is_zero();
    let expires_in = remaining.as_secs();
    let info = known.unwrap_or(fallback);
    json(
        StatusCode::OK,
        &json!({
            "active": active,
            "token": token,
            "token_type": "bearer",
            "token_use": "access_token",
            "client_id": info.client_id,
            "app_id": APP_ID,
            "user_id": USER_ID,
            "user": "sim-user@example.com",
            "hub_id": info.hub_id,
            "hub_domain": hub_domain(info.hub_id),
            "scopes": info.scopes,
            "expires_in": expires_in,
            "is_private_distribution": false,
            "signed_access_token": signed_access_token(&info, expires_in),
        }),
    )
}

/// `GET /oauth/v1/access-tokens/{token}` (deprecated by HubSpot, still served). An unknown,
/// expired or (by fault) inactive token is a 404.
pub(crate) async fn access_token_info(sim: &Sim, token: &str, correlation: Uuid) -> SimResponse {
    sim.lock().stats.access_token_info_requests += 1;
    if let Some(response) = oauth_fault(sim, correlation).await {
        return response;
    }
    let now = Instant::now();
    let state = sim.lock();
    let live = state
        .issued(token)
        .filter(|t| t.expires_at > now && !state.faults.introspect_inactive)
        .cloned();
    drop(state);
    let Some(info) = live else {
        return HubSpotError::not_found("The access token was not found or has expired.")
            .into_response(correlation);
    };
    json(
        StatusCode::OK,
        &json!({
            "token": token,
            "user": "sim-user@example.com",
            "user_id": USER_ID,
            "hub_domain": hub_domain(info.hub_id),
            "hub_id": info.hub_id,
            "app_id": APP_ID,
            "scopes": info.scopes,
            "expires_in": info.expires_at.saturating_duration_since(now).as_secs(),
            "token_type": "access",
            "is_private_distribution": false,
        }),
    )
}

/// `POST /oauth/v2/private-apps/get/access-token-info` with `{"tokenKey": "..."}`: the
/// static token's `hubId`, `appId`, `userId`, `scopes` (shape known from clients, no spec).
pub(crate) async fn private_app_info(sim: &Sim, body: &[u8], correlation: Uuid) -> SimResponse {
    sim.lock().stats.private_app_info_requests += 1;
    if let Some(response) = oauth_fault(sim, correlation).await {
        return response;
    }
    let key = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("tokenKey").and_then(Value::as_str).map(str::to_owned));
    let Some(key) = key else {
        return HubSpotError::validation("Body must be JSON with a tokenKey string")
            .into_response(correlation);
    };
    let state = sim.lock();
    let Some(scopes) = state.static_token_scopes(&key) else {
        return HubSpotError::unauthenticated("The private app token is invalid.")
            .into_response(correlation);
    };
    json(
        StatusCode::OK,
        &json!({
            "hubId": state.faults.hub_id,
            "appId": APP_ID,
            "userId": USER_ID,
            "scopes": scopes,
        }),
    )
}

fn hub_domain(hub_id: u64) -> String {
    format!("sim-{hub_id}.hubspot.com")
}

/// HubSpot's signed token blob: required by the introspection schema, opaque to clients.
fn signed_access_token(info: &IssuedToken, expires_in: u64) -> Value {
    let expires_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
        + u128::from(expires_in) * 1000;
    json!({
        "appId": APP_ID,
        "appInstallId": format!("{}-{}", APP_ID, info.hub_id),
        "audience": "api.hubapi.com",
        "expiresAt": u64::try_from(expires_at).unwrap_or(u64::MAX),
        "hubId": info.hub_id,
        "hublet": "na1",
        "installingUserId": USER_ID,
        "isPrivateDistribution": false,
        "isServiceAccount": false,
        "isUserLevel": false,
        "newSignature": "c2ltdWxhdGVkLXNpZ25hdHVyZQ",
        "scopeToScopeGroupPks": "",
        "scopes": info.scopes.join(","),
        "signature": "c2ltdWxhdGVk",
        "trialScopeToScopeGroupPks": "",
        "trialScopes": "",
        "userId": USER_ID,
    })
}

//! `/__sim/*`: the test-only control surface (no auth): stats, reset, recorded requests,
//! arrival times, faults.

use hyper::{Method, StatusCode};
use uuid::Uuid;

use super::body::{HubSpotError, SimResponse, empty, json};
use super::faults::FaultUpdate;
use super::state::Sim;

/// Answers a `/__sim/...` request; `None` if no such control route.
pub(crate) fn handle(
    sim: &Sim,
    method: &Method,
    path: &str,
    body: &[u8],
    correlation: Uuid,
) -> Option<SimResponse> {
    let response = match (method, path) {
        (&Method::GET, "/__sim/stats") => json(StatusCode::OK, &sim.lock().stats),
        (&Method::POST, "/__sim/reset") => {
            sim.lock().reset();
            empty(StatusCode::NO_CONTENT)
        }
        (&Method::GET, "/__sim/requests") => json(StatusCode::OK, &sim.lock().requests),
        (&Method::GET, "/__sim/arrivals") => json(StatusCode::OK, &sim.lock().arrivals),
        (&Method::GET, "/__sim/faults") => json(StatusCode::OK, &sim.lock().faults),
        (&Method::POST, "/__sim/faults") => set_faults(sim, body, correlation),
        _ => return None,
    };
    Some(response)
}

fn set_faults(sim: &Sim, body: &[u8], correlation: Uuid) -> SimResponse {
    // An empty body means `{}`: no change.
    let parsed = if body.iter().all(u8::is_ascii_whitespace) {
        Ok(FaultUpdate::default())
    } else {
        serde_json::from_slice::<FaultUpdate>(body).map_err(|e| e.to_string())
    };
    let update = match parsed.and_then(|u| u.validate().map(|()| u)) {
        Ok(update) => update,
        Err(reason) => {
            return HubSpotError::validation(format!("Invalid faults: {reason}"))
                .field("context", serde_json::json!({ "reason": [reason] }))
                .into_response(correlation);
        }
    };
    let mut state = sim.lock();
    state.faults.apply(&update);
    if update.revoke_all == Some(true) {
        state.revoke_all();
    }
    if let Some(added) = update.add_static_token {
        state.add_static_token(added.token, added.scopes);
    }
    json(StatusCode::OK, &state.faults)
}

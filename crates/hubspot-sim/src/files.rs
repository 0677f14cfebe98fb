//! The Files side of HubSpot: starting an import and the import-status route, with seeded
//! task ids whose bodies are the same bytes every time.

use std::time::{Duration, Instant, SystemTime};

use hyper::header::{AUTHORIZATION, HeaderMap};
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use super::body::{HubSpotError, SimResponse, json, raw, with_rate_headers, with_retry_after};
use super::state::{
    AuthFailure, Caller, ImportedTask, RateOutcome, RecordedRequest, Sim, State, chance,
};

/// HubSpot accepts a token with ANY ONE of these on the status route.
pub(crate) const STATUS_SCOPES: [&str; 3] = ["files", "files.read", "files.ui_hidden.read"];
/// ... and with any one of these on import-from-url.
const IMPORT_SCOPES: [&str; 3] = ["files", "files.write", "files.ui_hidden.write"];
/// An imported task is PENDING this long, then PROCESSING until `COMPLETE_AFTER`.
const PROCESSING_AFTER: Duration = Duration::from_secs(1);
const COMPLETE_AFTER: Duration = Duration::from_secs(3);
/// Seeded tasks were requested at some time within 300 days after 2025-01-01T00:00:00Z.
const SEED_EPOCH_SECS: u64 = 1_735_689_600;

/// What the status route decided: an answer, or close the connection without one.
pub(crate) enum Outcome {
    Answer(SimResponse),
    Reset,
}

/// `GET`/`HEAD /files/{v3|2026-03|2026-09}/files/import-from-url/async/tasks/{taskId}/status`.
///
/// Checks in this order: injected reset, `status_override`, bearer (401), rate window (429),
/// scopes (403), injected 5xx, then the task (200 or 404). Every answer after a successful
/// authentication carries the rate-limit headers.
pub(crate) async fn status(
    sim: &Sim,
    request: RecordedRequest,
    headers: &HeaderMap,
    task_id: &str,
    correlation: Uuid,
) -> Outcome {
    let (faults, overridden) = {
        let mut state = sim.lock();
        state.stats.status_requests += 1;
        state.record(request);
        state.arrive(sim.started.elapsed(), task_id);
        let overridden = state.faults.take_override();
        (state.faults.clone(), overridden)
    };
    if faults.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
    }
    let mut state = sim.lock();
    if chance(faults.reset_rate) {
        state.stats.connection_resets += 1;
        return Outcome::Reset;
    }
    let response = match overridden {
        Some(o) => {
            let status = StatusCode::from_u16(o.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            if status == StatusCode::TOO_MANY_REQUESTS {
                let policy = o.policy_name.as_deref().unwrap_or("TEN_SECONDLY_ROLLING");
                let response = HubSpotError::rate_limited_by(policy).into_response(correlation);
                with_retry_after(
                    with_rate_headers(response, state.rate.exhausted()),
                    o.retry_after.as_ref(),
                )
            } else {
                HubSpotError::for_status(status).into_response(correlation)
            }
        }
        None => answer_status(
            &mut state,
            headers,
            task_id,
            correlation,
            faults.fail_rate,
            faults.fail_status,
            faults.pad_bytes,
        ),
    };
    state.stats.count_answer(response.status());
    Outcome::Answer(response)
}

fn answer_status(
    state: &mut State,
    headers: &HeaderMap,
    task_id: &str,
    correlation: Uuid,
    fail_rate: f64,
    fail_status: u16,
    pad_bytes: u64,
) -> SimResponse {
    let now = Instant::now();
    let (caller, rate) = match gate(state, headers, &STATUS_SCOPES, now) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(&STATUS_SCOPES, correlation),
    };
    let response = if chance(fail_rate) {
        let status = StatusCode::from_u16(fail_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        HubSpotError::for_status(status).into_response(correlation)
    } else {
        match task_body(state, task_id, caller.hub_id, now) {
            Some(mut body) => {
                let pad = usize::try_from(pad_bytes).unwrap_or(usize::MAX);
                body.resize(body.len().saturating_add(pad), b' ');
                raw(StatusCode::OK, body)
            }
            None => HubSpotError::not_found(format!("No import task found with id {task_id}"))
                .into_response(correlation),
        }
    };
    with_rate_headers(response, rate)
}

/// Why an authenticated Files call was refused before reaching its task.
enum Refusal {
    Unauthenticated(AuthFailure),
    RateLimited(Option<RateOutcome>),
    MissingScopes(Option<RateOutcome>),
}

impl Refusal {
    /// HubSpot's answer for the refusal; past authentication it carries the rate headers.
    fn into_response(self, any_of: &[&str], correlation: Uuid) -> SimResponse {
        match self {
            Self::Unauthenticated(failure) => {
                let message = match failure {
                    AuthFailure::Missing => "Authentication credentials not found. This API supports OAuth 2.0 authentication and you can find more details at https://developers.hubspot.com/docs/methods/auth/oauth-overview".to_owned(),
                    AuthFailure::Unknown => "The OAuth token used to make this call is invalid.".to_owned(),
                    AuthFailure::Expired { ago } => format!(
                        "The OAuth token used to make this call expired {} second(s) ago.",
                        ago.as_secs()
                    ),
                };
                HubSpotError::unauthenticated(message).into_response(correlation)
            }
            Self::RateLimited(rate) => with_rate_headers(
                HubSpotError::rate_limited().into_response(correlation),
                rate,
            ),
            Self::MissingScopes(rate) => with_rate_headers(
                HubSpotError::missing_scopes(any_of).into_response(correlation),
                rate,
            ),
        }
    }
}

/// Who is calling, whether the window has room, whether the scopes fit: the checks every
/// authenticated Files call passes, in HubSpot's order.
fn gate(
    state: &mut State,
    headers: &HeaderMap,
    any_of: &[&str],
    now: Instant,
) -> Result<(Caller, Option<RateOutcome>), Refusal> {
    let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let caller = state
        .authenticate(authorization, now)
        .map_err(Refusal::Unauthenticated)?;
    let rate = state.rate.admit(now);
    if rate.is_some_and(|r| !r.allowed) {
        return Err(Refusal::RateLimited(rate));
    }
    if !any_of
        .iter()
        .any(|need| caller.scopes.iter().any(|have| have == need))
    {
        return Err(Refusal::MissingScopes(rate));
    }
    Ok((caller, rate))
}

/// `POST /files/{v3|2026-03|2026-09}/files/import-from-url/async`: 202 with the new task's id and
/// status link. `url` and `access` are required (as in the spec); the file is never fetched.
pub(crate) fn import(
    sim: &Sim,
    headers: &HeaderMap,
    body: &[u8],
    status_base: &str,
    correlation: Uuid,
) -> SimResponse {
    let mut state = sim.lock();
    state.stats.import_requests += 1;
    let response = match gate(&mut state, headers, &IMPORT_SCOPES, Instant::now()) {
        Err(refusal) => refusal.into_response(&IMPORT_SCOPES, correlation),
        Ok((_, rate)) => with_rate_headers(
            start_import(&mut state, body, status_base, correlation),
            rate,
        ),
    };
    state.stats.count_answer(response.status());
    response
}

fn start_import(
    state: &mut State,
    body: &[u8],
    status_base: &str,
    correlation: Uuid,
) -> SimResponse {
    let input: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let text = |name: &str| input.get(name).and_then(Value::as_str).map(str::to_owned);
    let (Some(url), Some(access)) = (text("url"), text("access")) else {
        return HubSpotError::validation("url and access are required").into_response(correlation);
    };
    let name = text("name").unwrap_or_else(|| {
        let last = url.rsplit('/').next().unwrap_or_default();
        last.split('.').next().unwrap_or_default().to_owned()
    });
    let id = Uuid::new_v4().to_string();
    state.imports.insert(
        id.clone(),
        ImportedTask {
            started: Instant::now(),
            requested_at: SystemTime::now(),
            name,
            access,
        },
    );
    json(
        StatusCode::ACCEPTED,
        &json!({ "id": id, "links": { "status": format!("{status_base}/tasks/{id}/status") } }),
    )
}

/// The 200 body for a task, or `None` (404). Bodies depend only on the id (seeded) or on the
/// import's start (imported) and the caller's hub, never on the time of the request, so one
/// id in one state always gives the same bytes.
fn task_body(state: &State, task_id: &str, hub_id: u64, now: Instant) -> Option<Vec<u8>> {
    let value = if let Some(task) = state.imports.get(task_id) {
        imported(task_id, task, hub_id, now)
    } else {
        seeded(task_id, hub_id)?
    };
    serde_json::to_vec(&value).ok()
}

fn seeded(task_id: &str, hub_id: u64) -> Option<Value> {
    let seed = fnv1a(task_id.as_bytes());
    let requested = SystemTime::UNIX_EPOCH
        + Duration::from_secs(SEED_EPOCH_SECS + seed % (300 * 86_400))
        + Duration::from_millis(seed >> 54);
    let started = requested + Duration::from_millis(150 + (seed >> 20) % 400);
    let completed = started + Duration::from_millis(1_200 + (seed >> 30) % 4_000);
    let (status, completed, extra) = if task_id.starts_with("complete-") {
        let name = format!("product-photo-{task_id}");
        let file = FileSpec {
            seed,
            name: &name,
            extension: "png",
            access: "PUBLIC_NOT_INDEXABLE",
            created: completed,
        };
        (
            "COMPLETE",
            completed,
            json!({ "numErrors": 0, "result": file.to_json(hub_id) }),
        )
    } else if task_id.starts_with("canceled-") {
        ("CANCELED", completed, canceled_extra(task_id))
    } else if task_id.starts_with("processing-") {
        ("PROCESSING", started, json!({}))
    } else if task_id.starts_with("pending-") {
        ("PENDING", started, json!({}))
    } else {
        return None;
    };
    Some(action_response(
        task_id, status, requested, started, completed, extra,
    ))
}

fn imported(task_id: &str, task: &ImportedTask, hub_id: u64, now: Instant) -> Value {
    let age = now.saturating_duration_since(task.started);
    let requested = task.requested_at;
    let started = requested + PROCESSING_AFTER;
    let completed = requested + COMPLETE_AFTER;
    if age < PROCESSING_AFTER {
        action_response(
            task_id,
            "PENDING",
            requested,
            requested,
            requested,
            json!({}),
        )
    } else if age < COMPLETE_AFTER {
        action_response(
            task_id,
            "PROCESSING",
            requested,
            started,
            started,
            json!({}),
        )
    } else {
        let file = FileSpec {
            seed: fnv1a(task_id.as_bytes()),
            name: &task.name,
            extension: "png",
            access: &task.access,
            created: completed,
        };
        action_response(
            task_id,
            "COMPLETE",
            requested,
            started,
            completed,
            json!({ "result": file.to_json(hub_id) }),
        )
    }
}

/// A `FileActionResponse`. The spec requires `completedAt` as a date-time string, so a task
/// still in flight (where HubSpot may send `null`) gets its `startedAt` there: a value that
/// validates and never claims a completion before the start.
fn action_response(
    task_id: &str,
    status: &str,
    requested: SystemTime,
    started: SystemTime,
    completed: SystemTime,
    extra: Value,
) -> Value {
    let mut value = json!({
        "taskId": task_id,
        "status": status,
        "requestedAt": timestamp(requested),
        "startedAt": timestamp(started),
        "completedAt": timestamp(completed),
        "links": { "status": format!("https://api.hubapi.com/files/v3/files/import-from-url/async/tasks/{task_id}/status") },
    });
    if let (Some(target), Value::Object(fields)) = (value.as_object_mut(), extra) {
        target.extend(fields);
    }
    value
}

fn canceled_extra(task_id: &str) -> Value {
    let url = format!("https://files.example.com/imports/{task_id}.png");
    json!({
        "numErrors": 1,
        "errors": [{
            "status": "error",
            "category": "VALIDATION_ERROR",
            "message": format!("Unable to download the file at {url}: the remote server answered 404."),
            "context": { "url": [url] },
            "errors": [],
            "links": {},
        }],
    })
}

/// The folder imported files land in.
const FOLDER: &str = "/imports/from-url/product-catalogue";

/// The `File` an import produced, with every field HubSpot usually fills.
struct FileSpec<'a> {
    seed: u64,
    name: &'a str,
    extension: &'a str,
    access: &'a str,
    created: SystemTime,
}

impl FileSpec<'_> {
    fn to_json(&self, hub_id: u64) -> Value {
        let Self {
            seed,
            name,
            extension,
            access,
            created,
        } = *self;
        // HubSpot's `url` uses the account's file domain, `defaultHostingUrl` its own CDN.
        let file = format!("{FOLDER}/{name}.{extension}");
        let default_url =
            format!("https://{hub_id}.fs1.hubspotusercontent-na1.net/hubfs/{hub_id}{file}");
        let url = format!("https://sim-{hub_id}.hs-sites.com/hubfs{file}");
        json!({
            "id": (100_000_000_000 + seed % 90_000_000_000).to_string(),
            "name": name,
            "path": file,
            "parentFolderId": (10_000_000_000 + (seed >> 8) % 9_000_000_000).to_string(),
            "size": 20_000 + seed % 2_000_000,
            "height": 400 + (seed >> 12) % 1_200,
            "width": 600 + (seed >> 24) % 1_400,
            "encoding": extension,
            "type": "IMG",
            "extension": extension,
            "access": access,
            "isUsableInContent": true,
            "sourceGroup": "CONTENT",
            "fileMd5": format!("{:016x}{:016x}", seed, fnv1a(name.as_bytes()).rotate_left(17)),
            "url": url,
            "defaultHostingUrl": default_url,
            "createdAt": timestamp(created),
            "updatedAt": timestamp(created),
            "archived": false,
        })
    }
}

fn timestamp(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// FNV-1a: a stable hash (the std hasher is seeded per process) for deterministic bodies.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether a method is allowed on the status route.
pub(crate) fn is_status_method(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

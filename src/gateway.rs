//! The request handler: one request from route to response. Its steps, in order:
//!
//! 1. **route**: the path becomes a typed status request (or 404/405/400);
//! 2. **auth**: the caller's API key or certificate becomes a client name (or 401);
//! 3. **cache**: a stored answer is served as a HIT;
//! 4. **coalesce**: a miss joins the fetch in flight for its key, or leads a new one, which
//!    runs in its own task so a caller hanging up does not cancel it for the others;
//! 5. **token**: the verified HubSpot token in service (or 503);
//! 6. **upstream**: HubSpot is asked within the deadline and the rate budget; a 401 forces
//!    one token refresh and one retry, a 403 `MISSING_SCOPES` a re-verification;
//! 7. **classify**: the answer is kept (terminal, a 404 for `missing_ttl`, a non-terminal
//!    one for `pending_ttl` and `stale_if_error`) or only passed on; when HubSpot failed,
//!    the last non-terminal answer within `stale_if_error` stands in (STALE);
//! 8. **respond**: HubSpot's status and body with the gateway's cache headers, or the
//!    failure in HubSpot's error shape ([`crate::error`]), and the request's metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use crate::auth::{Authenticator, PeerCertName};
use crate::cache::{AnswerCache, CacheOutcome, Flight, Outcome, Stored};
use crate::error::{Fault, GatewayError};
use crate::metrics::{Metrics, RequestSeries};
use crate::route::{StatusRequest, match_route};
use crate::token::{ActiveToken, TokenError, TokenManager};
use crate::upstream::{Answer, HubSpot, UpstreamError};

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// Everything a request needs, shared by all connections.
pub struct Gateway {
    auth: Authenticator,
    cache: AnswerCache<GatewayError>,
    tokens: TokenManager,
    hubspot: Arc<HubSpot>,
    metrics: Metrics,
    request_timeout: Duration,
    shutting_down: AtomicBool,
    series: RequestSeries,
}

/// Who asked, what for, and what they get.
struct Handled {
    client: Arc<str>,
    /// The route's request, when the path was one.
    key: Option<StatusRequest>,
    cache: CacheOutcome,
    /// Calls this request's own fetch sent to HubSpot (0 for hits and coalesced callers).
    tries: u32,
    result: Result<Arc<Stored>, Arc<GatewayError>>,
    /// For a STALE answer: the status the caller would have got without it.
    fwd_status: Option<StatusCode>,
}

impl Gateway {
    /// Puts the parts together; the metric series of the common answers are resolved here.
    pub fn new(
        auth: Authenticator,
        cache: AnswerCache<GatewayError>,
        tokens: TokenManager,
        hubspot: Arc<HubSpot>,
        metrics: Metrics,
        request_timeout: Duration,
    ) -> Gateway {
        let series = metrics.request_series(auth.names());
        Gateway {
            series,
            auth,
            cache,
            tokens,
            hubspot,
            metrics,
            request_timeout,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Serves one request. Every failure becomes a response here, so this never errs.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let started = Instant::now();
        let request_id = request_id(req.headers());
        let handled = self.clone().answer(&req, &request_id).await;
        // The request id (the caller's own, when valid) is the error body's `correlationId`
        // and the access line's `request_id`, so a caller's report leads to the line.
        // `request_id` only ever holds visible ASCII, so `to_str` cannot fail.
        let id = request_id.to_str().unwrap_or_default();
        let mut response = match &handled.result {
            Ok(stored) => self.reply(stored, handled.cache, handled.fwd_status),
            Err(e) => e.to_response(id),
        };
        if req.method() == hyper::Method::HEAD {
            // hyper drops a HEAD body on HTTP/1 but sends it on HTTP/2, which is a protocol
            // error there: answer with the length and no body on both.
            let length = hyper::body::Body::size_hint(response.body())
                .exact()
                .unwrap_or(0);
            *response.body_mut() = Full::new(Bytes::new());
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
        let headers = response.headers_mut();
        if let Some(x_cache) = handled.cache.header() {
            headers.insert(X_CACHE, HeaderValue::from_static(x_cache));
        }
        let code = response.status();
        let elapsed = started.elapsed();
        self.series
            .record(&handled.client, code, handled.cache, elapsed);
        // The version the caller used (the key holds none: every version shares one entry).
        let version = handled.key.as_ref().and(
            req.uri()
                .path()
                .split('/')
                .nth(2)
                .and_then(crate::route::ApiVersion::from_segment)
                .map(crate::route::ApiVersion::segment),
        );
        let failed = handled.result.as_ref().err().map(|e| (e, e.fault()));
        let refusal = failed.as_ref().map(|(e, fault)| crate::log::Refusal {
            path: handled.key.is_none().then(|| req.uri().path()),
            fault,
            error: e,
        });
        // One access line; `[log] access` picks which.
        crate::log::access(&crate::log::Access {
            request_id: id,
            client: &handled.client,
            method: req.method().as_str(),
            version,
            task_id: handled.key.as_ref().map(|k| k.task_id.as_str()),
            status: code.as_u16(),
            cache: handled.cache.label(),
            upstream_tries: handled.tries,
            us: elapsed.as_micros() as u64,
            trace_id: crate::log::trace_id(req.headers()),
            refusal,
        });
        response.headers_mut().insert(X_REQUEST_ID, request_id);
        Ok(response)
    }

    /// Steps 1–4 here, 5–7 in the fetch a leader spawns.
    async fn answer(self: Arc<Self>, req: &Request<Incoming>, request_id: &HeaderValue) -> Handled {
        let refused = |client: &str, key: Option<StatusRequest>, e: GatewayError| Handled {
            client: Arc::from(client),
            key,
            cache: CacheOutcome::None,
            tries: 0,
            result: Err(Arc::new(e)),
            fwd_status: None,
        };
        // 1. route
        let key = match match_route(req.method(), req.uri().path()) {
            Ok(key) => key,
            Err(e) => return refused("unauthenticated", None, e.into()),
        };
        // 2. who is calling
        let client = match self
            .auth
            .authenticate(req.headers(), req.extensions().get::<PeerCertName>())
        {
            Ok(client) => client,
            Err(e) => {
                self.metrics
                    .inbound_auth_failures_total
                    .with_label_values(&[e.label()])
                    .inc();
                return refused("unauthenticated", Some(key), e.into());
            }
        };
        // 3. cache, 4. coalesce
        let (rx, cache, tries) = match self.cache.lookup(&key) {
            Flight::Hit(stored) => {
                return Handled {
                    client,
                    key: Some(key),
                    cache: CacheOutcome::Hit,
                    tries: 0,
                    result: Ok(stored),
                    fwd_status: None,
                };
            }
            Flight::Follow(rx) => {
                self.metrics.coalesced_requests_total.inc();
                (rx, CacheOutcome::Coalesced, None)
            }
            Flight::Lead(leader) => {
                let rx = leader.rx.clone();
                let gateway = self.clone();
                let request_id = request_id.clone();
                let fetched = key.clone();
                let tries = Arc::new(AtomicU32::new(0));
                let counted = tries.clone();
                // The fetch runs in its own task, so a leader that hangs up does not cancel it
                // for the followers. Should it panic, dropping `leader` ends the flight and
                // its callers get an internal error at once.
                tokio::spawn(async move {
                    let fetch = gateway.fetch(fetched, request_id);
                    let outcome = crate::log::counting_tries(counted, fetch).await;
                    gateway.cache.complete(leader, outcome);
                });
                (rx, CacheOutcome::Miss, Some(tries))
            }
        };
        let result = wait(rx, self.request_timeout + Duration::from_secs(1)).await;
        let tries = tries.map_or(0, |t| t.load(Ordering::Relaxed));
        // HubSpot failed: the last answer seen, if recent enough, serves instead.
        if let Some(failed) = hubspot_failure(&result)
            && let Some(stale) = self.cache.stale(&key)
        {
            return Handled {
                client,
                key: Some(key),
                cache: CacheOutcome::Stale,
                tries,
                result: Ok(stale),
                fwd_status: Some(failed),
            };
        }
        Handled {
            client,
            key: Some(key),
            cache,
            tries,
            result,
            fwd_status: None,
        }
    }

    /// Steps 5–7: token, upstream, classify.
    async fn fetch(
        &self,
        key: StatusRequest,
        request_id: HeaderValue,
    ) -> Result<Stored, GatewayError> {
        // One deadline for the whole fetch, the 401 refresh and retry included, so the fetch
        // never outlives the callers waiting for it.
        let deadline = Instant::now() + self.request_timeout;
        let mut token = self.tokens.current()?;
        let mut answer = self.ask(&key, &token, &request_id, deadline).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            // HubSpot refused a token we believe valid: one forced refresh (single-flight,
            // rate-limited in the token manager), one retry, and whatever that answers.
            let wait = deadline.saturating_duration_since(Instant::now());
            if self.tokens.force_refresh(token.generation, wait).await {
                token = self.tokens.current()?;
                answer = self.ask(&key, &token, &request_id, deadline).await?;
            }
            // Still refused: the gateway's credential is at fault, not the caller's, so the
            // caller must not see a 401 it would take for a problem with its own key.
            if answer.status == StatusCode::UNAUTHORIZED {
                return Err(TokenError::RefusedUpstream.into());
            }
        } else if answer.status == StatusCode::FORBIDDEN && missing_scopes(&answer.body) {
            // HubSpot says the token lacks a scope we verified: have it verified again, so a
            // token that really lost a scope is withdrawn. The caller gets HubSpot's answer.
            self.tokens.reverify();
        }
        Ok(self
            .cache
            .entry(answer.status, answer.headers, answer.body, token.hub_id))
    }

    /// Asks HubSpot with `token`, never past its use-by time.
    async fn ask(
        &self,
        key: &StatusRequest,
        token: &ActiveToken,
        request_id: &HeaderValue,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        self.hubspot
            .get_status(key, &token.access, token.usable_until, request_id, deadline)
            .await
    }

    /// Step 8: the stored answer as a response, with the gateway's cache headers;
    /// `fwd_status` is what a STALE answer stands in for.
    fn reply(
        &self,
        stored: &Stored,
        cache: CacheOutcome,
        fwd_status: Option<StatusCode>,
    ) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(stored.body.clone()));
        *response.status_mut() = stored.status;
        let headers = response.headers_mut();
        let from_memory = matches!(cache, CacheOutcome::Hit | CacheOutcome::Stale);
        for (name, value) in &stored.headers {
            let rate_header = name.as_str().starts_with("x-hubspot-ratelimit-");
            if !(rate_header && from_memory) {
                headers.append(name, value.clone());
            }
        }
        if from_memory {
            let age = stored.stored_at.elapsed().as_secs();
            headers.insert(header::AGE, HeaderValue::from(age));
        }
        let cache_status = match cache {
            CacheOutcome::Hit => "hubspot-files-gateway; hit",
            CacheOutcome::Stale => {
                let value = match fwd_status {
                    Some(status) => format!(
                        "hubspot-files-gateway; fwd=stale; fwd-status={}",
                        status.as_u16()
                    ),
                    None => "hubspot-files-gateway; fwd=stale".to_owned(),
                };
                // A status code is three digits: always a valid header value.
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.insert(CACHE_STATUS, value);
                }
                return response;
            }
            CacheOutcome::Coalesced => "hubspot-files-gateway; fwd=miss; collapsed",
            CacheOutcome::Miss | CacheOutcome::None if stored.is_stored() => {
                "hubspot-files-gateway; fwd=miss; stored"
            }
            CacheOutcome::Miss | CacheOutcome::None => "hubspot-files-gateway; fwd=miss",
        };
        headers.insert(CACHE_STATUS, HeaderValue::from_static(cache_status));
        response
    }

    /// What `/readyz` reports: whether the gateway is ready and why not; when ready, the
    /// token problem worth reporting, if any (a failed refresh or static rotation while the
    /// last verified token still serves: callers are served correctly), and the hold after
    /// a HubSpot 429, if one is in force (ready all the same: callers get a correct 429, and
    /// another replica would share the account's limit).
    pub fn readiness(&self) -> Readiness {
        let hold = self.hubspot.hold_status().map(|h| UpstreamHold {
            policy: h.policy.label(),
            seconds_left: h.remaining.as_secs_f64(),
            capped: h.capped_from.is_some(),
            asked_seconds: h.capped_from.map(|d| d.as_secs_f64()),
        });
        let not_ready = if self.shutting_down.load(Ordering::Relaxed) {
            Some("shutting down".to_owned())
        } else {
            self.tokens.current().err().map(|e| e.to_string())
        };
        Readiness {
            ready: not_ready.is_none(),
            reason: not_ready.clone(),
            token_problem: not_ready
                .is_none()
                .then(|| self.tokens.problem().map(|e| e.to_string()))
                .flatten(),
            upstream_hold: hold,
        }
    }

    /// Empties the cache when the token in service belongs to another HubSpot account
    /// (called for every token change, so a cached answer of the old account is never a HIT).
    pub fn token_changed(&self, hub_id: Option<u64>) {
        self.cache.bind_hub(hub_id);
    }

    /// Turns readiness off ahead of shutdown.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// The metrics, with the cache gauges brought up to date.
    pub fn render_metrics(&self) -> Vec<u8> {
        let (entries, weight) = self.cache.usage();
        self.metrics.cache_entries.set(entries as i64);
        self.metrics.cache_weight_bytes.set(weight as i64);
        self.hubspot.update_gauges();
        self.metrics.render()
    }

    /// The token manager, for the admin endpoints and tests.
    pub fn tokens(&self) -> &TokenManager {
        &self.tokens
    }
}

/// The `/readyz` answer, serialized as its JSON body.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Readiness {
    /// 200 when true, 503 when false.
    pub ready: bool,
    /// Why not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// A token problem that does not stop service (see [`Gateway::readiness`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_problem: Option<String>,
    /// The hold after a HubSpot 429 in force, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_hold: Option<UpstreamHold>,
}

impl Readiness {
    /// The status `/readyz` answers with.
    pub fn status(&self) -> StatusCode {
        if self.ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// A hold on every upstream call after a HubSpot 429, as `/readyz` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamHold {
    /// The `policyName` HubSpot gave (`unknown` for any other).
    pub policy: &'static str,
    /// Seconds until calls may go out again.
    pub seconds_left: f64,
    /// HubSpot asked for longer than the cap: `upstream.max_hold`, or 24 h for `DAILY`.
    pub capped: bool,
    /// What HubSpot asked for, when capped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asked_seconds: Option<f64>,
}

/// The status the caller would get for `result` when it is HubSpot failing (unreachable,
/// too slow, a 5xx or 429, the rate budget refusing the call), which the last answer seen
/// may stand in for. Never for the caller's own fault or the gateway's credential.
fn hubspot_failure(result: &Outcome<GatewayError>) -> Option<StatusCode> {
    match result {
        Ok(answer) => crate::cache::is_failure(answer.status).then_some(answer.status),
        Err(e) => match e.fault() {
            Fault::Upstream => Some(e.to_response("").status()),
            Fault::Client | Fault::Credential | Fault::Internal => None,
        },
    }
}

/// Whether a 403 body is HubSpot's `MISSING_SCOPES` error.
fn missing_scopes(body: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("category")?.as_str().map(|c| c == "MISSING_SCOPES"))
        .unwrap_or(false)
}

/// Waits for a flight's outcome up to `limit`; a flight abandoned by its leader (the fetch
/// panicked) is an internal error.
async fn wait(
    mut rx: tokio::sync::watch::Receiver<Option<Outcome<GatewayError>>>,
    limit: Duration,
) -> Outcome<GatewayError> {
    match tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await {
        Ok(Ok(outcome)) => outcome
            .clone()
            .unwrap_or_else(|| Err(Arc::new(GatewayError::Internal))),
        Ok(Err(_)) => Err(Arc::new(GatewayError::Internal)),
        Err(_) => Err(Arc::new(GatewayError::WaitTimeout)),
    }
}

/// The caller's `X-Request-Id` when it is short and printable, else a new one.
fn request_id(headers: &hyper::HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .cloned()
        .unwrap_or_else(|| {
            // uuid's `fast-rng` draws from the thread's generator: no syscall per request.
            let mut buf = uuid::Uuid::encode_buffer();
            HeaderValue::from_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
                .expect("a uuid is a valid header value")
        })
}

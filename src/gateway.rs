//! The request handler: one request from route to response. Its steps, in order:
//!
//! 1. **route**: the path becomes a typed status request (or 404/405/400);
//! 2. **auth**: the caller's API key or certificate becomes a client name (or 401);
//! 3. **cache**: a stored answer is served as a HIT;
//! 4. **coalesce**: a miss joins the fetch in flight for its key, or leads a new one, which
//!    runs in its own task so a caller hanging up does not cancel it for the others. In
//!    cluster mode the leader then asks the shared cache (a HIT, with its true `Age`) and
//!    joins the task's flight across replicas, in one Redis call that also takes the
//!    shared budget's admission for the leader's first call: another replica's answer is
//!    COALESCED, and only the flight's leader goes on to HubSpot (Redis failing: this
//!    replica goes alone);
//! 5. **token**: the verified HubSpot token in service (or 503);
//! 6. **upstream**: HubSpot is asked within the deadline and the rate budget; a 401 forces
//!    one token refresh and one retry, a 403 `MISSING_SCOPES` a re-verification;
//! 7. **classify**: the answer is kept (terminal, a 404 for `missing_ttl`, a non-terminal
//!    one for `pending_ttl` and `stale_if_error`) or only passed on; when HubSpot failed,
//!    the last non-terminal answer within `stale_if_error` stands in (STALE);
//! 8. **respond**: HubSpot's status and body with the gateway's cache headers, or the
//!    failure in HubSpot's error shape ([`crate::error`]), and the request's metrics;
//! 9. **share** (cluster mode, after the callers have their answer): a terminal answer
//!    goes to the shared cache, and every HubSpot answer to the replicas waiting on the
//!    flight.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use opentelemetry::trace::SpanKind;

use crate::auth::{AuthError, Authenticator, PeerCertName};
use crate::budget::{Charge, FirstTry};
use crate::cache::{AnswerCache, CacheOutcome, Flight, Origin, Outcome, Stored};
use crate::cluster::{self, ClusterBackend, TaskKey};
use crate::error::{Fault, GatewayError};
use crate::metrics::{Metrics, RequestSeries};
use crate::route::{RouteError, StatusRequest, route};
use crate::token::{ActiveToken, TokenError, TokenManager};
use crate::upstream::{Answer, HubSpot, Throttle, ThrottleSource, UpstreamError};

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
    /// The shared backend in cluster mode.
    cluster: Option<Arc<ClusterBackend>>,
    /// Whether "no hub id, nothing shared" was logged: it is said once.
    hubless_warned: AtomicBool,
}

/// What the leader of a task's flight across replicas owes the others once its own callers
/// have their answer.
struct Share {
    cluster: Arc<ClusterBackend>,
    task: TaskKey,
    /// The flight's lease; dropped unpublished (the fetch failed without an answer from
    /// HubSpot), it is released and a waiting replica takes the flight over.
    lease: cluster::Lease,
}

/// What `handle` read from the request before dropping it, for the response and its
/// access line.
struct Asked {
    method: hyper::Method,
    /// The route version the caller used, when the path was the route.
    version: Option<&'static str>,
    /// The path, when it was not the route.
    path: Option<String>,
    /// The caller's valid `traceparent`'s trace id.
    caller_trace: Option<String>,
    request_id: HeaderValue,
    span: Option<crate::telemetry::RequestSpan>,
    started: Instant,
    /// The request's header map, emptied, for the answer's headers.
    headers: hyper::HeaderMap,
    /// Kept unread until the answer is made, as hyper would have it.
    _body: Incoming,
}

/// A request's header map, emptied, to carry an answer's headers; a fresh one if the request
/// made it large, so a keep-alive connection does not hold that size between requests
/// (hyper keeps each answer's map for the next request).
fn recycled(mut headers: hyper::HeaderMap) -> hyper::HeaderMap {
    // A hit's answer has 6 headers; a map for 12 (a few hundred bytes) takes a request of
    // a dozen headers round, and no more.
    if headers.capacity() > 12 {
        return hyper::HeaderMap::new();
    }
    headers.clear();
    headers
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
    /// When the answer was found, which its `Age` counts to: for a hit, the request's
    /// start, so a hit reads the clock once for its freshness, its `Age` and its duration.
    at: Instant,
}

impl Handled {
    /// A stored answer served from memory, found at `at`.
    fn hit(client: Arc<str>, key: StatusRequest, stored: Arc<Stored>, at: Instant) -> Handled {
        Handled {
            client,
            key: Some(key),
            cache: CacheOutcome::Hit,
            tries: 0,
            result: Ok(stored),
            fwd_status: None,
            at,
        }
    }
}

impl Gateway {
    /// Puts the parts together; the metric series of the common answers are resolved here.
    /// `cluster` is the shared backend in cluster mode (`None` without `[cluster]`).
    pub fn new(
        auth: Authenticator,
        cache: AnswerCache<GatewayError>,
        tokens: TokenManager,
        hubspot: Arc<HubSpot>,
        metrics: Metrics,
        request_timeout: Duration,
        cluster: Option<Arc<ClusterBackend>>,
    ) -> Gateway {
        let series = metrics.request_series(auth.names());
        Gateway {
            cluster,
            hubless_warned: AtomicBool::new(false),
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
    ///
    /// The request is read (see [`Gateway::read`]) before the returned future is first
    /// polled, and what is left of it is dropped then: on HTTP/1 hyper reads ahead on the
    /// connection while an answer is pending, and reuses the connection's read buffer only
    /// once no slice of the last request is left; it allocated a new buffer for every
    /// request before. (On HTTP/2 this reading runs on the connection's task rather than
    /// the stream's: about half a microsecond a request; telling the two apart cost every
    /// HTTP/1 request ~400 instructions of copies.)
    pub fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static {
        let started = Instant::now();
        let (asked, routed, caller) = self.read(req, started);
        async move {
            let cx = asked.span.as_ref().map(|s| s.context().clone());
            let handled = crate::telemetry::within(
                cx,
                self.clone()
                    .answer(routed, caller, &asked.request_id, started),
            )
            .await;
            Ok(self.respond(handled, asked))
        }
    }

    /// Steps 1 and 2, and all the rest of the answer needs from the request, which it takes
    /// apart: its header map, emptied, carries the answer's headers (hyper made it from the
    /// last answer's, so no request allocates one), and its body is kept until the answer
    /// is made (dropped unread, hyper drains what is left of it or closes the connection).
    #[allow(clippy::type_complexity)]
    fn read(
        &self,
        req: Request<Incoming>,
        started: Instant,
    ) -> (
        Asked,
        Result<StatusRequest, RouteError>,
        Option<Result<Arc<str>, AuthError>>,
    ) {
        let (parts, body) = req.into_parts();
        let request_id = request_id(&parts.headers);
        // `None` unless `[telemetry]` is on: then this request's spans hang from this one.
        let span = crate::telemetry::RequestSpan::start(
            &parts.method,
            &parts.headers,
            request_id.to_str().unwrap_or_default(),
        );
        // 1. route (the version the caller used is kept apart: the key holds none, as
        // every version shares one entry)
        let routed = route(&parts.method, parts.uri.path());
        let version = routed.as_ref().ok().map(|(v, _)| v.segment());
        let routed = routed.map(|(_, key)| key);
        // 2. who is calling, for a request on the route
        let caller = routed.as_ref().ok().map(|_| {
            self.auth
                .authenticate(&parts.headers, parts.extensions.get::<PeerCertName>())
        });
        let asked = Asked {
            // The path only for a refusal's access line; the caller's valid `traceparent`.
            path: routed.is_err().then(|| parts.uri.path().to_owned()),
            caller_trace: crate::log::trace_id(&parts.headers).map(str::to_owned),
            method: parts.method,
            version,
            request_id,
            span,
            started,
            headers: recycled(parts.headers),
            _body: body,
        };
        (asked, routed, caller)
    }

    /// Step 8: the answer as a response, counted and logged.
    fn respond(&self, handled: Handled, asked: Asked) -> Response<Full<Bytes>> {
        // The request id (the caller's own, when valid) is the error body's `correlationId`
        // and the access line's `request_id`, so a caller's report leads to the line.
        // `request_id` only ever holds visible ASCII, so `to_str` cannot fail.
        let id = asked.request_id.to_str().unwrap_or_default();
        let mut response = match &handled.result {
            Ok(stored) => self.reply(
                stored,
                handled.cache,
                handled.fwd_status,
                handled.at,
                asked.headers,
            ),
            Err(e) => e.to_response(id),
        };
        if asked.method == hyper::Method::HEAD {
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
        let elapsed = asked.started.elapsed();
        self.series
            .record(&handled.client, code, handled.cache, elapsed);
        let task_id = handled.key.as_ref().map(|k| k.task_id.as_str());
        // Tracing on: the request's own trace (the caller's, or a new one); off: the
        // caller's valid `traceparent`, if any.
        let own_trace = asked
            .span
            .as_ref()
            .map(crate::telemetry::RequestSpan::trace_id);
        let trace_id = own_trace.as_deref().or(asked.caller_trace.as_deref());
        let failed = handled.result.as_ref().err().map(|e| (e, e.fault()));
        let refusal = failed.as_ref().map(|(e, fault)| crate::log::Refusal {
            path: asked.path.as_deref(),
            fault,
            error: e,
        });
        // One access line; `[log] access` picks which.
        crate::log::access(&crate::log::Access {
            request_id: id,
            client: &handled.client,
            method: asked.method.as_str(),
            version: asked.version,
            task_id,
            status: code.as_u16(),
            cache: handled.cache.label(),
            upstream_tries: handled.tries,
            us: elapsed.as_micros() as u64,
            trace_id,
            refusal,
        });
        if let Some(span) = asked.span {
            span.finish(crate::telemetry::Outcome {
                version: asked.version,
                task_id,
                status: code.as_u16(),
                cache: handled.cache.label(),
                client: &handled.client,
                error: handled
                    .result
                    .as_ref()
                    .err()
                    .map(|e| crate::telemetry::fault_label(e.fault())),
            });
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID, asked.request_id);
        response
    }

    /// Steps 2–4 here (1 is `routed`), 5–7 in the fetch a leader spawns; `started` is when
    /// the request came in.
    async fn answer(
        self: Arc<Self>,
        routed: Result<StatusRequest, RouteError>,
        caller: Option<Result<Arc<str>, AuthError>>,
        request_id: &HeaderValue,
        started: Instant,
    ) -> Handled {
        let refused = |client: &str, key: Option<StatusRequest>, e: GatewayError| Handled {
            client: Arc::from(client),
            key,
            cache: CacheOutcome::None,
            tries: 0,
            result: Err(Arc::new(e)),
            fwd_status: None,
            at: started,
        };
        let key = match routed {
            Ok(key) => key,
            Err(e) => return refused("unauthenticated", None, e.into()),
        };
        // 2. who is calling (`handle` asks for every request on the route)
        let client = match caller.unwrap_or(Err(AuthError::Missing)) {
            Ok(client) => client,
            Err(e) => {
                self.metrics
                    .inbound_auth_failures_total
                    .with_label_values(&[e.label()])
                    .inc();
                return refused("unauthenticated", Some(key), e.into());
            }
        };
        // 3. cache: a hit is answered here, with no await; 4. coalesce: the rest waits in
        // a future of its own, boxed so a hit does not carry (and move, request after
        // request) the wait's state in its own.
        match self.look(&key, &client, started) {
            Flight::Hit(stored) => Handled::hit(client, key, stored, started),
            flight => Box::pin(self.settle(key, client, flight, request_id)).await,
        }
    }

    /// The cache lookup as of `now`, in its own span when tracing is on.
    fn look(&self, key: &StatusRequest, client: &Arc<str>, now: Instant) -> Flight<GatewayError> {
        let mut lookup = crate::telemetry::child("cache lookup", SpanKind::Internal);
        let flight = self.cache.lookup(key, client, now);
        lookup.set(
            "gateway.cache.lookup",
            crate::telemetry::flight_label(&flight),
        );
        flight
    }

    /// Step 4 for a key not answered from memory: waits for the flight `flight` joined or
    /// leads. A flight refused by its leader's client's share is that client's refusal
    /// alone: a follower of another client asks again under its own charge (leading a new
    /// flight or joining one), within its own wait.
    async fn settle(
        self: Arc<Self>,
        key: StatusRequest,
        client: Arc<str>,
        mut flight: Flight<GatewayError>,
        request_id: &HeaderValue,
    ) -> Handled {
        let waited = Instant::now() + self.request_timeout + Duration::from_secs(1);
        let (result, cache, tries, now) = loop {
            let (rx, cache, tries, leader) = match flight {
                Flight::Hit(stored) => return Handled::hit(client, key, stored, Instant::now()),
                Flight::Follow(rx, leader) => (rx, CacheOutcome::Coalesced, None, leader),
                Flight::Lead(leader) => {
                    let rx = leader.rx.clone();
                    let tries = self.lead(leader, &key, request_id, &client);
                    (rx, CacheOutcome::Miss, Some(tries), client.clone())
                }
            };
            let result = wait(rx, waited.saturating_duration_since(Instant::now())).await;
            let now = Instant::now();
            if leader != client && share_refusal(&result) && now < waited {
                flight = self.look(&key, &client, now);
                continue;
            }
            if cache == CacheOutcome::Coalesced {
                self.metrics.coalesced_requests_total.inc();
            }
            break (result, cache, tries, now);
        };
        let tries = tries.map_or(0, |t| t.load(Ordering::Relaxed));
        // Another replica's answer: from the shared cache a HIT, from its flight COALESCED,
        // for this flight's leader and followers alike.
        let cache = match &result {
            Ok(stored) => match stored.origin {
                Origin::SharedCache => CacheOutcome::Hit,
                Origin::Peer => {
                    if cache == CacheOutcome::Miss {
                        self.metrics.coalesced_requests_total.inc();
                    }
                    CacheOutcome::Coalesced
                }
                Origin::HubSpot => cache,
            },
            Err(_) => cache,
        };
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
                at: Instant::now(),
            };
        }
        Handled {
            client,
            key: Some(key),
            cache,
            tries,
            result,
            fwd_status: None,
            at: now,
        }
    }

    /// Starts `leader`'s fetch of `key` in its own task, charged to `client`; returns the
    /// count of HubSpot calls it makes.
    fn lead(
        self: &Arc<Self>,
        leader: crate::cache::Leader<GatewayError>,
        key: &StatusRequest,
        request_id: &HeaderValue,
        client: &Arc<str>,
    ) -> Arc<AtomicU32> {
        let gateway = self.clone();
        let request_id = request_id.clone();
        let fetched = key.clone();
        // The leader's client is charged for the HubSpot calls its flight makes.
        let charged = client.clone();
        let tries = Arc::new(AtomicU32::new(0));
        let counted = tries.clone();
        // The fetch runs in its own task, so a leader that hangs up does not cancel it
        // for the followers. Should it panic, dropping `leader` ends the flight and
        // its callers get an internal error at once. The fetch's spans belong to the
        // leader's request.
        let cx = crate::telemetry::current();
        tokio::spawn(async move {
            let fetch =
                crate::telemetry::within(cx, gateway.fetch_shared(fetched, request_id, charged));
            let (outcome, share) = crate::log::counting_tries(counted, fetch).await;
            // Taken before the outcome moves into the cache; sent after it answered
            // this replica's callers, so Redis is never on their path.
            let owed = share.map(|share| {
                let answer = outcome.as_ref().ok().and_then(|s| shareable(s, &share));
                let store = outcome
                    .as_ref()
                    .is_ok_and(|s| s.origin == Origin::HubSpot && s.is_fresh_terminal());
                (share, answer, store)
            });
            gateway.cache.complete(leader, outcome);
            if let Some((share, answer, store)) = owed {
                share
                    .finish(answer, store, gateway.cache.terminal_ttl())
                    .await;
            }
        });
        tries
    }

    /// A leader's fetch: in cluster mode the shared cache, then the task's flight across
    /// replicas, and HubSpot only for the flight's leader; without `[cluster]`, without a
    /// hub id to key Redis by, or when Redis fails, this replica's own call. Returns what
    /// the leader then owes the other replicas.
    async fn fetch_shared(
        &self,
        key: StatusRequest,
        request_id: HeaderValue,
        client: Arc<str>,
    ) -> (Result<Stored, GatewayError>, Option<Share>) {
        // One deadline for the whole fetch (waiting on another replica, the 401 refresh and
        // retry included), so the fetch never outlives the callers waiting for it.
        let deadline = Instant::now() + self.request_timeout;
        // Keyed by the account of the token in service: a task is never shared across hubs.
        let token = self.tokens.current().ok();
        let hub = token.as_ref().and_then(|t| t.hub_id);
        let (Some(cluster), Some(hub)) = (self.cluster.clone(), hub) else {
            if self.cluster.is_some()
                && token.is_some()
                && !self.hubless_warned.swap(true, Ordering::Relaxed)
            {
                tracing::warn!(
                    "cluster mode: HubSpot did not say which account the token belongs to, so this replica shares no answer and no flight (its calls are its own)"
                );
            }
            return (
                self.fetch(key, request_id, deadline, client, None).await,
                None,
            );
        };
        let task = TaskKey::new(hub, key.task_id.as_str());
        // One round trip: the shared cache, else the flight (wait for its leader, or lead
        // if the shared budget admits the first call), in one atomic step, so no replica
        // stores an answer between the look and the lease.
        let charge = Charge {
            client: &client,
            share: self.auth.share(&client),
            hub_id: Some(hub),
            first: None,
        };
        let ask = self.hubspot.budget().shared_ask(&charge);
        let flight = match cluster.lookup(&task, deadline.into(), ask).await {
            Ok(cluster::Lookup::Cached(found)) => {
                match self
                    .adopt(found.answer, Origin::SharedCache, found.age)
                    .filter(Stored::is_fresh_terminal)
                {
                    Some(hit) => return (Ok(hit), None),
                    // Stored but not a HIT here (past this replica's `terminal_ttl`, or a
                    // status this build cannot serve): the flight decides.
                    None => cluster.join_flight(&task, deadline.into()).await,
                }
            }
            Ok(cluster::Lookup::Flight(flight)) => Ok(flight),
            // The budget's refusal reaches the caller as the upstream client gives it (its
            // metrics included); no lease was taken, so nothing is owed to other replicas.
            Ok(cluster::Lookup::Refused { wait, reason }) => {
                let first = FirstTry::new(cluster::Admission::Refused { wait, reason });
                let fetched = self.fetch(key, request_id, deadline, client, Some(&first));
                return (fetched.await, None);
            }
            Err(e) => Err(e),
        };
        let mut lease = match flight {
            Ok(cluster::Flight::Leader(lease)) => lease,
            Ok(cluster::Flight::Answer(answer)) => {
                if let Some(stored) = self.adopt(answer, Origin::Peer, Duration::ZERO) {
                    return (Ok(stored), None);
                }
                // An answer this build cannot pass on: ask HubSpot rather than fail.
                return (
                    self.fetch(key, request_id, deadline, client, None).await,
                    None,
                );
            }
            // The other replica's call outlived this caller's deadline: what a caller gets
            // when HubSpot is too slow.
            Ok(cluster::Flight::DeadlineReached) => return (Err(GatewayError::WaitTimeout), None),
            // Redis down or failing: this replica asks HubSpot itself.
            Err(_) => {
                return (
                    self.fetch(key, request_id, deadline, client, None).await,
                    None,
                );
            }
        };
        if Instant::now() >= deadline {
            // Taken over as the deadline passed: nothing can be asked in time. Dropping the
            // lease releases it for a waiter with time left.
            return (Err(GatewayError::WaitTimeout), None);
        }
        let first = lease.take_admission().map(FirstTry::new);
        let share = Share {
            cluster: cluster.clone(),
            task,
            lease,
        };
        (
            self.fetch(key, request_id, deadline, client, first.as_ref())
                .await,
            Some(share),
        )
    }

    /// Another replica's answer as this replica stores and serves it; `None` when its
    /// status or a header is not one HTTP allows (a newer build's, or damaged bytes).
    fn adopt(&self, answer: cluster::Answer, origin: Origin, age: Duration) -> Option<Stored> {
        let status = StatusCode::from_u16(answer.status).ok()?;
        let mut headers = hyper::HeaderMap::with_capacity(answer.headers.len());
        for (name, value) in answer.headers {
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            headers.append(name, HeaderValue::from_maybe_shared(value).ok()?);
        }
        Some(
            self.cache
                .shared_entry(origin, status, headers, answer.body, answer.hub_id, age),
        )
    }

    /// Steps 5–7: token, upstream, classify, by `deadline`; `first` is the shared budget's
    /// answer for the first call when the flight's lookup took it.
    async fn fetch(
        &self,
        key: StatusRequest,
        request_id: HeaderValue,
        deadline: Instant,
        client: Arc<str>,
        first: Option<&FirstTry>,
    ) -> Result<Stored, GatewayError> {
        let mut token = {
            let mut wait = crate::telemetry::child("token wait", SpanKind::Internal);
            let token = self.tokens.current();
            wait.set("gateway.token.ready", token.is_ok());
            token?
        };
        let mut answer = self
            .ask(&key, &token, &request_id, deadline, &client, first)
            .await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            // HubSpot refused a token we believe valid: one forced refresh (single-flight,
            // rate-limited in the token manager), one retry, and whatever that answers.
            let wait = deadline.saturating_duration_since(Instant::now());
            let mut waited = crate::telemetry::child("token refresh wait", SpanKind::Internal);
            let refreshed = self.tokens.force_refresh(token.generation, wait).await;
            waited.set("gateway.token.refreshed", refreshed);
            drop(waited);
            if refreshed {
                token = self.tokens.current()?;
                answer = self
                    .ask(&key, &token, &request_id, deadline, &client, None)
                    .await?;
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

    /// Asks HubSpot with `token`, never past its use-by time, charging `client` (`first`:
    /// the shared budget's answer already taken for the first try).
    async fn ask(
        &self,
        key: &StatusRequest,
        token: &ActiveToken,
        request_id: &HeaderValue,
        deadline: Instant,
        client: &str,
        first: Option<&FirstTry>,
    ) -> Result<Answer, UpstreamError> {
        let charge = Charge {
            client,
            share: self.auth.share(client),
            hub_id: token.hub_id,
            first,
        };
        self.hubspot
            .get_status(
                key,
                &token.access,
                token.usable_until,
                request_id,
                deadline,
                &charge,
            )
            .await
    }

    /// Step 8: the stored answer as a response, with the gateway's cache headers added to
    /// `headers` (empty); `fwd_status` is what a STALE answer stands in for, `at` when the
    /// answer was found.
    fn reply(
        &self,
        stored: &Stored,
        cache: CacheOutcome,
        fwd_status: Option<StatusCode>,
        at: Instant,
        headers: hyper::HeaderMap,
    ) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(stored.body.clone()));
        *response.status_mut() = stored.status;
        *response.headers_mut() = headers;
        let headers = response.headers_mut();
        let from_memory = matches!(cache, CacheOutcome::Hit | CacheOutcome::Stale);
        for (name, value) in &stored.headers {
            let rate_header = name.as_str().starts_with("x-hubspot-ratelimit-");
            if !(rate_header && from_memory) {
                headers.append(name, value.clone());
            }
        }
        if from_memory {
            let age = at.saturating_duration_since(stored.stored_at).as_secs();
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
    /// another replica would share the account's limit); in cluster mode, whether Redis is
    /// in use (ready either way: without it the replica serves correctly in local mode).
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
        let cluster = self.cluster.as_ref().map(|c| ClusterState {
            backend: if c.is_up() { "up" } else { "down" },
        });
        Readiness {
            cluster,
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
    /// In cluster mode, the shared backend's state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterState>,
}

/// The cluster backend as `/readyz` shows it. `down` leaves the gateway ready: each replica
/// then serves with its local share of the budget, its own cache and single-flight.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClusterState {
    /// `up` (budget, cache and flights shared through Redis) or `down` (local mode).
    pub backend: &'static str,
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

impl Share {
    /// Step 9: a terminal answer of this replica's own call goes to the shared cache for
    /// `ttl`, then `answer` (any HubSpot answer, PENDING and HubSpot's errors included, as
    /// local followers get them) to the replicas waiting on the flight. Without an answer
    /// (no HubSpot answer to pass on: unreachable, too slow, the budget refused, no token)
    /// the lease is released, so a waiting replica takes the flight over within its own
    /// deadline instead of getting this replica's error: that failure may be this
    /// replica's alone, and the gateway's own errors are not HubSpot answers to replay.
    /// Redis failing here is only counted: the callers already have their answer.
    async fn finish(self, answer: Option<cluster::Answer>, store: bool, ttl: Duration) {
        let Some(answer) = answer else { return };
        if store {
            let _ = self.cluster.cache_put(&self.task, &answer, ttl).await;
        }
        let _ = self.lease.publish(&answer).await;
    }
}

/// An answer of `share`'s hub as replicas exchange it: HubSpot's status, the headers a
/// replay sends and the body. `None` for another hub's answer (the token changed account
/// during the call), which is never shared.
fn shareable(stored: &Stored, share: &Share) -> Option<cluster::Answer> {
    (stored.hub_id() == Some(share.task.hub_id)).then(|| cluster::Answer {
        hub_id: share.task.hub_id,
        status: stored.status.as_u16(),
        headers: stored
            .headers
            .iter()
            .map(|(name, value)| {
                (
                    name.as_str().to_owned(),
                    Bytes::copy_from_slice(value.as_bytes()),
                )
            })
            .collect(),
        body: stored.body.clone(),
    })
}

/// Whether a flight ended in its leader's client's share refusal (no HubSpot answer: the
/// budget would not charge that client one more call).
fn share_refusal(result: &Outcome<GatewayError>) -> bool {
    matches!(
        result.as_ref().map_err(|e| &**e),
        Err(GatewayError::Upstream(UpstreamError::Throttled(Throttle {
            by: ThrottleSource::ClientShare,
            ..
        })))
    )
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

/// The caller's `X-Request-Id` when it is short and printable, else a new one. The caller's
/// is copied: a clone would be a slice of the connection's read buffer (see `handle`).
fn request_id(headers: &hyper::HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            !v.is_empty() && v.len() <= 128 && v.as_bytes().iter().all(|b| b.is_ascii_graphic())
        })
        .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        .unwrap_or_else(|| {
            // uuid's `fast-rng` draws from the thread's generator: no syscall per request.
            let mut buf = uuid::Uuid::encode_buffer();
            HeaderValue::from_str(uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf))
                .expect("a uuid is a valid header value")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request's header map carries the answer's headers emptied, and only while it is
    /// small: a map a request made large is dropped, not kept on the connection.
    #[test]
    fn only_a_small_request_map_is_recycled() {
        let mut small = hyper::HeaderMap::new();
        small.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        small.insert(header::HOST, HeaderValue::from_static("gw"));
        let capacity = small.capacity();
        let kept = recycled(small);
        assert!(kept.is_empty(), "the caller's headers are gone");
        assert_eq!(kept.capacity(), capacity, "its storage is reused");

        let mut large = hyper::HeaderMap::new();
        for i in 0..100 {
            let name = HeaderName::try_from(format!("x-h{i}")).expect("a header name");
            large.insert(name, HeaderValue::from_static("v"));
        }
        let fresh = recycled(large);
        assert!(fresh.is_empty());
        assert!(fresh.capacity() <= 12, "capacity {}", fresh.capacity());
    }
}

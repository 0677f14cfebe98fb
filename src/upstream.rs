//! The HubSpot client: pooled hyper over rustls, deadlines, retries, and HubSpot's 429s read
//! into the outbound budget ([`crate::budget`]).

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use crate::budget::{Budget, Charge};
pub use crate::budget::{HoldStatus, Throttle, ThrottleSource, daily_hold};
use crate::cluster::ClusterBackend;
use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::proxy::Egress;
use crate::route::StatusRequest;
use crate::secret::Secret;
use std::sync::Arc;

/// Headers of HubSpot's answer that reach the caller; everything else stays here.
const KEPT_HEADERS: &[&str] = &[
    "content-type",
    "x-hubspot-correlation-id",
    "retry-after",
    "x-hubspot-ratelimit-interval-milliseconds",
    "x-hubspot-ratelimit-max",
    "x-hubspot-ratelimit-remaining",
    "x-hubspot-ratelimit-daily",
    "x-hubspot-ratelimit-daily-remaining",
    "x-hubspot-ratelimit-secondly",
    "x-hubspot-ratelimit-secondly-remaining",
];

/// The largest answer body read from HubSpot.
pub const MAX_BODY: usize = 1 << 20;
/// The longest hold a `DAILY` 429 can impose: a daily limit resets within a day whatever the
/// account's time zone, so a longer `Retry-After` is taken as this. `upstream.max_hold` does
/// not apply to `DAILY` holds.
pub const MAX_DAILY_HOLD: Duration = Duration::from_secs(24 * 3600);
/// The hold after a 429 (other than `DAILY`) that says neither `Retry-After` nor
/// `X-HubSpot-RateLimit-Interval-Milliseconds`: HubSpot's ten-secondly window.
const DEFAULT_HOLD: Duration = Duration::from_secs(10);
/// The shortest hold after a 429: one that named a time already past still holds for this,
/// so the gateway never answers a 429 by calling again at once.
const MIN_HOLD: Duration = Duration::from_secs(1);

/// How many times one status request is tried at most.
const MAX_TRIES: u32 = 3;

/// An answer as HubSpot sent it: status, the kept headers, and the body bytes untouched.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The rate-limit policy a HubSpot 429 names in its body's `policyName`. Anything HubSpot
/// may add later is `Unknown`, so metric labels stay bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// `TEN_SECONDLY_ROLLING`: the burst limit per app and account; also the gateway's own
    /// budget, which mirrors it.
    TenSecondlyRolling,
    /// `SECONDLY`: the per-second limit of some endpoints.
    Secondly,
    /// `DAILY`: the account's daily limit, reset at midnight in the account's time zone.
    Daily,
    /// Any other or no `policyName`.
    Unknown,
}

impl Policy {
    /// Every policy, in label order (for metric series created at start).
    pub const ALL: [Policy; 4] = [
        Policy::TenSecondlyRolling,
        Policy::Secondly,
        Policy::Daily,
        Policy::Unknown,
    ];

    /// HubSpot's name for it; the `policy_name` label of `upstream_429_total` and the
    /// `policyName` of the gateway's own 429 bodies.
    pub fn label(self) -> &'static str {
        match self {
            Policy::TenSecondlyRolling => "TEN_SECONDLY_ROLLING",
            Policy::Secondly => "SECONDLY",
            Policy::Daily => "DAILY",
            Policy::Unknown => "unknown",
        }
    }

    /// The policy a 429 body names; a body that is not JSON or names none is `Unknown`.
    pub fn from_body(body: &[u8]) -> Policy {
        #[derive(serde::Deserialize)]
        struct RateLimited<'a> {
            #[serde(rename = "policyName", borrow)]
            policy_name: Option<std::borrow::Cow<'a, str>>,
        }
        let name = serde_json::from_slice::<RateLimited>(body)
            .ok()
            .and_then(|b| b.policy_name);
        match name.as_deref() {
            Some("TEN_SECONDLY_ROLLING") => Policy::TenSecondlyRolling,
            Some("SECONDLY") => Policy::Secondly,
            Some("DAILY") => Policy::Daily,
            _ => Policy::Unknown,
        }
    }
}

/// Reads a `Retry-After` value in either form RFC 9110 allows: delay-seconds (`120`) or an
/// HTTP-date (`Sun, 06 Nov 1994 08:49:37 GMT`, and the two obsolete date formats), as the
/// time from `now`. A date already past is zero. Anything else (`-5`, `1.5`, `soon`, a
/// number too large for 64 bits, an empty value) is `None`: it is never passed on.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim_matches([' ', '\t']);
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// `wait` as a `Retry-After` value: whole seconds, rounded up, at least 1 (what HubSpot's
/// clients and RFC 9110 expect; `0` would invite an immediate retry).
pub fn retry_after_value(wait: Duration) -> HeaderValue {
    let secs = wait
        .as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0));
    HeaderValue::from(secs.max(1))
}

/// Why no answer came from HubSpot.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HubSpot is unreachable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("HubSpot did not answer within the deadline")]
    Timeout,
    /// The outbound budget refused the call: which budget, for how long, its quota.
    #[error("upstream calls are held back ({}, {})", .0.by.label(), .0.policy.label())]
    Throttled(Throttle),
    /// HubSpot answered with more than [`MAX_BODY`] bytes: not a status answer, not relayed.
    #[error("HubSpot's answer is larger than the {limit} bytes the gateway relays")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The gateway could not put the request together; nothing was sent.
    #[error("the request to HubSpot could not be built")]
    Request(#[from] RequestError),
}

/// A try span's `error.type`: why no answer came.
fn error_type(e: &UpstreamError) -> &'static str {
    match e {
        UpstreamError::Unavailable(_) => "unavailable",
        UpstreamError::Timeout => "timeout",
        UpstreamError::Throttled { .. } => "throttled",
        UpstreamError::TooLarge { .. } => "too_large",
        UpstreamError::Request(_) => "request",
    }
}

/// Why a request to HubSpot could not be built. Neither cause carries the offending value,
/// so a token never reaches a log line through this error.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The base URL and path do not make a URI.
    #[error("the upstream URI is invalid")]
    Uri(#[source] hyper::http::Error),
    /// The bearer holds bytes a header value cannot carry.
    #[error("the bearer token is not a valid header value")]
    Bearer(#[source] InvalidHeaderValue),
}

/// Why the HubSpot client cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error(transparent)]
    Proxy(#[from] crate::proxy::RouteError),
}

/// The pooled client every call to HubSpot goes through.
pub struct HubSpot {
    client: Client<HttpsConnector<Egress>, Full<Bytes>>,
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    base_path: String,
    /// `upstream.api_version`: every status call uses it, whatever the caller's version.
    api_version: crate::route::ApiVersion,
    request_timeout: Duration,
    user_agent: HeaderValue,
    budget: Budget,
    max_hold: Duration,
    metrics: Metrics,
}

impl HubSpot {
    /// Builds the client from validated config, reading the proxy password and proxy
    /// variables from the process environment. With `cluster`, the outbound budget is the
    /// account's, shared with every replica through it.
    pub fn new(
        config: &UpstreamConfig,
        metrics: Metrics,
        cluster: Option<Arc<ClusterBackend>>,
    ) -> Result<HubSpot, SetupError> {
        HubSpot::with_env(config, metrics, cluster, &|name| std::env::var(name).ok())
    }

    /// [`HubSpot::new`] with `env` standing for the process environment.
    pub fn with_env(
        config: &UpstreamConfig,
        metrics: Metrics,
        cluster: Option<Arc<ClusterBackend>>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HubSpot, SetupError> {
        let route = crate::proxy::route(config, env)?;
        if let Some(proxy) = route.proxy() {
            tracing::info!(%proxy, "HubSpot connections tunnel through the proxy");
        }
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        // TLS wraps the tunnel, so it runs from the gateway to HubSpot end to end.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(Egress::new(&route, http));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(https);
        let base = &config.base_url;
        Ok(HubSpot {
            client,
            scheme: base.scheme().clone(),
            authority: base.authority().clone(),
            base_path: base.path().to_owned(),
            api_version: config.api_version,
            request_timeout: config.request_timeout,
            user_agent: HeaderValue::from_static(concat!(
                "hubspot-files-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            budget: Budget::new(config, cluster),
            max_hold: config.max_hold,
            metrics,
        })
    }

    /// Asks HubSpot for one task's status with `bearer` by `deadline`: within the outbound
    /// budget (every try charged to `charge`'s client and account), each try bounded by half the request timeout (so a hung connection leaves time
    /// for one more), retried on connect errors, timed-out tries and 502/503/504 while the
    /// deadline and the bearer's `usable_until` allow.
    pub async fn get_status(
        &self,
        req: &StatusRequest,
        bearer: &Secret,
        usable_until: Option<Instant>,
        request_id: &HeaderValue,
        deadline: Instant,
        charge: &Charge<'_>,
    ) -> Result<Answer, UpstreamError> {
        let path = req.upstream_path(self.api_version);
        let per_try = self.request_timeout / 2;
        let mut attempt = 0;
        let mut last: Option<Result<Answer, UpstreamError>> = None;
        loop {
            attempt += 1;
            // Built before the budget is touched: a request that cannot be built is not sent.
            let request = self.request(Method::GET, &path, Some(bearer), Some(request_id), None)?;
            let permit = match self.budget.acquire(charge).await {
                Ok(permit) => permit,
                Err(throttle) => {
                    self.metrics
                        .upstream_throttled_total
                        .with_label_values(&[throttle.by.label()])
                        .inc();
                    if throttle.by == ThrottleSource::ClientShare {
                        self.metrics
                            .client_share_refusals_total
                            .with_label_values(&[charge.client])
                            .inc();
                    }
                    // A retry that finds the budget spent returns what HubSpot last said.
                    return last.unwrap_or(Err(UpstreamError::Throttled(throttle)));
                }
            };
            self.metrics
                .client_upstream_calls_total
                .with_label_values(&[charge.client])
                .inc();
            crate::log::upstream_try();
            // One span per call sent (nothing when tracing is off); a try the budget or a
            // hold refused sent nothing, and shows on the server span.
            let mut span = crate::telemetry::child(
                "HubSpot GET status",
                opentelemetry::trace::SpanKind::Client,
            );
            span.set("http.request.method", "GET");
            span.set("gateway.attempt", i64::from(attempt));
            let started = Instant::now();
            let result = self.send(request, deadline.min(started + per_try)).await;
            // HubSpot received the call, if at all, before its answer or the error came back;
            // a try that timed out may still reach it, so it keeps its place at admission +
            // the request timeout.
            if !matches!(result, Err(UpstreamError::Timeout)) {
                permit.answered();
            }
            let code = match &result {
                Ok(a) => a.status.as_str().to_owned(),
                Err(_) => "error".to_owned(),
            };
            self.metrics
                .upstream_requests_total
                .with_label_values(&[&code])
                .inc();
            self.metrics
                .upstream_request_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            match &result {
                Ok(a) => {
                    span.set("http.response.status_code", i64::from(a.status.as_u16()));
                    span.set(
                        "gateway.throttled",
                        a.status == StatusCode::TOO_MANY_REQUESTS,
                    );
                }
                Err(e) => span.set("error.type", error_type(e)),
            }
            drop(span);
            let retryable = match &result {
                Ok(a) => matches!(a.status.as_u16(), 502..=504),
                Err(UpstreamError::Unavailable(_) | UpstreamError::Timeout) => true,
                // An oversized answer would be as large again: one call is enough.
                Err(
                    UpstreamError::Throttled(_)
                    | UpstreamError::Request(_)
                    | UpstreamError::TooLarge { .. },
                ) => false,
            };
            let mut result = result;
            if let Ok(answer) = &mut result {
                self.observe_rate_headers(answer, charge.hub_id).await;
            }
            let backoff = Duration::from_millis(50 << attempt)
                + Duration::from_millis(rand::rng().random_range(0..50));
            let retry_at = Instant::now() + backoff;
            // Never send the token after it stops being usable, even on a retry.
            let usable = usable_until.is_none_or(|t| retry_at < t);
            if !retryable || attempt >= MAX_TRIES || retry_at >= deadline || !usable {
                return result;
            }
            last = Some(result);
            tokio::time::sleep(backoff).await;
        }
    }

    /// Posts a form (the OAuth endpoints); one try, no budget: token calls are not API calls.
    pub async fn post_form(
        &self,
        path: &str,
        fields: &[(&str, &str)],
    ) -> Result<Answer, UpstreamError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let request = self.request(
            Method::POST,
            path,
            None,
            None,
            Some(("application/x-www-form-urlencoded", body.into())),
        )?;
        self.send(request, Instant::now() + self.request_timeout)
            .await
    }

    /// Posts JSON (the private-app token-info endpoint); one try.
    pub async fn post_json(&self, path: &str, json: Vec<u8>) -> Result<Answer, UpstreamError> {
        let request = self.request(
            Method::POST,
            path,
            None,
            None,
            Some(("application/json", json.into())),
        )?;
        self.send(request, Instant::now() + self.request_timeout)
            .await
    }

    /// A plain GET without credentials (the v1 access-token info endpoint); one try.
    pub async fn get(&self, path: &str) -> Result<Answer, UpstreamError> {
        let request = self.request(Method::GET, path, None, None, None)?;
        self.send(request, Instant::now() + self.request_timeout)
            .await
    }

    /// The request for `path` under the base URL, with the gateway's own headers and, when
    /// given, the bearer, the request id and a body of `content type, bytes`.
    fn request(
        &self,
        method: Method,
        path: &str,
        token: Option<&Secret>,
        request_id: Option<&HeaderValue>,
        body: Option<(&'static str, Bytes)>,
    ) -> Result<Request<Full<Bytes>>, RequestError> {
        let uri = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{}", self.base_path, path))
            .build()
            .map_err(RequestError::Uri)?;
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.method_mut() = method;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert(header::USER_AGENT, self.user_agent.clone());
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(RequestError::Bearer)?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        if let Some(id) = request_id {
            headers.insert(HeaderName::from_static("x-request-id"), id.clone());
        }
        if let Some((content_type, bytes)) = body {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            *request.body_mut() = Full::new(bytes);
        }
        Ok(request)
    }

    async fn send(
        &self,
        request: Request<Full<Bytes>>,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let call = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| UpstreamError::Unavailable(Box::new(e)))?;
            let (parts, body) = response.into_parts();
            // A status answer is about a kilobyte; anything far larger is not one. A declared
            // length over the limit is refused before a byte of the body is read.
            let too_large = UpstreamError::TooLarge { limit: MAX_BODY };
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > MAX_BODY as u64) {
                return Err(too_large);
            }
            let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large),
                Err(e) => return Err(UpstreamError::Unavailable(e)),
            };
            let mut headers = HeaderMap::new();
            for name in KEPT_HEADERS {
                for value in parts.headers.get_all(*name) {
                    headers.append(HeaderName::from_static(name), value.clone());
                }
            }
            Ok(Answer {
                status: parts.status,
                headers,
                body,
            })
        };
        match tokio::time::timeout_at(deadline.into(), call).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// Follows HubSpot's own view of the budget: the remaining gauge, and a 429's hold. The
    /// caller's `Retry-After` is always the gateway's own (whole seconds until the hold it
    /// set ends), never HubSpot's value verbatim; another answer's `Retry-After` (a 503's)
    /// is passed on in that form when valid and dropped when not. A 429 also gets the
    /// `RateLimit-*` headers of the hold it started, and holds every replica in cluster mode.
    async fn observe_rate_headers(&self, answer: &mut Answer, hub_id: Option<u64>) {
        let number = |name: &str| {
            answer
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(remaining) = number("x-hubspot-ratelimit-remaining") {
            self.metrics
                .upstream_ratelimit_remaining
                .set(i64::try_from(remaining).unwrap_or(i64::MAX));
        }
        let now = SystemTime::now();
        let retry_after = answer
            .headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, now));
        if answer.status != StatusCode::TOO_MANY_REQUESTS {
            match retry_after {
                Some(wait) => answer
                    .headers
                    .insert(header::RETRY_AFTER, retry_after_value(wait)),
                None => answer.headers.remove(header::RETRY_AFTER),
            };
            return;
        }
        let policy = Policy::from_body(&answer.body);
        self.metrics
            .upstream_429_total
            .with_label_values(&[policy.label()])
            .inc();
        let (asked, cap) = match policy {
            // HubSpot resets daily limits at midnight in the account's time zone, which the
            // gateway cannot know: without a Retry-After, see `daily_hold`.
            Policy::Daily => (
                retry_after.unwrap_or_else(|| daily_hold(now, self.budget.daily_probing())),
                MAX_DAILY_HOLD,
            ),
            Policy::TenSecondlyRolling | Policy::Secondly | Policy::Unknown => (
                retry_after
                    .or_else(|| {
                        number("x-hubspot-ratelimit-interval-milliseconds")
                            .map(Duration::from_millis)
                    })
                    .unwrap_or(DEFAULT_HOLD),
                self.max_hold,
            ),
        };
        let asked = asked.max(MIN_HOLD);
        let quota = match policy {
            Policy::Daily => number("x-hubspot-ratelimit-daily"),
            Policy::TenSecondlyRolling | Policy::Secondly | Policy::Unknown => {
                number("x-hubspot-ratelimit-max")
            }
        };
        let limit = self.budget.hold_limit(policy, quota);
        let hold = self.budget.hold(asked, cap, policy, limit, hub_id).await;
        if hold.newly_capped {
            tracing::warn!(
                policy = policy.label(),
                asked_s = asked.as_secs(),
                held_s = hold.remaining.as_secs(),
                cap_s = cap.as_secs(),
                "HubSpot asked for a hold longer than the cap (upstream.max_hold; 24 h for DAILY); holding for the cap"
            );
        }
        for (name, value) in crate::budget::rate_limit_headers(limit, hold.remaining) {
            answer.headers.insert(name, value);
        }
    }

    /// The outbound budget every call here asks first.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }

    /// The hold in force after a HubSpot 429, if any.
    pub fn hold_status(&self) -> Option<HoldStatus> {
        self.budget.hold_status()
    }

    /// Brings the budget and hold gauges up to date (called when metrics are read).
    pub fn update_gauges(&self) {
        let m = &self.metrics;
        let (limit, remaining) = self.budget.gauges();
        m.upstream_budget_limit.set(i64::from(limit));
        m.upstream_budget_remaining.set(i64::from(remaining));
        m.upstream_hold_seconds.set(
            self.hold_status()
                .map_or(0.0, |h| h.remaining.as_secs_f64()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call charged to a client with a share of the whole budget.
    const CHARGE: Charge<'static> = Charge {
        client: "tests",
        share: Some(1.0),
        hub_id: None,
        first: None,
    };

    /// A bearer a header cannot carry, or a path a URI cannot, is a typed error before
    /// anything is sent or taken from the budget, never an empty request or a panic.
    #[tokio::test]
    async fn a_request_that_cannot_be_built_is_an_error() {
        let config = UpstreamConfig {
            rate_limit: crate::config::RateLimit {
                requests: 1,
                per: Duration::from_secs(60),
            },
            ..UpstreamConfig::default()
        };
        let hubspot = HubSpot::new(&config, Metrics::new(), None).expect("client");
        let req = crate::route::match_route(
            &Method::GET,
            "/files/v3/files/import-from-url/async/tasks/a/status",
        )
        .expect("route");
        let id = HeaderValue::from_static("id");
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..2 {
            let bad = Secret::new("pat-na1-\nsecret");
            match hubspot
                .get_status(&req, &bad, None, &id, deadline, &CHARGE)
                .await
            {
                Err(UpstreamError::Request(RequestError::Bearer(_))) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(
            hubspot.budget.acquire(&CHARGE).await.is_ok(),
            "the budget was not spent"
        );
        match hubspot.get("/oauth/v1/access-tokens/a b").await {
            Err(e @ UpstreamError::Request(RequestError::Uri(_))) => {
                assert!(!format!("{e:?}").contains("a b"));
            }
            other => panic!("{other:?}"),
        }
    }

    /// An answer over the limit is `TooLarge` whether it declares its length (refused before
    /// reading) or streams it in chunks (refused once the limit is passed), never
    /// `Unavailable`.
    #[tokio::test]
    async fn an_oversized_answer_is_too_large() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for chunked in [false, true] {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let mut head = [0u8; 4096];
                let _ = socket.read(&mut head).await;
                let body = vec![b' '; 2 * MAX_BODY];
                let reply = if chunked {
                    let mut r = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n".to_vec();
                    for chunk in body.chunks(64 * 1024) {
                        r.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                        r.extend_from_slice(chunk);
                        r.extend_from_slice(b"\r\n");
                    }
                    r.extend_from_slice(b"0\r\n\r\n");
                    r
                } else {
                    let mut r = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(&body);
                    r
                };
                let _ = socket.write_all(&reply).await;
            }
        });
        let config = UpstreamConfig {
            base_url: format!("http://{addr}")
                .parse()
                .expect("a loopback base_url"),
            ..UpstreamConfig::default()
        };
        let hubspot = HubSpot::new(&config, Metrics::new(), None).expect("client");
        for _ in 0..2 {
            match hubspot.get("/big").await {
                Err(UpstreamError::TooLarge { limit }) => assert_eq!(limit, MAX_BODY),
                other => panic!("{other:?}"),
            }
        }
    }

    /// The policies HubSpot documents are recognised; anything else is `unknown`.
    #[test]
    fn policy_names_are_bounded() {
        assert_eq!(
            Policy::from_body(br#"{"policyName":"DAILY"}"#),
            Policy::Daily
        );
        assert_eq!(
            Policy::from_body(br#"{"policyName":"SECONDLY"}"#),
            Policy::Secondly
        );
        assert_eq!(
            Policy::from_body(br#"{"policyName":"TEN_SECONDLY_ROLLING"}"#),
            Policy::TenSecondlyRolling
        );
        for body in [
            &br#"{"policyName":"HOURLY"}"#[..],
            b"{}",
            b"not json",
            br#"{"policyName":5}"#,
        ] {
            assert_eq!(Policy::from_body(body), Policy::Unknown);
        }
    }

    /// The examples of each form, and the invalid values callers must never see.
    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        // RFC 9110's example date, `now` + 20 s, in all three formats it accepts.
        for date in [
            "Sun, 06 Nov 1994 08:49:57 GMT",
            "Sunday, 06-Nov-94 08:49:57 GMT",
            "Sun Nov  6 08:49:57 1994",
        ] {
            assert_eq!(
                parse_retry_after(date, now),
                Some(Duration::from_secs(20)),
                "{date}"
            );
        }
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO)
        );
        for bad in [
            "-5",
            "1.5",
            "soon",
            "99999999999999999999",
            "",
            "+5",
            "5s",
            "0x10",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
    }
}

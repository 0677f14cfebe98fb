//! The HubSpot client: pooled hyper over rustls, deadlines, retries, and the outbound budget.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng;

use crate::config::UpstreamConfig;
use crate::metrics::Metrics;
use crate::route::StatusRequest;
use crate::secret::Secret;

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
const MAX_BODY: usize = 1 << 20;
/// The longest hold a 429 can impose; a larger `Retry-After` is taken as this.
const MAX_HOLD: Duration = Duration::from_secs(3600);

/// How many times one status request is tried at most.
const MAX_TRIES: u32 = 3;

/// An answer as HubSpot sent it: status, the kept headers, and the body bytes untouched.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Who held an upstream call back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleSource {
    /// HubSpot answered 429; every call waits until its interval is over.
    HubSpot429,
    /// The gateway's own budget (`upstream.rate_limit`) is spent.
    LocalBudget,
}

impl ThrottleSource {
    /// The `source` label of `upstream_throttled_total`.
    pub fn label(self) -> &'static str {
        match self {
            ThrottleSource::HubSpot429 => "hubspot_429",
            ThrottleSource::LocalBudget => "local_budget",
        }
    }
}

/// Why no answer came from HubSpot.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("HubSpot is unreachable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("HubSpot did not answer within the deadline")]
    Timeout,
    #[error("upstream calls are held back ({})", .by.label())]
    Throttled {
        /// How long until a call may go out again.
        retry_after: Duration,
        /// Who is holding calls back.
        by: ThrottleSource,
    },
    /// The gateway could not put the request together; nothing was sent.
    #[error("the request to HubSpot could not be built")]
    Request(#[from] RequestError),
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

/// The pooled client every call to HubSpot goes through.
pub struct HubSpot {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    base_path: String,
    request_timeout: Duration,
    user_agent: HeaderValue,
    budget: RateBudget,
    metrics: Metrics,
}

impl HubSpot {
    /// Builds the client from validated config.
    pub fn new(config: &UpstreamConfig, metrics: Metrics) -> Result<HubSpot, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
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
            request_timeout: config.request_timeout,
            user_agent: HeaderValue::from_static(concat!(
                "hubspot-files-gateway/",
                env!("CARGO_PKG_VERSION")
            )),
            budget: RateBudget::new(config.rate_limit.requests, config.rate_limit.per),
            metrics,
        })
    }

    /// Asks HubSpot for one task's status with `bearer` by `deadline`: within the outbound
    /// budget, each try bounded by half the request timeout (so a hung connection leaves time
    /// for one more), retried on connect errors, timed-out tries and 502/503/504 while the
    /// deadline and the bearer's `usable_until` allow.
    pub async fn get_status(
        &self,
        req: &StatusRequest,
        bearer: &Secret,
        usable_until: Option<Instant>,
        request_id: &HeaderValue,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let path = req.upstream_path();
        let per_try = self.request_timeout / 2;
        let mut attempt = 0;
        let mut last: Option<Result<Answer, UpstreamError>> = None;
        loop {
            attempt += 1;
            // Built before the budget is touched: a request that cannot be built is not sent.
            let request = self.request(Method::GET, &path, Some(bearer), Some(request_id), None)?;
            if let Err((retry_after, source)) = self.budget.acquire() {
                self.metrics
                    .upstream_throttled_total
                    .with_label_values(&[source.label()])
                    .inc();
                // A retry that finds the budget spent returns what HubSpot last said.
                return last.unwrap_or(Err(UpstreamError::Throttled {
                    retry_after,
                    by: source,
                }));
            }
            let started = Instant::now();
            let result = self.send(request, deadline.min(started + per_try)).await;
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
            let retryable = match &result {
                Ok(a) => matches!(a.status.as_u16(), 502..=504),
                Err(UpstreamError::Unavailable(_) | UpstreamError::Timeout) => true,
                Err(UpstreamError::Throttled { .. } | UpstreamError::Request(_)) => false,
            };
            let mut result = result;
            if let Ok(answer) = &mut result {
                self.observe_rate_headers(answer);
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
            // A status answer is about a kilobyte; anything far larger is not one.
            let body = http_body_util::Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(UpstreamError::Unavailable)?
                .to_bytes();
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

    /// Follows HubSpot's own view of the budget: the remaining gauge, and a 429's hold. A 429
    /// without `Retry-After` gets one, so callers learn how long the gateway will hold.
    fn observe_rate_headers(&self, answer: &mut Answer) {
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
                .set(remaining as i64);
        }
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            let wait = number("retry-after")
                .map(Duration::from_secs)
                .or_else(|| {
                    number("x-hubspot-ratelimit-interval-milliseconds").map(Duration::from_millis)
                })
                .unwrap_or(Duration::from_secs(10))
                .min(MAX_HOLD);
            self.budget.hold_for(wait);
            if !answer.headers.contains_key(header::RETRY_AFTER) {
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                answer
                    .headers
                    .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
        }
    }
}

/// HubSpot counts calls in a rolling window; so does this, exactly: a call is allowed when
/// fewer than `limit` calls were sent in the last `per`. After a HubSpot 429, every call is
/// held until the time HubSpot named.
struct RateBudget {
    limit: usize,
    per: Duration,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    sent: VecDeque<Instant>,
    hold_until: Option<Instant>,
}

impl RateBudget {
    fn new(limit: u32, per: Duration) -> RateBudget {
        RateBudget {
            limit: limit as usize,
            per,
            state: Mutex::new(BudgetState {
                sent: VecDeque::with_capacity(limit as usize),
                hold_until: None,
            }),
        }
    }

    /// Takes one call from the budget, or says how long to wait and why not.
    fn acquire(&self) -> Result<(), (Duration, ThrottleSource)> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(until) = s.hold_until {
            if until > now {
                return Err((until - now, ThrottleSource::HubSpot429));
            }
            s.hold_until = None;
        }
        while s
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= self.per)
        {
            s.sent.pop_front();
        }
        if s.sent.len() >= self.limit {
            let oldest = s.sent.front().copied().unwrap_or(now);
            return Err((
                self.per.saturating_sub(now.duration_since(oldest)),
                ThrottleSource::LocalBudget,
            ));
        }
        s.sent.push_back(now);
        Ok(())
    }

    fn hold_for(&self, wait: Duration) {
        let until = Instant::now() + wait;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.hold_until = Some(s.hold_until.map_or(until, |u| u.max(until)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_a_rolling_window() {
        let b = RateBudget::new(3, Duration::from_millis(200));
        for _ in 0..3 {
            assert!(b.acquire().is_ok());
        }
        let (wait, source) = b.acquire().expect_err("spent");
        assert_eq!(source, ThrottleSource::LocalBudget);
        assert!(wait <= Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(210));
        assert!(b.acquire().is_ok(), "window rolled over");
    }

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
        let hubspot = HubSpot::new(&config, Metrics::new()).expect("client");
        let req = crate::route::match_route(
            &Method::GET,
            "/files/v3/files/import-from-url/async/tasks/a/status",
        )
        .expect("route");
        let id = HeaderValue::from_static("id");
        let deadline = Instant::now() + Duration::from_secs(1);
        for _ in 0..2 {
            let bad = Secret::new("pat-na1-\nsecret");
            match hubspot.get_status(&req, &bad, None, &id, deadline).await {
                Err(UpstreamError::Request(RequestError::Bearer(_))) => {}
                other => panic!("{other:?}"),
            }
        }
        assert!(hubspot.budget.acquire().is_ok(), "the budget was not spent");
        match hubspot.get("/oauth/v1/access-tokens/a b").await {
            Err(e @ UpstreamError::Request(RequestError::Uri(_))) => {
                assert!(!format!("{e:?}").contains("a b"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_429_holds_every_call() {
        let b = RateBudget::new(100, Duration::from_secs(10));
        b.hold_for(Duration::from_secs(2));
        let (wait, source) = b.acquire().expect_err("held");
        assert_eq!(source, ThrottleSource::HubSpot429);
        assert!(wait > Duration::from_secs(1));
    }
}

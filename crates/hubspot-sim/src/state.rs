//! The simulator's memory: issued tokens, refresh tokens, the rate window, counters,
//! recorded requests, imported tasks and the faults in force.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;
use serde::Serialize;

use super::SimConfig;
use super::faults::Faults;

/// How many status-route requests `GET /__sim/requests` keeps.
const RECORDED_REQUESTS: usize = 1000;
/// How many status-route arrivals `GET /__sim/arrivals` keeps: small entries, so enough for
/// a benchmark's whole run.
const RECORDED_ARRIVALS: usize = 200_000;
/// Expired tokens are remembered this long (so a 401 can say "expired"), then forgotten.
const FORGET_EXPIRED_AFTER: Duration = Duration::from_secs(3600);
/// The app and user every simulated token belongs to.
pub(crate) const APP_ID: u64 = 4_123_456;
pub(crate) const USER_ID: u64 = 81_234_567;

/// Counters per endpoint and outcome (`GET /__sim/stats`). No secrets: counts only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// GET/HEAD on the status route (v3, 2026-03, 2026-09), whatever the answer.
    pub status_requests: u64,
    /// POST import-from-url.
    pub import_requests: u64,
    /// POST /oauth/{v1,v3,2026-03,2026-09}/token.
    pub token_requests: u64,
    /// Access tokens issued.
    pub tokens_issued: u64,
    /// POST /oauth/{v3,2026-03,2026-09}/token/introspect.
    pub introspect_requests: u64,
    /// The grant and introspection POSTs by path, so a client's OAuth version shows.
    pub oauth_requests_by_path: BTreeMap<String, u64>,
    /// GET /oauth/v1/access-tokens/{token}.
    pub access_token_info_requests: u64,
    /// POST /oauth/v2/private-apps/get/access-token-info.
    pub private_app_info_requests: u64,
    /// 429 answers on API routes.
    pub rate_limited: u64,
    /// 401 answers on API routes.
    pub unauthorized: u64,
    /// 403 answers on API routes.
    pub forbidden: u64,
    /// 404 answers on the status route.
    pub not_found: u64,
    /// 5xx answers on API routes (injected).
    pub server_errors: u64,
    /// Connections closed without an answer (injected).
    pub connection_resets: u64,
}

impl Stats {
    /// Counts an API answer under its outcome.
    pub(crate) fn count_answer(&mut self, status: hyper::StatusCode) {
        match status.as_u16() {
            401 => self.unauthorized += 1,
            403 => self.forbidden += 1,
            404 => self.not_found += 1,
            429 => self.rate_limited += 1,
            500..=599 => self.server_errors += 1,
            _ => {}
        }
    }
}

/// One status-route request as the simulator received it (`GET /__sim/requests`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecordedRequest {
    /// HTTP method.
    pub method: String,
    /// Path, as sent (not decoded).
    pub path: String,
    /// Query string, if any.
    pub query: Option<String>,
    /// Headers by lower-case name; repeated headers joined with ", ".
    pub headers: BTreeMap<String, String>,
}

/// When a status-route request reached the simulator (`GET /__sim/arrivals`), before any
/// latency or fault: what a rate limiter in front of it is judged by.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Arrival {
    /// Milliseconds since the simulator started (microsecond precision).
    pub at_ms: f64,
    /// The taskId asked for, decoded.
    pub task_id: String,
}

/// An access token the simulator issued.
#[derive(Debug, Clone)]
pub(crate) struct IssuedToken {
    pub scopes: Vec<String>,
    pub hub_id: u64,
    pub client_id: String,
    pub expires_at: Instant,
}

/// Who a bearer token belongs to, once it has been checked.
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    pub scopes: Vec<String>,
    pub hub_id: u64,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum AuthFailure {
    Missing,
    Unknown,
    Expired { ago: Duration },
}

/// What the rate window said about one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateOutcome {
    pub allowed: bool,
    pub max: u32,
    pub interval: Duration,
    pub remaining: u32,
}

/// A rolling window: at most `max` calls in any `interval`.
#[derive(Debug)]
pub(crate) struct RateWindow {
    limit: Option<(u32, Duration)>,
    calls: VecDeque<Instant>,
}

impl RateWindow {
    fn new(limit: Option<(u32, Duration)>) -> Self {
        Self {
            limit,
            calls: VecDeque::new(),
        }
    }

    /// Counts one call if the window has room. Refused calls are not counted, so a client
    /// that waits out the interval gets through again. `None` when unlimited.
    pub fn admit(&mut self, now: Instant) -> Option<RateOutcome> {
        let (max, interval) = self.limit?;
        while self
            .calls
            .front()
            .is_some_and(|t| now.duration_since(*t) >= interval)
        {
            self.calls.pop_front();
        }
        let used = u32::try_from(self.calls.len()).unwrap_or(u32::MAX);
        let allowed = used < max;
        if allowed {
            self.calls.push_back(now);
        }
        Some(RateOutcome {
            allowed,
            max,
            interval,
            remaining: max.saturating_sub(used.saturating_add(u32::from(allowed))),
        })
    }

    /// The window's numbers as for a refused call, without counting one (forced 429s).
    pub fn exhausted(&self) -> Option<RateOutcome> {
        let (max, interval) = self.limit?;
        Some(RateOutcome {
            allowed: false,
            max,
            interval,
            remaining: 0,
        })
    }

    fn clear(&mut self) {
        self.calls.clear();
    }
}

/// A task started with import-from-url; its status follows from its age.
#[derive(Debug, Clone)]
pub(crate) struct ImportedTask {
    pub started: Instant,
    pub requested_at: SystemTime,
    pub name: String,
    pub access: String,
}

/// Everything that changes while the simulator runs, behind one lock (never held across
/// an await). No `Debug`: it holds tokens.
pub(crate) struct State {
    pub faults: Faults,
    pub stats: Stats,
    pub requests: VecDeque<RecordedRequest>,
    pub arrivals: VecDeque<Arrival>,
    pub imports: HashMap<String, ImportedTask>,
    pub rate: RateWindow,
    tokens: HashMap<String, IssuedToken>,
    /// When the config names the refresh token, only these are accepted.
    allowed_refresh: Option<HashSet<String>>,
    /// Refresh tokens retired by rotation.
    retired_refresh: HashSet<String>,
    static_token: Option<String>,
    /// Private-app tokens added at run time, with fixed scopes (or `None`: the current ones).
    added_static: HashMap<String, Option<Vec<String>>>,
}

/// The simulator: its fixed config and its changing state.
pub(crate) struct Sim {
    pub config: SimConfig,
    /// The zero of every [`Arrival::at_ms`].
    pub started: Instant,
    state: Mutex<State>,
}

impl Sim {
    pub fn new(config: SimConfig) -> Self {
        let faults = Faults {
            latency_ms: u64::try_from(config.latency.as_millis()).unwrap_or(u64::MAX),
            fail_rate: config.fail_rate.clamp(0.0, 1.0),
            fail_status: 503,
            reset_rate: 0.0,
            token_down: false,
            token_status: None,
            token_latency_ms: 0,
            token_garbage: false,
            introspect_inactive: false,
            scopes: config.scopes.clone(),
            hub_id: config.hub_id,
            rotate_refresh_token: false,
            status_override: None,
            pad_bytes: 0,
        };
        let state = State {
            faults,
            stats: Stats::default(),
            requests: VecDeque::new(),
            arrivals: VecDeque::new(),
            imports: HashMap::new(),
            rate: RateWindow::new(config.rate_limit),
            tokens: HashMap::new(),
            allowed_refresh: config.refresh_token.clone().map(|t| HashSet::from([t])),
            retired_refresh: HashSet::new(),
            static_token: config.static_token.clone(),
            added_static: HashMap::new(),
        };
        Self {
            config,
            started: Instant::now(),
            state: Mutex::new(state),
        }
    }

    /// The state, even after a panic elsewhere poisoned the lock: counters stay usable.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    /// Keeps a status-route request for `GET /__sim/requests`.
    pub fn record(&mut self, request: RecordedRequest) {
        if self.requests.len() == RECORDED_REQUESTS {
            self.requests.pop_front();
        }
        self.requests.push_back(request);
    }

    /// Keeps a status-route arrival for `GET /__sim/arrivals`.
    pub fn arrive(&mut self, since_start: Duration, task_id: &str) {
        if self.arrivals.len() == RECORDED_ARRIVALS {
            self.arrivals.pop_front();
        }
        self.arrivals.push_back(Arrival {
            at_ms: since_start.as_secs_f64() * 1000.0,
            task_id: task_id.to_owned(),
        });
    }

    /// `POST /__sim/reset`: zero counters, forget recorded requests and arrivals, empty the
    /// rate window. Issued tokens, imports and faults stay.
    pub fn reset(&mut self) {
        self.stats = Stats::default();
        self.requests.clear();
        self.arrivals.clear();
        self.rate.clear();
    }

    /// Whether a refresh token may be used now.
    pub fn refresh_token_valid(&self, token: &str) -> bool {
        !token.is_empty()
            && !self.retired_refresh.contains(token)
            && self
                .allowed_refresh
                .as_ref()
                .is_none_or(|allowed| allowed.contains(token))
    }

    /// The refresh token to hand back: the same one, or with rotation a new one that
    /// replaces it.
    pub fn next_refresh_token(&mut self, presented: &str) -> String {
        if !self.faults.rotate_refresh_token {
            return presented.to_owned();
        }
        let fresh = format!("na1-{}", uuid::Uuid::new_v4());
        self.retired_refresh.insert(presented.to_owned());
        if let Some(allowed) = self.allowed_refresh.as_mut() {
            allowed.remove(presented);
            allowed.insert(fresh.clone());
        }
        fresh
    }

    /// Issues a new access token with the current scopes and hub.
    pub fn issue_token(
        &mut self,
        client_id: &str,
        ttl: Duration,
        now: Instant,
    ) -> (String, IssuedToken) {
        self.tokens.retain(|_, t| {
            now.checked_duration_since(t.expires_at)
                .is_none_or(|ago| ago < FORGET_EXPIRED_AFTER)
        });
        let token = opaque_token();
        let issued = IssuedToken {
            scopes: self.faults.scopes.clone(),
            hub_id: self.faults.hub_id,
            client_id: client_id.to_owned(),
            expires_at: now + ttl,
        };
        self.tokens.insert(token.clone(), issued.clone());
        self.stats.tokens_issued += 1;
        (token, issued)
    }

    /// An issued token, expired or not (introspection and v1 info report on both).
    pub fn issued(&self, token: &str) -> Option<&IssuedToken> {
        self.tokens.get(token)
    }

    /// One-shot fault: every issued access token stops working.
    pub fn revoke_all(&mut self) {
        self.tokens.clear();
    }

    /// One-shot fault: one more private-app token is accepted from now on.
    pub fn add_static_token(&mut self, token: String, scopes: Option<Vec<String>>) {
        if !token.is_empty() {
            self.added_static.insert(token, scopes);
        }
    }

    /// The scopes of `token` if it is a private-app token (configured or added), else `None`.
    pub fn static_token_scopes(&self, token: &str) -> Option<Vec<String>> {
        if self.static_token.as_deref() == Some(token) {
            return Some(self.faults.scopes.clone());
        }
        self.added_static
            .get(token)
            .map(|fixed| fixed.clone().unwrap_or_else(|| self.faults.scopes.clone()))
    }

    /// Checks an `Authorization` header value. A static token has its scopes (the configured
    /// one: the current scopes) and hub and never expires; `revoke_all` does not touch it.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
        now: Instant,
    ) -> Result<Caller, AuthFailure> {
        let token = authorization
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::Missing)?;
        if let Some(scopes) = self.static_token_scopes(token) {
            return Ok(Caller {
                scopes,
                hub_id: self.faults.hub_id,
            });
        }
        let issued = self.tokens.get(token).ok_or(AuthFailure::Unknown)?;
        match now.checked_duration_since(issued.expires_at) {
            Some(ago) => Err(AuthFailure::Expired { ago }),
            None => Ok(Caller {
                scopes: issued.scopes.clone(),
                hub_id: issued.hub_id,
            }),
        }
    }
}

/// Rolls a die for a fault that hits a share `rate` (0..=1) of requests.
pub(crate) fn chance(rate: f64) -> bool {
    rate > 0.0 && rand::rng().random_bool(rate.clamp(0.0, 1.0))
}

/// ~300 URL-safe characters, like HubSpot's access tokens (which vary in length).
fn opaque_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let len = rng.random_range(290..=310);
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

//! The HubSpot credential: obtained, verified for the required scopes, refreshed ahead of
//! expiry by one background task, and published to request handlers through a watch channel.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyper::StatusCode;
use rand::Rng;
use serde::Deserialize;
use tokio::sync::{Notify, watch};

use crate::config::{Credentials, OauthApi};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::{HubSpot, UpstreamError};

/// Backoff after a failed refresh: starts here, doubles, never exceeds `MAX_BACKOFF` (nor a
/// quarter of the token's lifetime, so a short-lived token recovers within a short step).
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The longest lifetime believed from a token response.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A token that never expires (static mode) is verified again this often.
const STATIC_REVERIFY: Duration = Duration::from_secs(600);
/// How often the static token file is checked for a new token.
const STATIC_POLL: Duration = Duration::from_secs(1);
/// An upstream 401 (or 403) forces at most one refresh (re-verification) this often.
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// A token that passed verification.
#[derive(Debug)]
pub struct ActiveToken {
    pub access: Secret,
    /// After this, the token is too close to expiry to send.
    pub usable_until: Option<Instant>,
    pub hub_id: Option<u64>,
    pub scopes: Vec<String>,
    /// Increases with every new token, so a caller can tell whether a refresh happened.
    pub generation: u64,
}

impl ActiveToken {
    /// Whether the token may still be sent at `now`.
    pub fn usable(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|t| now < t)
    }
}

/// Why no token can be injected. Cheap to clone: it is published to every handler.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    #[error("no HubSpot token has been obtained yet")]
    NotYet,
    #[error("the HubSpot token expired and no replacement could be obtained")]
    Expired,
    #[error("the HubSpot token lacks required scopes")]
    MissingScopes(Vec<String>),
    #[error("HubSpot says the token is not active")]
    Inactive,
    #[error("the token endpoint answered {0}")]
    Rejected(StatusCode),
    #[error("the token endpoint's answer is not the expected JSON")]
    Garbage(#[source] Arc<serde_json::Error>),
    #[error("the token endpoint could not be reached")]
    Unreachable(#[source] Arc<UpstreamError>),
    #[error("the static token file cannot be read")]
    File(#[source] Arc<std::io::Error>),
    #[error("the static token file is empty")]
    EmptyFile,
    /// HubSpot answered 401 to the token in service, even after the forced refresh allowed.
    #[error("HubSpot refused the gateway's token (401)")]
    RefusedUpstream,
}

impl TokenError {
    /// HubSpot judged the token itself (inactive, scopes missing, refused): trying the same
    /// token again cannot help, unlike a timeout or a 5xx.
    fn is_verdict(&self) -> bool {
        match self {
            TokenError::Inactive | TokenError::MissingScopes(_) | TokenError::RefusedUpstream => {
                true
            }
            TokenError::Rejected(status) => {
                status.is_client_error() && *status != StatusCode::TOO_MANY_REQUESTS
            }
            TokenError::NotYet
            | TokenError::Expired
            | TokenError::Garbage(_)
            | TokenError::Unreachable(_)
            | TokenError::File(_)
            | TokenError::EmptyFile => false,
        }
    }
}

/// What handlers see: the token in service (if any) and the latest problem (if any).
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    pub token: Option<Arc<ActiveToken>>,
    pub problem: Option<TokenError>,
    /// The last forced round the refresher has finished (see [`TokenManager::force_refresh`]).
    pub forced_done: u64,
}

/// Why HubSpot's answer forced the refresher to act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForceReason {
    /// 401: HubSpot refused the token; get a new one.
    Unauthorized,
    /// 403 `MISSING_SCOPES`: verify the token in service again, and withdraw it if it fails.
    MissingScopes,
}

impl ForceReason {
    /// The `reason` label of `token_forced_refreshes_total`.
    pub fn label(self) -> &'static str {
        match self {
            ForceReason::Unauthorized => "upstream_401",
            ForceReason::MissingScopes => "upstream_403",
        }
    }

    fn index(self) -> usize {
        match self {
            ForceReason::Unauthorized => 0,
            ForceReason::MissingScopes => 1,
        }
    }
}

/// Forced work asked of the refresher, shared by the manager (which asks) and the refresher.
#[derive(Default)]
struct Forced {
    notify: Notify,
    state: Mutex<ForcedState>,
}

#[derive(Default)]
struct ForcedState {
    /// Per reason: when it last forced a round, and which round that was.
    last: [Option<(Instant, u64)>; 2],
    /// The latest round asked for; the refresher reports the one it finished in
    /// `TokenStatus::forced_done`.
    round: u64,
    refresh: bool,
    reverify: bool,
}

/// Hands out the current token; the refresh itself runs in [`Refresher::run`].
#[derive(Clone)]
pub struct TokenManager {
    status: watch::Receiver<TokenStatus>,
    forced: Arc<Forced>,
    metrics: Metrics,
}

impl TokenManager {
    /// The token to inject now, or why there is none. Never an expired or unverified token.
    pub fn current(&self) -> Result<Arc<ActiveToken>, TokenError> {
        let status = self.status.borrow();
        match &status.token {
            Some(t) if t.usable(Instant::now()) => Ok(t.clone()),
            Some(_) => Err(status.problem.clone().unwrap_or(TokenError::Expired)),
            None => Err(status.problem.clone().unwrap_or(TokenError::NotYet)),
        }
    }

    /// The latest problem while a verified token still serves (a failed refresh or static
    /// rotation): not a reason to stop, but worth saying on `/readyz`.
    pub fn problem(&self) -> Option<TokenError> {
        self.status.borrow().problem.clone()
    }

    /// Asks for a new token because HubSpot refused generation `stale_generation` (an
    /// upstream 401), and waits for it up to `wait`. Single-flight: callers whose token was
    /// already replaced return at once, and at most one forced refresh runs per 30 s; callers
    /// after that round has finished do not wait. Returns whether a newer token exists.
    pub async fn force_refresh(&self, stale_generation: u64, wait: Duration) -> bool {
        let mut rx = self.status.clone();
        let newer = |s: &TokenStatus| {
            s.token
                .as_ref()
                .is_some_and(|t| t.generation > stale_generation)
        };
        if newer(&rx.borrow()) {
            return true;
        }
        let Some(round) = self.force(ForceReason::Unauthorized) else {
            return false;
        };
        match tokio::time::timeout(wait, rx.wait_for(|s| newer(s) || s.forced_done >= round)).await
        {
            Ok(Ok(status)) => newer(&status),
            Ok(Err(_)) | Err(_) => false,
        }
    }

    /// HubSpot answered 403 `MISSING_SCOPES` to a token we verified: have it verified again
    /// (at most once per 30 s). Does not wait: the caller gets HubSpot's answer.
    pub fn reverify(&self) {
        let _ = self.force(ForceReason::MissingScopes);
    }

    /// Starts a forced round for `reason` unless one started within the last 30 s; returns
    /// the round to wait for, or `None` if the recent round has already finished.
    fn force(&self, reason: ForceReason) -> Option<u64> {
        let done = self.status.borrow().forced_done;
        let mut s = self.forced.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if let Some((at, round)) = s.last[reason.index()]
            && now.duration_since(at) < FORCED_REFRESH_INTERVAL
        {
            return (round > done).then_some(round);
        }
        s.round += 1;
        let round = s.round;
        s.last[reason.index()] = Some((now, round));
        match reason {
            ForceReason::Unauthorized => s.refresh = true,
            ForceReason::MissingScopes => s.reverify = true,
        }
        drop(s);
        self.metrics
            .token_forced_refreshes_total
            .with_label_values(&[reason.label()])
            .inc();
        tracing::warn!(
            reason = reason.label(),
            "HubSpot refused the token in service; forcing a token refresh"
        );
        self.forced.notify.notify_one();
        Some(round)
    }

    /// Subscribes to every change of token or problem.
    pub fn subscribe(&self) -> watch::Receiver<TokenStatus> {
        self.status.clone()
    }

    /// Creates the manager and the refresh loop to spawn; nothing is fetched until the loop
    /// runs.
    pub fn new(
        credentials: Credentials,
        api: OauthApi,
        required_scopes: Vec<String>,
        hubspot: Arc<HubSpot>,
        metrics: Metrics,
    ) -> (TokenManager, Refresher) {
        let (tx, rx) = watch::channel(TokenStatus::default());
        let forced = Arc::new(Forced::default());
        let manager = TokenManager {
            status: rx,
            forced: forced.clone(),
            metrics: metrics.clone(),
        };
        let source = match credentials {
            Credentials::Oauth {
                client_id,
                client_secret,
                refresh_token,
            } => Source::Oauth {
                client_id,
                client_secret,
                refresh_token,
                api,
            },
            Credentials::Static { token, file } => Source::Static {
                initial: token,
                file,
            },
        };
        let refresher = Refresher {
            source,
            required_scopes,
            hubspot,
            metrics,
            tx,
            forced,
            generation: 0,
            verified_at: None,
            lifetime: None,
            rejected: None,
            static_backoff: MIN_BACKOFF,
        };
        (manager, refresher)
    }
}

enum Source {
    Oauth {
        client_id: Secret,
        client_secret: Secret,
        /// Replaced whenever HubSpot returns a different one (rotation).
        refresh_token: Secret,
        api: OauthApi,
    },
    Static {
        initial: Secret,
        file: Option<PathBuf>,
    },
}

/// The background task that obtains and verifies tokens.
pub struct Refresher {
    source: Source,
    required_scopes: Vec<String>,
    hubspot: Arc<HubSpot>,
    metrics: Metrics,
    tx: watch::Sender<TokenStatus>,
    forced: Arc<Forced>,
    generation: u64,
    /// When the token in service was last verified (static tokens are re-verified).
    verified_at: Option<Instant>,
    /// Lifetime of the latest token; bounds the backoff.
    lifetime: Option<Duration>,
    /// Static mode: a replacement that failed verification, and when it may be tried again.
    rejected: Option<(Secret, Instant)>,
    static_backoff: Duration,
}

/// A freshly obtained token before it is published.
struct Fetched {
    access: Secret,
    lifetime: Option<Duration>,
    hub_id: Option<u64>,
    scopes: Vec<String>,
    started: Instant,
}

/// What verification learnt about a token.
struct Verified {
    hub_id: Option<u64>,
    scopes: Vec<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: u64,
    hub_id: Option<u64>,
    scopes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Introspection {
    active: Option<bool>,
    #[serde(default)]
    scopes: Vec<String>,
    hub_id: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrivateAppInfo {
    #[serde(default)]
    scopes: Vec<String>,
    hub_id: Option<u64>,
}

impl Refresher {
    /// Runs until `shutdown` resolves: fetch, verify, publish, sleep until the refresh time
    /// (or back off after a failure), and wake early when a refresh is forced.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = MIN_BACKOFF;
        let mut due = Instant::now();
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = self.forced.notify.notified() => {}
            }
            let (round, refresh, reverify) = {
                let mut s = self.forced.state.lock().unwrap_or_else(|p| p.into_inner());
                let taken = (s.round, s.refresh, s.reverify);
                s.refresh = false;
                s.reverify = false;
                taken
            };
            if !refresh && !reverify && Instant::now() < due {
                continue;
            }
            let is_static = matches!(self.source, Source::Static { .. });
            if reverify || (refresh && is_static) {
                self.reverify_current().await;
                // A 403 whose token passed again needs no new token before the usual time.
                let serving = self.tx.borrow().token.is_some();
                if !refresh && serving && Instant::now() < due {
                    self.finish_round(round);
                    continue;
                }
            }
            let wait = match self.obtain(refresh || reverify).await {
                Ok(fetched) => {
                    backoff = MIN_BACKOFF;
                    let lifetime = fetched.lifetime;
                    self.publish(fetched);
                    match lifetime {
                        Some(l) => refresh_delay(l),
                        None => STATIC_POLL,
                    }
                }
                Err(Skip::Unchanged) => STATIC_POLL,
                Err(Skip::Failed(problem)) => {
                    self.metrics
                        .token_refreshes_total
                        .with_label_values(&["failure"])
                        .inc();
                    let still_usable = self
                        .tx
                        .borrow()
                        .token
                        .as_ref()
                        .is_some_and(|t| t.usable(Instant::now()));
                    // Static mode polls the file every second whatever happens (a fixed file
                    // is picked up at once); the backoff applies to retrying a rejected value.
                    let wait = if is_static {
                        STATIC_POLL
                    } else {
                        jitter(backoff)
                    };
                    let cap = self
                        .lifetime
                        .map_or(MAX_BACKOFF, |l| (l / 4).clamp(MIN_BACKOFF, MAX_BACKOFF));
                    backoff = (backoff * 2).min(cap);
                    tracing::warn!(error = %problem, source = ?std::error::Error::source(&problem).map(|s| s.to_string()), retry_in_ms = wait.as_millis() as u64, token_in_service = still_usable, "HubSpot token refresh failed");
                    if is_static && still_usable {
                        self.metrics.token_rotation_failed.set(1);
                    }
                    self.metrics.token_scopes_verified.set(still_usable as i64);
                    self.tx.send_modify(|s| s.problem = Some(problem));
                    wait
                }
            };
            due = Instant::now() + wait;
            self.finish_round(round);
        }
    }

    /// Tells callers waiting on forced round `round` (or earlier) that it is over.
    fn finish_round(&self, round: u64) {
        if round > self.tx.borrow().forced_done {
            self.tx.send_modify(|s| s.forced_done = round);
        }
    }

    /// Verifies the token in service again (HubSpot refused it); withdraws it when HubSpot's
    /// verdict is that it is inactive, lacks a scope or is unknown. A failure to ask (timeout,
    /// 5xx) keeps it: the refresh that follows backs off as usual.
    async fn reverify_current(&mut self) {
        let Some(token) = self.tx.borrow().token.clone() else {
            return;
        };
        match self.verify(&token.access).await {
            Ok(_) => {
                self.verified_at = Some(Instant::now());
                tracing::info!(
                    generation = token.generation,
                    "HubSpot token verified again after HubSpot refused it; still in service"
                );
            }
            Err(e) if e.is_verdict() => self.withdraw(token.generation, e),
            Err(e) => {
                tracing::warn!(error = %e, "HubSpot token could not be verified again; kept in service")
            }
        }
    }

    /// Takes the token of `generation` out of service: nothing is forwarded until a new
    /// token passes verification.
    fn withdraw(&mut self, generation: u64, problem: TokenError) {
        tracing::warn!(error = %problem, generation, "HubSpot token failed verification; withdrawn from service");
        self.metrics.token_scopes_verified.set(0);
        self.tx.send_modify(|s| {
            if s.token.as_ref().is_some_and(|t| t.generation == generation) {
                s.token = None;
            }
            s.problem = Some(problem);
        });
    }

    fn publish(&mut self, fetched: Fetched) {
        self.generation += 1;
        self.verified_at = Some(Instant::now());
        self.lifetime = fetched.lifetime;
        let usable_until = fetched
            .lifetime
            .map(|l| fetched.started + l - (l / 4).min(Duration::from_secs(5)));
        let expiry_unix = fetched.lifetime.map(|l| {
            (SystemTime::now() + l)
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        });
        tracing::info!(
            hub_id = fetched.hub_id,
            scopes = %fetched.scopes.join(","),
            expires_in_s = fetched.lifetime.map(|l| l.as_secs()),
            generation = self.generation,
            "HubSpot token verified and in service"
        );
        let token = Arc::new(ActiveToken {
            access: fetched.access,
            usable_until,
            hub_id: fetched.hub_id,
            scopes: fetched.scopes,
            generation: self.generation,
        });
        self.metrics
            .token_refreshes_total
            .with_label_values(&["success"])
            .inc();
        self.metrics.token_scopes_verified.set(1);
        self.metrics.token_rotation_failed.set(0);
        self.metrics
            .token_expiry_timestamp_seconds
            .set(expiry_unix.unwrap_or(0.0));
        self.tx.send_modify(|s| {
            s.token = Some(token);
            s.problem = None;
        });
    }

    /// Asks HubSpot whether `access` is active and carries every required scope.
    async fn verify(&self, access: &Secret) -> Result<Verified, TokenError> {
        let info = match &self.source {
            Source::Oauth {
                client_id,
                client_secret,
                api: OauthApi::V3,
                ..
            } => {
                let answer = self
                    .hubspot
                    .post_form(
                        "/oauth/v3/token/introspect",
                        &[
                            ("client_id", client_id.expose()),
                            ("client_secret", client_secret.expose()),
                            ("token", access.expose()),
                            ("token_type_hint", "access_token"),
                        ],
                    )
                    .await
                    .map_err(unreachable)?;
                let info: Introspection = json(&answer)?;
                Verified {
                    hub_id: info.hub_id,
                    scopes: active(info)?,
                }
            }
            Source::Oauth {
                api: OauthApi::V1, ..
            } => {
                let path = format!("/oauth/v1/access-tokens/{}", utf8_percent(access.expose()));
                let answer = self.hubspot.get(&path).await.map_err(unreachable)?;
                // v1 has no `active`: a 200 with the token's details means it is live.
                let info: Introspection = json(&answer)?;
                Verified {
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                }
            }
            Source::Static { .. } => {
                let body = serde_json::to_vec(&serde_json::json!({ "tokenKey": access.expose() }))
                    .unwrap_or_default();
                let answer = self
                    .hubspot
                    .post_json("/oauth/v2/private-apps/get/access-token-info", body)
                    .await
                    .map_err(unreachable)?;
                let info: PrivateAppInfo = json(&answer)?;
                Verified {
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                }
            }
        };
        missing(&self.required_scopes, &info.scopes)?;
        Ok(info)
    }

    /// A new token, verified; or why not. `forced`: HubSpot refused the token in service, so
    /// a static file's rejected value is tried again without waiting for its backoff.
    async fn obtain(&mut self, forced: bool) -> Result<Fetched, Skip> {
        let started = Instant::now();
        let (client_id, client_secret, refresh_token, api) = match &mut self.source {
            Source::Oauth {
                client_id,
                client_secret,
                refresh_token,
                api,
            } => (
                client_id.clone(),
                client_secret.clone(),
                refresh_token,
                *api,
            ),
            Source::Static { initial, file } => {
                let value = match file {
                    Some(path) => {
                        let text = tokio::fs::read_to_string(&*path)
                            .await
                            .map_err(|e| Skip::Failed(TokenError::File(Arc::new(e))))?;
                        Secret::new(text.trim())
                    }
                    None => initial.clone(),
                };
                return self.obtain_static(value, forced, started).await;
            }
        };
        let path = match api {
            OauthApi::V3 => "/oauth/v3/token",
            OauthApi::V1 => "/oauth/v1/token",
        };
        let answer = self
            .hubspot
            .post_form(
                path,
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", client_id.expose()),
                    ("client_secret", client_secret.expose()),
                    ("refresh_token", refresh_token.expose()),
                ],
            )
            .await
            .map_err(unreachable)?;
        let grant: TokenResponse = json(&answer)?;
        if let Some(new) = grant
            .refresh_token
            .filter(|r| !r.is_empty() && r != refresh_token.expose())
        {
            tracing::info!("HubSpot returned a new refresh token; using it from now on");
            *refresh_token = Secret::new(new);
        }
        if let Some(scopes) = &grant.scopes {
            missing(&self.required_scopes, scopes)?;
        }
        let access = Secret::new(grant.access_token);
        let info = self.verify(&access).await?;
        Ok(Fetched {
            access,
            // HubSpot's tokens live 30 minutes; an absurd `expires_in` is capped rather than
            // trusted into an overflow.
            lifetime: Some(Duration::from_secs(
                grant.expires_in.min(MAX_LIFETIME.as_secs()),
            )),
            hub_id: info.hub_id.or(grant.hub_id),
            scopes: info.scopes,
            started,
        })
    }

    /// Static mode: `value` is what the file holds now.
    async fn obtain_static(
        &mut self,
        value: Secret,
        forced: bool,
        started: Instant,
    ) -> Result<Fetched, Skip> {
        if value.expose().is_empty() {
            return Err(Skip::Failed(TokenError::EmptyFile));
        }
        let in_service = self
            .tx
            .borrow()
            .token
            .as_ref()
            .filter(|t| t.access == value)
            .map(|t| t.generation);
        let reverify_due = self
            .verified_at
            .is_none_or(|t| t.elapsed() >= STATIC_REVERIFY);
        if in_service.is_some() && !reverify_due {
            return Err(Skip::Unchanged);
        }
        if let Some((rejected, retry_at)) = &self.rejected
            && *rejected == value
            && Instant::now() < *retry_at
            && !forced
        {
            return Err(Skip::Unchanged);
        }
        match self.verify(&value).await {
            Ok(info) => {
                self.rejected = None;
                self.static_backoff = MIN_BACKOFF;
                Ok(Fetched {
                    access: value,
                    lifetime: None,
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                    started,
                })
            }
            Err(e) => {
                match in_service {
                    // The token in service itself failed its periodic check.
                    Some(generation) if e.is_verdict() => self.withdraw(generation, e.clone()),
                    Some(_) => {
                        // HubSpot could not be asked (timeout, 5xx): the token stays, and the
                        // check is due again after a backoff, not at every one-second poll.
                        let wait = jitter(self.static_backoff).min(STATIC_REVERIFY);
                        self.static_backoff = (self.static_backoff * 2).min(MAX_BACKOFF);
                        self.verified_at = Instant::now()
                            .checked_sub(STATIC_REVERIFY - wait)
                            .or(self.verified_at);
                    }
                    None => {
                        // Remember the rejected value so it is not asked about every second.
                        let retry_at = Instant::now() + jitter(self.static_backoff);
                        self.static_backoff = (self.static_backoff * 2).min(MAX_BACKOFF);
                        self.rejected = Some((value, retry_at));
                    }
                }
                Err(Skip::Failed(e))
            }
        }
    }
}

/// Why `obtain` produced no new token.
enum Skip {
    /// Static mode: the file holds the token already in service.
    Unchanged,
    Failed(TokenError),
}

impl From<TokenError> for Skip {
    fn from(e: TokenError) -> Skip {
        Skip::Failed(e)
    }
}

fn unreachable(e: UpstreamError) -> TokenError {
    TokenError::Unreachable(Arc::new(e))
}

fn json<T: serde::de::DeserializeOwned>(answer: &crate::upstream::Answer) -> Result<T, TokenError> {
    if answer.status != StatusCode::OK {
        return Err(TokenError::Rejected(answer.status));
    }
    serde_json::from_slice(&answer.body).map_err(|e| TokenError::Garbage(Arc::new(e)))
}

/// The scopes of an introspection answer, if it says `active: true`.
fn active(info: Introspection) -> Result<Vec<String>, TokenError> {
    if info.active == Some(true) {
        Ok(info.scopes)
    } else {
        Err(TokenError::Inactive)
    }
}

fn missing(required: &[String], granted: &[String]) -> Result<(), TokenError> {
    let absent: Vec<String> = required
        .iter()
        .filter(|r| !granted.contains(r))
        .cloned()
        .collect();
    if absent.is_empty() {
        Ok(())
    } else {
        Err(TokenError::MissingScopes(absent))
    }
}

/// Everything but RFC 3986's unreserved characters, so a token is one path segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn utf8_percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

/// When to refresh a token of this lifetime: at `lifetime - margin`, margin =
/// min(max(60 s, lifetime / 10), lifetime / 2), a little earlier by jitter so replicas
/// started together do not refresh together.
pub fn refresh_delay(lifetime: Duration) -> Duration {
    let margin = Duration::from_secs(60).max(lifetime / 10).min(lifetime / 2);
    let early = rand::rng().random_range(0.0..0.1) * margin.as_secs_f64();
    // Never back to back, even for a token that claims to expire at once.
    (lifetime - margin)
        .saturating_sub(Duration::from_secs_f64(early))
        .max(MIN_BACKOFF)
}

/// A wait of `base` ± 20 %, so failing replicas spread their retries.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_margin_follows_the_design_rule() {
        let d = refresh_delay(Duration::from_secs(1800));
        assert!(
            d <= Duration::from_secs(1620) && d >= Duration::from_secs(1602),
            "{d:?}"
        );
        let d = refresh_delay(Duration::from_secs(4));
        assert!(
            d <= Duration::from_secs(2) && d >= Duration::from_millis(1800),
            "{d:?}"
        );
        let d = refresh_delay(Duration::from_secs(300));
        assert!(d <= Duration::from_secs(240), "{d:?}");
    }

    #[test]
    fn missing_scopes_are_named() {
        let req = vec!["files".to_owned(), "files.ui_hidden.read".to_owned()];
        match missing(&req, &["files".to_owned()]) {
            Err(TokenError::MissingScopes(m)) => assert_eq!(m, ["files.ui_hidden.read"]),
            other => panic!("{other:?}"),
        }
        assert!(missing(&req, &req).is_ok());
    }
}

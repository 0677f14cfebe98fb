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

/// Backoff after a failed refresh: starts here, doubles, never exceeds `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A token that never expires (static mode) is verified again this often.
const STATIC_REVERIFY: Duration = Duration::from_secs(600);
/// How often the static token file is checked for a new token.
const STATIC_POLL: Duration = Duration::from_secs(1);
/// An upstream 401 forces at most one refresh this often.
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
    fn usable(&self, now: Instant) -> bool {
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
}

/// What handlers see: the token in service (if any) and the latest problem (if any).
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    pub token: Option<Arc<ActiveToken>>,
    pub problem: Option<TokenError>,
}

/// Hands out the current token; the refresh itself runs in [`TokenManager::run`].
#[derive(Clone)]
pub struct TokenManager {
    status: watch::Receiver<TokenStatus>,
    force: Arc<Notify>,
    last_forced: Arc<Mutex<Option<Instant>>>,
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

    /// Asks for a new token because HubSpot refused `stale` (an upstream 401), and waits for
    /// it up to `wait`. Single-flight: callers with an already-replaced token return at once,
    /// and at most one forced refresh runs per 30 s. Returns whether a newer token exists.
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
        {
            let mut last = self.last_forced.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let recently = last.is_some_and(|t| now.duration_since(t) < FORCED_REFRESH_INTERVAL);
            if !recently {
                *last = Some(now);
                self.force.notify_one();
            }
        }
        matches!(
            tokio::time::timeout(wait, rx.wait_for(newer)).await,
            Ok(Ok(_))
        )
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
        let force = Arc::new(Notify::new());
        let manager = TokenManager {
            status: rx,
            force: force.clone(),
            last_forced: Arc::new(Mutex::new(None)),
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
            force,
            generation: 0,
            verified_at: None,
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
    force: Arc<Notify>,
    generation: u64,
    /// When the token in service was last verified (static tokens are re-verified).
    verified_at: Option<Instant>,
}

/// A freshly obtained token before it is published.
struct Fetched {
    access: Secret,
    lifetime: Option<Duration>,
    hub_id: Option<u64>,
    scopes: Vec<String>,
    started: Instant,
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
        let mut static_seen: Option<String> = None;
        loop {
            let wait = match self.obtain(&mut static_seen).await {
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
                    tracing::warn!(error = %problem, source = ?std::error::Error::source(&problem).map(|s| s.to_string()), retry_in_ms = backoff.as_millis() as u64, "HubSpot token refresh failed");
                    self.tx.send_modify(|s| s.problem = Some(problem));
                    let still_usable = self
                        .tx
                        .borrow()
                        .token
                        .as_ref()
                        .is_some_and(|t| t.usable(Instant::now()));
                    self.metrics.token_scopes_verified.set(still_usable as i64);
                    let wait = jitter(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    wait
                }
            };
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
                _ = self.force.notified() => {}
            }
        }
    }

    fn publish(&mut self, fetched: Fetched) {
        self.generation += 1;
        self.verified_at = Some(Instant::now());
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
        self.metrics
            .token_expiry_timestamp_seconds
            .set(expiry_unix.unwrap_or(0.0));
        self.tx.send_replace(TokenStatus {
            token: Some(token),
            problem: None,
        });
    }

    async fn obtain(&mut self, static_seen: &mut Option<String>) -> Result<Fetched, Skip> {
        let started = Instant::now();
        let fetched = match &mut self.source {
            Source::Oauth {
                client_id,
                client_secret,
                refresh_token,
                api,
            } => {
                let (path, api) = match api {
                    OauthApi::V3 => ("/oauth/v3/token", OauthApi::V3),
                    OauthApi::V1 => ("/oauth/v1/token", OauthApi::V1),
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
                let info: Introspection = match api {
                    OauthApi::V3 => {
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
                        json(&answer)?
                    }
                    OauthApi::V1 => {
                        let path =
                            format!("/oauth/v1/access-tokens/{}", utf8_percent(access.expose()));
                        let answer = self.hubspot.get(&path).await.map_err(unreachable)?;
                        let mut info: Introspection = json(&answer)?;
                        // v1 has no `active`: a 200 with the token's details means it is live.
                        info.active = Some(true);
                        info
                    }
                };
                if info.active != Some(true) {
                    return Err(Skip::Failed(TokenError::Inactive));
                }
                missing(&self.required_scopes, &info.scopes)?;
                Fetched {
                    access,
                    lifetime: Some(Duration::from_secs(grant.expires_in)),
                    hub_id: info.hub_id.or(grant.hub_id),
                    scopes: info.scopes,
                    started,
                }
            }
            Source::Static { initial, file } => {
                let value = match file {
                    Some(path) => {
                        let text = tokio::fs::read_to_string(&*path)
                            .await
                            .map_err(|e| Skip::Failed(TokenError::File(Arc::new(e))))?;
                        text.trim().to_owned()
                    }
                    None => initial.expose().to_owned(),
                };
                let due = self
                    .verified_at
                    .is_none_or(|t| t.elapsed() >= STATIC_REVERIFY);
                if static_seen.as_deref() == Some(value.as_str()) && !due {
                    return Err(Skip::Unchanged);
                }
                // Remember what was tried, so an unchanged rejected file is not retried every
                // second; the backoff of a failure still retries it.
                *static_seen = Some(value.clone());
                let body = serde_json::to_vec(&serde_json::json!({ "tokenKey": value }))
                    .unwrap_or_default();
                let answer = self
                    .hubspot
                    .post_json("/oauth/v2/private-apps/get/access-token-info", body)
                    .await
                    .map_err(unreachable)?;
                let info: PrivateAppInfo = json(&answer)?;
                missing(&self.required_scopes, &info.scopes)?;
                Fetched {
                    access: Secret::new(value),
                    lifetime: None,
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                    started,
                }
            }
        };
        Ok(fetched)
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

fn unreachable(e: UpstreamError) -> Skip {
    Skip::Failed(TokenError::Unreachable(Arc::new(e)))
}

fn json<T: serde::de::DeserializeOwned>(answer: &crate::upstream::Answer) -> Result<T, TokenError> {
    if answer.status != StatusCode::OK {
        return Err(TokenError::Rejected(answer.status));
    }
    serde_json::from_slice(&answer.body).map_err(|e| TokenError::Garbage(Arc::new(e)))
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

fn utf8_percent(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// When to refresh a token of this lifetime: at `lifetime - margin`, margin =
/// min(max(60 s, lifetime / 10), lifetime / 2), a little earlier by jitter so replicas
/// started together do not refresh together.
pub fn refresh_delay(lifetime: Duration) -> Duration {
    let margin = Duration::from_secs(60).max(lifetime / 10).min(lifetime / 2);
    let early = rand::rng().random_range(0.0..0.1) * margin.as_secs_f64();
    (lifetime - margin).saturating_sub(Duration::from_secs_f64(early))
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

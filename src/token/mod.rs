//! The HubSpot credential as request handlers see it: the token in service (or why there is
//! none), and the two ways a handler reacts to HubSpot refusing it (force a refresh, have it
//! verified again). Obtaining and verifying tokens is the refresher's job ([`refresher`]),
//! through the source of the configured mode ([`oauth`], [`static_token`]).

mod oauth;
mod refresher;
mod static_token;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use rand::Rng;
use tokio::sync::{Notify, watch};

use crate::config::{Credentials, OauthApi};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::{Answer, HubSpot, RequestError, UpstreamError};

pub use oauth::refresh_delay;
pub use refresher::Refresher;

/// Backoff after a failed attempt: starts here, doubles, never exceeds `MAX_BACKOFF`.
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// An upstream 401 (or 403) forces at most one refresh (re-verification) this often.
const FORCED_REFRESH_INTERVAL: Duration = Duration::from_secs(30);

/// A token that passed verification.
#[derive(Debug)]
pub struct ActiveToken {
    /// The bearer sent to HubSpot.
    pub access: Secret,
    /// After this, the token is too close to expiry to send.
    pub usable_until: Option<Instant>,
    /// The HubSpot account the token belongs to, when HubSpot said.
    pub hub_id: Option<u64>,
    /// The scopes HubSpot reported for it.
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
    /// The call to the token endpoint could not be put together (nothing was sent).
    #[error("the request to the token endpoint could not be built")]
    Request(#[source] Arc<RequestError>),
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
            | TokenError::Request(_)
            | TokenError::File(_)
            | TokenError::EmptyFile => false,
        }
    }
}

impl From<UpstreamError> for TokenError {
    fn from(e: UpstreamError) -> TokenError {
        match e {
            UpstreamError::Request(e) => TokenError::Request(Arc::new(e)),
            e @ (UpstreamError::Unavailable(_)
            | UpstreamError::Timeout
            | UpstreamError::Throttled { .. }
            | UpstreamError::TooLarge { .. }) => TokenError::Unreachable(Arc::new(e)),
        }
    }
}

/// What handlers see: the token in service (if any) and the latest problem (if any).
#[derive(Debug, Clone, Default)]
pub struct TokenStatus {
    /// The verified token in service.
    pub token: Option<Arc<ActiveToken>>,
    /// The latest failure to obtain or verify a token, until a token is published.
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
        let context = refresher::Context::new(hubspot, required_scopes, metrics, tx);
        let refresher = match credentials {
            Credentials::Oauth {
                client_id,
                client_secret,
                refresh_token,
            } => Refresher::oauth(
                oauth::OAuth::new(client_id, client_secret, refresh_token, api),
                context,
                forced,
            ),
            Credentials::Static { token, file } => Refresher::static_token(
                static_token::StaticToken::new(token, file),
                context,
                forced,
            ),
        };
        (manager, refresher)
    }
}

/// The JSON of a token endpoint's 200 answer; any other status is its verdict.
fn json<T: serde::de::DeserializeOwned>(answer: &Answer) -> Result<T, TokenError> {
    if answer.status != StatusCode::OK {
        return Err(TokenError::Rejected(answer.status));
    }
    serde_json::from_slice(&answer.body).map_err(|e| TokenError::Garbage(Arc::new(e)))
}

/// Fails with the scopes of `required` that `granted` lacks, if any.
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

/// A wait of `base` ± 20 %, so failing replicas spread their retries.
fn jitter(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.8..1.2))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scopes a token lacks are named, in the order they are required.
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

//! The refresh loop: one background task that obtains and verifies tokens through the
//! configured [`Source`], publishes them to the handlers, and wakes early when a handler
//! forces a refresh or a re-verification.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use super::oauth::OAuth;
use super::static_token::StaticToken;
use super::{ActiveToken, Forced, TokenError, TokenStatus};
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::HubSpot;

/// Where tokens come from: one implementation per `token.mode`. The source decides how a
/// token is obtained and verified and how long to wait after each attempt; the loop decides
/// when to ask and publishes what passes.
pub(super) trait Source: Send + Sync + 'static {
    /// Asks HubSpot whether `access` is active and carries every required scope.
    fn verify(
        &self,
        cx: &Context,
        access: &Secret,
    ) -> impl Future<Output = Result<Verified, TokenError>> + Send;

    /// A new token, verified; or why not. `forced`: HubSpot refused the token in service, so
    /// anything the source holds back (a rejected value's backoff) is tried at once.
    fn obtain(
        &mut self,
        cx: &Context,
        forced: bool,
    ) -> impl Future<Output = Result<Fetched, Skip>> + Send;

    /// The token in service passed verification again.
    fn reverified(&mut self) {}

    /// Whether a 401 for the token in service calls for verifying it again before obtaining
    /// one: a source that cannot mint a replacement has to find out whether its token died.
    fn recheck_when_refused(&self) -> bool;

    /// An attempt failed (`serving`: a verified token is still usable); returns the wait
    /// before the next one.
    fn failed(&mut self, cx: &Context, serving: bool) -> Duration;
}

/// A freshly obtained token before it is published.
pub(super) struct Fetched {
    pub(super) access: Secret,
    /// `None`: the token does not expire.
    pub(super) lifetime: Option<Duration>,
    pub(super) hub_id: Option<u64>,
    pub(super) scopes: Vec<String>,
    /// When the request for it was sent; its lifetime counts from here.
    pub(super) started: Instant,
    /// When the source wants to be asked again.
    pub(super) next_in: Duration,
}

/// What verification learnt about a token.
pub(super) struct Verified {
    pub(super) hub_id: Option<u64>,
    pub(super) scopes: Vec<String>,
}

/// Why `obtain` produced no new token.
pub(super) enum Skip {
    /// The source holds nothing new (the token in service, or a value still backing off);
    /// ask again after `next_in`.
    Unchanged {
        next_in: Duration,
    },
    Failed(TokenError),
}

impl From<TokenError> for Skip {
    fn from(e: TokenError) -> Skip {
        Skip::Failed(e)
    }
}

/// What every source works with: the HubSpot client, the scopes to demand, the metrics, and
/// the status channel (to see the token in service, and to withdraw it).
pub(super) struct Context {
    pub(super) hubspot: Arc<HubSpot>,
    pub(super) required_scopes: Vec<String>,
    pub(super) metrics: Metrics,
    tx: watch::Sender<TokenStatus>,
}

impl Context {
    pub(super) fn new(
        hubspot: Arc<HubSpot>,
        required_scopes: Vec<String>,
        metrics: Metrics,
        tx: watch::Sender<TokenStatus>,
    ) -> Context {
        Context {
            hubspot,
            required_scopes,
            metrics,
            tx,
        }
    }

    /// The token in service, usable or not.
    pub(super) fn serving(&self) -> Option<Arc<ActiveToken>> {
        self.tx.borrow().token.clone()
    }

    /// Takes the token of `generation` out of service: nothing is forwarded until a new
    /// token passes verification.
    pub(super) fn withdraw(&self, generation: u64, problem: TokenError) {
        tracing::warn!(error = %problem, generation, "HubSpot token failed verification; withdrawn from service");
        self.metrics.token_scopes_verified.set(0);
        self.tx.send_modify(|s| {
            if s.token.as_ref().is_some_and(|t| t.generation == generation) {
                s.token = None;
            }
            s.problem = Some(problem);
        });
    }
}

/// The background task that obtains and verifies tokens; spawn [`Refresher::run`].
pub struct Refresher(Mode);

/// The loop, typed by the configured source.
enum Mode {
    OAuth(Loop<OAuth>),
    Static(Loop<StaticToken>),
}

impl Refresher {
    /// The loop of OAuth mode.
    pub(super) fn oauth(source: OAuth, cx: Context, forced: Arc<Forced>) -> Refresher {
        Refresher(Mode::OAuth(Loop::new(source, cx, forced)))
    }

    /// The loop of static mode.
    pub(super) fn static_token(source: StaticToken, cx: Context, forced: Arc<Forced>) -> Refresher {
        Refresher(Mode::Static(Loop::new(source, cx, forced)))
    }

    /// Runs until `shutdown` resolves: fetch, verify, publish, sleep until the refresh time
    /// (or back off after a failure), and wake early when a refresh is forced.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        match self.0 {
            Mode::OAuth(l) => l.run(shutdown).await,
            Mode::Static(l) => l.run(shutdown).await,
        }
    }
}

struct Loop<S> {
    source: S,
    cx: Context,
    forced: Arc<Forced>,
    generation: u64,
}

impl<S: Source> Loop<S> {
    fn new(source: S, cx: Context, forced: Arc<Forced>) -> Loop<S> {
        Loop {
            source,
            cx,
            forced,
            generation: 0,
        }
    }

    async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
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
            if reverify || (refresh && self.source.recheck_when_refused()) {
                self.reverify_current().await;
                // A 403 whose token passed again needs no new token before the usual time.
                let serving = self.cx.serving().is_some();
                if !refresh && serving && Instant::now() < due {
                    self.finish_round(round);
                    continue;
                }
            }
            due = match self.source.obtain(&self.cx, refresh || reverify).await {
                // A token's lifetime counts from when it was asked for, so its refresh is
                // scheduled from then too, not from when verification finished: otherwise a
                // slow HubSpot shrinks the overlap in which the old token still serves.
                Ok(fetched) => {
                    let due = fetched.started + fetched.next_in;
                    self.publish(fetched);
                    due
                }
                Err(Skip::Unchanged { next_in }) => Instant::now() + next_in,
                Err(Skip::Failed(problem)) => {
                    self.cx
                        .metrics
                        .token_refreshes_total
                        .with_label_values(&["failure"])
                        .inc();
                    let still_usable = self.cx.serving().is_some_and(|t| t.usable(Instant::now()));
                    let wait = self.source.failed(&self.cx, still_usable);
                    tracing::warn!(error = %problem, source = ?std::error::Error::source(&problem).map(|s| s.to_string()), retry_in_ms = wait.as_millis() as u64, token_in_service = still_usable, "HubSpot token refresh failed");
                    self.cx
                        .metrics
                        .token_scopes_verified
                        .set(still_usable as i64);
                    self.cx.tx.send_modify(|s| s.problem = Some(problem));
                    Instant::now() + wait
                }
            };
            self.finish_round(round);
        }
    }

    /// Tells callers waiting on forced round `round` (or earlier) that it is over.
    fn finish_round(&self, round: u64) {
        if round > self.cx.tx.borrow().forced_done {
            self.cx.tx.send_modify(|s| s.forced_done = round);
        }
    }

    /// Verifies the token in service again (HubSpot refused it); withdraws it when HubSpot's
    /// verdict is that it is inactive, lacks a scope or is unknown. A failure to ask (timeout,
    /// 5xx) keeps it: the refresh that follows backs off as usual.
    async fn reverify_current(&mut self) {
        let Some(token) = self.cx.serving() else {
            return;
        };
        match self.source.verify(&self.cx, &token.access).await {
            Ok(_) => {
                self.source.reverified();
                tracing::info!(
                    generation = token.generation,
                    "HubSpot token verified again after HubSpot refused it; still in service"
                );
            }
            Err(e) if e.is_verdict() => self.cx.withdraw(token.generation, e),
            Err(e) => {
                tracing::warn!(error = %e, "HubSpot token could not be verified again; kept in service")
            }
        }
    }

    fn publish(&mut self, fetched: Fetched) {
        self.generation += 1;
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
        let metrics = &self.cx.metrics;
        metrics
            .token_refreshes_total
            .with_label_values(&["success"])
            .inc();
        metrics.token_scopes_verified.set(1);
        metrics.token_rotation_failed.set(0);
        metrics
            .token_expiry_timestamp_seconds
            .set(expiry_unix.unwrap_or(0.0));
        self.cx.tx.send_modify(|s| {
            s.token = Some(token);
            s.problem = None;
        });
    }
}

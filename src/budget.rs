//! The outbound budget every call to HubSpot asks first: the account's rolling window
//! (`upstream.rate_limit`), each client's share of it (`[[auth.clients]] share`), the
//! optional daily limit (`upstream.daily_limit`), and the hold after a HubSpot 429.
//!
//! Without a cluster backend all of it is kept here. With one, the window, the shares, the
//! daily count and the holds are the whole account's, checked and recorded in Redis by one
//! script; when Redis cannot answer, this replica keeps its part of them here
//! (`limit / replicas_hint`, see [`ClusterConfig::local_share`]): never more, never an error.
//! Every call allowed is recorded here as well (with its member in the shared windows), so a
//! replica that falls back counts the calls it already made in the window, and a Redis that
//! restarted empty gets them back (this budget is the backend's [`Ledger`]).
//!
//! [`ClusterConfig::local_share`]: crate::cluster::ClusterConfig::local_share
//! [`Ledger`]: crate::cluster::Ledger

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use hyper::header::{self, HeaderName, HeaderValue};

use crate::cluster::budget::{BudgetAsk, CallId, ClientWindow};
use crate::cluster::{Admission, BudgetPolicy, ClusterBackend, Ledger, Refusal, ReplayCall};
use crate::config::UpstreamConfig;
use crate::upstream::{Policy, retry_after_value};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// A hold on every upstream call after a HubSpot 429, as `/readyz` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldStatus {
    /// The policy HubSpot named.
    pub policy: Policy,
    /// Time left until calls may go out again.
    pub remaining: Duration,
    /// When HubSpot asked for longer than `upstream.max_hold`: what it asked for.
    pub capped_from: Option<Duration>,
}

/// Which budget held an upstream call back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrottleSource {
    /// HubSpot answered 429; every call waits until its interval is over.
    HubSpot429,
    /// The account's window (`upstream.rate_limit`) is spent: this replica's own, or in
    /// cluster mode the one every replica shares.
    LocalBudget,
    /// The calling client's share of the window is spent; other clients still call.
    ClientShare,
    /// The configured `upstream.daily_limit` is spent until the daily reset.
    DailyLimit,
}

impl ThrottleSource {
    /// Every source, in label order (for metric series created at start).
    pub const ALL: [ThrottleSource; 4] = [
        ThrottleSource::HubSpot429,
        ThrottleSource::LocalBudget,
        ThrottleSource::ClientShare,
        ThrottleSource::DailyLimit,
    ];

    /// The `source` label of `upstream_throttled_total`.
    pub fn label(self) -> &'static str {
        match self {
            ThrottleSource::HubSpot429 => "hubspot_429",
            ThrottleSource::LocalBudget => "local_budget",
            ThrottleSource::ClientShare => "client_share",
            ThrottleSource::DailyLimit => "daily_limit",
        }
    }
}

/// A call the budget refused: how long to wait, which budget refused, the HubSpot policy it
/// stands for, and that budget's quota (the `RateLimit-Limit` a caller sees).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttle {
    /// How long until a call may be allowed (the `Retry-After` and `RateLimit-Reset`).
    pub wait: Duration,
    /// Which budget refused.
    pub by: ThrottleSource,
    /// `TenSecondlyRolling` for the windows, `Daily` for the daily limit, HubSpot's policy
    /// for a hold.
    pub policy: Policy,
    /// Calls that budget allows per window (per day for the daily ones).
    pub limit: u64,
}

impl Throttle {
    /// `Retry-After` and the IETF draft's `RateLimit-Limit`, `RateLimit-Remaining` (0: the
    /// call was refused) and `RateLimit-Reset` (whole seconds, as `Retry-After`) of the budget
    /// that refused.
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 4] {
        rate_limit_headers(self.limit, self.wait)
    }
}

/// The headers of a 429 for a budget of `limit` that allows a call again in `wait`.
pub fn rate_limit_headers(limit: u64, wait: Duration) -> [(HeaderName, HeaderValue); 4] {
    let reset = retry_after_value(wait);
    [
        (header::RETRY_AFTER, reset.clone()),
        (RATELIMIT_LIMIT, HeaderValue::from(limit)),
        (RATELIMIT_REMAINING, HeaderValue::from(0u64)),
        (RATELIMIT_RESET, reset),
    ]
}

/// `RateLimit-Limit`: the quota of the budget a 429 is about.
pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
/// `RateLimit-Remaining`: calls left in it (0 on a 429).
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
/// `RateLimit-Reset`: whole seconds until it allows a call again.
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Whom one HubSpot call is charged to.
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    /// The client whose request causes the call (a flight's leader).
    pub client: &'a str,
    /// Its `share` of the budget, when it has one.
    pub share: Option<f64>,
    /// The HubSpot account of the token in use; the shared budget is per account (a token
    /// whose account HubSpot did not name counts as account 0, the same on every replica).
    pub hub_id: Option<u64>,
    /// The shared budget's answer for the first call, when a cluster flight's lookup already
    /// asked it ([`Budget::shared_ask`]): the first [`Budget::acquire`] uses it instead of
    /// asking again.
    pub first: Option<&'a FirstTry>,
}

/// The shared budget's answer for a flight leader's first call, taken with its lease in the
/// same Redis step; used once. An admission never used (the token went away, or a hold
/// came, between the lookup and the call) keeps its place in the shared windows at
/// admission + the request timeout, as a call that never answered does: one slot of the
/// window lost, never a call over the limit.
#[derive(Debug)]
pub struct FirstTry(Mutex<Option<Admission>>);

impl FirstTry {
    /// Holds `admission` for the first [`Budget::acquire`] that names it.
    pub fn new(admission: Admission) -> FirstTry {
        FirstTry(Mutex::new(Some(admission)))
    }

    fn take(&self) -> Option<Admission> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// The calls a client with `share` may make per window of `limit`: `floor(limit × share)`,
/// at least 1 (a client is never shut out), at most `limit`.
pub fn share_limit(limit: u32, share: f64) -> u32 {
    // The nudge keeps a product that is whole on paper whole in binary (100 × 0.29 is
    // 28.999999999999996), far below any real fraction of a call.
    let n = (f64::from(limit) * share + 1e-9).floor();
    // `share` is validated to lie in (0, 1], so `n` is within 0..=limit.
    (n as u32).clamp(1, limit.max(1))
}

/// How long a `DAILY` 429 without `Retry-After` holds, from `now`. HubSpot resets daily
/// limits at midnight in the account's time zone, which the gateway does not know:
///
/// - the first `DAILY` hold lasts until the next midnight UTC;
/// - a `DAILY` 429 within a day after a `DAILY` hold ended (`probing`) means the account's
///   midnight is later than UTC's (or the limit was spent again): it holds until the next
///   whole hour UTC, so the reset is found within the hour (every time zone's midnight falls
///   on a UTC hour, or at :30/:45 for a few), for at most one call an hour.
pub fn daily_hold(now: SystemTime, probing: bool) -> Duration {
    const HOUR: u64 = 3600;
    let period = if probing { HOUR } else { 24 * HOUR };
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let into_period = Duration::from_secs(since_epoch.as_secs() % period)
        + Duration::from_nanos(u64::from(since_epoch.subsec_nanos()));
    Duration::from_secs(period) - into_period
}

/// HubSpot counts calls in a rolling window by when they *reach* it; so does this: a call
/// is allowed when fewer than `limit` calls are in the last `per` (and, for a client with a
/// share, fewer than its part of them). After a HubSpot 429, every call is held until the
/// time HubSpot named (capped by the caller of [`Budget::hold`]).
///
/// A call's place in the window is an upper bound of when HubSpot received it: admission +
/// `in_flight` (the request timeout, which no try outlives) while it is out, then the time
/// its answer came back ([`Permit::answered`]). Counting from
/// admission instead is not safe at `limit` equal to HubSpot's: a call admitted as an
/// earlier one leaves the window can overtake it in transit and reach HubSpot within `per`
/// of it. A fixed margin added to `per` would cost every window that margin, sized for the
/// slowest call; moving the entry to the answer's time costs each call only its own
/// round trip.
pub struct Budget {
    limit: u32,
    per: Duration,
    /// The longest a call stays unanswered: its entry's place until the answer is in.
    in_flight: Duration,
    daily_limit: Option<u64>,
    cluster: Option<Arc<ClusterBackend>>,
    state: Arc<Mutex<BudgetState>>,
    /// What the cluster backend replays into a Redis that lost this replica's calls (it
    /// holds it weakly).
    _ledger: Option<Arc<BudgetLedger>>,
    /// In cluster mode, the shared window as the gauges show it.
    shared: Arc<SharedView>,
    /// The task keeping `shared` up to date, started by the first [`Budget::gauges`].
    poller: OnceLock<tokio::task::AbortHandle>,
}

/// The account's shared window as last read from Redis.
struct SharedView {
    /// The hub of the latest call (`u64::MAX` before the first).
    hub: AtomicU64,
    /// Calls in its window at the latest read; negative when unknown (Redis did not answer).
    used: AtomicI64,
}

/// How often the shared window is read for the gauges.
const SHARED_VIEW_INTERVAL: Duration = Duration::from_secs(1);

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some(poller) = self.poller.get() {
            poller.abort();
        }
    }
}

struct BudgetState {
    sent: Window,
    /// The calls of each client that has a share, in the same window.
    by_client: HashMap<Box<str>, Window>,
    /// The id of the next call recorded.
    next_call: u64,
    /// Calls sent on the current UTC day: (days since the epoch, calls).
    today: (u64, u64),
    hold: Option<Hold>,
    /// When the latest `DAILY` hold ends or ended.
    daily_until: Option<Instant>,
    /// In cluster mode, until when a call this replica allowed alone (Redis down) stays in
    /// the window: Redis does not have it.
    alone_until: Option<Instant>,
    /// After a replay into a Redis that lost calls, until when this replica keeps to its
    /// local share as well as the shared window: other replicas' calls of the last window
    /// may not be back in it yet.
    capped_until: Option<Instant>,
}

/// One hold after a 429.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    policy: Policy,
    capped_from: Option<Duration>,
    /// The quota HubSpot's 429 named, for the `RateLimit-Limit` of held callers.
    limit: u64,
}

/// What [`Budget::hold`] decided.
#[derive(Debug, Clone, Copy)]
pub struct HoldSet {
    /// Time until the hold in force ends.
    pub remaining: Duration,
    /// This 429 started a capped hold (so it is logged once, not once per 429).
    pub newly_capped: bool,
}

impl Budget {
    /// The budget of `upstream.rate_limit` and `upstream.daily_limit`; with `cluster`, the
    /// account's, shared with every replica.
    pub fn new(config: &UpstreamConfig, cluster: Option<Arc<ClusterBackend>>) -> Budget {
        let state = Arc::new(Mutex::new(BudgetState {
            sent: Window::default(),
            by_client: HashMap::new(),
            next_call: 0,
            today: (0, 0),
            hold: None,
            daily_until: None,
            alone_until: None,
            capped_until: None,
        }));
        let ledger = cluster.as_ref().map(|cluster| {
            let ledger = Arc::new(BudgetLedger {
                state: state.clone(),
                per: config.rate_limit.per,
            });
            let weak: Weak<BudgetLedger> = Arc::downgrade(&ledger);
            cluster.set_ledger(weak);
            ledger
        });
        Budget {
            limit: config.rate_limit.requests,
            per: config.rate_limit.per,
            in_flight: config.request_timeout,
            daily_limit: config.daily_limit,
            cluster,
            state,
            _ledger: ledger,
            shared: Arc::new(SharedView {
                hub: AtomicU64::new(u64::MAX),
                used: AtomicI64::new(-1),
            }),
            poller: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one call for `charge` from every budget at once, or says which one refused and
    /// how long to wait. A refused call takes nothing from any of them. Call
    /// [`Permit::answered`] as soon as HubSpot's answer is in: that moment is where the call
    /// stays in the windows.
    pub async fn acquire(&self, charge: &Charge<'_>) -> Result<Permit<'_>, Throttle> {
        let Some(cluster) = &self.cluster else {
            return self.take_local(charge, self.limit, self.daily_limit);
        };
        // A hold this replica saw itself needs no round trip.
        let held = self.lock().held(Instant::now());
        if let Some(throttle) = held {
            return Err(throttle);
        }
        let policy = self.policy();
        let client = charge.share.map(|share| ClientWindow {
            client: charge.client,
            limit: share_limit(self.limit, share),
        });
        let hub = charge.hub_id.unwrap_or(0);
        self.shared.hub.store(hub, Ordering::Relaxed);
        let mut answer = match charge.first.and_then(FirstTry::take) {
            Some(admission) => Ok(admission),
            None => {
                self.capped(cluster)?;
                cluster.acquire_for(hub, &policy, client).await
            }
        };
        if let Ok(Admission::Refused {
            reason: Refusal::Replay,
            ..
        }) = answer
        {
            // The replay is done and this replica's cap applies: ask again through it.
            self.capped(cluster)?;
            answer = cluster.acquire_for(hub, &policy, client).await;
        }
        match answer {
            Ok(Admission::Allowed { call, .. }) => {
                let mut permit = self.record(&mut self.lock(), Instant::now(), charge, call);
                permit.shared = Some(SharedCall {
                    cluster: cluster.clone(),
                    hub,
                    call,
                    client: client.map(|c| Box::from(c.client)),
                });
                Ok(permit)
            }
            Ok(Admission::Refused { wait, reason }) => Err(self.refused(reason, wait, client)),
            Err(e) => {
                tracing::debug!(error = %e, "shared budget not answering: this replica's part of it applies");
                let hint = u64::from(cluster.config().replicas_hint.max(1));
                let daily = self.daily_limit.map(|d| (d / hint).max(1));
                self.take_local(charge, cluster.local_share(self.limit), daily)
            }
        }
    }

    /// Refuses a call while this replica keeps to its local share after a replay and its
    /// own calls in the window already fill that share.
    fn capped(&self, cluster: &ClusterBackend) -> Result<(), Throttle> {
        let now = Instant::now();
        let mut s = self.lock();
        let Some(until) = s.capped_until.filter(|t| *t > now) else {
            return Ok(());
        };
        let share = cluster.local_share(self.limit);
        match s.wait_for(now, self.per, share as usize, None) {
            None => Ok(()),
            Some(wait) => Err(Throttle {
                wait: wait.min(until - now).max(Duration::from_millis(1)),
                by: ThrottleSource::LocalBudget,
                policy: Policy::TenSecondlyRolling,
                limit: u64::from(share),
            }),
        }
    }

    /// The account's rules as the shared budget applies them.
    fn policy(&self) -> BudgetPolicy {
        BudgetPolicy {
            limit: self.limit,
            per: self.per,
            daily_limit: self.daily_limit,
            daily_reset_offset: Duration::ZERO,
            in_flight: self.in_flight,
        }
    }

    /// What a cluster flight's lookup asks the shared budget for `charge`'s first call, so
    /// that the lease and the admission are one Redis step; `None` without a cluster backend
    /// or during a hold this replica saw itself (then [`Budget::acquire`] refuses without a
    /// round trip, as always). The answer goes back through [`Charge::first`].
    pub fn shared_ask<'c>(&self, charge: &Charge<'c>) -> Option<BudgetAsk<'c>> {
        self.cluster.as_ref()?;
        let now = Instant::now();
        let mut s = self.lock();
        // While capped, the call asks through the cap first ([`Budget::acquire`]).
        if s.held(now).is_some() || s.capped_until.is_some_and(|t| t > now) {
            return None;
        }
        drop(s);
        Some(BudgetAsk {
            hub_id: charge.hub_id.unwrap_or(0),
            policy: self.policy(),
            client: charge.share.map(|share| ClientWindow {
                client: charge.client,
                limit: share_limit(self.limit, share),
            }),
        })
    }

    /// A refusal of the shared budget as the caller sees it.
    fn refused(&self, reason: Refusal, wait: Duration, client: Option<ClientWindow>) -> Throttle {
        let limit = u64::from(self.limit);
        let daily = self.daily_limit.unwrap_or(limit);
        let (by, policy, limit) = match reason {
            Refusal::Window => (
                ThrottleSource::LocalBudget,
                Policy::TenSecondlyRolling,
                limit,
            ),
            Refusal::ClientShare => (
                ThrottleSource::ClientShare,
                Policy::TenSecondlyRolling,
                client.map_or(limit, |c| u64::from(c.limit)),
            ),
            Refusal::Hold(policy) => (ThrottleSource::HubSpot429, policy, limit),
            Refusal::DailyHold => (ThrottleSource::HubSpot429, Policy::Daily, daily),
            Refusal::DailyLimit => (ThrottleSource::DailyLimit, Policy::Daily, daily),
            // Asked again after the replay; a second one means Redis lost the replica set
            // again at once: the window's refusal, briefly.
            Refusal::Replay => (
                ThrottleSource::LocalBudget,
                Policy::TenSecondlyRolling,
                limit,
            ),
        };
        Throttle {
            wait,
            by,
            policy,
            limit,
        }
    }

    /// The budget kept here: `limit` calls per window, `daily` per UTC day.
    fn take_local(
        &self,
        charge: &Charge<'_>,
        limit: u32,
        daily: Option<u64>,
    ) -> Result<Permit<'_>, Throttle> {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(throttle) = s.held(now) {
            return Err(throttle);
        }
        if let Some(daily) = daily {
            let (day, to_reset) = utc_day(SystemTime::now());
            if s.today.0 == day && s.today.1 >= daily {
                return Err(Throttle {
                    wait: to_reset,
                    by: ThrottleSource::DailyLimit,
                    policy: Policy::Daily,
                    limit: daily,
                });
            }
        }
        let account = s.wait_for(now, self.per, limit as usize, None);
        if let Some(share) = charge.share {
            let own = share_limit(limit, share);
            if let Some(wait) = s.wait_for(now, self.per, own as usize, Some(charge.client)) {
                // When the account's window is full too, the client cannot call before both
                // have room.
                return Err(Throttle {
                    wait: account.map_or(wait, |a| a.max(wait)),
                    by: ThrottleSource::ClientShare,
                    policy: Policy::TenSecondlyRolling,
                    limit: u64::from(own),
                });
            }
        }
        if let Some(wait) = account {
            return Err(Throttle {
                wait,
                by: ThrottleSource::LocalBudget,
                policy: Policy::TenSecondlyRolling,
                limit: u64::from(limit),
            });
        }
        if self.cluster.is_some() {
            let alone = now.checked_add(self.in_flight + self.per).unwrap_or(now);
            s.alone_until = Some(s.alone_until.map_or(alone, |t| t.max(alone)));
        }
        // Recorded under the lock that checked the windows, so no other call takes the
        // same room.
        Ok(self.record(&mut s, now, charge, CallId::fresh()))
    }

    /// Records one call for `charge` admitted at `now`, at `now + in_flight` until it is
    /// answered.
    fn record(
        &self,
        s: &mut BudgetState,
        now: Instant,
        charge: &Charge<'_>,
        call: CallId,
    ) -> Permit<'_> {
        // `request_timeout` is bounded by config validation; a clock near its end must not
        // panic.
        let until = now.checked_add(self.in_flight).unwrap_or(now);
        let id = s.record(now, until, self.per, charge, call);
        Permit {
            budget: self,
            id,
            until,
            client: charge.share.map(|_| Box::from(charge.client)),
            shared: None,
        }
    }

    /// Moves `permit`'s call to now in the windows it was recorded in, and in Redis (off
    /// the caller's path, bounded by `cluster.timeout`).
    fn completed(&self, permit: &mut Permit<'_>) {
        let now = Instant::now();
        {
            let mut s = self.lock();
            let moved = (permit.until, permit.id);
            s.sent.restamp(moved, now);
            if let Some(client) = permit.client.as_deref()
                && let Some(window) = s.by_client.get_mut(client)
            {
                window.restamp(moved, now);
            }
        }
        let Some(shared) = permit.shared.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let per = self.per;
        runtime.spawn(async move {
            let client = shared.client.as_deref();
            if let Err(e) = shared
                .cluster
                .restamp(shared.hub, shared.call, client, per)
                .await
            {
                tracing::debug!(error = %e, "a call's answer time was not recorded in the shared window: it counts from its admission plus the request timeout");
            }
        });
    }

    /// The window's limit and the calls it allows right now, for the gauges: this
    /// replica's; in cluster mode the account's, the same on every replica (read from Redis
    /// every second), or this replica's part of it while Redis does not answer.
    pub fn gauges(&self) -> (u32, u32) {
        let local = |limit: u32| {
            let mut s = self.lock();
            s.sent.prune(Instant::now(), self.per);
            let used = u32::try_from(s.sent.calls.len()).unwrap_or(u32::MAX);
            (limit, limit.saturating_sub(used))
        };
        let Some(cluster) = &self.cluster else {
            return local(self.limit);
        };
        self.start_poller(cluster);
        let used = self.shared.used.load(Ordering::Relaxed);
        match u32::try_from(used) {
            Ok(used) if cluster.is_up() => (self.limit, self.limit.saturating_sub(used)),
            Ok(_) | Err(_) => local(cluster.local_share(self.limit)),
        }
    }

    /// Starts reading the shared window every second, once, from within the runtime.
    fn start_poller(&self, cluster: &Arc<ClusterBackend>) {
        if self.poller.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (cluster, shared, per) = (cluster.clone(), self.shared.clone(), self.per);
        let task = runtime.spawn(async move {
            loop {
                let hub = shared.hub.load(Ordering::Relaxed);
                // While Redis is down the gauges show this replica's part; asking would only
                // count a fallback a second.
                let used = if hub == u64::MAX || !cluster.is_up() {
                    -1
                } else {
                    match cluster.window_used(hub, per).await {
                        Ok(used) => i64::from(used),
                        Err(_) => -1,
                    }
                };
                shared.used.store(used, Ordering::Relaxed);
                tokio::time::sleep(SHARED_VIEW_INTERVAL).await;
            }
        });
        if let Err(task) = self.poller.set(task.abort_handle()) {
            // Another scrape started one first: keep that one.
            task.abort();
        }
    }

    /// The `RateLimit-Limit` of a hold for `policy`: what HubSpot's 429 said (`hubspot`),
    /// else the configured daily limit for `DAILY`, else the window's limit.
    pub fn hold_limit(&self, policy: Policy, hubspot: Option<u64>) -> u64 {
        let configured = match policy {
            Policy::Daily => self.daily_limit.unwrap_or(u64::from(self.limit)),
            Policy::TenSecondlyRolling | Policy::Secondly | Policy::Unknown => {
                u64::from(self.limit)
            }
        };
        hubspot.unwrap_or(configured)
    }

    /// Holds every call for `asked`, at most `cap`; a hold already in force that ends later
    /// stays (two 429s in flight at once must not shorten the first one's hold). With a
    /// cluster backend every replica is held too, for the hold this one keeps; if Redis does
    /// not answer, this replica holds alone.
    pub async fn hold(
        &self,
        asked: Duration,
        cap: Duration,
        policy: Policy,
        limit: u64,
        hub_id: Option<u64>,
    ) -> HoldSet {
        let set = self.hold_here(asked, cap, policy, limit);
        if let Some(cluster) = &self.cluster {
            let hub = hub_id.unwrap_or(0);
            let shared = cluster.hold_for_policy(hub, set.remaining, policy).await;
            if let Err(e) = shared {
                tracing::debug!(error = %e, "shared hold not set: this replica holds alone");
            }
        }
        set
    }

    fn hold_here(&self, asked: Duration, cap: Duration, policy: Policy, limit: u64) -> HoldSet {
        let now = Instant::now();
        let held = asked.min(cap);
        let capped_from = (asked > cap).then_some(asked);
        let new = Hold {
            // `max_hold` is bounded by config validation; a clock near its end must not panic.
            until: now.checked_add(held).unwrap_or(now),
            policy,
            capped_from,
            limit,
        };
        let mut s = self.lock();
        let current = s.hold.filter(|h| h.until > now);
        let newly_capped = capped_from.is_some() && current.is_none_or(|h| h.capped_from.is_none());
        let kept = match current {
            Some(h) if h.until >= new.until => h,
            _ => new,
        };
        s.hold = Some(kept);
        if kept.policy == Policy::Daily {
            s.daily_until = Some(kept.until);
        }
        HoldSet {
            remaining: kept.until.saturating_duration_since(now),
            newly_capped: newly_capped && kept.capped_from.is_some(),
        }
    }

    /// Whether a `DAILY` hold ended less than a day ago (see [`daily_hold`]).
    pub fn daily_probing(&self) -> bool {
        let now = Instant::now();
        self.lock()
            .daily_until
            .is_some_and(|t| t <= now && now - t < DAY)
    }

    /// The hold in force after a HubSpot 429 this replica saw, if any.
    pub fn hold_status(&self) -> Option<HoldStatus> {
        let now = Instant::now();
        let hold = self.lock().hold.filter(|h| h.until > now)?;
        Some(HoldStatus {
            policy: hold.policy,
            remaining: hold.until.saturating_duration_since(now),
            capped_from: hold.capped_from,
        })
    }
}

impl BudgetState {
    /// The hold in force as a refusal; an ended one is forgotten.
    fn held(&mut self, now: Instant) -> Option<Throttle> {
        let hold = self.hold?;
        if hold.until > now {
            return Some(Throttle {
                wait: hold.until - now,
                by: ThrottleSource::HubSpot429,
                policy: hold.policy,
                limit: hold.limit,
            });
        }
        self.hold = None;
        None
    }

    /// How long until the window (the account's, or `client`'s) holds fewer than `limit`
    /// calls; `None` when it does now.
    fn wait_for(
        &mut self,
        now: Instant,
        per: Duration,
        limit: usize,
        client: Option<&str>,
    ) -> Option<Duration> {
        let sent = match client {
            None => &mut self.sent,
            Some(name) => self.by_client.get_mut(name)?,
        };
        sent.prune(now, per);
        let n = sent.calls.len();
        if n < limit {
            return None;
        }
        // The call that leaves the window last before one more fits.
        let leaving = sent.calls.keys().nth(n - limit).map_or(now, |(t, _)| *t);
        // Pruned: every call here leaves after `now`.
        Some(
            leaving
                .checked_add(per)
                .map_or(per, |t| t.saturating_duration_since(now)),
        )
    }

    /// Counts one call admitted at `now` for `charge`, placed at `until`, in every window it
    /// belongs to; returns its id there.
    fn record(
        &mut self,
        now: Instant,
        until: Instant,
        per: Duration,
        charge: &Charge<'_>,
        call: CallId,
    ) -> u64 {
        let id = self.next_call;
        self.next_call = self.next_call.wrapping_add(1);
        self.sent.prune(now, per);
        self.sent.calls.insert((until, id), call);
        if charge.share.is_some() {
            let sent = match self.by_client.get_mut(charge.client) {
                Some(sent) => sent,
                None => self.by_client.entry(charge.client.into()).or_default(),
            };
            sent.prune(now, per);
            sent.calls.insert((until, id), call);
        }
        let (day, _) = utc_day(SystemTime::now());
        if self.today.0 == day {
            self.today.1 += 1;
        } else {
            self.today = (day, 1);
        }
        id
    }
}

/// The calls in one window, by the time each counts from (see [`Budget`]) and their id,
/// with the member each has in the shared windows (for a replay).
#[derive(Default)]
struct Window {
    calls: BTreeMap<(Instant, u64), CallId>,
}

impl Window {
    /// Forgets calls that left the window: placed `per` or more before `now`.
    fn prune(&mut self, now: Instant, per: Duration) {
        while self
            .calls
            .first_key_value()
            .is_some_and(|((t, _), _)| now.saturating_duration_since(*t) >= per)
        {
            self.calls.pop_first();
        }
    }

    /// Moves call `(placed, id)` to `to`, if it is still here.
    fn restamp(&mut self, (placed, id): (Instant, u64), to: Instant) {
        if let Some(call) = self.calls.remove(&(placed, id)) {
            self.calls.insert((to, id), call);
        }
    }
}

/// The budget's memory of this replica's calls, as the cluster backend replays them.
struct BudgetLedger {
    state: Arc<Mutex<BudgetState>>,
    per: Duration,
}

impl Ledger for BudgetLedger {
    fn recent_calls(&self) -> Vec<ReplayCall> {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.sent.prune(now, self.per);
        let mut owners: HashMap<u64, &str> = HashMap::new();
        for (client, window) in &s.by_client {
            for (_, id) in window.calls.keys() {
                owners.insert(*id, client);
            }
        }
        let signed_ms = |t: Instant| -> i64 {
            let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
            if t >= now { ms(t - now) } else { -ms(now - t) }
        };
        s.sent
            .calls
            .iter()
            .map(|((t, id), call)| ReplayCall {
                call: *call,
                offset_ms: signed_ms(*t),
                client: owners.get(id).map(|c| (*c).to_owned()),
            })
            .collect()
    }

    fn replayed(&self, restarted: bool) -> bool {
        let now = Instant::now();
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let alone = s.alone_until.is_some_and(|t| t > now);
        if !(restarted || alone) {
            return false;
        }
        s.capped_until = now.checked_add(self.per);
        true
    }
}

/// One call the budget allowed, out to HubSpot: it counts from its admission + the request
/// timeout until [`Permit::answered`] moves it to when its answer came back.
pub struct Permit<'a> {
    budget: &'a Budget,
    id: u64,
    /// Where the call stands in the local windows until answered.
    until: Instant,
    /// The client whose own window holds it as well.
    client: Option<Box<str>>,
    /// Its entry in the shared windows, in cluster mode.
    shared: Option<SharedCall>,
}

/// A call's entry in Redis, to move once its answer is in.
struct SharedCall {
    cluster: Arc<ClusterBackend>,
    hub: u64,
    call: CallId,
    client: Option<Box<str>>,
}

impl std::fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("id", &self.id)
            .field("client", &self.client)
            .field("shared", &self.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl Permit<'_> {
    /// HubSpot's answer (or a failure that proves the call is over) is in: the call moves
    /// to now in every window. A permit dropped without this (a try that timed out and may
    /// still reach HubSpot, a call abandoned mid-way) keeps its place at admission + the
    /// request timeout.
    pub fn answered(mut self) {
        let budget = self.budget;
        budget.completed(&mut self);
    }
}

/// The UTC day of `now` (days since the epoch) and the time left in it.
fn utc_day(now: SystemTime) -> (u64, Duration) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    (since.as_secs() / DAY.as_secs(), daily_hold(now, false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateLimit;
    use crate::upstream::{MAX_DAILY_HOLD, parse_retry_after};

    /// A local budget of `requests` per `per`, and `daily` calls a day.
    fn budget(requests: u32, per: Duration, daily: Option<u64>) -> Budget {
        let config = UpstreamConfig {
            rate_limit: RateLimit { requests, per },
            daily_limit: daily,
            ..UpstreamConfig::default()
        };
        Budget::new(&config, None)
    }

    /// A client without a share.
    fn anyone(client: &str) -> Charge<'_> {
        Charge {
            client,
            share: None,
            hub_id: None,
            first: None,
        }
    }

    /// `client` with `share`.
    fn sharing(client: &str, share: f64) -> Charge<'_> {
        Charge {
            client,
            share: Some(share),
            hub_id: None,
            first: None,
        }
    }

    /// The window refuses the call past the limit, as the account budget with its limit, and
    /// allows it again once the oldest call has left it.
    #[tokio::test]
    async fn budget_is_a_rolling_window() {
        let b = budget(3, Duration::from_millis(200), None);
        for _ in 0..3 {
            b.acquire(&anyone("a")).await.expect("room").answered();
        }
        let refused = b.acquire(&anyone("b")).await.expect_err("spent");
        assert_eq!(refused.by, ThrottleSource::LocalBudget);
        assert_eq!(refused.policy, Policy::TenSecondlyRolling);
        assert_eq!(refused.limit, 3);
        assert!(refused.wait > Duration::ZERO && refused.wait <= Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(210));
        assert!(b.acquire(&anyone("a")).await.is_ok(), "window rolled over");
    }

    /// A call counts in the window from when its answer came back, where HubSpot (which
    /// counts arrivals) may have counted it, not from its admission: calls answered out of
    /// admission order leave the window in answer order, and a call still out stays in it
    /// past `per` (for as long as the request timeout allows it to be out).
    #[tokio::test]
    async fn a_call_counts_from_its_answer_not_its_admission() {
        let per = Duration::from_millis(1000);
        let b = budget(2, per, None);
        let first = b.acquire(&anyone("a")).await.expect("room for the first");
        let second = b.acquire(&anyone("b")).await.expect("room for the second");
        // The second is answered at once, the first only after a slow round trip.
        second.answered();
        let second_done = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        let first_answer = Instant::now();
        first.answered();
        let first_done = Instant::now();
        // Once the second's answer is `per` old its place is free; the first's is not (for
        // 500 ms more), although both were admitted more than `per` ago.
        std::thread::sleep((second_done + per).saturating_duration_since(Instant::now()));
        b.acquire(&anyone("a"))
            .await
            .expect("the second left")
            .answered();
        let asked = Instant::now();
        let refused = b.acquire(&anyone("a")).await.expect_err("the first is in");
        let answered = Instant::now();
        assert_eq!(refused.by, ThrottleSource::LocalBudget);
        // The wait ends when the first's answer is `per` old.
        let earliest = (first_answer + per).saturating_duration_since(answered);
        let latest = (first_done + per).saturating_duration_since(asked);
        assert!(
            refused.wait >= earliest && refused.wait <= latest,
            "{refused:?}, not within {earliest:?}..={latest:?}"
        );
        std::thread::sleep((first_done + per).saturating_duration_since(Instant::now()));
        assert!(b.acquire(&anyone("a")).await.is_ok(), "the first left");

        // A call still out, or abandoned unanswered, holds its place past `per`: HubSpot
        // may not have it yet.
        let one = budget(1, Duration::from_millis(100), None);
        let out = one.acquire(&anyone("a")).await.expect("room");
        std::thread::sleep(Duration::from_millis(150));
        let held = one.acquire(&anyone("a")).await.expect_err("still out");
        let timeout = UpstreamConfig::default().request_timeout;
        assert!(held.wait > timeout / 2, "{held:?}");
        out.answered();
        let just_answered = one
            .acquire(&anyone("a"))
            .await
            .expect_err("answered just now");
        assert!(
            just_answered.wait <= Duration::from_millis(100),
            "{just_answered:?}"
        );
        std::thread::sleep(Duration::from_millis(130));
        drop(one.acquire(&anyone("a")).await.expect("out of the window"));
        std::thread::sleep(Duration::from_millis(150));
        let abandoned = one.acquire(&anyone("a")).await.expect_err("abandoned");
        assert!(abandoned.wait > timeout / 2, "{abandoned:?}");
    }

    /// A client at `floor(limit × share)` calls is refused with its share's quota while
    /// another client still calls; its refused calls take nothing from the account, and it
    /// calls again once its own oldest call leaves the window.
    #[tokio::test]
    async fn a_share_refuses_its_client_alone() {
        let per = Duration::from_millis(300);
        let b = budget(10, per, None);
        for _ in 0..5 {
            b.acquire(&sharing("greedy", 0.55))
                .await
                .expect("share")
                .answered();
        }
        for _ in 0..20 {
            let refused = b
                .acquire(&sharing("greedy", 0.55))
                .await
                .expect_err("share");
            assert_eq!(refused.by, ThrottleSource::ClientShare);
            assert_eq!(refused.limit, 5, "floor(10 × 0.55)");
            assert!(refused.wait > Duration::ZERO && refused.wait <= per);
        }
        assert_eq!(b.gauges(), (10, 5), "refused calls took nothing");
        for _ in 0..5 {
            b.acquire(&anyone("quiet")).await.expect("room").answered();
        }
        // The account is full now: the greedy client's wait covers both windows.
        let refused = b.acquire(&sharing("greedy", 0.55)).await.expect_err("both");
        assert_eq!(refused.by, ThrottleSource::ClientShare);
        let quiet = b.acquire(&anyone("quiet")).await.expect_err("account");
        assert_eq!(quiet.by, ThrottleSource::LocalBudget);
        assert!(refused.wait >= quiet.wait.saturating_sub(Duration::from_millis(5)));
        std::thread::sleep(per + Duration::from_millis(20));
        assert!(b.acquire(&sharing("greedy", 0.55)).await.is_ok());
    }

    /// A share's quota is the floor of its part of the limit, never 0 and never above it.
    #[test]
    fn share_limits_floor_and_stay_at_least_one() {
        assert_eq!(share_limit(90, 0.5), 45);
        assert_eq!(share_limit(90, 0.333), 29);
        assert_eq!(share_limit(100, 0.29), 29, "not 28.999…");
        assert_eq!(share_limit(10, 0.7), 7);
        assert_eq!(share_limit(90, 1.0), 90);
        assert_eq!(share_limit(3, 0.1), 1);
        assert_eq!(share_limit(1, f64::MIN_POSITIVE), 1);
    }

    /// `upstream.daily_limit` refuses once spent, as `DAILY` with the wait until midnight UTC
    /// and the daily quota; the window alone would have allowed it.
    #[tokio::test]
    async fn the_daily_limit_refuses_until_midnight_utc() {
        let b = budget(100, Duration::from_secs(10), Some(2));
        assert!(b.acquire(&anyone("a")).await.is_ok());
        assert!(b.acquire(&anyone("b")).await.is_ok());
        let refused = b.acquire(&anyone("a")).await.expect_err("daily");
        assert_eq!(refused.by, ThrottleSource::DailyLimit);
        assert_eq!(refused.policy, Policy::Daily);
        assert_eq!(refused.limit, 2);
        let to_midnight = daily_hold(SystemTime::now(), false);
        assert!(refused.wait.abs_diff(to_midnight) < Duration::from_secs(2));
    }

    /// The 429 headers say the refusing budget's quota, nothing left, and the same whole
    /// seconds in `RateLimit-Reset` and `Retry-After` (rounded up, at least 1).
    #[test]
    fn refusal_headers_name_the_budget() {
        let t = Throttle {
            wait: Duration::from_millis(2300),
            by: ThrottleSource::ClientShare,
            policy: Policy::TenSecondlyRolling,
            limit: 45,
        };
        let headers = t.headers();
        let get = |name: &HeaderName| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().expect("ascii").to_owned())
        };
        assert_eq!(get(&header::RETRY_AFTER).as_deref(), Some("3"));
        assert_eq!(get(&RATELIMIT_LIMIT).as_deref(), Some("45"));
        assert_eq!(get(&RATELIMIT_REMAINING).as_deref(), Some("0"));
        assert_eq!(get(&RATELIMIT_RESET).as_deref(), Some("3"));
        let short = rate_limit_headers(1, Duration::from_millis(1));
        assert_eq!(short[3].1, "1");
    }

    /// A DAILY hold that has ended puts the budget in probing mode for a day; one still in
    /// force, or none, does not.
    #[tokio::test]
    async fn probing_follows_an_ended_daily_hold() {
        let b = budget(100, Duration::from_secs(10), None);
        assert!(!b.daily_probing());
        b.hold(
            Duration::from_millis(50),
            MAX_DAILY_HOLD,
            Policy::Daily,
            7,
            None,
        )
        .await;
        assert!(!b.daily_probing(), "the hold is still in force");
        std::thread::sleep(Duration::from_millis(80));
        assert!(b.daily_probing());
        assert!(b.acquire(&anyone("a")).await.is_ok(), "the hold ended");
    }

    /// A 429's hold stops every call, shares or not, for the policy it named and with the
    /// quota it was given.
    #[tokio::test]
    async fn a_429_holds_every_call() {
        let b = budget(100, Duration::from_secs(10), None);
        b.hold(
            Duration::from_secs(2),
            Duration::from_secs(60),
            Policy::Daily,
            250_000,
            None,
        )
        .await;
        for charge in [anyone("a"), sharing("b", 0.5)] {
            let refused = b.acquire(&charge).await.expect_err("held");
            assert_eq!(refused.by, ThrottleSource::HubSpot429);
            assert_eq!(refused.policy, Policy::Daily);
            assert_eq!(refused.limit, 250_000);
            assert!(refused.wait > Duration::from_secs(1));
        }
        assert_eq!(b.gauges(), (100, 100), "held calls took nothing");
    }

    /// A hold longer than the cap is cut to it, remembers what was asked, and is reported as
    /// newly capped once: a second 429 during it is not a new capped hold.
    #[tokio::test]
    async fn a_long_hold_is_capped_and_reported_once() {
        let b = budget(100, Duration::from_secs(10), None);
        let cap = Duration::from_secs(5);
        let p = Policy::TenSecondlyRolling;
        let first = b.hold(Duration::from_secs(300), cap, p, 100, None).await;
        assert!(first.newly_capped);
        assert!(first.remaining <= cap);
        let second = b.hold(Duration::from_secs(300), cap, p, 100, None).await;
        assert!(!second.newly_capped);
        let status = b.hold_status().expect("a hold");
        assert_eq!(status.capped_from, Some(Duration::from_secs(300)));
        assert!(status.remaining <= cap);
        // A shorter hold does not shorten the one in force.
        b.hold(Duration::from_secs(1), cap, Policy::Secondly, 100, None)
            .await;
        assert!(b.hold_status().expect("a hold").remaining > Duration::from_secs(3));
    }

    /// A first DAILY hold ends at the next midnight UTC (from midnight itself, a whole day
    /// ahead: the limit just reset, so a DAILY 429 now means the next reset); while probing
    /// after one, at the next whole hour UTC.
    #[test]
    fn daily_reset_is_the_next_midnight_utc_then_hourly() {
        let midnight = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400);
        assert_eq!(daily_hold(midnight, false), Duration::from_secs(86_400));
        let evening =
            midnight + Duration::from_secs(23 * 3600 + 59 * 60) + Duration::from_millis(500);
        assert_eq!(
            daily_hold(evening, false),
            Duration::from_secs(59) + Duration::from_millis(500)
        );
        let morning = midnight + Duration::from_secs(4 * 3600 + 10 * 60);
        assert_eq!(
            daily_hold(morning, false),
            Duration::from_secs(19 * 3600 + 50 * 60)
        );
        assert_eq!(daily_hold(morning, true), Duration::from_secs(50 * 60));
        // The same instant, written as HubSpot would in a Retry-After, is read back exactly.
        let date = httpdate::fmt_http_date(midnight + Duration::from_secs(86_400));
        assert_eq!(
            parse_retry_after(&date, midnight),
            Some(Duration::from_secs(86_400))
        );
    }
}

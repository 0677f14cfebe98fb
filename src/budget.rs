//! The outbound budget every call to HubSpot asks first: the account's rolling window
//! (`upstream.rate_limit`), and the hold after a HubSpot 429 (`DAILY` included).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::upstream::Policy;

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

/// HubSpot counts calls in a rolling window; so does this, exactly: a call is allowed when
/// fewer than `limit` calls were sent in the last `per`. After a HubSpot 429, every call is
/// held until the time HubSpot named (capped by the caller of [`Budget::hold`]).
pub struct Budget {
    limit: usize,
    per: Duration,
    state: Mutex<BudgetState>,
}

struct BudgetState {
    sent: VecDeque<Instant>,
    hold: Option<Hold>,
    /// When the latest `DAILY` hold ends or ended.
    daily_until: Option<Instant>,
}

/// One hold after a 429.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    policy: Policy,
    capped_from: Option<Duration>,
}

/// What [`Budget::hold`] decided.
#[derive(Debug, Clone, Copy)]
pub struct HoldSet {
    /// Time until the hold in force ends.
    pub remaining: Duration,
    /// This 429 started a capped hold (so it is logged once, not once per 429).
    pub newly_capped: bool,
}

/// Why the budget refused a call: how long to wait, who refused, and for which policy.
pub type Refused = (Duration, ThrottleSource, Policy);

impl Budget {
    /// A budget of `limit` calls per `per`.
    pub fn new(limit: u32, per: Duration) -> Budget {
        Budget {
            limit: limit as usize,
            per,
            state: Mutex::new(BudgetState {
                sent: VecDeque::with_capacity(limit as usize),
                hold: None,
                daily_until: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes one call from the budget, or says how long to wait, why not, and for which
    /// policy.
    pub async fn acquire(&self) -> Result<(), Refused> {
        let now = Instant::now();
        let mut s = self.lock();
        if let Some(hold) = s.hold {
            if hold.until > now {
                return Err((hold.until - now, ThrottleSource::HubSpot429, hold.policy));
            }
            s.hold = None;
        }
        s.prune(now, self.per);
        if s.sent.len() >= self.limit {
            let oldest = s.sent.front().copied().unwrap_or(now);
            return Err((
                self.per.saturating_sub(now.duration_since(oldest)),
                ThrottleSource::LocalBudget,
                Policy::TenSecondlyRolling,
            ));
        }
        s.sent.push_back(now);
        Ok(())
    }

    /// Calls per window.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Calls the window allows right now.
    pub fn remaining(&self) -> usize {
        let mut s = self.lock();
        s.prune(Instant::now(), self.per);
        self.limit.saturating_sub(s.sent.len())
    }

    /// Holds every call for `asked`, at most `cap`; a hold already in force that ends later
    /// stays (two 429s in flight at once must not shorten the first one's hold).
    pub fn hold(&self, asked: Duration, cap: Duration, policy: Policy) -> HoldSet {
        let now = Instant::now();
        let held = asked.min(cap);
        let capped_from = (asked > cap).then_some(asked);
        let new = Hold {
            // `max_hold` is bounded by config validation; a clock near its end must not panic.
            until: now.checked_add(held).unwrap_or(now),
            policy,
            capped_from,
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
            .is_some_and(|t| t <= now && now - t < Duration::from_secs(24 * 3600))
    }

    /// The hold in force after a HubSpot 429, if any.
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
    /// Forgets calls older than the window.
    fn prune(&mut self, now: Instant, per: Duration) {
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= per)
        {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{MAX_DAILY_HOLD, parse_retry_after};

    /// The window refuses the call past the limit and allows it again once the oldest call
    /// has left it.
    #[tokio::test]
    async fn budget_is_a_rolling_window() {
        let b = Budget::new(3, Duration::from_millis(200));
        for _ in 0..3 {
            assert!(b.acquire().await.is_ok());
        }
        let (wait, source, _) = b.acquire().await.expect_err("spent");
        assert_eq!(source, ThrottleSource::LocalBudget);
        assert!(wait <= Duration::from_millis(200));
        std::thread::sleep(Duration::from_millis(210));
        assert!(b.acquire().await.is_ok(), "window rolled over");
    }

    /// A DAILY hold that has ended puts the budget in probing mode for a day; one still in
    /// force, or none, does not.
    #[tokio::test]
    async fn probing_follows_an_ended_daily_hold() {
        let b = Budget::new(100, Duration::from_secs(10));
        assert!(!b.daily_probing());
        b.hold(Duration::from_millis(50), MAX_DAILY_HOLD, Policy::Daily);
        assert!(!b.daily_probing(), "the hold is still in force");
        std::thread::sleep(Duration::from_millis(80));
        assert!(b.daily_probing());
        assert!(b.acquire().await.is_ok(), "the hold ended");
    }

    /// A 429's hold stops every call, for the policy it named.
    #[tokio::test]
    async fn a_429_holds_every_call() {
        let b = Budget::new(100, Duration::from_secs(10));
        b.hold(
            Duration::from_secs(2),
            Duration::from_secs(60),
            Policy::Daily,
        );
        let (wait, source, policy) = b.acquire().await.expect_err("held");
        assert_eq!(source, ThrottleSource::HubSpot429);
        assert_eq!(policy, Policy::Daily);
        assert!(wait > Duration::from_secs(1));
    }

    /// A hold longer than the cap is cut to it, remembers what was asked, and is reported as
    /// newly capped once: a second 429 during it is not a new capped hold.
    #[test]
    fn a_long_hold_is_capped_and_reported_once() {
        let b = Budget::new(100, Duration::from_secs(10));
        let cap = Duration::from_secs(5);
        let first = b.hold(Duration::from_secs(300), cap, Policy::TenSecondlyRolling);
        assert!(first.newly_capped);
        assert!(first.remaining <= cap);
        let second = b.hold(Duration::from_secs(300), cap, Policy::TenSecondlyRolling);
        assert!(!second.newly_capped);
        let status = b.hold_status().expect("a hold");
        assert_eq!(status.capped_from, Some(Duration::from_secs(300)));
        assert!(status.remaining <= cap);
        // A shorter hold does not shorten the one in force.
        b.hold(Duration::from_secs(1), cap, Policy::Secondly);
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

//! The account's outbound budget shared by every replica: an exact rolling window, each
//! client's share of it, a hold after HubSpot's 429, and an optional daily limit.
//!
//! The window is a sorted set of call times per hub, checked and recorded by one Lua script
//! that reads Redis' own clock (`TIME`), so replicas' clocks do not matter. A call at `t`
//! counts until `t + per`, so no half-open span of length `per` ever holds more than `limit`
//! calls. A fixed window or GCRA would let about twice the limit through across a boundary.
//! A client with a share has its own sorted set beside the account's, checked and recorded
//! by the same script, so a call refused by either takes nothing from the other.
//!
//! Daily reset: HubSpot resets the daily limit at midnight in the account's time zone, which
//! the gateway cannot see; the reset is `daily_reset_offset` after UTC midnight (default 0,
//! i.e. UTC midnight). An account in UTC-5 sets 5h; the cost of a wrong guess is a hold that
//! ends early (HubSpot answers 429 again and the hold is set again) or late.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{ClusterBackend, ClusterError, millis};

/// What the budget allows, for one hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetPolicy {
    /// Calls per `per` for the whole account (every replica together).
    pub limit: u32,
    /// The rolling window's length.
    pub per: Duration,
    /// Calls per day for the whole account; `None` counts nothing.
    pub daily_limit: Option<u64>,
    /// When the day ends: this long after UTC midnight (less than 24h).
    pub daily_reset_offset: Duration,
}

/// The budget's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call may go; it is recorded at `at_ms` (Redis' clock, ms since the epoch).
    Allowed {
        /// Calls left in the window after this one.
        remaining: u32,
        /// When the call was recorded.
        at_ms: u64,
    },
    /// The call must not go for `wait` (always > 0).
    Refused {
        /// How long until a call may be allowed.
        wait: Duration,
        /// Which rule refused.
        reason: Refusal,
    },
}

/// Why a call was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The rolling window is full; `wait` is until its oldest call leaves it.
    Window,
    /// A replica saw HubSpot's 429; `wait` is what is left of its `Retry-After`.
    Hold,
    /// HubSpot's daily limit was hit; `wait` is until the daily reset.
    DailyHold,
    /// The calling client's own window is full; `wait` is until it (and the account's
    /// window, when that is full too) has room.
    ClientShare,
    /// The configured daily limit is spent; `wait` is until the daily reset.
    DailyLimit,
}

const DAY_MS: u64 = 86_400_000;

/// One client's window inside the account's: at most `limit` of its calls per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientWindow<'a> {
    /// The client's configured name.
    pub client: &'a str,
    /// Its calls per window (`floor(limit × share)`, at least 1).
    pub limit: u32,
}

/// KEYS: window, hold, daily counter, and the client's window when ARGV[6] > 0. ARGV:
/// limit, per ms, unique member, daily limit (0 = none), reset offset ms, client limit (0 =
/// none). Returns {code, n}: 1 allowed (n = remaining, then time), 0 window (n = wait ms),
/// 2 hold, 4 daily hold, 3 daily limit, 5 client share (n = wait ms).
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local hold = redis.call('PTTL', KEYS[2])
if hold > 0 then
  if redis.call('GET', KEYS[2]) == 'daily' then return {4, hold, now} end
  return {2, hold, now}
end
local limit = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local daily = tonumber(ARGV[4])
local to_reset = 86400000 - ((now - tonumber(ARGV[5])) % 86400000)
if daily > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used >= daily then return {3, to_reset, now} end
end
-- How long until the window at `key` holds fewer than `max` calls (0: it does now).
local function wait_for(key, max)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - per)
  local n = redis.call('ZCARD', key)
  if n < max then return n, 0 end
  local leaving = redis.call('ZRANGE', key, n - max, n - max, 'WITHSCORES')
  local wait = tonumber(leaving[2]) + per - now
  if wait < 1 then wait = 1 end
  return n, wait
end
local n, wait = wait_for(KEYS[1], limit)
local client = tonumber(ARGV[6])
if client > 0 then
  local _, own = wait_for(KEYS[4], client)
  if own > 0 then
    if wait > own then own = wait end
    return {5, own, now}
  end
end
if wait > 0 then return {0, wait, now} end
local member = now .. ':' .. ARGV[3]
redis.call('ZADD', KEYS[1], now, member)
redis.call('PEXPIRE', KEYS[1], per)
if client > 0 then
  redis.call('ZADD', KEYS[4], now, member)
  redis.call('PEXPIRE', KEYS[4], per)
end
if daily > 0 then
  redis.call('INCR', KEYS[3])
  redis.call('PEXPIRE', KEYS[3], to_reset)
end
return {1, limit - n - 1, now}
"#,
    )
});

/// KEYS: hold. ARGV: ms (0 = until the daily reset), kind, reset offset ms. Keeps the later
/// of the existing and the new end, so a short hold never shortens a daily one.
static HOLD: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local ms = tonumber(ARGV[1])
if ms == 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  ms = 86400000 - ((now - tonumber(ARGV[3])) % 86400000)
end
if redis.call('PTTL', KEYS[1]) < ms then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ms)
end
return ms
"#,
    )
});

/// KEYS: window. ARGV: per ms. Returns the calls in the window now (Redis' clock).
static WINDOW_USED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZCOUNT', KEYS[1], '(' .. (now - tonumber(ARGV[1])), '+inf')
"#,
    )
});

impl ClusterBackend {
    /// How many calls the shared window of `hub_id` holds now, every replica's together (for
    /// the budget gauges; nothing is recorded).
    pub async fn window_used(&self, hub_id: u64, per: Duration) -> Result<u32, ClusterError> {
        self.call(
            "budget_window",
            WINDOW_USED
                .key(self.key("rl", hub_id))
                .arg(millis(per))
                .invoke_async(&mut self.conn()),
        )
        .await
    }

    /// Asks the shared budget for one call to HubSpot for `hub_id`, recording it if allowed.
    /// On `Err` the caller uses its local budget of `local_share(limit)`.
    pub async fn acquire(
        &self,
        hub_id: u64,
        policy: &BudgetPolicy,
    ) -> Result<Admission, ClusterError> {
        self.acquire_for(hub_id, policy, None).await
    }

    /// [`ClusterBackend::acquire`] for a call charged to `client`'s window as well: both are
    /// checked and, if both have room, recorded in one script, so a refusal by either
    /// records nothing.
    pub async fn acquire_for(
        &self,
        hub_id: u64,
        policy: &BudgetPolicy,
        client: Option<ClientWindow<'_>>,
    ) -> Result<Admission, ClusterError> {
        let mut script = ACQUIRE.prepare_invoke();
        script
            .key(self.key("rl", hub_id))
            .key(self.key("hold", hub_id))
            .key(self.key("day", hub_id));
        if let Some(c) = client {
            // Hub ids are digits, so `hub:name` names one client of one hub.
            script.key(self.key("rlc", format_args!("{hub_id}:{}", c.client)));
        }
        script
            .arg(policy.limit)
            .arg(millis(policy.per))
            .arg(uuid::Uuid::new_v4().simple().to_string())
            .arg(policy.daily_limit.unwrap_or(0))
            .arg(millis(policy.daily_reset_offset) % DAY_MS)
            .arg(client.map_or(0, |c| c.limit.max(1)));
        let (code, n, now): (i64, i64, u64) = self
            .call("budget_acquire", script.invoke_async(&mut self.conn()))
            .await?;
        let wait = Duration::from_millis(u64::try_from(n).unwrap_or(1).max(1));
        let refused = |reason| Ok(Admission::Refused { wait, reason });
        match code {
            1 => Ok(Admission::Allowed {
                remaining: u32::try_from(n).unwrap_or(0),
                at_ms: now,
            }),
            0 => refused(Refusal::Window),
            2 => refused(Refusal::Hold),
            3 => refused(Refusal::DailyLimit),
            4 => refused(Refusal::DailyHold),
            5 => refused(Refusal::ClientShare),
            other => Err(ClusterError::Redis {
                op: "budget_acquire",
                message: format!("unexpected script answer {other}"),
            }),
        }
    }

    /// Holds every replica's calls for `hub_id` for `wait` (HubSpot's `Retry-After`, or the
    /// rate-limit interval). Never shortens a longer hold already set.
    pub async fn hold(&self, hub_id: u64, wait: Duration) -> Result<Duration, ClusterError> {
        self.set_hold("budget_hold", hub_id, millis(wait).max(1), "429", 0)
            .await
    }

    /// Holds every replica's calls for `hub_id` until the daily reset (HubSpot's `DAILY` 429).
    /// Returns how long the hold lasts.
    pub async fn hold_daily(
        &self,
        hub_id: u64,
        policy: &BudgetPolicy,
    ) -> Result<Duration, ClusterError> {
        let offset = millis(policy.daily_reset_offset) % DAY_MS;
        self.set_hold("budget_hold_daily", hub_id, 0, "daily", offset)
            .await
    }

    /// Holds every replica's calls for `hub_id` for `wait` as a `DAILY` hold (refused as
    /// [`Refusal::DailyHold`]): HubSpot's `Retry-After`, or the hold this replica chose.
    pub async fn hold_daily_for(
        &self,
        hub_id: u64,
        wait: Duration,
    ) -> Result<Duration, ClusterError> {
        self.set_hold("budget_hold_daily", hub_id, millis(wait).max(1), "daily", 0)
            .await
    }

    async fn set_hold(
        &self,
        op: &'static str,
        hub_id: u64,
        ms: u64,
        kind: &str,
        offset_ms: u64,
    ) -> Result<Duration, ClusterError> {
        let ms: u64 = self
            .call(
                op,
                HOLD.key(self.key("hold", hub_id))
                    .arg(ms)
                    .arg(kind)
                    .arg(offset_ms)
                    .invoke_async(&mut self.conn()),
            )
            .await?;
        Ok(Duration::from_millis(ms))
    }
}

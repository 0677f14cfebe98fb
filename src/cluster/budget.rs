//! The account's outbound budget shared by every replica: an exact rolling window, each
//! client's share of it, a hold after HubSpot's 429, and an optional daily limit.
//!
//! The window is a sorted set of call times per hub, checked and recorded by one Lua script
//! that reads Redis' own clock (`TIME`), so replicas' clocks do not matter. A call placed
//! at `t` counts until `t + per`, so no half-open span of length `per` ever holds more than
//! `limit` calls. A fixed window or GCRA would let about twice the limit through across a
//! boundary. HubSpot counts a call when it arrives, so a call is placed at admission +
//! `in_flight` while out and moved to its answer's time (Redis' clock) once that is in
//! ([`ClusterBackend::restamp`]): every place is then no earlier than HubSpot's count.
//! A client with a share has its own sorted set beside the account's, checked and recorded
//! by the same script, so a call refused by either takes nothing from the other. The check
//! is one Lua function ([`ADMIT_LUA`]) run alone ([`ClusterBackend::acquire_for`]) or inside
//! a flight's first look, so a leader's lease and its first call's admission are one step.
//!
//! A Redis that restarts empty has forgotten the window. Every admission checks that Redis
//! knows the replica (a set of replica ids per hub, in the same script); when it does not,
//! or Redis just came back after the replica worked alone, the replica writes its own calls
//! of the last window back (`REPLAY`, from its [`Ledger`]) before it asks, and, when
//! Redis' `run_id` changed or it worked alone, keeps to its local share for one window:
//! each replica knows only its own calls, and the others replay theirs a moment later.
//!
//! Daily reset: HubSpot resets the daily limit at midnight in the account's time zone, which
//! the gateway cannot see; the reset is `daily_reset_offset` after UTC midnight (default 0,
//! i.e. UTC midnight). An account in UTC-5 sets 5h; the cost of a wrong guess is a hold that
//! ends early (HubSpot answers 429 again and the hold is set again) or late.

use std::sync::LazyLock;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redis::{Script, ScriptInvocation};

use super::{ClusterBackend, ClusterError, millis};
use crate::upstream::Policy;

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
    /// The longest a call may stay unanswered. An allowed call is recorded at admission +
    /// this, the latest HubSpot can receive it, until [`ClusterBackend::restamp`] moves it
    /// to when its answer came; 0 records it at admission.
    pub in_flight: Duration,
}

/// One allowed call's entry in the shared windows, for [`ClusterBackend::restamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallId(uuid::Uuid);

/// The budget's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call may go; it is recorded at `at_ms` (Redis' clock, ms since the epoch).
    Allowed {
        /// Calls left in the window after this one.
        remaining: u32,
        /// When the call was admitted (its entry counts from `at_ms + in_flight`).
        at_ms: u64,
        /// Its entry, to restamp once HubSpot answered.
        call: CallId,
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
    /// A replica saw HubSpot's 429 of this policy (any but `DAILY`); `wait` is what is left
    /// of its hold.
    Hold(Policy),
    /// HubSpot's daily limit was hit; `wait` is until the daily reset.
    DailyHold,
    /// The calling client's own window is full; `wait` is until it (and the account's
    /// window, when that is full too) has room.
    ClientShare,
    /// The configured daily limit is spent; `wait` is until the daily reset.
    DailyLimit,
    /// Redis did not know this replica (it restarted empty, or this replica worked alone
    /// meanwhile): its recent calls were replayed, nothing was recorded, and this replica
    /// now caps its own calls at its local share for a window; ask again through that cap.
    Replay,
}

const DAY_MS: u64 = 86_400_000;

impl CallId {
    /// A new id, unique across replicas: for a call this replica allowed on its own, so that
    /// a later replay writes it under one member however often it is replayed.
    pub fn fresh() -> CallId {
        CallId(uuid::Uuid::new_v4())
    }

    /// Its member in the sorted sets.
    fn member(self) -> String {
        self.0.simple().to_string()
    }
}

/// One of this replica's calls still in the window, as a replay writes it into a Redis that
/// lost it.
#[derive(Debug, Clone)]
pub struct ReplayCall {
    /// The member the call has (or would have had) in the shared windows.
    pub call: CallId,
    /// Where it stands in the window relative to now, in ms (negative: in the past; positive:
    /// a call still out, placed at admission + the request timeout).
    pub offset_ms: i64,
    /// The client whose own window holds it, when it was charged to a share.
    pub client: Option<String>,
}

/// What a replica remembers of its own calls, for a Redis that restarted empty (or a
/// replica that worked alone while Redis did not answer): [`super::ClusterBackend`] asks it
/// for the calls to replay, then tells it the replay happened.
pub trait Ledger: Send + Sync {
    /// This replica's calls still in the window now.
    fn recent_calls(&self) -> Vec<ReplayCall>;
    /// The replay is done; `restarted` when Redis is not the one this replica saw last.
    /// Returns whether this replica now caps its own calls at its local share for a window:
    /// other replicas' calls of the last window may not be replayed yet.
    fn replayed(&self, restarted: bool) -> bool;
}

/// One client's window inside the account's: at most `limit` of its calls per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientWindow<'a> {
    /// The client's configured name.
    pub client: &'a str,
    /// Its calls per window (`floor(limit × share)`, at least 1).
    pub limit: u32,
}

/// The admission check, as a Lua function both [`ACQUIRE`] and the flight's first look
/// ([`super::flight`]) run. Arguments: the window, hold, daily counter, client window (unused
/// when the client limit is 0) and replica set keys, then limit, per ms, unique member,
/// daily limit (0 = none), reset offset ms, client limit (0 = none), in-flight bound ms (the
/// entry's score is now + it), this replica's id. Returns {code, n, now}: 1 allowed (n =
/// remaining), 0 window (n = wait ms), 2 hold (`TEN_SECONDLY_ROLLING`), 6 hold
/// (`SECONDLY`), 7 hold (any other policy), 4 daily hold, 3 daily limit, 5 client share,
/// 8 this replica is not in the replica set (a Redis that restarted empty, or lost the
/// keys): nothing is recorded until it replayed its recent calls ([`REPLAY`]).
pub(crate) const ADMIT_LUA: &str = r#"
local function admit(kwin, khold, kday, kclient, kseen, a_limit, a_per, member, a_daily, a_offset, a_client, a_flight, replica)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  if redis.call('SISMEMBER', kseen, replica) == 0 then return {8, 1, now} end
  local hold = redis.call('PTTL', khold)
  if hold > 0 then
    local kind = redis.call('GET', khold)
    if kind == 'daily' then return {4, hold, now} end
    if kind == 'secondly' then return {6, hold, now} end
    if kind == 'unknown' then return {7, hold, now} end
    return {2, hold, now}
  end
  local limit = tonumber(a_limit)
  local per = tonumber(a_per)
  local daily = tonumber(a_daily)
  local to_reset = 86400000 - ((now - tonumber(a_offset)) % 86400000)
  if daily > 0 then
    local used = tonumber(redis.call('GET', kday) or '0')
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
  local n, wait = wait_for(kwin, limit)
  local client = tonumber(a_client)
  if client > 0 then
    local _, own = wait_for(kclient, client)
    if own > 0 then
      if wait > own then own = wait end
      return {5, own, now}
    end
  end
  if wait > 0 then return {0, wait, now} end
  local until_ms = now + tonumber(a_flight)
  local life = until_ms + per - now
  redis.call('ZADD', kwin, until_ms, member)
  if redis.call('PTTL', kwin) < life then redis.call('PEXPIRE', kwin, life) end
  if redis.call('PTTL', kseen) < life then redis.call('PEXPIRE', kseen, life) end
  if client > 0 then
    redis.call('ZADD', kclient, until_ms, member)
    if redis.call('PTTL', kclient) < life then redis.call('PEXPIRE', kclient, life) end
  end
  if daily > 0 then
    redis.call('INCR', kday)
    redis.call('PEXPIRE', kday, to_reset)
  end
  return {1, limit - n - 1, now}
end
"#;

/// KEYS: window, hold, daily counter, the client's window when ARGV[6] > 0, replica set.
/// ARGV: as [`ADMIT_LUA`]'s arguments after the keys.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{ADMIT_LUA}\nreturn admit(KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], \
         ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])"
    ))
});

/// KEYS: the account's window, the replica set, then the client windows calls name. ARGV:
/// replica id, per ms, then per call: member, offset from now in ms, index of its client's
/// key in KEYS (0: none). Writes each call at now + offset (Redis' clock) where it is not
/// already (`NX`: a member replayed twice, or one Redis still holds, counts once, at the
/// place Redis gave it), drops calls already out of the window, keeps each key alive until
/// its last entry leaves it, and adds the replica to the set, all in one step, so no
/// admission of this replica sees the set without its calls. Returns the calls written.
static REPLAY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per = tonumber(ARGV[2])
local written = 0
for i = 3, #ARGV - 2, 3 do
  local at = now + tonumber(ARGV[i + 1])
  if at > now - per then
    local life = at + per - now
    local targets = {KEYS[1]}
    local c = tonumber(ARGV[i + 2])
    if c > 0 then targets[2] = KEYS[c] end
    for _, key in ipairs(targets) do
      written = written + redis.call('ZADD', key, 'NX', at, ARGV[i])
      if redis.call('PTTL', key) < life then redis.call('PEXPIRE', key, life) end
    end
  end
end
redis.call('SADD', KEYS[2], ARGV[1])
if redis.call('PTTL', KEYS[2]) < per then redis.call('PEXPIRE', KEYS[2], per) end
return written
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

/// KEYS: the account's window and, when the call was charged to one, the client's. ARGV:
/// member, per ms. Moves the call's entry (where it still is) to now, when its answer is
/// in: HubSpot received it no later, so the next call admitted once this entry leaves the
/// window reaches HubSpot more than `per` after it. Keeps each key alive for `per` more.
static RESTAMP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local per = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now, ARGV[1]) > 0 then
    if redis.call('PTTL', key) < per then redis.call('PEXPIRE', key, per) end
  end
end
return now
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
        let ask = BudgetAsk {
            hub_id,
            policy: *policy,
            client,
        };
        if self.replay_if_due(hub_id, policy.per).await? {
            // This replica's cap applies from now: the caller asks through it.
            return Ok(Admission::Refused {
                wait: Duration::from_millis(1),
                reason: Refusal::Replay,
            });
        }
        let mut replayed = false;
        loop {
            let mut script = ACQUIRE.prepare_invoke();
            let call = self.admit_args(&ask, &mut script);
            let (code, n, now): (i64, i64, u64) = self
                .call("budget_acquire", script.invoke_async(&mut self.conn()))
                .await?;
            let answer = admission("budget_acquire", code, n, now, call)?;
            match answer {
                Admission::Refused {
                    reason: Refusal::Replay,
                    ..
                } if !replayed => {
                    replayed = true;
                    if self.replay(hub_id, policy.per).await? {
                        return Ok(answer);
                    }
                }
                answer => return Ok(answer),
            }
        }
    }

    /// Replays this replica's recent calls before its next admission when Redis just came
    /// back after this replica worked alone (its local calls are not in the shared window).
    /// Returns whether this replica now caps its own calls (see [`Ledger::replayed`]).
    pub(crate) async fn replay_if_due(
        &self,
        hub_id: u64,
        per: Duration,
    ) -> Result<bool, ClusterError> {
        if !self.inner.replay_due.swap(false, Ordering::AcqRel) {
            return Ok(false);
        }
        let replayed = self.replay(hub_id, per).await;
        if replayed.is_err() {
            self.inner.replay_due.store(true, Ordering::Release);
        }
        replayed
    }

    /// Replays this replica's recent calls now, in the background, into the window of its
    /// latest admission: when Redis came back or a connection to it was made again, so that
    /// a replica without requests has its calls back in a restarted Redis within moments,
    /// not at its next call. `only_if_due`: only when a return after a down spell is still
    /// to be replayed (see [`ClusterBackend::replay_if_due`]).
    pub(crate) fn spawn_replay(&self, only_if_due: bool) {
        let last = *self
            .inner
            .last_ask
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let (Some((hub_id, per)), Ok(runtime)) = (last, tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let backend = self.clone();
        runtime.spawn(async move {
            let replayed = if only_if_due {
                backend.replay_if_due(hub_id, per).await
            } else {
                backend.replay(hub_id, per).await
            };
            if let Err(e) = replayed {
                tracing::debug!(error = %e, "replay not done: it runs before this replica's next admission");
            }
        });
    }

    /// Writes this replica's calls of the last `per` (from its [`Ledger`]) into `hub_id`'s
    /// shared windows and registers the replica there, in one script; reads Redis' `run_id`
    /// to tell a restart from a replica that is new or worked alone. Returns whether the
    /// ledger now caps this replica's calls at its local share.
    pub(crate) async fn replay(&self, hub_id: u64, per: Duration) -> Result<bool, ClusterError> {
        let ledger = self.ledger();
        let calls = ledger
            .as_ref()
            .map(|l| l.recent_calls())
            .unwrap_or_default();
        let info = self
            .call(
                "server_info",
                redis::cmd("INFO")
                    .arg("server")
                    .query_async::<String>(&mut self.conn()),
            )
            .await;
        let run_id = match info {
            Ok(info) => info
                .lines()
                .find_map(|line| line.strip_prefix("run_id:"))
                .map(|id| id.trim().to_owned()),
            // An ACL user without INFO: the calls are still replayed; only a restart in
            // shared mode cannot be told apart, so that cap is not applied.
            Err(ClusterError::Redis { .. }) => None,
            Err(e) => return Err(e),
        };
        let mut script = REPLAY.prepare_invoke();
        script
            .key(self.key("rl", hub_id))
            .key(self.key("replicas", hub_id));
        script.arg(&self.inner.replica).arg(millis(per));
        let mut clients: Vec<&str> = Vec::new();
        for call in &calls {
            let index = match call.client.as_deref() {
                None => 0,
                Some(name) => match clients.iter().position(|c| *c == name) {
                    Some(i) => i + 3,
                    None => {
                        clients.push(name);
                        clients.len() + 2
                    }
                },
            };
            script
                .arg(call.call.member())
                .arg(call.offset_ms)
                .arg(index);
        }
        for client in &clients {
            script.key(self.client_key(hub_id, client));
        }
        let written: u64 = self
            .call("budget_replay", script.invoke_async(&mut self.conn()))
            .await?;
        let restarted = {
            let mut seen = self.inner.run_id.lock().unwrap_or_else(|p| p.into_inner());
            let restarted = seen.is_some() && run_id.is_some() && *seen != run_id;
            if run_id.is_some() {
                *seen = run_id;
            }
            restarted
        };
        self.inner.metrics.window_replays_total.inc();
        let capped = ledger.is_some_and(|l| l.replayed(restarted));
        if restarted || capped {
            tracing::warn!(
                hub_id,
                replayed = written,
                restarted,
                capped,
                "shared budget: Redis lost this replica's recent calls (restarted, or this replica worked alone): replayed them into the shared window; this replica keeps to its local share for one window"
            );
        }
        Ok(capped)
    }

    /// Adds `ask`'s keys (five: the client's window, or the account's again in its place)
    /// and then its arguments to `script`, in [`ADMIT_LUA`]'s order; returns the id the call
    /// is recorded under if allowed.
    pub(crate) fn admit_args(&self, ask: &BudgetAsk<'_>, script: &mut ScriptInvocation) -> CallId {
        *self
            .inner
            .last_ask
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((ask.hub_id, ask.policy.per));
        let window = self.key("rl", ask.hub_id);
        let client_window = match ask.client {
            Some(c) => self.client_key(ask.hub_id, c.client),
            None => window.clone(),
        };
        script
            .key(window)
            .key(self.key("hold", ask.hub_id))
            .key(self.key("day", ask.hub_id))
            .key(client_window)
            .key(self.key("replicas", ask.hub_id));
        let call = CallId(uuid::Uuid::new_v4());
        let policy = &ask.policy;
        script
            .arg(policy.limit)
            .arg(millis(policy.per))
            .arg(call.member())
            .arg(policy.daily_limit.unwrap_or(0))
            .arg(millis(policy.daily_reset_offset) % DAY_MS)
            .arg(ask.client.map_or(0, |c| c.limit.max(1)))
            .arg(millis(policy.in_flight))
            .arg(&self.inner.replica);
        call
    }

    /// Moves `call`'s entry in `hub_id`'s window (and in `client`'s, when it was charged to
    /// one) to now, Redis' clock, once HubSpot's answer (or failure) is in. Until then, or
    /// if this fails, the entry stays at admission + `in_flight`.
    pub async fn restamp(
        &self,
        hub_id: u64,
        call: CallId,
        client: Option<&str>,
        per: Duration,
    ) -> Result<(), ClusterError> {
        let mut script = RESTAMP.prepare_invoke();
        script.key(self.key("rl", hub_id));
        if let Some(client) = client {
            script.key(self.client_key(hub_id, client));
        }
        script.arg(call.member()).arg(millis(per));
        let _: u64 = self
            .call("budget_restamp", script.invoke_async(&mut self.conn()))
            .await?;
        Ok(())
    }

    /// The window of `client`'s calls for `hub_id`.
    fn client_key(&self, hub_id: u64, client: &str) -> String {
        // Hub ids are digits, so `hub:name` names one client of one hub.
        self.key("rlc", format_args!("{hub_id}:{client}"))
    }

    /// Holds every replica's calls for `hub_id` for `wait` (HubSpot's `Retry-After`, or the
    /// rate-limit interval) after a `TEN_SECONDLY_ROLLING` 429. Never shortens a longer hold
    /// already set.
    pub async fn hold(&self, hub_id: u64, wait: Duration) -> Result<Duration, ClusterError> {
        self.hold_for_policy(hub_id, wait, Policy::TenSecondlyRolling)
            .await
    }

    /// [`ClusterBackend::hold`] after a 429 naming `policy`, which every replica's held
    /// callers are then told; a `DAILY` one is [`ClusterBackend::hold_daily_for`].
    pub async fn hold_for_policy(
        &self,
        hub_id: u64,
        wait: Duration,
        policy: Policy,
    ) -> Result<Duration, ClusterError> {
        // "429" is what builds before the policy was kept wrote for every hold: read as
        // TEN_SECONDLY_ROLLING, as they read it, so replicas of both builds agree.
        let (op, kind) = match policy {
            Policy::TenSecondlyRolling => ("budget_hold", "429"),
            Policy::Secondly => ("budget_hold", "secondly"),
            Policy::Unknown => ("budget_hold", "unknown"),
            Policy::Daily => ("budget_hold_daily", "daily"),
        };
        self.set_hold(op, hub_id, millis(wait).max(1), kind, 0)
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
        self.hold_for_policy(hub_id, wait, Policy::Daily).await
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

/// What a call asks of the shared budget: its account, the budget's rules and, when its
/// client has a share, that client's window.
#[derive(Debug, Clone, Copy)]
pub struct BudgetAsk<'a> {
    /// The HubSpot account (hub id).
    pub hub_id: u64,
    /// The account's rules.
    pub policy: BudgetPolicy,
    /// The calling client's window, when it has a share.
    pub client: Option<ClientWindow<'a>>,
}

/// [`ADMIT_LUA`]'s answer {code, n, now} for the call recorded as `call`, read by `op`.
pub(crate) fn admission(
    op: &'static str,
    code: i64,
    n: i64,
    now: u64,
    call: CallId,
) -> Result<Admission, ClusterError> {
    let wait = Duration::from_millis(u64::try_from(n).unwrap_or(1).max(1));
    let refused = |reason| Ok(Admission::Refused { wait, reason });
    match code {
        1 => Ok(Admission::Allowed {
            remaining: u32::try_from(n).unwrap_or(0),
            at_ms: now,
            call,
        }),
        0 => refused(Refusal::Window),
        2 => refused(Refusal::Hold(Policy::TenSecondlyRolling)),
        6 => refused(Refusal::Hold(Policy::Secondly)),
        7 => refused(Refusal::Hold(Policy::Unknown)),
        3 => refused(Refusal::DailyLimit),
        4 => refused(Refusal::DailyHold),
        5 => refused(Refusal::ClientShare),
        8 => refused(Refusal::Replay),
        other => Err(ClusterError::Redis {
            op,
            message: format!("unexpected script answer {other}"),
        }),
    }
}

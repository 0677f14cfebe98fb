//! One upstream call per task across replicas.
//!
//! The first replica to ask takes a lease (`SET lease token NX PX lease_ttl`) and becomes
//! the leader; it renews the lease while its call runs, then publishes the answer (PENDING
//! ones included) under a short-lived key and, when a replica waits (it raises a flag as it
//! finds the lease taken), on a pub/sub channel, and releases the lease by
//! compare-and-delete. Other replicas wait: a pub/sub message wakes them at once, and they
//! poll every `poll_interval` because pub/sub may drop messages. A waiter accepts only an
//! answer stamped with the token of a leader it waited for, so an older answer is never
//! replayed. If the lease disappears without an answer (the leader died and it expired, or
//! it gave up), the next poll takes it over and that waiter becomes the leader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use tokio::sync::broadcast::error::RecvError;
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::Instant;

use super::budget::{ADMIT_LUA, BudgetAsk, admission};
use super::codec::{decode_published, encode_published};
use super::health::connect_bound;
use super::{
    Admission, Answer, CachedAnswer, ClusterBackend, ClusterError, Refusal, TaskKey, millis,
};

/// How long a published answer stays readable by pollers. Waiters poll far more often; the
/// key only has to outlive the slowest poll after the message.
const ANSWER_TTL: Duration = Duration::from_secs(10);

/// What joining a task's flight gave.
#[derive(Debug)]
pub enum Flight {
    /// This replica calls HubSpot, then [`Lease::publish`]es the answer.
    Leader(Lease),
    /// Another replica's call answered.
    Answer(Answer),
    /// The caller's deadline came first.
    DeadlineReached,
}

/// What a first look at a task across replicas gave.
#[derive(Debug)]
pub enum Lookup {
    /// A replica stored a finished answer for it; no flight was joined.
    Cached(CachedAnswer),
    /// No stored answer: the task's flight, joined.
    Flight(Flight),
    /// No stored answer and no leader, but the shared budget refused the call: no lease was
    /// taken, so the task is free for another replica's try.
    Refused {
        /// How long until a call may be allowed.
        wait: Duration,
        /// Which rule refused.
        reason: Refusal,
    },
}

/// The Redis keys of one task's flight.
#[derive(Debug)]
struct FlightKeys {
    /// The leader's token, while it holds the lease.
    lease: String,
    /// The latest published answer and its leader's token.
    answer: String,
    /// Set while some replica waits, so the leader's answer is published on the channel.
    waiting: String,
}

/// An answer received by pub/sub, fanned out to this replica's waiters.
#[derive(Debug)]
pub(crate) struct Published {
    lease_key: String,
    token: String,
    answer: Answer,
}

/// KEYS: lease, answer, waiting flag, the task's shared-cache entry, then (with the budget)
/// [`ADMIT_LUA`]'s five keys. ARGV: new token, lease ms, look at the cache ('1' or '0'),
/// ask the budget ('1' or '0'), then (with the budget) its eight arguments, then the tokens
/// of leaders waited for. Every answer is {code, text, bytes, n, now}: {3, age ms, stored
/// answer} (the shared cache holds one: nothing else is done), {1, token, answer} (an
/// awaited leader's answer), {0, holder} (wait; the flag tells the leader to publish),
/// {2, token, _, remaining, now} (the lease was free and the budget, if asked, admitted
/// the call: the caller leads), or {4, refusal code, _, wait ms} (the lease was free but
/// the budget refused: no lease is taken). One atomic step: no replica can store an answer
/// between the cache look and the lease, so a leader need not look again, and a call the
/// budget refuses never holds a lease a waiter would have to outwait.
static JOIN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(&format!(
        "{ADMIT_LUA}{}",
        r#"
if ARGV[3] == '1' then
  local e = redis.call('HMGET', KEYS[4], 't', 'v')
  if e[1] and e[2] then
    local t = redis.call('TIME')
    local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    return {3, tostring(math.max(0, now - tonumber(e[1]))), e[2], 0, 0}
  end
end
local budget = ARGV[4] == '1'
local first = 5
if budget then first = 13 end
local tok = redis.call('HGET', KEYS[2], 'tok')
if tok then
  for i = first, #ARGV do
    if ARGV[i] == tok then return {1, tok, redis.call('HGET', KEYS[2], 'v'), 0, 0} end
  end
end
local holder = redis.call('GET', KEYS[1])
if holder then
  redis.call('SET', KEYS[3], '1', 'PX', ARGV[2])
  return {0, holder, '', 0, 0}
end
local remaining, now = 0, 0
if budget then
  local a = admit(KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], ARGV[5], ARGV[6], ARGV[7],
    ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12])
  if a[1] ~= 1 then return {4, tostring(a[1]), '', a[2], a[3]} end
  remaining, now = a[2], a[3]
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {2, ARGV[1], '', remaining, now}
"#
    ))
});

/// KEYS: lease. ARGV: token, lease ms. 1 if still held and extended.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#,
    )
});

/// KEYS: lease. ARGV: token. Deletes only our own lease.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#,
    )
});

/// KEYS: lease, answer, waiting flag. ARGV: token, encoded answer, answer ttl ms, channel,
/// message. The message goes out only when a waiter raised the flag: every replica's
/// subscriber receives and decodes each message, which is wasted work (on every replica,
/// on the miss path's CPU) when nobody waits.
static PUBLISH: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'tok', ARGV[1], 'v', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
if redis.call('DEL', KEYS[3]) == 1 then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

impl ClusterBackend {
    /// The lease, answer and waiting-flag keys of `key`'s flight.
    fn flight_keys(&self, key: &TaskKey) -> FlightKeys {
        let suffix = key.suffix();
        FlightKeys {
            lease: self.key("lease", &suffix),
            answer: self.key("ans", &suffix),
            waiting: self.key("wait", &suffix),
        }
    }

    fn channel(&self) -> String {
        self.key("flights", "v1")
    }

    /// A miss's first look at `key` across replicas, in one round trip: the shared cache's
    /// answer if a replica stored one (a stored answer that cannot be read is passed over),
    /// else [`ClusterBackend::join_flight`]'s outcome. With `budget`, a lease that is free
    /// is taken only if the shared budget admits the call, in the same step: the leader's
    /// admission comes with its lease ([`Lease::take_admission`]), and a refusal is
    /// [`Lookup::Refused`] with no lease taken. On `Err` the caller uses its local
    /// single-flight and budget.
    pub async fn lookup(
        &self,
        key: &TaskKey,
        deadline: Instant,
        budget: Option<BudgetAsk<'_>>,
    ) -> Result<Lookup, ClusterError> {
        self.join(key, deadline, true, budget).await
    }

    /// Joins the cluster-wide flight for `key`: leads it, or waits (until `deadline`) for
    /// its leader's answer, taking it over if the leader disappears. On `Err` the caller
    /// uses its local single-flight.
    pub async fn join_flight(
        &self,
        key: &TaskKey,
        deadline: Instant,
    ) -> Result<Flight, ClusterError> {
        match self.join(key, deadline, false, None).await? {
            Lookup::Flight(flight) => Ok(flight),
            // Only a look at the cache can find an entry, only an ask of the budget be
            // refused.
            Lookup::Cached(_) | Lookup::Refused { .. } => Err(ClusterError::Redis {
                op: "flight_join",
                message: "an answer to a question not asked".to_owned(),
            }),
        }
    }

    /// The flight's loop; with `look_first`, its first step also reads the shared cache,
    /// and with `budget` its first step that finds no stored answer asks the budget.
    async fn join(
        &self,
        key: &TaskKey,
        deadline: Instant,
        look_first: bool,
        mut budget: Option<BudgetAsk<'_>>,
    ) -> Result<Lookup, ClusterError> {
        let keys = self.flight_keys(key);
        let cache_key = self.cache_key(key);
        // Only the first step looks: a waiter's later polls must find its leader's answer
        // (COALESCED), not the copy that leader stored in the cache just before publishing.
        let mut look = look_first;
        let token = uuid::Uuid::new_v4().simple().to_string();
        let lease_ms = millis(self.inner.config.lease_ttl);
        // Subscribed before the first look, so an answer published in between is not missed.
        let mut messages = self.inner.published.subscribe();
        let mut awaited: Vec<String> = Vec::new();
        let waits = &self.inner.metrics.flight_waits_total;
        if let Some(ask) = &budget
            && self.replay_if_due(ask.hub_id, ask.policy.per).await?
        {
            // The leader's call asks through this replica's cap instead.
            budget = None;
        }
        let mut replayed = false;
        loop {
            let mut script = JOIN.key(&keys.lease);
            script.key(&keys.answer).key(&keys.waiting).key(&cache_key);
            let op = if look { "flight_lookup" } else { "flight_join" };
            script
                .arg(&token)
                .arg(lease_ms)
                .arg(if look { "1" } else { "0" })
                .arg(if budget.is_some() { "1" } else { "0" });
            let call = budget.map(|ask| self.admit_args(&ask, &mut script));
            script.arg(&awaited);
            let step: Result<(i64, String, Vec<u8>, i64, u64), _> =
                self.call(op, script.invoke_async(&mut self.conn())).await;
            look = false;
            let (code, holder, bytes, n, now) = match step {
                Ok(step) => step,
                Err(e) => {
                    if !awaited.is_empty() {
                        waits.with_label_values(&["error"]).inc();
                    }
                    return Err(e);
                }
            };
            // Redis does not know this replica: its recent calls go in first, then the same
            // step again, without the budget when this replica's own cap now applies (the
            // leader's call asks through it).
            if code == 4
                && holder == "8"
                && !replayed
                && let Some(ask) = &budget
            {
                replayed = true;
                if self.replay(ask.hub_id, ask.policy.per).await? {
                    budget = None;
                }
                continue;
            }
            if code != 3 {
                budget = None;
            }
            match code {
                3 => match self.cached(key, &holder, &bytes) {
                    Ok(found) => return Ok(Lookup::Cached(found)),
                    // An entry this build cannot read or another hub's: as if absent, and
                    // the flight is joined at once (the budget still asked, if it was).
                    Err(_) => continue,
                },
                4 => {
                    let refusal = holder.parse().map_err(|_| ClusterError::Redis {
                        op,
                        message: "unreadable budget refusal".to_owned(),
                    });
                    let call = call.ok_or_else(|| ClusterError::Redis {
                        op,
                        message: "a budget refusal where none was asked".to_owned(),
                    })?;
                    return match admission(op, refusal?, n, now, call)? {
                        Admission::Refused { wait, reason } => Ok(Lookup::Refused { wait, reason }),
                        Admission::Allowed { .. } => Err(ClusterError::Redis {
                            op,
                            message: "a refusal that allows".to_owned(),
                        }),
                    };
                }
                1 => {
                    let answer = Answer::decode(&bytes)?;
                    if answer.hub_id != key.hub_id {
                        return Err(ClusterError::WrongHub);
                    }
                    waits.with_label_values(&["answer"]).inc();
                    return Ok(Lookup::Flight(Flight::Answer(answer)));
                }
                2 => {
                    if !awaited.is_empty() {
                        self.inner.metrics.lease_takeovers_total.inc();
                        waits.with_label_values(&["takeover"]).inc();
                    }
                    let mut lease = Lease::start(self.clone(), keys, token);
                    if let Some(call) = call {
                        lease.admission = Some(admission(op, 1, n, now, call)?);
                    }
                    return Ok(Lookup::Flight(Flight::Leader(lease)));
                }
                _ => {
                    if !awaited.contains(&holder) {
                        awaited.push(holder);
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                waits.with_label_values(&["deadline"]).inc();
                return Ok(Lookup::Flight(Flight::DeadlineReached));
            }
            let nap = tokio::time::sleep_until(deadline.min(now + self.inner.config.poll_interval));
            tokio::pin!(nap);
            loop {
                tokio::select! {
                    () = &mut nap => break,
                    message = messages.recv() => match message {
                        Ok(p) if p.lease_key == keys.lease && awaited.contains(&p.token) => {
                            if p.answer.hub_id != key.hub_id {
                                return Err(ClusterError::WrongHub);
                            }
                            waits.with_label_values(&["answer"]).inc();
                            return Ok(Lookup::Flight(Flight::Answer(p.answer.clone())));
                        }
                        Ok(_) => {}
                        // Messages were lost locally: poll now instead of waiting.
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => {
                            (&mut nap).await;
                            break;
                        }
                    },
                }
            }
        }
    }
}

/// The lease of a flight's leader. It is renewed in the background every third of
/// `lease_ttl` until [`Lease::publish`], [`Lease::abandon`] or drop; dropped without an
/// answer, it is released so a waiter takes over at its next poll.
#[derive(Debug)]
pub struct Lease {
    backend: ClusterBackend,
    keys: FlightKeys,
    token: String,
    /// The shared budget's admission of the leader's first call, when the lookup asked it.
    admission: Option<Admission>,
    held: Arc<AtomicBool>,
    renewer: Option<JoinHandle<()>>,
    finished: bool,
}

impl Lease {
    fn start(backend: ClusterBackend, keys: FlightKeys, token: String) -> Lease {
        let held = Arc::new(AtomicBool::new(true));
        let renewer = {
            let (backend, key, token, held) = (
                backend.clone(),
                keys.lease.clone(),
                token.clone(),
                held.clone(),
            );
            let ttl = backend.inner.config.lease_ttl;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval_at(Instant::now() + ttl / 3, ttl / 3);
                loop {
                    tick.tick().await;
                    let renewed = backend
                        .call(
                            "lease_renew",
                            RENEW
                                .key(&key)
                                .arg(&token)
                                .arg(millis(ttl))
                                .invoke_async::<i64>(&mut backend.conn()),
                        )
                        .await;
                    // An error is retried at the next tick; only Redis saying "not yours"
                    // ends the lease.
                    if let Ok(0) = renewed {
                        held.store(false, Ordering::Release);
                        break;
                    }
                }
            })
        };
        Lease {
            backend,
            keys,
            token,
            admission: None,
            held,
            renewer: Some(renewer),
            finished: false,
        }
    }

    /// The shared budget's admission of this leader's first call, taken with the lease by
    /// [`ClusterBackend::lookup`]; `None` once taken, or when the budget was not asked.
    pub fn take_admission(&mut self) -> Option<Admission> {
        self.admission.take()
    }

    /// False once a renewal found the lease gone (expired while Redis was unreachable, then
    /// taken by another replica): this replica's answer is still published, but another
    /// call may be running.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// Publishes the answer to every waiter (key and pub/sub message) and releases the lease.
    pub async fn publish(mut self, answer: &Answer) -> Result<(), ClusterError> {
        // Encoded first: an answer that cannot be stored returns here with the lease still
        // unfinished, so dropping it releases the lease and a waiter takes over at once
        // instead of waiting `lease_ttl` for it to expire.
        let bytes = answer.encode()?;
        let message = encode_published(&self.keys.lease, &self.token, &bytes)?;
        self.stop_renewing();
        self.finished = true;
        let backend = self.backend.clone();
        let _: i64 = backend
            .call(
                "flight_publish",
                PUBLISH
                    .key(&self.keys.lease)
                    .key(&self.keys.answer)
                    .key(&self.keys.waiting)
                    .arg(&self.token)
                    .arg(bytes)
                    .arg(millis(ANSWER_TTL))
                    .arg(backend.channel())
                    .arg(message)
                    .invoke_async(&mut backend.conn()),
            )
            .await?;
        Ok(())
    }

    /// Stops renewing and leaves the lease to expire, as a replica that died would: waiters
    /// take over after `lease_ttl`. For shutdown paths that must not wait, and for tests.
    pub fn abandon(mut self) {
        self.stop_renewing();
        self.finished = true;
    }

    fn stop_renewing(&mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.finished {
            return;
        }
        // Outside a runtime nothing can be sent; the lease then simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (backend, key, token) = (
                self.backend.clone(),
                std::mem::take(&mut self.keys.lease),
                std::mem::take(&mut self.token),
            );
            runtime.spawn(async move {
                let _ = backend
                    .call(
                        "lease_release",
                        RELEASE
                            .key(&key)
                            .arg(&token)
                            .invoke_async::<i64>(&mut backend.conn()),
                    )
                    .await;
            });
        }
    }
}

/// Listens on the flights channel and fans answers out to local waiters; reconnects after
/// any failure (and then replays this replica's recent calls, see
/// [`ClusterBackend::spawn_replay`]). Polling covers the gaps.
pub(crate) fn spawn_subscriber(backend: &ClusterBackend, client: redis::Client) -> AbortHandle {
    let channel = backend.channel();
    let sender = backend.inner.published.clone();
    let bound = connect_bound(backend.inner.config.timeout);
    let weak = Arc::downgrade(&backend.inner);
    tokio::spawn(async move {
        let mut subscribed_before = false;
        loop {
            if let Ok(Ok(mut pubsub)) = tokio::time::timeout(bound, client.get_async_pubsub()).await
            {
                if let Ok(Ok(())) = tokio::time::timeout(bound, pubsub.subscribe(&channel)).await {
                    // A new connection after a lost one: Redis may have restarted empty,
                    // and this replica may get no request to find out for a while.
                    if subscribed_before && let Some(inner) = weak.upgrade() {
                        ClusterBackend { inner }.spawn_replay(false);
                    }
                    subscribed_before = true;
                    let mut stream = pubsub.into_on_message();
                    while let Some(message) = stream.next().await {
                        let Ok((lease_key, token, bytes)) =
                            decode_published(message.get_payload_bytes())
                        else {
                            continue;
                        };
                        let Ok(answer) = Answer::decode(bytes) else {
                            continue;
                        };
                        // No receiver is normal: nobody on this replica waits.
                        let _ = sender.send(Arc::new(Published {
                            lease_key,
                            token,
                            answer,
                        }));
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .abort_handle()
}

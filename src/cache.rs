//! Answers kept in memory (terminal ones, HubSpot's 404s for a while, optionally a short
//! micro-cache of the rest, and the last non-terminal answer to stand in for a HubSpot
//! failure), and single-flight: concurrent misses of one key share one upstream call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::StatusCode;
use hyper::header::HeaderMap;
use moka::sync::Cache as Moka;
use tokio::sync::watch;

use crate::config::CacheConfig;
use crate::route::StatusRequest;

/// Bytes an entry costs beyond its body and headers: the key (twice), `Arc`s, the
/// `HeaderMap`'s table, moka's entry, deque and timer-wheel nodes, allocator rounding.
/// Measured (bench/run --only memory, docs/benchmarks.md), not guessed: with it, resident
/// memory stays within 1.3 x max_bytes + 30 MiB.
const ENTRY_OVERHEAD: u32 = 1536;

/// One answer, shared by everyone it is given to.
#[derive(Debug)]
pub struct Stored {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub stored_at: Instant,
    /// Served as a HIT while younger than this.
    fresh_for: Duration,
    /// May stand in for a HubSpot failure while younger than this.
    stale_for: Duration,
    /// The HubSpot account whose token fetched it; an answer is never served to another.
    hub_id: Option<u64>,
    /// A 200 whose `status` is COMPLETE or CANCELED: the only kind replicas share as a HIT.
    terminal: bool,
    /// Who asked HubSpot for it.
    pub origin: Origin,
}

/// Who asked HubSpot for an answer; with cluster mode, another replica may have. It decides
/// what the callers of a flight see in `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This replica's own call.
    HubSpot,
    /// The shared (second-level) cache, stored by any replica: a HIT.
    SharedCache,
    /// Another replica's call for the same task, shared with this one: COALESCED.
    Peer,
}

/// The outcome of a fetch, shared with every caller that waited for it. The error side is
/// whatever the fetching side produces, shared behind an `Arc`.
pub type Outcome<E> = Result<Arc<Stored>, Arc<E>>;

/// How a caller's answer was obtained; the `X-Cache` header and the `cache` metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from memory.
    Hit = 0,
    /// This request's own upstream call.
    Miss = 1,
    /// Another request's upstream call, shared.
    Coalesced = 2,
    /// The request never reached the cache (refused before it).
    None = 3,
    /// HubSpot failed; the last answer seen stood in for the failure.
    Stale = 4,
}

impl CacheOutcome {
    /// Every outcome, in the order of their discriminants.
    pub const ALL: [CacheOutcome; 5] = [
        CacheOutcome::Hit,
        CacheOutcome::Miss,
        CacheOutcome::Coalesced,
        CacheOutcome::None,
        CacheOutcome::Stale,
    ];

    /// The `cache` label of the request metrics.
    pub fn label(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Coalesced => "coalesced",
            CacheOutcome::None => "none",
            CacheOutcome::Stale => "stale",
        }
    }

    /// The `X-Cache` header value, if the request reached the cache.
    pub fn header(self) -> Option<&'static str> {
        match self {
            CacheOutcome::Hit => Some("HIT"),
            CacheOutcome::Miss => Some("MISS"),
            CacheOutcome::Coalesced => Some("COALESCED"),
            CacheOutcome::None => None,
            CacheOutcome::Stale => Some("STALE"),
        }
    }
}

/// The fetches in flight, by key: a follower clones the receiver; with it, the client the
/// flight's HubSpot calls are charged to.
type Flights<E> = Mutex<HashMap<StatusRequest, (watch::Receiver<Option<Outcome<E>>>, Arc<str>)>>;

/// Whether a caller must fetch or can wait for a fetch already running.
pub enum Flight<E> {
    /// The answer is already stored.
    Hit(Arc<Stored>),
    /// Nobody is fetching this key: the caller must run the fetch and `complete` it.
    Lead(Leader<E>),
    /// Someone is fetching it, charged to the client named here: wait on this.
    Follow(watch::Receiver<Option<Outcome<E>>>, Arc<str>),
}

/// The duty to fetch one key and tell its followers: hand the outcome to
/// [`AnswerCache::complete`]. Dropped without completing (the fetch panicked or was
/// cancelled), it still leaves the in-flight table, and its followers see the flight end
/// without an outcome instead of waiting for their deadline.
pub struct Leader<E> {
    key: StatusRequest,
    tx: watch::Sender<Option<Outcome<E>>>,
    /// Where the leader's own caller waits, like any follower.
    pub rx: watch::Receiver<Option<Outcome<E>>>,
    flights: Arc<Flights<E>>,
}

impl<E> Drop for Leader<E> {
    fn drop(&mut self) {
        // The entry is this leader's: `lookup` adds one only where none is, and only the
        // leader's drop removes it. The sender goes with the leader, which closes the channel
        // for followers still waiting on an abandoned flight.
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// The store and the in-flight table.
pub struct AnswerCache<E> {
    store: Moka<StatusRequest, Arc<Stored>>,
    flights: Arc<Flights<E>>,
    terminal_ttl: Duration,
    pending_ttl: Duration,
    stale_if_error: Duration,
    missing_ttl: Duration,
    /// The HubSpot account whose answers are stored; 0 until the first token is seen.
    hub_id: AtomicU64,
}

struct PerEntryTtl;

impl moka::Expiry<StatusRequest, Arc<Stored>> for PerEntryTtl {
    fn expire_after_create(
        &self,
        _: &StatusRequest,
        value: &Arc<Stored>,
        _: Instant,
    ) -> Option<Duration> {
        // An answer from the shared cache arrives already aged: it leaves when its windows
        // close as counted from HubSpot's answer, not from this replica's copy.
        Some(value.kept_for().saturating_sub(value.stored_at.elapsed()))
    }
}

impl<E: Send + Sync + 'static> AnswerCache<E> {
    /// A cache bounded by `max_bytes` of weight.
    pub fn new(config: &CacheConfig) -> Self {
        let store = Moka::builder()
            .max_capacity(config.max_bytes)
            .weigher(|k: &StatusRequest, v: &Arc<Stored>| weight(k, v))
            .expire_after(PerEntryTtl)
            // LRU rather than moka's default TinyLFU: a task that just finished is the one its
            // pollers ask about next, and TinyLFU would refuse to admit it into a full cache.
            .eviction_policy(moka::policy::EvictionPolicy::lru())
            .build();
        AnswerCache {
            store,
            flights: Arc::new(Mutex::new(HashMap::new())),
            terminal_ttl: config.terminal_ttl,
            pending_ttl: config.pending_ttl,
            stale_if_error: config.stale_if_error,
            missing_ttl: config.missing_ttl,
            hub_id: AtomicU64::new(0),
        }
    }

    /// Looks the key up as of `now` (the request's own clock read, so a hit reads no other);
    /// on a miss, joins the fetch in flight or becomes its leader, the flight then charged
    /// to `client`.
    pub fn lookup(&self, key: &StatusRequest, client: &Arc<str>, now: Instant) -> Flight<E> {
        if let Some(hit) = self.get(key, now) {
            return Flight::Hit(hit);
        }
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((rx, leader)) = flights.get(key) {
            return Flight::Follow(rx.clone(), leader.clone());
        }
        // A leader that finished between the lookup above and taking the lock stored its
        // answer before leaving the table: look once more so no second fetch starts.
        if let Some(hit) = self.get(key, Instant::now()) {
            return Flight::Hit(hit);
        }
        let (tx, rx) = watch::channel(None);
        flights.insert(key.clone(), (rx.clone(), client.clone()));
        Flight::Lead(Leader {
            key: key.clone(),
            tx,
            rx,
            flights: self.flights.clone(),
        })
    }

    /// Ends a flight: stores the answer if it may be stored, tells every follower, and leaves
    /// the in-flight table (as the leader is dropped).
    pub fn complete(&self, leader: Leader<E>, outcome: Result<Stored, E>) {
        let outcome = match outcome {
            Ok(stored) => {
                let stored = Arc::new(stored);
                // A fetch that started with the previous account's token finishes after the
                // account changed: its answer goes to its callers but is not kept.
                if stored.is_stored() && self.same_hub(&stored) {
                    self.store
                        .insert(leader.key.clone(), Arc::new(stored.for_keeping()));
                } else if !is_failure(stored.status) {
                    // HubSpot said something newer than the entry kept (a 403, a status the
                    // gateway does not keep): the old answer must not stand in for it later.
                    self.store.invalidate(&leader.key);
                }
                Ok(stored)
            }
            Err(e) => Err(Arc::new(e)),
        };
        // A caller that joins between this send and the leader leaving the table gets this
        // outcome at once; one that looks after finds the stored answer or starts afresh.
        leader.tx.send_replace(Some(outcome));
    }

    /// Wraps an upstream answer for storing; its windows say whether and how long it is a
    /// HIT, and whether it may later stand in for a failure.
    ///
    /// A PENDING/PROCESSING answer is a HIT within `pending_ttl` and may stand in within
    /// `stale_if_error`, each counted from when it was fetched: past the first and within
    /// the second it is asked again, and kept for the case HubSpot then fails.
    pub fn entry(
        &self,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        hub_id: Option<u64>,
    ) -> Stored {
        let terminal =
            status == StatusCode::OK && matches!(task_status(&body), Some("COMPLETE" | "CANCELED"));
        let (fresh_for, stale_for) = match (status, task_status(&body)) {
            (StatusCode::OK, Some("COMPLETE" | "CANCELED")) => (self.terminal_ttl, Duration::ZERO),
            (StatusCode::OK, Some("PENDING" | "PROCESSING")) => {
                (self.pending_ttl, self.stale_if_error)
            }
            (StatusCode::OK, Some(_)) => (self.pending_ttl, Duration::ZERO),
            (StatusCode::NOT_FOUND, _) => (self.missing_ttl, Duration::ZERO),
            _ => (Duration::ZERO, Duration::ZERO),
        };
        Stored {
            status,
            headers,
            body,
            stored_at: Instant::now(),
            fresh_for,
            stale_for,
            hub_id,
            terminal,
            origin: Origin::HubSpot,
        }
    }

    /// Wraps an answer another replica obtained, as [`AnswerCache::entry`] does, with its
    /// `origin` and its `age` (time since HubSpot gave it), so its windows and its `Age`
    /// header count from HubSpot's answer whichever replica asked.
    pub fn shared_entry(
        &self,
        origin: Origin,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        hub_id: u64,
        age: Duration,
    ) -> Stored {
        let mut stored = self.entry(status, headers, body, Some(hub_id));
        stored.origin = origin;
        if let Some(then) = stored.stored_at.checked_sub(age) {
            stored.stored_at = then;
        }
        stored
    }

    /// How long terminal answers are kept: also their life in the shared cache.
    pub fn terminal_ttl(&self) -> Duration {
        self.terminal_ttl
    }

    /// A stored answer young enough to be a HIT, of the current HubSpot account.
    fn get(&self, key: &StatusRequest, now: Instant) -> Option<Arc<Stored>> {
        self.kept(key)
            .filter(|s| now.saturating_duration_since(s.stored_at) < s.fresh_for)
    }

    /// The last answer seen for `key`, when it may stand in for a HubSpot failure: a
    /// non-terminal 200 of the current HubSpot account younger than `stale_if_error`.
    pub fn stale(&self, key: &StatusRequest) -> Option<Arc<Stored>> {
        self.kept(key)
            .filter(|s| s.stored_at.elapsed() < s.stale_for)
    }

    /// The entry kept for `key`, unless it belongs to another HubSpot account than the
    /// current one (then it is dropped).
    fn kept(&self, key: &StatusRequest) -> Option<Arc<Stored>> {
        let kept = self.store.get(key)?;
        if self.same_hub(&kept) {
            Some(kept)
        } else {
            self.store.invalidate(key);
            None
        }
    }

    /// Whether `stored` was fetched for the account now in service (0: not known yet).
    fn same_hub(&self, stored: &Stored) -> bool {
        let current = self.hub_id.load(Ordering::Relaxed);
        current == 0 || stored.hub_id.is_none_or(|h| h == current)
    }

    /// Forgets every answer if the token now belongs to another HubSpot account.
    pub fn bind_hub(&self, hub_id: Option<u64>) {
        let Some(hub) = hub_id else { return };
        let previous = self.hub_id.swap(hub, Ordering::Relaxed);
        if previous != 0 && previous != hub {
            tracing::warn!(previous, hub, "HubSpot account changed; cache emptied");
            self.store.invalidate_all();
        }
    }

    /// Entry count and weight, for the gauges.
    pub fn usage(&self) -> (u64, u64) {
        self.store.run_pending_tasks();
        (self.store.entry_count(), self.store.weighted_size())
    }
}

impl Stored {
    /// Whether this is a terminal answer (a 200 COMPLETE or CANCELED) still young enough to
    /// be a HIT: what replicas share through the second-level cache.
    pub fn is_fresh_terminal(&self) -> bool {
        self.terminal && self.stored_at.elapsed() < self.fresh_for
    }

    /// The HubSpot account whose token obtained it, when known.
    pub fn hub_id(&self) -> Option<u64> {
        self.hub_id
    }

    /// Whether this answer was kept (as a HIT later, or to stand in for a failure).
    pub fn is_stored(&self) -> bool {
        !self.kept_for().is_zero()
    }

    /// How long the cache keeps it: the longer of its two windows.
    fn kept_for(&self) -> Duration {
        self.fresh_for.max(self.stale_for)
    }

    /// The copy the cache keeps: its own bytes, and only the headers a HIT sends.
    ///
    /// hyper hands out body and header bytes as slices of the connection's read buffer, so
    /// an entry kept for hours would otherwise pin a buffer many times its size (measured:
    /// 4.5x the cache's weight in RSS), and `max_bytes` would not bound memory. Rate-limit
    /// headers describe the moment of the call and are only sent with fresh answers.
    fn for_keeping(&self) -> Stored {
        let kept = self
            .headers
            .iter()
            .filter(|(name, _)| !name.as_str().starts_with("x-hubspot-ratelimit-"));
        let mut headers = HeaderMap::with_capacity(2);
        for (name, value) in kept {
            let name = hyper::header::HeaderName::from_bytes(name.as_str().as_bytes());
            let copy = hyper::header::HeaderValue::from_bytes(value.as_bytes());
            if let (Ok(name), Ok(copy)) = (name, copy) {
                headers.append(name, copy);
            }
        }
        Stored {
            status: self.status,
            headers,
            body: Bytes::copy_from_slice(&self.body),
            stored_at: self.stored_at,
            fresh_for: self.fresh_for,
            stale_for: self.stale_for,
            hub_id: self.hub_id,
            terminal: self.terminal,
            origin: self.origin,
        }
    }
}

/// Whether HubSpot's answer is a failure the last answer seen may stand in for (a 5xx, or
/// its 429) rather than news about the task.
pub fn is_failure(status: StatusCode) -> bool {
    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
}

fn weight(key: &StatusRequest, value: &Arc<Stored>) -> u32 {
    let headers: usize = value
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 32)
        .sum();
    let total = value.body.len() + headers + key.task_id.as_str().len() + ENTRY_OVERHEAD as usize;
    u32::try_from(total).unwrap_or(u32::MAX)
}

/// The `status` field of a FileActionResponse, without building the whole document.
fn task_status(body: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        status: Option<&'a str>,
    }
    let probe: Probe = serde_json::from_slice(body).ok()?;
    match probe.status? {
        "COMPLETE" => Some("COMPLETE"),
        "CANCELED" => Some("CANCELED"),
        "PENDING" => Some("PENDING"),
        "PROCESSING" => Some("PROCESSING"),
        _ => Some("OTHER"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client a test's flights are charged to.
    fn who() -> Arc<str> {
        Arc::from("tests")
    }

    fn key(id: &str) -> StatusRequest {
        crate::route::match_route(
            &hyper::Method::GET,
            &format!("/files/v3/files/import-from-url/async/tasks/{id}/status"),
        )
        .expect("route")
    }

    /// A follower learns whose client the flight is charged to; a leader dropped without
    /// completing (its fetch panicked) ends the flight: followers see it closed at once, and
    /// the next caller leads a new one.
    #[tokio::test]
    async fn an_abandoned_flight_ends_for_its_followers() {
        let cache: AnswerCache<()> = AnswerCache::new(&CacheConfig::default());
        let Flight::Lead(leader) = cache.lookup(&key("a"), &who(), Instant::now()) else {
            panic!("the first caller leads");
        };
        let Flight::Follow(mut follower, charged) =
            cache.lookup(&key("a"), &Arc::from("other"), Instant::now())
        else {
            panic!("the second caller follows");
        };
        assert_eq!(
            &*charged, "tests",
            "the flight is charged to its leader's client"
        );
        let fetch = tokio::spawn(async move {
            let _leader = leader;
            panic!("the fetch fails");
        });
        assert!(fetch.await.is_err());
        assert!(follower.wait_for(Option::is_some).await.is_err());
        assert!(matches!(
            cache.lookup(&key("a"), &who(), Instant::now()),
            Flight::Lead(_)
        ));
    }

    /// A completed flight answers its followers and leaves the table; a stored answer is a
    /// hit afterwards.
    #[test]
    fn a_completed_flight_answers_and_leaves() {
        let cache: AnswerCache<()> = AnswerCache::new(&CacheConfig::default());
        let Flight::Lead(leader) = cache.lookup(&key("b"), &who(), Instant::now()) else {
            panic!("the first caller leads");
        };
        let Flight::Follow(follower, _) = cache.lookup(&key("b"), &who(), Instant::now()) else {
            panic!("the second caller follows");
        };
        let body = Bytes::from(r#"{"status":"COMPLETE"}"#);
        let entry = cache.entry(StatusCode::OK, HeaderMap::new(), body, None);
        cache.complete(leader, Ok(entry));
        assert!(matches!(&*follower.borrow(), Some(Ok(s)) if s.status == StatusCode::OK));
        assert!(matches!(
            cache.lookup(&key("b"), &who(), Instant::now()),
            Flight::Hit(_)
        ));
        assert!(cache.flights.lock().expect("lock").is_empty());
    }

    /// An answer another replica stored 5 s ago keeps its age here: a HIT whose `Age` counts
    /// from HubSpot's answer, and kept only for what is left of `terminal_ttl`; one older
    /// than `terminal_ttl` is no HIT at all.
    #[test]
    fn a_shared_answer_keeps_its_age() {
        let config = CacheConfig {
            terminal_ttl: Duration::from_secs(60),
            ..CacheConfig::default()
        };
        let cache: AnswerCache<()> = AnswerCache::new(&config);
        let shared = |origin, body: &'static str, age| {
            let body = Bytes::from(body);
            cache.shared_entry(origin, StatusCode::OK, HeaderMap::new(), body, 7, age)
        };
        let complete = r#"{"status":"COMPLETE"}"#;
        let aged = shared(Origin::SharedCache, complete, Duration::from_secs(5));
        assert!(aged.is_fresh_terminal());
        assert_eq!(aged.origin, Origin::SharedCache);
        assert_eq!(aged.hub_id(), Some(7));
        let Flight::Lead(leader) = cache.lookup(&key("s"), &who(), Instant::now()) else {
            panic!("nothing stored yet");
        };
        cache.complete(leader, Ok(aged));
        let Flight::Hit(hit) = cache.lookup(&key("s"), &who(), Instant::now()) else {
            panic!("the shared answer is kept");
        };
        assert!(hit.stored_at.elapsed() >= Duration::from_secs(5));
        assert!(hit.kept_for().saturating_sub(hit.stored_at.elapsed()) <= Duration::from_secs(55));
        let expired = shared(Origin::SharedCache, complete, Duration::from_secs(61));
        assert!(!expired.is_fresh_terminal());
        let pending = shared(Origin::Peer, r#"{"status":"PENDING"}"#, Duration::ZERO);
        assert!(
            !pending.is_fresh_terminal(),
            "only terminal answers are shared as HITs"
        );
    }

    /// With the default windows: terminal answers are HITs; PENDING/PROCESSING answers are
    /// not HITs but may stand in for a failure; HubSpot's 404 is a HIT for `missing_ttl` and
    /// never stands in; anything else is not kept.
    #[test]
    fn default_windows_by_kind_of_answer() {
        let config = CacheConfig::default();
        let cache: AnswerCache<()> = AnswerCache::new(&config);
        let e = |status: StatusCode, body: &'static str| {
            let s = cache.entry(status, HeaderMap::new(), Bytes::from(body), None);
            (s.is_stored(), s.fresh_for, s.stale_for)
        };
        let zero = Duration::ZERO;
        let terminal = (true, config.terminal_ttl, zero);
        assert_eq!(
            e(StatusCode::OK, r#"{"status":"COMPLETE","taskId":"a"}"#),
            terminal
        );
        assert_eq!(
            e(StatusCode::OK, r#"{"taskId":"a","status":"CANCELED"}"#),
            terminal
        );
        let pending = (true, zero, config.stale_if_error);
        assert_eq!(e(StatusCode::OK, r#"{"status":"PENDING"}"#), pending);
        assert_eq!(e(StatusCode::OK, r#"{"status":"PROCESSING"}"#), pending);
        let missing = (true, config.missing_ttl, zero);
        assert_eq!(e(StatusCode::NOT_FOUND, r#"{"status":"error"}"#), missing);
        let nothing = (false, zero, zero);
        assert_eq!(e(StatusCode::OK, r#"{"status":"SOMETHING_NEW"}"#), nothing);
        assert_eq!(e(StatusCode::OK, "not json"), nothing);
        assert_eq!(
            e(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"PENDING"}"#),
            nothing
        );
        assert_eq!(
            e(StatusCode::FORBIDDEN, r#"{"status":"COMPLETE"}"#),
            nothing
        );
    }

    /// A PENDING answer past `pending_ttl` is no longer a HIT but still stands in within
    /// `stale_if_error`; a later answer that is news (a 403) replaces it, so the old one never
    /// stands in for a failure after it, while a HubSpot 5xx leaves it in place.
    #[test]
    fn a_pending_answer_stands_in_until_news_arrives() {
        let config = CacheConfig {
            pending_ttl: Duration::from_millis(1),
            ..CacheConfig::default()
        };
        let cache: AnswerCache<()> = AnswerCache::new(&config);
        let complete_with = |status: StatusCode, body: &'static str| {
            let Flight::Lead(leader) = cache.lookup(&key("p"), &who(), Instant::now()) else {
                panic!("no fresh answer, so the caller leads");
            };
            let entry = cache.entry(status, HeaderMap::new(), Bytes::from(body), None);
            cache.complete(leader, Ok(entry));
        };
        complete_with(StatusCode::OK, r#"{"status":"PENDING"}"#);
        std::thread::sleep(Duration::from_millis(5));
        assert!(cache.stale(&key("p")).is_some());
        complete_with(StatusCode::SERVICE_UNAVAILABLE, "{}");
        assert!(cache.stale(&key("p")).is_some(), "a failure is not news");
        complete_with(StatusCode::FORBIDDEN, "{}");
        assert!(
            cache.stale(&key("p")).is_none(),
            "a newer answer replaced it"
        );
    }
}

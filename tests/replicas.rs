//! Cluster mode end to end: three real gateway processes sharing one real `redis-server`
//! in front of one simulated HubSpot behave like one gateway (one call per task, one cache,
//! one budget, one hold), and keep answering when Redis stops or freezes.

mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hubspot_sim::SimConfig;
use hyper::StatusCode;
use serde_json::json;
use support::cluster::{
    Arrival, RedisServer, Replica, arrivals, busiest_window, cluster_toml, replicas,
};
use support::{Reply, client, faults, get, get_all, get_all_with, simulator, status_requests};

/// The tests count HubSpot calls within time windows and each runs three gateway
/// processes: one at a time, so that one test's load never becomes another's failure.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `[cluster]` lines for functional tests: a Redis call bound generous enough that a loaded
/// machine does not push a replica into local mode by accident, and the account shared by
/// three replicas when Redis is gone.
const CLUSTER: &str = "timeout = \"500ms\"\nreplicas_hint = 3";

/// One Redis, one simulator and three replicas in front of it.
struct Cluster {
    redis: RedisServer,
    sim: hubspot_sim::RunningSimulator,
    replicas: Vec<Replica>,
}

/// Starts Redis, a simulator with `sim` settings and three ready replicas whose account
/// budget is `requests` per `per`, with `cluster` as their `[cluster]` lines.
async fn cluster(name: &str, sim: SimConfig, requests: u32, per: &str, cluster: &str) -> Cluster {
    let redis = RedisServer::start();
    let sim = simulator(sim).await;
    let toml = cluster_toml(&sim.base_url(), requests, per, &redis.url(), cluster);
    let replicas = replicas(name, 3, &toml).await;
    Cluster {
        redis,
        sim,
        replicas,
    }
}

/// The simulator's settings for these tests: `latency` on every status answer, no rate limit.
fn sim_with(latency: Duration) -> SimConfig {
    SimConfig {
        latency,
        rate_limit: None,
        ..SimConfig::default()
    }
}

/// Statuses seen, with how many of each, for assertion messages.
fn tally(replies: &[Reply]) -> BTreeMap<u16, usize> {
    let mut seen = BTreeMap::new();
    for reply in replies {
        *seen.entry(reply.status.as_u16()).or_insert(0) += 1;
    }
    seen
}

/// The gateway's own 429: `Retry-After` a whole number of seconds ≥ 1, HubSpot's body
/// shape with category `RATE_LIMITS`.
fn assert_gateway_429(reply: &Reply) {
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = reply
        .header("retry-after")
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After not whole seconds: {:?}", reply.headers));
    assert!(retry >= 1, "Retry-After {retry}");
    let body = reply.json();
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(body["category"], "RATE_LIMITS", "{body}");
}

/// 300 callers on each of three replicas ask for one new PENDING task while HubSpot takes
/// its time: HubSpot is asked once, and all 900 callers get its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_polled_on_every_replica_is_one_hubspot_call() {
    let _serial = SERIAL.lock().await;
    // Long enough that 900 requests from one test process reach three replicas on a loaded
    // two-core machine while the first HubSpot call is still out.
    let c = cluster(
        "flight",
        sim_with(Duration::from_millis(1500)),
        1000,
        "10s",
        CLUSTER,
    )
    .await;
    let http = Arc::new(client());
    // Open the 900 connections first (an invalid taskId never reaches HubSpot), so the
    // burst below is requests only.
    let warm: Vec<String> = (0..900).map(|i| c.replicas[i % 3].url("bad!id")).collect();
    let warmed = get_all_with(http.clone(), warm).await;
    assert_eq!(tally(&warmed), BTreeMap::from([(400, 900)]));
    assert_eq!(status_requests(&c.sim).await, 0);

    let urls: Vec<String> = (0..900)
        .map(|i| c.replicas[i % 3].url("pending-replicas-flight"))
        .collect();
    let replies = get_all_with(http, urls).await;
    assert_eq!(tally(&replies), BTreeMap::from([(200, 900)]));
    assert_eq!(status_requests(&c.sim).await, 1, "HubSpot calls");
    let first = &replies[0].body;
    assert!(
        replies.iter().all(|r| r.body == *first),
        "every caller gets HubSpot's one answer"
    );
    assert_eq!(replies[0].json()["status"], "PENDING");
}

/// A COMPLETE task fetched through one replica is a HIT on the other two without asking
/// HubSpot, and its `Age` counts from when HubSpot answered, not from the other replica's
/// first sight of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_task_is_a_hit_on_every_replica() {
    let _serial = SERIAL.lock().await;
    let c = cluster("hit", sim_with(Duration::ZERO), 1000, "10s", CLUSTER).await;
    let task = "complete-replicas-hit";
    let fetched = get(&c.replicas[0].url(task)).await;
    assert_eq!(fetched.status, StatusCode::OK);
    assert_eq!(fetched.header("x-cache"), "MISS");
    let slept = Duration::from_millis(2500);
    tokio::time::sleep(slept).await;

    for replica in &c.replicas[1..] {
        let hit = get(&replica.url(task)).await;
        assert_eq!(hit.status, StatusCode::OK);
        assert_eq!(hit.header("x-cache"), "HIT", "{:?}", hit.headers);
        assert_eq!(hit.body, fetched.body, "HubSpot's bytes");
        let age: u64 = hit.header("age").parse().expect("Age in seconds");
        // Whole seconds, truncated: 2.5 s slept is at least 2; the upper bound only
        // rules out an age from another clock or origin.
        assert!(
            (2..=30).contains(&age),
            "Age {age} after {slept:?} since HubSpot answered"
        );
    }
    assert_eq!(status_requests(&c.sim).await, 1, "HubSpot calls");
}

/// Three replicas polling distinct tasks for 13 s against an account limit of 30 per 10 s
/// (HubSpot's and the gateway's alike): HubSpot never answers 429, no rolling 10 s window at
/// HubSpot holds more than 30 calls, the budget is used (not refused wholesale), and the
/// callers past it get the gateway's 429 with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_keep_one_account_budget() {
    let _serial = SERIAL.lock().await;
    let sim = SimConfig {
        rate_limit: Some((30, Duration::from_secs(10))),
        ..SimConfig::default()
    };
    let c = cluster("budget", sim, 30, "10s", CLUSTER).await;
    let started = Instant::now();
    let mut replies = Vec::new();
    let mut wave = 0;
    while started.elapsed() < Duration::from_secs(13) {
        let urls = (0..3)
            .map(|r| c.replicas[r].url(&format!("pending-budget-{wave}-{r}")))
            .collect();
        replies.extend(get_all(urls).await);
        wave += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }

    let stats = support::stats(&c.sim).await;
    assert_eq!(stats["rate_limited"], 0, "HubSpot answered 429: {stats}");
    let seen = arrivals(&c.sim).await;
    let (most, at) = busiest_window(&seen, Duration::from_secs(10));
    assert!(
        most <= 30,
        "{most} calls reached HubSpot in the 10 s from {at:.0} ms"
    );
    let counts = tally(&replies);
    let ok = counts.get(&200).copied().unwrap_or(0);
    assert!(
        ok >= 30,
        "13 s of a 30-per-10 s budget let only {ok} through: {counts:?}"
    );
    assert_eq!(ok, seen.len(), "one HubSpot call per answered caller");
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(!refused.is_empty(), "nobody was refused: {counts:?}");
    assert_eq!(ok + refused.len(), replies.len(), "{counts:?}");
    for reply in refused {
        assert_gateway_429(reply);
    }
}

/// A HubSpot 429 with `Retry-After: 3` seen by one replica holds all three: HubSpot gets no
/// call from any replica until 3 s after that 429, callers meanwhile get the gateway's 429,
/// and calls go through again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hubspot_429_on_one_replica_holds_all() {
    let _serial = SERIAL.lock().await;
    let c = cluster("hold", sim_with(Duration::ZERO), 1000, "10s", CLUSTER).await;
    faults(
        &c.sim,
        json!({ "status_override": { "status": 429, "count": 1, "retry_after": 3 } }),
    )
    .await;
    let throttled = get(&c.replicas[0].url("pending-hold-first")).await;
    assert_gateway_429(&throttled);

    let mut held = Vec::new();
    let mut i = 0;
    let mut answered = None;
    let deadline = Instant::now() + Duration::from_secs(15);
    while answered.is_none() {
        assert!(
            Instant::now() < deadline,
            "no call went through 15 s after the hold"
        );
        let reply = get(&c.replicas[i % 3].url(&format!("pending-hold-{i}"))).await;
        match reply.status {
            StatusCode::OK => answered = Some(i),
            _ => held.push(reply),
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for reply in &held {
        assert_gateway_429(reply);
    }
    // Each replica was asked (and refused) during the hold.
    assert!(
        held.len() >= 6,
        "only {} callers during the hold",
        held.len()
    );

    let seen = arrivals(&c.sim).await;
    let (first, rest) = seen.split_first().expect("the 429'd call arrived");
    assert_eq!(first.task_id, "pending-hold-first");
    let early: Vec<&Arrival> = rest
        .iter()
        .filter(|a| a.at_ms < first.at_ms + 3000.0)
        .collect();
    assert!(
        early.is_empty(),
        "HubSpot called during the hold (429 at {:.0} ms): {early:?}",
        first.at_ms
    );
}

/// Redis killed while callers keep coming, then started again: no caller gets a 5xx; every
/// replica notices (`cluster_backend_up` 0) and keeps at most its share of the account
/// (limit / replicas_hint) while still answering; after the restart every replica is up
/// again, the calls each made alone still count (a replica that spent its share gets no new
/// call until they left the window, though the new Redis is empty), and then a finished task
/// fetched on one is a HIT on the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_mid_run() {
    let _serial = SERIAL.lock().await;
    let mut c = cluster("restart", sim_with(Duration::ZERO), 60, "10s", CLUSTER).await;
    let share = 60 / 3;
    assert_eq!(
        get(&c.replicas[0].url("complete-restart-warm"))
            .await
            .status,
        StatusCode::OK
    );

    // Callers all along: a finished task and an in-flight one, round the replicas, each
    // answer's status and time kept.
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicUsize::new(0));
    let urls: Vec<(String, String)> = c
        .replicas
        .iter()
        .map(|r| (r.url("complete-restart-warm"), r.url("pending-restart-bg")))
        .collect();
    let background = tokio::spawn({
        let (stop, calls) = (stop.clone(), calls.clone());
        async move {
            let mut seen = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                let (done, pending) = &urls[i % 3];
                let url = if i % 4 == 3 { pending } else { done };
                let started = Instant::now();
                let status = get(url).await.status;
                seen.push((status, started.elapsed(), url.clone()));
                calls.fetch_add(1, Ordering::AcqRel);
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        }
    });
    // Twice round the replicas while Redis is away and again once it is back.
    let background_calls = |n: usize| {
        let calls = calls.clone();
        async move {
            let target = calls.load(Ordering::Acquire) + n;
            support::wait_for(
                || {
                    let done = calls.load(Ordering::Acquire) >= target;
                    async move { done }
                },
                "background callers answered",
            )
            .await;
        }
    };

    c.redis.kill();
    let mut during = Vec::new();
    for (r, replica) in c.replicas.iter().enumerate() {
        // A new task makes the replica ask Redis and find it gone.
        during.push(get(&replica.url(&format!("complete-restart-down-{r}"))).await);
    }
    for replica in &c.replicas {
        replica.wait_backend_up(0.0, Duration::from_secs(10)).await;
    }
    // Each replica on its own share: 30 distinct tasks each, at once.
    for (r, replica) in c.replicas.iter().enumerate() {
        let urls = (0..30)
            .map(|i| replica.url(&format!("pending-restart-share-{r}-{i}")))
            .collect();
        let replies = get_all(urls).await;
        let counts = tally(&replies);
        let ok = counts.get(&200).copied().unwrap_or(0);
        assert!(
            (1..=share).contains(&ok),
            "replica {r} answered {ok} of 30 new tasks with Redis down (share {share}): {counts:?}"
        );
        for reply in replies.iter().filter(|r| r.status != StatusCode::OK) {
            assert_gateway_429(reply);
        }
        during.extend(replies);
    }
    let spent_at = Instant::now();
    let stats = support::stats(&c.sim).await;
    assert_eq!(stats["rate_limited"], 0, "{stats}");
    background_calls(6).await;

    c.redis.run();
    for replica in &c.replicas {
        replica.wait_backend_up(1.0, Duration::from_secs(15)).await;
    }
    background_calls(6).await;
    // The new Redis knows nothing of the shares spent alone, but the replica does: no call
    // for a new task until they left the window (10 s). Asked only while well inside it.
    let inside = get(&c.replicas[1].url("pending-restart-inside")).await;
    if spent_at.elapsed() < Duration::from_secs(8) {
        assert_gateway_429(&inside);
        assert_eq!(inside.header("ratelimit-limit"), share.to_string());
    }
    tokio::time::sleep(
        (spent_at + Duration::from_millis(10_500)).saturating_duration_since(Instant::now()),
    )
    .await;
    stop.store(true, Ordering::Release);
    let background = background.await.expect("background callers");
    let failed: Vec<StatusCode> = background
        .iter()
        .map(|(status, _, _)| *status)
        .chain(during.iter().map(|r| r.status))
        .filter(StatusCode::is_server_error)
        .collect();
    assert!(failed.is_empty(), "callers got 5xx: {failed:?}");
    // Answered within the Redis timeout plus the usual path, never held while Redis is away.
    let slow: Vec<_> = background
        .iter()
        .filter(|(_, took, _)| *took >= Duration::from_secs(2))
        .collect();
    assert!(slow.is_empty(), "callers waited on Redis: {slow:?}");

    // Shared again: one HubSpot call for a finished task, HITs on the other replicas.
    let before = status_requests(&c.sim).await;
    let task = "complete-restart-after";
    assert_eq!(
        get(&c.replicas[1].url(task)).await.header("x-cache"),
        "MISS"
    );
    // The replica writes the shared cache just after answering: until that lands, another
    // replica finds the flight's answer instead (COALESCED), so wait for the key first.
    let redis = c.redis.inspect().await;
    support::wait_for(
        || {
            let mut keys = redis::cmd("KEYS");
            keys.arg(format!("*:c:*:{task}"));
            let mut redis = redis.clone();
            async move {
                let found: Vec<String> = keys.query_async(&mut redis).await.expect("KEYS");
                !found.is_empty()
            }
        },
        "the answer in the shared cache",
    )
    .await;
    for r in [0, 2] {
        let hit = get(&c.replicas[r].url(task)).await;
        assert_eq!(
            hit.header("x-cache"),
            "HIT",
            "replica {r}: {:?}",
            hit.headers
        );
    }
    assert_eq!(status_requests(&c.sim).await, before + 1, "HubSpot calls");
}

/// Redis frozen (SIGSTOP, as a hung server or a partition looks): callers on every replica
/// keep getting HubSpot's answers, each within the Redis timeout plus the usual path (2 s
/// allowed), and the replicas use Redis again once it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_never_holds_a_caller() {
    let _serial = SERIAL.lock().await;
    let lines = "timeout = \"250ms\"\nreplicas_hint = 3";
    let c = cluster("frozen", sim_with(Duration::ZERO), 1000, "10s", lines).await;
    assert_eq!(
        get(&c.replicas[0].url("complete-frozen-warm")).await.status,
        StatusCode::OK
    );

    c.redis.signal("-STOP");
    for round in 0..4 {
        for (r, replica) in c.replicas.iter().enumerate() {
            for task in [
                format!("complete-frozen-{round}-{r}"),
                format!("pending-frozen-{round}"),
                "complete-frozen-warm".to_owned(),
            ] {
                let started = Instant::now();
                let reply = get(&replica.url(&task)).await;
                let took = started.elapsed();
                assert_eq!(reply.status, StatusCode::OK, "{task} on replica {r}");
                assert!(
                    took < Duration::from_secs(2),
                    "{task} on replica {r} took {took:?} with Redis frozen"
                );
            }
        }
    }
    c.redis.signal("-CONT");
    for replica in &c.replicas {
        replica.wait_backend_up(1.0, Duration::from_secs(15)).await;
    }
}

/// Two HubSpot accounts (two simulators with different hub ids) behind gateways sharing one
/// Redis and key prefix: the same task id asked at once on both, then again, always gets
/// each account its own answer from its own HubSpot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_accounts_never_see_each_others_answers() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut sims = Vec::new();
    let mut gateways = Vec::new();
    for hub_id in [1_001_001_u64, 2_002_002] {
        let sim = simulator(SimConfig {
            hub_id,
            ..sim_with(Duration::from_millis(500))
        })
        .await;
        let toml = cluster_toml(&sim.base_url(), 1000, "10s", &redis.url(), CLUSTER);
        gateways.push(replicas(&format!("hub-{hub_id}"), 1, &toml).await);
        sims.push((hub_id, sim));
    }
    let task = "complete-replicas-two-accounts";
    for round in 0..2 {
        let urls = gateways.iter().map(|g| g[0].url(task)).collect();
        let replies = get_all(urls).await;
        for ((hub_id, _), reply) in sims.iter().zip(&replies) {
            assert_eq!(reply.status, StatusCode::OK);
            let body = String::from_utf8_lossy(&reply.body);
            let other = sims
                .iter()
                .map(|(h, _)| *h)
                .find(|h| h != hub_id)
                .expect("two accounts");
            assert!(
                body.contains(&format!("sim-{hub_id}.")) && !body.contains(&other.to_string()),
                "round {round}: account {hub_id} got {body}"
            );
        }
    }
    for (hub_id, sim) in &sims {
        assert_eq!(
            status_requests(sim).await,
            1,
            "HubSpot calls of account {hub_id}"
        );
    }
}

/// Redis restarted empty (killed and started again on its port, no persistence) just after
/// three replicas spent the account's budget between them: HubSpot never sees more than
/// the limit in any rolling window across the restart (the replicas put their calls back
/// into the new Redis before calling again), and calls go on once the old ones left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_never_lets_twice_the_limit_through() {
    let _serial = SERIAL.lock().await;
    let sim = SimConfig {
        rate_limit: Some((12, Duration::from_secs(4))),
        ..sim_with(Duration::ZERO)
    };
    let mut c = cluster("emptied", sim, 12, "4s", CLUSTER).await;
    // The account's 12, 4 on each replica (its local share too).
    for wave in 0..4 {
        let urls = (0..3)
            .map(|r| c.replicas[r].url(&format!("pending-emptied-{wave}-{r}")))
            .collect();
        let replies = get_all(urls).await;
        assert!(
            replies.iter().all(|r| r.status == StatusCode::OK),
            "before the restart: {:?}",
            tally(&replies)
        );
    }
    c.redis.kill();
    c.redis.run();
    let started = Instant::now();
    let mut wave = 0;
    while started.elapsed() < Duration::from_secs(7) {
        let urls = (0..3)
            .map(|r| c.replicas[r].url(&format!("pending-emptied-after-{wave}-{r}")))
            .collect();
        for reply in get_all(urls).await {
            assert!(
                reply.status == StatusCode::OK || reply.status == StatusCode::TOO_MANY_REQUESTS,
                "{:?}",
                reply.status
            );
            if reply.status == StatusCode::TOO_MANY_REQUESTS {
                assert_gateway_429(&reply);
            }
        }
        wave += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stats = support::stats(&c.sim).await;
    assert_eq!(stats["rate_limited"], 0, "HubSpot answered 429: {stats}");
    let seen = arrivals(&c.sim).await;
    let (most, at) = busiest_window(&seen, Duration::from_secs(4));
    assert!(
        most <= 12,
        "{most} calls reached HubSpot in the 4 s from {at:.0} ms (limit 12)"
    );
    assert!(
        seen.len() > 12,
        "no call after the restart in 7 s: {} in all",
        seen.len()
    );
}

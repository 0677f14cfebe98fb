//! The cluster backend against a real `redis-server` on loopback, with several backends
//! standing in for replicas: the shared rolling window and client shares (alone and through
//! the gateway's budget), holds, the second-level cache, flights across replicas, and Redis
//! killed, restarted and frozen. Then the request path in cluster mode: gateways in this
//! process sharing one Redis and one simulator.

mod support;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use hubspot_files_gateway::budget::{Budget, Charge, ThrottleSource};
use hubspot_files_gateway::cluster::budget::ClientWindow;
use hubspot_files_gateway::cluster::{
    Admission, Answer, BudgetAsk, BudgetPolicy, ClusterBackend, ClusterConfig, ClusterError,
    ClusterMetrics, ClusterOptions, Flight, Lookup, Refusal, TaskKey,
};
use hubspot_files_gateway::config::{RateLimit, UpstreamConfig};
use hubspot_files_gateway::metrics::Metrics;
use hubspot_files_gateway::route::match_route;
use hubspot_files_gateway::secret::Secret;
use hubspot_files_gateway::upstream::{HubSpot, Policy, UpstreamError};
use hyper::Method;
use hyper::header::HeaderValue;
use support::cluster::RedisServer;
use tokio::time::Instant;

/// One replica: a backend with its own metrics registry.
async fn replica_with(
    server: &RedisServer,
    tweak: impl FnOnce(&mut ClusterConfig),
    options: ClusterOptions,
) -> (ClusterBackend, ClusterMetrics) {
    let mut config = ClusterConfig::new(server.url());
    // Functional tests must not fail because a loaded machine took 50 ms for one call; the
    // tests about slowness set the production default back.
    config.timeout = Duration::from_millis(500);
    config.key_prefix = "t:".into();
    tweak(&mut config);
    let metrics = ClusterMetrics::register(&prometheus::Registry::new()).expect("fresh registry");
    let backend = ClusterBackend::connect_with(config, None, metrics.clone(), options)
        .await
        .expect("backend set up");
    (backend, metrics)
}

async fn replica(server: &RedisServer) -> (ClusterBackend, ClusterMetrics) {
    replica_with(server, |_| {}, ClusterOptions::default()).await
}

fn policy(limit: u32, per: Duration) -> BudgetPolicy {
    BudgetPolicy {
        limit,
        per,
        daily_limit: None,
        daily_reset_offset: Duration::ZERO,
        in_flight: Duration::ZERO,
    }
}

fn answer(hub_id: u64, status: &str) -> Answer {
    Answer {
        hub_id,
        status: 200,
        headers: vec![
            (
                "content-type".into(),
                Bytes::from_static(b"application/json"),
            ),
            (
                "x-hubspot-correlation-id".into(),
                Bytes::from_static(b"corr-1"),
            ),
        ],
        body: Bytes::from(format!("{{\"id\":\"t-1\",\"status\":\"{status}\"}}")),
    }
}

/// Time until the next UTC midnight plus `offset`, by this machine's clock (Redis runs on
/// the same machine).
fn until_reset(offset: Duration) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64;
    let day = 86_400_000u64;
    let offset = offset.as_millis() as u64;
    Duration::from_millis(day - ((now + day - offset) % day))
}

fn assert_close(got: Duration, want: Duration, slack: Duration) {
    let diff = got.abs_diff(want);
    assert!(diff <= slack, "got {got:?}, want {want:?} ± {slack:?}");
}

/// Options of a replica that notices Redis is back within 100 ms.
fn fast_probe() -> ClusterOptions {
    ClusterOptions {
        probe_interval: Duration::from_millis(100),
        ..ClusterOptions::default()
    }
}

/// Waits (15 s at most) until the backend's probe finds Redis answering again.
async fn wait_up(backend: &ClusterBackend, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !backend.is_up() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `cmd` on `server` every 10 ms until `done` holds for its answer (10 s at most).
async fn poll_redis<T: redis::FromRedisValue>(
    server: &RedisServer,
    cmd: &redis::Cmd,
    what: &str,
    mut done: impl FnMut(T) -> bool,
) {
    let mut conn = server.inspect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done(cmd.query_async(&mut conn).await.expect("inspection query")) {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` connections subscribe to the flights channel, so a test that relies on
/// pub/sub does not race the subscriber's start.
async fn wait_subscribers(server: &RedisServer, n: i64) {
    let mut numsub = redis::cmd("PUBSUB");
    numsub.arg("NUMSUB").arg("t:flights:v1");
    poll_redis(
        server,
        &numsub,
        &format!("{n} subscribers"),
        |counts: Vec<(String, i64)>| counts.first().is_some_and(|(_, count)| *count >= n),
    )
    .await;
}

/// Four replicas hammering one hub with a 30/10 s budget: no 10 s span of the recorded call
/// times ever holds more than 30, refused calls get a positive wait, and the window fills
/// again once its oldest calls leave it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_window_holds_across_replicas() {
    let server = RedisServer::start();
    let per = Duration::from_secs(10);
    let run_for = Duration::from_secs(12);
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (backend, _) = replica(&server).await;
        tasks.push(tokio::spawn(async move {
            let (mut allowed, mut refused, mut errors) = (Vec::new(), 0u32, Vec::new());
            let end = Instant::now() + run_for;
            while Instant::now() < end {
                match backend.acquire(7, &policy(30, per)).await {
                    Ok(Admission::Allowed { at_ms, .. }) => allowed.push(at_ms),
                    Ok(Admission::Refused { wait, reason }) => {
                        assert_eq!(reason, Refusal::Window);
                        assert!(wait > Duration::ZERO && wait <= per, "wait {wait:?}");
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => errors.push(e.to_string()),
                }
            }
            (allowed, refused, errors)
        }));
    }
    let mut times = Vec::new();
    let mut refused = 0;
    for task in tasks {
        let (allowed, r, errors) = task.await.expect("replica task");
        assert!(errors.is_empty(), "Redis calls failed: {errors:?}");
        times.extend(allowed);
        refused += r;
    }
    times.sort_unstable();
    assert!(refused > 0, "the budget never refused");
    // 12 s covers the first window and the refill after it.
    assert!(
        times.len() >= 60,
        "only {} calls allowed in 12 s",
        times.len()
    );
    assert!(times.len() <= 90, "{} calls allowed in 12 s", times.len());
    for pair in times.windows(31) {
        assert!(
            pair[30] - pair[0] >= 10_000,
            "31 calls within {} ms: {:?}",
            pair[30] - pair[0],
            pair
        );
    }
    // The sorted set holds exactly the calls of the current window, at the times reported.
    let mut conn = server.inspect().await;
    let recorded: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg("t:rl:7")
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut conn)
        .await
        .expect("ZRANGE");
    assert!(!recorded.is_empty() && recorded.len() <= 30);
    for (_, score) in recorded {
        assert!(times.binary_search(&score).is_ok(), "unknown time {score}");
    }
}

/// A 429 hold set by one replica refuses every replica's calls for that hub until it ends,
/// a shorter hold never shortens it, and other hubs are not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_is_seen_by_every_replica() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, _) = replica(&server).await;
    let p = policy(100, Duration::from_secs(10));
    a.hold(1, Duration::from_millis(1500)).await.expect("hold");
    a.hold(1, Duration::from_millis(10))
        .await
        .expect("short hold");
    match b.acquire(1, &p).await.expect("acquire") {
        Admission::Refused { wait, reason } => {
            assert_eq!(reason, Refusal::Hold(Policy::TenSecondlyRolling));
            assert!(wait > Duration::from_millis(800) && wait <= Duration::from_millis(1500));
        }
        other => panic!("held hub allowed: {other:?}"),
    }
    assert!(matches!(
        b.acquire(2, &p).await.expect("acquire"),
        Admission::Allowed { .. }
    ));
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert!(matches!(
        a.acquire(1, &p).await.expect("acquire"),
        Admission::Allowed { .. }
    ));
}

/// A DAILY hold lasts until the configured reset (UTC midnight plus the offset) on every
/// replica, and a daily limit refuses once spent, with the wait until the reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_hold_and_daily_limit_last_until_the_reset() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, _) = replica(&server).await;
    let slack = Duration::from_secs(5);
    let p = policy(100, Duration::from_secs(10));
    let held = a.hold_daily(3, &p).await.expect("daily hold");
    assert_close(held, until_reset(Duration::ZERO), slack);
    match b.acquire(3, &p).await.expect("acquire") {
        Admission::Refused { wait, reason } => {
            assert_eq!(reason, Refusal::DailyHold);
            assert_close(wait, until_reset(Duration::ZERO), slack);
        }
        other => panic!("daily-held hub allowed: {other:?}"),
    }
    // A 429 hold never shortens the daily one.
    a.hold(3, Duration::from_secs(1)).await.expect("hold");
    assert!(matches!(
        b.acquire(3, &p).await.expect("acquire"),
        Admission::Refused {
            reason: Refusal::DailyHold,
            ..
        }
    ));

    let offset = Duration::from_secs(5 * 3600);
    let daily = BudgetPolicy {
        daily_limit: Some(3),
        daily_reset_offset: offset,
        ..p
    };
    for i in 0..3 {
        let r = [&a, &b][i % 2].acquire(4, &daily).await.expect("acquire");
        assert!(matches!(r, Admission::Allowed { .. }), "{r:?}");
    }
    match b.acquire(4, &daily).await.expect("acquire") {
        Admission::Refused { wait, reason } => {
            assert_eq!(reason, Refusal::DailyLimit);
            assert_close(wait, until_reset(offset), slack);
        }
        other => panic!("daily limit not enforced: {other:?}"),
    }
    let held = a.hold_daily(5, &daily).await.expect("daily hold");
    assert_close(held, until_reset(offset), slack);
}

/// A client's window inside the account's, shared by two replicas: the client gets its 3
/// calls across both, then `ClientShare` refusals that record nothing; other clients use
/// the rest of the account's 10; with the account full, a client under its own limit is
/// refused by the account's window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_windows_hold_across_replicas() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, _) = replica(&server).await;
    let per = Duration::from_secs(60);
    let p = policy(10, per);
    let greedy = Some(ClientWindow {
        client: "greedy",
        limit: 3,
    });
    let replicas = [&a, &b];
    for i in 0..3 {
        let r = replicas[i % 2]
            .acquire_for(9, &p, greedy)
            .await
            .expect("acquire");
        assert!(matches!(r, Admission::Allowed { .. }), "{r:?}");
    }
    let mut conn = server.inspect().await;
    for i in 0..5 {
        match replicas[i % 2]
            .acquire_for(9, &p, greedy)
            .await
            .expect("acquire")
        {
            Admission::Refused { wait, reason } => {
                assert_eq!(reason, Refusal::ClientShare);
                assert!(wait > Duration::ZERO && wait <= per, "wait {wait:?}");
            }
            other => panic!("share not enforced: {other:?}"),
        }
    }
    let recorded = |conn: &mut redis::aio::MultiplexedConnection, key: &'static str| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZCARD")
                .arg(key)
                .query_async::<u64>(&mut conn)
                .await
                .expect("ZCARD")
        }
    };
    assert_eq!(
        recorded(&mut conn, "t:rl:9").await,
        3,
        "refusals recorded nothing"
    );
    assert_eq!(recorded(&mut conn, "t:rlc:9:greedy").await, 3);
    for i in 0..7 {
        let r = replicas[i % 2].acquire(9, &p).await.expect("acquire");
        assert!(
            matches!(r, Admission::Allowed { .. }),
            "other call {i}: {r:?}"
        );
    }
    assert!(matches!(
        b.acquire(9, &p).await.expect("acquire"),
        Admission::Refused {
            reason: Refusal::Window,
            ..
        }
    ));
    let other = Some(ClientWindow {
        client: "other",
        limit: 3,
    });
    assert!(matches!(
        a.acquire_for(9, &p, other).await.expect("acquire"),
        Admission::Refused {
            reason: Refusal::Window,
            ..
        }
    ));
    assert!(matches!(
        a.acquire_for(9, &p, greedy).await.expect("acquire"),
        Admission::Refused {
            reason: Refusal::ClientShare,
            ..
        }
    ));
    assert_eq!(recorded(&mut conn, "t:rl:9").await, 10);
    assert_eq!(recorded(&mut conn, "t:rlc:9:other").await, 0);
}

/// The gateway's budget on one replica's backend: `requests` per minute, `daily` a day.
async fn shared_budget(
    server: &RedisServer,
    requests: u32,
    daily: Option<u64>,
    timeout: Duration,
) -> Budget {
    let config = UpstreamConfig {
        rate_limit: RateLimit {
            requests,
            per: Duration::from_secs(60),
        },
        daily_limit: daily,
        ..UpstreamConfig::default()
    };
    let (backend, _) = replica_with(server, |c| c.timeout = timeout, fast_probe()).await;
    Budget::new(&config, Some(Arc::new(backend)))
}

/// A call of `client` (with `share`) for hub `hub`.
fn charge(client: &str, share: Option<f64>, hub: u64) -> Charge<'_> {
    Charge {
        client,
        share,
        hub_id: Some(hub),
        first: None,
    }
}

/// The scores of the sorted set `key`, in order.
async fn scores(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> Vec<u64> {
    let members: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(key)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(conn)
        .await
        .expect("ZRANGE");
    members.into_iter().map(|(_, score)| score).collect()
}

/// Redis' clock in ms since the epoch: the one the shared window counts by.
async fn redis_now(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    secs * 1000 + micros / 1000
}

/// Polls until `n` of `key`'s entries stand at or before Redis' now (their calls' answers
/// are recorded; a call still out stands at admission + the request timeout); returns all
/// its scores and that now.
async fn answered(
    conn: &mut redis::aio::MultiplexedConnection,
    key: &str,
    n: usize,
) -> (Vec<u64>, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (got, now) = (scores(conn, key).await, redis_now(conn).await);
        if got.iter().filter(|s| **s <= now).count() == n {
            return (got, now);
        }
        assert!(
            Instant::now() < deadline,
            "the answers were not recorded in {key}: {got:?} at {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Across replicas a call counts in the account's window from when its answer came back
/// (Redis' clock), where HubSpot may have counted it, not from its admission: two calls
/// admitted at once on two replicas and answered 800 ms apart leave the shared window 800
/// ms apart, and a call still out stands at admission + the request timeout, so it cannot
/// leave the window before HubSpot has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_counts_in_the_shared_window_from_its_answer() {
    let server = RedisServer::start();
    let per = Duration::from_secs(2);
    let config = UpstreamConfig {
        rate_limit: RateLimit { requests: 2, per },
        ..UpstreamConfig::default()
    };
    let a = Budget::new(&config, Some(Arc::new(replica(&server).await.0)));
    let b = Budget::new(&config, Some(Arc::new(replica(&server).await.0)));
    let mut conn = server.inspect().await;
    let who = charge("quiet", None, 31);

    let first = a.acquire(&who).await.expect("room for the first");
    let second = b.acquire(&who).await.expect("room for the second");
    // Both are out: each stands a request timeout past its admission.
    let (out, now) = (
        scores(&mut conn, "t:rl:31").await,
        redis_now(&mut conn).await,
    );
    let timeout = config.request_timeout.as_millis() as u64;
    assert!(
        out.len() == 2 && out.iter().all(|s| *s > now + timeout / 2),
        "{out:?} at {now}"
    );
    second.answered();
    answered(&mut conn, "t:rl:31", 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    first.answered();
    let (at, now) = answered(&mut conn, "t:rl:31", 2).await;
    assert!(at[1] - at[0] >= 800, "answered 800 ms apart: {at:?}");

    // Once the second's answer is `per` old, its place is free and the first's is not,
    // although both were admitted more than `per` ago.
    let per_ms = per.as_millis() as u64;
    let second_leaves = (at[0] + per_ms + 50).saturating_sub(now);
    tokio::time::sleep(Duration::from_millis(second_leaves)).await;
    let third = a.acquire(&who).await.expect("the second left the window");
    third.answered();
    let asked = redis_now(&mut conn).await;
    let refused = b.acquire(&who).await.expect_err("the first is still in");
    assert_eq!(refused.by, ThrottleSource::LocalBudget);
    // The wait ends when the first's answer is `per` old.
    let first_leaves = Duration::from_millis((at[1] + per_ms).saturating_sub(asked));
    assert!(
        refused.wait > Duration::ZERO && refused.wait <= first_leaves,
        "{refused:?}, the first leaves in {first_leaves:?}"
    );
    tokio::time::sleep(first_leaves + Duration::from_millis(50)).await;
    b.acquire(&who).await.expect("the first left the window");
}

/// Two replicas' budgets over one Redis are one account's: a share of 0.5 of 6 gives its
/// client 3 calls across both, the account's 6 bound the sum, a 429 one replica saw holds
/// the other, and the daily limit counts both. Each refusal names its budget and quota.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_is_the_accounts_across_replicas() {
    let server = RedisServer::start();
    let slow_ok = Duration::from_millis(500);
    let a = shared_budget(&server, 6, None, slow_ok).await;
    let b = shared_budget(&server, 6, None, slow_ok).await;
    let replicas = [&a, &b];
    // The greedy client's 3, then the rest of the account's 6 for a client without a share;
    // each next call is refused by the budget it would pass, with that budget's quota.
    let rounds = [
        (
            charge("greedy", Some(0.5), 21),
            ThrottleSource::ClientShare,
            3,
        ),
        (charge("quiet", None, 21), ThrottleSource::LocalBudget, 6),
    ];
    let mut conn = server.inspect().await;
    for (round, (who, by, limit)) in rounds.into_iter().enumerate() {
        for i in 0..3 {
            let call = replicas[i % 2].acquire(&who).await.expect("within budget");
            call.answered();
        }
        // An answer reaches Redis in the background; until then its call stands at admission
        // plus the request timeout, and the wait below is past 60 s (seen on a loaded machine).
        answered(&mut conn, "t:rl:21", 3 * (round + 1)).await;
        let refused = b.acquire(&who).await.expect_err("spent");
        assert_eq!((refused.by, refused.limit), (by, limit));
        // Every call is restamped at its answer (awaited above): none waits past the window.
        assert!(
            refused.wait > Duration::ZERO && refused.wait <= Duration::from_secs(60),
            "{:?}",
            refused.wait
        );
    }

    // A 429 seen by one replica holds the other's calls for that hub, naming its policy
    // (the longest last: a replica's own hold covers every hub, and a longer one stays).
    let holds = [
        (Policy::TenSecondlyRolling, 22, Duration::from_secs(3)),
        (Policy::Secondly, 25, Duration::from_secs(3)),
        (Policy::Unknown, 26, Duration::from_secs(3)),
        (Policy::Daily, 23, Duration::from_secs(30)),
    ];
    for (policy, hub, asked) in holds {
        let cap = Duration::from_secs(86_400);
        a.hold(asked, cap, policy, 100, Some(hub)).await;
        let held = b
            .acquire(&charge("quiet", None, hub))
            .await
            .expect_err("held");
        assert_eq!((held.by, held.policy), (ThrottleSource::HubSpot429, policy));
        assert!(held.wait > asked / 3 && held.wait <= asked, "{held:?}");
    }

    let c = shared_budget(&server, 100, Some(2), slow_ok).await;
    let d = shared_budget(&server, 100, Some(2), slow_ok).await;
    c.acquire(&charge("quiet", None, 24)).await.expect("day 1");
    d.acquire(&charge("quiet", None, 24)).await.expect("day 2");
    let spent = c
        .acquire(&charge("quiet", None, 24))
        .await
        .expect_err("daily");
    assert_eq!(spent.by, ThrottleSource::DailyLimit);
    assert_eq!((spent.policy, spent.limit), (Policy::Daily, 2));
    assert_close(
        spent.wait,
        until_reset(Duration::ZERO),
        Duration::from_secs(5),
    );
}

/// A HubSpot 429 one replica's client receives holds every replica: the other's next call
/// for that account is refused by the hold, for the 429's `Retry-After`, without reaching
/// HubSpot (the simulator stands in for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hubspot_429_on_one_replica_holds_them_all() {
    let server = RedisServer::start();
    let sim = support::simulator(hubspot_sim::SimConfig::default()).await;
    let config = UpstreamConfig {
        base_url: sim.base_url().parse().expect("the simulator's URL"),
        ..UpstreamConfig::default()
    };
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let (backend, _) = replica(&server).await;
        let hubspot = HubSpot::new(&config, Metrics::new(), Some(Arc::new(backend)));
        replicas.push(hubspot.expect("client"));
    }
    let override_429 = serde_json::json!({ "status": 429, "count": 1, "retry_after": 5 });
    support::faults(&sim, serde_json::json!({ "status_override": override_429 })).await;
    let req = match_route(
        &Method::GET,
        "/files/v3/files/import-from-url/async/tasks/t-1/status",
    )
    .expect("the status route");
    let bearer = Secret::new("pat-na1-test");
    let id = HeaderValue::from_static("req-1");
    let charge = charge("tests", None, 77);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let first = replicas[0]
        .get_status(&req, &bearer, None, &id, deadline, &charge)
        .await
        .expect("HubSpot's answer");
    assert_eq!(first.status, 429);
    let second = replicas[1]
        .get_status(&req, &bearer, None, &id, deadline, &charge)
        .await;
    match second {
        Err(UpstreamError::Throttled(held)) => {
            assert_eq!(held.by, ThrottleSource::HubSpot429);
            assert!(held.wait > Duration::from_secs(3) && held.wait <= Duration::from_secs(5));
        }
        other => panic!("the other replica was not held: {other:?}"),
    }
    assert_eq!(support::status_requests(&sim).await, 1);
}

/// The budget gauges in cluster mode show the account's window, the same on every replica
/// (read from Redis every second), and this replica's part of it once Redis is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_show_the_accounts_window() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(200);
    let a = shared_budget(&server, 6, None, timeout).await;
    let b = shared_budget(&server, 6, None, timeout).await;
    for _ in 0..4 {
        a.acquire(&charge("quiet", None, 41)).await.expect("shared");
    }
    b.acquire(&charge("quiet", None, 41)).await.expect("shared");
    for budget in [&a, &b] {
        wait_gauges(budget, (6, 1)).await;
    }
    server.kill();
    // This replica's part (6 / 2), less the calls it made itself.
    wait_gauges(&a, (3, 0)).await;
    wait_gauges(&b, (3, 2)).await;
}

/// Waits (10 s at most) until `budget`'s gauges read `want` (limit, remaining).
async fn wait_gauges(budget: &Budget, want: (u32, u32)) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while budget.gauges() != want {
        assert!(
            Instant::now() < deadline,
            "gauges {:?}, want {want:?}",
            budget.gauges()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// With Redis gone, each replica keeps its part of the account's budget (`requests /
/// replicas_hint` = 3 of 6) and a share of that part, answering refusals rather than
/// errors; calls it made while Redis was up still count in its window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_keeps_its_part() {
    let mut server = RedisServer::start();
    let timeout = Duration::from_millis(100);
    let fresh = shared_budget(&server, 6, None, timeout).await;
    let busy = shared_budget(&server, 6, None, timeout).await;
    for _ in 0..3 {
        busy.acquire(&charge("quiet", None, 31))
            .await
            .expect("shared");
    }
    server.kill();
    for i in 0..3 {
        fresh
            .acquire(&charge("quiet", None, 31))
            .await
            .unwrap_or_else(|t| panic!("local call {i} refused: {t:?}"));
    }
    for budget in [&fresh, &busy] {
        let refused = budget
            .acquire(&charge("quiet", None, 31))
            .await
            .expect_err("the local part is spent");
        assert_eq!(refused.by, ThrottleSource::LocalBudget);
        assert_eq!(refused.limit, 3, "limit / replicas_hint");
    }
    let other = shared_budget(&server, 6, None, timeout).await;
    other
        .acquire(&charge("greedy", Some(0.5), 31))
        .await
        .expect("one call: floor(3 x 0.5)");
    let refused = other
        .acquire(&charge("greedy", Some(0.5), 31))
        .await
        .expect_err("share of the local part");
    assert_eq!(
        (refused.by, refused.limit),
        (ThrottleSource::ClientShare, 1)
    );
}

/// An answer stored by one replica is read by another with its true age; another hub, another
/// task or an expired entry gives nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_level_cache_is_shared_with_its_age() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, b_metrics) = replica(&server).await;
    let key = TaskKey::new(11, "complete-1");
    let stored = answer(11, "COMPLETE");
    a.cache_put(&key, &stored, Duration::from_secs(60))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hit = b.cache_get(&key).await.expect("get").expect("a hit");
    assert_eq!(hit.answer, stored);
    assert!(
        hit.age >= Duration::from_millis(1000) && hit.age < Duration::from_secs(10),
        "age {:?}",
        hit.age
    );
    assert_eq!(b_metrics.cache_hits_total.get(), 1);
    let other_hub = TaskKey::new(12, "complete-1");
    assert!(b.cache_get(&other_hub).await.expect("get").is_none());
    let other_task = TaskKey::new(11, "complete-10");
    assert!(b.cache_get(&other_task).await.expect("get").is_none());
    assert!(matches!(
        a.cache_put(&other_hub, &stored, Duration::from_secs(60))
            .await,
        Err(ClusterError::WrongHub)
    ));

    let short = TaskKey::new(11, "complete-2");
    a.cache_put(&short, &stored, Duration::from_millis(200))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(b.cache_get(&short).await.expect("get").is_none());
}

/// Runs `k` replicas into one flight at once; the leader answers after `work`, which must
/// outlast every replica's join on a loaded machine (a replica joining after the answer
/// leads a flight of its own). Returns how many led and every answer the others got.
async fn race_flight(replicas: Vec<ClusterBackend>, work: Duration) -> (usize, Vec<Answer>) {
    let key = TaskKey::new(21, "pending-1");
    let barrier = Arc::new(tokio::sync::Barrier::new(replicas.len()));
    let mut tasks = Vec::new();
    for backend in replicas {
        let (key, barrier) = (key.clone(), barrier.clone());
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let deadline = Instant::now() + Duration::from_secs(8);
            match backend.join_flight(&key, deadline).await.expect("join") {
                Flight::Leader(lease) => {
                    tokio::time::sleep(work).await;
                    lease
                        .publish(&answer(21, "PENDING"))
                        .await
                        .expect("publish");
                    None
                }
                Flight::Answer(a) => Some(a),
                Flight::DeadlineReached => panic!("waiter reached its deadline"),
            }
        }));
    }
    let (mut leaders, mut answers) = (0, Vec::new());
    for task in tasks {
        match task.await.expect("replica task") {
            None => leaders += 1,
            Some(a) => answers.push(a),
        }
    }
    (leaders, answers)
}

/// Of five replicas joining one flight at once, exactly one leads and the four others get
/// its PENDING answer through the pub/sub wake-up, well before their next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_pubsub_wakes_the_waiters() {
    let server = RedisServer::start();
    let mut replicas = Vec::new();
    for _ in 0..5 {
        let slow_poll = |c: &mut ClusterConfig| c.poll_interval = Duration::from_secs(5);
        replicas.push(
            replica_with(&server, slow_poll, ClusterOptions::default())
                .await
                .0,
        );
    }
    wait_subscribers(&server, 5).await;
    let started = Instant::now();
    let (leaders, answers) = race_flight(replicas, Duration::from_secs(1)).await;
    assert_eq!(leaders, 1);
    assert_eq!(answers.len(), 4);
    assert!(answers.iter().all(|a| *a == answer(21, "PENDING")));
    // Polling alone would take 5 s: the wake-up came by pub/sub.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

/// A flight's answer goes out on the channel only when a replica waits for it: a leader
/// nobody waited for publishes no message (every replica's subscriber would receive and
/// decode it for nothing), one with a waiter does, and the waiter gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_is_broadcast_only_to_a_waiter() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, _) = replica(&server).await;
    let client = redis::Client::open(server.url()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub.subscribe("t:flights:v1").await.expect("subscribe");
    let mut messages = pubsub.into_on_message();
    let far = || Instant::now() + Duration::from_secs(5);
    let alone = TaskKey::new(91, "pending-alone");
    let Flight::Leader(lease) = a.join_flight(&alone, far()).await.expect("join") else {
        panic!("a fresh task has no flight");
    };
    lease
        .publish(&answer(91, "PENDING"))
        .await
        .expect("publish");
    let quiet = tokio::time::timeout(Duration::from_millis(500), messages.next()).await;
    assert!(quiet.is_err(), "a message nobody waited for was published");
    let awaited = TaskKey::new(91, "pending-awaited");
    let Flight::Leader(lease) = a.join_flight(&awaited, far()).await.expect("join") else {
        panic!("a fresh task has no flight");
    };
    let waiter = tokio::spawn({
        let (b, key) = (b.clone(), awaited.clone());
        async move {
            b.join_flight(&key, Instant::now() + Duration::from_secs(5))
                .await
        }
    });
    // The waiter has looked (and raised its flag) once the leader's lease is seen taken.
    wait_key(&server, "wait", 91, "pending-awaited").await;
    lease
        .publish(&answer(91, "PENDING"))
        .await
        .expect("publish");
    tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .expect("a message for the waiter")
        .expect("the subscription is open");
    match waiter.await.expect("waiter").expect("join") {
        Flight::Answer(got) => assert_eq!(got, answer(91, "PENDING")),
        other => panic!("want the leader's answer, got {other:?}"),
    }
}

/// Without pub/sub (every message lost), waiters still get the leader's answer by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_poll_when_pubsub_messages_are_lost() {
    let server = RedisServer::start();
    let no_pubsub = ClusterOptions {
        subscribe: false,
        ..ClusterOptions::default()
    };
    let mut replicas = Vec::new();
    let mut metrics = Vec::new();
    for _ in 0..4 {
        let (b, m) = replica_with(&server, |_| {}, no_pubsub.clone()).await;
        replicas.push(b);
        metrics.push(m);
    }
    let (leaders, answers) = race_flight(replicas, Duration::from_secs(1)).await;
    assert_eq!(leaders, 1);
    assert_eq!(answers.len(), 3);
    assert!(answers.iter().all(|a| *a == answer(21, "PENDING")));
    let answered: u64 = metrics
        .iter()
        .map(|m| m.flight_waits_total.with_label_values(&["answer"]).get())
        .sum();
    assert_eq!(answered, 3);
}

/// A leader that stops renewing loses its lease when it expires and a waiter takes it over;
/// a leader that keeps renewing keeps it past `lease_ttl`; a leader dropped without an
/// answer releases it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_leader_is_taken_over() {
    let server = RedisServer::start();
    let short_lease = |c: &mut ClusterConfig| c.lease_ttl = Duration::from_secs(1);
    let (a, _) = replica_with(&server, short_lease, ClusterOptions::default()).await;
    let (b, b_metrics) = replica_with(&server, short_lease, ClusterOptions::default()).await;
    let key = TaskKey::new(31, "processing-1");
    let far = || Instant::now() + Duration::from_secs(8);

    // Alive: renewed past three lease lives, so the waiter reaches its own deadline.
    let Flight::Leader(lease) = a.join_flight(&key, far()).await.expect("join") else {
        panic!("first replica must lead");
    };
    let waited = b
        .join_flight(&key, Instant::now() + Duration::from_millis(3000))
        .await
        .expect("join");
    assert!(matches!(waited, Flight::DeadlineReached), "{waited:?}");
    assert!(lease.is_held());

    // Dead: no renewal, so the lease expires and the waiter leads.
    lease.abandon();
    let started = Instant::now();
    let Flight::Leader(taken) = b.join_flight(&key, far()).await.expect("join") else {
        panic!("the waiter must take over");
    };
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(b_metrics.lease_takeovers_total.get(), 1);

    // Dropped without an answer: released, so the next waiter leads before the lease ends.
    let waiter = tokio::spawn({
        let (a, key) = (a.clone(), key.clone());
        async move { a.join_flight(&key, far()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(taken);
    let led = waiter.await.expect("task").expect("join");
    assert!(matches!(led, Flight::Leader(_)), "{led:?}");
}

/// Redis killed: the next call fails within the timeout, the backend goes down, further calls
/// fail at once without the network, and all come back once Redis is started again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut server = RedisServer::start();
    let fast = fast_probe();
    let timeout = Duration::from_millis(50);
    let (backend, metrics) = replica_with(&server, |c| c.timeout = timeout, fast).await;
    assert!(backend.is_up());
    assert_eq!(metrics.backend_up.get(), 1);
    let p = policy(10, Duration::from_secs(10));
    backend.acquire(41, &p).await.expect("shared budget");

    server.kill();
    let key = TaskKey::new(41, "t");
    for _ in 0..5 {
        let started = Instant::now();
        assert!(backend.acquire(41, &p).await.is_err());
        assert!(backend.cache_get(&key).await.is_err());
        // One call's timeout plus scheduling on a loaded machine.
        assert!(started.elapsed() < timeout * 2 + Duration::from_millis(400));
    }
    assert!(!backend.is_up());
    assert_eq!(metrics.backend_up.get(), 0);
    assert!(
        metrics
            .local_fallbacks_total
            .with_label_values(&["budget_acquire"])
            .get()
            >= 5
    );
    assert_eq!(backend.local_share(90), 45);

    server.run();
    wait_up(&backend, "backend not up 15 s after restart").await;
    assert_eq!(metrics.backend_up.get(), 1);
    assert!(matches!(
        backend.acquire(41, &p).await.expect("shared again"),
        Admission::Allowed { .. }
    ));
}

/// A replica started while Redis is unreachable starts down (no error, no panic) and comes
/// up by itself once Redis listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_down_and_comes_up_by_itself() {
    let mut server = RedisServer::start();
    server.kill();
    let fast = fast_probe();
    let (backend, metrics) = replica_with(&server, |_| {}, fast).await;
    assert!(!backend.is_up());
    assert_eq!(metrics.backend_up.get(), 0);
    assert!(matches!(
        backend.cache_get(&TaskKey::new(1, "t")).await,
        Err(ClusterError::Down)
    ));
    server.run();
    wait_up(&backend, "backend not up 15 s after Redis started").await;
    assert!(backend.cache_get(&TaskKey::new(1, "t")).await.is_ok());
}

/// Redis frozen (SIGSTOP): every kind of call returns within the 50 ms timeout (with margin
/// for a loaded machine) instead of hanging; after SIGCONT the backend is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_redis_never_holds_a_call() {
    let server = RedisServer::start();
    let fast = fast_probe();
    let timeout = Duration::from_millis(50);
    let (backend, metrics) = replica_with(&server, |c| c.timeout = timeout, fast).await;
    assert!(backend.is_up());
    let p = policy(10, Duration::from_secs(10));
    let key = TaskKey::new(51, "t");
    let bound = timeout + Duration::from_millis(400);
    // The first admission also registers this replica in Redis (one replay of its calls).
    backend.acquire(51, &p).await.expect("shared budget");

    server.signal("-STOP");
    let started = Instant::now();
    let first = backend.acquire(51, &p).await;
    assert!(
        matches!(first, Err(ClusterError::Timeout { .. })),
        "{first:?}"
    );
    assert!(started.elapsed() < bound, "{:?}", started.elapsed());
    assert!(!backend.is_up());
    assert_eq!(
        metrics
            .redis_calls_total
            .with_label_values(&["budget_acquire", "timeout"])
            .get(),
        1
    );
    for _ in 0..3 {
        let started = Instant::now();
        assert!(backend.cache_get(&key).await.is_err());
        assert!(
            backend
                .cache_put(&key, &answer(51, "COMPLETE"), Duration::from_secs(5))
                .await
                .is_err()
        );
        assert!(
            backend
                .join_flight(&key, Instant::now() + Duration::from_secs(5))
                .await
                .is_err()
        );
        assert!(backend.hold(51, Duration::from_secs(1)).await.is_err());
        assert!(started.elapsed() < bound * 4, "{:?}", started.elapsed());
    }

    server.signal("-CONT");
    wait_up(&backend, "backend not up 15 s after SIGCONT").await;
    assert!(backend.acquire(51, &p).await.is_ok());
}

/// With `requirepass`, the password from the config authenticates; without it the backend
/// stays down (and says so) instead of failing open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authenticates() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    let metrics = ClusterMetrics::register(&prometheus::Registry::new()).expect("registry");
    let mut config = ClusterConfig::new(server.url());
    config.timeout = Duration::from_millis(500);
    let with = ClusterBackend::connect(config.clone(), Some(Secret::new("s3cret-pw")), metrics)
        .await
        .expect("set up");
    assert!(with.is_up());
    assert!(
        with.acquire(1, &policy(5, Duration::from_secs(1)))
            .await
            .is_ok()
    );
    let metrics = ClusterMetrics::register(&prometheus::Registry::new()).expect("registry");
    let without = ClusterBackend::connect(config, None, metrics)
        .await
        .expect("set up");
    assert!(!without.is_up());
    assert!(matches!(
        without.acquire(1, &policy(5, Duration::from_secs(1))).await,
        Err(ClusterError::Down)
    ));
    assert!(!format!("{with:?}").contains("s3cret"));
}

/// `rediss://` with `redis_ca_file`: the backend speaks TLS (rustls, ring) to a server whose
/// certificate the CA signed; without the CA the certificate is refused and the backend
/// stays down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_private_ca() {
    let server = RedisServer::start_tls();
    let ca = server.ca_file();
    let (trusting, _) = replica_with(
        &server,
        |c| c.redis_ca_file = Some(ca.clone()),
        ClusterOptions::default(),
    )
    .await;
    assert!(trusting.is_up());
    let key = TaskKey::new(71, "complete-tls");
    trusting
        .cache_put(&key, &answer(71, "COMPLETE"), Duration::from_secs(60))
        .await
        .expect("put over TLS");
    let hit = trusting.cache_get(&key).await.expect("get over TLS");
    assert_eq!(hit.expect("hit").answer, answer(71, "COMPLETE"));
    let (public_roots_only, _) = replica(&server).await;
    assert!(!public_roots_only.is_up());
}

/// What a miss costs in Redis round trips on loopback (printed with `--nocapture`): one
/// before HubSpot (shared cache, flight and the budget's admission in one call), then
/// publish and cache write; each well under the 50 ms default timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn miss_round_trips_are_measured() {
    let server = RedisServer::start();
    let (backend, metrics) = replica(&server).await;
    let p = policy(1_000_000, Duration::from_secs(10));
    let rounds = 200u32;
    let started = Instant::now();
    for i in 0..rounds {
        let key = TaskKey::new(61, format!("task-{i}"));
        let ask = BudgetAsk {
            hub_id: 61,
            policy: p,
            client: None,
        };
        let Lookup::Flight(Flight::Leader(mut lease)) = backend
            .lookup(&key, Instant::now() + Duration::from_secs(5), Some(ask))
            .await
            .expect("lookup")
        else {
            panic!("a fresh task has no stored answer and no flight");
        };
        assert!(matches!(
            lease.take_admission(),
            Some(Admission::Allowed { .. })
        ));
        let a = answer(61, "COMPLETE");
        lease.publish(&a).await.expect("publish");
        backend
            .cache_put(&key, &a, Duration::from_secs(60))
            .await
            .expect("put");
    }
    let per_miss = started.elapsed() / rounds;
    eprintln!("miss path: 3 Redis round trips, {per_miss:?} per miss on loopback");
    for op in ["flight_lookup", "flight_publish", "cache_put"] {
        let h = metrics.redis_call_duration_seconds.with_label_values(&[op]);
        assert_eq!(h.get_sample_count(), u64::from(rounds), "{op}");
        let mean = h.get_sample_sum() / f64::from(rounds);
        eprintln!("  {op}: mean {:.3} ms", mean * 1000.0);
    }
    assert!(per_miss < Duration::from_millis(250), "{per_miss:?}");
    // The look before the lease is the lookup itself: no separate cache read, join or
    // budget call.
    for op in ["cache_get", "flight_join", "budget_acquire"] {
        let h = metrics.redis_call_duration_seconds.with_label_values(&[op]);
        assert_eq!(h.get_sample_count(), 0, "{op}");
    }
}

/// A first look finds a stored answer with its age and takes no lease; a task without one
/// is led, in the same call; another hub's entry (under its own key, or damaged to name
/// another hub under this one's) is never returned, and the lease is taken all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_finds_the_stored_answer_or_leads_in_one_call() {
    let server = RedisServer::start();
    let (a, _) = replica(&server).await;
    let (b, b_metrics) = replica(&server).await;
    let far = || Instant::now() + Duration::from_secs(5);
    let mut conn = server.inspect().await;
    let stored = TaskKey::new(81, "complete-1");
    a.cache_put(&stored, &answer(81, "COMPLETE"), Duration::from_secs(60))
        .await
        .expect("put");
    tokio::time::sleep(Duration::from_millis(30)).await;
    match b.lookup(&stored, far(), None).await.expect("lookup") {
        Lookup::Cached(hit) => {
            assert_eq!(hit.answer, answer(81, "COMPLETE"));
            assert!(hit.age >= Duration::from_millis(20), "{:?}", hit.age);
            assert!(hit.age < Duration::from_secs(30), "{:?}", hit.age);
        }
        other => panic!("want the stored answer, got {other:?}"),
    }
    assert_eq!(b_metrics.cache_hits_total.get(), 1);
    let lease: Option<String> = redis::cmd("GET")
        .arg("t:lease:81:complete-1")
        .query_async(&mut conn)
        .await
        .expect("GET");
    assert_eq!(lease, None, "a hit takes no lease");
    // The same task in another hub: not this hub's answer; this caller leads.
    let other_hub = TaskKey::new(82, "complete-1");
    let Lookup::Flight(Flight::Leader(led)) =
        b.lookup(&other_hub, far(), None).await.expect("lookup")
    else {
        panic!("another hub's stored answer was returned");
    };
    // A waiter of that flight (another replica) gets the leader's answer, not a lease.
    let waiter = tokio::spawn({
        let (a, key) = (a.clone(), other_hub.clone());
        async move {
            a.lookup(&key, Instant::now() + Duration::from_secs(5), None)
                .await
        }
    });
    // The waiter has looked (and raised its flag) once the leader's lease is seen taken.
    wait_key(&server, "wait", 82, "complete-1").await;
    led.publish(&answer(82, "PENDING")).await.expect("publish");
    match waiter.await.expect("waiter").expect("lookup") {
        Lookup::Flight(Flight::Answer(got)) => assert_eq!(got, answer(82, "PENDING")),
        other => panic!("want the leader's answer, got {other:?}"),
    }
    // Hub 83's key holding hub 84's bytes (what no replica writes): passed over, and the
    // caller leads in the same call.
    a.cache_put(
        &TaskKey::new(84, "complete-2"),
        &answer(84, "COMPLETE"),
        Duration::from_secs(60),
    )
    .await
    .expect("put");
    let _: () = redis::cmd("RENAME")
        .arg("t:c:84:complete-2")
        .arg("t:c:83:complete-2")
        .query_async(&mut conn)
        .await
        .expect("RENAME");
    let Lookup::Flight(Flight::Leader(_lease)) = b
        .lookup(&TaskKey::new(83, "complete-2"), far(), None)
        .await
        .expect("lookup")
    else {
        panic!("an entry naming another hub was returned");
    };
    assert_eq!(b_metrics.cache_hits_total.get(), 1);
}

// The request path in cluster mode: two gateways in this process, one redis-server, and the
// simulator standing in for HubSpot.

/// A simulator for hub `hub_id` without HubSpot's rate limit (these tests count calls),
/// answering every status request after `latency`.
async fn hub_sim(hub_id: u64, latency: Duration) -> hubspot_sim::RunningSimulator {
    support::simulator(hubspot_sim::SimConfig {
        hub_id,
        latency,
        rate_limit: None,
        ..hubspot_sim::SimConfig::default()
    })
    .await
}

/// A ready gateway in front of `sim` in cluster mode on `server`.
async fn replica_gateway(
    sim: &hubspot_sim::RunningSimulator,
    server: &RedisServer,
) -> support::TestGateway {
    replica_gateway_timing(sim, server, Duration::from_secs(5)).await
}

/// [`replica_gateway`] with `upstream.request_timeout` set to `request_timeout`.
async fn replica_gateway_timing(
    sim: &hubspot_sim::RunningSimulator,
    server: &RedisServer,
    request_timeout: Duration,
) -> support::TestGateway {
    replica_gateway_with(sim, server, |c| {
        c.upstream.request_timeout = request_timeout
    })
    .await
}

/// [`replica_gateway`] with its config changed by `edit` first.
async fn replica_gateway_with(
    sim: &hubspot_sim::RunningSimulator,
    server: &RedisServer,
    edit: impl FnOnce(&mut hubspot_files_gateway::config::Config),
) -> support::TestGateway {
    let mut config = support::config(&sim.base_url());
    config.upstream.request_timeout = Duration::from_secs(5);
    edit(&mut config);
    let mut cluster = ClusterConfig::new(server.url());
    // As in `replica_with`: a loaded machine must not turn a functional test into a
    // fallback test.
    cluster.timeout = Duration::from_millis(500);
    cluster.key_prefix = "t:".into();
    config.cluster = Some(cluster);
    let gateway = support::gateway(config, support::oauth()).await;
    support::wait_ready(&gateway).await;
    gateway
}

/// A Redis, a simulator for hub `hub_id` answering at once, and two ready replicas in
/// front of them.
async fn two_replicas(
    hub_id: u64,
) -> (
    RedisServer,
    hubspot_sim::RunningSimulator,
    support::TestGateway,
    support::TestGateway,
) {
    let server = RedisServer::start();
    let sim = hub_sim(hub_id, Duration::ZERO).await;
    let a = replica_gateway(&sim, &server).await;
    let b = replica_gateway(&sim, &server).await;
    (server, sim, a, b)
}

/// `/readyz` as status and JSON.
async fn readyz(gateway: &support::TestGateway) -> (hyper::StatusCode, serde_json::Value) {
    let reply = support::send(hyper::Method::GET, &gateway.admin_url("/readyz"), &[]).await;
    (reply.status, reply.json())
}

/// A COMPLETE task fetched through replica A is a HIT on replica B without a HubSpot call,
/// with the same body and an `Age` counted from HubSpot's answer to A (not from B's copy);
/// B keeps it in memory afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_answer_on_one_replica_is_a_hit_on_another() {
    let (server, sim, a, b) = two_replicas(7_001).await;
    let first = support::get(&a.status_url("complete-shared")).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-cache"), "MISS");
    // Stored once A answered; then past one second, so a true Age is at least 1 whichever
    // replica answers.
    wait_key(&server, "c", 7_001, "complete-shared").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let hit = support::get(&b.status_url("complete-shared")).await;
    assert_eq!(hit.status, 200);
    assert_eq!(hit.header("x-cache"), "HIT", "{:?}", hit.headers);
    assert_eq!(hit.header("cache-status"), "hubspot-files-gateway; hit");
    assert_eq!(hit.body, first.body);
    let age: u64 = hit.header("age").parse().expect("an Age header");
    assert!((1..=10).contains(&age), "Age {age}");
    assert_eq!(
        support::status_requests(&sim).await,
        1,
        "B did not ask HubSpot"
    );
    let shared = "hubspot_gateway_cluster_cache_hits_total";
    assert_eq!(support::metric(&b, shared).await, Some(1.0));
    let again = support::get(&b.status_url("complete-shared")).await;
    assert_eq!(again.header("x-cache"), "HIT");
    assert_eq!(
        support::metric(&b, shared).await,
        Some(1.0),
        "from B's memory"
    );
    assert_eq!(support::status_requests(&sim).await, 1);
    let (status, ready) = readyz(&b).await;
    assert_eq!(status, 200);
    assert_eq!(ready["cluster"]["backend"], "up", "{ready}");
    // Redis holds the answer, never a credential: not the token HubSpot was sent, not the
    // OAuth secrets, not the caller's key.
    let sent = support::sim_requests(&sim).await;
    let bearer = sent[0]["headers"]["authorization"]
        .as_str()
        .and_then(|h| h.strip_prefix("Bearer "))
        .expect("HubSpot was sent a bearer token")
        .to_owned();
    let stored = String::from_utf8_lossy(&redis_contents(&server).await).into_owned();
    assert!(stored.contains("complete-shared"), "the answer is there");
    for secret in [
        bearer.as_str(),
        "SECRET",
        support::KEY,
        "Bearer",
        "authorization",
    ] {
        assert!(!stored.contains(secret), "Redis holds {secret:?}");
    }
    a.stop().await;
    b.stop().await;
}

/// A miss on a replica asks Redis once before HubSpot: the shared cache, the flight and the
/// budget's admission are one look (`flight_lookup`), with no separate cache read, flight
/// join or budget call (the answer's time is still recorded in the window afterwards);
/// another replica's HIT comes from that same single look and costs no budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_looks_at_redis_once_before_hubspot() {
    let (server, sim, a, b) = two_replicas(7_010).await;
    let pending = support::get(&a.status_url("pending-looked")).await;
    assert_eq!(pending.status, 200);
    assert_eq!(pending.header("x-cache"), "MISS");
    let done = support::get(&a.status_url("complete-looked")).await;
    assert_eq!(done.header("x-cache"), "MISS");
    assert_eq!(support::status_requests(&sim).await, 2);
    assert_eq!(count(&a, "flight_lookup").await, 2.0);
    // Each call's admission came with its lease; its answer time is still recorded.
    for op in ["cache_get", "flight_join", "budget_acquire"] {
        assert_eq!(count(&a, op).await, 0.0, "{op}");
    }
    let restamped = |gw| async move { count(gw, "budget_restamp").await };
    let deadline = Instant::now() + Duration::from_secs(5);
    while restamped(&a).await < 2.0 {
        assert!(
            Instant::now() < deadline,
            "the answers' times were not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_key(&server, "c", 7_010, "complete-looked").await;
    let hit = support::get(&b.status_url("complete-looked")).await;
    assert_eq!(hit.header("x-cache"), "HIT", "{:?}", hit.headers);
    assert_eq!(hit.body, done.body);
    assert_eq!(
        support::status_requests(&sim).await,
        2,
        "B did not ask HubSpot"
    );
    assert_eq!(count(&b, "flight_lookup").await, 1.0);
    for op in ["cache_get", "flight_join", "budget_acquire"] {
        assert_eq!(count(&b, op).await, 0.0, "{op}");
    }
    a.stop().await;
    b.stop().await;
}

/// The account's window spent, the next miss's one Redis look is refused by the budget:
/// the caller gets the gateway's 429 (`Retry-After`, `RateLimit-*`, HubSpot's body with
/// `TEN_SECONDLY_ROLLING`), HubSpot is not asked, no lease is left for the task (another
/// replica's caller leads it at once, refused the same way), and the refusal is counted
/// as the budget's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_refusal_in_the_lookup_takes_no_lease() {
    let server = RedisServer::start();
    let sim = hub_sim(7_011, Duration::ZERO).await;
    let spent = |c: &mut hubspot_files_gateway::config::Config| {
        c.upstream.rate_limit = RateLimit {
            requests: 1,
            per: Duration::from_secs(30),
        }
    };
    let a = replica_gateway_with(&sim, &server, spent).await;
    let b = replica_gateway_with(&sim, &server, spent).await;
    let first = support::get(&a.status_url("pending-first")).await;
    assert_eq!(first.status, 200);
    let refused = support::get(&a.status_url("pending-refused")).await;
    assert_eq!(refused.status, 429, "{:?}", refused.headers);
    let wait: u64 = refused.header("retry-after").parse().expect("Retry-After");
    // Until the first call's answer time is recorded it counts from admission + the
    // request timeout (5 s).
    assert!((1..=35).contains(&wait), "Retry-After {wait}");
    assert_eq!(refused.header("ratelimit-limit"), "1");
    assert_eq!(refused.header("ratelimit-remaining"), "0");
    assert_eq!(refused.json()["policyName"], "TEN_SECONDLY_ROLLING");
    assert_eq!(
        support::status_requests(&sim).await,
        1,
        "HubSpot asked once"
    );
    let lease: Option<String> = redis::cmd("GET")
        .arg("t:lease:7011:pending-refused")
        .query_async(&mut server.inspect().await)
        .await
        .expect("GET");
    assert_eq!(lease, None, "a refused try holds no lease");
    let throttled = "hubspot_gateway_upstream_throttled_total{source=\"local_budget\"}";
    assert_eq!(support::metric(&a, throttled).await, Some(1.0));
    // Not a waiter of a lease nobody renews: B is refused at once, by the shared window.
    let started = Instant::now();
    let other = support::get(&b.status_url("pending-refused")).await;
    assert_eq!(other.status, 429);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(support::metric(&b, throttled).await, Some(1.0));
    assert_eq!(support::status_requests(&sim).await, 1);
    a.stop().await;
    b.stop().await;
}

/// Successful Redis calls of `op` `gw` made (0 before the first).
async fn count(gw: &support::TestGateway, op: &str) -> f64 {
    let series = format!("hubspot_gateway_cluster_redis_calls_total{{op=\"{op}\",result=\"ok\"}}");
    support::metric(gw, &series).await.unwrap_or(0.0)
}

/// Every key in `server` and every value under it, as bytes (strings, hashes, sets, sorted
/// sets and lists).
async fn redis_contents(server: &RedisServer) -> Vec<u8> {
    let mut conn = server.inspect().await;
    let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    let mut all = Vec::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .expect("TYPE");
        let read = match kind.as_str() {
            "string" => redis::cmd("GET").arg(&key).clone(),
            "hash" => redis::cmd("HGETALL").arg(&key).clone(),
            "zset" => redis::cmd("ZRANGE").arg(&key).arg(0).arg(-1).clone(),
            "list" => redis::cmd("LRANGE").arg(&key).arg(0).arg(-1).clone(),
            "set" => redis::cmd("SMEMBERS").arg(&key).clone(),
            other => panic!("the backend wrote a {other} at a key"),
        };
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![read.query_async(&mut conn).await.expect("GET")],
            _ => read.query_async(&mut conn).await.expect("read"),
        };
        all.extend_from_slice(&key);
        for value in values {
            all.extend_from_slice(&value);
        }
    }
    all
}

/// Stale answers stay per replica, and a replica keeps the one it received from another
/// replica's flight: after callers on A and B share one HubSpot call for a PENDING task,
/// HubSpot failing (503) makes the replica that only waited answer STALE with that body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_only_waited_can_answer_stale() {
    let server = RedisServer::start();
    let sim = hub_sim(7_006, Duration::from_millis(1500)).await;
    let a = replica_gateway(&sim, &server).await;
    let b = replica_gateway(&sim, &server).await;
    let replies = support::get_all(vec![
        a.status_url("pending-stale-peer"),
        b.status_url("pending-stale-peer"),
    ])
    .await;
    assert_eq!(support::status_requests(&sim).await, 1);
    let waited = replies
        .iter()
        .position(|r| r.header("x-cache") == "COALESCED")
        .expect("one replica waited for the other's call");
    let waiter = [&a, &b][waited];
    support::faults(
        &sim,
        serde_json::json!({ "fail_rate": 1.0, "fail_status": 503 }),
    )
    .await;
    let stale = support::get(&waiter.status_url("pending-stale-peer")).await;
    assert_eq!(stale.status, 200, "{:?}", stale.body);
    assert_eq!(stale.header("x-cache"), "STALE");
    assert_eq!(
        stale.body, replies[waited].body,
        "the peer's answer, byte for byte"
    );
    assert!(
        support::status_requests(&sim).await >= 2,
        "HubSpot was asked again and failed"
    );
}

/// Callers of a new task on replicas A and B at the same time cost one HubSpot call: one
/// caller's answer is the MISS, the other's is COALESCED with the same body; the next round,
/// the task still PENDING, costs one call again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_on_two_replicas_cost_one_hubspot_call() {
    let server = RedisServer::start();
    // HubSpot takes long enough that the second replica joins while the first one asks,
    // even on a loaded machine.
    let sim = hub_sim(7_002, Duration::from_millis(1500)).await;
    let a = replica_gateway(&sim, &server).await;
    let b = replica_gateway(&sim, &server).await;
    for round in 1..=2u64 {
        let replies = support::get_all(vec![
            a.status_url("pending-flight"),
            b.status_url("pending-flight"),
        ])
        .await;
        let mut seen: Vec<&str> = replies.iter().map(|r| r.header("x-cache")).collect();
        seen.sort_unstable();
        assert_eq!(seen, ["COALESCED", "MISS"], "round {round}");
        assert!(replies.iter().all(|r| r.status == 200));
        assert_eq!(replies[0].body, replies[1].body);
        assert_eq!(support::status_requests(&sim).await, round, "round {round}");
    }
    let coalesced = |gw| async move {
        support::metric(gw, "hubspot_gateway_coalesced_requests_total")
            .await
            .unwrap_or(0.0)
    };
    assert_eq!(coalesced(&a).await + coalesced(&b).await, 2.0);
    a.stop().await;
    b.stop().await;
}

/// Redis killed under a running replica: callers still get HubSpot's answers (200, no 5xx),
/// the backend metric says 0 and `/readyz` stays ready showing `down`; a replica started
/// while Redis is down serves too; both return to shared mode once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_means_local_mode_not_errors() {
    let mut server = RedisServer::start();
    let sim = hub_sim(7_003, Duration::ZERO).await;
    let a = replica_gateway(&sim, &server).await;
    let up = "hubspot_gateway_cluster_backend_up";
    assert_eq!(support::metric(&a, up).await, Some(1.0));
    server.kill();
    for task in ["complete-down-1", "pending-down-2", "complete-down-1"] {
        let reply = support::get(&a.status_url(task)).await;
        assert_eq!(reply.status, 200, "{task}: {:?}", reply.body);
    }
    assert_eq!(support::metric(&a, up).await, Some(0.0));
    let (status, ready) = readyz(&a).await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["cluster"]["backend"], "down", "{ready}");
    let late = replica_gateway(&sim, &server).await;
    assert_eq!(
        support::get(&late.status_url("complete-down-3"))
            .await
            .status,
        200
    );
    assert_eq!(support::metric(&late, up).await, Some(0.0));
    server.run();
    for gateway in [&a, &late] {
        support::wait_for(
            || async { support::metric(gateway, up).await == Some(1.0) },
            "backend up again",
        )
        .await;
    }
    assert_eq!(readyz(&late).await.1["cluster"]["backend"], "up");
    a.stop().await;
    late.stop().await;
}

/// Two HubSpot accounts on one Redis never share: the same taskId's COMPLETE answer stored
/// by hub 7004's replica is a MISS for hub 7005's, whose own HubSpot is asked and whose
/// body names its own hub; concurrent callers of one new task cost one call per hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hubs_never_share() {
    let server = RedisServer::start();
    let (sim_a, sim_b) = (
        hub_sim(7_004, Duration::from_millis(400)).await,
        hub_sim(7_005, Duration::from_millis(400)).await,
    );
    let a = replica_gateway(&sim_a, &server).await;
    let b = replica_gateway(&sim_b, &server).await;
    let first = support::get(&a.status_url("complete-hubs")).await;
    assert_eq!(first.header("x-cache"), "MISS");
    wait_key(&server, "c", 7_004, "complete-hubs").await;
    let other = support::get(&b.status_url("complete-hubs")).await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("x-cache"), "MISS");
    let body = String::from_utf8_lossy(&other.body);
    assert!(body.contains("7005") && !body.contains("7004"), "{body}");
    let replies = support::get_all(vec![
        a.status_url("pending-hubs"),
        b.status_url("pending-hubs"),
    ])
    .await;
    assert!(replies.iter().all(|r| r.header("x-cache") == "MISS"));
    assert_eq!(support::status_requests(&sim_a).await, 2);
    assert_eq!(support::status_requests(&sim_b).await, 2);
    a.stop().await;
    b.stop().await;
}

/// Waits until a replica wrote `kind` (`lease`: it leads the flight, so the next caller is
/// sure to find a leader at work; `c`: the shared cache holds the answer) for `task` in hub
/// `hub`.
async fn wait_key(server: &RedisServer, kind: &str, hub: u64, task: &str) {
    let key = format!("t:{kind}:{hub}:{task}");
    let mut exists = redis::cmd("EXISTS");
    exists.arg(&key);
    poll_redis(server, &exists, &format!("key {key}"), |there: bool| there).await;
}

/// A replica waiting on another's flight past its own deadline answers what a slow HubSpot
/// gives (504 `UPSTREAM_TIMEOUT`) without calling HubSpot itself; the leader's caller still
/// gets HubSpot's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_past_its_deadline_gets_the_slow_hubspot_answer() {
    let server = RedisServer::start();
    // Slower than B's deadline by a wide margin, within A's per-try bound (half its 5 s).
    let sim = hub_sim(7_006, Duration::from_millis(2200)).await;
    let a = replica_gateway(&sim, &server).await;
    let b = replica_gateway_timing(&sim, &server, Duration::from_secs(1)).await;
    let url = a.status_url("pending-slow");
    let leader = tokio::spawn(async move { support::get(&url).await });
    wait_key(&server, "lease", 7_006, "pending-slow").await;
    let started = std::time::Instant::now();
    let waiter = support::get(&b.status_url("pending-slow")).await;
    assert_eq!(waiter.status, 504, "{:?}", waiter.body);
    assert_eq!(waiter.json()["category"], "UPSTREAM_TIMEOUT");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let led = leader.await.expect("leader's request");
    assert_eq!((led.status.as_u16(), led.header("x-cache")), (200, "MISS"));
    assert_eq!(support::status_requests(&sim).await, 1);
    let deadline = r#"hubspot_gateway_cluster_flight_waits_total{outcome="deadline"}"#;
    assert_eq!(support::metric(&b, deadline).await, Some(1.0));
    a.stop().await;
    b.stop().await;
}

/// A leader that gets no answer from HubSpot (its call timed out) releases the flight, and
/// the waiting replica takes it over within its own deadline instead of inheriting the
/// failure: one account (hub 7007) behind two simulators, the leader's too slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_leader_hands_the_flight_over() {
    let server = RedisServer::start();
    let slow = hub_sim(7_007, Duration::from_millis(3000)).await;
    let fast = hub_sim(7_007, Duration::ZERO).await;
    // A's flight lasts its 2 s deadline: B's caller must join it meanwhile to take it over
    // (joining after it ended, B would simply lead), and still has 3 s of its own 5 s after.
    let a = replica_gateway_timing(&slow, &server, Duration::from_secs(2)).await;
    let b = replica_gateway(&fast, &server).await;
    let url = a.status_url("complete-handover");
    let leader = tokio::spawn(async move { support::get(&url).await });
    wait_key(&server, "lease", 7_007, "complete-handover").await;
    let waiter = support::get(&b.status_url("complete-handover")).await;
    let led = leader.await.expect("leader's request");
    assert_eq!(led.status, 504, "{:?}", led.body);
    assert_eq!(
        (waiter.status.as_u16(), waiter.header("x-cache")),
        (200, "MISS")
    );
    assert_eq!(support::status_requests(&fast).await, 1);
    let takeovers = "hubspot_gateway_cluster_lease_takeovers_total";
    assert_eq!(support::metric(&b, takeovers).await, Some(1.0));
    // B's answer went to the shared cache: A now answers it as a HIT without its HubSpot.
    wait_key(&server, "c", 7_007, "complete-handover").await;
    let slow_calls = support::status_requests(&slow).await;
    let hit = support::get(&a.status_url("complete-handover")).await;
    assert_eq!((hit.status.as_u16(), hit.header("x-cache")), (200, "HIT"));
    assert_eq!(support::status_requests(&slow).await, slow_calls);
    a.stop().await;
    b.stop().await;
}

/// The API key of the client with a share in the cross-replica share test.
const GREEDY_KEY: &str = "greedy-key-9876543210";

/// A share refusal on the replica leading a task's flight is its client's alone: the
/// greedy client (1 call of the account's 4) leads on replica A, whose HubSpot answers 401
/// after a second, so its retry with a fresh token finds its share spent. Replica B's quiet
/// caller, waiting on that flight meanwhile, is not handed the refusal: B takes the flight
/// over under its own client's charge and answers 200. One account (hub 7009) behind two
/// simulators, A's with its tokens revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_share_refusal_stays_on_its_replica_and_client() {
    let server = RedisServer::start();
    let revoked = hub_sim(7_009, Duration::from_millis(1000)).await;
    let fast = hub_sim(7_009, Duration::ZERO).await;
    let budget = |c: &mut hubspot_files_gateway::config::Config| {
        c.upstream.rate_limit = RateLimit {
            requests: 4,
            per: Duration::from_secs(60),
        };
        c.auth
            .clients
            .push(hubspot_files_gateway::config::ClientConfig {
                name: "greedy".into(),
                key_sha256: Some(hubspot_files_gateway::auth::hash_key(GREEDY_KEY)),
                cert_cn: None,
                share: Some(0.25),
            });
    };
    let a = replica_gateway_with(&revoked, &server, budget).await;
    let b = replica_gateway_with(&fast, &server, budget).await;
    support::faults(&revoked, serde_json::json!({ "revoke_all": true })).await;
    let url = a.status_url("pending-greedy");
    let auth = format!("Bearer {GREEDY_KEY}");
    let led =
        tokio::spawn(
            async move { support::send(Method::GET, &url, &[("authorization", &auth)]).await },
        );
    wait_key(&server, "lease", 7_009, "pending-greedy").await;
    let waiter = support::get(&b.status_url("pending-greedy")).await;
    let led = led.await.expect("greedy caller");
    assert_eq!(led.status, 429, "{:?}", led.body);
    assert_eq!(led.header("ratelimit-limit"), "1");
    assert_eq!(
        (waiter.status.as_u16(), waiter.header("x-cache")),
        (200, "MISS"),
        "{:?}",
        waiter.body
    );
    assert_eq!(support::status_requests(&revoked).await, 1);
    assert_eq!(support::status_requests(&fast).await, 1);
    a.stop().await;
    b.stop().await;
}

/// A replica's budget of `limit` calls per `per` for the account, over `server`, with its
/// backend (to see it go down and up) and its metrics.
async fn window_budget(
    server: &RedisServer,
    limit: u32,
    per: Duration,
) -> (Budget, Arc<ClusterBackend>, ClusterMetrics) {
    let config = UpstreamConfig {
        rate_limit: RateLimit {
            requests: limit,
            per,
        },
        ..UpstreamConfig::default()
    };
    let (backend, metrics) = replica_with(
        server,
        |c| c.timeout = Duration::from_millis(300),
        fast_probe(),
    )
    .await;
    let backend = Arc::new(backend);
    (
        Budget::new(&config, Some(backend.clone())),
        backend,
        metrics,
    )
}

/// Asks every replica's budget for a call every 50 ms during `span`; returns when each
/// allowed call's answer was in (answered at once).
async fn call_for(replicas: &[&Budget], hub: u64, span: Duration) -> Vec<Instant> {
    let mut made = Vec::new();
    let end = Instant::now() + span;
    while Instant::now() < end {
        for budget in replicas {
            if let Ok(permit) = budget.acquire(&charge("quiet", None, hub)).await {
                permit.answered();
                made.push(Instant::now());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    made
}

/// The most calls of `made` within any span shorter than `span`.
fn busiest(made: &[Instant], span: Duration) -> usize {
    let mut made = made.to_vec();
    made.sort();
    (0..made.len())
        .map(|i| {
            made[i..]
                .iter()
                .take_while(|t| **t - made[i] < span)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// The calls `made` across `event` kept to `limit` in every window of `per` (less the
/// placement slack), and more than `limit` were made in all: calls resumed once the window
/// had room.
fn assert_limit_kept_and_calls_resumed(made: &[Instant], limit: u32, per: Duration, event: &str) {
    let most = busiest(made, per - PLACEMENT_SLACK);
    assert!(
        most <= limit as usize,
        "{most} calls within one window across {event} (limit {limit})"
    );
    assert!(
        made.len() > limit as usize,
        "no call once the old ones left the window: {}",
        made.len()
    );
}

/// Allowance for the busiest-window checks: a call is recorded here just after its answer
/// time, the moment the budget places it; a loaded machine may put up to this between the
/// two. Without the replay the excess is a whole window's calls within milliseconds.
const PLACEMENT_SLACK: Duration = Duration::from_millis(250);

/// A Redis that restarts empty (no persistence) between two calls has forgotten the
/// account's window; each replica's calls of the last window go back into it (replayed,
/// found by the replica set the admission checks, whether or not a call failed meanwhile),
/// so the two replicas together never make more than the limit in any rolling window
/// across the restart, and call again once the old calls left it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restarted_empty_gets_the_replicas_calls_back() {
    let mut server = RedisServer::start();
    let (limit, per) = (6, Duration::from_secs(3));
    let (a, _, a_metrics) = window_budget(&server, limit, per).await;
    let (b, _, _) = window_budget(&server, limit, per).await;
    let hub = 51;
    let mut made = Vec::new();
    for i in 0..limit {
        let budget = if i % 2 == 0 { &a } else { &b };
        budget
            .acquire(&charge("quiet", None, hub))
            .await
            .expect("room before the restart")
            .answered();
        made.push(Instant::now());
    }
    let mut conn = server.inspect().await;
    answered(&mut conn, "t:rl:51", limit as usize).await;
    server.kill();
    server.run();
    made.extend(call_for(&[&a, &b], hub, per + Duration::from_millis(1500)).await);
    assert_limit_kept_and_calls_resumed(&made, limit, per, "the restart");
    assert!(
        a_metrics.window_replays_total.get() >= 2,
        "at start and after the restart"
    );
}

/// Redis killed: each replica works alone on its part of the limit; then a new, empty Redis
/// comes up. The calls made alone go into its window before the next admission, so the
/// account never sees more than the limit in a rolling window, and calls go on once the
/// window has room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_made_alone_count_in_the_window_of_a_redis_back_up() {
    let mut server = RedisServer::start();
    let (limit, per) = (6, Duration::from_secs(3));
    let (a, a_backend, _) = window_budget(&server, limit, per).await;
    let (b, b_backend, _) = window_budget(&server, limit, per).await;
    let hub = 52;
    server.kill();
    let mut made = call_for(&[&a, &b], hub, Duration::from_millis(600)).await;
    assert_eq!(made.len(), limit as usize, "each replica's part, 3 of 6");
    server.run();
    wait_up(&a_backend, "replica a not up again").await;
    wait_up(&b_backend, "replica b not up again").await;
    made.extend(call_for(&[&a, &b], hub, per).await);
    assert_limit_kept_and_calls_resumed(&made, limit, per, "Redis' return");
}

/// A replica that gets no request after Redis restarted empty still puts its calls of the
/// last window back: when its connection to Redis is made again, not at its next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_replicas_replay_when_they_reconnect() {
    let mut server = RedisServer::start();
    let (limit, per) = (6, Duration::from_secs(30));
    let (a, _, _) = window_budget(&server, limit, per).await;
    let (b, _, b_metrics) = window_budget(&server, limit, per).await;
    let hub = 53;
    a.acquire(&charge("quiet", None, hub))
        .await
        .expect("room")
        .answered();
    for _ in 0..4 {
        b.acquire(&charge("quiet", None, hub))
            .await
            .expect("room")
            .answered();
    }
    let mut conn = server.inspect().await;
    answered(&mut conn, "t:rl:53", 5).await;
    let replays = b_metrics.window_replays_total.get();
    server.kill();
    server.run();
    // No call on either replica: the window fills again from their replays alone.
    let mut zcard = redis::cmd("ZCARD");
    zcard.arg("t:rl:53");
    poll_redis(
        &server,
        &zcard,
        "both replicas' calls replayed",
        |n: i64| n == 5,
    )
    .await;
    assert!(b_metrics.window_replays_total.get() > replays);
    let refused = b
        .acquire(&charge("quiet", None, hub))
        .await
        .expect_err("its own 4 fill its local share of 3");
    assert_eq!(
        (refused.by, refused.limit),
        (ThrottleSource::LocalBudget, 3)
    );
}

/// Redis losing the keys without a restart (`FLUSHALL`, an eviction) and without any failed
/// call is found by the admission itself: the replica's next call first puts its calls of
/// the last window back, then is admitted against them; with the same `run_id` there is no
/// cap, so the replica may still use the whole window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lost_without_a_failed_call_are_found_by_the_admission() {
    let server = RedisServer::start();
    let (limit, per) = (6, Duration::from_secs(30));
    let (a, _, a_metrics) = window_budget(&server, limit, per).await;
    let hub = 54;
    for _ in 0..4 {
        a.acquire(&charge("quiet", None, hub))
            .await
            .expect("room")
            .answered();
    }
    let mut conn = server.inspect().await;
    answered(&mut conn, "t:rl:54", 4).await;
    let replays = a_metrics.window_replays_total.get();
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut conn)
        .await
        .expect("FLUSHALL");
    for i in 0..2 {
        a.acquire(&charge("quiet", None, hub))
            .await
            .unwrap_or_else(|t| panic!("call {i} within the window refused: {t:?}"))
            .answered();
    }
    assert_eq!(a_metrics.window_replays_total.get(), replays + 1);
    assert_eq!(
        a_metrics
            .local_fallbacks_total
            .with_label_values(&["budget_acquire"])
            .get(),
        0,
        "no call failed"
    );
    let refused = a
        .acquire(&charge("quiet", None, hub))
        .await
        .expect_err("4 replayed and 2 new fill the window");
    assert_eq!(
        (refused.by, refused.limit),
        (ThrottleSource::LocalBudget, 6)
    );
    answered(&mut conn, "t:rl:54", 6).await;
}

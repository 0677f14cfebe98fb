//! Useful while HubSpot is not: the last PENDING/PROCESSING answer stands in for a HubSpot
//! failure (`cache.stale_if_error`), and HubSpot's 404 for a task is remembered
//! (`cache.missing_ttl`); neither is ever served to another HubSpot account.

mod support;

use std::time::{Duration, Instant};

use hubspot_files_gateway::config::Config;
use hubspot_sim::{RunningSimulator, SimConfig};
use hyper::{Method, StatusCode};
use serde_json::json;
use support::*;

/// The stale window of the failure tests: long enough for a 2 s old answer to be served
/// after a failure that itself takes up to the 1 s deadline of the timeout case, with 2 s
/// to spare for a busy machine; short enough to wait out.
const WINDOW: Duration = Duration::from_secs(5);

/// A simulator without HubSpot's rate limit (these tests count calls) and with tokens
/// living `token_ttl`.
async fn sim(token_ttl: Duration) -> RunningSimulator {
    simulator(SimConfig {
        token_ttl,
        rate_limit: None,
        ..SimConfig::default()
    })
    .await
}

/// A ready gateway in front of `sim` with `change` applied to the test config.
async fn gateway_with(sim: &RunningSimulator, change: impl FnOnce(&mut Config)) -> TestGateway {
    let mut cfg = config(&sim.base_url());
    cfg.cache.stale_if_error = WINDOW;
    change(&mut cfg);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    gw
}

/// How HubSpot is made to fail.
enum Failure {
    /// Every status request's connection closed unanswered.
    Reset,
    /// The simulator gone: connections refused.
    Refused,
    /// Answers slower than `request_timeout`.
    Timeout,
    /// HubSpot's 503.
    Unavailable,
    /// HubSpot's 429 (and the hold it starts).
    RateLimited,
    /// The gateway's own budget (1 call a minute) refusing the call.
    Budget,
}

/// A task seen 2 s before HubSpot fails in `failure`'s way is served STALE with the old
/// body, a true `Age` and `Cache-Status` naming the status it stands in for; once the
/// answer is older than the window the caller gets that status, as without stale answers.
async fn stale_then_error(failure: Failure, expected: StatusCode) {
    let mut sim = Some(sim(Duration::from_secs(1800)).await);
    let gw = gateway_with(sim.as_ref().expect("running"), |c| {
        // A slow HubSpot fails after 1 s. The other failures keep the usual 5 s deadline:
        // with 1 s, retrying resets on a loaded machine ran into it (504, not 502).
        if matches!(failure, Failure::Timeout) {
            c.upstream.request_timeout = Duration::from_secs(1);
        }
        if matches!(failure, Failure::Budget) {
            c.upstream.rate_limit.requests = 1;
            c.upstream.rate_limit.per = Duration::from_secs(60);
        }
    })
    .await;
    let url = gw.status_url("pending-stale");
    let before_first = Instant::now();
    let first = get(&url).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-cache"), "MISS");
    assert_eq!(first.json()["status"], "PENDING");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = match failure {
        Failure::Reset => Some(json!({ "reset_rate": 1.0 })),
        Failure::Timeout => Some(json!({ "latency_ms": 3000 })),
        Failure::Unavailable => Some(json!({ "fail_rate": 1.0, "fail_status": 503 })),
        Failure::RateLimited => Some(json!({
            "status_override": { "status": 429, "count": 1000, "retry_after": 1 }
        })),
        Failure::Refused | Failure::Budget => None,
    };
    match (fault, matches!(failure, Failure::Refused)) {
        (Some(fault), _) => faults(sim.as_ref().expect("running"), fault).await,
        (None, true) => sim.take().expect("running").stop().await,
        (None, false) => {}
    }
    let stale = get(&url).await;
    assert_eq!(stale.status, StatusCode::OK, "{:?}", stale.body);
    assert_eq!(stale.header("x-cache"), "STALE");
    assert_eq!(stale.body, first.body, "the last answer, byte for byte");
    let age: u64 = stale.header("age").parse().expect("an Age header");
    assert!(
        age >= 2 && Duration::from_secs(age) <= before_first.elapsed(),
        "Age {age} is the answer's true age"
    );
    assert_eq!(
        stale.header("cache-status"),
        format!(
            "hubspot-files-gateway; fwd=stale; fwd-status={}",
            expected.as_u16()
        )
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_requests_total{cache="stale",client="tests",code="200"}"#
        )
        .await,
        Some(1.0)
    );
    // Poll until the window is over: then the failure itself.
    let give_up = Instant::now() + Duration::from_secs(30);
    let last = loop {
        let r = get(&url).await;
        if r.header("x-cache") != "STALE" {
            break r;
        }
        assert!(Instant::now() < give_up, "the stale window never ended");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        before_first.elapsed() >= WINDOW,
        "no stale answer was refused within the window"
    );
    assert_eq!(last.status, expected, "{:?}", last.body);
    assert!(!last.headers.contains_key("age"));
    assert_eq!(
        last.json()["status"],
        "error",
        "HubSpot's error shape, as without stale answers"
    );
}

/// HubSpot closing the connection: STALE, then 502.
#[tokio::test]
async fn connection_reset_is_answered_stale_within_the_window() {
    stale_then_error(Failure::Reset, StatusCode::BAD_GATEWAY).await;
}

/// HubSpot not listening any more: STALE, then 502.
#[tokio::test]
async fn connection_refused_is_answered_stale_within_the_window() {
    stale_then_error(Failure::Refused, StatusCode::BAD_GATEWAY).await;
}

/// HubSpot slower than `request_timeout`: STALE, then 504.
#[tokio::test]
async fn timeout_is_answered_stale_within_the_window() {
    stale_then_error(Failure::Timeout, StatusCode::GATEWAY_TIMEOUT).await;
}

/// HubSpot's 503: STALE, then 503.
#[tokio::test]
async fn hubspot_503_is_answered_stale_within_the_window() {
    stale_then_error(Failure::Unavailable, StatusCode::SERVICE_UNAVAILABLE).await;
}

/// HubSpot's 429: STALE, then 429.
#[tokio::test]
async fn hubspot_429_is_answered_stale_within_the_window() {
    stale_then_error(Failure::RateLimited, StatusCode::TOO_MANY_REQUESTS).await;
}

/// The gateway's own budget refusing the call: STALE, then 429.
#[tokio::test]
async fn spent_budget_is_answered_stale_within_the_window() {
    stale_then_error(Failure::Budget, StatusCode::TOO_MANY_REQUESTS).await;
}

/// `stale_if_error = "0s"`: HubSpot's failure reaches the caller at once.
#[tokio::test]
async fn zero_window_turns_stale_answers_off() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |c| c.cache.stale_if_error = Duration::ZERO).await;
    let url = gw.status_url("pending-off");
    assert_eq!(get(&url).await.status, StatusCode::OK);
    faults(&sim, json!({ "fail_rate": 1.0, "fail_status": 503 })).await;
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.header("x-cache"), "MISS");
}

/// A failure that is the caller's own (no key, a malformed id, a path not served) is
/// answered as such, never STALE, while a stale answer for the task is available; a
/// terminal answer stays a HIT while HubSpot fails.
#[tokio::test]
async fn callers_own_failures_and_terminal_answers_are_not_stale() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |_| {}).await;
    let url = gw.status_url("pending-own");
    assert_eq!(get(&url).await.status, StatusCode::OK);
    assert_eq!(
        get(&gw.status_url("complete-own")).await.header("x-cache"),
        "MISS"
    );
    faults(&sim, json!({ "fail_rate": 1.0, "fail_status": 503 })).await;
    assert_eq!(get(&url).await.header("x-cache"), "STALE");
    let no_key = send(Method::GET, &url, &[]).await;
    assert_eq!(no_key.status, StatusCode::UNAUTHORIZED);
    let bad_id = get(&gw.status_url("pending-own%20x")).await;
    assert_eq!(bad_id.status, StatusCode::BAD_REQUEST);
    let other_path = get(&format!("http://{}/files/v3/other", gw.addr)).await;
    assert_eq!(other_path.status, StatusCode::NOT_FOUND);
    for r in [no_key, bad_id, other_path] {
        assert_ne!(r.header("x-cache"), "STALE");
        assert!(!r.headers.contains_key("age"));
    }
    let terminal = get(&gw.status_url("complete-own")).await;
    assert_eq!(terminal.status, StatusCode::OK);
    assert_eq!(terminal.header("x-cache"), "HIT");
    assert_eq!(
        terminal.header("cache-status"),
        "hubspot-files-gateway; hit"
    );
}

/// With `pending_ttl` too: a poll within it is a HIT, a poll after it asks HubSpot again,
/// and when HubSpot then fails the answer (no longer a HIT) is still served STALE. (2 s
/// rather than 1 s, so that two polls on a busy machine still fall within it.)
#[tokio::test]
async fn pending_ttl_and_stale_window_coexist() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |c| c.cache.pending_ttl = Duration::from_secs(2)).await;
    let url = gw.status_url("processing-both");
    assert_eq!(get(&url).await.header("x-cache"), "MISS");
    assert_eq!(get(&url).await.header("x-cache"), "HIT");
    assert_eq!(status_requests(&sim).await, 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let again = get(&url).await;
    assert_eq!(
        again.header("x-cache"),
        "MISS",
        "past pending_ttl: asked again"
    );
    assert_eq!(status_requests(&sim).await, 2);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    faults(&sim, json!({ "fail_rate": 1.0, "fail_status": 503 })).await;
    let stale = get(&url).await;
    assert_eq!(stale.header("x-cache"), "STALE");
    assert_eq!(stale.body, again.body);
    assert!(stale.header("age").parse::<u64>().expect("Age") >= 1);
}

/// 100 polls of a missing id within `missing_ttl` (the default 30 s) cost HubSpot one call;
/// the remembered 404 is HubSpot's own body and headers, with `Age`.
#[tokio::test]
async fn a_missing_task_costs_one_call_per_window() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |_| {}).await;
    let url = gw.status_url("missing-typo");
    let first = get(&url).await;
    assert_eq!(first.status, StatusCode::NOT_FOUND);
    assert_eq!(first.header("x-cache"), "MISS");
    let client = client();
    let auth = format!("Bearer {KEY}");
    for _ in 0..100 {
        let r = send_with(&client, Method::GET, &url, &[("authorization", &auth)]).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.header("x-cache"), "HIT");
        assert_eq!(r.header("cache-status"), "hubspot-files-gateway; hit");
        assert_eq!(r.body, first.body, "HubSpot's own body");
        for name in ["content-type", "x-hubspot-correlation-id"] {
            assert_eq!(r.header(name), first.header(name), "{name}");
        }
        assert!(r.header("age").parse::<u64>().is_ok(), "an Age header");
    }
    assert_eq!(
        status_requests(&sim).await,
        1,
        "101 polls, one HubSpot call"
    );
}

/// Past `missing_ttl` the remembered 404 is dropped and HubSpot is asked again.
#[tokio::test]
async fn a_missing_task_is_asked_again_after_the_window() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |c| c.cache.missing_ttl = Duration::from_secs(1)).await;
    let url = gw.status_url("missing-later");
    let started = Instant::now();
    assert_eq!(get(&url).await.header("x-cache"), "MISS");
    wait_for(
        || async { get(&url).await.header("x-cache") == "MISS" },
        "the remembered 404 to expire",
    )
    .await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(status_requests(&sim).await, 2);
}

/// `missing_ttl = "0s"`: every poll of a missing id asks HubSpot.
#[tokio::test]
async fn zero_missing_ttl_asks_every_time() {
    let sim = sim(Duration::from_secs(1800)).await;
    let gw = gateway_with(&sim, |c| c.cache.missing_ttl = Duration::ZERO).await;
    for _ in 0..3 {
        let r = get(&gw.status_url("missing-off")).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND);
        assert_eq!(r.header("x-cache"), "MISS");
    }
    assert_eq!(status_requests(&sim).await, 3);
}

/// After the token changes to another HubSpot account, neither the stale answer nor the
/// remembered 404 of the old account is served: the failure is the caller's answer, and the
/// missing id is asked again.
#[tokio::test]
async fn another_hub_never_gets_stale_or_remembered_404() {
    // Tokens live 4 s, so the next token (of the new hub) comes within about 2 s.
    let sim = sim(Duration::from_secs(4)).await;
    let gw = gateway_with(&sim, |c| c.cache.stale_if_error = Duration::from_secs(300)).await;
    let (pending, missing) = (gw.status_url("pending-hub"), gw.status_url("missing-hub"));
    assert_eq!(get(&pending).await.status, StatusCode::OK);
    assert_eq!(get(&missing).await.header("x-cache"), "MISS");
    assert_eq!(get(&missing).await.header("x-cache"), "HIT");
    faults(&sim, json!({ "fail_rate": 1.0, "fail_status": 503 })).await;
    assert_eq!(get(&pending).await.header("x-cache"), "STALE");
    faults(&sim, json!({ "fail_rate": 0.0, "hub_id": 99_000_001u64 })).await;
    wait_for(
        || async { metric(&gw, "hubspot_gateway_cache_entries").await == Some(0.0) },
        "the next token (of the new hub) empties the cache",
    )
    .await;
    faults(&sim, json!({ "fail_rate": 1.0 })).await;
    let failed = get(&pending).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.header("x-cache"), "MISS");
    faults(&sim, json!({ "fail_rate": 0.0 })).await;
    let calls = status_requests(&sim).await;
    let asked = get(&missing).await;
    assert_eq!(asked.status, StatusCode::NOT_FOUND);
    assert_eq!(asked.header("x-cache"), "MISS");
    assert_eq!(status_requests(&sim).await, calls + 1);
}

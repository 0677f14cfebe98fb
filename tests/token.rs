//! The HubSpot credential under stress and failure: single-flight refresh, backoff,
//! verification, forced refreshes, rotation, static tokens and secrets kept out of sight.
//! Each test runs the simulator and a gateway on loopback and injects faults at run time.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use hubspot_files_gateway::config::{Credentials, OauthApi};
use hubspot_files_gateway::secret::Secret;
use hubspot_sim::{RunningSimulator, SimConfig};
use hyper::{Method, StatusCode};
use serde_json::json;
use support::*;

/// A simulator issuing tokens of `ttl` seconds, without a rate limit (tests poll a lot).
async fn sim_with_ttl(ttl: u64) -> RunningSimulator {
    simulator(SimConfig {
        token_ttl: Duration::from_secs(ttl),
        rate_limit: None,
        ..SimConfig::default()
    })
    .await
}

/// A simulator issuing tokens of 4 s (refreshed about every 2 s) for the configured refresh
/// token only, without a rate limit: for the rotation tests, which turn rotation on.
async fn sim_for_rotation() -> RunningSimulator {
    simulator(SimConfig {
        token_ttl: Duration::from_secs(4),
        rate_limit: None,
        refresh_token: Some("test-refresh-token-SECRET".into()),
        ..SimConfig::default()
    })
    .await
}

/// A counter of `GET /__sim/stats`.
async fn count(sim: &RunningSimulator, name: &str) -> u64 {
    stats(sim).await[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// `/readyz` as status and JSON body.
async fn readyz(gw: &TestGateway) -> (StatusCode, serde_json::Value) {
    let r = send(Method::GET, &gw.admin_url("/readyz"), &[]).await;
    (r.status, r.json())
}

/// A simulator that accepts the private-app token `pat-na1-OLD-0001` (more are added with
/// the `add_static_token` fault), without a rate limit.
async fn static_simulator() -> RunningSimulator {
    simulator(SimConfig {
        static_token: Some("pat-na1-OLD-0001".into()),
        rate_limit: None,
        ..SimConfig::default()
    })
    .await
}

/// The bearer tokens HubSpot's status route received, oldest first.
async fn bearers(sim: &RunningSimulator) -> Vec<String> {
    let seen = sim_requests(sim).await;
    seen.iter()
        .filter_map(|r| r["headers"]["authorization"].as_str())
        .map(|a| a.trim_start_matches("Bearer ").to_owned())
        .collect()
}

/// The bearer token of the latest status request HubSpot received.
async fn last_bearer(sim: &RunningSimulator) -> String {
    bearers(sim).await.pop().expect("a status request")
}

/// Static-mode credentials reading `file`, which holds `initial` now.
fn static_credentials(file: &Path, initial: &str) -> Credentials {
    Credentials::Static {
        token: Secret::new(initial),
        file: Some(file.to_owned()),
    }
}

/// 500 callers at the moment of a refresh: one token request, and every caller is answered
/// with the still-valid token without waiting for the (slow) refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_at_the_refresh_moment_cause_one_token_request() {
    // A 30 s token is refreshed 13.5–15 s after it was fetched; each OAuth call (token, then
    // introspection) takes 3 s, so the refresh is in flight for 6 s while the old token
    // stays usable until 25 s: the 500 callers (on connections opened beforehand, each
    // needing its own HubSpot call) have seconds, not milliseconds, to be answered before
    // the refresh completes, and the old token cannot run out under them.
    let sim = sim_with_ttl(30).await;
    faults(&sim, json!({ "token_latency_ms": 3000 })).await;
    let mut cfg = config(&sim.base_url());
    // The warm-up may open connections it never uses; the head deadline (10 s by default)
    // would close them while they wait in the pool for the refresh, racing their reuse.
    cfg.server.header_read_timeout = Duration::from_secs(60);
    // The 500 status calls are exact only if no try is cut at its deadline (half the request
    // timeout) and retried: under load some took longer than 2.5 s (531 calls seen).
    cfg.upstream.request_timeout = Duration::from_secs(30);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(count(&sim, "token_requests").await, 1);
    let callers = warmed_client(&gw, 500).await;
    wait_for_up_to(
        Duration::from_secs(30),
        || async { count(&sim, "token_requests").await == 2 },
        "the proactive refresh reaches the token endpoint",
    )
    .await;
    let refresh_seen = Instant::now();
    let urls = (0..500)
        .map(|i| gw.status_url(&format!("pending-{i}")))
        .collect();
    for r in get_all_with(callers, urls).await {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    let answered_in = refresh_seen.elapsed();
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_token_refreshes_total{result="success"}"#
        )
        .await,
        Some(1.0),
        "all 500 were answered while the refresh was still in flight ({answered_in:?}): nobody waited for it"
    );
    wait_for(
        || async {
            metric(
                &gw,
                r#"hubspot_gateway_token_refreshes_total{result="success"}"#,
            )
            .await
                == Some(2.0)
        },
        "the refresh completes",
    )
    .await;
    assert_eq!(
        count(&sim, "token_requests").await,
        2,
        "one token request for the refresh, whatever the load"
    );
    assert_eq!(count(&sim, "unauthorized").await, 0);
    assert_eq!(count(&sim, "status_requests").await, 500);
}

/// Token endpoint down for twice the token's lifetime, then back: no answer is ever made with
/// an expired token (HubSpot never says 401), callers get 200 then 503 TOKEN_UNAVAILABLE,
/// cached answers keep being served, /readyz follows, refreshes back off, and service resumes
/// within one (capped) backoff step.
#[tokio::test]
async fn token_endpoint_down_for_twice_the_lifetime_then_back() {
    let sim = sim_with_ttl(4).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("complete-kept")).await.status,
        StatusCode::OK
    );
    faults(&sim, json!({ "token_down": true })).await;
    let down_at = Instant::now();
    let tokens_before = count(&sim, "token_requests").await;
    let (mut served, mut refused, mut not_ready) = (0, 0, false);
    while down_at.elapsed() < Duration::from_secs(8) {
        let r = get(&gw.status_url("pending-down")).await;
        match r.status {
            StatusCode::OK => {
                assert_eq!(refused, 0, "served again after the token expired");
                served += 1;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.json()["category"], "TOKEN_UNAVAILABLE");
                refused += 1;
                let (ready, body) = readyz(&gw).await;
                assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE, "{body}");
                not_ready = true;
            }
            other => panic!("unexpected {other}: {:?}", r.body),
        }
        let cached = get(&gw.status_url("complete-kept")).await;
        assert_eq!(cached.status, StatusCode::OK);
        assert_eq!(
            cached.header("x-cache"),
            "HIT",
            "cached answers survive the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served > 0, "the old token served while still valid");
    assert!(
        refused > 0 && not_ready,
        "expiry without replacement is visible"
    );
    assert_eq!(
        count(&sim, "unauthorized").await,
        0,
        "no request ever went out with an expired token"
    );
    let attempts = count(&sim, "token_requests").await - tokens_before;
    // First failure ~2 s after the outage began, then 0.5 s, then 1 s steps (the cap for a
    // 4 s token, ±20 %): 6–9 attempts. An uncapped doubling makes at most 5; a loop, hundreds.
    assert!(
        (6..=12).contains(&attempts),
        "retried with capped backoff, not in a loop: {attempts} token requests in 8 s"
    );
    assert!(
        metric(
            &gw,
            r#"hubspot_gateway_token_refreshes_total{result="failure"}"#
        )
        .await
        .is_some_and(|f| f >= 4.0)
    );
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(0.0)
    );

    let failures = metric(
        &gw,
        r#"hubspot_gateway_token_refreshes_total{result="failure"}"#,
    )
    .await
    .expect("failures counted");
    faults(&sim, json!({ "token_down": false })).await;
    let back_at = Instant::now();
    wait_ready(&gw).await;
    let recovery = back_at.elapsed();
    // The next attempt succeeds (or the one after, if an attempt was under way as the
    // endpoint came back): the backoff stayed capped, it did not grow into a long wait.
    let failed_since = metric(
        &gw,
        r#"hubspot_gateway_token_refreshes_total{result="failure"}"#,
    )
    .await
    .expect("failures counted")
        - failures;
    assert!(
        failed_since <= 1.0,
        "{failed_since} more failures after the endpoint came back"
    );
    // The backoff of a 4 s token is capped at 1 s (±20 % jitter), plus two OAuth calls;
    // an uncapped doubling would be past 30 s by now.
    assert!(
        recovery < Duration::from_secs(6),
        "recovered after {recovery:?}"
    );
    assert_eq!(
        get(&gw.status_url("pending-down")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(1.0)
    );
}

/// Starts a gateway while the token endpoint has `fault`, and checks it is a failure retried
/// with backoff: /readyz 503 naming `reason`, callers 503 TOKEN_UNAVAILABLE, nothing sent to
/// the status route, a few attempts rather than a loop, and recovery once the fault is gone.
async fn token_failure_is_retried_with_backoff(
    fault: serde_json::Value,
    request_timeout: Duration,
    reason: &str,
) {
    let sim = sim_with_ttl(1800).await;
    faults(&sim, fault).await;
    let mut cfg = config(&sim.base_url());
    cfg.upstream.request_timeout = request_timeout;
    let started = Instant::now();
    let gw = gateway(cfg, oauth()).await;
    wait_for(
        || async {
            metric(
                &gw,
                r#"hubspot_gateway_token_refreshes_total{result="failure"}"#,
            )
            .await
                >= Some(2.0)
        },
        "two failed attempts",
    )
    .await;
    let (ready, body) = readyz(&gw).await;
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["reason"].as_str().is_some_and(|r| r.contains(reason)),
        "{body}"
    );
    let r = get(&gw.status_url("complete-x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["category"], "TOKEN_UNAVAILABLE");
    assert_eq!(count(&sim, "status_requests").await, 0);
    assert_eq!(
        count(&sim, "introspect_requests").await,
        0,
        "nothing to verify"
    );
    // Attempts at about 0, 0.5, 1.5, 3.5 s (each ±20 %, plus the timeout when slow).
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    let attempts = count(&sim, "token_requests").await;
    let window = started.elapsed();
    // Backoff starts at 0.5 s - 20 % and doubles; however long the window took on a busy
    // machine, no more attempts than that schedule allows (2–4 in 3 s).
    let most = max_attempts_with_backoff(window, Duration::from_millis(400));
    assert!(
        (2..=most).contains(&attempts),
        "{attempts} attempts in {window:?} (at most {most} with backoff)"
    );
    faults(
        &sim,
        json!({ "token_status": null, "token_latency_ms": 0, "token_garbage": false }),
    )
    .await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("complete-x")).await.status,
        StatusCode::OK
    );
}

/// The token endpoint answering 500 is a failure with backoff.
#[tokio::test]
async fn token_endpoint_500_is_retried_with_backoff() {
    token_failure_is_retried_with_backoff(
        json!({ "token_status": 500 }),
        Duration::from_secs(5),
        "answered 500",
    )
    .await;
}

/// A token endpoint slower than the request timeout is a failure with backoff.
#[tokio::test]
async fn token_endpoint_beyond_the_timeout_is_retried_with_backoff() {
    token_failure_is_retried_with_backoff(
        json!({ "token_latency_ms": 1500 }),
        Duration::from_millis(700),
        "could not be reached",
    )
    .await;
}

/// A token endpoint answering 200 with a body that is not JSON is a failure with backoff.
#[tokio::test]
async fn token_endpoint_garbage_is_retried_with_backoff() {
    token_failure_is_retried_with_backoff(
        json!({ "token_garbage": true }),
        Duration::from_secs(5),
        "not the expected JSON",
    )
    .await;
}

/// Introspection saying `active: false` (scopes intact): the token is never injected.
#[tokio::test]
async fn inactive_token_is_never_injected() {
    let sim = sim_with_ttl(1800).await;
    faults(&sim, json!({ "introspect_inactive": true })).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_for(
        || async { count(&sim, "introspect_requests").await >= 1 },
        "introspection asked",
    )
    .await;
    let (ready, body) = readyz(&gw).await;
    assert_eq!(ready, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        body["reason"]
            .as_str()
            .is_some_and(|r| r.contains("not active")),
        "{body}"
    );
    let r = get(&gw.status_url("complete-x")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["category"], "TOKEN_UNAVAILABLE");
    assert_eq!(count(&sim, "status_requests").await, 0);
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(0.0)
    );
}

/// The account loses a scope: the refreshed token lacking it is never sent (HubSpot never
/// answers 403); the old token serves until it expires, then callers get 503 MISSING_SCOPES.
#[tokio::test]
async fn refreshed_token_missing_a_scope_is_never_injected() {
    let sim = sim_with_ttl(4).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    faults(&sim, json!({ "scopes": ["files"] })).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let missing = loop {
        let r = get(&gw.status_url("pending-scopes")).await;
        match r.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => break Some(r.json()),
            other => panic!("unexpected {other}: {:?}", r.body),
        }
        assert!(Instant::now() < deadline, "the old token never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let body = missing.expect("a 503");
    assert_eq!(body["category"], "MISSING_SCOPES");
    assert_eq!(
        body["context"]["missingScopes"],
        json!(["files.ui_hidden.read"])
    );
    assert_eq!(
        count(&sim, "forbidden").await,
        0,
        "the unverified token never left"
    );
    assert_eq!(count(&sim, "unauthorized").await, 0);
    assert_eq!(readyz(&gw).await.0, StatusCode::SERVICE_UNAVAILABLE);
}

/// A token of another hub empties the cache: a cached COMPLETE answer is asked again.
#[tokio::test]
async fn hub_change_empties_the_cache() {
    let sim = sim_with_ttl(4).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("complete-hub")).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        get(&gw.status_url("complete-hub")).await.header("x-cache"),
        "HIT"
    );
    faults(&sim, json!({ "hub_id": 99_000_001u64 })).await;
    wait_for(
        || async { metric(&gw, "hubspot_gateway_cache_entries").await == Some(0.0) },
        "the next token (of the new hub) empties the cache",
    )
    .await;
    let r = get(&gw.status_url("complete-hub")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.header("x-cache"),
        "MISS",
        "asked again after the hub changed"
    );
    assert_eq!(count(&sim, "status_requests").await, 2);
}

/// HubSpot answers 401 to a token that looks valid (all tokens revoked): 500 concurrent
/// callers cause one forced refresh and one retry each, and all get 200. A second 401 within
/// 30 s does not loop: one try, no retry, and the caller gets 503 TOKEN_UNAVAILABLE (the
/// gateway's credential failed, not the caller's key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_forces_one_refresh_and_one_retry() {
    let sim = sim_with_ttl(1800).await;
    let mut cfg = config(&sim.base_url());
    // The count below is exact only if no try is cut by its deadline (half the request
    // timeout) and retried: 500 calls at once on a loaded machine took longer than 2.5 s.
    cfg.upstream.request_timeout = Duration::from_secs(30);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("pending-a")).await.status,
        StatusCode::OK
    );
    faults(&sim, json!({ "revoke_all": true })).await;
    let urls = (0..500)
        .map(|i| gw.status_url(&format!("pending-{i}")))
        .collect();
    for r in get_all(urls).await {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    }
    assert_eq!(count(&sim, "token_requests").await, 2, "one forced refresh");
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_token_forced_refreshes_total{reason="upstream_401"}"#
        )
        .await,
        Some(1.0)
    );
    let first_401s = count(&sim, "unauthorized").await;
    assert!((1..=500).contains(&first_401s), "{first_401s}");
    assert_eq!(count(&sim, "status_requests").await, 1 + 500 + first_401s);

    // Revoked again at once: the forced refresh is spent for 30 s, so no loop.
    faults(&sim, json!({ "revoke_all": true })).await;
    let before = count(&sim, "status_requests").await;
    let r = get(&gw.status_url("pending-loop")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", r.body);
    assert_eq!(r.json()["category"], "TOKEN_UNAVAILABLE");
    assert_eq!(
        count(&sim, "status_requests").await,
        before + 1,
        "no retry loop"
    );
    assert_eq!(count(&sim, "token_requests").await, 2);
}

/// HubSpot answers 403 MISSING_SCOPES to a verified token: the token is verified again
/// (counted). If it passes, it stays in service; if HubSpot now calls it inactive, it is
/// withdrawn and nothing more is forwarded until a token passes.
#[tokio::test]
async fn upstream_403_missing_scopes_reverifies_the_token() {
    let sim = sim_with_ttl(1800).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    faults(
        &sim,
        json!({ "status_override": { "status": 403, "count": 1 } }),
    )
    .await;
    let r = get(&gw.status_url("pending-a")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["category"], "MISSING_SCOPES");
    wait_for(
        || async { count(&sim, "introspect_requests").await == 2 },
        "re-verification",
    )
    .await;
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_token_forced_refreshes_total{reason="upstream_403"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        get(&gw.status_url("pending-a")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        count(&sim, "token_requests").await,
        1,
        "a token that passed is kept"
    );
    assert_eq!(readyz(&gw).await.0, StatusCode::OK);

    // Now HubSpot disowns the token: the next 403 withdraws it. (A second 403 within 30 s
    // would not re-verify, so use a fresh gateway.)
    let gw2 = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw2).await;
    faults(
        &sim,
        json!({ "introspect_inactive": true, "status_override": { "status": 403, "count": 1 } }),
    )
    .await;
    assert_eq!(
        get(&gw2.status_url("pending-b")).await.status,
        StatusCode::FORBIDDEN
    );
    wait_for(
        || async { readyz(&gw2).await.0 == StatusCode::SERVICE_UNAVAILABLE },
        "token withdrawn",
    )
    .await;
    let before = count(&sim, "status_requests").await;
    let r = get(&gw2.status_url("pending-b")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["category"], "TOKEN_UNAVAILABLE");
    assert_eq!(
        count(&sim, "status_requests").await,
        before,
        "nothing forwarded"
    );
    assert_eq!(
        metric(&gw2, "hubspot_gateway_token_scopes_verified").await,
        Some(0.0)
    );
    faults(&sim, json!({ "introspect_inactive": false })).await;
    wait_ready(&gw2).await;
    assert_eq!(
        get(&gw2.status_url("pending-b")).await.status,
        StatusCode::OK
    );
}

/// HubSpot rotates the refresh token on every grant and retires the presented one: the
/// gateway keeps refreshing, so it used each new refresh token.
#[tokio::test]
async fn rotated_refresh_token_is_used_for_the_next_refresh() {
    let sim = sim_for_rotation().await;
    faults(&sim, json!({ "rotate_refresh_token": true })).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    wait_for(
        || async {
            metric(
                &gw,
                r#"hubspot_gateway_token_refreshes_total{result="success"}"#,
            )
            .await
                >= Some(3.0)
        },
        "two refreshes after the first token",
    )
    .await;
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_token_refreshes_total{result="failure"}"#
        )
        .await,
        Some(0.0),
        "no refresh was refused"
    );
    // The configured refresh token was retired by the first rotation.
    let client = client();
    let req = hyper::Request::post(format!("{}/oauth/v3/token", sim.base_url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            "grant_type=refresh_token&client_id=test-client-id&client_secret=x&refresh_token=test-refresh-token-SECRET",
        )))
        .expect("request");
    let status = client.request(req).await.expect("answered").status();
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "the old refresh token is dead"
    );
    assert_eq!(
        get(&gw.status_url("pending-r")).await.status,
        StatusCode::OK
    );
}

/// `token.api = "v1"`: the deprecated grant and token-info endpoints are used instead.
#[tokio::test]
async fn v1_endpoints_serve_unmigrated_accounts() {
    let sim = sim_with_ttl(1800).await;
    let mut cfg = config(&sim.base_url());
    cfg.token.api = OauthApi::V1;
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("complete-v1")).await.status,
        StatusCode::OK
    );
    assert_eq!(count(&sim, "access_token_info_requests").await, 1);
    assert_eq!(count(&sim, "introspect_requests").await, 0);
}

/// A static token file replaced in place: the new token is verified and used.
#[tokio::test]
async fn static_token_replaced_in_place() {
    let sim = static_simulator().await;
    faults(
        &sim,
        json!({ "add_static_token": { "token": "pat-na1-NEW-0002" } }),
    )
    .await;
    let dir = temp_dir("in-place");
    let file = dir.join("static_token");
    std::fs::write(&file, "pat-na1-OLD-0001\n").expect("write");
    let gw = gateway(
        config(&sim.base_url()),
        static_credentials(&file, "pat-na1-OLD-0001"),
    )
    .await;
    wait_ready(&gw).await;
    get(&gw.status_url("pending-s")).await;
    assert_eq!(last_bearer(&sim).await, "pat-na1-OLD-0001");
    std::fs::write(&file, "pat-na1-NEW-0002\n").expect("rewrite");
    wait_for(
        || async {
            get(&gw.status_url("pending-s")).await;
            last_bearer(&sim).await == "pat-na1-NEW-0002"
        },
        "the replacement in service",
    )
    .await;
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_rotation_failed").await,
        Some(0.0)
    );
    assert_eq!(readyz(&gw).await.1, json!({ "ready": true }));
    assert_eq!(count(&sim, "unauthorized").await, 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// A static token mounted the Kubernetes way (`static_token` → `..data/static_token`,
/// `..data` → a timestamped dir) and rotated by atomically swapping the `..data` symlink.
#[cfg(unix)]
#[tokio::test]
async fn static_token_replaced_by_symlink_swap() {
    use std::os::unix::fs::symlink;
    let sim = static_simulator().await;
    faults(
        &sim,
        json!({ "add_static_token": { "token": "pat-na1-NEW-0002" } }),
    )
    .await;
    let dir = temp_dir("symlink");
    let first = dir.join("..2026_01_01_00_00_00.1");
    std::fs::create_dir(&first).expect("dir");
    std::fs::write(first.join("static_token"), "pat-na1-OLD-0001").expect("write");
    symlink("..2026_01_01_00_00_00.1", dir.join("..data")).expect("..data");
    symlink("..data/static_token", dir.join("static_token")).expect("link");
    let file = dir.join("static_token");
    let gw = gateway(
        config(&sim.base_url()),
        static_credentials(&file, "pat-na1-OLD-0001"),
    )
    .await;
    wait_ready(&gw).await;
    get(&gw.status_url("pending-k")).await;
    assert_eq!(last_bearer(&sim).await, "pat-na1-OLD-0001");
    // What the kubelet does: new dir, new symlink, rename over `..data`, old dir removed.
    let second = dir.join("..2026_01_01_00_01_00.2");
    std::fs::create_dir(&second).expect("dir");
    std::fs::write(second.join("static_token"), "pat-na1-NEW-0002").expect("write");
    symlink("..2026_01_01_00_01_00.2", dir.join("..data_tmp")).expect("tmp link");
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).expect("atomic swap");
    std::fs::remove_dir_all(&first).expect("old dir removed");
    wait_for(
        || async {
            get(&gw.status_url("pending-k")).await;
            last_bearer(&sim).await == "pat-na1-NEW-0002"
        },
        "the swapped token in service",
    )
    .await;
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_rotation_failed").await,
        Some(0.0)
    );
    assert_eq!(count(&sim, "unauthorized").await, 0);
    let _ = std::fs::remove_dir_all(dir);
}

/// A static token replaced by one lacking a scope: it is never used, the last verified token
/// keeps serving, /readyz stays 200 but names the problem, the rotation gauge says 1, the bad
/// token is re-checked with backoff (not every poll); a good file fixes it.
#[tokio::test]
async fn static_token_replaced_by_one_lacking_scopes_is_not_used() {
    let sim = static_simulator().await;
    faults(
        &sim,
        json!({ "add_static_token": { "token": "pat-na1-WEAK-0003", "scopes": ["files"] } }),
    )
    .await;
    faults(
        &sim,
        json!({ "add_static_token": { "token": "pat-na1-GOOD-0004" } }),
    )
    .await;
    let dir = temp_dir("weak");
    let file = dir.join("static_token");
    std::fs::write(&file, "pat-na1-OLD-0001").expect("write");
    let gw = gateway(
        config(&sim.base_url()),
        static_credentials(&file, "pat-na1-OLD-0001"),
    )
    .await;
    wait_ready(&gw).await;
    std::fs::write(&file, "pat-na1-WEAK-0003").expect("rewrite");
    wait_for(
        || async { metric(&gw, "hubspot_gateway_token_rotation_failed").await == Some(1.0) },
        "rotation failure reported",
    )
    .await;
    let checks_at_failure = count(&sim, "private_app_info_requests").await;
    let (ready, body) = readyz(&gw).await;
    assert_eq!(
        ready,
        StatusCode::OK,
        "the verified token still serves: {body}"
    );
    assert!(
        body["token_problem"]
            .as_str()
            .is_some_and(|p| p.contains("scopes")),
        "{body}"
    );
    let failed_at = Instant::now();
    for _ in 0..5 {
        let r = get(&gw.status_url("pending-w")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(last_bearer(&sim).await, "pat-na1-OLD-0001");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(1.0)
    );
    let rechecks = count(&sim, "private_app_info_requests").await - checks_at_failure;
    let window = failed_at.elapsed();
    // Re-checks back off from 0.5 s - 20 %, doubling: at most 2 in the ~1.5 s the polls take
    // (a re-check at every one-second file poll would make more once the window grows).
    let most = max_attempts_with_backoff(window, Duration::from_millis(400)) - 1;
    assert!(
        rechecks <= most,
        "{rechecks} re-checks of the same bad token in {window:?} (at most {most})"
    );
    assert!(!bearers(&sim).await.iter().any(|b| b.contains("WEAK")));
    std::fs::write(&file, "pat-na1-GOOD-0004").expect("fix");
    wait_for(
        || async { metric(&gw, "hubspot_gateway_token_rotation_failed").await == Some(0.0) },
        "rotation succeeds",
    )
    .await;
    assert_eq!(readyz(&gw).await.1, json!({ "ready": true }));
    get(&gw.status_url("pending-w")).await;
    assert_eq!(last_bearer(&sim).await, "pat-na1-GOOD-0004");
    let _ = std::fs::remove_dir_all(dir);
}

/// The binary at log level trace through a full scenario (requests, a bad key, a forced 401
/// refresh, a 403 re-verification, a token-endpoint outage, rotated refresh tokens): no
/// client secret, refresh token (configured or rotated), access token or API key appears in
/// its logs, its metrics or any body it answered; the refresh log line says hub, scopes and
/// expiry. Run twice: text lines, then JSON lines with an access line for every request.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_metrics_or_bodies_at_trace_level() {
    secrets_stay_out(LogFormat::Text).await;
    secrets_stay_out(LogFormat::Json).await;
}

/// The `[log] format` a run of the secrets scenario uses.
#[cfg(unix)]
#[derive(Clone, Copy, PartialEq)]
enum LogFormat {
    Text,
    Json,
}

/// The scenario of [`no_secret_reaches_logs_metrics_or_bodies_at_trace_level`] in one log
/// format.
#[cfg(unix)]
async fn secrets_stay_out(format: LogFormat) {
    const CLIENT_SECRET: &str = "cs-MARKER-4b1d0c2e9f";
    const REFRESH_TOKEN: &str = "rt-MARKER-8e77a1c3d5";
    let sim = simulator(SimConfig {
        token_ttl: Duration::from_secs(4),
        rate_limit: None,
        client_secret: Some(CLIENT_SECRET.into()),
        refresh_token: Some(REFRESH_TOKEN.into()),
        ..SimConfig::default()
    })
    .await;
    faults(&sim, json!({ "rotate_refresh_token": true })).await;
    let dir = temp_dir("trace");
    for (name, value) in [
        ("client_id", "cid-plain"),
        ("client_secret", CLIENT_SECRET),
        ("refresh_token", REFRESH_TOKEN),
    ] {
        std::fs::write(dir.join(name), format!("{value}\n")).expect("secret file");
    }
    let config = dir.join("gateway.toml");
    let token = format!(
        r#"client_id_file = "{d}/client_id"
client_secret_file = "{d}/client_secret"
refresh_token_file = "{d}/refresh_token""#,
        d = dir.display()
    );
    let log_section = match format {
        LogFormat::Text => "",
        LogFormat::Json => "[log]\nformat = \"json\"\naccess = \"all\"\n",
    };
    let text = config_toml(&sim.base_url(), &token) + log_section;
    std::fs::write(&config, text).expect("config");
    let log = dir.join("gateway.log");
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", "trace")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("gateway starts");
    let (service, admin) = listen_addrs(&log).await;
    let url = |task: &str| {
        format!("http://{service}/files/v3/files/import-from-url/async/tasks/{task}/status")
    };
    let admin_url = |path: &str| format!("http://{admin}{path}");
    let mut bodies: Vec<bytes::Bytes> = Vec::new();
    let ready =
        || async { send(Method::GET, &admin_url("/readyz"), &[]).await.status == StatusCode::OK };
    wait_for(ready, "ready").await;

    for task in ["complete-t", "complete-t", "pending-t"] {
        let r = get(&url(task)).await;
        assert_eq!(r.status, StatusCode::OK);
        bodies.push(r.body);
    }
    let r = send(
        Method::GET,
        &url("pending-t"),
        &[("authorization", "Bearer not-a-key")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    bodies.push(r.body);
    // A forced refresh: HubSpot revokes every token.
    faults(&sim, json!({ "revoke_all": true })).await;
    let r = get(&url("pending-401")).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
    bodies.push(r.body);
    // A re-verification.
    faults(
        &sim,
        json!({ "status_override": { "status": 403, "count": 1 } }),
    )
    .await;
    let r = get(&url("pending-403")).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    bodies.push(r.body);
    // The token endpoint fails until the token expires.
    faults(&sim, json!({ "token_down": true })).await;
    wait_for(
        || async {
            let r = get(&url("pending-down")).await;
            r.status == StatusCode::SERVICE_UNAVAILABLE
        },
        "the token expires",
    )
    .await;
    let r = get(&url("pending-down")).await;
    bodies.push(r.body);
    bodies.push(send(Method::GET, &admin_url("/readyz"), &[]).await.body);
    faults(&sim, json!({ "token_down": false })).await;
    wait_for(ready, "ready again").await;
    let r = get(&url("pending-back")).await;
    assert_eq!(r.status, StatusCode::OK);
    bodies.push(r.body);
    bodies.push(send(Method::GET, &admin_url("/readyz"), &[]).await.body);
    bodies.push(send(Method::GET, &admin_url("/healthz"), &[]).await.body);
    let metrics = send(Method::GET, &admin_url("/metrics"), &[]).await.body;
    let metrics = String::from_utf8_lossy(&metrics).into_owned();
    assert!(
        metrics
            .contains(r#"hubspot_gateway_token_forced_refreshes_total{reason="upstream_401"} 1"#)
    );
    assert!(
        metrics
            .contains(r#"hubspot_gateway_token_forced_refreshes_total{reason="upstream_403"} 1"#)
    );
    bodies.push(metrics.into());

    kill(&child, "TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("join")
        .expect("wait");
    assert!(exit.success(), "{exit:?}");
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(text.contains("TRACE"), "the log is at trace level");
    let refresh_line = text
        .lines()
        .find(|l| l.contains("HubSpot token verified and in service"))
        .expect("a refresh log line");
    let fields = match format {
        LogFormat::Text => [
            "hub_id=21557345",
            "scopes=files,files.ui_hidden.read",
            "expires_in_s=4",
        ],
        LogFormat::Json => [
            r#""hub_id":21557345"#,
            r#""scopes":"files,files.ui_hidden.read""#,
            r#""expires_in_s":4"#,
        ],
    };
    for field in fields {
        assert!(refresh_line.contains(field), "{refresh_line}");
    }
    if format == LogFormat::Json {
        for line in text.lines() {
            let parsed = serde_json::from_str::<serde_json::Value>(line);
            assert!(parsed.is_ok(), "a line that is not JSON: {line}");
        }
        let access = text.lines().filter(|l| l.contains(r#""target":"access""#));
        assert!(
            access.count() >= bodies.len() - 4,
            "an access line per request"
        );
    }
    assert!(text.contains("forcing a token refresh"));
    assert!(text.contains("HubSpot token refresh failed"));

    let mut secrets: Vec<String> = vec![CLIENT_SECRET.into(), REFRESH_TOKEN.into(), KEY.into()];
    let access: std::collections::BTreeSet<String> = bearers(&sim).await.into_iter().collect();
    assert!(
        access.len() >= 2,
        "a refreshed token was used: {}",
        access.len()
    );
    secrets.extend(access);
    // Rotated refresh tokens are `na1-<uuid>`; none was ever known to this test, so look for
    // the shape.
    secrets.push("na1-".into());
    let mut places: Vec<(String, String)> = vec![("log".into(), text)];
    for (i, body) in bodies.iter().enumerate() {
        places.push((
            format!("body {i}"),
            String::from_utf8_lossy(body).into_owned(),
        ));
    }
    for (place, content) in &places {
        for secret in &secrets {
            assert!(
                !content.contains(secret.as_str()),
                "a secret ({} chars, starting {:?}) appears in the {place}",
                secret.len(),
                &secret[..4]
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// HubSpot answering refreshes with a new refresh token: the binary counts every rotation
/// (`token_refresh_token_rotated_total`, 0 before the first), says so once at warn however
/// many follow, and never prints a refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_token_rotation_is_counted_and_warned_once() {
    let sim = sim_for_rotation().await;
    let dir = temp_dir("rotation-warning");
    let config = dir.join("gateway.toml");
    let token = "client_id_env = \"T_CLIENT_ID\"\nclient_secret_env = \"T_CLIENT_SECRET\"\nrefresh_token_env = \"T_REFRESH_TOKEN\"";
    std::fs::write(&config, config_toml(&sim.base_url(), token)).expect("config");
    let mut gw = spawn_serve(std::process::Command::new(BIN), &config);
    let rotated = "hubspot_gateway_token_refresh_token_rotated_total";
    wait_for(
        || async { metric_at(&gw.admin, rotated).await == Some(0.0) },
        "the rotation counter at 0 from start",
    )
    .await;
    faults(&sim, json!({ "rotate_refresh_token": true })).await;
    // Tokens of 4 s are refreshed about every 2 s: two rotations within 15 s.
    wait_for_up_to(
        Duration::from_secs(15),
        || async { metric_at(&gw.admin, rotated).await >= Some(2.0) },
        "two rotations",
    )
    .await;
    let _ = gw.child.kill();
    let _ = gw.child.wait();
    let lines: Vec<String> = gw.log.try_iter().collect();
    let warned: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("new refresh token"))
        .collect();
    assert_eq!(warned.len(), 1, "{lines:#?}");
    assert!(warned[0].contains("share one refresher"), "{}", warned[0]);
    assert!(
        lines
            .iter()
            .all(|l| !l.contains("SECRET") && !l.contains("na1-")),
        "a refresh token was printed: {lines:#?}"
    );
}

//! The outbound budget as callers see it: per-client shares (a refusal only for its own
//! client), a window that HubSpot's own never refuses, the `RateLimit-*` headers of every
//! 429 the gateway makes or passes on, and the per-client metrics (a real gateway on
//! loopback in front of the HubSpot simulator).

mod support;

use std::time::Duration;

use hubspot_files_gateway::auth::hash_key;
use hubspot_files_gateway::config::ClientConfig;
use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use serde_json::json;
use support::*;

/// The API key of the client with a share.
const GREEDY_KEY: &str = "greedy-key-9876543210";

/// A gateway allowing `limit` HubSpot calls a minute (long enough that no call leaves the
/// window during a test, however slow the machine), with client `tests` (no share) and
/// client `greedy` (`share = 0.5`).
async fn start_shared(limit: u32) -> (hubspot_sim::RunningSimulator, TestGateway) {
    start_with(SimConfig::default(), |c| {
        c.upstream.rate_limit.requests = limit;
        c.upstream.rate_limit.per = Duration::from_secs(60);
        c.auth.clients.push(ClientConfig {
            name: "greedy".into(),
            key_sha256: Some(hash_key(GREEDY_KEY)),
            cert_cn: None,
            share: Some(0.5),
        });
    })
    .await
}

/// GET as the greedy client.
async fn get_greedy(url: &str) -> Reply {
    send(
        Method::GET,
        url,
        &[("authorization", &format!("Bearer {GREEDY_KEY}"))],
    )
    .await
}

/// The value of `hubspot_gateway_{family}{label="value"}`.
async fn counter(gw: &TestGateway, family: &str, label: &str, value: &str) -> Option<f64> {
    metric(
        gw,
        &format!(r#"hubspot_gateway_{family}{{{label}="{value}"}}"#),
    )
    .await
}

/// A header as a whole number of seconds or calls, failing when it is not one.
fn number(r: &Reply, name: &str) -> u64 {
    let value = r.header(name);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name} {value:?} is not an integer"))
}

/// A 429 in HubSpot's rate-limit shape with `Retry-After` (1..=`max_wait` s) and the
/// `RateLimit-*` headers of a budget of `limit` calls: none remaining, reset when
/// `Retry-After` says.
fn assert_rate_limited(r: &Reply, limit: u64, max_wait: u64, policy: &str) {
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let body = r.json();
    assert_eq!(body["status"], "error", "{body}");
    assert_eq!(body["category"], "RATE_LIMITS", "{body}");
    assert_eq!(body["errorType"], "RATE_LIMIT", "{body}");
    assert_eq!(body["policyName"], policy, "{body}");
    assert!(body["correlationId"].is_string(), "{body}");
    let wait = number(r, "retry-after");
    assert!((1..=max_wait).contains(&wait), "Retry-After {wait}");
    assert_eq!(number(r, "ratelimit-limit"), limit);
    assert_eq!(number(r, "ratelimit-remaining"), 0);
    assert_eq!(number(r, "ratelimit-reset"), wait);
}

/// Two clients, the greedy one with half of a 10-call budget, hammering distinct tasks: the
/// greedy one gets 5 calls, then 429s naming its share (limit 5) with a valid Retry-After,
/// while the quiet one's calls go through; cache hits cost the greedy one nothing; the sum
/// of HubSpot calls never passes the account's 10, whose own 429 names the account's limit.
#[tokio::test]
async fn a_share_holds_back_its_client_alone() {
    let (sim, gw) = start_shared(10).await;
    // One call caches a finished import; asking for it again is a hit and costs nothing.
    assert_eq!(
        get_greedy(&gw.status_url("complete-g")).await.status,
        StatusCode::OK
    );
    for _ in 0..20 {
        let hit = get_greedy(&gw.status_url("complete-g")).await;
        assert_eq!(hit.status, StatusCode::OK);
        assert_eq!(hit.header("x-cache"), "HIT");
    }
    for i in 0..4 {
        let r = get_greedy(&gw.status_url(&format!("pending-g{i}"))).await;
        assert_eq!(r.status, StatusCode::OK, "greedy call {i} within its share");
    }
    for i in 4..12 {
        let r = get_greedy(&gw.status_url(&format!("pending-g{i}"))).await;
        assert_rate_limited(&r, 5, 60, "TEN_SECONDLY_ROLLING");
        assert!(
            r.json()["message"].as_str().unwrap_or("").contains("share"),
            "the message says it is the caller's share"
        );
    }
    assert_eq!(
        status_requests(&sim).await,
        5,
        "refused calls never reach HubSpot"
    );
    // The quiet client is not held by the greedy one's share.
    for i in 0..5 {
        let r = get(&gw.status_url(&format!("pending-q{i}"))).await;
        assert_eq!(r.status, StatusCode::OK, "quiet call {i}");
    }
    // The account's 10 are spent: now everyone waits, told the account's limit.
    let quiet = get(&gw.status_url("pending-q5")).await;
    assert_rate_limited(&quiet, 10, 60, "TEN_SECONDLY_ROLLING");
    let greedy = get_greedy(&gw.status_url("pending-g12")).await;
    assert_rate_limited(&greedy, 5, 60, "TEN_SECONDLY_ROLLING");
    assert_eq!(
        status_requests(&sim).await,
        10,
        "the sum stays within the limit"
    );
    let expected = [
        ("client_upstream_calls_total", "client", "greedy", 5.0),
        ("client_upstream_calls_total", "client", "tests", 5.0),
        ("client_share_refusals_total", "client", "greedy", 9.0),
        ("client_share_refusals_total", "client", "tests", 0.0),
        ("upstream_throttled_total", "source", "client_share", 9.0),
        ("upstream_throttled_total", "source", "local_budget", 1.0),
    ];
    for (family, label, value, count) in expected {
        let got = counter(&gw, family, label, value).await;
        assert_eq!(got, Some(count), "{family}{{{label}={value}}}");
    }
}

/// Callers coalesced onto one call, and hits, are charged nothing: only the flight's leader
/// pays for the one HubSpot call, so a client with a share of 1 call is never refused by
/// waiting on another's call.
#[tokio::test]
async fn coalesced_callers_are_not_charged() {
    let (sim, gw) = start_shared(2).await;
    // A slow answer, so the greedy caller joins the quiet one's call in flight.
    faults(&sim, json!({ "latency_ms": 2000 })).await;
    let url = gw.status_url("pending-shared");
    let leader = leading(&sim, &url, KEY).await;
    let follower = get_greedy(&url).await;
    assert_eq!(follower.status, StatusCode::OK);
    assert_eq!(follower.header("x-cache"), "COALESCED");
    assert_eq!(leader.await.expect("leader").status, StatusCode::OK);
    faults(&sim, json!({ "latency_ms": 0 })).await;
    // Its one call is still there to spend.
    let own = get_greedy(&gw.status_url("pending-own")).await;
    assert_eq!(own.status, StatusCode::OK);
    assert_one_call_each(&sim, &gw).await;
}

/// Starts a GET of `url` with API key `key` and waits until its call reached HubSpot (the
/// first status request), so that the next caller of `url` joins its flight.
async fn leading(
    sim: &hubspot_sim::RunningSimulator,
    url: &str,
    key: &'static str,
) -> tokio::task::JoinHandle<Reply> {
    let url = url.to_owned();
    let call = tokio::spawn(async move {
        let auth = format!("Bearer {key}");
        send(Method::GET, &url, &[("authorization", &auth)]).await
    });
    wait_for(
        || async { status_requests(sim).await == 1 },
        "the leader's call reached HubSpot",
    )
    .await;
    call
}

/// HubSpot got two calls, one charged to each client.
async fn assert_one_call_each(sim: &hubspot_sim::RunningSimulator, gw: &TestGateway) {
    assert_eq!(status_requests(sim).await, 2);
    for client in ["greedy", "tests"] {
        assert_eq!(
            counter(gw, "client_upstream_calls_total", "client", client).await,
            Some(1.0),
            "{client}"
        );
    }
}

/// HubSpot's own 429, passed on, keeps HubSpot's body and carries the `RateLimit-*` headers
/// of the hold it started (HubSpot's `X-HubSpot-RateLimit-Max` as the limit); callers held
/// after it get the gateway's 429 with the same limit.
#[tokio::test]
async fn hubspot_429_carries_the_holds_headers() {
    let (sim, gw) = start().await;
    faults(
        &sim,
        json!({ "status_override": { "status": 429, "count": 1, "retry_after": 7 } }),
    )
    .await;
    let first = get(&gw.status_url("pending-h")).await;
    let limit = number(&first, "x-hubspot-ratelimit-max");
    assert_rate_limited(&first, limit, 7, "TEN_SECONDLY_ROLLING");
    let held = get(&gw.status_url("pending-h2")).await;
    assert_rate_limited(&held, limit, 7, "TEN_SECONDLY_ROLLING");
    assert_eq!(status_requests(&sim).await, 1);
    // The one call HubSpot refused was caused by `tests`; a hold is not its share.
    for (family, count) in [
        ("client_upstream_calls_total", 1.0),
        ("client_share_refusals_total", 0.0),
    ] {
        let value = counter(&gw, family, "client", "tests").await;
        assert_eq!(value, Some(count), "{family}");
    }
}

/// `upstream.daily_limit` spent: the gateway's own 429 says `DAILY`, the daily quota, and
/// the seconds until midnight UTC; HubSpot is not asked.
#[tokio::test]
async fn the_daily_limit_answers_daily_429s() {
    let (sim, gw) = start_with(SimConfig::default(), |c| c.upstream.daily_limit = Some(2)).await;
    for task in ["pending-d1", "pending-d2"] {
        assert_eq!(get(&gw.status_url(task)).await.status, StatusCode::OK);
    }
    let refused = get(&gw.status_url("pending-d3")).await;
    assert_rate_limited(&refused, 2, 86_400, "DAILY");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    assert!(number(&refused, "retry-after").abs_diff(to_midnight) <= 5);
    assert_eq!(status_requests(&sim).await, 2);
    assert_eq!(
        counter(&gw, "upstream_throttled_total", "source", "daily_limit").await,
        Some(1.0)
    );
}

/// With the gateway's budget equal to HubSpot's (2 calls per 2 s), one call that HubSpot
/// counts 600 ms after the gateway sent it, then a quick one: counted from admission, the
/// slow call would leave the gateway's window while HubSpot still counts it, and the next
/// call would meet HubSpot's own 429. Counted from its answer, HubSpot never refuses; the
/// gateway answers its own 429 meanwhile, and both places come free again.
#[tokio::test]
async fn a_budget_equal_to_hubspots_never_meets_its_429() {
    let per = Duration::from_secs(2);
    let sim = SimConfig {
        rate_limit: Some((2, per)),
        ..SimConfig::default()
    };
    let (sim, gw) = start_with(sim, |c| {
        c.upstream.rate_limit.requests = 2;
        c.upstream.rate_limit.per = per;
    })
    .await;
    faults(&sim, json!({ "latency_ms": 600 })).await;
    let slow = tokio::spawn({
        let url = gw.status_url("pending-slow");
        async move { get(&url).await }
    });
    wait_for(
        || async { status_requests(&sim).await == 1 },
        "the slow call reached HubSpot",
    )
    .await;
    faults(&sim, json!({ "latency_ms": 0 })).await;
    let quick = get(&gw.status_url("pending-quick")).await;
    assert_eq!(quick.status, StatusCode::OK);

    // Past both admissions + per, and past the slow call's answer + per.
    let end = std::time::Instant::now() + Duration::from_millis(3500);
    let mut replies = Vec::new();
    while std::time::Instant::now() < end {
        replies.push(get(&gw.status_url(&format!("pending-poll-{}", replies.len()))).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.await.expect("slow caller").status, StatusCode::OK);
    let stats = stats(&sim).await;
    assert_eq!(stats["rate_limited"], 0, "HubSpot answered 429: {stats}");
    let ok = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert!(ok >= 2, "the window never came free: {ok} answered");
    let refused: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status != StatusCode::OK)
        .collect();
    assert!(!refused.is_empty(), "the budget never refused");
    for r in refused {
        assert_rate_limited(r, 2, 3, "TEN_SECONDLY_ROLLING");
    }
}

/// A share refusal is its own client's only: the greedy client (1 call of a 2-call budget)
/// leads a flight whose first call HubSpot answers 401 after a second, so its retry with a
/// fresh token finds its share spent. The quiet client, which joined that flight meanwhile,
/// is not handed the greedy client's 429: it asks again under its own charge and gets 200.
#[tokio::test]
async fn a_coalesced_caller_never_gets_another_clients_share_refusal() {
    let (sim, gw) = start_shared(2).await;
    faults(&sim, json!({ "latency_ms": 1000, "revoke_all": true })).await;
    let url = gw.status_url("pending-both");
    let greedy = leading(&sim, &url, GREEDY_KEY).await;
    faults(&sim, json!({ "latency_ms": 0 })).await;
    let quiet = get(&url).await;
    let greedy = greedy.await.expect("greedy caller");
    assert_rate_limited(&greedy, 1, 60, "TEN_SECONDLY_ROLLING");
    assert_eq!(quiet.status, StatusCode::OK, "{:?}", quiet.body);
    assert_eq!(quiet.header("x-cache"), "MISS", "its own call");
    // The greedy client's one call (refused with the revoked token), then the quiet one's.
    assert_one_call_each(&sim, &gw).await;
    assert_eq!(
        counter(&gw, "client_share_refusals_total", "client", "greedy").await,
        Some(1.0)
    );
}

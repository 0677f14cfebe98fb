//! Cache and single-flight: one HubSpot call per question, a store bounded by bytes.

mod support;

use std::time::Duration;

use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use support::*;
use tokio::io::AsyncWriteExt;

/// A simulator without HubSpot's rate limit (these tests count calls, not budgets) and with
/// `latency` on every status answer, so concurrent callers overlap.
async fn slow_simulator(latency: Duration) -> hubspot_sim::RunningSimulator {
    simulator(SimConfig {
        latency,
        rate_limit: None,
        ..SimConfig::default()
    })
    .await
}

/// `n` callers ask for `task` at once, on connections opened beforehand (see
/// [`warmed_client`]), so that they all arrive while the first one's call is out; returns
/// every answer.
async fn crowd(gw: &TestGateway, task: &str, n: usize) -> Vec<Reply> {
    let client = warmed_client(gw, n).await;
    get_all_with(client, vec![gw.status_url(task); n]).await
}

/// `n` callers GET `url` at once, each with the test key; returns every answer.
async fn crowd_at(url: &str, n: usize) -> Vec<Reply> {
    get_all(vec![url.to_owned(); n]).await
}

fn count(replies: &[Reply], x_cache: &str) -> usize {
    replies
        .iter()
        .filter(|r| r.header("x-cache") == x_cache)
        .count()
}

/// 1,000 concurrent callers of one PENDING task: one upstream request, 1,000 answers of 200,
/// one MISS and the rest COALESCED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_callers_of_a_pending_task_make_one_call() {
    // A PENDING answer is not stored either: the 1,000 requests (on connections opened
    // first) must all arrive within these 4 s.
    let sim = slow_simulator(Duration::from_secs(4)).await;
    let mut cfg = config(&sim.base_url());
    cfg.upstream.request_timeout = Duration::from_secs(10);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let replies = crowd(&gw, "pending-crowd", 1000).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.json()["status"] == "PENDING")
    );
    assert_eq!(status_requests(&sim).await, 1);
    assert_eq!(count(&replies, "MISS"), 1);
    assert_eq!(count(&replies, "COALESCED"), 999);
    assert_eq!(
        metric(&gw, "hubspot_gateway_coalesced_requests_total").await,
        Some(999.0)
    );
}

/// The same for a COMPLETE task, and afterwards everyone gets a HIT without HubSpot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_callers_of_a_complete_task_make_one_call_then_hit() {
    let sim = slow_simulator(Duration::from_secs(4)).await;
    let mut cfg = config(&sim.base_url());
    cfg.upstream.request_timeout = Duration::from_secs(10);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let replies = crowd(&gw, "complete-crowd", 1000).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.body == replies[0].body)
    );
    assert_eq!(status_requests(&sim).await, 1);
    let again = crowd(&gw, "complete-crowd", 200).await;
    assert_eq!(count(&again, "HIT"), 200);
    assert_eq!(status_requests(&sim).await, 1);
}

/// HubSpot answering 503 to a crowd: the crowd costs what one caller costs (the gateway's
/// own retries of a 503, MAX_TRIES = 3), and every caller gets the 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowd_of_a_failing_task_shares_one_upstream_attempt() {
    // An error is not stored, so a caller that arrives after the flight ended starts a new
    // one: the flight (three tries of 1.5 s) must outlast 500 requests arriving on a loaded
    // 2-core machine (300 ms tries on connections opened by the crowd itself were not enough
    // in CI: 6 calls); `crowd` opens the connections first.
    let sim = slow_simulator(Duration::from_millis(1500)).await;
    let mut cfg = config(&sim.base_url());
    cfg.upstream.request_timeout = Duration::from_secs(10);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    faults(
        &sim,
        serde_json::json!({ "status_override": { "status": 503, "count": 1000 } }),
    )
    .await;
    let replies = crowd(&gw, "pending-fail", 500).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::SERVICE_UNAVAILABLE),
        "every caller gets HubSpot's 503"
    );
    assert_eq!(
        status_requests(&sim).await,
        3,
        "one call, retried twice on 503, for the whole crowd"
    );
    // Not stored: the next caller asks again.
    faults(&sim, serde_json::json!({ "status_override": null })).await;
    assert_eq!(
        get(&gw.status_url("pending-fail")).await.status,
        StatusCode::OK
    );
}

/// HubSpot too slow for the deadline: the crowd costs what one caller costs (one try cut at
/// half the deadline, one retry cut at the deadline), and every caller gets a 504 within its
/// own deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowd_of_a_timed_out_task_gets_504_from_one_call() {
    // HubSpot answers after 20 s; the gateway's deadline is 3 s. Answers well before 20 s
    // can only come from the deadline, whatever the machine's load adds on top of 2 s.
    let sim = slow_simulator(Duration::from_secs(20)).await;
    let mut cfg = config(&sim.base_url());
    // The flight lasts the whole deadline: long enough for all 300 requests (on connections
    // opened first) to arrive while the one call is in flight.
    cfg.upstream.request_timeout = Duration::from_secs(3);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let client = warmed_client(&gw, 300).await;
    let started = std::time::Instant::now();
    let replies = get_all_with(client, vec![gw.status_url("pending-slow"); 300]).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered at the deadline, not when HubSpot answered: {:?}",
        started.elapsed()
    );
    for r in &replies {
        assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(r.json()["category"], "UPSTREAM_TIMEOUT");
    }
    assert_eq!(
        status_requests(&sim).await,
        2,
        "one try and its retry, for all 300 callers"
    );
}

/// The first caller hangs up while its call is in flight: the fetch goes on, and the callers
/// that joined it still get the answer, from that one call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_hanging_up_does_not_cancel_the_fetch() {
    // Long enough for 20 followers to connect and join, and for the leader to hang up, all
    // while the one call is out, on a loaded machine.
    let sim = slow_simulator(Duration::from_secs(3)).await;
    let mut cfg = config(&sim.base_url());
    // Each try may take half the deadline.
    cfg.upstream.request_timeout = Duration::from_secs(10);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let mut leader = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let request = format!(
        "GET /files/v3/files/import-from-url/async/tasks/complete-hangup/status HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {KEY}\r\n\r\n"
    );
    leader.write_all(request.as_bytes()).await.expect("write");
    wait_for(
        || async { status_requests(&sim).await == 1 },
        "leader's call reached HubSpot",
    )
    .await;
    let followers = tokio::spawn({
        let url = gw.status_url("complete-hangup");
        async move { crowd_at(&url, 20).await }
    });
    // The leader hangs up once the followers are connected (not after a fixed sleep that a
    // busy machine may outlast or undercut).
    wait_for(
        || async {
            metric(&gw, r#"hubspot_gateway_connections_open{port="service"}"#).await >= Some(21.0)
        },
        "the 20 followers connected beside the leader",
    )
    .await;
    drop(leader);
    let replies = followers.await.expect("followers");
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::OK && r.json()["status"] == "COMPLETE")
    );
    assert_eq!(count(&replies, "COALESCED"), 20);
    assert_eq!(status_requests(&sim).await, 1);
    assert_eq!(
        get(&gw.status_url("complete-hangup"))
            .await
            .header("x-cache"),
        "HIT",
        "the orphaned fetch was stored"
    );
}

/// Three times `max_bytes` of distinct terminal answers: the cache's weight stays within
/// `max_bytes`, and the newest answers are still HITs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_is_bounded_by_bytes() {
    let sim = slow_simulator(Duration::ZERO).await;
    let mut cfg = config(&sim.base_url());
    cfg.cache.max_bytes = 256 * 1024;
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let client = client();
    let auth = format!("Bearer {KEY}");
    let mut stored = 0usize;
    let mut i = 0;
    while stored < 3 * 256 * 1024 {
        let r = send_with(
            &client,
            Method::GET,
            &gw.status_url(&format!("complete-fill-{i}")),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        stored += r.body.len();
        i += 1;
    }
    let weight = metric(&gw, "hubspot_gateway_cache_weight_bytes")
        .await
        .expect("gauge");
    let entries = metric(&gw, "hubspot_gateway_cache_entries")
        .await
        .expect("gauge");
    assert!(weight <= 256.0 * 1024.0, "weight {weight} > max_bytes");
    assert!(
        weight >= 0.5 * 256.0 * 1024.0,
        "the cache is used: {weight}"
    );
    assert!(entries < i as f64 / 2.0, "{entries} of {i} kept");
    let before = status_requests(&sim).await;
    for j in (i - 10)..i {
        let r = send_with(
            &client,
            Method::GET,
            &gw.status_url(&format!("complete-fill-{j}")),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(r.header("x-cache"), "HIT", "newest entry {j} of {i}");
    }
    assert_eq!(status_requests(&sim).await, before);
}

/// With a `pending_ttl`, a second poll within it is a HIT; after it, a MISS. (2 s rather
/// than the recommended 1 s, so that two polls on a busy machine still fall within it.)
#[tokio::test]
async fn pending_micro_cache() {
    let sim = slow_simulator(Duration::ZERO).await;
    let mut cfg = config(&sim.base_url());
    cfg.cache.pending_ttl = Duration::from_secs(2);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("pending-micro")).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(
        get(&gw.status_url("pending-micro")).await.header("x-cache"),
        "HIT"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(
        get(&gw.status_url("pending-micro")).await.header("x-cache"),
        "MISS"
    );
    assert_eq!(status_requests(&sim).await, 2);
}

/// A fetch that started with the old account's token and finishes after the token of
/// another HubSpot account was published: its callers get the answer, but it is not kept,
/// so the new account never gets a HIT of the old account's answer.
#[tokio::test]
async fn answer_fetched_for_the_old_account_is_not_kept() {
    let sim = simulator(SimConfig {
        token_ttl: Duration::from_secs(8),
        rate_limit: None,
        ..SimConfig::default()
    })
    .await;
    let mut cfg = config(&sim.base_url());
    // Each try may take half the deadline: room for the 6 s answer below.
    cfg.upstream.request_timeout = Duration::from_secs(20);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    // Tokens issued from now on belong to hub 999; the refresh comes 3.6-4 s after start,
    // while this 6 s call is in flight with the old token: seconds of margin on each side,
    // for the call to start before the refresh and to end after it.
    faults(
        &sim,
        serde_json::json!({ "hub_id": 999, "latency_ms": 6000 }),
    )
    .await;
    assert_eq!(
        stats(&sim).await["token_requests"].as_u64(),
        Some(1),
        "the call starts with the first account's token"
    );
    let first = get(&gw.status_url("complete-race")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        stats(&sim).await["token_requests"].as_u64() >= Some(2),
        "the refresh happened during the call"
    );
    faults(&sim, serde_json::json!({ "latency_ms": 0 })).await;
    let second = get(&gw.status_url("complete-race")).await;
    assert_eq!(
        second.header("x-cache"),
        "MISS",
        "the old account's answer was not served"
    );
    assert_eq!(
        get(&gw.status_url("complete-race")).await.header("x-cache"),
        "HIT"
    );
}

//! The request path end to end: a real gateway on loopback in front of the HubSpot simulator.

mod support;

use std::time::{Duration, Instant};

use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use support::*;

/// A COMPLETE task asked twice: HubSpot sees one request; the second answer is a HIT with
/// the same bytes, an Age, and RFC 9211 Cache-Status.
#[tokio::test]
async fn terminal_answer_is_served_from_memory() {
    let (sim, gw) = start().await;
    let first = get(&gw.status_url("complete-abc")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-cache"), "MISS");
    assert_eq!(first.json()["status"], "COMPLETE");
    assert!(
        first.header("cache-status").contains("stored"),
        "{}",
        first.header("cache-status")
    );
    assert!(!first.header("x-hubspot-correlation-id").is_empty());
    assert!(
        !first.header("x-hubspot-ratelimit-remaining").is_empty(),
        "fresh answers carry HubSpot's rate headers"
    );
    let second = get(&gw.status_url("complete-abc")).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.header("x-cache"), "HIT");
    assert_eq!(second.header("cache-status"), "hubspot-files-gateway; hit");
    assert!(second.headers.contains_key("age"));
    assert!(
        !second.headers.contains_key("x-hubspot-ratelimit-remaining"),
        "rate headers only on fresh answers"
    );
    assert_eq!(
        first.body, second.body,
        "cached bytes are the upstream's bytes"
    );
    assert_eq!(status_requests(&sim).await, 1);
    // CANCELED is terminal too.
    get(&gw.status_url("canceled-x")).await;
    assert_eq!(
        get(&gw.status_url("canceled-x")).await.header("x-cache"),
        "HIT"
    );
    assert_eq!(status_requests(&sim).await, 2);
}

/// Non-terminal answers are never stored by default: each poll reaches HubSpot.
#[tokio::test]
async fn pending_answer_is_asked_every_time() {
    let (sim, gw) = start().await;
    for _ in 0..2 {
        let r = get(&gw.status_url("pending-abc")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["status"], "PENDING");
        assert_eq!(r.header("x-cache"), "MISS");
    }
    assert_eq!(status_requests(&sim).await, 2);
}

/// The date-versioned route and HEAD are served; HubSpot is asked on the default
/// `upstream.api_version`, 2026-03.
#[tokio::test]
async fn versioned_route_and_head() {
    let (sim, gw) = start().await;
    let url = format!(
        "http://{}/files/2026-03/files/import-from-url/async/tasks/processing-1/status",
        gw.addr
    );
    let r = get(&url).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "PROCESSING");
    let head = send(
        Method::HEAD,
        &gw.status_url("complete-h"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty(), "HEAD has no body");
    let seen = sim_requests(&sim).await;
    let paths: Vec<&str> = seen.iter().filter_map(|r| r["path"].as_str()).collect();
    assert!(
        paths.contains(&"/files/2026-03/files/import-from-url/async/tasks/processing-1/status"),
        "{paths:?}"
    );
}

/// No key, an unknown key, or another scheme: 401 in HubSpot's shape, nothing forwarded.
#[tokio::test]
async fn unauthenticated_callers_are_refused() {
    let (sim, gw) = start().await;
    let url = gw.status_url("complete-abc");
    for headers in [
        vec![],
        vec![("authorization", "Bearer wrong-key")],
        vec![("authorization", "Basic dGVzdDp0ZXN0")],
    ] {
        let r = send(Method::GET, &url, &headers).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{headers:?}");
        let body = r.json();
        assert_eq!(body["status"], "error");
        assert_eq!(body["category"], "INVALID_AUTHENTICATION");
        assert!(
            body["correlationId"]
                .as_str()
                .is_some_and(|c| c.len() == 36)
        );
        assert!(body["message"].as_str().is_some());
    }
    assert_eq!(status_requests(&sim).await, 0);
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_inbound_auth_failures_total{reason="missing"}"#
        )
        .await,
        Some(1.0)
    );
}

/// Hostile or malformed taskIds get 400 VALIDATION_ERROR; other paths 404; POST 405 with
/// Allow. None of them reaches HubSpot.
#[tokio::test]
async fn bad_requests_are_answered_and_not_forwarded() {
    let (sim, gw) = start().await;
    let long = "a".repeat(129);
    for id in [
        "..",
        "%2e%2e",
        "a%2Fb",
        "%00x",
        long.as_str(),
        "a%20b",
        "%252e%252e",
        "",
    ] {
        let r = get(&gw.status_url(id)).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "taskId {id:?}");
        assert_eq!(r.json()["category"], "VALIDATION_ERROR", "taskId {id:?}");
    }
    let r = get(&format!("http://{}/files/v3/files/abc", gw.addr)).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["status"], "error");
    let r = send(
        Method::POST,
        &gw.status_url("complete-abc"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.header("allow"), "GET, HEAD");
    assert_eq!(status_requests(&sim).await, 0);
}

/// What HubSpot receives is the managed token and the gateway's own headers: never the
/// caller's Authorization, cookies, query string or hop-by-hop headers.
#[tokio::test]
async fn caller_credentials_never_reach_hubspot() {
    let (sim, gw) = start().await;
    let url = format!("{}?hapikey=leak&x=1", gw.status_url("pending-h"));
    let r = send(
        Method::GET,
        &url,
        &[
            ("authorization", &format!("Bearer {KEY}")),
            ("cookie", "session=leak"),
            ("x-request-id", "req-123"),
            ("proxy-authorization", "Basic leak"),
        ],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-request-id"), "req-123");
    let seen = sim_requests(&sim).await;
    let req = &seen[0];
    let text = req.to_string();
    assert!(!text.contains(KEY), "caller's key forwarded: {text}");
    assert!(
        !text.contains("leak"),
        "caller's cookie, query or proxy credentials forwarded: {text}"
    );
    let headers = &req["headers"];
    let auth = headers["authorization"]
        .as_str()
        .expect("managed token sent");
    assert!(
        auth.starts_with("Bearer ") && auth.len() > 200,
        "managed token: {} chars",
        auth.len()
    );
    assert_eq!(headers["x-request-id"], "req-123");
    assert!(
        headers["user-agent"]
            .as_str()
            .is_some_and(|u| u.starts_with("hubspot-files-gateway/"))
    );
    assert_eq!(headers["accept"], "application/json");
}

/// The answer's headers are the gateway's and HubSpot's alone: none of the caller's comes
/// back (the answer is built in the request's emptied header map), on a miss or a hit.
#[tokio::test]
async fn no_caller_header_comes_back_in_the_answer() {
    let (_sim, gw) = start().await;
    let key = format!("Bearer {KEY}");
    let sent = [
        ("authorization", key.as_str()),
        ("cookie", "session=echo-probe"),
        ("x-echo-probe", "echo-probe"),
        ("x-request-id", "req-echo"),
    ];
    for expected in ["MISS", "HIT", "HIT"] {
        let r = send(Method::GET, &gw.status_url("complete-echo"), &sent).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("x-cache"), expected);
        assert_eq!(r.header("x-request-id"), "req-echo");
        for (name, value) in r.headers.iter() {
            let value = value.to_str().unwrap_or_default();
            assert!(
                !["authorization", "cookie", "x-echo-probe"].contains(&name.as_str())
                    && !value.contains("echo-probe")
                    && !value.contains(KEY),
                "{expected}: the caller's header came back: {name}: {value}"
            );
        }
    }
}

/// A token without `files.ui_hidden.read` is never used: /readyz 503, callers get 503
/// MISSING_SCOPES naming the scope, and HubSpot's status route is never called.
#[tokio::test]
async fn token_missing_a_scope_is_never_injected() {
    let sim = simulator(SimConfig {
        scopes: vec!["files".into()],
        ..SimConfig::default()
    })
    .await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_for(
        || async { stats(&sim).await["token_requests"].as_u64() >= Some(1) },
        "a token request",
    )
    .await;
    let ready = send(Method::GET, &gw.admin_url("/readyz"), &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        ready.json()["reason"]
            .as_str()
            .is_some_and(|r| r.contains("scope")),
        "{:?}",
        ready.body
    );
    let r = get(&gw.status_url("complete-abc")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    let body = r.json();
    assert_eq!(body["category"], "MISSING_SCOPES");
    assert_eq!(
        body["context"]["missingScopes"],
        serde_json::json!(["files.ui_hidden.read"])
    );
    assert_eq!(status_requests(&sim).await, 0);
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(0.0)
    );
}

/// A 4-second token polled for 10 seconds (and at least 100 times): every answer is 200,
/// and the token is refreshed ahead of expiry a few times, not once per request.
#[tokio::test]
async fn short_lived_token_is_refreshed_ahead_of_expiry() {
    let sim = simulator(SimConfig {
        token_ttl: Duration::from_secs(4),
        rate_limit: None,
        ..SimConfig::default()
    })
    .await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    let client = client();
    let auth = format!("Bearer {KEY}");
    let started = Instant::now();
    let mut answered = 0;
    // A busy machine answers more slowly: poll on until both the time and the count are met.
    while started.elapsed() < Duration::from_secs(10) || answered < 100 {
        let r = send_with(
            &client,
            Method::GET,
            &gw.status_url("pending-poll"),
            &[("authorization", &auth)],
        )
        .await;
        assert_eq!(
            r.status,
            StatusCode::OK,
            "after {:?}: {:?}",
            started.elapsed(),
            r.body
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let polled = started.elapsed();
    let tokens = stats(&sim).await["token_requests"]
        .as_u64()
        .expect("counter");
    // Refreshed about every 2 s (never sooner than 1.8 s): 1 at start + ~5 in 10 s.
    let most = 2 + (polled.as_secs_f64() / 1.8) as u64;
    assert!(
        (4..=most).contains(&tokens),
        "token requests in {polled:?} for {answered} answers: {tokens} (at most {most})"
    );
    assert_eq!(
        stats(&sim).await["unauthorized"].as_u64(),
        Some(0),
        "no request went out with an expired token"
    );
}

/// The admin port exports the documented metric families.
#[tokio::test]
async fn metrics_are_exported() {
    let (_sim, gw) = start().await;
    get(&gw.status_url("complete-m")).await;
    get(&gw.status_url("complete-m")).await;
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_requests_total{cache="miss",client="tests",code="200"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_requests_total{cache="hit",client="tests",code="200"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_requests_total{code="200"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(&gw, "hubspot_gateway_token_scopes_verified").await,
        Some(1.0)
    );
    assert!(
        metric(&gw, "hubspot_gateway_token_expiry_timestamp_seconds")
            .await
            .is_some_and(|t| t > 1.7e9)
    );
    assert_eq!(
        metric(&gw, r#"hubspot_gateway_build_info{version="0.1.0"}"#).await,
        Some(1.0)
    );
    assert_eq!(
        metric(&gw, "hubspot_gateway_cache_entries").await,
        Some(1.0)
    );
    let text = send(Method::GET, &gw.admin_url("/metrics"), &[]).await.body;
    assert!(String::from_utf8_lossy(&text).contains("\nprocess_resident_memory_bytes "));
    assert_eq!(
        send(Method::GET, &gw.admin_url("/healthz"), &[])
            .await
            .status,
        StatusCode::OK
    );
}

/// The gateway's own budget: once `rate_limit` calls went out in the window, the next miss
/// gets HubSpot's 429 shape with Retry-After, and HubSpot is not called.
#[tokio::test]
async fn local_budget_refuses_before_hubspot_has_to() {
    let sim = simulator(SimConfig::default()).await;
    let mut cfg = config(&sim.base_url());
    cfg.upstream.rate_limit.requests = 2;
    cfg.upstream.rate_limit.per = Duration::from_secs(10);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    assert_eq!(
        get(&gw.status_url("pending-1")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        get(&gw.status_url("pending-2")).await.status,
        StatusCode::OK
    );
    let r = get(&gw.status_url("pending-3")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r
        .header("retry-after")
        .parse()
        .expect("Retry-After in seconds");
    assert!((1..=10).contains(&secs), "{secs}");
    let body = r.json();
    assert_eq!(body["policyName"], "TEN_SECONDLY_ROLLING");
    assert_eq!(body["errorType"], "RATE_LIMIT");
    assert_eq!(body["status"], "error");
    assert_eq!(status_requests(&sim).await, 2);
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_throttled_total{source="local_budget"}"#
        )
        .await,
        Some(1.0)
    );
    // Cached answers do not spend the budget.
    get(&gw.status_url("complete-x")).await;
}

/// HubSpot's 429 (without Retry-After) reaches the caller with a Retry-After, and every
/// further call is held by the gateway until the interval is over, without asking HubSpot.
#[tokio::test]
async fn hubspot_429_holds_all_calls() {
    let sim = simulator(SimConfig::default()).await;
    let gw = gateway(config(&sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    faults(
        &sim,
        serde_json::json!({ "status_override": { "status": 429, "count": 1 } }),
    )
    .await;
    let r = get(&gw.status_url("pending-a")).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        r.json()["policyName"],
        "TEN_SECONDLY_ROLLING",
        "HubSpot's own 429 body passes through"
    );
    assert!(!r.header("retry-after").is_empty());
    let held = get(&gw.status_url("pending-b")).await;
    assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!held.header("retry-after").is_empty());
    assert_eq!(
        status_requests(&sim).await,
        1,
        "the held call never reached HubSpot"
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_throttled_total{source="hubspot_429"}"#
        )
        .await,
        Some(1.0)
    );
}

/// HTTP/2 without TLS (prior knowledge) is served on the same port as HTTP/1.1.
#[tokio::test]
async fn http2_prior_knowledge_is_served() {
    let (_sim, gw) = start().await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let r = send_with(
        &h2,
        Method::GET,
        &gw.status_url("complete-h2"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["status"], "COMPLETE");
    // HEAD over HTTP/2: headers and length, no body (a body would be a protocol error).
    let head = send_with(
        &h2,
        Method::HEAD,
        &gw.status_url("complete-h2"),
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), r.body.len().to_string());
}

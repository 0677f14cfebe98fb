//! HubSpot's throttling as the gateway reads it: DAILY holds, both forms of `Retry-After`,
//! invalid values, `upstream.max_hold`, answers too large to relay, and the metrics that
//! show them (a real gateway on loopback in front of the HubSpot simulator).

mod support;

use std::time::{Duration, Instant, SystemTime};

use hubspot_files_gateway::upstream::{parse_retry_after, retry_after_value};
use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::*;

/// A simulator and a gateway (with `max_hold` when given) in front of it, ready.
async fn start_with(max_hold: Option<Duration>) -> (hubspot_sim::RunningSimulator, TestGateway) {
    let sim = simulator(SimConfig::default()).await;
    let mut cfg = config(&sim.base_url());
    if let Some(max_hold) = max_hold {
        cfg.upstream.max_hold = max_hold;
    }
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    (sim, gw)
}

/// The next status request the simulator sees is a 429 with these extra override fields.
async fn next_429(sim: &hubspot_sim::RunningSimulator, extra: Value) {
    let mut o = json!({ "status": 429, "count": 1 });
    if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
        o.extend(extra.clone());
    }
    faults(sim, json!({ "status_override": o })).await;
}

/// The caller's `Retry-After`: it must be integer seconds ≥ 1, whatever HubSpot sent.
fn retry_after(r: &Reply) -> u64 {
    let value = r.header("retry-after");
    let secs: u64 = value
        .parse()
        .unwrap_or_else(|_| panic!("Retry-After {value:?} is not integer seconds"));
    assert!(secs >= 1, "Retry-After {secs}");
    secs
}

/// `/readyz` as JSON.
async fn readyz(gw: &TestGateway) -> Value {
    send(Method::GET, &gw.admin_url("/readyz"), &[])
        .await
        .json()
}

/// Seconds until the next midnight UTC, as the test computes it on its own.
fn secs_to_midnight_utc() -> u64 {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    86_400 - now % 86_400
}

/// A DAILY 429 without Retry-After holds every call until the next midnight UTC (the
/// documented choice: the account's time zone is unknown), is not cut by `max_hold`, and
/// every held caller gets a 429 saying `policyName: DAILY` with that Retry-After; HubSpot is
/// not asked again during the hold.
#[tokio::test]
async fn daily_429_holds_until_the_daily_reset() {
    let (sim, gw) = start_with(None).await;
    next_429(&sim, json!({ "policy_name": "DAILY" })).await;
    let first = get(&gw.status_url("pending-d1")).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.json()["policyName"], "DAILY", "HubSpot's body passes");
    let expected = secs_to_midnight_utc();
    let near = |secs: u64| secs.abs_diff(expected) <= 5;
    assert!(
        near(retry_after(&first)),
        "{} vs {expected}",
        retry_after(&first)
    );
    for task in ["pending-d2", "pending-d1", "processing-d3"] {
        let held = get(&gw.status_url(task)).await;
        assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
        let body = held.json();
        assert_eq!(body["policyName"], "DAILY", "{body}");
        assert_eq!(body["errorType"], "RATE_LIMIT");
        assert_eq!(body["category"], "RATE_LIMITS");
        assert!(
            near(retry_after(&held)),
            "{} vs {expected}",
            retry_after(&held)
        );
    }
    assert_eq!(
        status_requests(&sim).await,
        1,
        "no HubSpot call during the hold"
    );
    let ready = readyz(&gw).await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["upstream_hold"]["policy"], "DAILY");
    assert_eq!(
        ready["upstream_hold"]["capped"], false,
        "max_hold does not cut DAILY"
    );
    let left = ready["upstream_hold"]["seconds_left"]
        .as_f64()
        .expect("seconds");
    assert!(left > 60.0 || expected <= 65, "{left}");
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_429_total{policy_name="DAILY"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_429_total{policy_name="TEN_SECONDLY_ROLLING"}"#
        )
        .await,
        Some(0.0)
    );
}

/// `Retry-After` as an HTTP-date 20 s ahead: the gateway asks HubSpot again neither at the
/// old 10 s fallback nor anywhere before that date, and does once it has passed.
#[tokio::test]
async fn http_date_retry_after_is_honoured() {
    let (sim, gw) = start_with(None).await;
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
    let made = Instant::now();
    let until = made + Duration::from_secs(19);
    next_429(&sim, json!({ "retry_after": date })).await;
    let first = get(&gw.status_url("pending-h")).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    let secs = retry_after(&first);
    // 17 s when answered at once; each whole second the answer took on a busy machine is a
    // second less of the hold left.
    let late = made.elapsed().as_secs();
    assert!(
        (17u64.saturating_sub(late)..=20).contains(&secs),
        "Retry-After {secs} for a date 20 s ahead, answered {late} s late"
    );
    // Ask every second past the 10 s a fallback would have held, up to 13 s in.
    let asked_from = Instant::now();
    while asked_from.elapsed() < Duration::from_secs(13) {
        let held = get(&gw.status_url("pending-h")).await;
        assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
        assert!(retry_after(&held) <= secs);
        assert_eq!(
            status_requests(&sim).await,
            1,
            "HubSpot asked before its date"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep_until((until + Duration::from_secs(2)).into()).await;
    assert_eq!(
        get(&gw.status_url("pending-h")).await.status,
        StatusCode::OK
    );
    assert_eq!(status_requests(&sim).await, 2);
}

/// Each invalid `Retry-After` HubSpot might send (`-5`, `1.5`, `soon`, a number past 64
/// bits) reaches no caller: the one whose call got the 429 and the ones held after it all
/// get the gateway's own integer seconds.
#[tokio::test]
async fn invalid_retry_after_is_never_passed_on() {
    for bad in ["-5", "1.5", "soon", "99999999999999999999"] {
        let (sim, gw) = start_with(None).await;
        next_429(&sim, json!({ "retry_after": bad })).await;
        let first = get(&gw.status_url("pending-i")).await;
        assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS, "{bad}");
        let secs = retry_after(&first);
        assert!(secs <= 60, "{bad}: {secs}");
        for reply in get_all(vec![gw.status_url("pending-i"); 3]).await {
            assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{bad}");
            assert!(retry_after(&reply) <= secs, "{bad}");
        }
        assert_eq!(status_requests(&sim).await, 1, "{bad}");
        gw.stop().await;
    }
}

/// A 429 asking for longer than `upstream.max_hold` holds for `max_hold` only, says so on
/// `/readyz` (what was asked, what is left) and in the hold gauge, and calls go out again
/// once it ends.
#[tokio::test]
async fn hold_over_max_hold_is_capped_and_visible() {
    let max_hold = Duration::from_secs(3);
    let (sim, gw) = start_with(Some(max_hold)).await;
    next_429(&sim, json!({ "retry_after": 600 })).await;
    let first = get(&gw.status_url("pending-c")).await;
    // The hold began when HubSpot's 429 came back, before its caller got this answer: it
    // ends by `answered + max_hold` however long the call took on a busy machine.
    let answered = Instant::now();
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&first) <= 3);
    let ready = readyz(&gw).await;
    assert_eq!(ready["ready"], true);
    let hold = &ready["upstream_hold"];
    assert_eq!(hold["capped"], true, "{ready}");
    assert_eq!(hold["asked_seconds"], 600.0);
    assert_eq!(hold["policy"], "TEN_SECONDLY_ROLLING");
    let left = hold["seconds_left"].as_f64().expect("seconds");
    assert!(left > 0.0 && left <= 3.0, "{left}");
    let gauge = metric(&gw, "hubspot_gateway_upstream_hold_seconds")
        .await
        .expect("hold gauge");
    assert!(gauge > 0.0 && gauge <= 3.0, "{gauge}");
    let held = get(&gw.status_url("pending-c")).await;
    assert_eq!(held.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry_after(&held) <= 3);
    assert_eq!(status_requests(&sim).await, 1);
    tokio::time::sleep_until((answered + max_hold + Duration::from_millis(200)).into()).await;
    assert_eq!(
        get(&gw.status_url("pending-c")).await.status,
        StatusCode::OK
    );
    assert_eq!(status_requests(&sim).await, 2);
    assert!(readyz(&gw).await.get("upstream_hold").is_none());
    assert_eq!(
        metric(&gw, "hubspot_gateway_upstream_hold_seconds").await,
        Some(0.0)
    );
}

/// An answer of 2 MiB is not relayed: one HubSpot call (not retried), a 502 in HubSpot's
/// error shape naming the cause, counted once upstream.
#[tokio::test]
async fn answer_too_large_is_a_502_naming_it() {
    let (sim, gw) = start_with(None).await;
    faults(&sim, json!({ "pad_bytes": 2 << 20 })).await;
    let r = get(&gw.status_url("complete-big")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let body = r.json();
    assert_eq!(body["status"], "error");
    assert_eq!(body["category"], "UPSTREAM_ANSWER_TOO_LARGE");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("larger than the 1 MiB"), "{message}");
    assert!(body["correlationId"].is_string());
    assert_eq!(status_requests(&sim).await, 1, "not retried");
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_upstream_requests_total{code="error"}"#
        )
        .await,
        Some(1.0)
    );
}

/// Right after start, every counter with a known label set is exported at 0 (so an
/// `increase()` alert sees the first event), and the budget gauges show the configured limit.
#[tokio::test]
async fn counters_exist_at_zero_after_start() {
    let (_sim, gw) = start_with(None).await;
    let text = send(Method::GET, &gw.admin_url("/metrics"), &[]).await.body;
    let text = String::from_utf8_lossy(&text);
    let mut series: Vec<String> = [
        r#"token_refreshes_total{result="failure"}"#,
        r#"upstream_throttled_total{source="hubspot_429"}"#,
        r#"upstream_throttled_total{source="local_budget"}"#,
        r#"upstream_throttled_total{source="client_share"}"#,
        r#"upstream_throttled_total{source="daily_limit"}"#,
        r#"client_upstream_calls_total{client="tests"}"#,
        r#"client_share_refusals_total{client="tests"}"#,
        r#"token_forced_refreshes_total{reason="upstream_401"}"#,
        r#"token_forced_refreshes_total{reason="upstream_403"}"#,
        r#"inbound_auth_failures_total{reason="missing"}"#,
        r#"inbound_auth_failures_total{reason="malformed"}"#,
        r#"inbound_auth_failures_total{reason="unknown_key"}"#,
        r#"inbound_auth_failures_total{reason="unknown_certificate"}"#,
        r#"requests_total{cache="miss",client="tests",code="200"}"#,
        r#"requests_total{cache="hit",client="tests",code="200"}"#,
        r#"requests_total{cache="miss",client="tests",code="429"}"#,
        r#"requests_total{cache="miss",client="tests",code="502"}"#,
        r#"requests_total{cache="coalesced",client="tests",code="504"}"#,
        r#"requests_total{cache="none",client="unauthenticated",code="401"}"#,
        "upstream_hold_seconds",
    ]
    .iter()
    .map(|s| format!("hubspot_gateway_{s} 0"))
    .collect();
    for policy in ["TEN_SECONDLY_ROLLING", "SECONDLY", "DAILY", "unknown"] {
        series.push(format!(
            r#"hubspot_gateway_upstream_429_total{{policy_name="{policy}"}} 0"#
        ));
    }
    for s in &series {
        assert!(text.lines().any(|l| l == s), "missing: {s}");
    }
    assert!(
        text.lines()
            .any(|l| l == "hubspot_gateway_upstream_budget_limit 10000")
    );
    assert!(
        text.lines()
            .any(|l| l == "hubspot_gateway_upstream_budget_remaining 10000")
    );
    get(&gw.status_url("pending-b")).await;
    assert_eq!(
        metric(&gw, "hubspot_gateway_upstream_budget_remaining").await,
        Some(9999.0)
    );
}

proptest! {
    /// Every delay-seconds value that fits 64 bits reads as itself.
    #[test]
    fn delay_seconds_read_exactly(n in any::<u64>(), pad in "[ \t]{0,2}") {
        let now = SystemTime::now();
        prop_assert_eq!(
            parse_retry_after(&format!("{pad}{n}{pad}"), now),
            Some(Duration::from_secs(n))
        );
    }

    /// An HTTP-date reads as the time from now to it (zero when past), to the second.
    #[test]
    fn http_dates_read_as_the_time_to_them(ahead in -86_400i64..10 * 86_400, now_s in 1_000_000_000u64..4_000_000_000) {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s);
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(now_s.saturating_add_signed(ahead));
        let expected = Duration::from_secs(u64::try_from(ahead).unwrap_or(0));
        prop_assert_eq!(parse_retry_after(&httpdate::fmt_http_date(at), now), Some(expected));
    }

    /// Negative, fractional, suffixed and overflowing numbers are invalid, never a delay.
    #[test]
    fn malformed_numbers_are_refused(n in any::<u64>(), f in 0u32..1000, extra in "[0-9]{1,5}") {
        let now = SystemTime::now();
        prop_assert_eq!(parse_retry_after(&format!("-{n}"), now), None);
        prop_assert_eq!(parse_retry_after(&format!("{n}.{f}"), now), None);
        prop_assert_eq!(parse_retry_after(&format!("{n}s"), now), None);
        prop_assert_eq!(parse_retry_after(&format!("{}{extra}", u64::MAX), now), None);
    }

    /// Any text either reads as a delay (digits, or a date) or is refused; nothing panics,
    /// and whatever is accepted becomes a valid Retry-After of at least 1 whole second.
    #[test]
    fn any_text_is_read_or_refused(text in "\\PC{0,40}") {
        let now = SystemTime::now();
        if let Some(wait) = parse_retry_after(&text, now) {
            let trimmed = text.trim_matches([' ', '\t']);
            prop_assert!(
                trimmed.bytes().all(|b| b.is_ascii_digit()) || httpdate::parse_http_date(trimmed).is_ok()
            );
            let header = retry_after_value(wait);
            let secs: u64 = header.to_str().expect("ascii").parse().expect("integer");
            prop_assert!(secs >= 1 && Duration::from_secs(secs) >= wait);
        }
    }
}

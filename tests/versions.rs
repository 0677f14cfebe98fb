//! API versions: callers on any published version of the status route are served by one
//! HubSpot call on `upstream.api_version`, OAuth runs on `token.api`'s version end to end,
//! and versions HubSpot does not publish are 404s that never reach it.

mod support;

use std::time::Duration;

use hubspot_files_gateway::config::{Config, ConfigError, OauthApi};
use hubspot_files_gateway::route::ApiVersion;
use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use serde_json::json;
use support::*;

/// The caller-side URL of `task` on `version` (`v3`, `2026-03`, ... or one HubSpot never
/// published).
fn url_on(gw: &TestGateway, version: &str, task: &str) -> String {
    format!(
        "http://{}/files/{version}/files/import-from-url/async/tasks/{task}/status",
        gw.addr
    )
}

/// The path HubSpot sees for `task` on `version`.
fn upstream_path(version: ApiVersion, task: &str) -> String {
    format!(
        "/files/{}/files/import-from-url/async/tasks/{task}/status",
        version.segment()
    )
}

/// Every status-route path the simulator received, oldest first.
async fn seen_paths(sim: &hubspot_sim::RunningSimulator) -> Vec<String> {
    sim_requests(sim)
        .await
        .iter()
        .filter_map(|r| r["path"].as_str().map(str::to_owned))
        .collect()
}

/// Three callers of one PENDING task at once, on v3, 2026-03 and 2026-09: one HubSpot call,
/// on the default `upstream.api_version` (2026-03); all three get its answer, one as the
/// MISS that led the call and two as COALESCED.
#[tokio::test]
async fn three_versions_at_once_make_one_call_on_the_configured_version() {
    assert_eq!(Config::default().upstream.api_version, ApiVersion::V2026_03);
    // Long enough that the three callers overlap even on a busy machine.
    let (sim, gw) = start_with(
        SimConfig {
            latency: Duration::from_secs(2),
            rate_limit: None,
            ..SimConfig::default()
        },
        |_| {},
    )
    .await;
    let replies = get_all(
        ["v3", "2026-03", "2026-09"]
            .iter()
            .map(|v| url_on(&gw, v, "pending-versions"))
            .collect(),
    )
    .await;
    for r in &replies {
        assert_eq!(r.status, StatusCode::OK, "{:?}", r.body);
        assert_eq!(r.json()["status"], "PENDING");
        assert_eq!(r.body, replies[0].body, "one answer for all three");
    }
    let mut caches: Vec<&str> = replies.iter().map(|r| r.header("x-cache")).collect();
    caches.sort_unstable();
    assert_eq!(caches, ["COALESCED", "COALESCED", "MISS"]);
    assert_eq!(
        seen_paths(&sim).await,
        [upstream_path(ApiVersion::V2026_03, "pending-versions")]
    );
}

/// A COMPLETE task asked for on v3, then 2026-03, then 2026-09: the first call fills the
/// cache and the other two versions are hits on that one entry, HubSpot asked once.
#[tokio::test]
async fn one_cache_entry_serves_every_version() {
    let (sim, gw) = start().await;
    let first = get(&url_on(&gw, "v3", "complete-versions")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.header("x-cache"), "MISS");
    for version in ["2026-03", "2026-09", "v3"] {
        let r = get(&url_on(&gw, version, "complete-versions")).await;
        assert_eq!(r.status, StatusCode::OK, "{version}");
        assert_eq!(r.header("x-cache"), "HIT", "{version}");
        assert_eq!(r.body, first.body, "{version}");
    }
    assert_eq!(
        seen_paths(&sim).await,
        [upstream_path(ApiVersion::V2026_03, "complete-versions")]
    );
}

/// `upstream.api_version` alone decides HubSpot's path: with `v3` (and with each other
/// version) callers on every version are answered from that version's path.
#[tokio::test]
async fn upstream_api_version_decides_the_path() {
    for configured in ApiVersion::ALL {
        let sim = SimConfig {
            rate_limit: None,
            ..SimConfig::default()
        };
        let (sim, gw) = start_with(sim, |c| c.upstream.api_version = configured).await;
        let mut want = Vec::new();
        for caller in ["v3", "2026-03", "2026-09"] {
            let task = format!("processing-{caller}");
            let r = get(&url_on(&gw, caller, &task)).await;
            assert_eq!(r.status, StatusCode::OK, "{configured:?} {caller}");
            assert_eq!(r.json()["status"], "PROCESSING");
            want.push(upstream_path(configured, &task));
        }
        assert_eq!(seen_paths(&sim).await, want, "{configured:?}");
        gw.stop().await;
    }
}

/// A valid config file but for `[section] key = "word"` on its first two lines.
fn toml_with(section: &str, key: &str, word: &str) -> Result<Config, ConfigError> {
    // The OAuth credentials go into `[token]`, which is `section` itself or comes after it.
    let token = if section == "token" { "" } else { "[token]\n" };
    Config::parse(&format!(
        r#"[{section}]
{key} = "{word}"
{token}client_id_env = "ID"
client_secret_env = "SECRET"
refresh_token_env = "RT"
[[auth.clients]]
name = "billing"
key_sha256 = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
"#
    ))
}

/// `word` is refused as the one problem of the file, naming its key and line, not the value.
fn assert_refused(result: Result<Config, ConfigError>, key: &str, word: &str) {
    match result {
        Err(ConfigError::Invalid(problems)) => {
            assert_eq!(problems.0.len(), 1, "{word:?}: {problems}");
            let problem = &problems.0[0];
            assert!(
                problem.starts_with("line 2,") && problem.contains(&format!("({key})")),
                "{word:?}: {problem}"
            );
            assert!(word.is_empty() || !problem.contains(word), "{problem}");
        }
        other => panic!("{word:?} must be refused: {other:?}"),
    }
}

/// `[section] key` takes each `accepted` word as its value (read back by `read`) and refuses
/// each `refused` one.
fn assert_key_values<T: PartialEq + std::fmt::Debug>(
    (section, key): (&str, &str),
    accepted: &[(&str, T)],
    refused: &[&str],
    read: impl Fn(&Config) -> &T,
) {
    for (word, want) in accepted {
        let c = toml_with(section, key, word).expect("a published version");
        assert_eq!(read(&c), want, "{word}");
    }
    for word in refused {
        assert_refused(
            toml_with(section, key, word),
            &format!("{section}.{key}"),
            word,
        );
    }
}

/// `upstream.api_version` in the TOML file takes the three published versions and refuses
/// any other value.
#[test]
fn upstream_api_version_parses_from_toml() {
    assert_key_values(
        ("upstream", "api_version"),
        &[
            ("v3", ApiVersion::V3),
            ("2026-03", ApiVersion::V2026_03),
            ("2026-09", ApiVersion::V2026_09),
        ],
        &["v4", "2026-13", "2026-3", ""],
        |c| &c.upstream.api_version,
    );
}

/// OAuth on `token.api` (default 2026-03, then 2026-09 and v3): the token is obtained and
/// introspected on that version's paths only, and callers are served with it.
#[tokio::test]
async fn oauth_runs_on_the_configured_version_end_to_end() {
    assert_eq!(Config::default().token.api, OauthApi::V2026_03);
    for (api, version) in [
        (None, "2026-03"),
        (Some(OauthApi::V2026_09), "2026-09"),
        (Some(OauthApi::V3), "v3"),
    ] {
        let (sim, gw) = start_with(SimConfig::default(), |c| {
            if let Some(api) = api {
                c.token.api = api;
            }
        })
        .await;
        let r = get(&url_on(&gw, "v3", "complete-oauth")).await;
        assert_eq!(r.status, StatusCode::OK, "{version}: {:?}", r.body);
        assert_eq!(r.json()["status"], "COMPLETE");
        let pending = get(&url_on(&gw, "2026-09", "pending-oauth")).await;
        assert_eq!(pending.status, StatusCode::OK, "{version}");
        let s = stats(&sim).await;
        assert_eq!(
            s["oauth_requests_by_path"],
            json!({
                format!("/oauth/{version}/token"): 1,
                format!("/oauth/{version}/token/introspect"): 1,
            }),
            "{version}"
        );
        assert_eq!(s["access_token_info_requests"], 0, "{version}");
        assert_eq!(s["status_requests"], 2, "{version}");
        gw.stop().await;
    }
}

/// `token.api` in the TOML file takes v1, v3, 2026-03 and 2026-09 and refuses anything else.
#[test]
fn token_api_parses_from_toml() {
    assert_key_values(
        ("token", "api"),
        &[
            ("v1", OauthApi::V1),
            ("v3", OauthApi::V3),
            ("2026-03", OauthApi::V2026_03),
            ("2026-09", OauthApi::V2026_09),
        ],
        &["v2", "2026-13", "2026-3"],
        |c| &c.token.api,
    );
}

/// Versions HubSpot never published (`v4`, `2026-13`, ...) are the gateway's 404 in HubSpot's
/// shape, with a key or without, for GET and POST alike, and HubSpot is not asked.
#[tokio::test]
async fn unknown_versions_are_404_and_never_forwarded() {
    let (sim, gw) = start().await;
    let auth = format!("Bearer {KEY}");
    for version in ["v4", "2026-13", "2026-3", "V3", "v1", "2025-09"] {
        let url = url_on(&gw, version, "complete-1");
        for (method, headers) in [
            (Method::GET, vec![("authorization", auth.as_str())]),
            (Method::GET, vec![]),
            (Method::POST, vec![("authorization", auth.as_str())]),
        ] {
            let r = send(method.clone(), &url, &headers).await;
            assert_eq!(r.status, StatusCode::NOT_FOUND, "{method} {version}");
            let body = r.json();
            assert_eq!(body["status"], "error");
            assert_eq!(body["category"], "OBJECT_NOT_FOUND");
            assert!(body["correlationId"].is_string(), "{body}");
        }
    }
    assert_eq!(status_requests(&sim).await, 0);
    // The published versions on the same gateway are served.
    for version in ["v3", "2026-03", "2026-09"] {
        let r = get(&url_on(&gw, version, "complete-1")).await;
        assert_eq!(r.status, StatusCode::OK, "{version}");
    }
}

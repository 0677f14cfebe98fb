//! The HubSpot simulator behaves like HubSpot: every body it sends validates against
//! HubSpot's own OpenAPI specs, and auth, scopes, rate limit, faults and control routes work.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hubspot_sim::{self as simulator, RunningSimulator, SimConfig, parse_rate_limit};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const V3: &str = "/files/v3/files/import-from-url/async";
const V2026: &str = "/files/2026-03/files/import-from-url/async";
const V2026_09: &str = "/files/2026-09/files/import-from-url/async";
/// Each version of the status route with the spec file that describes it.
const FILES_SPECS: [(&str, &str); 3] = [
    (V3, "files-v3.json"),
    (V2026, "files-2026-03.json"),
    (V2026_09, "files-2026-09.json"),
];
/// Each version of the refresh grant with the spec file that describes it.
const TOKEN_SPECS: [(&str, &str); 4] = [
    ("/oauth/v1/token", "oauth-v1.json"),
    ("/oauth/v3/token", "oauth-v3.json"),
    ("/oauth/2026-03/token", "oauth-2026-03.json"),
    ("/oauth/2026-09/token", "oauth-2026-09.json"),
];
/// Each version of introspection with the spec file that describes it.
const INTROSPECT_SPECS: [(&str, &str); 3] = [
    ("/oauth/v3/token/introspect", "oauth-v3.json"),
    ("/oauth/2026-03/token/introspect", "oauth-2026-03.json"),
    ("/oauth/2026-09/token/introspect", "oauth-2026-09.json"),
];
const FORM: &str = "application/x-www-form-urlencoded";

/// One answer: status, headers, body bytes.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .expect("ASCII header")
    }
}

/// A plain-HTTP client bound to one simulator.
struct Sim {
    running: RunningSimulator,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Sim {
    async fn start(config: SimConfig) -> Self {
        let running = simulator::start(config).await.expect("simulator starts");
        let client = Client::builder(TokioExecutor::new()).build_http();
        Self { running, client }
    }

    async fn try_send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Result<Answer, hyper_util::client::legacy::Error> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.running.base_url()));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("valid request");
        let response = self.client.request(request).await?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        self.try_send(method, path, headers, body)
            .await
            .expect("simulator answers")
    }

    async fn get(&self, path: &str, token: &str) -> Answer {
        let bearer = format!("Bearer {token}");
        self.send(Method::GET, path, &[("authorization", &bearer)], "")
            .await
    }

    async fn post_form(&self, path: &str, form: &str) -> Answer {
        self.send(Method::POST, path, &[("content-type", FORM)], form)
            .await
    }

    async fn post_json(&self, path: &str, body: Value) -> Answer {
        self.send(
            Method::POST,
            path,
            &[("content-type", "application/json")],
            &body.to_string(),
        )
        .await
    }

    async fn token(&self) -> String {
        let answer = self.post_form("/oauth/v3/token", REFRESH).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
        answer.json()["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    async fn faults(&self, faults: Value) {
        let answer = self.post_json("/__sim/faults", faults).await;
        assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    }

    async fn stats(&self) -> Value {
        self.send(Method::GET, "/__sim/stats", &[], "").await.json()
    }
}

const REFRESH: &str =
    "grant_type=refresh_token&client_id=cid&client_secret=secret&refresh_token=rt-1";

fn status_path(base: &str, task: &str) -> String {
    format!("{base}/tasks/{task}/status")
}

/// A vendored HubSpot spec file, parsed.
fn spec(spec_file: &str) -> Value {
    let path = format!("{}/spec/{spec_file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("spec is JSON")
}

/// The operation `method` on `path` as `spec_file` publishes it (`null` if it does not).
fn operation(spec_file: &str, method: &str, path: &str) -> Value {
    spec(spec_file)["paths"][path][method].clone()
}

/// Validates `body` against `#/components/schemas/{schema}` of a HubSpot spec file, with the
/// spec's components embedded so internal `$ref`s resolve; formats (uuid, date-time) checked.
fn assert_valid(spec_file: &str, schema: &str, body: &Value) {
    let spec = spec(spec_file);
    let schema_doc = json!({
        "$ref": format!("#/components/schemas/{schema}"),
        "components": spec["components"],
    });
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema_doc)
        .expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{schema} in {spec_file} rejects {body}: {errors:#?}"
    );
}

/// An error answer: HubSpot's `Error` schema, JSON content type, and the body's
/// `correlationId` equal to the `X-HubSpot-Correlation-Id` header.
fn assert_error(answer: &Answer, status: StatusCode, category: &str) -> Value {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    let body = answer.json();
    assert_valid("files-v3.json", "Error", &body);
    assert_eq!(body["category"], category, "{body}");
    assert_eq!(
        body["correlationId"],
        answer.header("x-hubspot-correlation-id"),
        "correlation id in body and header"
    );
    assert_eq!(
        answer.header("content-type"),
        "application/json;charset=utf-8"
    );
    body
}

/// Polls `path` until its JSON `status` is `want` (no fixed sleeps).
async fn poll_status(sim: &Sim, path: &str, token: &str, want: &str) -> Answer {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = sim.get(path, token).await;
        if answer.status == StatusCode::OK && answer.json()["status"] == want {
            return answer;
        }
        assert!(Instant::now() < deadline, "{path} never became {want}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The spec file whose `TokenResponseIF` describes a 200 from a grant documented in `spec`:
/// `oauth-2026-09.json` documents no 200 answer for its grant (only the error), and its
/// operation is the 2026-03 one (both name `/oauth/v3/token` as their implementation), so
/// its answers are held to the 2026-03 schema.
fn token_response_spec(spec: &str) -> &str {
    if spec == "oauth-2026-09.json" {
        "oauth-2026-03.json"
    } else {
        spec
    }
}

/// The refresh-grant answers of every version validate as `TokenResponseIF` and carry a
/// ~300-char opaque token, `expires_in` = ttl, the hub and the granted scopes.
#[tokio::test]
async fn token_answers_validate() {
    let sim = Sim::start(SimConfig::default()).await;
    let documented =
        |spec: &str, path: &str| operation(spec, "post", path)["responses"]["200"].is_object();
    // When HubSpot documents the 2026-09 answer, its own schema must be used instead.
    assert!(!documented("oauth-2026-09.json", "/oauth/2026-09/token"));
    assert!(documented("oauth-2026-03.json", "/oauth/2026-03/token"));
    for (path, spec) in TOKEN_SPECS {
        assert!(
            operation(spec, "post", path).is_object(),
            "{spec} publishes {path}"
        );
        let answer = sim.post_form(path, REFRESH).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.header("content-type"),
            "application/json;charset=utf-8"
        );
        uuid::Uuid::parse_str(answer.header("x-hubspot-correlation-id")).expect("uuid");
        let body = answer.json();
        assert_valid(token_response_spec(spec), "TokenResponseIF", &body);
        let token = body["access_token"].as_str().expect("token");
        assert!((290..=310).contains(&token.len()), "length {}", token.len());
        assert!(
            token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(body["expires_in"], 1800);
        assert_eq!(body["token_type"], "bearer");
        assert_eq!(body["refresh_token"], "rt-1");
        assert_eq!(body["hub_id"], 21_557_345);
        assert_eq!(body["scopes"], json!(["files", "files.ui_hidden.read"]));
    }
}

/// Bad grant type, client id, secret or refresh token get HubSpot's 400 OAuth error on every
/// version, which validates as that version's `Error`.
#[tokio::test]
async fn oauth_errors_are_400() {
    let sim = Sim::start(SimConfig {
        client_id: Some("cid".into()),
        client_secret: Some("secret".into()),
        refresh_token: Some("rt-1".into()),
        ..SimConfig::default()
    })
    .await;
    let cases = [
        (
            "grant_type=password&client_id=cid&client_secret=secret&refresh_token=rt-1",
            "BAD_GRANT_TYPE",
        ),
        (
            "grant_type=refresh_token&client_id=other&client_secret=secret&refresh_token=rt-1",
            "BAD_CLIENT_ID",
        ),
        (
            "grant_type=refresh_token&client_id=cid&client_secret=nope&refresh_token=rt-1",
            "BAD_CLIENT_SECRET",
        ),
        (
            "grant_type=refresh_token&client_id=cid&client_secret=secret&refresh_token=rt-2",
            "BAD_REFRESH_TOKEN",
        ),
        (
            "grant_type=refresh_token&client_id=cid&client_secret=secret",
            "BAD_REFRESH_TOKEN",
        ),
    ];
    for (form, status) in cases {
        for (path, spec) in TOKEN_SPECS {
            let answer = sim.post_form(path, form).await;
            let body = assert_error(&answer, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
            assert_valid(spec, "Error", &body);
            assert_eq!(body["status"], status, "{form}");
        }
    }
    assert_eq!(
        sim.post_form("/oauth/v3/token", REFRESH).await.status,
        StatusCode::OK
    );
}

/// Introspection on every version: an issued token is active with its scopes; an unknown
/// token, and any token under `introspect_inactive`, is `active: false`; every answer
/// validates against that version's spec.
#[tokio::test]
async fn introspection_validates_active_and_inactive() {
    for (path, spec) in INTROSPECT_SPECS {
        assert!(
            operation(spec, "post", path).is_object(),
            "{spec} publishes {path}"
        );
        introspection_on(path, spec).await;
    }
}

async fn introspection_on(path: &str, spec: &str) {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let form = |t: &str| {
        format!("client_id=cid&client_secret=secret&token={t}&token_type_hint=access_token")
    };

    let active = sim.post_form(path, &form(&token)).await.json();
    assert_valid(spec, "TokenInfoResponseBaseIF", &active);
    assert_eq!(active["active"], true);
    assert_eq!(active["scopes"], json!(["files", "files.ui_hidden.read"]));
    assert_eq!(active["hub_id"], 21_557_345);
    assert!(active["expires_in"].as_u64().is_some_and(|s| s > 1700));

    let unknown = sim.post_form(path, &form("nope")).await.json();
    assert_valid(spec, "TokenInfoResponseBaseIF", &unknown);
    assert_eq!(unknown["active"], false);

    sim.faults(json!({ "introspect_inactive": true })).await;
    let inactive = sim.post_form(path, &form(&token)).await.json();
    assert_valid(spec, "TokenInfoResponseBaseIF", &inactive);
    assert_eq!(inactive["active"], false);
    assert_eq!(inactive["scopes"], active["scopes"], "only `active` tells");
    let stats = sim.stats().await;
    assert_eq!(stats["introspect_requests"], 3);
    assert_eq!(stats["oauth_requests_by_path"][path], 3, "{stats}");
}

/// `GET /oauth/v1/access-tokens/{token}` validates as `AccessTokenInfoResponse`; an unknown
/// token is a 404 HubSpot error.
#[tokio::test]
async fn v1_access_token_info_validates() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let answer = sim
        .send(
            Method::GET,
            &format!("/oauth/v1/access-tokens/{token}"),
            &[],
            "",
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_valid("oauth-v1.json", "AccessTokenInfoResponse", &body);
    assert_eq!(body["token"], token.as_str());
    assert_eq!(body["scopes"], json!(["files", "files.ui_hidden.read"]));

    let unknown = sim
        .send(Method::GET, "/oauth/v1/access-tokens/nope", &[], "")
        .await;
    let body = assert_error(&unknown, StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND");
    assert_valid("oauth-v1.json", "Error", &body);
    assert_eq!(sim.stats().await["access_token_info_requests"], 2);
}

/// The private-app info route reports the static token's hub, app, user and scopes (no spec:
/// checked by hand), refuses other keys, and the static token works as a bearer.
#[tokio::test]
async fn private_app_info_reports_static_token() {
    let sim = Sim::start(SimConfig {
        static_token: Some("pat-na1-static".into()),
        ..SimConfig::default()
    })
    .await;
    let path = "/oauth/v2/private-apps/get/access-token-info";
    let answer = sim
        .post_json(path, json!({ "tokenKey": "pat-na1-static" }))
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let body = answer.json();
    assert_eq!(body["hubId"], 21_557_345);
    assert!(body["appId"].is_u64() && body["userId"].is_u64());
    assert_eq!(body["scopes"], json!(["files", "files.ui_hidden.read"]));
    assert_eq!(body.as_object().map(|o| o.len()), Some(4));

    let other = sim
        .post_json(path, json!({ "tokenKey": "pat-other" }))
        .await;
    assert_error(&other, StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION");
    let malformed = sim.post_json(path, json!({ "key": 1 })).await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");

    let status = sim
        .get(&status_path(V3, "complete-1"), "pat-na1-static")
        .await;
    assert_eq!(status.status, StatusCode::OK);
    assert_eq!(sim.stats().await["private_app_info_requests"], 3);
}

/// Seeded ids answer COMPLETE / CANCELED / PENDING / PROCESSING bodies that validate as
/// `FileActionResponse` on v3, 2026-03 and 2026-09 (each against its own spec),
/// byte-identical on every request; `missing-*` and unknown ids are 404s that validate as
/// `Error`.
#[tokio::test]
async fn seeded_status_bodies_validate_on_every_version() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    for (base, spec) in FILES_SPECS {
        let route = format!("{base}/tasks/{{taskId}}/status");
        assert!(
            operation(spec, "get", &route).is_object(),
            "{spec} publishes {route}"
        );
        for (id, status) in [
            ("complete-abc", "COMPLETE"),
            ("canceled-abc", "CANCELED"),
            ("pending-abc", "PENDING"),
            ("processing-abc", "PROCESSING"),
        ] {
            let first = sim.get(&status_path(base, id), &token).await;
            assert_eq!(first.status, StatusCode::OK, "{id}");
            assert_eq!(
                first.header("content-type"),
                "application/json;charset=utf-8"
            );
            let body = first.json();
            assert_valid(spec, "FileActionResponse", &body);
            assert_eq!(body["status"], status);
            assert_eq!(body["taskId"], id);
            let again = sim.get(&status_path(base, id), &token).await;
            assert_eq!(first.body, again.body, "{id}: same bytes every time");
            assert_ne!(
                first.header("x-hubspot-correlation-id"),
                again.header("x-hubspot-correlation-id")
            );
        }
        let complete = sim.get(&status_path(base, "complete-abc"), &token).await;
        let encoded = sim.get(&status_path(base, "complete%2Dabc"), &token).await;
        assert_eq!(
            encoded.body, complete.body,
            "the id is percent-decoded once"
        );
        assert!(
            (1000..=1300).contains(&complete.body.len()),
            "{} bytes: {}",
            complete.body.len(),
            String::from_utf8_lossy(&complete.body)
        );
        assert_valid(spec, "File", &complete.json()["result"]);
        let canceled = sim
            .get(&status_path(base, "canceled-abc"), &token)
            .await
            .json();
        assert_eq!(canceled["numErrors"], 1);
        assert_valid(spec, "StandardError", &canceled["errors"][0]);

        for id in ["missing-abc", "whatever"] {
            let answer = sim.get(&status_path(base, id), &token).await;
            let body = assert_error(&answer, StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND");
            assert_valid(spec, "Error", &body);
        }
    }
    let other = sim.get(&status_path(V3, "complete-abd"), &token).await;
    assert_ne!(
        other.json()["result"]["id"],
        sim.get(&status_path(V3, "complete-abc"), &token)
            .await
            .json()["result"]["id"]
    );
    assert_eq!(sim.stats().await["status_requests"], 41);
}

/// HEAD on the status route answers GET's status and headers (length included), no body.
#[tokio::test]
async fn head_mirrors_get() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let bearer = format!("Bearer {token}");
    let path = status_path(V3, "complete-head");
    let get = sim.get(&path, &token).await;
    let head = sim
        .send(Method::HEAD, &path, &[("authorization", &bearer)], "")
        .await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    assert_eq!(
        head.header("content-type"),
        "application/json;charset=utf-8"
    );
    head.header("x-hubspot-ratelimit-remaining");
    let post = sim
        .send(Method::POST, &path, &[("authorization", &bearer)], "")
        .await;
    assert_error(&post, StatusCode::METHOD_NOT_ALLOWED, "VALIDATION_ERROR");
    assert_eq!(post.header("allow"), "GET, HEAD");
}

/// No token, an unknown token and an expired one (ttl 1 s, polled) all get 401
/// `INVALID_AUTHENTICATION` bodies that validate, without rate-limit headers.
#[tokio::test]
async fn missing_unknown_and_expired_tokens_get_401() {
    let sim = Sim::start(SimConfig {
        token_ttl: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await;
    let path = status_path(V3, "complete-1");
    let none = sim.send(Method::GET, &path, &[], "").await;
    assert_error(&none, StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION");
    assert!(none.headers.get("x-hubspot-ratelimit-remaining").is_none());
    let basic = sim
        .send(Method::GET, &path, &[("authorization", "Basic abc")], "")
        .await;
    assert_error(&basic, StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION");
    let unknown = sim.get(&path, "not-a-token").await;
    let body = assert_error(&unknown, StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION");
    assert_valid("files-2026-03.json", "Error", &body);

    let token = sim.token().await;
    assert_eq!(sim.get(&path, &token).await.status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(5);
    let expired = loop {
        let answer = sim.get(&path, &token).await;
        if answer.status != StatusCode::OK {
            break answer;
        }
        assert!(Instant::now() < deadline, "token never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let body = assert_error(&expired, StatusCode::UNAUTHORIZED, "INVALID_AUTHENTICATION");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired")),
        "{body}"
    );
    assert_eq!(sim.stats().await["unauthorized"], 4);
}

/// A token with only unrelated scopes gets 403 `MISSING_SCOPES` listing the scopes of which
/// any one would do; a token with just `files.read` is enough, as on HubSpot.
#[tokio::test]
async fn unrelated_scopes_get_403() {
    let sim = Sim::start(SimConfig {
        scopes: vec!["crm.objects.contacts.read".into()],
        ..SimConfig::default()
    })
    .await;
    let token = sim.token().await;
    for base in [V3, V2026] {
        let answer = sim.get(&status_path(base, "complete-1"), &token).await;
        let body = assert_error(&answer, StatusCode::FORBIDDEN, "MISSING_SCOPES");
        assert_eq!(
            body["errors"][0]["context"]["requiredGranularScopes"],
            json!(["files", "files.read", "files.ui_hidden.read"])
        );
        answer.header("x-hubspot-ratelimit-remaining");
    }
    sim.faults(json!({ "scopes": ["files.read"] })).await;
    let narrow = sim.token().await;
    assert_eq!(
        sim.get(&status_path(V3, "complete-1"), &narrow)
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        sim.get(&status_path(V3, "complete-1"), &token).await.status,
        StatusCode::FORBIDDEN,
        "scopes change for new tokens only"
    );
    assert_eq!(sim.stats().await["forbidden"], 3);
}

/// The rolling window: each call shows interval, max and remaining; the call past the limit
/// gets HubSpot's 429 body (validating as `Error`) with `Remaining: 0`.
#[tokio::test]
async fn rate_limit_gives_429_and_headers() {
    let sim = Sim::start(SimConfig {
        rate_limit: Some((3, Duration::from_secs(10))),
        ..SimConfig::default()
    })
    .await;
    let token = sim.token().await;
    let path = status_path(V3, "complete-1");
    for remaining in ["2", "1", "0"] {
        let answer = sim.get(&path, &token).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.header("x-hubspot-ratelimit-interval-milliseconds"),
            "10000"
        );
        assert_eq!(answer.header("x-hubspot-ratelimit-max"), "3");
        assert_eq!(answer.header("x-hubspot-ratelimit-remaining"), remaining);
    }
    let limited = sim.get(&path, &token).await;
    let body = assert_error(&limited, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITS");
    assert_eq!(body["status"], "error");
    assert_eq!(body["errorType"], "RATE_LIMIT");
    assert_eq!(body["policyName"], "TEN_SECONDLY_ROLLING");
    assert_eq!(
        body["message"],
        "You have reached your ten_secondly_rolling limit."
    );
    assert_eq!(limited.header("x-hubspot-ratelimit-remaining"), "0");
    assert_eq!(sim.stats().await["rate_limited"], 1);

    sim.send(Method::POST, "/__sim/reset", &[], "").await;
    assert_eq!(
        sim.get(&path, &token).await.status,
        StatusCode::OK,
        "reset empties the window"
    );
}

/// The daily limit: a forced 429 with `policy_name: DAILY` is HubSpot's daily-limit body
/// (validating as `Error`), a `retry_after` string is sent verbatim (an HTTP-date, or an
/// invalid value for the gateway's tests), and `pad_bytes` makes a 200 body that large
/// while still JSON.
#[tokio::test]
async fn daily_429_raw_retry_after_and_padding() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let path = status_path(V3, "complete-1");
    sim.faults(json!({ "status_override": { "status": 429, "count": 1, "policy_name": "DAILY", "retry_after": "Sun, 06 Nov 2044 08:49:37 GMT" } }))
        .await;
    let daily = sim.get(&path, &token).await;
    let body = assert_error(&daily, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITS");
    assert_eq!(body["policyName"], "DAILY");
    assert_eq!(body["errorType"], "RATE_LIMIT");
    assert_eq!(body["message"], "You have reached your daily limit.");
    assert_eq!(daily.header("retry-after"), "Sun, 06 Nov 2044 08:49:37 GMT");
    let rejected = sim
        .send(
            Method::POST,
            "/__sim/faults",
            &[("content-type", "application/json")],
            r#"{"status_override":{"status":429,"count":1,"retry_after":"a\nb"}}"#,
        )
        .await;
    assert_eq!(rejected.status, StatusCode::BAD_REQUEST);

    sim.faults(json!({ "pad_bytes": 2 << 20 })).await;
    let padded = sim.get(&path, &token).await;
    assert_eq!(padded.status, StatusCode::OK);
    assert!(padded.body.len() > 2 << 20, "{}", padded.body.len());
    assert_valid("files-v3.json", "FileActionResponse", &padded.json());
}

/// `fail_rate` 1 answers every status request with `fail_status` and a HubSpot body that
/// validates (502, 503, 504), counted as server errors; the config's `fail_rate` works too.
#[tokio::test]
async fn injected_5xx_validate() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let path = status_path(V2026, "complete-1");
    for status in [502u16, 503, 504] {
        sim.faults(json!({ "fail_rate": 1.0, "fail_status": status }))
            .await;
        let answer = sim.get(&path, &token).await;
        assert_eq!(answer.status.as_u16(), status);
        assert_valid("files-2026-03.json", "Error", &answer.json());
        assert_eq!(
            answer.json()["correlationId"],
            answer.header("x-hubspot-correlation-id")
        );
    }
    assert_eq!(sim.stats().await["server_errors"], 3);

    let failing = Sim::start(SimConfig {
        fail_rate: 1.0,
        ..SimConfig::default()
    })
    .await;
    let token = failing.token().await;
    let answer = failing.get(&path, &token).await;
    assert_error(
        &answer,
        StatusCode::SERVICE_UNAVAILABLE,
        "SERVICE_UNAVAILABLE",
    );
}

/// The token-side faults: down (503), a fixed status, garbage 200, latency; and the
/// control route's own checks: `{}` changes nothing, unknown fields and bad ranges are 400.
#[tokio::test]
async fn token_faults_via_control_route() {
    let sim = Sim::start(SimConfig::default()).await;
    let before = sim.send(Method::GET, "/__sim/faults", &[], "").await.json();
    assert_eq!(before["fail_status"], 503);
    assert_eq!(before["scopes"], json!(["files", "files.ui_hidden.read"]));
    sim.faults(json!({})).await;
    assert_eq!(
        sim.send(Method::GET, "/__sim/faults", &[], "").await.json(),
        before
    );
    for bad in [
        json!({ "latency": 5 }),
        json!({ "fail_rate": 2.0 }),
        json!({ "fail_status": 404 }),
    ] {
        let answer = sim.post_json("/__sim/faults", bad).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    }

    sim.faults(json!({ "token_down": true })).await;
    let down = sim.post_form("/oauth/v3/token", REFRESH).await;
    assert_valid(
        "oauth-v3.json",
        "Error",
        &assert_error(
            &down,
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVICE_UNAVAILABLE",
        ),
    );
    let introspect = sim
        .post_form(
            "/oauth/v3/token/introspect",
            "client_id=a&client_secret=b&token=c",
        )
        .await;
    assert_eq!(introspect.status, StatusCode::SERVICE_UNAVAILABLE);

    sim.faults(json!({ "token_down": false, "token_status": 500 }))
        .await;
    let status = sim.post_form("/oauth/v1/token", REFRESH).await;
    assert_valid(
        "oauth-v1.json",
        "Error",
        &assert_error(&status, StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
    );

    sim.faults(json!({ "token_status": null, "token_garbage": true }))
        .await;
    let garbage = sim.post_form("/oauth/v3/token", REFRESH).await;
    assert_eq!(garbage.status, StatusCode::OK);
    assert!(serde_json::from_slice::<Value>(&garbage.body).is_err());

    sim.faults(json!({ "token_garbage": false, "token_latency_ms": 300 }))
        .await;
    let started = Instant::now();
    assert_eq!(
        sim.post_form("/oauth/v3/token", REFRESH).await.status,
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(sim.stats().await["token_requests"], 4);
    assert_eq!(sim.stats().await["tokens_issued"], 1);
}

/// The status-side faults: latency, forced statuses (429 with `Retry-After`) for exactly
/// `count` requests, connection resets, and `revoke_all` turning issued tokens into 401s.
#[tokio::test]
async fn status_faults_via_control_route() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let path = status_path(V3, "pending-1");

    sim.faults(json!({ "latency_ms": 250 })).await;
    let started = Instant::now();
    assert_eq!(sim.get(&path, &token).await.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(250));
    sim.faults(json!({ "latency_ms": 0, "status_override": { "status": 429, "count": 2, "retry_after": 7 } }))
        .await;
    for _ in 0..2 {
        let answer = sim.get(&path, &token).await;
        let body = assert_error(&answer, StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITS");
        assert_eq!(body["policyName"], "TEN_SECONDLY_ROLLING");
        assert_eq!(answer.header("retry-after"), "7");
        assert_eq!(answer.header("x-hubspot-ratelimit-remaining"), "0");
    }
    assert_eq!(
        sim.get(&path, &token).await.status,
        StatusCode::OK,
        "override used up"
    );
    let faults = sim.send(Method::GET, "/__sim/faults", &[], "").await.json();
    assert_eq!(faults["status_override"], Value::Null);

    sim.faults(json!({ "status_override": { "status": 477, "count": 1 } }))
        .await;
    let migrating = sim.get(&path, &token).await;
    assert_valid("files-v3.json", "Error", &migrating.json());
    assert_eq!(migrating.status.as_u16(), 477);

    sim.faults(json!({ "reset_rate": 1.0 })).await;
    assert!(
        sim.try_send(Method::GET, &path, &[], "").await.is_err(),
        "connection closed unanswered"
    );
    sim.faults(json!({ "reset_rate": 0.0 })).await;
    assert!(
        sim.stats().await["connection_resets"]
            .as_u64()
            .is_some_and(|n| n >= 1)
    );

    sim.faults(json!({ "revoke_all": true })).await;
    assert_error(
        &sim.get(&path, &token).await,
        StatusCode::UNAUTHORIZED,
        "INVALID_AUTHENTICATION",
    );
    let fresh = sim.token().await;
    assert_eq!(
        sim.get(&path, &fresh).await.status,
        StatusCode::OK,
        "new tokens work"
    );
}

/// Stats count per endpoint and outcome and hold no secrets; reset zeroes them and keeps
/// issued tokens valid.
#[tokio::test]
async fn stats_and_reset() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    sim.get(&status_path(V3, "complete-1"), &token).await;
    sim.get(&status_path(V3, "missing-1"), &token).await;
    sim.get(&status_path(V3, "complete-1"), "bad").await;
    let stats = sim.stats().await;
    assert_eq!(stats["token_requests"], 1);
    assert_eq!(
        stats["oauth_requests_by_path"],
        json!({ "/oauth/v3/token": 1 })
    );
    assert_eq!(stats["status_requests"], 3);
    assert_eq!(stats["not_found"], 1);
    assert_eq!(stats["unauthorized"], 1);
    assert!(!stats.to_string().contains(&token) && !stats.to_string().contains("rt-1"));

    let reset = sim.send(Method::POST, "/__sim/reset", &[], "").await;
    assert_eq!(reset.status, StatusCode::NO_CONTENT);
    let zeroed = sim.stats().await;
    assert!(
        zeroed
            .as_object()
            .is_some_and(|o| o.values().all(|v| *v == 0 || *v == json!({}))),
        "{zeroed}"
    );
    assert_eq!(
        sim.send(Method::GET, "/__sim/requests", &[], "")
            .await
            .json(),
        json!([])
    );
    assert_eq!(
        sim.get(&status_path(V3, "complete-1"), &token).await.status,
        StatusCode::OK
    );
}

/// `/__sim/requests` shows each status request as received, headers (Authorization too)
/// and query included, so tests can prove what a client forwarded.
#[tokio::test]
async fn recorded_requests_show_headers() {
    let sim = Sim::start(SimConfig::default()).await;
    let path = format!("{}?hapikey=x", status_path(V3, "complete%2D1"));
    sim.send(
        Method::GET,
        &path,
        &[
            ("authorization", "Bearer abc"),
            ("x-request-id", "req-1"),
            ("accept", "application/json"),
        ],
        "",
    )
    .await;
    let recorded = sim
        .send(Method::GET, "/__sim/requests", &[], "")
        .await
        .json();
    assert_eq!(recorded.as_array().map(Vec::len), Some(1));
    let request = &recorded[0];
    assert_eq!(request["method"], "GET");
    assert_eq!(request["path"], status_path(V3, "complete%2D1"));
    assert_eq!(request["query"], "hapikey=x");
    assert_eq!(request["headers"]["authorization"], "Bearer abc");
    assert_eq!(request["headers"]["x-request-id"], "req-1");
    assert_eq!(request["headers"]["accept"], "application/json");

    for _ in 0..1000 {
        sim.send(Method::HEAD, &status_path(V3, "later"), &[], "")
            .await;
    }
    let recorded = sim
        .send(Method::GET, "/__sim/requests", &[], "")
        .await
        .json();
    let recorded = recorded.as_array().expect("array");
    assert_eq!(recorded.len(), 1000, "only the last 1000 are kept");
    assert_eq!(recorded[0]["method"], "HEAD");
}

/// `/__sim/arrivals` lists every status request's arrival time, oldest first, taken before
/// the injected latency (so callers held together arrive together) and cleared by reset:
/// what a rate limiter in front of the simulator is judged by.
#[tokio::test]
async fn arrivals_record_when_requests_came() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    sim.faults(json!({ "latency_ms": 400 })).await;
    let (pending, complete) = (
        status_path(V3, "pending-a"),
        status_path(V2026, "complete%2Db"),
    );
    let (a, b) = tokio::join!(sim.get(&pending, &token), sim.get(&complete, &token));
    assert_eq!((a.status, b.status), (StatusCode::OK, StatusCode::OK));
    sim.get(&status_path(V3, "missing-c"), "bad").await;
    let arrivals = sim
        .send(Method::GET, "/__sim/arrivals", &[], "")
        .await
        .json();
    let arrivals = arrivals.as_array().expect("a list");
    assert_eq!(arrivals.len(), 3, "{arrivals:?}");
    let at: Vec<f64> = arrivals
        .iter()
        .map(|a| a["at_ms"].as_f64().expect("at_ms"))
        .collect();
    let mut first_two: Vec<&str> = arrivals[..2]
        .iter()
        .map(|a| a["task_id"].as_str().expect("task_id"))
        .collect();
    first_two.sort_unstable();
    assert_eq!(first_two, ["complete-b", "pending-a"]);
    assert_eq!(arrivals[2]["task_id"], "missing-c");
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    // Both arrived before either answer's 400 ms latency ran out; the third only after.
    assert!(at[1] - at[0] < 400.0, "{at:?}");
    assert!(at[2] - at[0] >= 400.0, "{at:?}");

    sim.send(Method::POST, "/__sim/reset", &[], "").await;
    assert_eq!(
        sim.send(Method::GET, "/__sim/arrivals", &[], "")
            .await
            .json(),
        json!([])
    );
}

/// With `rotate_refresh_token`, each token answer returns a new refresh token and the old
/// one gets `BAD_REFRESH_TOKEN`; the new one works.
#[tokio::test]
async fn rotated_refresh_token_invalidates_old() {
    let sim = Sim::start(SimConfig {
        refresh_token: Some("rt-1".into()),
        ..SimConfig::default()
    })
    .await;
    sim.faults(json!({ "rotate_refresh_token": true })).await;
    let first = sim.post_form("/oauth/v3/token", REFRESH).await.json();
    let rotated = first["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();
    assert_ne!(rotated, "rt-1");
    let old = sim.post_form("/oauth/v3/token", REFRESH).await;
    let body = assert_error(&old, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    assert_eq!(body["status"], "BAD_REFRESH_TOKEN");
    let form = REFRESH.replace("rt-1", &rotated);
    let next = sim.post_form("/oauth/v1/token", &form).await;
    assert_eq!(next.status, StatusCode::OK);
    assert_ne!(next.json()["refresh_token"], rotated.as_str());
}

/// An imported task answers 202 (validating as `ImportFromUrlTaskLocator`) with its status
/// link, then goes PENDING → PROCESSING → COMPLETE, each body validating on both versions.
#[tokio::test]
async fn imported_task_lifecycle() {
    let sim = Sim::start(SimConfig::default()).await;
    let token = sim.token().await;
    let bearer = format!("Bearer {token}");
    let input = json!({ "url": "https://example.com/cat.png", "access": "PRIVATE", "folderPath": "/imports" });
    let answer = sim
        .send(
            Method::POST,
            V3,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            &input.to_string(),
        )
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{:?}", answer.body);
    let located = answer.json();
    assert_valid("files-v3.json", "ImportFromUrlTaskLocator", &located);
    let id = located["id"].as_str().expect("id").to_owned();
    let link = format!("{}{}", sim.running.base_url(), status_path(V3, &id));
    assert_eq!(located["links"]["status"], link);

    let first = sim.get(&status_path(V3, &id), &token).await.json();
    assert_valid("files-v3.json", "FileActionResponse", &first);
    assert_eq!(first["status"], "PENDING");
    let processing = poll_status(&sim, &status_path(V2026, &id), &token, "PROCESSING").await;
    assert_valid(
        "files-2026-03.json",
        "FileActionResponse",
        &processing.json(),
    );
    let complete = poll_status(&sim, &status_path(V3, &id), &token, "COMPLETE").await;
    let body = complete.json();
    assert_valid("files-v3.json", "FileActionResponse", &body);
    assert_eq!(body["result"]["name"], "cat");
    assert_eq!(body["result"]["access"], "PRIVATE");
    assert_eq!(
        sim.get(&status_path(V3, &id), &token).await.body,
        complete.body
    );

    let invalid = sim
        .send(Method::POST, V3, &[("authorization", &bearer)], "{}")
        .await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "VALIDATION_ERROR");
    let anonymous = sim.post_json(V3, input).await;
    assert_error(
        &anonymous,
        StatusCode::UNAUTHORIZED,
        "INVALID_AUTHENTICATION",
    );
    assert_eq!(sim.stats().await["import_requests"], 3);
}

/// Any other path, unknown versions included, is HubSpot's 404 error body, correlation id
/// included; an OAuth POST to a version HubSpot does not publish is never served.
#[tokio::test]
async fn unknown_path_is_404() {
    let sim = Sim::start(SimConfig::default()).await;
    for path in [
        "/",
        "/crm/v3/objects/contacts",
        "/files/v4/files/import-from-url/async",
        "/files/v4/files/import-from-url/async/tasks/complete-1/status",
        "/files/2026-13/files/import-from-url/async/tasks/complete-1/status",
        "/__sim/nothing",
    ] {
        let answer = sim.send(Method::GET, path, &[], "").await;
        assert_error(&answer, StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND");
    }
    // Versions HubSpot does not publish for an endpoint: no grant, no introspection.
    for path in [
        "/oauth/v4/token",
        "/oauth/2026-13/token",
        "/oauth/v1/token/introspect",
        "/oauth/v4/token/introspect",
    ] {
        let answer = sim.post_form(path, REFRESH).await;
        assert_error(&answer, StatusCode::NOT_FOUND, "OBJECT_NOT_FOUND");
    }
    let stats = sim.stats().await;
    assert_eq!(stats["token_requests"], 0);
    assert_eq!(stats["oauth_requests_by_path"], json!({}));
}

/// The simulator speaks h2c (HTTP/2 with prior knowledge) as well as HTTP/1.1.
#[tokio::test]
async fn serves_h2c() {
    let sim = Sim::start(SimConfig::default()).await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::get(format!("{}/__sim/stats", sim.running.base_url()))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = client.request(request).await.expect("h2c answer");
    assert_eq!(response.version(), hyper::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
}

/// `stop` ends the server: the port no longer accepts connections.
#[tokio::test]
async fn stop_closes_the_port() {
    let running = simulator::start(SimConfig::default()).await.expect("start");
    let addr = running.addr;
    running.stop().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

/// `--rate-limit` strings: `N/DURATION`, a bare number meaning seconds; junk and zero refused.
#[test]
fn rate_limit_flag_parses() {
    assert_eq!(
        parse_rate_limit("100/10s"),
        Ok((100, Duration::from_secs(10)))
    );
    assert_eq!(
        parse_rate_limit("5/250ms"),
        Ok((5, Duration::from_millis(250)))
    );
    assert_eq!(
        parse_rate_limit("190/10"),
        Ok((190, Duration::from_secs(10)))
    );
    for bad in ["100", "x/10s", "0/10s", "10/0s", "10/soon"] {
        assert!(parse_rate_limit(bad).is_err(), "{bad}");
    }
}

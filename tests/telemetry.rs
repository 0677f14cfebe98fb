//! Tracing end to end: the gateway binary with `[telemetry]` exports its spans over
//! OTLP/HTTP to a real receiver on loopback (a hyper server decoding
//! `ExportTraceServiceRequest`), and the tests read what arrived: trace and parent ids,
//! span names and attributes, the access line's `trace_id`, and that no secret is in any of
//! it. A receiver that is down or never answers changes no answer.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hubspot_sim::SimConfig;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use support::{
    BIN, KEY, ServeChild, config_toml, kill, metric_at, send, sim_requests, simulator, spawn_serve,
    temp_dir, wait_exit, wait_for, wait_for_up_to,
};

/// The HubSpot token the simulator accepts; it must appear in no span.
const TOKEN: &str = "pat-na1-TELEMETRY-SECRET-7c1e";
const CALLER_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_PARENT: &str = "00f067aa0ba902b7";

/// What the receiver got: each export's raw body and its decoded request.
#[derive(Default)]
struct Received {
    bodies: Vec<Bytes>,
    exports: Vec<ExportTraceServiceRequest>,
    /// Requests to any other path or method.
    strays: usize,
}

/// An OTLP/HTTP receiver on 127.0.0.1 port 0: `POST /v1/traces` with a protobuf body.
struct Receiver {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver address");
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, hyper::Error>(receive(req, &shared).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Receiver { addr, received }
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Span> {
        let received = self.received.lock().expect("receiver lock");
        received
            .exports
            .iter()
            .flat_map(|e| &e.resource_spans)
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| s.spans.clone())
            .collect()
    }

    /// The spans of trace `trace` (hex), once `wanted` of them have arrived.
    async fn trace(&self, trace: &str, wanted: usize) -> Vec<Span> {
        let find = || {
            self.spans()
                .into_iter()
                .filter(|s| hex(&s.trace_id) == trace)
                .collect::<Vec<_>>()
        };
        wait_for(
            || {
                let n = find().len();
                async move { n >= wanted }
            },
            "the trace's spans at the receiver",
        )
        .await;
        find()
    }
}

/// Records one export and answers as an OTLP receiver does (an empty protobuf response).
async fn receive(req: Request<Incoming>, shared: &Mutex<Received>) -> Response<Full<Bytes>> {
    let ok_path = req.method() == Method::POST && req.uri().path() == "/v1/traces";
    let protobuf = req
        .headers()
        .get("content-type")
        .is_some_and(|v| v == "application/x-protobuf");
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut received = shared.lock().expect("receiver lock");
    if !(ok_path && protobuf) {
        received.strays += 1;
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()))
            .expect("response");
    }
    match ExportTraceServiceRequest::decode(body.clone()) {
        Ok(export) => {
            received.exports.push(export);
            received.bodies.push(body);
            Response::builder()
                .header("content-type", "application/x-protobuf")
                .body(Full::new(Bytes::new()))
                .expect("response")
        }
        Err(_) => {
            received.strays += 1;
            Response::builder()
                .status(StatusCode::BAD_REQUEST)
                .body(Full::new(Bytes::new()))
                .expect("response")
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A span's attributes as strings (ints and bools printed).
fn attrs(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(Value::StringValue(s)) => s.clone(),
                Some(Value::IntValue(i)) => i.to_string(),
                Some(Value::BoolValue(b)) => b.to_string(),
                Some(Value::DoubleValue(d)) => d.to_string(),
                other => format!("{other:?}"),
            };
            (kv.key.clone(), value)
        })
        .collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

fn server_span(spans: &[Span]) -> &Span {
    let servers: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32)
        .collect();
    assert_eq!(servers.len(), 1, "one server span per request: {spans:#?}");
    servers[0]
}

/// The gateway binary (static token `TOKEN`, text logs) with `[telemetry]` lines, beside a
/// simulator it asks.
async fn gateway(name: &str, telemetry: &str) -> (ServeChild, hubspot_sim::RunningSimulator) {
    let sim = simulator(SimConfig {
        rate_limit: None,
        static_token: Some(TOKEN.into()),
        ..SimConfig::default()
    })
    .await;
    let dir = temp_dir(&format!("telemetry-{name}"));
    let path = dir.join("gateway.toml");
    let token = "mode = \"static\"\nstatic_token_env = \"TELEMETRY_TEST_TOKEN\"";
    let text = format!(
        "{}\n[telemetry]\n{telemetry}\n",
        config_toml(&sim.base_url(), token)
    );
    std::fs::write(&path, text).expect("write config");
    let mut command = Command::new(BIN);
    command.env("TELEMETRY_TEST_TOKEN", TOKEN);
    let served = spawn_serve(command, &path);
    let ready = format!("http://{}/readyz", served.admin);
    wait_for(
        || async { send(Method::GET, &ready, &[]).await.status == StatusCode::OK },
        "gateway ready",
    )
    .await;
    (served, sim)
}

fn status_url(served: &ServeChild, task: &str) -> String {
    format!(
        "http://{}/files/v3/files/import-from-url/async/tasks/{task}/status",
        served.service
    )
}

/// The access line of request `id` (text format), waiting up to 10 s for it; earlier lines
/// are kept in `seen`.
fn access_line(served: &ServeChild, seen: &mut Vec<String>, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    let marker = format!("request_id=\"{id}\"");
    loop {
        if let Some(line) = seen.iter().find(|l| l.contains(&marker)) {
            return line.clone();
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let line = served
            .log
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("an access line for {id} within 10 s"));
        if line.contains(" access: ") {
            seen.push(line);
        }
    }
}

/// The access line's `trace_id` (32 hex digits), if it has one.
fn trace_id(line: &str) -> Option<String> {
    let rest = line.split(" trace_id=").nth(1)?;
    let value = rest.split_whitespace().next()?.trim_matches('"');
    Some(value.to_owned())
}

/// A caller's `traceparent` is continued: the server span has the caller's trace id and
/// span as parent; the cache lookup, token wait and HubSpot try are its children with the
/// documented names and attributes; the access line's `trace_id` is the exported trace's; a
/// caller without (or with an invalid) `traceparent` gets a new trace; nothing exported
/// holds the API key, the HubSpot token or an `Authorization` value, and HubSpot is not sent
/// the `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_continue_the_callers_trace_and_carry_no_secret() {
    let receiver = Receiver::start().await;
    let telemetry = format!(
        "otlp_endpoint = \"http://{}\"\nservice_name = \"gw-under-test\"\nexport_timeout = \"5s\"",
        receiver.addr
    );
    let (mut served, sim) = gateway("continue", &telemetry).await;
    let mut lines = Vec::new();
    let auth = format!("Bearer {KEY}");
    let url = status_url(&served, "complete-tel-1");

    // 1. A caller with a sampled traceparent and a tracestate: a miss, one HubSpot call.
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01");
    let reply = send(
        Method::GET,
        &url,
        &[
            ("authorization", &auth),
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
            ("x-request-id", "tel-req-1"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.header("x-cache"), "MISS");
    let spans = receiver.trace(CALLER_TRACE, 4).await;
    let server = server_span(&spans);
    assert_eq!(hex(&server.parent_span_id), CALLER_PARENT);
    assert_eq!(
        server.name,
        "GET /files/{version}/files/import-from-url/async/tasks/{taskId}/status"
    );
    let a = attrs(server);
    for (key, value) in [
        ("http.request.method", "GET"),
        (
            "http.route",
            "/files/{version}/files/import-from-url/async/tasks/{taskId}/status",
        ),
        ("http.response.status_code", "200"),
        ("gateway.api_version", "v3"),
        ("gateway.cache", "miss"),
        ("gateway.client", "tests"),
        ("gateway.task_id", "complete-tel-1"),
        ("gateway.request_id", "tel-req-1"),
        ("gateway.throttled", "false"),
    ] {
        assert_eq!(
            a.get(key).map(String::as_str),
            Some(value),
            "{key} in {a:?}"
        );
    }
    assert_eq!(server.trace_state, "vendor=opaque");
    for name in ["cache lookup", "token wait", "HubSpot GET status"] {
        let children = named(&spans, name);
        assert_eq!(children.len(), 1, "one {name} span: {spans:#?}");
        assert_eq!(
            children[0].parent_span_id, server.span_id,
            "{name}'s parent"
        );
    }
    assert_eq!(
        attrs(named(&spans, "cache lookup")[0]).get("gateway.cache.lookup"),
        Some(&"lead".to_owned())
    );
    assert_eq!(
        attrs(named(&spans, "token wait")[0]).get("gateway.token.ready"),
        Some(&"true".to_owned())
    );
    let try_span = named(&spans, "HubSpot GET status")[0];
    assert_eq!(try_span.kind, SpanKind::Client as i32);
    let t = attrs(try_span);
    assert_eq!(t.get("gateway.attempt").map(String::as_str), Some("1"));
    assert_eq!(
        t.get("http.response.status_code").map(String::as_str),
        Some("200")
    );
    assert_eq!(
        t.get("gateway.throttled").map(String::as_str),
        Some("false")
    );
    let line = access_line(&served, &mut lines, "tel-req-1");
    assert_eq!(trace_id(&line).as_deref(), Some(CALLER_TRACE), "{line}");

    // 2. No traceparent: a HIT in a trace of its own, a root span, no HubSpot try.
    let reply = send(
        Method::GET,
        &url,
        &[("authorization", &auth), ("x-request-id", "tel-req-2")],
    )
    .await;
    assert_eq!(reply.header("x-cache"), "HIT");
    let line = access_line(&served, &mut lines, "tel-req-2");
    let new_trace = trace_id(&line).expect("a trace_id");
    assert_ne!(new_trace, CALLER_TRACE);
    let spans = receiver.trace(&new_trace, 2).await;
    let server = server_span(&spans);
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(
        attrs(server).get("gateway.cache").map(String::as_str),
        Some("hit")
    );
    assert!(named(&spans, "HubSpot GET status").is_empty());
    assert_eq!(
        named(&spans, "cache lookup")[0].parent_span_id,
        server.span_id
    );

    // 3. An invalid traceparent is ignored (a new trace) and never echoed, not even in a 401.
    let bad = "00-ZZZZ2f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let reply = send(
        Method::GET,
        &url,
        &[("traceparent", bad), ("x-request-id", "tel-req-3")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(!String::from_utf8_lossy(&reply.body).contains("ZZZZ"));
    let line = access_line(&served, &mut lines, "tel-req-3");
    let third = trace_id(&line).expect("a trace_id");
    assert!(third != CALLER_TRACE && third.len() == 32 && !third.contains('Z'));
    let spans = receiver.trace(&third, 1).await;
    let server = server_span(&spans);
    assert!(server.parent_span_id.is_empty());
    let a = attrs(server);
    assert_eq!(
        a.get("http.response.status_code").map(String::as_str),
        Some("401")
    );
    assert_eq!(
        a.get("gateway.client").map(String::as_str),
        Some("unauthenticated")
    );
    assert_eq!(a.get("error.type").map(String::as_str), Some("client"));

    // The resource names the service; nothing anywhere holds a secret.
    {
        let received = receiver.received.lock().expect("receiver lock");
        assert_eq!(
            received.strays, 0,
            "every request was a protobuf POST /v1/traces"
        );
        let service = received.exports[0].resource_spans[0]
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .and_then(|kv| kv.value.as_ref()?.value.clone());
        assert_eq!(service, Some(Value::StringValue("gw-under-test".into())));
        for body in &received.bodies {
            let text = String::from_utf8_lossy(body).to_lowercase();
            for secret in [KEY, TOKEN, "authorization", "bearer"] {
                assert!(
                    !text.contains(&secret.to_lowercase()),
                    "an export holds {secret}"
                );
            }
        }
    }
    // HubSpot is not told our trace.
    for seen in sim_requests(&sim).await {
        assert!(seen["headers"].get("traceparent").is_none(), "{seen}");
        assert!(seen["headers"].get("tracestate").is_none(), "{seen}");
    }

    // 4. SIGTERM right after an answer: that request's spans still reach the receiver,
    // sent by the flush at shutdown if the last batch had not gone yet.
    let last_trace = "0af7651916cd43dd8448eb211c80319c";
    let reply = send(
        Method::GET,
        &url,
        &[
            ("authorization", &auth),
            (
                "traceparent",
                &format!("00-{last_trace}-b7ad6b7169203331-01"),
            ),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    kill(&served.child, "TERM");
    assert!(wait_exit(&mut served.child, Duration::from_secs(20)).success());
    let last = receiver
        .spans()
        .into_iter()
        .filter(|s| hex(&s.trace_id) == last_trace)
        .count();
    assert_eq!(
        last, 2,
        "the server span and its cache lookup, exported by exit"
    );
}

/// `sample_ratio = 0` keeps no new trace, but a caller's sampled `traceparent` is honoured
/// (parent-based sampling); the access line has a trace id either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_follows_the_callers_decision() {
    let receiver = Receiver::start().await;
    let telemetry = format!(
        "otlp_endpoint = \"http://{}/\"\nsample_ratio = 0.0\nexport_timeout = \"5s\"",
        receiver.addr
    );
    let (mut served, _sim) = gateway("sampling", &telemetry).await;
    let mut lines = Vec::new();
    let auth = format!("Bearer {KEY}");
    let url = status_url(&served, "complete-tel-2");
    send(
        Method::GET,
        &url,
        &[("authorization", &auth), ("x-request-id", "unsampled")],
    )
    .await;
    let unsampled = trace_id(&access_line(&served, &mut lines, "unsampled"))
        .expect("a trace id when not sampled too");
    let traceparent = format!("00-{CALLER_TRACE}-{CALLER_PARENT}-01");
    let reply = send(
        Method::GET,
        &url,
        &[("authorization", &auth), ("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    // The caller's trace arrives; by then the earlier, unsampled one would have too.
    receiver.trace(CALLER_TRACE, 2).await;
    assert!(
        receiver
            .spans()
            .iter()
            .all(|s| hex(&s.trace_id) == CALLER_TRACE),
        "only the caller's sampled trace is exported, not {unsampled}"
    );
    kill(&served.child, "TERM");
    assert!(wait_exit(&mut served.child, Duration::from_secs(20)).success());
}

/// Each HubSpot call is a span of its own, numbered, with HubSpot's status: three tries on
/// a failing HubSpot (503, retried), then one try marked throttled on a 429 (not retried),
/// whose server span is marked throttled too; the server span of a 5xx answer is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_hubspot_try_is_a_span() {
    let receiver = Receiver::start().await;
    let telemetry = format!("otlp_endpoint = \"http://{}\"", receiver.addr);
    let (mut served, sim) = gateway("tries", &telemetry).await;
    let auth = format!("Bearer {KEY}");
    let tries = |spans: &[Span]| {
        let mut tries: Vec<HashMap<String, String>> = named(spans, "HubSpot GET status")
            .into_iter()
            .map(attrs)
            .collect();
        tries.sort_by(|a, b| a.get("gateway.attempt").cmp(&b.get("gateway.attempt")));
        tries
    };
    let field = |a: &HashMap<String, String>, k: &str| a.get(k).cloned().unwrap_or_default();

    // Sets the simulator's faults, asks for `task` in trace `trace`, and returns the
    // answer and the trace's spans once `spans` of them arrived.
    let ask = |faults: serde_json::Value, task: &'static str, trace: &'static str, spans| {
        let (sim, served, receiver, auth) = (&sim, &served, &receiver, &auth);
        async move {
            support::faults(sim, faults).await;
            let traceparent = format!("00-{trace}-{CALLER_PARENT}-01");
            let headers = [
                ("authorization", auth.as_str()),
                ("traceparent", &traceparent),
            ];
            let reply = send(Method::GET, &status_url(served, task), &headers).await;
            (reply, receiver.trace(trace, spans).await)
        }
    };
    let failing = "1bf92f3577b34da6a3ce929d0e0e4736";
    let faults = serde_json::json!({ "fail_rate": 1.0, "fail_status": 503 });
    let (reply, spans) = ask(faults, "processing-tel-4", failing, 6).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    let server = server_span(&spans);
    let tries_seen = tries(&spans);
    assert_eq!(tries_seen.len(), 3, "{spans:#?}");
    for (i, t) in tries_seen.iter().enumerate() {
        assert_eq!(field(t, "gateway.attempt"), (i + 1).to_string());
        assert_eq!(field(t, "http.response.status_code"), "503");
        assert_eq!(field(t, "gateway.throttled"), "false");
    }
    assert!(
        named(&spans, "HubSpot GET status")
            .iter()
            .all(|t| t.parent_span_id == server.span_id)
    );
    assert_eq!(
        server.status.as_ref().map(|s| s.code),
        Some(opentelemetry_proto::tonic::trace::v1::status::StatusCode::Error as i32)
    );

    let throttled = "2bf92f3577b34da6a3ce929d0e0e4736";
    let faults =
        serde_json::json!({ "fail_rate": 0.0, "status_override": { "status": 429, "count": 1 } });
    let (reply, spans) = ask(faults, "processing-tel-5", throttled, 4).await;
    assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS);
    let tries_seen = tries(&spans);
    assert_eq!(tries_seen.len(), 1, "{spans:#?}");
    assert_eq!(field(&tries_seen[0], "http.response.status_code"), "429");
    assert_eq!(field(&tries_seen[0], "gateway.throttled"), "true");
    assert_eq!(
        field(&attrs(server_span(&spans)), "gateway.throttled"),
        "true"
    );
    kill(&served.child, "TERM");
    assert!(wait_exit(&mut served.child, Duration::from_secs(20)).success());
}

/// A receiver that refuses connections, or accepts and never answers, changes no answer and
/// delays none: every request is answered as without tracing, each well within the export
/// timeout; the spans that could not be sent are counted; SIGTERM still exits 0 promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_silent_receiver_changes_no_answer() {
    // Silent: accepts, reads nothing, answers nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("address");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    // Dead: a port nothing listens on any more.
    let dead_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("address")
    };
    for (name, addr) in [("silent", silent_addr), ("dead", dead_addr)] {
        let telemetry = format!("otlp_endpoint = \"http://{addr}\"\nexport_timeout = \"6s\"");
        let (mut served, _sim) = gateway(name, &telemetry).await;
        let auth = format!("Bearer {KEY}");
        // Enough requests to span several export rounds (one a second).
        for i in 0..8 {
            let started = Instant::now();
            let reply = send(
                Method::GET,
                &status_url(&served, "complete-tel-3"),
                &[("authorization", &auth)],
            )
            .await;
            let took = started.elapsed();
            assert_eq!(reply.status, StatusCode::OK, "{name}");
            assert_eq!(
                reply.header("x-cache"),
                if i == 0 { "MISS" } else { "HIT" },
                "{name}"
            );
            assert!(
                String::from_utf8_lossy(&reply.body).contains("COMPLETE"),
                "{name}"
            );
            // The export timeout is 6 s: a request that waited for an export would show it.
            assert!(took < Duration::from_secs(3), "{name}: {took:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let failed = "hubspot_gateway_trace_spans_dropped_total{reason=\"export_failed\"}";
        // A silent receiver fails an export only when its 6 s bound ends.
        wait_for_up_to(
            Duration::from_secs(20),
            || async { metric_at(&served.admin, failed).await.unwrap_or(0.0) > 0.0 },
            "failed exports counted",
        )
        .await;
        let started = Instant::now();
        kill(&served.child, "TERM");
        assert!(wait_exit(&mut served.child, Duration::from_secs(20)).success());
        // Drain (none open) plus at most one export bound for the flush, with room.
        assert!(started.elapsed() < Duration::from_secs(15), "{name}");
    }
}

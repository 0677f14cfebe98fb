//! The binary's logs as an operator reads them: `[log] format` (text, JSON), `[log] access`
//! (all, errors, off) independent of `RUST_LOG`, the access line's fields, the request id
//! shared by the line, the `X-Request-Id` header and an error body's `correlationId`, and a
//! writer that drops and counts lines rather than block requests.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use hubspot_sim::{RunningSimulator, SimConfig};
use hyper::{Method, StatusCode};
use serde_json::Value;
use support::*;

/// The private-app token the simulator accepts, with the required scopes.
const STATIC_TOKEN: &str = "pat-na1-logs-test-token";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// A running binary, its simulator and where its stderr goes.
struct Running {
    child: Child,
    service: String,
    log: PathBuf,
    dir: PathBuf,
    _sim: RunningSimulator,
}

impl Running {
    fn url(&self, task: &str) -> String {
        format!(
            "http://{}/files/v3/files/import-from-url/async/tasks/{task}/status",
            self.service
        )
    }

    /// SIGTERM, a clean exit, and the whole log (flushed at exit).
    async fn stop(mut self) -> String {
        kill(&self.child, "TERM");
        let status = wait_exit(&mut self.child, Duration::from_secs(60));
        assert!(status.success(), "{status:?}");
        let text = std::fs::read_to_string(&self.log).expect("log");
        let _ = std::fs::remove_dir_all(&self.dir);
        text
    }
}

/// A simulator, and the binary started against it with `log` as its `[log]` section,
/// `rust_log` as `RUST_LOG` and `stderr` as its stderr; the temp dir it runs in.
async fn spawn(
    name: &str,
    log: &str,
    rust_log: &str,
    stderr: impl FnOnce(&Path) -> Stdio,
) -> (Child, RunningSimulator, PathBuf) {
    let sim = simulator(SimConfig {
        rate_limit: None,
        static_token: Some(STATIC_TOKEN.into()),
        ..SimConfig::default()
    })
    .await;
    let dir = temp_dir(name);
    let token = r#"mode = "static"
static_token_env = "LOGS_TEST_TOKEN""#;
    let config = dir.join("gateway.toml");
    let text = format!("{}\n[log]\n{log}\n", config_toml(&sim.base_url(), token));
    std::fs::write(&config, text).expect("config");
    let child = std::process::Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("RUST_LOG", rust_log)
        .env("LOGS_TEST_TOKEN", STATIC_TOKEN)
        .stdout(Stdio::null())
        .stderr(stderr(&dir))
        .spawn()
        .expect("gateway starts");
    (child, sim, dir)
}

/// Starts the binary with its stderr in a file (see [`spawn`]) and waits until it is ready.
async fn run(name: &str, log: &str, rust_log: &str) -> Running {
    let log_file =
        |dir: &Path| Stdio::from(std::fs::File::create(dir.join("gateway.log")).expect("log file"));
    let (child, sim, dir) = spawn(name, log, rust_log, log_file).await;
    let log_path = dir.join("gateway.log");
    // The listening lines are INFO: with a quieter RUST_LOG, find the ports another way.
    let (service, admin) = listen_addrs(&log_path).await;
    let admin_url = format!("http://{admin}/readyz");
    wait_for(
        || async { send(Method::GET, &admin_url, &[]).await.status == StatusCode::OK },
        "ready",
    )
    .await;
    Running {
        child,
        service,
        log: log_path,
        dir,
        _sim: sim,
    }
}

/// A GET with the test key and the given `X-Request-Id`.
async fn get_as(url: &str, request_id: &str, extra: &[(&str, &str)]) -> Reply {
    let auth = format!("Bearer {KEY}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("x-request-id", request_id),
    ];
    headers.extend_from_slice(extra);
    send(Method::GET, url, &headers).await
}

/// Every line of a JSON log, parsed; a line that is not JSON fails the test.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// The access line whose `request_id` is `id`.
fn access_line<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    let found: Vec<&Value> = lines
        .iter()
        .filter(|l| l["target"] == "access" && l["request_id"] == id)
        .collect();
    assert_eq!(found.len(), 1, "one access line for {id}: {found:?}");
    found[0]
}

/// In JSON, every line parses; the access line of a miss carries the request id the caller
/// sent, client, method, route version, taskId, status, cache outcome, upstream tries,
/// duration in µs and the `traceparent`'s trace id; a hit says `hit` and 0 tries; a 401's
/// body `correlationId`, its `X-Request-Id` and its access line's request id are one id,
/// the gateway's own when the caller sent none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_lines_carry_every_field_and_the_request_id() {
    let gw = run("logs-json", "format = \"json\"\naccess = \"all\"", "info").await;
    let traceparent = format!("00-{TRACE_ID}-00f067aa0ba902b7-01");
    let miss = get_as(
        &gw.url("complete-json"),
        "caller-miss-1",
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.header("x-request-id"), "caller-miss-1");
    let hit = get_as(&gw.url("complete-json"), "caller-hit-1", &[]).await;
    assert_eq!(hit.header("x-cache"), "HIT");
    let refused = send(Method::GET, &gw.url("complete-json"), &[]).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let made = refused.header("x-request-id").to_owned();
    assert!(!made.is_empty(), "the gateway made a request id");
    assert_eq!(refused.json()["correlationId"], made.as_str());
    let text = gw.stop().await;
    let lines = json_lines(&text);

    let line = access_line(&lines, "caller-miss-1");
    for (field, want) in [
        ("level", Value::from("INFO")),
        ("client", "tests".into()),
        ("method", "GET".into()),
        ("version", "v3".into()),
        ("task_id", "complete-json".into()),
        ("status", 200.into()),
        ("cache", "miss".into()),
        ("upstream_tries", 1.into()),
        ("trace_id", TRACE_ID.into()),
    ] {
        assert_eq!(line[field], want, "{field} in {line}");
    }
    assert!(line["us"].as_u64().is_some_and(|us| us > 0), "{line}");
    assert!(line["timestamp"].is_string(), "{line}");

    let line = access_line(&lines, "caller-hit-1");
    assert_eq!(line["cache"], "hit", "{line}");
    assert_eq!(line["upstream_tries"], 0, "{line}");
    assert!(
        line.get("trace_id").is_none(),
        "no traceparent, no trace id: {line}"
    );

    let line = access_line(&lines, &made);
    assert_eq!(line["status"], 401, "{line}");
    assert_eq!(line["client"], "unauthenticated", "{line}");
    assert_eq!(line["cache"], "none", "{line}");
    assert_eq!(line["fault"], "Client", "{line}");
}

/// Every error body's `correlationId` is the caller's valid `X-Request-Id`, and an invalid
/// one (a control character is not sent by hyper, so: too long) is replaced by a fresh id
/// used in header and body alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_body_correlation_id_is_the_request_id() {
    let gw = run("logs-corr", "format = \"json\"", "info").await;
    let r = send(
        Method::GET,
        &gw.url("complete-c"),
        &[("x-request-id", "caller-401")],
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.header("x-request-id"), "caller-401");
    assert_eq!(r.json()["correlationId"], "caller-401");
    let r = get_as(&gw.url("bad%2Fid"), "caller-400", &[]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.json()["correlationId"], "caller-400");
    let long = "x".repeat(129);
    let r = get_as(&gw.url("missing-c"), &long, &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let made = r.header("x-request-id").to_owned();
    assert_ne!(made, long);
    let text = gw.stop().await;
    let lines = json_lines(&text);
    assert_eq!(access_line(&lines, "caller-401")["status"], 401);
    assert_eq!(access_line(&lines, "caller-400")["status"], 400);
    // HubSpot's own 404 is passed on as is (its body, its correlationId), but the access
    // line is the gateway's id, and it is logged as an error answer.
    let line = access_line(&lines, &made);
    assert_eq!(line["status"], 404);
    assert_eq!(line["upstream_tries"], 1);
}

/// A 200 with request id `ok-200`, a 401 with `refused-401`, then the whole log.
async fn a_200_and_a_401(gw: Running) -> String {
    let ok = get_as(&gw.url("complete-m"), "ok-200", &[]).await;
    assert_eq!(ok.status, StatusCode::OK);
    let headers = [("x-request-id", "refused-401")];
    let refused = send(Method::GET, &gw.url("complete-m"), &headers).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    gw.stop().await
}

/// `access = "errors"` logs the 401 but not the 200, even with `RUST_LOG=warn`, which hides
/// the INFO events of everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_mode_logs_refusals_only_whatever_rust_log_says() {
    let gw = run(
        "logs-errors",
        "access = \"errors\"",
        "warn,hubspot_files_gateway::server=info",
    )
    .await;
    let text = a_200_and_a_401(gw).await;
    let refused: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(r#"request_id="refused-401""#))
        .collect();
    assert_eq!(refused.len(), 1, "{text}");
    assert!(refused[0].contains("status=401"), "{}", refused[0]);
    assert!(!text.contains("ok-200"), "{text}");
    assert!(
        !text.contains("HubSpot token verified"),
        "RUST_LOG=warn hides INFO: {text}"
    );
}

/// `access = "off"` logs neither a 200 nor a 401, while `RUST_LOG` keeps the other events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_mode_logs_no_request() {
    let gw = run("logs-off", "access = \"off\"", "info").await;
    let text = a_200_and_a_401(gw).await;
    assert!(
        !text.contains("ok-200") && !text.contains("refused-401"),
        "{text}"
    );
    assert!(
        text.contains("HubSpot token verified"),
        "other INFO events stay: {text}"
    );
}

/// With stderr a pipe nobody reads, the writer's queue fills and lines are dropped, not
/// waited for: requests keep being answered, and the drops are counted in
/// `hubspot_gateway_log_lines_dropped_total` (0 before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_log_reader_never_blocks_a_request() {
    let (mut child, _sim, dir) = spawn("logs-stall", "format = \"json\"", "trace", |_| {
        Stdio::piped()
    })
    .await;
    // Read the log only until both listen addresses are in it, then never again (the pipe
    // stays open).
    let stderr = child.stderr.take().expect("piped");
    let (service, admin, stderr) = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut reader = std::io::BufReader::new(stderr);
        let (mut service, mut admin) = (None, None);
        let mut line = String::new();
        while service.is_none() || admin.is_none() {
            line.clear();
            let n = reader.read_line(&mut line).expect("read the log");
            assert!(n > 0, "the log ended before both listen addresses");
            let addr = || {
                let l: Value = serde_json::from_str(&line).expect("a JSON line");
                l["addr"].as_str().map(str::to_owned)
            };
            if line.contains("gateway listening") {
                service = addr();
            } else if line.contains("admin listening") {
                admin = addr();
            }
        }
        (service.expect("service"), admin.expect("admin"), reader)
    })
    .await
    .expect("join");
    let dropped = || async {
        let r = send(Method::GET, &format!("http://{admin}/metrics"), &[]).await;
        let text = String::from_utf8_lossy(&r.body).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("hubspot_gateway_log_lines_dropped_total "))
            .map(|v| v.trim().parse::<f64>().expect("a number"))
    };
    let ready = format!("http://{admin}/readyz");
    wait_for(
        || async {
            let client = client();
            let req = hyper::Request::get(&ready)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .expect("request");
            matches!(client.request(req).await, Ok(r) if r.status() == StatusCode::OK)
        },
        "ready",
    )
    .await;
    assert!(dropped().await.is_some(), "the counter exists from start");
    let url =
        format!("http://{service}/files/v3/files/import-from-url/async/tasks/complete-s/status");
    let client = client();
    let mut answered = 0u64;
    let mut total = None;
    // At least one line a request (its access line): past the queue's bound plus what the
    // pipe holds, lines are dropped. Each request must still be answered.
    let most = 3 * hubspot_files_gateway::log::BUFFERED_LINES / 100;
    for round in 0..most {
        let batch: Vec<_> = (0..100)
            .map(|_| {
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let reply = tokio::time::timeout(
                        Duration::from_secs(30),
                        send_with(
                            &client,
                            Method::GET,
                            &url,
                            &[("authorization", &format!("Bearer {KEY}"))],
                        ),
                    )
                    .await
                    .expect("answered while nobody reads the log");
                    reply.status
                })
            })
            .collect();
        for task in batch {
            assert_eq!(task.await.expect("join"), StatusCode::OK);
            answered += 1;
        }
        if round % 5 == 4 {
            total = dropped().await;
            if total.is_some_and(|n| n > 0.0) {
                break;
            }
        }
    }
    let total = total.expect("the counter");
    assert!(
        total > 0.0,
        "lines dropped after {answered} requests: {total}"
    );
    drop(stderr);
    kill(&child, "TERM");
    let _ = wait_exit(&mut child, Duration::from_secs(60));
    let _ = std::fs::remove_dir_all(dir);
}

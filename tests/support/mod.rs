//! Shared test helpers: start the simulator and a gateway on port 0, make requests, and run
//! the binary (its path, a temp dir, a config file, its log, signals).
#![allow(dead_code)]

pub mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hubspot_files_gateway::auth::hash_key;
use hubspot_files_gateway::config::{ClientConfig, Config, Credentials};
use hubspot_files_gateway::secret::Secret;
use hubspot_files_gateway::server::{self, Listeners};
use hubspot_sim::{self as simulator, RunningSimulator, SimConfig};
use hyper::header::HeaderMap;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The API key every test gateway accepts, as client `tests`.
pub const KEY: &str = "test-key-0123456789";

/// A gateway running in this process on loopback.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl TestGateway {
    /// URL of the status route for `task` on API version `v3`.
    pub fn status_url(&self, task: &str) -> String {
        format!(
            "http://{}/files/v3/files/import-from-url/async/tasks/{task}/status",
            self.addr
        )
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Asks for graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A config pointing at `upstream`, with one client (`tests`, key [`KEY`]).
pub fn config(upstream: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().expect("addr");
    c.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    c.server.shutdown_grace = Duration::from_secs(5);
    c.upstream.base_url = upstream
        .parse()
        .expect("the simulator URL is a valid base_url");
    c.upstream.request_timeout = Duration::from_secs(5);
    c.upstream.rate_limit.requests = 10_000;
    c.auth.clients = vec![ClientConfig {
        name: "tests".into(),
        key_sha256: Some(hash_key(KEY)),
        cert_cn: None,
        share: None,
    }];
    c
}

/// OAuth credentials the simulator accepts by default.
pub fn oauth() -> Credentials {
    Credentials::Oauth {
        client_id: Secret::new("test-client-id"),
        client_secret: Secret::new("test-client-secret-SECRET"),
        refresh_token: Secret::new("test-refresh-token-SECRET"),
    }
}

/// Starts a simulator with `sim` settings.
pub async fn simulator(sim: SimConfig) -> RunningSimulator {
    simulator::start(sim).await.expect("simulator starts")
}

/// Starts a gateway with `config` (listen addresses are replaced by port 0).
pub async fn gateway(config: Config, credentials: Credentials) -> TestGateway {
    let service = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let admin = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (addr, admin_addr) = (
        service.local_addr().expect("addr"),
        admin.local_addr().expect("addr"),
    );
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        server::run(config, credentials, Listeners { service, admin }, shutdown)
            .await
            .expect("gateway runs");
    });
    TestGateway {
        addr,
        admin: admin_addr,
        stop: Some(stop),
        task,
    }
}

/// A simulator with default settings and a ready gateway in front of it.
pub async fn start() -> (RunningSimulator, TestGateway) {
    start_with(SimConfig::default(), |_| {}).await
}

/// A simulator with `sim` settings and a ready gateway in front of it, its config (OAuth
/// credentials, one client) changed by `edit` first.
pub async fn start_with(
    sim: SimConfig,
    edit: impl FnOnce(&mut Config),
) -> (RunningSimulator, TestGateway) {
    let sim = simulator(sim).await;
    let mut cfg = config(&sim.base_url());
    edit(&mut cfg);
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    (sim, gw)
}

/// A response as a caller sees it.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

/// One plain-HTTP client shared by a test.
pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Sends `method url` with `headers` and reads the whole answer.
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)]) -> Reply {
    send_with(&client(), method, url, headers).await
}

pub async fn send_with(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let response = client
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("request answered");
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

/// GET with the test API key.
pub async fn get(url: &str) -> Reply {
    send(
        Method::GET,
        url,
        &[("authorization", &format!("Bearer {KEY}"))],
    )
    .await
}

/// The simulator's request counters.
pub async fn stats(sim: &RunningSimulator) -> serde_json::Value {
    send(Method::GET, &format!("{}/__sim/stats", sim.base_url()), &[])
        .await
        .json()
}

/// How many status requests the simulator has seen.
pub async fn status_requests(sim: &RunningSimulator) -> u64 {
    stats(sim).await["status_requests"]
        .as_u64()
        .expect("status_requests counter")
}

/// Changes the simulator's faults at run time.
pub async fn faults(sim: &RunningSimulator, json: serde_json::Value) {
    let client = client();
    let req = Request::post(format!("{}/__sim/faults", sim.base_url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json.to_string())))
        .expect("request");
    let status = client.request(req).await.expect("faults answered").status();
    assert!(status.is_success(), "faults rejected: {status}");
}

/// Polls `/readyz` until it answers 200 (10 s at most).
pub async fn wait_ready(gw: &TestGateway) {
    wait_for(
        || async {
            send(Method::GET, &gw.admin_url("/readyz"), &[])
                .await
                .status
                == StatusCode::OK
        },
        "gateway ready",
    )
    .await;
}

/// Polls `check` every 20 ms until it holds, failing after 10 s.
pub async fn wait_for<F, Fut>(check: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_for_up_to(Duration::from_secs(10), check, what).await;
}

/// Polls `check` every 20 ms until it holds, failing after `limit`.
pub async fn wait_for_up_to<F, Fut>(limit: Duration, mut check: F, what: &str)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line (exact name with labels) in the admin `/metrics` output.
pub async fn metric(gw: &TestGateway, series: &str) -> Option<f64> {
    metric_at(&gw.admin.to_string(), series).await
}

/// The value of a metric line (exact name with labels) on the admin port at `admin`.
pub async fn metric_at(admin: &str, series: &str) -> Option<f64> {
    let text = send(Method::GET, &format!("http://{admin}/metrics"), &[])
        .await
        .body;
    String::from_utf8_lossy(&text).lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok()).flatten()
    })
}

/// GETs every URL at once, one task each, with the test key on one shared client; returns the
/// answers in order.
pub async fn get_all(urls: Vec<String>) -> Vec<Reply> {
    get_all_with(std::sync::Arc::new(client()), urls).await
}

/// [`get_all`] on `client`, whose pooled connections (opened by an earlier wave) are reused.
pub async fn get_all_with(
    client: std::sync::Arc<Client<HttpConnector, Full<Bytes>>>,
    urls: Vec<String>,
) -> Vec<Reply> {
    let auth = std::sync::Arc::new(format!("Bearer {KEY}"));
    let calls: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let (client, auth) = (client.clone(), auth.clone());
            tokio::spawn(async move {
                send_with(&client, Method::GET, &url, &[("authorization", &auth)]).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(calls.len());
    for call in calls {
        replies.push(call.await.expect("caller task"));
    }
    replies
}

/// A shared client holding up to `n` open keep-alive connections to `gw`, opened by `n`
/// concurrent GETs of an invalid taskId (400 at the gateway, nothing sent to HubSpot). A crowd sent on it afterwards is requests only: on a loaded
/// machine opening hundreds of connections takes seconds, sending on open ones does not, so
/// the crowd overlaps one upstream call without depending on how fast sockets open. The
/// client may open a few more connections than it uses; those never send a request, so the
/// gateway closes them at `header_read_timeout` (10 s by default): send the crowd before
/// that, or raise it.
pub async fn warmed_client(
    gw: &TestGateway,
    n: usize,
) -> std::sync::Arc<Client<HttpConnector, Full<Bytes>>> {
    let client = std::sync::Arc::new(client());
    let warm = get_all_with(client.clone(), vec![gw.status_url("bad!id"); n]).await;
    assert!(
        warm.iter().all(|r| r.status == StatusCode::BAD_REQUEST),
        "an invalid taskId is refused at the gateway"
    );
    client
}

/// The status requests the simulator received, as it recorded them (method, path, query,
/// headers), oldest first.
pub async fn sim_requests(sim: &RunningSimulator) -> Vec<serde_json::Value> {
    sim_list(sim, "/__sim/requests").await
}

/// The JSON list a simulator control route (`/__sim/requests`, `/__sim/arrivals`) answers.
pub async fn sim_list(sim: &RunningSimulator, route: &str) -> Vec<serde_json::Value> {
    let seen = send(Method::GET, &format!("{}{route}", sim.base_url()), &[])
        .await
        .json();
    seen.as_array()
        .unwrap_or_else(|| panic!("{route} answers a list: {seen}"))
        .clone()
}

/// The gateway binary cargo built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_hubspot-files-gateway");

/// A fresh, empty directory for one test's files (per process, so test binaries never share).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hfg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// A gateway config file's text for `upstream`: loopback port-0 listeners, a budget tests
/// never exhaust, client `tests` with [`KEY`], and `token` as the `[token]` table's lines.
pub fn config_toml(upstream: &str, token: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "10s"
[upstream]
base_url = "{upstream}"
request_timeout = "10s"
rate_limit = {{ requests = 10000, per = "10s" }}
[token]
{token}
[[auth.clients]]
name = "tests"
key_sha256 = "{}"
"#,
        hash_key(KEY)
    )
}

/// The gateway binary running `serve --config` on port-0 listeners.
pub struct ServeChild {
    pub child: Child,
    pub service: String,
    pub admin: String,
    /// Its stderr lines after the two listening lines, as they are written (a thread drains
    /// the pipe, so the child never blocks on it).
    pub log: std::sync::mpsc::Receiver<String>,
}

/// Runs `command` (the binary, or a shell that execs it with its arguments) as `serve
/// --config config` at `RUST_LOG=info`, with the OAuth credentials of [`oauth`] in the `T_*`
/// variables the tests' configs name, and waits (20 s at most) for both listen addresses.
pub fn spawn_serve(mut command: Command, config: &Path) -> ServeChild {
    use std::io::BufRead;
    let mut child = command
        .args(["serve", "--config"])
        .arg(config)
        .env("T_CLIENT_ID", "test-client-id")
        .env("T_CLIENT_SECRET", "test-client-secret-SECRET")
        .env("T_REFRESH_TOKEN", "test-refresh-token-SECRET")
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("gateway binary starts");
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, log) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut service, mut admin) = (String::new(), String::new());
    // The two listeners log in either order.
    while service.is_empty() || admin.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = log
            .recv_timeout(left)
            .expect("the gateway logs both listen addresses within 20 s");
        let addr = || {
            line.split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
                .expect("addr= in the listening line")
        };
        if line.contains("gateway listening") {
            service = addr();
        } else if line.contains("admin listening") {
            admin = addr();
        }
    }
    ServeChild {
        child,
        service,
        admin,
        log,
    }
}

/// Waits until the log file the binary writes (text or JSON) names both listen addresses
/// (service, admin), which the binary chose itself since the config asks for port 0.
pub async fn listen_addrs(log: &Path) -> (String, String) {
    let (mut service, mut admin) = (None, None);
    wait_for(
        || {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let addr = |marker: &str| {
                text.lines()
                    .find(|l| l.contains(marker))
                    // `addr=...` in text lines, `"addr":"..."` in JSON lines.
                    .and_then(|l| {
                        (l.split("addr=").nth(1)).or_else(|| l.split(r#""addr":""#).nth(1))
                    })
                    .and_then(|r| r.split(|c: char| c.is_whitespace() || c == '"').next())
                    .map(str::to_owned)
            };
            service = addr("gateway listening");
            admin = addr("admin listening");
            let found = service.is_some() && admin.is_some();
            async move { found }
        },
        "listen addresses in the log",
    )
    .await;
    (service.expect("service"), admin.expect("admin"))
}

/// Sends `signal` (e.g. `TERM`, `INT`) to the child process.
pub fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{signal} failed");
}

/// Waits for the child to exit, failing after `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The most attempts a retry loop can make within `window` of its first attempt when it
/// waits at least `first` before the second and doubles the wait after every attempt (the
/// first attempt counts). A loop retrying without backoff makes many more; a slow machine
/// only fewer, so this bound holds however long the window turned out to be.
pub fn max_attempts_with_backoff(window: Duration, first: Duration) -> u64 {
    let (mut attempts, mut at, mut wait) = (1, Duration::ZERO, first);
    while at + wait <= window {
        at += wait;
        wait *= 2;
        attempts += 1;
    }
    attempts
}

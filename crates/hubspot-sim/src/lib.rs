//! The HubSpot stand-in: OAuth token endpoints, the Files import-status route and a
//! `/__sim/*` control surface, served over plain HTTP/1.1 and h2c, and the `simulate` command
//! line ([`cli`]) that the `hubspot-sim` binary and the gateway's `simulate` subcommand share.
//!
//! Files: `lib.rs` config, server and routing · `cli.rs` the `simulate` flags · `oauth.rs`
//! token endpoints · `files.rs` import and status · `state.rs` tokens, rate window, counters
//! · `faults.rs` injected faults · `control.rs` `/__sim/*` · `body.rs` HubSpot's response and
//! error bodies.
#![forbid(unsafe_code)]

mod body;
pub mod cli;
mod control;
mod faults;
mod files;
mod oauth;
mod state;

use std::fmt;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, HOST, HeaderValue};
use hyper::http::request::Parts;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

pub use faults::{FaultUpdate, Faults, RetryAfter, StatusOverride};
pub use state::{Arrival, RecordedRequest, Stats};

use body::{HubSpotError, SimResponse};
use files::Outcome;
use state::Sim;

/// Prefix of the v1 token-info route; the rest of the path is the token.
const ACCESS_TOKENS: &str = "/oauth/v1/access-tokens/";
/// The versions of the Files routes HubSpot publishes, numbered then dated.
const FILES_VERSIONS: [&str; 3] = ["v3", "2026-03", "2026-09"];
/// Largest request body the simulator reads (OAuth forms and import JSON are tiny).
const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `serve` waits for open connections after `shutdown` resolves.
const DRAIN: Duration = Duration::from_secs(5);

/// How the simulated HubSpot account behaves. Faults can also be changed while it runs
/// (`POST /__sim/faults`).
#[derive(Clone)]
pub struct SimConfig {
    /// Scopes granted to issued tokens and to the static token.
    pub scopes: Vec<String>,
    /// Lifetime of issued access tokens (`expires_in`).
    pub token_ttl: Duration,
    /// Rolling-window limit on authenticated Files calls: at most N per interval;
    /// `None` = unlimited (and no rate-limit headers).
    pub rate_limit: Option<(u32, Duration)>,
    /// Delay added to every status-route answer.
    pub latency: Duration,
    /// Share (0..=1) of status requests answered 503 with HubSpot's error body.
    pub fail_rate: f64,
    /// The only accepted client id; `None` = any non-empty one.
    pub client_id: Option<String>,
    /// The only accepted client secret; `None` = any non-empty one.
    pub client_secret: Option<String>,
    /// The only accepted refresh token; `None` = any non-empty one.
    pub refresh_token: Option<String>,
    /// A private-app token accepted as a bearer, with the same scopes, that never expires.
    pub static_token: Option<String>,
    /// The HubSpot account (hub) id tokens belong to.
    pub hub_id: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            scopes: vec!["files".to_owned(), "files.ui_hidden.read".to_owned()],
            token_ttl: Duration::from_secs(1800),
            rate_limit: Some((100, Duration::from_secs(10))),
            latency: Duration::ZERO,
            fail_rate: 0.0,
            client_id: None,
            client_secret: None,
            refresh_token: None,
            static_token: None,
            hub_id: 21_557_345,
        }
    }
}

impl fmt::Debug for SimConfig {
    /// Secrets print as `***` (or `None`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let masked = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("SimConfig")
            .field("scopes", &self.scopes)
            .field("token_ttl", &self.token_ttl)
            .field("rate_limit", &self.rate_limit)
            .field("latency", &self.latency)
            .field("fail_rate", &self.fail_rate)
            .field("client_id", &self.client_id)
            .field("client_secret", &masked(&self.client_secret))
            .field("refresh_token", &masked(&self.refresh_token))
            .field("static_token", &masked(&self.static_token))
            .field("hub_id", &self.hub_id)
            .finish()
    }
}

/// Parses a `--rate-limit` value such as `100/10s` (a bare number after `/` is seconds).
pub fn parse_rate_limit(s: &str) -> Result<(u32, Duration), String> {
    let (count, per) = s
        .split_once('/')
        .ok_or_else(|| format!("rate limit {s:?} is not of the form N/DURATION, e.g. 100/10s"))?;
    let count: u32 = count
        .trim()
        .parse()
        .map_err(|e| format!("rate limit count {count:?}: {e}"))?;
    let per = per.trim();
    let interval = match per.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => humantime::parse_duration(per)
            .map_err(|e| format!("rate limit interval {per:?}: {e}"))?,
    };
    if count == 0 || interval.is_zero() {
        return Err(format!(
            "rate limit {s:?} must allow at least one call per non-zero interval"
        ));
    }
    Ok((count, interval))
}

/// A running simulator: its address and a way to stop it. Dropping it stops the server too.
#[derive(Debug)]
pub struct RunningSimulator {
    /// Where it listens.
    pub addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl RunningSimulator {
    /// `http://IP:PORT`, the base URL to give a HubSpot client.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, drains open connections (bounded) and waits for the server to end.
    pub async fn stop(self) {
        // The server may already have ended; nothing to tell it then.
        let _ = self.shutdown.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "simulator ended with an error"),
            Err(error) => tracing::warn!(%error, "simulator task failed"),
        }
    }
}

/// Binds `127.0.0.1:0`, serves there in a spawned task and returns the handle.
pub async fn start(config: SimConfig) -> std::io::Result<RunningSimulator> {
    start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
}

/// Binds `addr`, serves there in a spawned task and returns the handle.
pub async fn start_on(addr: SocketAddr, config: SimConfig) -> std::io::Result<RunningSimulator> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (shutdown, stopped) = oneshot::channel::<()>();
    // A dropped sender also resolves `stopped`, so dropping the handle stops the server.
    let task = tokio::spawn(serve(listener, config, async {
        let _ = stopped.await;
    }));
    Ok(RunningSimulator {
        addr,
        shutdown,
        task,
    })
}

/// Serves on `listener` (HTTP/1.1 and h2c) until `shutdown` resolves, then drains open
/// connections for at most a few seconds. Binds nothing itself.
pub async fn serve(
    listener: TcpListener,
    config: SimConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let sim = Arc::new(Sim::new(config));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        // Usually out of file descriptors: back off instead of spinning.
                        tracing::warn!(%error, "simulator accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let sim = Arc::clone(&sim);
                let service = hyper::service::service_fn(move |request| {
                    let sim = Arc::clone(&sim);
                    async move { handle(&sim, local, request).await }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::debug!(%error, "simulator connection ended");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::debug!("simulator drain timed out");
    }
    Ok(())
}

/// The injected "connection reset": returning it makes hyper close the connection without
/// writing an answer, which is the fault we want the client to see.
#[derive(Debug)]
struct ConnectionReset;

impl fmt::Display for ConnectionReset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("connection reset injected by the simulator")
    }
}

impl std::error::Error for ConnectionReset {}

/// One request: read the body, route, then stamp the correlation id every answer carries.
async fn handle(
    sim: &Sim,
    local: SocketAddr,
    request: Request<Incoming>,
) -> Result<SimResponse, ConnectionReset> {
    let correlation = Uuid::new_v4();
    let (parts, body) = request.into_parts();
    let outcome = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => route(sim, local, &parts, &collected.to_bytes(), correlation).await,
        Err(_) => Outcome::Answer(
            HubSpotError::validation("Request body too large or unreadable")
                .into_response(correlation),
        ),
    };
    let Outcome::Answer(mut response) = outcome else {
        return Err(ConnectionReset);
    };
    response.headers_mut().insert(
        "x-hubspot-correlation-id",
        HeaderValue::from_str(&correlation.to_string()).expect("a UUID is a valid header value"),
    );
    if parts.method == Method::HEAD {
        // Same headers as GET, no body; the length is kept so HEAD tells the GET size.
        let length = response
            .body()
            .clone()
            .collect()
            .await
            .map_or(0, |b| b.to_bytes().len());
        response
            .headers_mut()
            .insert(CONTENT_LENGTH, HeaderValue::from(length));
        *response.body_mut() = Full::new(Bytes::new());
    }
    Ok(response)
}

/// Path → endpoint. Anything unknown is HubSpot's 404 body.
async fn route(
    sim: &Sim,
    local: SocketAddr,
    parts: &Parts,
    body: &Bytes,
    correlation: Uuid,
) -> Outcome {
    let method = &parts.method;
    let path = parts.uri.path();
    if path.starts_with("/__sim/")
        && let Some(response) = control::handle(sim, method, path, body, correlation)
    {
        return Outcome::Answer(response);
    }
    let oauth = oauth_route(path);
    if oauth.is_some() && method == Method::POST {
        // A path from the fixed list above, never a token: safe to show in the stats.
        *sim.lock()
            .stats
            .oauth_requests_by_path
            .entry(path.to_owned())
            .or_default() += 1;
    }
    let response = match (method, oauth, path) {
        (&Method::POST, Some(OauthRoute::Token), _) => oauth::token(sim, body, correlation).await,
        (&Method::POST, Some(OauthRoute::Introspect), _) => {
            oauth::introspect(sim, body, correlation).await
        }
        (&Method::POST, _, "/oauth/v2/private-apps/get/access-token-info") => {
            oauth::private_app_info(sim, body, correlation).await
        }
        (&Method::GET, _, _) if path.starts_with(ACCESS_TOKENS) => {
            // A path segment arrives percent-encoded; HubSpot looks up the decoded token.
            let raw = path.strip_prefix(ACCESS_TOKENS).unwrap_or_default();
            let token = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
            oauth::access_token_info(sim, &token, correlation).await
        }
        _ => match files_route(path) {
            Some((version, FilesRoute::Import)) if method == Method::POST => {
                let host = parts
                    .headers
                    .get(HOST)
                    .and_then(|h| h.to_str().ok())
                    .map_or_else(|| local.to_string(), str::to_owned);
                let base = format!("http://{host}/files/{version}/files/import-from-url/async");
                files::import(sim, &parts.headers, body, &base, correlation)
            }
            Some((_, FilesRoute::Status(task_id))) if files::is_status_method(method) => {
                let recorded = record(parts);
                return files::status(sim, recorded, &parts.headers, &task_id, correlation).await;
            }
            Some((_, FilesRoute::Import)) => not_allowed("POST", correlation),
            Some((_, FilesRoute::Status(_))) => not_allowed("GET, HEAD", correlation),
            None => HubSpotError::not_found(format!("No route for {method} {path}"))
                .into_response(correlation),
        },
    };
    Outcome::Answer(response)
}

/// The OAuth endpoints that differ only by version: the refresh grant (v1, v3, 2026-03,
/// 2026-09) and introspection (v3, 2026-03, 2026-09; v1 has the token-info route instead).
enum OauthRoute {
    Token,
    Introspect,
}

fn oauth_route(path: &str) -> Option<OauthRoute> {
    let (version, endpoint) = path.strip_prefix("/oauth/")?.split_once('/')?;
    match (version, endpoint) {
        ("v1" | "v3" | "2026-03" | "2026-09", "token") => Some(OauthRoute::Token),
        ("v3" | "2026-03" | "2026-09", "token/introspect") => Some(OauthRoute::Introspect),
        _ => None,
    }
}

/// The two Files routes the simulator serves, under `/files/{v3|2026-03|2026-09}/`.
enum FilesRoute {
    Import,
    Status(String),
}

fn files_route(path: &str) -> Option<(&str, FilesRoute)> {
    let rest = path.strip_prefix("/files/")?;
    let (version, rest) = rest.split_once('/')?;
    if !FILES_VERSIONS.contains(&version) {
        return None;
    }
    let rest = rest.strip_prefix("files/import-from-url/async")?;
    if rest.is_empty() {
        return Some((version, FilesRoute::Import));
    }
    let task = rest.strip_prefix("/tasks/")?.strip_suffix("/status")?;
    if task.is_empty() || task.contains('/') {
        return None;
    }
    // HubSpot's clients percent-encode the whole id; decode it once, as HubSpot does.
    let task = percent_encoding::percent_decode_str(task)
        .decode_utf8_lossy()
        .into_owned();
    Some((version, FilesRoute::Status(task)))
}

fn not_allowed(allow: &'static str, correlation: Uuid) -> SimResponse {
    let mut response = HubSpotError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "VALIDATION_ERROR",
        format!("Method not allowed; use {allow}"),
    )
    .into_response(correlation);
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

/// A status-route request as received, for `GET /__sim/requests`.
fn record(parts: &Parts) -> RecordedRequest {
    let mut headers = std::collections::BTreeMap::<String, String>::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_owned())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    RecordedRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
    }
}

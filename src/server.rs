//! Listeners: the service port (plain TCP or TLS), the admin port, accept loops, per-connection
//! deadlines and limits, and graceful shutdown. The caller binds the sockets and decides what
//! shutdown means.
//!
//! Every connection is watched from accept to close: it must send a complete request head
//! within `header_read_timeout` (TLS handshake and protocol detection included), it is closed
//! after `idle_timeout` without a request in progress, and an answer its peer does not take
//! within `send_timeout` (an HTTP/2 window left at 0, a socket it does not read) closes it.
//! Connections beyond the cap are closed at once, and a global bound on answers in progress
//! keeps stalled callers from holding memory without limit.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

use crate::auth::{Authenticator, PeerCertName};
use crate::cache::AnswerCache;
use crate::cluster::{ClusterBackend, ClusterConfig, ClusterMetrics};
use crate::config::{Config, Credentials, ServerConfig};
use crate::gateway::Gateway;
use crate::metrics::{ConnectionMetrics, Metrics};
use crate::reload::{ReloadSource, Reloader};
use crate::tls::{TlsError, TlsFiles, TlsHolder};
use crate::token::TokenManager;
use crate::upstream::HubSpot;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("TLS setup failed: {0}")]
    Tls(#[from] TlsError),
    #[error("HubSpot client setup failed: {0}")]
    Upstream(#[source] crate::upstream::SetupError),
    /// `[cluster]` cannot be used: its password is unreadable, or its URL or CA file cannot
    /// be set up. (A Redis that does not answer is not this: the gateway starts in local mode.)
    #[error("cluster backend setup failed: {0}")]
    Cluster(String),
}

/// The two bound sockets.
pub struct Listeners {
    pub service: TcpListener,
    pub admin: TcpListener,
}

/// Connections the admin port holds at most: probes and a scraper need a handful.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// File descriptors kept out of `max_connections` when it is derived from the file limit:
/// the admin port, HubSpot connections, and the one an over-cap connection needs until it is
/// closed.
const RESERVED_FDS: u64 = 256 + ADMIN_MAX_CONNECTIONS as u64;
/// How long an idle connection asked to close politely (HTTP/2 GOAWAY) may take to do so.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Raises the soft open-file limit to the hard limit and returns the limit in force, if the
/// platform has one.
pub fn raise_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => Some(limit),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE)
                .ok()
                .map(|(soft, _)| soft)
        }
    }
}

/// `server.max_connections`, or the file limit less a reserve when it is unset.
pub fn max_connections(configured: Option<u32>, file_limit: Option<u64>) -> usize {
    if let Some(n) = configured {
        return n as usize;
    }
    let limit = file_limit.unwrap_or(1024);
    let usable = if limit > 2 * RESERVED_FDS {
        limit - RESERVED_FDS
    } else {
        limit / 2
    };
    usable.clamp(16, 1_000_000) as usize
}

/// Runs the gateway until `shutdown` resolves, then drains for up to `shutdown_grace`.
pub async fn run(
    config: Config,
    credentials: Credentials,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    run_with_reload(config, credentials, listeners, shutdown, None).await
}

/// `run`, and with `reload` the clients and TLS files are read again on every message it
/// receives and whenever a file changes (see [`crate::reload`]).
pub async fn run_with_reload(
    config: Config,
    credentials: Credentials,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
    reload: Option<ReloadSource>,
) -> Result<(), RunError> {
    let tls = match TlsFiles::from_config(&config.server) {
        Some(files) => Some(TlsHolder::new(files.acceptor()?)),
        None => None,
    };
    let file_limit = raise_file_limit();
    let metrics = Metrics::new();
    let connection_metrics = metrics.register_connections();
    let cluster = match &config.cluster {
        Some(cluster) => Some(connect_cluster(cluster, &metrics).await?),
        None => None,
    };
    let hubspot = Arc::new(
        HubSpot::new(&config.upstream, metrics.clone(), cluster.clone())
            .map_err(RunError::Upstream)?,
    );
    let auth = Authenticator::new(&config.auth);
    let (tokens, refresher) = TokenManager::new(
        credentials,
        config.token.api,
        config.token.required_scopes.clone(),
        hubspot.clone(),
        metrics.clone(),
    );
    let reloader = reload.map(|source| {
        let reloader = Reloader::new(
            source.path,
            &config,
            auth.clone(),
            tls.clone(),
            metrics.clone(),
        );
        (reloader, source.requests)
    });
    let gateway = Arc::new(Gateway::new(
        auth,
        AnswerCache::new(&config.cache),
        tokens,
        hubspot,
        metrics,
        config.upstream.request_timeout,
        cluster,
    ));
    if config.auth.mode == crate::config::AuthMode::None {
        tracing::warn!("auth.mode = \"none\": every caller is accepted without credentials");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let service_limits = Limits::service(&config.server, file_limit);
    tracing::info!(
        max_connections = service_limits.max_connections,
        file_limit = file_limit.unwrap_or(0),
        "connection limits"
    );
    let refresh = tokio::spawn(refresher.run(stopped()));
    let admin = tokio::spawn(serve_admin(
        listeners.admin,
        gateway.clone(),
        Limits::admin(&config.server),
        connection_metrics.clone(),
        stopped(),
    ));
    let hub = tokio::spawn(follow_token_hub(gateway.clone(), stopped()));
    let reloading =
        reloader.map(|(reloader, requests)| tokio::spawn(reloader.run(requests, stopped())));

    tracing::info!(addr = %listeners.service.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "gateway listening");
    let service = {
        let gateway = gateway.clone();
        move |req: Request<Incoming>| gateway.clone().handle(req)
    };
    let gateway_for_shutdown = gateway.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested: readiness off, no new connections, draining");
        gateway_for_shutdown.begin_shutdown();
    };
    accept_loop(
        listeners.service,
        tls,
        service,
        service_limits,
        connection_metrics,
        shutdown,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = refresh.await;
    let _ = admin.await;
    let _ = hub.await;
    if let Some(reloading) = reloading {
        let _ = reloading.await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// The shared backend of `[cluster]`, its metrics on the gateway's registry. A Redis that
/// does not answer yet is no error: the backend starts down (local mode, logged once) and
/// comes up by itself when Redis answers.
async fn connect_cluster(
    config: &ClusterConfig,
    metrics: &Metrics,
) -> Result<Arc<ClusterBackend>, RunError> {
    let password = config
        .password(&|name| std::env::var(name).ok())
        .map_err(RunError::Cluster)?;
    let cluster_metrics = ClusterMetrics::register(metrics.registry())
        .map_err(|e| RunError::Cluster(format!("metrics: {e}")))?;
    let backend = ClusterBackend::connect(config.clone(), password, cluster_metrics)
        .await
        .map_err(|e| RunError::Cluster(e.to_string()))?;
    tracing::info!(
        prefix = %config.key_prefix,
        up = backend.is_up(),
        "cluster mode: budget, cache and flights shared through Redis"
    );
    Ok(Arc::new(backend))
}

/// The bounds one listener applies.
#[derive(Debug, Clone)]
struct Limits {
    /// The `port` label of the connection metrics.
    port: &'static str,
    header_read_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
    max_pending_responses: usize,
    http2_max_concurrent_streams: u32,
    max_header_bytes: usize,
}

impl Limits {
    fn service(server: &ServerConfig, file_limit: Option<u64>) -> Limits {
        Limits {
            port: "service",
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            send_timeout: server.send_timeout,
            shutdown_grace: server.shutdown_grace,
            max_connections: max_connections(server.max_connections, file_limit),
            max_pending_responses: server.max_pending_responses as usize,
            http2_max_concurrent_streams: server.http2_max_concurrent_streams,
            max_header_bytes: usize::try_from(server.max_header_bytes).unwrap_or(usize::MAX),
        }
    }

    /// The admin port keeps its own small cap, so a flood of the service port never reaches
    /// it, and the service port's deadlines.
    fn admin(server: &ServerConfig) -> Limits {
        Limits {
            port: "admin",
            shutdown_grace: Duration::from_secs(1),
            max_connections: ADMIN_MAX_CONNECTIONS,
            max_pending_responses: ADMIN_MAX_CONNECTIONS * 4,
            http2_max_concurrent_streams: 4,
            ..Limits::service(server, None)
        }
    }

    fn builder(&self) -> auto::Builder<TokioExecutor> {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // The watchdog keeps every deadline. hyper's own header timer also runs while a
            // keep-alive connection waits for its next request, so it closed idle
            // connections at `header_read_timeout` instead of `idle_timeout`.
            .header_read_timeout(None)
            // hyper's read buffer bounds the head; past it hyper answers 431 itself.
            .max_buf_size(self.max_header_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(self.http2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX))
            // Answers are small JSON documents: a stream never needs more queued than this.
            .max_send_buf_size(64 << 10)
            // Pings find peers that went away; idle_timeout closes the ones that answer.
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        builder
    }
}

/// What one listener's connections share.
struct Listener {
    limits: Limits,
    metrics: ConnectionMetrics,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<TlsHolder>,
    /// Requests from their head until their answer is taken, at most
    /// `limits.max_pending_responses`. A count, not a semaphore: nothing ever waits for it,
    /// and a semaphore's release takes a lock.
    pending: AtomicUsize,
}

/// Why the gateway closed a connection; the `reason` label of `connections_closed_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    HeadTimeout,
    IdleTimeout,
    SendTimeout,
    Shutdown,
}

impl Close {
    fn label(self) -> &'static str {
        match self {
            Close::HeadTimeout => "head_timeout",
            Close::IdleTimeout => "idle_timeout",
            Close::SendTimeout => "send_timeout",
            Close::Shutdown => "shutdown",
        }
    }
}

/// Accepts connections until `shutdown`, then waits for open ones up to the grace period.
async fn accept_loop<S, F>(
    listener: TcpListener,
    tls: Option<TlsHolder>,
    service: S,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let max = limits.max_connections;
    let shared = Arc::new(Listener {
        builder: limits.builder(),
        pending: AtomicUsize::new(0),
        limits,
        metrics,
        tls,
    });
    let connections = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let port = shared.limits.port;
    let mut failures: u64 = 0;
    let mut backoff = Duration::from_millis(5);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(e) => {
                    // Usually EMFILE: one line per burst and a counter, never a line per
                    // attempt, and a growing pause so the loop does not spin.
                    shared.metrics.accept_errors_total.with_label_values(&[port]).inc();
                    if failures == 0 {
                        tracing::warn!(error = %e, port, "accept failing; backing off until it recovers");
                    }
                    failures += 1;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if failures > 0 {
            tracing::info!(failures, port, "accept recovered");
            failures = 0;
            backoff = Duration::from_millis(5);
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Closing at once keeps the file descriptor free for callers already connected
            // and for the admin port.
            shared
                .metrics
                .rejected_total
                .with_label_values(&[port])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(
            shared.clone(),
            stream,
            service.clone(),
            permit,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let grace = shared.limits.shutdown_grace;
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    tokio::select! {
        _ = connections.acquire_many(all) => tracing::info!(port, "all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(port, grace_s = grace.as_secs_f64(), "shutdown grace elapsed; closing remaining connections"),
    }
}

/// One connection from accept to close, under its deadlines.
async fn serve_connection<S, F>(
    shared: Arc<Listener>,
    stream: TcpStream,
    service: S,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let metrics = &shared.metrics;
    let port = shared.limits.port;
    let open = metrics.open.with_label_values(&[port]);
    open.inc();
    let state = Arc::new(ConnState::new(Instant::now(), &shared.limits));
    let closed = match &shared.tls {
        None => {
            let svc = tracked(&shared, &state, service, None);
            drive(&shared, &state, TokioIo::new(stream), svc, &mut stop).await
        }
        // Boxed: the handshake and the TLS stream take several KiB that every plain
        // connection's task would otherwise carry as well (its size is the largest branch's).
        Some(holder) => {
            Box::pin(serve_tls(
                &shared, &state, holder, stream, service, &mut stop,
            ))
            .await
        }
    };
    if let Some(reason) = closed {
        metrics
            .closed_total
            .with_label_values(&[reason.label()])
            .inc();
    }
    open.dec();
}

/// A TLS connection: the handshake within the head deadline, then HTTP on the TLS stream.
async fn serve_tls<S, F>(
    shared: &Arc<Listener>,
    state: &Arc<ConnState>,
    holder: &TlsHolder,
    stream: TcpStream,
    service: S,
    stop: &mut watch::Receiver<bool>,
) -> Option<Close>
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    // Asked per connection: a reload changes the certificate for new connections
    // and leaves open ones alone.
    let acceptor = holder.acceptor();
    let head_deadline = state.accepted + shared.limits.header_read_timeout;
    let handshake = tokio::select! {
        done = acceptor.accept(stream) => match done {
            Ok(stream) => Ok(stream),
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                Err(None)
            }
        },
        _ = tokio::time::sleep_until(head_deadline) => Err(Some(Close::HeadTimeout)),
        _ = stop.wait_for(|s| *s) => Err(Some(Close::Shutdown)),
    };
    match handshake {
        Ok(stream) => {
            // The verified client certificate names the caller for every request
            // on this connection.
            let peer = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .map(|der| PeerCertName::from_der(der))
                .unwrap_or(PeerCertName(None));
            let svc = tracked(shared, state, service, Some(peer));
            drive(shared, state, TokioIo::new(stream), svc, stop).await
        }
        Err(reason) => reason,
    }
}

/// Serves HTTP on `io` until it ends or a deadline closes it; returns why the gateway
/// closed it, if it did.
async fn drive<I, Svc>(
    shared: &Listener,
    state: &ConnState,
    io: I,
    svc: Svc,
    stop: &mut watch::Receiver<bool>,
) -> Option<Close>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    Svc: hyper::service::Service<Request<Incoming>, Response = Response<Tracked>, Error = Infallible>
        + Send
        + 'static,
    Svc::Future: Send + 'static,
{
    let limits = &shared.limits;
    let conn = shared.builder.serve_connection(io, svc);
    tokio::pin!(conn);
    // Set once the connection was asked to close politely: it must be gone by then.
    let mut closing: Option<(Instant, Close)> = None;
    let mut stopping = false;
    // One timer for the connection's life, moved rather than made anew: registering a
    // timer per request cost more than anything else the watchdog does.
    let sleep = tokio::time::sleep_until(state.accepted + limits.header_read_timeout);
    tokio::pin!(sleep);
    let watchdog = Arc::new(WatchdogWake::default());
    let watchdog_waker = std::task::Waker::from(watchdog.clone());
    loop {
        let (deadline, reason) = match closing {
            Some(c) => c,
            None => {
                let now = Instant::now();
                let (deadline, reason) = state.deadline(limits);
                (state.sleep_until(now, deadline), reason)
            }
        };
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        let changed = state.changed.notified();
        let stop_now = stop.wait_for(|s| *s);
        tokio::pin!(changed, stop_now);
        // New futures: each must be polled once to be heard.
        watchdog.woken.store(true, Ordering::Release);
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(result));
            }
            // The watchdog's futures are polled only when one of them woke the task, not on
            // every wake a request's bytes bring (see `WatchdogWake`).
            watchdog.task.register(cx.waker());
            if !watchdog.woken.swap(false, Ordering::AcqRel) {
                return Poll::Pending;
            }
            let mut own = Context::from_waker(&watchdog_waker);
            if changed.as_mut().poll(&mut own).is_ready() {
                return Poll::Ready(Event::Changed);
            }
            if sleep.as_mut().poll(&mut own).is_ready() {
                return Poll::Ready(Event::Deadline);
            }
            if !stopping && stop_now.as_mut().poll(&mut own).is_ready() {
                return Poll::Ready(Event::Stop);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Ended(result) => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                if closing.is_some() {
                    return closing.map(|(_, reason)| reason);
                }
                // Ended by the peer, or by hyper for a deadline the watchdog also keeps.
                let (deadline, reason) = state.deadline(limits);
                return (deadline <= Instant::now()).then_some(reason);
            }
            Event::Changed => {}
            Event::Deadline => {
                if closing.is_some() {
                    return Some(reason);
                }
                // The state may have moved since the deadline was computed.
                let (now_deadline, now_reason) = state.deadline(limits);
                if now_deadline > Instant::now() {
                    continue;
                }
                match now_reason {
                    // Nothing in progress: a GOAWAY lets an HTTP/2 peer know not to retry on
                    // this connection; HTTP/1 closes at once.
                    Close::IdleTimeout => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some((Instant::now() + CLOSE_GRACE, Close::IdleTimeout));
                    }
                    other => return Some(other),
                }
            }
            Event::Stop => {
                stopping = true;
                if !state.busy() {
                    // Idle or still sending its head: nothing to finish, close now.
                    return Some(Close::Shutdown);
                }
                conn.as_mut().graceful_shutdown();
                closing = Some((Instant::now() + limits.shutdown_grace, Close::Shutdown));
            }
        }
    }
}

/// What woke a connection's watchdog.
enum Event {
    /// The connection ended, by the peer or an error.
    Ended(Result<(), Box<dyn std::error::Error + Send + Sync>>),
    /// A deadline moved earlier than the watchdog sleeps to.
    Changed,
    /// The watchdog's timer fired.
    Deadline,
    /// The listener is shutting down.
    Stop,
}

/// Lets a connection's task tell its watchdog's wakes (timer, deadline change, shutdown)
/// from the others: the watchdog's futures are polled with a waker of this, which notes
/// the wake and passes it on to the task. Polling all of them on every wake, as a
/// `select!` does, cost more per request than everything else the watchdog does.
#[derive(Default)]
struct WatchdogWake {
    woken: AtomicBool,
    task: futures_util::task::AtomicWaker,
}

impl std::task::Wake for WatchdogWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// What the watchdog of one connection knows about it.
struct ConnState {
    accepted: Instant,
    /// A complete request head has arrived.
    spoke: AtomicBool,
    /// Requests from their head until their answer is taken.
    in_progress: AtomicUsize,
    /// When `in_progress` last dropped to 0.
    idle_since: Mutex<Instant>,
    /// Answers produced and not yet taken: request number, since when. A few at most
    /// (one on HTTP/1), so a list rather than a map.
    waiting: Mutex<Vec<(u64, Instant)>>,
    next_id: AtomicU64,
    /// When the watchdog wakes next, in nanoseconds after `accepted`. A change whose own
    /// deadline falls before it wakes the watchdog; any other change leaves it asleep, so a
    /// request costs the watchdog nothing (see [`ConnState::sleep_until`]).
    wakes_at: AtomicU64,
    /// Wakes the watchdog when a deadline moves before `wakes_at`.
    changed: Notify,
    /// The listener's, for the deadlines a request's end starts.
    send_timeout: Duration,
    idle_timeout: Duration,
}

impl ConnState {
    fn new(accepted: Instant, limits: &Limits) -> ConnState {
        ConnState {
            accepted,
            spoke: AtomicBool::new(false),
            in_progress: AtomicUsize::new(0),
            idle_since: Mutex::new(accepted),
            waiting: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(0),
            // Until the watchdog first sleeps, every change wakes it.
            wakes_at: AtomicU64::new(u64::MAX),
            send_timeout: limits.send_timeout,
            idle_timeout: limits.idle_timeout,
            changed: Notify::new(),
        }
    }

    /// When the watchdog sleeps until, with `deadline` the next one in force: that deadline,
    /// or sooner, one step (the shorter of `send_timeout` and `idle_timeout`) from now. A
    /// change after now can only bring a deadline of its own at least a step away, so none
    /// needs to wake the watchdog: it wakes once a step at most, whatever the requests.
    fn sleep_until(&self, now: Instant, deadline: Instant) -> Instant {
        // A change racing this (its clock read before `now`, its write after the state was
        // read) may find `wakes_at` later than its deadline by the instants between the two:
        // it is then enforced that much late, never missed.
        let wake = deadline.min(now + self.send_timeout.min(self.idle_timeout));
        let nanos = u64::try_from(wake.saturating_duration_since(self.accepted).as_nanos())
            .unwrap_or(u64::MAX);
        self.wakes_at.store(nanos, Ordering::SeqCst);
        wake
    }

    /// Wakes the watchdog if `deadline` comes before it would wake by itself.
    fn wake_by(&self, deadline: Instant) {
        let nanos = u64::try_from(deadline.saturating_duration_since(self.accepted).as_nanos())
            .unwrap_or(u64::MAX);
        if nanos < self.wakes_at.load(Ordering::SeqCst) {
            self.changed.notify_one();
        }
    }

    fn busy(&self) -> bool {
        self.spoke.load(Ordering::Acquire) && self.in_progress.load(Ordering::Acquire) > 0
    }

    /// The next deadline and what it enforces.
    fn deadline(&self, limits: &Limits) -> (Instant, Close) {
        if !self.spoke.load(Ordering::Acquire) {
            return (
                self.accepted + limits.header_read_timeout,
                Close::HeadTimeout,
            );
        }
        if self.in_progress.load(Ordering::Acquire) == 0 {
            let since = *self.idle_since.lock().unwrap_or_else(|e| e.into_inner());
            return (since + limits.idle_timeout, Close::IdleTimeout);
        }
        let oldest = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(_, since)| *since)
            .min();
        match oldest {
            Some(since) => (since + limits.send_timeout, Close::SendTimeout),
            // Requests still being answered: the gateway's own deadlines bound them; the
            // watchdog looks again within a step, or sooner when one ends.
            None => (Instant::now() + limits.idle_timeout, Close::IdleTimeout),
        }
    }
}

impl Listener {
    /// Counts one more answer in progress, unless `max_pending_responses` already are.
    fn admit(&self) -> bool {
        let max = self.limits.max_pending_responses;
        let admitted = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.metrics.pending_responses.inc();
        }
        admitted
    }

    /// An answer admitted by [`Listener::admit`] was taken or dropped.
    fn release(&self) {
        self.pending.fetch_sub(1, Ordering::AcqRel);
        self.metrics.pending_responses.dec();
    }
}

/// One request, from its head until its answer is taken (or dropped with its stream).
struct InFlight {
    conn: Arc<ConnState>,
    id: u64,
    /// The listener that admitted it, when it did (a shed request is not counted there).
    admitted: Option<Arc<Listener>>,
}

impl InFlight {
    fn start(conn: &Arc<ConnState>, admitted: Option<Arc<Listener>>) -> InFlight {
        conn.in_progress.fetch_add(1, Ordering::AcqRel);
        // The head deadline no longer applies and no other starts here: the watchdog sleeps on.
        conn.spoke.store(true, Ordering::Release);
        InFlight {
            conn: conn.clone(),
            id: conn.next_id.fetch_add(1, Ordering::Relaxed),
            admitted,
        }
    }

    /// The answer exists: from now on, the peer has `send_timeout` to take it.
    fn answered(&self) {
        let now = Instant::now();
        self.conn
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((self.id, now));
        self.conn.wake_by(now + self.conn.send_timeout);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        {
            let mut waiting = self.conn.waiting.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(at) = waiting.iter().position(|(id, _)| *id == self.id) {
                waiting.swap_remove(at);
            }
        }
        // An answer taken only moves deadlines later, unless it leaves the connection idle.
        if self.conn.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            let now = Instant::now();
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = now;
            self.conn.wake_by(now + self.conn.idle_timeout);
        }
        if let Some(listener) = &self.admitted {
            listener.release();
        }
    }
}

/// An answer's body that keeps its request counted until hyper has taken all of it.
struct Tracked {
    inner: Full<Bytes>,
    _request: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps `service` so every request is counted on its connection and against the listener's
/// bound on answers in progress; past that bound the answer is a bodiless 503, which needs
/// no flow-control window to leave.
fn tracked<S, F>(
    shared: &Arc<Listener>,
    state: &Arc<ConnState>,
    service: S,
    peer: Option<PeerCertName>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, Infallible>> + Send + 'static,
> + Send
+ 'static
where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let shared = shared.clone();
    let state = state.clone();
    service_fn(move |mut req: Request<Incoming>| {
        if let Some(peer) = &peer {
            req.extensions_mut().insert(peer.clone());
        }
        let shed = !shared.admit();
        let request = InFlight::start(&state, (!shed).then(|| shared.clone()));
        let answer = (!shed).then(|| service(req));
        if shed {
            shared.metrics.shed_total.inc();
        }
        async move {
            let response = match answer {
                Some(answer) => answer.await?,
                None => overloaded(),
            };
            request.answered();
            Ok(response.map(|inner| Tracked {
                inner,
                _request: request,
            }))
        }
    })
}

/// The answer when too many answers are already waiting: no body, so it needs no window.
fn overloaded() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// Tells the gateway about every new token, so the cache follows the token's HubSpot account
/// the moment it changes, not at the next cache miss.
async fn follow_token_hub(gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let mut status = gateway.tokens().subscribe();
    tokio::pin!(shutdown);
    loop {
        let hub = status
            .borrow_and_update()
            .token
            .as_ref()
            .and_then(|t| t.hub_id);
        gateway.token_changed(hub);
        tokio::select! {
            _ = &mut shutdown => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}

/// The admin port: `/metrics`, `/healthz`, `/readyz`. Never the service port.
async fn serve_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    limits: Limits,
    metrics: ConnectionMetrics,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listening");
    let service = move |req: Request<Incoming>| {
        let gateway = gateway.clone();
        async move { Ok::<_, Infallible>(admin(&gateway, &req)) }
    };
    accept_loop(listener, None, service, limits, metrics, shutdown).await;
}

fn admin(gateway: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            gateway.render_metrics(),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "application/json",
            br#"{"status":"ok"}"#.to_vec(),
        ),
        (&Method::GET, "/readyz") => {
            let readiness = gateway.readiness();
            (readiness.status(), "application/json", readiness.to_json())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: try /metrics, /healthz, /readyz\n".to_vec(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plain connection's task does not carry the TLS path's state: an idle connection
    /// costs its task's size in memory, and with the TLS handshake and stream inline it was
    /// 7 KB (measured; now about 2.2 KB, most of it hyper's connection).
    #[tokio::test]
    async fn a_plain_connection_task_stays_small() {
        let server = ServerConfig::default();
        let limits = Limits::service(&server, None);
        let shared = Arc::new(Listener {
            builder: limits.builder(),
            pending: AtomicUsize::new(0),
            limits,
            metrics: Metrics::new().register_connections(),
            tls: None,
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (_stop_tx, stop_rx) = watch::channel(false);
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a permit");
        let service = |_req: Request<Incoming>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
        };
        let task = serve_connection(shared, stream, service, permit, stop_rx);
        let size = std::mem::size_of_val(&task);
        assert!(
            size <= 3 * 1024,
            "a plain connection's task is {size} bytes"
        );
    }
}

//! OpenTelemetry traces: the `[telemetry]` tracer, the spans of a request (server span, cache
//! lookup, token wait, each HubSpot try, Redis calls), W3C `traceparent` from callers, and the
//! export over OTLP/HTTP (protobuf) in the background.
//!
//! Off (no `[telemetry]`), nothing here builds a span: every entry point checks one
//! `OnceLock` and returns an empty handle. On, finished spans go to a bounded queue
//! ([`QUEUED_SPANS`]) that a task of its own exports in batches; a span that finds the queue
//! full is dropped, never waited for, and counted (`hubspot_gateway_trace_spans_dropped_total`),
//! so a dead or slow receiver never delays a request. The exporter speaks through our own
//! hyper client over rustls with *ring* (no reqwest, no tonic, no OpenSSL, no aws-lc-rs).
//!
//! `traceparent` is not sent to HubSpot: HubSpot ignores it, and it would hand a third party
//! our span ids for nothing; `X-Request-Id` already correlates a call with HubSpot's side.

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::HeaderMap;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::{Context, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use tokio::sync::{mpsc, watch};

use crate::config::TelemetryConfig;

/// Finished spans waiting for export; past this they are dropped and counted.
pub const QUEUED_SPANS: usize = 4096;
/// Spans sent in one export request at most.
const BATCH: usize = 512;
/// How long a finished span waits for its batch to fill before it is sent anyway.
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// The largest receiver answer read (an OTLP answer is a few bytes).
const MAX_ANSWER: usize = 64 << 10;
/// The server span's name for the status route (`{method} {http.route}`, as the HTTP
/// semantic conventions name server spans).
pub const ROUTE: &str = "/files/{version}/files/import-from-url/async/tasks/{taskId}/status";

static TRACER: OnceLock<SdkTracer> = OnceLock::new();
static DROPPED_QUEUE_FULL: AtomicU64 = AtomicU64::new(0);
static DROPPED_EXPORT_FAILED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are built (a `[telemetry]` table was configured and [`init`] ran).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// `trace_spans_dropped_total{reason}` (`queue_full`, `export_failed`): both series exist at
/// 0 from start, and are brought up to this module's counts at each scrape, so a span costs
/// no metric update.
pub struct DroppedSpans(prometheus::IntCounterVec);

impl DroppedSpans {
    /// The collector, for the registry.
    pub fn new() -> DroppedSpans {
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "trace_spans_dropped_total",
                "Finished spans not delivered to the OTLP receiver: its queue was full, or the export failed.",
            )
            .namespace(crate::metrics::PREFIX),
            &["reason"],
        )
        .expect("static metric definition");
        for reason in ["queue_full", "export_failed"] {
            counter.with_label_values(&[reason]);
        }
        DroppedSpans(counter)
    }
}

impl Default for DroppedSpans {
    fn default() -> Self {
        DroppedSpans::new()
    }
}

impl prometheus::core::Collector for DroppedSpans {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        for (reason, count) in [
            ("queue_full", &DROPPED_QUEUE_FULL),
            ("export_failed", &DROPPED_EXPORT_FAILED),
        ] {
            let series = self.0.with_label_values(&[reason]);
            let (now, seen) = (count.load(Ordering::Relaxed), series.get());
            if now > seen {
                series.inc_by(now - seen);
            }
        }
        self.0.collect()
    }
}

/// `<endpoint>/v1/traces` for an `http(s)://host[:port][/prefix]` endpoint; `None` for
/// anything else (another scheme, a user or password, a query or fragment).
pub fn traces_url(endpoint: &str) -> Option<String> {
    let uri: hyper::Uri = endpoint.parse().ok()?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority()?;
    let clean = !authority.as_str().contains('@')
        && !authority.host().is_empty()
        && uri.query().is_none()
        && !endpoint.contains('#');
    (scheme_ok && clean).then(|| format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry.otlp_endpoint is not a usable URL")]
    Endpoint,
    #[error("cannot set up TLS for the OTLP receiver: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("tracing was already started in this process")]
    AlreadyStarted,
}

/// The running exporter: keep it until exit and call [`Telemetry::shutdown`] to flush.
pub struct Telemetry {
    provider: SdkTracerProvider,
    stop: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<()>,
    flush_bound: Duration,
}

/// Starts tracing for this process. Call once, inside the tokio runtime.
pub fn init(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
    use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
    let url = traces_url(&config.otlp_endpoint).ok_or(TelemetryError::Endpoint)?;
    let client = ExportClient::new(config.export_timeout)?;
    // Headers for the receiver, if it needs any, come from the standard
    // OTEL_EXPORTER_OTLP_(TRACES_)HEADERS variables, which the exporter reads itself.
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(config.export_timeout)
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let resource = Resource::builder_empty()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(QUEUED_SPANS);
    let (stop, stopped) = watch::channel(false);
    let worker = tokio::spawn(export_loop(rx, exporter, stopped, config.export_timeout));
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_span_processor(Queue { tx })
        .build();
    TRACER
        .set(provider.tracer("hubspot-files-gateway"))
        .map_err(|_| TelemetryError::AlreadyStarted)?;
    Ok(Telemetry {
        provider,
        stop,
        worker,
        flush_bound: config.export_timeout,
    })
}

impl Telemetry {
    /// Sends the spans still queued, within `export_timeout`, then stops the exporter.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(self.flush_bound, self.worker)
            .await
            .is_err()
        {
            tracing::warn!(
                bound_s = self.flush_bound.as_secs_f64(),
                "trace export did not finish within telemetry.export_timeout at shutdown; remaining spans dropped"
            );
        }
        // The queue's worker is gone; this only releases the provider's processors.
        let _ = self.provider.shutdown();
    }
}

/// The span processor: finished spans go to the export queue, or are counted as dropped.
#[derive(Debug)]
struct Queue {
    tx: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            DROPPED_QUEUE_FULL.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        // The flush at shutdown is `Telemetry::shutdown`, which can await it.
        Ok(())
    }
}

/// Collects finished spans into batches and exports each, one at a time, until `stop`;
/// then exports what is still queued.
async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    mut stop: watch::Receiver<bool>,
    timeout: Duration,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            span = rx.recv() => match span {
                Some(span) => {
                    batch.push(span);
                    if batch.len() >= BATCH {
                        export(&exporter, &mut batch, timeout).await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => export(&exporter, &mut batch, timeout).await,
            // Only `Telemetry::shutdown` sends, and a dropped sender means the same.
            _ = stop.changed() => break,
        }
    }
    while let Ok(span) = rx.try_recv() {
        batch.push(span);
        if batch.len() >= BATCH {
            export(&exporter, &mut batch, timeout).await;
        }
    }
    export(&exporter, &mut batch, timeout).await;
}

/// Sends `batch` (emptying it); a failed or late export counts its spans as dropped and is
/// said once, not once per batch, until an export succeeds again.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    timeout: Duration,
) {
    static FAILING: AtomicBool = AtomicBool::new(false);
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::replace(batch, Vec::with_capacity(BATCH));
    let count = spans.len() as u64;
    // The exporter bounds its own tries by `timeout`; this bounds everything else.
    let result = tokio::time::timeout(timeout + Duration::from_secs(1), exporter.export(spans))
        .await
        .map_err(|_| "timed out".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    match result {
        Ok(()) => {
            if FAILING.swap(false, Ordering::Relaxed) {
                tracing::info!("trace export works again");
            }
        }
        Err(error) => {
            DROPPED_EXPORT_FAILED.fetch_add(count, Ordering::Relaxed);
            if !FAILING.swap(true, Ordering::Relaxed) {
                tracing::warn!(%error, spans = count, "trace export failed; spans are dropped until the receiver answers");
            }
        }
    }
}

/// The exporter's HTTP client: hyper over rustls with the ring provider, as for HubSpot.
#[derive(Debug, Clone)]
struct ExportClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl ExportClient {
    fn new(timeout: Duration) -> Result<ExportClient, rustls::Error> {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
            .https_or_http()
            .enable_all_versions()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(https);
        Ok(ExportClient { client, timeout })
    }
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for ExportClient {
    async fn send_bytes(
        &self,
        request: opentelemetry_http::Request<Bytes>,
    ) -> Result<opentelemetry_http::Response<Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let request = hyper::Request::from_parts(parts, Full::new(body));
        let send = async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_ANSWER).collect().await?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(opentelemetry_http::Response::from_parts(
                parts, body,
            ))
        };
        tokio::time::timeout(self.timeout, send)
            .await
            .map_err(|_| "the OTLP receiver did not answer in time")?
    }
}

/// The server span of one request, and the context its children hang from.
pub struct RequestSpan {
    cx: Context,
    method: &'static str,
}

/// What the server span records once the answer is known.
pub struct Outcome<'a> {
    /// The status route's version the caller used, when the path was the route.
    pub version: Option<&'a str>,
    pub task_id: Option<&'a str>,
    pub status: u16,
    /// `hit`, `miss`, `coalesced`, `stale` or `none`.
    pub cache: &'static str,
    pub client: &'a str,
    /// The error's category (HubSpot's error shape) when the gateway refused.
    pub error: Option<&'static str>,
}

impl RequestSpan {
    /// The server span for a request, child of the caller's `traceparent` when it sent one
    /// valid header (an invalid one is ignored: a new trace starts). `None` when off.
    pub fn start(method: &hyper::Method, headers: &HeaderMap, request_id: &str) -> Option<Self> {
        let tracer = TRACER.get()?;
        let parent = if crate::log::trace_id(headers).is_some() {
            TraceContextPropagator::new().extract_with_context(
                &Context::new(),
                &opentelemetry_http::HeaderExtractor(headers),
            )
        } else {
            Context::new()
        };
        let method = method_label(method);
        let span = tracer
            .span_builder(method)
            .with_kind(SpanKind::Server)
            .with_attributes([
                KeyValue::new("http.request.method", method),
                KeyValue::new("gateway.request_id", request_id.to_owned()),
            ])
            .start_with_context(tracer, &parent);
        Some(RequestSpan {
            cx: parent.with_span(span),
            method,
        })
    }

    /// The context to run the request's work in, so its spans are children of this one.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// The trace id as 32 lowercase hex digits (the access line's `trace_id`).
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.cx.span().span_context().trace_id())
    }

    /// Records the answer and ends the span.
    pub fn finish(self, outcome: Outcome<'_>) {
        let span = self.cx.span();
        if let (Some(version), Some(task_id)) = (outcome.version, outcome.task_id) {
            span.update_name(format!("{} {ROUTE}", self.method));
            span.set_attribute(KeyValue::new("http.route", ROUTE));
            span.set_attribute(KeyValue::new("gateway.api_version", version.to_owned()));
            span.set_attribute(KeyValue::new("gateway.task_id", task_id.to_owned()));
        }
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(outcome.status),
        ));
        span.set_attribute(KeyValue::new("gateway.cache", outcome.cache));
        // HubSpot's 429, its hold or the gateway's budget: the caller was told to wait.
        span.set_attribute(KeyValue::new("gateway.throttled", outcome.status == 429));
        span.set_attribute(KeyValue::new("gateway.client", outcome.client.to_owned()));
        if let Some(category) = outcome.error {
            span.set_attribute(KeyValue::new("error.type", category));
        }
        // Server spans are errors for 5xx only: a 4xx is the caller's problem.
        if outcome.status >= 500 {
            span.set_status(Status::error(
                outcome.error.unwrap_or("upstream error").to_owned(),
            ));
        }
        span.end();
    }
}

/// The server span's `error.type` for a refusal: who caused it.
pub fn fault_label(fault: crate::error::Fault) -> &'static str {
    use crate::error::Fault;
    match fault {
        Fault::Client => "client",
        Fault::Credential => "credential",
        Fault::Upstream => "upstream",
        Fault::Internal => "internal",
    }
}

/// The cache lookup span's outcome: stored, leading a new fetch, or following one.
pub fn flight_label<E>(flight: &crate::cache::Flight<E>) -> &'static str {
    use crate::cache::Flight;
    match flight {
        Flight::Hit(_) => "hit",
        Flight::Lead(_) => "lead",
        Flight::Follow(..) => "follow",
    }
}

/// The method as the HTTP semantic conventions name it: the known ones, else `_OTHER`.
fn method_label(method: &hyper::Method) -> &'static str {
    match *method {
        hyper::Method::GET => "GET",
        hyper::Method::HEAD => "HEAD",
        hyper::Method::POST => "POST",
        hyper::Method::PUT => "PUT",
        hyper::Method::DELETE => "DELETE",
        hyper::Method::PATCH => "PATCH",
        hyper::Method::OPTIONS => "OPTIONS",
        hyper::Method::TRACE => "TRACE",
        hyper::Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// A span inside a request (cache lookup, token wait, a HubSpot try, a Redis call), child of
/// the context current where it starts. Empty when off; ended when dropped. Boxed, so when
/// off it is a pointer's size rather than a whole span's, moved around for nothing.
pub struct Child(Option<Box<opentelemetry_sdk::trace::Span>>);

impl Child {
    /// Records `key = value` on the span (nothing when off).
    pub fn set(&mut self, key: &'static str, value: impl Into<Value>) {
        use opentelemetry::trace::Span as _;
        if let Some(span) = &mut self.0 {
            span.set_attribute(KeyValue::new(key, value));
        }
    }
}

/// Starts a child span of the current context (see [`Child`]). Outside a request (no span
/// in the current context, e.g. a background lease renewal) nothing is built: such work
/// would otherwise start a trace of its own every time.
pub fn child(name: &'static str, kind: SpanKind) -> Child {
    Child(TRACER.get().and_then(|tracer| {
        let cx = Context::current();
        cx.has_active_span().then(|| {
            Box::new(
                tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .start_with_context(tracer, &cx),
            )
        })
    }))
}

/// The current context, to carry into a spawned task with [`within`]; `None` when off.
pub fn current() -> Option<Context> {
    enabled().then(Context::current)
}

/// Runs `work` with `cx` as its current context, so spans it starts are children of it.
pub async fn within<F: Future>(cx: Option<Context>, work: F) -> F::Output {
    match cx {
        Some(cx) => work.with_context(cx).await,
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only plain http(s) URLs become a traces URL, with `/v1/traces` appended once.
    #[test]
    fn traces_url_accepts_plain_http_urls_only() {
        assert_eq!(
            traces_url("http://otel-collector:4318").as_deref(),
            Some("http://otel-collector:4318/v1/traces")
        );
        assert_eq!(
            traces_url("https://otel.example.com/prefix/").as_deref(),
            Some("https://otel.example.com/prefix/v1/traces")
        );
        for bad in [
            "otel-collector:4318",
            "ftp://otel:21",
            "http://user:pw@otel:4318",
            "http://otel:4318/?k=v",
            "http://otel:4318/#x",
            "",
            "http://",
        ] {
            assert_eq!(traces_url(bad), None, "{bad}");
        }
    }

    /// A full queue drops the span at once, without waiting, and counts it.
    #[test]
    fn a_full_queue_drops_and_counts() {
        use opentelemetry::trace::SpanContext;
        let (tx, mut rx) = mpsc::channel(1);
        let queue = Queue { tx };
        let span = || SpanData {
            span_context: SpanContext::empty_context(),
            parent_span_id: opentelemetry::trace::SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: "cache lookup".into(),
            start_time: std::time::SystemTime::now(),
            end_time: std::time::SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: Default::default(),
        };
        let before = DROPPED_QUEUE_FULL.load(Ordering::Relaxed);
        queue.on_end(span());
        queue.on_end(span());
        queue.on_end(span());
        assert_eq!(DROPPED_QUEUE_FULL.load(Ordering::Relaxed) - before, 2);
        assert!(rx.try_recv().is_ok() && rx.try_recv().is_err());
        let text = {
            use prometheus::core::Collector;
            let families = DroppedSpans::new().collect();
            format!("{families:?}")
        };
        assert!(text.contains("queue_full") && text.contains("export_failed"));
    }

    /// Off, no span is built and no context is carried.
    #[test]
    fn off_builds_nothing() {
        assert!(!enabled());
        assert!(child("cache lookup", SpanKind::Internal).0.is_none());
        assert!(current().is_none());
        let headers = HeaderMap::new();
        assert!(RequestSpan::start(&hyper::Method::GET, &headers, "id").is_none());
    }
}

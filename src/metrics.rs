//! Prometheus metrics: one registry owned by `Metrics`, passed to whoever records, and the
//! pre-resolved series of the request path's common answers.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::auth::AuthError;
use crate::budget::ThrottleSource;
use crate::cache::CacheOutcome;
use crate::token::ForceReason;
use crate::upstream::Policy;
use hyper::StatusCode;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub(crate) const PREFIX: &str = "hubspot_gateway";

/// Every metric family the gateway exports. Label values are bounded: client names come from
/// the config, codes are HTTP codes, nothing comes from a request's text.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration_seconds: HistogramVec,
    pub upstream_requests_total: IntCounterVec,
    pub upstream_request_duration_seconds: Histogram,
    pub upstream_throttled_total: IntCounterVec,
    pub upstream_ratelimit_remaining: IntGauge,
    pub cache_entries: IntGauge,
    pub cache_weight_bytes: IntGauge,
    pub coalesced_requests_total: IntCounter,
    pub token_refreshes_total: IntCounterVec,
    pub token_expiry_timestamp_seconds: Gauge,
    pub token_scopes_verified: IntGauge,
    pub inbound_auth_failures_total: IntCounterVec,
    pub build_info: IntGaugeVec,
    pub token_forced_refreshes_total: IntCounterVec,
    pub token_rotation_failed: IntGauge,
    /// Refresh grants HubSpot answered with a different refresh token than the one sent.
    pub token_refresh_token_rotated_total: IntCounter,
    // Live reload of the config, client keys and TLS files.
    /// Reloads by `result`: `applied` or `refused` (the running config kept serving).
    pub config_reloads_total: IntCounterVec,
    /// Unix time of the last config that loaded and went into service (start-up included).
    pub config_last_load_timestamp_seconds: Gauge,
    /// HubSpot's 429s by the `policyName` they carry (bounded: see [`Policy`]).
    pub upstream_429_total: IntCounterVec,
    /// Calls the outbound budget allows right now.
    pub upstream_budget_remaining: IntGauge,
    /// Calls the outbound budget allows per window.
    pub upstream_budget_limit: IntGauge,
    /// Seconds until the hold after a HubSpot 429 ends; 0 when none is in force.
    pub upstream_hold_seconds: Gauge,
    /// HubSpot calls each client's requests caused (a flight's leader is charged), by
    /// `client`.
    pub client_upstream_calls_total: IntCounterVec,
    /// Calls refused because the client's `share` of the budget was spent, by `client`.
    pub client_share_refusals_total: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

impl Metrics {
    /// Creates and registers every family, process metrics included.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help).namespace(PREFIX), labels)
                .expect("static metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("each name registered once");
            c
        };
        let int_gauge = |name: &str, help: &str| {
            let g = IntGauge::with_opts(Opts::new(name, help).namespace(PREFIX))
                .expect("static metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("each name registered once");
            g
        };
        let requests_total = counter(
            "requests_total",
            "Requests answered, by client name, HTTP code and cache outcome.",
            &["client", "code", "cache"],
        );
        let request_duration_seconds = HistogramVec::new(
            HistogramOpts::new("request_duration_seconds", "Time to answer a request.")
                .namespace(PREFIX)
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["cache"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(request_duration_seconds.clone()))
            .expect("each name registered once");
        let upstream_requests_total = counter(
            "upstream_requests_total",
            "Requests sent to HubSpot, by HTTP code or `error`.",
            &["code"],
        );
        let upstream_request_duration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "upstream_request_duration_seconds",
                "Time HubSpot took to answer.",
            )
            .namespace(PREFIX)
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(upstream_request_duration_seconds.clone()))
            .expect("each name registered once");
        let upstream_throttled_total = counter(
            "upstream_throttled_total",
            "Upstream calls held back: `hubspot_429` (HubSpot said so) or `local_budget`.",
            &["source"],
        );
        let upstream_ratelimit_remaining = int_gauge(
            "upstream_ratelimit_remaining",
            "X-HubSpot-RateLimit-Remaining of the latest answer.",
        );
        let cache_entries = int_gauge("cache_entries", "Answers in the cache.");
        let cache_weight_bytes = int_gauge("cache_weight_bytes", "Weight of the cache in bytes.");
        let coalesced_requests_total = IntCounter::with_opts(
            Opts::new(
                "coalesced_requests_total",
                "Requests answered by another request's upstream call.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(coalesced_requests_total.clone()))
            .expect("each name registered once");
        let token_refreshes_total = counter(
            "token_refreshes_total",
            "HubSpot token refreshes (with verification), by result.",
            &["result"],
        );
        let token_expiry_timestamp_seconds = Gauge::with_opts(
            Opts::new(
                "token_expiry_timestamp_seconds",
                "Unix time at which the current HubSpot token expires.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(token_expiry_timestamp_seconds.clone()))
            .expect("each name registered once");
        let token_scopes_verified = int_gauge(
            "token_scopes_verified",
            "1 while the current token is verified to carry every required scope.",
        );
        let inbound_auth_failures_total = counter(
            "inbound_auth_failures_total",
            "Callers refused, by reason.",
            &["reason"],
        );
        let build_info = IntGaugeVec::new(
            Opts::new(
                "build_info",
                "Always 1; the version label says which build.",
            )
            .namespace(PREFIX),
            &["version"],
        )
        .expect("static metric definition");
        registry
            .register(Box::new(build_info.clone()))
            .expect("each name registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let token_forced_refreshes_total = counter(
            "token_forced_refreshes_total",
            "Token refreshes or re-verifications forced by HubSpot's answer: `upstream_401` (token refused) or `upstream_403` (MISSING_SCOPES).",
            &["reason"],
        );
        let token_rotation_failed = int_gauge(
            "token_rotation_failed",
            "1 while the static token file holds a token that could not be read or verified; the last verified token stays in service.",
        );
        let token_refresh_token_rotated_total = IntCounter::with_opts(
            Opts::new(
                "token_refresh_token_rotated_total",
                "Refresh grants HubSpot answered with a new refresh token. With several replicas each holding its own copy, any increase means they must share one refresher.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(token_refresh_token_rotated_total.clone()))
            .expect("each name registered once");
        // Live reload: both results exist from the start, so a dashboard sees 0, not nothing.
        let config_reloads_total = counter(
            "config_reloads_total",
            "Config reloads (SIGHUP or a changed file), by result: `applied` or `refused`.",
            &["result"],
        );
        for result in crate::reload::RESULTS {
            config_reloads_total.with_label_values(&[result]);
        }
        let config_last_load_timestamp_seconds = Gauge::with_opts(
            Opts::new(
                "config_last_load_timestamp_seconds",
                "Unix time of the last config that went into service, start-up included.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(config_last_load_timestamp_seconds.clone()))
            .expect("each name registered once");
        // HubSpot's throttling, read exactly: 429s by policy, the budget, the hold.
        let upstream_429_total = counter(
            "upstream_429_total",
            "HubSpot 429 answers by policyName: TEN_SECONDLY_ROLLING, SECONDLY, DAILY or unknown.",
            &["policy_name"],
        );
        let upstream_budget_remaining = int_gauge(
            "upstream_budget_remaining",
            "Calls the outbound budget (upstream.rate_limit) allows right now.",
        );
        let upstream_budget_limit = int_gauge(
            "upstream_budget_limit",
            "Calls the outbound budget allows per window (upstream.rate_limit.requests).",
        );
        let upstream_hold_seconds = Gauge::with_opts(
            Opts::new(
                "upstream_hold_seconds",
                "Seconds until the hold after a HubSpot 429 ends (capped by upstream.max_hold except DAILY); 0 when none.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        registry
            .register(Box::new(upstream_hold_seconds.clone()))
            .expect("each name registered once");
        let client_upstream_calls_total = counter(
            "client_upstream_calls_total",
            "HubSpot calls caused by each client's requests (cache hits and coalesced answers cause none).",
            &["client"],
        );
        let client_share_refusals_total = counter(
            "client_share_refusals_total",
            "Calls refused with 429 because the client's share of the outbound budget was spent.",
            &["client"],
        );
        // Every series of a known label set exists from the start at 0, so an `increase()`
        // alert sees the first event rather than a series appearing at 1.
        for policy in Policy::ALL {
            upstream_429_total.with_label_values(&[policy.label()]);
        }
        for source in ThrottleSource::ALL {
            upstream_throttled_total.with_label_values(&[source.label()]);
        }
        for result in ["success", "failure"] {
            token_refreshes_total.with_label_values(&[result]);
        }
        for reason in [ForceReason::Unauthorized, ForceReason::MissingScopes] {
            token_forced_refreshes_total.with_label_values(&[reason.label()]);
        }
        for reason in [
            AuthError::Missing,
            AuthError::Malformed,
            AuthError::UnknownKey,
            AuthError::UnknownCertificate,
            AuthError::Duplicate,
        ] {
            inbound_auth_failures_total.with_label_values(&[reason.label()]);
        }
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(process::Collector::new()))
            .expect("process collector registered once");
        registry
            .register(Box::new(log_lines::Dropped::new()))
            .expect("log collector registered once");
        registry
            .register(Box::new(crate::telemetry::DroppedSpans::new()))
            .expect("span drop collector registered once");
        Metrics {
            registry,
            requests_total,
            request_duration_seconds,
            upstream_requests_total,
            upstream_request_duration_seconds,
            upstream_throttled_total,
            upstream_ratelimit_remaining,
            cache_entries,
            cache_weight_bytes,
            coalesced_requests_total,
            token_refreshes_total,
            token_expiry_timestamp_seconds,
            token_scopes_verified,
            inbound_auth_failures_total,
            build_info,
            token_forced_refreshes_total,
            token_rotation_failed,
            token_refresh_token_rotated_total,
            config_reloads_total,
            config_last_load_timestamp_seconds,
            upstream_429_total,
            upstream_budget_remaining,
            upstream_budget_limit,
            upstream_hold_seconds,
            client_upstream_calls_total,
            client_share_refusals_total,
        }
    }

    /// The series of every request's answer, resolved ahead for `clients` (the configured
    /// caller names). The common answers' series exist from here on at 0: 200 by every cache
    /// outcome, and a fetch's usual failures, per client; and the refusals of callers not
    /// authenticated.
    pub fn request_series(&self, clients: Vec<Arc<str>>) -> RequestSeries {
        let fetched = [CacheOutcome::Miss, CacheOutcome::Coalesced];
        for client in &clients {
            self.client_upstream_calls_total
                .with_label_values(&[&**client]);
            self.client_share_refusals_total
                .with_label_values(&[&**client]);
            for code in ["404", "429", "502", "503", "504"] {
                for outcome in fetched {
                    self.requests_total
                        .with_label_values(&[&**client, code, outcome.label()]);
                }
            }
        }
        for code in ["400", "401", "404", "405"] {
            self.requests_total.with_label_values(&[
                "unauthenticated",
                code,
                CacheOutcome::None.label(),
            ]);
        }
        let ok = clients
            .into_iter()
            .map(|client| {
                let series = CacheOutcome::ALL.map(|o| {
                    self.requests_total
                        .with_label_values(&[&*client, "200", o.label()])
                });
                (client, series)
            })
            .collect();
        let duration = CacheOutcome::ALL.map(|o| {
            self.request_duration_seconds
                .with_label_values(&[o.label()])
        });
        RequestSeries {
            requests_total: self.requests_total.clone(),
            ok,
            duration,
        }
    }

    /// The registry in Prometheus' text format.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Metrics {
    /// The registry, for modules that register their own block of families
    /// (`cluster::ClusterMetrics::register`).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The request metrics of the common answers, resolved once: looking a series up by its
/// labels costs more than the rest of a cache hit's bookkeeping (measured,
/// docs/benchmarks.md). Other answers are looked up as they come.
pub struct RequestSeries {
    requests_total: IntCounterVec,
    /// `requests_total{client, code="200", cache}` per configured client, by outcome.
    ok: HashMap<Arc<str>, [IntCounter; CacheOutcome::ALL.len()]>,
    /// `request_duration_seconds{cache}` by outcome.
    duration: [Histogram; CacheOutcome::ALL.len()],
}

impl RequestSeries {
    /// Counts one answered request and the time it took.
    pub fn record(&self, client: &str, code: StatusCode, cache: CacheOutcome, elapsed: Duration) {
        let outcome = cache as usize;
        match self.ok.get(client) {
            Some(series) if code == StatusCode::OK => series[outcome].inc(),
            _ => self
                .requests_total
                .with_label_values(&[client, code.as_str(), cache.label()])
                .inc(),
        }
        self.duration[outcome].observe(elapsed.as_secs_f64());
    }
}

// ---- Connection limits: families registered by the listeners, kept apart from the request
// families above so each set can change on its own.

/// What the listeners count: connections held, refused and closed by a deadline, accept
/// failures, and answers waiting for their callers.
#[derive(Clone)]
pub struct ConnectionMetrics {
    /// Open connections, by `port` (`service` or `admin`).
    pub open: IntGaugeVec,
    /// Connections closed at once because `port` was at its cap.
    pub rejected_total: IntCounterVec,
    /// Connections the gateway closed, by `reason`: `head_timeout`, `idle_timeout`,
    /// `send_timeout`, `shutdown`.
    pub closed_total: IntCounterVec,
    /// `accept()` failures (EMFILE, ENFILE, ...), by `port`.
    pub accept_errors_total: IntCounterVec,
    /// Answers produced but not yet taken by their callers.
    pub pending_responses: IntGauge,
    /// Requests answered with a bodiless 503 because `max_pending_responses` was reached.
    pub shed_total: IntCounter,
}

impl Metrics {
    /// Registers the connection families in this registry; call once per registry.
    pub fn register_connections(&self) -> ConnectionMetrics {
        let register = |c: Box<dyn prometheus::core::Collector>| {
            self.registry
                .register(c)
                .expect("connection families registered once per registry");
        };
        let vec = |name: &str, help: &str, label: &str| {
            IntCounterVec::new(Opts::new(name, help).namespace(PREFIX), &[label])
                .expect("static metric definition")
        };
        let open = IntGaugeVec::new(
            Opts::new("connections_open", "Open connections, by port.").namespace(PREFIX),
            &["port"],
        )
        .expect("static metric definition");
        let rejected_total = vec(
            "connections_rejected_total",
            "Connections closed at once because the port was at its connection cap.",
            "port",
        );
        let closed_total = vec(
            "connections_closed_total",
            "Connections the gateway closed: head_timeout (no complete request head in time), idle_timeout, send_timeout (an answer not taken in time), shutdown.",
            "reason",
        );
        let accept_errors_total = vec(
            "accept_errors_total",
            "accept() failures such as EMFILE, by port.",
            "port",
        );
        let pending_responses = IntGauge::with_opts(
            Opts::new(
                "pending_responses",
                "Answers produced but not yet taken by their callers.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        let shed_total = IntCounter::with_opts(
            Opts::new(
                "responses_shed_total",
                "Requests answered with a bodiless 503 because too many answers were waiting for their callers.",
            )
            .namespace(PREFIX),
        )
        .expect("static metric definition");
        register(Box::new(open.clone()));
        register(Box::new(rejected_total.clone()));
        register(Box::new(closed_total.clone()));
        register(Box::new(accept_errors_total.clone()));
        register(Box::new(pending_responses.clone()));
        register(Box::new(shed_total.clone()));
        ConnectionMetrics {
            open,
            rejected_total,
            closed_total,
            accept_errors_total,
            pending_responses,
            shed_total,
        }
    }
}

/// `process_*` from the prometheus crate's collector, except `process_cpu_seconds_total`,
/// which it reports in whole seconds: here it is read with the clock tick's precision.
#[cfg(target_os = "linux")]
mod process {
    use prometheus::core::Desc;
    use prometheus::process_collector::ProcessCollector;
    use prometheus::proto::{Counter, MetricFamily};

    const CPU: &str = "process_cpu_seconds_total";

    /// The crate's process collector with the CPU family's value replaced.
    pub struct Collector {
        inner: ProcessCollector,
    }

    impl Collector {
        /// The collector for this process.
        pub fn new() -> Collector {
            Collector {
                inner: ProcessCollector::for_self(),
            }
        }
    }

    impl prometheus::core::Collector for Collector {
        fn desc(&self) -> Vec<&Desc> {
            self.inner.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let mut families = self.inner.collect();
            if let Some(seconds) = cpu_seconds() {
                for family in families.iter_mut().filter(|f| f.name() == CPU) {
                    for metric in family.mut_metric() {
                        let mut counter = Counter::default();
                        counter.set_value(seconds);
                        metric.set_counter(counter);
                    }
                }
            }
            families
        }
    }

    /// User plus system CPU time of this process, from `/proc/self/stat` in clock ticks.
    pub fn cpu_seconds() -> Option<f64> {
        let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
        Some((stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU counter carries the clock tick's precision: as exported, it lies between two
    /// precise readings taken around the export (the crate's whole seconds would not), and
    /// after well under a second of work it is above zero.
    #[cfg(target_os = "linux")]
    #[test]
    fn cpu_seconds_are_not_whole() {
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while process::cpu_seconds().unwrap_or(0.0) < 0.05
            && start.elapsed() < Duration::from_secs(5)
        {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let metrics = Metrics::new();
        let before = process::cpu_seconds().expect("/proc/self/stat");
        let text = String::from_utf8(metrics.render()).expect("utf-8");
        let after = process::cpu_seconds().expect("/proc/self/stat");
        let value: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_cpu_seconds_total "))
            .expect("the family is exported")
            .parse()
            .expect("a number");
        assert!(
            before <= value && value <= after,
            "{before} <= {value} <= {after}"
        );
        assert!(value > 0.0, "{value}");
    }
}

// ---- The log writer: lines it dropped because its queue was full. Read at scrape time from
// the writer's own count, so logging itself costs nothing here.
mod log_lines {
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use prometheus::{IntCounter, Opts};

    /// `log_lines_dropped_total`, brought up to the writer's count at each scrape.
    pub struct Dropped(IntCounter);

    impl Dropped {
        pub fn new() -> Dropped {
            Dropped(
                IntCounter::with_opts(
                    Opts::new(
                        "log_lines_dropped_total",
                        "Log lines dropped because the writer's queue was full.",
                    )
                    .namespace(super::PREFIX),
                )
                .expect("static metric definition"),
            )
        }
    }

    impl Collector for Dropped {
        fn desc(&self) -> Vec<&Desc> {
            self.0.desc()
        }

        fn collect(&self) -> Vec<MetricFamily> {
            let now = crate::log::dropped_lines();
            let seen = self.0.get();
            if now > seen {
                self.0.inc_by(now - seen);
            }
            self.0.collect()
        }
    }
}

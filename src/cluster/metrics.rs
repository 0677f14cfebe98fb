//! The cluster backend's Prometheus families, registered on the gateway's registry.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

const PREFIX: &str = "hubspot_gateway";

const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
];

/// Every cluster metric. Label values are fixed operation and result names.
#[derive(Clone)]
pub struct ClusterMetrics {
    /// 1 while the shared Redis answers, 0 while replicas fall back to local behaviour.
    pub backend_up: IntGauge,
    /// Redis calls by `op` and `result` (`ok`, `error`, `timeout`).
    pub redis_calls_total: IntCounterVec,
    /// Duration of Redis calls by `op`.
    pub redis_call_duration_seconds: HistogramVec,
    /// Answers served from the shared (second-level) cache.
    pub cache_hits_total: IntCounter,
    /// Waits for another replica's flight, by `outcome` (`answer`, `takeover`, `deadline`, `error`).
    pub flight_waits_total: IntCounterVec,
    /// Leases taken over from a leader that stopped renewing or released without an answer.
    pub lease_takeovers_total: IntCounter,
    /// Operations the caller had to do locally because Redis was down or failed, by `op`.
    pub local_fallbacks_total: IntCounterVec,
    /// Replays of this replica's recent calls into a shared window Redis did not have
    /// (Redis restarted empty, or came back after this replica worked alone).
    pub window_replays_total: IntCounter,
}

impl ClusterMetrics {
    /// Creates the families and registers them on `registry` (the gateway's, or a test's).
    pub fn register(registry: &Registry) -> Result<ClusterMetrics, prometheus::Error> {
        let opts = |name: &str, help: &str| Opts::new(name, help).namespace(PREFIX);
        let backend_up = IntGauge::with_opts(opts(
            "cluster_backend_up",
            "1 while the shared Redis answers; 0 while this replica uses its local budget, cache and single-flight.",
        ))?;
        let redis_calls_total = IntCounterVec::new(
            opts(
                "cluster_redis_calls_total",
                "Calls to the shared Redis, by operation and result (ok, error, timeout).",
            ),
            &["op", "result"],
        )?;
        let redis_call_duration_seconds = HistogramVec::new(
            HistogramOpts::new(
                "cluster_redis_call_duration_seconds",
                "Time one call to the shared Redis took, by operation.",
            )
            .namespace(PREFIX)
            .buckets(BUCKETS.to_vec()),
            &["op"],
        )?;
        let cache_hits_total = IntCounter::with_opts(opts(
            "cluster_cache_hits_total",
            "Answers found in the shared cache (stored by any replica).",
        ))?;
        let flight_waits_total = IntCounterVec::new(
            opts(
                "cluster_flight_waits_total",
                "Waits for another replica's upstream call, by outcome (answer, takeover, deadline, error).",
            ),
            &["outcome"],
        )?;
        let lease_takeovers_total = IntCounter::with_opts(opts(
            "cluster_lease_takeovers_total",
            "Flights taken over from a leader whose lease expired or was released without an answer.",
        ))?;
        let local_fallbacks_total = IntCounterVec::new(
            opts(
                "cluster_local_fallbacks_total",
                "Operations done locally because the shared Redis was down or failed, by operation.",
            ),
            &["op"],
        )?;
        let window_replays_total = IntCounter::with_opts(opts(
            "cluster_window_replays_total",
            "Replays of this replica's recent calls into the shared window after Redis restarted empty or came back up.",
        ))?;
        registry.register(Box::new(window_replays_total.clone()))?;
        registry.register(Box::new(backend_up.clone()))?;
        registry.register(Box::new(redis_calls_total.clone()))?;
        registry.register(Box::new(redis_call_duration_seconds.clone()))?;
        registry.register(Box::new(cache_hits_total.clone()))?;
        registry.register(Box::new(flight_waits_total.clone()))?;
        registry.register(Box::new(lease_takeovers_total.clone()))?;
        registry.register(Box::new(local_fallbacks_total.clone()))?;
        Ok(ClusterMetrics {
            backend_up,
            redis_calls_total,
            redis_call_duration_seconds,
            cache_hits_total,
            flight_waits_total,
            lease_takeovers_total,
            local_fallbacks_total,
            window_replays_total,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The families register beside the gateway's own without a name clash and render with
    /// the gateway's prefix.
    #[test]
    fn registers_on_the_gateway_registry() {
        let gateway = crate::metrics::Metrics::new();
        let cluster = ClusterMetrics::register(gateway.registry()).expect("no clash");
        cluster.backend_up.set(1);
        cluster
            .redis_calls_total
            .with_label_values(&["cache_get", "ok"])
            .inc();
        let text = String::from_utf8(gateway.render()).expect("utf-8");
        assert!(
            text.contains("hubspot_gateway_cluster_backend_up 1"),
            "{text}"
        );
        assert!(text.contains(
            "hubspot_gateway_cluster_redis_calls_total{op=\"cache_get\",result=\"ok\"} 1"
        ));
        assert!(ClusterMetrics::register(gateway.registry()).is_err());
    }
}

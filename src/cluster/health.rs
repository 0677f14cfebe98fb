//! Up or down: the state callers read, its transitions (each logged once), and the probe
//! that brings a down backend back when Redis answers again.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::task::AbortHandle;

use super::ClusterBackend;

/// How long a reconnect or a probe may take: longer than one call's `timeout`, since a new
/// connection pays TCP, TLS and AUTH, but it runs in the background and never holds a request.
pub(crate) fn connect_bound(timeout: Duration) -> Duration {
    timeout.max(Duration::from_secs(1))
}

impl ClusterBackend {
    /// Marks the backend down; logs only the transition, not every failed call.
    pub(crate) fn mark_down(&self, op: &'static str, reason: &str) {
        if self.inner.up.swap(false, Ordering::AcqRel) {
            self.inner.metrics.backend_up.set(0);
            tracing::warn!(
                op,
                reason,
                "cluster backend down: using local budget, cache and single-flight until Redis answers"
            );
        }
    }

    fn mark_up(&self) {
        if !self.inner.up.swap(true, Ordering::AcqRel) {
            // The calls made alone while down are not in the shared window.
            self.inner.replay_due.store(true, Ordering::Release);
            self.spawn_replay(true);
            self.inner.metrics.backend_up.set(1);
            tracing::info!("cluster backend up: budget, cache and flights shared through Redis");
        }
    }

    /// One PING; on success the backend is (again) up. Returns whether Redis answered.
    pub(crate) async fn probe(&self) -> bool {
        let mut conn = self.conn();
        let bound = connect_bound(self.inner.config.timeout);
        let ping = redis::cmd("PING");
        let answer = tokio::time::timeout(bound, ping.query_async::<String>(&mut conn)).await;
        let ok = matches!(answer, Ok(Ok(_)));
        if ok {
            self.mark_up();
        }
        ok
    }
}

/// Probes every `probe_interval` while the backend is down. Holds only a weak reference, so
/// it ends with the last handle.
pub(crate) fn spawn_probe(backend: &ClusterBackend) -> AbortHandle {
    let weak = std::sync::Arc::downgrade(&backend.inner);
    let interval = backend.inner.options.probe_interval;
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let Some(inner) = weak.upgrade() else { break };
            let backend = ClusterBackend { inner };
            if !backend.is_up() {
                backend.probe().await;
            }
        }
    })
    .abort_handle()
}

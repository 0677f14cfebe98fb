//! The cluster backend: one budget, one second-level cache and one flight per task shared by
//! every replica through Redis (or Valkey), degrading to local behaviour when Redis is not there.
//!
//! - [`config`]: the `[cluster]` table.
//! - [`budget`]: the account's rolling window, holds after a 429, the daily limit.
//! - [`cache`]: terminal answers shared between replicas, with their true age.
//! - [`flight`]: one upstream call per task across replicas (lease, publish, wait, takeover).
//! - [`codec`]: the versioned bytes of an answer in Redis.
//! - [`health`]: up/down state, its log lines and the background probe.
//! - [`metrics`]: the `cluster_*` Prometheus families.
//!
//! Every Redis call is bounded by `timeout`; a call that fails or times out marks the backend
//! down and returns an error at once, and while down every call returns
//! [`ClusterError::Down`] without touching the network, so the caller uses its local budget,
//! cache and single-flight. A background probe brings the backend back up when Redis answers.
//! Nothing stored holds a credential: keys are made of hub ids and task ids, and
//! [`codec`] refuses credential headers.

pub mod budget;
pub mod cache;
pub mod codec;
pub mod config;
pub mod flight;
pub mod health;
pub mod metrics;

use std::future::Future;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult};
use tokio::sync::broadcast;
use tokio::task::AbortHandle;

pub use budget::{Admission, BudgetAsk, BudgetPolicy, Ledger, Refusal, ReplayCall};
pub use cache::CachedAnswer;
pub use codec::{Answer, CodecError};
pub use config::ClusterConfig;
pub use flight::{Flight, Lease, Lookup};
pub use metrics::ClusterMetrics;

use crate::secret::Secret;

/// Why a cluster operation did not happen. Every variant means the same to the caller: do
/// it locally this time.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Redis was found unreachable by an earlier call; no network call was made.
    #[error("cluster backend is down")]
    Down,
    /// The call took longer than `timeout`; the backend is now down.
    #[error("redis call {op} timed out")]
    Timeout {
        /// The operation, as in the metrics' `op` label.
        op: &'static str,
    },
    /// Redis answered with an error, or the connection failed.
    #[error("redis call {op} failed: {message}")]
    Redis {
        /// The operation, as in the metrics' `op` label.
        op: &'static str,
        /// The client's message (never a credential).
        message: String,
    },
    /// A stored answer could not be read, or an answer cannot be stored.
    #[error("shared answer unreadable: {0}")]
    Codec(#[from] CodecError),
    /// A stored answer names another hub than its key: it is never returned.
    #[error("shared answer belongs to another hub")]
    WrongHub,
    /// The URL or the CA file cannot be used.
    #[error("cluster backend cannot be set up: {0}")]
    Setup(String),
}

/// A setup failure naming the step and the error's kind only: the crate's message may quote
/// the URL.
fn setup_error(step: &'static str) -> impl Fn(redis::RedisError) -> ClusterError {
    move |e| ClusterError::Setup(format!("{step}: {:?}", e.kind()))
}

/// A duration in whole milliseconds, as Redis takes them.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Knobs that are not configuration: for tests and embedding.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Receive flight answers by pub/sub; off, waiters rely on polling alone.
    pub subscribe: bool,
    /// How often a down backend checks whether Redis answers again.
    pub probe_interval: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            subscribe: true,
            probe_interval: Duration::from_millis(250),
        }
    }
}

/// One task as the cluster names it: the HubSpot account and the taskId. No API version:
/// HubSpot is always asked on `upstream.api_version`, so callers on every version share one
/// entry and one flight, as they do in one replica's memory. The key it yields
/// (`{prefix}{kind}:{hub_id}:{task_id}`) is injective: a hub id is digits only, so the first
/// `:` after the prefix and kind ends it, whatever the taskId holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    /// The HubSpot account (hub id) whose token asks.
    pub hub_id: u64,
    /// The validated taskId.
    pub task_id: String,
}

impl TaskKey {
    /// A key for `task_id` in account `hub_id`.
    pub fn new(hub_id: u64, task_id: impl Into<String>) -> TaskKey {
        TaskKey {
            hub_id,
            task_id: task_id.into(),
        }
    }

    fn suffix(&self) -> String {
        format!("{}:{}", self.hub_id, self.task_id)
    }
}

/// A handle on the shared backend; cheap to clone, one per replica.
#[derive(Clone)]
pub struct ClusterBackend {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClusterConfig,
    options: ClusterOptions,
    conn: ConnectionManager,
    up: AtomicBool,
    metrics: ClusterMetrics,
    /// Flight answers received by pub/sub, fanned out to this replica's waiters.
    published: broadcast::Sender<Arc<flight::Published>>,
    background: Mutex<Vec<AbortHandle>>,
    /// This replica's id in the shared replica sets (new at every start).
    replica: String,
    /// This replica's own calls, for a replay (the budget's, once it registered).
    ledger: Mutex<Option<Weak<dyn Ledger>>>,
    /// Redis' `run_id` at the latest replay: a different one means Redis restarted.
    run_id: Mutex<Option<String>>,
    /// Set when Redis answers again after being down: the calls this replica made alone
    /// are replayed before its next admission.
    replay_due: AtomicBool,
    /// The hub and window of this replica's latest admission: where a replay this replica
    /// starts by itself (no call waiting) writes its calls.
    last_ask: Mutex<Option<(u64, Duration)>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let tasks = match self.background.get_mut() {
            Ok(tasks) => tasks,
            Err(poisoned) => poisoned.into_inner(),
        };
        for task in tasks.drain(..) {
            task.abort();
        }
    }
}

/// Prints the key prefix and the state, never the URL or the password.
impl std::fmt::Debug for ClusterBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackend")
            .field("prefix", &self.inner.config.key_prefix)
            .field("up", &self.is_up())
            .finish()
    }
}

impl ClusterBackend {
    /// Sets up the backend with default options; see [`ClusterBackend::connect_with`].
    pub async fn connect(
        config: ClusterConfig,
        password: Option<Secret>,
        metrics: ClusterMetrics,
    ) -> Result<ClusterBackend, ClusterError> {
        Self::connect_with(config, password, metrics, ClusterOptions::default()).await
    }

    /// Sets up the backend. Fails only on a setup error (a URL the crate cannot use); an
    /// unreachable Redis gives a backend that starts down and comes up by itself.
    pub async fn connect_with(
        config: ClusterConfig,
        password: Option<Secret>,
        metrics: ClusterMetrics,
        options: ClusterOptions,
    ) -> Result<ClusterBackend, ClusterError> {
        let mut info = config
            .redis_url
            .as_str()
            .into_connection_info()
            .map_err(setup_error("redis_url"))?;
        let mut settings = info.redis_settings().clone();
        if let Some(user) = &config.redis_username {
            settings = settings.set_username(user);
        }
        if let Some(password) = &password {
            settings = settings.set_password(password.expose());
        }
        info = info.set_redis_settings(settings);
        let client = match &config.redis_ca_file {
            Some(path) => {
                let root_cert = std::fs::read(path).map_err(|e| {
                    ClusterError::Setup(format!("redis_ca_file {}: {e}", path.display()))
                })?;
                let certificates = redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                };
                redis::Client::build_with_tls(info, certificates)
            }
            None => redis::Client::open(info),
        }
        .map_err(setup_error("redis client"))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(health::connect_bound(config.timeout)))
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
            .map_err(setup_error("redis connection"))?;
        let (published, _) = broadcast::channel(1024);
        metrics.backend_up.set(0);
        let backend = ClusterBackend {
            inner: Arc::new(Inner {
                config,
                options,
                conn,
                up: AtomicBool::new(false),
                metrics,
                published,
                background: Mutex::new(Vec::new()),
                replica: uuid::Uuid::new_v4().simple().to_string(),
                ledger: Mutex::new(None),
                run_id: Mutex::new(None),
                replay_due: AtomicBool::new(false),
                last_ask: Mutex::new(None),
            }),
        };
        let mut tasks = vec![health::spawn_probe(&backend)];
        if backend.inner.options.subscribe {
            tasks.push(flight::spawn_subscriber(&backend, client));
        }
        match backend.inner.background.lock() {
            Ok(mut guard) => guard.extend(tasks),
            Err(poisoned) => poisoned.into_inner().extend(tasks),
        }
        if !backend.probe().await {
            tracing::warn!(
                "cluster backend: Redis unreachable at start; using local budget, cache and single-flight until it answers"
            );
        }
        Ok(backend)
    }

    /// Whether the shared Redis is in use; false means: behave as a lone replica.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The configuration this backend runs with.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    /// Names the ledger of this replica's own calls that a replay writes into a Redis that
    /// lost them (the budget's). Held weakly: it ends with its owner.
    pub fn set_ledger(&self, ledger: Weak<dyn Ledger>) {
        *self.inner.ledger.lock().unwrap_or_else(|p| p.into_inner()) = Some(ledger);
    }

    fn ledger(&self) -> Option<Arc<dyn Ledger>> {
        self.inner
            .ledger
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .and_then(Weak::upgrade)
    }

    /// This replica's share of an account `limit` while the backend is down.
    pub fn local_share(&self, limit: u32) -> u32 {
        self.inner.config.local_share(limit)
    }

    /// Counts one operation the caller does locally because the backend said no.
    fn fallback(&self, op: &'static str) {
        self.inner
            .metrics
            .local_fallbacks_total
            .with_label_values(&[op])
            .inc();
    }

    fn key(&self, kind: &str, rest: impl std::fmt::Display) -> String {
        format!("{}{kind}:{rest}", self.inner.config.key_prefix)
    }

    /// Runs one Redis call bounded by `timeout`, with its metrics and the up/down state.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = RedisResult<T>>,
    ) -> Result<T, ClusterError> {
        let metrics = &self.inner.metrics;
        if !self.is_up() {
            self.fallback(op);
            return Err(ClusterError::Down);
        }
        // One span per Redis call when tracing is on (ended when this returns).
        let mut span = crate::telemetry::child(op, opentelemetry::trace::SpanKind::Client);
        span.set("db.system.name", "redis");
        span.set("db.operation.name", op);
        let started = Instant::now();
        let outcome = tokio::time::timeout(self.inner.config.timeout, fut).await;
        span.set("gateway.redis.ok", matches!(outcome, Ok(Ok(_))));
        metrics
            .redis_call_duration_seconds
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
        let (result, err) = match outcome {
            Ok(Ok(value)) => {
                metrics
                    .redis_calls_total
                    .with_label_values(&[op, "ok"])
                    .inc();
                return Ok(value);
            }
            Ok(Err(e)) => {
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_unrecoverable_error()
                {
                    self.mark_down(op, &format!("{:?}", e.kind()));
                }
                (
                    "error",
                    ClusterError::Redis {
                        op,
                        message: e.to_string(),
                    },
                )
            }
            Err(_) => {
                self.mark_down(op, "timed out");
                ("timeout", ClusterError::Timeout { op })
            }
        };
        metrics
            .redis_calls_total
            .with_label_values(&[op, result])
            .inc();
        self.fallback(op);
        Err(err)
    }

    fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys ignore the API version and separate hubs and tasks: a hub id is digits only, so
    /// no pair of (hub, taskId) can spell another's key.
    #[test]
    fn task_keys_name_hub_and_task_only() {
        let key = TaskKey::new(21_557_345, "complete-1");
        assert_eq!(key.suffix(), "21557345:complete-1");
        assert_ne!(
            TaskKey::new(1, "2:x").suffix(),
            TaskKey::new(12, "x").suffix()
        );
        assert_ne!(TaskKey::new(1, "a").suffix(), TaskKey::new(2, "a").suffix());
    }
}

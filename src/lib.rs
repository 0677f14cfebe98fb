//! hubspot-files-gateway: the one place internal services ask HubSpot how a file import is
//! going. Modules, in the order a request meets them:
//!
//! - [`server`]: listeners (TCP or TLS), accept loops, the admin port, graceful shutdown.
//! - [`route`]: a path becomes a typed status request (version + validated taskId).
//! - [`auth`]: who is calling (API key sha256 or client certificate) → a client name.
//! - [`gateway`]: the request handler, reading top to bottom as route → auth → cache →
//!   coalesce → token → upstream → classify → respond.
//! - [`cache`]: terminal answers in memory, and single-flight for every miss.
//! - [`cluster`]: with `[cluster]`, the cache, flights and budget replicas share through
//!   Redis, falling back to the local ones while Redis is down.
//! - [`token`]: the HubSpot credential: refresh ahead of expiry, scope verification.
//! - [`budget`]: the outbound budget every HubSpot call asks first: windows, holds, shares.
//! - [`upstream`]: the pooled HubSpot client: deadlines, retries, the 429 reading.
//! - [`proxy`]: the outbound proxy HubSpot connections may have to tunnel through.
//! - [`error`]: the one place failures become HubSpot-shaped responses.
//! - [`metrics`]: the Prometheus registry.
//! - [`log`]: text or JSON lines through a writer that never blocks; the access line.
//! - [`telemetry`]: OpenTelemetry spans of each request, exported over OTLP.
//! - [`config`], [`secret`]: the TOML config and credentials that never print.
//! - [`reload`], [`tls`]: live reload of clients and certificates; the TLS files.
//!
//! The HubSpot stand-in for tests, `demo` and benchmarks is its own crate,
//! `crates/hubspot-sim`; nothing here depends on it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod budget;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod error;
pub mod gateway;
pub mod log;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod secret;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod upstream;

//! Each section of the config file (`[server]`, `[upstream]`, `[token]`, ...): its keys,
//! types and defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{BaseUrl, bytesize, duration};
use crate::secret::Secret;

/// `[reload]`: how changes to the config and the files it names are noticed. SIGHUP always
/// reloads.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReloadConfig {
    /// How often the config file, TLS files and secret files are checked for a change;
    /// `"0s"` turns watching off (SIGHUP only).
    #[serde(with = "duration")]
    pub watch_interval: Duration,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        ReloadConfig {
            watch_interval: Duration::from_secs(5),
        }
    }
}

/// `[server]`: the two listeners and shutdown.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    #[serde(with = "duration")]
    pub shutdown_grace: Duration,
    /// Seconds a client has to send its request head; slow clients are cut off after it.
    #[serde(with = "duration")]
    pub header_read_timeout: Duration,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    /// A connection with no request in progress (HTTP/1 keep-alive, HTTP/2 with no open
    /// stream) is closed after this, PINGs or not.
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
    /// A response the peer does not take (HTTP/2 window left at 0, or a socket it does not
    /// read) within this closes its connection.
    #[serde(with = "duration")]
    pub send_timeout: Duration,
    /// Open service connections at most; more are closed at once. Unset: the open-file
    /// limit (raised to its hard limit at start) minus a reserve for the admin port,
    /// HubSpot connections and files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Concurrent HTTP/2 streams per connection.
    pub http2_max_concurrent_streams: u32,
    /// Answers produced but not yet taken by their callers, across all connections; past it
    /// new requests get a bodiless 503.
    pub max_pending_responses: u32,
    /// Largest request head (request line and headers); larger ones get 431.
    #[serde(with = "bytesize")]
    pub max_header_bytes: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            admin_listen: SocketAddr::from(([0, 0, 0, 0], 9090)),
            shutdown_grace: Duration::from_secs(20),
            header_read_timeout: Duration::from_secs(10),
            tls_cert_file: None,
            tls_key_file: None,
            client_ca_file: None,
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(10),
            max_connections: None,
            http2_max_concurrent_streams: 100,
            max_pending_responses: 10_000,
            max_header_bytes: 16 << 10,
        }
    }
}

impl ServerConfig {
    /// Ranges of the connection limits: each bound must exist and stay usable.
    pub(super) fn validate_limits(&self, invalid: &mut impl FnMut(String)) {
        let counts = [
            (
                "max_connections",
                self.max_connections.unwrap_or(1),
                1,
                1_000_000,
            ),
            (
                "http2_max_concurrent_streams",
                self.http2_max_concurrent_streams,
                1,
                1000,
            ),
            (
                "max_pending_responses",
                self.max_pending_responses,
                1,
                1_000_000,
            ),
        ];
        for (name, n, min, max) in counts {
            if !(min..=max).contains(&n) {
                invalid(format!("server.{name} must be between {min} and {max}"));
            }
        }
        if !(1024..=1 << 20).contains(&self.max_header_bytes) {
            invalid("server.max_header_bytes must be between 1KiB and 1MiB".into());
        }
    }
}

/// `[upstream]`: how HubSpot is reached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub base_url: BaseUrl,
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// Deadline for one upstream call, retries included.
    #[serde(with = "duration")]
    pub request_timeout: Duration,
    /// The outbound budget, a rolling window like HubSpot's. Without `[cluster]` it is this
    /// replica's; with `[cluster]` it is the whole account's, shared by every replica through
    /// Redis (each keeps `requests / replicas_hint` while Redis does not answer).
    pub rate_limit: RateLimit,
    /// Calls to HubSpot per UTC day at most (the account's, in cluster mode); unset counts
    /// none. Past it callers get 429 `DAILY` until midnight UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_limit: Option<u64>,
    /// The longest hold after a HubSpot 429 other than `DAILY`: a longer `Retry-After` is
    /// cut to this (logged, shown on `/readyz`). `DAILY` holds last until the daily reset.
    #[serde(with = "duration")]
    pub max_hold: Duration,
    /// Unset: straight to HubSpot; `"env"`: the proxy variables; or `http://host[:port]`.
    #[serde(skip_serializing_if = "crate::proxy::ProxySetting::is_direct")]
    pub proxy: crate::proxy::ProxySetting,
    /// The user the proxy knows the gateway as (Basic authentication on the CONNECT).
    pub proxy_username: Option<String>,
    /// The proxy password: a file (a mounted secret) or an environment variable's name.
    pub proxy_password_file: Option<PathBuf>,
    pub proxy_password_env: Option<String>,
    /// The version of the status route HubSpot is asked on, whichever one the caller used.
    pub api_version: crate::route::ApiVersion,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: BaseUrl::hubspot(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            rate_limit: RateLimit::default(),
            daily_limit: None,
            max_hold: Duration::from_secs(60),
            proxy: crate::proxy::ProxySetting::Direct,
            proxy_username: None,
            proxy_password_file: None,
            proxy_password_env: None,
            api_version: crate::route::ApiVersion::default(),
        }
    }
}

/// The outbound budget: at most `requests` calls to HubSpot per `per`.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    #[serde(with = "duration")]
    pub per: Duration,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            requests: 90,
            per: Duration::from_secs(10),
        }
    }
}

/// Where the HubSpot credential comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    /// Refresh-token grant; scopes verified by introspection.
    Oauth,
    /// A private-app token or service key from a file; scopes verified with access-token-info.
    Static,
}

/// Which version of HubSpot's OAuth endpoints to use (`token.api`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum OauthApi {
    /// `/oauth/2026-03/token` and `/oauth/2026-03/token/introspect`.
    #[default]
    #[serde(rename = "2026-03")]
    V2026_03,
    /// `/oauth/2026-09/token` and `/oauth/2026-09/token/introspect`.
    #[serde(rename = "2026-09")]
    V2026_09,
    /// `/oauth/v3/token` and `/oauth/v3/token/introspect`.
    #[serde(rename = "v3")]
    V3,
    /// `/oauth/v1/token` and `/oauth/v1/access-tokens/{token}`; HubSpot ends them on 2027-02-16.
    #[serde(rename = "v1")]
    V1,
}

/// `[token]`: the HubSpot credential and the scopes it must carry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    pub mode: TokenMode,
    pub api: OauthApi,
    pub required_scopes: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token_env: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_token_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub static_token_env: Option<String>,
}

impl Default for TokenConfig {
    fn default() -> Self {
        TokenConfig {
            mode: TokenMode::Oauth,
            api: OauthApi::default(),
            required_scopes: vec!["files".into(), "files.ui_hidden.read".into()],
            client_id_file: None,
            client_id_env: None,
            client_secret_file: None,
            client_secret_env: None,
            refresh_token_file: None,
            refresh_token_env: None,
            static_token_file: None,
            static_token_env: None,
        }
    }
}

/// `[cache]`: terminal answers kept in memory.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    #[serde(with = "bytesize")]
    pub max_bytes: u64,
    #[serde(with = "duration")]
    pub terminal_ttl: Duration,
    /// Non-terminal answers are kept this long; 0 (the default) keeps none.
    #[serde(with = "duration")]
    pub pending_ttl: Duration,
    /// The last PENDING/PROCESSING answer stands in for a HubSpot failure while younger than
    /// this (`X-Cache: STALE`); 0 turns it off.
    #[serde(with = "duration")]
    pub stale_if_error: Duration,
    /// HubSpot's 404 for a task is answered from memory this long, per HubSpot account; 0
    /// asks HubSpot every time.
    #[serde(with = "duration")]
    pub missing_ttl: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            terminal_ttl: Duration::from_secs(24 * 3600),
            pending_ttl: Duration::ZERO,
            stale_if_error: Duration::from_secs(300),
            missing_ttl: Duration::from_secs(30),
        }
    }
}

/// How callers of the gateway prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    ApiKeys,
    Mtls,
    None,
}

/// `[auth]`: the known callers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// `mode = "none"` on an address other than loopback must be asked for by name.
    pub allow_none_off_loopback: bool,
    pub clients: Vec<ClientConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::ApiKeys,
            allow_none_off_loopback: false,
            clients: Vec::new(),
        }
    }
}

/// One caller: a name for metrics and logs, and the sha256 of its API key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    pub name: String,
    /// Hex sha256 of the API key (`hubspot-files-gateway hash-key`); for `mode = "api_keys"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_sha256: Option<String>,
    /// Subject common name of the client certificate; for `mode = "mtls"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_cn: Option<String>,
    /// The part of the outbound budget this client's requests may use, in (0, 1]: at most
    /// `floor(rate_limit.requests × share)` (at least 1) of its HubSpot calls per window.
    /// Unset: no limit of its own (the whole budget still bounds it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
}

/// The credentials read from files or the environment at start-up.
#[derive(Debug, Clone)]
pub enum Credentials {
    Oauth {
        client_id: Secret,
        client_secret: Secret,
        refresh_token: Secret,
    },
    Static {
        token: Secret,
        /// Re-read when it changes, so a rotated Kubernetes secret is picked up.
        file: Option<PathBuf>,
    },
}

/// `[telemetry]`: OpenTelemetry traces sent over OTLP/HTTP (protobuf). Absent: no spans are
/// built at all.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP receiver, `http(s)://host[:port][/prefix]`; spans go to
    /// `<otlp_endpoint>/v1/traces`.
    pub otlp_endpoint: String,
    /// The `service.name` resource attribute.
    #[serde(default = "TelemetryConfig::default_service_name")]
    pub service_name: String,
    /// The share of new traces kept (0 to 1). A caller's `traceparent` decides for its own
    /// trace: sampled by the caller, sampled here.
    #[serde(default = "TelemetryConfig::default_sample_ratio")]
    pub sample_ratio: f64,
    /// The longest one export to the receiver may take (retries included), and the bound
    /// on the flush at shutdown.
    #[serde(default = "TelemetryConfig::default_export_timeout", with = "duration")]
    pub export_timeout: Duration,
}

impl TelemetryConfig {
    fn default_service_name() -> String {
        "hubspot-files-gateway".to_owned()
    }

    fn default_sample_ratio() -> f64 {
        1.0
    }

    fn default_export_timeout() -> Duration {
        Duration::from_secs(10)
    }
}

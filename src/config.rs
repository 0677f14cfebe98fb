//! The TOML configuration: its shape, defaults, validation, and where secrets come from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Why a configuration cannot be used. Every variant makes the process exit 64. No variant
/// shows the value of a key (only key names, numbers and enum words), since an operator may
/// have pasted a secret anywhere.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The position and TOML's message with values taken out, never the offending line.
    #[error("invalid config at line {line}, column {column}: {message}")]
    Parse {
        message: String,
        line: usize,
        column: usize,
    },
    /// Every problem found, each naming the key it is about.
    #[error("invalid config: {0}")]
    Invalid(Problems),
}

/// One or more problems with a config, each a sentence that names its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problems(pub Vec<String>);

impl Problems {
    fn result(problems: Vec<String>) -> Result<(), ConfigError> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(Problems(problems)))
        }
    }
}

impl std::fmt::Display for Problems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // One line, so a refused reload is one log line.
        if self.0.len() > 1 {
            write!(f, "{} problems: ", self.0.len())?;
        }
        f.write_str(&self.0.join("; "))
    }
}

const MILLI: Duration = Duration::from_millis(1);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The range of every timeout and window unless its key documents another.
const SANE: RangeInclusive<Duration> = MILLI..=DAY;
/// How often files may be polled for a change, when polling is on.
const WATCH_INTERVAL: RangeInclusive<Duration> = Duration::from_millis(100)..=DAY;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub token: TokenConfig,
    #[serde(default)]
    pub cache: CacheConfig,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub reload: ReloadConfig,
    /// `[log]`: line format and which requests get an access line.
    #[serde(default)]
    pub log: crate::log::LogConfig,
    /// `[cluster]`: budget, cache and flights shared through Redis; absent = per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

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
    fn validate_limits(&self, invalid: &mut impl FnMut(String)) {
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
    pub rate_limit: RateLimit,
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
            max_hold: Duration::from_secs(60),
            proxy: crate::proxy::ProxySetting::Direct,
            proxy_username: None,
            proxy_password_file: None,
            proxy_password_env: None,
            api_version: crate::route::ApiVersion::default(),
        }
    }
}

/// HubSpot's address: `http` or `https`, a host, an optional port and path prefix; no
/// user, password, query or fragment. Parsed once when the config loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    path: String,
}

/// Why a `base_url` is refused; never repeats the URL (it could carry a password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error("upstream.base_url is not a URL")]
    Syntax,
    #[error("upstream.base_url must start with http:// or https:// and name a host")]
    SchemeOrHost,
    #[error("upstream.base_url must not carry a user or password")]
    Userinfo,
    #[error("upstream.base_url must not have a query or fragment")]
    QueryOrFragment,
}

impl BaseUrl {
    /// `https://api.hubapi.com`.
    pub fn hubspot() -> BaseUrl {
        BaseUrl {
            scheme: hyper::http::uri::Scheme::HTTPS,
            authority: hyper::http::uri::Authority::from_static("api.hubapi.com"),
            path: String::new(),
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &hyper::http::uri::Scheme {
        &self.scheme
    }

    /// Host and optional port.
    pub fn authority(&self) -> &hyper::http::uri::Authority {
        &self.authority
    }

    /// The path prefix without a trailing `/` (empty for none).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl std::str::FromStr for BaseUrl {
    type Err = BaseUrlError;

    fn from_str(text: &str) -> Result<BaseUrl, BaseUrlError> {
        // `Uri` drops a fragment silently, so it is looked for first.
        if text.contains('#') {
            return Err(BaseUrlError::QueryOrFragment);
        }
        let uri: hyper::Uri = text.parse().map_err(|_| BaseUrlError::Syntax)?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(BaseUrlError::SchemeOrHost);
        };
        if !matches!(scheme.as_str(), "http" | "https") || authority.host().is_empty() {
            return Err(BaseUrlError::SchemeOrHost);
        }
        if authority.as_str().contains('@') {
            return Err(BaseUrlError::Userinfo);
        }
        let path = match parts.path_and_query {
            Some(pq) if pq.query().is_some() => return Err(BaseUrlError::QueryOrFragment),
            Some(pq) => pq.path().trim_end_matches('/').to_owned(),
            None => String::new(),
        };
        Ok(BaseUrl {
            scheme,
            authority,
            path,
        })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BaseUrl, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
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

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Reads and validates the file at `path`, then checks every file it names (and, with
    /// `secrets`, every secret): what `check-config`, `serve` and a reload run. Every problem
    /// of every kind is reported at once.
    pub fn load_checked(
        path: &Path,
        secrets: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let (config, mut problems) = Config::parse_all(&text)?;
        if let Err(ConfigError::Invalid(more)) = config.check_files(secrets, env) {
            problems.extend(more.0);
        }
        Problems::result(problems)?;
        Ok(config)
    }

    /// Parses and validates TOML text, reporting every problem at once.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let (config, problems) = Config::parse_all(text)?;
        Problems::result(problems)?;
        Ok(config)
    }

    /// The config and every problem with it: after a value that does not fit its key, that
    /// line is set aside (the key keeps its default) and the rest is read on. Only TOML that
    /// is not TOML at all stops at the first error.
    fn parse_all(text: &str) -> Result<(Config, Vec<String>), ConfigError> {
        if let Err(e) = text.parse::<toml::Table>() {
            let (line, column) = position(text, e.span().map_or(0, |s| s.start));
            return Err(ConfigError::Parse {
                message: redact(
                    e.message(),
                    e.span().and_then(|s| text.get(s)).unwrap_or_default(),
                ),
                line,
                column,
            });
        }
        let mut problems = Vec::new();
        let mut rest = text.to_owned();
        // Each round sets one line aside; the bound keeps a pathological file cheap.
        for _ in 0..64 {
            match toml::from_str::<Config>(&rest) {
                Ok(config) => {
                    if let Err(ConfigError::Invalid(more)) = config.validate() {
                        problems.extend(more.0);
                    }
                    return Ok((config, problems));
                }
                Err(e) => {
                    let span = e.span().unwrap_or(0..0);
                    let (line, column) = position(&rest, span.start);
                    let raw = rest.get(span.clone()).unwrap_or_default();
                    let key = key_at(&rest, span.start)
                        .map(|k| format!(" ({k})"))
                        .unwrap_or_default();
                    problems.push(format!(
                        "line {line}, column {column}{key}: {}",
                        redact(e.message(), raw)
                    ));
                    match set_line_aside(&rest, span.start) {
                        Some(next) => rest = next,
                        None => break,
                    }
                }
            }
        }
        Err(ConfigError::Invalid(Problems(problems)))
    }

    /// Checks what the types alone cannot, and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |m: String| problems.push(m);
        let rl = self.upstream.rate_limit;
        if rl.requests == 0 {
            invalid("upstream.rate_limit.requests must be > 0".into());
        }
        for (name, d, range) in self.durations() {
            if !range.contains(&d) {
                invalid(format!(
                    "{name} must be between {} and {}",
                    humantime::format_duration(*range.start()),
                    humantime::format_duration(*range.end())
                ));
            }
        }
        if !self.reload.watch_interval.is_zero()
            && !WATCH_INTERVAL.contains(&self.reload.watch_interval)
        {
            invalid(format!(
                "reload.watch_interval must be 0s (off) or between {} and {}",
                humantime::format_duration(*WATCH_INTERVAL.start()),
                humantime::format_duration(*WATCH_INTERVAL.end())
            ));
        }
        self.server.validate_limits(&mut invalid);
        crate::proxy::problems(&self.upstream)
            .into_iter()
            .for_each(&mut invalid);
        if let Some(cluster) = &self.cluster {
            cluster
                .problems(self.upstream.request_timeout)
                .into_iter()
                .for_each(&mut invalid);
        }
        if self.cache.max_bytes == 0 {
            invalid("cache.max_bytes must be > 0".into());
        }
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            invalid("server.admin_listen must differ from server.listen".into());
        }
        if self.token.required_scopes.is_empty() {
            invalid("token.required_scopes must name at least one scope".into());
        }
        if let Some(i) = self
            .token
            .required_scopes
            .iter()
            .position(|s| s.is_empty() || !s.bytes().all(|b| b.is_ascii_graphic()))
        {
            invalid(format!(
                "token.required_scopes[{i}] must be a non-empty scope name without spaces"
            ));
        }
        self.validate_token(&mut invalid);
        let tls = (&self.server.tls_cert_file, &self.server.tls_key_file);
        if tls.0.is_some() != tls.1.is_some() {
            invalid("server.tls_cert_file and server.tls_key_file go together".into());
        }
        if self.server.client_ca_file.is_some() && tls.0.is_none() {
            invalid("server.client_ca_file needs tls_cert_file and tls_key_file".into());
        }
        self.validate_auth(&mut invalid);
        Problems::result(problems)
    }

    /// Every duration with the range it must lie in.
    fn durations(&self) -> [(&'static str, Duration, RangeInclusive<Duration>); 12] {
        let s = &self.server;
        [
            (
                "upstream.connect_timeout",
                self.upstream.connect_timeout,
                SANE,
            ),
            (
                "upstream.request_timeout",
                self.upstream.request_timeout,
                SANE,
            ),
            // A longer hold is cut to this; DAILY holds have their own cap.
            ("upstream.max_hold", self.upstream.max_hold, SANE),
            (
                "upstream.rate_limit.per",
                self.upstream.rate_limit.per,
                SANE,
            ),
            ("server.header_read_timeout", s.header_read_timeout, SANE),
            (
                "server.idle_timeout",
                s.idle_timeout,
                Duration::from_millis(100)..=Duration::from_secs(3600),
            ),
            (
                "server.send_timeout",
                s.send_timeout,
                Duration::from_millis(100)..=Duration::from_secs(600),
            ),
            // 0 closes open connections at once on shutdown.
            (
                "server.shutdown_grace",
                s.shutdown_grace,
                Duration::ZERO..=DAY,
            ),
            (
                "cache.terminal_ttl",
                self.cache.terminal_ttl,
                MILLI..=30 * DAY,
            ),
            // 0 keeps no pending answer.
            (
                "cache.pending_ttl",
                self.cache.pending_ttl,
                Duration::ZERO..=DAY,
            ),
            // 0 turns each off.
            (
                "cache.stale_if_error",
                self.cache.stale_if_error,
                Duration::ZERO..=DAY,
            ),
            (
                "cache.missing_ttl",
                self.cache.missing_ttl,
                Duration::ZERO..=DAY,
            ),
        ]
    }

    fn validate_token(&self, invalid: &mut impl FnMut(String)) {
        let t = &self.token;
        for (name, var) in [
            ("client_id_env", &t.client_id_env),
            ("client_secret_env", &t.client_secret_env),
            ("refresh_token_env", &t.refresh_token_env),
            ("static_token_env", &t.static_token_env),
        ] {
            let Some(var) = var else { continue };
            if !is_variable_name(var) {
                // Not echoed: a value that is not a variable name may be the secret itself.
                invalid(format!(
                    "token.{name} must name an environment variable (letters, digits, _)"
                ));
            }
        }
        let wanted: &[&str] = match t.mode {
            TokenMode::Oauth => &["client_id", "client_secret", "refresh_token"],
            TokenMode::Static => &["static_token"],
        };
        for (name, file, env) in self.secret_sources() {
            match (wanted.contains(&name), file.is_some(), env.is_some()) {
                (true, true, true) => invalid(format!(
                    "token.{name}: set {name}_file or {name}_env, not both"
                )),
                (true, false, false) => {
                    invalid(format!("token.{name}_file or token.{name}_env is required"))
                }
                (false, true, _) | (false, _, true) => {
                    invalid(format!("token.{name}_*: not used with this token.mode"))
                }
                _ => {}
            }
        }
    }

    fn validate_auth(&self, invalid: &mut impl FnMut(String)) {
        let clients = &self.auth.clients;
        let mut names = HashMap::new();
        let mut hashes = HashMap::new();
        let mut cns = HashMap::new();
        for (i, c) in clients.iter().enumerate() {
            // Positions, not names: a name is a value, and values are never echoed.
            if c.name.is_empty() || c.name == "unauthenticated" || c.name == crate::auth::ANONYMOUS
            {
                invalid(format!("auth.clients[{i}].name is empty or reserved"));
            } else if !c.name.bytes().all(|b| b.is_ascii_graphic()) {
                invalid(format!(
                    "auth.clients[{i}].name must be printable ASCII without spaces"
                ));
            }
            if let Some(first) = names.insert(c.name.as_str(), i) {
                invalid(format!(
                    "auth.clients[{i}].name repeats auth.clients[{first}].name"
                ));
            }
            if let Some(h) = &c.key_sha256
                && let Some(first) = hashes.insert(h.to_ascii_lowercase(), i)
            {
                invalid(format!(
                    "auth.clients[{i}].key_sha256 repeats auth.clients[{first}].key_sha256: one key would name two clients"
                ));
            }
            if let Some(cn) = &c.cert_cn
                && let Some(first) = cns.insert(cn.as_str(), i)
            {
                invalid(format!(
                    "auth.clients[{i}].cert_cn repeats auth.clients[{first}].cert_cn"
                ));
            }
        }
        match self.auth.mode {
            AuthMode::ApiKeys => {
                if clients.is_empty() {
                    invalid("auth.mode = \"api_keys\" needs at least one [[auth.clients]]".into());
                }
                for (i, c) in clients.iter().enumerate() {
                    let ok = c
                        .key_sha256
                        .as_deref()
                        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                    if !ok {
                        invalid(format!(
                            "auth.clients[{i}].key_sha256 must be 64 hex digits"
                        ));
                    }
                }
            }
            AuthMode::Mtls => {
                if self.server.client_ca_file.is_none() {
                    invalid("auth.mode = \"mtls\" needs server.client_ca_file (and TLS)".into());
                }
                if clients.is_empty()
                    || clients
                        .iter()
                        .any(|c| c.cert_cn.as_deref().is_none_or(str::is_empty))
                {
                    invalid(
                        "auth.mode = \"mtls\": list the callers as [[auth.clients]] with cert_cn"
                            .into(),
                    );
                }
            }
            AuthMode::None => {
                let loopback = self.server.listen.ip().is_loopback();
                if !loopback && !self.auth.allow_none_off_loopback {
                    invalid(
                        "auth.mode = \"none\" accepts every caller: server.listen must be a loopback address, or set auth.allow_none_off_loopback = true"
                            .into(),
                    );
                }
            }
        }
    }

    /// Each secret with the file and environment variable it may come from.
    fn secret_sources(&self) -> [(&'static str, &Option<PathBuf>, &Option<String>); 4] {
        let t = &self.token;
        [
            ("client_id", &t.client_id_file, &t.client_id_env),
            ("client_secret", &t.client_secret_file, &t.client_secret_env),
            ("refresh_token", &t.refresh_token_file, &t.refresh_token_env),
            ("static_token", &t.static_token_file, &t.static_token_env),
        ]
    }

    /// Every secret file the config names, with its secret's name.
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        self.secret_sources()
            .into_iter()
            .filter_map(|(name, file, _)| file.as_deref().map(|f| (name, f)))
            .collect()
    }

    /// Checks every file the config names: the TLS certificate, key and CA are read and
    /// built into a TLS config, and, with `secrets`, every secret is read. Reports every
    /// problem at once.
    pub fn check_files(
        &self,
        secrets: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if secrets && let Err(ConfigError::Invalid(p)) = self.credentials(env) {
            problems.extend(p.0);
        }
        problems.extend(crate::proxy::check(&self.upstream, secrets, env));
        if let Some(files) = crate::tls::TlsFiles::from_config(&self.server) {
            // Read problems are reported per file; only if all read does building mean more.
            let mut readable = true;
            for (file, path) in files.each() {
                if let Err(e) = std::fs::read(path) {
                    problems.push(crate::tls::TlsError::Read { file, source: e }.to_string());
                    readable = false;
                }
            }
            if readable && let Err(e) = files.acceptor() {
                problems.push(e.to_string());
            }
        }
        Problems::result(problems)
    }

    /// Reads the HubSpot credentials; `env` looks up environment variables (a parameter so
    /// tests need not touch the process environment). Every missing secret is reported.
    pub fn credentials(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Credentials, ConfigError> {
        let t = &self.token;
        let mut problems = Vec::new();
        let mut read = |name: &'static str, file: &Option<PathBuf>, var: &Option<String>| {
            read_secret(name, file, var, env)
                .map_err(|e| problems.push(e))
                .ok()
        };
        let credentials = match t.mode {
            TokenMode::Oauth => {
                let client_id = read("client_id", &t.client_id_file, &t.client_id_env);
                let client_secret =
                    read("client_secret", &t.client_secret_file, &t.client_secret_env);
                let refresh_token =
                    read("refresh_token", &t.refresh_token_file, &t.refresh_token_env);
                match (client_id, client_secret, refresh_token) {
                    (Some(client_id), Some(client_secret), Some(refresh_token)) => {
                        Some(Credentials::Oauth {
                            client_id,
                            client_secret,
                            refresh_token,
                        })
                    }
                    _ => None,
                }
            }
            TokenMode::Static => read("static_token", &t.static_token_file, &t.static_token_env)
                .map(|token| Credentials::Static {
                    token,
                    file: t.static_token_file.clone(),
                }),
        };
        match credentials {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid(Problems(problems))),
        }
    }

    /// The effective configuration as TOML, defaults filled in. Secrets are never inline, so
    /// this shows only where they come from.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |p| p + 1);
    (line, offset - start + 1)
}

/// The dotted name of the key whose line holds `offset` (`server.header_read_timeout`), if
/// that line is `key = value`. Key names are safe to show; values are not.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let line = text[start..].lines().next().unwrap_or_default();
    let key = line.split_once('=')?.0.trim();
    let bare = |k: &str| {
        !k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    };
    if !bare(key) {
        return None;
    }
    let section = text[..start].lines().rev().find_map(|l| {
        let l = l.trim();
        l.starts_with('[')
            .then(|| l.trim_matches(['[', ']', ' ']).to_owned())
    });
    match section {
        Some(section) if bare(&section) => Some(format!("{section}.{key}")),
        _ => Some(key.to_owned()),
    }
}

/// `text` with the line holding `offset` commented out, if what remains is still TOML and
/// still has its sections (a table header set aside would move its keys elsewhere).
fn set_line_aside(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |p| p + 1);
    let end = text[start..].find('\n').map_or(text.len(), |p| start + p);
    let line = text[start..end].trim_start();
    if line.starts_with('[') || line.starts_with('#') || line.is_empty() {
        return None;
    }
    let next = format!("{}#{}", &text[..start], &text[start..]);
    next.parse::<toml::Table>().is_ok().then_some(next)
}

/// Reads one secret from its file or environment variable, trimming surrounding whitespace
/// (mounted secrets often end in a newline). The problem names the config key, never the
/// path or the variable: those are values, and could be a pasted secret.
pub fn read_secret(
    name: &'static str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    read_keyed_secret(&format!("token.{name}"), file, var, env)
}

/// [`read_keyed_secret`] for a secret that may be left unset: `None` when neither
/// `{key}_file` nor `{key}_env` is configured.
pub fn read_optional_secret(
    key: &str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    if file.is_none() && var.is_none() {
        return Ok(None);
    }
    read_keyed_secret(key, file, var, env).map(Some)
}

/// Whether `var` can name an environment variable (letters, digits, `_`, not starting
/// with a digit). A `_env` value that is not one may be the secret itself, pasted there.
pub fn is_variable_name(var: &str) -> bool {
    let mut bytes = var.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// [`read_secret`] for the secret whose keys are `{key}_file` / `{key}_env`, `key` written
/// out with its section (`upstream.proxy_password`).
pub fn read_keyed_secret(
    key: &str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    let raw = match (file, var) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{key}_file: cannot read the file: {e}"))?,
        (None, Some(var)) => env(var)
            .ok_or_else(|| format!("{key}_env names an environment variable that is not set"))?,
        (None, None) => return Err(format!("{key}: no _file or _env configured")),
    };
    let value = raw.trim();
    if value.is_empty() {
        let source = if file.is_some() { "file" } else { "env" };
        return Err(format!("{key}_{source}: the secret is empty"));
    }
    Ok(Secret::new(value))
}

/// Takes every value out of a TOML or serde message, keeping key names (after "field" or
/// "key"), numbers and the expected alternatives (after "expected": they come from the
/// types, not from the file). `raw` is the offending source text, removed wherever it still
/// appears.
fn redact(message: &str, raw: &str) -> String {
    let keeps_names = [
        "unknown field",
        "missing field",
        "duplicate key",
        "duplicate field",
    ]
    .iter()
    .any(|p| message.starts_with(p));
    let (head, tail) = match message.find("expected") {
        Some(i) if !keeps_names => message.split_at(i),
        _ => (message, ""),
    };
    let mut out = String::with_capacity(message.len());
    if keeps_names {
        out.push_str(head);
    } else {
        let mut quote: Option<char> = None;
        for c in head.chars() {
            match quote {
                Some(q) if c == q => {
                    quote = None;
                    out.push_str("<redacted>");
                }
                Some(_) => {}
                None if c == '"' || c == '`' || c == '\'' => quote = Some(c),
                None => out.push(c),
            }
        }
        if quote.is_some() {
            out.push_str("<redacted>");
        }
    }
    out.push_str(tail);
    let raw = raw.trim().trim_matches(['"', '\'']);
    if raw.len() >= 3 && !keeps_names {
        out = out.replace(raw, "<redacted>");
    }
    out
}

/// Durations written as `"250ms"`, `"30s"`, `"24h"`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes a duration the way `parse` reads it.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    /// Reads a duration string; the error never repeats it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses `"250ms"`, `"4s"`, `"1h 30m"`. The error does not repeat the text: it may be a
    /// secret pasted in the wrong place.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            let why = match e {
                humantime::DurationError::NumberOverflow => "too large",
                humantime::DurationError::Empty => "empty",
                humantime::DurationError::UnknownUnit { .. } => "unknown unit",
                humantime::DurationError::NumberExpected(_)
                | humantime::DurationError::InvalidCharacter(_) => "not a number with a unit",
            };
            format!("invalid duration ({why}): write e.g. \"250ms\", \"30s\", \"24h\"")
        })
    }
}

/// Sizes written as `"64MiB"`, `"1GiB"`, `"500KB"` or a plain number of bytes.
pub mod bytesize {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes a size in the largest binary unit that divides it.
    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        let (div, unit) = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|(d, _)| *n >= *d && n % d == 0)
            .unwrap_or((1, "B"));
        s.serialize_str(&format!("{}{unit}", n / div))
    }

    /// Reads a size string; the error never repeats it.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses a size with an optional binary (KiB, MiB, GiB) or decimal (KB, MB, GB) unit.
    /// The error does not repeat the text.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| "invalid size: write e.g. \"64MiB\", \"500KB\" or bytes".to_owned())?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err("invalid size unit: use B, KiB, MiB, GiB, KB, MB or GB".into()),
        };
        n.checked_mul(mult)
            .ok_or_else(|| "invalid size: too large".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[token]
client_id_env = "ID"
client_secret_env = "SECRET"
refresh_token_env = "RT"
[[auth.clients]]
name = "billing"
key_sha256 = "8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4"
"#;

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.server.listen.port(), 8080);
        assert_eq!(c.server.admin_listen.port(), 9090);
        assert_eq!(c.upstream.rate_limit.requests, 90);
        assert_eq!(c.cache.max_bytes, 64 << 20);
        assert_eq!(c.token.required_scopes, ["files", "files.ui_hidden.read"]);
    }

    /// `upstream.max_hold` defaults to 60 s, takes a duration, and is refused at 0 or past
    /// a day (no hold but the daily one lasts longer).
    #[test]
    fn max_hold_is_bounded() {
        let c = Config::parse(MINIMAL).expect("valid");
        assert_eq!(c.upstream.max_hold, Duration::from_secs(60));
        let with = |v: &str| {
            let text = if MINIMAL.contains("[upstream]\n") {
                MINIMAL.replace("[upstream]\n", &format!("[upstream]\nmax_hold = \"{v}\"\n"))
            } else {
                format!("[upstream]\nmax_hold = \"{v}\"\n{MINIMAL}")
            };
            Config::parse(&text)
        };
        assert_eq!(
            with("5m").expect("valid").upstream.max_hold,
            Duration::from_secs(300)
        );
        for bad in ["0s", "25h"] {
            let err = with(bad).expect_err(bad).to_string();
            assert!(err.contains("upstream.max_hold"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = Config::parse(&format!("{MINIMAL}\n[cache]\nmax_byte = \"1MiB\"\n")).unwrap_err();
        assert!(err.to_string().contains("max_byte"), "{err}");
    }

    #[test]
    fn errors_never_echo_what_could_be_a_secret() {
        let pasted = MINIMAL.replace(
            "refresh_token_env = \"RT\"",
            "refresh_token = \"na1-SECRET\"",
        );
        let err = Config::parse(&pasted).unwrap_err().to_string();
        assert!(
            err.contains("refresh_token") && !err.contains("SECRET"),
            "{err}"
        );
        let as_env = MINIMAL.replace(
            "refresh_token_env = \"RT\"",
            "refresh_token_env = \"na1-SECRET\"",
        );
        let err = Config::parse(&as_env).unwrap_err().to_string();
        assert!(err.contains("_env") && !err.contains("SECRET"), "{err}");
    }

    #[test]
    fn sizes_and_durations_parse() {
        assert_eq!(bytesize::parse("64MiB"), Ok(64 << 20));
        assert_eq!(bytesize::parse("1GiB"), Ok(1 << 30));
        assert_eq!(bytesize::parse("500KB"), Ok(500_000));
        assert!(bytesize::parse("12 parsecs").is_err());
        assert_eq!(duration::parse("250ms"), Ok(Duration::from_millis(250)));
        assert!(duration::parse("soon").is_err());
    }

    #[test]
    fn secrets_come_from_env_lookup_and_never_print() {
        let c = Config::parse(MINIMAL).expect("valid");
        let creds = c
            .credentials(&|k| Some(format!("value-of-{k}")))
            .expect("resolved");
        let printed = format!("{creds:?}");
        assert!(!printed.contains("value-of"), "{printed}");
        let missing = c.credentials(&|_| None).unwrap_err().to_string();
        for key in ["client_id_env", "client_secret_env", "refresh_token_env"] {
            assert!(
                missing.contains(key),
                "every missing secret is named: {missing}"
            );
        }
        // The variable names are values: "ID", "SECRET", "RT" never appear.
        assert!(
            !missing.contains("\"ID\"") && !missing.contains(" ID "),
            "{missing}"
        );
    }

    #[test]
    fn mtls_needs_a_client_ca_and_certificate_names() {
        let base = MINIMAL.replace(
            "[[auth.clients]]",
            "[auth]\nmode = \"mtls\"\n[[auth.clients]]",
        );
        let err = Config::parse(&base).unwrap_err();
        assert!(err.to_string().contains("client_ca_file"), "{err}");
        let with_ca = format!(
            "[server]\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\nclient_ca_file = \"ca\"\n{base}"
        );
        let err = Config::parse(&with_ca).unwrap_err();
        assert!(err.to_string().contains("cert_cn"), "{err}");
        let named = with_ca.replace(
            "name = \"billing\"",
            "name = \"billing\"\ncert_cn = \"billing.svc\"",
        );
        Config::parse(&named).expect("mtls with CA and names is valid");
    }

    #[test]
    fn effective_config_round_trips() {
        let c = Config::parse(MINIMAL).expect("valid");
        let again = Config::parse(&c.to_toml()).expect("printed config parses");
        assert_eq!(again.cache.terminal_ttl, c.cache.terminal_ttl);
    }

    /// `base_url` keeps scheme, host, port and a path prefix without its trailing slash, and
    /// refuses everything that could carry a credential.
    #[test]
    fn base_url_is_parsed_once_and_refuses_credentials() {
        let u: BaseUrl = "http://127.0.0.1:8081/prefix/".parse().expect("valid");
        assert_eq!(u.scheme().as_str(), "http");
        assert_eq!(u.authority().as_str(), "127.0.0.1:8081");
        assert_eq!(u.path(), "/prefix");
        assert_eq!(u.to_string(), "http://127.0.0.1:8081/prefix");
        assert_eq!(BaseUrl::hubspot().to_string(), "https://api.hubapi.com");
        for (bad, why) in [
            ("https://u:p@api.hubapi.com", BaseUrlError::Userinfo),
            ("https://api.hubapi.com/?k=v", BaseUrlError::QueryOrFragment),
            ("https://api.hubapi.com/#f", BaseUrlError::QueryOrFragment),
            ("ftp://api.hubapi.com", BaseUrlError::SchemeOrHost),
            ("/just/a/path", BaseUrlError::SchemeOrHost),
            ("http://exa mple.com", BaseUrlError::Syntax),
        ] {
            assert_eq!(bad.parse::<BaseUrl>(), Err(why), "{bad}");
        }
    }

    /// Values are taken out of TOML's messages; key names and the expected alternatives
    /// stay.
    #[test]
    fn redact_keeps_key_names_and_alternatives_only() {
        assert_eq!(
            redact(
                "unknown variant `s3cr3t`, expected `oauth` or `static`",
                "\"s3cr3t\""
            ),
            "unknown variant <redacted>, expected `oauth` or `static`"
        );
        assert_eq!(
            redact(
                "unknown field `refresh_token`, expected one of `mode`",
                "refresh_token"
            ),
            "unknown field `refresh_token`, expected one of `mode`"
        );
        assert_eq!(
            redact("invalid value s3cr3t here", "\"s3cr3t\""),
            "invalid value <redacted> here"
        );
    }

    /// One run names problems on several lines and validation problems together.
    #[test]
    fn every_problem_is_reported_in_one_run() {
        let text = MINIMAL.replace(
            "[token]",
            "[cache]\nterminal_ttl = \"soon\"\nmax_bytes = \"lots\"\n[token]\nmode = \"weird\"",
        ) + "[[auth.clients]]\nname = \"billing\"\nkey_sha256 = \"short\"\n";
        let err = Config::parse(&text).unwrap_err().to_string();
        for part in [
            "(cache.terminal_ttl)",
            "(cache.max_bytes)",
            "(token.mode)",
            "auth.clients[1].name repeats",
            "auth.clients[1].key_sha256 must be 64 hex digits",
        ] {
            assert!(err.contains(part), "{part} missing: {err}");
        }
    }
}

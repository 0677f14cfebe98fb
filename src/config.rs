//! The TOML configuration: its shape, defaults, validation, and where secrets come from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

/// Why a configuration cannot be used. Every variant makes the process exit 64.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The position and TOML's message, never the offending line: it could hold a secret
    /// pasted where it does not belong.
    #[error("invalid config at line {line}, column {column}: {message}")]
    Parse {
        message: String,
        line: usize,
        column: usize,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("secret {name}: cannot read {path}: {source}")]
    SecretFile {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("secret {name}: {reason}")]
    Secret { name: &'static str, reason: String },
}

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
        }
    }
}

/// The largest `upstream.max_hold`: no HubSpot limit but the daily one lasts longer.
const MAX_HOLD_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// `[upstream]`: how HubSpot is reached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub base_url: String,
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
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: "https://api.hubapi.com".into(),
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            rate_limit: RateLimit::default(),
            max_hold: Duration::from_secs(60),
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

/// Which generation of HubSpot's OAuth endpoints to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OauthApi {
    V3,
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
            api: OauthApi::V3,
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
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            max_bytes: 64 << 20,
            terminal_ttl: Duration::from_secs(24 * 3600),
            pending_ttl: Duration::ZERO,
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
    pub clients: Vec<ClientConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::ApiKeys,
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

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start).min(text.len());
            let before = &text.as_bytes()[..offset];
            let line = before.iter().filter(|b| **b == b'\n').count() + 1;
            let column = offset
                - before
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |p| p + 1)
                + 1;
            ConfigError::Parse {
                message: e.message().to_owned(),
                line,
                column,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what the types alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let uri: hyper::Uri = self
            .upstream
            .base_url
            .parse()
            .map_err(|e| ConfigError::Invalid(format!("upstream.base_url: {e}")))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return invalid("upstream.base_url must be an http(s) URL with a host".into());
        }
        if uri.query().is_some() {
            return invalid("upstream.base_url must not have a query".into());
        }
        let rl = self.upstream.rate_limit;
        if rl.requests == 0 || rl.per.is_zero() {
            return invalid("upstream.rate_limit needs requests > 0 and per > 0".into());
        }
        for (name, d) in [
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            ("upstream.request_timeout", self.upstream.request_timeout),
            ("upstream.max_hold", self.upstream.max_hold),
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("cache.terminal_ttl", self.cache.terminal_ttl),
        ] {
            if d.is_zero() {
                return invalid(format!("{name} must be > 0"));
            }
        }
        if self.upstream.max_hold > MAX_HOLD_LIMIT {
            return invalid("upstream.max_hold must be at most 24h".into());
        }
        if self.server.listen == self.server.admin_listen && self.server.listen.port() != 0 {
            return invalid("server.admin_listen must differ from server.listen".into());
        }
        if self.token.required_scopes.is_empty() {
            return invalid("token.required_scopes must name at least one scope".into());
        }
        let t = &self.token;
        let sources = [
            (
                "client_id",
                t.client_id_file.is_some(),
                t.client_id_env.is_some(),
            ),
            (
                "client_secret",
                t.client_secret_file.is_some(),
                t.client_secret_env.is_some(),
            ),
            (
                "refresh_token",
                t.refresh_token_file.is_some(),
                t.refresh_token_env.is_some(),
            ),
            (
                "static_token",
                t.static_token_file.is_some(),
                t.static_token_env.is_some(),
            ),
        ];
        for var in [
            &t.client_id_env,
            &t.client_secret_env,
            &t.refresh_token_env,
            &t.static_token_env,
        ]
        .into_iter()
        .flatten()
        {
            let mut bytes = var.bytes();
            let ok = bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                // Not echoed: a value that is not a variable name may be the secret itself.
                return invalid(
                    "token.*_env must name an environment variable (letters, digits, _)".into(),
                );
            }
        }
        let wanted: &[&str] = match t.mode {
            TokenMode::Oauth => &["client_id", "client_secret", "refresh_token"],
            TokenMode::Static => &["static_token"],
        };
        for (name, file, env) in sources {
            let needed = wanted.contains(&name);
            match (needed, file, env) {
                (true, true, true) => {
                    return invalid(format!(
                        "token.{name}: set {name}_file or {name}_env, not both"
                    ));
                }
                (true, false, false) => {
                    return invalid(format!("token.{name}_file or token.{name}_env is required"));
                }
                (false, true, _) | (false, _, true) => {
                    return invalid(format!("token.{name}_*: not used with this token.mode"));
                }
                _ => {}
            }
        }
        let tls = (&self.server.tls_cert_file, &self.server.tls_key_file);
        if tls.0.is_some() != tls.1.is_some() {
            return invalid("server.tls_cert_file and server.tls_key_file go together".into());
        }
        if self.server.client_ca_file.is_some() && tls.0.is_none() {
            return invalid("server.client_ca_file needs tls_cert_file and tls_key_file".into());
        }
        let mut names = std::collections::HashSet::new();
        for c in &self.auth.clients {
            if c.name.is_empty() || c.name == "unauthenticated" || !names.insert(&c.name) {
                return invalid(format!(
                    "auth.clients: name {:?} is empty, reserved or repeated",
                    c.name
                ));
            }
        }
        match self.auth.mode {
            AuthMode::ApiKeys => {
                if self.auth.clients.is_empty() {
                    return invalid(
                        "auth.mode = \"api_keys\" needs at least one [[auth.clients]]".into(),
                    );
                }
                for c in &self.auth.clients {
                    let ok = c
                        .key_sha256
                        .as_deref()
                        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
                    if !ok {
                        return invalid(format!(
                            "auth.clients {:?}: key_sha256 must be 64 hex digits",
                            c.name
                        ));
                    }
                }
            }
            AuthMode::Mtls => {
                if self.server.client_ca_file.is_none() {
                    return invalid(
                        "auth.mode = \"mtls\" needs server.client_ca_file (and TLS)".into(),
                    );
                }
                if self.auth.clients.is_empty()
                    || self
                        .auth
                        .clients
                        .iter()
                        .any(|c| c.cert_cn.as_deref().is_none_or(str::is_empty))
                {
                    return invalid(
                        "auth.mode = \"mtls\": list the callers as [[auth.clients]] with cert_cn"
                            .into(),
                    );
                }
            }
            AuthMode::None => {}
        }
        Ok(())
    }

    /// Reads the HubSpot credentials; `env` looks up environment variables (a parameter so
    /// tests need not touch the process environment).
    pub fn credentials(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Credentials, ConfigError> {
        let t = &self.token;
        Ok(match t.mode {
            TokenMode::Oauth => Credentials::Oauth {
                client_id: read_secret("client_id", &t.client_id_file, &t.client_id_env, env)?,
                client_secret: read_secret(
                    "client_secret",
                    &t.client_secret_file,
                    &t.client_secret_env,
                    env,
                )?,
                refresh_token: read_secret(
                    "refresh_token",
                    &t.refresh_token_file,
                    &t.refresh_token_env,
                    env,
                )?,
            },
            TokenMode::Static => Credentials::Static {
                token: read_secret(
                    "static_token",
                    &t.static_token_file,
                    &t.static_token_env,
                    env,
                )?,
                file: t.static_token_file.clone(),
            },
        })
    }

    /// The effective configuration as TOML, defaults filled in. Secrets are never inline, so
    /// this shows only where they come from.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Reads one secret from its file or environment variable, trimming surrounding whitespace
/// (mounted secrets often end in a newline).
pub fn read_secret(
    name: &'static str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, ConfigError> {
    let raw = match (file, var) {
        (Some(path), _) => {
            std::fs::read_to_string(path).map_err(|source| ConfigError::SecretFile {
                name,
                path: path.clone(),
                source,
            })?
        }
        (None, Some(var)) => env(var).ok_or_else(|| ConfigError::Secret {
            name,
            reason: format!("environment variable {var} is not set"),
        })?,
        (None, None) => {
            return Err(ConfigError::Secret {
                name,
                reason: "no _file or _env configured".into(),
            });
        }
    };
    let value = raw.trim();
    if value.is_empty() {
        return Err(ConfigError::Secret {
            name,
            reason: "is empty".into(),
        });
    }
    Ok(Secret::new(value))
}

/// Durations written as `"250ms"`, `"30s"`, `"24h"`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses `"250ms"`, `"4s"`, `"1h 30m"`.
    pub fn parse(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim())
            .map_err(|e| format!("invalid duration {text:?}: {e}"))
    }
}

/// Sizes written as `"64MiB"`, `"1GiB"`, `"500KB"` or a plain number of bytes.
pub mod bytesize {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
        let (div, unit) = [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")]
            .into_iter()
            .find(|(d, _)| *n >= *d && n % d == 0)
            .unwrap_or((1, "B"));
        s.serialize_str(&format!("{}{unit}", n / div))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }

    /// Parses a size with an optional binary (KiB, MiB, GiB) or decimal (KB, MB, GB) unit.
    pub fn parse(text: &str) -> Result<u64, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num.parse().map_err(|_| format!("invalid size {text:?}"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" | "kB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => return Err(format!("invalid size unit {other:?} in {text:?}")),
        };
        n.checked_mul(mult)
            .ok_or_else(|| format!("size {text:?} is too large"))
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
        let missing = c.credentials(&|_| None).unwrap_err();
        assert!(missing.to_string().contains("ID"), "{missing}");
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
}

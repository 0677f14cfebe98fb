//! The TOML configuration: the whole file's shape, loading it, and reporting every problem
//! at once. Each section's shape is in `sections`, the checks in `validate`, secrets in
//! `secrets`, and the error messages that never echo a value in `diagnostics`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod base_url;
mod diagnostics;
mod secrets;
mod sections;
mod units;
mod validate;

#[cfg(test)]
mod tests;

pub use base_url::{BaseUrl, BaseUrlError};
pub use secrets::{is_variable_name, read_keyed_secret, read_optional_secret, read_secret};
pub use sections::{
    AuthConfig, AuthMode, CacheConfig, ClientConfig, Credentials, OauthApi, RateLimit,
    ReloadConfig, ServerConfig, TelemetryConfig, TokenConfig, TokenMode, UpstreamConfig,
};
pub use units::{bytesize, duration};

use diagnostics::{key_at, position, redact, set_line_aside};

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
    /// `[telemetry]`: traces over OTLP; absent = no tracing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetryConfig>,
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

    /// The effective configuration as TOML, defaults filled in. Secrets are never inline, so
    /// this shows only where they come from.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

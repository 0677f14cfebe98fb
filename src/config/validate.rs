//! What the types alone cannot check: ranges, pairs of keys that go together, clients
//! that repeat, and auth modes that need more.

use std::collections::HashMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::{AuthMode, Config, ConfigError, Problems, TokenMode, is_variable_name};

const MILLI: Duration = Duration::from_millis(1);
const DAY: Duration = Duration::from_secs(24 * 3600);
/// The range of every timeout and window unless its key documents another.
const SANE: RangeInclusive<Duration> = MILLI..=DAY;
/// How often files may be polled for a change, when polling is on.
const WATCH_INTERVAL: RangeInclusive<Duration> = Duration::from_millis(100)..=DAY;

impl Config {
    /// Checks what the types alone cannot, and reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |m: String| problems.push(m);
        let rl = self.upstream.rate_limit;
        if rl.requests == 0 {
            invalid("upstream.rate_limit.requests must be > 0".into());
        }
        if self.upstream.daily_limit == Some(0) {
            invalid("upstream.daily_limit must be > 0 (leave it unset for none)".into());
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
        if let Some(telemetry) = &self.telemetry {
            validate_telemetry(telemetry, &mut invalid);
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
            if c.share.is_some_and(|s| !(s > 0.0 && s <= 1.0)) {
                invalid(format!(
                    "auth.clients[{i}].share must be a fraction in (0, 1]"
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
}

/// `[telemetry]`: a receiver URL the exporter can use, a printable service name, a ratio
/// that is one, and an export bound that neither gives up at once nor holds shutdown long.
fn validate_telemetry(t: &super::TelemetryConfig, invalid: &mut impl FnMut(String)) {
    if crate::telemetry::traces_url(&t.otlp_endpoint).is_none() {
        // Not echoed: a URL may carry a credential.
        invalid(
            "telemetry.otlp_endpoint must be http://host[:port][/prefix] or https://..., without user, password, query or fragment"
                .into(),
        );
    }
    if t.service_name.is_empty()
        || t.service_name.len() > 255
        || !t.service_name.bytes().all(|b| b.is_ascii_graphic())
    {
        invalid("telemetry.service_name must be 1 to 255 printable ASCII characters".into());
    }
    if !(0.0..=1.0).contains(&t.sample_ratio) {
        invalid("telemetry.sample_ratio must be between 0 and 1".into());
    }
    let export = Duration::from_millis(100)..=Duration::from_secs(60);
    if !export.contains(&t.export_timeout) {
        invalid("telemetry.export_timeout must be between 100ms and 1m".into());
    }
}

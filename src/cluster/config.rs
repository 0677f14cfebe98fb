//! `[cluster]`: where the shared Redis is, how long each call may take, and its validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{duration, read_optional_secret};
use crate::secret::Secret;

/// `[cluster]`: the Redis (or Valkey) every replica shares. Absent, each replica keeps its own
/// budget, cache and single-flight, as without this table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port[/db]` or `rediss://` (TLS); never with a password in it.
    pub redis_url: String,
    /// ACL user name; unset means the `default` user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_username: Option<String>,
    /// A mounted file holding the Redis password (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password_file: Option<PathBuf>,
    /// The name of an environment variable holding the Redis password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_password_env: Option<String>,
    /// PEM file of the CA that signed the Redis server's certificate (`rediss://` only);
    /// unset, the server must present a certificate from a public CA (webpki roots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis_ca_file: Option<PathBuf>,
    /// Prepended to every key and channel, so several gateways can share one Redis.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Bound of each Redis call; past it the call counts as failed and the caller falls back.
    #[serde(default = "default_timeout", with = "duration")]
    pub timeout: Duration,
    /// How many replicas share the account while Redis is unreachable: each then keeps
    /// `limit / replicas_hint` of the budget locally.
    #[serde(default = "default_replicas_hint")]
    pub replicas_hint: u32,
    /// Life of a flight's lease without renewal; longer than `upstream.request_timeout`, so
    /// a live leader never loses it, and the time a dead leader's waiters wait to take over.
    #[serde(default = "default_lease_ttl", with = "duration")]
    pub lease_ttl: Duration,
    /// How often a waiter polls for the leader's answer when no pub/sub message came.
    #[serde(default = "default_poll_interval", with = "duration")]
    pub poll_interval: Duration,
}

fn default_prefix() -> String {
    "hsgw:".into()
}
fn default_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_replicas_hint() -> u32 {
    2
}
fn default_lease_ttl() -> Duration {
    Duration::from_secs(15)
}
fn default_poll_interval() -> Duration {
    Duration::from_millis(100)
}

impl ClusterConfig {
    /// A config for `redis_url` with every default, for tests and embedding.
    pub fn new(redis_url: impl Into<String>) -> ClusterConfig {
        ClusterConfig {
            redis_url: redis_url.into(),
            redis_username: None,
            redis_password_file: None,
            redis_password_env: None,
            redis_ca_file: None,
            key_prefix: default_prefix(),
            timeout: default_timeout(),
            replicas_hint: default_replicas_hint(),
            lease_ttl: default_lease_ttl(),
            poll_interval: default_poll_interval(),
        }
    }

    /// Every problem with the table, each a sentence naming its key (empty = valid);
    /// `request_timeout` is `upstream.request_timeout`, which the lease must outlive. No
    /// message echoes a value: the URL may hold a pasted password.
    pub fn problems(&self, request_timeout: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        let mut invalid = |m: &str| problems.push(format!("cluster.{m}"));
        match redis::parse_redis_url(&self.redis_url) {
            None => invalid("redis_url must be a redis:// or rediss:// URL"),
            Some(url) => {
                if !matches!(url.scheme(), "redis" | "rediss") || url.host().is_none() {
                    invalid("redis_url must be a redis:// or rediss:// URL with a host");
                }
                if url.password().is_some() {
                    invalid(
                        "redis_url must not hold a password: use redis_password_file or redis_password_env",
                    );
                }
                if !url.username().is_empty() && self.redis_username.is_some() {
                    invalid("redis_username: set it in redis_url or here, not both");
                }
                if self.redis_ca_file.is_some() && url.scheme() != "rediss" {
                    invalid("redis_ca_file needs a rediss:// (TLS) redis_url");
                }
                if url.query().is_some() {
                    invalid("redis_url must not have a query");
                }
            }
        }
        if self.redis_password_file.is_some() && self.redis_password_env.is_some() {
            invalid("redis_password: set redis_password_file or redis_password_env, not both");
        }
        if let Some(var) = &self.redis_password_env {
            let mut bytes = var.bytes();
            let ok = bytes
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                invalid(
                    "redis_password_env must name an environment variable (letters, digits, _)",
                );
            }
        }
        if self.key_prefix.is_empty()
            || self.key_prefix.len() > 64
            || !self.key_prefix.bytes().all(|b| b.is_ascii_graphic())
        {
            invalid("key_prefix must be 1-64 printable ASCII characters without spaces");
        }
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(5) {
            invalid("timeout must be > 0 and at most 5s (it is paid on every request)");
        }
        if self.replicas_hint == 0 {
            invalid("replicas_hint must be at least 1");
        }
        if self.lease_ttl <= request_timeout {
            invalid("lease_ttl must be longer than upstream.request_timeout");
        }
        if self.poll_interval.is_zero() || self.poll_interval >= self.lease_ttl {
            invalid("poll_interval must be > 0 and shorter than lease_ttl");
        }
        problems
    }

    /// The Redis password from its file or environment variable, if one is configured. The
    /// error is the config module's message (never the secret).
    pub fn password(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Option<Secret>, String> {
        // Named with its section: the problem then points at the right key.
        read_optional_secret(
            "cluster.redis_password",
            &self.redis_password_file,
            &self.redis_password_env,
            env,
        )
    }

    /// What `check-config` checks beyond the table itself: the CA file is read, and with
    /// `secrets` the password too. Each problem names its key, never the path or the secret.
    pub fn file_problems(
        &self,
        secrets: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        if let Some(path) = &self.redis_ca_file
            && std::fs::read(path).is_err()
        {
            problems.push("cluster.redis_ca_file cannot be read".to_owned());
        }
        if secrets && let Err(e) = self.password(env) {
            problems.push(e);
        }
        problems
    }

    /// This replica's share of an account `limit` while Redis is unreachable (at least 1, so
    /// a replica can always make progress).
    pub fn local_share(&self, limit: u32) -> u32 {
        (limit / self.replicas_hint.max(1)).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn parse(text: &str) -> Result<ClusterConfig, String> {
        let c: ClusterConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        let problems = c.problems(REQUEST_TIMEOUT);
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(c)
    }

    /// A minimal table gets the documented defaults.
    #[test]
    fn defaults() {
        let c = parse("redis_url = \"redis://valkey:6379\"").expect("valid");
        assert_eq!(c.key_prefix, "hsgw:");
        assert_eq!(c.timeout, Duration::from_millis(50));
        assert_eq!(c.replicas_hint, 2);
        assert_eq!(c.local_share(90), 45);
        assert_eq!(c.local_share(1), 1);
        assert!(c.password(&|_| None).expect("no password").is_none());
    }

    /// A password pasted into the URL is refused without being echoed.
    #[test]
    fn inline_password_is_refused_and_not_echoed() {
        let err = parse("redis_url = \"rediss://user:hunter2@valkey:6380\"").unwrap_err();
        assert!(
            err.contains("redis_password_file") && !err.contains("hunter2"),
            "{err}"
        );
        let err = parse("redis_url = \"http://valkey\"").unwrap_err();
        assert!(err.contains("redis_url"), "{err}");
    }

    /// Secrets follow the `_file`/`_env` convention and never print.
    #[test]
    fn password_from_env_never_prints() {
        let c = parse("redis_url = \"redis://v\"\nredis_password_env = \"REDIS_PW\"").expect("ok");
        let pw = c
            .password(&|k| (k == "REDIS_PW").then(|| "s3cret\n".into()))
            .expect("read")
            .expect("configured");
        assert_eq!(pw.expose(), "s3cret");
        assert!(!format!("{c:?} {pw:?}").contains("s3cret"));
        let both =
            "redis_url = \"redis://v\"\nredis_password_env = \"A\"\nredis_password_file = \"/f\"";
        assert!(parse(both).unwrap_err().contains("not both"));
    }

    /// `[cluster]` in the gateway's file is read and validated with the rest of it.
    #[test]
    fn the_gateway_config_carries_it() {
        let base = concat!(
            "[token]\nmode = \"static\"\nstatic_token_env = \"T\"\n",
            "[[auth.clients]]\nname = \"billing\"\n",
            "key_sha256 = \"8f434346648f6b96df89dda901c5176b10a6d83961dd3c1ac88b59b2dc327aa4\"\n",
        );
        let none = crate::config::Config::parse(base).expect("valid");
        assert!(none.cluster.is_none());
        let with = format!("{base}[cluster]\nredis_url = \"redis://valkey:6379\"\n");
        let c = crate::config::Config::parse(&with).expect("valid");
        assert_eq!(c.cluster.expect("present").redis_url, "redis://valkey:6379");
        let short = format!(
            "{base}[upstream]\nrequest_timeout = \"20s\"\n[cluster]\nredis_url = \"redis://v\"\n"
        );
        let err = crate::config::Config::parse(&short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("lease_ttl"), "{err}");
    }

    /// `check-config` reads the CA file and, unless told not to, the password: a missing
    /// one is named by its key, without the path or variable name.
    #[test]
    fn files_and_password_are_checked() {
        let c = parse(
            "redis_url = \"rediss://v\"\nredis_ca_file = \"/nonexistent/ca-x.pem\"\nredis_password_env = \"PW_VAR_X\"",
        )
        .expect("valid table");
        let problems = c.file_problems(true, &|_| None).join("; ");
        assert!(problems.contains("cluster.redis_ca_file"), "{problems}");
        assert!(problems.contains("cluster.redis_password"), "{problems}");
        assert!(
            !problems.contains("ca-x") && !problems.contains("PW_VAR_X"),
            "{problems}"
        );
        let without_secrets = c.file_problems(false, &|_| None);
        assert_eq!(without_secrets.len(), 1, "{without_secrets:?}");
    }

    /// Bounds that would make the cluster unsafe are refused.
    #[test]
    fn unsafe_values_are_refused() {
        let lease = parse("redis_url = \"redis://v\"\nlease_ttl = \"5s\"").unwrap_err();
        assert!(lease.contains("lease_ttl"), "{lease}");
        let t = parse("redis_url = \"redis://v\"\ntimeout = \"0s\"").unwrap_err();
        assert!(t.contains("timeout"), "{t}");
        let r = parse("redis_url = \"redis://v\"\nreplicas_hint = 0").unwrap_err();
        assert!(r.contains("replicas_hint"), "{r}");
        let ca = parse("redis_url = \"redis://v\"\nredis_ca_file = \"/ca.pem\"").unwrap_err();
        assert!(ca.contains("rediss://"), "{ca}");
        let unknown = parse("redis_url = \"redis://v\"\nredis_password = \"x\"").unwrap_err();
        assert!(unknown.contains("redis_password"), "{unknown}");
    }
}

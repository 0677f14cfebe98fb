//! The second-level cache: terminal answers (COMPLETE, CANCELED) shared between replicas,
//! each stored with the time Redis stored it so every replica reports the true `Age`.
//!
//! One hash per task: `t` = Redis' clock at store (ms), `v` = the [`codec`](super::codec)
//! bytes; the key carries the hub id, and a read also checks the hub inside the value.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;

use super::{Answer, ClusterBackend, ClusterError, TaskKey, millis};

/// An answer read from the shared cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswer {
    /// The answer as the storing replica had it.
    pub answer: Answer,
    /// Time since a replica stored it, by Redis' clock.
    pub age: Duration,
}

/// KEYS: entry. ARGV: encoded answer, ttl ms.
static PUT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 't', now, 'v', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
"#,
    )
});

/// KEYS: entry. Returns nil, or {now ms, stored ms, encoded answer}.
static GET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local e = redis.call('HMGET', KEYS[1], 't', 'v')
if not e[1] or not e[2] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, tonumber(e[1]), e[2]}
"#,
    )
});

impl ClusterBackend {
    pub(crate) fn cache_key(&self, key: &TaskKey) -> String {
        self.key("c", key.suffix())
    }

    /// Stores a terminal answer for `ttl` (`cache.terminal_ttl`). The answer must belong to
    /// the key's hub.
    pub async fn cache_put(
        &self,
        key: &TaskKey,
        answer: &Answer,
        ttl: Duration,
    ) -> Result<(), ClusterError> {
        if answer.hub_id != key.hub_id {
            return Err(ClusterError::WrongHub);
        }
        let bytes = answer.encode()?;
        let ttl_ms = millis(ttl).max(1);
        let _: u64 = self
            .call(
                "cache_put",
                PUT.key(self.cache_key(key))
                    .arg(bytes)
                    .arg(ttl_ms)
                    .invoke_async(&mut self.conn()),
            )
            .await?;
        Ok(())
    }

    /// The shared answer for `key`, with its age; `None` when no replica stored one.
    pub async fn cache_get(&self, key: &TaskKey) -> Result<Option<CachedAnswer>, ClusterError> {
        let found: Option<(u64, u64, Vec<u8>)> = self
            .call(
                "cache_get",
                GET.key(self.cache_key(key)).invoke_async(&mut self.conn()),
            )
            .await?;
        let Some((now, stored, bytes)) = found else {
            return Ok(None);
        };
        self.found(key, now.saturating_sub(stored), &bytes)
            .map(Some)
    }

    /// An entry's bytes and age (ms, as a script writes it) read with a flight's first look.
    pub(crate) fn cached(
        &self,
        key: &TaskKey,
        age_ms: &str,
        bytes: &[u8],
    ) -> Result<CachedAnswer, ClusterError> {
        let age_ms = age_ms.parse().map_err(|_| ClusterError::Redis {
            op: "flight_lookup",
            message: "unreadable age of a cached answer".to_owned(),
        })?;
        self.found(key, age_ms, bytes)
    }

    /// A stored entry for `key` as the caller gets it: decoded, checked to be of the key's
    /// hub, counted as a hit.
    fn found(
        &self,
        key: &TaskKey,
        age_ms: u64,
        bytes: &[u8],
    ) -> Result<CachedAnswer, ClusterError> {
        let answer = Answer::decode(bytes)?;
        if answer.hub_id != key.hub_id {
            return Err(ClusterError::WrongHub);
        }
        self.inner.metrics.cache_hits_total.inc();
        Ok(CachedAnswer {
            answer,
            age: Duration::from_millis(age_ms),
        })
    }
}

//! Faults the simulator can be told to inject, and how `POST /__sim/faults` changes them.

use serde::{Deserialize, Serialize};

/// The most `pad_bytes` can add: enough to exceed any relay limit, not enough to hurt.
const MAX_PAD_BYTES: u64 = 64 << 20;

/// The faults and account settings in force right now (`GET /__sim/faults` shows this).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Faults {
    /// Extra delay before every status-route answer, in milliseconds.
    pub latency_ms: u64,
    /// Share (0..=1) of status requests answered with `fail_status` and a HubSpot error body.
    pub fail_rate: f64,
    /// Which 5xx the `fail_rate` answers use.
    pub fail_status: u16,
    /// Share (0..=1) of status requests whose connection is closed without an answer.
    pub reset_rate: f64,
    /// OAuth endpoints answer 503 with a HubSpot error body.
    pub token_down: bool,
    /// OAuth endpoints answer this status with a HubSpot error body.
    pub token_status: Option<u16>,
    /// Extra delay before every OAuth endpoint answer, in milliseconds.
    pub token_latency_ms: u64,
    /// OAuth endpoints answer 200 with a body that is not JSON.
    pub token_garbage: bool,
    /// Introspection (and v1 token info) report every token as inactive.
    pub introspect_inactive: bool,
    /// Scopes granted to tokens issued from now on (and to the static token).
    pub scopes: Vec<String>,
    /// Hub (account) id of tokens issued from now on (and of the static token).
    pub hub_id: u64,
    /// Every token answer carries a new refresh token; the one presented stops working.
    pub rotate_refresh_token: bool,
    /// The next status requests are answered with a fixed status.
    pub status_override: Option<StatusOverride>,
    /// Bytes of JSON whitespace appended to every status-route 200 body (an answer too large
    /// to relay).
    pub pad_bytes: u64,
}

/// "Answer the next `count` status requests with `status`" (a HubSpot error body; 429 uses
/// HubSpot's rate-limit body, with `policy_name` when given, and sends `Retry-After:
/// retry_after` when given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusOverride {
    /// HTTP status to answer with.
    pub status: u16,
    /// How many status requests still get it.
    pub count: u32,
    /// The `Retry-After` header (sent with 429 only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<RetryAfter>,
    /// The 429 body's `policyName` (`TEN_SECONDLY_ROLLING` when absent): `DAILY` makes
    /// HubSpot's daily-limit answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
}

/// A `Retry-After` value: a number of seconds, or any text sent as it is (an HTTP-date, or
/// a value HubSpot should never send, for the gateway's tests).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RetryAfter {
    /// `Retry-After: <seconds>`.
    Seconds(u64),
    /// `Retry-After: <text>`, verbatim.
    Raw(String),
}

/// The JSON body of `POST /__sim/faults`. Every field is optional and, when present, replaces
/// the current value; `{}` changes nothing. Unknown fields are rejected (400) so that a typo
/// in a test does not silently inject nothing.
///
/// - `latency_ms` (u64): delay before each status-route answer.
/// - `fail_rate` (0..=1): share of status requests answered `fail_status` with a HubSpot body.
/// - `fail_status` (u16, default 503): the 5xx used by `fail_rate`.
/// - `reset_rate` (0..=1): share of status requests whose connection is closed unanswered.
/// - `token_down` (bool): OAuth endpoints (token and introspect on every version, v1 token info,
///   private-app info) answer 503.
/// - `token_status` (u16 or null): OAuth endpoints answer this status with an error body.
/// - `token_latency_ms` (u64): delay before each OAuth endpoint answer.
/// - `token_garbage` (bool): OAuth endpoints answer 200 with a non-JSON body.
/// - `introspect_inactive` (bool): introspection answers `active: false` (scopes unchanged,
///   so only `active` tells), v1 token info answers 404.
/// - `scopes` (string[]): scopes of tokens issued from now on, and of the static token.
/// - `hub_id` (u64): hub of tokens issued from now on, and of the static token.
/// - `rotate_refresh_token` (bool): each token answer returns a new refresh token and the
///   presented one stops working.
/// - `revoke_all` (bool, one-shot): every access token issued so far becomes invalid (401).
/// - `status_override` (`{"status", "count", "retry_after"?, "policy_name"?}` or null): the
///   next `count` status requests answer `status`; a 429 carries `Retry-After: retry_after`
///   (a number, or a string sent verbatim such as an HTTP-date) and `policyName:
///   policy_name` (default `TEN_SECONDLY_ROLLING`; `DAILY` for the daily limit).
/// - `pad_bytes` (u64): whitespace appended to every status-route 200 body.
/// - `add_static_token` (`{"token", "scopes"?}`, one-shot): one more private-app token is
///   accepted (as a bearer and by private-app info), with these scopes for good, or without
///   `scopes` the current `scopes` like the configured static token. For rotation tests.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    /// See the struct doc.
    pub latency_ms: Option<u64>,
    /// See the struct doc.
    pub fail_rate: Option<f64>,
    /// See the struct doc.
    pub fail_status: Option<u16>,
    /// See the struct doc.
    pub reset_rate: Option<f64>,
    /// See the struct doc.
    pub token_down: Option<bool>,
    /// See the struct doc; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    pub token_status: Option<Option<u16>>,
    /// See the struct doc.
    pub token_latency_ms: Option<u64>,
    /// See the struct doc.
    pub token_garbage: Option<bool>,
    /// See the struct doc.
    pub introspect_inactive: Option<bool>,
    /// See the struct doc.
    pub scopes: Option<Vec<String>>,
    /// See the struct doc.
    pub hub_id: Option<u64>,
    /// See the struct doc.
    pub rotate_refresh_token: Option<bool>,
    /// See the struct doc.
    pub revoke_all: Option<bool>,
    /// See the struct doc; `null` clears it.
    #[serde(default, deserialize_with = "present")]
    pub status_override: Option<Option<StatusOverride>>,
    /// See the struct doc.
    pub pad_bytes: Option<u64>,
    /// See the struct doc.
    pub add_static_token: Option<StaticToken>,
}

/// A private-app token added at run time (`add_static_token`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticToken {
    /// The token value.
    pub token: String,
    /// Its scopes, fixed; absent = the account's current scopes.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
}

/// Tells "field absent" (outer `None`, via `default`) from "field is null" (`Some(None)`).
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl FaultUpdate {
    /// Checks the ranges a JSON type cannot express.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("fail_rate", self.fail_rate),
            ("reset_rate", self.reset_rate),
        ] {
            if let Some(rate) = rate
                && !(0.0..=1.0).contains(&rate)
            {
                return Err(format!("{name} must be within 0..=1"));
            }
        }
        if let Some(status) = self.fail_status
            && !(500..=599).contains(&status)
        {
            return Err("fail_status must be a 5xx status".to_owned());
        }
        let statuses = [
            self.token_status.flatten(),
            self.status_override.clone().flatten().map(|o| o.status),
        ];
        if statuses
            .into_iter()
            .flatten()
            .any(|s| !(100..=599).contains(&s))
        {
            return Err("statuses must be within 100..=599".to_owned());
        }
        if self.pad_bytes.is_some_and(|n| n > MAX_PAD_BYTES) {
            return Err(format!("pad_bytes must be at most {MAX_PAD_BYTES}"));
        }
        if let Some(Some(StatusOverride {
            retry_after: Some(RetryAfter::Raw(text)),
            ..
        })) = &self.status_override
            && hyper::header::HeaderValue::from_str(text).is_err()
        {
            return Err("retry_after must be a valid header value".to_owned());
        }
        Ok(())
    }
}

impl Faults {
    /// Uses up one request of `status_override`: the override to answer with, if any is left.
    pub(crate) fn take_override(&mut self) -> Option<StatusOverride> {
        let current = self.status_override.take().filter(|o| o.count > 0)?;
        if current.count > 1 {
            self.status_override = Some(StatusOverride {
                count: current.count - 1,
                ..current.clone()
            });
        }
        Some(current)
    }

    /// Replaces every field the update names; `revoke_all` and `add_static_token` are not
    /// stored faults and are handled by the caller.
    pub fn apply(&mut self, update: &FaultUpdate) {
        let u = update.clone();
        if let Some(v) = u.latency_ms {
            self.latency_ms = v;
        }
        if let Some(v) = u.fail_rate {
            self.fail_rate = v;
        }
        if let Some(v) = u.fail_status {
            self.fail_status = v;
        }
        if let Some(v) = u.reset_rate {
            self.reset_rate = v;
        }
        if let Some(v) = u.token_down {
            self.token_down = v;
        }
        if let Some(v) = u.token_status {
            self.token_status = v;
        }
        if let Some(v) = u.token_latency_ms {
            self.token_latency_ms = v;
        }
        if let Some(v) = u.token_garbage {
            self.token_garbage = v;
        }
        if let Some(v) = u.introspect_inactive {
            self.introspect_inactive = v;
        }
        if let Some(v) = u.scopes {
            self.scopes = v;
        }
        if let Some(v) = u.hub_id {
            self.hub_id = v;
        }
        if let Some(v) = u.rotate_refresh_token {
            self.rotate_refresh_token = v;
        }
        if let Some(v) = u.status_override {
            self.status_override = v;
        }
        if let Some(v) = u.pad_bytes {
            self.pad_bytes = v;
        }
    }
}

//! Logging: the subscriber (text or JSON lines on stderr, through a bounded writer that never
//! blocks a request), the access line of each request, the W3C trace id it carries, and the
//! count of upstream tries a fetch made.
//!
//! Access lines have the target [`ACCESS_TARGET`] and are governed by `[log] access` alone;
//! `RUST_LOG` governs every other event. Both go to one writer: a queue of
//! [`BUFFERED_LINES`] lines drained by a thread of its own. When the queue is full a line is
//! dropped, not waited for, and counted in `hubspot_gateway_log_lines_dropped_total`.

use std::future::Future;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use hyper::HeaderMap;
use serde::{Deserialize, Serialize};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// The target of every access line (`"target":"access"` in JSON).
pub const ACCESS_TARGET: &str = "access";
/// The event name of an access line for a 2xx/3xx answer; `[log] access = "errors"` leaves
/// these out. Names are metadata, so the choice is made once per call site, not per line.
pub const ANSWERED: &str = "answered";
/// The event name of an access line for any other answer.
pub const REFUSED: &str = "refused";
/// Lines the writer queue holds before it drops: about 5 MB of JSON access lines, many
/// seconds of a busy replica's output for a collector that stalls.
pub const BUFFERED_LINES: usize = 16_384;

/// `[log]`: how lines are written and which requests get an access line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` (for a person) or `json` (one object a line, for a log collector).
    pub format: LogFormat,
    /// Which requests get an access line.
    pub access: AccessLog,
}

/// The line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-01-01T00:00:00.000000Z  INFO target: message key=value ...`
    #[default]
    Text,
    /// `{"timestamp":..,"level":..,"target":..,"message":..,"key":value,...}`
    Json,
}

/// Which requests get an access line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    /// Every request.
    #[default]
    All,
    /// Only answers that are not 2xx or 3xx.
    Errors,
    /// None.
    Off,
}

impl AccessLog {
    /// Whether an access line with this event name is written.
    fn enabled(self, name: &str) -> bool {
        match self {
            AccessLog::All => true,
            AccessLog::Errors => name != ANSWERED,
            AccessLog::Off => false,
        }
    }
}

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines the writer dropped because its queue was full, since start (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Installs the process's subscriber. Keep the guard until exit: dropping it flushes the
/// lines still queued. Call once; a second call leaves the first subscriber in place.
pub fn init(config: &LogConfig) -> WorkerGuard {
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let _ = DROPPED.set(writer.error_counter());
    let env = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let access = config.access;
    let events = env.and(filter_fn(|m| m.target() != ACCESS_TARGET));
    let access_lines = filter_fn(move |m| m.target() == ACCESS_TARGET && access.enabled(m.name()));
    let layer = match config.format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            // Colour only for a person at a terminal; log collectors get plain text.
            .with_ansi(std::io::stderr().is_terminal())
            .with_filter(events.or(access_lines))
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(writer)
            .with_filter(events.or(access_lines))
            .boxed(),
    };
    let _ = Registry::default().with(layer).try_init();
    guard
}

/// The trace id of a valid W3C `traceparent` header (32 lowercase hex digits, not all zero),
/// if the caller sent exactly one.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all("traceparent").iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    parse_traceparent(value)
}

/// `version-traceid-parentid-flags`: version `00` is exactly that; a later version may append
/// `-...`, and `ff` is invalid.
fn parse_traceparent(value: &str) -> Option<&str> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let (head, rest) = (value.get(..55)?, &value[55..]);
    let mut parts = head.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let valid = hex(version, 2)
        && version != "ff"
        && (rest.is_empty() || (version != "00" && rest.starts_with('-')))
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    valid.then_some(trace)
}

tokio::task_local! {
    static UPSTREAM_TRIES: Arc<AtomicU32>;
}

/// Runs `fetch` with its upstream tries counted into `tries` (see [`upstream_try`]).
pub async fn counting_tries<F: Future>(tries: Arc<AtomicU32>, fetch: F) -> F::Output {
    UPSTREAM_TRIES.scope(tries, fetch).await
}

/// Counts one call sent to HubSpot for the fetch in progress, if it is being counted.
pub fn upstream_try() {
    let _ = UPSTREAM_TRIES.try_with(|t| t.fetch_add(1, Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only well-formed `traceparent` values yield a trace id: the examples of the W3C
    /// recommendation, and the invalid forms it names (version ff, all-zero ids, upper case,
    /// wrong lengths, trailing data on version 00).
    #[test]
    fn traceparent_is_read_as_the_recommendation_says() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let good = format!("00-{trace}-00f067aa0ba902b7-01");
        assert_eq!(parse_traceparent(&good), Some(trace));
        let later = format!("01-{trace}-00f067aa0ba902b7-01-more");
        assert_eq!(parse_traceparent(&later), Some(trace));
        for bad in [
            format!("ff-{trace}-00f067aa0ba902b7-01"),
            format!("00-{}-00f067aa0ba902b7-01", "0".repeat(32)),
            format!("00-{trace}-0000000000000000-01"),
            format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
            format!("00-{trace}-00f067aa0ba902b7-01-more"),
            format!("01-{trace}-00f067aa0ba902b7-01more"),
            format!("00-{trace}-00f067aa0ba902b7-1"),
            "00-abc".to_owned(),
            String::new(),
            "é".repeat(40),
        ] {
            assert_eq!(parse_traceparent(&bad), None, "{bad}");
        }
    }

    /// `errors` writes refusals only, `off` nothing, `all` both.
    #[test]
    fn access_modes_choose_by_event_name() {
        assert!(AccessLog::All.enabled(ANSWERED) && AccessLog::All.enabled(REFUSED));
        assert!(!AccessLog::Errors.enabled(ANSWERED) && AccessLog::Errors.enabled(REFUSED));
        assert!(!AccessLog::Off.enabled(ANSWERED) && !AccessLog::Off.enabled(REFUSED));
    }
}

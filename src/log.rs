//! Logging: the subscriber (text or JSON lines on stderr, through a bounded writer that never
//! blocks a request), the access line of each request, the W3C trace id it carries, and the
//! count of upstream tries a fetch made.
//!
//! Access lines have the target [`ACCESS_TARGET`] and are governed by `[log] access` alone;
//! `RUST_LOG` governs every other event. Both go to one writer: a queue of at most
//! [`BUFFERED_LINES`] lines that a thread of its own writes out in batches, one `write` per
//! batch. When the queue is full a line is dropped, not waited for, and counted in
//! `hubspot_gateway_log_lines_dropped_total`.
//!
//! In JSON the access line is written by hand into a per-thread buffer, in the same shape as
//! the JSON formatter writes every other event: on a cache hit the generic formatter and a
//! `write` per line cost a fifth of the gateway's CPU (docs/benchmarks.md, "Profile findings").

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use hyper::HeaderMap;
use serde::{Deserialize, Serialize};
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
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
/// How long the writer lets lines gather after a batch: a busy replica's lines leave in one
/// `write` per pause instead of one per line, and its request threads wake the writer at most
/// once per pause.
const GATHER: Duration = Duration::from_millis(5);
/// How long the exit waits for the writer to write what is queued (a stalled stderr never
/// holds the exit longer).
const FLUSH_AT_EXIT: Duration = Duration::from_secs(1);

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

/// The process's writer, once [`init`] made it.
static WRITER: OnceLock<LineWriter> = OnceLock::new();
/// Set by [`init`] for `format = "json"`: access lines are then written by hand, filtered by
/// this mode.
static JSON_ACCESS: OnceLock<AccessLog> = OnceLock::new();

/// Lines the writer dropped because its queue was full, since start (0 before [`init`]).
pub fn dropped_lines() -> u64 {
    WRITER
        .get()
        .map_or(0, |w| w.queue.dropped.load(Ordering::Relaxed))
}

/// Installs the process's subscriber. Keep the guard until exit: dropping it writes the
/// lines still queued. Call once; a second call leaves the first subscriber in place.
pub fn init(config: &LogConfig) -> LogGuard {
    if WRITER.get().is_some() {
        return LogGuard(None);
    }
    let writer = WRITER
        .get_or_init(|| LineWriter::start(std::io::stderr()))
        .clone();
    let guard = LogGuard(Some(writer.clone()));
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
        LogFormat::Json => {
            let _ = JSON_ACCESS.set(access);
            tracing_subscriber::fmt::layer()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(writer)
                .with_filter(events.or(access_lines))
                .boxed()
        }
    };
    let _ = Registry::default().with(layer).try_init();
    guard
}

/// Writes what is queued when dropped (waiting at most [`FLUSH_AT_EXIT`]).
pub struct LogGuard(Option<LineWriter>);

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(writer) = &self.0 {
            writer.finish(FLUSH_AT_EXIT);
        }
    }
}

/// A writer that never blocks its caller: lines go into a bounded queue that a thread of its
/// own writes out, a batch per `write`.
#[derive(Clone)]
struct LineWriter {
    queue: Arc<Queue>,
}

struct Queue {
    batch: Mutex<Batch>,
    /// Wakes the writer thread (when it waits for lines) and the exit (when it waits for the
    /// writer to finish).
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    lines: usize,
    /// The writer thread waits for lines: the next line must wake it.
    idle: bool,
    /// No more lines are coming: write what is queued and stop.
    closing: bool,
    /// The writer thread has stopped.
    done: bool,
}

impl LineWriter {
    fn start<W: Write + Send + 'static>(out: W) -> LineWriter {
        let writer = LineWriter {
            queue: Arc::new(Queue {
                batch: Mutex::new(Batch::default()),
                wake: Condvar::new(),
                dropped: AtomicU64::new(0),
            }),
        };
        let queue = writer.queue.clone();
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || queue.write_out(out));
        if spawned.is_err() {
            // Without its thread nothing is ever written: every line counts as dropped.
            writer.lock().done = true;
        }
        writer
    }

    fn lock(&self) -> MutexGuard<'_, Batch> {
        self.queue.lock()
    }

    /// Queues one line (or drops and counts it when the queue is full or closed).
    fn push(&self, line: &[u8]) {
        let mut batch = self.lock();
        if batch.lines >= BUFFERED_LINES || batch.done {
            drop(batch);
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        batch.bytes.extend_from_slice(line);
        batch.lines += 1;
        let wake = std::mem::take(&mut batch.idle);
        drop(batch);
        if wake {
            self.queue.wake.notify_all();
        }
    }

    /// Asks the writer thread to write what is queued and stop; waits up to `limit`.
    fn finish(&self, limit: Duration) {
        let mut batch = self.lock();
        batch.closing = true;
        self.queue.wake.notify_all();
        let deadline = std::time::Instant::now() + limit;
        while !batch.done {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            batch = self
                .queue
                .wake
                .wait_timeout(batch, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Batch> {
        // A panic while holding the lock leaves a batch that is still whole bytes.
        self.batch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer thread: takes the whole queue, writes it, lets lines gather, again.
    fn write_out<W: Write>(&self, mut out: W) {
        let mut spare = Vec::new();
        loop {
            let mut batch = self.lock();
            while batch.lines == 0 && !batch.closing {
                batch.idle = true;
                batch = self.wake.wait(batch).unwrap_or_else(|e| e.into_inner());
            }
            batch.idle = false;
            let closing = batch.closing;
            std::mem::swap(&mut batch.bytes, &mut spare);
            batch.lines = 0;
            drop(batch);
            // A failed write loses its lines; there is nowhere left to say so.
            let _ = out.write_all(&spare).and_then(|()| out.flush());
            spare.clear();
            if closing {
                let mut batch = self.lock();
                if batch.lines == 0 {
                    batch.done = true;
                    self.wake.notify_all();
                    return;
                }
                continue;
            }
            std::thread::sleep(GATHER);
        }
    }
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        self.clone()
    }
}

/// One request's access line.
pub struct Access<'a> {
    /// The caller's valid `X-Request-Id`, or the gateway's own.
    pub request_id: &'a str,
    /// The client name, or `unauthenticated`.
    pub client: &'a str,
    /// The request's method: an HTTP token, written unescaped.
    pub method: &'a str,
    /// The route version the caller used, when the path was the route (written unescaped).
    pub version: Option<&'a str>,
    /// The validated task id (its characters need no escaping), when the path was the route.
    pub task_id: Option<&'a str>,
    pub status: u16,
    /// The cache outcome's label.
    pub cache: &'static str,
    /// Calls this request's own fetch sent to HubSpot.
    pub upstream_tries: u32,
    /// Microseconds from the request head to the answer.
    pub us: u64,
    /// The `traceparent`'s trace id, if valid.
    pub trace_id: Option<&'a str>,
    /// Set when the gateway refused the request itself.
    pub refusal: Option<Refusal<'a>>,
}

/// Why the gateway refused a request.
pub struct Refusal<'a> {
    /// The path, when it was not the route.
    pub path: Option<&'a str>,
    pub fault: &'a dyn fmt::Debug,
    pub error: &'a dyn fmt::Display,
}

impl Access<'_> {
    /// `answered` (2xx/3xx, not refused by the gateway) or `refused`.
    fn name(&self) -> &'static str {
        if self.refusal.is_none() && (200..400).contains(&self.status) {
            ANSWERED
        } else {
            REFUSED
        }
    }
}

thread_local! {
    /// The line being written on this thread, reused so a line costs no allocation.
    static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    /// The last whole second stamped on this thread and its `YYYY-MM-DDTHH:MM:SS`: a line
    /// then only formats its microseconds, not a date.
    static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
}

/// `now` as RFC 3339 with microseconds and `Z`, byte for byte what
/// `humantime::format_rfc3339_micros` writes.
fn timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut date) = SECOND.get();
    if cached != secs {
        let whole = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
        let text = humantime::format_rfc3339_seconds(whole).to_string();
        match text
            .as_bytes()
            .get(..19)
            .and_then(|d| <[u8; 19]>::try_from(d).ok())
        {
            Some(d) => date = d,
            // Not the expected form (a year past 9999): the general formatter says it.
            None => {
                let _ = write!(out, "{}", humantime::format_rfc3339_micros(now));
                return;
            }
        }
        SECOND.set((secs, date));
    }
    out.extend_from_slice(&date);
    let micros = since.subsec_micros();
    let mut fraction = *b".000000Z";
    let mut rest = micros;
    for digit in fraction[1..7].iter_mut().rev() {
        *digit = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&fraction);
}

/// `value` in decimal, as `Display` writes it.
fn decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    loop {
        start -= 1;
        digits[start] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[start..]);
}

/// Writes the request's access line, if `[log] access` wants it.
pub fn access(a: &Access<'_>) {
    match (JSON_ACCESS.get(), WRITER.get()) {
        (Some(mode), Some(writer)) => {
            if !mode.enabled(a.name()) {
                return;
            }
            let written = LINE.try_with(|line| {
                let Ok(mut line) = line.try_borrow_mut() else {
                    return false;
                };
                line.clear();
                json_access_line(&mut line, SystemTime::now(), a);
                writer.push(&line);
                true
            });
            if !matches!(written, Ok(true)) {
                let mut line = Vec::with_capacity(512);
                json_access_line(&mut line, SystemTime::now(), a);
                writer.push(&line);
            }
        }
        // Text, or no subscriber of ours (a test's): the access event, filtered by its name.
        _ => access_event(a),
    }
}

/// The access line as an event, for the text format and any other subscriber.
fn access_event(a: &Access<'_>) {
    macro_rules! access {
        ($name:expr, $($fields:tt)*) => {
            tracing::event!(name: $name, target: ACCESS_TARGET, tracing::Level::INFO, request_id = a.request_id, client = %a.client, method = %a.method, version = a.version, task_id = a.task_id, status = a.status, cache = a.cache, upstream_tries = a.upstream_tries, us = a.us, trace_id = a.trace_id, $($fields)*)
        };
    }
    match &a.refusal {
        None if a.name() == ANSWERED => access!(ANSWERED, "request"),
        None => access!(REFUSED, "request"),
        Some(r) => {
            access!(REFUSED, path = r.path, fault = ?r.fault, error = %r.error, "request refused")
        }
    }
}

/// The access line as the JSON formatter writes an event (flattened fields, then the
/// target), newline included.
fn json_access_line(out: &mut Vec<u8>, now: SystemTime, a: &Access<'_>) {
    /// A JSON string: what serde_json would write unescaped (ids, names) is copied as it
    /// is. The scan looks at every byte without stopping early, which the compiler turns
    /// into a few wide compares instead of three branches a byte.
    fn string(out: &mut Vec<u8>, value: &str) {
        let escape = value.bytes().fold(false, |bad, b| {
            bad | (b < 0x20) | (b == b'"') | (b == b'\\')
        });
        if escape {
            // Writing a str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, value);
        } else {
            out.push(b'"');
            out.extend_from_slice(value.as_bytes());
            out.push(b'"');
        }
    }
    /// A value that needs no escaping by how it was made: a label of ours, an HTTP method
    /// (a token: no control character, quote or backslash), a validated task id or trace id.
    fn plain(out: &mut Vec<u8>, value: &str) {
        debug_assert!(
            value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\'),
            "{value:?} needs escaping"
        );
        out.extend_from_slice(value.as_bytes());
    }
    // The keys and the punctuation between values are copied in runs, one copy per gap.
    out.extend_from_slice(b"{\"timestamp\":\"");
    timestamp(out, now);
    out.extend_from_slice(if a.refusal.is_some() {
        b"\",\"level\":\"INFO\",\"message\":\"request refused\",\"request_id\":"
    } else {
        b"\",\"level\":\"INFO\",\"message\":\"request\",\"request_id\":"
    });
    string(out, a.request_id);
    out.extend_from_slice(b",\"client\":");
    string(out, a.client);
    out.extend_from_slice(b",\"method\":\"");
    plain(out, a.method);
    if let Some(version) = a.version {
        out.extend_from_slice(b"\",\"version\":\"");
        plain(out, version);
    }
    if let Some(task_id) = a.task_id {
        out.extend_from_slice(b"\",\"task_id\":\"");
        plain(out, task_id);
    }
    out.extend_from_slice(b"\",\"status\":");
    decimal(out, a.status.into());
    out.extend_from_slice(b",\"cache\":\"");
    plain(out, a.cache);
    out.extend_from_slice(b"\",\"upstream_tries\":");
    decimal(out, a.upstream_tries.into());
    out.extend_from_slice(b",\"us\":");
    decimal(out, a.us);
    if let Some(trace_id) = a.trace_id {
        out.extend_from_slice(b",\"trace_id\":\"");
        plain(out, trace_id);
        out.push(b'"');
    }
    if let Some(r) = &a.refusal {
        if let Some(path) = r.path {
            out.extend_from_slice(b",\"path\":");
            string(out, path);
        }
        out.extend_from_slice(b",\"fault\":");
        string(out, &format!("{:?}", r.fault));
        out.extend_from_slice(b",\"error\":");
        string(out, &r.error.to_string());
    }
    out.extend_from_slice(b",\"target\":\"");
    plain(out, ACCESS_TARGET);
    out.extend_from_slice(b"\"}\n");
}

/// The trace id of a valid W3C `traceparent` header (32 lowercase hex digits, not all zero),
/// if the caller sent exactly one.
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    // A `HeaderName`, not a `&str`: a `&str` is parsed into a name on every lookup.
    const TRACEPARENT: hyper::header::HeaderName =
        hyper::header::HeaderName::from_static("traceparent");
    let mut values = headers.get_all(TRACEPARENT).iter();
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

    /// A writer capturing into a shared buffer, for the JSON formatter.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("capture").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The hand-written JSON access line is, byte for byte, what the JSON formatter writes
    /// for the access event (timestamps aside): a hit, HubSpot's own refusal, and the
    /// gateway's refusals with and without a path, with characters that need escaping.
    #[test]
    fn hand_written_json_access_lines_match_the_formatter() {
        let fault = "Client";
        let error = "no such route: \"x\"\n";
        let cases = [
            (
                200,
                None,
                Some("v3"),
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (404, None, Some("2026-03"), None),
            (401, Some(None), Some("v3"), None),
            (404, Some(Some("/nope/\"q\"\\é")), None, None),
        ];
        for (status, refused, version, trace_id) in cases {
            let a = Access {
                request_id: "id-\"1\"",
                client: "bench",
                method: "GET",
                version,
                task_id: version.map(|_| "complete-1"),
                status,
                cache: "hit",
                upstream_tries: 2,
                us: 1234,
                trace_id,
                refusal: refused.map(|path| Refusal {
                    path,
                    fault: &fault as &dyn fmt::Debug,
                    error: &error,
                }),
            };
            let capture = Capture::default();
            let sink = capture.clone();
            let subscriber = tracing_subscriber::fmt()
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .with_writer(move || sink.clone())
                .finish();
            tracing::subscriber::with_default(subscriber, || access_event(&a));
            let formatter =
                String::from_utf8(capture.0.lock().expect("capture").clone()).expect("utf-8");
            let mut ours = Vec::new();
            json_access_line(&mut ours, SystemTime::now(), &a);
            let ours = String::from_utf8(ours).expect("utf-8");
            let strip = |line: &str| line.split_once("\"level\"").expect("a level").1.to_owned();
            assert_eq!(strip(&ours), strip(&formatter), "{ours}");
            let stamp = |line: &str| line[..line.find(",\"level\"").expect("a level")].len();
            assert_eq!(
                stamp(&ours),
                stamp(&formatter),
                "same timestamp form: {ours}"
            );
        }
    }

    /// The access line's own timestamp and numbers are, byte for byte, humantime's RFC 3339
    /// with microseconds and `Display`'s decimal: across second boundaries (the date is kept
    /// per second), at whole seconds, and at the extremes.
    #[test]
    fn timestamps_and_numbers_match_the_general_formatters() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let offsets_us = [
            0,
            1,
            999_999,
            1_000_000,
            1_000_001,
            59_999_999,
            86_400_000_123,
        ];
        // Twice over, so each second is met both fresh and kept.
        for now in offsets_us
            .iter()
            .chain(offsets_us.iter())
            .map(|us| base + Duration::from_micros(*us))
            .chain([SystemTime::UNIX_EPOCH, SystemTime::now()])
        {
            let mut ours = Vec::new();
            timestamp(&mut ours, now);
            let expected = humantime::format_rfc3339_micros(now).to_string();
            assert_eq!(String::from_utf8(ours).expect("utf-8"), expected);
        }
        for n in [0, 7, 10, 1234, u64::from(u32::MAX), u64::MAX] {
            let mut ours = Vec::new();
            decimal(&mut ours, n);
            assert_eq!(String::from_utf8(ours).expect("utf-8"), n.to_string());
        }
    }

    /// Lines leave whole and in order; past the queue's bound, while the output is stalled,
    /// lines are dropped and counted instead of waited for.
    #[test]
    fn a_stalled_output_drops_and_counts_lines() {
        #[derive(Clone)]
        struct Gate(Arc<Mutex<()>>, Capture);
        impl Write for Gate {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let _open = self.0.lock().expect("gate");
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Gate(Arc::default(), Capture::default());
        let closed = gate.0.lock().expect("gate");
        let writer = LineWriter::start(gate.clone());
        let sent = 3 * BUFFERED_LINES;
        for i in 0..sent {
            writer.push(format!("line {i}\n").as_bytes());
        }
        let dropped = writer.queue.dropped.load(Ordering::Relaxed) as usize;
        assert!(dropped >= BUFFERED_LINES, "dropped {dropped} of {sent}");
        drop(closed);
        writer.finish(Duration::from_secs(10));
        let out = String::from_utf8(gate.1.0.lock().expect("capture").clone()).expect("utf-8");
        let numbers: Vec<usize> = out
            .lines()
            .map(|l| {
                l.strip_prefix("line ")
                    .expect("a whole line")
                    .parse()
                    .expect("n")
            })
            .collect();
        assert_eq!(numbers.len() + dropped, sent);
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "in order");
    }

    /// `errors` writes refusals only, `off` nothing, `all` both.
    #[test]
    fn access_modes_choose_by_event_name() {
        assert!(AccessLog::All.enabled(ANSWERED) && AccessLog::All.enabled(REFUSED));
        assert!(!AccessLog::Errors.enabled(ANSWERED) && AccessLog::Errors.enabled(REFUSED));
        assert!(!AccessLog::Off.enabled(ANSWERED) && !AccessLog::Off.enabled(REFUSED));
    }
}

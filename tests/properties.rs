//! Properties over generated input: the route parser, size and duration parsing, and config
//! loading from arbitrary TOML never panic, and config errors never contain a value.
//! (`Retry-After` is parsed inside `upstream`, with no public function to test here.)

use hubspot_files_gateway::config::{Config, bytesize, duration};
use hubspot_files_gateway::route::{ApiVersion, RouteError, match_route};
use hyper::Method;
use proptest::prelude::*;

const PREFIX: &str = "/files/v3/files/import-from-url/async/tasks/";

/// A string that cannot occur in any message by chance: `zq` + 6..12 letters and digits.
fn marker() -> impl Strategy<Value = String> {
    "zq[a-zA-Z0-9]{6,12}"
}

/// Any TOML value, with every string a marker so its appearance in an error is a leak.
fn value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        marker().prop_map(toml::Value::String),
        (marker(), "(ms|s|h|d|KiB|MiB)").prop_map(|(m, u)| toml::Value::String(m + &u)),
        (marker()).prop_map(|m| toml::Value::String(format!("https://u:{m}@example.com"))),
        (marker()).prop_map(|m| toml::Value::String(format!("https://example.com/?{m}"))),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<bool>().prop_map(toml::Value::Boolean),
        (-1.0e12f64..1.0e12).prop_map(toml::Value::Float),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(toml::Value::Array),
            prop::collection::vec((key(), inner), 0..3)
                .prop_map(|kv| toml::Value::Table(kv.into_iter().collect())),
        ]
    })
}

/// The config's real key names, so generated values reach the typed fields.
fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "listen",
        "admin_listen",
        "shutdown_grace",
        "header_read_timeout",
        "tls_cert_file",
        "base_url",
        "connect_timeout",
        "request_timeout",
        "rate_limit",
        "requests",
        "per",
        "mode",
        "api",
        "required_scopes",
        "client_id_env",
        "client_secret_file",
        "static_token_file",
        "max_bytes",
        "terminal_ttl",
        "pending_ttl",
        "clients",
        "name",
        "key_sha256",
        "cert_cn",
        "watch_interval",
        "allow_none_off_loopback",
    ])
    .prop_map(str::to_owned)
}

/// A valid config (static token, one API-key client) that generated values are put into.
const VALID: &str = "[token]\nmode = \"static\"\nstatic_token_env = \"HUBSPOT_TOKEN\"\n\
    [[auth.clients]]\nname = \"reports\"\nkey_sha256 = \"\
    ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"\n";

/// Every string inside `value`.
fn strings(value: &toml::Value, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) => out.push(s.clone()),
        toml::Value::Array(a) => a.iter().for_each(|v| strings(v, out)),
        toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// The markers inside `text` (each string holds exactly one).
fn markers(values: &[String]) -> Vec<String> {
    values
        .iter()
        .filter_map(|s| {
            let start = s.find("zq")?;
            let rest = &s[start..];
            let end = rest
                .find(|c: char| !c.is_ascii_alphanumeric())
                .unwrap_or(rest.len());
            Some(
                rest[..end]
                    .trim_end_matches(['m', 's', 'h', 'd'])
                    .to_owned(),
            )
        })
        .filter(|m| m.len() >= 6)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any path at all: the route parser answers without panicking.
    #[test]
    fn route_never_panics(path in any::<String>()) {
        let _ = match_route(&Method::GET, &path);
    }

    /// An id the parser accepts is one safe path segment: unreserved characters only, not
    /// `.` or `..`, at most 128 bytes, and the upstream path it makes on
    /// every version parses back to it.
    #[test]
    fn accepted_ids_are_one_safe_segment(raw in "([A-Za-z0-9._~/%-]|%[0-9A-Fa-f]{2}|%2[Ff]){0,40}") {
        let path = format!("{PREFIX}{raw}/status");
        match match_route(&Method::GET, &path) {
            Ok(req) => {
                let id = req.task_id.as_str();
                prop_assert!(!id.is_empty() && id.len() <= 128);
                prop_assert!(id != "." && id != "..");
                prop_assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)), "{id:?}");
                for version in ApiVersion::ALL {
                    let again = match_route(&Method::GET, &req.upstream_path(version));
                    prop_assert_eq!(again, Ok(req.clone()));
                }
            }
            Err(e) => prop_assert!(matches!(e, RouteError::InvalidTaskId | RouteError::NotFound)),
        }
    }

    /// Size parsing: no panic on any text; a number with a unit is that many bytes, or an
    /// error exactly when it overflows; the error never repeats the text.
    #[test]
    fn sizes_parse_exactly(n in any::<u64>(), unit in prop::sample::select(vec![
        ("", 1u64), ("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30),
        ("KB", 1_000), ("MB", 1_000_000), ("GB", 1_000_000_000),
    ]), junk in any::<String>(), m in marker()) {
        let _ = bytesize::parse(&junk);
        prop_assert_eq!(bytesize::parse(&format!("{n}{}", unit.0)).ok(), n.checked_mul(unit.1));
        let err = bytesize::parse(&format!("{m}MiB")).expect_err("not a number");
        prop_assert!(!err.contains(&m));
    }

    /// Duration parsing: no panic on any text; milliseconds read back exactly; the error never
    /// repeats the text.
    #[test]
    fn durations_parse_exactly(ms in 0u64..10_000_000_000, junk in any::<String>(), m in marker()) {
        let _ = duration::parse(&junk);
        prop_assert_eq!(duration::parse(&format!("{ms}ms")), Ok(std::time::Duration::from_millis(ms)));
        let err = duration::parse(&format!("{m}s")).expect_err("not a duration");
        prop_assert!(!err.contains(&m));
    }

    /// Any value under any known key of any section: loading never panics, and an error
    /// never contains a string from the file.
    #[test]
    fn config_errors_never_contain_a_value(
        section in prop::sample::select(vec!["server", "upstream", "token", "cache", "auth", "reload"]),
        k in key(),
        v in value(),
    ) {
        let mut doc: toml::Table = VALID.parse().expect("valid base");
        let table = doc
            .entry(section)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(t) = table {
            t.insert(k, v.clone());
        }
        let text = toml::to_string(&doc).expect("serializable");
        if let Err(e) = Config::parse(&text) {
            let shown = e.to_string();
            let mut found = Vec::new();
            strings(&v, &mut found);
            for m in markers(&found) {
                prop_assert!(!shown.contains(&m), "{shown} contains {m}");
            }
        }
    }

    /// Arbitrary text as a config: no panic, whatever it is.
    #[test]
    fn config_text_never_panics(text in any::<String>()) {
        let _ = Config::parse(&text);
    }
}

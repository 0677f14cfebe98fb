//! Unit tests of loading, validating and printing a config.

use std::time::Duration;

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

/// `[telemetry]` is off when absent, takes the documented defaults, and each bad value
/// is refused by key name without echoing the value (a URL may hold a credential).
#[test]
fn telemetry_table_defaults_and_checks() {
    assert!(Config::parse(MINIMAL).expect("valid").telemetry.is_none());
    let with = |lines: &str| Config::parse(&format!("{MINIMAL}[telemetry]\n{lines}\n"));
    let t = with("otlp_endpoint = \"http://otel-collector:4318\"")
        .expect("valid")
        .telemetry
        .expect("on");
    assert_eq!(t.service_name, "hubspot-files-gateway");
    assert_eq!(t.sample_ratio, 1.0);
    assert_eq!(t.export_timeout, Duration::from_secs(10));
    for (lines, key) in [
        (
            "otlp_endpoint = \"http://user:s3cr3t@otel:4318\"",
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"s3cr3t://otel:4318\"",
            "telemetry.otlp_endpoint",
        ),
        (
            "otlp_endpoint = \"http://otel:4318\"\nsample_ratio = 1.5",
            "telemetry.sample_ratio",
        ),
        (
            "otlp_endpoint = \"http://otel:4318\"\nsample_ratio = nan",
            "telemetry.sample_ratio",
        ),
        (
            "otlp_endpoint = \"http://otel:4318\"\nexport_timeout = \"0s\"",
            "telemetry.export_timeout",
        ),
        (
            "otlp_endpoint = \"http://otel:4318\"\nservice_name = \"a s3cr3t\"",
            "telemetry.service_name",
        ),
        ("service_name = \"x\"", "otlp_endpoint"),
    ] {
        match with(lines) {
            Err(ConfigError::Invalid(problems)) => {
                let text = problems.to_string();
                assert!(text.contains(key), "{lines}: {text}");
                assert!(!text.contains("s3cr3t"), "{lines}: {text}");
            }
            other => panic!("{lines}: {other:?}"),
        }
    }
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

/// A client's `share` is a fraction in (0, 1]; anything else is refused by position, never
/// echoed. `upstream.daily_limit` is unset by default and refused at 0.
#[test]
fn shares_and_the_daily_limit_are_checked() {
    let c = Config::parse(MINIMAL).expect("valid");
    assert_eq!(c.auth.clients[0].share, None);
    assert_eq!(c.upstream.daily_limit, None);
    let with_share = |v: &str| Config::parse(&format!("{MINIMAL}share = {v}\n"));
    let ok = with_share("0.5").expect("valid");
    assert_eq!(ok.auth.clients[0].share, Some(0.5));
    assert_eq!(
        with_share("1").expect("valid").auth.clients[0].share,
        Some(1.0)
    );
    for bad in ["0", "0.0", "-0.25", "1.5", "nan", "inf"] {
        let err = with_share(bad).expect_err(bad).to_string();
        assert!(err.contains("auth.clients[0].share"), "{bad}: {err}");
        assert!(!err.contains(bad) || bad == "0", "{bad} echoed: {err}");
    }
    let daily = |v: &str| Config::parse(&format!("[upstream]\ndaily_limit = {v}\n{MINIMAL}"));
    assert_eq!(
        daily("250000").expect("valid").upstream.daily_limit,
        Some(250_000)
    );
    let err = daily("0").expect_err("0").to_string();
    assert!(err.contains("upstream.daily_limit"), "{err}");
}

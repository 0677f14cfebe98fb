//! Config that refuses nonsense, in the real binary: every case exits 64 from `check-config`
//! and `serve`, names the key, and prints no value that could be a secret.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use hubspot_files_gateway::auth::hash_key;
use support::{BIN, temp_dir};

/// Stands for a credential pasted where it does not belong; must never be printed.
const SECRET: &str = "na1-PASTED-SECRET-7f3c";

/// A valid config on loopback port 0 with secrets from `T_*` variables; `extra` is appended.
fn valid(extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[token]
client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
refresh_token_env = "T_REFRESH_TOKEN"
[[auth.clients]]
name = "billing"
key_sha256 = "{}"
{extra}"#,
        hash_key("k1")
    )
}

/// Runs the binary on the config `text` with the three OAuth variables set. A `serve` that
/// wrongly starts is killed after 20 s (and then fails the exit-code assertion).
fn run(dir: &Path, text: &str, args: &[&str]) -> Output {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    let child = command(&path, args).spawn().expect("binary runs");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    });
    let out = child.wait_with_output().expect("binary output");
    let _ = tx.send(());
    out
}

/// The binary with `args --config path`, the three OAuth variables set, stdout and stderr
/// piped.
fn command(path: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .arg("--config")
        .arg(path)
        .env("T_CLIENT_ID", "id")
        .env("T_CLIENT_SECRET", "secret")
        .env("T_REFRESH_TOKEN", "refresh")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Both `check-config` and `serve` refuse `text` with exit 64, the error names every key
/// in `keys`, and `SECRET` appears in neither stdout nor stderr.
fn refused(name: &str, text: &str, keys: &[&str]) {
    let dir = temp_dir(name);
    for args in [&["check-config"][..], &["serve"][..]] {
        let out = run(&dir, text, args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(64),
            "{name} {args:?}: stdout {stdout} stderr {stderr}"
        );
        for key in keys {
            assert!(stderr.contains(key), "{name} {args:?}: no {key}: {stderr}");
        }
        assert!(
            !stdout.contains(SECRET) && !stderr.contains(SECRET),
            "{name} {args:?} echoed the value: {stdout}{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// A secret pasted into a `*_file` path is not echoed when the file cannot be read.
#[test]
fn secret_pasted_as_a_file_path_is_not_echoed() {
    let text = valid("").replace(
        "client_secret_env = \"T_CLIENT_SECRET\"",
        &format!("client_secret_file = \"{SECRET}\""),
    );
    refused("file-path", &text, &["token.client_secret_file"]);
}

/// A secret pasted as a duration, a number or an enum is not echoed.
#[test]
fn secret_pasted_as_a_duration_number_or_enum_is_not_echoed() {
    let cases = [
        (
            "duration",
            format!("[cache]\nterminal_ttl = \"{SECRET}\"\n"),
        ),
        (
            "number",
            format!("[upstream]\nrate_limit = {{ requests = \"{SECRET}\", per = \"1s\" }}\n"),
        ),
        (
            "suffix",
            format!("[reload]\nwatch_interval = \"{SECRET}s\"\n"),
        ),
        ("size", format!("[cache]\nmax_bytes = \"{SECRET}\"\n")),
    ];
    for (name, extra) in cases {
        refused(name, &(valid("") + &extra), &[]);
    }
    let mode = valid("").replace("[token]", &format!("[token]\nmode = \"{SECRET}\""));
    refused("enum-mode", &mode, &["oauth"]);
}

/// `base_url` with a user and password, a query or a fragment is refused, unprinted.
#[test]
fn base_url_with_userinfo_query_or_fragment_is_refused() {
    for (name, url) in [
        ("userinfo", format!("https://svc:{SECRET}@api.hubapi.com")),
        ("query", format!("https://api.hubapi.com/?key={SECRET}")),
        ("fragment", format!("https://api.hubapi.com/#{SECRET}")),
        ("scheme", format!("ftp://{SECRET}.example")),
    ] {
        let text = valid("").replace(
            "[token]",
            &format!("[upstream]\nbase_url = \"{url}\"\n[token]"),
        );
        refused(name, &text, &["upstream.base_url"]);
    }
}

/// Two clients with one key hash, or one name, are refused (one would silently replace the
/// other), and both problems are reported in one run.
#[test]
fn duplicate_key_hashes_and_names_are_refused_together() {
    let text = valid(&format!(
        "[[auth.clients]]\nname = \"billing\"\nkey_sha256 = \"{}\"\n",
        hash_key("k1").to_uppercase()
    ));
    refused(
        "duplicates",
        &text,
        &[
            "auth.clients[1].name repeats auth.clients[0].name",
            "auth.clients[1].key_sha256 repeats auth.clients[0].key_sha256",
        ],
    );
}

/// A missing or unreadable TLS file fails `check-config` and makes `serve` exit 64, not 1;
/// the path is not printed.
#[test]
fn missing_or_bad_tls_files_are_a_config_error() {
    let dir = temp_dir("tls-files");
    let garbage = dir.join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n",
    )
    .expect("w");
    let missing = valid("").replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\ntls_cert_file = \"/nonexistent/{SECRET}.crt\"\ntls_key_file = \"/nonexistent/{SECRET}.key\""
        ),
    );
    refused(
        "tls-missing",
        &missing,
        &["server.tls_cert_file", "server.tls_key_file"],
    );
    let bad = valid("").replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!(
            "admin_listen = \"127.0.0.1:0\"\ntls_cert_file = \"{0}\"\ntls_key_file = \"{0}\"",
            garbage.display()
        ),
    );
    refused("tls-garbage", &bad, &["server.tls_cert_file"]);
}

/// Durations outside their range (zero, or near `u64::MAX` seconds) are refused, not
/// accepted to panic later.
#[test]
fn durations_out_of_range_are_refused() {
    let huge = valid("").replace(
        "[server]\nlisten",
        "[server]\nheader_read_timeout = \"18446744073709551615s\"\nlisten",
    );
    refused("duration-huge", &huge, &["server.header_read_timeout"]);
    let cases = [
        (
            "upstream.connect_timeout",
            "[upstream]\nconnect_timeout = \"0s\"\n",
        ),
        (
            "upstream.request_timeout",
            "[upstream]\nrequest_timeout = \"2days\"\n",
        ),
        (
            "cache.terminal_ttl",
            "[cache]\nterminal_ttl = \"400days\"\n",
        ),
        (
            "reload.watch_interval",
            "[reload]\nwatch_interval = \"1ms\"\n",
        ),
    ];
    for (key, extra) in cases {
        refused(key, &valid(extra), &[key]);
    }
}

/// `auth.mode = "none"` on a non-loopback address is refused unless asked for by name.
#[test]
fn auth_none_off_loopback_needs_explicit_consent() {
    let open = valid("")
        .replace("listen = \"127.0.0.1:0\"", "listen = \"0.0.0.0:0\"")
        .replace(
            "[[auth.clients]]",
            "[auth]\nmode = \"none\"\n[[auth.clients]]",
        );
    refused("none-open", &open, &["auth.allow_none_off_loopback"]);
    let consent = open.replace(
        "mode = \"none\"",
        "mode = \"none\"\nallow_none_off_loopback = true",
    );
    let out = run(&temp_dir("none-consent"), &consent, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let loopback = valid("").replace(
        "[[auth.clients]]",
        "[auth]\nmode = \"none\"\n[[auth.clients]]",
    );
    let out = run(&temp_dir("none-loopback"), &loopback, &["check-config"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
}

/// Every missing secret is reported in one run, by key, without the variable names.
#[test]
fn all_missing_secrets_are_reported_at_once() {
    let text = valid("")
        .replace("T_CLIENT_ID", "GW_UNSET_ID")
        .replace("T_CLIENT_SECRET", "GW_UNSET_SECRET")
        .replace("T_REFRESH_TOKEN", "GW_UNSET_RT");
    let dir = temp_dir("secrets");
    let out = run(&dir, &text, &["check-config"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    for key in ["client_id_env", "client_secret_env", "refresh_token_env"] {
        assert!(stderr.contains(key), "{stderr}");
    }
    assert!(!stderr.contains("GW_UNSET"), "{stderr}");
    // Without secrets, everything else is still checked and this config passes.
    let out = run(&dir, &text, &["check-config", "--without-secrets"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("secrets not checked"));
}

/// `--without-secrets` still checks the TLS files.
#[test]
fn without_secrets_still_checks_tls_files() {
    let text = valid("").replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\ntls_cert_file = \"/nonexistent/c\"\ntls_key_file = \"/nonexistent/k\"",
    );
    let out = run(
        &temp_dir("without"),
        &text,
        &["check-config", "--without-secrets"],
    );
    assert_eq!(out.status.code(), Some(64), "{out:?}");
}

/// `check-config | head -1`: a reader that closes the pipe early gets exit 0, no panic.
#[test]
fn check_config_tolerates_a_closed_pipe() {
    let dir = temp_dir("pipe");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, valid("")).expect("write");
    let mut child = command(&path, &["check-config"])
        .spawn()
        .expect("binary runs");
    // Closed before the child writes anything: its first write meets a broken pipe.
    drop(child.stdout.take());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // And through a real shell pipe, as an operator would.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "T_CLIENT_ID=a T_CLIENT_SECRET=b T_REFRESH_TOKEN=c '{BIN}' check-config --config '{}' | head -1; echo \"exit=${{PIPESTATUS[0]}}\"",
            path.display()
        ))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with("# ") && stdout.ends_with("exit=0\n"),
        "{stdout}"
    );
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

//! The binary as operators run it: signals, exit codes, `demo`, `check-config`, `hash-key`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use support::*;

/// Writes a gateway config for `upstream`; OAuth secrets come from the environment variables
/// the test gives the child process.
fn write_config(dir: &Path, upstream: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let token = r#"client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
refresh_token_env = "T_REFRESH_TOKEN""#;
    std::fs::write(&path, config_toml(upstream, token)).expect("write config");
    path
}

/// SIGTERM while a slow HubSpot call is in flight: readiness turns off, the call still gets
/// its answer, new connections are refused, and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let sim = simulator(SimConfig {
        latency: Duration::from_millis(1500),
        ..SimConfig::default()
    })
    .await;
    let dir = temp_dir("sigterm");
    let config = write_config(&dir, &sim.base_url());
    let log = dir.join("gateway.log");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("T_CLIENT_ID", "id")
        .env("T_CLIENT_SECRET", "secret")
        .env("T_REFRESH_TOKEN", "refresh")
        .stderr(std::fs::File::create(&log).expect("log file"))
        .stdout(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let (service, admin) = listen_addrs(&log).await;
    let ready_url = format!("http://{admin}/readyz");
    wait_for(
        || async { send(Method::GET, &ready_url, &[]).await.status == StatusCode::OK },
        "ready",
    )
    .await;

    let url =
        format!("http://{service}/files/v3/files/import-from-url/async/tasks/pending-slow/status");
    let in_flight = tokio::spawn(async move { get(&url).await });
    wait_for(
        || async { status_requests(&sim).await == 1 },
        "the slow call reached HubSpot",
    )
    .await;
    kill(&child, "TERM");
    wait_for(
        || async {
            send(Method::GET, &ready_url, &[]).await.status == StatusCode::SERVICE_UNAVAILABLE
        },
        "readiness off",
    )
    .await;
    assert!(
        tokio::net::TcpStream::connect(&service).await.is_err(),
        "no new connections after SIGTERM"
    );

    let reply = in_flight.await.expect("request task");
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "PENDING");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
}

/// `demo` starts the simulator and the gateway, prints the addresses it bound (port 0 here,
/// so a demo already running on the documented ports does not matter), and every curl line
/// it prints works as the README says.
#[cfg(feature = "demo")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_its_curl_lines() {
    let mut child = Command::new(BIN)
        .args(["demo", "--listen", "127.0.0.1:0"])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--sim-listen",
            "127.0.0.1:0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let (mut banner, mut curls) = (None, Vec::new());
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8");
        if line.starts_with("Ctrl-C") {
            break;
        }
        if line.starts_with("hubspot-files-gateway demo:") {
            banner = Some(line);
        } else if line.starts_with("curl ") {
            curls.push(line);
        }
    }
    let banner = banner.expect("the demo names its addresses");
    let bound = |what: &str| {
        let addr = banner
            .split(&format!("{what} http://"))
            .nth(1)
            .and_then(|rest| rest.split([',', ' ']).next())
            .unwrap_or_else(|| panic!("no {what} address in {banner:?}"));
        let addr: std::net::SocketAddr = addr.parse().expect("an address");
        assert!(
            addr.ip().is_loopback() && addr.port() != 0,
            "{what} bound {addr}"
        );
        addr
    };
    let (service, admin) = (bound("gateway"), bound("admin"));
    bound("HubSpot simulator");
    assert_eq!(curls.len(), 5, "{curls:?}");
    assert!(
        curls[..4]
            .iter()
            .all(|c| c.contains(&format!("http://{service}/"))),
        "{curls:?}"
    );
    assert!(
        curls[4].contains(&format!("http://{admin}/metrics")),
        "{curls:?}"
    );
    let ready_url = format!("http://{admin}/readyz");
    wait_for(
        || async { send(Method::GET, &ready_url, &[]).await.status == StatusCode::OK },
        "demo ready",
    )
    .await;
    let run = |line: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(line)
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let first = run(&curls[0]);
    assert!(first.starts_with("http/1.1 200"), "{first}");
    let again = run(&curls[1]);
    assert!(
        again.starts_with("http/1.1 200") && again.contains("x-cache: hit"),
        "{again}"
    );
    assert!(run(&curls[2]).contains("\"status\":\"pending\""));
    assert!(run(&curls[3]).starts_with("http/1.1 401"));
    assert!(run(&curls[4]).contains("hubspot_gateway_requests_total{"));
    kill(&child, "INT");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
}

/// `simulate` (the gateway binary's copy of `hubspot-sim`) serves the simulator on the
/// address it is given and stops cleanly on SIGTERM.
#[cfg(feature = "demo")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_serves_until_sigterm() {
    let dir = temp_dir("simulate");
    let log = dir.join("simulate.log");
    let mut child = Command::new(BIN)
        .args(["simulate", "--listen", "127.0.0.1:0", "--rate-limit", "0"])
        .stderr(std::fs::File::create(&log).expect("log file"))
        .stdout(Stdio::null())
        .spawn()
        .expect("simulate starts");
    let mut addr = None;
    wait_for(
        || {
            addr = std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .find(|l| l.contains("HubSpot simulator listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned);
            let found = addr.is_some();
            async move { found }
        },
        "the simulator's address in its log",
    )
    .await;
    let addr = addr.expect("address");
    let stats = send(Method::GET, &format!("http://{addr}/__sim/stats"), &[]).await;
    assert_eq!(stats.status, StatusCode::OK);
    assert_eq!(stats.json()["status_requests"], 0);
    kill(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).code(),
        Some(0)
    );
    let bad = Command::new(BIN)
        .args(["simulate", "--fail-rate", "2"])
        .output()
        .expect("runs");
    assert_eq!(bad.status.code(), Some(64), "a bad flag is a usage error");
}

/// Built without the `demo` feature, the binary has no `demo` or `simulate` command.
#[cfg(not(feature = "demo"))]
#[test]
fn no_demo_without_the_feature() {
    for command in ["demo", "simulate"] {
        let out = Command::new(BIN).arg(command).output().expect("runs");
        assert_eq!(out.status.code(), Some(64), "{command} is not a command");
    }
}

/// check-config: 0 and the effective config for a valid file (no secret printed), 64 for an
/// unknown key or an unreadable secret.
#[test]
fn check_config_exit_codes() {
    let dir = temp_dir("check");
    let config = write_config(&dir, "https://api.hubapi.com");
    let run = |config: &PathBuf, env: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.arg("check-config").arg("--config").arg(config);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("runs")
    };
    let env = [
        ("T_CLIENT_ID", "id-VALUE"),
        ("T_CLIENT_SECRET", "secret-VALUE"),
        ("T_REFRESH_TOKEN", "rt-VALUE"),
    ];
    let ok = run(&config, &env);
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(
        out.contains("terminal_ttl") && !out.contains("VALUE"),
        "{out}"
    );
    assert_eq!(
        run(&config, &[]).status.code(),
        Some(64),
        "missing secret env"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(&config).expect("read") + "\n[cache]\nmax_byte = \"1MiB\"\n",
    )
    .expect("write");
    let out = run(&bad, &env);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_byte"));
    let usage = Command::new(BIN)
        .arg("no-such-command")
        .output()
        .expect("runs");
    assert_eq!(usage.status.code(), Some(64));
}

/// hash-key prints the sha256 the config expects.
#[test]
fn hash_key_prints_sha256() {
    let mut child = Command::new(BIN)
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"demo-key-change-me\n")
        .expect("write");
    let out = child.wait_with_output().expect("output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "090d1548c9d65f413a1a2c828a0bee3a7ae02d2137caf51e6029e6c3cb1f1fa4"
    );
}

//! The binary as operators run it: signals, exit codes, `demo`, `check-config`, `hash-key`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hubspot-files-gateway");

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("hfg-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Writes a gateway config for `upstream` with loopback port-0 listeners; OAuth secrets come
/// from the environment variables the test gives the child process.
fn write_config(dir: &std::path::Path, upstream: &str) -> PathBuf {
    let path = dir.join("gateway.toml");
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "10s"
[upstream]
base_url = "{upstream}"
request_timeout = "10s"
[token]
client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
refresh_token_env = "T_REFRESH_TOKEN"
[[auth.clients]]
name = "tests"
key_sha256 = "{}"
"#,
        hubspot_files_gateway::auth::hash_key(KEY)
    );
    std::fs::write(&path, text).expect("write config");
    path
}

fn kill(child: &Child, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .expect("kill runs");
    assert!(status.success());
}

/// Waits for the child to exit, failing after `limit`.
fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "process did not exit within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads the child's log until both listen addresses are printed.
fn listen_addrs(child: &mut Child) -> (String, String) {
    let stderr = child.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let (mut service, mut admin) = (None, None);
    while service.is_none() || admin.is_none() {
        let line = lines
            .next()
            .expect("log line before exit")
            .expect("utf-8 log");
        let addr = || {
            line.split("addr=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_owned)
        };
        if line.contains("gateway listening") {
            service = addr();
        } else if line.contains("admin listening") {
            admin = addr();
        }
    }
    // Keep draining the log so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (service.expect("service addr"), admin.expect("admin addr"))
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
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("T_CLIENT_ID", "id")
        .env("T_CLIENT_SECRET", "secret")
        .env("T_REFRESH_TOKEN", "refresh")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("gateway starts");
    let (service, admin) = listen_addrs(&mut child);
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

/// `demo` starts the simulator and the gateway, and every curl line it prints works as the
/// README says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_answers_its_curl_lines() {
    let mut child = Command::new(BIN)
        .arg("demo")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut curls = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("utf-8");
        if line.starts_with("Ctrl-C") {
            break;
        }
        if line.starts_with("curl ") {
            curls.push(line);
        }
    }
    assert_eq!(curls.len(), 5, "{curls:?}");
    wait_for(
        || async {
            send(Method::GET, "http://127.0.0.1:9090/readyz", &[])
                .await
                .status
                == StatusCode::OK
        },
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
    assert!(
        run(&curls[0]).starts_with("http/1.1 200"),
        "{}",
        run(&curls[0])
    );
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

//! The outbound proxy: the gateway reaches HubSpot (the simulator) through a real tinyproxy
//! on loopback, authenticates to it without HubSpot seeing a `Proxy-*` header, answers a 502
//! in HubSpot's shape when the proxy refuses it, follows `HTTP_PROXY`/`NO_PROXY` with
//! `proxy = "env"`, and keeps TLS to HubSpot end to end inside the tunnel.
//!
//! The simulator speaks plain HTTP, so the tinyproxy tests tunnel http; the last test shows
//! with a recording proxy that an https base URL sends a TLS ClientHello, not HTTP, through
//! the tunnel.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use hubspot_files_gateway::metrics::Metrics;
use hubspot_files_gateway::upstream::HubSpot;
use hubspot_sim::{RunningSimulator, SimConfig};
use hyper::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tinyproxy process of this test's own, killed when dropped.
struct Tinyproxy {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tinyproxy {
    /// Starts tinyproxy on a free loopback port, allowing CONNECT to `allow_port` only, with
    /// Basic authentication when `auth` is given.
    async fn start(dir: &Path, allow_port: u16, auth: Option<(&str, &str)>) -> Tinyproxy {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Tinyproxy::start_on(dir, port, allow_port, auth).await
    }

    /// Starts tinyproxy on `port` (see [`Tinyproxy::start`]).
    async fn start_on(
        dir: &Path,
        port: u16,
        allow_port: u16,
        auth: Option<(&str, &str)>,
    ) -> Tinyproxy {
        let log = dir.join(format!("tinyproxy-{port}.log"));
        let _ = std::fs::remove_file(&log);
        let conf = dir.join(format!("tinyproxy-{port}.conf"));
        let mut text = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\n\
             MaxClients 50\nAllow 127.0.0.1\nConnectPort {allow_port}\n",
            log.display()
        );
        if let Some((user, password)) = auth {
            text.push_str(&format!("BasicAuth {user} {password}\n"));
        }
        std::fs::write(&conf, text).expect("tinyproxy config");
        let child = match Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!(
                "cannot run tinyproxy ({e}); install it with: apt-get update && apt-get install -y tinyproxy"
            ),
        };
        let proxy = Tinyproxy { child, port, log };
        wait_for(
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
            "tinyproxy accepting",
        )
        .await;
        proxy
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many CONNECT requests to `target` (host:port) the proxy logged.
    fn connects_to(&self, target: &str) -> usize {
        let line = format!("CONNECT {target} HTTP/1.1");
        self.log().lines().filter(|l| l.contains(&line)).count()
    }
}

fn sim_target(sim: &RunningSimulator) -> String {
    sim.base_url().trim_start_matches("http://").to_owned()
}

fn sim_port(sim: &RunningSimulator) -> u16 {
    sim_target(sim)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the simulator's port")
}

/// The gateway binary with `config`, `env` added to its environment (the proxy variables
/// of this process removed first, so only the test's count), logging to `log`.
fn spawn_gateway(config: &Path, env: &[(&str, &str)], log: &Path) -> Child {
    let mut command = Command::new(BIN);
    command
        .args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    for name in [
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        command.env_remove(name);
    }
    command.envs(env.iter().copied());
    command.spawn().expect("gateway starts")
}

/// The `[token]` lines for the simulator's default OAuth app, read from variables.
const TOKEN_FROM_ENV: &str =
    "client_id_env = \"CID\"\nclient_secret_env = \"CSECRET\"\nrefresh_token_env = \"RTOKEN\"";
const TOKEN_ENV: [(&str, &str); 3] = [
    ("CID", "test-client-id"),
    ("CSECRET", "test-client-secret-SECRET"),
    ("RTOKEN", "test-refresh-token-SECRET"),
];

/// A gateway process started from `config_text`; its service and admin URLs.
struct Process {
    child: Child,
    service: String,
    admin: String,
    log: PathBuf,
}

impl Process {
    async fn start(dir: &Path, name: &str, config_text: &str, env: &[(&str, &str)]) -> Process {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, config_text).expect("config");
        let log = dir.join(format!("{name}.log"));
        let mut all_env = TOKEN_ENV.to_vec();
        all_env.extend_from_slice(env);
        let child = spawn_gateway(&config, &all_env, &log);
        let (service, admin) = listen_addrs(&log).await;
        let process = Process {
            child,
            service,
            admin,
            log,
        };
        let ready = || async {
            send(Method::GET, &process.admin_url("/readyz"), &[])
                .await
                .status
                == StatusCode::OK
        };
        wait_for(ready, "gateway process ready").await;
        process
    }

    fn status_url(&self, task: &str) -> String {
        format!(
            "http://{}/files/v3/files/import-from-url/async/tasks/{task}/status",
            self.service
        )
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn stop(mut self) -> String {
        kill(&self.child, "TERM");
        wait_exit(&mut self.child, Duration::from_secs(30));
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A status request goes through the proxy: the proxy logs the CONNECT to the simulator
/// (the token calls take the same way), and the caller gets HubSpot's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_goes_through_the_proxy() {
    let dir = temp_dir("proxy-plain");
    let sim = simulator(SimConfig::default()).await;
    let proxy = Tinyproxy::start(&dir, sim_port(&sim), None).await;
    let mut config = config(&sim.base_url());
    config.upstream.proxy = proxy.url().parse().expect("proxy URL");
    let gw = gateway(config, oauth()).await;
    wait_ready(&gw).await;
    let before = proxy.connects_to(&sim_target(&sim));
    assert!(before >= 1, "the token was obtained through the proxy");

    let reply = get(&gw.status_url("complete-proxy")).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["status"], "COMPLETE");
    assert_eq!(status_requests(&sim).await, 1);
    let log = proxy.log();
    assert!(
        log.contains(&format!("CONNECT {} HTTP/1.1", sim_target(&sim))),
        "{log}"
    );
    gw.stop().await;
}

/// With Basic authentication, the gateway authenticates to the proxy, and what reaches
/// HubSpot carries no `Proxy-*` header and neither the password nor its Basic encoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_credentials_reach_only_the_proxy() {
    const PASSWORD: &str = "pxy-MARKER-7c1e0a";
    let dir = temp_dir("proxy-auth");
    let sim = simulator(SimConfig::default()).await;
    let proxy = Tinyproxy::start(&dir, sim_port(&sim), Some(("gateway", PASSWORD))).await;
    let password_file = dir.join("proxy-password");
    std::fs::write(&password_file, format!("{PASSWORD}\n")).expect("password file");
    let mut config = config(&sim.base_url());
    config.upstream.proxy = proxy.url().parse().expect("proxy URL");
    config.upstream.proxy_username = Some("gateway".into());
    config.upstream.proxy_password_file = Some(password_file);
    let gw = gateway(config, oauth()).await;
    wait_ready(&gw).await;

    for task in ["complete-auth", "pending-auth"] {
        let reply = get(&gw.status_url(task)).await;
        assert_eq!(reply.status, StatusCode::OK, "{task}");
    }
    assert!(proxy.connects_to(&sim_target(&sim)) >= 1);
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("gateway:{PASSWORD}"));
    let seen = sim_requests(&sim).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    for request in &seen {
        let headers = request["headers"].as_object().expect("headers");
        for (name, value) in headers {
            assert!(!name.starts_with("proxy-"), "HubSpot saw {name}");
            let value = value.as_str().unwrap_or_default();
            assert!(
                !value.contains(PASSWORD) && !value.contains(&encoded),
                "HubSpot saw the proxy credential in {name}"
            );
        }
    }
    let metrics = send(Method::GET, &gw.admin_url("/metrics"), &[]).await.body;
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(!metrics.contains(PASSWORD) && !metrics.contains(&encoded));
    gw.stop().await;
}

/// When the proxy refuses the gateway's password (the proxy's password was rotated and the
/// gateway still has the old one), callers get a 502 in HubSpot's error shape, and the
/// password appears in no answer, metric or log line (debug level).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_proxy_password_is_a_502_without_secrets() {
    const OLD: &str = "pxy-OLD-MARKER-51d2";
    const NEW: &str = "pxy-NEW-MARKER-9a3f";
    let dir = temp_dir("proxy-refused");
    let sim = simulator(SimConfig::default()).await;
    let proxy = Tinyproxy::start(&dir, sim_port(&sim), Some(("gateway", OLD))).await;
    std::fs::write(dir.join("proxy-password"), format!("{OLD}\n")).expect("password file");
    let mut text = config_toml(&sim.base_url(), TOKEN_FROM_ENV);
    text = text.replace(
        "[upstream]\n",
        &format!(
            "[upstream]\nproxy = \"{}\"\nproxy_username = \"gateway\"\nproxy_password_file = \"{}\"\n",
            proxy.url(),
            dir.join("proxy-password").display()
        ),
    );
    let gw = Process::start(&dir, "gateway", &text, &[]).await;
    let reply = get(&gw.status_url("pending-before")).await;
    assert_eq!(reply.status, StatusCode::OK);

    // The proxy comes back on the same port with a password the gateway does not have;
    // the tunnels it held are gone with it.
    let port = proxy.port;
    drop(proxy);
    let proxy = Tinyproxy::start_on(&dir, port, sim_port(&sim), Some(("gateway", NEW))).await;
    let seen_before = status_requests(&sim).await;
    let reply = get(&gw.status_url("pending-after")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    let body = reply.json();
    assert_eq!(body["status"], "error");
    assert_eq!(body["category"], "UPSTREAM_UNAVAILABLE");
    assert!(body["correlationId"].is_string() && body["message"].is_string());
    assert_eq!(
        status_requests(&sim).await,
        seen_before,
        "nothing reached HubSpot"
    );
    assert!(
        proxy.log().contains("CONNECT "),
        "the gateway asked the proxy"
    );

    let b64 = |p: &str| base64::engine::general_purpose::STANDARD.encode(format!("gateway:{p}"));
    let metrics = send(Method::GET, &gw.admin_url("/metrics"), &[]).await.body;
    let readyz = send(Method::GET, &gw.admin_url("/readyz"), &[]).await.body;
    let mut outputs = vec![
        String::from_utf8_lossy(&reply.body).into_owned(),
        format!("{:?}", reply.headers),
        String::from_utf8_lossy(&metrics).into_owned(),
        String::from_utf8_lossy(&readyz).into_owned(),
    ];
    outputs.push(gw.stop());
    assert!(
        outputs[4].contains("status=502"),
        "the log has the refused request: {}",
        outputs[4]
    );
    for output in &outputs {
        for secret in [OLD.to_owned(), NEW.to_owned(), b64(OLD), b64(NEW)] {
            assert!(!output.contains(&secret), "a proxy secret in: {output}");
        }
    }
}

/// A gateway whose proxy password is wrong from the start obtains no token through the
/// proxy: it stays unready and callers get a 503 `TOKEN_UNAVAILABLE`, HubSpot sees nothing,
/// and the password is in no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_proxy_password_at_start_leaves_no_token() {
    const WRONG: &str = "pxy-WRONG-MARKER-c0de";
    let dir = temp_dir("proxy-wrong");
    let sim = simulator(SimConfig::default()).await;
    let proxy = Tinyproxy::start(&dir, sim_port(&sim), Some(("gateway", "the-right-one"))).await;
    let password_file = dir.join("proxy-password");
    std::fs::write(&password_file, WRONG).expect("password file");
    let mut config = config(&sim.base_url());
    config.upstream.proxy = proxy.url().parse().expect("proxy URL");
    config.upstream.proxy_username = Some("gateway".into());
    config.upstream.proxy_password_file = Some(password_file);
    let gw = gateway(config, oauth()).await;
    wait_for(
        || async { proxy.log().contains("CONNECT ") },
        "the gateway asked the proxy for a tunnel",
    )
    .await;
    let reply = get(&gw.status_url("complete-wrong")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.json()["category"], "TOKEN_UNAVAILABLE");
    let readyz = send(Method::GET, &gw.admin_url("/readyz"), &[]).await;
    assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(stats(&sim).await["status_requests"], 0);
    let encoded = base64::engine::general_purpose::STANDARD.encode(format!("gateway:{WRONG}"));
    for output in [&reply.body, &readyz.body] {
        let text = String::from_utf8_lossy(output);
        assert!(!text.contains(WRONG) && !text.contains(&encoded), "{text}");
    }
    gw.stop().await;
}

/// `proxy = "env"` takes `HTTP_PROXY` from the process environment for an http base URL,
/// and goes direct when `NO_PROXY` covers HubSpot's host: the proxy then logs no CONNECT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_proxy_is_used_unless_no_proxy_covers_the_host() {
    let dir = temp_dir("proxy-env");
    let sim = simulator(SimConfig::default()).await;
    let proxy = Tinyproxy::start(&dir, sim_port(&sim), None).await;
    let text = config_toml(&sim.base_url(), TOKEN_FROM_ENV)
        .replace("[upstream]\n", "[upstream]\nproxy = \"env\"\n");
    let target = sim_target(&sim);

    let via = Process::start(&dir, "via", &text, &[("HTTP_PROXY", &proxy.url())]).await;
    let before = proxy.connects_to(&target);
    assert!(before >= 1, "the token was obtained through the proxy");
    assert_eq!(
        get(&via.status_url("pending-env")).await.status,
        StatusCode::OK
    );
    via.stop();

    let before = proxy.connects_to(&target);
    let direct = Process::start(
        &dir,
        "direct",
        &text,
        &[
            ("http_proxy", &proxy.url()),
            ("NO_PROXY", "localhost,127.0.0.1"),
        ],
    )
    .await;
    assert_eq!(
        get(&direct.status_url("pending-env")).await.status,
        StatusCode::OK
    );
    direct.stop();
    assert_eq!(proxy.connects_to(&target), before, "{}", proxy.log());
}

/// With an https base URL, the tunnel carries TLS from the gateway to HubSpot: the proxy
/// sees `CONNECT api.hubapi.com:443` with the gateway's `Proxy-Authorization`, and then only
/// a TLS ClientHello (no request line, no header, no bearer in clear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_to_hubspot_runs_inside_the_tunnel() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let recorder = tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.expect("the gateway connects");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            if stream.read(&mut byte).await.expect("read") == 0 {
                break;
            }
            head.push(byte[0]);
        }
        stream
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .expect("write");
        let mut after = vec![0u8; 512];
        let n = stream.read(&mut after).await.expect("read");
        after.truncate(n);
        (String::from_utf8_lossy(&head).into_owned(), after)
    });
    let dir = temp_dir("proxy-tls");
    std::fs::write(dir.join("pw"), "tls-MARKER-0e4b\n").expect("password file");
    let text = format!(
        "[upstream]\nproxy = \"http://{addr}\"\nproxy_username = \"gw\"\nproxy_password_file = \"{}\"\nrequest_timeout = \"4s\"\n",
        dir.join("pw").display()
    );
    let upstream: hubspot_files_gateway::config::UpstreamConfig =
        toml::from_str(text.trim_start_matches("[upstream]\n")).expect("upstream config");
    let hubspot = HubSpot::new(&upstream, Metrics::new(), None).expect("client");
    // The recorder never finishes the handshake: the call fails, what matters is what it saw.
    let call = tokio::spawn(async move { hubspot.get("/oauth/v1/access-tokens/x").await });
    let (head, after) = tokio::time::timeout(Duration::from_secs(10), recorder)
        .await
        .expect("the proxy saw the tunnel in time")
        .expect("recorder");
    call.abort();
    assert!(
        head.starts_with("CONNECT api.hubapi.com:443 HTTP/1.1\r\n"),
        "{head}"
    );
    let expected = base64::engine::general_purpose::STANDARD.encode("gw:tls-MARKER-0e4b");
    assert!(
        head.contains(&format!("Proxy-Authorization: Basic {expected}\r\n")),
        "{head}"
    );
    // A TLS record of type handshake (22) holding a ClientHello (1) for HubSpot's name.
    assert!(after.len() > 5, "{after:?}");
    assert_eq!((after[0], after[5]), (22, 1), "{after:?}");
    let clear = String::from_utf8_lossy(&after);
    assert!(clear.contains("api.hubapi.com"), "SNI names HubSpot");
    for word in ["GET ", "HTTP/1.1", "access-tokens", "Authorization"] {
        assert!(!clear.contains(word), "{word} in clear inside the tunnel");
    }
}

/// `check-config` reads the proxy password (a missing one is exit 64 naming the key, never
/// the path's secret), `--without-secrets` skips it, and a proxy URL with a user and
/// password is refused without the password appearing in the output.
#[test]
fn check_config_reads_the_proxy_password_and_refuses_userinfo() {
    let dir = temp_dir("proxy-check");
    let run = |text: &str, extra: &[&str]| {
        let config = dir.join("gateway.toml");
        std::fs::write(&config, text).expect("config");
        let out = Command::new(BIN)
            .arg("check-config")
            .args(extra)
            .arg("--config")
            .arg(&config)
            .envs(TOKEN_ENV)
            .output()
            .expect("check-config runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let password = dir.join("proxy-password");
    let with_proxy = |proxy: &str| {
        config_toml("https://api.hubapi.com", TOKEN_FROM_ENV).replace(
            "[upstream]\n",
            &format!(
                "[upstream]\nproxy = \"{proxy}\"\nproxy_username = \"gw\"\nproxy_password_file = \"{}\"\n",
                password.display()
            ),
        )
    };
    let good = with_proxy("http://proxy.internal:3128");

    let (code, out) = run(&good, &[]);
    assert_eq!(code, Some(64), "{out}");
    assert!(out.contains("upstream.proxy_password_file"), "{out}");
    let (code, out) = run(&good, &["--without-secrets"]);
    assert_eq!(code, Some(0), "{out}");

    std::fs::write(&password, "chk-MARKER-33aa\n").expect("password");
    let (code, out) = run(&good, &[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("proxy = \"http://proxy.internal:3128\""),
        "{out}"
    );
    assert!(!out.contains("chk-MARKER"), "{out}");

    let (code, out) = run(
        &with_proxy("http://gw:url-MARKER-77@proxy.internal:3128"),
        &[],
    );
    assert_eq!(code, Some(64), "{out}");
    assert!(
        out.contains("upstream.proxy must not carry a user or password"),
        "{out}"
    );
    assert!(!out.contains("url-MARKER"), "{out}");
}

//! Live reload in the real binary: SIGHUP and a Kubernetes-style `..data` symlink swap change
//! which API keys work while a client connection stays open, and a bad config is refused.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hubspot_files_gateway::auth::hash_key;
use hubspot_sim::RunningSimulator;
use hubspot_sim::SimConfig;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use support::{BIN, KEY, metric_at, send, simulator, spawn_serve, temp_dir, wait_for};

/// The key a reload brings into service in place of [`KEY`].
const NEW_KEY: &str = "rotated-key-9876543210";
/// Looks like a credential; must never reach the log.
const LEAKED: &str = "hunter2-SECRET-in-userinfo";

/// A gateway config for `upstream` accepting `key` as client `caller`.
fn config_text(upstream: &str, key: &str, watch: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "2s"
[upstream]
base_url = "{upstream}"
[token]
client_id_env = "T_CLIENT_ID"
client_secret_env = "T_CLIENT_SECRET"
refresh_token_env = "T_REFRESH_TOKEN"
[reload]
watch_interval = "{watch}"
[[auth.clients]]
name = "caller"
key_sha256 = "{}"
"#,
        hash_key(key)
    )
}

/// One test's world: the simulator, a directory, and the binary serving the config the
/// test writes there (from the simulator's URL and the directory) once it is ready.
struct World {
    sim: RunningSimulator,
    dir: PathBuf,
    path: PathBuf,
    gw: Running,
}

impl World {
    async fn start(name: &str, config: impl FnOnce(&str, &Path) -> String) -> World {
        let sim = simulator(SimConfig::default()).await;
        let dir = temp_dir(name);
        let path = dir.join("gateway.toml");
        std::fs::write(&path, config(&sim.base_url(), &dir)).expect("write config");
        let gw = Running::start(&path);
        gw.wait_ready().await;
        World { sim, dir, path, gw }
    }

    /// Replaces the config file with `text` and sends SIGHUP.
    fn rewrite_and_hup(&self, text: &str) {
        std::fs::write(&self.path, text).expect("rewrite config");
        self.gw.signal("HUP");
    }
}

/// The gateway binary, its addresses, and its log lines as they arrive.
struct Running {
    child: Child,
    service: String,
    admin: String,
    log: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(config: &Path) -> Running {
        let served = spawn_serve(Command::new(BIN), config);
        Running {
            child: served.child,
            service: served.service,
            admin: served.admin,
            log: served.log,
            seen: Vec::new(),
        }
    }

    /// Waits (20 s at most) for a log line containing `text` that was not matched before.
    fn wait_log(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => panic!("no log line with {text:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(&self.admin, series).await
    }

    async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.admin);
        wait_for(
            || async { send(Method::GET, &url, &[]).await.status == StatusCode::OK },
            "gateway ready",
        )
        .await;
    }

    /// Opens one HTTP/1.1 connection that the test keeps for the whole reload.
    async fn connect(&self) -> (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>) {
        let stream = tokio::net::TcpStream::connect(&self.service)
            .await
            .expect("connect");
        http1(stream).await
    }

    /// Opens one HTTPS connection trusting `ca`; also returns the certificate the gateway
    /// presented.
    async fn connect_tls(
        &self,
        ca: &CertificateDer<'static>,
    ) -> (
        SendRequest<Empty<Bytes>>,
        tokio::task::JoinHandle<()>,
        CertificateDer<'static>,
    ) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(&self.service)
            .await
            .expect("connect");
        let name = ServerName::try_from("127.0.0.1").expect("name");
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .expect("TLS handshake with the gateway");
        let presented = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("server certificate")
            .clone()
            .into_owned();
        let (sender, task) = http1(stream).await;
        (sender, task, presented)
    }

    fn stop(mut self) {
        self.signal("TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An HTTP/1.1 client connection over `io`, driven by its own task.
async fn http1<T>(io: T) -> (SendRequest<Empty<Bytes>>, tokio::task::JoinHandle<()>)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .expect("handshake");
    (
        sender,
        tokio::spawn(async move {
            let _ = conn.await;
        }),
    )
}

/// A test CA that issues server certificates for 127.0.0.1.
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "reload test CA");
        let ca = params.self_signed(&key).expect("CA");
        Ca {
            der: ca.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes a fresh server certificate and key to `dir/server.pem` and `dir/server.key`;
    /// returns the certificate.
    fn issue_into(&self, dir: &Path, cn: &str) -> CertificateDer<'static> {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".into()]).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
        cert.der().clone()
    }
}

/// One status request with `key` on the kept connection; its HTTP status.
async fn status_on(conn: &mut SendRequest<Empty<Bytes>>, key: &str) -> StatusCode {
    conn.ready()
        .await
        .expect("the kept connection is still open");
    let req = Request::get("/files/v3/files/import-from-url/async/tasks/complete-reload/status")
        .header("host", "gateway")
        .header("authorization", format!("Bearer {key}"))
        .body(Empty::new())
        .expect("request");
    let resp = conn
        .send_request(req)
        .await
        .expect("the kept connection answers");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

/// Writes `text` as `dir/gateway.toml` the way a Kubernetes volume does: the file is a
/// symlink through `..data`, and an update points `..data` at a new directory atomically.
fn k8s_publish(dir: &Path, version: &str, text: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data).expect("version dir");
    std::fs::write(data.join("gateway.toml"), text).expect("write");
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).expect("symlink");
    std::fs::rename(&tmp, dir.join("..data")).expect("swap ..data");
    let link = dir.join("gateway.toml");
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink("..data/gateway.toml", &link).expect("symlink");
    }
}

/// SIGHUP re-reads the config: the old key stops working and the new one works, on a
/// connection opened before the reload and kept open through it; both results of
/// `config_reloads_total` exist from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_api_keys_without_dropping_a_connection() {
    let mut w = World::start("sighup", |url, _| config_text(url, KEY, "0s")).await;
    let applied = "hubspot_gateway_config_reloads_total{result=\"applied\"}";
    let refused = "hubspot_gateway_config_reloads_total{result=\"refused\"}";
    assert_eq!(w.gw.metric(applied).await, Some(0.0));
    assert_eq!(w.gw.metric(refused).await, Some(0.0));
    let loaded_at =
        w.gw.metric("hubspot_gateway_config_last_load_timestamp_seconds")
            .await
            .expect("last load gauge");
    assert!(loaded_at > 1.0e9, "{loaded_at}");

    let (mut conn, _task) = w.gw.connect().await;
    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::OK);
    assert_eq!(
        status_on(&mut conn, NEW_KEY).await,
        StatusCode::UNAUTHORIZED
    );

    w.rewrite_and_hup(&config_text(&w.sim.base_url(), NEW_KEY, "0s"));
    w.gw.wait_log("config reloaded");

    assert_eq!(status_on(&mut conn, NEW_KEY).await, StatusCode::OK);
    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::UNAUTHORIZED);
    assert_eq!(w.gw.metric(applied).await, Some(1.0));
    assert_eq!(w.gw.metric(refused).await, Some(0.0));
    w.gw.stop();
}

/// A Kubernetes-style `..data` swap of the mounted config is noticed without any signal, and
/// a connection opened before it keeps working with the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_file_symlink_swap_reloads_keys_without_a_signal() {
    let sim = simulator(SimConfig::default()).await;
    let dir = temp_dir("symlink");
    k8s_publish(&dir, "v1", &config_text(&sim.base_url(), KEY, "100ms"));
    let mut gw = Running::start(&dir.join("gateway.toml"));
    gw.wait_ready().await;
    let (mut conn, _task) = gw.connect().await;
    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::OK);

    k8s_publish(&dir, "v2", &config_text(&sim.base_url(), NEW_KEY, "100ms"));
    let line = gw.wait_log("config reloaded");
    assert!(line.contains("file_changed"), "{line}");

    assert_eq!(status_on(&mut conn, NEW_KEY).await, StatusCode::OK);
    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::UNAUTHORIZED);
    gw.stop();
}

/// A config that fails validation on reload is refused with one log line that shows no
/// value from it; the old keys keep working and the refusal is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_on_reload_is_refused_and_old_keys_keep_working() {
    let mut w = World::start("refused", |url, _| config_text(url, KEY, "0s")).await;
    let (mut conn, _task) = w.gw.connect().await;
    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::OK);

    // Three problems at once: a password in base_url, the new key given to two clients.
    let with_password = w
        .sim
        .base_url()
        .replace("http://", &format!("http://user:{LEAKED}@"));
    let bad = config_text(&with_password, NEW_KEY, "0s")
        + &format!(
            "[[auth.clients]]\nname = \"other\"\nkey_sha256 = \"{}\"\n",
            hash_key(NEW_KEY)
        );
    w.rewrite_and_hup(&bad);
    let line = w.gw.wait_log("config reload refused");
    assert!(line.contains("upstream.base_url"), "{line}");
    assert!(line.contains("key_sha256"), "{line}");
    assert!(!line.contains(LEAKED), "{line}");

    assert_eq!(status_on(&mut conn, KEY).await, StatusCode::OK);
    assert_eq!(
        status_on(&mut conn, NEW_KEY).await,
        StatusCode::UNAUTHORIZED
    );
    let refused = "hubspot_gateway_config_reloads_total{result=\"refused\"}";
    assert_eq!(w.gw.metric(refused).await, Some(1.0));

    // The next good config goes into service: a refusal does not stick.
    w.rewrite_and_hup(&config_text(&w.sim.base_url(), NEW_KEY, "0s"));
    w.gw.wait_log("config reloaded");
    assert_eq!(status_on(&mut conn, NEW_KEY).await, StatusCode::OK);
    assert!(
        w.gw.seen.iter().all(|l| !l.contains(LEAKED)),
        "{:?}",
        w.gw.seen
    );
    w.gw.stop();
}

/// A changed setting that needs a restart is named in the log; the keys still reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_that_cannot_change_live_are_named_in_the_log() {
    let mut w = World::start("restart", |url, _| config_text(url, KEY, "0s")).await;
    let changed = config_text(&w.sim.base_url(), NEW_KEY, "0s")
        .replace("shutdown_grace = \"2s\"", "shutdown_grace = \"3s\"");
    w.rewrite_and_hup(&changed);
    let line = w.gw.wait_log("config reloaded");
    assert!(line.contains("server.shutdown_grace"), "{line}");
    assert!(!line.contains("auth.clients"), "{line}");
    let (mut conn, _task) = w.gw.connect().await;
    assert_eq!(status_on(&mut conn, NEW_KEY).await, StatusCode::OK);
    w.gw.stop();
}

/// SIGHUP puts a new TLS certificate in service for new connections while a connection made
/// with the old one keeps working; a broken certificate file is refused and the current
/// certificate stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_tls_certificate_without_dropping_a_connection() {
    let ca = Ca::new();
    let mut first = None;
    let mut w = World::start("tls", |url, dir| {
        first = Some(ca.issue_into(dir, "gateway-1"));
        config_text(url, KEY, "0s").replace(
            "shutdown_grace",
            &format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\nshutdown_grace",
                dir.join("server.pem").display(),
                dir.join("server.key").display()
            ),
        )
    })
    .await;
    let (mut old, _task, presented) = w.gw.connect_tls(&ca.der).await;
    assert_eq!(Some(presented), first);
    assert_eq!(status_on(&mut old, KEY).await, StatusCode::OK);

    let second = ca.issue_into(&w.dir, "gateway-2");
    w.gw.signal("HUP");
    let line = w.gw.wait_log("config reloaded");
    assert!(line.contains("tls=true"), "{line}");
    let (mut new, _task2, presented) = w.gw.connect_tls(&ca.der).await;
    assert_eq!(presented, second, "new connections get the new certificate");
    assert_eq!(status_on(&mut new, KEY).await, StatusCode::OK);
    assert_eq!(status_on(&mut old, KEY).await, StatusCode::OK);

    std::fs::write(
        w.dir.join("server.pem"),
        "-----BEGIN CERTIFICATE-----\n!!\n",
    )
    .expect("w");
    w.gw.signal("HUP");
    let line = w.gw.wait_log("config reload refused");
    assert!(line.contains("server.tls_cert_file"), "{line}");
    let (_conn, _task3, presented) = w.gw.connect_tls(&ca.der).await;
    assert_eq!(
        presented, second,
        "a refused reload keeps the certificate in service"
    );
    w.gw.stop();
}

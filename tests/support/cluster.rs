//! Cluster-mode harness: a `redis-server` of the test's own on a free loopback port, gateway
//! replicas as child processes sharing it, and the simulator's arrival log.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

use hubspot_sim::RunningSimulator;
use hyper::{Method, StatusCode};

use super::{BIN, ServeChild, config_toml, metric_at, send, spawn_serve, wait_for};

/// A redis-server process of the test's own on a free loopback port (plain or TLS-only),
/// without persistence; killed on drop. Fails naming the package to install when
/// `redis-server` is not there: these tests never skip.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    /// With TLS: the directory of `ca.pem`, `server.pem`, `server.key`; removed on drop.
    tls: Option<PathBuf>,
}

impl RedisServer {
    /// A plain server on a free port.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A plain server with further `redis-server` arguments (e.g. a password).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::launch(extra.iter().map(|s| s.to_string()).collect(), None)
    }

    /// Picks a free port (bound, then released) and starts the server on it.
    fn launch(extra: Vec<String>, tls: Option<PathBuf>) -> RedisServer {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut server = RedisServer {
            port,
            child: None,
            extra,
            tls,
        };
        server.run();
        server
    }

    /// A server that speaks only TLS, with a certificate for 127.0.0.1 from a test CA.
    pub fn start_tls() -> RedisServer {
        let dir = std::env::temp_dir().join(format!("cluster-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let ca_key = KeyPair::generate().expect("key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "cluster test CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("signed");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
        Self::launch(Vec::new(), Some(dir))
    }

    /// Starts (or restarts) the process on this server's port and waits until it answers.
    pub fn run(&mut self) {
        let port = self.port.to_string();
        let ports = match &self.tls {
            None => vec!["--port".to_string(), port],
            Some(dir) => {
                let file = |name: &str| dir.join(name).display().to_string();
                vec![
                    "--port".into(),
                    "0".into(),
                    "--tls-port".into(),
                    port,
                    "--tls-cert-file".into(),
                    file("server.pem"),
                    "--tls-key-file".into(),
                    file("server.key"),
                    "--tls-ca-cert-file".into(),
                    file("ca.pem"),
                    "--tls-auth-clients".into(),
                    "no".into(),
                ]
            }
        };
        let child = Command::new("redis-server")
            .args(&ports)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--loglevel", "warning"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server ({e}); these tests need it: \
                     apt-get update && apt-get install -y redis-server"
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                drop(s);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on port {} within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://` for a TLS server.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> String {
        self.child
            .as_ref()
            .expect("server running")
            .id()
            .to_string()
    }

    /// Stops the process (SIGKILL) and waits for it; its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the running process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.pid()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} failed");
    }

    /// The CA file a client needs for a TLS server.
    pub fn ca_file(&self) -> PathBuf {
        self.tls.as_ref().expect("a TLS server").join("ca.pem")
    }

    /// A plain connection for checking what the backend stored.
    pub async fn inspect(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("url")
            .get_multiplexed_async_connection()
            .await
            .expect("inspection connection")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A frozen process cannot die until it is continued.
            let _ = Command::new("kill").args(["-CONT", &self.pid()]).status();
        }
        self.kill();
        if let Some(dir) = &self.tls {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A gateway config file's text for cluster mode: [`config_toml`]'s (loopback port-0
/// listeners, client `tests` with [`super::KEY`]) with OAuth credentials from the `T_*` variables
/// [`spawn_serve`] sets, the account's budget `requests` per `per`, and `[cluster]` on
/// `redis_url` with `cluster` as further lines of that table.
pub fn cluster_toml(
    upstream: &str,
    requests: u32,
    per: &str,
    redis_url: &str,
    cluster: &str,
) -> String {
    const UNLIMITED: &str = r#"rate_limit = { requests = 10000, per = "10s" }"#;
    let base = config_toml(
        upstream,
        "client_id_env = \"T_CLIENT_ID\"\nclient_secret_env = \"T_CLIENT_SECRET\"\n\
         refresh_token_env = \"T_REFRESH_TOKEN\"",
    );
    assert!(
        base.contains(UNLIMITED),
        "config_toml's budget line changed"
    );
    let budget = format!("rate_limit = {{ requests = {requests}, per = \"{per}\" }}");
    format!(
        "{}[cluster]\nredis_url = \"{redis_url}\"\n{cluster}\n",
        base.replace(UNLIMITED, &budget)
    )
}

/// One gateway replica: the binary serving `config` as a child process, killed on drop.
pub struct Replica {
    served: ServeChild,
    /// Its config file's directory, removed on drop.
    dir: PathBuf,
}

impl Replica {
    /// Writes `toml` to a fresh directory named after `name` and serves it; returns once the
    /// replica listens (not yet ready: see [`Replica::wait_ready`]).
    pub async fn spawn(name: &str, toml: &str) -> Replica {
        let dir = std::env::temp_dir().join(format!(
            "hfg-replica-{name}-{}-{}",
            std::process::id(),
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("replica dir");
        let path = dir.join("gateway.toml");
        std::fs::write(&path, toml).expect("write config");
        // spawn_serve blocks while it reads the log: off the runtime, which also serves
        // the simulator the replica is about to call.
        let served = tokio::task::spawn_blocking(move || spawn_serve(Command::new(BIN), &path))
            .await
            .expect("spawn task");
        Replica { served, dir }
    }

    /// URL of the status route for `task` on API version `v3`.
    pub fn url(&self, task: &str) -> String {
        format!(
            "http://{}/files/v3/files/import-from-url/async/tasks/{task}/status",
            self.served.service
        )
    }

    /// The value of a metric line (exact name with labels) on this replica's admin port.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(&self.served.admin, series).await
    }

    /// Waits (10 s at most) until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("http://{}/readyz", self.served.admin);
        wait_for(
            || async { send(Method::GET, &url, &[]).await.status == StatusCode::OK },
            "replica ready",
        )
        .await;
    }

    /// Waits (`limit` at most) until `hubspot_gateway_cluster_backend_up` reads `value`.
    pub async fn wait_backend_up(&self, value: f64, limit: Duration) {
        super::wait_for_up_to(
            limit,
            || async { self.metric("hubspot_gateway_cluster_backend_up").await == Some(value) },
            &format!("cluster_backend_up {value} on {}", self.served.admin),
        )
        .await;
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.served.child.kill();
        let _ = self.served.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` replicas of `toml`, started together, each ready.
pub async fn replicas(name: &str, n: usize, toml: &str) -> Vec<Replica> {
    let mut started = Vec::with_capacity(n);
    for i in 0..n {
        started.push(Replica::spawn(&format!("{name}-{i}"), toml).await);
    }
    for replica in &started {
        replica.wait_ready().await;
    }
    started
}

/// One status request's arrival at the simulator, from `GET /__sim/arrivals`.
#[derive(Debug, Clone)]
pub struct Arrival {
    /// Milliseconds since the simulator started.
    pub at_ms: f64,
    /// The taskId asked for.
    pub task_id: String,
}

/// Every status request the simulator received since it started (or was reset), oldest
/// first.
pub async fn arrivals(sim: &RunningSimulator) -> Vec<Arrival> {
    super::sim_list(sim, "/__sim/arrivals")
        .await
        .iter()
        .map(|a| Arrival {
            at_ms: a["at_ms"].as_f64().expect("at_ms"),
            task_id: a["task_id"].as_str().expect("task_id").to_owned(),
        })
        .collect()
}

/// The most arrivals in any rolling window of `window` (half-open, as HubSpot counts: a
/// call `window` after another no longer shares its window), and where that window starts.
pub fn busiest_window(arrivals: &[Arrival], window: Duration) -> (usize, f64) {
    let width = window.as_secs_f64() * 1000.0;
    let mut at: Vec<f64> = arrivals.iter().map(|a| a.at_ms).collect();
    at.sort_by(f64::total_cmp);
    let (mut most, mut start, mut first) = (0, 0.0, 0);
    for (last, t) in at.iter().enumerate() {
        while t - at[first] >= width {
            first += 1;
        }
        if last + 1 - first > most {
            most = last + 1 - first;
            start = at[first];
        }
    }
    (most, start)
}

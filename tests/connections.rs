//! Connection deadlines and limits on the service port: silent, half-sent, idle and stalled
//! connections are closed in time, the connection cap keeps the admin port answering, and
//! request heads are bounded.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hubspot_files_gateway::config::Config;
use hubspot_sim::SimConfig;
use hyper::{Method, StatusCode};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A gateway in front of a default simulator, with `tune` applied to its config; not waited
/// for readiness (the deadline tests do not need HubSpot).
async fn gateway_with(
    tune: impl FnOnce(&mut Config),
) -> (hubspot_sim::RunningSimulator, TestGateway) {
    let sim = simulator(SimConfig::default()).await;
    let mut c = config(&sim.base_url());
    tune(&mut c);
    let gw = gateway(c, oauth()).await;
    (sim, gw)
}

/// Reads from `stream` until the peer closes it (EOF or reset), failing after `limit`;
/// returns how long that took from `since`.
async fn closed_within<S>(stream: &mut S, since: Instant, limit: Duration, what: &str) -> Duration
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = vec![0u8; 16 << 10];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, read_all)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after {limit:?}"));
    since.elapsed()
}

/// A raw HTTP/2 client connection (window and PING control), its driver spawned; the
/// returned receiver resolves when the gateway ends the connection.
async fn h2_client(
    addr: SocketAddr,
    builder: h2::client::Builder,
) -> (
    h2::client::SendRequest<Bytes>,
    h2::PingPong,
    tokio::sync::oneshot::Receiver<()>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (send, mut conn) = builder.handshake(tcp).await.expect("h2 handshake");
    let ping = conn.ping_pong().expect("ping_pong taken once");
    let (ended_tx, ended) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ = conn.await;
        let _ = ended_tx.send(());
    });
    (send, ping, ended)
}

fn status_request(addr: SocketAddr, task: &str) -> hyper::Request<()> {
    hyper::Request::get(format!(
        "http://{addr}/files/v3/files/import-from-url/async/tasks/{task}/status"
    ))
    .body(())
    .expect("request")
}

/// One keyless GET of the status route on an HTTP/2 connection: the sender (kept, or the
/// client would close the connection) and the answer's head.
async fn h2_get(
    send: h2::client::SendRequest<Bytes>,
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    hyper::Response<h2::RecvStream>,
) {
    let mut send = send.ready().await.expect("ready");
    let (response, _) = send
        .send_request(status_request(addr, "complete-abc"), true)
        .expect("send");
    (send, response.await.expect("an answer"))
}

/// Waits (8 s at most) for an HTTP/2 connection to be ended by the gateway; returns how long
/// after `since`.
async fn ended_within(
    ended: tokio::sync::oneshot::Receiver<()>,
    since: Instant,
    what: &str,
) -> Duration {
    tokio::time::timeout(Duration::from_secs(8), ended)
        .await
        .unwrap_or_else(|_| panic!("{what}: still open after 8 s"))
        .ok();
    since.elapsed()
}

/// Waits until at least `n` connections were closed for `reason`: the counter moves just
/// after the socket closes.
async fn wait_closed(gw: &TestGateway, reason: &str, n: f64) {
    let series = format!("hubspot_gateway_connections_closed_total{{reason=\"{reason}\"}}");
    wait_for(
        || async { metric(gw, &series).await.unwrap_or(0.0) >= n },
        &format!("{n} connections closed for {reason}"),
    )
    .await;
}

/// Keeps answering PINGs (one every 200 ms) until the connection goes away.
fn keep_pinging(mut ping: h2::PingPong) {
    tokio::spawn(async move {
        while ping.ping(h2::Ping::opaque()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

/// A socket that sends nothing, one that sends half the HTTP/2 preface, one with half an
/// HTTP/1 head, and an HTTP/2 connection that completes its handshake and answers PINGs but
/// never opens a stream are all closed at `header_read_timeout` (1 s here), not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_sent_connections_close_at_the_head_deadline() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let mut preface = TcpStream::connect(gw.addr).await.expect("connect");
    preface
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("write");
    let mut half_head = TcpStream::connect(gw.addr).await.expect("connect");
    half_head
        .write_all(
            b"GET /files/v3/files/import-from-url/async/tasks/x/status HTTP/1.1\r\nHost: x\r\n",
        )
        .await
        .expect("write");
    let (_send, ping, ended) = h2_client(gw.addr, h2::client::Builder::new()).await;
    keep_pinging(ping);

    let limit = Duration::from_secs(6);
    for (name, stream) in [
        ("zero bytes", &mut silent),
        ("partial HTTP/2 preface", &mut preface),
        ("partial HTTP/1 head", &mut half_head),
    ] {
        let took = closed_within(stream, started, limit, name).await;
        eprintln!("{name}: closed after {took:?}");
        assert!(
            took >= Duration::from_millis(900),
            "{name} closed early: {took:?}"
        );
    }
    tokio::time::timeout(limit, ended)
        .await
        .expect("HTTP/2 connection without a stream closed")
        .ok();
    eprintln!(
        "HTTP/2 with PINGs, no stream: closed after {:?}",
        started.elapsed()
    );
    wait_closed(&gw, "head_timeout", 4.0).await;
    gw.stop().await;
}

/// Opens an HTTP/2 connection with `builder` that answers PINGs, sends one keyless request,
/// reads the answer's body if `drain`, and returns how long after sending it the gateway
/// ended the connection, checking it was counted under `reason`.
async fn h2_request_then_closed(
    gw: &TestGateway,
    builder: h2::client::Builder,
    drain: bool,
    reason: &str,
) -> Duration {
    let (send, ping, ended) = h2_client(gw.addr, builder).await;
    keep_pinging(ping);
    // The deadline starts after the request was sent, so it cannot pass before `sent` plus
    // the timeout, however late this task reads the answer on a busy machine.
    let sent = Instant::now();
    // The head leaves even with a window of 0: it is not flow-controlled.
    let (_send, response) = h2_get(send, gw.addr).await;
    // No key: 401, which is what an attacker gets.
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Held until the end, so the client never cancels the stream itself.
    let mut body = response.into_body();
    if drain {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
        }
    }
    let took = ended_within(ended, sent, reason).await;
    assert!(
        took >= Duration::from_millis(800),
        "{reason}: closed early, {took:?}"
    );
    wait_closed(gw, reason, 1.0).await;
    took
}

/// An HTTP/2 connection that was answered and then stays without a stream, answering PINGs,
/// is closed at `idle_timeout` (1 s here), though its head deadline (30 s) is far away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connection_answering_pings_closes_at_idle_timeout() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(30);
        c.server.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let took = h2_request_then_closed(&gw, h2::client::Builder::new(), true, "idle_timeout").await;
    eprintln!("idle HTTP/2 with PINGs: closed {took:?} after its last stream");
    gw.stop().await;
}

/// An HTTP/1.1 keep-alive connection waiting for its next request is idle: it stays open
/// past `header_read_timeout` (1 s here), which bounds only the wait for a head, and is
/// closed at `idle_timeout` (3 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_keep_alive_connection_closes_at_idle_timeout() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.idle_timeout = Duration::from_secs(3);
    })
    .await;
    let mut stream = TcpStream::connect(gw.addr).await.expect("connect");
    // The idle deadline starts once the answer is written, after `sent`: a close before
    // `sent` + 3 s is early, whenever this task gets to read the answer.
    let sent = Instant::now();
    stream
        .write_all(
            b"GET /files/v3/files/import-from-url/async/tasks/x/status HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.expect("read the answer");
        assert!(n > 0, "closed before answering");
        head.extend_from_slice(&buf[..n]);
    }
    // No key: a 401, answered with the connection kept alive.
    assert!(
        head.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    let answered = Instant::now();
    let took = closed_within(&mut stream, sent, Duration::from_secs(10), "idle").await;
    assert!(
        took >= Duration::from_millis(2500),
        "closed {took:?} after the request, before idle_timeout"
    );
    // The head deadline would have closed it within 1 s of the answer, so before this.
    let open_after_answer = took.saturating_sub(answered - sent);
    assert!(
        open_after_answer > Duration::from_millis(1200),
        "closed {open_after_answer:?} after the answer: at the head deadline"
    );
    wait_closed(&gw, "idle_timeout", 1.0).await;
    gw.stop().await;
}

/// An HTTP/2 stream whose answer cannot leave (the client advertises a window of 0) closes its
/// connection at `send_timeout` (1 s here), though the connection is far from idle or head
/// deadlines; the stall is counted as `send_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_http2_answer_closes_its_connection_at_send_timeout() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(30);
        c.server.idle_timeout = Duration::from_secs(30);
        c.server.send_timeout = Duration::from_secs(1);
    })
    .await;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let took = h2_request_then_closed(&gw, builder, false, "send_timeout").await;
    eprintln!("stalled HTTP/2 answer: connection closed {took:?} after its answer's head");
    gw.stop().await;
}

/// With `max_pending_responses` (5 here) answers stalled behind a window of 0, the next
/// request, from another caller, gets a bodiless 503 with `Retry-After: 1` at once and is
/// counted; once the stalled connection is closed (`send_timeout`), callers are served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_answers_past_the_global_bound_are_shed_with_503() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.max_pending_responses = 5;
        c.server.send_timeout = Duration::from_secs(2);
    })
    .await;
    wait_ready(&gw).await;
    let mut builder = h2::client::Builder::new();
    builder.initial_window_size(0);
    let (mut send, _ping, ended) = h2_client(gw.addr, builder).await;
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let (next, response) = h2_get(send, gw.addr).await;
        send = next;
        stalled.push(response);
    }
    let shed = get(&gw.status_url("complete-abc")).await;
    assert_eq!(shed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(shed.header("retry-after"), "1");
    assert!(shed.body.is_empty());
    assert_eq!(
        metric(&gw, "hubspot_gateway_responses_shed_total").await,
        Some(1.0)
    );
    ended_within(ended, Instant::now(), "stalled connection").await;
    drop(stalled);
    let served = get(&gw.status_url("complete-abc")).await;
    assert_eq!(served.status, StatusCode::OK);
    gw.stop().await;
}

/// Writes a CA and a server certificate for 127.0.0.1 into `dir`; returns the CA to trust.
fn test_pki(dir: &std::path::Path) -> rustls::pki_types::CertificateDer<'static> {
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "connections test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().expect("key");
    let cert = CertificateParams::new(vec!["127.0.0.1".into()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("signed");
    std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
    std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
    ca.der().clone()
}

/// A TLS connection that completes its handshake and then says nothing, and one that never
/// starts the handshake, are closed at `header_read_timeout` (1 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_connections_close_at_the_head_deadline() {
    let dir = std::env::temp_dir().join(format!("hfg-conn-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let ca = test_pki(&dir);
    let (_sim, gw) = gateway_with(|c| {
        c.server.header_read_timeout = Duration::from_secs(1);
        c.server.tls_cert_file = Some(dir.join("server.pem"));
        c.server.tls_key_file = Some(dir.join("server.key"));
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("root");
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));

    let started = Instant::now();
    let mut no_handshake = TcpStream::connect(gw.addr).await.expect("connect");
    let tcp = TcpStream::connect(gw.addr).await.expect("connect");
    let name = ServerName::try_from("127.0.0.1").expect("name");
    let mut after_handshake = connector.connect(name, tcp).await.expect("handshake");
    let handshake_done = started.elapsed();

    let limit = Duration::from_secs(6);
    let took = closed_within(
        &mut after_handshake,
        started,
        limit,
        "silent after handshake",
    )
    .await;
    eprintln!("TLS silent after handshake ({handshake_done:?}): closed after {took:?}");
    assert!(took >= Duration::from_millis(900), "closed early: {took:?}");
    let took = closed_within(&mut no_handshake, started, limit, "no handshake").await;
    eprintln!("TLS listener, zero bytes: closed after {took:?}");
    gw.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// With twice `max_connections` idle sockets open (100 cap, 200 sockets), the ones over the
/// cap are closed at once and counted, `/healthz` answers within 1 s, and a caller already
/// connected still gets its answer within 1 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_and_admin_still_answers() {
    let (_sim, gw) = gateway_with(|c| {
        c.server.max_connections = Some(100);
    })
    .await;
    wait_ready(&gw).await;
    // A caller with a keep-alive connection from before the flood.
    let caller = client();
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str())];
    let first = send_with(
        &caller,
        Method::GET,
        &gw.status_url("complete-abc"),
        &headers,
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);

    let mut sockets = Vec::new();
    for _ in 0..200 {
        sockets.push(TcpStream::connect(gw.addr).await.expect("connect"));
    }
    // Over the cap: closed at once, long before any deadline (10 s).
    let started = Instant::now();
    let mut closed = 0;
    for socket in &mut sockets {
        let mut byte = [0u8; 1];
        if let Ok(Ok(0) | Err(_)) =
            tokio::time::timeout(Duration::from_millis(20), socket.read(&mut byte)).await
        {
            closed += 1;
        }
    }
    eprintln!(
        "{closed} of 200 sockets closed at once ({:?})",
        started.elapsed()
    );
    assert!(closed >= 100, "only {closed} over-cap sockets were closed");

    let t = Instant::now();
    let health = send(Method::GET, &gw.admin_url("/healthz"), &[]).await;
    let health_took = t.elapsed();
    assert_eq!(health.status, StatusCode::OK);
    let t = Instant::now();
    let again = send_with(
        &caller,
        Method::GET,
        &gw.status_url("complete-abc"),
        &headers,
    )
    .await;
    let request_took = t.elapsed();
    assert_eq!(again.status, StatusCode::OK);
    eprintln!("/healthz {health_took:?}, request {request_took:?}");
    assert!(
        health_took < Duration::from_secs(1),
        "/healthz took {health_took:?}"
    );
    assert!(
        request_took < Duration::from_secs(1),
        "request took {request_took:?}"
    );
    let rejected = metric(
        &gw,
        "hubspot_gateway_connections_rejected_total{port=\"service\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(rejected >= 100.0, "rejected counter {rejected}");
    drop(sockets);
    gw.stop().await;
}

/// A 400 KB header gets 431 and so does one just over `max_header_bytes` (16 KiB), on HTTP/1
/// and HTTP/2; a 12 KB header is within the limit and reaches the gateway (401 without a key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_heads_get_431() {
    let (_sim, gw) = gateway_with(|_| {}).await;
    let url = gw.status_url("complete-abc");
    let within = send(Method::GET, &url, &[("x-big", &"a".repeat(12_000))]).await;
    assert_eq!(within.status, StatusCode::UNAUTHORIZED);
    let over = send(Method::GET, &url, &[("x-big", &"a".repeat(17_000))]).await;
    assert_eq!(over.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);

    let mut socket = TcpStream::connect(gw.addr).await.expect("connect");
    let mut head = b"GET /files/v3/files/import-from-url/async/tasks/complete-abc/status HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 400_000));
    head.extend(b"\r\n\r\n");
    let (mut read, mut write) = socket.split();
    // The gateway may answer and close before all of it is written.
    let (_, answer) = tokio::join!(write.write_all(&head), async {
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut answer)).await;
        answer
    });
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 431"),
        "400 KB header answered: {:?}",
        answer.lines().next()
    );
    // HTTP/2: the same limit on the header list.
    let (send, _ping, _ended) = h2_client(gw.addr, h2::client::Builder::new()).await;
    let mut send = send.ready().await.expect("ready");
    let mut request = status_request(gw.addr, "complete-abc");
    request
        .headers_mut()
        .insert("x-big", "a".repeat(17_000).parse().expect("header value"));
    let (response, _) = send.send_request(request, true).expect("send");
    let answer = response.await.expect("an answer, not a reset");
    assert_eq!(answer.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    gw.stop().await;
}

/// Two `Authorization` headers, both valid, get 400 VALIDATION_ERROR and nothing reaches
/// HubSpot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_get_400() {
    let (sim, gw) = start().await;
    let auth = format!("Bearer {KEY}");
    let reply = send(
        Method::GET,
        &gw.status_url("complete-abc"),
        &[("authorization", &auth), ("authorization", &auth)],
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let body = reply.json();
    assert_eq!(body["status"], "error");
    assert_eq!(body["category"], "VALIDATION_ERROR");
    assert!(body["correlationId"].is_string());
    assert_eq!(status_requests(&sim).await, 0);
    assert_eq!(
        metric(
            &gw,
            "hubspot_gateway_inbound_auth_failures_total{reason=\"duplicate\"}"
        )
        .await,
        Some(1.0)
    );
    gw.stop().await;
}

/// Shutdown closes connections that are idle or still sending their head at once: `stop`
/// returns well within `shutdown_grace` (5 s here), and each such socket sees its end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_idle_and_half_sent_connections_at_once() {
    let (_sim, gw) = start().await;
    let mut silent = TcpStream::connect(gw.addr).await.expect("connect");
    let mut half_head = TcpStream::connect(gw.addr).await.expect("connect");
    half_head
        .write_all(b"GET /files/v3/files/import-from-url/async/tasks/x/status HTTP/1.1\r\n")
        .await
        .expect("write");
    let (_send, _ping, ended) = h2_client(gw.addr, h2::client::Builder::new()).await;
    // The gateway holds all three before it is told to stop (a fixed sleep may be too short
    // on a busy machine).
    wait_for(
        || async {
            metric(&gw, r#"hubspot_gateway_connections_open{port="service"}"#).await == Some(3.0)
        },
        "three connections accepted",
    )
    .await;
    let started = Instant::now();
    gw.stop().await;
    let took = started.elapsed();
    eprintln!("shutdown with idle and half-sent connections took {took:?}");
    assert!(took < Duration::from_secs(2), "shutdown waited {took:?}");
    let limit = Duration::from_secs(1);
    closed_within(&mut silent, started, limit, "silent").await;
    closed_within(&mut half_head, started, limit, "half head").await;
    tokio::time::timeout(limit, ended)
        .await
        .expect("HTTP/2 connection closed")
        .ok();
}

/// The gateway binary as a child process on port-0 listeners, and its log.
struct GatewayProcess {
    child: Child,
    service: SocketAddr,
    admin: SocketAddr,
    /// Log lines after the listening lines: those still arriving, and those read so far.
    log: std::sync::Mutex<(std::sync::mpsc::Receiver<String>, Vec<String>)>,
    /// Its HubSpot, and the directory of its config.
    _sim: hubspot_sim::RunningSimulator,
    dir: std::path::PathBuf,
}

impl GatewayProcess {
    /// The admin `/metrics` line of `series` (exact name with labels).
    async fn metric(&self, series: &str) -> Option<f64> {
        metric_at(&self.admin.to_string(), series).await
    }

    /// The log lines written so far.
    fn log(&self) -> Vec<String> {
        let mut log = self.log.lock().expect("log lock");
        let (rx, lines) = &mut *log;
        lines.extend(rx.try_iter());
        lines.clone()
    }

    /// Log lines containing `text`.
    fn log_lines(&self, text: &str) -> usize {
        self.log().iter().filter(|l| l.contains(text)).count()
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts a simulator and `serve --config` in front of it, with `server_lines` added under
/// `[server]`, under an open-file limit of `file_limit` (soft and hard) if given.
async fn spawn_gateway(name: &str, server_lines: &str, file_limit: Option<u32>) -> GatewayProcess {
    let sim = simulator(SimConfig::default()).await;
    let upstream = sim.base_url();
    let dir = temp_dir(&format!("conn-{name}"));
    let path = dir.join("gateway.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_lines}\n\
         [upstream]\nbase_url = \"{upstream}\"\n\
         [token]\nclient_id_env = \"T_CLIENT_ID\"\nclient_secret_env = \"T_CLIENT_SECRET\"\n\
         refresh_token_env = \"T_REFRESH_TOKEN\"\n\
         [[auth.clients]]\nname = \"tests\"\nkey_sha256 = \"{}\"\n",
        hubspot_files_gateway::auth::hash_key(KEY)
    );
    std::fs::write(&path, text).expect("write config");
    let bin = BIN;
    let command = match file_limit {
        None => Command::new(bin),
        Some(n) => {
            // The shell's ulimit sets the hard limit too, so the gateway cannot raise it.
            let mut c = Command::new("sh");
            c.args(["-c", &format!("ulimit -n {n} && exec \"$0\" \"$@\""), bin]);
            c
        }
    };
    let served = spawn_serve(command, &path);
    let addr = |a: &str| a.parse().expect("a socket address in the log");
    GatewayProcess {
        _sim: sim,
        dir,
        log: std::sync::Mutex::new((served.log, Vec::new())),
        service: addr(&served.service),
        admin: addr(&served.admin),
        child: served.child,
    }
}

/// Resident memory of process `pid` in bytes, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS line")
        * 1024
}

/// The zero-window attack (200 HTTP/2 connections advertising a window of 0, each opening
/// 1,000 streams without a key) keeps the gateway binary's resident memory under 150 MB at
/// its peak (507 MB before connections were bounded), and every attacking connection is closed
/// within 25 s: `send_timeout` (5 s here) for those holding stalled answers, `idle_timeout`
/// (5 s here) for those whose streams were all refused with a bodiless 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_window_attack_memory_stays_bounded() {
    const STREAMS: usize = 1000;
    let gw = spawn_gateway("zw", "send_timeout = \"5s\"\nidle_timeout = \"5s\"", None).await;
    let pid = gw.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_bytes(pid);

    let started = Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..200 {
        let addr = gw.service;
        attackers.push(tokio::spawn(async move {
            let mut builder = h2::client::Builder::new();
            builder.initial_window_size(0);
            let Ok(tcp) = TcpStream::connect(addr).await else {
                return;
            };
            let Ok((mut send, conn)) = builder.handshake::<_, Bytes>(tcp).await else {
                return;
            };
            let ended = tokio::spawn(conn);
            let mut held = Vec::new();
            for i in 0..STREAMS {
                let Ok(ready) = send.ready().await else { break };
                send = ready;
                match send.send_request(status_request(addr, &format!("zw-{i}")), true) {
                    Ok((response, _)) => held.push(response),
                    Err(_) => break,
                }
            }
            let sent = held.len();
            let _ = ended.await;
            if std::env::var("ZW_DEBUG").is_ok() {
                eprintln!(
                    "attacker: {sent} streams sent, ended at {:?}",
                    started.elapsed()
                );
            }
            drop(held);
        }));
    }
    // Sampled from a thread of its own: the runtime's workers are as busy as the gateway.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut peak = before;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_bytes(pid));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        }
    });
    while started.elapsed() < Duration::from_secs(40) && !attackers.iter().all(|a| a.is_finished())
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().expect("sampler");
    let all_closed = attackers.iter().all(|a| a.is_finished());
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_bytes(pid);
    let mb = |b: u64| b as f64 / 1e6;
    eprintln!(
        "zero-window attack: RSS before {:.1} MB, peak {:.1} MB, after {:.1} MB; attackers done after {took:?}",
        mb(before),
        mb(peak),
        mb(after)
    );
    let metrics = send(Method::GET, &format!("http://{}/metrics", gw.admin), &[]).await;
    for line in String::from_utf8_lossy(&metrics.body).lines() {
        if line.starts_with("hubspot_gateway_connections_closed_total")
            || line.starts_with("hubspot_gateway_responses_shed_total")
        {
            eprintln!("{line}");
        }
    }
    assert!(
        all_closed,
        "attacking connections still open after {took:?}"
    );
    assert!(peak < 150_000_000, "peak RSS {:.1} MB", mb(peak));
    drop(gw);
}

/// The connection keys parse with their units, default as documented, and out-of-range
/// values are refused with the key's name.
#[test]
fn connection_keys_parse_default_and_refuse_out_of_range_values() {
    let base = format!(
        "[token]\nclient_id_env = \"A\"\nclient_secret_env = \"B\"\nrefresh_token_env = \"C\"\n\
         [[auth.clients]]\nname = \"tests\"\nkey_sha256 = \"{}\"\n",
        hubspot_files_gateway::auth::hash_key(KEY)
    );
    let defaults = Config::parse(&base).expect("defaults valid");
    assert_eq!(defaults.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(defaults.server.send_timeout, Duration::from_secs(10));
    assert_eq!(defaults.server.max_connections, None);
    assert_eq!(defaults.server.http2_max_concurrent_streams, 100);
    assert_eq!(defaults.server.max_header_bytes, 16 << 10);
    let tuned = Config::parse(&format!(
        "[server]\nidle_timeout = \"5s\"\nmax_connections = 500\nmax_header_bytes = \"32KiB\"\n{base}"
    ))
    .expect("tuned valid");
    assert_eq!(tuned.server.idle_timeout, Duration::from_secs(5));
    assert_eq!(tuned.server.max_connections, Some(500));
    assert_eq!(tuned.server.max_header_bytes, 32 << 10);
    for (line, key) in [
        ("idle_timeout = \"0s\"", "server.idle_timeout"),
        ("send_timeout = \"2h\"", "server.send_timeout"),
        ("max_connections = 0", "server.max_connections"),
        (
            "http2_max_concurrent_streams = 5000",
            "server.http2_max_concurrent_streams",
        ),
        ("max_header_bytes = \"100B\"", "server.max_header_bytes"),
    ] {
        let err = Config::parse(&format!("[server]\n{line}\n{base}"))
            .expect_err(line)
            .to_string();
        assert!(err.contains(key), "{line}: {err}");
    }
}

/// Opens `n` connections to `addr` that send nothing.
async fn idle_sockets(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(s) = TcpStream::connect(addr).await {
            sockets.push(s);
        }
    }
    sockets
}

/// Under an open-file limit of 512 and no `max_connections`, the cap derives from the limit
/// (256): 600 silent sockets leave `/healthz` and a caller's request answering within 1 s,
/// the ones over the cap are counted, and `accept` never fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_cap_from_the_file_limit_keeps_the_gateway_answering() {
    // The test process holds the other end of every socket.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let gw = spawn_gateway("cap", "", Some(512)).await;
    let caller = client();
    let auth = format!("Bearer {KEY}");
    let headers = [("authorization", auth.as_str())];
    let url = format!(
        "http://{}/files/v3/files/import-from-url/async/tasks/complete-abc/status",
        gw.service
    );
    wait_for(
        || async { send_with(&caller, Method::GET, &url, &headers).await.status == StatusCode::OK },
        "the gateway answers",
    )
    .await;

    let sockets = idle_sockets(gw.service, 600).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let health = send(Method::GET, &format!("http://{}/healthz", gw.admin), &[]).await;
    let health_took = t.elapsed();
    let t = Instant::now();
    let again = send_with(&caller, Method::GET, &url, &headers).await;
    let request_took = t.elapsed();
    eprintln!(
        "600 silent sockets, file limit 512: /healthz {health_took:?}, request {request_took:?}"
    );
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(again.status, StatusCode::OK);
    assert!(
        health_took < Duration::from_secs(1),
        "/healthz took {health_took:?}"
    );
    assert!(
        request_took < Duration::from_secs(1),
        "request took {request_took:?}"
    );
    let rejected = gw
        .metric("hubspot_gateway_connections_rejected_total{port=\"service\"}")
        .await
        .unwrap_or(0.0);
    eprintln!("rejected over the cap: {rejected}");
    assert!(rejected >= 300.0, "rejected {rejected}");
    assert_eq!(gw.log_lines("accept failing"), 0);
    drop(sockets);
}

/// When `accept` fails (EMFILE: `max_connections` set above an open-file limit of 128), the
/// gateway logs one line per burst, not one per attempt, counts every failure, and serves
/// again once descriptors are free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_failures_back_off_with_one_log_line_per_burst() {
    // The test process holds the other end of every socket.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let gw = spawn_gateway("emfile", "max_connections = 1000", Some(128)).await;
    let sockets = idle_sockets(gw.service, 300).await;
    // The first failure's warning (the log needs no descriptor; the admin port does), then
    // long enough for many more attempts to fail, counted from that first failure rather
    // than from the connects, which a busy machine may not have served yet.
    wait_for(
        || {
            let warned = gw.log_lines("accept failing") >= 1;
            async move { warned }
        },
        "the first accept failure logged",
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bursts = gw.log_lines("accept failing");
    let recovered = gw.log_lines("accept recovered");
    if std::env::var_os("SHOW_LOG").is_some() {
        for l in gw.log().iter() {
            eprintln!("{l}");
        }
    }
    drop(sockets);
    // Freed descriptors: the admin port answers again.
    wait_for(
        || async {
            gw.metric("hubspot_gateway_accept_errors_total{port=\"service\"}")
                .await
                .is_some_and(|n| n >= 5.0)
        },
        "accept failures counted",
    )
    .await;
    let failures = gw
        .metric("hubspot_gateway_accept_errors_total{port=\"service\"}")
        .await
        .unwrap_or(0.0);
    eprintln!("accept failures: {failures}, warning lines: {bursts}, recoveries: {recovered}");
    // One warning opens each burst and one line closes it; never one line per attempt.
    assert!(bursts >= 1, "no warning for {failures} failures");
    assert!(
        bursts <= recovered + 1,
        "{bursts} warnings for {recovered} recoveries"
    );
    assert!(
        failures >= 4.0 * bursts as f64,
        "{bursts} warnings for {failures} failures"
    );
}

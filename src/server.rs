//! Listeners: the service port (plain TCP or TLS), the admin port, accept loops and graceful
//! shutdown. The caller binds the sockets and decides what shutdown means.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Authenticator, PeerCertName};
use crate::cache::AnswerCache;
use crate::config::{Config, Credentials, ServerConfig};
use crate::gateway::Gateway;
use crate::metrics::Metrics;
use crate::token::TokenManager;
use crate::upstream::HubSpot;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("TLS setup failed: {0}")]
    Tls(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The two bound sockets.
pub struct Listeners {
    pub service: TcpListener,
    pub admin: TcpListener,
}

/// Runs the gateway until `shutdown` resolves, then drains for up to `shutdown_grace`.
pub async fn run(
    config: Config,
    credentials: Credentials,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    let tls = match (&config.server.tls_cert_file, &config.server.tls_key_file) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert, key, &config.server)?),
        _ => None,
    };
    let metrics = Metrics::new();
    let hubspot = Arc::new(
        HubSpot::new(&config.upstream, metrics.clone())
            .map_err(|e| RunError::Tls(e.to_string()))?,
    );
    let (tokens, refresher) = TokenManager::new(
        credentials,
        config.token.api,
        config.token.required_scopes.clone(),
        hubspot.clone(),
        metrics.clone(),
    );
    let gateway = Arc::new(Gateway::new(
        Authenticator::new(&config.auth),
        AnswerCache::new(&config.cache),
        tokens,
        hubspot,
        metrics,
        config.upstream.request_timeout,
    ));
    if config.auth.mode == crate::config::AuthMode::None {
        tracing::warn!("auth.mode = \"none\": every caller is accepted without credentials");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let refresh = tokio::spawn(refresher.run(stopped()));
    let admin = tokio::spawn(serve_admin(listeners.admin, gateway.clone(), stopped()));
    let hub = tokio::spawn(follow_token_hub(gateway.clone(), stopped()));

    tracing::info!(addr = %listeners.service.local_addr().map(|a| a.to_string()).unwrap_or_default(), tls = tls.is_some(), "gateway listening");
    let service = {
        let gateway = gateway.clone();
        move |req: Request<Incoming>| gateway.clone().handle(req)
    };
    let grace = config.server.shutdown_grace;
    let header_timeout = config.server.header_read_timeout;
    let gateway_for_shutdown = gateway.clone();
    let shutdown = async move {
        shutdown.await;
        tracing::info!("shutdown requested: readiness off, no new connections, draining");
        gateway_for_shutdown.begin_shutdown();
    };
    accept_loop(
        listeners.service,
        tls,
        service,
        header_timeout,
        grace,
        shutdown,
    )
    .await;
    let _ = stop_tx.send(true);
    let _ = refresh.await;
    let _ = admin.await;
    let _ = hub.await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// Accepts connections until `shutdown`, then waits for open ones up to `grace`.
async fn accept_loop<S, F>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    header_timeout: Duration,
    grace: Duration,
    shutdown: impl Future<Output = ()>,
) where
    S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1024)
        // HTTP/2 has no header-read timeout: pings find peers that went away.
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Usually EMFILE: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(stream), service_fn(service))
                                .into_owned(),
                        )
                        .await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(header_timeout, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    // The verified client certificate names the caller for every request
                    // on this connection.
                    let peer = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|certs| certs.first())
                        .map(|der| PeerCertName::from_der(der))
                        .unwrap_or(PeerCertName(None));
                    let svc = service_fn(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(peer.clone());
                        service(req)
                    });
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(stream), svc)
                                .into_owned(),
                        )
                        .await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!(grace_s = grace.as_secs_f64(), "shutdown grace elapsed; closing remaining connections"),
    }
}

/// Tells the gateway about every new token, so the cache follows the token's HubSpot account
/// the moment it changes, not at the next cache miss.
async fn follow_token_hub(gateway: Arc<Gateway>, shutdown: impl Future<Output = ()>) {
    let mut status = gateway.tokens().subscribe();
    tokio::pin!(shutdown);
    loop {
        let hub = status
            .borrow_and_update()
            .token
            .as_ref()
            .and_then(|t| t.hub_id);
        gateway.token_changed(hub);
        tokio::select! {
            _ = &mut shutdown => return,
            changed = status.changed() => if changed.is_err() { return },
        }
    }
}

/// The admin port: `/metrics`, `/healthz`, `/readyz`. Never the service port.
async fn serve_admin(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()>,
) {
    tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin listening");
    let service = move |req: Request<Incoming>| {
        let gateway = gateway.clone();
        async move { Ok::<_, Infallible>(admin(&gateway, &req)) }
    };
    accept_loop(
        listener,
        None,
        service,
        Duration::from_secs(10),
        Duration::from_secs(1),
        shutdown,
    )
    .await;
}

fn admin(gateway: &Gateway, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            gateway.render_metrics(),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "application/json",
            br#"{"status":"ok"}"#.to_vec(),
        ),
        (&Method::GET, "/readyz") => {
            let readiness = gateway.readiness();
            (readiness.status(), "application/json", readiness.to_json())
        }
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            b"not found: try /metrics, /healthz, /readyz\n".to_vec(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    server: &ServerConfig,
) -> Result<TlsAcceptor, RunError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| RunError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let certs = rustls_pemfile::certs(&mut read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RunError::Tls(format!("{}: {e}", cert.display())))?;
    let key = rustls_pemfile::private_key(&mut read(key)?.as_slice())
        .map_err(|e| RunError::Tls(format!("{}: {e}", key.display())))?
        .ok_or_else(|| RunError::Tls(format!("{}: no private key found", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| RunError::Tls(e.to_string()))?;
    let builder = match &server.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_pemfile::certs(&mut read(ca)?.as_slice()) {
                let c = c.map_err(|e| RunError::Tls(format!("{}: {e}", ca.display())))?;
                roots.add(c).map_err(|e| RunError::Tls(e.to_string()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| RunError::Tls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| RunError::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

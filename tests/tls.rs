//! TLS on the service port, and callers named by their client certificate (mTLS).

mod support;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hubspot_files_gateway::config::{AuthMode, ClientConfig, Config};
use hubspot_sim::SimConfig;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;

/// A test CA, a server certificate for 127.0.0.1, and client certificates by common name.
struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway test CA");
        let ca = params.self_signed(&key).expect("CA");
        std::fs::write(dir.join("ca.pem"), ca.pem()).expect("write");
        let pki = Pki {
            ca_der: ca.der().clone(),
            issuer: Issuer::new(params, key),
        };
        let (cert, key) = pki.issue(vec!["127.0.0.1".into()], "gateway");
        std::fs::write(dir.join("server.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("server.key"), key.serialize_pem()).expect("write");
        pki
    }

    fn issue(&self, sans: Vec<String>, cn: &str) -> (rcgen::Certificate, KeyPair) {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, &self.issuer).expect("signed"), key)
    }

    /// An HTTPS client trusting the test CA, presenting a certificate for `cn` if given.
    fn client(
        &self,
        cn: Option<&str>,
    ) -> Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        Full<Bytes>,
    > {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("root");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
        let tls = match cn {
            None => builder.with_no_client_auth(),
            Some(cn) => {
                let (cert, key) = self.issue(vec![], cn);
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
                builder
                    .with_client_auth_cert(vec![cert.der().clone()], key)
                    .expect("client cert")
            }
        };
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_all_versions()
            .build();
        Client::builder(TokioExecutor::new()).build(https)
    }
}

fn tls_config(dir: &Path, upstream: &str) -> Config {
    let mut c = config(upstream);
    c.server.tls_cert_file = Some(dir.join("server.pem"));
    c.server.tls_key_file = Some(dir.join("server.key"));
    c
}

async fn status_with<C>(
    client: &Client<C, Full<Bytes>>,
    url: &str,
    key: Option<&str>,
) -> Result<(StatusCode, String), String>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = Request::get(url);
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).expect("req"))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = resp.status();
    let x_cache = resp
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    resp.into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    Ok((status, x_cache))
}

/// TLS with API keys: HTTPS callers (HTTP/1.1 or HTTP/2 by ALPN) are served; the key is
/// still required.
#[tokio::test]
async fn tls_listener_serves_api_key_callers() {
    let dir = temp_dir("tls-keys");
    let pki = Pki::new(&dir);
    let sim = simulator(SimConfig::default()).await;
    let gw = gateway(tls_config(&dir, &sim.base_url()), oauth()).await;
    wait_ready(&gw).await;
    let url = format!(
        "https://127.0.0.1:{}/files/v3/files/import-from-url/async/tasks/complete-tls/status",
        gw.addr.port()
    );
    let client = pki.client(None);
    assert_eq!(
        status_with(&client, &url, Some(KEY)).await,
        Ok((StatusCode::OK, "MISS".into()))
    );
    assert_eq!(
        status_with(&client, &url, Some(KEY)).await,
        Ok((StatusCode::OK, "HIT".into()))
    );
    assert_eq!(
        status_with(&client, &url, None).await.map(|r| r.0),
        Ok(StatusCode::UNAUTHORIZED)
    );
    // Plain HTTP on the TLS port gets nothing.
    assert!(client_plain_fails(&gw.status_url("complete-tls")).await);
}

async fn client_plain_fails(url: &str) -> bool {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .expect("req");
    match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        support::client().request(req),
    )
    .await
    {
        Ok(Ok(resp)) => !resp.status().is_success(),
        _ => true,
    }
}

/// mTLS: a certificate from the CA with a configured common name names the caller (its
/// metrics label); an unknown common name is refused with 401; no certificate, no
/// connection.
#[tokio::test]
async fn client_certificates_name_the_caller() {
    let dir = temp_dir("tls-mtls");
    let pki = Pki::new(&dir);
    let sim = simulator(SimConfig::default()).await;
    let mut cfg = tls_config(&dir, &sim.base_url());
    cfg.server.client_ca_file = Some(dir.join("ca.pem"));
    cfg.auth.mode = AuthMode::Mtls;
    cfg.auth.clients = vec![ClientConfig {
        name: "billing".into(),
        key_sha256: None,
        cert_cn: Some("billing-service".into()),
        share: None,
    }];
    let gw = gateway(cfg, oauth()).await;
    wait_ready(&gw).await;
    let url = format!(
        "https://127.0.0.1:{}/files/v3/files/import-from-url/async/tasks/complete-m/status",
        gw.addr.port()
    );
    assert_eq!(
        status_with(&pki.client(Some("billing-service")), &url, None)
            .await
            .map(|r| r.0),
        Ok(StatusCode::OK)
    );
    assert_eq!(
        status_with(&pki.client(Some("stranger")), &url, None)
            .await
            .map(|r| r.0),
        Ok(StatusCode::UNAUTHORIZED)
    );
    assert!(
        status_with(&pki.client(None), &url, None).await.is_err(),
        "no client certificate, no connection"
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_requests_total{cache="miss",client="billing",code="200"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            &gw,
            r#"hubspot_gateway_inbound_auth_failures_total{reason="unknown_certificate"}"#
        )
        .await,
        Some(1.0)
    );
    assert_eq!(status_requests(&sim).await, 1);
}

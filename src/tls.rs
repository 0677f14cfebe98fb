//! TLS on the service port: certificate, key and client CA read from PEM files into a
//! `rustls` server config, and the holder that lets a reload swap them while connections run.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::ServerConfig;

/// Which configured file a TLS problem is about; the key name, never the path (a path is a
/// value and could be anything an operator pasted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFile {
    Cert,
    Key,
    ClientCa,
}

impl TlsFile {
    /// The config key that names this file.
    pub fn key(self) -> &'static str {
        match self {
            TlsFile::Cert => "server.tls_cert_file",
            TlsFile::Key => "server.tls_key_file",
            TlsFile::ClientCa => "server.client_ca_file",
        }
    }
}

impl std::fmt::Display for TlsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.key())
    }
}

/// Why the TLS configuration cannot be built. No variant shows file contents or paths.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{file}: cannot read the file: {source}")]
    Read {
        file: TlsFile,
        #[source]
        source: std::io::Error,
    },
    /// The PEM is malformed; the reason is a fixed description, since the offending line
    /// could be key material.
    #[error("{file}: not valid PEM ({reason})")]
    Pem { file: TlsFile, reason: &'static str },
    #[error("{file}: no {wanted} found in the PEM file")]
    Missing { file: TlsFile, wanted: &'static str },
    #[error("{file}: rejected: {source}")]
    Rejected {
        file: TlsFile,
        #[source]
        source: rustls::Error,
    },
    #[error("server.client_ca_file: cannot build the client verifier: {source}")]
    Verifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The files that make up the service port's TLS, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The TLS files of `[server]`, or `None` when the service port is plain TCP.
    pub fn from_config(server: &ServerConfig) -> Option<TlsFiles> {
        match (&server.tls_cert_file, &server.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: server.client_ca_file.clone(),
            }),
            _ => None,
        }
    }

    /// Every file, with the key that names it.
    pub fn each(&self) -> impl Iterator<Item = (TlsFile, &Path)> {
        [
            (TlsFile::Cert, Some(self.cert.as_path())),
            (TlsFile::Key, Some(self.key.as_path())),
            (TlsFile::ClientCa, self.client_ca.as_deref()),
        ]
        .into_iter()
        .filter_map(|(f, p)| p.map(|p| (f, p)))
    }

    /// Reads every file and builds the acceptor: certificate chain, private key, and, with a
    /// client CA, a verifier that requires client certificates signed by it.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        let certs = certificates(TlsFile::Cert, &self.cert)?;
        let key_pem = read(TlsFile::Key, &self.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
            pem::Error::NoItemsFound => TlsError::Missing {
                file: TlsFile::Key,
                wanted: "private key",
            },
            other => pem_error(TlsFile::Key, &other),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Rejected {
                file: TlsFile::Cert,
                source,
            })?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certificates(TlsFile::ClientCa, ca)? {
                    roots.add(c).map_err(|source| TlsError::Rejected {
                        file: TlsFile::ClientCa,
                        source,
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|source| TlsError::Verifier { source })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config =
            builder
                .with_single_cert(certs, key)
                .map_err(|source| TlsError::Rejected {
                    file: TlsFile::Key,
                    source,
                })?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

fn read(file: TlsFile, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { file, source })
}

/// Every certificate in a PEM file; at least one.
fn certificates(file: TlsFile, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_bytes = read(file, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(file, &e))?;
    if certs.is_empty() {
        return Err(TlsError::Missing {
            file,
            wanted: "certificate",
        });
    }
    Ok(certs)
}

fn pem_error(file: TlsFile, e: &pem::Error) -> TlsError {
    let reason = match e {
        pem::Error::MissingSectionEnd { .. } => "a section has no END line",
        pem::Error::IllegalSectionStart { .. } => "a BEGIN line is malformed",
        pem::Error::Base64Decode(_) => "a section is not valid base64",
        pem::Error::NoItemsFound => "nothing of the expected kind",
        pem::Error::SectionTooLarge => "a section is too large",
        // `pem::Error` is non-exhaustive: a future kind still gets a content-free answer.
        _ => "unreadable",
    };
    TlsError::Pem { file, reason }
}

/// The acceptor the service port uses, swapped whole by a reload. Each connection asks for
/// the current one, so a connection keeps the certificate it was accepted with.
#[derive(Clone)]
pub struct TlsHolder {
    current: Arc<RwLock<TlsAcceptor>>,
}

impl TlsHolder {
    /// Holds `acceptor` until the first `replace`.
    pub fn new(acceptor: TlsAcceptor) -> TlsHolder {
        TlsHolder {
            current: Arc::new(RwLock::new(acceptor)),
        }
    }

    /// The acceptor for a new connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        // A poisoned lock still holds a whole acceptor: a panic cannot leave half of one.
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Puts `acceptor` in service for every connection accepted from now on.
    pub fn replace(&self, acceptor: TlsAcceptor) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = acceptor;
    }
}

impl std::fmt::Debug for TlsHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsHolder").finish_non_exhaustive()
    }
}

//! Who is calling: API keys (stored as sha256) or client certificates, mapped to a client name.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use hyper::header::{AUTHORIZATION, HeaderMap};
use sha2::{Digest, Sha256};

use crate::config::{AuthConfig, AuthMode};

/// Why a caller was refused; the text doubles as the `reason` label of
/// `inbound_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing")]
    Missing,
    #[error("malformed")]
    Malformed,
    #[error("unknown_key")]
    UnknownKey,
    #[error("unknown_certificate")]
    UnknownCertificate,
    /// More than one `Authorization` header: which one names the caller would depend on who
    /// reads the request, so none does.
    #[error("duplicate")]
    Duplicate,
}

impl AuthError {
    /// The bounded metric label.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::UnknownKey => "unknown_key",
            AuthError::UnknownCertificate => "unknown_certificate",
            AuthError::Duplicate => "duplicate",
        }
    }
}

/// The common name of a verified client certificate, put into request extensions by the
/// TLS listener.
#[derive(Debug, Clone)]
pub struct PeerCertName(pub Option<String>);

impl PeerCertName {
    /// The subject common name of a DER certificate (rustls has already verified it).
    pub fn from_der(der: &[u8]) -> PeerCertName {
        let cn = x509_parser::parse_x509_certificate(der)
            .ok()
            .and_then(|(_, cert)| {
                cert.subject()
                    .iter_common_name()
                    .next()
                    .and_then(|cn| cn.as_str().ok())
                    .map(str::to_owned)
            });
        PeerCertName(cn)
    }
}

/// Decides who a request comes from. Clones share one client table, so a reload that calls
/// `replace` on any clone changes who every clone accepts.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: AuthMode,
    table: Arc<RwLock<Arc<ClientTable>>>,
}

/// The callers known at one moment: built whole from a config, then swapped whole.
#[derive(Debug, Default)]
struct ClientTable {
    by_key_hash: HashMap<[u8; 32], Arc<str>, DigestHasher>,
    by_cert_cn: HashMap<String, Arc<str>>,
    /// Each client's `share` of the outbound budget, when it has one.
    shares: HashMap<Arc<str>, f64>,
}

impl ClientTable {
    fn new(config: &AuthConfig) -> ClientTable {
        let mut table = ClientTable::default();
        for c in &config.clients {
            let name: Arc<str> = Arc::from(c.name.as_str());
            if let Some(share) = c.share {
                table.shares.insert(name.clone(), share);
            }
            if let Some(hash) = c.key_sha256.as_deref().and_then(decode_hex32) {
                table.by_key_hash.insert(hash, name.clone());
            }
            if let Some(cn) = &c.cert_cn {
                table.by_cert_cn.insert(cn.clone(), name);
            }
        }
        table
    }
}

/// Hashes a SHA-256 digest by its last 8 bytes: they are already uniform, and a caller
/// cannot choose them (that would take a preimage), so a keyed hash over all 32 bytes, the
/// map's default, adds only time to every request's lookup.
#[derive(Debug, Clone, Copy, Default)]
struct DigestHasher;

impl std::hash::BuildHasher for DigestHasher {
    type Hasher = DigestHash;

    fn build_hasher(&self) -> DigestHash {
        DigestHash(0)
    }
}

/// See [`DigestHasher`].
struct DigestHash(u64);

impl std::hash::Hasher for DigestHash {
    fn write(&mut self, bytes: &[u8]) {
        // A `[u8; 32]` hashes as its length, then its 32 bytes in one write: the last
        // write's last 8 bytes are the digest's own.
        if let Some(tail) = bytes.last_chunk::<8>() {
            self.0 = u64::from_le_bytes(*tail);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The name that stands for every caller when `auth.mode = "none"`.
pub const ANONYMOUS: &str = "anonymous";

impl Authenticator {
    /// Builds the lookup tables from the validated config.
    pub fn new(config: &AuthConfig) -> Self {
        Authenticator {
            mode: config.mode,
            table: Arc::new(RwLock::new(Arc::new(ClientTable::new(config)))),
        }
    }

    /// Puts the clients of `config` in service for every request from now on. The mode
    /// stays what it was at start-up (changing it needs a restart); requests already past
    /// `authenticate` keep the name they got.
    pub fn replace(&self, config: &AuthConfig) {
        let table = Arc::new(ClientTable::new(config));
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = table;
    }

    /// The mode fixed at start-up.
    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    fn table(&self) -> Arc<ClientTable> {
        // The table is swapped whole, so a poisoned lock still holds a consistent one.
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Every name `authenticate` can return.
    pub fn names(&self) -> Vec<Arc<str>> {
        let table = self.table();
        let mut names: Vec<Arc<str>> = match self.mode {
            AuthMode::None => vec![Arc::from(ANONYMOUS)],
            AuthMode::ApiKeys => table.by_key_hash.values().cloned().collect(),
            AuthMode::Mtls => table.by_cert_cn.values().cloned().collect(),
        };
        names.sort();
        names.dedup();
        names
    }

    /// The `share` of the outbound budget `client` may use, if it has one; a reload changes
    /// it with the rest of the client list.
    pub fn share(&self, client: &str) -> Option<f64> {
        self.table().shares.get(client).copied()
    }

    /// The configured name of the caller, or why it is refused.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<&PeerCertName>,
    ) -> Result<Arc<str>, AuthError> {
        // Refused in every mode: a proxy in front may read the other header than we would.
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(AuthError::Duplicate);
        }
        match self.mode {
            AuthMode::None => Ok(Arc::from(ANONYMOUS)),
            AuthMode::Mtls => {
                let cn = peer
                    .and_then(|p| p.0.as_deref())
                    .ok_or(AuthError::Missing)?;
                self.table()
                    .by_cert_cn
                    .get(cn)
                    .cloned()
                    .ok_or(AuthError::UnknownCertificate)
            }
            AuthMode::ApiKeys => {
                let value = first.ok_or(AuthError::Missing)?;
                let key = bearer(value.as_bytes()).ok_or(AuthError::Malformed)?;
                // Looking up by hash keeps the comparison independent of the key's bytes.
                let hash: [u8; 32] = Sha256::digest(key).into();
                // Looked up under the read lock: no reference count to move per request.
                self.table
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .by_key_hash
                    .get(&hash)
                    .cloned()
                    .ok_or(AuthError::UnknownKey)
            }
        }
    }
}

/// The credential of an `Authorization: Bearer <credential>` header.
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let key = rest.trim_ascii();
    (!key.is_empty()).then_some(key)
}

/// Hex sha256 of an API key, as `key_sha256` expects it.
pub fn hash_key(key: &str) -> String {
    Sha256::digest(key.trim().as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientConfig;

    /// The digest map's hash is the digest's own last 8 bytes, as `DigestHasher` says, and
    /// a map of many clients finds each key and no other.
    #[test]
    fn digest_hasher_uses_the_digests_own_bytes() {
        use std::hash::BuildHasher;
        let digest: [u8; 32] = Sha256::digest(b"k-123").into();
        let tail = u64::from_le_bytes(*digest.last_chunk::<8>().expect("32 bytes"));
        assert_eq!(DigestHasher.hash_one(digest), tail);
        let mut map: HashMap<[u8; 32], usize, DigestHasher> = HashMap::default();
        for i in 0..1000 {
            map.insert(Sha256::digest(format!("key-{i}")).into(), i);
        }
        for i in 0..1000 {
            let d: [u8; 32] = Sha256::digest(format!("key-{i}")).into();
            assert_eq!(map.get(&d), Some(&i));
        }
        assert_eq!(map.get(&digest), None);
    }

    /// API keys with one client, `billing` (key `k-123`) with `share`.
    fn clients(share: Option<f64>) -> AuthConfig {
        AuthConfig {
            mode: AuthMode::ApiKeys,
            allow_none_off_loopback: false,
            clients: vec![ClientConfig {
                name: "billing".into(),
                key_sha256: Some(hash_key("k-123")),
                cert_cn: None,
                share,
            }],
        }
    }

    fn auth() -> Authenticator {
        Authenticator::new(&clients(Some(0.25)))
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().expect("header"));
        h
    }

    #[test]
    fn keys_map_to_names() {
        let a = auth();
        assert_eq!(
            a.authenticate(&headers("Bearer k-123"), None).as_deref(),
            Ok("billing")
        );
        assert_eq!(
            a.authenticate(&headers("bearer k-123"), None).as_deref(),
            Ok("billing")
        );
        assert_eq!(
            a.authenticate(&headers("Bearer nope"), None),
            Err(AuthError::UnknownKey)
        );
        assert_eq!(
            a.authenticate(&headers("Basic azoxMjM="), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&headers("Bearer "), None),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new(), None),
            Err(AuthError::Missing)
        );
    }

    /// A client's share is looked up by its name; an unknown name has none; a reload's
    /// client list brings its shares with it.
    #[test]
    fn shares_follow_the_name_and_the_reload() {
        let a = auth();
        assert_eq!(a.share("billing"), Some(0.25));
        assert_eq!(a.share("other"), None);
        a.replace(&clients(None));
        assert_eq!(a.share("billing"), None);
    }

    /// Two `Authorization` headers are refused even when both carry a valid key.
    #[test]
    fn two_authorization_headers_are_refused() {
        let mut h = headers("Bearer k-123");
        h.append(AUTHORIZATION, "Bearer k-123".parse().expect("header"));
        assert_eq!(auth().authenticate(&h, None), Err(AuthError::Duplicate));
    }

    #[test]
    fn hash_key_matches_sha256sum() {
        // printf 'abc' | sha256sum
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}

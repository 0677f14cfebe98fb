//! `upstream.base_url`: HubSpot's address, parsed and checked once when the config loads.

use serde::{Deserialize, Serialize};

/// HubSpot's address: `http` or `https`, a host, an optional port and path prefix; no
/// user, password, query or fragment. Parsed once when the config loads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    scheme: hyper::http::uri::Scheme,
    authority: hyper::http::uri::Authority,
    path: String,
}

/// Why a `base_url` is refused; never repeats the URL (it could carry a password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BaseUrlError {
    #[error("upstream.base_url is not a URL")]
    Syntax,
    #[error("upstream.base_url must start with http:// or https:// and name a host")]
    SchemeOrHost,
    #[error("upstream.base_url must not carry a user or password")]
    Userinfo,
    #[error("upstream.base_url must not have a query or fragment")]
    QueryOrFragment,
}

impl BaseUrl {
    /// `https://api.hubapi.com`.
    pub fn hubspot() -> BaseUrl {
        BaseUrl {
            scheme: hyper::http::uri::Scheme::HTTPS,
            authority: hyper::http::uri::Authority::from_static("api.hubapi.com"),
            path: String::new(),
        }
    }

    /// `http` or `https`.
    pub fn scheme(&self) -> &hyper::http::uri::Scheme {
        &self.scheme
    }

    /// Host and optional port.
    pub fn authority(&self) -> &hyper::http::uri::Authority {
        &self.authority
    }

    /// The path prefix without a trailing `/` (empty for none).
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl std::str::FromStr for BaseUrl {
    type Err = BaseUrlError;

    fn from_str(text: &str) -> Result<BaseUrl, BaseUrlError> {
        // `Uri` drops a fragment silently, so it is looked for first.
        if text.contains('#') {
            return Err(BaseUrlError::QueryOrFragment);
        }
        let uri: hyper::Uri = text.parse().map_err(|_| BaseUrlError::Syntax)?;
        let parts = uri.into_parts();
        let (Some(scheme), Some(authority)) = (parts.scheme, parts.authority) else {
            return Err(BaseUrlError::SchemeOrHost);
        };
        if !matches!(scheme.as_str(), "http" | "https") || authority.host().is_empty() {
            return Err(BaseUrlError::SchemeOrHost);
        }
        if authority.as_str().contains('@') {
            return Err(BaseUrlError::Userinfo);
        }
        let path = match parts.path_and_query {
            Some(pq) if pq.query().is_some() => return Err(BaseUrlError::QueryOrFragment),
            Some(pq) => pq.path().trim_end_matches('/').to_owned(),
            None => String::new(),
        };
        Ok(BaseUrl {
            scheme,
            authority,
            path,
        })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.path)
    }
}

impl Serialize for BaseUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BaseUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BaseUrl, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

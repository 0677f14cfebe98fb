//! The outbound proxy: `upstream.proxy` and its credentials, the route to HubSpot they give
//! (direct, or an HTTP CONNECT tunnel), and the connector that opens that route. TLS to
//! HubSpot runs inside the tunnel, so the proxy sees only the `CONNECT host:port` line.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use base64::Engine;
use hyper::Uri;
use hyper::header::HeaderValue;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::config::{BaseUrl, UpstreamConfig, is_variable_name, read_optional_secret};
use crate::secret::Secret;

/// `upstream.proxy`: how connections to HubSpot leave the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ProxySetting {
    /// Unset: straight to HubSpot.
    #[default]
    Direct,
    /// `"env"`: `HTTPS_PROXY` / `HTTP_PROXY` (by the base URL's scheme) and `NO_PROXY`,
    /// upper or lower case, read once at start.
    Env,
    /// `"http://host[:port]"`: every connection tunnels through this proxy.
    Url(Uri),
}

impl ProxySetting {
    /// Whether the key is unset (so the effective config does not print it).
    pub fn is_direct(&self) -> bool {
        *self == ProxySetting::Direct
    }
}

/// Why an `upstream.proxy` value is refused; never repeats the value (it could carry a
/// password).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    #[error("upstream.proxy must be \"env\" or http://host[:port]")]
    Syntax,
    #[error(
        "upstream.proxy must not carry a user or password: set upstream.proxy_username and proxy_password_file or proxy_password_env"
    )]
    Userinfo,
    #[error("upstream.proxy must be http://host[:port], without a path, query or fragment")]
    Extra,
}

impl std::str::FromStr for ProxySetting {
    type Err = ProxyUrlError;

    fn from_str(text: &str) -> Result<ProxySetting, ProxyUrlError> {
        if text == "env" {
            return Ok(ProxySetting::Env);
        }
        parse_proxy_uri(text).map(ProxySetting::Url)
    }
}

/// An `http://host[:port]` proxy address: the only kind a plain TCP connection reaches and
/// that speaks CONNECT. A user or password in it is refused (it would sit in the config or
/// the environment in clear, and print wherever the URL does).
fn parse_proxy_uri(text: &str) -> Result<Uri, ProxyUrlError> {
    if text.contains('#') {
        return Err(ProxyUrlError::Extra);
    }
    let uri: Uri = text.parse().map_err(|_| ProxyUrlError::Syntax)?;
    let Some(authority) = uri.authority() else {
        return Err(ProxyUrlError::Syntax);
    };
    if authority.as_str().contains('@') {
        return Err(ProxyUrlError::Userinfo);
    }
    if uri.scheme_str() != Some("http") || authority.host().is_empty() {
        return Err(ProxyUrlError::Syntax);
    }
    match uri.path_and_query() {
        Some(pq) if pq.query().is_some() || !matches!(pq.path(), "" | "/") => {
            Err(ProxyUrlError::Extra)
        }
        _ => Ok(uri),
    }
}

impl std::fmt::Display for ProxySetting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProxySetting::Direct => Ok(()),
            ProxySetting::Env => f.write_str("env"),
            ProxySetting::Url(uri) => write!(f, "http://{}", host_port(uri)),
        }
    }
}

impl Serialize for ProxySetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ProxySetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ProxySetting, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// `host:port` of a proxy address (port 80 when the URL names none), for logs and
/// messages: it never holds credentials.
fn host_port(uri: &Uri) -> String {
    let host = uri.host().unwrap_or_default();
    format!("{host}:{}", uri.port_u16().unwrap_or(80))
}

/// Every problem with the `upstream.proxy*` keys, each naming its key and never its value.
pub fn problems(upstream: &UpstreamConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let username = upstream.proxy_username.as_deref();
    let file = upstream.proxy_password_file.is_some();
    let env = upstream.proxy_password_env.as_deref();
    if file && env.is_some() {
        problems.push(
            "upstream.proxy_password: set proxy_password_file or proxy_password_env, not both"
                .into(),
        );
    }
    if let Some(var) = env
        && !is_variable_name(var)
    {
        problems.push(
            "upstream.proxy_password_env must name an environment variable (letters, digits, _)"
                .into(),
        );
    }
    let password = file || env.is_some();
    match (username, password) {
        (Some(_), false) => problems.push(
            "upstream.proxy_username needs upstream.proxy_password_file or proxy_password_env"
                .into(),
        ),
        (None, true) => {
            problems.push("upstream.proxy_password_* needs upstream.proxy_username".into())
        }
        (Some(_), true) | (None, false) => {}
    }
    // Basic authentication joins user and password with ':'.
    if let Some(user) = username
        && (user.is_empty() || user.contains(':') || !user.bytes().all(|b| b.is_ascii_graphic()))
    {
        problems
            .push("upstream.proxy_username must be printable ASCII without spaces or ':'".into());
    }
    if upstream.proxy.is_direct() && (username.is_some() || password) {
        problems.push("upstream.proxy_username / proxy_password_*: set upstream.proxy".into());
    }
    problems
}

/// The proxy password from its file or environment variable, if one is configured. The
/// error names the key, never the path, the variable or the secret.
pub fn password(
    upstream: &UpstreamConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    read_optional_secret(
        "upstream.proxy_password",
        &upstream.proxy_password_file,
        &upstream.proxy_password_env,
        env,
    )
}

/// What `check-config` finds wrong with the route: the proxy password (with `secrets`) and,
/// for `proxy = "env"`, the proxy variables `env` holds.
pub fn check(
    upstream: &UpstreamConfig,
    secrets: bool,
    env: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    let without_secrets;
    let upstream = if secrets {
        upstream
    } else {
        without_secrets = UpstreamConfig {
            proxy_username: None,
            proxy_password_file: None,
            proxy_password_env: None,
            ..upstream.clone()
        };
        &without_secrets
    };
    route(upstream, env).err().map(|e| e.to_string())
}

/// How connections to HubSpot are opened, decided once at start.
#[derive(Clone)]
pub enum Route {
    /// Straight to HubSpot.
    Direct,
    /// Through an HTTP CONNECT tunnel at `proxy`, with `Proxy-Authorization: auth` on the
    /// CONNECT when the proxy needs credentials (never on a request to HubSpot).
    Tunnel {
        /// `http://host:port` of the proxy, without credentials.
        proxy: Uri,
        /// `Basic ...`, marked sensitive.
        auth: Option<HeaderValue>,
    },
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Direct => f.write_str("Direct"),
            Route::Tunnel { proxy, auth } => f
                .debug_struct("Tunnel")
                .field("proxy", &host_port(proxy))
                .field("auth", &auth.as_ref().map(|_| "***"))
                .finish(),
        }
    }
}

impl Route {
    /// `host:port` of the proxy in use, for the start-up log line; `None` when direct.
    pub fn proxy(&self) -> Option<String> {
        match self {
            Route::Direct => None,
            Route::Tunnel { proxy, .. } => Some(host_port(proxy)),
        }
    }
}

/// Why no route to HubSpot can be set up. No variant carries a value: the environment's
/// proxy URL may hold a password.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The password could not be read; the message names the key.
    #[error("{0}")]
    Password(String),
    #[error(
        "upstream.proxy = \"env\": the {0} variable is not a proxy URL the gateway can use (http://host[:port])"
    )]
    Environment(&'static str),
    #[error("upstream.proxy_username cannot go in a header")]
    Header,
}

/// The route `upstream` gives to `base_url`, reading the proxy password and, for
/// `proxy = "env"`, the proxy variables through `env` (a parameter so tests need not
/// touch the process environment).
pub fn route(
    upstream: &UpstreamConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Route, RouteError> {
    let configured = match (&upstream.proxy_username, password(upstream, env)) {
        (Some(user), Ok(Some(password))) => Some(basic_auth(user, &password)?),
        (_, Ok(_)) => None,
        (_, Err(e)) => return Err(RouteError::Password(e)),
    };
    let (proxy, from_env) = match &upstream.proxy {
        ProxySetting::Direct => return Ok(Route::Direct),
        ProxySetting::Url(uri) => (uri.clone(), None),
        ProxySetting::Env => match env_proxy(&upstream.base_url, env)? {
            Some((uri, auth)) => (uri, auth),
            None => return Ok(Route::Direct),
        },
    };
    // Credentials in the config win over a user and password in the proxy variable.
    Ok(Route::Tunnel {
        proxy,
        auth: configured.or(from_env),
    })
}

/// The proxy the environment names for `base_url`, the way curl reads it: `HTTPS_PROXY`
/// for an https base URL, `HTTP_PROXY` for http (upper case first, then lower case), none
/// when `NO_PROXY` covers the host. hyper-util's matcher does the reading and the
/// `NO_PROXY` rules.
fn env_proxy(
    base_url: &BaseUrl,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(Uri, Option<HeaderValue>)>, RouteError> {
    let first = |names: [&'static str; 2]| {
        names
            .into_iter()
            .find_map(|n| env(n).filter(|v| !v.is_empty()).map(|v| (n, v)))
    };
    let https = base_url.scheme() == &hyper::http::uri::Scheme::HTTPS;
    let names = if https {
        ["HTTPS_PROXY", "https_proxy"]
    } else {
        ["HTTP_PROXY", "http_proxy"]
    };
    let Some((name, value)) = first(names) else {
        return Ok(None);
    };
    let no = first(["NO_PROXY", "no_proxy"]).map(|(_, v)| v);
    let target = Uri::builder()
        .scheme(base_url.scheme().clone())
        .authority(base_url.authority().clone())
        .path_and_query("/")
        .build()
        .map_err(|_| RouteError::Environment(name))?;
    let build = |no: Option<&str>| {
        let builder = Matcher::builder();
        let builder = if https {
            builder.https(value.as_str())
        } else {
            builder.http(value.as_str())
        };
        builder.no(no.unwrap_or_default()).build()
    };
    // A value the matcher cannot read matches nothing, even without NO_PROXY: refused
    // rather than silently going direct.
    let Some(intercept) = build(None).intercept(&target) else {
        return Err(RouteError::Environment(name));
    };
    if intercept.uri().scheme_str() != Some("http") {
        return Err(RouteError::Environment(name));
    }
    if build(no.as_deref()).intercept(&target).is_none() {
        return Ok(None);
    }
    Ok(Some((
        intercept.uri().clone(),
        intercept.basic_auth().cloned(),
    )))
}

/// `Basic base64(user:password)`, marked sensitive so it never prints.
fn basic_auth(user: &str, password: &Secret) -> Result<HeaderValue, RouteError> {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{}", password.expose()));
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).map_err(|_| RouteError::Header)?;
    value.set_sensitive(true);
    Ok(value)
}

/// The TCP connector under TLS: straight to the destination, or through the proxy's tunnel.
#[derive(Clone)]
pub enum Egress {
    /// Connects to the destination.
    Direct(HttpConnector),
    /// Connects to the proxy and asks it to `CONNECT` to the destination.
    Tunnel(Tunnel<HttpConnector>),
}

impl Egress {
    /// The connector for `route` over `http` (whose connect timeout then bounds the TCP
    /// connection to the proxy).
    pub fn new(route: &Route, http: HttpConnector) -> Egress {
        match route {
            Route::Direct => Egress::Direct(http),
            Route::Tunnel { proxy, auth } => {
                let tunnel = Tunnel::new(proxy.clone(), http);
                Egress::Tunnel(match auth {
                    Some(auth) => tunnel.with_auth(auth.clone()),
                    None => tunnel,
                })
            }
        }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl tower_service::Service<Uri> for Egress {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Egress::Direct(c) => c.poll_ready(cx).map_err(Into::into),
            Egress::Tunnel(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Egress::Direct(c) => {
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
            Egress::Tunnel(c) => {
                // The tunnel assumes port 443 when the URI names none; an http base URL
                // without a port means 80.
                let dst = with_default_port(dst);
                let connecting = c.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// `dst` with its scheme's default port written out, so `CONNECT` names the right one.
fn with_default_port(dst: Uri) -> Uri {
    if dst.port().is_some() || dst.scheme_str() != Some("http") {
        return dst;
    }
    let Some(host) = dst.host() else { return dst };
    let mut parts = dst.clone().into_parts();
    match format!("{host}:80").parse() {
        Ok(authority) => {
            parts.authority = Some(authority);
            Uri::from_parts(parts).unwrap_or(dst)
        }
        Err(_) => dst,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn upstream(extra: &str) -> UpstreamConfig {
        toml::from_str(extra).expect("upstream table")
    }

    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |k| map.get(k).cloned()
    }

    /// `upstream.proxy` takes "env" or http://host[:port]; userinfo, other schemes, paths
    /// and queries are refused without the value appearing in the message.
    #[test]
    fn proxy_setting_parses_and_refuses_without_echo() {
        assert_eq!("env".parse::<ProxySetting>(), Ok(ProxySetting::Env));
        let url = "http://proxy.internal:3128".parse::<ProxySetting>();
        assert_eq!(
            url.as_ref().map(ToString::to_string).ok().as_deref(),
            Some("http://proxy.internal:3128")
        );
        for (bad, why) in [
            ("http://user:hunter2@proxy:3128", ProxyUrlError::Userinfo),
            ("https://proxy:3128", ProxyUrlError::Syntax),
            ("socks5://proxy:1080", ProxyUrlError::Syntax),
            ("proxy:3128", ProxyUrlError::Syntax),
            ("http://proxy:3128/path", ProxyUrlError::Extra),
            ("http://proxy:3128/?q=1", ProxyUrlError::Extra),
            ("http://proxy:3128#f", ProxyUrlError::Extra),
        ] {
            let err = bad.parse::<ProxySetting>().expect_err(bad);
            assert_eq!(err, why, "{bad}");
            assert!(!err.to_string().contains("hunter2"));
        }
    }

    /// Username and password go together, come from exactly one source, and need a proxy.
    #[test]
    fn credential_keys_are_checked_together() {
        let ok = upstream(
            "proxy = \"http://p:3128\"\nproxy_username = \"gw\"\nproxy_password_env = \"PP\"",
        );
        assert!(problems(&ok).is_empty(), "{:?}", problems(&ok));
        for (text, key) in [
            (
                "proxy = \"env\"\nproxy_username = \"gw\"",
                "proxy_username needs",
            ),
            (
                "proxy = \"env\"\nproxy_password_env = \"PP\"",
                "needs upstream.proxy_username",
            ),
            (
                "proxy = \"env\"\nproxy_username = \"gw\"\nproxy_password_env = \"PP\"\nproxy_password_file = \"/f\"",
                "not both",
            ),
            (
                "proxy = \"env\"\nproxy_username = \"gw\"\nproxy_password_env = \"s3cr3t-value!\"",
                "must name an environment variable",
            ),
            (
                "proxy_username = \"gw\"\nproxy_password_env = \"PP\"",
                "set upstream.proxy",
            ),
            (
                "proxy = \"env\"\nproxy_username = \"a:b\"\nproxy_password_env = \"PP\"",
                "without spaces or ':'",
            ),
        ] {
            let found = problems(&upstream(text)).join("; ");
            assert!(found.contains(key), "{text}: {found}");
            assert!(!found.contains("s3cr3t"), "{found}");
        }
    }

    /// A configured proxy with credentials is a tunnel whose auth is `Basic` of user:password,
    /// sensitive, and never printed by `Debug`.
    #[test]
    fn url_route_carries_basic_auth_that_never_prints() {
        let u = upstream(
            "proxy = \"http://127.0.0.1:3128\"\nproxy_username = \"gw\"\nproxy_password_env = \"PP\"",
        );
        let route = route(&u, &env_of(&[("PP", "open sesame")])).expect("route");
        let Route::Tunnel { proxy, auth } = &route else {
            panic!("expected a tunnel, got {route:?}");
        };
        assert_eq!(proxy.to_string(), "http://127.0.0.1:3128/");
        let auth = auth.as_ref().expect("auth");
        assert!(auth.is_sensitive());
        let expected = base64::engine::general_purpose::STANDARD.encode("gw:open sesame");
        assert_eq!(
            auth.to_str().ok(),
            Some(format!("Basic {expected}").as_str())
        );
        let shown = format!("{route:?}");
        assert!(
            !shown.contains(&expected) && !shown.contains("sesame"),
            "{shown}"
        );
        let missing = super::route(&u, &env_of(&[])).expect_err("unset variable");
        assert!(missing.to_string().contains("upstream.proxy_password_env"));
    }

    /// `proxy = "env"` picks the variable by the base URL's scheme, upper case first, goes
    /// direct when NO_PROXY covers the host or nothing is set, takes a user and password
    /// from the variable, and refuses a proxy URL it cannot use without echoing it.
    #[test]
    fn env_route_follows_the_variables() {
        let https = upstream("proxy = \"env\"");
        let http = upstream("proxy = \"env\"\nbase_url = \"http://127.0.0.1:8081\"");
        let proxy_of = |u: &UpstreamConfig, vars: &[(&str, &str)]| {
            route(u, &env_of(vars)).expect("route").proxy()
        };
        let both = [
            ("HTTPS_PROXY", "http://secure:3128"),
            ("https_proxy", "http://lower:3128"),
            ("HTTP_PROXY", "http://plain:8080"),
        ];
        assert_eq!(proxy_of(&https, &both).as_deref(), Some("secure:3128"));
        assert_eq!(proxy_of(&http, &both).as_deref(), Some("plain:8080"));
        assert_eq!(
            proxy_of(&https, &[("https_proxy", "lower:3128")]).as_deref(),
            Some("lower:3128")
        );
        assert_eq!(proxy_of(&https, &[]), None);
        assert_eq!(
            proxy_of(
                &https,
                &[("HTTPS_PROXY", "http://p:1"), ("NO_PROXY", ".hubapi.com")]
            ),
            None
        );
        assert_eq!(
            proxy_of(
                &http,
                &[("HTTP_PROXY", "http://p:1"), ("no_proxy", "127.0.0.0/8")]
            ),
            None
        );
        let Route::Tunnel { auth, .. } =
            route(&https, &env_of(&[("HTTPS_PROXY", "http://gw:pa55@p:3128")])).expect("route")
        else {
            panic!("expected a tunnel");
        };
        assert!(auth.is_some_and(|a| a.is_sensitive()));
        for bad in ["socks5://gw:pa55@p:1080", "https://gw:pa55@p:3128", "::"] {
            let err = route(&https, &env_of(&[("HTTPS_PROXY", bad)])).expect_err(bad);
            let text = err.to_string();
            assert!(
                text.contains("HTTPS_PROXY") && !text.contains("pa55"),
                "{text}"
            );
        }
    }

    /// An http destination without a port is tunnelled to port 80, not the tunnel's 443.
    #[test]
    fn default_port_is_written_out_for_http() {
        let uri = |s: &str| s.parse::<Uri>().expect("uri");
        assert_eq!(
            with_default_port(uri("http://hub.internal/x")).to_string(),
            "http://hub.internal:80/x"
        );
        assert_eq!(
            with_default_port(uri("https://api.hubapi.com/")).to_string(),
            "https://api.hubapi.com/"
        );
        assert_eq!(
            with_default_port(uri("http://h:81/")).to_string(),
            "http://h:81/"
        );
    }
}

//! OAuth mode: the refresh-token grant, verification by introspection (v3, 2026-03, 2026-09)
//! or the v1 access-token info, and the refresh schedule that follows a token's lifetime.

use std::time::{Duration, Instant};

use rand::Rng;
use serde::Deserialize;

use super::refresher::{Context, Fetched, Skip, Source, Verified};
use super::{MAX_BACKOFF, MIN_BACKOFF, TokenError, jitter, json, missing};
use crate::config::OauthApi;
use crate::secret::Secret;

/// The longest lifetime believed from a token response.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The OAuth app's credentials and the state of its refresh schedule.
pub(super) struct OAuth {
    client_id: Secret,
    client_secret: Secret,
    /// Replaced whenever HubSpot returns a different one (rotation).
    refresh_token: Secret,
    api: OauthApi,
    /// Lifetime of the latest token; bounds the backoff, so a short-lived token recovers
    /// within a short step.
    lifetime: Option<Duration>,
    backoff: Duration,
    /// Whether a rotation was already logged at warn: it says the same every time.
    rotation_warned: bool,
}

impl OAuth {
    pub(super) fn new(
        client_id: Secret,
        client_secret: Secret,
        refresh_token: Secret,
        api: OauthApi,
    ) -> OAuth {
        OAuth {
            client_id,
            client_secret,
            refresh_token,
            api,
            lifetime: None,
            backoff: MIN_BACKOFF,
            rotation_warned: false,
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    refresh_token: Option<String>,
    expires_in: u64,
    hub_id: Option<u64>,
    scopes: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Introspection {
    active: Option<bool>,
    #[serde(default)]
    scopes: Vec<String>,
    hub_id: Option<u64>,
}

impl Source for OAuth {
    async fn verify(&self, cx: &Context, access: &Secret) -> Result<Verified, TokenError> {
        let info = match introspect_path(self.api) {
            Some(introspect) => {
                let answer = cx
                    .hubspot
                    .post_form(
                        introspect,
                        &[
                            ("client_id", self.client_id.expose()),
                            ("client_secret", self.client_secret.expose()),
                            ("token", access.expose()),
                            ("token_type_hint", "access_token"),
                        ],
                    )
                    .await?;
                let info: Introspection = json(&answer)?;
                if info.active != Some(true) {
                    return Err(TokenError::Inactive);
                }
                Verified {
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                }
            }
            None => {
                let path = format!("/oauth/v1/access-tokens/{}", path_segment(access.expose()));
                let answer = cx.hubspot.get(&path).await?;
                // v1 has no `active`: a 200 with the token's details means it is live.
                let info: Introspection = json(&answer)?;
                Verified {
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                }
            }
        };
        missing(&cx.required_scopes, &info.scopes)?;
        Ok(info)
    }

    async fn obtain(&mut self, cx: &Context, _forced: bool) -> Result<Fetched, Skip> {
        let started = Instant::now();
        let answer = cx
            .hubspot
            .post_form(
                token_path(self.api),
                &[
                    ("grant_type", "refresh_token"),
                    ("client_id", self.client_id.expose()),
                    ("client_secret", self.client_secret.expose()),
                    ("refresh_token", self.refresh_token.expose()),
                ],
            )
            .await
            .map_err(TokenError::from)?;
        let grant: TokenResponse = json(&answer)?;
        if let Some(new) = grant
            .refresh_token
            .filter(|r| !r.is_empty() && r != self.refresh_token.expose())
        {
            cx.metrics.token_refresh_token_rotated_total.inc();
            // This process follows the new token, but only this process holds it: replicas
            // that each refresh with their own copy would retire one another's. Said once at
            // warn, the counter tells every further rotation.
            if self.rotation_warned {
                tracing::info!("HubSpot returned a new refresh token; using it from now on");
            } else {
                self.rotation_warned = true;
                tracing::warn!(
                    "HubSpot returned a new refresh token (rotation); using it from now on. It lives only in this process: with several replicas, each refreshing with its own copy, they must share one refresher (see README, cluster mode)"
                );
            }
            self.refresh_token = Secret::new(new);
        }
        if let Some(scopes) = &grant.scopes {
            missing(&cx.required_scopes, scopes)?;
        }
        let access = Secret::new(grant.access_token);
        let info = self.verify(cx, &access).await?;
        // HubSpot's tokens live 30 minutes; an absurd `expires_in` is capped rather than
        // trusted into an overflow.
        let lifetime = Duration::from_secs(grant.expires_in.min(MAX_LIFETIME.as_secs()));
        self.lifetime = Some(lifetime);
        self.backoff = MIN_BACKOFF;
        Ok(Fetched {
            access,
            lifetime: Some(lifetime),
            hub_id: info.hub_id.or(grant.hub_id),
            scopes: info.scopes,
            started,
            next_in: refresh_delay(lifetime),
        })
    }

    /// A 401 is answered by a new grant; what HubSpot thinks of the old token no longer matters.
    fn recheck_when_refused(&self) -> bool {
        false
    }

    /// Backs off: the wait doubles, up to a quarter of the token's lifetime (so a short-lived
    /// token recovers within a short step) and never beyond `MAX_BACKOFF`.
    fn failed(&mut self, _cx: &Context, _serving: bool) -> Duration {
        let wait = jitter(self.backoff);
        let cap = self
            .lifetime
            .map_or(MAX_BACKOFF, |l| (l / 4).clamp(MIN_BACKOFF, MAX_BACKOFF));
        self.backoff = (self.backoff * 2).min(cap);
        wait
    }
}

/// The refresh-token grant's endpoint. Its form body (`grant_type`, `client_id`,
/// `client_secret`, `refresh_token`) is the same on every version.
fn token_path(api: OauthApi) -> &'static str {
    match api {
        OauthApi::V2026_03 => "/oauth/2026-03/token",
        OauthApi::V2026_09 => "/oauth/2026-09/token",
        OauthApi::V3 => "/oauth/v3/token",
        OauthApi::V1 => "/oauth/v1/token",
    }
}

/// The introspection endpoint (form: `client_id`, `client_secret`, `token`,
/// `token_type_hint`), or `None` for v1, which has only the access-token info route.
fn introspect_path(api: OauthApi) -> Option<&'static str> {
    match api {
        OauthApi::V2026_03 => Some("/oauth/2026-03/token/introspect"),
        OauthApi::V2026_09 => Some("/oauth/2026-09/token/introspect"),
        OauthApi::V3 => Some("/oauth/v3/token/introspect"),
        OauthApi::V1 => None,
    }
}

/// Everything but RFC 3986's unreserved characters, so a token is one path segment.
const PATH_SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn path_segment(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, PATH_SEGMENT).to_string()
}

/// When to refresh a token of this lifetime: at `lifetime - margin`, margin =
/// min(max(60 s, lifetime / 10), lifetime / 2), a little earlier by jitter so replicas
/// started together do not refresh together.
pub fn refresh_delay(lifetime: Duration) -> Duration {
    let margin = Duration::from_secs(60).max(lifetime / 10).min(lifetime / 2);
    let early = rand::rng().random_range(0.0..0.1) * margin.as_secs_f64();
    // Never back to back, even for a token that claims to expire at once.
    (lifetime - margin)
        .saturating_sub(Duration::from_secs_f64(early))
        .max(MIN_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The form fields the gateway sends to the grant and to introspection.
    const GRANT_FIELDS: [&str; 4] = ["grant_type", "client_id", "client_secret", "refresh_token"];
    const INTROSPECT_FIELDS: [&str; 4] = ["client_id", "client_secret", "token", "token_type_hint"];

    /// HubSpot's OAuth spec of one version, as vendored beside the simulator.
    fn spec(version: &str) -> serde_json::Value {
        let path = format!(
            "{}/crates/hubspot-sim/spec/oauth-{version}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).expect("the spec is JSON")
    }

    /// Every field the gateway posts to `path` is a documented property of its form body.
    fn assert_documented_form(spec: &serde_json::Value, path: &str, fields: &[&str]) {
        let form = &spec["paths"][path]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
            ["schema"]["properties"];
        assert!(form.is_object(), "{path} is not a documented form POST");
        for field in fields {
            assert!(
                form.get(field).is_some(),
                "{path} does not document {field}"
            );
        }
    }

    /// Each `token.api` posts to the paths its vendored HubSpot spec publishes, with form
    /// fields that spec documents, and the refresh grant is a `grant_type` it allows.
    #[test]
    fn oauth_paths_and_forms_are_the_published_ones() {
        for (api, version) in [
            (OauthApi::V2026_03, "2026-03"),
            (OauthApi::V2026_09, "2026-09"),
            (OauthApi::V3, "v3"),
            (OauthApi::V1, "v1"),
        ] {
            let spec = spec(version);
            let token = token_path(api);
            assert_eq!(token, format!("/oauth/{version}/token"));
            assert_documented_form(&spec, token, &GRANT_FIELDS);
            let grants = &spec["paths"][token]["post"]["requestBody"]["content"]["application/x-www-form-urlencoded"]
                ["schema"]["properties"]["grant_type"]["enum"];
            let grants = grants.as_array().expect("grant_type is an enum");
            assert!(grants.iter().any(|g| g == "refresh_token"), "{version}");
            match introspect_path(api) {
                Some(introspect) => {
                    assert_eq!(introspect, format!("/oauth/{version}/token/introspect"));
                    assert_documented_form(&spec, introspect, &INTROSPECT_FIELDS);
                }
                None => assert!(
                    spec["paths"]["/oauth/v1/access-tokens/{token}"]["get"].is_object(),
                    "v1 verifies with the access-token info route"
                ),
            }
        }
        assert_eq!(OauthApi::default(), OauthApi::V2026_03);
    }

    /// The refresh comes a margin before expiry: a tenth of the lifetime, at least 60 s, at
    /// most half the lifetime, and up to a tenth of the margin earlier by jitter.
    #[test]
    fn refresh_margin_is_a_tenth_of_the_lifetime_within_bounds() {
        let d = refresh_delay(Duration::from_secs(1800));
        assert!(
            d <= Duration::from_secs(1620) && d >= Duration::from_secs(1602),
            "{d:?}"
        );
        let d = refresh_delay(Duration::from_secs(4));
        assert!(
            d <= Duration::from_secs(2) && d >= Duration::from_millis(1800),
            "{d:?}"
        );
        let d = refresh_delay(Duration::from_secs(300));
        assert!(d <= Duration::from_secs(240), "{d:?}");
    }
}

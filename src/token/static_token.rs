//! Static mode: a private-app token, from the config or a mounted file polled every second,
//! verified through the private-app token info endpoint and again every ten minutes; a
//! replacement that fails verification is retried with its own backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::refresher::{Context, Fetched, Skip, Source, Verified};
use super::{MAX_BACKOFF, MIN_BACKOFF, TokenError, jitter, json, missing};
use crate::secret::Secret;

/// A token that never expires is verified again this often.
const REVERIFY: Duration = Duration::from_secs(600);
/// How often the token file is checked for a new token.
const POLL: Duration = Duration::from_secs(1);

/// The private-app token's origin and what is known about its current value.
pub(super) struct StaticToken {
    /// The value read at startup; the only one when there is no file.
    initial: Secret,
    file: Option<PathBuf>,
    /// When the token in service was last verified.
    verified_at: Option<Instant>,
    /// A replacement that failed verification, and when it may be tried again.
    rejected: Option<(Secret, Instant)>,
    backoff: Duration,
}

impl StaticToken {
    pub(super) fn new(initial: Secret, file: Option<PathBuf>) -> StaticToken {
        StaticToken {
            initial,
            file,
            verified_at: None,
            rejected: None,
            backoff: MIN_BACKOFF,
        }
    }

    /// What the file holds now (or the configured value when there is no file).
    async fn read(&self) -> Result<Secret, TokenError> {
        match &self.file {
            Some(path) => {
                let text = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| TokenError::File(Arc::new(e)))?;
                Ok(Secret::new(text.trim()))
            }
            None => Ok(self.initial.clone()),
        }
    }

    /// The next wait of this source's backoff, which then doubles.
    fn back_off(&mut self) -> Duration {
        let wait = jitter(self.backoff);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        wait
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PrivateAppInfo {
    #[serde(default)]
    scopes: Vec<String>,
    hub_id: Option<u64>,
}

impl Source for StaticToken {
    async fn verify(&self, cx: &Context, access: &Secret) -> Result<Verified, TokenError> {
        let body = serde_json::to_vec(&serde_json::json!({ "tokenKey": access.expose() }))
            .expect("a JSON object of one string serializes");
        let answer = cx
            .hubspot
            .post_json("/oauth/v2/private-apps/get/access-token-info", body)
            .await?;
        let info: PrivateAppInfo = json(&answer)?;
        missing(&cx.required_scopes, &info.scopes)?;
        Ok(Verified {
            hub_id: info.hub_id,
            scopes: info.scopes,
        })
    }

    async fn obtain(&mut self, cx: &Context, forced: bool) -> Result<Fetched, Skip> {
        let started = Instant::now();
        let value = self.read().await?;
        if value.expose().is_empty() {
            return Err(Skip::Failed(TokenError::EmptyFile));
        }
        let in_service = cx
            .serving()
            .filter(|t| t.access == value)
            .map(|t| t.generation);
        let reverify_due = self.verified_at.is_none_or(|t| t.elapsed() >= REVERIFY);
        if in_service.is_some() && !reverify_due {
            return Err(Skip::Unchanged { next_in: POLL });
        }
        if let Some((rejected, retry_at)) = &self.rejected
            && *rejected == value
            && Instant::now() < *retry_at
            && !forced
        {
            return Err(Skip::Unchanged { next_in: POLL });
        }
        match self.verify(cx, &value).await {
            Ok(info) => {
                self.rejected = None;
                self.backoff = MIN_BACKOFF;
                self.verified_at = Some(Instant::now());
                Ok(Fetched {
                    access: value,
                    lifetime: None,
                    hub_id: info.hub_id,
                    scopes: info.scopes,
                    started,
                    next_in: POLL,
                })
            }
            Err(e) => {
                match in_service {
                    // The token in service itself failed its periodic check.
                    Some(generation) if e.is_verdict() => cx.withdraw(generation, e.clone()),
                    Some(_) => {
                        // HubSpot could not be asked (timeout, 5xx): the token stays, and the
                        // check is due again after a backoff, not at every one-second poll.
                        let wait = self.back_off().min(REVERIFY);
                        self.verified_at = Instant::now()
                            .checked_sub(REVERIFY - wait)
                            .or(self.verified_at);
                    }
                    None => {
                        // Remember the rejected value so it is not asked about every second.
                        let retry_at = Instant::now() + self.back_off();
                        self.rejected = Some((value, retry_at));
                    }
                }
                Err(Skip::Failed(e))
            }
        }
    }

    fn reverified(&mut self) {
        self.verified_at = Some(Instant::now());
    }

    /// The file's value cannot be replaced from here: a 401 first finds out whether the
    /// token in service is dead (and withdraws it), then the file is read again.
    fn recheck_when_refused(&self) -> bool {
        true
    }

    /// The file is polled every second whatever happens, so a fixed file is picked up at
    /// once; the backoff applies to asking about a rejected value. A failure while a
    /// verified token still serves is a failed rotation.
    fn failed(&mut self, cx: &Context, serving: bool) -> Duration {
        if serving {
            cx.metrics.token_rotation_failed.set(1);
        }
        POLL
    }
}

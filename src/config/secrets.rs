//! Where secrets come from (a file or an environment variable, never inline), reading them,
//! and checking every file the config names.

use std::path::{Path, PathBuf};

use super::{Config, ConfigError, Credentials, Problems, TokenMode};
use crate::secret::Secret;

impl Config {
    /// Each secret with the file and environment variable it may come from.
    pub(super) fn secret_sources(&self) -> [(&'static str, &Option<PathBuf>, &Option<String>); 4] {
        let t = &self.token;
        [
            ("client_id", &t.client_id_file, &t.client_id_env),
            ("client_secret", &t.client_secret_file, &t.client_secret_env),
            ("refresh_token", &t.refresh_token_file, &t.refresh_token_env),
            ("static_token", &t.static_token_file, &t.static_token_env),
        ]
    }

    /// Every secret file the config names, with its secret's name.
    pub fn secret_files(&self) -> Vec<(&'static str, &Path)> {
        self.secret_sources()
            .into_iter()
            .filter_map(|(name, file, _)| file.as_deref().map(|f| (name, f)))
            .collect()
    }

    /// Checks every file the config names: the TLS certificate, key and CA are read and
    /// built into a TLS config, and, with `secrets`, every secret is read. Reports every
    /// problem at once.
    pub fn check_files(
        &self,
        secrets: bool,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if secrets && let Err(ConfigError::Invalid(p)) = self.credentials(env) {
            problems.extend(p.0);
        }
        problems.extend(crate::proxy::check(&self.upstream, secrets, env));
        if let Some(cluster) = &self.cluster {
            problems.extend(cluster.file_problems(secrets, env));
        }
        if let Some(files) = crate::tls::TlsFiles::from_config(&self.server) {
            // Read problems are reported per file; only if all read does building mean more.
            let mut readable = true;
            for (file, path) in files.each() {
                if let Err(e) = std::fs::read(path) {
                    problems.push(crate::tls::TlsError::Read { file, source: e }.to_string());
                    readable = false;
                }
            }
            if readable && let Err(e) = files.acceptor() {
                problems.push(e.to_string());
            }
        }
        Problems::result(problems)
    }

    /// Reads the HubSpot credentials; `env` looks up environment variables (a parameter so
    /// tests need not touch the process environment). Every missing secret is reported.
    pub fn credentials(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Credentials, ConfigError> {
        let t = &self.token;
        let mut problems = Vec::new();
        let mut read = |name: &'static str, file: &Option<PathBuf>, var: &Option<String>| {
            read_secret(name, file, var, env)
                .map_err(|e| problems.push(e))
                .ok()
        };
        let credentials = match t.mode {
            TokenMode::Oauth => {
                let client_id = read("client_id", &t.client_id_file, &t.client_id_env);
                let client_secret =
                    read("client_secret", &t.client_secret_file, &t.client_secret_env);
                let refresh_token =
                    read("refresh_token", &t.refresh_token_file, &t.refresh_token_env);
                match (client_id, client_secret, refresh_token) {
                    (Some(client_id), Some(client_secret), Some(refresh_token)) => {
                        Some(Credentials::Oauth {
                            client_id,
                            client_secret,
                            refresh_token,
                        })
                    }
                    _ => None,
                }
            }
            TokenMode::Static => read("static_token", &t.static_token_file, &t.static_token_env)
                .map(|token| Credentials::Static {
                    token,
                    file: t.static_token_file.clone(),
                }),
        };
        match credentials {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(ConfigError::Invalid(Problems(problems))),
        }
    }
}

/// Reads one secret from its file or environment variable, trimming surrounding whitespace
/// (mounted secrets often end in a newline). The problem names the config key, never the
/// path or the variable: those are values, and could be a pasted secret.
pub fn read_secret(
    name: &'static str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    read_keyed_secret(&format!("token.{name}"), file, var, env)
}

/// [`read_keyed_secret`] for a secret that may be left unset: `None` when neither
/// `{key}_file` nor `{key}_env` is configured.
pub fn read_optional_secret(
    key: &str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<Secret>, String> {
    if file.is_none() && var.is_none() {
        return Ok(None);
    }
    read_keyed_secret(key, file, var, env).map(Some)
}

/// Whether `var` can name an environment variable (letters, digits, `_`, not starting
/// with a digit). A `_env` value that is not one may be the secret itself, pasted there.
pub fn is_variable_name(var: &str) -> bool {
    let mut bytes = var.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// [`read_secret`] for the secret whose keys are `{key}_file` / `{key}_env`, `key` written
/// out with its section (`upstream.proxy_password`).
pub fn read_keyed_secret(
    key: &str,
    file: &Option<PathBuf>,
    var: &Option<String>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Secret, String> {
    let raw = match (file, var) {
        (Some(path), _) => std::fs::read_to_string(path)
            .map_err(|e| format!("{key}_file: cannot read the file: {e}"))?,
        (None, Some(var)) => env(var)
            .ok_or_else(|| format!("{key}_env names an environment variable that is not set"))?,
        (None, None) => return Err(format!("{key}: no _file or _env configured")),
    };
    let value = raw.trim();
    if value.is_empty() {
        let source = if file.is_some() { "file" } else { "env" };
        return Err(format!("{key}_{source}: the secret is empty"));
    }
    Ok(Secret::new(value))
}

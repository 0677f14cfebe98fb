//! Live reload: on SIGHUP or when the config file, a TLS file or a secret file changes
//! (Kubernetes swaps a `..data` symlink), the config is read and checked again; the clients
//! and the TLS certificate go into service without dropping a connection, and a config that
//! fails is refused with one log line while the running one keeps serving.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::auth::Authenticator;
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::tls::{TlsError, TlsFiles, TlsHolder};

/// The `result` label values of `config_reloads_total`.
pub const RESULTS: [&str; 2] = ["applied", "refused"];

/// Where a reload comes from, as the binary wires it: the config file, and a channel that
/// receives one message per SIGHUP.
#[derive(Debug)]
pub struct ReloadSource {
    pub path: PathBuf,
    pub requests: mpsc::Receiver<()>,
}

/// Why a reload was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("server.tls_cert_file: TLS cannot be turned on or off live; restart to change it")]
    TlsToggled,
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Clients in service after the reload.
    pub clients: usize,
    /// Whether the TLS certificate, key and CA were read again.
    pub tls: bool,
    /// Keys that changed but only take effect after a restart, e.g. `server.listen`.
    pub needs_restart: Vec<String>,
}

/// The running config and the live parts a reload swaps.
pub struct Reloader {
    path: PathBuf,
    /// The settings that cannot change live, as they were at start-up.
    fixed: toml::Table,
    auth: Authenticator,
    tls: Option<TlsHolder>,
    metrics: Metrics,
    env: fn(&str) -> Option<String>,
    watch_interval: Duration,
    /// Digest of every watched file as last seen, so a change is noticed once.
    seen: [u8; 32],
    /// The files whose change triggers a reload.
    watched: Vec<PathBuf>,
}

impl Reloader {
    /// A reloader for the gateway started from `config`, read from `path`.
    pub fn new(
        path: PathBuf,
        config: &Config,
        auth: Authenticator,
        tls: Option<TlsHolder>,
        metrics: Metrics,
    ) -> Reloader {
        metrics.config_last_load_timestamp_seconds.set(unix_now());
        let watched = watched_files(&path, config);
        Reloader {
            seen: fingerprint(&watched),
            fixed: fixed_settings(config),
            watch_interval: config.reload.watch_interval,
            path,
            auth,
            tls,
            metrics,
            env: |name| std::env::var(name).ok(),
            watched,
        }
    }

    /// Reads the config again and puts its clients and TLS files in service, or refuses it
    /// and changes nothing. Counts the result and logs one line either way.
    pub fn reload(&mut self, trigger: &'static str) -> Result<Applied, ReloadError> {
        let result = self.try_reload();
        // Whatever the outcome, the files as they are now have been judged: watching waits
        // for the next change instead of repeating this verdict.
        self.seen = fingerprint(&self.watched);
        match &result {
            Ok(applied) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["applied"])
                    .inc();
                self.metrics
                    .config_last_load_timestamp_seconds
                    .set(unix_now());
                if applied.needs_restart.is_empty() {
                    tracing::info!(
                        trigger,
                        clients = applied.clients,
                        tls = applied.tls,
                        "config reloaded"
                    );
                } else {
                    tracing::warn!(
                        trigger,
                        clients = applied.clients,
                        tls = applied.tls,
                        needs_restart = %applied.needs_restart.join(", "),
                        "config reloaded; changed settings that only take effect after a restart are not applied"
                    );
                }
            }
            Err(e) => {
                self.metrics
                    .config_reloads_total
                    .with_label_values(&["refused"])
                    .inc();
                tracing::warn!(trigger, error = %e, "config reload refused; the running config keeps serving");
            }
        }
        result
    }

    fn try_reload(&mut self) -> Result<Applied, ReloadError> {
        let config = Config::load_checked(&self.path, true, &self.env)?;
        let files = TlsFiles::from_config(&config.server);
        let acceptor = match (&self.tls, &files) {
            (Some(_), Some(files)) => Some(files.acceptor()?),
            (None, None) => None,
            _ => return Err(ReloadError::TlsToggled),
        };
        let mut needs_restart = changed_keys(&self.fixed, &fixed_settings(&config));
        // Clients written for another mode would lock every caller out: they wait for the
        // restart that changes the mode.
        let same_mode = config.auth.mode == self.auth.mode();
        if same_mode {
            self.auth.replace(&config.auth);
        } else {
            needs_restart.push("auth.clients (written for the new auth.mode)".into());
        }
        if let (Some(holder), Some(acceptor)) = (&self.tls, acceptor) {
            holder.replace(acceptor);
        }
        self.watched = watched_files(&self.path, &config);
        Ok(Applied {
            clients: if same_mode {
                config.auth.clients.len()
            } else {
                0
            },
            tls: self.tls.is_some(),
            needs_restart,
        })
    }

    /// Reloads on every request from `source` and, unless `reload.watch_interval` is 0,
    /// whenever a watched file's content changes; returns when `shutdown` resolves.
    pub async fn run(
        mut self,
        mut requests: mpsc::Receiver<()>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = (!self.watch_interval.is_zero()).then(|| {
            let mut t = tokio::time::interval(self.watch_interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        let mut signals_open = true;
        loop {
            let trigger = tokio::select! {
                _ = &mut shutdown => return,
                got = requests.recv(), if signals_open => match got {
                    Some(()) => "sighup",
                    None => { signals_open = false; continue }
                },
                _ = async { match tick.as_mut() {
                    Some(t) => { t.tick().await; }
                    None => std::future::pending::<()>().await,
                } } => {
                    let now = fingerprint(&self.watched);
                    if now == self.seen {
                        continue;
                    }
                    "file_changed"
                }
            };
            let _ = self.reload(trigger);
        }
    }
}

/// The config file and every file it names (TLS and secrets): a change to any of them is a
/// reason to reload.
fn watched_files(path: &Path, config: &Config) -> Vec<PathBuf> {
    let mut files = vec![path.to_owned()];
    if let Some(tls) = TlsFiles::from_config(&config.server) {
        files.extend(tls.each().map(|(_, p)| p.to_owned()));
    }
    files.extend(config.secret_files().into_iter().map(|(_, p)| p.to_owned()));
    files
}

/// A digest of the watched files' contents (a missing file counts as its own state). Content,
/// not mtime: a Kubernetes `..data` swap can keep timestamps, and the files are small.
fn fingerprint(files: &[PathBuf]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for f in files {
        match std::fs::read(f) {
            Ok(bytes) => {
                hash.update([1]);
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(&bytes);
            }
            Err(_) => hash.update([0]),
        }
    }
    hash.finalize().into()
}

/// The config with the parts a reload can change taken out: what is left needs a restart.
fn fixed_settings(config: &Config) -> toml::Table {
    let mut fixed = config.clone();
    fixed.auth.clients.clear();
    // The TLS files' content and paths reload; whether TLS is on does not.
    for file in [
        &mut fixed.server.tls_cert_file,
        &mut fixed.server.tls_key_file,
        &mut fixed.server.client_ca_file,
    ] {
        if file.is_some() {
            *file = Some(PathBuf::new());
        }
    }
    toml::Table::try_from(&fixed).unwrap_or_default()
}

/// `section.key` for every key whose value differs between `old` and `new`.
fn changed_keys(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let empty = toml::Table::new();
    let mut changed = Vec::new();
    let sections = old
        .keys()
        .chain(new.keys().filter(|k| !old.contains_key(*k)));
    for section in sections {
        let (a, b) = (old.get(section), new.get(section));
        match (as_section(a, &empty), as_section(b, &empty)) {
            (Some(a), Some(b)) => {
                for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                    if a.get(key) != b.get(key) {
                        changed.push(format!("{section}.{key}"));
                    }
                }
            }
            _ if a != b => changed.push(section.clone()),
            _ => {}
        }
    }
    changed
}

/// A section's table, an absent section as an empty one; `None` for a top-level value.
fn as_section<'a>(
    value: Option<&'a toml::Value>,
    empty: &'a toml::Table,
) -> Option<&'a toml::Table> {
    match value {
        None => Some(empty),
        Some(v) => v.as_table(),
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("toml")
    }

    /// Only the keys whose values differ are named, section by section.
    #[test]
    fn changed_keys_names_each_differing_key() {
        let old = table("[server]\nlisten = \"a\"\nx = 1\n[cache]\nttl = 1\n");
        let new = table("[server]\nlisten = \"b\"\nx = 1\n[cache]\nttl = 1\n[extra]\ny = 2\n");
        assert_eq!(changed_keys(&old, &new), ["server.listen", "extra.y"]);
        assert!(changed_keys(&old, &old).is_empty());
    }
}

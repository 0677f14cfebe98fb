//! The `simulate` command line: its flags, their checks, and serving until shutdown. The
//! `hubspot-sim` binary and `hubspot-files-gateway simulate` both run exactly this.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::{SimConfig, parse_rate_limit, serve};

/// Exit code for bad flags (sysexits `EX_USAGE`), as the gateway uses.
pub const USAGE: u8 = 64;
/// Exit code for a failure while running (cannot bind, server error).
pub const RUNTIME: u8 = 1;

/// The flags of `simulate`: where to listen and how the simulated account behaves.
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Scopes granted to issued tokens, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "files,files.ui_hidden.read"
    )]
    pub scopes: Vec<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 1800)]
    pub token_ttl: u64,
    /// HubSpot's rolling limit, e.g. `100/10s`; `0` for none.
    #[arg(long, default_value = "100/10s")]
    pub rate_limit: String,
    /// Added to every status answer, e.g. `250ms`.
    #[arg(long, value_parser = parse_duration, default_value = "0s")]
    pub latency: Duration,
    /// Share of status requests answered with a 5xx, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    pub fail_rate: f64,
    /// The only client id accepted (default: any).
    #[arg(long)]
    pub client_id: Option<String>,
    /// The only client secret accepted (default: any).
    #[arg(long)]
    pub client_secret: Option<String>,
    /// The only refresh token accepted (default: any).
    #[arg(long)]
    pub refresh_token: Option<String>,
    /// A private-app token to accept, with the granted scopes.
    #[arg(long)]
    pub static_token: Option<String>,
}

/// A duration such as `250ms` or `2s`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Why `simulate` ended unsuccessfully; [`SimulateError::exit_code`] says how to exit.
#[derive(Debug)]
pub enum SimulateError {
    /// A flag's value is out of range or malformed.
    Usage(String),
    /// Binding or serving failed.
    Runtime(String),
}

impl SimulateError {
    /// [`USAGE`] or [`RUNTIME`].
    pub fn exit_code(&self) -> u8 {
        match self {
            SimulateError::Usage(_) => USAGE,
            SimulateError::Runtime(_) => RUNTIME,
        }
    }
}

impl fmt::Display for SimulateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SimulateError::Usage(m) | SimulateError::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for SimulateError {}

impl SimulateArgs {
    /// The simulator settings these flags describe, or what is wrong with them.
    pub fn sim_config(&self) -> Result<SimConfig, SimulateError> {
        let rate_limit = if self.rate_limit.trim() == "0" {
            None
        } else {
            Some(
                parse_rate_limit(&self.rate_limit)
                    .map_err(|e| SimulateError::Usage(format!("--rate-limit: {e}")))?,
            )
        };
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(SimulateError::Usage(
                "--fail-rate must be between 0 and 1".into(),
            ));
        }
        Ok(SimConfig {
            scopes: self.scopes.clone(),
            token_ttl: Duration::from_secs(self.token_ttl),
            rate_limit,
            latency: self.latency,
            fail_rate: self.fail_rate,
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            refresh_token: self.refresh_token.clone(),
            static_token: self.static_token.clone(),
            ..SimConfig::default()
        })
    }
}

/// Checks the flags, binds `--listen` and serves until `shutdown` resolves.
pub async fn run(
    args: SimulateArgs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SimulateError> {
    let config = args.sim_config()?;
    let listener = TcpListener::bind(args.listen)
        .await
        .map_err(|e| SimulateError::Runtime(format!("cannot listen on {}: {e}", args.listen)))?;
    let addr = listener.local_addr().unwrap_or(args.listen);
    tracing::info!(%addr, "HubSpot simulator listening");
    serve(listener, config, shutdown)
        .await
        .map_err(|e| SimulateError::Runtime(format!("simulator failed: {e}")))
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(flags: &[&str]) -> Result<SimulateArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("sim").chain(flags.iter().copied())).map(|c| c.args)
    }

    /// No flags: the documented defaults (127.0.0.1:8081, both scopes, 30 min tokens,
    /// 100 per 10 s, no latency, no failures).
    #[test]
    fn defaults_are_the_documented_ones() {
        let args = parse(&[]).expect("no flags parse");
        assert_eq!(args.listen, "127.0.0.1:8081".parse().expect("addr"));
        let config = args.sim_config().expect("defaults are valid");
        assert_eq!(config.scopes, ["files", "files.ui_hidden.read"]);
        assert_eq!(config.token_ttl, Duration::from_secs(1800));
        assert_eq!(config.rate_limit, Some((100, Duration::from_secs(10))));
        assert_eq!(config.latency, Duration::ZERO);
    }

    /// Every flag reaches the config; `--rate-limit 0` means no limit.
    #[test]
    fn flags_reach_the_config() {
        let args = parse(&[
            "--listen=127.0.0.1:0",
            "--scopes=files.read,crm",
            "--token-ttl=60",
            "--rate-limit=0",
            "--latency=250ms",
            "--fail-rate=0.5",
            "--client-id=id",
            "--client-secret=cs",
            "--refresh-token=rt",
            "--static-token=pat",
        ])
        .expect("flags parse");
        let config = args.sim_config().expect("valid");
        assert_eq!(config.scopes, ["files.read", "crm"]);
        assert_eq!(config.token_ttl, Duration::from_secs(60));
        assert_eq!(config.rate_limit, None);
        assert_eq!(config.latency, Duration::from_millis(250));
        assert_eq!(config.fail_rate, 0.5);
        assert_eq!(config.client_id.as_deref(), Some("id"));
        assert_eq!(config.client_secret.as_deref(), Some("cs"));
        assert_eq!(config.refresh_token.as_deref(), Some("rt"));
        assert_eq!(config.static_token.as_deref(), Some("pat"));
    }

    /// Bad values are usage errors (exit 64), not panics.
    #[test]
    fn bad_values_are_usage_errors() {
        assert!(parse(&["--latency=soon"]).is_err());
        for flags in [["--fail-rate=1.5"], ["--rate-limit=ten"]] {
            let error = parse(&flags)
                .expect("parses")
                .sim_config()
                .expect_err("rejected");
            assert_eq!(error.exit_code(), USAGE, "{error}");
        }
    }
}

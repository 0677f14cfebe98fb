//! The `hubspot-files-gateway` binary: parses the command line, sets up logging, binds, runs,
//! and turns the outcome into an exit code (0 clean, 64 bad config or usage, 1 runtime).

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hubspot_files_gateway::auth;
use hubspot_files_gateway::config::Config;
use hubspot_files_gateway::log::{self, LogConfig};
use hubspot_files_gateway::reload::ReloadSource;
use hubspot_files_gateway::server::{self, Listeners};
use hubspot_files_gateway::telemetry;
use tokio::net::TcpListener;

#[cfg(feature = "demo")]
mod demo;

const USAGE: u8 = 64;
const RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "hubspot-files-gateway",
    version,
    about = "A gateway in front of HubSpot's file-import status route."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Config file for `serve` when no command is given.
    #[arg(long, global = true, default_value = "config/gateway.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Run the HubSpot simulator and the gateway together on loopback.
    #[cfg(feature = "demo")]
    Demo(demo::DemoArgs),
    /// Run the HubSpot simulator alone (the same as the `hubspot-sim` binary).
    #[cfg(feature = "demo")]
    Simulate(Box<hubspot_sim::cli::SimulateArgs>),
    /// Validate a config file, every file it names and every secret, and print the config
    /// as the gateway understands it.
    CheckConfig(CheckConfigArgs),
    /// Read an API key on stdin and print its sha256 for `key_sha256`.
    HashKey,
}

#[derive(clap::Args)]
struct CheckConfigArgs {
    /// Check everything but whether the secrets are present and readable (for a deploy
    /// pipeline that has no access to them).
    #[arg(long)]
    without_secrets: bool,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // `serve` and `demo` set up logging from their config's `[log]`; the other commands log
    // little, as text. Each guard lives until its command returns, so queued lines are
    // flushed before exit.
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(&args),
        #[cfg(feature = "demo")]
        Command::Simulate(args) => {
            let _log = log::init(&LogConfig::default());
            simulate(*args)
        }
        Command::CheckConfig(args) => {
            let _log = log::init(&LogConfig::default());
            check_config(&cli.config, &args)
        }
        Command::HashKey => hash_key(),
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime starts")
}

fn serve(path: &Path) -> ExitCode {
    let env = |name: &str| std::env::var(name).ok();
    // Every file is checked before binding, so a bad TLS file is a bad config (64) like any
    // other, reported together with every other problem.
    let config = match Config::load_checked(path, true, &env) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let _log = log::init(&config.log);
    let credentials = match config.credentials(&env) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    runtime().block_on(async {
        let reload = match sighup(path) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("cannot listen for SIGHUP: {e}");
                return ExitCode::from(RUNTIME);
            }
        };
        let listeners = match bind(&config).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let traces = match config.telemetry.as_ref().map(telemetry::init).transpose() {
            Ok(t) => t,
            Err(e) => {
                eprintln!("cannot start tracing: {e}");
                return ExitCode::from(RUNTIME);
            }
        };
        let code =
            match server::run_with_reload(config, credentials, listeners, signal(), Some(reload))
                .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "gateway failed");
                    ExitCode::from(RUNTIME)
                }
            };
        // The spans of the last requests, within telemetry.export_timeout.
        if let Some(traces) = traces {
            traces.shutdown().await;
        }
        code
    })
}

#[cfg(feature = "demo")]
fn simulate(args: hubspot_sim::cli::SimulateArgs) -> ExitCode {
    match runtime().block_on(hubspot_sim::cli::run(args, signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn check_config(path: &Path, args: &CheckConfigArgs) -> ExitCode {
    use std::io::Write;
    let env = |name: &str| std::env::var(name).ok();
    let config = match Config::load_checked(path, !args.without_secrets, &env) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let secrets = if args.without_secrets {
        "secrets not checked (--without-secrets)"
    } else {
        "every secret it names is readable (values not shown)"
    };
    let text = format!(
        "# {}: valid; every file it names is readable; {secrets}\n{}",
        path.display(),
        config.to_toml()
    );
    // A reader that stops early (`check-config | head -1`) is not an error: the verdict is
    // the exit code, and the config was valid.
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("check-config: cannot write the config: {e}");
            ExitCode::from(RUNTIME)
        }
    }
}

fn hash_key() -> ExitCode {
    let mut key = String::new();
    if std::io::stdin().read_to_string(&mut key).is_err() || key.trim().is_empty() {
        eprintln!(
            "hash-key: write the API key on stdin, e.g. `printf %s \"$KEY\" | hubspot-files-gateway hash-key`"
        );
        return ExitCode::from(USAGE);
    }
    println!("{}", auth::hash_key(&key));
    ExitCode::SUCCESS
}

async fn bind(config: &Config) -> Result<Listeners, ExitCode> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr).await.map_err(|e| {
            eprintln!("cannot listen on {addr}: {e}");
            ExitCode::from(RUNTIME)
        })
    };
    Ok(Listeners {
        service: bind(config.server.listen).await?,
        admin: bind(config.server.admin_listen).await?,
    })
}

fn usage_error(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(USAGE)
}

/// Turns every SIGHUP into a reload of the config at `path`. Registered before the
/// listeners bind, so from the first "listening" line on, SIGHUP no longer ends the process.
fn sighup(path: &Path) -> std::io::Result<ReloadSource> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    // One pending request is enough: reloads read the newest files anyway.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!("SIGHUP received: reloading the config");
            if tx.try_send(()).is_err() && tx.is_closed() {
                return;
            }
        }
    });
    Ok(ReloadSource {
        path: path.to_owned(),
        requests: rx,
    })
}

/// Resolves on SIGTERM (what Kubernetes sends) or SIGINT (Ctrl-C).
async fn signal() {
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

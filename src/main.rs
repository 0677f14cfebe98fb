//! The `hubspot-files-gateway` binary: parses the command line, sets up logging, binds, runs,
//! and turns the outcome into an exit code (0 clean, 64 bad config or usage, 1 runtime).

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hubspot_files_gateway::auth;
use hubspot_files_gateway::config::Config;
use hubspot_files_gateway::server::{self, Listeners};
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
    /// Validate a config file and print it as the gateway understands it.
    CheckConfig,
    /// Read an API key on stdin and print its sha256 for `key_sha256`.
    HashKey,
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal; log collectors get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(&cli.config),
        #[cfg(feature = "demo")]
        Command::Demo(args) => demo::run(&args),
        #[cfg(feature = "demo")]
        Command::Simulate(args) => simulate(*args),
        Command::CheckConfig => check_config(&cli.config),
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
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let credentials = match config.credentials(&|name| std::env::var(name).ok()) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    runtime().block_on(async {
        let listeners = match bind(&config).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        match server::run(config, credentials, listeners, signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::from(RUNTIME)
            }
        }
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

fn check_config(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    if let Err(e) = config.credentials(&|name| std::env::var(name).ok()) {
        return usage_error(&e);
    }
    println!(
        "# {}: valid; every secret it names is readable (values not shown: ***)",
        path.display()
    );
    print!("{}", config.to_toml());
    ExitCode::SUCCESS
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

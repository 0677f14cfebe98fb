//! The `hubspot-files-gateway` binary: parses the command line, sets up logging, binds, runs,
//! and turns the outcome into an exit code (0 clean, 64 bad config or usage, 1 runtime).

use std::io::{IsTerminal, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hubspot_files_gateway::config::{Config, duration};
use hubspot_files_gateway::reload::ReloadSource;
use hubspot_files_gateway::server::{self, Listeners};
use hubspot_files_gateway::{auth, simulator};
use tokio::net::TcpListener;

const USAGE: u8 = 64;
const RUNTIME: u8 = 1;

/// The configuration `demo` runs, embedded so `demo` works from anywhere.
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
/// The API key `demo` accepts; `config/demo.toml` holds its sha256.
const DEMO_API_KEY: &str = "demo-key-change-me";

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
    Demo,
    /// Run the HubSpot simulator alone.
    Simulate(Box<SimulateArgs>),
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

#[derive(clap::Args)]
struct SimulateArgs {
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Scopes granted to issued tokens, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "files,files.ui_hidden.read"
    )]
    scopes: Vec<String>,
    /// Lifetime of issued access tokens, in seconds.
    #[arg(long, default_value_t = 1800)]
    token_ttl: u64,
    /// HubSpot's rolling limit, e.g. `100/10s`; `0` for none.
    #[arg(long, default_value = "100/10s")]
    rate_limit: String,
    /// Added to every status answer, e.g. `250ms`.
    #[arg(long, value_parser = duration::parse, default_value = "0s")]
    latency: Duration,
    /// Share of status requests answered with a 5xx, 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// The only client id accepted (default: any).
    #[arg(long)]
    client_id: Option<String>,
    /// The only client secret accepted (default: any).
    #[arg(long)]
    client_secret: Option<String>,
    /// The only refresh token accepted (default: any).
    #[arg(long)]
    refresh_token: Option<String>,
    /// A private-app token to accept, with the granted scopes.
    #[arg(long)]
    static_token: Option<String>,
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
        Command::Demo => demo(),
        Command::Simulate(args) => simulate(*args),
        Command::CheckConfig(args) => check_config(&cli.config, &args),
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
        match server::run_with_reload(config, credentials, listeners, signal(), Some(reload)).await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::from(RUNTIME)
            }
        }
    })
}

fn demo() -> ExitCode {
    let config = match Config::parse(DEMO_CONFIG) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    // The simulator accepts any non-empty OAuth client, so the demo supplies its own values
    // instead of reading the environment.
    let credentials =
        match config.credentials(&|name| Some(format!("demo-{}", name.to_lowercase()))) {
            Ok(c) => c,
            Err(e) => return usage_error(&e),
        };
    runtime().block_on(async {
        let sim_addr: SocketAddr = ([127, 0, 0, 1], 8081).into();
        let sim = match simulator::start_on(sim_addr, simulator::SimConfig::default()).await {
            Ok(sim) => sim,
            Err(e) => {
                eprintln!("cannot start the simulator on {sim_addr}: {e}");
                return ExitCode::from(RUNTIME);
            }
        };
        let listeners = match bind(&config).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let base = format!("http://{}", config.server.listen);
        let status =
            |id: &str| format!("{base}/files/v3/files/import-from-url/async/tasks/{id}/status");
        println!(
            "hubspot-files-gateway demo: gateway {base}, admin http://{}, HubSpot simulator {}",
            config.server.admin_listen,
            sim.base_url()
        );
        println!("API key: {DEMO_API_KEY}\n");
        println!(
            "curl -i -H 'Authorization: Bearer {DEMO_API_KEY}' {}",
            status("complete-demo")
        );
        println!(
            "curl -i -H 'Authorization: Bearer {DEMO_API_KEY}' {}   # again: X-Cache: HIT",
            status("complete-demo")
        );
        println!(
            "curl -i -H 'Authorization: Bearer {DEMO_API_KEY}' {}",
            status("pending-demo")
        );
        println!("curl -i {}   # no key: 401", status("complete-demo"));
        println!(
            "curl -s http://{}/metrics | grep hubspot_gateway_requests_total",
            config.server.admin_listen
        );
        println!("\nCtrl-C stops both.");
        let result = server::run(config, credentials, listeners, signal()).await;
        sim.stop().await;
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "gateway failed");
                ExitCode::from(RUNTIME)
            }
        }
    })
}

fn simulate(args: SimulateArgs) -> ExitCode {
    let rate_limit = if args.rate_limit.trim() == "0" {
        None
    } else {
        match simulator::parse_rate_limit(&args.rate_limit) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("--rate-limit: {e}");
                return ExitCode::from(USAGE);
            }
        }
    };
    if !(0.0..=1.0).contains(&args.fail_rate) {
        eprintln!("--fail-rate must be between 0 and 1");
        return ExitCode::from(USAGE);
    }
    let config = simulator::SimConfig {
        scopes: args.scopes,
        token_ttl: Duration::from_secs(args.token_ttl),
        rate_limit,
        latency: args.latency,
        fail_rate: args.fail_rate,
        client_id: args.client_id,
        client_secret: args.client_secret,
        refresh_token: args.refresh_token,
        static_token: args.static_token,
        ..simulator::SimConfig::default()
    };
    runtime().block_on(async {
        let listener = match TcpListener::bind(args.listen).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("cannot listen on {}: {e}", args.listen);
                return ExitCode::from(RUNTIME);
            }
        };
        tracing::info!(addr = %args.listen, "HubSpot simulator listening");
        match simulator::serve(listener, config, signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("simulator failed: {e}");
                ExitCode::from(RUNTIME)
            }
        }
    })
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

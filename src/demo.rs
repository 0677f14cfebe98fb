//! `demo`: the HubSpot simulator and the gateway together on loopback, with the demo config
//! embedded, and the curl lines to try printed with the addresses actually bound.

use std::net::SocketAddr;
use std::process::ExitCode;

use hubspot_files_gateway::config::Config;
use hubspot_files_gateway::server;
use hubspot_sim::SimConfig;

use crate::{RUNTIME, bind, runtime, signal, usage_error};

/// The configuration `demo` runs, embedded so `demo` works from anywhere.
const DEMO_CONFIG: &str = include_str!("../config/demo.toml");
/// The API key `demo` accepts; `config/demo.toml` holds its sha256.
const DEMO_API_KEY: &str = "demo-key-change-me";

/// Where `demo` listens; port 0 picks a free port (the addresses bound are printed).
#[derive(clap::Args)]
pub struct DemoArgs {
    /// The gateway's service address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The gateway's admin address (`/metrics`, `/healthz`, `/readyz`).
    #[arg(long, default_value = "127.0.0.1:9090")]
    admin_listen: SocketAddr,
    /// The HubSpot simulator's address.
    #[arg(long, default_value = "127.0.0.1:8081")]
    sim_listen: SocketAddr,
}

/// Runs the simulator and the gateway until SIGINT or SIGTERM.
pub fn run(args: &DemoArgs) -> ExitCode {
    let mut config = match Config::parse(DEMO_CONFIG) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let _log = hubspot_files_gateway::log::init(&config.log);
    config.server.listen = args.listen;
    config.server.admin_listen = args.admin_listen;
    // The simulator accepts any non-empty OAuth client, so the demo supplies its own values
    // instead of reading the environment.
    let credentials =
        match config.credentials(&|name| Some(format!("demo-{}", name.to_lowercase()))) {
            Ok(c) => c,
            Err(e) => return usage_error(&e),
        };
    runtime().block_on(async {
        let sim = match hubspot_sim::start_on(args.sim_listen, SimConfig::default()).await {
            Ok(sim) => sim,
            Err(e) => {
                eprintln!("cannot start the simulator on {}: {e}", args.sim_listen);
                return ExitCode::from(RUNTIME);
            }
        };
        config.upstream.base_url = match sim.base_url().parse() {
            Ok(url) => url,
            Err(e) => {
                eprintln!("the simulator's address is not a usable base_url: {e}");
                return ExitCode::from(RUNTIME);
            }
        };
        let listeners = match bind(&config).await {
            Ok(l) => l,
            Err(code) => return code,
        };
        let bound =
            |l: &tokio::net::TcpListener, asked: SocketAddr| l.local_addr().unwrap_or(asked);
        let service = bound(&listeners.service, args.listen);
        let admin = bound(&listeners.admin, args.admin_listen);
        print_instructions(service, admin, &sim.base_url());
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

/// The addresses in use, the API key, and the README's curl lines against them.
fn print_instructions(service: SocketAddr, admin: SocketAddr, sim: &str) {
    let base = format!("http://{service}");
    let status =
        |id: &str| format!("{base}/files/v3/files/import-from-url/async/tasks/{id}/status");
    println!(
        "hubspot-files-gateway demo: gateway {base}, admin http://{admin}, HubSpot simulator {sim}"
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
    println!("curl -s http://{admin}/metrics | grep hubspot_gateway_requests_total");
    println!("\nCtrl-C stops both.");
}

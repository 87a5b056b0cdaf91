//! The `pgveil` command line: parses arguments, loads the configuration and starts the
//! proxy. The only place where errors become `anyhow` messages for a human.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tracing::{level_filters::LevelFilter, warn};

use pgveil::config::Config;

/// Transparent PostgreSQL proxy. Applications connect to pgveil instead of PostgreSQL;
/// this build relays every session unchanged (policy enforcement, masking and
/// encryption are not in it yet).
#[derive(Parser)]
#[command(name = "pgveil", version, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (or set PGVEIL_LOG).
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy: applications connect to `listen`, pgveil connects to `upstream`.
    #[command(
        after_help = "Examples:\n  pgveil run --config /etc/pgveil/pgveil.yaml\n  pgveil run --listen 127.0.0.1:6432 --upstream db.internal:5432\n\nSIGTERM or SIGINT: stop accepting, let open sessions finish for limits.shutdown_grace_seconds, then exit."
    )]
    Run(RunArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (YAML) [default: config/pgveil.yaml if it exists, else built-in
    /// defaults]
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address applications connect to, e.g. 127.0.0.1:6432 (overrides `listen`).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// PostgreSQL server as HOST:PORT (overrides `upstream.host` and `upstream.port`).
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<String>,
    /// Policy file (overrides `policy`).
    #[arg(long, value_name = "FILE")]
    policy: Option<PathBuf>,
    /// Address of the HTTP admin endpoint (overrides `admin`).
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Event-loop threads running sessions: 0 = one per core (overrides `workers`).
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
}

const DEFAULT_CONFIG: &str = "config/pgveil.yaml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_level.as_deref());
    let result = match cli.command {
        Command::Run(args) => run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pgveil: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(flag: Option<&str>) {
    let wanted = flag
        .map(str::to_string)
        .or_else(|| std::env::var("PGVEIL_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let level = wanted.parse::<LevelFilter>().unwrap_or_else(|_| {
        eprintln!("pgveil: unknown log level {wanted:?}; using info");
        LevelFilter::INFO
    });
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

fn load_config(args: &RunArgs) -> Result<Config> {
    let mut config = match &args.config {
        Some(path) => Config::load(path)?,
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => {
            Config::load(std::path::Path::new(DEFAULT_CONFIG))?
        }
        None => {
            warn!("no --config given and {DEFAULT_CONFIG} not found; using built-in defaults");
            Config::default()
        }
    };
    if let Some(listen) = &args.listen {
        config.listen = listen
            .parse()
            .with_context(|| format!("--listen: expected ADDR:PORT, got {listen:?}"))?;
    }
    if let Some(upstream) = &args.upstream {
        config.set_upstream(upstream)?;
    }
    if let Some(policy) = &args.policy {
        config.policy = Some(policy.clone());
    }
    if let Some(admin) = &args.admin {
        config.admin = Some(
            admin
                .parse()
                .with_context(|| format!("--admin: expected ADDR:PORT, got {admin:?}"))?,
        );
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    config.validate("config")?;
    Ok(config)
}

fn run(args: RunArgs) -> Result<()> {
    let config = load_config(&args)?;
    // Fail closed: this build cannot enforce a policy or write an audit log yet, and
    // running as if it did would pass protected data in plaintext or leave accesses
    // unrecorded.
    if let Some(policy) = &config.policy {
        bail!(
            "policy {} is configured, but this build of pgveil cannot enforce policies yet; \
             refusing to start rather than pass protected data unfiltered (remove `policy` to run as a plain proxy)",
            policy.display()
        );
    }
    if config.audit.is_some() {
        bail!(
            "audit is configured, but this build of pgveil cannot write the audit log yet; \
             refusing to start rather than leave accesses unrecorded"
        );
    }
    if let Some(admin) = config.admin {
        warn!(%admin, "the admin HTTP endpoint is not available in this build; ignoring `admin`");
    }
    pgveil::server::run(config)?;
    Ok(())
}

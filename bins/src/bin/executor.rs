//! `executor`: Vivian's service. It time-shares the farm's DUTs and serves
//! the REST API.
//!
//! ```text
//! executor                  serve (the default)
//! executor serve            the same, spelled out
//! executor --check-config   print the effective configuration and exit
//! executor demo             a self-contained virtual farm on localhost
//! ```
//!
//! The configuration comes from the environment only (see
//! `vivian_core::config`); it is parsed once, before anything else, and a bad
//! value stops start-up with an error naming the variable.

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vivian_core::config::{Config, ConfigError, ValueSource};

/// Vivian executor: time-shares CI test machines (DUTs) of one farm.
/// Configured through environment variables (FARM_NAME, MARS_DB_FILE, ...).
#[derive(Debug, Parser)]
#[command(name = "executor", version)]
struct Cli {
    /// Print the effective configuration (secrets masked) and exit: 0 when it
    /// is valid, 1 with every error otherwise.
    #[arg(long)]
    check_config: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the service (the default when no command is given).
    Serve,
    /// Run a self-contained virtual farm on localhost (no root, no
    /// configuration): executor, console multiplexer, a virtual PDU with
    /// simulated DUTs and a sample job streamed to the terminal.
    Demo(vivian::demo::DemoArgs),
}

/// Exit status for an invalid configuration.
const EXIT_BAD_CONFIG: u8 = 1;
/// Exit status for a failure after the configuration was accepted.
const EXIT_FAILURE: u8 = 2;

fn process_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Parses the process environment and checks the files it names.
fn load_config() -> Result<Config, ConfigError> {
    let config = Config::from_process_env()?;
    config.check_files()?;
    Ok(config)
}

fn print_config_error(e: &ConfigError) {
    eprintln!("executor: invalid configuration:");
    for err in &e.errors {
        eprintln!("  {err}");
    }
}

fn check_config() -> ExitCode {
    let config = match load_config() {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let env = process_env();
    println!("# Effective configuration of the Vivian executor (secrets masked)");
    for entry in config.entries(&env) {
        match entry.source {
            ValueSource::Environment => println!("{}={}", entry.name, entry.value),
            ValueSource::Default => println!("{}={}  # default", entry.name, entry.value),
        }
    }
    for w in config.warnings(&env) {
        eprintln!("executor: warning: {w}");
    }
    println!("# configuration OK");
    ExitCode::SUCCESS
}

fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(farm = %config.farm_name, "configuration loaded");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(vivian::serve::run_executor(config))
}

fn demo(args: vivian::demo::DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("executor: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match runtime.block_on(vivian::demo::run_demo(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("executor demo: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn main() -> ExitCode {
    // Before any other thread exists (see the module's docs).
    let malloc_tuned = vivian::memory::tune_allocator();
    let cli = Cli::parse();
    if cli.check_config {
        return check_config();
    }
    // The demo prints its job to the terminal: keep the logs to warnings.
    let default_filter = match cli.command {
        Some(Command::Demo(_)) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    if malloc_tuned {
        tracing::debug!(
            arena_max = vivian::memory::ARENA_MAX,
            mmap_threshold = vivian::memory::MMAP_THRESHOLD,
            trim_threshold = vivian::memory::TRIM_THRESHOLD,
            "malloc tuned"
        );
    } else {
        tracing::debug!("malloc settings left to the environment");
    }
    if let Some(Command::Demo(args)) = cli.command {
        return demo(args);
    }
    let config = match load_config() {
        Ok(c) => c,
        Err(e) => {
            print_config_error(&e);
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    for w in config.warnings(&process_env()) {
        tracing::warn!("{w}");
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => serve(config),
        Command::Demo(_) => unreachable!("handled before the configuration is loaded"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("executor: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

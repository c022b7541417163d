//! `executorctl`: the executor's command-line client (EX C.6).
//!
//! `executorctl [-e URL] run [-w] [-c HOST] [-t TAG]... [-i ID] [-s DIR]
//! [-j JOB_ID] [-a ACCESS:SECRET] [-g GROUP]... job.yml` exits with the job's
//! status: 0 PASS, 1 WARN, 2 COMPLETE, 3 FAIL, 4 INCOMPLETE, 5 UNKNOWN,
//! 6 SETUP_FAIL. `executorctl duts` lists the DUTs, `executorctl dut info
//! <id>` shows one.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vivian::client::{self, RunOptions, DEFAULT_EXECUTOR_URL};

#[derive(Parser, Debug)]
#[command(
    name = "executorctl",
    version,
    about = "Client of the Vivian (CI-tron compatible) executor"
)]
struct Cli {
    /// URL of the executor service.
    #[arg(short = 'e', long = "executor", env = "EXECUTOR_URL", default_value = DEFAULT_EXECUTOR_URL)]
    executor_url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a job on a DUT and stream its console; exits with the job's status.
    Run(RunArgs),
    /// List the DUTs of the farm and their states.
    Duts,
    /// Commands about one DUT.
    Dut {
        #[command(subcommand)]
        command: DutCommand,
    },
}

#[derive(Subcommand, Debug)]
enum DutCommand {
    /// Print everything the executor knows about a DUT.
    Info {
        /// ID (MAC address) or full name of the DUT.
        name: String,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Wait for a machine to become available if all are busy.
    #[arg(short = 'w', long = "wait")]
    wait: bool,
    /// Hostname that the executor will use to connect back to this client,
    /// useful for non-trivial routing to the test device.
    #[arg(short = 'c', long = "callback")]
    callback: Option<String>,
    /// Tag of the machine that should be running the job (repeatable).
    /// Overrides the job's target.
    #[arg(short = 't', long = "machine-tag")]
    machine_tags: Vec<String>,
    /// ID of the machine that should run the job. Overrides the job's target.
    #[arg(short = 'i', long = "machine-id")]
    machine_id: Option<String>,
    /// Directory that will be forwarded to the job (sent as the job bucket's
    /// initial state; this client does not mirror the bucket back yet).
    #[arg(short = 's', long = "share-directory")]
    share_directory: Option<PathBuf>,
    /// Identifier for the job, if you have one already.
    #[arg(short = 'j', long = "job-id")]
    job_id: Option<String>,
    /// MinIO credentials that have access to all the groups specified using
    /// '-g'. Format: accesskey:secretkey
    #[arg(
        short = 'a',
        long = "minio-auth",
        env = "VALVE_MINIO_AUTH_CREDENTIALS",
        hide_env_values = true
    )]
    minio_auth: Option<String>,
    /// Add the MinIO job user to the specified group (repeatable). Requires
    /// valid credentials given with '--minio-auth' which already have access
    /// to this group.
    #[arg(short = 'g', long = "minio-group")]
    minio_groups: Vec<String>,
    /// Seconds to wait for the executor to connect back after accepting the
    /// job.
    #[arg(long = "callback-timeout", default_value_t = 15.0)]
    callback_timeout: f64,
    /// Job that should be run.
    job: PathBuf,
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ERROR: cannot start the async runtime: {e}");
            std::process::exit(client::JobStatus::SetupFail.exit_code());
        }
    };
    let code = rt.block_on(async {
        match cli.command {
            Command::Run(args) => {
                if !(args.callback_timeout.is_finite() && args.callback_timeout > 0.0) {
                    eprintln!("ERROR: --callback-timeout must be a positive number of seconds");
                    return client::JobStatus::SetupFail.exit_code();
                }
                let opts = RunOptions {
                    executor_url: cli.executor_url,
                    job_path: args.job,
                    wait: args.wait,
                    callback_host: args.callback,
                    machine_tags: args.machine_tags,
                    machine_id: args.machine_id,
                    share_directory: args.share_directory,
                    job_id: args.job_id,
                    minio_auth: args.minio_auth,
                    minio_groups: args.minio_groups,
                    callback_timeout: Duration::from_secs_f64(args.callback_timeout),
                    interactive: true,
                };
                let status = client::run_job(&opts).await;
                println!("Job status: {status}");
                status.exit_code()
            }
            Command::Duts => match client::duts::list(&cli.executor_url).await {
                Ok(table) => {
                    print!("{table}");
                    0
                }
                Err(e) => {
                    eprintln!("ERROR: {e:#}");
                    1
                }
            },
            Command::Dut {
                command: DutCommand::Info { name },
            } => match client::duts::info(&cli.executor_url, &name).await {
                Ok(Some(json)) => {
                    println!("{json}");
                    0
                }
                Ok(None) => {
                    eprintln!("No DUTs exist with this name: '{name}'");
                    1
                }
                Err(e) => {
                    eprintln!("ERROR: {e:#}");
                    1
                }
            },
        }
    });
    // The stdin reader thread may still block on a read: exit explicitly.
    rt.shutdown_background();
    std::process::exit(code);
}

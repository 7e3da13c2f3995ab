//! `vessel`: one binary for the VMM (`vessel run`) and, later, the manager and its CLI.

mod cmd_run;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Vessel: a virtualization stack in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground, its serial console on this terminal.
    Run(cmd_run::RunArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VESSEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logging();
    let status = match cli.command {
        Command::Run(args) => cmd_run::run(args),
    };
    match status {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vessel: {e:#}");
            std::process::exit(1);
        }
    }
}

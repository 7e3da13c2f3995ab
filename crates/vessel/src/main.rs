//! `vessel`: one binary for the VMM (`vessel run`), disk image tools (`vessel img`), the
//! manager daemon (`vessel daemon`) and its CLI verbs.

mod cmd_cluster;
mod cmd_img;
mod cmd_manage;
mod cmd_network;
mod cmd_run;
mod cmd_saves;
mod cmd_storage;
mod cmd_virsh;
mod host_topology;
mod virsh_args;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "vessel",
    version,
    about = "Vessel: a virtualization stack in Rust"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    global: cmd_manage::GlobalOpts,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground, its serial console on this terminal.
    Run(Box<cmd_run::RunArgs>),
    /// Disk image tools: create, info, convert, check, resize.
    #[command(subcommand)]
    Img(cmd_img::ImgCommand),
    /// Copy a Diff snapshot's memory file onto the memory file of the snapshot it
    /// follows, which then is the Diff snapshot's memory (Firecracker's rebase-snap).
    RebaseSnap {
        /// The memory file of the snapshot the diff follows (a Full one, or one rebased
        /// before); changed in place.
        #[arg(long)]
        base_file: std::path::PathBuf,
        /// The Diff snapshot's memory file.
        #[arg(long)]
        diff_file: std::path::PathBuf,
    },
    #[command(flatten)]
    Manage(cmd_manage::ManageCommand),
}

fn init_logging() {
    use tracing_subscriber::filter::LevelFilter;
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_env("VESSEL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .with_filter(filter);
    // The VMM API's `PUT /logger` file: off until the API names one and its level.
    let (api_filter, api_level) = tracing_subscriber::reload::Layer::new(LevelFilter::OFF);
    vmm::api::fc_log::set_level_hook(move |level| {
        let _ = api_level.reload(level);
    });
    tracing_subscriber::registry()
        .with(stderr)
        .with(vmm::api::fc_log::ApiLogLayer.with_filter(api_filter))
        .init();
}

fn main() {
    let cli = Cli::parse_from(virsh_args::positional(
        &Cli::command(),
        std::env::args_os().collect(),
    ));
    init_logging();
    let status = match cli.command {
        Command::Run(args) => cmd_run::run(*args),
        Command::Img(cmd) => cmd_img::run(cmd),
        Command::RebaseSnap {
            base_file,
            diff_file,
        } => vmm::snapshot::memory::rebase(&base_file, &diff_file)
            .map(|n| {
                eprintln!(
                    "vessel: {} MiB of {} copied onto {}",
                    n >> 20,
                    diff_file.display(),
                    base_file.display()
                );
                0
            })
            .map_err(anyhow::Error::from),
        Command::Manage(cmd) => cmd_manage::run(cmd, &cli.global),
    };
    // An API request that ended the VM (or arrived as it ended) still gets its answer.
    vmm::api::http::drain(std::time::Duration::from_millis(500));
    match status {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vessel: {}", error_text(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes, joined by ": ". A cause whose text its error already ends
/// with (an error that formats its source into its own message, as thiserror's
/// `"…: {0}"` with `#[from]` does) is said once, not twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    let mut previous = String::new();
    for cause in e.chain() {
        let said = cause.to_string();
        if !previous.ends_with(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
        previous = said;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_text;

    /// An error that formats its source into its own message.
    #[derive(Debug)]
    struct Outer(std::io::Error);

    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "restoring the snapshot: {}", self.0)
        }
    }

    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_its_error_already_states_is_said_once() {
        let inner = std::io::Error::other("the memory file has 3 bytes");
        let e = anyhow::Error::from(Outer(inner)).context("cannot restore the snapshot S");
        assert_eq!(
            error_text(&e),
            "cannot restore the snapshot S: restoring the snapshot: the memory file has 3 bytes"
        );
        let e = anyhow::Error::from(std::io::Error::other("disk gone")).context("opening D");
        assert_eq!(error_text(&e), "opening D: disk gone");
    }
}

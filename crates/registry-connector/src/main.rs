//! The `registry-connector` binary: parse flags, set up logging, run the command.
#![forbid(unsafe_code)]

use clap::Parser;
use registry_connector::runtime::{self, cli::Cli};

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    runtime::logging::init(cli.log_format, &cli.log_level);
    match runtime::run(cli.command).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "registry-connector failed");
            std::process::ExitCode::FAILURE
        }
    }
}

//! The `lanup` command: a clap front end over `lanup-node` and
//! `lanup-protocol`. Errors are reported once, here, with their causes, and
//! mapped to an exit code.

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    init_logging();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lanup: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LANUP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

//! The `lanup` command: a clap front end over `lanup-node` and
//! `lanup-protocol`. Errors are reported once, here, with their causes, and
//! mapped to an exit code.

mod commands;
mod demo;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    init_logging(cli.default_log_level());
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lanup: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// Logs go to stderr; `LANUP_LOG` (e.g. `debug`, `lanup_node=trace`)
/// overrides the command's default level.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LANUP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

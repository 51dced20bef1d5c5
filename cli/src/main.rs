//! The `lanup` command: a clap front end over `lanup-node` and
//! `lanup-protocol`. Errors are reported once, here, with their causes, and
//! mapped to an exit code.

mod change;
mod commands;
mod demo;
mod fleet;
mod record;
mod rollout;
mod setup;
mod status;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};

fn main() -> ExitCode {
    // `lanup --version` and `lanup node --version` say the version the
    // node reports in `lanup status`.
    let matches = commands::Cli::command()
        .version(lanup_node::upgrade::version())
        .mut_subcommand("node", |node| node.version(lanup_node::upgrade::version()))
        .get_matches();
    let cli = match commands::Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if cli.is_node() {
        steady_allocator();
    }
    match cli.service_state() {
        Some(state) => log_to_file(&state, cli.default_log_level()),
        None => init_logging(cli.default_log_level()),
    }
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lanup: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// glibc's allocator raises its mmap threshold to the largest block freed,
/// so after the first 4 MiB chunk buffer every later one comes from its
/// arenas, which keep the freed memory: a node's RSS crept up release after
/// release (6 nodes, 12 releases of 12 MiB: 23 -> 41 MiB, the fetcher 31 ->
/// 92 MiB). A fixed threshold hands big buffers back to the system when
/// freed (18 -> 19-20 MiB over the same run). glibc reads it only when a
/// process starts, so a node started without it runs itself again, with
/// the same pid, arguments and environment plus the threshold; if that
/// fails it goes on as it is.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn steady_allocator() {
    use std::os::unix::process::CommandExt;
    const THRESHOLD: &str = "MALLOC_MMAP_THRESHOLD_";
    if std::env::var_os(THRESHOLD).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut again = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        again.arg0(arg0);
    }
    let error = again.args(args).env(THRESHOLD, "131072").exec();
    eprintln!("lanup: note: running without a fixed allocator threshold: {error}");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn steady_allocator() {}

/// Logs go to stderr; `LANUP_LOG` (e.g. `debug`, `lanup_node=trace`)
/// overrides the command's default level. When stderr is the journal (a
/// node run by systemd), each line starts with its syslog priority
/// (`<4>` for a warning), which journald keeps as the entry's level, and
/// carries no timestamp of its own.
fn init_logging(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LANUP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal, not in log files or the journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if lanup_node::platform::stderr_is_journal() {
        let format = tracing_subscriber::fmt::format().without_time();
        builder.event_format(Journald(format)).init();
    } else {
        builder.init();
    }
}

/// The log of a node the Windows Service Control Manager runs, which has
/// no console: `STATE/lanup.log`, rotated at 16 MiB with four older files,
/// each line with its level; stderr if that file cannot be opened.
fn log_to_file(state: &std::path::Path, default_level: &str) {
    let path = state.join("lanup.log");
    match lanup_node::logfile::Rotating::open(&path, 16 << 20, 4) {
        Ok(file) => {
            let filter = tracing_subscriber::EnvFilter::try_from_env("LANUP_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .init();
        }
        Err(e) => {
            init_logging(default_level);
            tracing::warn!(log = %path.display(), error = %e, "cannot open the log file; logging to stderr");
        }
    }
}

/// A log format for the journal: the syslog priority of the event's level,
/// then the line as `inner` writes it.
struct Journald<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Journald<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            tracing::Level::ERROR => 3,
            tracing::Level::WARN => 4,
            tracing::Level::INFO => 6,
            tracing::Level::DEBUG | tracing::Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(ctx, writer, event)
    }
}

//! A sample application for lanup's apply tests: a real program that runs
//! from its install directory until it is stopped.
//!
//! It reads `VERSION` and `BEHAVIOUR` from its working directory (files its
//! release lists), records `<version> <pid>` in `var/current` and appends it
//! to `var/history` (files no release lists, like an application's data),
//! then waits for SIGTERM. `BEHAVIOUR` is `run` (the default), `exit` (exit
//! at once with status 3: a release that does not come up) or `ignore-term`
//! (carry on after SIGTERM, so only SIGKILL stops it).

use std::io::Write;

fn main() -> std::io::Result<()> {
    let read = |name: &str| std::fs::read_to_string(name).map(|s| s.trim().to_owned());
    let version = read("VERSION").unwrap_or_else(|_| "unknown".into());
    let behaviour = read("BEHAVIOUR").unwrap_or_else(|_| "run".into());
    let line = format!("{version} {}\n", std::process::id());
    std::fs::create_dir_all("var")?;
    std::fs::write("var/current.tmp", &line)?;
    std::fs::rename("var/current.tmp", "var/current")?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open("var/history")?
        .write_all(line.as_bytes())?;
    eprintln!("sample app {line:?} ({behaviour})");
    if behaviour == "exit" {
        std::process::exit(3);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        loop {
            term.recv().await;
            if behaviour == "ignore-term" {
                eprintln!("sample app: ignoring SIGTERM");
                continue;
            }
            return Ok(());
        }
    })
}

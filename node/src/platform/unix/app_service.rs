//! An application that is a systemd unit (`app.service`): stopped,
//! started and judged through `systemctl`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::super::ServiceView;

/// Runs `systemctl ARGS` within `timeout`; its output, or why it failed.
fn systemctl(args: &[&str], timeout: Duration) -> Result<String, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let out_path = dir.path().join("out");
    let out = std::fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    let mut child = Command::new("systemctl")
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "systemctl {} did not finish within {timeout:?}",
                    args.join(" ")
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(e.to_string()),
        }
    };
    let said = std::fs::read_to_string(&out_path).unwrap_or_default();
    if status.success() {
        Ok(said)
    } else {
        Err(format!(
            "systemctl {} failed ({status}): {}",
            args.join(" "),
            said.trim()
        ))
    }
}

/// The unit's state: active (or activating), its main pid, and what
/// systemd says of it.
pub fn state(unit: &str) -> Result<ServiceView, String> {
    let said = systemctl(
        &[
            "show",
            "--property=ActiveState,SubState,MainPID,Result,ExecMainStatus",
            unit,
        ],
        Duration::from_secs(10),
    )?;
    Ok(parse_show(&said))
}

/// `systemctl show`'s `KEY=VALUE` lines as a [`ServiceView`].
fn parse_show(said: &str) -> ServiceView {
    let get = |key: &str| {
        said.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
            .unwrap_or("")
            .trim()
            .to_owned()
    };
    let active = get("ActiveState");
    ServiceView {
        running: active == "active" || active == "activating",
        pid: get("MainPID").parse().ok().filter(|p| *p > 0),
        detail: format!(
            "{active} ({}), result {}, exit status {}",
            get("SubState"),
            get("Result"),
            get("ExecMainStatus")
        ),
    }
}

/// Starts the unit; returns once systemd's start job is done.
pub fn start(unit: &str) -> Result<(), String> {
    systemctl(&["start", unit], Duration::from_secs(120)).map(|_| ())
}

/// Stops the unit, within `timeout`.
pub fn stop(unit: &str, timeout: Duration) -> Result<(), String> {
    systemctl(&["stop", unit], timeout).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemctl_show_reads_as_running_with_its_main_pid_or_as_failed() {
        let running = parse_show(
            "MainPID=4242\nResult=success\nExecMainStatus=0\nActiveState=active\nSubState=running\n",
        );
        assert!(running.running);
        assert_eq!(running.pid, Some(4242));
        let failed = parse_show(
            "MainPID=0\nResult=exit-code\nExecMainStatus=3\nActiveState=failed\nSubState=failed\n",
        );
        assert!(!failed.running);
        assert_eq!(failed.pid, None);
        assert!(failed.detail.contains("exit status 3"), "{}", failed.detail);
    }
}

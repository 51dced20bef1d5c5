//! The installed application as a running program: finding its processes,
//! stopping them (SIGTERM, then SIGKILL after a timeout), starting it from
//! its install directory, and checking that it came up healthy.
//!
//! A process counts as the application's when its name is the app's name
//! and it runs from the install directory (its executable or working
//! directory is inside it), so several installs of one program on a machine
//! never stop each other. The application is started in its own process
//! group with its output appended to a log file: it outlives the node, as
//! it did before lanup started it, and a node that restarts finds it again.

use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sysinfo::{Pid, ProcessRefreshKind, ProcessStatus, ProcessesToUpdate, System, UpdateKind};

use crate::config::AppConfig;
use crate::platform;

/// How often a wait for a process looks again.
const POLL: Duration = Duration::from_millis(20);
/// Linux truncates a process's name to this many bytes.
const COMM_LEN: usize = 15;

/// Failures of the running program, each naming what failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AppError {
    #[error("no start command: set app.start, or publish with an AppName Exe")]
    NoStartCommand,
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open the application log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("process {pid} is still running {waited:?} after it was killed")]
    Unkillable { pid: u32, waited: Duration },
    #[error("the application exited {status} {after:.1?} after it started (health_after is {health_after:?})")]
    Exited {
        status: String,
        after: Duration,
        health_after: Duration,
    },
    #[error("the application's process {pid} is gone {after:.1?} after it started")]
    Vanished { pid: u32, after: Duration },
    #[error("the application's service {service}: {reason}")]
    Service { service: String, reason: String },
    #[error(
        "the application's service {service} is not running {after:.1?} after it started: {detail}"
    )]
    ServiceDown {
        service: String,
        after: Duration,
        detail: String,
    },
    #[error("the application's launcher exited {status} {after:.1?} after it started and left no process of the application running (a forking application needs app.pid_file, or app.name set to the name its process runs as)")]
    LeftNothing { status: String, after: Duration },
    #[error("health command {command:?} failed: {reason}")]
    Unhealthy { command: String, reason: String },
}

/// One process of the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppProcess {
    pub pid: u32,
    /// Distinguishes this process from a later one that reuses the pid.
    start_time: u64,
}

/// How a stop went.
#[derive(Debug, Clone, Default)]
pub struct Stopped {
    pub pids: Vec<u32>,
    /// Processes that ignored the stop request (SIGTERM) for
    /// `stop_timeout` and were ended.
    pub killed: Vec<u32>,
    /// Processes that could not be asked (a Windows program without a
    /// window) and were ended once the others had stopped.
    pub ended: Vec<u32>,
}

/// A process this node started, with its exit status once it has one.
#[derive(Debug, Clone)]
pub struct Started {
    pub pid: u32,
    pub at: Instant,
    /// When it started, in seconds since the Unix epoch (as the system
    /// dates processes).
    wall: u64,
    /// The process name the application runs as.
    name: Option<String>,
    exit: Arc<Mutex<Option<ExitStatus>>>,
}

impl std::fmt::Display for Started {
    /// The process, as the apply log names it: "pid 4242", or that a
    /// service's manager names no main process (it has already ended).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.pid {
            0 => f.write_str("no main process"),
            pid => write!(f, "pid {pid}"),
        }
    }
}

impl Started {
    fn exited(&self) -> Option<ExitStatus> {
        self.exit.lock().ok().and_then(|e| *e)
    }
}

/// The size at which the application's output log is rotated.
pub const APP_LOG_MAX: u64 = 8 << 20;
/// Rotated application logs kept beside the current one.
pub const APP_LOG_KEEP: usize = 3;

/// The application of one install directory.
#[derive(Debug, Clone)]
pub struct App {
    pub config: AppConfig,
    /// Where the started application's stdout and stderr go.
    pub log: PathBuf,
}

fn refresh_kind() -> ProcessRefreshKind {
    ProcessRefreshKind::nothing()
        .with_exe(UpdateKind::Always)
        .with_cwd(UpdateKind::Always)
        .without_tasks()
}

fn name_matches(name: &OsStr, exe: Option<&Path>, wanted: &str) -> bool {
    let name = name.to_string_lossy();
    name == wanted
        || platform::same_program(&name, wanted)
        || exe.and_then(Path::file_name).is_some_and(|f| f == wanted)
        || (wanted.len() > COMM_LEN && wanted.as_bytes().get(..COMM_LEN) == Some(name.as_bytes()))
}

fn alive(status: ProcessStatus) -> bool {
    !matches!(status, ProcessStatus::Zombie | ProcessStatus::Dead)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether process `pid` runs (a zombie does not).
fn process_alive(pid: u32) -> bool {
    let mut sys = System::new();
    let id = Pid::from_u32(pid);
    sys.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[id]),
        true,
        ProcessRefreshKind::nothing().without_tasks(),
    );
    sys.process(id).is_some_and(|p| alive(p.status()))
}

impl App {
    pub fn new(config: AppConfig, log: PathBuf) -> App {
        App { config, log }
    }

    /// The install directory as the system reports process paths
    /// (symbolic links resolved).
    fn install_root(&self) -> PathBuf {
        platform::real_path(&self.config.install_dir)
    }

    /// Whether the application is a service its service manager runs.
    pub fn is_service(&self) -> bool {
        self.config.service.is_some()
    }

    /// The process name to look for: the configured one, else the
    /// manifest's AppName.
    pub fn name<'a>(&'a self, manifest_name: Option<&'a str>) -> Option<&'a str> {
        self.config.name.as_deref().or(manifest_name)
    }

    /// The application's live processes: those with its name, and the one
    /// `app.pid_file` names, that run from the install directory.
    pub fn processes(&self, name: Option<&str>) -> Vec<AppProcess> {
        if let Some(service) = &self.config.service {
            return match platform::app_service::state(service) {
                Ok(view) if view.running => vec![AppProcess {
                    pid: view.pid.unwrap_or(0),
                    start_time: 0,
                }],
                _ => Vec::new(),
            };
        }
        let pid_file = self.pid_file_process().map(|(pid, _)| pid);
        if name.is_none() && pid_file.is_none() {
            return Vec::new();
        }
        let root = self.install_root();
        let mut sys = System::new();
        sys.refresh_processes_specifics(ProcessesToUpdate::All, true, refresh_kind());
        let own = std::process::id();
        let mut found: Vec<AppProcess> = sys
            .processes()
            .values()
            .filter(|p| p.pid().as_u32() != own && p.thread_kind().is_none())
            .filter(|p| alive(p.status()))
            .filter(|p| {
                Some(p.pid().as_u32()) == pid_file
                    || name.is_some_and(|name| name_matches(p.name(), p.exe(), name))
            })
            .filter(|p| {
                p.exe().is_some_and(|e| e.starts_with(&root))
                    || p.cwd().is_some_and(|c| c.starts_with(&root))
            })
            .map(|p| AppProcess {
                pid: p.pid().as_u32(),
                start_time: p.start_time(),
            })
            .collect();
        found.sort_by_key(|p| p.pid);
        found
    }

    /// Which of `procs` still run.
    fn still_running(procs: &[AppProcess]) -> Vec<AppProcess> {
        let pids: Vec<Pid> = procs.iter().map(|p| Pid::from_u32(p.pid)).collect();
        let mut sys = System::new();
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().without_tasks(),
        );
        procs
            .iter()
            .filter(|want| {
                sys.process(Pid::from_u32(want.pid))
                    .is_some_and(|p| alive(p.status()) && p.start_time() == want.start_time)
            })
            .copied()
            .collect()
    }

    /// Stops every process of the application: a stop request (SIGTERM; on
    /// Windows a close request to its windows and a Ctrl-Break to its
    /// console group), then the end (SIGKILL; `TerminateProcess`) for those
    /// still running after `stop_timeout`, and then whatever is left of the
    /// process tree the node started (its process group; its job object),
    /// so no child of the application outlives it. Returns once all are
    /// gone.
    pub fn stop(&self, name: Option<&str>) -> Result<Stopped, AppError> {
        if let Some(service) = &self.config.service {
            return self.stop_service(service);
        }
        let procs = self.processes(name);
        let mut stopped = Stopped {
            pids: procs.iter().map(|p| p.pid).collect(),
            ..Stopped::default()
        };
        if procs.is_empty() {
            return Ok(stopped);
        }
        let (asked, unasked): (Vec<AppProcess>, Vec<AppProcess>) =
            procs.iter().partition(|p| platform::request_stop(p.pid));
        let deadline = Instant::now() + self.config.stop_timeout;
        let mut ignoring = Self::still_running(&asked);
        while !ignoring.is_empty() && Instant::now() < deadline {
            std::thread::sleep(POLL);
            ignoring = Self::still_running(&ignoring);
        }
        stopped.killed = ignoring.iter().map(|p| p.pid).collect();
        stopped.ended = Self::still_running(&unasked)
            .iter()
            .map(|p| p.pid)
            .collect();
        if !stopped.killed.is_empty() {
            tracing::warn!(pids = ?stopped.killed, timeout = ?self.config.stop_timeout, "the application ignored the stop request; ending it");
        }
        let mut left = Self::still_running(&procs);
        left.iter().for_each(|p| platform::kill(p.pid));
        platform::stop_tree(&self.config.install_dir, &stopped.pids);
        let waited = Instant::now();
        while !left.is_empty() {
            if waited.elapsed() > Duration::from_secs(10) {
                return Err(AppError::Unkillable {
                    pid: left[0].pid,
                    waited: waited.elapsed(),
                });
            }
            std::thread::sleep(POLL);
            left = Self::still_running(&left);
        }
        Ok(stopped)
    }

    /// Stops the application's service through its manager, which stops
    /// its whole process tree (its cgroup; its process).
    fn stop_service(&self, service: &str) -> Result<Stopped, AppError> {
        let error = |reason| AppError::Service {
            service: service.to_owned(),
            reason,
        };
        let view = platform::app_service::state(service).map_err(error)?;
        if !view.running {
            return Ok(Stopped::default());
        }
        platform::app_service::stop(service, self.config.stop_timeout + Duration::from_secs(10))
            .map_err(error)?;
        Ok(Stopped {
            pids: view.pid.into_iter().collect(),
            ..Stopped::default()
        })
    }

    /// Starts the application's service; its main process is the one
    /// judged.
    fn start_service(&self, service: &str, name: Option<&str>) -> Result<Started, AppError> {
        let error = |reason| AppError::Service {
            service: service.to_owned(),
            reason,
        };
        let at = Instant::now();
        platform::app_service::start(service).map_err(error)?;
        let mut view = platform::app_service::state(service).map_err(error)?;
        while view.running && view.pid.is_none() && at.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(POLL);
            view = platform::app_service::state(service).map_err(error)?;
        }
        Ok(Started {
            pid: view.pid.unwrap_or(0),
            at,
            wall: unix_now(),
            name: self.name(name).map(str::to_owned),
            exit: Arc::new(Mutex::new(None)),
        })
    }

    /// A service must stay running, with the main process it started with,
    /// for `health_after` (a service its manager restarts crashed).
    fn check_service(&self, service: &str, started: &Started) -> Result<(), AppError> {
        let deadline = started.at + self.config.health_after;
        loop {
            let view =
                platform::app_service::state(service).map_err(|reason| AppError::Service {
                    service: service.to_owned(),
                    reason,
                })?;
            let same = started.pid == 0 || view.pid == Some(started.pid);
            if !view.running || !same {
                return Err(AppError::ServiceDown {
                    service: service.to_owned(),
                    after: started.at.elapsed(),
                    detail: if view.running {
                        format!(
                            "its main process {} is gone, now {:?} ({})",
                            started.pid, view.pid, view.detail
                        )
                    } else {
                        view.detail
                    },
                });
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
        if let Some(argv) = &self.config.health_command {
            self.run_health_command(argv)?;
        }
        Ok(())
    }

    /// The start command: `app.start`, else the manifest's AppName Exe or
    /// Name inside the install directory.
    fn start_command(
        &self,
        exe: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<String>, AppError> {
        if let Some(start) = &self.config.start {
            return Ok(start.clone());
        }
        exe.or(name)
            .map(|e| vec![e.to_owned()])
            .ok_or(AppError::NoStartCommand)
    }

    /// A program path as the start and health commands use it: relative
    /// paths with a folder in them, or naming a file that exists in the
    /// install directory, resolve there; bare names are looked up on PATH.
    fn program(&self, program: &str) -> PathBuf {
        let path = Path::new(program);
        let inside = self.config.install_dir.join(path);
        if path.is_absolute() {
            path.to_owned()
        } else if program.contains(['/', '\\']) || inside.exists() {
            inside
        } else {
            path.to_owned()
        }
    }

    /// Rotates the application's output log once it has reached
    /// [`APP_LOG_MAX`] (copied to `app.log.1`, emptied in place: the
    /// running application keeps its file open), keeping [`APP_LOG_KEEP`].
    pub fn rotate_log(&self) -> std::io::Result<bool> {
        crate::logfile::rotate_in_place(&self.log, APP_LOG_MAX, APP_LOG_KEEP)
    }

    /// Starts the application from its install directory, in its own
    /// process group, output appended to the log. `exe` and `name` are the
    /// manifest's AppName Exe and Name, used when `app.start` is not set.
    pub fn start(&self, exe: Option<&str>, name: Option<&str>) -> Result<Started, AppError> {
        if let Some(service) = &self.config.service {
            return self.start_service(service, name);
        }
        let argv = self.start_command(exe, name)?;
        if let Err(e) = self.rotate_log() {
            tracing::warn!(log = %self.log.display(), error = %e, "cannot rotate the application's log");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| AppError::Log {
                path: self.log.clone(),
                source,
            })?;
        let err_log = log.try_clone().map_err(|source| AppError::Log {
            path: self.log.clone(),
            source,
        })?;
        let program = self.program(&argv[0]);
        let mut command = Command::new(&program);
        command
            .args(&argv[1..])
            .current_dir(&self.config.install_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log);
        platform::detach(&mut command);
        let start_error = |source| AppError::Start {
            program: program.display().to_string(),
            source,
        };
        let mut child = command.spawn().map_err(start_error)?;
        if let Err(e) = platform::adopt(&child, &self.config.install_dir) {
            let _ = child.kill();
            return Err(start_error(e));
        }
        let started = Started {
            pid: child.id(),
            at: Instant::now(),
            wall: unix_now(),
            name: self.name(name).map(str::to_owned),
            exit: Arc::new(Mutex::new(None)),
        };
        // Reaped here while the node lives; after that, by init.
        let exit = started.exit.clone();
        std::thread::spawn(move || {
            if let Ok(status) = child.wait() {
                if let Ok(mut e) = exit.lock() {
                    *e = Some(status);
                }
            }
        });
        Ok(started)
    }

    /// The new process must still run `health_after` after its start, and
    /// then `health_command`, if set, must exit 0 within `health_timeout`.
    /// A process that exits 0 having left the application running (a
    /// launcher, a daemon that forks) hands over: the process it left (the
    /// one `app.pid_file` names, else the application's newest process by
    /// name in the install directory) is the one judged from then on.
    pub fn check_health(&self, started: &Started) -> Result<(), AppError> {
        if let Some(service) = &self.config.service {
            return self.check_service(service, started);
        }
        let health_after = self.config.health_after;
        let deadline = started.at + health_after;
        let mut judged: Option<u32> = None;
        loop {
            match judged {
                None => {
                    if let Some(status) = started.exited() {
                        judged = Some(self.follow(started, status, deadline)?);
                    }
                }
                Some(pid) if !process_alive(pid) => {
                    return Err(AppError::Vanished {
                        pid,
                        after: started.at.elapsed(),
                    })
                }
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
        // The reaper may need a moment to see an exit that just happened.
        std::thread::sleep(POLL);
        let pid = match judged {
            Some(pid) => pid,
            None => match started.exited() {
                Some(status) => self.follow(started, status, Instant::now())?,
                None => started.pid,
            },
        };
        if !process_alive(pid) {
            return Err(AppError::Vanished {
                pid,
                after: started.at.elapsed(),
            });
        }
        if let Some(argv) = &self.config.health_command {
            self.run_health_command(argv)?;
        }
        Ok(())
    }

    /// The started process exited with `status`: a failure, or (exit 0) a
    /// launcher whose application runs on in the process this returns,
    /// looked for until `deadline` (and at least two seconds: a daemon
    /// writes its pid file a moment after its launcher exits).
    fn follow(
        &self,
        started: &Started,
        status: ExitStatus,
        deadline: Instant,
    ) -> Result<u32, AppError> {
        if !status.success() {
            return Err(AppError::Exited {
                status: status.to_string(),
                after: started.at.elapsed(),
                health_after: self.config.health_after,
            });
        }
        let until = deadline.max(Instant::now() + Duration::from_secs(2));
        loop {
            if let Some(pid) = self.left_running(started) {
                tracing::info!(
                    launcher = started.pid,
                    pid,
                    "the application's launcher exited 0; judging the process it left running"
                );
                return Ok(pid);
            }
            if Instant::now() >= until {
                return Err(AppError::LeftNothing {
                    status: status.to_string(),
                    after: started.at.elapsed(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The application's process that a launcher started at `started`
    /// left running: the one the pid file names, else the oldest of its
    /// processes by name that started no earlier than the launcher.
    fn left_running(&self, started: &Started) -> Option<u32> {
        let since = started.wall.saturating_sub(1);
        if self.config.pid_file.is_some() {
            let (pid, start_time) = self.pid_file_process()?;
            return (start_time >= since && pid != started.pid).then_some(pid);
        }
        self.processes(started.name.as_deref())
            .into_iter()
            .filter(|p| p.pid != started.pid && p.start_time >= since)
            .min_by_key(|p| (p.start_time, p.pid))
            .map(|p| p.pid)
    }

    /// The live process `app.pid_file` names, with its start time.
    fn pid_file_process(&self) -> Option<(u32, u64)> {
        let path = self.config.pid_file.as_ref()?;
        let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
        let mut sys = System::new();
        let id = Pid::from_u32(pid);
        sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[id]),
            true,
            ProcessRefreshKind::nothing().without_tasks(),
        );
        sys.process(id)
            .filter(|p| alive(p.status()))
            .map(|p| (pid, p.start_time()))
    }

    fn run_health_command(&self, argv: &[String]) -> Result<(), AppError> {
        self.run_bounded(argv, self.config.health_timeout, "app.health_timeout")
            .map_err(|reason| AppError::Unhealthy {
                command: argv.join(" "),
                reason,
            })
    }

    /// Runs `argv` in the install directory (a relative program found
    /// there); `Err` says why it failed: it could not start, it exited
    /// non-zero, or it did not finish within `timeout` (`setting` names
    /// the config key) and was killed.
    pub fn run_bounded(
        &self,
        argv: &[String],
        timeout: Duration,
        setting: &str,
    ) -> Result<(), String> {
        let Some(program) = argv.first() else {
            return Err("no program given".into());
        };
        let mut command = Command::new(self.program(program));
        command
            .args(&argv[1..])
            .current_dir(&self.config.install_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // A tree of its own (a process group, a job object), ended whole
        // when the command is done: what it started does not outlive it.
        platform::detach(&mut command);
        let mut child = command.spawn().map_err(|e| format!("cannot run it: {e}"))?;
        let tree = PathBuf::from(format!("bounded command {}", child.id()));
        if let Err(e) = platform::adopt(&child, &tree) {
            // Not let run (on Windows it waits, suspended, for its job).
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("cannot run it in a process tree of its own: {e}"));
        }
        let deadline = Instant::now() + timeout;
        let ended = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break Ok(()),
                Ok(Some(status)) => {
                    break Err(match status.code() {
                        Some(code) => format!("it exited with status {code}"),
                        None => format!("it was ended by a signal ({status})"),
                    })
                }
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!("no answer within {timeout:?} ({setting})"));
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => break Err(e.to_string()),
            }
        };
        platform::stop_tree(&tree, &[child.id()]);
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_linux_reports_them() {
        let long = "a-very-long-application-name";
        assert!(name_matches(OsStr::new("TIMS"), None, "TIMS"));
        assert!(name_matches(OsStr::new("a-very-long-app"), None, long));
        assert!(name_matches(
            OsStr::new("x"),
            Some(Path::new("/opt/tims/bin/TIMS")),
            "TIMS"
        ));
        assert!(!name_matches(OsStr::new("TIMSX"), None, "TIMS"));
        assert!(!name_matches(OsStr::new("TIM"), None, "TIMS"));
    }
}

//! The node as a Windows service: the Service Control Manager's side.
//!
//! `lanup node --windows-service` is what the SCM starts (`lanup service
//! install` registers it so). The node reports *start pending* with a wait
//! hint until it has recovered its state and listens, then *running*; a
//! stop or a shutdown from the SCM stops it as SIGTERM does on Linux, with
//! *stop pending* and a wait hint while it finishes; it ends *stopped*,
//! with a service-specific exit code when it failed. The SCM's recovery
//! actions (set at install, and by the service itself at each start, since
//! the MSI cannot express them) start it again after a failure: the
//! counterpart of `Restart=on-failure`. The SCM has no watchdog, so the
//! node keeps its own: a node whose loop has not said it is alive for
//! [`WEDGED`] stops with a failure, and recovery starts it again.

use std::ffi::OsString;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tracing::{info, warn};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// The service's name in the SCM.
pub const SERVICE_NAME: &str = "lanup";

/// How long a service node may go without its loop saying it is alive
/// before it stops itself for the SCM to restart it.
pub const WEDGED: Duration = Duration::from_secs(120);

/// The exit code of a node that stops so that the SCM starts it again (a
/// new lanup, or a wedged node).
const RESTART_CODE: u32 = 75;

static HANDLE: OnceLock<service_control_handler::ServiceStatusHandle> = OnceLock::new();
static STOP: OnceLock<tokio::sync::Notify> = OnceLock::new();
static STOPPING: AtomicBool = AtomicBool::new(false);
static CHECKPOINT: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`started`] when the node last said it is alive.
static ALIVE_MS: AtomicU64 = AtomicU64::new(0);
static BODY: Mutex<Option<Box<dyn FnOnce() -> i32 + Send>>> = Mutex::new(None);
static EXIT: AtomicU64 = AtomicU64::new(0);

fn started() -> Instant {
    static AT: OnceLock<Instant> = OnceLock::new();
    *AT.get_or_init(Instant::now)
}

fn stop_notify() -> &'static tokio::sync::Notify {
    STOP.get_or_init(tokio::sync::Notify::new)
}

/// Whether this process runs under the SCM.
pub fn running_as_service() -> bool {
    HANDLE.get().is_some()
}

fn report(state: ServiceState, exit: u32, wait_hint: Duration) {
    let Some(handle) = HANDLE.get() else { return };
    let pending = matches!(
        state,
        ServiceState::StartPending | ServiceState::StopPending
    );
    let status = ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: if exit == 0 {
            ServiceExitCode::Win32(0)
        } else {
            ServiceExitCode::ServiceSpecific(exit)
        },
        checkpoint: if pending {
            CHECKPOINT.fetch_add(1, Ordering::Relaxed) as u32 + 1
        } else {
            0
        },
        wait_hint,
        process_id: None,
    };
    if let Err(e) = handle.set_service_status(status) {
        warn!(error = %e, "cannot tell the Service Control Manager the node's state");
    }
}

define_windows_service!(ffi_service_main, service_main);

fn service_main(_arguments: Vec<OsString>) {
    let handler = |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            STOPPING.store(true, Ordering::SeqCst);
            report(ServiceState::StopPending, 0, Duration::from_secs(30));
            stop_notify().notify_waiters();
            stop_notify().notify_one();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let handle = match service_control_handler::register(SERVICE_NAME, handler) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("lanup: cannot register with the Service Control Manager: {e}");
            return;
        }
    };
    let _ = HANDLE.set(handle);
    report(ServiceState::StartPending, 0, Duration::from_secs(60));
    if let Err(e) = own_recovery() {
        warn!(error = %format!("{e:#}"), "the Service Control Manager will not restart this node after a failure");
    }
    let body = BODY.lock().ok().and_then(|mut b| b.take());
    let code = body.map_or(1, |body| body());
    EXIT.store(code as u64, Ordering::SeqCst);
    report(ServiceState::Stopped, code as u32, Duration::ZERO);
}

/// Runs `body` (the node) as the service the SCM started; returns its exit
/// code once the SCM has been told it stopped. Fails when this process was
/// not started by the SCM.
pub fn run_as_service(body: impl FnOnce() -> i32 + Send + 'static) -> Result<i32> {
    started();
    if let Ok(mut slot) = BODY.lock() {
        *slot = Some(Box::new(body));
    }
    service_dispatcher::start(SERVICE_NAME, ffi_service_main)
        .context("cannot reach the Service Control Manager (`--windows-service` is for the SCM; run `lanup node` by hand without it)")?;
    Ok(EXIT.load(Ordering::SeqCst) as i32)
}

/// Completes when the node is asked to stop: Ctrl-C, or the SCM's stop or
/// shutdown.
pub async fn stop_requested() {
    if STOPPING.load(Ordering::SeqCst) {
        return;
    }
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = stop_notify().notified() => {}
    }
}

/// Stops this process so that the SCM starts the service again (its
/// recovery acts on a failure, `failure actions on non-crash failures` is
/// set at install).
pub fn exit_for_restart() -> ! {
    report(ServiceState::Stopped, RESTART_CODE, Duration::ZERO);
    std::process::exit(RESTART_CODE as i32)
}

/// The node's line to the SCM; silent when the node was started by hand.
#[derive(Debug)]
pub struct Notifier {
    watchdog: bool,
}

impl Notifier {
    pub fn from_env() -> Notifier {
        Notifier { watchdog: false }
    }

    /// The node is up: its state recovered, its control pipe listening, its
    /// swarm running. Starts the node's own watchdog.
    pub fn ready(&mut self) {
        if !running_as_service() || crate::upgrade::on_trial() {
            return;
        }
        report(ServiceState::Running, 0, Duration::ZERO);
        self.alive();
        if !self.watchdog {
            self.watchdog = true;
            std::thread::spawn(|| loop {
                std::thread::sleep(WEDGED / 8);
                let quiet =
                    started().elapsed().as_millis() as u64 - ALIVE_MS.load(Ordering::Relaxed);
                if quiet > WEDGED.as_millis() as u64 && !STOPPING.load(Ordering::SeqCst) {
                    warn!(quiet_ms = quiet, "the node's loop has not answered; stopping for the Service Control Manager to start it again");
                    exit_for_restart();
                }
            });
        }
    }

    /// The node's parts answered.
    pub fn alive(&mut self) {
        ALIVE_MS.store(started().elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The SCM shows no status text.
    pub fn status(&mut self, _text: &str) {}

    pub fn stopping(&mut self) {
        STOPPING.store(true, Ordering::SeqCst);
        report(ServiceState::StopPending, 0, Duration::from_secs(30));
    }
}

/// Registers `lanup node --windows-service --config CONFIG` with the SCM as
/// the `lanup` service, running as LocalSystem, started automatically when
/// `start` (else disabled until configured), restarted 5 s after a failure
/// (three times a day, then every minute).
pub fn install(binary: &std::path::Path, config: &std::path::Path, start: bool) -> Result<()> {
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("cannot open the Service Control Manager (run as Administrator)")?;
    let info = ServiceInfo {
        name: SERVICE_NAME.into(),
        display_name: "lanup update node".into(),
        service_type: ServiceType::OWN_PROCESS,
        start_type: if start {
            ServiceStartType::AutoStart
        } else {
            ServiceStartType::Disabled
        },
        error_control: ServiceErrorControl::Normal,
        executable_path: binary.to_owned(),
        launch_arguments: vec![
            "node".into(),
            "--windows-service".into(),
            "--config".into(),
            config.into(),
        ],
        dependencies: vec![],
        account_name: None,
        account_password: None,
    };
    let service = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .context("cannot register the lanup service")?;
    service
        .set_description("Takes this machine's application updates from the site's peers")
        .context("cannot describe the lanup service")?;
    set_recovery(&service)?;
    info!(binary = %binary.display(), "registered the lanup service");
    Ok(())
}

/// The SCM starts the service again 5 s after a failure, twice, then after
/// a minute, the count reset after a day without one; a stop with an exit
/// code other than 0 counts as a failure (a new lanup, a wedged node).
fn set_recovery(service: &windows_service::service::Service) -> Result<()> {
    let restart = |secs| ServiceAction {
        action_type: ServiceActionType::Restart,
        delay: Duration::from_secs(secs),
    };
    service
        .update_failure_actions(ServiceFailureActions {
            reset_period: ServiceFailureResetPeriod::After(Duration::from_secs(86_400)),
            reboot_msg: None,
            command: None,
            actions: Some(vec![restart(5), restart(5), restart(60)]),
        })
        .context("cannot set the lanup service's recovery actions")?;
    service
        .set_failure_actions_on_non_crash_failures(true)
        .context("cannot set the lanup service's recovery actions")
}

/// Sets the service's recovery actions from inside it, at each start, so
/// that a service registered by the installer (which cannot express them)
/// has them too.
fn own_recovery() -> Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the Service Control Manager")?;
    let service = manager
        .open_service(SERVICE_NAME, ServiceAccess::CHANGE_CONFIG)
        .context("cannot open the lanup service")?;
    set_recovery(&service)
}

/// Makes the `lanup` service start with the machine, and starts it now:
/// what an administrator does once the node is configured (the MSI
/// registers it disabled).
pub fn enable() -> Result<()> {
    use windows_sys::Win32::System::Services::{
        ChangeServiceConfigW, SERVICE_AUTO_START, SERVICE_NO_CHANGE,
    };
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the Service Control Manager (run as Administrator)")?;
    let service = manager
        .open_service(
            SERVICE_NAME,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .context("cannot open the lanup service (is lanup installed?)")?;
    let null = std::ptr::null();
    // SAFETY: a valid service handle, and SERVICE_NO_CHANGE or null for
    // everything but the start type.
    let changed = unsafe {
        ChangeServiceConfigW(
            service.raw_handle(),
            SERVICE_NO_CHANGE,
            SERVICE_AUTO_START,
            SERVICE_NO_CHANGE,
            null,
            null,
            std::ptr::null_mut(),
            null,
            null,
            null,
            null,
        )
    };
    if changed == 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot make the lanup service start with the machine");
    }
    let state = service.query_status().map(|s| s.current_state);
    if !matches!(
        state,
        Ok(ServiceState::Running | ServiceState::StartPending)
    ) {
        service
            .start::<&str>(&[])
            .context("cannot start the lanup service")?;
    }
    Ok(())
}

/// Stops and removes the `lanup` service.
pub fn uninstall() -> Result<()> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("cannot open the Service Control Manager (run as Administrator)")?;
    let service = manager
        .open_service(
            SERVICE_NAME,
            ServiceAccess::STOP | ServiceAccess::QUERY_STATUS | ServiceAccess::DELETE,
        )
        .context("cannot open the lanup service")?;
    if service
        .query_status()
        .is_ok_and(|s| s.current_state != ServiceState::Stopped)
    {
        let _ = service.stop();
    }
    service.delete().context("cannot remove the lanup service")
}

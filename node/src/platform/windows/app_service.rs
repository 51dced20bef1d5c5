//! An application that is a Windows service (`app.service`): stopped,
//! started and judged through the Service Control Manager.

use std::time::{Duration, Instant};

use windows_service::service::{Service, ServiceAccess, ServiceExitCode, ServiceState};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};

use super::super::ServiceView;

fn open(name: &str, access: ServiceAccess) -> Result<Service, String> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .map_err(|e| format!("cannot open the Service Control Manager: {e}"))?;
    manager
        .open_service(name, access)
        .map_err(|e| format!("cannot open the service {name}: {e}"))
}

/// The service's state: running (or starting), its process, and what the
/// SCM says of it.
pub fn state(name: &str) -> Result<ServiceView, String> {
    let status = open(name, ServiceAccess::QUERY_STATUS)?
        .query_status()
        .map_err(|e| format!("cannot query the service {name}: {e}"))?;
    let exit = match status.exit_code {
        ServiceExitCode::Win32(code) => format!("exit code {code}"),
        ServiceExitCode::ServiceSpecific(code) => format!("service-specific exit code {code}"),
    };
    Ok(ServiceView {
        running: matches!(
            status.current_state,
            ServiceState::Running | ServiceState::StartPending
        ),
        pid: status.process_id.filter(|p| *p > 0),
        detail: format!("{:?}, {exit}", status.current_state),
    })
}

/// Starts the service; returns once the SCM has started its process.
pub fn start(name: &str) -> Result<(), String> {
    open(name, ServiceAccess::START | ServiceAccess::QUERY_STATUS)?
        .start::<&str>(&[])
        .map_err(|e| format!("cannot start the service {name}: {e}"))
}

/// Stops the service and waits until it has stopped, within `timeout`.
pub fn stop(name: &str, timeout: Duration) -> Result<(), String> {
    let service = open(name, ServiceAccess::STOP | ServiceAccess::QUERY_STATUS)?;
    let stopped = |s: &Service| {
        s.query_status()
            .is_ok_and(|s| s.current_state == ServiceState::Stopped)
    };
    // A service that ends its process while it answers the stop control
    // makes the call fail; what counts is whether it stops.
    let asked = if stopped(&service) {
        Ok(())
    } else {
        service.stop().map(|_| ())
    };
    let deadline = Instant::now() + timeout;
    while !stopped(&service) {
        if Instant::now() > deadline {
            return Err(match asked {
                Ok(()) => format!("the service {name} did not stop within {timeout:?}"),
                Err(e) => format!("cannot stop the service {name}: {e}"),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

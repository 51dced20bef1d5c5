//! Security descriptors from SDDL strings: who may open the control pipe
//! and a private file.

use std::ffi::c_void;
use std::io;
use std::path::Path;

use windows_sys::Win32::Foundation::{LocalFree, HLOCAL};
use windows_sys::Win32::Security::Authorization::{
    ConvertStringSecurityDescriptorToSecurityDescriptorW, SDDL_REVISION_1,
};
use windows_sys::Win32::Security::{
    SetFileSecurityW, DACL_SECURITY_INFORMATION, PROTECTED_DACL_SECURITY_INFORMATION,
    PSECURITY_DESCRIPTOR, SECURITY_ATTRIBUTES,
};

use super::wide;

/// Full access for SYSTEM, the Administrators group and the object's
/// owner, nobody else, nothing inherited: what mode 0600 is to a root-run
/// node on Linux.
pub(crate) const OWNER_ADMINS_SYSTEM: &str = "D:P(A;;GA;;;SY)(A;;GA;;;BA)(A;;GA;;;OW)";

/// A security descriptor made by the system from SDDL, freed on drop.
#[derive(Debug)]
pub(crate) struct Descriptor(PSECURITY_DESCRIPTOR);

// SAFETY: the descriptor is a block of memory this value owns alone; the
// system only reads it.
unsafe impl Send for Descriptor {}
// SAFETY: as above: never written after it is made.
unsafe impl Sync for Descriptor {}

impl Descriptor {
    pub(crate) fn from_sddl(sddl: &str) -> io::Result<Descriptor> {
        let text = wide(sddl);
        let mut sd: PSECURITY_DESCRIPTOR = std::ptr::null_mut();
        // SAFETY: `text` is a NUL-terminated UTF-16 string that outlives the
        // call; `sd` receives memory the system allocates, freed on drop.
        let ok = unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                text.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                std::ptr::null_mut(),
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Descriptor(sd))
    }

    /// Security attributes pointing at this descriptor, for creating an
    /// object (valid while `self` lives).
    pub(crate) fn attributes(&self) -> SECURITY_ATTRIBUTES {
        SECURITY_ATTRIBUTES {
            nLength: std::mem::size_of::<SECURITY_ATTRIBUTES>() as u32,
            lpSecurityDescriptor: self.0,
            bInheritHandle: 0,
        }
    }

    /// Sets this descriptor's access list on the file at `path`, replacing
    /// the one it inherited.
    pub(crate) fn apply_to(&self, path: &Path) -> io::Result<()> {
        let name = wide(path.as_os_str());
        // SAFETY: `name` is NUL-terminated and `self.0` a valid descriptor,
        // both alive for the call.
        let ok = unsafe {
            SetFileSecurityW(
                name.as_ptr(),
                DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                self.0,
            )
        };
        if ok == 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Descriptor {
    fn drop(&mut self) {
        // SAFETY: the descriptor came from LocalAlloc inside
        // ConvertStringSecurityDescriptorToSecurityDescriptorW.
        unsafe { LocalFree(self.0 as HLOCAL) };
    }
}

/// The raw pointer `tokio`'s pipe options take for security attributes.
pub(crate) fn raw(attributes: &mut SECURITY_ATTRIBUTES) -> *mut c_void {
    (attributes as *mut SECURITY_ATTRIBUTES).cast()
}

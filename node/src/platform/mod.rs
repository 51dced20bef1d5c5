//! What differs between the systems a node runs on, behind one interface,
//! so that the rest of the node needs no `cfg`: so far file modes and
//! positioned reads and writes. Both sides compile for their target; the
//! Unix side is what every test here runs.

#[cfg(unix)]
mod unix;
#[cfg(unix)]
pub use unix::*;

#[cfg(windows)]
mod windows;
#[cfg(windows)]
pub use windows::*;

//! Workspace-level tests live under `tests/`; this library is empty.

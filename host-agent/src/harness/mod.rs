//! The pieces that boot a throwaway guest: a private libvirtd in its own mount
//! namespace and a shell on the guest's serial console. `vmplug verify-image`
//! runs on them, and so does the end-to-end test suite (`tests/`): one code path
//! for both. Every wait is bounded and every failure is an error, never a panic.

pub mod console;
pub mod libvirtd;
pub mod workdir;

/// Why the harness could not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HarnessError(pub String);

impl HarnessError {
    pub fn new(msg: impl Into<String>) -> Self {
        HarnessError(msg.into())
    }
}

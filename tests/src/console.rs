//! The guest's serial console shell: `vmplug::harness::console`, the same code
//! `vmplug verify-image` runs.

pub use vmplug::harness::console::Console;

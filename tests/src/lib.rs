//! The end-to-end fixture: a private libvirtd per test, a real QEMU guest booted
//! from Debian's kernel and a busybox initramfs running the static `vmplug-guest`,
//! and the real `vmplug` binary driven as an operator would.
//!
//! Each test owns its daemon, its guest, its sockets and its CID. Every wait is
//! bounded; on failure the guest console, the QEMU/libvirtd logs and the agent
//! log are printed; teardown always runs (Drop, including after a panic), and a
//! later run reaps daemons left behind by a killed run, by their PID files.

pub mod cache;
pub mod console;
pub mod env;
pub mod guest;
pub mod images;
pub mod initramfs;
pub mod libvirtd;
pub mod procs;
pub mod schema;
pub mod stats;
pub mod verify;

pub use env::Env;
pub use guest::{Guest, GuestKernel, GuestSpec, Transport};

//! Types shared by vmplug's host orchestrator and guest agent: `CpuSet`, sizes, the
//! protocol and its framing. No I/O here (the optional `io` feature adds async
//! framing over tokio streams), so everything is unit-tested in isolation.
#![deny(unsafe_code)]

pub mod cpuset;
#[cfg(feature = "io")]
#[allow(unsafe_code)]
pub mod fdstream;
pub mod frame;
pub mod protocol;
pub mod size;
pub mod text;

pub use cpuset::{CpuSet, CpuSetError};
pub use size::{BlockSize, Bytes, SizeError, GIB, KIB, MIB};

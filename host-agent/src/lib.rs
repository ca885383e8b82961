//! vmplug, the host orchestrator: every operation of the guide through libvirt,
//! each constraint checked before acting, and a closed loop with the guest agent.

pub mod autoscale;
pub mod cli;
pub mod completion;
pub mod domain;
pub mod facts;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod harness;
pub mod libvirt;
pub mod link;
pub mod locale;
pub mod lograte;
pub mod manual;
pub mod meta;
pub mod ops;
pub mod plan;
pub mod planner;
pub mod preflight;
pub mod prepare;
pub mod report;
pub mod settings;
pub mod trust;
pub mod tune;
pub mod unplug;
pub mod verb;
pub mod verify;
pub mod vmem;
pub mod vmem_add;
pub mod vmem_detach;
pub mod wait;
pub mod xml;

//! hatch: a self-hosted microVM control plane (daemon, REST API and CLI).

pub mod api;
pub mod cli;
pub mod config;
pub mod crash;
pub mod domain;
pub mod ids;
pub mod image;
pub mod manager;
pub mod net;
pub mod proxy;
pub mod snapshot;
pub mod ssh;
pub mod store;
pub mod telemetry;
pub mod vmm;

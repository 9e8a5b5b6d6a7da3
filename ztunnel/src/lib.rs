//! Node-level ambient mesh tunnel daemon (library). The binary in `main.rs` only parses the
//! command line ([`cli`]) and calls [`app::run`]; everything else lives in the modules below,
//! each named after the one concern it handles. See ARCHITECTURE.md for how they fit together.

pub mod accept;
pub mod admin;
pub mod app;
pub mod authz;
pub mod burst;
pub mod ca_service;
pub mod capture;
pub mod cli;
pub mod cni;
pub mod config;
pub mod dns;
pub mod drain;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod k8s;
pub mod memory;
pub mod proxy;
pub mod socket;
pub mod source;
pub mod splice;
pub mod state;
pub mod status;
pub mod telemetry;
pub mod tls;
pub mod workers;

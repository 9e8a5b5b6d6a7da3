//! Node-level ambient mesh tunnel daemon (library). The binary in `main.rs` only parses the
//! command line and calls [`app::run`]; everything else lives in the modules below, each named
//! after the one concern it handles. See ARCHITECTURE.md for how they fit together.

pub mod config;
pub mod identity;
pub mod source;
pub mod state;
pub mod tls;

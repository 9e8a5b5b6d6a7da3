//! The waypoint: the optional L7 proxy of an ambient mesh.
//!
//! Node daemons hand flows whose destination has a waypoint to it over HBONE (HTTP/2 CONNECT
//! over mutual TLS on 15008), with the original destination as the CONNECT authority. The
//! waypoint terminates that with its own SPIFFE identity, reads who the client is from its
//! certificate, and when the stream carries HTTP serves it request by request: Gateway API
//! `HTTPRoute` rules pick a backend Service ([`routing`]), filters edit the request, and each
//! request goes on over HBONE to an endpoint pod, with its own identity again. Anything that
//! is not HTTP is forwarded as a plain byte stream.
//!
//! The HBONE client and server, TLS, identities and certificates, the Kubernetes object model
//! and the state snapshot all come from the `ztunnel` library, so both binaries speak the
//! same wire protocol from the same code. See ARCHITECTURE.md ("Waypoint") for the modules.

pub mod admin;
pub mod app;
pub mod authz;
pub mod check;
pub mod forward;
pub mod io;
pub mod metrics;
pub mod normalize;
pub mod report;
pub mod routing;
pub mod server;
pub mod snapshot;
pub mod upstream;

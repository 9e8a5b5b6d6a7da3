//! Why a flow was refused, and what the client and the telemetry see of it.
//!
//! Every refusal is a [`FlowError`]; its HBONE status ([`FlowError::status`]) and its response
//! flag ([`FlowError::flag`]) are decided here and nowhere else. Captured TCP clients learn of a
//! refusal by a reset ([`Response::Reset`]); HBONE clients by the status.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use http::StatusCode;

use crate::authz::Reason as DenyReason;
use crate::hbone::HboneError;
use crate::state::ResolveError;
use crate::telemetry::ResponseFlag;

/// Why a flow was refused.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// A captured outbound connection whose source is not an enrolled pod of this node.
    #[error("{0} is not an enrolled pod of this node")]
    UnknownSource(IpAddr),
    /// The destination service has no ready endpoint for the port.
    #[error(transparent)]
    NoRoute(#[from] ResolveError),
    /// The destination is not an enrolled pod of this node.
    #[error("{0} is not an enrolled pod of this node")]
    NotLocal(SocketAddr),
    /// An HBONE request for another pod than the one the connection was made to.
    #[error("authority {authority} does not match the connection's destination {local}")]
    AuthorityMismatch {
        /// The `:authority` asked for.
        authority: SocketAddr,
        /// Where the connection arrived (the pod whose certificate was presented).
        local: SocketAddr,
    },
    /// An HBONE request for one of the daemon's own ports.
    #[error("authority {0} names one of the daemon's own ports; refused to avoid a loop")]
    Loop(SocketAddr),
    /// Authorization refused the flow.
    #[error("{0}")]
    Denied(DenyReason),
    /// The destination pod (or, passing through, the external destination) refused or did not
    /// answer.
    #[error(transparent)]
    Connect(#[from] io::Error),
    /// The HBONE tunnel to the destination's node failed or was refused.
    #[error(transparent)]
    Tunnel(#[from] HboneError),
    /// The HBONE stream could not be answered.
    #[error("cannot accept the HBONE stream: {0}")]
    Accept(#[from] h2::Error),
}

impl FlowError {
    /// The status an HBONE client gets.
    pub fn status(&self) -> StatusCode {
        match self {
            FlowError::AuthorityMismatch { .. } | FlowError::Loop(_) => StatusCode::BAD_REQUEST,
            FlowError::Denied(_) => StatusCode::UNAUTHORIZED,
            FlowError::UnknownSource(_)
            | FlowError::NoRoute(_)
            | FlowError::NotLocal(_)
            | FlowError::Connect(_)
            | FlowError::Tunnel(_)
            | FlowError::Accept(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response flag of the metrics and the access log.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            FlowError::UnknownSource(_)
            | FlowError::NoRoute(_)
            | FlowError::NotLocal(_)
            | FlowError::AuthorityMismatch { .. }
            | FlowError::Loop(_) => ResponseFlag::NoRoute,
            FlowError::Denied(_) => ResponseFlag::Denied,
            FlowError::Connect(_) | FlowError::Tunnel(_) | FlowError::Accept(_) => {
                ResponseFlag::UpstreamFailure
            }
        }
    }

    /// The authorization reason, for a denied flow.
    pub fn deny_reason(&self) -> Option<&DenyReason> {
        match self {
            FlowError::Denied(r) => Some(r),
            _ => None,
        }
    }
}

/// What a refused client gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Response {
    /// An HBONE client: this status.
    Status(StatusCode),
    /// A TCP client: its connection is reset.
    Reset,
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Response::Status(s) => f.write_str(s.as_str()),
            Response::Reset => f.write_str("reset"),
        }
    }
}

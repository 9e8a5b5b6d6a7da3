//! One record per flow, for the metrics and the access log.
//!
//! A flow's [`FlowReport`] is built once, when the flow knows where it goes, and everything a
//! user sees of the flow comes from it: the Istio metric labels ([`super::ConnLabels`]), and
//! the one `access` log line written when it ends (the line operators and the tests read).
//! Byte counts follow Istio: `bytes_received` came from the client, `bytes_sent` went to it.

use std::fmt::Display;
use std::net::SocketAddr;
use std::time::Instant;

use super::metrics::{ConnMeter, Metrics, Protocol, Reporter, ResponseFlag};
use crate::identity::SpiffeId;
use crate::splice::Transferred;
use crate::state::{Service, Waypoint, Workload};

/// What is known of one flow, from one reporter's point of view.
#[derive(Debug, Clone, Copy)]
pub struct FlowReport<'a> {
    /// Which end reports.
    pub reporter: Reporter,
    /// How the flow travels.
    pub protocol: Protocol,
    /// Client address.
    pub src: SocketAddr,
    /// Destination address (the pod and its port once known, else the original destination).
    pub dst: SocketAddr,
    /// The client pod, when known.
    pub src_workload: Option<&'a Workload>,
    /// The destination pod, when known.
    pub dst_workload: Option<&'a Workload>,
    /// The client's identity, when proven (peer certificate) or known first-hand.
    pub src_identity: Option<&'a SpiffeId>,
    /// The destination's identity, when known.
    pub dst_identity: Option<&'a SpiffeId>,
    /// The service dialled (its VIP) or else the first service selecting the destination pod.
    pub service: Option<&'a Service>,
    /// The waypoint the flow was handed to (source reporter only). The destination workload
    /// and identity are then the waypoint pod's, as in Istio's metrics; the log line names the
    /// waypoint so a flow to a Service can be told from one through its waypoint.
    pub waypoint: Option<&'a Waypoint>,
    /// When the flow was accepted.
    pub start: Instant,
}

/// Why a flow ended without success, as the access log shows it.
#[derive(Clone, Copy)]
pub struct Failure<'e> {
    /// The response flag of the metrics and the log.
    pub flag: ResponseFlag,
    /// What went wrong, for the `error` field.
    pub error: &'e dyn Display,
    /// Why authorization refused or revoked the flow, for the `deny_reason` field.
    pub deny_reason: Option<&'e dyn Display>,
}

impl FlowReport<'_> {
    /// Counts the flow as opened; bytes go to the returned meter as they move, and dropping it
    /// counts the close.
    pub fn open(&self, metrics: &Metrics) -> ConnMeter {
        metrics.open(self, ResponseFlag::None)
    }

    /// A flow that ended before data could flow: counted opened and closed with the failure's
    /// flag, and logged.
    pub fn refused(&self, metrics: &Metrics, failure: Failure<'_>) {
        drop(metrics.open(self, failure.flag));
        self.log(
            failure.flag,
            Transferred::default(),
            Some(failure.error),
            failure.deny_reason,
        );
    }

    /// A flow that carried data has ended; `error` when it did not end cleanly, `deny_reason`
    /// when a policy change revoked it. Its metrics keep the flag it opened with (`-`).
    pub fn closed(
        &self,
        meter: ConnMeter,
        bytes: Transferred,
        error: Option<&dyn Display>,
        deny_reason: Option<&dyn Display>,
    ) {
        // Count the close before the log line, so whoever reads the log sees the metric too.
        drop(meter);
        self.log(ResponseFlag::None, bytes, error, deny_reason);
    }

    fn log(
        &self,
        flag: ResponseFlag,
        bytes: Transferred,
        error: Option<&dyn Display>,
        deny_reason: Option<&dyn Display>,
    ) {
        let name = |w: Option<&Workload>| w.map(Workload::key).unwrap_or_default();
        let id = |i: Option<&SpiffeId>| i.map(ToString::to_string).unwrap_or_default();
        tracing::info!(
            target: "access",
            reporter = %self.reporter,
            protocol = %self.protocol,
            src_addr = %self.src,
            dst_addr = %self.dst,
            src_workload = name(self.src_workload),
            dst_workload = name(self.dst_workload),
            src_identity = id(self.src_identity),
            dst_identity = id(self.dst_identity),
            bytes_received = bytes.to_tunnel,
            bytes_sent = bytes.from_tunnel,
            duration_ms = self.start.elapsed().as_millis() as u64,
            response_flags = %flag,
            error = error.map(ToString::to_string),
            deny_reason = deny_reason.map(ToString::to_string),
            waypoint = self.waypoint.map(Waypoint::key),
            "access"
        );
    }
}

//! The daemon once ready (`steady_state`): state changes followed (open flows re-checked,
//! certificates, capture), the CNI plugin answered, capture re-synced, until a signal,
//! `/quitquitquit` or a hand-over stops it ([`Stop`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::data_plane::DataPlane;
use super::{Shared, Signals};
use crate::admin::{CaptureSnapshot, CaptureView, Readiness};
use crate::capture::{Capture, LocalPod};
use crate::cni::{Announcement, CniStats, Pending};
use crate::config::Config;
use crate::handover;
use crate::identity::{CertManager, SpiffeId};
use crate::state::State;

/// How often capture is re-checked against the state without a state change.
const CAPTURE_RESYNC: Duration = Duration::from_secs(2);

/// Why the daemon left its steady state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// A signal or `/quitquitquit`: drain and exit.
    Requested,
    /// A new daemon of this node accepts on the sockets now: drain and exit, leaving capture
    /// and the socket files to it.
    HandedOver,
}

/// What the main task owns in `steady_state`: capture, the pods the CNI plugin announced,
/// and the plugin's requests.
pub(super) struct MainLoop<'a> {
    pub(super) capture: &'a mut Option<Capture>,
    pub(super) pending: Pending,
    pub(super) cni: Option<tokio::sync::mpsc::Receiver<Announcement>>,
    pub(super) cni_stats: CniStats,
}

/// The next CNI request, or never without a CNI endpoint.
async fn next_announcement(
    rx: &mut Option<tokio::sync::mpsc::Receiver<Announcement>>,
) -> Option<Announcement> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Follows state changes (open flows re-checked, certificates, capture), answers the CNI
/// plugin ([`crate::cni::answer`]: capture in place before the answer) and re-syncs capture
/// now and then (a pod's veth may appear after its object does; announcements expire), until
/// SIGTERM, SIGINT, `/quitquitquit` or a completed hand-over. While a hand-over is in progress
/// capture is the new daemon's to change (CNI requests wait; those still waiting when the
/// hand-over completes fail, and the runtime retries them with the new daemon), readiness
/// answers 503, and a signal waits for its outcome (a second one stops accepting at once,
/// leaving the shared queues to the new daemon).
pub(super) async fn steady_state(
    shared: &Shared,
    data_plane: &DataPlane,
    main: MainLoop<'_>,
    mut state_rx: watch::Receiver<Arc<State>>,
    signals: &mut Signals,
    handover: &mut Option<mpsc::UnboundedReceiver<handover::Event>>,
) -> Stop {
    let cfg = &shared.cfg;
    let MainLoop {
        capture,
        mut pending,
        cni: mut cni_rx,
        cni_stats,
    } = main;
    let mut resync = tokio::time::interval(CAPTURE_RESYNC);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut handing_over, mut stop_asked) = (false, false);
    loop {
        let event = async {
            match handover.as_mut() {
                Some(rx) => rx.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = resync.tick(), if !handing_over => {
                let state = state_rx.borrow().clone();
                sync_capture(cfg, capture.as_mut(), &state, &mut pending, &shared.capture, &shared.readiness, false);
            }
            changed = state_rx.changed() => {
                if changed.is_err() {
                    return Stop::Requested;
                }
                let state = state_rx.borrow_and_update().clone();
                data_plane.proxy.recheck_connections(&state);
                update_certificates(cfg, &shared.certs, &state);
                if !handing_over {
                    sync_capture(cfg, capture.as_mut(), &state, &mut pending, &shared.capture, &shared.readiness, true);
                }
            }
            Some(a) = next_announcement(&mut cni_rx), if !handing_over => {
                let state = state_rx.borrow().clone();
                let sync = |c: &mut Capture, p: &mut Pending| {
                    sync_capture(cfg, Some(c), &state, p, &shared.capture, &shared.readiness, true);
                };
                let reply = crate::cni::answer(
                    &a.request,
                    &state,
                    &cfg.node_name,
                    &mut pending,
                    capture.as_mut(),
                    sync,
                    &cni_stats,
                );
                // The plugin may have given up meanwhile; nothing to do then.
                let _ = a.reply.send(reply);
            }
            signal = signals.recv() => {
                if !handing_over {
                    tracing::info!("{signal} received; draining");
                    return Stop::Requested;
                }
                if stop_asked {
                    tracing::info!("{signal} received again during the hand-over; no longer \
                        accepting (the new daemon takes what waits), draining");
                    shared.serving.close();
                    return Stop::HandedOver;
                }
                tracing::info!("{signal} received during a hand-over; serving until the new \
                    daemon is ready (another signal stops accepting now)");
                stop_asked = true;
            }
            _ = shared.drain.started() => {
                tracing::info!("drain requested through the admin socket");
                return Stop::Requested;
            }
            Some(event) = event => match event {
                handover::Event::Started { .. } => {
                    handing_over = true;
                    shared.readiness.set_handing_over(true);
                }
                handover::Event::Aborted => {
                    handing_over = false;
                    shared.readiness.set_handing_over(false);
                    if stop_asked {
                        tracing::info!("draining, as signalled during the hand-over");
                        return Stop::Requested;
                    }
                    let state = state_rx.borrow().clone();
                    sync_capture(cfg, capture.as_mut(), &state, &mut pending, &shared.capture, &shared.readiness, true);
                }
                handover::Event::Completed { .. } => return Stop::HandedOver,
            },
        }
    }
}

/// The SPIFFE identities of the enrolled workloads on this node.
pub(super) fn local_identities(cfg: &Config, state: &State) -> BTreeSet<SpiffeId> {
    state
        .local_workloads(&cfg.node_name)
        .filter(|w| w.enrolled)
        .map(|w| (*w.identity).clone())
        .collect()
}

/// Tells the certificate manager which identities this node needs now.
pub(super) fn update_certificates(cfg: &Config, certs: &Arc<CertManager>, state: &State) {
    certs.set_identities(&local_identities(cfg, state));
}

/// Brings capture in line with `state`. Logs `capture updated` after a state change, and after
/// a periodic resync only when the attached interfaces changed.
pub(super) fn sync_capture(
    cfg: &Config,
    capture: Option<&mut Capture>,
    state: &State,
    pending: &mut Pending,
    view: &CaptureView,
    readiness: &Readiness,
    state_changed: bool,
) {
    let Some(capture) = capture else { return };
    let mut pods: Vec<LocalPod> = state
        .local_workloads(&cfg.node_name)
        .filter_map(|w| LocalPod::new(w.key(), &w.ips, w.enrolled, w.dns_capture))
        .collect();
    // Pods the CNI plugin announced that the state does not show yet.
    pending.merge(&mut pods, std::time::Instant::now());
    let problems = capture.sync(&pods);
    for (pod, error) in &problems {
        // Warn once per state change; the periodic retries stay quiet.
        if state_changed {
            tracing::warn!(%pod, %error, "capture not in place for pod; retrying");
        } else {
            tracing::debug!(%pod, %error, "capture still not in place for pod");
        }
    }
    let enrolled = pods.iter().filter(|p| p.enrolled).count();
    let interfaces = capture.attached();
    let attached = interfaces.len();
    let blockers: Vec<String> = capture
        .pods()
        .iter()
        .filter_map(|p| {
            let problem = p.problem.as_deref().filter(|_| !p.captured)?;
            let ips: Vec<String> = p.ips.iter().map(ToString::to_string).collect();
            Some(format!(
                "capture of pod {} ({}) not in place: {problem}",
                p.name,
                ips.join(", ")
            ))
        })
        .collect();
    let blocked = blockers.len();
    readiness.set_blockers(blockers);
    let interfaces_changed = view.update(CaptureSnapshot {
        interfaces,
        enrolled: capture.enrolled(),
        enrolled_pods: capture.enrolled_pods(),
        drops: capture.drop_counts(),
        uplinks: capture.uplinks().to_vec(),
        pods: capture.pods().to_vec(),
    });
    if state_changed || interfaces_changed {
        tracing::info!(
            generation = state.generation,
            enrolled,
            not_captured = blocked,
            interfaces = attached,
            "capture updated"
        );
    }
}

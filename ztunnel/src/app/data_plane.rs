//! What serves traffic, started once every listener is bound: the DNS proxy, and the data
//! plane (worker threads, HBONE pool, proxy, HBONE server and the accept loops of 15001, 15006
//! and 15008), with the once-a-second watch over its descriptors and heap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::listeners::{DataPlaneListeners, DnsSockets};
use super::{AppError, Shared};
use crate::dns::{self, DnsStats};
use crate::hbone::client::Pool;
use crate::hbone::limits::Limits;
use crate::hbone::server::Server;
use crate::proxy::route::Node;
use crate::proxy::{Captured, Proxy};
use crate::workers::Workers;

/// The DNS proxy's counters (registered whether or not it runs), and the proxy itself when
/// configured. Upstreams default to /etc/resolv.conf; without any, forwarded names get
/// SERVFAIL.
pub(super) fn start_dns(shared: &Shared, sockets: Option<DnsSockets>) -> Arc<DnsStats> {
    let stats = Arc::new(DnsStats::default());
    shared.metrics.register(|r| stats.register(r));
    let cfg = &shared.cfg;
    let (Some(d), Some(DnsSockets { udp, tcp, ipv6 })) = (&cfg.dns, sockets) else {
        return stats;
    };
    let upstreams = if d.upstreams.is_empty() {
        dns::upstream::read_resolv_conf(std::path::Path::new("/etc/resolv.conf")).unwrap_or_else(
            |e| {
                tracing::warn!(error = %e, "dns: no upstream; names outside the mesh get SERVFAIL");
                Vec::new()
            },
        )
    } else {
        d.upstreams.clone()
    };
    tracing::info!(port = cfg.ports.dns, upstreams = ?upstreams, "dns proxy listening");
    let upstream = Arc::new(dns::upstream::Resolver::new(&upstreams, d.upstream_timeout));
    let handler = dns::Handler::new(
        shared.state.clone(),
        &cfg.cluster_domain,
        upstream,
        stats.clone(),
    );
    let gate = dns::limits::Gate::new(d.limits, stats.refused.clone());
    let serving = &shared.serving;
    for (udp, tcp) in std::iter::once((udp, tcp)).chain(ipv6) {
        tokio::spawn(serving.clone().run(dns::server::run_udp(
            udp,
            handler.clone(),
            cfg.daemon_mark,
            gate.clone(),
        )));
        tokio::spawn(serving.clone().run(dns::server::run_tcp(
            tcp,
            handler.clone(),
            gate.clone(),
            shared.accept_errors.clone(),
        )));
    }
    stats
}

/// What serves flows, as `start_data_plane` built it. The main task re-checks open flows
/// through the proxy on state changes; metrics and the admin API read the pool and workers.
pub(super) struct DataPlane {
    /// HBONE connections to other nodes.
    pub(super) pool: Pool,
    /// The data-plane worker threads.
    pub(super) workers: Arc<Workers>,
    /// Outbound and inbound flows.
    pub(super) proxy: Arc<Proxy>,
}

/// Starts the data plane on `listeners`: the worker threads, the HBONE pool, the proxy, the
/// HBONE server, and the accept loops of 15001, 15006 and 15008 (tasks of this runtime that
/// hand each accepted socket to a worker).
pub(super) fn start_data_plane(
    shared: &Shared,
    listeners: DataPlaneListeners,
) -> Result<DataPlane, AppError> {
    let cfg = &shared.cfg;
    let (sockets, drain) = (&shared.sockets, &shared.drain);
    let pool = Pool::new(cfg.hbone.clone(), shared.certs.clone(), sockets.clone());
    let workers = Arc::new(
        Workers::start(cfg.worker_threads, shared.accept_errors.clone())
            .map_err(AppError::Workers)?,
    );
    let proxy = Proxy::new(
        Node::from_config(cfg),
        &cfg.root_namespace,
        shared.state.clone(),
        pool.clone(),
        sockets.clone(),
        shared.metrics.clone(),
    );
    let limits = Limits::new(cfg.hbone_inbound.clone());
    shared.metrics.register(|r| limits.register(r));
    tokio::spawn(watch_resources(limits.clone(), cfg.release_code_pages));
    let server = Server::with_limits(
        cfg.hbone.clone(),
        limits.clone(),
        &cfg.trust_domain,
        shared.certs.clone(),
        proxy.clone(),
        drain.clone(),
    );
    let mut captured = vec![
        (listeners.outbound, Captured::Outbound),
        (listeners.inbound_plaintext, Captured::InboundPlaintext),
    ];
    let mut hbone = vec![listeners.hbone];
    if let Some(v6) = listeners.ipv6 {
        captured.push((v6.outbound, Captured::Outbound));
        captured.push((v6.inbound_plaintext, Captured::InboundPlaintext));
        hbone.push(v6.hbone);
    }
    for (listener, kind) in captured {
        let (proxy, w, d, serving) = (
            proxy.clone(),
            workers.clone(),
            drain.clone(),
            shared.serving.clone(),
        );
        workers
            .spawn_acceptor(listener, move |l| serving.run(proxy.serve(l, kind, w, d)))
            .map_err(AppError::Workers)?;
    }
    // An HBONE connection does not count for the drain itself: its streams do. Connections
    // are admitted at accept, so one over a limit is reset before a worker or TLS sees it.
    let admit = move |peer: SocketAddr| match limits.admit(peer.ip()) {
        Ok(admitted) => Some(admitted),
        Err(reason) => {
            limits.refused_connection(reason, peer, "reset at accept");
            None
        }
    };
    let serve = move |tcp, peer, guard, admitted| {
        drop(guard);
        server.clone().serve_admitted(tcp, peer, admitted)
    };
    for listener in hbone {
        let (w, d, serving) = (workers.clone(), drain.clone(), shared.serving.clone());
        let (admit, serve) = (admit.clone(), serve.clone());
        workers
            .spawn_acceptor(listener, move |l| {
                serving
                    .run(async move { w.accept_loop_admitting(l, "hbone", &d, admit, serve).await })
            })
            .map_err(AppError::Workers)?;
    }
    Ok(DataPlane {
        pool,
        workers,
        proxy,
    })
}

/// How often descriptors are counted, held-back refusal lines written, and a drop in
/// connections checked for memory to give back.
const RESOURCE_TICK: Duration = Duration::from_secs(1);

/// Every [`RESOURCE_TICK`]: counts the process's descriptors for the HBONE limits, writes the
/// refusal summaries held back, and gives freed heap back to the kernel after a burst of
/// inbound connections ended or when steady traffic left it growing
/// ([`crate::memory::Reclaim`]).
async fn watch_resources(limits: Arc<Limits>, code_pages: bool) {
    let mut reclaim = crate::memory::Reclaim::default();
    let mut tick = tokio::time::interval(RESOURCE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let l = limits.clone();
        let counted = tokio::task::spawn_blocking(move || {
            l.sample_descriptors();
            l
        })
        .await;
        let Ok(l) = counted else { continue };
        l.flush_logs();
        if let Some(released) = reclaim.after(l.in_use(), code_pages) {
            tracing::debug!(bytes = released, "free heap given back to the kernel");
        }
    }
}

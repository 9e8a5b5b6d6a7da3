//! Forwarding of names the mesh does not own to the upstream resolvers, with hickory-resolver:
//! UDP first, TCP when the answer is truncated, a small cache that honours the answers' TTLs,
//! and one overall timeout after which the pod gets SERVFAIL.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use futures::future::BoxFuture;
use hickory_resolver::config::{NameServerConfigGroup, ResolveHosts, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::{Query, ResponseCode};
use hickory_resolver::proto::rr::Record;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::TokioResolver;

/// Entries kept by the upstream cache.
const CACHE_SIZE: usize = 512;

/// What an upstream said about a query.
#[derive(Debug)]
pub enum Forwarded {
    /// An answer (possibly NXDOMAIN or NOERROR without records) to relay.
    Answer {
        /// Response code to relay.
        rcode: ResponseCode,
        /// Answer records (CNAME chains included).
        answers: Vec<Record>,
        /// Authority records (the SOA of negative answers).
        authority: Vec<Record>,
    },
    /// No usable answer (timeout, unreachable, upstream failure): SERVFAIL.
    Failed(String),
}

/// Something that answers queries the mesh does not own. The daemon uses [`Resolver`]; the
/// unit tests of the query path use a stand-in.
pub trait Upstream: Send + Sync {
    /// Resolves one question.
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded>;
}

/// Why the upstream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No resolver configured and none in resolv.conf.
    #[error(
        "no upstream DNS resolver: --dns-upstream is not set and {path} lists no nameserver \
         ({reason}); set --dns-upstream or --dns-capture=false"
    )]
    NoResolver {
        /// resolv.conf path.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// The real upstream: hickory's caching resolver over the configured servers.
pub struct Resolver {
    resolver: TokioResolver,
    timeout: Duration,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("servers", &self.resolver.config().name_servers())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Resolver {
    /// A resolver for `servers` (all tried, UDP then TCP), failing after `timeout` per query.
    pub fn new(servers: &[SocketAddr], timeout: Duration) -> Resolver {
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            // UDP and TCP to each; `true`: trust their NXDOMAIN.
            group.merge(NameServerConfigGroup::from_ips_clear(
                &[s.ip()],
                s.port(),
                true,
            ));
        }
        let config = ResolverConfig::from_parts(None, Vec::new(), group);
        let mut opts = ResolverOpts::default();
        opts.ndots = 0;
        opts.timeout = timeout;
        opts.attempts = 1;
        opts.cache_size = CACHE_SIZE;
        opts.use_hosts_file = ResolveHosts::Never;
        opts.preserve_intermediates = true;
        opts.edns0 = true;
        opts.try_tcp_on_error = true;
        let resolver = hickory_resolver::Resolver::builder_with_config(
            config,
            TokioConnectionProvider::default(),
        )
        .with_options(opts)
        .build();
        Resolver { resolver, timeout }
    }
}

impl Upstream for Resolver {
    fn forward(&self, query: Query) -> BoxFuture<'_, Forwarded> {
        Box::pin(async move {
            let lookup = self
                .resolver
                .lookup(query.name().clone(), query.query_type());
            match tokio::time::timeout(self.timeout, lookup).await {
                Err(_) => Forwarded::Failed(format!("no answer within {:?}", self.timeout)),
                Ok(Ok(l)) => Forwarded::Answer {
                    rcode: ResponseCode::NoError,
                    answers: l.records().to_vec(),
                    authority: Vec::new(),
                },
                Ok(Err(e)) => match e.proto().map(|p| p.kind()) {
                    Some(ProtoErrorKind::NoRecordsFound {
                        response_code, soa, ..
                    }) if matches!(
                        response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                    {
                        Forwarded::Answer {
                            rcode: *response_code,
                            answers: Vec::new(),
                            authority: soa
                                .iter()
                                .map(|s| s.as_ref().clone().into_record_of_rdata())
                                .collect(),
                        }
                    }
                    _ => Forwarded::Failed(e.to_string()),
                },
            }
        })
    }
}

/// The `nameserver` lines of a resolv.conf, port 53.
pub fn read_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, UpstreamError> {
    let err = |reason: String| UpstreamError::NoResolver {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let servers: Vec<SocketAddr> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // Link-local IPv6 with a zone (`fe80::1%eth0`) is not supported: skipped.
            words.next()?.parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .collect();
    if servers.is_empty() {
        return Err(err("no usable `nameserver` line".into()));
    }
    Ok(servers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("resolv.conf");
        std::fs::write(
            &p,
            "# c\nsearch x\nnameserver 10.0.0.53\nnameserver ::1\nnameserver bad\n",
        )
        .expect("write");
        let s = read_resolv_conf(&p).expect("servers");
        assert_eq!(
            s,
            vec![
                "10.0.0.53:53".parse().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
        std::fs::write(&p, "search x\n").expect("write");
        let e = read_resolv_conf(&p).expect_err("none").to_string();
        assert!(
            e.contains("resolv.conf") && e.contains("--dns-upstream"),
            "{e}"
        );
    }
}

//! Who may have which certificate: the CA service's decision, apart from gRPC and from the API
//! server (whose answers come in through [`PodDirectory`]), so every rule is tested in-process.
//!
//! The rules:
//! - a caller is a Kubernetes service account, authenticated by a TokenReview;
//! - any service account may have its own identity;
//! - a node agent (a configured service account, `istio-system/ztunnel` by default) may have
//!   another identity only while a pod with that identity is scheduled on the agent's own
//!   node. The node is the `spec.nodeName` of the pod the agent's token is bound to (the
//!   TokenReview names it), never a name the agent sends: a node agent that could name its node
//!   could name any node;
//! - the CSR's one SAN must be exactly the identity granted.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;

use crate::identity::SpiffeId;

/// TokenReview's user `extra` key naming the pod a bound token belongs to.
pub const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// TokenReview's user `extra` key with that pod's UID.
pub const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";

/// Why a request is refused; each maps to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No token, or one the API server does not accept.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// The caller is known but may not have this identity.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The request itself is malformed (CSR, metadata).
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    /// The API server could not be asked; the caller should retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl Refusal {
    /// The gRPC status the caller gets.
    pub fn status(&self) -> tonic::Status {
        match self {
            Refusal::Unauthenticated(m) => tonic::Status::unauthenticated(m.clone()),
            Refusal::PermissionDenied(m) => tonic::Status::permission_denied(m.clone()),
            Refusal::InvalidArgument(m) => tonic::Status::invalid_argument(m.clone()),
            Refusal::Unavailable(m) => tonic::Status::unavailable(m.clone()),
        }
    }
}

/// What a TokenReview said about a token.
#[derive(Debug, Clone, Default)]
pub struct ReviewedToken {
    /// `status.authenticated`.
    pub authenticated: bool,
    /// `status.user.username`.
    pub username: String,
    /// `status.user.extra`.
    pub extra: BTreeMap<String, Vec<String>>,
    /// `status.error`, if any.
    pub error: Option<String>,
}

/// The pod a bound service-account token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    /// Pod name (in the service account's namespace).
    pub name: String,
    /// Pod UID; a pod re-created under the same name has another.
    pub uid: Option<String>,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Service account namespace.
    pub namespace: String,
    /// Service account name.
    pub service_account: String,
    /// The pod its token is bound to, when it is.
    pub pod: Option<BoundPod>,
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// The caller a TokenReview vouches for: a service account, or a refusal.
pub fn caller_of(review: &ReviewedToken) -> Result<Caller, Refusal> {
    if !review.authenticated {
        let why = review
            .error
            .as_deref()
            .unwrap_or("token rejected by the API server");
        return Err(Refusal::Unauthenticated(why.to_string()));
    }
    let rest = review
        .username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| {
            Refusal::PermissionDenied(format!(
                "{} is not a service account; only workloads get certificates",
                review.username
            ))
        })?;
    let (namespace, service_account) = rest
        .split_once(':')
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty())
        .ok_or_else(|| {
            Refusal::Unauthenticated(format!("malformed username {}", review.username))
        })?;
    let one = |key: &str| {
        review
            .extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|s| !s.is_empty())
            .cloned()
    };
    Ok(Caller {
        namespace: namespace.to_string(),
        service_account: service_account.to_string(),
        pod: one(POD_NAME_KEY).map(|name| BoundPod {
            name,
            uid: one(POD_UID_KEY),
        }),
    })
}

/// The fields of a pod the decision reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// Name.
    pub name: String,
    /// UID.
    pub uid: Option<String>,
    /// `spec.serviceAccountName` (empty means `default`).
    pub service_account: String,
    /// `spec.nodeName`, once scheduled.
    pub node_name: Option<String>,
    /// `status.phase`.
    pub phase: Option<String>,
}

impl PodView {
    fn service_account(&self) -> &str {
        if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        }
    }

    /// A pod that has finished never needs a certificate again.
    fn is_live(&self) -> bool {
        !matches!(self.phase.as_deref(), Some("Succeeded" | "Failed"))
    }
}

/// A boxed future borrowing its arguments.
pub type Lookup<'a, T> = Pin<Box<dyn Future<Output = Result<T, Refusal>> + Send + 'a>>;

/// The pod look-ups the decision needs (the API server in `ztunnel ca serve`, a map in tests).
pub trait PodDirectory: Send + Sync {
    /// Pod `namespace/name`, if it exists.
    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> Lookup<'a, Option<PodView>>;
    /// The pods of `namespace` scheduled on `node`.
    fn pods_on_node<'a>(&'a self, namespace: &'a str, node: &'a str) -> Lookup<'a, Vec<PodView>>;
}

/// The CA's fixed rules.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only trust domain signed.
    pub trust_domain: String,
    /// Service accounts (`namespace`, `name`) of node agents.
    pub node_agents: Vec<(String, String)>,
}

/// A decision and what it was based on, for the log.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The identity asked for, once known.
    pub requested: Option<SpiffeId>,
    /// The caller's node, once known.
    pub node: Option<String>,
    /// The identity to sign, or why not.
    pub result: Result<SpiffeId, Refusal>,
}

/// Decides whether `caller` may have a certificate for the CSR whose SAN is `csr_id`, on
/// behalf of `impersonated` (the request's `ImpersonatedIdentity`) when given.
pub async fn authorize(
    policy: &Policy,
    caller: &Caller,
    csr_id: &SpiffeId,
    impersonated: Option<&str>,
    pods: &dyn PodDirectory,
) -> Decision {
    let mut decision = Decision {
        requested: None,
        node: None,
        result: Err(Refusal::PermissionDenied("undecided".into())),
    };
    decision.result = decide(policy, caller, csr_id, impersonated, pods, &mut decision).await;
    decision
}

async fn decide(
    policy: &Policy,
    caller: &Caller,
    csr_id: &SpiffeId,
    impersonated: Option<&str>,
    pods: &dyn PodDirectory,
    seen: &mut Decision,
) -> Result<SpiffeId, Refusal> {
    let requested = match impersonated {
        Some(uri) => SpiffeId::parse(uri)
            .map_err(|e| Refusal::InvalidArgument(format!("ImpersonatedIdentity: {e}")))?,
        None => csr_id.clone(),
    };
    seen.requested = Some(requested.clone());
    if requested.trust_domain != policy.trust_domain {
        return Err(Refusal::PermissionDenied(format!(
            "{requested} is outside trust domain {}",
            policy.trust_domain
        )));
    }
    if csr_id != &requested {
        return Err(Refusal::PermissionDenied(format!(
            "the CSR asks for {csr_id}, the request for {requested}"
        )));
    }
    let own = SpiffeId::new(
        &policy.trust_domain,
        &caller.namespace,
        &caller.service_account,
    );
    if requested == own {
        return Ok(requested);
    }
    let is_agent = policy
        .node_agents
        .iter()
        .any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account);
    if !is_agent {
        return Err(Refusal::PermissionDenied(format!(
            "{caller} may only have its own identity {own}; it is not a node agent"
        )));
    }
    let bound = caller.pod.as_ref().ok_or_else(|| {
        Refusal::PermissionDenied(format!(
            "the token of node agent {caller} is not bound to a pod, so its node is unknown; \
             use a projected (pod-bound) service-account token"
        ))
    })?;
    let agent_pod = pods
        .pod(&caller.namespace, &bound.name)
        .await?
        .ok_or_else(|| {
            Refusal::PermissionDenied(format!(
                "the pod {}/{} the token is bound to no longer exists",
                caller.namespace, bound.name
            ))
        })?;
    if bound.uid.is_some() && agent_pod.uid != bound.uid {
        return Err(Refusal::PermissionDenied(format!(
            "pod {}/{} was re-created since the token was issued",
            caller.namespace, bound.name
        )));
    }
    if agent_pod.service_account() != caller.service_account {
        return Err(Refusal::PermissionDenied(format!(
            "pod {}/{} does not run as {caller}",
            caller.namespace, bound.name
        )));
    }
    let node = agent_pod.node_name.clone().ok_or_else(|| {
        Refusal::PermissionDenied(format!(
            "pod {}/{} is not scheduled on a node",
            caller.namespace, bound.name
        ))
    })?;
    seen.node = Some(node.clone());
    let local = pods.pods_on_node(&requested.namespace, &node).await?;
    let found = local.iter().any(|p| {
        p.node_name.as_deref() == Some(node.as_str())
            && p.service_account() == requested.service_account
            && p.is_live()
    });
    if found {
        Ok(requested)
    } else {
        Err(Refusal::PermissionDenied(format!(
            "no pod with identity {requested} is scheduled on node {node}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Pods by namespace, as the API server would list them.
    #[derive(Default)]
    struct Pods(HashMap<String, Vec<PodView>>);

    impl Pods {
        fn add(mut self, ns: &str, name: &str, sa: &str, node: &str) -> Self {
            self.0.entry(ns.into()).or_default().push(PodView {
                name: name.into(),
                uid: Some(format!("uid-{name}")),
                service_account: sa.into(),
                node_name: Some(node.into()),
                phase: Some("Running".into()),
            });
            self
        }
    }

    impl PodDirectory for Pods {
        fn pod<'a>(&'a self, ns: &'a str, name: &'a str) -> Lookup<'a, Option<PodView>> {
            let found = self
                .0
                .get(ns)
                .and_then(|v| v.iter().find(|p| p.name == name).cloned());
            Box::pin(async move { Ok(found) })
        }
        fn pods_on_node<'a>(&'a self, ns: &'a str, node: &'a str) -> Lookup<'a, Vec<PodView>> {
            let found = self
                .0
                .get(ns)
                .map(|v| {
                    v.iter()
                        .filter(|p| p.node_name.as_deref() == Some(node))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            Box::pin(async move { Ok(found) })
        }
    }

    fn policy() -> Policy {
        Policy {
            trust_domain: "cluster.local".into(),
            node_agents: vec![("istio-system".into(), "ztunnel".into())],
        }
    }

    fn cluster() -> Pods {
        Pods::default()
            .add("istio-system", "ztunnel-a", "ztunnel", "node1")
            .add("istio-system", "ztunnel-b", "ztunnel", "node2")
            .add("mesh", "client", "client", "node1")
            .add("mesh", "server", "server", "node2")
            .add("mesh", "plain", "", "node1")
    }

    fn review(user: &str, pod: Option<&str>) -> ReviewedToken {
        let mut extra = BTreeMap::new();
        if let Some(p) = pod {
            extra.insert(POD_NAME_KEY.to_string(), vec![p.to_string()]);
            extra.insert(POD_UID_KEY.to_string(), vec![format!("uid-{p}")]);
        }
        ReviewedToken {
            authenticated: true,
            username: user.into(),
            extra,
            error: None,
        }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", ns, sa)
    }

    async fn ask(r: &ReviewedToken, csr: &SpiffeId, imp: Option<&str>) -> Decision {
        let caller = caller_of(r).expect("authenticated");
        authorize(&policy(), &caller, csr, imp, &cluster()).await
    }

    const AGENT: &str = "system:serviceaccount:istio-system:ztunnel";

    #[tokio::test]
    async fn a_node_agent_gets_identities_of_pods_on_its_own_node_only() {
        let agent1 = review(AGENT, Some("ztunnel-a"));
        let client = id("mesh", "client");
        let d = ask(&agent1, &client, Some(&client.to_string())).await;
        assert_eq!(d.result, Ok(client.clone()));
        assert_eq!(d.node.as_deref(), Some("node1"));

        // An empty serviceAccountName is the `default` account.
        let default = id("mesh", "default");
        let d = ask(&agent1, &default, Some(&default.to_string())).await;
        assert_eq!(d.result, Ok(default));

        // `server` runs on node2 only.
        let server = id("mesh", "server");
        let d = ask(&agent1, &server, Some(&server.to_string())).await;
        assert!(
            matches!(&d.result, Err(Refusal::PermissionDenied(m)) if m.contains("node1")),
            "{d:?}"
        );
        let agent2 = review(AGENT, Some("ztunnel-b"));
        let d = ask(&agent2, &server, Some(&server.to_string())).await;
        assert_eq!(d.result, Ok(server));
    }

    #[tokio::test]
    async fn the_csr_must_name_the_identity_asked_for() {
        let agent1 = review(AGENT, Some("ztunnel-a"));
        let client = id("mesh", "client");
        let d = ask(&agent1, &id("mesh", "server"), Some(&client.to_string())).await;
        assert!(
            matches!(&d.result, Err(Refusal::PermissionDenied(m)) if m.contains("CSR")),
            "{d:?}"
        );
        let d = ask(&agent1, &client, Some("not-a-spiffe-id")).await;
        assert!(
            matches!(d.result, Err(Refusal::InvalidArgument(_))),
            "{d:?}"
        );
        let other_td = SpiffeId::new("evil.local", "mesh", "client");
        let d = ask(&agent1, &other_td, None).await;
        assert!(
            matches!(d.result, Err(Refusal::PermissionDenied(_))),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn workloads_get_their_own_identity_and_nothing_else() {
        let pod = review("system:serviceaccount:mesh:client", None);
        let own = id("mesh", "client");
        assert_eq!(ask(&pod, &own, None).await.result, Ok(own));
        let other = id("mesh", "server");
        let d = ask(&pod, &other, Some(&other.to_string())).await;
        assert!(
            matches!(&d.result, Err(Refusal::PermissionDenied(m)) if m.contains("not a node agent")),
            "{d:?}"
        );
    }

    #[tokio::test]
    async fn a_node_agent_token_without_a_bound_pod_or_with_a_stale_one_is_refused() {
        let client = id("mesh", "client");
        let unbound = review(AGENT, None);
        let d = ask(&unbound, &client, Some(&client.to_string())).await;
        assert!(
            matches!(&d.result, Err(Refusal::PermissionDenied(m)) if m.contains("not bound")),
            "{d:?}"
        );
        let mut stale = review(AGENT, Some("ztunnel-a"));
        stale
            .extra
            .insert(POD_UID_KEY.into(), vec!["uid-of-an-older-pod".into()]);
        let d = ask(&stale, &client, Some(&client.to_string())).await;
        assert!(
            matches!(&d.result, Err(Refusal::PermissionDenied(m)) if m.contains("re-created")),
            "{d:?}"
        );
        let gone = review(AGENT, Some("ztunnel-gone"));
        let d = ask(&gone, &client, Some(&client.to_string())).await;
        assert!(
            matches!(d.result, Err(Refusal::PermissionDenied(_))),
            "{d:?}"
        );
    }

    #[test]
    fn rejected_tokens_and_non_service_accounts_are_refused() {
        let rejected = ReviewedToken {
            authenticated: false,
            error: Some("invalid bearer token".into()),
            ..ReviewedToken::default()
        };
        assert!(matches!(
            caller_of(&rejected),
            Err(Refusal::Unauthenticated(m)) if m.contains("invalid bearer token")
        ));
        let user = review("alice", None);
        assert!(matches!(
            caller_of(&user),
            Err(Refusal::PermissionDenied(_))
        ));
        assert_eq!(
            Refusal::Unauthenticated("x".into()).status().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            Refusal::PermissionDenied("x".into()).status().code(),
            tonic::Code::PermissionDenied
        );
    }
}

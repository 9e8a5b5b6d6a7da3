//! The CA service's questions to the API server: TokenReview (who is calling) and pod
//! look-ups (where the caller runs, what runs there). It needs `create` on
//! `tokenreviews.authentication.k8s.io` and `get`/`list` on pods (deploy/rbac/ztunnel-ca.yaml).

use std::path::Path;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};

use super::authorize::{Lookup, PodDirectory, PodView, Refusal, ReviewedToken};

/// A client of the API server with the CA's own credentials.
#[derive(Clone)]
pub struct KubeDirectory {
    client: Client,
}

impl std::fmt::Debug for KubeDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeDirectory").finish_non_exhaustive()
    }
}

impl KubeDirectory {
    /// Connects with `kubeconfig`, else the in-cluster service account.
    pub async fn connect(kubeconfig: Option<&Path>) -> Result<KubeDirectory, String> {
        let client = crate::source::kube::client(kubeconfig).await?;
        Ok(KubeDirectory { client })
    }

    /// Asks the API server whether `token` is valid and whose it is. The review is made for
    /// the API server's own audiences, which is what service-account tokens carry by default.
    pub async fn review(&self, token: &str) -> Result<ReviewedToken, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        let user = status.user.unwrap_or_default();
        Ok(ReviewedToken {
            authenticated: status.authenticated.unwrap_or(false),
            username: user.username.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
            error: status.error,
        })
    }
}

fn view(pod: Pod) -> PodView {
    let spec = pod.spec.unwrap_or_default();
    PodView {
        name: pod.metadata.name.unwrap_or_default(),
        uid: pod.metadata.uid,
        service_account: spec.service_account_name.unwrap_or_default(),
        node_name: spec.node_name.filter(|n| !n.is_empty()),
        phase: pod.status.and_then(|s| s.phase),
    }
}

impl PodDirectory for KubeDirectory {
    fn pod<'a>(&'a self, namespace: &'a str, name: &'a str) -> Lookup<'a, Option<PodView>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let pod = api.get_opt(name).await.map_err(|e| {
                Refusal::Unavailable(format!("reading pod {namespace}/{name}: {e}"))
            })?;
            Ok(pod.map(view))
        })
    }

    fn pods_on_node<'a>(&'a self, namespace: &'a str, node: &'a str) -> Lookup<'a, Vec<PodView>> {
        Box::pin(async move {
            let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
            let params = ListParams::default().fields(&format!("spec.nodeName={node}"));
            let pods = api.list(&params).await.map_err(|e| {
                Refusal::Unavailable(format!("listing pods of {namespace} on {node}: {e}"))
            })?;
            Ok(pods.items.into_iter().map(view).collect())
        })
    }
}

//! The state source of `--source kube`: one watch per kind on the Kubernetes API server.
//!
//! Each kind is listed, then watched (kube-runtime's `watcher`, which re-lists after a broken
//! watch and backs off while the API server is away). Objects are typed on arrival by the same
//! translation as the state files ([`crate::k8s::from_json`]) and applied one at a time to a
//! [`Model`]; a burst of events becomes one new [`State`]. While a watch is broken the last
//! state stays in force and [`SourceHealth`] counts how stale it is; a re-list replaces that
//! kind's objects as a whole once it is complete.
//!
//! The kinds: Namespaces, Pods (all of them: endpoints live on every node), Services,
//! `security.istio.io` AuthorizationPolicy and PeerAuthentication (whichever of v1 and v1beta1
//! the server prefers), and Gateway API Gateway and HTTPRoute (for waypoints). The security
//! kinds are required: without them the daemon cannot know what to refuse, so it stays not
//! ready. The Gateway API kinds are optional: many clusters do not install them.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::api::{Api, ApiResource};
use kube::core::ObjectMeta as WatchMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Client;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, watch};

use super::{log_applied, SourceError, SourceHealth, StateSource};
use crate::k8s::{self, Object, ObjectError};
use crate::state::{Model, State};

/// One kind the source watches.
#[derive(Debug)]
struct Kind {
    kind: &'static str,
    /// API group; empty for the core group.
    group: &'static str,
    /// Resource name, for URLs and RBAC messages.
    plural: &'static str,
    /// Without it the daemon does not become ready.
    required: bool,
}

const KINDS: &[Kind] = &[
    Kind {
        kind: "Namespace",
        group: "",
        plural: "namespaces",
        required: true,
    },
    Kind {
        kind: "Pod",
        group: "",
        plural: "pods",
        required: true,
    },
    Kind {
        kind: "Service",
        group: "",
        plural: "services",
        required: true,
    },
    Kind {
        kind: "AuthorizationPolicy",
        group: "security.istio.io",
        plural: "authorizationpolicies",
        required: true,
    },
    Kind {
        kind: "PeerAuthentication",
        group: "security.istio.io",
        plural: "peerauthentications",
        required: true,
    },
    Kind {
        kind: "Gateway",
        group: "gateway.networking.k8s.io",
        plural: "gateways",
        required: false,
    },
    Kind {
        kind: "HTTPRoute",
        group: "gateway.networking.k8s.io",
        plural: "httproutes",
        required: false,
    },
];

impl Kind {
    /// `pods` or `authorizationpolicies.security.istio.io`, as RBAC and kubectl name it.
    fn resource(&self) -> String {
        match self.group {
            "" => self.plural.to_string(),
            g => format!("{}.{g}", self.plural),
        }
    }
}

/// First and longest wait before a failed watch lists its kind again.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(500);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How long an optional kind that is not installed waits before it is looked for again.
const NOT_INSTALLED_RETRY: Duration = Duration::from_secs(30);

/// An object as typed on arrival: `Ok(None)` for a kind the daemon does not use yet.
type Typed = Result<Option<Object>, ObjectError>;

/// `(namespace, name)`.
type Key = (String, String);

/// What a watch task reports.
#[derive(Debug)]
enum Update {
    /// A re-list started: until `Listed`, objects are collected, not applied.
    Relist,
    /// An object added or changed (boxed: objects are large, the other updates small).
    Apply { key: Key, object: Box<Typed> },
    /// An object deleted.
    Delete { key: Key },
    /// The list is complete: objects not seen in it are gone.
    Listed,
    /// The optional kind is not served by this API server; it counts as listed and empty.
    NotInstalled,
    /// The watch failed; it is retried with backoff.
    Error(String),
}

/// Per kind: whether it is current. Which objects of the kind exist is the model's to say
/// ([`Model::keys`]), asked when a list begins.
#[derive(Debug, Default)]
struct KindState {
    /// A list in progress.
    relist: Option<Relist>,
    /// Listed at least once.
    synced: bool,
}

/// A list of one kind in progress.
#[derive(Debug, Default)]
struct Relist {
    /// Objects in the model when the list began that it has not brought (yet): at its end,
    /// they are gone.
    unseen: HashSet<Key>,
    /// Objects the list brought, for the log.
    listed: usize,
    /// Objects of a re-list, held until it is complete so that the state in force is never a
    /// mix of the old and the new view. The first list of a kind has no view to protect (the
    /// daemon is not ready until every kind is listed), so its objects are applied as they
    /// arrive: each typed object is freed before the next is read, instead of 10,000 of them
    /// being alive at once while the model allocates what it keeps among them.
    held: Vec<(Key, Typed)>,
}

/// Follows the API server and publishes a new [`State`] after each burst of changes.
#[derive(Debug)]
pub struct KubeSource {
    kubeconfig: Option<PathBuf>,
    model: Model,
    generation: u64,
    kinds: BTreeMap<&'static str, KindState>,
    updates: Option<mpsc::Receiver<(&'static Kind, Update)>>,
    health: Arc<SourceHealth>,
}

impl KubeSource {
    /// See [`Model::keep_policy_objects`].
    pub(super) fn keep_policy_objects(&mut self, keep: bool) {
        self.model.keep_policy_objects(keep);
    }

    /// A source that reaches the API server through `kubeconfig`, or the in-cluster service
    /// account when `None`.
    pub fn new(kubeconfig: Option<PathBuf>, trust_domain: &str) -> Self {
        KubeSource {
            kubeconfig,
            model: Model::new(trust_domain),
            generation: 0,
            kinds: KINDS
                .iter()
                .map(|k| (k.kind, KindState::default()))
                .collect(),
            updates: None,
            health: Arc::new(SourceHealth::new("kube", KINDS.iter().map(|k| k.kind))),
        }
    }

    async fn client(&self) -> Result<Client, String> {
        client(self.kubeconfig.as_deref()).await
    }

    /// Starts one watch task per kind (once).
    async fn start(&mut self) -> Result<(), String> {
        if self.updates.is_some() {
            return Ok(());
        }
        let client = self.client().await?;
        let (tx, rx) = mpsc::channel(4096);
        for kind in KINDS {
            tokio::spawn(watch_kind(client.clone(), kind, tx.clone()));
        }
        self.updates = Some(rx);
        Ok(())
    }

    /// Applies one update; true when the model changed.
    fn apply(&mut self, kind: &'static Kind, update: Update) -> bool {
        let Some(ks) = self.kinds.get_mut(kind.kind) else {
            return false;
        };
        let mut changed = false;
        match update {
            Update::Relist => {
                // Everything the model holds of the kind is unconfirmed until listed again,
                // including what a list that broke off had already applied or confirmed.
                ks.relist = Some(Relist {
                    unseen: self.model.keys(kind.kind),
                    ..Relist::default()
                })
            }
            Update::Apply { key, object } => match &mut ks.relist {
                Some(list) => {
                    list.unseen.remove(&key);
                    list.listed += 1;
                    if ks.synced {
                        list.held.push((key, *object));
                    } else {
                        changed = apply_object(&mut self.model, kind, &key, *object);
                    }
                }
                None => changed = apply_object(&mut self.model, kind, &key, *object),
            },
            Update::Delete { key } => {
                self.model.delete(kind.kind, &key.0, &key.1);
                if let Some(list) = &mut ks.relist {
                    list.unseen.remove(&key);
                }
                changed = true;
            }
            Update::Listed => {
                let Relist {
                    unseen,
                    listed,
                    held,
                } = ks.relist.take().unwrap_or_default();
                for gone in unseen {
                    self.model.delete(kind.kind, &gone.0, &gone.1);
                    changed = true;
                }
                for (key, object) in held {
                    changed |= apply_object(&mut self.model, kind, &key, object);
                }
                if !ks.synced {
                    tracing::info!(kind = kind.kind, objects = listed, "kube: listed");
                }
                ks.synced = true;
                self.health.set_ok(kind.kind);
            }
            Update::NotInstalled if kind.required => {
                let e = format!(
                    "{} is not served by the API server: install its CustomResourceDefinition; \
                     until then the daemon cannot know which traffic to refuse and stays not ready",
                    kind.resource()
                );
                if self.health.set_error(kind.kind, &e) {
                    tracing::error!(kind = kind.kind, resource = %kind.resource(), "kube: {e}");
                }
            }
            Update::NotInstalled => {
                if !ks.synced {
                    tracing::warn!(
                        kind = kind.kind,
                        resource = %kind.resource(),
                        "kube: resource not served by the API server (CRD not installed?); \
                         treated as empty, looked for again every 30s"
                    );
                }
                ks.synced = true;
                self.health.set_ok(kind.kind);
            }
            Update::Error(e) => {
                if self.health.set_error(kind.kind, &e) {
                    tracing::warn!(kind = kind.kind, resource = %kind.resource(), error = %e, "kube: watch failed; the last state stays in force, retrying with backoff");
                }
            }
        }
        if changed {
            self.health.set_ok(kind.kind);
        }
        changed
    }

    /// Whether every required kind (and every optional one, installed or not) is listed.
    fn complete(&self) -> bool {
        self.kinds.values().all(|k| k.synced)
    }

    /// Waits for the next update, applies it and every update already queued behind it.
    /// Returns whether the model changed and when the first update arrived, or `None` when
    /// every watch task is gone.
    async fn next_batch(&mut self) -> Option<(bool, Instant)> {
        let rx = self.updates.as_mut()?;
        let (kind, first) = rx.recv().await?;
        let arrived = Instant::now();
        let mut batch = vec![(kind, first)];
        while batch.len() < 10_000 {
            match rx.try_recv() {
                Ok(u) => batch.push(u),
                Err(_) => break,
            }
        }
        let mut changed = false;
        for (kind, u) in batch {
            changed |= self.apply(kind, u);
        }
        Some((changed, arrived))
    }

    fn publish(&mut self, tx: &watch::Sender<Arc<State>>, arrived: Option<Instant>) {
        self.generation += 1;
        let state = self.model.snapshot(self.generation);
        log_applied(&state, arrived.map(|t| t.elapsed()), None);
        tx.send_replace(Arc::new(state));
        tokio::spawn(crate::memory::trim_after_state_change());
    }
}

/// Applies a typed object, or logs why it cannot be (the previous version, if any, stays).
fn apply_object(
    model: &mut Model,
    kind: &Kind,
    key: &Key,
    object: Result<Option<Object>, ObjectError>,
) -> bool {
    match object {
        Ok(Some(o)) => {
            model.apply(o);
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(
                kind = kind.kind,
                object = %format!("{}/{}", key.0, key.1),
                field = %e.field,
                error = %e.message,
                "kube: object rejected; its last good version (if any) stays in force"
            );
            false
        }
    }
}

impl StateSource for KubeSource {
    fn health(&self) -> Arc<SourceHealth> {
        self.health.clone()
    }

    fn first_complete<'a>(&'a mut self, tx: &'a watch::Sender<Arc<State>>) -> BoxFuture<'a, ()> {
        async move {
            let mut delay = Duration::from_millis(500);
            while let Err(e) = self.start().await {
                tracing::warn!(error = %e, "kube: cannot reach the API server; retrying");
                self.health.set_error("client", &e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            self.health.set_ok("client");
            while !self.complete() {
                if self.next_batch().await.is_none() {
                    return std::future::pending().await;
                }
            }
            self.publish(tx, None);
        }
        .boxed()
    }

    fn run(mut self: Box<Self>, tx: watch::Sender<Arc<State>>) -> BoxFuture<'static, ()> {
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    batch = self.next_batch() => match batch {
                        Some((true, arrived)) => self.publish(&tx, Some(arrived)),
                        Some((false, _)) => {}
                        None => return,
                    },
                    _ = tick.tick() => self.health.refresh(),
                }
            }
        }
        .boxed()
    }

    fn initial(&mut self) -> Result<State, SourceError> {
        if let Some(path) = &self.kubeconfig {
            kube::config::Kubeconfig::read_from(path).map_err(|e| SourceError::Kube {
                error: format!("kubeconfig {}: {e}", path.display()),
            })?;
        }
        Ok(State::default())
    }
}

/// Lists and watches one kind for ever, sending what happens to the source.
async fn watch_kind(
    client: Client,
    kind: &'static Kind,
    tx: mpsc::Sender<(&'static Kind, Update)>,
) {
    let send = |u: Update| tx.send((kind, u));
    let ar = loop {
        match resource(&client, kind).await {
            Ok(Some(ar)) => break ar,
            Ok(None) => {
                if send(Update::NotInstalled).await.is_err() {
                    return;
                }
                tokio::time::sleep(NOT_INSTALLED_RETRY).await;
            }
            Err(e) => {
                if send(Update::Error(e)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let api: Api<RawObject> = Api::all_with(client, &ar);
    // A watcher resumes a broken watch silently, so a recovery would never be seen; instead
    // each failure ends this watcher and a new one lists the kind again (after a backoff),
    // which both proves the view current and replaces whatever was missed.
    let mut backoff = WATCH_BACKOFF_MIN;
    loop {
        let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(event) = events.next().await {
            let update = match event {
                Ok(Event::Init) => Update::Relist,
                Ok(Event::InitApply(o) | Event::Apply(o)) => {
                    let key = key_of(&o);
                    Update::Apply {
                        key,
                        object: Box::new(typed(&ar, o)),
                    }
                }
                Ok(Event::Delete(o)) => Update::Delete { key: key_of(&o) },
                Ok(Event::InitDone) => {
                    backoff = WATCH_BACKOFF_MIN;
                    Update::Listed
                }
                Err(e) => Update::Error(describe(kind, &e)),
            };
            let failed = matches!(update, Update::Error(_));
            if send(update).await.is_err() {
                return;
            }
            if failed {
                break;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

/// The API resource of `kind`: fixed for the core group, discovered (preferred version) for
/// the others. `Ok(None)`: the server does not serve it.
async fn resource(client: &Client, kind: &Kind) -> Result<Option<ApiResource>, String> {
    if kind.group.is_empty() {
        return Ok(Some(ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: kind.kind.into(),
            plural: kind.plural.into(),
        }));
    }
    match kube::discovery::group(client, kind.group).await {
        Ok(g) => Ok(g.recommended_kind(kind.kind).map(|(ar, _)| ar)),
        Err(kube::Error::Discovery(_)) => Ok(None),
        Err(e) => Err(format!("discovering {}: {e}", kind.resource())),
    }
}

/// An object as the API server sent it: its JSON text, typed only once it has been taken off
/// the wire, and the metadata the watch itself needs (name, namespace, resource version).
///
/// Why not `DynamicObject`: that builds a JSON tree of the whole object (`managedFields`,
/// container specs, conditions: thousands of small allocations per pod), and typing went
/// through a second tree. At 10,000 pods that garbage, interleaved on the heap with what the
/// model keeps, stayed resident as fragments. The text of one object is a single allocation,
/// and typing it reads only the fields the daemon uses.
#[derive(Clone, Debug)]
struct RawObject {
    metadata: WatchMeta,
    json: Box<RawValue>,
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// The only metadata read before typing; an object whose metadata does not even fit
        /// this is rejected when typed, with its field, not here (which would fail its page).
        #[derive(Default, Deserialize)]
        #[serde(default, rename_all = "camelCase")]
        struct Meta {
            name: Option<String>,
            namespace: Option<String>,
            resource_version: Option<String>,
        }
        #[derive(Default, Deserialize)]
        #[serde(default)]
        struct Head {
            metadata: Meta,
        }
        let json = Box::<RawValue>::deserialize(d)?;
        let head: Head = serde_json::from_str(json.get()).unwrap_or_default();
        Ok(RawObject {
            metadata: WatchMeta {
                name: head.metadata.name,
                namespace: head.metadata.namespace,
                resource_version: head.metadata.resource_version,
                ..WatchMeta::default()
            },
            json,
        })
    }
}

impl kube::Resource for RawObject {
    type DynamicType = ApiResource;
    type Scope = kube::core::DynamicResourceScope;

    fn group(ar: &ApiResource) -> std::borrow::Cow<'_, str> {
        ar.group.as_str().into()
    }

    fn version(ar: &ApiResource) -> std::borrow::Cow<'_, str> {
        ar.version.as_str().into()
    }

    fn kind(ar: &ApiResource) -> std::borrow::Cow<'_, str> {
        ar.kind.as_str().into()
    }

    fn api_version(ar: &ApiResource) -> std::borrow::Cow<'_, str> {
        ar.api_version.as_str().into()
    }

    fn plural(ar: &ApiResource) -> std::borrow::Cow<'_, str> {
        ar.plural.as_str().into()
    }

    fn meta(&self) -> &WatchMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut WatchMeta {
        &mut self.metadata
    }
}

fn key_of(o: &RawObject) -> Key {
    (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    )
}

/// Types an object through the translation the state files use. Items of a list carry no
/// `apiVersion`/`kind`; the watched resource supplies them.
fn typed(ar: &ApiResource, o: RawObject) -> Result<Option<Object>, ObjectError> {
    k8s::from_json_text(&ar.api_version, &ar.kind, o.json.get())
}

/// An operator-facing reason for a failed list or watch: what is missing, and which
/// permission when the API server refused.
fn describe(kind: &Kind, e: &watcher::Error) -> String {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.as_ref()),
        watcher::Error::WatchError(s) => Some(s.as_ref()),
        _ => None,
    };
    match api {
        Some(s) if s.code == 403 => format!(
            "forbidden: the service account needs get, list and watch on {} at cluster scope ({})",
            kind.resource(),
            s.message
        ),
        Some(s) if s.code == 401 => format!(
            "unauthorized: the API server rejected the credentials ({})",
            s.message
        ),
        Some(s) if s.code == 404 => format!(
            "{} is not served by the API server ({})",
            kind.resource(),
            s.message
        ),
        _ => e.to_string(),
    }
}

/// An API client through `kubeconfig`, or the in-cluster service account when `None` (the
/// source's watches, the CA service's reviews, and the daemon's exit check in
/// [`crate::cni::install`]).
pub(crate) async fn client(kubeconfig: Option<&std::path::Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?
        }
        None => {
            kube::Config::incluster().map_err(|e| format!("in-cluster service account: {e}"))?
        }
    };
    Client::try_from(config).map_err(|e| format!("API client: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(name: &str) -> &'static Kind {
        KINDS.iter().find(|k| k.kind == name).expect("known kind")
    }

    fn pod(name: &str, ip: &str) -> Update {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "a"},
            "spec": {"nodeName": "n1"},
            "status": {"podIP": ip, "phase": "Running"},
        });
        Update::Apply {
            key: ("a".into(), name.into()),
            object: Box::new(k8s::from_json_text("v1", "Pod", &json.to_string())),
        }
    }

    fn pods_resource() -> ApiResource {
        ApiResource {
            group: String::new(),
            version: "v1".into(),
            api_version: "v1".into(),
            kind: "Pod".into(),
            plural: "pods".into(),
        }
    }

    #[test]
    fn a_list_page_and_a_watch_event_keep_each_object_whole_until_typed() {
        // As an API server sends a page of pods: one good, one whose IP is not a string.
        // The page must load (the bad pod fails alone, naming its field), and what the
        // watch itself needs (name, namespace, resource version) is read without typing.
        let page = r#"{"kind":"PodList","apiVersion":"v1","metadata":{"resourceVersion":"41"},
            "items":[
              {"metadata":{"name":"good","namespace":"a","resourceVersion":"40",
                           "managedFields":[{"manager":"kubelet","fieldsV1":{"f:status":{}}}]},
               "spec":{"nodeName":"n1","containers":[{"name":"app","image":"x"}]},
               "status":{"podIP":"10.0.0.1","phase":"Running","conditions":[{"type":"Ready"}]}},
              {"metadata":{"name":"bad","namespace":"a","resourceVersion":"39"},
               "status":{"podIP":5,"phase":"Running"}}]}"#;
        let list: kube::core::ObjectList<RawObject> =
            serde_json::from_str(page).expect("the page loads");
        assert_eq!(list.items.len(), 2);
        assert_eq!(key_of(&list.items[0]), ("a".into(), "good".into()));
        assert_eq!(
            list.items[1].metadata.resource_version.as_deref(),
            Some("39")
        );
        let ar = pods_resource();
        let mut items = list.items.into_iter();
        let good = typed(&ar, items.next().expect("good"));
        let Ok(Some(Object::Pod(pod))) = good else {
            panic!("typed: {good:?}");
        };
        assert_eq!(pod.metadata.name, "good");
        let bad = typed(&ar, items.next().expect("bad")).expect_err("rejected");
        assert_eq!(bad.field, "status.podIP");

        let event = r#"{"type":"MODIFIED","object":{"kind":"Pod","apiVersion":"v1",
            "metadata":{"name":"good","namespace":"a","resourceVersion":"42"},
            "status":{"podIP":"10.0.0.2","phase":"Running"}}}"#;
        let event: kube::core::WatchEvent<RawObject> =
            serde_json::from_str(event).expect("the event loads");
        let kube::core::WatchEvent::Modified(o) = event else {
            panic!("modified");
        };
        assert_eq!(
            kube::ResourceExt::resource_version(&o).as_deref(),
            Some("42")
        );
    }

    #[test]
    fn a_relist_replaces_the_kind_only_once_complete() {
        let mut src = KubeSource::new(None, "cluster.local");
        let pods = kind("Pod");
        src.apply(pods, Update::Relist);
        src.apply(pods, pod("p1", "10.0.0.1"));
        src.apply(pods, pod("p2", "10.0.0.2"));
        // The first list is applied as it arrives (nothing is published until every kind
        // is listed).
        assert!(!src.complete());
        assert!(!src.apply(pods, Update::Listed));
        assert_eq!(src.model.snapshot(2).workloads.len(), 2);

        // The watch breaks; the last state stays, and the view is reported stale.
        src.apply(pods, Update::Error("connection refused".into()));
        assert_eq!(src.model.snapshot(3).workloads.len(), 2);
        assert!(!src.health.snapshot()["in_sync"].as_bool().expect("bool"));

        // A re-list without p1 removes it; a bad object keeps nothing new.
        src.apply(pods, Update::Relist);
        src.apply(pods, pod("p2", "10.0.0.2"));
        src.apply(pods, pod("p3", "not-an-ip"));
        assert_eq!(
            src.model.snapshot(4).workloads.len(),
            2,
            "a re-list is held until complete"
        );
        assert!(src.apply(pods, Update::Listed));
        let s = src.model.snapshot(4);
        assert_eq!(s.workloads.len(), 1);
        assert!(s.workload("10.0.0.2".parse().expect("ip")).is_some());
        assert!(src.health.snapshot()["in_sync"].as_bool().expect("bool"));

        src.apply(
            pods,
            Update::Delete {
                key: ("a".into(), "p2".into()),
            },
        );
        assert!(src.model.snapshot(5).workloads.is_empty());

        // A re-list that breaks off and starts again: p4 and p5 are in force; the first
        // attempt brings p4 only, the second p6 only. At its end p4 and p5 are both gone,
        // although the second attempt began after p5 had already gone unconfirmed.
        src.apply(pods, Update::Relist);
        src.apply(pods, pod("p4", "10.0.0.4"));
        src.apply(pods, pod("p5", "10.0.0.5"));
        assert!(src.apply(pods, Update::Listed));
        src.apply(pods, Update::Relist);
        src.apply(pods, pod("p4", "10.0.0.4"));
        src.apply(pods, Update::Error("connection reset".into()));
        src.apply(pods, Update::Relist);
        src.apply(pods, pod("p6", "10.0.0.6"));
        assert_eq!(
            src.model.snapshot(6).workloads.len(),
            2,
            "p4, p5 until listed"
        );
        assert!(src.apply(pods, Update::Listed));
        let s = src.model.snapshot(7);
        assert_eq!(s.workloads.len(), 1);
        assert!(s.workload("10.0.0.6".parse().expect("ip")).is_some());
    }

    #[test]
    fn missing_security_crds_keep_the_source_incomplete_but_gateway_api_is_optional() {
        let mut src = KubeSource::new(None, "cluster.local");
        for k in KINDS {
            src.apply(k, Update::Relist);
            src.apply(k, Update::Listed);
        }
        assert!(src.complete());
        let mut src = KubeSource::new(None, "cluster.local");
        for k in KINDS {
            let u = if k.group.is_empty() {
                Update::Listed
            } else {
                Update::NotInstalled
            };
            src.apply(k, u);
        }
        assert!(!src.complete());
        let failing = src.health.snapshot()["failing"].clone();
        assert!(failing["AuthorizationPolicy"]["error"]
            .as_str()
            .expect("error")
            .contains("authorizationpolicies.security.istio.io is not served"));
        assert!(failing.get("Gateway").is_none());
    }
}

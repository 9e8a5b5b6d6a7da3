//! The state source of `--state`: a file or a directory of Kubernetes YAML, watched by polling.
//!
//! Polling (default every 500 ms) is used instead of inotify because it behaves the same for
//! plain files, editors' rename-on-save, and ConfigMap volumes (whose files are symlinks that
//! are swapped atomically), and the files are small. Each file is parsed on its own: a file
//! with a bad document keeps its last good content in force while the other files update, and
//! the rejection is logged with file, document and field.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

use super::{log_applied, SourceError, SourceHealth, StateSource};
use crate::k8s::{self, Object};
use crate::state::Model;
use crate::state::State;

/// How old a file's modification time must be before an unchanged stamp means an unchanged
/// file.
const STAMP_SETTLE: Duration = Duration::from_secs(1);

/// `(kind, namespace, name)`: what identifies an object across files and versions.
type ObjectKey = (&'static str, String, String);

fn object_key(o: &Object) -> ObjectKey {
    let m = o.meta();
    (
        o.kind(),
        m.namespace.clone().unwrap_or_default(),
        m.name.clone(),
    )
}

#[derive(Debug)]
struct FileEntry {
    /// Modification time and size when last read: a file whose stamp is unchanged is not read
    /// again (a poll of a large state directory then costs one `stat` per file).
    stamp: Option<(std::time::SystemTime, u64)>,
    /// Hash of the text last read, to detect changes without keeping the text.
    hash: u64,
    /// The objects of the last version that parsed (they live in the model).
    keys: Vec<ObjectKey>,
    /// Some version of this file has parsed.
    good: bool,
}

/// Polls a file or directory and applies what changed to a [`Model`]: only changed files are
/// parsed again, and only their objects are re-applied or removed.
#[derive(Debug)]
pub struct FileSource {
    path: PathBuf,
    interval: Duration,
    files: BTreeMap<PathBuf, FileEntry>,
    model: Model,
    generation: u64,
    health: Arc<SourceHealth>,
}

impl FileSource {
    /// A source for `path` (file or directory), read every `interval`.
    pub fn new(path: &Path, trust_domain: &str, interval: Duration) -> Self {
        FileSource {
            path: path.to_path_buf(),
            interval,
            files: BTreeMap::new(),
            model: Model::new(trust_domain),
            generation: 0,
            health: Arc::new(SourceHealth::new("file", ["files"].into_iter())),
        }
    }

    /// Reads the source once. Returns a new state when anything accepted changed.
    pub fn poll(&mut self) -> Result<Option<State>, SourceError> {
        let paths = self.list()?;
        let mut changed = false;
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !paths.contains(p))
            .cloned()
            .collect();
        for p in gone {
            if let Some(f) = self.files.remove(&p) {
                self.retract(&p, f.keys);
                changed = true;
            }
        }
        for p in paths {
            let stamp = std::fs::metadata(&p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())));
            // A stamp is trusted only once it is a second old: two writes of the same size
            // within one tick of the file system's clock would otherwise look like one.
            let settled = stamp.is_some_and(|(m, _)| m.elapsed().is_ok_and(|a| a > STAMP_SETTLE));
            if settled && self.files.get(&p).is_some_and(|f| f.stamp == stamp) {
                continue;
            }
            let text = match std::fs::read_to_string(&p) {
                Ok(t) => t,
                // Removed between listing and reading: the next poll sees it gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(SourceError::Read { path: p, error }),
            };
            let hash = text_hash(&text);
            if let Some(f) = self.files.get_mut(&p).filter(|f| f.hash == hash) {
                f.stamp = stamp;
                continue;
            }
            match k8s::parse_file(&p, &text) {
                Ok(objects) => {
                    let keys: Vec<ObjectKey> = objects.iter().map(object_key).collect();
                    let entry = FileEntry {
                        stamp,
                        hash,
                        keys: keys.clone(),
                        good: true,
                    };
                    let old = self.files.insert(p.clone(), entry);
                    for o in objects {
                        self.model.apply(o);
                    }
                    let removed = old
                        .map(|f| f.keys)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|k| !keys.contains(k))
                        .collect();
                    self.retract(&p, removed);
                    changed = true;
                }
                Err(e) => {
                    tracing::warn!(
                        file = %e.file.display(),
                        document = e.document,
                        field = %e.field,
                        error = %e.message,
                        "state rejected"
                    );
                    // Remember the bad version so it is reported once, but keep the last
                    // good objects of this file in force.
                    let f = self.files.entry(p).or_insert(FileEntry {
                        stamp,
                        hash,
                        keys: Vec::new(),
                        good: false,
                    });
                    f.hash = hash;
                    f.stamp = stamp;
                }
            }
        }
        if !changed && self.generation > 0 {
            return Ok(None);
        }
        self.generation += 1;
        Ok(Some(self.model.snapshot(self.generation)))
    }

    /// Removes objects that file `from` no longer has. One that another file also defines
    /// stays, in that file's version (read again: this is rare, and keeping every file's
    /// objects in memory for it would double the state's size).
    fn retract(&mut self, from: &Path, keys: Vec<ObjectKey>) {
        for key in keys {
            let other = self
                .files
                .iter()
                .find(|(p, f)| p.as_path() != from && f.keys.contains(&key))
                .map(|(p, _)| p.clone());
            let again = other.and_then(|p| {
                let text = std::fs::read_to_string(&p).ok()?;
                k8s::parse_file(&p, &text)
                    .ok()?
                    .into_iter()
                    .find(|o| object_key(o) == key)
            });
            match again {
                Some(o) => self.model.apply(o),
                None => self.model.delete(key.0, &key.1, &key.2),
            }
        }
    }

    /// Whether every file present has parsed at least once: until then the state is
    /// incomplete (a pod file that never parsed would leave its pods unknown), and the daemon
    /// does not report ready.
    pub fn complete(&self) -> bool {
        self.files.values().all(|f| f.good)
    }

    fn list(&self) -> Result<Vec<PathBuf>, SourceError> {
        let read_err = |error| SourceError::Read {
            path: self.path.clone(),
            error,
        };
        let meta = std::fs::metadata(&self.path).map_err(read_err)?;
        if !meta.is_dir() {
            return Ok(vec![self.path.clone()]);
        }
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.path).map_err(read_err)? {
            let p = entry.map_err(read_err)?.path();
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let yaml = name.ends_with(".yaml") || name.ends_with(".yml") || name.ends_with(".json");
            if yaml && !name.starts_with('.') && p.is_file() {
                out.push(p);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Polls until every file has parsed once (see [`FileSource::complete`]), publishing each
    /// state read meanwhile. Read errors are logged and retried.
    async fn poll_until_complete(&mut self, tx: &watch::Sender<Arc<State>>) {
        while !self.complete() {
            tokio::time::sleep(self.interval).await;
            match self.poll() {
                Ok(Some(s)) => {
                    tx.send_replace(Arc::new(s));
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "state source unreadable; not ready"),
            }
        }
    }

    /// Polls forever, publishing each new state. Read errors are logged and retried: the
    /// daemon keeps its last good state while the source is unavailable.
    async fn poll_forever(mut self, tx: watch::Sender<Arc<State>>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let started = std::time::Instant::now();
            match self.poll() {
                Ok(Some(state)) => {
                    self.health.set_ok("files");
                    log_applied(&state, Some(started.elapsed()));
                    tx.send_replace(Arc::new(state));
                }
                Ok(None) => self.health.set_ok("files"),
                Err(e) => {
                    if self.health.set_error("files", &e.to_string()) {
                        tracing::warn!(error = %e, "state source unreadable; keeping last good state");
                    }
                }
            }
        }
    }
}

fn text_hash(text: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}

impl StateSource for FileSource {
    fn health(&self) -> Arc<SourceHealth> {
        self.health.clone()
    }

    /// The first poll: an unreadable path stops the start; files that do not parse yet leave
    /// the state incomplete.
    fn initial(&mut self) -> Result<State, SourceError> {
        Ok(self.poll()?.unwrap_or_default())
    }

    fn first_complete<'a>(&'a mut self, tx: &'a watch::Sender<Arc<State>>) -> BoxFuture<'a, ()> {
        Box::pin(self.poll_until_complete(tx))
    }

    fn run(self: Box<Self>, tx: watch::Sender<Arc<State>>) -> BoxFuture<'static, ()> {
        Box::pin(self.poll_forever(tx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
    const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1, phase: Running}\n";

    #[test]
    fn bad_file_keeps_its_last_good_objects_while_others_update() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
        std::fs::write(dir.path().join("pod.yaml"), POD).expect("write");
        let mut src = FileSource::new(dir.path(), "cluster.local", Duration::from_millis(10));
        let s = src.poll().expect("reads").expect("first state");
        assert_eq!(s.workloads.len(), 1);
        assert!(
            src.poll().expect("reads").is_none(),
            "no change, no new state"
        );

        std::fs::write(
            dir.path().join("pod.yaml"),
            POD.replace("10.0.0.1", "not-an-ip"),
        )
        .expect("write");
        // The bad file changes nothing: no new state, the pod stays.
        assert!(src.poll().expect("reads").is_none());

        std::fs::write(
            dir.path().join("ns.yaml"),
            NS.replace(
                "{name: a}",
                "{name: a, labels: {istio.io/dataplane-mode: ambient}}",
            ),
        )
        .expect("write");
        let s = src.poll().expect("reads").expect("ns changed");
        let w = s
            .workloads
            .values()
            .next()
            .expect("pod kept from last good file");
        assert!(w.enrolled, "other file's update applied");
    }

    #[tokio::test]
    async fn first_complete_waits_until_every_file_has_parsed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
        std::fs::write(
            dir.path().join("pod.yaml"),
            "apiVersion: v1\nkind: Pod\nmetadata: [\n",
        )
        .expect("write");
        let mut src = FileSource::new(dir.path(), "cluster.local", Duration::from_millis(10));
        let first = src.initial().expect("readable");
        assert!(first.workloads.is_empty());
        let (tx, rx) = watch::channel(Arc::new(first));
        let wait = tokio::time::timeout(Duration::from_millis(100), src.first_complete(&tx));
        assert!(wait.await.is_err(), "a file never parsed: not complete");

        std::fs::write(dir.path().join("pod.yaml"), POD).expect("write");
        let wait = tokio::time::timeout(Duration::from_secs(5), src.first_complete(&tx));
        wait.await.expect("complete once the file parses");
        assert_eq!(
            rx.borrow().workloads.len(),
            1,
            "the complete state is published"
        );
    }

    #[test]
    fn only_changed_files_are_re_applied_and_removed_objects_leave() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pod2 = POD
            .replace("name: p,", "name: p2,")
            .replace("10.0.0.1", "10.0.0.2");
        std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
        std::fs::write(dir.path().join("pods.yaml"), format!("{POD}---\n{pod2}")).expect("write");
        // The same pod in a second file: removing it from one file keeps it.
        std::fs::write(dir.path().join("more.yaml"), POD).expect("write");
        let mut src = FileSource::new(dir.path(), "cluster.local", Duration::from_millis(10));
        assert_eq!(
            src.poll().expect("reads").expect("state").workloads.len(),
            2
        );

        std::fs::write(dir.path().join("pods.yaml"), &pod2).expect("write");
        let s = src.poll().expect("reads").expect("changed");
        assert_eq!(s.workloads.len(), 2, "p is still in more.yaml");

        std::fs::remove_file(dir.path().join("more.yaml")).expect("rm");
        let s = src.poll().expect("reads").expect("changed");
        assert_eq!(s.workloads.len(), 1);
        assert!(s.workload("10.0.0.2".parse().expect("ip")).is_some());
    }
}

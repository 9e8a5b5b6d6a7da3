//! The state source of `--state`: a file or a directory of Kubernetes YAML, watched by polling.
//!
//! Polling (default every 500 ms) is used instead of inotify because it behaves the same for
//! plain files, editors' rename-on-save, and ConfigMap volumes (whose files are symlinks that
//! are swapped atomically). Each file is read on its own, and only when its modification time
//! or size changed; a changed file is split into its YAML documents and only the documents
//! whose text changed are parsed and applied (a one-label edit in a 3.6 MB file of 13,000
//! objects parses one document), objects no longer present are removed. A document that does
//! not parse keeps its last good version in force while the file's other documents update;
//! a file that cannot be read (not UTF-8, larger than `--state-max-file-size`, an I/O error)
//! keeps all its last good content while the other files update. A problem is logged once
//! per change with the file (and document and field); an unreadable file is shown as a
//! failing part of the source's health until it is readable again.
//!
//! Reading and parsing run on a blocking thread of the runtime (`spawn_blocking`), never on
//! the control thread, whose accept loops hand captured connections to the workers: a large
//! or slow file delays only the next state, not new flows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
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

/// `(kind, namespace/name)`: what identifies an object across files and versions (one
/// allocation per object: the source keeps one for each of a large state's objects).
type ObjectKey = (&'static str, Box<str>);

fn object_key(o: &Object) -> ObjectKey {
    let m = o.meta();
    let ns = m.namespace.as_deref().unwrap_or_default();
    (o.kind(), format!("{ns}/{}", m.name).into_boxed_str())
}

/// Deletes the object `key` names from `model`.
fn delete(model: &mut Model, key: &ObjectKey) {
    let (ns, name) = key.1.split_once('/').unwrap_or(("", &key.1));
    model.delete(key.0, ns, name);
}

/// One YAML document of a file as last read.
#[derive(Debug, Clone)]
struct Document {
    /// Hash of its text: an unchanged document is neither parsed nor applied again.
    hash: u64,
    /// The objects of its last version that parsed (they live in the model); empty while it
    /// never parsed.
    keys: Box<[ObjectKey]>,
    /// Its current text parsed (else `keys` are of an earlier version, kept in force).
    parsed: bool,
    /// Some version of it has parsed.
    ever_parsed: bool,
}

#[derive(Debug)]
struct FileEntry {
    /// Modification time and size when last read: a file whose stamp is unchanged is not read
    /// again (a poll of a large state directory then costs one `stat` per file).
    stamp: Option<(std::time::SystemTime, u64)>,
    /// Hash of the text last read, to detect changes without keeping the text.
    hash: u64,
    /// Its documents, in order.
    docs: Vec<Document>,
    /// Some version of each of its documents has parsed (else the state is incomplete).
    good: bool,
    /// Why the file cannot be read now (logged when it changes).
    unreadable: Option<String>,
}

/// Why one file of the source was not read; its last good content stays in force.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Larger than `--state-max-file-size`.
    #[error(
        "state file {path} is {size} bytes, over the {cap}-byte limit (--state-max-file-size); \
         its last good content stays in force"
    )]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The limit.
        cap: u64,
    },
    /// An I/O error, or content that is not UTF-8.
    #[error("state file {path} cannot be read: {error}; its last good content stays in force")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
}

/// Polls a file or directory and applies what changed to a [`Model`]: only changed files are
/// parsed again, and only their objects are re-applied or removed.
#[derive(Debug)]
pub struct FileSource {
    interval: Duration,
    /// The poller's state; locked only by the one poll in progress (on the poll thread).
    poller: Arc<Mutex<Poller>>,
    /// Where polls are sent to run ([`spawn_poll_thread`]); started by the first poll, and
    /// again if it ever stops.
    polls: Mutex<Option<mpsc::Sender<PollRequest>>>,
    health: Arc<SourceHealth>,
}

/// A poll to run on the poll thread, and how to tell its caller it is done.
type PollRequest = Box<dyn FnOnce(Result<(), SourceError>) + Send>;

/// Starts the thread every poll of a source runs on, for the source's life (it ends when the
/// source is dropped). One thread rather than the blocking pool's, which come and go and take
/// turns: glibc gives each thread its own arena, and with the model's objects spread over
/// several arenas, each kept pages part live and part free. A stream of 500 file updates grew
/// the daemon's resident memory by 8 MiB while the heap in use stayed flat.
fn spawn_poll_thread(poller: Arc<Mutex<Poller>>) -> std::io::Result<mpsc::Sender<PollRequest>> {
    let (tx, rx) = mpsc::channel::<PollRequest>();
    std::thread::Builder::new()
        .name("state-files".into())
        .spawn(move || {
            for done in rx {
                let mut p = poller.lock().unwrap_or_else(|p| p.into_inner());
                let polled = p.poll().map(|state| {
                    if state.is_some() {
                        p.pending = state;
                    }
                });
                drop(p);
                done(polled);
            }
        })?;
    Ok(tx)
}

#[derive(Debug)]
struct Poller {
    path: PathBuf,
    max_file_size: u64,
    files: BTreeMap<PathBuf, FileEntry>,
    model: Model,
    generation: u64,
    health: Arc<SourceHealth>,
    /// The newest modification time of the files whose change is in the state not yet
    /// logged as applied (for `since_write_us`).
    written: Option<std::time::SystemTime>,
    /// A new state a poll produced that was not handed out yet: the caller of
    /// [`FileSource::poll_off_thread`] may be dropped while its poll runs on, and the change
    /// must not be lost with it.
    pending: Option<State>,
}

impl FileSource {
    /// A source for `path` (file or directory), read every `interval`; a file larger than
    /// `max_file_size` bytes is not read.
    pub fn new(path: &Path, trust_domain: &str, interval: Duration, max_file_size: u64) -> Self {
        let health = Arc::new(SourceHealth::new("file", ["files"].into_iter()));
        FileSource {
            interval,
            poller: Arc::new(Mutex::new(Poller {
                path: path.to_path_buf(),
                max_file_size,
                files: BTreeMap::new(),
                model: Model::new(trust_domain),
                generation: 0,
                health: health.clone(),
                written: None,
                pending: None,
            })),
            polls: Mutex::new(None),
            health,
        }
    }

    /// See [`Model::keep_policy_objects`].
    pub(super) fn keep_policy_objects(&self, keep: bool) {
        self.poller().model.keep_policy_objects(keep);
    }

    fn poller(&self) -> std::sync::MutexGuard<'_, Poller> {
        self.poller.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads the source once (on the poll thread, waiting for it). Returns a new state when
    /// anything accepted changed.
    pub fn poll(&mut self) -> Result<Option<State>, SourceError> {
        futures::executor::block_on(self.poll_off_thread())
    }

    /// [`FileSource::poll`] without blocking the runtime. A new state is kept in the poller
    /// until handed out, so a caller dropped mid-poll (start-up racing signals) loses nothing.
    async fn poll_off_thread(&self) -> Result<Option<State>, SourceError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.start_poll(Box::new(move |polled| {
            let _ = tx.send(polled);
        }))?;
        rx.await.unwrap_or_else(|_| Err(poll_lost()))?;
        Ok(self.poller().pending.take())
    }

    /// Hands a poll to the poll thread, starting it first if needed.
    fn start_poll(&self, request: PollRequest) -> Result<(), SourceError> {
        let mut polls = self.polls.lock().unwrap_or_else(|p| p.into_inner());
        let tx = match polls.take() {
            Some(tx) => tx,
            None => spawn_poll_thread(self.poller.clone()).map_err(|e| SourceError::Poll {
                error: format!("cannot start the thread that reads the state files: {e}"),
            })?,
        };
        // A thread that stopped (a poll panicked) fails this poll and is replaced at the next.
        tx.send(request).map_err(|_| poll_lost())?;
        *polls = Some(tx);
        Ok(())
    }

    /// Whether every file present has parsed at least once: until then the state is
    /// incomplete (a pod file that never parsed would leave its pods unknown), and the daemon
    /// does not report ready.
    pub fn complete(&self) -> bool {
        self.poller().files.values().all(|f| f.good)
    }
}

impl Poller {
    fn poll(&mut self) -> Result<Option<State>, SourceError> {
        self.written = None;
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
                if f.unreadable.is_some() {
                    self.health.set_ok(&part(&p));
                }
                let keys = f.docs.into_iter().flat_map(|d| d.keys.into_vec()).collect();
                self.retract(&p, keys);
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
            let text = match self.read(&p, stamp.map(|(_, len)| len)) {
                Ok(t) => t,
                // Removed between listing and reading: the next poll sees it gone.
                Err(FileError::Read { error, .. })
                    if error.kind() == std::io::ErrorKind::NotFound =>
                {
                    continue
                }
                Err(e) => {
                    self.unreadable(p, e);
                    continue;
                }
            };
            self.readable(&p);
            // The text is hashed once, document by document; the file's hash is theirs.
            let pieces: Vec<(&str, u64)> = k8s::split_documents(&text)
                .into_iter()
                .map(|d| (d, text_hash(d)))
                .collect();
            let hash = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                pieces.iter().for_each(|(_, d)| d.hash(&mut h));
                h.finish()
            };
            if let Some(f) = self.files.get_mut(&p).filter(|f| f.hash == hash) {
                f.stamp = stamp;
                continue;
            }
            let old = self.files.remove(&p);
            let (docs, applied, removed) = self.read_documents(&p, &pieces, old.as_ref());
            let good = docs.iter().all(|d| d.ever_parsed);
            self.files.insert(
                p.clone(),
                FileEntry {
                    stamp,
                    hash,
                    docs,
                    good,
                    unreadable: old.and_then(|f| f.unreadable),
                },
            );
            if applied || !removed.is_empty() {
                changed = true;
                let mtime = stamp.map(|(m, _)| m);
                self.written = self.written.max(mtime);
            }
            self.retract(&p, removed);
        }
        if !changed && self.generation > 0 {
            return Ok(None);
        }
        self.generation += 1;
        Ok(Some(self.model.snapshot(self.generation)))
    }

    /// Applies what changed in file `p` (now the documents `pieces`, with their hashes) since
    /// `old`: only documents whose text is new are parsed and their objects applied, in
    /// document order. A document that does not parse is logged and keeps in force the objects
    /// of `old` that no other document has (its last good version, and the deletions the file
    /// makes until it parses again). Returns the new documents, whether anything was applied, and the keys `old`
    /// had that the file no longer has (for [`Poller::retract`]).
    fn read_documents(
        &mut self,
        p: &Path,
        pieces: &[(&str, u64)],
        old: Option<&FileEntry>,
    ) -> (Vec<Document>, bool, Vec<ObjectKey>) {
        let old_docs = old.map(|f| f.docs.as_slice()).unwrap_or_default();
        // Unchanged documents are found by their text's hash, wherever they moved.
        let mut by_hash: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, d) in old_docs.iter().enumerate().rev() {
            by_hash.entry(d.hash).or_default().push(i);
        }
        let mut docs = Vec::new();
        let mut applied = false;
        for (index, &(piece, hash)) in pieces.iter().enumerate() {
            if let Some(i) = by_hash.get_mut(&hash).and_then(Vec::pop) {
                docs.push(old_docs[i].clone());
                continue;
            }
            match k8s::parse_file(p, piece) {
                Ok(objects) => {
                    let keys = objects.iter().map(object_key).collect();
                    for o in objects {
                        self.model.apply(o);
                        applied = true;
                    }
                    docs.push(Document {
                        hash,
                        keys,
                        parsed: true,
                        ever_parsed: true,
                    });
                }
                Err(e) => {
                    tracing::warn!(
                        file = %e.file.display(),
                        document = index,
                        field = %e.field,
                        error = %e.message,
                        "state rejected"
                    );
                    // Its last good version stays in force: below, it keeps the objects of the
                    // previous version that no other document accounts for.
                    let last = old_docs.get(index);
                    docs.push(Document {
                        hash,
                        keys: Box::default(),
                        parsed: false,
                        ever_parsed: last.is_some_and(|d| d.ever_parsed),
                    });
                }
            }
        }
        if let Some(bad) = docs.iter().position(|d| !d.parsed && d.keys.is_empty()) {
            // Which object a malformed document stood for cannot be known: the objects of the
            // last good version that no document accounts for now stay in force with it (a
            // deletion elsewhere in the file waits until the file parses again).
            let now: HashSet<&ObjectKey> = docs.iter().flat_map(|d| d.keys.iter()).collect();
            let kept: Box<[ObjectKey]> = old_docs
                .iter()
                .flat_map(|d| d.keys.iter())
                .filter(|k| !now.contains(k))
                .cloned()
                .collect();
            docs[bad].ever_parsed |= !kept.is_empty();
            docs[bad].keys = kept;
        }
        let now: HashSet<&ObjectKey> = docs.iter().flat_map(|d| d.keys.iter()).collect();
        if applied && now.len() < docs.iter().map(|d| d.keys.len()).sum::<usize>() {
            // An object defined twice in the file: the later definition wins, as when the
            // file is read whole, so its documents are applied again in order (rare).
            for ((piece, _), _) in pieces.iter().zip(&docs).filter(|(_, d)| d.parsed) {
                for o in k8s::parse_file(p, piece).unwrap_or_default() {
                    self.model.apply(o);
                }
            }
        }
        let removed = old_docs
            .iter()
            .flat_map(|d| d.keys.iter())
            .filter(|k| !now.contains(k))
            .cloned()
            .collect();
        (docs, applied, removed)
    }

    /// Removes objects that file `from` no longer has. One that another file also defines
    /// stays, in that file's version (read again: this is rare, and keeping every file's
    /// objects in memory for it would double the state's size).
    fn retract(&mut self, from: &Path, keys: Vec<ObjectKey>) {
        for key in keys {
            let other = self
                .files
                .iter()
                .find(|(p, f)| p.as_path() != from && f.docs.iter().any(|d| d.keys.contains(&key)))
                .map(|(p, _)| p.clone());
            let again = other.and_then(|p| {
                let text = self.read(&p, None).ok()?;
                k8s::parse_file(&p, &text)
                    .ok()?
                    .into_iter()
                    .find(|o| object_key(o) == key)
            });
            match again {
                Some(o) => self.model.apply(o),
                None => delete(&mut self.model, &key),
            }
        }
    }

    /// The text of `p`, unless it is over the size cap (`len`: its size from a `stat`, if
    /// known) or unreadable.
    fn read(&self, p: &Path, len: Option<u64>) -> Result<String, FileError> {
        use std::io::Read;
        let err = |error| FileError::Read {
            path: p.to_path_buf(),
            error,
        };
        let too_large = |size| FileError::TooLarge {
            path: p.to_path_buf(),
            size,
            cap: self.max_file_size,
        };
        if let Some(len) = len.filter(|l| *l > self.max_file_size) {
            return Err(too_large(len));
        }
        // The file may grow between the stat and the read: read at most one byte past the cap.
        let file = std::fs::File::open(p).map_err(err)?;
        let mut bytes = Vec::new();
        file.take(self.max_file_size.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(err)?;
        let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        if size > self.max_file_size {
            return Err(too_large(size));
        }
        String::from_utf8(bytes)
            .map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
    }

    /// Records that `p` cannot be read: its last good objects stay; logged when the reason
    /// changes, shown in the source's health until the file is readable again or gone.
    fn unreadable(&mut self, p: PathBuf, e: FileError) {
        let reason = e.to_string();
        let f = self.files.entry(p.clone()).or_insert(FileEntry {
            stamp: None,
            hash: 0,
            docs: Vec::new(),
            good: false,
            unreadable: None,
        });
        // No stamp: the file is tried again on every poll until it reads.
        f.stamp = None;
        if f.unreadable.as_deref() != Some(reason.as_str()) {
            tracing::warn!(file = %p.display(), error = %reason, "state file unreadable");
            f.unreadable = Some(reason.clone());
        }
        self.health.set_error(&part(&p), &reason);
    }

    /// `p` was read: clears what [`Poller::unreadable`] recorded.
    fn readable(&mut self, p: &Path) {
        if let Some(f) = self.files.get_mut(p) {
            if f.unreadable.take().is_some() {
                self.health.set_ok(&part(p));
            }
        }
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
}

/// The health part of one file.
fn part(p: &Path) -> String {
    format!("file {}", p.display())
}

impl FileSource {
    /// Polls until every file has parsed once (see [`FileSource::complete`]), publishing each
    /// state read meanwhile. Read errors are logged and retried.
    async fn poll_until_complete(&mut self, tx: &watch::Sender<Arc<State>>) {
        while !self.complete() || self.poller().pending.is_some() {
            tokio::time::sleep(self.interval).await;
            match self.poll_off_thread().await {
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
    async fn poll_forever(self, tx: watch::Sender<Arc<State>>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let started = std::time::Instant::now();
            match self.poll_off_thread().await {
                Ok(Some(state)) => {
                    self.health.set_ok("files");
                    let written = self.poller().written.take();
                    let since_write = written.and_then(|w| w.elapsed().ok());
                    log_applied(&state, Some(started.elapsed()), since_write);
                    tx.send_replace(Arc::new(state));
                    tokio::spawn(crate::memory::trim_after_state_change());
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

/// A poll that ended without answering: its thread stopped.
fn poll_lost() -> SourceError {
    SourceError::Poll {
        error: "the thread reading the state files stopped".into(),
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
#[path = "file_tests.rs"]
mod tests;

//! Tests of the file source: per-file and per-document change detection, bad and unreadable
//! files and documents keeping their last good version.

use super::*;

const NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n";
fn source(dir: &Path, max_file_size: u64) -> FileSource {
    FileSource::new(
        dir,
        "cluster.local",
        Duration::from_millis(10),
        max_file_size,
    )
}

/// Rewrites `ns.yaml` with the namespace enrolled.
fn enroll_namespace(dir: &Path) {
    let ns = NS.replace(
        "{name: a}",
        "{name: a, labels: {istio.io/dataplane-mode: ambient}}",
    );
    std::fs::write(dir.join("ns.yaml"), ns).expect("write");
}

const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: a}\nspec: {nodeName: n}\nstatus: {podIP: 10.0.0.1, phase: Running}\n";

#[test]
fn bad_file_keeps_its_last_good_objects_while_others_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
    std::fs::write(dir.path().join("pod.yaml"), POD).expect("write");
    let mut src = source(dir.path(), 1 << 20);
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

    enroll_namespace(dir.path());
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
    let mut src = source(dir.path(), 1 << 20);
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
    let mut src = source(dir.path(), 1 << 20);
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

#[test]
fn oversized_or_unreadable_file_keeps_its_objects_and_never_blocks_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
    std::fs::write(dir.path().join("pod.yaml"), POD).expect("write");
    let mut src = source(dir.path(), 400);
    assert_eq!(
        src.poll().expect("reads").expect("state").workloads.len(),
        1
    );

    // pod.yaml grows over the cap, and another file is not UTF-8.
    let big = format!("{POD}# {}\n", "x".repeat(500));
    std::fs::write(dir.path().join("pod.yaml"), big).expect("write");
    std::fs::write(dir.path().join("junk.yaml"), b"kind: \xff\xfe\n").expect("write");
    // Meanwhile ns.yaml changes: that update still goes through.
    enroll_namespace(dir.path());
    let s = src
        .poll()
        .expect("one bad file is no source error")
        .expect("ns changed");
    let w = s
        .workloads
        .values()
        .next()
        .expect("pod kept from its last good version");
    assert!(w.enrolled, "the other file's update applied");
    assert!(!src.complete(), "junk.yaml never read: incomplete");

    let health = src.health().snapshot();
    let failing = health["failing"]
        .as_object()
        .expect("failing parts")
        .clone();
    let pod_err = failing
        .iter()
        .find(|(k, _)| k.ends_with("pod.yaml"))
        .map(|(_, v)| v["error"].as_str().unwrap_or_default().to_string())
        .expect("pod.yaml failing");
    assert!(
        pod_err.contains("pod.yaml")
            && pod_err.contains("400-byte limit")
            && pod_err.contains("--state-max-file-size"),
        "{pod_err}"
    );
    assert!(
        failing.keys().any(|k| k.ends_with("junk.yaml")),
        "{failing:?}"
    );
    assert!(
        src.poll().expect("reads").is_none(),
        "nothing new: no new state"
    );

    // Fixed: read again, the health parts clear.
    std::fs::write(
        dir.path().join("pod.yaml"),
        POD.replace("10.0.0.1", "10.0.0.9"),
    )
    .expect("write");
    std::fs::remove_file(dir.path().join("junk.yaml")).expect("rm");
    let s = src.poll().expect("reads").expect("pod changed");
    assert!(s.workload("10.0.0.9".parse().expect("ip")).is_some());
    assert!(src.complete());
    assert!(src.health().in_sync(), "{}", src.health().snapshot());
}

/// Pod `name` at `ip` labelled `app: <app>`, as one document.
fn pod(name: &str, ip: &str, app: &str) -> String {
    format!("---\n{{apiVersion: v1, kind: Pod, metadata: {{name: {name}, namespace: a, labels: {{app: {app}}}}}, spec: {{nodeName: n}}, status: {{podIP: {ip}, phase: Running}}}}\n")
}

fn workload(s: &State, ip: &str) -> Arc<crate::state::Workload> {
    s.workload(ip.parse().expect("ip"))
        .expect("workload")
        .clone()
}

#[test]
fn an_edit_re_applies_only_the_documents_that_changed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("all.yaml");
    let write = |docs: &[String]| std::fs::write(&file, docs.concat()).expect("write");
    let mut docs = vec![
        format!("# the namespace first\n---\n{NS}"),
        pod("p1", "10.0.0.1", "x"),
        pod("p2", "10.0.0.2", "x"),
        pod("p3", "10.0.0.3", "x"),
    ];
    write(&docs);
    let mut src = source(dir.path(), 1 << 20);
    let s1 = src.poll().expect("reads").expect("state");
    assert_eq!(s1.workloads.len(), 3);

    // One label edited: only that pod is translated again (the others are the very same
    // objects in the new snapshot).
    docs[2] = pod("p2", "10.0.0.2", "edited");
    write(&docs);
    let s2 = src.poll().expect("reads").expect("changed");
    assert_eq!(workload(&s2, "10.0.0.2").labels.get("app"), Some("edited"));
    assert!(Arc::ptr_eq(
        &workload(&s1, "10.0.0.1"),
        &workload(&s2, "10.0.0.1")
    ));
    assert!(Arc::ptr_eq(
        &workload(&s1, "10.0.0.3"),
        &workload(&s2, "10.0.0.3")
    ));

    // Renamed: the old name leaves, the new one arrives; a removed document's pod leaves.
    docs[3] = pod("p3-renamed", "10.0.0.3", "x");
    docs.remove(1);
    write(&docs);
    let s3 = src.poll().expect("reads").expect("changed");
    assert!(
        s3.workload("10.0.0.1".parse().expect("ip")).is_none(),
        "p1 deleted"
    );
    assert_eq!(workload(&s3, "10.0.0.3").name, "p3-renamed");
    assert_eq!(s3.workloads.len(), 2);
    assert!(Arc::ptr_eq(
        &workload(&s2, "10.0.0.2"),
        &workload(&s3, "10.0.0.2")
    ));

    // Documents reordered only: nothing to apply, no new state.
    docs.swap(1, 2);
    write(&docs);
    assert!(src.poll().expect("reads").is_none());
}

#[test]
fn a_malformed_document_keeps_its_last_good_version_and_the_others_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("all.yaml");
    let write = |docs: &[String]| std::fs::write(&file, docs.concat()).expect("write");
    let mut docs = vec![
        NS.to_string(),
        pod("p1", "10.0.0.1", "x"),
        pod("p2", "10.0.0.2", "x"),
    ];
    write(&docs);
    let mut src = source(dir.path(), 1 << 20);
    src.poll().expect("reads").expect("state");

    docs[1] = pod("p1", "not-an-ip", "y");
    docs[2] = pod("p2", "10.0.0.2", "y");
    write(&docs);
    let s = src.poll().expect("reads").expect("p2 changed");
    assert_eq!(
        workload(&s, "10.0.0.1").labels.get("app"),
        Some("x"),
        "p1's last good version stays"
    );
    assert_eq!(workload(&s, "10.0.0.2").labels.get("app"), Some("y"));
    assert!(src.complete(), "every document has parsed once");

    // Fixed: the document is applied.
    docs[1] = pod("p1", "10.0.0.1", "z");
    write(&docs);
    let s = src.poll().expect("reads").expect("p1 fixed");
    assert_eq!(workload(&s, "10.0.0.1").labels.get("app"), Some("z"));

    // A new document that never parsed leaves the state incomplete.
    docs.push("---\nkind: Pod\nmetadata: [\n".into());
    write(&docs);
    assert!(src.poll().expect("reads").is_none());
    assert!(!src.complete());
}

#[test]
fn an_object_defined_twice_in_a_file_keeps_its_later_definition() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("all.yaml");
    let write = |docs: &[String]| std::fs::write(&file, docs.concat()).expect("write");
    let mut docs = vec![pod("p", "10.0.0.1", "first"), pod("p", "10.0.0.1", "last")];
    write(&docs);
    let mut src = source(dir.path(), 1 << 20);
    let s = src.poll().expect("reads").expect("state");
    assert_eq!(workload(&s, "10.0.0.1").labels.get("app"), Some("last"));
    docs[0] = pod("p", "10.0.0.1", "first-edited");
    write(&docs);
    let s = src.poll().expect("reads").expect("changed");
    assert_eq!(workload(&s, "10.0.0.1").labels.get("app"), Some("last"));
}

/// The daemon's runtimes are single-threaded: the poll goes to a blocking thread there.
#[tokio::test(flavor = "current_thread")]
async fn polls_run_on_a_blocking_thread_of_a_single_threaded_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("ns.yaml"), NS).expect("write");
    let src = source(dir.path(), 1 << 20);
    let state = src.poll_off_thread().await.expect("reads").expect("state");
    assert_eq!(state.generation, 1);
}

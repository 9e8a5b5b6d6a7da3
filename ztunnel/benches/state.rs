//! The daemon's own cost of one change to a large cluster state: 10,000 pods in 200
//! namespaces, 2,000 Services and 1,000 AuthorizationPolicies.
//!
//! `cargo bench -p ztunnel --bench state` (optionally `-- <rounds>`). Prints the median and
//! worst of each kind of change applied to a [`Model`] and the snapshot taken after it (what a
//! state source does per event): a pod relabelled, a namespace label flipped, a policy edited.
//! The time from the API server to the daemon (watch delivery) is not part of it; the
//! end-to-end figure comes from the namespace-cluster benchmark.

use std::fmt::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use ztunnel::k8s;
use ztunnel::state::Model;

/// Counts the heap the process holds, as glibc would size it (chunks of at least 32 bytes,
/// 16-byte aligned, 8 bytes of header): what the model and a snapshot cost in memory.
struct Counting;

static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn chunk(size: usize) -> usize {
    ((size + 8 + 15) & !15).max(32)
}

// SAFETY: forwards to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        HELD.fetch_add(chunk(l.size()), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's layout, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        HELD.fetch_sub(chunk(l.size()), std::sync::atomic::Ordering::Relaxed);
        // SAFETY: `p` came from `alloc` with this layout.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn held_mib() -> f64 {
    HELD.load(std::sync::atomic::Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

const NAMESPACES: usize = 200;
const PODS: usize = 10_000;
const SERVICES: usize = 2_000;
const POLICIES: usize = 1_000;

fn pod(out: &mut String, i: usize, app_label: &str) {
    let ns = i % NAMESPACES;
    let _ = write!(
        out,
        "---\n{{apiVersion: v1, kind: Pod, metadata: {{name: p{i}, namespace: ns{ns}, labels: {{app: {app_label}, version: v1}}}}, \
         spec: {{nodeName: node{node}, serviceAccountName: sa{app}, containers: [{{ports: [{{name: http, containerPort: 8080}}]}}]}}, \
         status: {{podIP: 10.{a}.{b}.{c}, phase: Running, conditions: [{{type: Ready, status: 'True'}}]}}}}\n",
        node = i % 100,
        app = i % 10,
        a = 100 + i / 65536,
        b = i / 256 % 256,
        c = i % 256,
    );
}

fn namespace(out: &mut String, ns: usize, ambient: bool) {
    let labels = if ambient {
        "{istio.io/dataplane-mode: ambient}"
    } else {
        "{}"
    };
    let _ = writeln!(
        out,
        "---\n{{apiVersion: v1, kind: Namespace, metadata: {{name: ns{ns}, labels: {labels}}}}}"
    );
}

fn policy(out: &mut String, i: usize, port: u16) {
    let _ = writeln!(
        out,
        "---\n{{apiVersion: security.istio.io/v1, kind: AuthorizationPolicy, metadata: {{name: ap{i}, namespace: ns{ns}}}, \
         spec: {{selector: {{matchLabels: {{app: app{app}}}}}, rules: [{{from: [{{source: {{principals: [cluster.local/ns/ns{ns}/sa/sa1]}}}}], to: [{{operation: {{ports: ['{port}']}}}}]}}]}}}}",
        ns = i % NAMESPACES,
        app = i % 10,
    );
}

fn objects(yaml: &str) -> Vec<k8s::Object> {
    k8s::parse_file(Path::new("bench.yaml"), yaml).expect("bench YAML parses")
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50);
    let mut yaml = String::new();
    for ns in 0..NAMESPACES {
        namespace(&mut yaml, ns, true);
    }
    for i in 0..PODS {
        pod(&mut yaml, i, &format!("app{}", i % 10));
    }
    for i in 0..SERVICES {
        let _ = writeln!(
            yaml,
            "---\n{{apiVersion: v1, kind: Service, metadata: {{name: s{i}, namespace: ns{ns}}}, spec: {{clusterIP: 10.96.{a}.{b}, selector: {{app: app{app}}}, ports: [{{port: 80, targetPort: http}}]}}}}",
            ns = i % NAMESPACES,
            app = i % 10,
            a = i / 256,
            b = i % 256,
        );
    }
    for i in 0..POLICIES {
        policy(&mut yaml, i, 8080);
    }
    let before = held_mib();
    let all = objects(&yaml);
    let parsed = held_mib() - before;
    let t = Instant::now();
    let mut model = Model::new("cluster.local");
    // As in the node daemon: compiled policies only.
    model.keep_policy_objects(false);
    let breakdown = std::env::var_os("STATE_BENCH_BREAKDOWN").is_some();
    let mut kept: std::collections::BTreeMap<&str, f64> = Default::default();
    for o in all {
        if breakdown {
            let a = held_mib();
            let c = o.clone();
            let size = held_mib() - a;
            drop(c);
            let b = held_mib();
            let kind = o.kind();
            model.apply(o);
            *kept.entry(kind).or_default() += held_mib() - b + size;
        } else {
            model.apply(o);
        }
    }
    for (k, v) in &kept {
        println!("  model keeps for {k}: {v:.2} MiB");
    }
    let first = model.snapshot(1);
    println!(
        "initial: {} objects applied and first snapshot in {:.1} ms ({} workloads, {} services)",
        model.len(),
        t.elapsed().as_secs_f64() * 1e3,
        first.workloads.len(),
        first.services.len()
    );
    let with_snapshot = held_mib() - before;
    drop(first);
    println!(
        "heap: {parsed:.1} MiB of parsed objects; model {:.1} MiB, with a snapshot {with_snapshot:.1} MiB",
        held_mib() - before
    );

    let mut generation = 1;
    let mut run = |name: &str, change: &dyn Fn(usize) -> String| {
        let mut took: Vec<Duration> = (0..rounds)
            .map(|r| {
                let objs = objects(&change(r));
                let t = Instant::now();
                for o in objs {
                    model.apply(o);
                }
                generation += 1;
                let s = model.snapshot(generation);
                let e = t.elapsed();
                drop(s);
                e
            })
            .collect();
        took.sort();
        println!(
            "{name:<28} median {:>7.2} ms   max {:>7.2} ms   ({rounds} rounds, apply + snapshot)",
            took[took.len() / 2].as_secs_f64() * 1e3,
            took[took.len() - 1].as_secs_f64() * 1e3,
        );
    };
    run("pod relabelled", &|r| {
        let mut y = String::new();
        pod(
            &mut y,
            r * 7 % PODS,
            if r % 2 == 0 { "moved" } else { "app1" },
        );
        y
    });
    run("namespace label flipped", &|r| {
        let mut y = String::new();
        namespace(&mut y, r % NAMESPACES, r % 2 == 1);
        y
    });
    run("policy edited", &|r| {
        let mut y = String::new();
        policy(
            &mut y,
            r % POLICIES,
            9000 + u16::try_from(r % 100).unwrap_or(0),
        );
        y
    });
    println!(
        "heap after the changes: model {:.1} MiB",
        held_mib() - before
    );
}
